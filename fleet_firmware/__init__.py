"""The controller's side of the cars' Arduino firmware: the sketch built into a release's firmware."""

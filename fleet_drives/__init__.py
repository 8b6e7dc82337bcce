"""The fleet's drives on the controller: recorded episodes collected from the cars' black boxes, merged into
one LeRobotDataset for the next training run."""

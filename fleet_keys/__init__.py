"""The fleet's update repository and its keys: The Update Framework (python-tuf) on the controller."""

"""LeRobotDataset v3.0 reading and a synthetic dataset writer."""

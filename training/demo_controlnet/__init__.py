"""A Canny ControlNet for the demo model, trained by our own code (see train.py)."""

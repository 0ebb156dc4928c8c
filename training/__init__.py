"""Training scripts that build the models the repository ships (not part of the installed package)."""

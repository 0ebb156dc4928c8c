"""Errors about model files. Each message names the file and the problem in one line."""


class ModelFileError(Exception):
    """A model file that cannot be used: corrupt, truncated, unsafe, or of an unknown architecture."""


class ModelNotFoundError(LookupError):
    """No model of that name; the message lists the names that exist."""

"""Errors about model files. Each message names the file and the problem in one line."""

from ..core.errors import MODEL_UNFIT, NOT_FOUND, StudioError


class ModelFileError(StudioError):
    """A model file that cannot be used: corrupt, truncated, unsafe, or of an unknown architecture."""

    kind = MODEL_UNFIT


class ModelNotFoundError(StudioError, LookupError):
    """No model of that name; the message lists the names that exist."""

    kind = NOT_FOUND

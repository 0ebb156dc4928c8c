"""The kinds of error a user can cause, and the one table that says what each means to an HTTP client.

Every error a request can run into carries a ``kind``: the message names the problem for a person, the
kind says what sort of problem it is for a program. The API maps kinds to statuses in one place
(:data:`HTTP_STATUS`); a job that failed keeps its error's kind, so a waiting client gets the same status
as one refused at once.
"""

from __future__ import annotations

BAD_REQUEST = "bad request"  # a field's value cannot be used
NOT_FOUND = "not found"  # no model, upscaler, job... of that name
FORBIDDEN = "forbidden"  # not the caller's, or not on this server (folders when shared)
MODEL_UNFIT = "model unfit"  # a model file that cannot be used: corrupt, unsafe, unknown architecture
TOO_LARGE = "too large"  # over a size limit
TOO_MANY = "too many"  # over a count limit (a client's jobs waiting in the queue)
PLUGIN = "plug-in"  # a plug-in's code failed
INTERNAL = "internal"  # a bug: the message says what, the log has the traceback

HTTP_STATUS = {BAD_REQUEST: 422, NOT_FOUND: 404, FORBIDDEN: 403, MODEL_UNFIT: 422, TOO_LARGE: 413, TOO_MANY: 429,
               PLUGIN: 500, INTERNAL: 500}


class StudioError(Exception):
    """Base of sdstudio's own errors; ``kind`` is one of the constants above."""

    kind = INTERNAL


class RequestError(StudioError, ValueError):
    """A request that cannot run; the message names the bad field and why."""

    kind = BAD_REQUEST


def kind_of(exc: BaseException) -> str:
    """The kind of any exception: ours say it; the standard lookups and value errors are read as theirs."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str) and kind in HTTP_STATUS:
        return kind
    if isinstance(exc, LookupError):
        return NOT_FOUND
    if isinstance(exc, ValueError):
        return BAD_REQUEST
    return INTERNAL


def http_status(exc_or_kind: BaseException | str | None) -> int:
    kind = exc_or_kind if isinstance(exc_or_kind, str) or exc_or_kind is None else kind_of(exc_or_kind)
    return HTTP_STATUS.get(kind or INTERNAL, 500)

"""User-facing errors: one readable message, no traceback, a non-zero exit from the CLI; and
warnings, for what a command did on the user's behalf without stopping."""

import re
import sys

# How torch re-raises an error from a DataLoader worker process: the error's own type, built
# from a message that wraps the worker's whole traceback (torch.utils.data's ExceptionWrapper).
WORKER_WRAPPED = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


class CsmcirError(Exception):
    """An error caused by the user's input (files, config, flags) rather than a bug.

    The CLI prints its message alone and exits with status 2, so every message must name the
    file, key or flag at fault and, where there is one, the fix. Raised in a DataLoader worker
    (``--workers N``), it reaches the main process with that same message, not torch's
    "Caught DataError in DataLoader worker process 0" and the worker's traceback.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        if isinstance(message, str) and (wrapped := WORKER_WRAPPED.match(message)):
            message = _worker_message(type(self), wrapped[1], message)
        super().__init__(message, *args)


def _worker_message(kind: type, name: str, wrapped: str) -> str:
    """The error's own message: what follows the traceback's last ``module.Class: `` line."""
    if name != kind.__name__:
        return wrapped
    last = wrapped.rfind(f"\n{kind.__module__}.{kind.__qualname__}: ")
    if last < 0:
        return wrapped
    return wrapped[last:].split(": ", 1)[1].rstrip("\n")


class DataError(CsmcirError):
    """A dataset on disk is missing, incomplete, or malformed."""


class ConfigError(CsmcirError):
    """A config file or option is wrong."""


def warn(message: str) -> None:
    """Tell the user, on stderr, something that happened without stopping the command: a cut
    text, a rebuilt cache entry, dropped queries. One line starting ``csmcir: warning:``."""
    print(f"csmcir: warning: {message}", file=sys.stderr, flush=True)

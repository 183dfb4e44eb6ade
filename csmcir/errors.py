"""User-facing errors: one readable message, no traceback, a non-zero exit from the CLI; and
warnings, for what a command did on the user's behalf without stopping."""

import sys


class CsmcirError(Exception):
    """An error caused by the user's input (files, config, flags) rather than a bug.

    The CLI prints its message alone and exits with status 2, so every message must name the
    file, key or flag at fault and, where there is one, the fix.
    """


class DataError(CsmcirError):
    """A dataset on disk is missing, incomplete, or malformed."""


class ConfigError(CsmcirError):
    """A config file or option is wrong."""


def warn(message: str) -> None:
    """Tell the user, on stderr, something that happened without stopping the command: a cut
    text, a rebuilt cache entry, dropped queries. One line starting ``csmcir: warning:``."""
    print(f"csmcir: warning: {message}", file=sys.stderr, flush=True)

"""File helpers shared by every module: atomic writes and JSON reads that name the fault."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from csmcir.errors import ConfigError, DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through ``write(fileobj)`` to a temp file in the same folder, then rename.

    A killed process leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file owner-only; give it the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output whose folder cannot be made or written in (a file in
    its way, no permission, a read-only disk), naming ``flag``: found only when the result is
    written, it would cost the work and end in a traceback. Nothing is created."""
    path = Path(path)
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{flag} {path}: its folder {folder} cannot be made, {existing} is a file. "
            f"Give {flag} a path in a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{flag} {path}: {existing} cannot be written in (no permission or a read-only "
            f"disk). Give {flag} a path in a folder you can write"
        )


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dump_json(obj: Any, indent: int | None = 2) -> str:
    """The project's one JSON style: keys in insertion order, UTF-8, a trailing newline."""
    return json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, dump_json(obj, indent))


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Load JSON; a missing file or a syntax error becomes a DataError naming file and position."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"malformed {what} {path}: {e.msg} at line {e.lineno}, column {e.colno} (char {e.pos})"
        ) from None


def torch_load_failure(error: BaseException) -> tuple[str, bool]:
    """Why ``torch.load(weights_only=True)`` did not load a file, in a sentence of our own, and
    whether it refused a pickled Python object (not cut short or corrupt: made elsewhere).

    torch's message is a paragraph whose first line, depending on the version, stops mid-sentence
    ("...you have two options") or advises ``weights_only=False``, which lets the file run code;
    neither belongs in a csmcir message. The specific reason comes after it.
    """
    text = str(error).strip()
    if found := re.search(r"GLOBAL ([\w.]+)", text):
        return f"it holds a pickled Python object of type {found[1]} beside its tensors", True
    if "weights only load failed" in text.lower():
        return "its pickle stream is not one torch.save writes", False
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] if text else type(error).__name__
    return first.rstrip("."), False

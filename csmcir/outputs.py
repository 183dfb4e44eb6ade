"""The one rule for every file or folder a csmcir command writes.

A command writes an output only where nothing is yet (a new path, an empty folder), or where a
csmcir command wrote the same kind of output before: a small provenance record says so. Anything
else there (a dataset, an annotation file, a caption file, a training run folder, an image, any
file csmcir did not write) is left as it is and the command is refused, naming what the path
holds and the flag that goes on. A path that is one of the command's own inputs is refused too.

Where the record lives depends on the output's format:

- a JSON file (evaluation results, an embedding plot's numbers): the top-level key
  ``"@csmcir"``; a merged caption file, keyed by image id only: the run every caption names;
- a PNG (a search grid, an embedding plot): the text chunk ``"@csmcir"``;
- a folder: the record file of its kind (a gallery index's ``meta.json``, a synthetic
  benchmark's ``synth_config.json``, a caption run's ``run.json``, a feature cache's
  ``meta.json``, a training run's ``model/``, checkpoints and logs).

Outputs of an older csmcir, written before these records, are recognised by their layout.

A record is ``{"kind": ..., "command": ..., "identity": {...}}``; the identity names the inputs
that distinguish the output (model, split, captions, query), and default output names carry
the same things, so two different results never get one default name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csmcir.errors import ConfigError, warn
from csmcir.io import check_writable

RECORD_KEY = "@csmcir"

EVAL_RESULTS = "results file"
CAPTION_FILE = "caption file"
GALLERY_INDEX = "gallery index"
SEARCH_GRID = "search grid"
EMBEDDING_PLOT = "embedding plot"
SYNTH_BENCHMARK = "synthetic benchmark"
CAPTION_SHARDS = "caption shard folder"
FEATURE_CACHE = "feature cache"
RUN_FOLDER = "training run folder"
FOLDER_KINDS = (GALLERY_INDEX, SYNTH_BENCHMARK, CAPTION_SHARDS, FEATURE_CACHE, RUN_FOLDER)

# What a training run folder holds (csmcir.model.run_folder, the quickstart's record).
RUN_FOLDER_FILES = ("model", "best", "last.ckpt", "best.ckpt", "quickstart.json", "logs")
INDEX_META, CAPTION_RUN = "meta.json", "run.json"
SYNTH_CONFIG, SYNTH_SCENES = "synth_config.json", "scenes.json"


def record(kind: str, command: str, identity: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance record an output of ``kind`` carries."""
    return {"kind": kind, "command": command, "identity": dict(identity)}


def short_digest(*parts: str | bytes, length: int = 8) -> str:
    """A few hex digits that tell inputs apart in a default output name."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:length]


def file_digest(path: str | Path, length: int = 16) -> str:
    """SHA-256 prefix of a file's bytes: the identity of an image or a caption file."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def read_record(path: Path) -> dict[str, Any] | None:
    """The provenance record of an existing output; None when it carries none."""
    if path.is_dir():
        if (path / SYNTH_CONFIG).is_file() or (path / SYNTH_SCENES).is_file():
            return {"kind": SYNTH_BENCHMARK, "identity": {}}
        if (path / CAPTION_RUN).is_file():
            run = _json(path / CAPTION_RUN)
            ident = {k: run.get(k) for k in ("benchmark", "root", "split")} if run else {}
            return {"kind": CAPTION_SHARDS, "identity": ident}
        meta = _json(path / INDEX_META) if (path / INDEX_META).is_file() else None
        if isinstance(meta, dict) and RECORD_KEY in meta:
            return meta[RECORD_KEY]
        if isinstance(meta, dict) and "model_fingerprint" in meta:  # built by an older csmcir
            return {"kind": GALLERY_INDEX, "identity": {}}
        if isinstance(meta, dict) and "feature_shape" in meta:  # its fingerprint is checked
            return {"kind": FEATURE_CACHE, "identity": {}}  # by csmcir features extract
        run = [name for name in RUN_FOLDER_FILES if (path / name).exists()]
        if run:
            return {"kind": RUN_FOLDER, "identity": {"holding": ", ".join(run)}}
        return None
    if path.suffix.lower() == ".png":
        found = _png_record(path)
        if found is None and _is_plot_report(_json(path.with_suffix(".json"))):
            return {"kind": EMBEDDING_PLOT, "identity": {}}  # drawn by an older csmcir
        return found
    data = _json(path) if path.suffix.lower() == ".json" else None
    if _is_plot_report(data) and RECORD_KEY not in data:
        return {"kind": EMBEDDING_PLOT, "identity": {}}
    if isinstance(data, dict):
        found = data.get(RECORD_KEY)
        if isinstance(found, dict) and "kind" in found:
            return found
        if {"benchmark", "model", "metrics"} <= set(data):  # results of an older csmcir eval
            return {"kind": EVAL_RESULTS, "identity": {}}
        if data and all(  # merged by csmcir caption merge: each caption names its run
            isinstance(v, dict) and {"Final_Caption", "prompt_version", "model"} <= set(v)
            for v in data.values()
        ):
            runs = {v.get("run") for v in data.values()} - {None}
            return {"kind": CAPTION_FILE, "identity": {"run": runs.pop()} if len(runs) == 1 else {}}
    return None


def _is_plot_report(data: Any) -> bool:
    """Whether ``data`` is the numbers ``csmcir plot embeddings`` writes beside its PNG."""
    return isinstance(data, dict) and {"png", "models", "method"} <= set(data)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _png_record(path: Path) -> dict[str, Any] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(RECORD_KEY)
    except (OSError, UnidentifiedImageError):
        return None
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def describe(path: Path, found: dict[str, Any] | None) -> str:
    """What ``path`` holds, as the refusal names it."""
    if found is not None:
        ident = found.get("identity") or {}
        said = ", ".join(f"{k} {v}" for k, v in ident.items() if v is not None)
        return f"a {found['kind']}" + (f" ({said})" if said else "")
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return f"a folder of files csmcir did not write ({shown}), a dataset or someone's work"
    if path.suffix.lower() == ".json":
        data = _json(path)
        if _is_image_list(data):
            return "a JSON map of image ids to image files (a dataset's image list)"
        if (
            isinstance(data, dict)
            and data
            and all(
                isinstance(v, str) or (isinstance(v, dict) and "Final_Caption" in v)
                for v in data.values()
            )
        ):
            return "a caption file that no csmcir command made here"
        if data is not None:
            return f"a JSON {type(data).__name__} csmcir did not write (an annotation file?)"
    return "a file csmcir did not write"


def _is_image_list(data: Any) -> bool:
    """Whether ``data`` maps ids to image file names (CIRR's and synthcir's ``image_splits``),
    which a plain caption file (id -> text) otherwise looks like."""
    from PIL import Image

    return (
        isinstance(data, dict)
        and bool(data)
        and all(
            isinstance(v, str) and Path(v).suffix.lower() in Image.registered_extensions()
            for v in data.values()
        )
    )


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder (links and relative paths included)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def claim(
    path: Path,
    kind: str,
    *,
    flag: str,
    reads: Mapping[str, Path | None] | None = None,
    identity: Mapping[str, Any] | None = None,
    other_identity: str = "replace",
) -> dict[str, Any] | None:
    """Check that a command may write an output of ``kind`` at ``path`` (given by ``flag``).

    ``reads``: the command's other files (its inputs, a second output), what each is
    (``"the --captions file"``) -> its path; writing over one is refused. An output of the
    same kind is replaced (said when its identity differs from ``identity``), unless
    ``other_identity="refuse"``. Returns the record of what is replaced, None for a new path.
    """
    noun = "folder" if kind in FOLDER_KINDS else "file"
    check_writable(path, flag)
    for what, source in (reads or {}).items():
        if source is not None and same_file(path, Path(source)):
            raise ConfigError(
                f"{flag} {path} is also {what}: writing the {kind} there would destroy "
                f"it. Give {flag} another {noun}"
            )
    if not path.exists():
        return None
    if (noun == "folder") != path.is_dir():
        raise ConfigError(
            f"{flag} {path} is a {'folder' if path.is_dir() else 'file'}; give {flag} a {noun} path"
        )
    if noun == "folder" and not any(path.iterdir()):
        return None
    found = read_record(path)
    if found is None or found.get("kind") != kind:
        raise ConfigError(
            f"{flag} {path} holds {describe(path, found)}, not a {kind} csmcir wrote; it is "
            f"left as it is. Give {flag} a new {noun}"
            + (" (or an empty one)" if noun == "folder" else "")
        )
    old = found.get("identity") or {}
    differs = identity is not None and old and dict(old) != dict(identity)
    if differs and other_identity == "refuse":
        raise ConfigError(
            f"{flag} {path} holds the {kind} of {_differences(old, identity)}; it is left as "
            f"it is. Give {flag} a new {noun}, or delete {path} first"
        )
    if differs:
        warn(f"replacing {path}: it held the {kind} of {_differences(old, identity)}")
    return found


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``model A (now B), ...``: what the old output was made from that this one is not,
    a key only one side names included (``none`` on the other)."""
    keys = [*new, *(k for k in old if k not in new)]
    return ", ".join(
        f"{k} {old.get(k, 'none')} (now {new.get(k, 'none')})"
        for k in keys
        if old.get(k) != new.get(k)
    )

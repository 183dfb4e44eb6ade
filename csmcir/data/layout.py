"""What every loader shares: reading annotation records strictly, and the missing-image policy.

Loaders build a :class:`CIRSplit` from the annotation files alone; :func:`apply_missing_policy`
then stats every image the split refers to. A missing image is an error by default. Dropping
is an explicit request, and what it drops is kept on the split and optionally written to a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from csmcir.data.records import CIRSplit
from csmcir.errors import DataError, warn
from csmcir.io import atomic_write_json, read_json

SHOWN = 5  # how many offending names an error message lists


def first_few(items: Iterable[Any], total: int | None = None, n: int = SHOWN) -> str:
    """``a, b, c and 7 more``: enough names to act on without flooding the terminal."""
    items = list(items)
    total = len(items) if total is None else total
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f" and {total - n} more" if total > n else "")


def require_root(root: str | Path, benchmark: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{benchmark}: dataset root {root} is not a folder; "
            "datasets/README.md shows the expected layout"
        )
    return root


def read_json_list(path: Path, what: str) -> list:
    data = read_json(path, what)
    if not isinstance(data, list):
        raise DataError(f"{what} {path}: expected a JSON list, got {type(data).__name__}")
    return data


def read_json_object(path: Path, what: str) -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise DataError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


def field(record: Any, key: str, path: Path, index: int, kind: type | tuple[type, ...]) -> Any:
    """``record[key]``, or a DataError naming the file, the record index and the key."""
    if not isinstance(record, Mapping):
        raise DataError(f"{path}: record #{index} is {type(record).__name__}, expected an object")
    if key not in record:
        raise DataError(f"{path}: record #{index} has no key {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(
            f"{path}: record #{index} key {key!r} should be {names}, got {type(value).__name__}"
        )
    return value


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty, stripped lines of a text file; a missing file names itself."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def missing_images(split: CIRSplit, progress: bool = True) -> list[str]:
    """Ids of the split's images whose file does not exist (a stat each, no decoding)."""
    ids = split.referenced_images()
    missing = []
    for image_id in tqdm(
        ids,
        desc=f"{split.benchmark}/{split.split}: images",
        unit="img",
        leave=False,
        disable=not progress,
    ):
        path = split.image_paths.get(image_id)
        if path is None or not path.is_file():
            missing.append(image_id)
    return missing


def describe_missing(split: CIRSplit, missing: list[str]) -> str:
    """One message: how many, which, and the likely cause when a whole folder is absent."""
    paths = [split.image_paths.get(i, Path(i)) for i in missing]
    msg = (
        f"{split.benchmark}/{split.split}: {len(missing)} of {len(split.referenced_images())} "
        f"images are missing: {first_few(paths)}"
    )
    absent = sorted({str(p.parent) for p in paths[:SHOWN] if not p.parent.is_dir()})
    if absent:
        msg += f" (folder not found: {first_few(absent)})"
    return msg


def drop_images(split: CIRSplit, missing: list[str]) -> tuple[CIRSplit, list[str]]:
    """A copy of the split without the missing images and every query that uses one.

    A query is dropped when its reference, any of its targets or any subset member is missing:
    keeping it would change what counts as a correct answer.
    """
    gone = set(missing)
    kept, dropped_queries = [], []
    for q in split.queries:
        used = {q.reference, *q.targets, *(q.subset or ())}
        (dropped_queries if used & gone else kept).append(q)
    dropped_ids = [q.query_id for q in dropped_queries]
    new = replace(
        split,
        queries=kept,
        gallery=[g for g in split.gallery if g not in gone],
        image_paths={k: v for k, v in split.image_paths.items() if k not in gone},
        dropped=[*split.dropped, *dict.fromkeys(missing)],
        dropped_queries=[*split.dropped_queries, *dropped_ids],
    )
    return new, dropped_ids


def apply_missing_policy(
    split: CIRSplit,
    *,
    drop_missing: bool = False,
    dropped_report: str | Path | None = None,
    progress: bool = True,
    require_queries: bool = True,
) -> CIRSplit:
    """Error on missing images, or drop them (and their queries) when explicitly asked.

    ``require_queries=False`` is for readers of the gallery alone (captioning): a split whose
    every query is dropped still lends its remaining images, where training or evaluation on it
    would have nothing to do and is refused.
    """
    missing = missing_images(split, progress=progress)
    if not missing:
        if dropped_report is not None:
            write_dropped_report(dropped_report, split, [], [])
        return split
    if not drop_missing:
        raise DataError(
            describe_missing(split, missing)
            + ". Restore them, or load with drop_missing=True (a command's --drop-missing flag) "
            "to drop them and the queries that use them"
        )
    paths = {i: split.image_paths.get(i) for i in missing}
    new, dropped_queries = drop_images(split, missing)
    # an empty split is an error, as read_split says for empty annotations
    if require_queries and not new.queries:
        raise DataError(
            describe_missing(split, missing)
            + f", and every one of its {len(split.queries)} queries uses one: dropping them "
            "would leave nothing to train on or evaluate. Restore the images"
        )
    warn(
        f"{split.benchmark}/{split.split}: drop_missing dropped {len(dropped_queries)} of "
        f"{len(split.queries)} queries, which use {len(missing)} missing images; queries: "
        f"{first_few(dropped_queries)}; images: {first_few(paths[i] or i for i in missing)}"
    )
    if dropped_report is not None:
        write_dropped_report(dropped_report, split, missing, dropped_queries, paths)
    return new


def write_dropped_report(
    path: str | Path,
    split: CIRSplit,
    missing: list[str],
    dropped_queries: list[str],
    paths: Mapping[str, Path | None] | None = None,
) -> None:
    paths = paths or {}
    atomic_write_json(
        path,
        {
            "benchmark": split.benchmark,
            "split": split.split,
            "missing_images": [
                {"id": i, "path": str(paths[i]) if paths.get(i) else None} for i in missing
            ],
            "dropped_queries": dropped_queries,
            "kept_queries": len(split.queries) - len(dropped_queries),
        },
    )

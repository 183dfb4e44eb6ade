"""Test-server submission files for CIRR (test1) and CIRCO (test), checked before they are done.

CIRR's server takes two JSON objects, ``{"version": "rc2", "metric": "recall", "<pairid>": [50
image names], ...}`` and the same with ``"metric": "recall_subset"`` and 3 names from the query's
subset, at most 5 MB each. CIRCO's takes ``{"<query id>": [50 unique image ids], ...}`` with the
ids as integers, as in its README's example; its server scores the list as it is, so a query's
reference may be in it (the authors' own submissions rank the whole gallery). Every writer parses
the exact text it is about to write and checks it against the split (every query present, nothing
extra, list lengths, no duplicates, no reference for CIRR, size) before writing anything, so a
file that would bounce at the server is an error here instead, and never lands on disk.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.data.registry import spec
from csmcir.errors import DataError
from csmcir.io import atomic_write_text, read_json

CIRR_VERSION = "rc2"
CIRR_RECALL_TOP = 50
CIRR_SUBSET_TOP = 3
CIRR_MAX_BYTES = 5_000_000
CIRCO_TOP = 50

# benchmark -> the one split its test server scores (the others have public answers).
SERVER_SPLITS = {"cirr": "test1", "circo": "test"}


def query_key(query: CIRQuery) -> str:
    """The id a server keys a query by: CIRR's pairid, CIRCO's query id."""
    return str(query.extra.get("pairid", query.query_id))


def how_to_score(benchmark: str, split: str) -> str:
    """Advice for a split without answers that is true for ``benchmark``: its test server where
    it has one that scores this split, else the splits to evaluate instead."""
    if SERVER_SPLITS.get(benchmark) == split:
        return "pass --submission DIR to write the files its test server scores"
    others = [s for s in spec(benchmark).splits if s != split and s != SERVER_SPLITS.get(benchmark)]
    return f"evaluate a split with answers ({', '.join(others)})" + (
        "" if benchmark in SERVER_SPLITS else f"; {benchmark} has no test server"
    )


def check_submission_split(benchmark: str, split: str) -> None:
    """Refuse a submission for a benchmark without a server, or for a split it does not score."""
    if benchmark not in SERVER_SPLITS:
        raise DataError(
            f"--submission: {benchmark} has no test server; submissions exist for "
            + ", ".join(f"{b} {s}" for b, s in SERVER_SPLITS.items())
        )
    if split != SERVER_SPLITS[benchmark]:
        raise DataError(
            f"--submission: the {benchmark} server scores split {SERVER_SPLITS[benchmark]!r}, "
            f"not {split!r} (whose answers are public: evaluate it without --submission)"
        )


def write_cirr_submission(
    split: CIRSplit,
    recall_top: Sequence[Sequence[str]],
    subset_top: Sequence[Sequence[str]],
    out_dir: str | Path,
    name: str = "csmcir",
) -> list[Path]:
    """Write and check CIRR's two files; ``recall_top[i]``/``subset_top[i]`` rank query i."""
    check_submission_split("cirr", split.split)
    keys = _keys(split, recall_top, subset_top)
    files = {}
    for metric, tops in (("recall", recall_top), ("recall_subset", subset_top)):
        obj: dict[str, Any] = {"version": CIRR_VERSION, "metric": metric}
        obj.update({key: list(top) for key, top in zip(keys, tops, strict=True)})
        path = Path(out_dir) / f"{metric}_submission_{name}.json"
        text = json.dumps(obj, separators=(",", ":"))
        _check_cirr(path, _parse_unique_keys(text, path), split, metric, len(text.encode()))
        files[path] = text
    return [atomic_write_text(path, text) for path, text in files.items()]


def write_circo_submission(
    split: CIRSplit, top: Sequence[Sequence[str]], out_dir: str | Path, name: str = "csmcir"
) -> Path:
    """Write and check CIRCO's file; ``top[i]`` ranks query i."""
    check_submission_split("circo", split.split)
    keys = _keys(split, top)
    obj = {key: [_circo_id(image_id) for image_id in t] for key, t in zip(keys, top, strict=True)}
    path = Path(out_dir) / f"circo_{split.split}_submission_{name}.json"
    text = json.dumps(obj, separators=(",", ":"))
    _check_circo(path, _parse_unique_keys(text, path), split)
    return atomic_write_text(path, text)


def check_cirr_file(path: str | Path, split: CIRSplit, metric: str) -> None:
    """Check a CIRR submission file against the split it claims to answer."""
    path = Path(path)
    _check_cirr(path, _read_unique_keys(path), split, metric, path.stat().st_size)


def _check_cirr(path: Path, obj: dict, split: CIRSplit, metric: str, size: int) -> None:
    if size > CIRR_MAX_BYTES:
        raise DataError(f"{path}: {size:,} bytes, over the CIRR server's 5 MB limit")
    where = f"CIRR submission {path}"
    if obj.get("version") != CIRR_VERSION:
        raise DataError(f"{where}: 'version' must be {CIRR_VERSION!r}, got {obj.get('version')!r}")
    if obj.get("metric") != metric:
        raise DataError(f"{where}: 'metric' must be {metric!r}, got {obj.get('metric')!r}")
    answers = {k: v for k, v in obj.items() if k not in {"version", "metric"}}
    length = CIRR_RECALL_TOP if metric == "recall" else CIRR_SUBSET_TOP
    queries = _check_keys(where, answers, split)
    gallery = set(split.gallery)
    for key, names in answers.items():
        query = queries[key]
        allowed = set(query.subset or ()) if metric == "recall_subset" else gallery
        _check_list(where, key, names, length, allowed)
        if query.reference in names:
            raise DataError(
                f"{where}: query {key}: lists its own reference image {query.reference!r}"
            )


def check_circo_file(path: str | Path, split: CIRSplit) -> None:
    """Check a CIRCO submission file against the split it claims to answer."""
    path = Path(path)
    _check_circo(path, _read_unique_keys(path), split)


def _check_circo(path: Path, answers: dict, split: CIRSplit) -> None:
    where = f"CIRCO submission {path}"
    _check_keys(where, answers, split)
    gallery = set(split.gallery)
    for key, ids in answers.items():
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise DataError(f"{where}: query {key}: expected a list of integer image ids")
        _check_list(where, key, [str(i) for i in ids], CIRCO_TOP, gallery)


def _keys(split: CIRSplit, *rankings: Sequence[Sequence[str]]) -> list[str]:
    keys = [query_key(q) for q in split.queries]
    duplicated = (
        sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) < len(keys) else []
    )
    if duplicated:
        raise DataError(f"{split.benchmark} {split.split}: duplicate query ids {duplicated[:5]}")
    for ranking in rankings:
        if len(ranking) != len(keys):
            raise ValueError(f"{len(ranking)} rankings for {len(keys)} queries")
    return keys


def _check_keys(where: str, answers: dict, split: CIRSplit) -> dict[str, CIRQuery]:
    queries = {query_key(q): q for q in split.queries}
    missing = [k for k in queries if k not in answers]
    extra = [k for k in answers if k not in queries]
    if missing or extra:
        raise DataError(
            f"{where} does not answer {split.benchmark} {split.split}: "
            f"{len(missing)} of its {len(queries)} queries missing (e.g. {missing[:3]}), "
            f"{len(extra)} unknown keys (e.g. {extra[:3]}); is it for another split?"
        )
    return queries


def _check_list(where: str, key: str, names: Any, length: int, allowed: set[str]) -> None:
    if not isinstance(names, list) or len(names) != length:
        got = len(names) if isinstance(names, list) else type(names).__name__
        raise DataError(f"{where}: query {key}: expected a list of {length} images, got {got}")
    if len(set(names)) != length:
        raise DataError(f"{where}: query {key}: the list repeats an image")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise DataError(f"{where}: query {key}: {unknown[0]!r} is not a candidate for this query")


def _read_unique_keys(path: Path) -> dict:
    read_json(path, "submission file")  # names the position of a syntax error
    return _parse_unique_keys(path.read_text(encoding="utf-8"), path)


def _parse_unique_keys(text: str, path: Path) -> dict:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise DataError(f"{path}: key {dup!r} appears more than once")
        return dict(pairs)

    obj = json.loads(text, object_pairs_hook=no_duplicates)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: a submission is a JSON object, got {type(obj).__name__}")
    return obj


def _circo_id(image_id: str) -> int:
    if not image_id.isdigit():
        raise DataError(f"CIRCO image id {image_id!r} is not a COCO integer id")
    return int(image_id)

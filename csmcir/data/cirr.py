"""CIRR (Liu et al. 2021), release rc2, and the synthetic benchmark written in the same layout.

Files under the root: ``captions/cap.rc2.<split>.json`` (records with ``pairid``, ``reference``,
``target_hard``, ``target_soft``, ``caption`` and ``img_set`` {``id``, ``members``,
``reference_rank``, ``target_rank``}; test1 records have no target fields) and
``image_splits/split.rc2.<split>.json`` (image name -> path relative to the root, e.g.
``./dev/dev-244-0-img0.png``).

Protocol: the gallery is every image of the split's image_splits file, the reference is removed
from its own ranking, and ``img_set.members`` is the subset for Recall_subset@K.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from csmcir.data.layout import field, read_json_list, read_json_object, require_root
from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.errors import DataError

CIRR_SPLITS = ("train", "val", "test1")
CIRR_HIDDEN = frozenset({"test1"})
SYNTHCIR_SPLITS = ("train", "val", "test")
SOURCE_HINT = {
    "cirr": "CIRR's annotation files come from github.com/Cuberick-Orion/CIRR, branch cirr_dataset",
    "synthcir": "generate the synthetic benchmark with: csmcir data synth --out <root>",
}
KNOWN_KEYS = frozenset({"pairid", "reference", "target_hard", "target_soft", "caption", "img_set"})


def read_image_split(path: Path, root: Path) -> dict[str, Path]:
    """Image name -> absolute path; values are relative to the root the user gave."""
    mapping = read_json_object(path, "CIRR image-split file")
    paths: dict[str, Path] = {}
    for name, rel in mapping.items():
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{path}: image {name!r} should map to a relative path, got {rel!r}")
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts:
            raise DataError(f"{path}: image {name!r} path {rel!r} must stay inside the root")
        paths[name] = root.joinpath(*pure.parts)  # pathlib drops the leading "./"
    return paths


def read_rc2_layout(
    root: str | Path,
    split: str,
    benchmark: str,
    hidden_splits: frozenset[str],
    exclude_reference: bool,
) -> CIRSplit:
    """Any benchmark written in CIRR's rc2 layout; answers are optional on ``hidden_splits``."""
    root = require_root(root, benchmark)
    cap_path = root / "captions" / f"cap.rc2.{split}.json"
    split_path = root / "image_splits" / f"split.rc2.{split}.json"
    for path in (cap_path, split_path):
        if not path.is_file():
            hint = SOURCE_HINT.get(benchmark, "see datasets/README.md")
            raise DataError(f"{benchmark}/{split}: {path} not found ({hint})")
    records = read_json_list(cap_path, f"{benchmark} caption file")
    image_paths = read_image_split(split_path, root)
    hidden = split in hidden_splits

    def known(name: str, i: int, key: str) -> str:
        if name not in image_paths:
            raise DataError(f"{cap_path}: record #{i} {key} {name!r} is not in {split_path}")
        return name

    queries: list[CIRQuery] = []
    seen_pairs: set[int] = set()
    for i, rec in enumerate(records):
        pairid = field(rec, "pairid", cap_path, i, int)
        if pairid in seen_pairs:
            raise DataError(f"{cap_path}: record #{i} repeats pairid {pairid}")
        seen_pairs.add(pairid)
        img_set = field(rec, "img_set", cap_path, i, dict)
        members = field(img_set, "members", cap_path, i, list)
        extra: dict = {"pairid": pairid, "img_set_id": field(img_set, "id", cap_path, i, int)}
        extra.update({k: img_set[k] for k in ("reference_rank", "target_rank") if k in img_set})
        targets: tuple[str, ...] = ()
        if not hidden or "target_hard" in rec:
            targets = (known(field(rec, "target_hard", cap_path, i, str), i, "target_hard"),)
        if "target_soft" in rec:
            extra["target_soft"] = field(rec, "target_soft", cap_path, i, dict)
        extra.update({k: v for k, v in rec.items() if k not in KNOWN_KEYS})
        queries.append(
            CIRQuery(
                query_id=str(pairid),
                reference=known(field(rec, "reference", cap_path, i, str), i, "reference"),
                texts=(field(rec, "caption", cap_path, i, str),),
                targets=targets,
                subset=tuple(known(str(m), i, "img_set member") for m in members),
                extra=extra,
            )
        )
    return CIRSplit(
        benchmark=benchmark,
        split=split,
        queries=queries,
        gallery=list(image_paths),
        image_paths=image_paths,
        exclude_reference=exclude_reference,
    )


def read(root: str | Path, split: str, *, exclude_reference: bool = True) -> CIRSplit:
    """CIRR rc2: test1 has no answers (they live on the evaluation server)."""
    return read_rc2_layout(root, split, "cirr", CIRR_HIDDEN, exclude_reference)


def read_synthcir(root: str | Path, split: str, *, exclude_reference: bool = True) -> CIRSplit:
    """The synthetic benchmark: CIRR's files, answers on every split, ``mod_type`` (and a
    change's ``mod_attribute``) in extra."""
    return read_rc2_layout(root, split, "synthcir", frozenset(), exclude_reference)

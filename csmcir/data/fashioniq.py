"""FashionIQ (Wu et al. 2021): dress, shirt and toptee, two relative captions per query.

Files under the root: ``captions/cap.<category>.<split>.json`` (records with ``candidate``,
``target`` and ``captions`` [2]; test records have no ``target``),
``image_splits/split.<category>.<split>.json`` (the list of ASINs that forms the gallery) and
``images/<ASIN>.png`` or ``.jpg`` (mirrors differ; both are accepted, PNG wins when both exist).

Protocol (CLIP4Cir / SPRC): the gallery is the whole split file, the reference stays in the
ranking unless ``exclude_reference=True``, and the two captions are joined as
``"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}"``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from csmcir.data.layout import field, read_json_list, require_root
from csmcir.data.records import CIRQuery, CIRSplit, unique
from csmcir.errors import ConfigError, DataError

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
HIDDEN_SPLITS = frozenset({"test"})
IMAGE_SUFFIXES = (".png", ".jpg")
STRIP = ".?, "


def join_captions(first: str, second: str) -> str:
    """The CLIP4Cir joining rule; an empty first caption gives ``" and <second>"``, kept as is."""
    return f"{first.strip(STRIP).capitalize()} and {second.strip(STRIP)}"


def single_caption(caption: str) -> str:
    return caption.strip(STRIP).capitalize()


def eval_text(query: CIRQuery) -> str:
    return join_captions(query.texts[0], query.texts[1])


def train_forms(query: CIRQuery) -> list[str]:
    """The four training texts: c1+c2, c2+c1, c1, c2. A single form that is empty is left out
    (three training captions are empty strings) so training never sees an empty text."""
    c1, c2 = query.texts
    forms = [join_captions(c1, c2), join_captions(c2, c1)]
    return forms + [s for s in (single_caption(c1), single_caption(c2)) if s]


def train_text(query: CIRQuery, rng: random.Random) -> str:
    """One of the four forms, uniformly, with the caller's generator (reproducible epochs)."""
    return rng.choice(train_forms(query))


def find_images(image_dir: Path) -> dict[str, Path]:
    """ASIN -> file, one directory scan instead of two stats per image."""
    if not image_dir.is_dir():
        return {}
    found: dict[str, Path] = {}
    with os.scandir(image_dir) as entries:
        for entry in entries:
            path = Path(entry.path)
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES and (path.stem not in found or suffix == IMAGE_SUFFIXES[0]):
                found[path.stem] = path
    return found


def read(
    root: str | Path, split: str, *, category: str | None = None, exclude_reference: bool = False
) -> CIRSplit:
    if category not in CATEGORIES:
        raise ConfigError(
            f"fashioniq: option category must be one of {', '.join(CATEGORIES)} (got {category!r})"
        )
    root = require_root(root, "fashioniq")
    cap_path = root / "captions" / f"cap.{category}.{split}.json"
    split_path = root / "image_splits" / f"split.{category}.{split}.json"
    records = read_json_list(cap_path, "FashionIQ caption file")
    gallery_raw = read_json_list(split_path, "FashionIQ image-split file")
    for i, name in enumerate(gallery_raw):
        if not isinstance(name, str) or not name:
            raise DataError(f"{split_path}: entry #{i} should be an image name, got {name!r}")
    gallery = unique(gallery_raw)
    hidden = split in HIDDEN_SPLITS

    queries = []
    for i, rec in enumerate(records):
        captions = field(rec, "captions", cap_path, i, list)
        if len(captions) != 2 or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{cap_path}: record #{i} key 'captions' should be two strings")
        target = None if hidden else field(rec, "target", cap_path, i, str)
        queries.append(
            CIRQuery(
                query_id=f"{category}-{i}",
                reference=field(rec, "candidate", cap_path, i, str),
                texts=(captions[0], captions[1]),
                targets=(target,) if target else (),
            )
        )

    image_dir = root / "images"
    found = find_images(image_dir)
    names = unique([*gallery, *(q.reference for q in queries), *(q.target or "" for q in queries)])
    image_paths = {n: found.get(n, image_dir / f"{n}{IMAGE_SUFFIXES[0]}") for n in names if n}
    return CIRSplit(
        benchmark=f"fashioniq-{category}",
        split=split,
        queries=queries,
        gallery=gallery,
        image_paths=image_paths,
        exclude_reference=exclude_reference,
        eval_text=eval_text,
        train_text=train_text,
    )

"""Shoes: the Attribute Discovery shoe images (Berg et al. 2010) with the relative captions of
Guo et al. (2018, "Dialog-based interactive image retrieval").

Files under the root: ``relative_captions_shoes.json`` (a list of {``ImageName``,
``ReferenceImageName``, ``RelativeCaption``}; ``ImageName`` is the target),
``train_im_names.txt`` and ``eval_im_names.txt`` (one image file name a line), and the images
anywhere below the root (the download unpacks to ``womens_*/<n>/img_womens_*.jpg``). Images are
indexed by file name, so a name found twice is an error.

Protocol: splits ``train`` and ``test`` (the official eval list; ``eval`` is accepted as an
alias). A triplet belongs to the split whose list holds both its images. The gallery is the
split's image list. The reference is removed from its own ranking by default, as in the
TIRG-derived evaluation code the Shoes results come from (e.g. AMC's ``test.py`` sets the
reference's similarity to -1e11); ``exclude_reference=False`` keeps it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from csmcir.data.layout import field, first_few, read_json_list, read_lines, require_root
from csmcir.data.records import CIRQuery, CIRSplit, unique
from csmcir.errors import DataError

SPLITS = ("train", "test")
ALIASES = {"eval": "test"}
LIST_FILES = {"train": "train_im_names.txt", "test": "eval_im_names.txt"}
CAPTION_FILE = "relative_captions_shoes.json"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


def index_images(root: Path) -> dict[str, Path]:
    """File name -> path for every image below the root; a repeated name is ambiguous."""
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if PurePath(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(folder) / name
            if name in found:
                raise DataError(
                    f"shoes: image name {name!r} occurs twice under {root}: {found[name]} and "
                    f"{path}; Shoes images are found by file name, so keep one copy"
                )
            found[name] = path
    return found


def read(root: str | Path, split: str, *, exclude_reference: bool = True) -> CIRSplit:
    root = require_root(root, "shoes")
    split = ALIASES.get(split, split)
    lists = {s: read_lines(root / f, f"Shoes image list ({s})") for s, f in LIST_FILES.items()}
    membership = {name: s for s, names in lists.items() for name in names}
    both = set(lists["train"]) & set(lists["test"])
    if both:
        raise DataError(
            f"shoes: {len(both)} images are in both {LIST_FILES['train']} and "
            f"{LIST_FILES['test']}: {first_few(sorted(both))}"
        )
    cap_path = root / CAPTION_FILE
    records = read_json_list(cap_path, "Shoes relative-caption file")

    queries, strays = [], []
    for i, rec in enumerate(records):
        target = field(rec, "ImageName", cap_path, i, str)
        reference = field(rec, "ReferenceImageName", cap_path, i, str)
        text = field(rec, "RelativeCaption", cap_path, i, str)
        homes = {membership.get(target), membership.get(reference)}
        if len(homes) != 1 or None in homes:
            strays.append(f"#{i} ({reference} -> {target})")
        elif homes == {split}:
            queries.append(
                CIRQuery(
                    query_id=str(i), reference=reference, texts=(text.strip(),), targets=(target,)
                )
            )
    if strays:
        raise DataError(
            f"{cap_path}: {len(strays)} records pair images that are not both in "
            f"{LIST_FILES['train']} or both in {LIST_FILES['test']}: {first_few(strays)}"
        )

    gallery = unique(lists[split])
    found = index_images(root)
    names = unique([*gallery, *(q.reference for q in queries), *(q.targets[0] for q in queries)])
    return CIRSplit(
        benchmark="shoes",
        split=split,
        queries=queries,
        gallery=gallery,
        image_paths={n: found.get(n, root / n) for n in names},
        exclude_reference=exclude_reference,
    )

"""Fashion200k (Han et al. 2017) under the TIRG protocol (Vo et al. 2019, google/tirg).

Files under the root: ``labels/<category>_<split>_detect_all.txt`` (lines
``path<TAB>detection score<TAB>caption``; categories dress, jacket, pants, skirt, top), the
images at ``<root>/<path>``, and ``test_queries.txt`` (lines ``source_path target_path``).

Protocol: the modification text is ``"replace <source word> with <target word>"`` (TIRG's
``get_different_word``), the gallery is every test image, the query image is excluded, and a
retrieved image is a hit when its caption equals the target's (``gallery_labels``).
Captions are whitespace-stripped as TIRG does. TIRG also rewrites ``. ? & *`` as ``dotmark``,
``questionmark``, ``andmark``, ``starmark`` for its own word tokenizer; that changes neither
word boundaries nor caption equality, so the text here keeps the original characters.

Every label line is one gallery entry, as in TIRG's reader (one ``self.imgs`` item a line). An
image listed on n lines is n entries, with ids ``path``, ``path#2``, ..., ``path#n`` and each its
own caption; a path in ``test_queries.txt`` means its last line, as TIRG's ``file2imgid`` dict
(the last assignment wins), and only that entry is removed from its query's ranking.

Training queries: TIRG pairs images whose captions differ in one word, sampling a fresh pair per
image each epoch. Here they are drawn once per ``seed``: for each train image with at least one
such partner, a random one-word-different caption and a random image bearing it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from csmcir.data.layout import first_few, require_root
from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.errors import DataError

SPLITS = ("train", "test")
QUERY_FILE = "test_queries.txt"


def word_diff(source: str, target: str) -> tuple[str, str]:
    """TIRG's rule: the first source word absent from the target, and vice versa.

    When every word is shared TIRG's loop ends on the last word; that is kept so scores match.
    """
    s, t = source.split(), target.split()
    return next((w for w in s if w not in t), s[-1]), next((w for w in t if w not in s), t[-1])


def modification_text(source: str, target: str) -> str:
    old, new = word_diff(source, target)
    return f"replace {old} with {new}"


def entry_id(path: str, occurrence: int) -> str:
    """The gallery id of the ``occurrence``-th (1-based) label line of an image path."""
    return path if occurrence == 1 else f"{path}#{occurrence}"


def read_labels(root: Path, split: str) -> tuple[dict[str, str], dict[str, str]]:
    """(gallery id -> caption, gallery id -> image path relative to the root): one entry per
    label line of every category's file, in file-name then line order."""
    label_dir = root / "labels"
    files = sorted(label_dir.glob(f"*_{split}_detect_all.txt")) if label_dir.is_dir() else []
    if not files:
        pattern = label_dir / f"<category>_{split}_detect_all.txt"
        raise DataError(f"fashion200k: no label files {pattern}")
    captions: dict[str, str] = {}
    images: dict[str, str] = {}
    seen: dict[str, int] = defaultdict(int)
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3 or not parts[0].strip() or not parts[2].strip():
                raise DataError(
                    f"{path}:{n}: expected 'path<TAB>score<TAB>caption', got {line[:80]!r}"
                )
            image = parts[0].strip()
            seen[image] += 1
            image_id = entry_id(image, seen[image])
            captions[image_id], images[image_id] = parts[2].strip(), image
    return captions, images


def test_queries(root: Path, labels: dict[str, str], images: dict[str, str]) -> list[CIRQuery]:
    path = root / QUERY_FILE
    if not path.is_file():
        raise DataError(f"fashion200k: {path} not found (TIRG's test queries, google/tirg)")
    last = {image: image_id for image_id, image in images.items()}  # TIRG's file2imgid
    queries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected 'source_path target_path', got {line[:80]!r}")
        unknown = [p for p in parts if p not in last]
        if unknown:
            raise DataError(f"{path}:{n}: {first_few(unknown)} not in the test label files")
        source, target = (last[p] for p in parts)
        queries.append(
            CIRQuery(
                query_id=str(len(queries)),
                reference=source,
                texts=(modification_text(labels[source], labels[target]),),
                targets=(target,),
                extra={"source_caption": labels[source], "target_caption": labels[target]},
            )
        )
    return queries


def one_word_partners(captions: list[str]) -> dict[str, list[str]]:
    """Caption -> the captions that differ from it in exactly one word (a swap of one word for
    another that the first caption lacks, the rest in the same order).

    Captions are grouped by "parent" (the caption minus one word) as TIRG does; TIRG removes a
    word with ``str.replace``, which also cuts it out of longer words, so here a word position
    is removed instead.
    """
    children: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for caption in captions:
        words = caption.split()
        for i, word in enumerate(words):
            children[" ".join(words[:i] + words[i + 1 :])].append((caption, word))
    partners: dict[str, dict[str, None]] = defaultdict(dict)
    for group in children.values():
        for a, word_a in group:
            for b, word_b in group:
                if a != b and word_a not in b.split() and word_b not in a.split():
                    partners[a][b] = None
    return {c: list(p) for c, p in partners.items()}


def train_queries(labels: dict[str, str], seed: int) -> list[CIRQuery]:
    by_caption: dict[str, list[str]] = defaultdict(list)
    for image, caption in labels.items():
        by_caption[caption].append(image)
    partners = one_word_partners(list(by_caption))
    rng = random.Random(seed)
    queries = []
    for image, caption in tqdm(labels.items(), desc="fashion200k: train pairs", unit="img"):
        if caption not in partners:
            continue
        target_caption = rng.choice(partners[caption])
        target = rng.choice(by_caption[target_caption])
        queries.append(
            CIRQuery(
                query_id=f"train-{len(queries)}",
                reference=image,
                texts=(modification_text(caption, target_caption),),
                targets=(target,),
                extra={"source_caption": caption, "target_caption": target_caption},
            )
        )
    return queries


def read(
    root: str | Path, split: str, *, seed: int = 0, exclude_reference: bool = True
) -> CIRSplit:
    root = require_root(root, "fashion200k")
    labels, images = read_labels(root, split)
    if split == "train":
        queries = train_queries(labels, seed)
    else:
        queries = test_queries(root, labels, images)
    return CIRSplit(
        benchmark="fashion200k",
        split=split,
        queries=queries,
        gallery=list(labels),
        image_paths={image_id: root / image for image_id, image in images.items()},
        exclude_reference=exclude_reference,
        gallery_labels=dict(labels),
    )

"""Torch datasets over CIRSplits: training triplets and the validation gallery+queries.

Their samples name images by id and read them in batches (:mod:`csmcir.data.batches`).
Randomness in a sample (FashionIQ's choice among its caption forms) comes from a generator
seeded with ``(seed, epoch, index)``: the same sample in the same epoch gets the same text, in
any worker, after a resume, on any number of ranks.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from csmcir.data.batches import BatchedImages, BatchSource
from csmcir.data.records import CIRQuery, CIRSplit

# Validation items are gallery targets (encoded with encode_target) or queries (encode_query).
GALLERY, QUERY = 0, 1
CLAUSE_BREAK = re.compile(r"\s*[,;]\s*|\s+and\s+")  # where a description's clauses part


def first_clauses(caption: str, clauses: int) -> str:
    """The caption's first ``clauses`` clauses (parted at commas, semicolons and "and"); the
    whole caption when it has no more. Why a stage 1 may want them: docs/training.md."""
    parts = [part for part in CLAUSE_BREAK.split(caption.strip().rstrip(".")) if part]
    return caption if len(parts) <= clauses else ", ".join(parts[:clauses])


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator that depends only on (seed, epoch, index); str seeds hash the same everywhere."""
    return random.Random(f"{seed}/{epoch}/{index}")


@dataclass(frozen=True)
class TrainItem:
    split: CIRSplit
    query: CIRQuery


class TrainTriplets(BatchedImages, Dataset):
    """(reference image, modification text, target image, target caption) per training query.

    ``image_keys`` numbers every image id of the union of splits: batches carry these integers
    so that equal targets can be found across DDP ranks (strings cannot be all-gathered).
    ``caption_clauses``: each target caption is cut to its first that many clauses
    (:func:`first_clauses`); 0 keeps it whole.
    """

    image_fields = ("reference_image", "target_image")

    def __init__(
        self,
        splits: Sequence[CIRSplit],
        images: BatchSource,
        captions: dict[str, str] | None,
        seed: int = 0,
        caption_clauses: int = 0,
    ) -> None:
        self.items = [TrainItem(s, q) for s in splits for q in s.queries]
        self.images = images
        if captions is not None and caption_clauses:
            captions = {i: first_clauses(c, caption_clauses) for i, c in captions.items()}
        self.captions = captions
        self.seed = seed
        ids: dict[str, None] = {}
        for item in self.items:
            ids.setdefault(item.query.reference)
            ids.setdefault(item.query.target)
        self.image_keys = {image_id: i for i, image_id in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        item = self.items[index]
        query, target = item.query, item.query.target
        return {
            "reference_image": query.reference,
            "text": item.split.train_text(query, sample_rng(self.seed, epoch, index)),
            "target_image": target,
            "target_caption": self.captions[target] if self.captions is not None else None,
            "reference_key": self.image_keys[query.reference],
            "target_key": self.image_keys[target],
        }


class ValidationItems(BatchedImages, Dataset):
    """A validation split as one sequence: its gallery targets first, then its queries.

    Encoding the gallery once and then the queries is the evaluation protocol; a single dataset
    lets one Lightning validation loader (with its progress bar) do both in order.
    """

    image_fields = ("image",)

    def __init__(
        self, split: CIRSplit, images: BatchSource, captions: dict[str, str] | None
    ) -> None:
        self.split = split
        self.images = images
        self.captions = captions

    def __len__(self) -> int:
        return len(self.split.gallery) + len(self.split.queries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n_gallery = len(self.split.gallery)
        if index < n_gallery:
            image_id = self.split.gallery[index]
            caption = self.captions[image_id] if self.captions is not None else None
            return {
                "kind": GALLERY,
                "position": index,
                "image": image_id,
                "text": caption,
            }
        position = index - n_gallery
        query = self.split.queries[position]
        return {
            "kind": QUERY,
            "position": position,
            "image": query.reference,
            "text": self.split.eval_text(query),
        }

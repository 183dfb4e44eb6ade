"""The one record type every benchmark loader returns.

A loader turns a benchmark's own files into a :class:`CIRSplit`: its queries and its gallery,
with image ids resolved to paths under the root the user gave. Protocol rules that differ between
benchmarks (how FashionIQ joins its two captions, whether the reference is excluded from the
ranking, caption-matched hits for Fashion200k) are carried by the split, so training and
evaluation code never branches on the benchmark's name.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CIRQuery:
    """One composed query: a reference image and the text that modifies it.

    ``texts`` holds the annotators' raw captions (FashionIQ has two, the others one);
    the split's text rules turn them into the model's input. ``targets`` lists every ground-truth
    image id, the main target first (CIRR ``target_hard``, CIRCO ``target_img_id``); it is empty
    on test splits whose answers are hidden. ``subset`` is CIRR's ``img_set.members``.
    """

    query_id: str
    reference: str
    texts: tuple[str, ...]
    targets: tuple[str, ...] = ()
    subset: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def target(self) -> str | None:
        """The main ground-truth target, or None on a hidden-answer split."""
        return self.targets[0] if self.targets else None


def single_text(query: CIRQuery, rng: random.Random | None = None) -> str:
    """The text rule of benchmarks with one caption per query."""
    return query.texts[0]


@dataclass
class CIRSplit:
    """A benchmark split: queries, the gallery, and where each image lives.

    Attributes:
        benchmark: registry name, e.g. ``"cirr"``, ``"fashioniq-dress"``, ``"synthcir"``.
        split: split name as the benchmark spells it (``val``, ``test1``...).
        queries: the composed queries, in the benchmark's own order.
        gallery: image ids that are ranked at evaluation, in a fixed order.
        image_paths: image id -> file path for every image the split refers to.
        exclude_reference: remove the query's reference image from its ranking (CIRR, Fashion200k)
            or keep it (the FashionIQ CLIP4Cir/SPRC protocol).
        eval_text: turns a query's captions into the evaluation-time text.
        train_text: the same at training time; may randomise (FashionIQ).
        gallery_labels: for caption-matched benchmarks (Fashion200k) the label of each gallery
            image; a retrieved image is a hit when its label equals the target's.
        dropped: image ids dropped by an explicit ``drop_missing`` request, for the record.
        dropped_queries: the ids of the queries dropped with them.
    """

    benchmark: str
    split: str
    queries: list[CIRQuery]
    gallery: list[str]
    image_paths: dict[str, Path]
    exclude_reference: bool = False
    eval_text: Callable[[CIRQuery], str] = single_text
    train_text: Callable[[CIRQuery, random.Random], str] = single_text
    gallery_labels: dict[str, str] | None = None
    dropped: list[str] = field(default_factory=list)
    dropped_queries: list[str] = field(default_factory=list)

    @property
    def has_targets(self) -> bool:
        return any(q.targets for q in self.queries)

    def image_path(self, image_id: str) -> Path:
        try:
            return self.image_paths[image_id]
        except KeyError:
            raise KeyError(
                f"{self.benchmark}/{self.split}: unknown image id {image_id!r}"
            ) from None

    def referenced_images(self) -> list[str]:
        """Every image id the split uses (gallery, references, targets, subsets), once each."""
        seen: dict[str, None] = dict.fromkeys(self.gallery)
        for q in self.queries:
            seen.setdefault(q.reference)
            for t in q.targets:
                seen.setdefault(t)
            for m in q.subset or ():
                seen.setdefault(m)
        return list(seen)

    def summary(self) -> dict[str, int | str]:
        return {
            "benchmark": self.benchmark,
            "split": self.split,
            "queries": len(self.queries),
            "gallery": len(self.gallery),
            "images": len(self.referenced_images()),
            "dropped": len(self.dropped),
            "dropped_queries": len(self.dropped_queries),
        }


def unique(ids: Sequence[str]) -> list[str]:
    """Order-preserving de-duplication (galleries must not list an image twice)."""
    return list(dict.fromkeys(ids))

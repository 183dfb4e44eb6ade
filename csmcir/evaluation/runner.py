"""Evaluate a model on a loaded split: encode the gallery (cached) and the queries, then score."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from csmcir.data.records import CIRSplit
from csmcir.evaluation.encode import (
    DEFAULT_CACHE_DIR,
    encode_gallery,
    encode_images,
    score_matrix,
    target_texts,
)
from csmcir.evaluation.protocols import Options, Prepared, apply_options, compute, prepare


@dataclass
class SplitScores:
    """A split's ``[queries, gallery]`` scores with what produced them."""

    prepared: Prepared
    scores: torch.Tensor
    gallery_from_cache: bool


def score_split(
    model,
    split: CIRSplit,
    captions: Mapping[str, str] | None = None,
    *,
    empty_captions: bool = False,
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    batch_size: int = 64,
    fingerprint: str | None = None,
    features=None,
    num_workers: int = 0,
) -> SplitScores:
    """Encode ``split``'s gallery (cached) and queries; ``features``: an open FeatureCache;
    ``num_workers``: DataLoader workers reading images or features ahead of the model."""
    prepared = prepare(split)
    texts = target_texts(model, split.gallery, captions, empty_captions)
    gallery, cached = encode_gallery(
        model,
        split.gallery,
        [split.image_path(g) for g in split.gallery],
        texts,
        cache_dir=cache_dir,
        batch_size=batch_size,
        fingerprint=fingerprint,
        features=features,
        num_workers=num_workers,
    )
    references = [split.image_path(q.reference) for q in split.queries]
    queries = encode_images(
        model,
        references,
        prepared.texts,
        side="query",
        batch_size=batch_size,
        desc="queries",
        ids=[q.reference for q in split.queries],
        features=features,
        num_workers=num_workers,
    )
    return SplitScores(prepared, score_matrix(model, queries, gallery), cached)


def evaluate(
    model,
    split: CIRSplit,
    captions: Mapping[str, str] | None = None,
    options: Options | None = None,
    **kwargs,
) -> dict[str, float]:
    """The split's benchmark metrics for ``model`` (the Python face of ``csmcir eval``)."""
    options = options or Options()
    apply_options(split, options)
    result = score_split(model, split, captions, **kwargs)
    return compute(result.scores, result.prepared, seed=options.seed)

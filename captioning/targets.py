"""Which images to caption: the gallery of a benchmark split, or of all its splits.

Captions describe targets, and any gallery image can be a target at evaluation, so an evaluation
split's whole gallery is captioned. Training reads a caption only for the images its queries
target, so ``train_targets_only`` leaves the training split's other images out (on the synthetic
benchmark 12,000 of its 36,000 train images; with a real MLLM, hours). Image ids and paths come
from the benchmark registry, the same place training and evaluation read them from.
"""

from __future__ import annotations

from pathlib import Path

from csmcir.data import registry

TRAIN_SPLIT = "train"  # the split every benchmark's training reads (csmcir.train.datamodule)


def gallery_images(
    benchmark: str,
    root: str | Path,
    split: str,
    *,
    drop_missing: bool = False,
    train_targets_only: bool = False,
    **options,
) -> tuple[dict[str, Path], list[str]]:
    """Gallery image id -> path over ``split`` (``all``: every split, each id once); dropped ids.

    A missing image is the registry's DataError unless ``drop_missing``; dropped ids are returned
    so the caller can report them. ``train_targets_only``: of the ``train`` split, only the
    images some query targets.
    """
    splits = registry.spec(benchmark).splits if split == "all" else (split,)
    images: dict[str, Path] = {}
    dropped: dict[str, None] = {}
    for name in splits:
        loaded = registry.load_split(  # captions need images, not queries
            benchmark, root, name, drop_missing=drop_missing, require_queries=False, **options
        )
        wanted = loaded.gallery
        if train_targets_only and name == TRAIN_SPLIT:
            wanted = list(dict.fromkeys(q.target for q in loaded.queries if q.target is not None))
        for image_id in wanted:
            images.setdefault(image_id, loaded.image_path(image_id))
        dropped.update(dict.fromkeys(loaded.dropped))
    return images, [i for i in dropped if i not in images]

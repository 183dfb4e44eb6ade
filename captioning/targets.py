"""Which images to caption: the gallery of a benchmark split, or of all its splits.

Captions describe targets, and any gallery image can be a target, so the whole gallery is
captioned. Image ids and paths come from the benchmark registry, the same place training and
evaluation read them from.
"""

from __future__ import annotations

from pathlib import Path

from csmcir.data import registry


def gallery_images(
    benchmark: str, root: str | Path, split: str, *, drop_missing: bool = False, **options
) -> tuple[dict[str, Path], list[str]]:
    """Gallery image id -> path over ``split`` (``all``: every split, each id once); dropped ids.

    A missing image is the registry's DataError unless ``drop_missing``; dropped ids are returned
    so the caller can report them.
    """
    splits = registry.spec(benchmark).splits if split == "all" else (split,)
    images: dict[str, Path] = {}
    dropped: dict[str, None] = {}
    for name in splits:
        loaded = registry.load_split(benchmark, root, name, drop_missing=drop_missing, **options)
        for image_id in loaded.gallery:
            images.setdefault(image_id, loaded.image_path(image_id))
        dropped.update(dict.fromkeys(loaded.dropped))
    return images, [i for i in dropped if i not in images]

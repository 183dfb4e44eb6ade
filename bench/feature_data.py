"""What the feature-path benchmarks share: a real on-disk feature cache of ViT-g's shape, a
training set over it, and the data path as it was before issue 17, to compare against.

The cache is written in the library's own format (``csmcir.model.features``) with random
float16 rows, so no ViT runs: ``[257, 1408]`` per image, 707 KB, like EVA ViT-g at 224 px.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from csmcir.data.batches import collate
from csmcir.data.prefetch import PrefetchLoader, loader_options
from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.io import atomic_write_json
from csmcir.model.features import (
    FORMAT_VERSION,
    META_FILE,
    CachedFeatures,
    FeatureCache,
    _write_shard,
)
from csmcir.train.datasets import TrainTriplets
from csmcir.train.sampler import EpochShuffleSampler

VITG_FEATURES = (257, 1408)
PATHS = ("old", "new")


def synthetic_cache(
    folder: Path, n_images: int, shape: tuple[int, int] = VITG_FEATURES, shard_size: int = 512
) -> FeatureCache:
    """A cache of ``n_images`` random float16 feature rows (ids ``img0`` ...)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": "synthetic",
        "feature_shape": list(shape),
        "dtype": "float16",
    }
    atomic_write_json(folder / META_FILE, meta)
    index: dict[str, Any] = {"shards": [], "ids": {}}
    rng = np.random.default_rng(0)
    for start in range(0, n_images, shard_size):
        ids = [f"img{i}" for i in range(start, min(start + shard_size, n_images))]
        rows = rng.standard_normal((len(ids), *shape), dtype=np.float32).astype(np.float16)
        _write_shard(folder, index, ids, rows)
    return FeatureCache.open(folder)


def triplets(cache: FeatureCache, texts: list[str], captions: list[str]) -> TrainTriplets:
    """One training query per pair of images (``img2k`` -> ``img2k+1``): all reads distinct."""
    ids = cache.ids()
    queries = [
        CIRQuery(f"q{k}", ids[2 * k], (texts[k % len(texts)],), (ids[2 * k + 1],))
        for k in range(len(ids) // 2)
    ]
    split = CIRSplit(
        benchmark="bench",
        split="train",
        queries=queries,
        gallery=ids,
        image_paths={i: Path(i) for i in ids},
        train_text=lambda q, rng: q.texts[0],
        eval_text=lambda q: q.texts[0],
    )
    target_captions = {q.target: captions[k % len(captions)] for k, q in enumerate(queries)}
    images = CachedFeatures(cache, split.image_paths)
    return TrainTriplets([split], images, target_captions)


class OldTriplets(torch.utils.data.Dataset):
    """The training samples as the data path before issue 17 made them (commit 4e81987): each
    sample read its two feature rows alone (``FeatureCache.get([id])``, which stacked the row
    into a new array) and widened them to float32 on the host; torch's stack then copied them
    into the batch, and nothing was pinned."""

    def __init__(self, new: TrainTriplets) -> None:
        self.new = new

    def __len__(self) -> int:
        return len(self.new)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        sample = self.new[key]
        for field in self.new.image_fields:
            sample[field] = self.new.images.cache.get([sample[field]])[0].float()
        return sample


def loader(
    data: TrainTriplets,
    path: str,
    batch_size: int,
    workers: int,
    pin: bool,
    seed: int = 0,
    thread: bool = True,
) -> DataLoader:
    """The training DataLoader of ``path``: ``new`` as ``CIRDataModule`` builds it (batch
    collate, pinned on a GPU), by ``workers`` processes or, with none, as ``fit`` reads a
    feature cache (:func:`~csmcir.data.prefetch.loader_options`: a prefetch thread; without
    ``thread``, in the reader's own thread); ``old`` as it was (per-sample reads, never
    pinned)."""
    options = {"batch_size": batch_size, "sampler": EpochShuffleSampler(data, seed=seed)}
    options |= {"drop_last": True, "persistent_workers": workers > 0}
    if path == "old":
        return DataLoader(OldTriplets(data), collate_fn=collate, num_workers=workers, **options)
    if workers == 0:
        options |= loader_options(features=True, num_workers=0, on_cuda=pin)
        options["prefetch"] = options["prefetch"] if thread else 0
    else:
        options |= {"num_workers": workers, "pin_memory": pin}
    return PrefetchLoader(data, collate_fn=data.collate, **options)


def endless(loader: DataLoader):
    """Batches without end, epoch after epoch (persistent workers are not restarted)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1

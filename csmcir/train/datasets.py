"""Torch datasets over CIRSplits: training triplets, validation gallery+queries, and their images.

A sample names its images by id; the dataset's :meth:`~BatchedImages.collate` reads a whole
batch's images at once from an :class:`ImageSource`: decoded and preprocessed on each access
(big benchmarks, with DataLoader workers), once into memory (the synthetic benchmark: a few
thousand 64 px PNGs, so every epoch after the first costs no decoding at all), or as frozen-ViT
features from the model's feature cache (:class:`CachedFeatures`), float16 rows copied from the
shards straight into the batch tensor. That tensor is a reused one in the training process and
shared memory in a DataLoader worker (:class:`BatchBuffers`), so handing it to the training
process copies nothing; with ``pin_memory`` the loader's pinning thread then stages it for an
asynchronous copy to the GPU. ``model_input`` names the keyword of
``encode_query``/``encode_target`` that the source's tensors feed.

Randomness in a sample (FashionIQ's choice among its caption forms) comes from a generator
seeded with ``(seed, epoch, index)``: the same sample in the same epoch gets the same text, in
any worker, after a resume, on any number of ranks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info
from tqdm import tqdm

from csmcir.data.images import load_image
from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.model.features import FeatureCache

Preprocess = Callable[[Image.Image], Tensor]

# Validation items are gallery targets (encoded with encode_target) or queries (encode_query).
GALLERY, QUERY = 0, 1


class BatchBuffers:
    """Batch tensors to fill: reused ones in the training process, shared memory in a worker.

    A fresh tensor of a batch's size is fresh pages from the kernel, which fault and are zeroed
    on the first write: on the benchmark machine that cost twice the copy of the features
    itself (BENCHMARKS.md, ``feature_loader``). So in the training process a buffer is handed
    out again once its storage's reference count says that no tensor, view or array but the
    pool's own holds it: a batch the training step (or a prefetching loader) still reads is never
    overwritten. At most ``keep`` buffers are kept per shape and dtype; beyond that a fresh
    tensor is made. In a DataLoader worker the tensor is made in shared memory instead (as
    torch's own collate does), so sending it to the training process copies nothing; the
    training process may hold it for any time, so it is never reused.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.pool: dict[tuple[tuple[int, ...], torch.dtype], list[Tensor]] = {}

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        shape = tuple(shape)
        if get_worker_info() is not None:
            storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
            return torch.empty(0, dtype=dtype).set_(storage).view(shape)
        buffers = self.pool.setdefault((shape, dtype), [])
        buffer = next((b for b in buffers if _unshared(b)), None)
        if buffer is None:
            buffer = torch.empty(shape, dtype=dtype)
            if len(buffers) < self.keep:
                buffers.append(buffer)
        # a view: a tensor of its own whose storage reference the count above sees
        return buffer.view(shape)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled empty (DataLoader workers under spawn): the buffers stay here."""
        return {"keep": self.keep, "pool": {}}


_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _unshared(tensor: Tensor) -> bool:
    """Whether only the pool holds ``tensor``'s memory (never, where torch cannot say)."""
    if _STORAGE_USE_COUNT is None:
        return False
    # 2: the pool's tensor, and the storage object this call makes
    return _STORAGE_USE_COUNT(tensor.untyped_storage()._cdata) <= 2


class ImageSource:
    """Image id -> preprocessed pixel tensor ``[3, H, W]``, decoding the file on each access."""

    model_input = "pixel_values"

    def __init__(self, paths: dict[Hashable, Path], preprocess: Preprocess) -> None:
        self.paths: dict[Hashable, Path] = {}
        self.preprocess = preprocess
        self.buffers = BatchBuffers()
        self.add(paths)

    def add(self, paths: dict[Hashable, Path]) -> None:
        """Make more images available (the training split's after the validation split's)."""
        self.paths.update(paths)

    def __getitem__(self, image_id: Hashable) -> Tensor:
        return self.preprocess(load_image(self.paths[image_id]))

    def batch(self, image_ids: Sequence[Hashable]) -> Tensor:
        """``[B, 3, H, W]`` pixels of ``image_ids``, stacked into one batch tensor."""
        items = [self[i] for i in image_ids]
        out = self.buffers.take((len(items), *items[0].shape), items[0].dtype)
        return torch.stack(items, out=out)


class InMemoryImages(ImageSource):
    """Every image decoded and preprocessed once, when added, and kept as a tensor."""

    def __init__(self, paths: dict[str, Path], preprocess: Preprocess) -> None:
        self.tensors: dict[str, Tensor] = {}
        super().__init__(paths, preprocess)

    def add(self, paths: dict[str, Path]) -> None:
        new = {k: v for k, v in paths.items() if k not in self.tensors}
        bar = tqdm(new.items(), desc="caching images", unit="img", leave=False, disable=not new)
        for image_id, path in bar:
            self.tensors[image_id] = self.preprocess(load_image(path))
        super().add(new)

    def __getitem__(self, image_id: str) -> Tensor:
        return self.tensors[image_id]


class CachedFeatures:
    """Image ids -> float16 frozen-ViT features ``[B, patches, hidden]`` from a feature cache."""

    model_input = "vision_features"

    def __init__(self, cache: FeatureCache, paths: dict[str, Path]) -> None:
        self.cache = cache
        self.buffers = BatchBuffers()
        self.add(paths)

    def add(self, paths: dict[str, Path]) -> None:
        self.cache.require(list(paths))

    def batch(self, image_ids: Sequence[str]) -> Tensor:
        shape = (len(image_ids), *self.cache.feature_shape)
        return self.cache.get(image_ids, out=self.buffers.take(shape, torch.float16))


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator that depends only on (seed, epoch, index); str seeds hash the same everywhere."""
    return random.Random(f"{seed}/{epoch}/{index}")


class BatchedImages:
    """A dataset whose samples name images by id in ``image_fields``: :meth:`collate` (the
    DataLoader's ``collate_fn``) turns each field into one batch tensor from ``images``."""

    images: ImageSource | CachedFeatures
    image_fields: tuple[str, ...]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = {f: self.images.batch([s[f] for s in samples]) for f in self.image_fields}
        rest = [{k: v for k, v in s.items() if k not in images} for s in samples]
        return {**collate(rest), **images}


@dataclass(frozen=True)
class TrainItem:
    split: CIRSplit
    query: CIRQuery


class TrainTriplets(BatchedImages, Dataset):
    """(reference image, modification text, target image, target caption) per training query.

    ``image_keys`` numbers every image id of the union of splits: batches carry these integers
    so that equal targets can be found across DDP ranks (strings cannot be all-gathered).
    """

    image_fields = ("reference_image", "target_image")

    def __init__(
        self,
        splits: Sequence[CIRSplit],
        images: ImageSource | CachedFeatures,
        captions: dict[str, str] | None,
        seed: int = 0,
    ) -> None:
        self.items = [TrainItem(s, q) for s in splits for q in s.queries]
        self.images = images
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
        self, split: CIRSplit, images: ImageSource | CachedFeatures, captions: dict[str, str] | None
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


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and ints, keep texts as lists; a text of None (no captions) stays None."""
    batch: dict[str, Any] = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        if isinstance(first, Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch

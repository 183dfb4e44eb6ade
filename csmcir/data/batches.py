"""Batches of images by id, read the way training and evaluation both read them.

A sample names its images by id; a dataset's :meth:`~BatchedImages.collate` reads a whole
batch's images at once from a :class:`BatchSource`: decoded and preprocessed on each access
(:class:`ImageSource`: big benchmarks, with DataLoader workers), once into memory
(:class:`InMemoryImages`: the synthetic benchmark, a few thousand 64 px PNGs, so every epoch
after the first costs no decoding at all), or as frozen-ViT features from the model's feature
cache (:class:`csmcir.model.features.CachedFeatures`), float16 rows copied from the shards
straight into the batch tensor. That tensor is a reused one in the training process and shared
memory in a DataLoader worker (:class:`BatchBuffers`), so handing it to the training process
copies nothing; with ``pin_memory`` the loader's pinning thread then stages it for an
asynchronous copy to the GPU. ``model_input`` names the keyword of
``encode_query``/``encode_target`` that the source's tensors feed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import get_worker_info
from tqdm import tqdm

from csmcir.data.images import load_image

Preprocess = Callable[[Image.Image], Tensor]


class BatchSource(Protocol):
    """Image ids -> one batch tensor that feeds the model's ``model_input`` keyword."""

    model_input: str

    def add(self, paths: dict[str, Path]) -> None: ...

    def batch(self, image_ids: Sequence[str]) -> Tensor: ...


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


class BatchedImages:
    """A dataset whose samples name images by id in ``image_fields``: :meth:`collate` (the
    DataLoader's ``collate_fn``) turns each field into one batch tensor from ``images``."""

    images: BatchSource
    image_fields: tuple[str, ...]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = {f: self.images.batch([s[f] for s in samples]) for f in self.image_fields}
        rest = [{k: v for k, v in s.items() if k not in images} for s in samples]
        return {**collate(rest), **images}


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

"""The frozen-ViT feature cache: run the vision tower once per image, read fp16 features after.

With a frozen ViT-g the vision tower costs far more than the Q-Former it feeds (see
BENCHMARKS.md), and its output never changes, so training and evaluation read it from disk.

Layout of a cache folder::

    meta.json       format version, vision fingerprint, feature shape, dtype, the model's config
    index.json      {"shards": [file names], "ids": {image_id: [shard, row]}}
    shards/*.npy    float16 arrays [n, patches, hidden], written whole and atomically

The cache is keyed by :meth:`CSMCIR.vision_fingerprint` (ViT config + weights + preprocessing):
opening it with a model whose fingerprint differs is an error, never a silent reuse.
Extraction is resumable: every finished shard is recorded in ``index.json`` (rewritten
atomically), and a rerun skips the images already there.
"""

from __future__ import annotations

import fcntl
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from csmcir.data.batches import BatchBuffers, ImageSource
from csmcir.errors import DataError
from csmcir.io import atomic_write, atomic_write_json, read_json
from csmcir.model.modes import eval_mode

if TYPE_CHECKING:
    from csmcir.model.encoder import CSMCIR

FORMAT_VERSION = 1
META_FILE = "meta.json"
INDEX_FILE = "index.json"
SHARD_DIR = "shards"
EXTRACT_HINT = "csmcir features extract --model MODEL --benchmark NAME --root DIR --out {folder}"


class FeatureCache:
    """Read side of a cache folder: image ids -> ``[B, patches, hidden]`` ViT features.

    Open it with :meth:`open`, which checks the fingerprint against the model; fill it with
    :func:`extract_features`.
    """

    def __init__(self, folder: Path, meta: dict[str, Any], index: dict[str, Any]) -> None:
        self.folder = folder
        self.meta = meta
        self._shards: list[str] = index["shards"]
        self._rows: dict[str, tuple[int, int]] = {k: tuple(v) for k, v in index["ids"].items()}
        self._arrays: dict[int, np.ndarray] = {}

    @staticmethod
    def exists(folder: str | Path) -> bool:
        """Whether ``folder`` holds a cache (of any model): how callers decide to use one."""
        return (Path(folder) / META_FILE).is_file()

    @classmethod
    def open(cls, folder: str | Path, model: CSMCIR | None = None) -> FeatureCache:
        """Open a cache; with ``model``, refuse it unless it was made by that model's ViT."""
        folder = Path(folder)
        if not cls.exists(folder):
            raise DataError(
                f"no feature cache at {folder} ({META_FILE} missing); make one with: "
                + EXTRACT_HINT.format(folder=folder)
            )
        meta = read_json(folder / META_FILE, "feature-cache metadata")
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"feature cache {folder}: format_version {meta.get('format_version')!r} is not "
                f"{FORMAT_VERSION}; extract it again"
            )
        if model is not None:
            check_fingerprint(folder, meta, model.vision_fingerprint())
        index_path = folder / INDEX_FILE
        index = (
            read_json(index_path, "feature-cache index")
            if index_path.is_file()
            else {"shards": [], "ids": {}}
        )
        return cls(folder, meta, index)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def feature_shape(self) -> tuple[int, int]:
        return tuple(self.meta["feature_shape"])

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._rows

    def ids(self) -> list[str]:
        return list(self._rows)

    def missing(self, image_ids: Sequence[str]) -> list[str]:
        return [i for i in image_ids if i not in self._rows]

    def require(self, image_ids: Sequence[str]) -> None:
        """A DataError naming the ids without features (and the command that extracts them)."""
        missing = self.missing(image_ids)
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise DataError(
                f"feature cache {self.folder} has no features for {len(missing)} image(s): "
                f"{shown}; extract that split with: " + EXTRACT_HINT.format(folder=self.folder)
            )

    def _array(self, shard: int) -> np.ndarray:
        if shard not in self._arrays:
            path = self.folder / SHARD_DIR / self._shards[shard]
            try:
                self._arrays[shard] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"feature cache shard {path} is unreadable: {e}") from None
        return self._arrays[shard]

    def get(self, image_ids: Sequence[str], out: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, patches, hidden]`` float16 features of ``image_ids`` in order, as stored.

        They stay float16 until they reach the model's device (the model widens them there):
        converting on the host would double the bytes every later copy moves. Rows are copied
        straight from the memory-mapped shards into ``out`` (or a new tensor), in file order and
        one slice per run of consecutive rows, so no intermediate copy is made. A missing id is
        an error.
        """
        self.require(image_ids)
        shape = (len(image_ids), *self.feature_shape)
        if out is None:
            out = torch.empty(shape, dtype=torch.float16)
        elif out.shape != shape or out.dtype != torch.float16 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float16 tensor of shape {shape}")
        target = out.numpy()
        for shard, row, position, n in _runs([self._rows[i] for i in image_ids]):
            target[position : position + n] = self._array(shard)[row : row + n]
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its memory maps (DataLoader workers under spawn reopen them)."""
        return {**self.__dict__, "_arrays": {}}


class CachedFeatures:
    """Image ids -> float16 frozen-ViT features ``[B, patches, hidden]`` from a feature cache:
    the :class:`~csmcir.data.batches.BatchSource` that training and evaluation read it through."""

    model_input = "vision_features"

    def __init__(self, cache: FeatureCache, paths: dict[str, Path]) -> None:
        self.cache = cache
        self.buffers = BatchBuffers()
        self.add(paths)

    def add(self, paths: dict[str, Path]) -> None:
        self.cache.require(list(paths))

    def batch(self, image_ids: Sequence[str]) -> torch.Tensor:
        shape = (len(image_ids), *self.cache.feature_shape)
        return self.cache.get(image_ids, out=self.buffers.take(shape, torch.float16))


def _runs(rows: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """``(shard, first row, first output position, length)`` of each run of requested rows that
    are consecutive both in a shard and in the output, ordered by shard and row: a sequential
    read (a validation gallery in extraction order) becomes a few large copies."""
    runs: list[list[int]] = []
    for position, (shard, row) in enumerate(rows):
        last = runs[-1] if runs else None
        if last and last[0] == shard and last[1] + last[3] == row and last[2] + last[3] == position:
            last[3] += 1
        else:
            runs.append([shard, row, position, 1])
    return sorted((tuple(run) for run in runs), key=lambda run: run[:2])


def check_fingerprint(folder: Path, meta: dict[str, Any], fingerprint: str) -> None:
    if meta.get("fingerprint") != fingerprint:
        raise DataError(
            f"feature cache {folder} is stale: it was extracted by a vision tower with "
            f"fingerprint {meta.get('fingerprint')}, but this model's is {fingerprint} (other "
            "weights or preprocessing). Delete the folder or extract into another one: "
            + EXTRACT_HINT.format(folder=folder)
        )


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One extraction per folder at a time: two writers would number their shards alike."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another extraction is writing to {folder}") from None
        yield


def extract_features(
    model: CSMCIR,
    image_paths: Mapping[str, str | Path],
    folder: str | Path,
    *,
    batch_size: int = 32,
    shard_size: int = 512,
    workers: int = 0,
    compile: bool = False,
    progress: bool = True,
) -> FeatureCache:
    """Run the model's ViT over every image not yet in the cache and store fp16 features.

    The ViT never waits for the rest: ``workers`` DataLoader processes decode and preprocess
    the images ahead of it (pinned for a GPU), the features travel to the host without
    blocking, and a thread of their own assembles and writes the shards (:class:`ShardWriter`).
    ``compile`` runs the ViT through ``torch.compile``. Whatever the settings, the shards hold
    the same bytes: each batch's features are those of ``model.vision_features`` on it.

    Resumable: a killed run loses at most the shard it was filling. A folder made by another
    vision tower is refused (see :func:`check_fingerprint`), and so is adding rows at another
    precision than the folder's (a GPU run's bf16 resumed on a CPU at fp32 would mix them).
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive")
    if workers < 0:
        raise ValueError("workers must be 0 or more")
    folder = Path(folder)
    fingerprint = model.vision_fingerprint()
    with _exclusive(folder):
        if FeatureCache.exists(folder):
            cache = FeatureCache.open(folder)
            check_fingerprint(folder, cache.meta, fingerprint)
        else:
            vision = model.config.vision
            patches = (vision["image_size"] // vision["patch_size"]) ** 2 + 1  # + [CLS]
            meta = {
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "feature_shape": [patches, vision["hidden_size"]],
                "dtype": "float16",
                "extracted_with": {
                    "preset": model.config.preset,
                    "precision": model.config.precision,
                    "vision": model.config.vision,
                    "image": model.config.to_dict()["image"],
                },
            }
            atomic_write_json(folder / META_FILE, meta)
            cache = FeatureCache(folder, meta, {"shards": [], "ids": {}})
        todo = {i: Path(image_paths[i]) for i in image_paths if i not in cache}
        made = cache.meta.get("extracted_with", {}).get("precision")
        if todo and made is not None and made != model.config.precision:
            raise DataError(
                f"{folder} holds ViT features extracted at precision {made}, and this run's ViT "
                f"runs at {model.config.precision}: adding {len(todo)} rows would mix two "
                f"precisions in one cache. Go on with --precision {made}, or extract into "
                "another folder"
            )
        index = {"shards": list(cache._shards), "ids": {k: list(v) for k, v in cache._rows.items()}}
        bar = tqdm(
            total=len(todo), desc="extracting ViT features", unit="img", disable=not progress
        )
        writer = ShardWriter(folder, index, shard_size, cache.feature_shape)
        with eval_mode(model), bar, writer:
            for ids, rows, ready in vit_batches(model, todo, batch_size, workers, compile):
                writer.put(ids, rows, ready)
                bar.update(len(ids))
        return FeatureCache.open(folder)


def _ids_and_pixels(images: ImageSource, ids: list[str]) -> tuple[list[str], torch.Tensor]:
    return ids, images.batch(ids)


def vit_batches(
    model: CSMCIR, paths: Mapping[str, Path], batch_size: int, workers: int, compile: bool
) -> Iterator[tuple[list[str], torch.Tensor, torch.cuda.Event | None]]:
    """``(ids, float16 features on the host, event)`` per batch, in the order of ``paths``.

    The features are copied into pinned host memory without blocking; ``event`` (None on a
    CPU) completes when they are there. So the host queues the next batch's ViT at once.
    """
    cuda = model.device.type == "cuda"
    images = ImageSource(dict(paths), model.transform.one)
    loader = DataLoader(
        list(paths),
        batch_size=batch_size,
        collate_fn=functools.partial(_ids_and_pixels, images),
        num_workers=workers,
        pin_memory=cuda,
    )
    forward: Callable[[torch.Tensor], torch.Tensor] = model.vision_features
    if compile:
        forward = torch.compile(forward)
    with torch.no_grad():
        for ids, pixels in loader:
            features = forward(pixels).to(torch.float16)
            rows = torch.empty(features.shape, dtype=torch.float16, pin_memory=cuda)
            rows.copy_(features, non_blocking=cuda)
            ready = None
            if cuda:
                ready = torch.cuda.Event()
                ready.record()
            yield ids, rows, ready


class ShardWriter:
    """Assembles feature rows into shards and writes them, in a thread of its own.

    Writing a ViT-g shard (512 images, 362 MB) takes about as long as a GPU takes to make it;
    in the extraction loop it would stall the GPU every shard. Rows come in batch by batch
    (:meth:`put`, in order); every ``shard_size`` of them become one shard, written and then
    recorded in the index, and the rest a last shard when the ``with`` block ends normally. When
    it ends with an error the rows of an incomplete shard are dropped, as a killed run drops
    them: the shards before it are complete and recorded. An error of the writer itself (a full
    disk) is raised in the caller at its next :meth:`put` or at the end.
    """

    _DONE, _ABORT = object(), object()

    def __init__(
        self,
        folder: Path,
        index: dict[str, Any],
        shard_size: int,
        row_shape: Sequence[int],
        depth: int = 4,
    ) -> None:
        self.folder, self.index, self.shard_size = folder, index, shard_size
        self.shard = np.empty((shard_size, *row_shape), dtype=np.float16)
        self.ids: list[str] = []
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="feature-shard-writer", daemon=True)

    def __enter__(self) -> ShardWriter:
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._send(self._DONE if kind is None else self._ABORT)
        self.thread.join()
        if kind is None:  # else the caller's own error goes on
            self._raise()

    def put(self, ids: list[str], rows: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        """Queue a batch's rows (written once ``ready`` completes); blocks while the writer is
        ``depth`` batches behind."""
        if not self._send((ids, rows, ready)):
            self._raise()

    def _send(self, item: object) -> bool:
        """Queue ``item``; False when the writer has stopped (on an error) and never will."""
        while self.thread.is_alive():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not self._ABORT:
                if item is self._DONE:
                    if self.ids:
                        self._write()
                    return
                ids, rows, ready = item
                if ready is not None:
                    ready.synchronize()
                rows = rows.numpy()
                while len(ids):
                    take = min(len(ids), self.shard_size - len(self.ids))
                    self.shard[len(self.ids) : len(self.ids) + take] = rows[:take]
                    self.ids += ids[:take]
                    ids, rows = ids[take:], rows[take:]
                    if len(self.ids) == self.shard_size:
                        self._write()
        except BaseException as e:  # handed to the caller
            self.error = e

    def _write(self) -> None:
        _write_shard(self.folder, self.index, self.ids, self.shard[: len(self.ids)])
        self.ids = []


def _write_shard(folder: Path, index: dict[str, Any], ids: list[str], feats: np.ndarray) -> None:
    """Write one shard, then record it: the index never names a shard that is not complete."""
    shard = len(index["shards"])
    name = f"shard-{shard:05d}.npy"
    atomic_write(folder / SHARD_DIR / name, lambda f: np.save(f, feats, allow_pickle=False))
    index["shards"].append(name)
    index["ids"].update({image_id: [shard, row] for row, image_id in enumerate(ids)})
    atomic_write_json(folder / INDEX_FILE, index, indent=None)

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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from csmcir.data.batches import BatchBuffers
from csmcir.data.images import load_image
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
    progress: bool = True,
) -> FeatureCache:
    """Run the model's ViT over every image not yet in the cache and store fp16 features.

    Resumable: a killed run loses at most the shard it was filling. A folder made by another
    vision tower is refused (see :func:`check_fingerprint`).
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive")
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
        todo = [i for i in image_paths if i not in cache]
        index = {"shards": list(cache._shards), "ids": {k: list(v) for k, v in cache._rows.items()}}
        bar = tqdm(
            total=len(todo), desc="extracting ViT features", unit="img", disable=not progress
        )
        with eval_mode(model), bar:
            for start in range(0, len(todo), shard_size):
                chunk = todo[start : start + shard_size]
                feats = _run_vit(model, [image_paths[i] for i in chunk], batch_size, bar)
                _write_shard(folder, index, chunk, feats)
        return FeatureCache.open(folder)


def _run_vit(model: CSMCIR, paths: Sequence[str | Path], batch_size: int, bar: tqdm) -> np.ndarray:
    parts = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = [load_image(p) for p in paths[start : start + batch_size]]
            feats = model.vision_features(model.preprocess(batch))
            parts.append(feats.to("cpu", torch.float16).numpy())
            bar.update(len(batch))
    return np.concatenate(parts)


def _write_shard(folder: Path, index: dict[str, Any], ids: list[str], feats: np.ndarray) -> None:
    """Write one shard, then record it: the index never names a shard that is not complete."""
    shard = len(index["shards"])
    name = f"shard-{shard:05d}.npy"
    atomic_write(folder / SHARD_DIR / name, lambda f: np.save(f, feats, allow_pickle=False))
    index["shards"].append(name)
    index["ids"].update({image_id: [shard, row] for row, image_id in enumerate(ids)})
    atomic_write_json(folder / INDEX_FILE, index, indent=None)

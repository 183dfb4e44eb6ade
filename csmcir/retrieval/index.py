"""A faiss index over a gallery's target embeddings, with its id map and the model's fingerprint.

Scores are inner products of L2-normalised embeddings (cosine). ``flat`` (exact) is the default;
``ivf`` (inverted lists, ``nlist`` cells, ``nprobe`` searched) and ``hnsw`` (graph, ``M`` links,
``ef_search``) trade exactness for speed on large galleries.

Multi-vector targets (``target_text="none"``: ``[N, Q, D]``, scored as the best of the Q tokens)
are indexed as N*Q vectors. A search asks faiss for k*Q vectors and keeps each image's first
(best) hit: the best vector of every image in the true top k ranks within the first (k-1)*Q + 1
vectors, so with the exact index this is exactly max-over-tokens scoring.

On disk an index is a folder: ``index.faiss``, ``ids.json`` (image ids and paths, in index
order) and ``meta.json`` (model fingerprint, build options, sizes, the folder of the model that
built it, and ``image_root``: the folder relative image paths were given from). An index built
from a model object (:meth:`GalleryIndex.build`) always records its model: the folder it was
loaded from (``model_dir=``), or else a copy saved in ``INDEX/model``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import torch

from csmcir.errors import ConfigError, DataError
from csmcir.io import atomic_write_bytes, atomic_write_json, read_json

KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.json", "meta.json"
MODEL_SUBDIR = "model"  # where an index keeps the model that built it, when no folder holds it
FORMAT_VERSION = 1


@dataclass
class Hits:
    """Search results, best first: ``ids[i][r]`` scored ``scores[i, r]`` for query i.

    ``indices`` are gallery positions; where an approximate index found fewer than k images the
    rows end in -1 (and ``ids[i]`` is shorter).
    """

    ids: list[list[str]]
    scores: np.ndarray
    indices: np.ndarray


class GalleryIndex:
    """Gallery embeddings in faiss plus everything needed to trust and read the results."""

    def __init__(
        self,
        index: faiss.Index,
        ids: Sequence[str],
        meta: dict,
        paths: Sequence[str | None] | None = None,
    ) -> None:
        self.index = index
        self.ids = list(ids)
        self.paths = list(paths) if paths is not None else [None] * len(self.ids)
        self.meta = meta
        self.tokens = int(meta.get("tokens_per_image", 1))
        if index.ntotal != len(self.ids) * self.tokens:
            raise DataError(
                f"index holds {index.ntotal} vectors for {len(self.ids)} images "
                f"x {self.tokens} tokens: its files do not belong together"
            )
        self.positions = {image_id: i for i, image_id in enumerate(self.ids)}
        self.model = None  # the model that built it (build()): saved with it if no folder has it
        self.folder: Path | None = None  # where it was loaded from

    # building

    @classmethod
    def build(
        cls,
        model,
        images: Sequence[str | Path] | Mapping[str, str | Path],
        captions: Mapping[str, str] | None = None,
        *,
        kind: str = "flat",
        model_dir: str | Path | None = None,
        empty_captions: bool = False,
        batch_size: int = 64,
        cache_dir: Path | None = None,
        **options,
    ) -> GalleryIndex:
        """Embed ``images`` (paths, or id -> path; a path's id is its file stem) and index them.

        ``model_dir``: the folder ``model`` was loaded from, recorded so the index can be opened
        with its model; without one, :meth:`save` saves the model into ``INDEX/model``.
        Relative image paths are recorded as given, with the current folder as ``image_root``.
        """
        from csmcir.evaluation.encode import encode_gallery, target_texts

        if isinstance(images, Mapping):
            ids, paths = [str(i) for i in images], [Path(p) for p in images.values()]
        else:
            paths = [Path(p) for p in images]
            ids = [p.stem for p in paths]
        if not ids:
            raise DataError("nothing to index: the gallery has no images")
        duplicated = (
            sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
        )
        if duplicated:
            raise DataError(
                f"two gallery images share the id {duplicated[0]!r}: ids must be unique"
            )
        texts = target_texts(model, ids, captions, empty_captions)
        fingerprint = model.fingerprint()
        embeddings, _ = encode_gallery(
            model,
            ids,
            paths,
            texts,
            cache_dir=cache_dir,
            batch_size=batch_size,
            fingerprint=fingerprint,
        )
        extra = {
            "target_text": model.config.target_text,
            "captioned": texts is not None,
            "model_dir": None if model_dir is None else str(Path(model_dir).resolve()),
            "image_root": str(Path.cwd().resolve()),
        }
        index = cls.from_embeddings(
            embeddings,
            ids,
            fingerprint=fingerprint,
            kind=kind,
            paths=[str(p) for p in paths],
            extra=extra,
            **options,
        )
        index.model = model
        return index

    @classmethod
    def from_embeddings(
        cls,
        embeddings: torch.Tensor | np.ndarray,
        ids: Sequence[str],
        *,
        fingerprint: str,
        kind: str = "flat",
        paths: Sequence[str] | None = None,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        extra: dict | None = None,
    ) -> GalleryIndex:
        """Index ready-made embeddings ``[N, D]`` or ``[N, Q, D]`` (one row per id)."""
        vectors = np.ascontiguousarray(torch.as_tensor(embeddings).float().numpy())
        if vectors.ndim not in (2, 3) or len(vectors) != len(ids):
            raise ValueError(f"embeddings {vectors.shape} do not match {len(ids)} ids")
        tokens = 1 if vectors.ndim == 2 else vectors.shape[1]
        flat = vectors.reshape(-1, vectors.shape[-1])
        dim = flat.shape[1]
        options: dict = {"kind": kind}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = nlist or max(1, min(len(flat) // 39, round(4 * math.sqrt(len(flat)))))
            if not 1 <= nlist <= len(flat):
                raise ConfigError(f"--nlist must be within 1..{len(flat)} (vectors), got {nlist}")
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            index.train(flat)
            index.nprobe = min(nprobe, nlist)
            options |= {"nlist": nlist, "nprobe": index.nprobe}
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
            options |= {"M": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
        else:
            raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
        index.add(flat)
        meta = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": fingerprint,
            "options": options,
            "dim": dim,
            "images": len(ids),
            "tokens_per_image": tokens,
            "built": datetime.now(UTC).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        return cls(index, ids, meta, paths)

    # searching

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> Hits:
        """Top-k gallery images for each query embedding ``[B, D]`` (or one ``[D]``)."""
        q = np.ascontiguousarray(torch.as_tensor(queries).detach().cpu().float().numpy())
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.meta["dim"]:
            raise ValueError(
                f"query embeddings {q.shape} do not match the index dim {self.meta['dim']}"
            )
        k = min(int(k), len(self.ids))
        if k < 1:
            raise ValueError("k must be at least 1")
        scores, found = self.index.search(q, min(k * self.tokens, self.index.ntotal))
        if self.tokens > 1:
            scores, found = self._best_per_image(scores, found, k)
        else:
            scores, found = scores[:, :k], found[:, :k]
        # An approximate index can find fewer than k: faiss pads with -1, left out of ``ids``.
        ids = [[self.ids[j] for j in row if j >= 0] for row in found]
        return Hits(ids, scores, found)

    def _best_per_image(self, scores: np.ndarray, found: np.ndarray, k: int):
        out_s = np.full((len(found), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(found), k), -1, dtype=np.int64)
        for r, (row_s, row_f) in enumerate(zip(scores, found, strict=True)):
            seen: set[int] = set()
            for s, f in zip(row_s, row_f, strict=True):
                image = int(f) // self.tokens if f >= 0 else -1
                if image < 0 or image in seen:
                    continue
                out_s[r, len(seen)], out_i[r, len(seen)] = s, image
                seen.add(image)
                if len(seen) == k:
                    break
        return out_s, out_i

    def model_folder(self, given: str | Path | None = None) -> Path:
        """``given`` (a --model flag), else the model folder the index recorded at build time;
        an error saying what to pass when there is neither or the recorded folder is gone."""
        if given is not None:
            return Path(given)
        recorded = self.meta.get("model_dir")
        if not recorded:
            raise ConfigError(
                f"the index {self.folder or '(in memory)'} records no model folder (built by an "
                "older csmcir, or from embeddings): pass --model, the folder it was built with"
            )
        if not Path(recorded).is_dir():
            raise ConfigError(
                f"the model folder recorded in the index ({recorded}) is gone: pass --model, "
                "the folder it was built with"
            )
        return Path(recorded)

    def check_model(self, model, fingerprint: str | None = None) -> None:
        """Refuse a model other than the one that built the index: its scores would be noise."""
        fingerprint = fingerprint or model.fingerprint()
        if fingerprint != self.meta["model_fingerprint"]:
            raise DataError(
                f"the index was built by model {self.meta['model_fingerprint'][:12]} "
                f"({self.meta.get('model_source', 'unknown source')}), not by this one "
                f"({fingerprint[:12]}): query it with that model, or rebuild it with "
                "csmcir index build"
            )

    # files

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not self.meta.get("model_dir") and self.model is not None:
            kept = self.model.save_pretrained(folder / MODEL_SUBDIR)
            self.meta["model_dir"] = str(kept.resolve())
        atomic_write_bytes(folder / INDEX_FILE, faiss.serialize_index(self.index).tobytes())
        atomic_write_json(folder / IDS_FILE, {"ids": self.ids, "paths": self.paths}, indent=None)
        atomic_write_json(folder / META_FILE, self.meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path, model=None) -> GalleryIndex:
        """Read a saved index; with ``model``, refuse it unless that model built the index."""
        folder = Path(folder)
        missing = [f for f in (INDEX_FILE, IDS_FILE, META_FILE) if not (folder / f).is_file()]
        if missing:
            raise DataError(
                f"{folder} is not a gallery index (missing {', '.join(missing)}); "
                "build one with csmcir index build"
            )
        meta = read_json(folder / META_FILE, "index meta file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{folder / META_FILE}: unknown format_version {meta.get('format_version')!r}"
            )
        id_map = read_json(folder / IDS_FILE, "index id map")
        raw = np.frombuffer((folder / INDEX_FILE).read_bytes(), dtype=np.uint8)
        try:
            index = faiss.deserialize_index(raw)
        except RuntimeError as e:
            raise DataError(f"unreadable faiss index {folder / INDEX_FILE}: {e}") from None
        opts = meta.get("options", {})
        if "nprobe" in opts:
            faiss.extract_index_ivf(index).nprobe = opts["nprobe"]
        if "ef_search" in opts:
            index.hnsw.efSearch = opts["ef_search"]
        gallery = cls(index, id_map["ids"], meta, resolve_paths(id_map.get("paths"), meta))
        gallery.folder = folder
        if model is not None:
            gallery.check_model(model)
        return gallery

    def path_of(self, image_id: str) -> str | None:
        return self.paths[self.positions[image_id]] if image_id in self.positions else None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"GalleryIndex({len(self.ids)} images, {self.meta['options']}, dim {self.meta['dim']})"
        )


def resolve_paths(paths: Sequence[str | None] | None, meta: dict) -> list[str | None] | None:
    """Image paths as recorded, relative ones joined to the folder they were given from (so an
    index opened from another folder finds its images); older indexes: as recorded."""
    root = meta.get("image_root")
    if paths is None or not root:
        return None if paths is None else list(paths)
    return [p if p is None or Path(p).is_absolute() else str(Path(root) / p) for p in paths]


def recall_against_exact(approx: Hits, exact: Hits) -> float:
    """Share of the exact top-k that an approximate search also returns (recall@k vs exact)."""
    found = sum(len(set(a) & set(e)) for a, e in zip(approx.ids, exact.ids, strict=True))
    total = sum(len(e) for e in exact.ids)
    return found / total if total else 1.0

"""Turning a gallery and its queries into embeddings, with the gallery cached on disk.

The gallery is the expensive side (every image through the ViT) and does not change between
metrics, protocol options or query sets, so its embeddings are stored per (model fingerprint,
gallery) in a safetensors file. The key covers every image's id, path, size and modification
time and the caption it was encoded with, so an edited image or caption file never reuses a
stale entry. Each entry records a SHA-256 of its embeddings' bytes: an entry whose bytes were
changed on disk (zeroed, garbled) is named as corrupt and encoded again, never used.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import Dataset
from tqdm import tqdm

from csmcir.data.batches import BatchedImages, ImageSource
from csmcir.data.prefetch import PrefetchLoader, loader_options
from csmcir.errors import ConfigError, DataError, warn
from csmcir.hub import MODEL, is_hub_name, resolve
from csmcir.io import atomic_write_bytes
from csmcir.model.features import CachedFeatures
from csmcir.model.run_folder import model_folder

DEFAULT_CACHE_DIR = Path(os.environ.get("CSMCIR_CACHE", Path.home() / ".cache" / "csmcir"))
CACHE_VERSION = "2"  # 2: entries carry a checksum of their embeddings


def load_model(spec: str, corpus: Callable[[], list[str]], seed: int = 0):
    """An exported model folder (or a training run folder: its ``model/``), a preset name
    (``tiny``: untrained, tokenizer from ``corpus``), or a hub name (``org/name``, fetched).

    Untrained presets are the zero-shot baseline: they show what training adds. ``corpus`` is
    called only when a tokenizer has to be built.
    """
    from csmcir.model import CSMCIR

    if Path(spec).exists():  # a folder (or run folder), or a file from_pretrained explains
        return CSMCIR.from_pretrained(model_folder(spec))
    from csmcir.model.registry import list_presets, load_preset

    if spec not in list_presets():
        if is_hub_name(spec):
            return CSMCIR.from_pretrained(resolve(spec, MODEL, "--model"))
        raise ConfigError(
            f"--model {spec!r} is neither a model folder, a preset ({', '.join(list_presets())}) "
            "nor a hub name (org/name)"
        )
    preset = load_preset(spec)
    texts = corpus() if preset.tokenizer == "wordpiece" else None
    return CSMCIR.from_preset(spec, tokenizer_corpus=texts, seed=seed)


def target_texts(
    model,
    ids: Sequence[str],
    captions: Mapping[str, str] | None,
    empty_captions: bool = False,
    source: str = "--captions",
) -> list[str] | None:
    """The caption each gallery image is encoded with; None for an image-only target model.

    A model that reads target captions refuses images without one (naming how many and which)
    unless ``empty_captions`` says to encode them with empty text.
    """
    if model.config.target_text == "none":
        return None
    captions = captions or {}
    missing = [i for i in ids if i not in captions]
    if missing and not empty_captions:
        given = "no caption file was given" if not captions else f"{source} does not cover them"
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise DataError(
            f"this model reads target captions, but {len(missing)} of {len(ids)} gallery images "
            f"have none ({given}): {shown}. Give {source} FILE with a caption for each "
            "(csmcir caption run | merge), or --empty-captions to encode them with empty text"
        )
    return [captions.get(i, "") for i in ids]


class EncodeItems(BatchedImages, Dataset):
    """(image, text) pairs to embed. Images are read a batch at a time by the same sources as
    training: cached features by image id, or pixels decoded by position."""

    image_fields = ("image",)

    def __init__(
        self, keys: Sequence[Hashable], texts: Sequence[str] | None, images: ImageSource
    ) -> None:
        self.keys, self.texts, self.images = keys, texts, images

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.keys[index],
            "text": None if self.texts is None else self.texts[index],
        }


@torch.inference_mode()
def encode_images(
    model,
    paths: Sequence[Path],
    texts: Sequence[str] | None,
    *,
    side: str,
    batch_size: int = 64,
    desc: str = "encoding",
    ids: Sequence[str] | None = None,
    features=None,
    num_workers: int = 0,
) -> torch.Tensor:
    """Embed (image, text) pairs with ``encode_query`` or ``encode_target``; fp32 on the CPU.

    With ``features`` (an open ``csmcir.model.features.FeatureCache``) the frozen ViT's output
    is read from the cache by image id instead of running the ViT; an id it lacks is an error.
    ``num_workers`` DataLoader workers decode images ahead of the model; a feature cache is read
    by a thread ahead of it instead, as ``fit`` reads it
    (:func:`~csmcir.data.prefetch.loader_options`); pinned for a GPU.
    """
    if texts is not None and len(texts) != len(paths):
        raise ValueError(f"{len(texts)} texts for {len(paths)} images")
    if features is not None and (ids is None or len(ids) != len(paths)):
        raise ValueError("reading a feature cache needs the image ids")
    if not paths:
        raise DataError(f"{desc}: nothing to encode")
    encode = {"query": model.encode_query, "target": model.encode_target}[side]
    if features is not None:
        images, keys = CachedFeatures(features, dict(zip(ids, paths, strict=True))), list(ids)
        model_input = CachedFeatures.model_input
    else:
        images, keys = ImageSource(dict(enumerate(paths)), model.transform.one), range(len(paths))
        model_input = ImageSource.model_input
    items = EncodeItems(keys, texts, images)
    options = loader_options(
        features=features is not None, num_workers=num_workers, on_cuda=model.device.type == "cuda"
    )
    loader = PrefetchLoader(items, batch_size=batch_size, collate_fn=items.collate, **options)
    model.eval()
    chunks = []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        batch_texts = None if texts is None else batch["text"]
        chunks.append(encode(batch_texts, **{model_input: batch["image"]}).float().cpu())
    return torch.cat(chunks)


def gallery_key(model_fingerprint: str, paths: Sequence[Path], ids: Sequence[str], texts) -> str:
    """Hash of the model and everything about the gallery that changes its embeddings."""
    h = hashlib.sha256(f"csmcir-gallery {CACHE_VERSION} {model_fingerprint}\n".encode())
    for i, (image_id, path) in enumerate(zip(ids, paths, strict=True)):
        try:
            stat = Path(path).stat()
        except OSError:
            raise DataError(f"image not found: {path}") from None
        text = "\x00none" if texts is None else texts[i]
        h.update(f"{image_id}\t{path}\t{stat.st_size}\t{stat.st_mtime_ns}\t{text}\n".encode())
    return h.hexdigest()


def encode_gallery(
    model,
    ids: Sequence[str],
    paths: Sequence[Path],
    texts: Sequence[str] | None,
    *,
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    batch_size: int = 64,
    fingerprint: str | None = None,
    features=None,
    num_workers: int = 0,
) -> tuple[torch.Tensor, bool]:
    """Gallery embeddings ``[N, D]`` (or ``[N, Q, D]``) and whether they came from the cache."""
    fingerprint = fingerprint or model.fingerprint()
    path = None
    if cache_dir is not None:
        # fp16 cached ViT features give slightly different embeddings than pixels.
        source = f"features {features.fingerprint}" if features is not None else "pixels"
        key = gallery_key(f"{fingerprint} {source}", paths, ids, texts)
        path = Path(cache_dir) / "gallery" / f"{key[:40]}.safetensors"
        cached = read_cached_gallery(path, len(ids))
        if cached is not None:
            return cached, True
    embeddings = encode_images(
        model,
        paths,
        texts,
        side="target",
        batch_size=batch_size,
        desc="gallery",
        ids=ids,
        features=features,
        num_workers=num_workers,
    )
    if path is not None:
        meta = {
            "model": fingerprint,
            "images": str(len(ids)),
            "version": CACHE_VERSION,
            "sha256": embeddings_checksum(embeddings),
        }
        atomic_write_bytes(path, safetensors_bytes({"embeddings": embeddings}, metadata=meta))
    return embeddings, False


def read_cached_gallery(path: Path, images: int) -> torch.Tensor | None:
    """A cache entry's embeddings, or None to encode again: absent, unreadable (cut short by
    a full disk or a partial copy: entries are written atomically) or corrupt (its bytes no
    longer match its checksum), which is said; the new embeddings then replace it."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            checksum = (f.metadata() or {}).get("sha256")
            cached = f.get_tensor("embeddings")
    except (SafetensorError, OSError, KeyError) as e:
        warn(f"gallery cache entry {path} is unreadable ({e}); encoding the gallery again")
        return None
    if cached.shape[0] != images:
        warn(
            f"gallery cache entry {path} holds {cached.shape[0]} embeddings for {images} images; "
            "encoding the gallery again"
        )
        return None
    if checksum != embeddings_checksum(cached):
        warn(
            f"gallery cache entry {path} is corrupt: its embeddings do not match the checksum "
            "written with them; encoding the gallery again"
        )
        return None
    return cached


def embeddings_checksum(embeddings: torch.Tensor) -> str:
    """SHA-256 of the embeddings' bytes, kept in the cache entry's header."""
    data = embeddings.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().data).hexdigest()


def score_matrix(model, queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``model.similarity`` over query chunks, so multi-vector galleries stay within memory."""
    per_query = gallery.shape[0] * (gallery.shape[1] if gallery.dim() == 3 else 1)
    chunk = max(1, min(1024, (1 << 25) // max(per_query, 1)))
    rows = [
        model.similarity(queries[i : i + chunk], gallery) for i in range(0, len(queries), chunk)
    ]
    return torch.cat(rows).float()

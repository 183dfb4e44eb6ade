"""What the demo does, without the web page: load a model and its index, check uploads, search.

Kept apart from the Gradio layout so every rule the page enforces (upload size, decodable
images, gallery-only files, the index's own model) is plain Python that tests call directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from captioning.backends.oracle import OracleBackend
from csmcir.data.captions import caption_writers
from csmcir.data.images import ImageTooLargeError, load_image, open_image, pixel_digest
from csmcir.errors import ConfigError, DataError
from csmcir.model.run_folder import model_folder
from csmcir.model.tokenizer import describe_cut, describe_unknown
from csmcir.retrieval.index import GalleryIndex

DEFAULT_MAX_UPLOAD_MB = 10.0
MAX_K = 50


@dataclass(frozen=True)
class Result:
    """One ranked gallery image: its rank (1 = best), id, file and cosine score."""

    rank: int
    image_id: str
    path: Path
    score: float


class RetrievalDemo:
    """A model, the gallery index it built, and the gallery's files, checked once at start-up."""

    def __init__(
        self, model, index: GalleryIndex, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    ) -> None:
        if max_upload_mb <= 0:
            raise ConfigError(f"--max-upload-mb must be positive, got {max_upload_mb}")
        index.check_model(model)
        self.model = model.eval()
        self.index = index
        self.max_upload_mb = max_upload_mb
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.gallery = gallery_files(index)
        self._ids_by_size: dict[tuple[int, int], list[str]] | None = None
        self._digests: dict[str, str] = {}

    @classmethod
    def load(
        cls,
        index_dir: str | Path,
        model_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    ) -> RetrievalDemo:
        """Open an index folder and its model (by default the folder recorded at build time)."""
        from csmcir.model import CSMCIR

        index = GalleryIndex.load(index_dir)
        folder = index.model_folder(None if model_dir is None else model_folder(model_dir))
        if not folder.is_dir():
            raise ConfigError(f"--model {folder} is not a model folder")
        model = CSMCIR.from_pretrained(folder).to(device)
        return cls(model, index, max_upload_mb)

    def gallery_folders(self) -> list[Path]:
        """The folders holding gallery images: the only files the web server may hand out."""
        folders = {p.parent for p in self.gallery.values()}
        return sorted(f for f in folders if not any(p in folders for p in f.parents))

    def find(self, text: str, limit: int) -> list[str]:
        """Gallery ids containing ``text`` (case-insensitive), in index order, at most ``limit``."""
        needle = text.strip().lower()
        found = [i for i in self.index.ids if needle in i.lower()]
        return found[:limit]

    def gallery_image(self, image_id: str) -> Path:
        try:
            return self.gallery[image_id]
        except KeyError:
            raise DataError(f"{image_id!r} is not an image of this index's gallery") from None

    def check_upload(self, path: str | Path) -> Image.Image:
        """An uploaded reference, refused when too large or not an image (named in the error)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"the upload {path.name} did not arrive; try again")
        size = path.stat().st_size
        if size > self.max_upload_bytes:
            raise DataError(self.size_refusal(path.name, size))
        try:
            return load_image(path, name=path.name)
        except ImageTooLargeError:
            raise
        except DataError:
            raise DataError(
                f"{path.name} is not an image this demo can read (PNG, JPEG, WebP, ...)"
            ) from None

    def size_refusal(self, name: str, size: int) -> str:
        """Why an upload of ``size`` bytes is refused (the page says it before sending it)."""
        return (
            f"{name} is {size / 2**20:.2f} MB; uploads are limited to {self.max_upload_mb:g} MB "
            "(csmcir demo --max-upload-mb)"
        )

    def gallery_match(self, image: Image.Image) -> str | None:
        """The id of the gallery image with exactly ``image``'s pixels, if any, so an uploaded
        copy of a gallery image can be hidden from its own ranking like a picked one.

        The first call reads every gallery image's header (not its pixels); only images of the
        same size are decoded and hashed, once each.
        """
        if self._ids_by_size is None:
            self._ids_by_size = {}
            for image_id, path in self.gallery.items():
                with open_image(path) as img:
                    self._ids_by_size.setdefault(img.size, []).append(image_id)
        digest = pixel_digest(image)
        for image_id in self._ids_by_size.get(image.size, []):
            if image_id not in self._digests:
                self._digests[image_id] = pixel_digest(load_image(self.gallery[image_id]))
            if self._digests[image_id] == digest:
                return image_id
        return None

    def caption_note(self) -> str | None:
        """Says so when the index's gallery captions were written by the oracle captioner from
        the benchmark's ground truth (not by an MLLM): its scores are then optimistic."""
        captions = self.index.meta.get("captions")
        if not self.index.meta.get("captioned") or not captions:
            return None
        try:
            writers = caption_writers(captions)
        except DataError:
            return None  # moved or unreadable: who wrote them is unknown, so nothing is said
        if not any(w.startswith(f"{OracleBackend.name}(") for w in writers):
            return None
        return (
            f"the gallery captions ({Path(captions).name}) were written by the oracle captioner "
            "from the benchmark's ground truth (scenes.json), not by an MLLM: each one states "
            "exactly what its image holds, which an MLLM's captions do not"
        )

    def unknown_note(self, text: str) -> str | None:
        """Says so when most of a text is unknown to the model's tokenizer (read as [UNK])."""
        (share,) = self.model.mostly_unknown([text.strip()])
        return None if share is None else describe_unknown(share)

    def cut_note(self, text: str) -> str | None:
        """Where the model cuts a text longer than it reads (None: it reads all of it)."""
        text = text.strip()
        (kept,) = self.model.truncated([text])
        return None if kept is None else describe_cut(text, kept)

    @torch.inference_mode()
    def search(
        self, reference: Image.Image, text: str, k: int = 10, exclude: str | None = None
    ) -> list[Result]:
        """The top-``k`` gallery images for (reference, text); ``exclude`` drops one id."""
        text = text.strip()
        if not text:
            raise ConfigError("type a modification text: a composed query needs one")
        if not 1 <= k <= MAX_K:
            raise ConfigError(f"k must be within 1..{MAX_K}, got {k}")
        query = self.model.encode_query([text], pixel_values=self.model.preprocess([reference]))
        extra = 1 if exclude in self.index.positions else 0
        hits = self.index.search(query, k + extra)
        ranked = [
            (image_id, float(score))
            for image_id, score in zip(hits.ids[0], hits.scores[0], strict=True)
            if image_id != exclude
        ][:k]
        return [
            Result(rank, image_id, self.gallery[image_id], score)
            for rank, (image_id, score) in enumerate(ranked, start=1)
        ]


def gallery_files(index: GalleryIndex) -> dict[str, Path]:
    """id -> absolute file of every gallery image; an index without its files is an error."""
    files: dict[str, Path] = {}
    missing: list[str] = []
    for image_id, path in zip(index.ids, index.paths, strict=True):
        if path is None or not Path(path).is_file():
            missing.append(f"{image_id} ({path})" if path else image_id)
        else:
            files[image_id] = Path(path).resolve()
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(missing[:5]) + more
        raise DataError(
            f"{len(missing)} of {len(index.ids)} gallery images of the index are not on disk: "
            f"{shown}. The demo shows gallery images, so it needs their files: rebuild the index "
            "with csmcir index build where the images are"
        )
    return files

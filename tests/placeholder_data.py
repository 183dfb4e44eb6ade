"""The real annotation files with placeholder images, for tests on official counts and formats.

Annotation folders are linked (never copied) into a temp root, and every image they name is
written as one of a few tiny solid-colour PNGs, so loaders and the image check run for real.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
COLOURS = (
    (200, 30, 30),
    (30, 160, 60),
    (40, 60, 210),
    (230, 200, 40),
    (120, 40, 160),
    (20, 20, 20),
)


def placeholder_pngs() -> list[bytes]:
    """A few 2x2 PNGs of distinct colours (an encoder tells them apart, unlike one image)."""
    out = []
    for colour in COLOURS:
        buf = io.BytesIO()
        Image.new("RGB", (2, 2), colour).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_images(paths: Iterable[Path], pngs: Sequence[bytes]) -> int:
    """Write the placeholders over ``paths`` (sorted, so the colours are the same every run)."""
    n = 0
    for n, path in enumerate(sorted(set(paths)), start=1):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pngs[(n - 1) % len(pngs)])
    return n


def link(root: Path, source: Path, *names: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).symlink_to(source / name, target_is_directory=True)


def fashioniq_root(
    root: Path,
    shared: Path,
    pngs: Sequence[bytes],
    splits: Sequence[str] = ("val",),
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    ext: str = "png",
) -> Path:
    """FashionIQ with every image of the splits' galleries and caption records."""
    link(root, shared / "fashioniq", "captions", "image_splits")
    names: set[str] = set()
    for cat in categories:
        for split in splits:
            names |= set(json.loads((root / f"image_splits/split.{cat}.{split}.json").read_text()))
            records = json.loads((root / f"captions/cap.{cat}.{split}.json").read_text())
            names |= {r[k] for r in records for k in ("candidate", "target") if k in r}
    write_images((root / "images" / f"{n}.{ext}" for n in names), pngs)
    return root


def cirr_root(
    root: Path, shared: Path, pngs: Sequence[bytes], splits: Sequence[str] = ("val", "test1")
) -> Path:
    """CIRR with every image its image_splits list for ``splits``."""
    link(root, shared / "cirr", "captions", "image_splits")
    for split in splits:
        mapping = json.loads((root / f"image_splits/split.rc2.{split}.json").read_text())
        write_images((root / rel for rel in mapping.values()), pngs)
    return root


def circo_root(root: Path, shared: Path, pngs: Sequence[bytes]) -> Path:
    """CIRCO with a gallery of exactly the referenced images (the COCO unlabeled layout)."""
    link(root, shared / "circo", "annotations")
    ids: set[int] = set()
    for split in ("val", "test"):
        for rec in json.loads((root / f"annotations/{split}.json").read_text()):
            ids |= {rec["reference_img_id"], *rec.get("gt_img_ids", ())}
    coco = root / "COCO2017_unlabeled"
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in sorted(ids)]
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations/image_info_unlabeled2017.json").write_text(json.dumps({"images": images}))
    write_images((coco / "unlabeled2017" / im["file_name"] for im in images), pngs)
    return root

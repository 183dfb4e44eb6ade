"""Opening images, with errors that name the file instead of a PIL traceback."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from csmcir.errors import DataError


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully (so truncation is found now, not mid-batch) and convert it to RGB."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"unreadable image {path}: {e}") from None


def verify_image(path: str | Path) -> str | None:
    """Return None when ``path`` decodes as an image, else the reason it does not."""
    try:
        load_image(path)
    except DataError as e:
        return str(e)
    return None

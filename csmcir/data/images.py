"""Opening images, with errors that name the file instead of a PIL traceback.

Every image the project reads goes through :func:`open_image`, which refuses a picture whose
header claims more than :func:`max_image_pixels` pixels before decoding it: a tiny PNG can
declare 15000 x 15000 pixels and take gigabytes to decode (a "decompression bomb"). The limit
is a setting, ``$CSMCIR_MAX_IMAGE_PIXELS`` (default: Pillow's own, 89,478,485 pixels).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from PIL import Image, UnidentifiedImageError

from csmcir.errors import ConfigError, DataError

MAX_PIXELS_ENV = "CSMCIR_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: 0.25 GiB of 24-bit RGB


def max_image_pixels() -> int:
    """The largest image (width x height) any command decodes: ``$CSMCIR_MAX_IMAGE_PIXELS``."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value.replace("_", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"${MAX_PIXELS_ENV} must be a positive number of pixels, got {value!r}")
    return limit


class ImageTooLargeError(DataError):
    """An image over the pixel limit: refused before it is decoded."""


def _too_large(where: str | Path, size: tuple[int, int] | int, limit: int) -> ImageTooLargeError:
    """The refusal of an image of ``size`` (width, height) or of ``size`` pixels in all."""
    pixels = size if isinstance(size, int) else size[0] * size[1]
    shape = (
        _pixels(pixels) if isinstance(size, int) else f"{size[0]} x {size[1]} = {_pixels(pixels)}"
    )
    enough = -(-pixels // 1_000_000) * 1_000_000  # rounded up to whole megapixels
    return ImageTooLargeError(
        f"image {where} has {shape}, over the limit of {_pixels(limit)} (a guard against "
        f"decompression bombs, set by ${MAX_PIXELS_ENV}); if the image is genuine, raise it, "
        f"e.g. {MAX_PIXELS_ENV}={enough}"
    )


def _pixels(n: int) -> str:
    """A pixel count as people read it: megapixels once it is large."""
    return f"{n / 1e6:,.1f} megapixels" if n >= 1_000_000 else f"{n:,} pixels"


def _bomb_pixels(error: Image.DecompressionBombError, limit: int) -> int:
    """The pixel count Pillow's refusal states ("Image size (N pixels) exceeds ..."); Pillow
    refuses at twice the limit, so that is the least the image has when the text differs."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return int(found.group(1)) if found else 2 * limit + 1


@contextlib.contextmanager
def open_image(source: str | Path | IO[bytes], where: str | Path | None = None) -> Iterator:
    """``PIL.Image.open`` that checks the pixel count first; errors name ``where`` (the file).

    Pillow's own guard (``Image.MAX_IMAGE_PIXELS``) is set to the same limit; it raises at twice
    the limit, this check at the limit itself, before anything is decoded.
    """
    where = where if where is not None else source
    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            # Between the limit and twice it Pillow only warns; the check below refuses.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
    except Image.DecompressionBombError as e:
        raise _too_large(where, _bomb_pixels(e, limit), limit) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"unreadable image {where}: {e}") from None
    with img:
        if img.width * img.height > limit:
            raise _too_large(where, img.size, limit)
        yield img


def load_image(path: str | Path, name: str | None = None) -> Image.Image:
    """Open an image fully (so truncation is found now, not mid-batch) and convert it to RGB.

    Errors name the file as ``name`` (default: its path).
    """
    path = Path(path)
    where = name or path
    if not path.is_file():
        raise DataError(f"image not found: {where}")
    with open_image(path, where) as img:
        try:
            img.load()
            return img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"unreadable image {where}: {e}") from None


def pixel_digest(image: Image.Image) -> str:
    """A SHA-256 of an image's mode, size and pixels: equal for two files of the same picture,
    whatever their format or compression."""
    h = hashlib.sha256(f"{image.mode} {image.width}x{image.height}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def verify_image(path: str | Path) -> str | None:
    """Return None when ``path`` decodes as an image, else the reason it does not."""
    try:
        load_image(path)
    except DataError as e:
        return str(e)
    return None

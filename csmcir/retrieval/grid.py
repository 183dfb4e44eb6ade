"""A PNG of one query and its results: reference, text, ranked hits with scores, target outlined."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from csmcir.data.images import load_image
from csmcir.errors import ConfigError
from csmcir.io import atomic_write
from csmcir.outputs import RECORD_KEY, SEARCH_GRID, record

TILE = 160
PAD = 8
LABEL = 40
COLUMNS = 5
ECHOED = 200  # characters of a query text repeated back in a status line or printout
TARGET_COLOUR = (0, 170, 60)
REFERENCE_COLOUR = (60, 90, 200)


@dataclass(frozen=True)
class GridItem:
    """One ranked result: the image id, its file (None when unknown) and its score."""

    image_id: str
    path: str | Path | None
    score: float


def check_grid_path(path: Path, flag: str = "grid") -> None:
    """A grid is a PNG, since its provenance record lives in a PNG text chunk: a name ending in
    another suffix (``x.jpg``) would hold bytes of another format than it says, so it is refused."""
    if path.suffix.lower() != ".png":
        named = f"ends in {path.suffix!r}" if path.suffix else "has no suffix"
        raise ConfigError(
            f"{flag} {path} {named}: a retrieval grid is written as PNG (with the search it "
            "shows inside, so a later search knows it may replace it); end the name in .png"
        )


def save_grid(
    path: str | Path,
    reference: Image.Image,
    text: str,
    results: Sequence[GridItem],
    target: str | None = None,
    columns: int = COLUMNS,
    identity: dict | None = None,
) -> Path:
    """Draw the query row (reference + text) above the results, ``columns`` per row.

    The true target, when given and retrieved, gets a thick green frame and a "target" label.
    The PNG carries its provenance record (``identity``: the query and index it shows), so a
    later search may replace it and nothing else (csmcir.outputs).
    """
    path = Path(path)
    check_grid_path(path)
    font = ImageFont.load_default(size=13)
    big = ImageFont.load_default(size=16)
    rows = max(1, -(-len(results) // columns))
    width = PAD + columns * (TILE + PAD)
    height = PAD + (TILE + LABEL + PAD) * (rows + 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    _paste(canvas, reference, PAD, PAD, REFERENCE_COLOUR)
    draw.text((PAD, PAD + TILE + 4), "reference", fill=REFERENCE_COLOUR, font=font)
    chars = max(20, (width - TILE - 3 * PAD) // 9)
    wrapped = "\n".join(textwrap.wrap(f'"{text}"', chars)[:6])
    draw.multiline_text((2 * PAD + TILE, PAD + 4), wrapped, fill="black", font=big, spacing=6)
    if target is not None and all(r.image_id != target for r in results):
        note = f"target {target} is not in the top {len(results)}"
        draw.text((2 * PAD + TILE, PAD + TILE - 16), note, fill=(200, 0, 0), font=font)

    for rank, item in enumerate(results, start=1):
        row, col = divmod(rank - 1, columns)
        x, y = PAD + col * (TILE + PAD), PAD + (row + 1) * (TILE + LABEL + PAD)
        is_target = item.image_id == target
        image = _open(item.path)
        _paste(canvas, image, x, y, TARGET_COLOUR if is_target else None)
        label = f"#{rank}  {item.score:.3f}" + ("  target" if is_target else "")
        draw.text((x, y + TILE + 3), label, fill=TARGET_COLOUR if is_target else "black", font=font)
        draw.text((x, y + TILE + 19), shorten(item.image_id, 22), fill=(90, 90, 90), font=font)

    info = PngInfo()
    info.add_text(RECORD_KEY, json.dumps(record(SEARCH_GRID, "csmcir search", identity or {})))
    return atomic_write(path, lambda f: canvas.save(f, format="PNG", pnginfo=info))


def _open(path: str | Path | None) -> Image.Image | None:
    if path is None or not Path(path).is_file():
        return None
    return load_image(path)


def _paste(
    canvas: Image.Image, image: Image.Image | None, x: int, y: int, frame: tuple | None
) -> None:
    draw = ImageDraw.Draw(canvas)
    if image is None:
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=(230, 230, 230))
        draw.text((x + 8, y + TILE // 2 - 8), "image not found", fill=(120, 120, 120))
    else:
        thumb = ImageOps.contain(image, (TILE, TILE))  # small images are scaled up too
        canvas.paste(thumb, (x + (TILE - thumb.width) // 2, y + (TILE - thumb.height) // 2))
    if frame is not None:
        draw.rectangle([x - 3, y - 3, x + TILE + 2, y + TILE + 2], outline=frame, width=5)


def shorten(text: str, n: int) -> str:
    """``text`` when it has at most ``n`` characters, else its first ``n - 1`` and "…"."""
    return text if len(text) <= n else text[: n - 1] + "…"

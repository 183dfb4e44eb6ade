"""Drawing synthetic scenes with PIL: a pure function from scene to PNG bytes.

Images are rendered at 64 px, the tiny model's input size, so the model sees exactly the pixels
written (no resampling in preprocessing) and the whole benchmark stays small and quick to write.
Shapes are drawn at 4x and box-filtered down, which anti-aliases their edges: at 64 px a small
object is about 10 px wide, and aliased triangles and crosses would be hard to tell apart.
Objects sit at fixed cell centres without jitter, so identical scenes give identical pixels and
an unchanged object looks the same in a reference, its targets and their near-duplicates.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from csmcir.data.synth_scenes import Obj, Scene

SUPERSAMPLE = 4
BACKGROUND = (64, 64, 64)
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (50, 90, 235),
    "purple": (150, 60, 210),
    "white": (245, 245, 245),
}
# Half the extent of an object as a fraction of the cell side.
HALF_EXTENT = {"small": 0.22, "large": 0.42}


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, cell: float) -> None:
    cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
    h = HALF_EXTENT[obj.size] * cell
    fill = RGB[obj.color]
    if obj.shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "square":
        s = 0.85 * h  # a square of the circle's extent looks larger than the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + 0.8 * h), (cx - h, cy + 0.8 * h)], fill=fill)
    elif obj.shape == "cross":
        w = 0.35 * h
        draw.rectangle((cx - h, cy - w, cx + h, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - h, cx + w, cy + h), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, grid: int, size: int) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        _draw_object(draw, obj, big / grid)
    return image.reduce(SUPERSAMPLE)


def png_bytes(image: Image.Image) -> bytes:
    """PNG without metadata chunks, so one scene always encodes to the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()

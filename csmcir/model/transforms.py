"""Image preprocessing: PIL images -> the normalised float tensor the ViT reads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from csmcir.model.config import ImageConfig


def target_pad(image: Image.Image, ratio: float) -> Image.Image:
    """Pad an elongated image with black towards aspect ``ratio`` (CLIP4Cir's "target pad").

    Centre-cropping a long garment photo would cut off the part the text talks about; padding
    until the long side is ``ratio`` times the short one keeps it while wasting few pixels.
    Images already within ``ratio`` are returned unchanged.
    """
    w, h = image.size
    if max(w, h) / min(w, h) < ratio:
        return image
    side = max(w, h) / ratio
    pad_w = max(int((side - w) / 2), 0)
    pad_h = max(int((side - h) / 2), 0)
    padded = Image.new(image.mode, (w + 2 * pad_w, h + 2 * pad_h))
    padded.paste(image, (pad_w, pad_h))
    return padded


def resize_short_side_and_crop(
    image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Resize so the short side is ``size``, then take the centre ``size`` square."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageTransform:
    """Callable turning a list of PIL images into a ``[B, 3, size, size]`` float tensor."""

    def __init__(self, config: ImageConfig) -> None:
        self.config = config
        self._resample = Image.Resampling[config.resample.upper()]
        # On the CPU whatever the default device: preprocessing runs where images are decoded.
        self._mean = torch.tensor(config.mean, device="cpu").view(3, 1, 1)
        self._std = torch.tensor(config.std, device="cpu").view(3, 1, 1)

    def one(self, image: Image.Image) -> torch.Tensor:
        cfg = self.config
        image = image.convert("RGB")
        if cfg.mode == "target_pad":
            padded = target_pad(image, cfg.pad_ratio)
            image = resize_short_side_and_crop(padded, cfg.size, self._resample)
        elif image.size != (cfg.size, cfg.size):
            image = image.resize((cfg.size, cfg.size), self._resample)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self._mean) / self._std

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("preprocess: no images given")
        return torch.stack([self.one(img) for img in images])

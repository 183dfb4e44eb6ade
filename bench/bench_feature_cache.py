"""Training-step time of the real-size BLIP-2 architecture with and without the ViT feature cache.

Builds the ``blip2-vitg`` architecture with random weights (EVA ViT-g: 39 layers, hidden 1408;
Q-Former: 12 layers, hidden 768, 32 queries; nothing is downloaded), extracts the features of a
few images into a real on-disk cache, then times one training step both ways:

- images: preprocessed pixels -> frozen ViT (no grad) -> fused pass -> InfoNCE -> backward;
- cache:  FeatureCache.get (fp16 memmap) -> fused pass -> InfoNCE -> backward.

Both arms run the same Q-Former forward+backward; the ratio is what skipping the ViT saves.
Run by hand (a few minutes on 2 CPU cores):

    python -m bench.bench_feature_cache [--batch-size 2] [--steps 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.report import update_section
from csmcir.model import CSMCIR, build_wordpiece_tokenizer, load_preset
from csmcir.model.features import FeatureCache, extract_features
from csmcir.train.loss import info_nce

TEXTS = [
    "is shorter and has no sleeves",
    "make the dress red with a floral pattern",
    "the same shirt but in dark blue",
    "has long sleeves and a collar",
]


def seconds(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    b = args.batch_size

    start = time.perf_counter()
    config = load_preset("blip2-vitg").config
    model = CSMCIR(config, build_wordpiece_tokenizer(TEXTS)).train()
    build_s = time.perf_counter() - start
    vit_params = sum(p.numel() for p in model.vision_model.parameters())
    tower_params = sum(p.numel() for p in model.tower.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(
        f"built in {build_s:.0f}s: ViT {vit_params / 1e6:.0f}M, Q-Former {tower_params / 1e6:.0f}M"
    )

    rng = np.random.default_rng(0)
    texts = [TEXTS[i % len(TEXTS)] for i in range(b)]
    captions = [TEXTS[(i + 1) % len(TEXTS)] for i in range(b)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i in range(2 * b):  # b references + b targets
            pixels = rng.integers(0, 256, (300, 240, 3), dtype=np.uint8)
            paths[f"img{i}"] = Path(tmp) / f"img{i}.png"
            Image.fromarray(pixels).save(paths[f"img{i}"])
        start = time.perf_counter()
        extract_features(model, paths, Path(tmp) / "cache", batch_size=b)
        extract_s = (time.perf_counter() - start) / len(paths)
        model.train()
        cache = FeatureCache.open(Path(tmp) / "cache", model)
        refs, tgts = list(paths)[:b], list(paths)[b:]
        images = {k: Image.open(p).convert("RGB") for k, p in paths.items()}
        ref_pixels = model.preprocess([images[k] for k in refs])
        tgt_pixels = model.preprocess([images[k] for k in tgts])

        def loss_backward(q: torch.Tensor, t: torch.Tensor) -> None:
            info_nce(model.similarity(q, t), 0.07).backward()
            for p in trainable:
                p.grad = None

        def step_images() -> None:
            loss_backward(
                model.encode_query(texts, ref_pixels), model.encode_target(captions, tgt_pixels)
            )

        def step_cache() -> None:
            loss_backward(
                model.encode_query(texts, vision_features=cache.get(refs)),
                model.encode_target(captions, vision_features=cache.get(tgts)),
            )

        # Warm-up steps of the cache arm also warm the Q-Former for the image arm, and the
        # extraction has run the ViT at this batch size. Then the arms alternate, so the load
        # other processes put on the machine falls on both alike.
        for _ in range(args.warmup):
            step_cache()
        with_cache, with_images = [], []
        for _ in range(args.steps):
            with_cache.append(seconds(step_cache))
            with_images.append(seconds(step_images))
        feature_kb = cache.get(refs[:1], torch.float16).numel() * 2 / 1024

    img_s, cache_s = statistics.median(with_images), statistics.median(with_cache)
    print(f"step with images {img_s:.2f}s, with cache {cache_s:.2f}s: {img_s / cache_s:.1f}x")
    body = "\n".join(
        [
            "## Frozen-ViT feature cache (real-size BLIP-2 architecture, random weights)",
            "",
            f"`blip2-vitg` architecture built from its preset: ViT-g {vit_params / 1e6:.0f}M "
            f"parameters (39 layers, hidden 1408, 224 px, 257 tokens), Q-Former side "
            f"{tower_params / 1e6:.0f}M (12 layers, hidden 768, 32 queries). One training step "
            f"= fused pass of {b} queries and {b} targets, InfoNCE, backward through the "
            f"Q-Former (ViT frozen); median of {args.steps} steps per arm, the arms "
            f"alternating, after {args.warmup} warm-up step(s).",
            "",
            f"| step (batch {b}) | seconds |",
            "| --- | ---: |",
            f"| images: frozen ViT run every step | {img_s:.2f} |",
            f"| feature cache: fp16 features read from disk | {cache_s:.2f} |",
            f"| **speed-up from the cache** | **{img_s / cache_s:.1f}x** |",
            "",
            f"Extraction (the ViT once per image, `extract_features`): {extract_s:.2f} s/image; "
            f"{feature_kb:.0f} KB of fp16 features per image on disk.",
        ]
    )
    print(body)
    if not args.no_report:
        update_section("feature_cache", body)


if __name__ == "__main__":
    main()

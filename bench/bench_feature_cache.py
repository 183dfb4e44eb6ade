"""Training-step time of the real-size BLIP-2 architecture with and without the ViT feature cache.

Builds the ``blip2-vitg`` architecture with random weights (EVA ViT-g: 39 layers, hidden 1408;
Q-Former: 12 layers, hidden 768, 32 queries; nothing is downloaded), extracts the features of a
few images into a real on-disk cache, then times one training step both ways:

- images: preprocessed pixels -> frozen ViT (no grad) -> fused pass -> InfoNCE -> backward;
- cache:  FeatureCache.get (fp16 memmap) -> fused pass -> InfoNCE -> backward.

Both arms run the same Q-Former forward+backward; the ratio is what skipping the ViT saves.
Run by hand (a few minutes on 2 CPU cores):

    python -m bench.bench_feature_cache [--batch-size 2] [--steps 2]
    python -m bench.bench_feature_cache --device cuda --batch-size 32 --steps 10 \
        --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from bench.report import device_label, section_name, update_section
from csmcir.model import CSMCIR, build_wordpiece_tokenizer, load_preset
from csmcir.model.config import PRECISIONS
from csmcir.model.features import FeatureCache, extract_features
from csmcir.train.loss import info_nce

TEXTS = [
    "is shorter and has no sleeves",
    "make the dress red with a floral pattern",
    "the same shirt but in dark blue",
    "has long sleeves and a collar",
]


def seconds(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    precision: str
    images_s: float
    cache_s: float
    extract_s: float
    feature_kb: float


def build(precision: str, device: torch.device) -> CSMCIR:
    """The real-size architecture with random weights, initialised on ``device`` (a CPU builds
    the 1.2B parameters in about a minute; a GPU in seconds)."""
    torch.manual_seed(0)
    config = load_preset("blip2-vitg").config.replace(precision=precision)
    with device:
        return CSMCIR(config, build_wordpiece_tokenizer(TEXTS)).train()


def measure(model: CSMCIR, args: argparse.Namespace, device: torch.device, tmp: Path) -> Timing:
    """Extract a real on-disk cache for 2B images, then time the two arms alternately."""
    b = args.batch_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    rng = np.random.default_rng(0)
    texts = [TEXTS[i % len(TEXTS)] for i in range(b)]
    captions = [TEXTS[(i + 1) % len(TEXTS)] for i in range(b)]
    paths = {}
    for i in range(2 * b):  # b references + b targets
        pixels = rng.integers(0, 256, (300, 240, 3), dtype=np.uint8)
        paths[f"img{i}"] = tmp / f"img{i}.png"
        Image.fromarray(pixels).save(paths[f"img{i}"])
    cache_dir = tmp / f"cache-{model.config.precision}"
    extract_s = seconds(
        lambda: extract_features(model, paths, cache_dir, batch_size=b, progress=False), device
    ) / len(paths)
    model.train()
    cache = FeatureCache.open(cache_dir, model)
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
        step_images()
    with_cache, with_images = [], []
    for _ in tqdm(range(args.steps), desc=f"{model.config.precision} steps", unit="pair"):
        with_cache.append(seconds(step_cache, device))
        with_images.append(seconds(step_images, device))
    return Timing(
        model.config.precision,
        statistics.median(with_images),
        statistics.median(with_cache),
        extract_s,
        cache.get(refs[:1]).numel() * 2 / 1024,  # float16
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32"], choices=PRECISIONS, help="one row each"
    )
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    b = args.batch_size

    rows = []
    for precision in args.precisions:
        start = time.perf_counter()
        model = build(precision, device)
        vit_params = sum(p.numel() for p in model.vision_model.parameters())
        tower_params = sum(p.numel() for p in model.tower.parameters())
        print(
            f"built in {time.perf_counter() - start:.0f}s: ViT {vit_params / 1e6:.0f}M, "
            f"Q-Former {tower_params / 1e6:.0f}M"
        )
        with tempfile.TemporaryDirectory() as tmp:
            timing = measure(model, args, device, Path(tmp))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(timing)
        print(
            f"{precision}: step with images {timing.images_s:.3f}s, with cache "
            f"{timing.cache_s:.3f}s: {timing.images_s / timing.cache_s:.1f}x"
        )
    body = "\n".join(
        [
            "## Frozen-ViT feature cache (real-size BLIP-2 architecture, random weights)",
            "",
            f"`blip2-vitg` architecture built from its preset: ViT-g {vit_params / 1e6:.0f}M "
            f"parameters (39 layers, hidden 1408, 224 px, 257 tokens), Q-Former side "
            f"{tower_params / 1e6:.0f}M (12 layers, hidden 768, 32 queries), on "
            f"{device_label(device)}. One training step = fused pass of {b} queries and {b} "
            "targets, InfoNCE, backward through the Q-Former (ViT frozen); median of "
            f"{args.steps} steps per arm, the arms alternating, after {args.warmup} warm-up "
            "step(s). `precision` is the model's autocast (`fp32`: none). Extraction runs the "
            f"ViT once per image (`extract_features`, batch {b}); the cache holds fp16 features.",
            "",
            f"| precision | step with images (s, batch {b}) | step with feature cache (s) | "
            "speed-up from the cache | extraction (s/image) | cache per image (KB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *(
                f"| {t.precision} | {t.images_s:.3f} | {t.cache_s:.3f} | "
                f"**{t.images_s / t.cache_s:.1f}x** | {t.extract_s:.4f} | {t.feature_kb:.0f} |"
                for t in rows
            ),
        ]
    )
    print(body)
    if not args.no_report:
        update_section(section_name("feature_cache", device), body)


if __name__ == "__main__":
    main()

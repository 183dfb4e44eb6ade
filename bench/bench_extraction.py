"""Frozen-ViT feature extraction at GPU pace: images/s and model-FLOPs utilisation.

The real EVA ViT-g of the ``blip2-vitg`` preset (39 layers, hidden 1408, 224 px, 257 tokens)
with random weights, nothing downloaded. Three measurements:

- ``vit``: the ViT alone (``CSMCIR.vision_features`` under the precision's autocast, no
  gradients) on pixels already on the device, per batch size, with torch's fused attention
  (``sdpa``, the default) or the eager matmul-softmax-matmul, and with ``torch.compile``;
- ``decode``: the images alone, decoded and preprocessed by ``--workers`` DataLoader processes
  (what feeds the ViT in ``csmcir features extract``);
- ``extract``: ``extract_features`` end to end over JPEG files on disk (decoding, the ViT, the
  copy to the host and the shard writes), with ``csmcir features extract``'s GPU defaults.

The ViT's FLOPs are counted from the architecture (:func:`vit_flops`, equal to torch's count,
tested); MFU is against the card's dense peak (``bench/report.py``).

    python -m bench.bench_extraction --device cuda
    python -m bench.bench_extraction --size tiny --no-report     # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bench.bench_feature_cache import TEXTS
from bench.report import PEAK_SOURCE, device_label, mfu, section_name, update_section
from csmcir.data.batches import ImageSource
from csmcir.model import CSMCIR, build_wordpiece_tokenizer, load_preset
from csmcir.model.features import extract_features
from csmcir.model.features_cli import GPU_BATCH

PRESETS = {"real": "blip2-vitg", "tiny": "tiny"}


def vit_flops(vision: dict[str, Any]) -> float:
    """FLOPs of the ViT's forward pass over one image, 2 a multiply-add of every matmul and of
    the patch embedding's convolution; layer norms, softmax and GELU left out (under 1%)."""
    h, ffn, layers = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    patch = vision["patch_size"]
    grid = vision["image_size"] // patch
    n = grid * grid + 1  # + [CLS]
    embedding = 2 * grid * grid * 3 * patch * patch * h
    attention = 2 * n * h * 3 * h + 2 * 2 * n * n * h + 2 * n * h * h
    return embedding + layers * (attention + 2 * 2 * n * h * ffn)


def build(size: str, precision: str, device: torch.device) -> CSMCIR:
    """The preset's architecture with random weights, made on ``device`` (seconds on a GPU)."""
    torch.manual_seed(0)
    config = load_preset(PRESETS[size]).config.replace(precision=precision)
    with device:
        return CSMCIR(config, build_wordpiece_tokenizer(TEXTS)).eval()


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call over ``repeats`` calls, synchronised at both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def vit_rows(
    model: CSMCIR,
    args: argparse.Namespace,
    device: torch.device,
    arms: list[tuple[str, bool, int]],
) -> list[str]:
    """One row per arm (attention, compiled, batch size): images/s, TFLOP/s, MFU."""
    size = model.config.image.size
    flops = vit_flops(model.config.vision)
    precision = model.config.precision
    rows = []
    for attention, compiled, batch in arms:
        model.vision_model.config._attn_implementation = attention
        forward = model.vision_features
        start = time.perf_counter()
        if compiled:
            forward = torch.compile(model.vision_features, backend=args.compile_backend)
        pixels = torch.randn(batch, 3, size, size, device=device)
        with torch.no_grad():
            for _ in range(args.warmup):
                forward(pixels)
            first = time.perf_counter() - start  # includes compiling
            seconds = timed(lambda f=forward, p=pixels: f(p), device, args.repeats)
        rate = batch / seconds
        note = f"compiled ({args.compile_backend}) in {first:.0f} s" if compiled else ""
        rows.append(
            f"| vit | {precision} | {attention} | {'yes' if compiled else 'no'} | {batch} | "
            f"{rate:,.0f} | {seconds / batch * 1e3:.2f} | {rate * flops / 1e12:.1f} | "
            f"{mfu(rate * flops, device, precision)} | {note} |"
        )
        print(rows[-1], flush=True)
        del pixels
    model.vision_model.config._attn_implementation = "sdpa"
    return rows


def write_jpegs(folder: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """``n`` JPEGs of a product photo's size (480 x 640) with smooth random content, so decoding
    costs what a real photo's does (noise would compress badly, flat colour too well)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in range(n):
        low = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((480, 640), Image.Resampling.BICUBIC)
        paths[f"img{i}"] = folder / f"img{i}.jpg"
        image.save(paths[f"img{i}"], quality=90)
    return paths


def pipeline_rows(
    model: CSMCIR, args: argparse.Namespace, device: torch.device, tmp: Path
) -> list[str]:
    """Decoding alone through the workers, then ``extract_features`` end to end."""
    paths = write_jpegs(tmp / "images", args.images)
    batch, workers = args.batch_sizes[-1], args.workers
    source = ImageSource(dict(paths), model.transform.one)
    loader = DataLoader(list(paths), batch_size=batch, collate_fn=source.batch, num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    decode = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    extract_features(model, paths, tmp / "cache", batch_size=batch, workers=workers, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end_to_end = len(paths) / (time.perf_counter() - start)
    flops = vit_flops(model.config.vision)
    precision = model.config.precision
    common = f"{precision} | sdpa | no | {batch} |"
    return [
        f"| decode ({workers} workers, {len(paths)} JPEGs 480x640) | - | - | - | {batch} | "
        f"{decode:,.0f} | {1e3 / decode:.2f} | - | - | images decoded and preprocessed |",
        f"| extract (end to end, {workers} workers) | {common} {end_to_end:,.0f} | "
        f"{1e3 / end_to_end:.2f} | {end_to_end * flops / 1e12:.1f} | "
        f"{mfu(end_to_end * flops, device, precision)} | decode, ViT, copy, shard writes |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--size", choices=PRESETS, default="real", help="tiny: a dry run")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, GPU_BATCH])
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per arm")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=1024, help="JPEGs of the pipeline arms")
    parser.add_argument("--workers", type=int, default=8, help="decoding processes")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile's (eager: a dry run's)"
    )
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build(args.size, args.precision, device)
    largest = args.batch_sizes[-1]
    plain = [("sdpa", False, b) for b in args.batch_sizes] + [("eager", False, largest)]
    rows = vit_rows(model, args, device, plain)
    with tempfile.TemporaryDirectory() as tmp:
        rows += pipeline_rows(model, args, device, Path(tmp))
    write_section(rows, model, args, device)
    # compiling ViT-g takes the longest: its row comes last, once the others are written
    rows += vit_rows(model, args, device, [("sdpa", True, largest)])
    write_section(rows, model, args, device)


def write_section(
    rows: list[str], model: CSMCIR, args: argparse.Namespace, device: torch.device
) -> None:
    vision = model.config.vision
    body = "\n".join(
        [
            "## Frozen-ViT feature extraction (ViT-g architecture, random weights)",
            "",
            f"On {device_label(device)}. The `{PRESETS[args.size]}` preset's ViT "
            f"({vision['num_hidden_layers']} layers, hidden {vision['hidden_size']}, "
            f"{vision['image_size']} px), {vit_flops(vision) / 1e9:.0f} GFLOP an image "
            "(`vit_flops`: 2 per multiply-add of every matmul and the patch embedding). `vit`: "
            "the ViT alone on pixels on the device, no gradients, the mean over "
            f"{args.repeats} batches after {args.warmup} warm-up batches (the compiled arm's "
            "warm-up includes its compilation); attention `sdpa` (torch's fused kernel, the "
            "default) or `eager`. `decode`: the JPEGs decoded and preprocessed by the "
            "DataLoader workers alone. `extract`: `extract_features` end to end with those "
            "workers, bf16, the non-blocking copy to pinned memory and the shard-writer thread "
            f"(`csmcir features extract`'s GPU defaults). MFU against the card's dense peak "
            f"({PEAK_SOURCE}, `bench/report.py`).",
            "",
            "| arm | precision | attention | compiled | batch | images/s | ms/image | TFLOP/s "
            "| MFU | note |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
            *rows,
        ]
    )
    print(body)
    if not args.no_report:
        update_section(section_name("extraction", device), body)


if __name__ == "__main__":
    main()

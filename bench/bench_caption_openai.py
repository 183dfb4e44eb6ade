"""Throughput of the ``openai`` captioning backend at concurrency 1 and 16.

A local OpenAI-compatible server (``captioning.fake_server``) answers every request after a fixed
latency, standing in for a served MLLM whose batch is never full. With latency L, the ideal rate
at concurrency C is C / L images per second; the gap to it is the client's own overhead (image
encoding, JSON, parsing, one flushed store write per image). Run from the repository root:
``python -m bench.bench_caption_openai``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

from bench.report import update_section
from captioning.backends.openai import OpenAIBackend
from captioning.fake_server import FakeChatServer
from captioning.prompts import PromptSpec
from captioning.runner import RunSummary, run_captioning
from captioning.store import CaptionStore


def make_images(folder: Path, n: int, side: int) -> dict[str, Path]:
    folder.mkdir(parents=True)
    paths = {}
    for i in range(n):
        path = folder / f"img{i:05d}.png"
        Image.new("RGB", (side, side), (i % 256, i // 256 % 256, 128)).save(path)
        paths[path.stem] = path
    return paths


def measure(server: FakeChatServer, images: dict[str, Path], concurrency: int, out: Path):
    backend = OpenAIBackend(
        server.base_url, server.model, api_key_env=None, concurrency=concurrency, timeout=30
    )
    with CaptionStore(out) as store:
        summary: RunSummary = run_captioning(
            backend, images, PromptSpec("scene"), store, progress=False
        )
    if summary.captioned != len(images):
        raise RuntimeError(f"only {summary.captioned} of {len(images)} images were captioned")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160, help="images per measurement")
    parser.add_argument("--latency", type=float, default=0.05, help="server latency, seconds")
    parser.add_argument("--image-side", type=int, default=224, help="test image side in px")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, FakeChatServer(latency=args.latency) as server:
        images = make_images(Path(tmp) / "images", args.images, args.image_side)
        for c in args.concurrency:
            summary = measure(server, images, c, Path(tmp) / f"out-c{c}")
            rows.append((c, summary))
    base = rows[0][1].rate
    lines = [
        f"`openai` captioning backend against a local chat-completions server answering after a "
        f"fixed {args.latency * 1000:.0f} ms, {args.images} PNG images of "
        f"{args.image_side}x{args.image_side} px per run (parse, check and store included).",
        "",
        "| concurrency | seconds | images/s | vs concurrency 1 | ideal images/s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for c, s in rows:
        lines.append(
            f"| {c} | {s.seconds:.2f} | {s.rate:.1f} | {s.rate / base:.1f}x | "
            f"{c / args.latency:.0f} |"
        )
    body = "\n".join(lines)
    print(body)
    update_section("caption_openai", "## Captioning: openai backend throughput\n\n" + body)
    top = rows[-1][1].rate / base
    if len(rows) > 1 and rows[-1][0] >= 16 and top < 10:
        print(f"FAIL: concurrency {rows[-1][0]} gave only {top:.1f}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

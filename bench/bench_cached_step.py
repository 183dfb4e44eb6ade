"""Profile of the real-size training step from the frozen-ViT feature cache: where the time goes.

The step is the real-size BLIP-2 Q-Former (12 layers, hidden 768, 32 queries, cross-attention to
``[257, 1408]`` ViT-g features; the ViT itself reduced to one layer, as its features come from
the cache) on a real on-disk feature cache of random float16 rows. Two data paths, alternating
step by step so the load of the shared machine falls on both alike:

- ``old``: the path before issue 17: each sample reads its rows alone and widens them to float32
  on the host, torch stacks them into a batch, the copy to the device is from pageable memory,
  and AdamW runs its per-tensor loop (torch's default on a CPU);
- ``new``: the batch's rows are copied from the shards into one float16 tensor (by the prefetch
  thread that ``fit`` reads a feature cache with, off the step), pinned on a GPU, copied
  without blocking and widened on the device; AdamW fused (``csmcir.train.module.adamw``).

Phases are timed with synchronised timers (a GPU is synchronised between phases, which
serialises what training overlaps): read, convert, collate, pin, copy to the device, forward
(both encoder passes and InfoNCE), backward, optimizer step. ``critical`` is what a training
step waits for: every phase of the old path (its worker hides the read only when there is one),
and for the new path everything but the read and pin that its prefetch thread does. ``loop``
times whole steps through the real DataLoaders (the old path's ``--workers`` processes, the new
path's prefetch thread), synchronising once per ``--steps``.

The model FLOPs of a step are counted from the architecture (:func:`step_flops`), and give the
achieved TFLOP/s and, on a GPU with a known peak, the model-FLOPs utilisation.

    python -m bench.bench_cached_step --threads 1                     # this CPU, batch 2
    python -m bench.bench_cached_step --device cuda --batch-sizes 32 128 --steps 20 --workers 4
    python -m bench.bench_cached_step --size tiny --steps 1 --no-report    # a dry run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from tqdm import tqdm

from bench.bench_memory_bank import build_model, corpus
from bench.feature_data import PATHS, endless, loader, synthetic_cache, triplets
from bench.report import PEAK_SOURCE, device_label, mfu, section_name, update_section
from csmcir.data.batches import collate
from csmcir.io import atomic_write_json
from csmcir.model import CSMCIR
from csmcir.model.config import CSMCIRConfig
from csmcir.model.registry import load_preset
from csmcir.train.datasets import TrainTriplets
from csmcir.train.loss import info_nce
from csmcir.train.module import adamw

PHASES = ("read", "convert", "collate", "pin", "copy", "forward", "backward", "optimizer")
WORKER_PHASES = {"new": ("read", "pin")}  # done ahead of the step, by the prefetch thread
MODELS = {"real": "qformer", "tiny": "tiny"}  # --size: bench_memory_bank's build_model names


def step_flops(config: CSMCIRConfig, text_tokens: int, caption_tokens: int) -> float:
    """Model FLOPs of one training sample: the query pass and the target pass, forward and
    backward, counting 2 FLOPs a multiply-add of every matmul.

    A fused pass runs ``n_queries + text`` tokens through each layer's self-attention and
    feed-forward; the layers with cross-attention (every ``cross_attention_frequency``-th, from
    the first) run the query tokens against the ``patches`` ViT tokens, whose key and value
    projections map ``vision hidden -> hidden``; ``text_projection`` reads one token. Backward
    costs twice the forward (gradients of inputs and weights), except the key/value projections
    of the ViT features, which need no input gradient: once. Norms, softmax, GELU and the loss
    are left out (under 1%).
    """
    q = config.qformer
    h, ffn, layers = q["hidden_size"], q["intermediate_size"], q["num_hidden_layers"]
    cross_layers = len(range(0, layers, q.get("cross_attention_frequency", 2)))
    nq = config.num_query_tokens
    patches = (config.vision["image_size"] // config.vision["patch_size"]) ** 2 + 1
    vision_hidden = config.vision["hidden_size"]

    def one_pass(text: int) -> tuple[float, float]:
        n = nq + text
        self_attention = 2 * n * h * 3 * h + 2 * 2 * n * n * h + 2 * n * h * h
        feed_forward = 2 * 2 * n * h * ffn
        cross = 2 * 2 * nq * h * h + 2 * 2 * nq * patches * h
        kv = 2 * 2 * patches * vision_hidden * h
        forward = layers * (self_attention + feed_forward) + cross_layers * (cross + kv)
        forward += 2 * h * config.embed_dim
        return forward, cross_layers * kv

    total = 0.0
    for text in (text_tokens, caption_tokens):
        forward, kv = one_pass(text)
        total += 3 * forward - kv
    return total


@dataclass
class Timings:
    phases: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    loop: list[float] = field(default_factory=list)

    def median(self, phase: str) -> float:
        return statistics.median(self.phases[phase]) if self.phases[phase] else 0.0

    def critical(self, path: str) -> float:
        hidden = WORKER_PHASES.get(path, ())
        return sum(self.median(p) for p in PHASES if p not in hidden)

    def data(self, path: str) -> float:
        hidden = WORKER_PHASES.get(path, ())
        return sum(self.median(p) for p in PHASES[:5] if p not in hidden)


class Profiler:
    """One model, one batch of sample keys, and a timed step for each path."""

    def __init__(self, model: CSMCIR, data: TrainTriplets, device: torch.device):
        self.model, self.data, self.device = model, data, device
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizers = {
            "old": torch.optim.AdamW(trainable, lr=1e-6),  # torch's default implementation
            "new": adamw([{"params": trainable}], lr=1e-6),
        }

    def timed(self, timings: Timings, phase: str, fn: Callable[[], Any]) -> Any:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings.phases[phase].append(time.perf_counter() - start)
        return out

    def batch(self, path: str, t: Timings, keys: list[int]) -> dict[str, Any]:
        """The batch on the device with float32 features, phase by phase."""
        samples = [self.data[k] for k in keys]
        fields = self.data.image_fields
        if path == "old":
            cache = self.data.images.cache
            rows = self.timed(
                t, "read", lambda: [{f: cache.get([s[f]])[0] for f in fields} for s in samples]
            )
            wide = self.timed(
                t, "convert", lambda: [{f: r[f].float() for f in fields} for r in rows]
            )
            batch = self.timed(
                t,
                "collate",
                lambda: collate([{**s, **w} for s, w in zip(samples, wide, strict=True)]),
            )
            t.phases["pin"].append(0.0)
            return self.timed(t, "copy", lambda: move_data_to_device(batch, self.device))
        batch = self.timed(t, "read", lambda: self.data.collate(samples))
        if self.device.type == "cuda":
            pinned = self.timed(t, "pin", lambda: {f: batch[f].pin_memory() for f in fields})
            batch = {**batch, **pinned}
        else:
            t.phases["pin"].append(0.0)
        batch = self.timed(t, "copy", lambda: move_data_to_device(batch, self.device))
        t.phases["collate"].append(0.0)
        widen = self.model.check_vision_features
        return {**batch, **self.timed(t, "convert", lambda: {f: widen(batch[f]) for f in fields})}

    def step(self, path: str, t: Timings, keys: list[int]) -> None:
        batch = self.batch(path, t, keys)
        loss = self.timed(t, "forward", lambda: self.loss(batch))
        self.timed(t, "backward", loss.backward)
        optimizer = self.optimizers[path]
        self.timed(t, "optimizer", lambda: (optimizer.step(), optimizer.zero_grad()))

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        model = self.model
        q = model.encode_query(batch["text"], vision_features=batch["reference_image"])
        t = model.encode_target(batch["target_caption"], vision_features=batch["target_image"])
        return info_nce(model.similarity(q, t), 0.07)

    def loop(self, path: str, batches: Iterator[dict[str, Any]], steps: int) -> float:
        """Seconds a step through the DataLoader, over ``steps`` steps synchronised once."""
        optimizer = self.optimizers[path]
        start = time.perf_counter()
        for _ in range(steps):
            batch = move_data_to_device(next(batches), self.device)
            self.loss(batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - start) / steps


def measure(
    args: argparse.Namespace, data: TrainTriplets, batch: int, precision: str
) -> tuple[dict[str, Timings], float]:
    """Phases of ``--steps`` step pairs, then ``--rounds`` of DataLoader loops, per path."""
    device = torch.device(args.device)
    model = build_model(MODELS[args.size])
    model.config = model.config.replace(precision=precision)
    model = model.to(device).train()
    profiler = Profiler(model, data, device)
    texts = [data[k]["text"] for k in range(batch)]
    captions = [data[k]["target_caption"] for k in range(batch)]
    tokens = [model.tokenize(x)["input_ids"].shape[1] for x in (texts, captions)]
    flops = batch * step_flops(model.config, *tokens)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    timings = {path: Timings() for path in PATHS}
    steps = tqdm(range(args.warmup + args.steps), desc=f"batch {batch} {precision}", unit="pair")
    for step in steps:
        keys = [order[(step * batch + i) % len(order)] for i in range(batch)]
        for path in PATHS:
            profiler.step(path, timings[path] if step >= args.warmup else Timings(), keys)
    pin = device.type == "cuda"
    # old: its per-sample reads in --workers processes; new: as fit reads a feature cache
    workers = {"old": args.workers, "new": 0}
    streams = {p: endless(loader(data, p, batch, workers[p], pin)) for p in PATHS}
    for path in PATHS:
        if args.warmup:
            profiler.loop(path, streams[path], args.warmup)
    for _ in tqdm(range(args.rounds), desc=f"batch {batch} {precision} loop", unit="round"):
        for path in PATHS:
            timings[path].loop.append(profiler.loop(path, streams[path], args.steps))
    return timings, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path (and loop)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating DataLoader rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the loop")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--size", choices=MODELS, default="real", help="tiny: the tiny preset (a dry run)"
    )
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write the rows here (the GPU suite)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = load_preset("blip2-vitg" if args.size == "real" else "tiny").config
    shape = (
        (config.image.size // config.vision["patch_size"]) ** 2 + 1,
        config.vision["hidden_size"],
    )
    load_before = os.getloadavg()[0]

    texts = corpus(64, 1)
    captions = [a + " " + b for a, b in zip(corpus(64, 2), corpus(64, 3), strict=True)]
    rows, records = [], []
    for batch in args.batch_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            # eight batches of distinct rows; the steps cycle through them
            data = triplets(synthetic_cache(Path(tmp), 16 * batch, shape), texts, captions)
            results = {p: measure(args, data, batch, p) for p in args.precisions}
        for precision, (timings, flops) in results.items():
            for path in PATHS:
                t = timings[path]
                critical, loop = t.critical(path), statistics.median(t.loop)
                hidden = WORKER_PHASES.get(path, ())
                cells = [
                    f"({t.median(p) * 1e3:.1f})" if p in hidden else f"{t.median(p) * 1e3:.1f}"
                    for p in PHASES
                ]
                utilisation = mfu(flops / loop, device, precision)
                records.append(
                    {"batch": batch, "precision": precision, "path": path, "loop_ms": loop * 1e3,
                     "critical_ms": critical * 1e3, "tflops": flops / loop / 1e12,
                     "mfu": utilisation}
                )  # fmt: skip
                rows.append(
                    f"| {batch} | {precision} | {path} | " + " | ".join(cells) + " | "
                    f"**{critical * 1e3:.0f}** | {t.data(path) / critical * 100:.1f}% | "
                    f"{loop * 1e3:.0f} | {flops / loop / 1e12:.3f} | {utilisation} |"
                )
                print(rows[-1])
    load_after = os.getloadavg()[0]
    body = "\n".join(
        [
            "## Profile of the cached training step (real-size BLIP-2 Q-Former)",
            "",
            f"On {device_label(device, args.threads if device.type == 'cpu' else None)}. One "
            "step = the query and target passes of the real-size Q-Former (186M parameters, "
            "12 layers, 32 queries) over cached `[257, 1408]` ViT-g features read from a real "
            "on-disk cache, InfoNCE, backward, AdamW. Milliseconds, median of "
            f"{args.steps} steps per path with synchronised timers, the paths alternating step "
            f"by step after {args.warmup} warm-up step(s). `old`: the data path before issue 17 "
            "(per-sample reads widened to fp32 on the host, stacked, copied from pageable "
            "memory; torch's default AdamW); `new`: fp16 rows copied straight into one batch "
            "tensor by `fit`'s prefetch thread (pinned on a GPU), widened on the device, fused "
            "AdamW. Figures in parentheses are done by that thread, off the step. `critical`: the "
            "step's time without those; `data share`: read to copy as a share of `critical`. "
            f"`loop`: a step through the real DataLoaders (old: {args.workers} worker(s), new: "
            "the prefetch thread), median "
            f"of {args.rounds} round(s) of {args.steps} steps synchronised once. Model FLOPs "
            "from the architecture (`step_flops`: 2 per multiply-add, backward twice the "
            "forward except the ViT features' key/value projections), over `loop`; MFU "
            f"against the card's dense peak where known ({PEAK_SOURCE}, `bench/report.py`).",
            "",
            "| batch | precision | path | "
            + " | ".join(PHASES)
            + " | critical | data share | loop | TFLOP/s | MFU |",
            "| ---: | --- | --- |" + " ---: |" * (len(PHASES) + 5),
            *rows,
            "",
            f"Load average (1 min) of the machine: {load_before:.1f} before, "
            f"{load_after:.1f} after.",
        ]
    )
    print(body)
    if args.json:
        atomic_write_json(args.json, records)
    if not args.no_report:
        update_section(section_name("cached_step", device), body)


if __name__ == "__main__":
    main()

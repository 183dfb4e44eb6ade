"""Training throughput of the tiny presets on this CPU (samples/s), into BENCHMARKS.md.

Runs the real training path (CIRDataModule with in-memory images, CSMCIRModule, a Lightning
Trainer) on a freshly generated synthetic benchmark with oracle captions, and times optimiser
steps after a short warm-up, for each model, batch size and torch thread count asked for. The
models: ``tiny`` (CSMCIR), ``+bank`` (with the gated memory bank), ``+symmetric`` (the two-way
loss; ``tiny+bank+symmetric`` is the quickstart's step) and ``clip4cir-tiny`` (the baseline),
measured in one run so that their ratio holds on a
shared machine: the equal wall-clock comparison (docs/baselines.md) reads it.

    python -m bench.bench_train_tiny [--steps 30] [--batch-sizes 32,128] [--threads 1,2]
    python -m bench.bench_train_tiny --models tiny+bank+symmetric,clip4cir-tiny --batch-sizes 64
    python -m bench.bench_train_tiny --device cuda --batch-sizes 32,128,512 --threads 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from bench.report import device_label, section_name, update_section
from csmcir import cli as csmcir_cli
from csmcir.data.synth import SynthConfig, generate
from csmcir.train.datamodule import CIRDataModule, caption_command
from csmcir.train.memory_bank import MemoryBankConfig
from csmcir.train.module import CSMCIRModule

WARMUP_STEPS = 5


class StepTimer(L.Callback):
    """Wall time of the training steps after the first ``WARMUP_STEPS``."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP_STEPS:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)  # kernels are queued, not yet run
            self.end = time.perf_counter()
            self.steps += 1


def make_benchmark(root: Path) -> Path:
    generate(root, SynthConfig(train_refs=600, val_refs=8, test_refs=2))
    captions = root / "mcot_captions.json"
    for command in caption_command("synthcir", root, captions).split(" && "):
        csmcir_cli.main([*command.split()[1:], *(["--no-progress"] if " run " in command else [])])
    return captions


def module(model: str) -> CSMCIRModule:
    """The training module of ``model``: a preset name, then ``+bank`` for the gated memory bank
    and ``+symmetric`` for the two-way loss (``tiny+bank+symmetric``: the quickstart's step)."""
    preset, *parts = model.split("+")
    if not set(parts) <= {"bank", "symmetric"}:
        raise SystemExit(f"--models: {model!r} is not PRESET[+bank][+symmetric]")
    # open from the first step: the quickstart's opens at its entropy gate, about step 240
    bank = MemoryBankConfig(enabled=True, open_entropy=None) if "bank" in parts else None
    return CSMCIRModule(
        preset=preset, warmup_steps=1, bank=bank, symmetric_loss="symmetric" in parts
    )


def measure(
    model: str,
    root: Path,
    captions: Path,
    batch_size: int,
    threads: int,
    steps: int,
    device: torch.device,
    grouped: bool,
) -> float:
    torch.set_num_threads(threads)
    L.seed_everything(0)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        max_steps=WARMUP_STEPS + steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    data = CIRDataModule(
        "synthcir",
        root,
        captions,
        batch_size=batch_size,
        cache_images=True,
        group_by_reference=grouped,
    )
    trainer.fit(module(model), data)
    return batch_size * timer.steps / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    parser.add_argument(
        "--models",
        default="tiny",
        help="tiny, tiny+bank+symmetric (the quickstart's step), clip4cir-tiny",
    )
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--batching",
        default="random,grouped",
        help="random batches, and/or a reference's queries batched together (the quickstart's: "
        "the ViT then runs once per distinct reference)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    batchings = args.batching.split(",")
    models = args.models.split(",")
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthcir"
        captions = make_benchmark(root)
        settings = [
            (m, b, g, t)
            for b in batch_sizes
            for g in batchings
            for t in thread_counts
            for m in models
        ]
        for model, batch_size, batching, threads in settings:
            grouped = batching == "grouped"
            rate = measure(model, root, captions, batch_size, threads, args.steps, device, grouped)
            rows.append((model, batch_size, batching, threads, rate))
            print(
                f"{model}, batch {batch_size} {batching}, {threads} thread(s): {rate:.1f} samples/s"
            )
    body = [
        f"## Training throughput: tiny presets, {device_label(device)}",
        "",
        "One optimiser step = query and target encoders forward and backward on a batch of "
        "(reference image, text, target image, caption) samples, 64 px images, in-batch "
        f"InfoNCE; timed over {args.steps} steps after {WARMUP_STEPS} warm-up steps, "
        "images cached in memory, no validation. `tiny`: CSMCIR's tiny preset; `+bank`: with "
        "the memory bank, open from the first step (the quickstart's opens at its entropy gate, "
        "about step 240); `+symmetric`: the two-way loss (`tiny+bank+symmetric` is the "
        "quickstart's step); `clip4cir-tiny`: the baseline.",
        "",
        "`grouped`: a reference's queries batched together (`data.group_by_reference`, the "
        "quickstart's recipe), so the reference ViT runs once per distinct reference image.",
        "",
        "| model | batch | batching | torch threads | samples/s | ms/step |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
        *(f"| {m} | {b} | {g} | {t} | {r:.1f} | {1000 * b / r:.0f} |" for m, b, g, t, r in rows),
    ]
    rate = {(m, b, g, t): r for m, b, g, t, r in rows}
    if len(models) > 1:
        first = models[0]
        ratios = [
            f"{m} {rate[m, b, g, t] / r:.2f}x (batch {b}, {g}, {t} thread{'s' * (t > 1)})"
            for (f, b, g, t), r in rate.items()
            if f == first
            for m in models[1:]
        ]
        body += ["", f"Samples/s against {first} at the same settings: {', '.join(ratios)}."]
    if device.type == "cpu":
        gains = [
            rate[m, b, g, 2] / r
            for (m, b, g, t), r in rate.items()
            if t == 1 and (m, b, g, 2) in rate
        ]
        measured = (
            f"in this run two threads ran {min(gains):.2f}-{max(gains):.2f}x as fast as one"
            if gains
            else "one thread count only in this run"
        )
        body += [
            "",
            f"Load average (1 min) of the shared machine: {load_before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after. Threads matter with the load: "
            f"{measured}, while with other "
            "processes busy (load average about 10) an earlier run measured one thread 5-11x "
            "faster than two, whose OpenMP threads wait for each other. A run alone uses every "
            "core it may (`csmcir fit` without `--threads`), and `csmcir ablate --lanes N` gives "
            "each of N runs side by side its share (docs/training.md).",
        ]
    update_section(section_name("train_tiny", device), "\n".join(body))


if __name__ == "__main__":
    main()

"""Write a benchmark's figures into its own section of BENCHMARKS.md.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; rerunning
it replaces only that section, so the file collects every benchmark's latest figures.
"""

from __future__ import annotations

import fcntl
import os
import platform
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from csmcir.io import atomic_write_text

# $CSMCIR_BENCHMARKS redirects the figures to another file (the GPU suite's dry run)
BENCHMARKS_MD = Path(
    os.environ.get("CSMCIR_BENCHMARKS") or Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
)
HEADER = (
    "# Benchmarks\n\n"
    "Figures written by the scripts in `bench/`; each section names the command that produced it.\n"
    "Ratios are measured within one run: the machines are shared and noisy.\n"
)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def device_label(device: torch.device, threads: int | None = None) -> str:
    """What a timing ran on, for a table's caption: the GPU's name, or the CPU thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU" if threads is None else f"CPU, {threads} thread" + ("s" if threads > 1 else "")


# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by a part of the
# name torch reports, most specific first; fp32 without TF32, which torch leaves off for matmuls
# by default. A card not listed gets no MFU figure rather than a guessed one.
PEAK_SOURCE = "NVIDIA datasheet, dense"
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM ("H100 80GB HBM3")
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The card's dense peak for ``precision`` (TFLOP/s), or None on a CPU or an unlisted card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[precision] for gpu, p in PEAK_TFLOPS.items() if gpu in name), None)


def mfu(flops_per_s: float, device: torch.device, precision: str) -> str:
    """Model-FLOPs utilisation against the card's peak, as a table cell ("-" without a peak)."""
    top = peak_tflops(device, precision)
    return f"{flops_per_s / (top * 1e12) * 100:.1f}%" if top else "-"


def section_name(name: str, device: torch.device) -> str:
    """CPU and GPU figures of one benchmark live side by side: ``NAME`` and ``NAME_cuda``."""
    return name if device.type == "cpu" else f"{name}_{device.type}"


def _invocation() -> list[str]:
    """How the running benchmark was started: ``-m bench.NAME`` (the scripts import the
    ``bench`` package, so that is how they run from the repository root) or its path."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None:
        return ["-m", spec.name]
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(BENCHMARKS_MD.parent):
        script = script.relative_to(BENCHMARKS_MD.parent)
    return [str(script)]


def update_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section ``name`` with ``body``, stamped with command and date."""
    command = " ".join(["python", *_invocation(), *sys.argv[1:]])
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    section = (
        f"<!-- bench:{name} -->\n{body.rstrip()}\n\n"
        f"Command: `{command}` ({stamp}; {machine()})\n<!-- /bench:{name} -->"
    )
    lock = path.with_suffix(".lock")
    with lock.open("w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else HEADER
        pattern = re.compile(
            rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S
        )
        text = (
            pattern.sub(lambda _: section, text)
            if pattern.search(text)
            else f"{text.rstrip()}\n\n{section}\n"
        )
        atomic_write_text(path, text)
    lock.unlink(missing_ok=True)

"""Write a benchmark's figures into its own section of BENCHMARKS.md.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; rerunning
it replaces only that section, so the file collects every benchmark's latest figures.
"""

from __future__ import annotations

import fcntl
import platform
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from csmcir.io import atomic_write_text

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Figures written by the scripts in `bench/`; each section names the command that produced it.\n"
    "Ratios are measured within one run: the machines are shared and noisy.\n"
)


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def device_label(device: torch.device, threads: int | None = None) -> str:
    """What a timing ran on, for a table's caption: the GPU's name, or the CPU thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU" if threads is None else f"CPU, {threads} thread" + ("s" if threads > 1 else "")


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

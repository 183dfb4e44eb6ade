"""Where a command computes: the one check of ``--device`` (and of ``fit``'s
``--trainer.accelerator``) that every command runs before any work.

Without it a GPU that is not there shows up late and in torch's words ("Found no NVIDIA driver"),
after data, captions or a model were already made.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from csmcir.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:1, mps"
GPU_ACCELERATORS = {"gpu": "cuda", "cuda": "cuda", "mps": "mps"}


def resolve_device(name: str | torch.device, flag: str = "--device") -> torch.device:
    """The torch device ``name`` asks for, when this machine has it; else a ConfigError that
    names ``flag`` and what works instead. ``auto`` is a GPU when there is one, else the CPU."""
    import torch  # here, not at the top: commands that never compute stay quick to start

    if isinstance(name, str) and name.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{flag} {name!r} is not a device: use {DEVICE_HELP}") from None
    if device.type == "cuda":
        check_cuda(device.index, f"{flag} {name}", _instead(flag))
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} {name}: this machine has no MPS (Apple GPU); {_instead(flag)}")
    elif device.type not in {"cpu", "cuda", "mps"}:
        raise ConfigError(f"{flag} {name}: csmcir runs on {DEVICE_HELP}, not {device.type}")
    return device


def check_cuda(index: int | None, asked: str, instead: str) -> None:
    """Refuse a CUDA GPU (or GPU number ``index``) this machine does not have: ``asked`` is
    the flag and value at fault, ``instead`` what works."""
    import torch

    if not torch.cuda.is_available():
        build = (
            "this torch is a CPU-only build"
            if torch.version.cuda is None
            else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable "
            "NVIDIA GPU or driver"
        )
        raise ConfigError(f"{asked}: {build}; {instead}")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise ConfigError(
            f"{asked}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}; "
            f"pick one of those, or {instead}"
        )


def _instead(flag: str) -> str:
    if flag == "--device":
        return "run on the CPU with --device cpu (or --device auto: a GPU only when there is one)"
    return f"train on the CPU with {flag} cpu (or {flag} auto)"


def add_device_argument(parser: argparse.ArgumentParser | Any, default: str = "auto") -> None:
    """``--device``, checked while the command line is parsed, so before any work: a command
    receives a ``torch.device`` this machine has."""
    parser.add_argument(
        "--device",
        type=resolve_device,
        default=default,
        help=f"where to compute: {DEVICE_HELP} (default {default})",
    )


def check_accelerator(accelerator: Any, devices: Any) -> None:
    """``fit``/``validate``: refuse ``--trainer.accelerator gpu|cuda|mps`` (and GPU numbers in
    ``--trainer.devices``) this machine lacks, before Lightning builds anything."""
    if not isinstance(accelerator, str) or accelerator.lower() not in GPU_ACCELERATORS:
        return  # cpu, auto, or an Accelerator object: Lightning decides
    flag = "--trainer.accelerator"
    if GPU_ACCELERATORS[accelerator.lower()] == "mps":
        resolve_device("mps", flag)
        return
    import torch

    instead = _instead(flag)
    check_cuda(None, f"{flag} {accelerator}", instead)
    count = torch.cuda.device_count()
    wanted = _device_indices(devices)
    if isinstance(wanted, int) and wanted > count:
        raise ConfigError(
            f"--trainer.devices {devices}: this machine has {count} CUDA GPU(s); "
            f"ask for at most {count}"
        )
    if isinstance(wanted, list):
        for index in wanted:
            check_cuda(index, f"--trainer.devices {devices}", instead)


def _device_indices(devices: Any) -> int | list[int] | None:
    """Lightning's ``devices``: a count (int or "2"), GPU numbers ([0, 1] or "0,1"), or
    None for "auto" / -1 (every GPU)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in {"auto", "-1"}:
            return None
        if "," in text:
            return [int(i) for i in text.split(",") if i.strip()]
        return int(text) if text.isdigit() else None
    if isinstance(devices, int):
        return None if devices < 0 else devices
    if isinstance(devices, list | tuple):
        return [int(i) for i in devices]
    return None

"""The exported model folder every model kind shares, and its atomic write.

A folder holds ``config.json`` (``{"model_type": KIND, "format_version": 1, "config": {...}}``),
``model.safetensors`` and the tokenizer's files: JSON and safetensors only, no pickle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from csmcir.errors import ConfigError, DataError
from csmcir.io import atomic_write_json, read_json
from csmcir.model.registry import CONFIG_FILE, KIND_MODULES, folder_model_type

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def save_pretrained(model: nn.Module, folder: str | Path) -> Path:
    """Write the inference folder beside its final place, then swap it in.

    A reader sees the old folder or the new one, never a mix of old weights and new config.
    An existing folder is replaced only when it is an exported model folder (or empty), so a
    mistyped path cannot wipe unrelated files.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise DataError(f"cannot save the model to {folder}: it is a file")
        if any(folder.iterdir()) and folder_model_type(folder) not in KIND_MODULES:
            raise DataError(
                f"refusing to replace {folder}: it is not empty and holds no CSMCIR model"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.tokenizer.save_pretrained(str(tmp))
        atomic_write_json(
            tmp / CONFIG_FILE,
            {
                "model_type": model.model_type,
                "format_version": FORMAT_VERSION,
                "config": model.config.to_dict(),
            },
        )
        swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def swap_in(tmp: Path, folder: Path) -> None:
    """Rename a finished folder into place, replacing an old one (already checked) whole."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
    tmp.rename(folder)
    if old is not None:
        shutil.rmtree(old)


def read_model_config(
    folder: Path, model_type: str, overrides: dict[str, Any], runtime_options: Sequence[str]
) -> dict[str, Any]:
    """The ``config`` of an exported folder of ``model_type``, after checking its format, its
    weights file and that ``overrides`` change only ``runtime_options``."""
    config_path = folder / CONFIG_FILE
    data = read_json(config_path, "model config")
    if not isinstance(data, dict) or data.get("model_type") != model_type:
        raise DataError(f"{config_path} is not a {model_type} model config")
    if data.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{config_path}: format_version {data.get('format_version')!r} is not supported by "
            f"this csmcir (expects {FORMAT_VERSION})"
        )
    unknown = sorted(set(overrides) - set(runtime_options))
    if unknown:
        raise ConfigError(
            f"from_pretrained can change only {', '.join(runtime_options)}; "
            f"got {', '.join(unknown)}"
        )
    if not (folder / WEIGHTS_FILE).is_file():
        raise DataError(f"model folder {folder} is incomplete, missing: {WEIGHTS_FILE}")
    return data.get("config")


def load_weights(model: nn.Module, folder: Path) -> nn.Module:
    """Load ``model.safetensors`` into ``model``; every key must fit, none may be left over."""
    path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DataError(f"unreadable weights {path}: {e}") from None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise DataError(
            f"{path} does not match {folder / CONFIG_FILE}: {str(e).splitlines()[-1]}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise DataError(
            f"{path} does not match {folder / CONFIG_FILE}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model

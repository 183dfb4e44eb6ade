"""One registry of model kinds: the place that says which code builds and loads which model.

A model kind (CSMCIR, the CLIP4Cir baseline, ...) lives in one module that declares a
module-level ``KIND = ModelKind(...)``: the ``model_type`` its exported folders carry in
``config.json``, its presets folder, and its builder and loaders. ``KIND_MODULES`` names those
modules; they are imported on first use, by name (as transformers' Auto classes do), so this
module imports no kind and no kind needs another. Adding a kind is one file and its line here.

Every generic entry point goes through here: ``load_preset`` / ``list_presets`` (one preset
namespace over all kinds), ``from_preset``, ``from_pretrained`` (dispatch on the folder's
``model_type``) and ``from_config`` (rebuild a model of a saved config, e.g. from a checkpoint).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csmcir.errors import ConfigError, DataError
from csmcir.hub import MODEL, Use, resolve
from csmcir.io import read_json

# model_type -> the module that declares its KIND.
KIND_MODULES: dict[str, str] = {
    "csmcir": "csmcir.model.loading",
    "clip4cir": "csmcir.baselines.loading",
}
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Preset:
    """A preset: its model config, where its tokenizer comes from, and (if any) its weights.

    ``tokenizer`` is ``"wordpiece"`` (built from a corpus), ``"weights"`` (read from the weights
    folder) or ``"open_clip"``. ``weights`` describes a download: ``repo``, ``variants``,
    ``default_dir`` and ``env`` (the environment variable that overrides the default folder).
    ``model_type`` names the kind that builds it; ``config`` is that kind's config dataclass.
    """

    name: str
    description: str
    config: Any
    tokenizer: str
    weights: dict[str, Any] | None = None
    model_type: str = "csmcir"

    def weights_dir(self, given: str | Path | None, use: Use, flag: str = "weights") -> Path:
        """Where the weights are read from: the argument, else $env, else the default folder
        when it exists, else the preset's hub repo; a hub name is fetched (:mod:`csmcir.hub`)."""
        if self.weights is None:
            raise ConfigError(f"preset {self.name!r} is random-initialised and has no weights")
        if given is None and os.environ.get(self.weights["env"]):
            given, flag = os.environ[self.weights["env"]], f"${self.weights['env']}"
        if given is None:
            default = Path(self.weights["default_dir"])
            given = default if default.exists() else self.weights["repo"]
            flag = f"preset {self.name!r}'s weights"
        return resolve(given, use, flag)


@dataclass(frozen=True)
class ModelKind:
    """What the registry needs of a model kind.

    Attributes:
        model_type: the ``model_type`` of its exported folders' ``config.json``.
        preset_dir: folder of its preset JSON files (``<name>.json``).
        load_preset: ``name -> Preset`` for a name in ``preset_dir``.
        from_preset: ``(preset, *, tokenizer_corpus, tokenizer, weights, vocab_size, seed,
            overrides) -> model``.
        from_pretrained: ``(folder, overrides) -> model`` for a folder whose ``config.json``
            has one of ``folder_types``.
        from_config: ``(config dict, tokenizer folder) -> model`` whose weights are loaded next.
        folder_types: the ``model_type`` values it loads; its own, plus e.g. ``blip-2`` for a
            downloaded BLIP-2 folder.
    """

    model_type: str
    preset_dir: Path
    load_preset: Callable[[str], Preset]
    from_preset: Callable[..., Any]
    from_pretrained: Callable[[Path, dict[str, Any]], Any]
    from_config: Callable[[dict[str, Any], Path], Any]
    folder_types: tuple[str, ...] = ()

    def preset_names(self) -> list[str]:
        return sorted(p.stem for p in self.preset_dir.glob("*.json"))


def kind(model_type: str) -> ModelKind:
    """The kind of ``model_type`` (importing its module on first use)."""
    if model_type not in KIND_MODULES:
        raise ConfigError(
            f"unknown model kind {model_type!r}; known: {', '.join(sorted(KIND_MODULES))}"
        )
    found = importlib.import_module(KIND_MODULES[model_type]).KIND
    if found.model_type != model_type:
        raise RuntimeError(f"{KIND_MODULES[model_type]} declares kind {found.model_type!r}")
    return found


def kinds() -> list[ModelKind]:
    return [kind(t) for t in KIND_MODULES]


def list_presets() -> list[str]:
    return sorted(name for k in kinds() for name in k.preset_names())


def load_preset(name: str) -> Preset:
    for k in kinds():
        if name in k.preset_names():
            return k.load_preset(name)
    raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(list_presets())}")


def refuse_unread_weights(preset: Preset, weights: str | Path | None) -> None:
    """Weights given to a preset that reads none are an error, never dropped."""
    if weights is not None and preset.weights is None:
        readers = [n for n in list_presets() if load_preset(n).weights is not None]
        raise ConfigError(
            f"preset {preset.name!r} is random-initialised and reads no weights, so weights "
            f"{weights} (--model.weights) would be ignored: the presets that read them are "
            f"{', '.join(readers)} (--model.preset), or start from a model folder with "
            "--model.init_from"
        )


def from_preset(
    name: str,
    *,
    tokenizer_corpus: Sequence[str] | None = None,
    tokenizer: Any = None,
    weights: str | Path | None = None,
    vocab_size: int = 2048,
    seed: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """A model of any kind's preset (see ``CSMCIR.from_preset`` for the arguments).

    Weights given to a preset that reads none are refused, never dropped: ``fit --model.weights
    Salesforce/blip2-itm-vit-g`` with the ``tiny`` preset trained a random model and exited 0.
    """
    preset = load_preset(name)
    refuse_unread_weights(preset, weights)
    return kind(preset.model_type).from_preset(
        preset,
        tokenizer_corpus=tokenizer_corpus,
        tokenizer=tokenizer,
        weights=weights,
        vocab_size=vocab_size,
        seed=seed,
        overrides=overrides or {},
    )


def folder_model_type(folder: Path) -> str | None:
    """The ``model_type`` of a folder's ``config.json``; None when it has no readable one."""
    try:
        data = read_json(folder / CONFIG_FILE, "model config")
    except DataError:
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def refuse_checkpoint_file(path: Path) -> None:
    """A weights file given where a model folder belongs: say what the folder is made from."""
    if not path.is_file():
        return
    if path.suffix == ".ckpt":
        raise DataError(
            f"{path} is a Lightning checkpoint, not a model folder: `csmcir fit` exports its "
            "weights to <run>/model and <run>/best when it ends; load one of those folders"
        )
    raise DataError(
        f"{path} is a file, not a model folder. A LAVIS or SPRC BLIP-2 state dict (.pth) "
        f"becomes a Blip2ForImageTextRetrieval folder with\n  csmcir convert lavis {path} "
        "--tokenizer BERT_TOKENIZER_DIR --out DIR\nthen pass DIR instead (docs/model.md)"
    )


def from_pretrained(folder: str | Path, overrides: dict[str, Any] | None = None) -> Any:
    """Load a model folder of any kind (a hub name is fetched first): the kind is read from its
    ``config.json``."""
    folder = resolve(folder, MODEL, "model")
    refuse_checkpoint_file(folder)
    if not folder.is_dir():
        raise DataError(f"model folder not found: {folder}")
    if not (folder / CONFIG_FILE).is_file():
        raise DataError(
            f"model folder {folder} has no {CONFIG_FILE}: expected an exported model "
            f"({CONFIG_FILE}, model.safetensors, tokenizer files) or a BLIP-2 download"
        )
    model_type = folder_model_type(folder)
    for k in kinds():
        if model_type in (k.model_type, *k.folder_types):
            return k.from_pretrained(folder, overrides or {})
    loadable = sorted({t for k in kinds() for t in (k.model_type, *k.folder_types)})
    raise DataError(
        f"{folder / CONFIG_FILE}: model_type {model_type!r} is not one csmcir loads "
        f"({', '.join(loadable)})"
    )


def from_config(config: dict[str, Any], tokenizer_folder: str | Path) -> Any:
    """A model of a saved config (CSMCIR configs carry no ``model_type``), weights loaded next."""
    model_type = config.get("model_type", "csmcir") if isinstance(config, dict) else None
    return kind(model_type).from_config(config, Path(tokenizer_folder))

"""Building and loading the CLIP4Cir baseline: presets, local OpenCLIP checkpoints, exports.

This module declares the ``clip4cir`` model kind (see ``csmcir.model.registry``). Presets are
JSON files in ``csmcir/baselines/presets/`` and share one namespace with the CSMCIR presets
(``csmcir.model.load_preset`` finds them too). An exported folder is written by
``csmcir.model.folder.save_pretrained``: ``config.json`` (``{"model_type": "clip4cir",
"format_version": 1, "config": {...}}``), ``model.safetensors`` and the tokenizer's file(s).
An OpenCLIP checkpoint is a local file or folder, or a hub name (``hf-hub:org/name``) fetched
by :mod:`csmcir.hub`; a missing one is an error that says what to fetch and how.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch

from csmcir.baselines.clip4cir import CLIP4Cir, build_clip
from csmcir.baselines.config import MODEL_TYPE, CLIP4CirConfig
from csmcir.baselines.text import OpenCLIPTokenizer, WordPieceTokenizer, load_text_tokenizer
from csmcir.errors import ConfigError, DataError
from csmcir.hub import OPEN_CLIP, OPEN_CLIP_WEIGHTS, local_copy_command
from csmcir.io import read_json
from csmcir.model.folder import load_weights, read_model_config
from csmcir.model.registry import ModelKind, Preset

PRESET_DIR = Path(__file__).resolve().parent / "presets"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# Options that change how a saved model runs or trains, not what its weights mean.
RUNTIME_OPTIONS = ("precision", "train_image_encoder", "train_text_encoder", "dropout")


def load_preset(name: str) -> Preset:
    """A baseline preset; a pretrained one gets its architecture from open_clip's own configs."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.json")))
        raise ConfigError(f"unknown baseline preset {name!r}; available: {available}")
    data = read_json(path, "preset file")
    config = dict(data["config"])
    if "clip" not in config:
        config["clip"] = builtin_clip_config(config["clip_model"])
    config = CLIP4CirConfig.from_dict(config)
    return Preset(
        name=name,
        description=data["description"],
        config=config,
        tokenizer=config.tokenizer,
        weights=data.get("weights"),
        model_type=MODEL_TYPE,
    )


def builtin_clip_config(name: str) -> dict[str, Any]:
    config = open_clip.get_model_config(name)
    if config is None:
        raise ConfigError(
            f"clip_model {name!r} is not an open_clip architecture; pick one of "
            "open_clip.list_models() (e.g. ViT-B-32, ViT-B-16, RN50x4, ViT-L-14), or pass a "
            f"folder holding {OPEN_CLIP_CONFIG} as the weights"
        )
    return config


def from_preset(
    preset: Preset,
    *,
    tokenizer_corpus: Sequence[str] | None,
    tokenizer: Any,
    weights: str | Path | None,
    vocab_size: int,
    seed: int | None,
    overrides: dict[str, Any],
) -> CLIP4Cir:
    if preset.weights is not None:
        return _from_openclip_checkpoint(preset, preset.weights_dir(weights, OPEN_CLIP), overrides)
    text = _preset_tokenizer(preset, tokenizer_corpus, tokenizer, vocab_size)
    text_cfg = {"vocab_size": len(text), "eos_id": text.eos_id, "pad_id": text.pad_id}
    config = preset.config.replace(clip={"text_cfg": text_cfg}, **overrides)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return CLIP4Cir(config, text)


def _preset_tokenizer(
    preset: Preset, corpus: Sequence[str] | None, given: Any, vocab_size: int
) -> WordPieceTokenizer | OpenCLIPTokenizer:
    if preset.tokenizer == "open_clip":
        return OpenCLIPTokenizer()
    if given is not None:
        return given if isinstance(given, WordPieceTokenizer) else WordPieceTokenizer(given)
    if corpus is None:
        raise ConfigError(
            f"preset {preset.name!r} builds its WordPiece vocabulary from the training texts: "
            "pass tokenizer_corpus=[modification texts] (or tokenizer=...)"
        )
    return WordPieceTokenizer.from_corpus(corpus, vocab_size)


def _download_help(preset: Preset, path: Path) -> str:
    repo, folder = preset.weights["repo"], preset.weights["default_dir"]
    return (
        f"Pass a hub name (open_clip's hf-hub:{repo}, or {repo}): it is fetched into the hub "
        "cache, only its open_clip_config.json and one weights file. Or fetch them into a "
        f"folder once:\n  {local_copy_command(repo, OPEN_CLIP, folder)}\n"
        f"and pass that folder as weights=... / --model.weights, or set "
        f"${preset.weights['env']}; a bare .safetensors/.bin/.pt file works too, with its "
        "architecture named by the clip_model option (default "
        f"{preset.config.clip_model}). Looked for: {path}"
    )


def resolve_checkpoint(
    preset: Preset, path: Path, clip_model: str
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(weights file, open_clip model config, preprocessing config) of a local checkpoint."""
    if path.is_file():
        return path, builtin_clip_config(clip_model), {}
    if not path.is_dir():
        raise DataError(f"OpenCLIP checkpoint not found: {path}\n{_download_help(preset, path)}")
    found = [path / name for name in OPEN_CLIP_WEIGHTS if (path / name).is_file()]
    if not found:
        raise DataError(
            f"OpenCLIP folder {path} holds no weights (none of {', '.join(OPEN_CLIP_WEIGHTS)})\n"
            f"{_download_help(preset, path)}"
        )
    if not (path / OPEN_CLIP_CONFIG).is_file():
        return found[0], builtin_clip_config(clip_model), {}
    data = read_json(path / OPEN_CLIP_CONFIG, "open_clip config")
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise DataError(f"{path / OPEN_CLIP_CONFIG} has no 'model_cfg' object")
    return found[0], data["model_cfg"], data.get("preprocess_cfg") or {}


def _image_options(clip_config: dict[str, Any], preprocess: dict[str, Any]) -> dict[str, Any]:
    size = clip_config["vision_cfg"].get("image_size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ConfigError(f"non-square CLIP input {size} is not supported")
        size = size[0]
    return {"size": size} | {k: preprocess[k] for k in ("mean", "std") if k in preprocess}


def _from_openclip_checkpoint(preset: Preset, path: Path, overrides: dict[str, Any]) -> CLIP4Cir:
    """Wrap a local OpenCLIP checkpoint: CLIP's towers with a fresh combiner."""
    clip_model = overrides.get("clip_model", preset.config.clip_model)
    checkpoint, clip_config, preprocess = resolve_checkpoint(preset, path, clip_model)
    base = preset.config.to_dict() | {"clip": clip_config, "clip_model": clip_model}
    base["image"] |= _image_options(clip_config, preprocess)
    config = CLIP4CirConfig.from_dict(base).replace(**overrides)
    tokenizer = OpenCLIPTokenizer()
    clip = build_clip(config.clip)
    try:
        open_clip.load_checkpoint(clip, str(checkpoint), strict=True, weights_only=True)
    except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise DataError(
            f"OpenCLIP checkpoint {checkpoint} does not load into the {clip_model} architecture: "
            f"{str(e).splitlines()[0]}. Name its architecture with the clip_model option, or use "
            f"a folder holding its {OPEN_CLIP_CONFIG}"
        ) from None
    return CLIP4Cir(config, tokenizer, clip=clip)


def from_config(config: dict[str, Any], tokenizer_folder: Path) -> CLIP4Cir:
    """A random-weight baseline of a saved config, with the tokenizer saved in the folder."""
    config = CLIP4CirConfig.from_dict(config)
    return CLIP4Cir(config, load_text_tokenizer(config.tokenizer, tokenizer_folder))


def from_pretrained(folder: Path, overrides: dict[str, Any]) -> CLIP4Cir:
    config = read_model_config(Path(folder), MODEL_TYPE, overrides, RUNTIME_OPTIONS)
    config = CLIP4CirConfig.from_dict(config).replace(**overrides)
    model = CLIP4Cir(config, load_text_tokenizer(config.tokenizer, folder))
    return load_weights(model, Path(folder))


KIND = ModelKind(
    model_type=MODEL_TYPE,
    preset_dir=PRESET_DIR,
    load_preset=load_preset,
    from_preset=from_preset,
    from_pretrained=from_pretrained,
    from_config=from_config,
)

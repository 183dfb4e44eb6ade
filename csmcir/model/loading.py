"""The CSMCIR model kind: its presets, exported folders and BLIP-2 downloads (see registry).

Presets are JSON files in ``csmcir/presets/`` (open_clip style). An exported folder is written
by :func:`csmcir.model.folder.save_pretrained` (``model_type: csmcir``); a downloaded BLIP-2
folder (``model_type: blip-2``) loads through :mod:`csmcir.model.blip2`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from csmcir.errors import ConfigError
from csmcir.hub import MODEL
from csmcir.io import read_json
from csmcir.model.blip2 import from_blip2_folder
from csmcir.model.config import CSMCIRConfig
from csmcir.model.encoder import CSMCIR
from csmcir.model.folder import load_weights, read_model_config
from csmcir.model.registry import ModelKind, Preset, folder_model_type
from csmcir.model.tokenizer import build_wordpiece_tokenizer, check_tokenizer, load_tokenizer

MODEL_TYPE = "csmcir"
BLIP2_MODEL_TYPE = "blip-2"
BLIP2_PRESET = "blip2-vitg"
PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"
# Options that change how a saved model runs, not what its weights mean.
RUNTIME_OPTIONS = ("precision", "gradient_checkpointing", "freeze_vision", "max_text_length")


def load_preset(name: str) -> Preset:
    data = read_json(PRESET_DIR / f"{name}.json", "preset file")
    return Preset(
        name=name,
        description=data["description"],
        config=CSMCIRConfig.from_dict(data["config"]),
        tokenizer=data["tokenizer"],
        weights=data.get("weights"),
        model_type=MODEL_TYPE,
    )


def from_preset(
    preset: Preset,
    *,
    tokenizer_corpus: Sequence[str] | None,
    tokenizer: PreTrainedTokenizerBase | None,
    weights: str | Path | None,
    vocab_size: int,
    seed: int | None,
    overrides: dict[str, Any],
) -> CSMCIR:
    if preset.weights is not None:
        return from_blip2_folder(CSMCIR, preset, preset.weights_dir(weights, MODEL), overrides)
    if tokenizer is None:
        if tokenizer_corpus is None:
            raise ConfigError(
                f"preset {preset.name!r} builds its WordPiece vocabulary from the training "
                "texts: pass tokenizer_corpus=[modification texts and captions] (or tokenizer=...)"
            )
        tokenizer = build_wordpiece_tokenizer(tokenizer_corpus, vocab_size)
    check_tokenizer(tokenizer, "the given tokenizer")
    config = preset.config.replace(qformer={"vocab_size": len(tokenizer)}).replace(**overrides)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return CSMCIR(config, tokenizer)


def from_pretrained(folder: Path, overrides: dict[str, Any]) -> CSMCIR:
    """An exported CSMCIR folder, or a downloaded BLIP-2 one (read as the blip2-vitg preset)."""
    if folder_model_type(folder) == BLIP2_MODEL_TYPE:
        return from_blip2_folder(CSMCIR, load_preset(BLIP2_PRESET), folder, overrides)
    config = read_model_config(folder, MODEL_TYPE, overrides, RUNTIME_OPTIONS)
    config = CSMCIRConfig.from_dict(config).replace(**overrides)
    return load_weights(CSMCIR.skeleton(config, load_tokenizer(folder)), folder)


def from_config(config: dict[str, Any], tokenizer_folder: Path) -> CSMCIR:
    """A model of a saved config without random initialisation: its weights are loaded next."""
    return CSMCIR.skeleton(CSMCIRConfig.from_dict(config), load_tokenizer(tokenizer_folder))


KIND = ModelKind(
    model_type=MODEL_TYPE,
    preset_dir=PRESET_DIR,
    load_preset=load_preset,
    from_preset=from_preset,
    from_pretrained=from_pretrained,
    from_config=from_config,
    folder_types=(BLIP2_MODEL_TYPE,),
)

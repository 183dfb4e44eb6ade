"""Building, saving and loading CSMCIR models: presets, exported folders, BLIP-2 downloads.

Files are safetensors + JSON only (no pickle). An exported folder holds ``config.json``
(``{"model_type": "csmcir", "format_version": 1, "config": {...}}``), ``model.safetensors`` and
the tokenizer's files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import Blip2ForImageTextRetrieval, PreTrainedTokenizerBase

from csmcir.errors import ConfigError, DataError
from csmcir.io import atomic_write_json, read_json
from csmcir.model.config import CSMCIRConfig
from csmcir.model.presets import Preset, load_preset
from csmcir.model.tokenizer import (
    VOCAB_FILES,
    build_wordpiece_tokenizer,
    check_tokenizer,
    load_tokenizer,
)

if TYPE_CHECKING:
    from csmcir.model.encoder import CSMCIR

MODEL_TYPE = "csmcir"
# The CLIP4Cir baseline (csmcir.baselines) is built, saved and loaded through the same entry
# points, so training and evaluation need not know which model they hold.
BASELINE_MODEL_TYPE = "clip4cir"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Options that change how a saved model runs, not what its weights mean.
RUNTIME_OPTIONS = ("precision", "gradient_checkpointing", "freeze_vision", "max_text_length")

# Architecture keys read back from a downloaded BLIP-2 config (the rest are transformers' own).
VISION_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "layer_norm_eps",
    "hidden_act",
    "qkv_bias",
    "initializer_range",
)
QFORMER_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "cross_attention_frequency",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "pad_token_id",
    "initializer_range",
)


def from_preset(
    cls: type[CSMCIR],
    name: str,
    *,
    tokenizer_corpus: Sequence[str] | None,
    tokenizer: PreTrainedTokenizerBase | None,
    weights: str | Path | None,
    vocab_size: int,
    seed: int | None,
    overrides: dict[str, Any],
) -> CSMCIR:
    preset = load_preset(name)
    if preset.model_type == BASELINE_MODEL_TYPE:
        from csmcir.baselines.loading import from_preset as baseline_from_preset

        return baseline_from_preset(
            preset,
            tokenizer_corpus=tokenizer_corpus,
            tokenizer=tokenizer,
            weights=weights,
            vocab_size=vocab_size,
            seed=seed,
            overrides=overrides,
        )
    if preset.weights is not None:
        return _from_blip2_folder(cls, preset, preset.weights_dir(weights), overrides)
    if tokenizer is None:
        if tokenizer_corpus is None:
            raise ConfigError(
                f"preset {name!r} builds its WordPiece vocabulary from the training texts: "
                "pass tokenizer_corpus=[modification texts and captions] (or tokenizer=...)"
            )
        tokenizer = build_wordpiece_tokenizer(tokenizer_corpus, vocab_size)
    check_tokenizer(tokenizer, "the given tokenizer")
    config = preset.config.replace(qformer={"vocab_size": len(tokenizer)}).replace(**overrides)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return cls(config, tokenizer)


def missing_blip2_files(folder: Path) -> list[str]:
    needed = [CONFIG_FILE, "tokenizer_config.json"]
    missing = [f for f in needed if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in (WEIGHTS_FILE, f"{WEIGHTS_FILE}.index.json")):
        missing.append(f"{WEIGHTS_FILE} (or {WEIGHTS_FILE}.index.json and its shards)")
    if not any((folder / f).is_file() for f in VOCAB_FILES):
        missing.append(" or ".join(VOCAB_FILES))
    return missing


def _blip2_download_help(preset: Preset, folder: Path) -> str:
    repo = preset.weights["repo"]
    variants = " or ".join(preset.weights["variants"])
    return (
        f"Download them once (nothing downloads at run time):\n"
        f"  huggingface-cli download {repo} --local-dir {folder}\n"
        f"(newer huggingface_hub: `hf download {repo} --local-dir {folder}`; "
        f"variants: {variants}). "
        f"Then pass the folder as weights=... / --model, or set ${preset.weights['env']}. "
        f"Files needed: {CONFIG_FILE}, {WEIGHTS_FILE}, tokenizer_config.json, "
        f"{' or '.join(VOCAB_FILES)}."
    )


def _from_blip2_folder(
    cls: type[CSMCIR], preset: Preset, folder: Path, overrides: dict[str, Any]
) -> CSMCIR:
    """Load BLIP-2 stage-1 weights (``Blip2ForImageTextRetrieval``) from a local folder, offline."""
    if not folder.is_dir():
        raise DataError(
            f"BLIP-2 weights folder not found: {folder}\n{_blip2_download_help(preset, folder)}"
        )
    missing = missing_blip2_files(folder)
    if missing:
        raise DataError(
            f"BLIP-2 weights folder {folder} is incomplete, missing: {', '.join(missing)}\n"
            f"{_blip2_download_help(preset, folder)}"
        )
    blip = Blip2ForImageTextRetrieval.from_pretrained(
        str(folder), local_files_only=True, dtype=torch.float32
    )
    vision = {k: getattr(blip.config.vision_config, k) for k in VISION_KEYS}
    qformer = {k: getattr(blip.config.qformer_config, k) for k in QFORMER_KEYS}
    config = preset.config.replace(
        vision=vision,
        qformer=qformer,
        num_query_tokens=blip.config.num_query_tokens,
        embed_dim=blip.config.image_text_hidden_size,
        image={"size": vision["image_size"]},
        max_text_length=min(preset.config.max_text_length, qformer["max_position_embeddings"]),
    ).replace(**overrides)
    tokenizer = load_tokenizer(folder)
    return cls(config, tokenizer, blip=blip)


def save_pretrained(model: CSMCIR, folder: str | Path) -> Path:
    """Write the inference folder beside its final place, then swap it in.

    A reader sees the old folder or the new one, never a mix of old weights and new config.
    An existing folder is replaced only when it is a CSMCIR model folder (or empty), so a
    mistyped path cannot wipe unrelated files.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise DataError(f"cannot save the model to {folder}: it is a file")
        if any(folder.iterdir()) and not _is_csmcir_folder(folder):
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
                "model_type": getattr(model, "model_type", MODEL_TYPE),
                "format_version": FORMAT_VERSION,
                "config": model.config.to_dict(),
            },
        )
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _is_csmcir_folder(folder: Path) -> bool:
    try:
        data = read_json(folder / CONFIG_FILE, "model config")
    except DataError:
        return False
    return isinstance(data, dict) and data.get("model_type") in (MODEL_TYPE, BASELINE_MODEL_TYPE)


def from_pretrained(cls: type[CSMCIR], folder: str | Path, overrides: dict[str, Any]) -> CSMCIR:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"model folder not found: {folder}")
    if not (folder / CONFIG_FILE).is_file():
        raise DataError(
            f"model folder {folder} has no {CONFIG_FILE}: "
            f"expected an exported CSMCIR model ({CONFIG_FILE}, {WEIGHTS_FILE}, tokenizer files)"
        )
    data = read_json(folder / CONFIG_FILE, "model config")
    if isinstance(data, dict) and data.get("model_type") == "blip-2":
        return _from_blip2_folder(cls, load_preset("blip2-vitg"), folder, overrides)
    if isinstance(data, dict) and data.get("model_type") == BASELINE_MODEL_TYPE:
        from csmcir.baselines.loading import from_pretrained as baseline_from_pretrained

        return baseline_from_pretrained(folder, overrides)
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        raise DataError(f"{folder / CONFIG_FILE} is not a CSMCIR model config")
    if data.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{folder / CONFIG_FILE}: format_version {data.get('format_version')!r} is not "
            f"supported by this csmcir (expects {FORMAT_VERSION})"
        )
    missing = [f for f in (WEIGHTS_FILE, "tokenizer_config.json") if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in VOCAB_FILES):
        missing.append(" or ".join(VOCAB_FILES))
    if missing:
        raise DataError(f"model folder {folder} is incomplete, missing: {', '.join(missing)}")
    unknown = sorted(set(overrides) - set(RUNTIME_OPTIONS))
    if unknown:
        raise ConfigError(
            f"from_pretrained can change only {', '.join(RUNTIME_OPTIONS)}; "
            f"got {', '.join(unknown)}"
        )
    config = CSMCIRConfig.from_dict(data.get("config")).replace(**overrides)
    tokenizer = load_tokenizer(folder)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise DataError(f"unreadable weights {folder / WEIGHTS_FILE}: {e}") from None
    model = cls.skeleton(config, tokenizer)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DataError(
            f"{folder / WEIGHTS_FILE} does not match {folder / CONFIG_FILE}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model


def model_from_config(config: dict[str, Any], tokenizer_folder: str | Path):
    """A model (CSMCIR or baseline) of a saved config, tokenizer from the folder.

    What rebuilds a model from a training checkpoint, whose weights are loaded next: a CSMCIR
    is built without random initialisation (its weights are uninitialised until loaded).
    """
    if isinstance(config, dict) and config.get("model_type") == BASELINE_MODEL_TYPE:
        from csmcir.baselines.loading import model_from_config as baseline_from_config

        return baseline_from_config(config, tokenizer_folder)
    from csmcir.model.encoder import CSMCIR

    return CSMCIR.skeleton(CSMCIRConfig.from_dict(config), load_tokenizer(tokenizer_folder))

"""BLIP-2 folders as the Hugging Face hub lays them out (``Salesforce/blip2-itm-vit-g``).

Loading is strict: every weight CSMCIR runs must come from the checkpoint (transformers alone
would initialise a missing one at random and only log it), a generation checkpoint is refused,
the folder's image processor decides the preprocessing, and its tokenizer may carry the
processor's extra tokens. Weights the checkpoint has and CSMCIR never reads (``itm_head``) are
kept, frozen, so that ``csmcir export hf`` can give them back.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    BlipImageProcessor,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights

from csmcir.errors import ConfigError, DataError
from csmcir.hub import MODEL, local_copy_command
from csmcir.io import read_json
from csmcir.model.config import RESAMPLES, ImageConfig
from csmcir.model.folder import WEIGHTS_FILE, swap_in
from csmcir.model.registry import CONFIG_FILE, Preset, refuse_checkpoint_file
from csmcir.model.tokenizer import VOCAB_FILES, load_tokenizer

if TYPE_CHECKING:
    from csmcir.model.encoder import CSMCIR

RETRIEVAL_REPO = "Salesforce/blip2-itm-vit-g"
INDEX_FILE = f"{WEIGHTS_FILE}.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
# In a retrieval checkpoint, never read by CSMCIR: may be absent, carried when present.
UNUSED_PREFIXES = ("itm_head.",)
# Only a generation checkpoint (Blip2ForConditionalGeneration, Blip2Model) has these.
GENERATION_PREFIXES = ("language_model.", "language_projection.")
# PIL's filter numbers, as image processors store ``resample``.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
ITM_HEAD = ("itm_head.weight", "itm_head.bias")
# The eps of the ViT's last LayerNorm where it differs from the others' (LAVIS's ln_vision);
# transformers' BLIP-2 has one eps for all, so only CSMCIR reads it (docs/model.md).
POST_EPS = "post_layernorm_eps"

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
    "attention_dropout",
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


def a_few(names: Sequence[str], n: int = 5) -> str:
    """The first ``n`` names and how many more: a readable list of a long one."""
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def missing_blip2_files(folder: Path) -> list[str]:
    needed = [CONFIG_FILE, "tokenizer_config.json"]
    missing = [f for f in needed if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in (WEIGHTS_FILE, INDEX_FILE)):
        missing.append(f"{WEIGHTS_FILE} (or {INDEX_FILE} and its shards)")
    if not any((folder / f).is_file() for f in VOCAB_FILES):
        missing.append(" or ".join(VOCAB_FILES))
    return missing


def download_help(preset: Preset, folder: Path) -> str:
    repo = preset.weights["repo"]
    variants = " or ".join(preset.weights["variants"])
    return (
        f"Pass its hub name instead ({variants}) as weights=... / --model.weights / --model: "
        "it is fetched into the hub cache, only the files needed. Or fetch them into a "
        f"folder once:\n  {local_copy_command(repo, MODEL, folder)}\n"
        f"and pass the folder, or set ${preset.weights['env']}. "
        f"Files needed: {CONFIG_FILE}, {WEIGHTS_FILE}, tokenizer_config.json, "
        f"{' or '.join(VOCAB_FILES)}. A LAVIS or SPRC .pth converts into such a folder with "
        "`csmcir convert lavis` (docs/model.md)."
    )


def checkpoint_keys(folder: Path) -> list[str]:
    """The tensor names of a folder's checkpoint, read from its header or index (no weights)."""
    try:
        if (folder / WEIGHTS_FILE).is_file():
            with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
                return list(f.keys())
        return list(read_json(folder / INDEX_FILE, "weights index")["weight_map"])
    except (SafetensorError, OSError, KeyError, TypeError) as e:
        raise DataError(f"unreadable BLIP-2 checkpoint in {folder}: {e}") from None


def read_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a folder's checkpoint whose names start with ``prefix`` (shards too)."""
    if (folder / WEIGHTS_FILE).is_file():
        files = {k: WEIGHTS_FILE for k in checkpoint_keys(folder)}
    else:
        files = read_json(folder / INDEX_FILE, "weights index").get("weight_map", {})
    wanted: dict[str, list[str]] = {}
    for key, file in files.items():
        if key.startswith(prefix):
            wanted.setdefault(file, []).append(key)
    if not wanted:
        raise DataError(f"the checkpoint in {folder} has no {prefix}* weights")
    tensors = {}
    for file, keys in wanted.items():
        with safe_open(str(folder / file), "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in keys}
    return tensors


def refuse_generation_checkpoint(folder: Path, keys: list[str]) -> None:
    """A blip2-opt / blip2-flan-t5 folder is also ``model_type: blip-2``, but it has a language
    model instead of the Q-Former's text embeddings and text projection, which CSMCIR runs."""
    if not any(k.startswith(GENERATION_PREFIXES) for k in keys):
        return
    try:
        architectures = read_json(folder / CONFIG_FILE, "model config").get("architectures")
    except (DataError, AttributeError):
        architectures = None
    kind = architectures[0] if architectures else "a BLIP-2 generation model"
    raise DataError(
        f"{folder} holds {kind}: a language model without the Q-Former's text embeddings and "
        "text projection, which CSMCIR's fused image+text pass runs. Use the stage-1 retrieval "
        f"checkpoint instead: {RETRIEVAL_REPO} (or {RETRIEVAL_REPO}-coco)"
    )


def load_retrieval_model(folder: Path) -> tuple[Blip2ForImageTextRetrieval, bool]:
    """The folder's ``Blip2ForImageTextRetrieval`` in fp32, and whether it had an ``itm_head``.

    Every other weight must come from the checkpoint: a missing one is an error naming the
    first few and the count, never a random module.
    """
    refuse_generation_checkpoint(folder, checkpoint_keys(folder))
    blip, info = Blip2ForImageTextRetrieval.from_pretrained(
        str(folder), local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    missing = sorted(info["missing_keys"])
    needed = [k for k in missing if not k.startswith(UNUSED_PREFIXES)]
    if needed:
        raise DataError(
            f"{folder} lacks {len(needed)} weight(s) CSMCIR needs: {a_few(needed)}. "
            "transformers would initialise them at random; use a complete "
            f"Blip2ForImageTextRetrieval checkpoint ({RETRIEVAL_REPO})"
        )
    has_itm_head = not any(k.startswith(UNUSED_PREFIXES) for k in missing)
    return blip, has_itm_head


def processor_settings(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The image processor's settings: ``preprocessor_config.json`` (hub layout), else the
    ``image_processor`` of ``processor_config.json`` (what ``Blip2Processor`` saves now)."""
    if (folder / PREPROCESSOR_FILE).is_file():
        path = folder / PREPROCESSOR_FILE
        data = read_json(path, "image processor config")
    elif (folder / PROCESSOR_FILE).is_file():
        path = folder / PROCESSOR_FILE
        data = read_json(path, "processor config")
        data = data.get("image_processor") if isinstance(data, dict) else None
        if data is None:
            return None
    else:
        return None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return path, data


def image_options(folder: Path, image_size: int) -> dict[str, Any] | None:
    """``ImageConfig`` fields that reproduce the folder's image processor, or None without one.

    BLIP-2's processor (and LAVIS's eval transform) resizes to the square size with a PIL
    filter, rescales by 1/255 and normalises; anything this pipeline cannot reproduce is
    refused by name rather than approximated.
    """
    found = processor_settings(folder)
    if found is None:
        return None
    path, data = found

    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: {key} {data.get(key)!r} {why}")

    size = data.get("size", image_size)
    if isinstance(size, dict):
        size = (
            (size["height"], size["width"])
            if "height" in size and "width" in size
            else size.get("shortest_edge")
        )
    height, width = size if isinstance(size, list | tuple) else (size, size)
    if height != width:
        raise refuse("size", "is not square; the BLIP-2 ViT reads square images")
    if height != image_size:
        raise refuse("size", f"does not match the ViT's image_size {image_size}")
    if data.get("do_resize") is False:
        raise refuse("do_resize", "is not supported: images are always resized")
    if data.get("do_center_crop"):
        raise refuse("do_center_crop", "is not supported by BLIP-2's processor or csmcir")
    factor = data.get("rescale_factor", 1 / 255)
    if data.get("do_rescale") is False or abs(factor - 1 / 255) > 1e-9:
        raise refuse("rescale_factor", "is not supported: pixels are rescaled by 1/255")
    resample = PIL_RESAMPLE.get(data.get("resample", 3))
    if resample not in RESAMPLES:
        raise refuse("resample", f"is not a PIL filter number ({sorted(PIL_RESAMPLE)})")
    options: dict[str, Any] = {"size": height, "mode": "resize", "resample": resample}
    if data.get("do_normalize", True):
        options |= {k: data[f"image_{k}"] for k in ("mean", "std") if f"image_{k}" in data}
    else:
        options |= {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    return options


def from_blip2_folder(
    cls: type[CSMCIR], preset: Preset, folder: Path, overrides: dict[str, Any]
) -> CSMCIR:
    """Load BLIP-2 stage-1 weights (``Blip2ForImageTextRetrieval``) from a local folder (a hub
    name is fetched into one by the caller, :mod:`csmcir.hub`)."""
    refuse_checkpoint_file(folder)
    if not folder.is_dir():
        raise DataError(
            f"BLIP-2 weights folder not found: {folder}\n{download_help(preset, folder)}"
        )
    missing = missing_blip2_files(folder)
    if missing:
        raise DataError(
            f"BLIP-2 weights folder {folder} is incomplete, missing: {', '.join(missing)}\n"
            f"{download_help(preset, folder)}"
        )
    blip, has_itm_head = load_retrieval_model(folder)
    vision = {k: getattr(blip.config.vision_config, k) for k in VISION_KEYS}
    if hasattr(blip.config.vision_config, POST_EPS):  # a converted LAVIS checkpoint's ln_vision
        vision[POST_EPS] = getattr(blip.config.vision_config, POST_EPS)
    qformer = {k: getattr(blip.config.qformer_config, k) for k in QFORMER_KEYS}
    image = image_options(folder, vision["image_size"]) or {"size": vision["image_size"]}
    config = preset.config.replace(
        vision=vision,
        qformer=qformer,
        num_query_tokens=blip.config.num_query_tokens,
        embed_dim=blip.config.image_text_hidden_size,
        image=image,
        max_text_length=min(preset.config.max_text_length, qformer["max_position_embeddings"]),
        itm_head=has_itm_head,
    ).replace(**overrides)
    return cls(config, load_tokenizer(folder), blip=blip)


def image_processor(image: ImageConfig) -> BlipImageProcessor:
    """BLIP-2's image processor for a resize-mode ``ImageConfig`` (what it can express)."""
    return BlipImageProcessor(
        size={"height": image.size, "width": image.size},
        image_mean=list(image.mean),
        image_std=list(image.std),
        resample={name: number for number, name in PIL_RESAMPLE.items()}[image.resample],
    )


def write_retrieval_folder(
    config: Blip2Config,
    state: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    images: BlipImageProcessor,
    folder: Path,
    source: str,
    named: Callable[[str], str] = str,
    extra: Mapping[str, str] | None = None,
) -> bool:
    """Write a new ``Blip2ForImageTextRetrieval`` folder laid out as the hub's; True when the
    ``itm_head`` came with ``state``, False when it had to be freshly initialised.

    Every other weight of the architecture must be in ``state``, in its shape, and nothing else
    may be: transformers' ``save_pretrained`` writes what ``from_pretrained`` reads back.
    ``named`` gives a key's name as the source spells it, for messages. The folder carries a
    ``Blip2Processor`` (``processor_config.json``, beside the hub's
    ``preprocessor_config.json``) with the model's ``num_query_tokens``, and the config the
    id of the processor's ``<image>`` token: ``processor(images=..., text=...)`` puts that many
    ``<image>`` ids before each text (without ``num_query_tokens`` it fails on ``max_length``),
    and ``Blip2ForImageTextRetrieval`` drops them again when ``image_token_index`` is set.
    ``extra`` files (name -> text, a model card) are written with the rest, before the folder
    is renamed into place.
    """
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"{folder} exists and is not an empty folder: pick a new --out")
    with no_init_weights():
        blip = Blip2ForImageTextRetrieval(config)
    expected = set(blip.state_dict())
    missing = [named(k) for k in sorted(expected - set(state) - set(ITM_HEAD))]
    if missing:
        raise DataError(f"{source} lacks {len(missing)} weight(s) BLIP-2 needs: {a_few(missing)}")
    unexpected = [named(k) for k in sorted(set(state) - expected)]
    if unexpected:
        raise DataError(f"{source}: no place in BLIP-2 for {a_few(unexpected)}")
    shapes = {k: tuple(v.shape) for k, v in blip.state_dict().items()}
    wrong = [
        f"{named(k)} {list(v.shape)} where {list(shapes[k])} fits"
        for k, v in sorted(state.items())
        if tuple(v.shape) != shapes[k]
    ]
    if wrong:
        raise DataError(
            f"{source}: {len(wrong)} weight(s) do not fit the architecture the others give "
            f"({config.qformer_config.hidden_size}-wide Q-Former, "
            f"{config.vision_config.hidden_size}-wide ViT): {a_few(wrong, 3)}. The file mixes "
            "weights of different models"
        )
    kept = all(k in state for k in ITM_HEAD)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    if not kept:
        generator = torch.Generator().manual_seed(0)
        std = config.qformer_config.initializer_range
        weight = torch.randn(blip.itm_head.weight.shape, generator=generator) * std
        state |= {"itm_head.weight": weight, "itm_head.bias": torch.zeros(2)}
    blip.load_state_dict(state, strict=True)
    # A copy: the processor adds <image> to the tokenizer it is given.
    processor = Blip2Processor(images, copy.deepcopy(tokenizer), config.num_query_tokens)
    blip.config.image_token_index = processor.tokenizer.convert_tokens_to_ids(
        str(processor.image_token)
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        blip.save_pretrained(tmp)
        processor.save_pretrained(tmp)  # tokenizer files, processor_config.json
        images.save_pretrained(tmp)  # preprocessor_config.json, as the hub has it
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if folder.exists():
            folder.rmdir()
        swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return kept

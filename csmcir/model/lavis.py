"""LAVIS / SPRC BLIP-2 state dicts into a ``Blip2ForImageTextRetrieval`` folder.

LAVIS's ``Blip2Qformer`` (stage 1, ``lavis/models/blip2_models/blip2_qformer.py``) and the
models built on it (SPRC's ``Blip2QformerCirAlignPrompt``) keep an EVA ViT
(``lavis/models/eva_vit.py``), ``ln_vision``, a BERT Q-Former (``Qformer.py``) and the projections
under their own names; :data:`RENAMES` maps them onto transformers'. Two entries are not renames:
the ViT's ``qkv.bias`` is built from ``q_bias``, zeros and ``v_bias`` (EVA has no key bias), and
``Qformer.bert.embeddings.LayerNorm`` is the Q-Former's ``layernorm`` (transformers applies it in
the Q-Former, after the text embeddings). Keys with no place in BLIP-2 (the Q-Former's LM head,
``temp``, SPRC's ``prompt_tokens``) are listed by name in the report and in the folder's
``lavis_conversion.json``, never dropped silently.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Blip2Config, PreTrainedTokenizerBase

from csmcir.errors import ConfigError, DataError
from csmcir.hub import TOKENIZER, VISION, local_copy_command, resolve
from csmcir.io import atomic_write_json, read_json, torch_load_failure
from csmcir.model.blip2 import a_few, image_processor, read_tensors, write_retrieval_folder
from csmcir.model.config import CLIP_MEAN, CLIP_STD, ImageConfig
from csmcir.model.registry import CONFIG_FILE
from csmcir.model.tokenizer import load_tokenizer

RECORD_FILE = "lavis_conversion.json"
# LAVIS name -> transformers name. "{i}" is a layer index; a name ending in "." is a prefix
# (the rest of the key is kept), any other name is matched whole. docs/model.md shows this table.
_VB, _HV = "visual_encoder.blocks.{i}.", "vision_model.encoder.layers.{i}."
_QL, _HQ = "Qformer.bert.encoder.layer.{i}.", "qformer.encoder.layer.{i}."
RENAMES: list[tuple[str, str]] = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    (_VB + "norm1.", _HV + "layer_norm1."),
    (_VB + "attn.qkv.weight", _HV + "self_attn.qkv.weight"),
    (_VB + "attn.proj.", _HV + "self_attn.projection."),
    (_VB + "norm2.", _HV + "layer_norm2."),
    (_VB + "mlp.", _HV + "mlp."),
    ("ln_vision.", "vision_model.post_layernorm."),
    ("query_tokens", "query_tokens"),
    ("Qformer.bert.embeddings.word_embeddings.", "embeddings.word_embeddings."),
    ("Qformer.bert.embeddings.position_embeddings.", "embeddings.position_embeddings."),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    (_QL + "attention.self.", _HQ + "attention.attention."),
    (_QL + "attention.output.", _HQ + "attention.output."),
    (_QL + "crossattention.self.", _HQ + "crossattention.attention."),
    (_QL + "crossattention.output.", _HQ + "crossattention.output."),
    (_QL + "intermediate.", _HQ + "intermediate."),
    (_QL + "output.", _HQ + "output."),
    (_QL + "intermediate_query.", _HQ + "intermediate_query."),
    (_QL + "output_query.", _HQ + "output_query."),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
    ("itm_head.", "itm_head."),
]


def _compile(name: str) -> re.Pattern[str]:
    pattern = re.escape(name).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(pattern + ("(?P<rest>.+)" if name.endswith(".") else ""))


_RENAMES = [(_compile(a), b) for a, b in RENAMES]
# EVA's attention biases: transformers' qkv.bias is [q_bias, zeros, v_bias].
QV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias")
# Buffers LAVIS saves that transformers recomputes (checked, not stored).
DERIVED = re.compile(r"Qformer\.bert\.embeddings\.position_ids")
# Keys under these are the networks themselves: one without a place is an error, not a list
# entry (a layer-scale gamma or relative position bias would change what the model computes).
NETWORK_PREFIXES = ("visual_encoder.blocks.", "Qformer.bert.")
# Head counts of the architectures LAVIS builds (shapes do not tell them).
KNOWN_HEADS = {"vision": {1408: 16}, "qformer": {768: 12}}
# What LAVIS builds them as: ViT-g (width 1408), BERT-base (768).
KNOWN_NAMES = {"vision": {1408: "EVA ViT-g"}, "qformer": {768: "BERT-base"}}
# LAVIS's EVA ViT uses LayerNorm eps 1e-6 and its ln_vision a plain nn.LayerNorm (eps 1e-5);
# its Q-Former is bert-base-uncased (eps 1e-12, dropout 0.1). ITM/ITC training and eval images:
# bicubic resize + CLIP normalisation.
VISION_EPS, LN_VISION_EPS, QFORMER_EPS, QFORMER_DROPOUT = 1e-6, 1e-5, 1e-12, 0.1
# LAVIS's CLIP ViT-L (clip_vit.py, the pretrain_vitL variants): OpenAI CLIP's module names.
CLIP_VIT_KEYS = ("conv1.weight", "transformer.resblocks.", "ln_pre.", "positional_embedding")
DEC_TOKEN = "[DEC]"
BERT_REPO = "google-bert/bert-base-uncased"  # the tokenizer LAVIS builds its Q-Former's from


@dataclass
class Conversion:
    """What ``convert_lavis`` did: the record a user reads (and ``lavis_conversion.json``)."""

    source: str
    wrapper: str | None
    vision_source: str
    converted: int = 0
    unmapped: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)
    itm_head: str = "kept"
    added_tokens: list[str] = field(default_factory=list)
    # Not in the shapes: each value and where it came from.
    assumed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self, folder: Path) -> str:
        lines = [
            f"converted {self.converted} tensors of {self.source}"
            + (f" (the {self.wrapper!r} entry)" if self.wrapper else "")
            + f" into {folder}",
            f"vision tower from: {self.vision_source}",
        ]
        if self.unmapped:
            lines.append(f"{len(self.unmapped)} key(s) with no place in BLIP-2, not converted:")
            lines += [f"  {k}" for k in self.unmapped]
        if self.derived:
            lines.append(f"recomputed by transformers, checked: {', '.join(self.derived)}")
        if self.itm_head == "fresh":
            lines.append(
                "itm_head: not in the checkpoint, freshly initialised (CSMCIR never uses it)"
            )
        if self.added_tokens:
            lines.append(f"tokenizer: added {', '.join(self.added_tokens)} as LAVIS does")
        lines.append("assumed, since the shapes cannot tell (also in lavis_conversion.json):")
        lines += [f"  {k} = {v['value']}: {v['from']}" for k, v in self.assumed.items()]
        return "\n".join(lines)


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a LAVIS/SPRC checkpoint file, and the wrapper key they were under.

    LAVIS saves ``{"model": state, "optimizer": ..., ...}``, SPRC ``{"epoch": n, CLASS_NAME:
    state}``, other code the bare state dict (maybe with DDP's ``module.`` prefix).
    """
    if not path.is_file():
        raise DataError(f"LAVIS checkpoint not found: {path}")
    try:
        try:  # mapped, not read whole: ViT-g checkpoints are gigabytes
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # pre-1.6 format
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise DataError(unreadable(path, e)) from None

    def is_state(obj: Any) -> bool:
        return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())

    if is_state(data):
        state, wrapper = data, None
    elif isinstance(data, dict) and is_state(data.get("model")):
        state, wrapper = data["model"], "model"
    else:
        inner = [k for k, v in data.items() if is_state(v)] if isinstance(data, dict) else []
        if len(inner) != 1:
            keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise DataError(
                f"{path}: no state dict found (expected the tensors themselves, a 'model' entry "
                f"as LAVIS saves, or one entry of tensors as SPRC saves); top level: {keys}"
            )
        state, wrapper = data[inner[0]], inner[0]
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state), wrapper


def unreadable(path: Path, error: Exception) -> str:
    """Why ``path`` is not a checkpoint csmcir reads, in our words (``io.torch_load_failure``):
    torch's own message advises ``weights_only=False``, which would let the file run code."""
    reason, pickled = torch_load_failure(error)
    if pickled:
        return (
            f"{path}: {reason}. csmcir reads checkpoints with torch.load(weights_only=True), "
            "which unpickles only tensors and plain containers, so that a file cannot run code. "
            "If you trust its source, re-save its state dict alone (a dict of tensors) and "
            "convert that"
        )
    if zipfile.is_zipfile(path):
        return f"{path} is a torch.save archive that cannot be read: {reason}"
    return (
        f"{path} is not a PyTorch checkpoint (neither torch.save's zip archive nor its legacy "
        "pickle format): a truncated download, or another kind of file. Fetch it again"
    )


def lavis_name(key: str) -> str:
    """The LAVIS name of a transformers BLIP-2 key (for messages); the key itself if none."""
    for lavis, ours in RENAMES:
        found = _compile(ours).fullmatch(key)
        if found:
            parts = found.groupdict()
            return lavis.replace("{i}", parts.get("i") or "") + (parts.get("rest") or "")
    if found := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", key):
        return f"visual_encoder.blocks.{found[1]}.attn.q_bias / v_bias"
    return key


def refuse_clip_vit(state: dict[str, torch.Tensor], source: Path | str) -> None:
    """LAVIS's ``pretrain_vitL`` models put OpenAI's CLIP ViT-L where EVA ViT-g goes: another
    network (no q/v-only biases, a pre-LayerNorm, fused attention weights) that transformers'
    BLIP-2 cannot hold."""
    clip = [
        k
        for k in state
        if k.startswith("visual_encoder.")
        and k.removeprefix("visual_encoder.").startswith(CLIP_VIT_KEYS)
    ]
    if clip:
        raise DataError(
            f"{source}: its visual_encoder is a CLIP ViT-L ({a_few(clip, 2)}), as in LAVIS's "
            "pretrain_vitL BLIP-2 variants. transformers' Blip2ForImageTextRetrieval holds only "
            "the EVA ViT-g of the other variants, so this checkpoint cannot be converted. Use an "
            "EVA ViT-g checkpoint (LAVIS's pretrain / coco stage-1 models, or the published "
            "Salesforce/blip2-itm-vit-g), or keep a ViT-L model in LAVIS"
        )


def rename(key: str) -> str | None:
    for pattern, target in _RENAMES:
        if found := pattern.fullmatch(key):
            parts = found.groupdict()
            return target.replace("{i}", parts.get("i") or "") + (parts.get("rest") or "")
    return None


def map_state_dict(lavis: dict[str, torch.Tensor], record: Conversion) -> dict[str, torch.Tensor]:
    """transformers' state dict of a LAVIS one; what has no place goes to ``record``."""
    refuse_clip_vit(lavis, record.source)
    state: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lavis.items():
        if match := QV_BIAS.fullmatch(key):
            biases.setdefault(match[1], {})[match[2]] = value
        elif DERIVED.fullmatch(key):
            if not torch.equal(value.flatten(), torch.arange(value.numel())):
                raise DataError(f"{key} is not 0, 1, 2, ...: this checkpoint's positions differ")
            record.derived.append(key)
        elif (name := rename(key)) is not None:
            state[name] = value
        else:
            record.unmapped.append(key)
    for layer, qv in biases.items():
        if set(qv) != {"q", "v"}:
            raise DataError(f"visual_encoder.blocks.{layer}.attn has a q_bias or a v_bias alone")
        bias = torch.cat([qv["q"], torch.zeros_like(qv["v"]), qv["v"]])
        state[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = bias
    inside = [k for k in record.unmapped if k.startswith(NETWORK_PREFIXES)]
    if inside:
        raise DataError(
            f"{len(inside)} weight(s) inside the ViT or the Q-Former have no place in "
            f"transformers' BLIP-2: {a_few(inside)}. This is not BLIP-2's EVA ViT-g + BERT "
            "Q-Former, so a conversion would compute something else"
        )
    record.converted = len(lavis) - len(record.unmapped) - len(record.derived)
    return state


def layer_indices(state: dict[str, torch.Tensor], prefix: str, part: str = "") -> list[int]:
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.{re.escape(part)}")
    return sorted({int(m[1]) for k in state if (m := pattern.match(k))})


def heads(kind: str, width: int, given: int | None, source: str, record: Conversion) -> int:
    """The head count of the ``kind`` network (not in the shapes), recorded with its origin."""
    known = KNOWN_HEADS[kind].get(width)
    flag = f"--{kind}-heads"
    if given is None and known is None:
        raise ConfigError(
            f"the {kind} width {width} is not one LAVIS ships "
            f"({', '.join(map(str, KNOWN_HEADS[kind]))}): give its attention heads with {flag} N"
        )
    if width % (given or known):
        raise ConfigError(f"{flag} {given}: does not divide the {kind} width {width}")
    if given is None:
        why = f"{KNOWN_NAMES[kind][width]}'s, as LAVIS builds width {width}"
    elif known is not None and given != known:
        why = (
            f"{source}; LAVIS's {KNOWN_NAMES[kind][width]} of width {width} has {known}. The "
            "shapes cannot tell, and a wrong count changes every embedding: check it against "
            "the code that trained the checkpoint"
        )
    else:
        why = source
    record.assumed[f"{kind}_heads"] = {"value": given or known, "from": why}
    return given or known


def infer_config(
    state: dict[str, torch.Tensor],
    vision_heads: tuple[int | None, str],
    qformer_heads: tuple[int | None, str],
    record: Conversion,
) -> Blip2Config:
    """The architecture of a converted state dict, read from its shapes; what the shapes cannot
    tell (head counts, epsilons, dropout) goes to ``record.assumed``. ``*_heads``: (the count
    given, else None; where it came from)."""

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise DataError(
                f"{record.source} has no {lavis_name(key)}, which every LAVIS BLIP-2 Q-Former "
                "model has: not a complete Blip2Qformer state dict (a partial save, or another "
                "model)"
            )
        return state[key]

    patch = need("vision_model.embeddings.patch_embedding.weight")
    positions = need("vision_model.embeddings.position_embedding").shape[1] - 1
    width = patch.shape[0]
    side = math.isqrt(positions)
    if side * side != positions:
        raise DataError(f"the ViT has {positions} patch positions, not a square grid")
    vision_layers = layer_indices(state, "vision_model.encoder.layers.")
    vision = {
        "hidden_size": width,
        "intermediate_size": need("vision_model.encoder.layers.0.mlp.fc1.weight").shape[0],
        "num_hidden_layers": len(vision_layers),
        "num_attention_heads": heads("vision", width, *vision_heads, record),
        "image_size": side * patch.shape[-1],
        "patch_size": patch.shape[-1],
        "layer_norm_eps": VISION_EPS,
        # read by CSMCIR (transformers' own BLIP-2 uses layer_norm_eps there too)
        "post_layernorm_eps": LN_VISION_EPS,
        "qkv_bias": True,
    }
    words = need("embeddings.word_embeddings.weight")
    layers = layer_indices(state, "qformer.encoder.layer.")
    cross = layer_indices(state, "qformer.encoder.layer.", "crossattention.")
    frequency = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if not cross or cross != list(range(0, len(layers), frequency)):
        raise DataError(f"Q-Former cross-attention in layers {cross}: not every n-th from 0")
    qformer = {
        "vocab_size": words.shape[0],
        "hidden_size": words.shape[1],
        "intermediate_size": need("qformer.encoder.layer.0.intermediate.dense.weight").shape[0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": heads("qformer", words.shape[1], *qformer_heads, record),
        "cross_attention_frequency": frequency,
        "max_position_embeddings": need("embeddings.position_embeddings.weight").shape[0],
        "layer_norm_eps": QFORMER_EPS,
        "hidden_dropout_prob": QFORMER_DROPOUT,
        "attention_probs_dropout_prob": QFORMER_DROPOUT,
        "use_qformer_text_input": True,
    }
    record.assumed |= {
        "vision_layer_norm_eps": {"value": VISION_EPS, "from": "LAVIS's EVA ViT (eva_vit.py)"},
        "ln_vision_eps": {
            "value": LN_VISION_EPS,
            "from": "LAVIS's ln_vision, a plain nn.LayerNorm (written as the vision config's "
            "post_layernorm_eps, which CSMCIR reads; transformers' own BLIP-2 applies "
            f"layer_norm_eps {VISION_EPS} there)",
        },
        "qformer_layer_norm_eps": {"value": QFORMER_EPS, "from": "bert-base-uncased's"},
        "qformer_dropout": {"value": QFORMER_DROPOUT, "from": "bert-base-uncased's"},
    }
    return Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        num_query_tokens=need("query_tokens").shape[1],
        image_text_hidden_size=need("text_projection.weight").shape[0],
    )


def vision_weights(
    source: Path, layers: int | None
) -> tuple[dict[str, torch.Tensor], int | None, list[str]]:
    """ViT weights under transformers' names from ``source``, its head count when the source
    says it, and the ViT keys of the source left out.

    ``source`` is a transformers BLIP-2 folder (any kind: only ``vision_model.*`` is read), a
    LAVIS/SPRC checkpoint that has ``visual_encoder.*``, or EVA's own ``eva_vit_g.pth`` (keys
    without the prefix; BLIP-2 keeps its first ``layers`` blocks).
    """
    if source.is_dir():
        config = read_json(source / CONFIG_FILE, "model config").get("vision_config") or {}
        return read_tensors(source, "vision_model."), config.get("num_attention_heads"), []
    state, _ = read_state_dict(source)
    bare = not any(k.startswith("visual_encoder.") for k in state)
    if bare:
        if not any(k.startswith("blocks.") for k in state):
            raise DataError(f"{source} holds no ViT weights (visual_encoder.* or blocks.*)")
        if layers is None:
            raise ConfigError(
                f"{source} is a bare EVA ViT: give --vision-layers N, the blocks BLIP-2 keeps "
                "(39 for EVA ViT-g: BLIP-2 drops its last layer)"
            )
        state = {f"visual_encoder.{k}": v for k, v in state.items()}
    block = re.compile(r"visual_encoder\.blocks\.(\d+)\.")

    def kept(key: str) -> bool:
        found = block.match(key)
        return key.startswith(("visual_encoder.", "ln_vision.")) and (
            layers is None or found is None or int(found[1]) < layers
        )

    record = Conversion(str(source), None, str(source))
    vision = map_state_dict({k: v for k, v in state.items() if kept(k)}, record)
    left = [k for k in state if not kept(k) and k.startswith("visual_encoder.")]
    return vision, None, [f"{source}: {k}" for k in left + record.unmapped]


def bert_tokenizer(folder: Path, rows: int, record: Conversion) -> PreTrainedTokenizerBase:
    """The Q-Former's tokenizer: bert-base-uncased plus ``[DEC]`` as LAVIS builds it, with
    exactly one token for every row of the word embeddings."""
    folder = resolve(folder, TOKENIZER, "--tokenizer")
    if not folder.is_dir():
        raise DataError(
            f"--tokenizer folder not found: {folder}. Give the hub name "
            "google-bert/bert-base-uncased (its tokenizer files are fetched into the hub cache; "
            "Salesforce/blip2-itm-vit-g, whose tokenizer already has [DEC], works too), or a "
            f"local copy:\n  {local_copy_command(BERT_REPO, TOKENIZER, folder)}"
        )
    tokenizer = load_tokenizer(folder)
    if DEC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
        record.added_tokens.append(DEC_TOKEN)
    covered = {i for i in tokenizer.get_vocab().values() if i < rows}
    if len(covered) != rows:
        raise ConfigError(
            f"the tokenizer in {folder} has {len(covered)} tokens for the Q-Former's {rows} word "
            "embeddings; LAVIS's is bert-base-uncased plus [DEC] (30,523): pass that folder"
        )
    return tokenizer


def convert_lavis(
    checkpoint: Path,
    tokenizer_folder: Path,
    out: Path,
    *,
    vision: Path | None = None,
    vision_layers: int | None = None,
    vision_heads: int | None = None,
    qformer_heads: int | None = None,
) -> Conversion:
    """Write ``out``: a ``Blip2ForImageTextRetrieval`` folder of a LAVIS/SPRC checkpoint."""
    if vision is not None:
        vision = resolve(vision, VISION, "--vision")
    lavis, wrapper = read_state_dict(checkpoint)
    vision_said = "--vision-heads"
    if not any(k.startswith("Qformer.bert.") for k in lavis):
        raise DataError(
            f"{checkpoint} has no LAVIS Q-Former (Qformer.bert.*): not a LAVIS/SPRC BLIP-2 "
            f"state dict; keys start {a_few(sorted(lavis), 3)}"
        )
    own_vision = any(k.startswith("visual_encoder.") for k in lavis)
    record = Conversion(str(checkpoint), wrapper, str(checkpoint) if own_vision else str(vision))
    state = map_state_dict(lavis, record)
    if own_vision and vision is not None:
        raise ConfigError(f"{checkpoint} has its own ViT weights: leave out --vision")
    if not own_vision:
        if vision is None:
            raise ConfigError(
                f"{checkpoint} has no ViT weights (LAVIS saves only trainable ones, and its "
                "ViT is frozen): give --vision with a BLIP-2 folder (Salesforce/blip2-itm-vit-g), "
                "LAVIS's eva_vit_g.pth (with --vision-layers 39) or a checkpoint that has them"
            )
        extra, source_heads, left = vision_weights(vision, vision_layers)
        state |= {k: v for k, v in extra.items() if k not in state}  # ln_vision: the checkpoint's
        record.unmapped += left
        if vision_heads is None and source_heads is not None:
            vision_heads, vision_said = source_heads, f"the config of --vision {vision}"
    config = infer_config(
        state, (vision_heads, vision_said), (qformer_heads, "--qformer-heads"), record
    )
    tokenizer = bert_tokenizer(tokenizer_folder, config.qformer_config.vocab_size, record)
    processor = image_processor(
        ImageConfig(
            size=config.vision_config.image_size, mode="resize", mean=CLIP_MEAN, std=CLIP_STD
        )
    )
    kept = write_retrieval_folder(
        config, state, tokenizer, processor, out, f"{checkpoint} (converted)", lavis_name
    )
    record.itm_head = "kept" if kept else "fresh"
    atomic_write_json(out / RECORD_FILE, record.__dict__)
    return record

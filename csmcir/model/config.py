"""The model's configuration: one JSON-serialisable dataclass, so a saved model is config + weights.

The BLIP-2 sub-configs are kept as plain dicts of ``Blip2VisionConfig`` / ``Blip2QFormerConfig``
keyword arguments: the JSON stays readable and transformers validates the values when the model
is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self

from csmcir.errors import ConfigError

TOWERS = ("shared", "separate")
TARGET_TEXTS = ("caption", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
RESIZE_MODES = ("resize", "target_pad")
# PIL's resampling filters by name; BLIP-2's image processor and LAVIS use bicubic.
RESAMPLES = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")

# CLIP's normalisation, which EVA ViT-g (BLIP-2's vision tower) was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageConfig:
    """How a PIL image becomes the ViT's input; part of the feature-cache key.

    ``mode="resize"`` squashes to ``size`` x ``size`` (BLIP-2's image processor, LAVIS);
    ``"target_pad"`` pads images whose aspect ratio exceeds ``pad_ratio`` (CLIP4Cir/SPRC),
    resizes the short side and centre-crops. ``resample`` is the PIL filter of either resize.
    """

    size: int = 224
    mode: str = "target_pad"
    pad_ratio: float = 1.25
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        _check_choice("image.mode", self.mode, RESIZE_MODES)
        _check_choice("image.resample", self.resample, RESAMPLES)
        if self.size < 1:
            raise ConfigError(f"model config: image.size must be positive, got {self.size}")
        if self.pad_ratio < 1:
            raise ConfigError(f"model config: image.pad_ratio must be >= 1, got {self.pad_ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("model config: image.mean and image.std need 3 values, std > 0")


class JSONConfig:
    """JSON round trip and checked overrides shared by the model config dataclasses.

    ``LABEL`` (model, baseline) names the config in error messages; dict-valued fields are
    merged key by key (deeply) by :meth:`replace`, so overriding one setting keeps its siblings.
    """

    LABEL = "model"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        data["image"]["mean"] = list(self.image.mean)  # type: ignore[attr-defined]
        data["image"]["std"] = list(self.image.std)  # type: ignore[attr-defined]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from JSON data; an unknown or missing key is a ConfigError naming it."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.LABEL} config: expected an object, got {type(data).__name__}")
        return _build(cls, data, "")

    def replace(self, **overrides: Any) -> Self:
        """A copy with fields changed; dict fields are merged key by key."""
        data = self.to_dict()
        for key, value in overrides.items():
            if key not in data:
                known = ", ".join(data)
                raise ConfigError(f"unknown {self.LABEL} option {key!r}; known: {known}")
            if isinstance(data[key], dict) and isinstance(value, dict):
                data[key] = _merge(data[key], value)
            else:
                data[key] = value
        return type(self).from_dict(data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class CSMCIRConfig(JSONConfig):
    """Everything needed to rebuild the encoder (architecture, switches, preprocessing).

    Attributes:
        preset: the preset it came from, for the record.
        vision: ``Blip2VisionConfig`` keyword arguments (the ViT).
        qformer: ``Blip2QFormerConfig`` keyword arguments; ``use_qformer_text_input`` is forced on
            because the fused pass feeds text through the Q-Former.
        num_query_tokens: learned query tokens of the Q-Former.
        embed_dim: size of the projected, L2-normalised embedding.
        tower: ``shared`` (one Q-Former for both sides) or ``separate`` (the target side has an
            independent copy: the ablation of the symmetric design).
        target_text: ``caption`` (target = image + its MCoT caption, the fused pass) or ``none``
            (target = image only, one embedding per query token, scored SPRC-style).
        freeze_vision: keep the ViT's weights fixed (the default for pretrained backbones; the
            feature cache is only valid then).
        precision: autocast dtype of the forward pass (``fp32`` = no autocast).
        gradient_checkpointing: trade compute for memory in the Q-Former (and a trainable ViT).
        max_text_length: texts are truncated to this many tokens, [CLS] and [SEP] included.
        image: preprocessing, see :class:`ImageConfig`.
        itm_head: the model carries its source checkpoint's image-text-matching head (frozen,
            never read by CSMCIR) so that ``csmcir export hf`` gives it back to transformers.
    """

    LABEL = "model"

    vision: dict[str, Any]
    qformer: dict[str, Any]
    num_query_tokens: int
    embed_dim: int
    preset: str = "custom"
    tower: str = "shared"
    target_text: str = "caption"
    freeze_vision: bool = True
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    max_text_length: int = 32
    image: ImageConfig = field(default_factory=ImageConfig)
    itm_head: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.image, dict):
            self.image = _build(ImageConfig, self.image, "image.")
        self.vision = dict(self.vision)
        self.qformer = {**self.qformer, "use_qformer_text_input": True}
        _check_choice("tower", self.tower, TOWERS)
        _check_choice("target_text", self.target_text, TARGET_TEXTS)
        _check_choice("precision", self.precision, PRECISIONS)
        for key in ("num_query_tokens", "embed_dim", "max_text_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model config: {key} must be a positive integer, got {value!r}")
        if self.max_text_length < 2:
            raise ConfigError("model config: max_text_length must leave room for [CLS] and [SEP]")
        max_positions = self.qformer.get("max_position_embeddings", 512)
        if self.max_text_length > max_positions:
            raise ConfigError(
                f"model config: max_text_length {self.max_text_length} exceeds the Q-Former's "
                f"max_position_embeddings {max_positions}"
            )


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"model config: {key} must be one of {', '.join(choices)}; got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"model config: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known: {', '.join(prefix + n for n in sorted(names))}"
        )
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise ConfigError(f"model config: missing key(s) {', '.join(prefix + k for k in missing)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"model config: {e}") from None

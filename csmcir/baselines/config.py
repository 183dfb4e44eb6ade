"""The CLIP4Cir baseline's configuration: one JSON-serialisable dataclass, like CSMCIRConfig.

``clip`` holds the open_clip model config (the keyword arguments of ``open_clip.CLIP``: an
``embed_dim``, a ``vision_cfg`` and a ``text_cfg``, as in open_clip's ``model_configs/*.json``),
so an exported folder rebuilds the exact architecture without the original checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from csmcir.errors import ConfigError
from csmcir.model.config import PRECISIONS, ImageConfig, JSONConfig, _build

MODEL_TYPE = "clip4cir"
TOKENIZERS = ("wordpiece", "open_clip")
# open_clip text towers whose tokenizer would come from the Hugging Face hub (not offline).
HUB_TEXT_KEYS = ("hf_model_name", "hf_tokenizer_name")


@dataclass
class CLIP4CirConfig(JSONConfig):
    """Everything needed to rebuild the baseline (CLIP architecture, combiner, preprocessing).

    Attributes:
        clip: open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, optional
            ``quick_gelu`` / ``custom_text``).
        projection_dim: width of the combiner's per-modality projections (CLIP4Cir: 4 x D).
        hidden_dim: width of the combiner's fusion and lambda layers (CLIP4Cir: 8 x D).
        dropout: dropout of every combiner layer (CLIP4Cir: 0.5).
        tokenizer: ``wordpiece`` (a vocabulary built from the training texts, for random
            models) or ``open_clip`` (CLIP's byte-level BPE, shipped inside open_clip).
        clip_model: the open_clip architecture name, for the record (``custom`` for presets).
        train_image_encoder: fine-tune CLIP's image tower (off: CLIP4Cir stage 2, frozen).
        train_text_encoder: fine-tune CLIP's text tower (CLIP4Cir stage 1 fine-tunes it).
        precision: autocast dtype of the forward pass (``fp32`` = no autocast).
        image: preprocessing, see :class:`~csmcir.model.config.ImageConfig`.
        preset: the preset it came from, for the record.
        model_type: always ``clip4cir``; tells saved configs apart from CSMCIR's.
    """

    LABEL = "baseline"

    clip: dict[str, Any]
    projection_dim: int
    hidden_dim: int
    dropout: float = 0.5
    tokenizer: str = "open_clip"
    clip_model: str = "custom"
    train_image_encoder: bool = False
    train_text_encoder: bool = False
    precision: str = "fp32"
    image: ImageConfig = field(default_factory=ImageConfig)
    preset: str = "custom"
    model_type: str = MODEL_TYPE

    # The evaluation and training code read these two switches of CSMCIRConfig: the
    # baseline's targets are images alone, and its query and target encoders differ.
    target_text = "none"
    tower = "separate"

    def __post_init__(self) -> None:
        if isinstance(self.image, dict):
            self.image = _build(ImageConfig, self.image, "image.")
        if self.model_type != MODEL_TYPE:
            raise ConfigError(f"baseline config: model_type must be {MODEL_TYPE!r}")
        if not isinstance(self.clip, dict):
            raise ConfigError("baseline config: clip must be an open_clip model config object")
        self.clip = copy.deepcopy(self.clip)
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in self.clip:
                raise ConfigError(f"baseline config: clip.{key} is missing")
        hub = [k for k in HUB_TEXT_KEYS if self.clip["text_cfg"].get(k)]
        if hub:
            raise ConfigError(
                f"baseline config: clip.text_cfg.{hub[0]} needs a Hugging Face tokenizer or text "
                "model from the hub; only open_clip's own text transformer and BPE tokenizer "
                "work offline"
            )
        if "multimodal_cfg" in self.clip:
            raise ConfigError("baseline config: CoCa models (clip.multimodal_cfg) are not CLIPs")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(
                f"baseline config: tokenizer must be one of {', '.join(TOKENIZERS)}; "
                f"got {self.tokenizer!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"baseline config: precision must be one of {', '.join(PRECISIONS)}; "
                f"got {self.precision!r}"
            )
        for key in ("projection_dim", "hidden_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"baseline config: {key} must be a positive integer, got {value!r}"
                )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"baseline config: dropout must lie in [0, 1), got {self.dropout}")

    @property
    def embed_dim(self) -> int:
        return int(self.clip["embed_dim"])

    @property
    def context_length(self) -> int:
        """Texts are padded and truncated to this many tokens (CLIP's positional table)."""
        return int(self.clip["text_cfg"].get("context_length", 77))

    @property
    def freeze_vision(self) -> bool:
        return not self.train_image_encoder

"""The CSMCIR encoder: one BLIP-2 Q-Former for queries and targets (see docs/model.md)."""

from csmcir.model.config import CSMCIRConfig, ImageConfig
from csmcir.model.encoder import CSMCIR
from csmcir.model.registry import list_presets, load_preset
from csmcir.model.tokenizer import build_wordpiece_tokenizer

__all__ = [
    "CSMCIR",
    "CSMCIRConfig",
    "ImageConfig",
    "build_wordpiece_tokenizer",
    "list_presets",
    "load_preset",
]

"""Baselines the CSMCIR ablation table compares against (see docs/baselines.md)."""

from csmcir.baselines.clip4cir import CLIP4Cir
from csmcir.baselines.combiner import Combiner
from csmcir.baselines.config import CLIP4CirConfig

__all__ = ["CLIP4Cir", "CLIP4CirConfig", "Combiner"]

"""``csmcir ablate``: the ablation grid runner (config, runs, table); see docs/ablation.md."""

from csmcir.ablation.cli import main

__all__ = ["main"]

"""Named presets, kept as JSON files in ``csmcir/presets/`` (open_clip style)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csmcir.errors import ConfigError
from csmcir.io import read_json
from csmcir.model.config import CSMCIRConfig

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


@dataclass(frozen=True)
class Preset:
    """A preset: its model config, where its tokenizer comes from, and (if any) its weights.

    ``tokenizer`` is ``"wordpiece"`` (built from a corpus) or ``"weights"`` (read from the
    weights folder). ``weights`` describes a download: ``repo``, ``variants``, ``default_dir``
    and ``env`` (the environment variable that overrides the default folder). ``model_type``
    is ``"csmcir"``, or ``"clip4cir"`` for a baseline preset (``csmcir/baselines/presets``),
    whose ``config`` is a ``CLIP4CirConfig``.
    """

    name: str
    description: str
    config: CSMCIRConfig
    tokenizer: str
    weights: dict[str, Any] | None = None
    model_type: str = "csmcir"

    def weights_dir(self, given: str | Path | None = None) -> Path:
        """The folder the weights are read from: the argument, else $env, else the default."""
        if self.weights is None:
            raise ConfigError(f"preset {self.name!r} is random-initialised and has no weights")
        if given is not None:
            return Path(given)
        return Path(os.environ.get(self.weights["env"]) or self.weights["default_dir"])


def list_presets() -> list[str]:
    from csmcir.baselines.loading import list_baseline_presets

    return sorted([p.stem for p in PRESET_DIR.glob("*.json")] + list_baseline_presets())


def load_preset(name: str) -> Preset:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        from csmcir.baselines.loading import list_baseline_presets, load_baseline_preset

        if name in list_baseline_presets():
            return load_baseline_preset(name)
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(list_presets())}")
    data = read_json(path, "preset file")
    return Preset(
        name=name,
        description=data["description"],
        config=CSMCIRConfig.from_dict(data["config"]),
        tokenizer=data["tokenizer"],
        weights=data.get("weights"),
    )

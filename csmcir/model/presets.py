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
    and ``env`` (the environment variable that overrides the default folder).
    """

    name: str
    description: str
    config: CSMCIRConfig
    tokenizer: str
    weights: dict[str, Any] | None = None

    def weights_dir(self, given: str | Path | None = None) -> Path:
        """The folder the weights are read from: the argument, else $env, else the default."""
        if self.weights is None:
            raise ConfigError(f"preset {self.name!r} is random-initialised and has no weights")
        if given is not None:
            return Path(given)
        return Path(os.environ.get(self.weights["env"]) or self.weights["default_dir"])


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> Preset:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(list_presets())}")
    data = read_json(path, "preset file")
    return Preset(
        name=name,
        description=data["description"],
        config=CSMCIRConfig.from_dict(data["config"]),
        tokenizer=data["tokenizer"],
        weights=data.get("weights"),
    )

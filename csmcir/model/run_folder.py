"""What a ``csmcir fit`` run folder holds (``trainer.default_root_dir``), without Lightning.

- ``model/``: the exported inference folder of the final weights; ``best/``: of the best
  validation checkpoint;
- ``last.ckpt``, ``best.ckpt``: Lightning checkpoints for resuming;
- ``logs/version_N/``: one folder of logs per run started there.

The commands that load a model accept a run folder for its ``model/`` (:func:`model_folder`),
and ``csmcir fit`` refuses to start over a folder that holds an earlier run (:func:`earlier_run`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from csmcir.errors import warn

FINAL_MODEL = "model"
BEST_MODEL = "best"
LAST_CKPT = "last.ckpt"
BEST_CKPT = "best.ckpt"
LOGS = "logs"
RUN_OUTPUTS = (FINAL_MODEL, BEST_MODEL, LAST_CKPT, BEST_CKPT)
MODEL_CONFIG = "config.json"  # what every exported model folder (and a BLIP-2 download) holds


def earlier_run(root: str | Path) -> list[Path]:
    """The checkpoints and exported models of an earlier run in ``root`` (none: a fresh folder)."""
    return [Path(root) / name for name in RUN_OUTPUTS if (Path(root) / name).exists()]


def remove_outputs(paths: list[Path]) -> None:
    """Delete an earlier run's checkpoints and exported models (its logs stay)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def model_folder(path: str | Path, flag: str = "--model") -> Path:
    """``path`` itself when it is a model folder; a run folder's ``model/``, said on stderr.

    The quickstart and ``csmcir fit`` write the run folder (``checkpoints/synthcir-tiny``), so
    that is the name users type; the weights are in its ``model/``.
    """
    path = Path(path)
    if (path / MODEL_CONFIG).is_file() or not (path / FINAL_MODEL / MODEL_CONFIG).is_file():
        return path
    warn(
        f"{flag} {path} is a training run folder: using its exported final model "
        f"{path / FINAL_MODEL} ({path / BEST_MODEL} holds the best validation checkpoint's)"
    )
    return path / FINAL_MODEL

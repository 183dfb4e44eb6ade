"""From training state to the inference folder that evaluation, search and the demo load.

A Lightning checkpoint stores the model's config and tokenizer files beside the weights
(:func:`checkpoint_entry`), so :func:`model_from_checkpoint` rebuilds the exact model from the
``.ckpt`` alone, with ``torch.load(weights_only=True)``. :class:`ExportModel` writes
``<run>/model`` (the final weights) and ``<run>/best`` (the best validation checkpoint) when fit
ends; ``CSMCIR.save_pretrained`` swaps each folder in atomically, and ``training.json`` records
where the weights came from.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from csmcir.errors import DataError
from csmcir.io import atomic_write_json, torch_load_failure
from csmcir.model.run_folder import BEST_MODEL, FINAL_MODEL

CHECKPOINT_KEY = "csmcir"
RECORD_FILE = "training.json"


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer's saved files as text, to store inside a checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(folder).iterdir())}


def checkpoint_entry(model) -> dict[str, Any]:
    return {
        "model_config": model.config.to_dict(),
        "tokenizer_files": tokenizer_files(model.tokenizer),
    }


def model_from_entry(entry: dict[str, Any]):
    """A random-weight model with a checkpoint's config and tokenizer (its weights load next).

    The config says which model it is (CSMCIR or the CLIP4Cir baseline).
    """
    from csmcir.model.registry import from_config

    with tempfile.TemporaryDirectory() as folder:
        for name, text in entry["tokenizer_files"].items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        return from_config(entry["model_config"], folder)


def unreadable_checkpoint(path: str | Path, error: BaseException) -> DataError:
    """The one message for a checkpoint torch cannot read: the file, the reason, the way out."""
    reason, pickled = torch_load_failure(error)
    if pickled:
        return DataError(
            f"checkpoint {path} is refused: {reason}. Checkpoints are read with "
            "torch.load(weights_only=True), which loads tensors and plain values only, so that "
            "a file cannot run code; csmcir fit writes nothing else, so this file was made by "
            "other code. Resume from a checkpoint csmcir fit wrote (last.ckpt, best.ckpt)"
        )
    return DataError(
        f"checkpoint {path} is unreadable ({reason}): it is cut short or corrupt (a full disk, an "
        "interrupted copy). Resume from another checkpoint of the run (last.ckpt, best.ckpt), or "
        "delete this one and start again"
    )


def read_checkpoint(path: str | Path, weights_only: bool | None = True) -> dict[str, Any]:
    """``torch.load`` of a Lightning checkpoint on the CPU; a bad file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise unreadable_checkpoint(path, e) from None


class NamedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader, with an unreadable ``--ckpt_path`` named in the error."""

    def load_checkpoint(self, path, *args, **kwargs) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise DataError(f"--ckpt_path: checkpoint not found: {path}") from None
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise unreadable_checkpoint(path, e) from None


def model_from_checkpoint(path: str | Path):
    """The trained model of a ``csmcir fit`` checkpoint, in eval mode on the CPU."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    entry = checkpoint.get(CHECKPOINT_KEY)
    if entry is None:
        raise DataError(f"{path} was not written by csmcir fit: it holds no model config")
    model = model_from_entry(entry)
    prefix = "model."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    model.load_state_dict(state)
    return model.eval()


def export_model(model, folder: str | Path, record: dict[str, Any]) -> Path:
    """Write the inference folder, then ``training.json`` (step, metrics, source) into it."""
    folder = model.save_pretrained(folder)
    atomic_write_json(Path(folder) / RECORD_FILE, record)
    return Path(folder)


class ExportModel(L.Callback):
    """At the end of fit, export ``<dirpath>/model`` (final) and ``<dirpath>/best`` (best val)."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        # drop_missing: what training never saw, and which queries validation left out
        dropped = trainer.datamodule.dropped()
        record = {
            "source": "end of fit",
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "val": metrics,
            "hyperparameters": dict(pl_module.hparams),
            "dropped": dropped,
        }
        export_model(pl_module.model, self.dirpath / FINAL_MODEL, record)
        for callback in trainer.checkpoint_callbacks:
            if (
                isinstance(callback, ModelCheckpoint)
                and callback.monitor
                and callback.best_model_path
            ):
                best = callback.best_model_path
                score = callback.best_model_score
                export_model(
                    model_from_checkpoint(best),
                    self.dirpath / BEST_MODEL,
                    {
                        "source": str(best),
                        "monitor": callback.monitor,
                        "score": None if score is None else float(score),
                        "hyperparameters": dict(pl_module.hparams),
                        "dropped": dropped,
                    },
                )

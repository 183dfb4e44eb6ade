"""The bank inside real training: Lightning fit of the tiny preset on a tiny synthetic benchmark
writes and reads the bank, logs its signals, and the .ckpt carries the bank to a resumed run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from csmcir.data.synth import generate
from csmcir.data.synth_build import SynthConfig
from csmcir.errors import ConfigError
from csmcir.io import atomic_write_json, read_json
from csmcir.model import CSMCIR
from csmcir.train.datamodule import CIRDataModule
from csmcir.train.memory_bank import MemoryBank, MemoryBankConfig
from csmcir.train.module import CSMCIRModule

BATCH, STEPS = 4, 5
BANK = {
    "enabled": True,
    "size": 12,
    "top_k": 4,
    "window": "fixed",
    "max_age": 3,
    "probe_every": 2,
    "probe_size": 3,
    "open_entropy": None,  # five steps of a random model never reach the default gate
}


@pytest.fixture(scope="module")
def synthcir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny synthetic benchmark and captions that list each image's objects."""
    root = tmp_path_factory.mktemp("synthcir")
    generate(root, SynthConfig(train_refs=12, val_refs=2, test_refs=2, image_size=32))
    scenes = read_json(root / "scenes.json")["images"]
    captions = {
        name: {"Final_Caption": ", ".join(f"{o['color']} {o['shape']}" for o in s["objects"])}
        for name, s in scenes.items()
    }
    return root, atomic_write_json(root / "captions.json", captions)


def fit(data: tuple[Path, Path], out: Path, steps: int, ckpt: Path | None = None) -> CSMCIRModule:
    root, captions = data
    L.seed_everything(0)
    module = CSMCIRModule(preset="tiny", warmup_steps=1, bank=MemoryBankConfig(**BANK))
    datamodule = CIRDataModule(
        "synthcir", str(root), str(captions), batch_size=BATCH, val_batch_size=16
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule, ckpt_path=ckpt, weights_only=True)
    module.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    module.trainer_ = trainer
    return module


@pytest.mark.slow
def test_fit_uses_the_bank_and_the_checkpoint_restores_it(synthcir, tmp_path: Path) -> None:
    module = fit(synthcir, tmp_path, STEPS)
    bank = module.memory_bank
    # steps 0..4 each wrote 4 targets into 12 slots: the last three batches (steps 2, 3, 4) remain
    assert sorted(bank.written.tolist()) == [2] * 4 + [3] * 4 + [4] * 4
    assert int(bank.cursor) == (STEPS * BATCH) % BANK["size"]
    assert 0.0 < module.metrics["bank/share"] < 1.0
    assert module.metrics["bank/live"] == 12.0  # read at step 4: steps 1, 2, 3 (ages 3, 2, 1)
    assert module.metrics["bank/window"] == 3.0
    assert "bank/drift" in module.metrics and "bank/target_cos" in module.metrics

    ckpt = tmp_path / "bank.ckpt"
    module.trainer_.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(state["memory_bank.embeddings"], bank.embeddings)

    resumed = fit(synthcir, tmp_path, STEPS, ckpt=ckpt)  # max_steps already reached: restore only
    for name in ("embeddings", "ids", "written", "cursor", "entropy_ema"):
        assert torch.equal(getattr(resumed.memory_bank, name), getattr(bank, name)), name


def test_no_bank_unless_enabled() -> None:
    assert CSMCIRModule(preset="tiny").memory_bank is None
    assert CSMCIRModule(preset="tiny", bank=MemoryBankConfig()).memory_bank is None


def test_bank_with_token_level_targets_is_refused() -> None:
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=["a red circle"], target_text="none")
    with pytest.raises(ConfigError, match="target_text"):
        MemoryBank.for_model(MemoryBankConfig(enabled=True), model)

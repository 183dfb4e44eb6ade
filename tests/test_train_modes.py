"""Every training step runs in the same module modes: trainable modules in train mode (dropout
on), a frozen ViT in eval mode, with or without the memory bank, straight or resumed.

The model starts from a BLIP-2 folder with the hub checkpoint's dropout 0.1: transformers'
``from_pretrained`` hands its modules over in eval mode and Lightning 2.6 does not call
``train()``, while the bank's drift probe switches modes mid-step.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from blip2_folder import make_blip2_folder
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from csmcir.train.datamodule import CIRDataModule
from csmcir.train.memory_bank import MemoryBankConfig
from csmcir.train.module import CSMCIRModule

BATCH = 8
# probe every step, open from the first one: the probe runs inside every training step
BANK = MemoryBankConfig(enabled=True, size=64, probe_every=1, probe_size=4, open_entropy=None)


class ModeRecorder(L.Callback):
    """The names of the model's modules in train mode, as each training step begins."""

    def __init__(self) -> None:
        self.steps: dict[int, frozenset[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        modules = pl_module.model.named_modules()
        self.steps[trainer.global_step] = frozenset(n for n, m in modules if m.training)


@pytest.fixture(scope="module")
def blip2(tmp_path_factory) -> Path:
    return make_blip2_folder(tmp_path_factory.mktemp("blip2") / "blip2-itm")[0]


def fit(blip2, synthcir, captions, bank, max_steps, ckpt_dir=None, resume=None):
    L.seed_everything(0)
    module = CSMCIRModule(init_from=blip2, warmup_steps=1, bank=bank)
    data = CIRDataModule("synthcir", synthcir, captions, batch_size=BATCH, cache_images=True)
    recorder = ModeRecorder()
    callbacks = [recorder]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(ckpt_dir, every_n_train_steps=2, save_top_k=-1))
    trainer = L.Trainer(
        max_steps=max_steps,
        val_check_interval=2,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, data, ckpt_path=resume)
    return module, recorder.steps


def test_modes_are_right_and_the_same_with_the_bank_and_after_resume(
    blip2, synthcir, captions, tmp_path, one_thread
):
    plain, modes = fit(blip2, synthcir, captions, None, 4)
    model = plain.model
    dropouts = {n for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
    qformer_dropouts = {n for n in dropouts if n.startswith("tower.")}
    assert qformer_dropouts and all(model.get_submodule(n).p == 0.1 for n in qformer_dropouts)
    vision = {n for n, _ in model.named_modules() if n.startswith("vision_model")}
    assert model.config.freeze_vision and sorted(modes) == [0, 1, 2, 3]
    for step, training in modes.items():
        assert qformer_dropouts <= training, step  # dropout on in the trainable Q-Former
        assert not vision & training, step  # the frozen ViT in eval mode
        everything_else = {n for n, _ in model.named_modules()} - vision
        assert training == everything_else, step

    _, with_bank = fit(blip2, synthcir, captions, BANK, 4, ckpt_dir=tmp_path / "ckpt")
    assert with_bank == modes
    _, resumed = fit(
        blip2, synthcir, captions, BANK, 4, resume=tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    )
    assert sorted(resumed) == [2, 3]
    assert all(resumed[s] == modes[s] for s in resumed)

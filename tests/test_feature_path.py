"""The feature path from the cache to the model: float16 batches read at once, in workers or not,
equal to what the path before it (per-image float32 rows, stacked) gave, in training losses and
in evaluation scores; and the optimiser and precision settings of the cached step."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from csmcir.data.batches import BatchBuffers
from csmcir.data.prefetch import Ahead
from csmcir.errors import ConfigError
from csmcir.evaluation.runner import score_split
from csmcir.model import CSMCIR
from csmcir.model.features import CachedFeatures, FeatureCache, _runs, extract_features
from csmcir.train.datamodule import CIRDataModule
from csmcir.train.module import CSMCIRModule, adamw

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def frozen(synthcir: Path, captions: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny frozen-ViT model folder and its feature cache of every train and val image,
    extracted in shards of 16 so that batches span shards."""
    data = CIRDataModule("synthcir", synthcir, captions)
    data.setup("fit")
    model = CSMCIR.from_preset(
        "tiny", tokenizer_corpus=data.text_corpus(), seed=0, freeze_vision=True
    )
    tmp = tmp_path_factory.mktemp("frozen")
    folder = model.save_pretrained(tmp / "model")
    paths = {}
    for split in [*data.splits.train, *(s for _, s in data.splits.val)]:
        paths.update({i: split.image_path(i) for i in split.referenced_images()})
    extract_features(model, paths, tmp / "features", shard_size=16, progress=False)
    return folder, tmp / "features"


def old_rows(cache_dir: Path, ids: list[str]) -> torch.Tensor:
    """What the path before issue 17 fed the model: each image's row, read from its shard file
    on its own and widened to float32 on the host, stacked. Read here from the files."""
    index = json.loads((cache_dir / "index.json").read_text())
    rows = []
    for image_id in ids:
        shard, row = index["ids"][image_id]
        array = np.load(cache_dir / "shards" / index["shards"][shard])
        rows.append(torch.from_numpy(array[row].astype(np.float32)))
    return torch.stack(rows)


def old_batch(self: CachedFeatures, image_ids: list[str]) -> torch.Tensor:
    """``CachedFeatures`` before issue 17: one read and one float32 widening per image."""
    return torch.stack([self.cache.get([i])[0].float() for i in image_ids])


def test_runs_cover_every_row_once_in_file_order() -> None:
    rows = [(0, 5), (0, 6), (0, 7), (1, 0), (0, 2), (0, 3), (1, 4), (1, 4)]
    assert _runs(rows) == [(0, 2, 4, 2), (0, 5, 0, 3), (1, 0, 3, 1), (1, 4, 6, 1), (1, 4, 7, 1)]
    assert _runs([]) == []


def test_batch_buffers_are_reused_only_when_nothing_holds_them() -> None:
    pool = BatchBuffers(keep=2)
    first = pool.take((2, 3), torch.float16)
    address = first.data_ptr()
    second = pool.take((2, 3), torch.float16)
    assert second.data_ptr() != address  # the first is still held
    del first
    again = pool.take((2, 3), torch.float16)
    assert again.data_ptr() == address  # released: the same memory again
    view = again[1:]  # a view of it holds it as well
    del again
    assert pool.take((2, 3), torch.float16).data_ptr() != address
    array = view.numpy()  # and so does an array
    del view
    assert pool.take((2, 3), torch.float16).data_ptr() != address
    del array
    assert pool.take((2, 3), torch.float16).data_ptr() == address
    assert pool.take((4, 3), torch.float16).shape == (4, 3)
    held = [pool.take((2, 3), torch.float16) for _ in range(4)]  # beyond keep: fresh ones
    assert len({t.data_ptr() for t in held}) == 4 and len(pool.pool[(2, 3), torch.float16]) == 2
    assert pickle.loads(pickle.dumps(pool)).pool == {}  # a spawned worker gets no buffers


def test_batches_are_float16_rows_equal_to_the_old_paths(synthcir, captions, frozen) -> None:
    folder, cache_dir = frozen
    model = CSMCIR.from_pretrained(folder)
    data = CIRDataModule(
        "synthcir", synthcir, captions, batch_size=8, features=cache_dir, num_workers=4
    )
    data.setup("fit")
    data.attach(model)
    loader = data.train_dataloader()
    # a feature cache is read in the training process, a thread ahead, whatever num_workers says
    assert loader.num_workers == 0 and isinstance(iter(loader), Ahead)
    dataset = loader.dataset
    worker = DataLoader(
        dataset, batch_size=8, sampler=loader.sampler, drop_last=True,
        collate_fn=dataset.collate, num_workers=1,
    )  # fmt: skip
    ids = {key: image_id for image_id, key in dataset.image_keys.items()}
    batches = list(loader)
    assert len(batches) == 8
    for batch, from_worker in zip(batches, worker, strict=True):
        for field, keys in (("reference_image", "reference_key"), ("target_image", "target_key")):
            features = batch[field]
            assert features.dtype == torch.float16 and features.shape == (8, 65, 64)
            old = old_rows(cache_dir, [ids[k] for k in batch[keys].tolist()])
            assert torch.equal(features.float(), old)
            # a worker's batch (made in shared memory: evaluation's workers) is the same batch
            assert from_worker[field].is_shared() and torch.equal(from_worker[field], features)
        assert from_worker["text"] == batch["text"]
    cache = FeatureCache.open(cache_dir, model)
    some = cache.ids()[10:40]  # a sequential read across two shard boundaries
    assert torch.equal(cache.get(some).float(), old_rows(cache_dir, some))
    reopened = pickle.loads(pickle.dumps(cache))  # how spawned workers receive it
    assert reopened._arrays == {} and torch.equal(reopened.get(some), cache.get(some))
    with pytest.raises(ValueError, match="float16 tensor of shape"):
        cache.get(some, out=torch.empty(len(some), 65, 64))


def fit(
    synthcir: Path, captions: Path, frozen: tuple[Path, Path], run_dir: Path
) -> tuple[list[float], dict[str, float]]:
    """Four steps of batch 8 from the feature cache, then a validation: losses and scores."""
    folder, cache_dir = frozen

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.values.append(outputs["loss"].item())

    L.seed_everything(0)
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=4, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[losses], default_root_dir=run_dir,
    )  # fmt: skip
    module = CSMCIRModule(init_from=folder, warmup_steps=1)
    data = CIRDataModule("synthcir", synthcir, captions, batch_size=8, features=cache_dir)
    trainer.fit(module, data)
    scores = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return list(losses.values), scores


def test_training_and_validation_give_the_old_paths_results(
    synthcir, captions, frozen, tmp_path, monkeypatch
) -> None:
    new_losses, new_scores = fit(synthcir, captions, frozen, tmp_path / "new")
    monkeypatch.setattr(CachedFeatures, "batch", old_batch)
    old_losses, old_scores = fit(synthcir, captions, frozen, tmp_path / "old")
    assert len(new_losses) == 4 and new_scores["val/score"] > 0
    # widening float16 to float32 is exact: on the device or on the host, the same numbers
    assert new_losses == old_losses
    assert new_scores == old_scores


def test_evaluation_gives_the_old_paths_scores(synthcir, captions, frozen, monkeypatch) -> None:
    from csmcir.data.captions import load_captions
    from csmcir.data.registry import load_split

    folder, cache_dir = frozen
    model = CSMCIR.from_pretrained(folder)
    split = load_split("synthcir", synthcir, "val")
    texts = load_captions(captions)
    cache = FeatureCache.open(cache_dir, model)

    def scores(**options) -> torch.Tensor:
        return score_split(model, split, texts, cache_dir=None, features=cache, **options).scores

    new, from_workers = scores(), scores(num_workers=1)
    monkeypatch.setattr(CachedFeatures, "batch", old_batch)
    assert torch.equal(new, scores())
    assert torch.equal(new, from_workers)


def test_adamw_is_fused_where_torch_has_the_kernel_and_agrees_with_the_loop() -> None:
    torch.manual_seed(0)
    start = [torch.randn(300, 200), torch.randn(200), torch.randn(())]
    grads = [[torch.randn_like(p) for p in start] for _ in range(10)]
    results = {}
    for kind in ("fused", "foreach", "loop"):
        params = [p.clone().requires_grad_() for p in start]
        groups = [
            {"params": params[:1], "weight_decay": 0.05},
            {"params": params[1:], "weight_decay": 0.0},
        ]
        options = {"lr": 1e-2, "betas": (0.9, 0.98)}
        if kind == "loop":
            optimizer = torch.optim.AdamW(groups, foreach=False, **options)
        else:
            optimizer = adamw(groups, fused=kind == "fused", **options)
            assert bool(optimizer.defaults["fused"]) is (kind == "fused")
            assert bool(optimizer.defaults["foreach"]) is (kind == "foreach")
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results[kind] = params
    assert all(not torch.equal(p, s) for p, s in zip(results["loop"], start, strict=True))
    for kind in ("fused", "foreach"):
        for ours, loop in zip(results[kind], results["loop"], strict=True):
            torch.testing.assert_close(ours, loop, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("precision", "options", "message"),
    [
        ("bf16-true", {}, "casts the weights"),
        ("32-true", {"precision": "fp16"}, "without loss scaling"),
    ],
)
def test_precisions_that_would_train_wrong_are_refused(
    synthcir, captions, frozen, precision, options, message
) -> None:
    folder, cache_dir = frozen
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, precision=precision, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    module = CSMCIRModule(init_from=folder, model_options=options)
    data = CIRDataModule("synthcir", synthcir, captions, batch_size=8, features=cache_dir)
    with pytest.raises(ConfigError, match=message):
        trainer.fit(module, data)

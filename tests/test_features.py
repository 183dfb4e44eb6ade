"""The frozen-ViT feature cache: same embeddings as the ViT, stale caches refused, resumable."""

from __future__ import annotations

import copy
import fcntl
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from csmcir import cli
from csmcir.data.images import load_image
from csmcir.data.registry import load_split
from csmcir.data.synth import generate
from csmcir.data.synth_build import SynthConfig
from csmcir.errors import DataError
from csmcir.model import CSMCIR
from csmcir.model import features as features_module
from csmcir.model.features import FeatureCache, extract_features


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthcir")
    generate(root, SynthConfig(train_refs=4, val_refs=3, test_refs=3))
    return root


@pytest.fixture(scope="module")
def val_split(synth_root: Path):
    return load_split("synthcir", synth_root, "val")


@pytest.fixture(scope="module")
def model(val_split) -> CSMCIR:
    texts = [q.texts[0] for q in val_split.queries]
    return CSMCIR.from_preset("tiny", tokenizer_corpus=texts, seed=0, freeze_vision=True).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model: CSMCIR) -> Path:
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


def paths_of(split) -> dict[str, Path]:
    return {i: split.image_path(i) for i in split.referenced_images()}


def test_cached_features_give_the_embeddings_of_the_vit(tmp_path, model, val_split) -> None:
    paths = paths_of(val_split)
    cache = extract_features(model, paths, tmp_path / "cache", batch_size=4, progress=False)
    assert len(cache) == len(paths) and cache.feature_shape == (65, 64)
    queries = val_split.queries[:4]
    ids = [q.reference for q in queries]
    texts = [q.texts[0] for q in queries]
    pixels = model.preprocess([load_image(paths[i]) for i in ids])
    with torch.no_grad():
        direct = model.vision_features(pixels)
        cached = FeatureCache.open(tmp_path / "cache", model).get(ids)
        # stored as fp16, read as fp16: exactly the ViT output rounded to half precision
        assert cached.dtype == torch.float16 and torch.equal(cached, direct.half())
        from_cache = model.encode_query(texts, vision_features=cached)
        from_images = model.encode_query(texts, pixels)
        # the model widens them itself: as if given the float32 of the rounded features
        widened = direct.half().float()
        assert torch.equal(from_cache, model.encode_query(texts, vision_features=widened))
    torch.testing.assert_close(from_cache, from_images, atol=2e-3, rtol=0)


def test_stale_cache_is_refused(tmp_path, model, val_split) -> None:
    paths = dict(list(paths_of(val_split).items())[:3])
    extract_features(model, paths, tmp_path / "cache", progress=False)
    other = CSMCIR.from_preset("tiny", tokenizer=model.tokenizer, seed=1, freeze_vision=True).eval()
    with pytest.raises(DataError, match="is stale"):
        FeatureCache.open(tmp_path / "cache", other)
    with pytest.raises(DataError, match="is stale"):
        extract_features(other, paths, tmp_path / "cache", progress=False)
    resized = CSMCIR.from_preset(
        "tiny", tokenizer=model.tokenizer, seed=0, freeze_vision=True, image={"mode": "target_pad"}
    )
    with pytest.raises(DataError, match="is stale"):
        FeatureCache.open(tmp_path / "cache", resized)
    # training the Q-Former does not touch the ViT: the cache stays valid
    trained = CSMCIR.from_preset("tiny", tokenizer=model.tokenizer, seed=0, freeze_vision=True)
    with torch.no_grad():
        trained.tower.text_projection.weight.add_(1.0)
    assert len(FeatureCache.open(tmp_path / "cache", trained)) == 3


def test_a_cache_is_not_extended_at_another_precision(tmp_path, model, val_split) -> None:
    """Rows of two precisions in one cache would be a silent mix: refused, naming the flag."""
    paths = paths_of(val_split)
    first = dict(list(paths.items())[:3])
    extract_features(model, first, tmp_path / "cache", progress=False)  # the model's fp32
    bf16 = copy.copy(model)
    bf16.config = model.config.replace(precision="bf16")
    assert len(extract_features(bf16, first, tmp_path / "cache", progress=False)) == 3  # no rows
    with pytest.raises(DataError, match=r"extracted at precision fp32.*--precision fp32"):
        extract_features(bf16, paths, tmp_path / "cache", progress=False)
    assert len(FeatureCache.open(tmp_path / "cache", model)) == 3
    assert len(extract_features(model, paths, tmp_path / "cache", progress=False)) == len(paths)


class CountedViT:
    """``model.vision_features`` that counts the images it runs and raises KeyboardInterrupt on
    batch number ``crash_on`` (1-based), as an interrupted extraction would."""

    def __init__(self, model: CSMCIR, crash_on: int | None = None) -> None:
        self.real, self.crash_on, self.batches, self.images = model.vision_features, crash_on, 0, 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        if self.batches == self.crash_on:
            raise KeyboardInterrupt
        self.images += len(pixels)
        return self.real(pixels)


def test_extraction_resumes_after_a_crash(tmp_path, model, val_split, monkeypatch) -> None:
    paths = paths_of(val_split)
    clean = extract_features(model, paths, tmp_path / "clean", shard_size=4, progress=False)
    options = {"batch_size": 2, "shard_size": 4, "progress": False}

    monkeypatch.setattr(model, "vision_features", CountedViT(model, crash_on=6))
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, paths, tmp_path / "resumed", **options)
    partial = FeatureCache.open(tmp_path / "resumed", model)
    assert len(partial) == 8  # two complete shards survived, the third's 2 rows did not
    counted = CountedViT(model)
    monkeypatch.setattr(model, "vision_features", counted)
    resumed = extract_features(model, paths, tmp_path / "resumed", **options)
    assert counted.images == len(paths) - 8  # only the rest was computed
    ids = list(paths)
    assert torch.equal(resumed.get(ids), clean.get(ids))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_pipelined_extraction_writes_the_vits_rows(tmp_path, model, val_split, workers) -> None:
    """Decoding workers, the non-blocking hand-off and the writer thread change no byte: shards
    (their boundaries off the batches') hold ``vision_features`` of each batch, in order."""
    paths = paths_of(val_split)
    ids = list(paths)
    folder = tmp_path / "cache"
    extract_features(
        model, paths, folder, batch_size=3, shard_size=5, workers=workers, progress=False
    )
    with torch.no_grad():
        expected = torch.cat(
            [
                model.vision_features(model.preprocess([load_image(paths[i]) for i in batch]))
                for batch in (ids[k : k + 3] for k in range(0, len(ids), 3))
            ]
        ).half()
    shards = sorted((folder / "shards").glob("*.npy"))
    assert len(shards) == -(-len(ids) // 5)
    rows = np.concatenate([np.load(s) for s in shards])
    assert rows.tobytes() == expected.numpy().tobytes()
    assert FeatureCache.open(folder, model).ids() == ids


def test_a_failing_shard_write_is_raised_in_the_caller(tmp_path, model, val_split, monkeypatch):
    def full_disk(*args) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(features_module, "_write_shard", full_disk)
    with pytest.raises(OSError, match="No space left"):
        extract_features(model, paths_of(val_split), tmp_path / "c", shard_size=2, progress=False)


def test_sdpa_attention_gives_the_eager_vits_features(model, val_split) -> None:
    """The ViT runs torch's fused attention (SDPA) by default; it computes what the eager
    matmul-softmax-matmul computes."""
    assert model.vision_model.config._attn_implementation == "sdpa"
    paths = list(paths_of(val_split).values())[:4]
    pixels = model.preprocess([load_image(p) for p in paths])
    with torch.no_grad():
        sdpa = model.vision_features(pixels)
        model.vision_model.config._attn_implementation = "eager"
        try:
            eager = model.vision_features(pixels)
        finally:
            model.vision_model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-4)


def test_missing_ids_and_folders_are_errors(tmp_path, model, val_split) -> None:
    with pytest.raises(DataError, match="csmcir features extract"):
        FeatureCache.open(tmp_path / "none", model)
    paths = dict(list(paths_of(val_split).items())[:2])
    cache = extract_features(model, paths, tmp_path / "cache", progress=False)
    assert cache.missing([*paths, "ghost"]) == ["ghost"]
    with pytest.raises(DataError, match="no features for 1 image"):
        cache.get([*paths, "ghost"])
    with (tmp_path / "cache" / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another extraction"):
            extract_features(model, paths, tmp_path / "cache", progress=False)


def test_cli_extract_and_info(tmp_path, capsys, model, model_dir, synth_root) -> None:
    out = tmp_path / "feats"
    args = ["features", "extract", "--model", str(model_dir), "--benchmark", "synthcir"]
    assert cli.main([*args, "--root", str(synth_root), "--out", str(out)]) == 0
    every = {
        i
        for s in ("train", "val", "test")
        for i in load_split("synthcir", synth_root, s).referenced_images()
    }
    cache = FeatureCache.open(out, model)
    assert set(cache.ids()) == every
    shard = np.load(out / "shards" / "shard-00000.npy")
    assert shard.dtype == np.float16
    assert cli.main(["features", "info", str(out), "--model", str(model_dir)]) == 0
    assert "valid for the given model: yes" in capsys.readouterr().out

    assert (
        cli.main(
            [
                "features",
                "extract",
                "--model",
                "tiny",
                "--benchmark",
                "synthcir",
                "--root",
                str(synth_root),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "random-initialised" in capsys.readouterr().err


def test_cli_reads_model_and_data_from_a_fit_config(tmp_path, model, model_dir, synth_root) -> None:
    config = tmp_path / "fit.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"init_from": str(model_dir), "model_options": {"precision": "fp32"}},
                "data": {"benchmark": "synthcir", "root": str(synth_root)},
            }
        )
    )
    out = tmp_path / "feats"
    code = cli.main(
        ["features", "extract", "--config", str(config), "--split", "val", "--out", str(out)]
    )
    assert code == 0
    val = load_split("synthcir", synth_root, "val").referenced_images()
    assert sorted(FeatureCache.open(out, model).ids()) == sorted(val)


def test_extraction_defaults_keep_a_gpu_busy_and_flags_win() -> None:
    from argparse import Namespace

    from csmcir.model.features_cli import GPU_BATCH, gpu_defaults

    unset = {"batch_size": None, "workers": None, "precision": None}
    gpu = gpu_defaults(Namespace(device=torch.device("cuda:0"), **unset), "fp32")
    assert gpu["batch_size"] == GPU_BATCH and gpu["precision"] == "bf16" and gpu["workers"] >= 1
    assert gpu_defaults(Namespace(device=torch.device("cpu"), **unset), "fp32") == {
        "batch_size": 32,
        "workers": 0,
        "precision": "fp32",
    }
    given = {"batch_size": 8, "workers": 3, "precision": "fp16"}
    assert gpu_defaults(Namespace(device=torch.device("cuda"), **given), "fp32") == given

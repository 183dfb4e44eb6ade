"""The frozen-ViT feature cache: same embeddings as the ViT, stale caches refused, resumable."""

from __future__ import annotations

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


def test_extraction_resumes_after_a_crash(tmp_path, model, val_split, monkeypatch) -> None:
    paths = paths_of(val_split)
    clean = extract_features(model, paths, tmp_path / "clean", shard_size=4, progress=False)

    real_run = features_module._run_vit
    calls = []

    def crash_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(features_module, "_run_vit", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, paths, tmp_path / "resumed", shard_size=4, progress=False)
    partial = FeatureCache.open(tmp_path / "resumed", model)
    assert len(partial) == 8  # two complete shards survived
    monkeypatch.setattr(features_module, "_run_vit", real_run)
    done = []
    monkeypatch.setattr(
        features_module,
        "_run_vit",
        lambda model, paths, *a: done.append(len(paths)) or real_run(model, paths, *a),
    )
    resumed = extract_features(model, paths, tmp_path / "resumed", shard_size=4, progress=False)
    assert sum(done) == len(paths) - 8  # only the rest was computed
    ids = list(paths)
    assert torch.equal(resumed.get(ids), clean.get(ids))


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

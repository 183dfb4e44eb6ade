"""``csmcir eval`` end to end on a small synthetic benchmark with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from csmcir.cli import main as csmcir_main
from csmcir.data.images import load_image
from csmcir.data.registry import load_split
from csmcir.errors import DataError
from csmcir.evaluation import protocols
from csmcir.evaluation.encode import encode_gallery, target_texts
from csmcir.evaluation.runner import evaluate, score_split
from csmcir.model import CSMCIR

CIRR_METRICS = ["R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "Avg"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthcir")
    args = ["data", "synth", "--out", str(root), "--seed", "0", "--train-refs", "4"]
    assert csmcir_main([*args, "--val-refs", "12", "--test-refs", "4", "--overwrite"]) == 0
    return root


@pytest.fixture(scope="module")
def model_dir(synth, tmp_path_factory) -> Path:
    split = load_split("synthcir", synth, "val")
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=[q.texts[0] for q in split.queries], seed=0)
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


def captions_for(synth: Path, tmp_path: Path, drop: int = 0) -> Path:
    split = load_split("synthcir", synth, "val")
    caps = {g: {"Final_Caption": f"a scene number {i}"} for i, g in enumerate(split.gallery)}
    for g in split.gallery[:drop]:
        del caps[g]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(caps))
    return path


def run_eval(args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "results.json"
    assert csmcir_main(["eval", *args, "--out", str(out), "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def test_eval_reports_cirr_metrics_counts_and_reuses_the_gallery_cache(
    synth, model_dir, tmp_path, capsys
):
    caps = captions_for(synth, tmp_path)
    args = ["--model", str(model_dir), "--benchmark", "synthcir", "--root", str(synth)]
    args += ["--captions", str(caps), "--cache-dir", str(tmp_path / "cache")]
    first = run_eval(args, tmp_path)
    split = load_split("synthcir", synth, "val")
    summary = first["data"]["splits"]["synthcir"]
    assert (summary["queries"], summary["gallery"]) == (len(split.queries), len(split.gallery))
    assert summary["gallery_from_cache"] is False
    metrics = first["metrics"]["synthcir"]
    assert list(metrics) == CIRR_METRICS
    assert metrics["Avg"] == pytest.approx((metrics["R@5"] + metrics["Rsubset@1"]) / 2)
    assert first["headline"] == {"name": "Avg", "value": metrics["Avg"]}
    assert first["protocol"]["synthcir"]["exclude_reference"] is True
    assert first["model"]["fingerprint"] == CSMCIR.from_pretrained(model_dir).fingerprint()
    printed = capsys.readouterr().out
    assert "Rsubset@1" in printed and "exclude_reference=True" in printed
    # The synthetic benchmark's queries are broken down by modification type.
    types = first["by_type"]["synthcir"]
    kinds = {q.extra["mod_type"] for q in split.queries}
    assert kinds <= set(types) and sum(types[k]["queries"] for k in kinds) == len(split.queries)
    assert "by modification type" in printed and "change:" in printed
    # R@1 taken apart: finding the look-alike group, then choosing inside it.
    top1 = first["top1"]["synthcir"]
    product = top1["top-1 in subset"] * top1["R@1 | top-1 in subset"] / 100
    assert product == pytest.approx(metrics["R@1"])
    assert "the first result is in the query's subset" in printed

    second = run_eval(args, tmp_path)
    assert second["data"]["splits"]["synthcir"]["gallery_from_cache"] is True
    assert second["metrics"] == first["metrics"]
    # Keeping the reference in the ranking is an option, recorded with the results.
    kept = run_eval([*args, "--exclude-reference", "no"], tmp_path)
    assert kept["protocol"]["synthcir"]["exclude_reference"] is False


def test_default_results_files_are_one_per_model_and_replacing_one_is_said(
    synth, tmp_path, monkeypatch, capsys
):
    """Every run exports a folder named model/: runs/A/model and runs/B/model on the same split
    wrote one file twice."""
    split = load_split("synthcir", synth, "val")
    corpus = [q.texts[0] for q in split.queries]
    for run, seed in (("A", 0), ("B", 1)):
        model = CSMCIR.from_preset("tiny", tokenizer_corpus=corpus, seed=seed)
        model.save_pretrained(tmp_path / "runs" / run / "model")
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--benchmark", "synthcir", "--root", str(synth), "--empty-captions"]
    args += ["--no-cache", "--device", "cpu"]
    for run in ("A", "B"):
        assert csmcir_main([*args, "--model", f"runs/{run}/model"]) == 0
    written = sorted(p.name for p in (tmp_path / "runs" / "eval").iterdir())
    assert len(written) == 2 and [w[:8] for w in written] == ["A-model-", "B-model-"]
    assert all(w.endswith("-synthcir-val.json") for w in written)
    assert "replacing" not in capsys.readouterr().err
    # the same model again: the same file, made again from the same inputs
    assert csmcir_main([*args, "--model", "runs/A/model"]) == 0
    assert "replacing" not in capsys.readouterr().err
    # results of another model over them (an explicit --out): replaced, saying what they held
    first = Path("runs/eval") / written[0]
    assert csmcir_main([*args, "--model", "runs/B/model", "--out", str(first)]) == 0
    err = capsys.readouterr().err
    assert f"replacing {first}: it held the results file of model runs/A/model (" in err
    # another protocol is another file
    assert csmcir_main([*args, "--model", "runs/A/model", "--exclude-reference", "no"]) == 0
    assert len(list((tmp_path / "runs" / "eval").iterdir())) == 3


def test_a_truncated_gallery_cache_entry_is_rebuilt_saying_so(synth, model_dir, tmp_path, capsys):
    model = CSMCIR.from_pretrained(model_dir).eval()
    split = load_split("synthcir", synth, "val")
    paths = [split.image_path(g) for g in split.gallery]
    texts = [f"scene {i}" for i in range(len(paths))]
    cache = tmp_path / "cache"
    first, cached = encode_gallery(model, split.gallery, paths, texts, cache_dir=cache)
    (entry,) = (cache / "gallery").iterdir()
    entry.write_bytes(entry.read_bytes()[:100])  # "incomplete metadata" for safetensors
    again, cached = encode_gallery(model, split.gallery, paths, texts, cache_dir=cache)
    assert cached is False and torch.equal(again, first)
    err = capsys.readouterr().err
    assert f"gallery cache entry {entry} is unreadable" in err
    assert "encoding the gallery again" in err
    third, cached = encode_gallery(model, split.gallery, paths, texts, cache_dir=cache)
    assert cached is True and torch.equal(third, first)  # the entry was replaced by a good one


def data_section(entry: Path) -> tuple[bytes, int]:
    """A safetensors file's bytes and where its data (after the 8-byte length and header) starts."""
    raw = entry.read_bytes()
    return raw, 8 + int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("damage", ["half zeroed", "garbled"])
def test_a_gallery_cache_entry_with_changed_data_is_named_corrupt_and_rebuilt(
    synth, model_dir, tmp_path, capsys, damage
):
    """The header intact, the vectors changed: once used as they were (Avg 51.6 for 92.2),
    or blamed on the model ("the model produced bad embeddings")."""
    caps = captions_for(synth, tmp_path)
    args = ["--model", str(model_dir), "--benchmark", "synthcir", "--root", str(synth)]
    args += ["--captions", str(caps), "--cache-dir", str(tmp_path / "cache")]
    first = run_eval(args, tmp_path)
    (entry,) = (tmp_path / "cache" / "gallery").iterdir()
    raw, start = data_section(entry)
    middle = start + (len(raw) - start) // 2
    if damage == "half zeroed":
        raw = raw[:middle] + bytes(len(raw) - middle)
    else:
        raw = raw[:start] + b"\xff" * (middle - start) + raw[middle:]  # NaNs
    entry.write_bytes(raw)
    capsys.readouterr()
    again = run_eval(args, tmp_path)
    err = capsys.readouterr().err
    assert f"gallery cache entry {entry} is corrupt" in err and "encoding the gallery again" in err
    assert again["data"]["splits"]["synthcir"]["gallery_from_cache"] is False
    assert again["metrics"] == first["metrics"]
    third = run_eval(args, tmp_path)  # the rebuilt entry is used
    assert third["data"]["splits"]["synthcir"]["gallery_from_cache"] is True


def test_scores_are_the_models_own_embeddings(synth, model_dir):
    model = CSMCIR.from_pretrained(model_dir).eval()
    split = load_split("synthcir", synth, "val")
    captions = {g: "a scene" for g in split.gallery}
    scored = score_split(model, split, captions, cache_dir=None, batch_size=7)
    q = split.queries[3]
    with torch.inference_mode():
        query = model.encode_query([q.texts[0]], images=[load_image(split.image_path(q.reference))])
        target = model.encode_target(["a scene"], images=[load_image(split.image_path(q.target))])
    column = split.gallery.index(q.target)
    assert scored.scores[3, column].item() == pytest.approx((query @ target.T).item(), abs=1e-5)
    assert scored.prepared.exclude[3] == split.gallery.index(q.reference)


def test_a_caption_reading_model_refuses_uncaptioned_galleries(synth, model_dir, tmp_path, capsys):
    caps = captions_for(synth, tmp_path, drop=3)
    args = ["eval", "--model", str(model_dir), "--benchmark", "synthcir", "--root", str(synth)]
    args += ["--captions", str(caps), "--no-cache", "--out", str(tmp_path / "r.json")]
    assert csmcir_main(args) == 2
    err = capsys.readouterr().err
    split = load_split("synthcir", synth, "val")
    assert f"3 of {len(split.gallery)} gallery images have none" in err
    assert split.gallery[0] in err and "--empty-captions" in err
    assert csmcir_main([*args, "--empty-captions"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["data"]["empty_captions"] is True


def test_image_only_targets_need_no_captions(synth):
    split = load_split("synthcir", synth, "val")
    corpus = [q.texts[0] for q in split.queries]
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=corpus, seed=0, target_text="none").eval()
    assert target_texts(model, split.gallery, None) is None
    gallery, _ = encode_gallery(
        model, split.gallery, [split.image_path(g) for g in split.gallery], None, cache_dir=None
    )
    assert gallery.shape == (len(split.gallery), model.config.num_query_tokens, 64)
    metrics = evaluate(model, split, cache_dir=None)
    assert list(metrics) == CIRR_METRICS


def test_untrained_preset_is_the_zero_shot_baseline(synth, tmp_path):
    args = ["--model", "tiny", "--benchmark", "synthcir", "--root", str(synth), "--split", "test"]
    results = run_eval([*args, "--empty-captions", "--no-cache"], tmp_path)
    assert results["model"]["preset"] == "tiny" and results["split"] == "test"
    assert 0 <= results["metrics"]["synthcir"]["R@50"] <= 100


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split", "val", "--submission", "sub"], "synthcir has no test server"),
        (["--caption-join", "first"], "--caption-join applies to benchmarks with two captions"),
        (["--category", "dress"], "--category applies to fashioniq"),
        (["--split", "nope"], "unknown split 'nope'"),
    ],
)
def test_bad_options_are_clear_errors(synth, model_dir, tmp_path, capsys, extra, message):
    args = ["eval", "--model", str(model_dir), "--benchmark", "synthcir", "--root", str(synth)]
    assert csmcir_main([*args, "--no-cache", "--empty-captions", *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_hidden_answer_split_needs_submission(synth):
    split = load_split("synthcir", synth, "val")
    split.queries = [
        type(q)(q.query_id, q.reference, q.texts, subset=q.subset) for q in split.queries
    ]
    with pytest.raises(DataError, match="has no public answers"):
        protocols.compute(
            torch.zeros(len(split.queries), len(split.gallery)), protocols.prepare(split)
        )


def test_feature_cache_gives_the_same_scores_as_pixels(synth, model_dir, tmp_path):
    from csmcir.model.features import FeatureCache, extract_features

    model = CSMCIR.from_pretrained(model_dir).eval()
    split = load_split("synthcir", synth, "val")
    captions = {g: "a scene" for g in split.gallery}
    cache = extract_features(model, split.image_paths, tmp_path / "feats", progress=False)
    pixels = score_split(model, split, captions, cache_dir=None).scores
    cached = score_split(model, split, captions, cache_dir=None, features=cache).scores
    assert torch.allclose(pixels, cached, atol=2e-3)  # fp16 features
    other = CSMCIR.from_preset("tiny", tokenizer_corpus=["a scene"], seed=3)
    with pytest.raises(DataError):
        FeatureCache.open(tmp_path / "feats", other)
    partial = extract_features(
        model,
        {split.gallery[0]: split.image_paths[split.gallery[0]]},
        tmp_path / "partial",
        progress=False,
    )
    with pytest.raises(DataError, match="has no features for"):
        score_split(model, split, captions, cache_dir=None, features=partial)

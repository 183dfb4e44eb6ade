"""``csmcir eval`` on the real FashionIQ / CIRR / CIRCO annotation files with placeholder images.

The annotation folders are linked (never copied) into a temp root and every image they name is
written as one of a few tiny solid-colour PNGs; the tiny untrained model at 64 px encodes them.
The official query and gallery counts and the test-server files' shapes are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import placeholder_data
import pytest
from conftest import SHARED_BENCHMARKS
from placeholder_data import placeholder_pngs

from csmcir.cli import main as csmcir_main
from csmcir.data.registry import load_split
from csmcir.evaluation.submission import check_circo_file, check_cirr_file
from csmcir.model import CSMCIR


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return placeholder_pngs()


@pytest.fixture(scope="module")
def shared() -> Path:
    """conftest's ``shared_benchmarks``, for module-scoped fixtures (encode each root once)."""
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"real annotation files not found at {SHARED_BENCHMARKS}")
    return SHARED_BENCHMARKS


@pytest.fixture(scope="module")
def model_dir(shared: Path, tmp_path_factory) -> Path:
    texts = [
        r["caption"] for r in json.loads((shared / "cirr/captions/cap.rc2.val.json").read_text())
    ]
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=texts, seed=0)
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def cirr_root(shared: Path, tmp_path_factory, pngs) -> Path:
    return placeholder_data.cirr_root(tmp_path_factory.mktemp("cirr"), shared, pngs)


@pytest.fixture(scope="module")
def circo_root(shared: Path, tmp_path_factory, pngs) -> Path:
    return placeholder_data.circo_root(tmp_path_factory.mktemp("circo"), shared, pngs)


def run_eval(model_dir: Path, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(model_dir), *args, "--empty-captions", "--no-cache"]
    assert csmcir_main([*argv, "--batch-size", "256", "--device", "cpu", "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fashioniq_val_all_categories(shared, model_dir, tmp_path, pngs):
    root = placeholder_data.fashioniq_root(tmp_path / "fashioniq", shared, pngs)

    results = run_eval(model_dir, tmp_path, "--benchmark", "fashioniq", "--root", str(root))
    counts = {k: (v["queries"], v["gallery"]) for k, v in results["data"]["splits"].items()}
    assert counts == {
        "fashioniq-dress": (2017, 3817),
        "fashioniq-shirt": (2038, 6346),
        "fashioniq-toptee": (1961, 5373),
    }
    metrics = results["metrics"]
    assert set(metrics["fashioniq-shirt"]) == {"R@10", "R@50"}
    average = metrics["average"]
    assert average["R@10"] == pytest.approx(
        sum(metrics[f"fashioniq-{c}"]["R@10"] for c in ("dress", "shirt", "toptee")) / 3
    )
    assert average["mean"] == pytest.approx((average["R@10"] + average["R@50"]) / 2)
    assert results["headline"] == {"name": "mean", "value": average["mean"]}
    protocol = results["protocol"]["fashioniq-dress"]
    assert protocol["exclude_reference"] is False and protocol["caption_join"] == "and"


def test_cirr_val_counts_and_metrics(model_dir, cirr_root, tmp_path):
    results = run_eval(model_dir, tmp_path, "--benchmark", "cirr", "--root", str(cirr_root))
    summary = results["data"]["splits"]["cirr"]
    assert (summary["queries"], summary["gallery"]) == (4181, 2297)
    metrics = results["metrics"]["cirr"]
    assert metrics["Avg"] == pytest.approx((metrics["R@5"] + metrics["Rsubset@1"]) / 2)
    # Six colours for 2,297 images: an untrained model ranks near chance, never near 100%.
    assert metrics["R@1"] < 5 and 5 < metrics["Rsubset@1"] < 40


def test_cirr_test1_submission(model_dir, cirr_root, tmp_path):
    sub = tmp_path / "sub"
    args = ["--benchmark", "cirr", "--root", str(cirr_root), "--split", "test1"]
    results = run_eval(model_dir, tmp_path, *args, "--submission", str(sub))
    recall, subset = (Path(p) for p in results["submission"])
    split = load_split("cirr", cirr_root, "test1")
    for path, metric, length in ((recall, "recall", 50), (subset, "recall_subset", 3)):
        obj = json.loads(path.read_text())
        assert len(obj) == 4148 + 2 and obj["version"] == "rc2" and obj["metric"] == metric
        assert {len(v) for k, v in obj.items() if k not in {"version", "metric"}} == {length}
        assert path.stat().st_size < 5_000_000
        check_cirr_file(path, split, metric)


@pytest.mark.slow
def test_circo_val_and_test_submission(model_dir, circo_root, tmp_path):
    results = run_eval(model_dir, tmp_path, "--benchmark", "circo", "--root", str(circo_root))
    summary = results["data"]["splits"]["circo"]
    info = circo_root / "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"
    assert summary["queries"] == 220
    assert summary["gallery"] == len(json.loads(info.read_text())["images"])
    assert list(results["metrics"]["circo"])[:4] == ["mAP@5", "mAP@10", "mAP@25", "mAP@50"]

    sub = tmp_path / "sub"
    args = ["--benchmark", "circo", "--root", str(circo_root), "--split", "test"]
    path = Path(run_eval(model_dir, tmp_path, *args, "--submission", str(sub))["submission"][0])
    obj = json.loads(path.read_text())
    assert list(obj) == [str(i) for i in range(800)]
    assert all(len(set(ids)) == 50 and all(isinstance(i, int) for i in ids) for ids in obj.values())
    check_circo_file(path, load_split("circo", circo_root, "test"))

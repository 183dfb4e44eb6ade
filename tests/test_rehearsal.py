"""A rehearsal of the real thing at small scale, through the commands a user types.

A BLIP-2 retrieval folder laid out as the hub's (tiny, random, dropout 0.1, its own image
processor, a Blip2Processor tokenizer), the real FashionIQ and CIRR annotation files from
../shared/benchmarks with placeholder images, then: MCoT captions through the ``openai`` backend
against the project's fake server, the frozen-ViT feature cache, a few training steps with the
memory bank, evaluation, a CIRR test1 submission and ``csmcir export hf`` loaded back by
transformers. Every stage's output is checked.

Kept fast by the loaders' own ``--drop-missing``: placeholders are written only for the images
of the first few FashionIQ dress queries (train and val) and CIRR val queries, so every command
drops (and counts) the rest; CIRR test1 is written whole, since a submission answers every
query.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from blip2_folder import make_blip2_folder
from conftest import SHARED_BENCHMARKS
from PIL import Image
from placeholder_data import link, placeholder_pngs, write_images
from transformers import AutoProcessor, Blip2ForImageTextRetrieval

from captioning.backends.openai import image_data_url
from captioning.fake_server import FakeChatServer, image_fingerprint
from captioning.targets import gallery_images
from csmcir.cli import main as csmcir_main
from csmcir.data.registry import load_split
from csmcir.evaluation.submission import check_cirr_file
from csmcir.model import CSMCIR
from csmcir.model.features import FeatureCache

FIQ_TRAIN, FIQ_VAL, CIRR_VAL = 48, 24, 16  # queries whose images are written
STEPS, BATCH = 4, 8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared() -> Path:
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"real annotation files not found at {SHARED_BENCHMARKS}")
    return SHARED_BENCHMARKS


def fashioniq_subset(root: Path, shared: Path) -> dict[str, set[str]]:
    """Dress images of the first train and val queries; the image ids each split keeps."""
    link(root, shared / "fashioniq", "captions", "image_splits")
    kept = {}
    for split, n in (("train", FIQ_TRAIN), ("val", FIQ_VAL)):
        records = json.loads((root / f"captions/cap.dress.{split}.json").read_text())[:n]
        kept[split] = {r[k] for r in records for k in ("candidate", "target")}
    write_images(
        (root / "images" / f"{i}.png" for s in kept.values() for i in s), placeholder_pngs()
    )
    return kept


def cirr_subset(root: Path, shared: Path) -> set[str]:
    """All of test1; of val, the first queries' references, targets and subset members."""
    link(root, shared / "cirr", "captions", "image_splits")
    test1 = json.loads((root / "image_splits/split.rc2.test1.json").read_text())
    val = json.loads((root / "image_splits/split.rc2.val.json").read_text())
    records = json.loads((root / "captions/cap.rc2.val.json").read_text())[:CIRR_VAL]
    kept = {
        n for r in records for n in (r["reference"], r["target_hard"], *r["img_set"]["members"])
    }
    write_images(
        [root / p for p in test1.values()] + [root / val[n] for n in kept], placeholder_pngs()
    )
    return kept


def run(*argv: str) -> None:
    assert csmcir_main(list(argv)) == 0, argv


def caption(server: FakeChatServer, benchmark: str, root: Path, split: str, out: Path, **options):
    """``csmcir caption run`` + ``merge``; every caption must be the server's answer about the
    very image it is stored for (the fake server names the image's fingerprint)."""
    shards = out.with_suffix(".shards")
    extra = [f"--{k}={v}" for k, v in options.items()]
    run(
        "caption", "run", "--benchmark", benchmark, "--root", str(root), "--split", split,
        "--backend", "openai", "--base-url", server.base_url, "--model", server.model,
        "--api-key-env", "NO_KEY_NEEDED", "--out", str(shards), "--concurrency", "8",
        "--drop-missing", "--no-progress", *extra,
    )  # fmt: skip
    run("caption", "merge", str(shards), "--out", str(out))
    captions = {k: v["Final_Caption"] for k, v in json.loads(out.read_text()).items()}
    paths, _ = gallery_images(benchmark, root, split, drop_missing=True, **options)
    assert set(captions) == set(paths)
    for image_id, path in paths.items():
        fingerprint = image_fingerprint(image_data_url(path))
        assert captions[image_id] == f"a test image with fingerprint {fingerprint}", image_id
    return captions


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "logs" / "version_0" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_rehearsal_from_a_hub_folder_to_transformers(shared, tmp_path, capsys, one_thread):
    blip2, original = make_blip2_folder(tmp_path / "blip2-itm-vit-g")
    fiq, cirr = tmp_path / "fashioniq", tmp_path / "cirr"
    fiq_ids = fashioniq_subset(fiq, shared)
    cirr_val_ids = cirr_subset(cirr, shared)

    # 1. captions through the openai backend, against the fake OpenAI-compatible server
    with FakeChatServer() as server:
        fiq_caps = caption(server, "fashioniq", fiq, "all", tmp_path / "fiq.json", category="dress")
        val_caps = caption(server, "cirr", cirr, "val", tmp_path / "cirr-val.json")
        test_caps = caption(server, "cirr", cirr, "test1", tmp_path / "cirr-test1.json")
    assert set(fiq_caps) >= fiq_ids["train"] | fiq_ids["val"]
    assert set(val_caps) == cirr_val_ids
    test1 = load_split("cirr", cirr, "test1")
    assert set(test_caps) == set(test1.gallery)

    # 2. the frozen-ViT feature caches
    features = {"fiq": tmp_path / "features-fiq", "cirr": tmp_path / "features-cirr"}
    run("features", "extract", "--model", str(blip2), "--benchmark", "fashioniq",
        "--root", str(fiq), "--option", "category=dress", "--split", "train", "--split", "val",
        "--drop-missing", "--device", "cpu", "--out", str(features["fiq"]))  # fmt: skip
    run("features", "extract", "--model", str(blip2), "--benchmark", "cirr", "--root", str(cirr),
        "--split", "val", "--split", "test1", "--drop-missing", "--device", "cpu",
        "--out", str(features["cirr"]))  # fmt: skip
    model = CSMCIR.from_pretrained(blip2)
    fiq_cache, cirr_cache = (FeatureCache.open(features[k], model) for k in ("fiq", "cirr"))
    assert len(fiq_cache) == len(fiq_ids["train"] | fiq_ids["val"])
    assert len(cirr_cache) == len(set(test1.gallery) | cirr_val_ids)
    some_feats = cirr_cache.get([test1.gallery[0]])
    assert some_feats.shape == (1, 65, 64)

    # 3. a few training steps with the memory bank, from the BLIP-2 folder
    run_dir = tmp_path / "run"
    config = tmp_path / "fit.yaml"
    config.write_text(
        f"seed_everything: 0\ncheckpoint_every: 0\nthreads: 1\n"
        f"trainer:\n  accelerator: cpu\n  devices: 1\n  max_steps: {STEPS}\n"
        f"  val_check_interval: {STEPS}\n  check_val_every_n_epoch: null\n"
        f"  num_sanity_val_steps: 0\n  log_every_n_steps: 1\n  enable_progress_bar: false\n"
        f"  default_root_dir: {run_dir}\n"
        f"model:\n  init_from: {blip2}\n  lr: 1.0e-4\n  warmup_steps: 1\n"
        f"  bank: {{enabled: true, size: 64, probe_every: 2, open_entropy: null}}\n"
        f"data:\n  benchmark: fashioniq\n  root: {fiq}\n  captions: {tmp_path / 'fiq.json'}\n"
        f"  categories: [dress]\n  features: {features['fiq']}\n  drop_missing: true\n"
        f"  batch_size: {BATCH}\n  val_batch_size: 64\n"
    )
    run("fit", "--config", str(config))
    rows = read_metrics(run_dir)
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert sorted(losses) == list(range(STEPS)) and all(math.isfinite(v) for v in losses.values())
    assert any(r.get("bank/drift") for r in rows) and any(r.get("bank/share") for r in rows)
    score = [float(r["val/score"]) for r in rows if r.get("val/score")]
    assert len(score) == 1 and 0 <= score[0] <= 100
    trained = CSMCIR.from_pretrained(run_dir / "model")
    assert trained.config.itm_head and trained.config.image.resample == "bilinear"
    assert not torch.equal(trained.tower.text_projection.weight, original.text_projection.weight)

    # 4. evaluation: FashionIQ dress val and CIRR val, from the feature caches
    out = tmp_path / "eval-fiq.json"
    run("eval", "--model", str(run_dir / "model"), "--benchmark", "fashioniq", "--root", str(fiq),
        "--category", "dress", "--captions", str(tmp_path / "fiq.json"),
        "--features", str(features["fiq"]), "--drop-missing", "--no-cache", "--device", "cpu",
        "--out", str(out))  # fmt: skip
    results = json.loads(out.read_text())
    summary = results["data"]["splits"]["fashioniq-dress"]
    written = fiq_ids["train"] | fiq_ids["val"]
    records = json.loads((fiq / "captions/cap.dress.val.json").read_text())
    kept = [r for r in records if {r["candidate"], r["target"]} <= written]
    gallery = set(json.loads((fiq / "image_splits/split.dress.val.json").read_text())) & written
    assert summary["queries"] == len(kept) >= FIQ_VAL and summary["gallery"] == len(gallery)
    assert set(results["metrics"]["fashioniq-dress"]) == {"R@10", "R@50"}
    out = tmp_path / "eval-cirr.json"
    run("eval", "--model", str(run_dir / "model"), "--benchmark", "cirr", "--root", str(cirr),
        "--captions", str(tmp_path / "cirr-val.json"), "--features", str(features["cirr"]),
        "--drop-missing", "--no-cache", "--device", "cpu", "--out", str(out))  # fmt: skip
    results = json.loads(out.read_text())
    summary = results["data"]["splits"]["cirr"]
    records = json.loads((cirr / "captions/cap.rc2.val.json").read_text())
    kept = [
        r
        for r in records
        if {r["reference"], r["target_hard"], *r["img_set"]["members"]} <= cirr_val_ids
    ]
    assert summary["queries"] == len(kept) >= CIRR_VAL and summary["gallery"] == len(cirr_val_ids)
    metrics = results["metrics"]["cirr"]
    assert metrics["Avg"] == pytest.approx((metrics["R@5"] + metrics["Rsubset@1"]) / 2)

    # 5. the CIRR test1 submission, every query answered
    sub = tmp_path / "submission"
    run("eval", "--model", str(run_dir / "model"), "--benchmark", "cirr", "--root", str(cirr),
        "--split", "test1", "--captions", str(tmp_path / "cirr-test1.json"),
        "--features", str(features["cirr"]), "--submission", str(sub), "--no-cache",
        "--device", "cpu", "--out", str(tmp_path / "eval-test1.json"))  # fmt: skip
    files = sorted(sub.glob("*.json"))
    assert [p.name.split("_submission")[0] for p in files] == ["recall", "recall_subset"]
    for path, metric in zip(files, ("recall", "recall_subset"), strict=True):
        check_cirr_file(path, test1, metric)
        assert len(json.loads(path.read_text())) == len(test1.queries) + 2 == 4148 + 2

    # 6. export to transformers, loaded back by transformers
    capsys.readouterr()
    run("export", "hf", str(run_dir / "model"), "--out", str(tmp_path / "hf"))
    assert "itm_head: the source checkpoint's" in capsys.readouterr().out
    exported = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(exported.itm_head.weight, original.itm_head.weight)  # carried through
    trained.eval()
    images = [test1.image_path(i) for i in test1.gallery[:4]]
    texts = [test_caps[i] for i in test1.gallery[:4]]
    pictures = [Image.open(p) for p in images]
    # the documented usage: the folder's own processor (it prepends the <image> ids the model
    # strips), images and texts together
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    inputs = processor(
        images=pictures, text=texts, padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        ours = trained.encode_target(texts, trained.preprocess(pictures))
        itm = exported(**inputs, use_image_text_matching_head=True)
        h = itm.text_model_output.last_hidden_state[:, exported.config.num_query_tokens]
    assert (ours - F.normalize(exported.text_projection(h), dim=-1)).abs().max() <= 1e-6

"""Loaders on the real FashionIQ / CIRR / CIRCO annotation files, with placeholder images.

The annotation folders are linked (not copied) into a temp root; every image they name is
written as the same tiny PNG, so the counts are the official ones and the image check is real.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import placeholder_data
import pytest
from placeholder_data import placeholder_pngs

from csmcir.data.registry import load_split
from csmcir.errors import DataError


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return placeholder_pngs()


@pytest.fixture
def fiq_root(shared_benchmarks: Path, tmp_path: Path, pngs) -> Path:
    return placeholder_data.fashioniq_root(tmp_path / "fashioniq", shared_benchmarks, pngs)


def test_fashioniq_val_official_counts(fiq_root: Path):
    counts = {}
    for cat in ("dress", "shirt", "toptee"):
        split = load_split("fashioniq", fiq_root, "val", category=cat)
        counts[cat] = (len(split.queries), len(split.gallery))
        assert all(q.target in split.image_paths for q in split.queries)
        texts = [split.eval_text(q) for q in split.queries]
        assert all(isinstance(t, str) and t for t in texts)
    assert counts == {"dress": (2017, 3817), "shirt": (2038, 6346), "toptee": (1961, 5373)}
    assert sum(q for q, _ in counts.values()) == 6016


def test_fashioniq_val_keeps_the_three_empty_captions(fiq_root: Path):
    empty = []
    for cat in ("dress", "shirt", "toptee"):
        split = load_split("fashioniq", fiq_root, "val", category=cat)
        empty += [split.eval_text(q) for q in split.queries if not all(t for t in q.texts)]
    assert len(empty) == 3
    assert all(t.startswith(" and ") for t in empty)


def test_fashioniq_test_captions_have_no_target(shared_benchmarks: Path, tmp_path: Path, pngs):
    options = {"splits": ("test",), "categories": ("dress",), "ext": "jpg"}
    root = placeholder_data.fashioniq_root(tmp_path / "fiq", shared_benchmarks, pngs, **options)
    names = json.loads((root / "image_splits/split.dress.test.json").read_text())
    split = load_split("fashioniq", root, "test", category="dress")
    assert len(split.queries) == 2024 and not split.has_targets
    assert split.image_paths[names[0]].suffix == ".jpg"


@pytest.fixture
def cirr_root(shared_benchmarks: Path, tmp_path: Path, pngs) -> Path:
    return placeholder_data.cirr_root(tmp_path / "cirr", shared_benchmarks, pngs)


def test_cirr_val_and_test1_official_counts(cirr_root: Path):
    val = load_split("cirr", cirr_root, "val")
    assert (len(val.queries), len(val.gallery)) == (4181, 2297)
    assert all(q.reference in q.subset and len(q.subset) == 6 for q in val.queries)
    assert all(q.target in val.image_paths for q in val.queries)
    test1 = load_split("cirr", cirr_root, "test1")
    assert (len(test1.queries), len(test1.gallery)) == (4148, 2315)
    assert not test1.has_targets
    assert len({q.query_id for q in test1.queries}) == 4148


def test_cirr_drop_missing_counts_and_writes_the_list(cirr_root: Path, tmp_path: Path):
    records = json.loads((cirr_root / "captions/cap.rc2.val.json").read_text())
    rel = json.loads((cirr_root / "image_splits/split.rc2.val.json").read_text())
    gone = {records[0]["reference"], records[100]["target_hard"]}
    for name in gone:
        (cirr_root / rel[name]).unlink()
    with pytest.raises(DataError, match=r"cirr/val: 2 of 2297 images are missing"):
        load_split("cirr", cirr_root, "val")
    # independently: a query goes when any image it names is gone (members included)
    expected = [
        str(r["pairid"])
        for r in records
        if gone & {r["reference"], r["target_hard"], *r["img_set"]["members"]}
    ]
    report = tmp_path / "dropped.json"
    split = load_split("cirr", cirr_root, "val", drop_missing=True, dropped_report=report)
    assert len(split.queries) == 4181 - len(expected)
    assert len(split.gallery) == 2295 and set(split.dropped) == gone
    written = json.loads(report.read_text())
    assert written["dropped_queries"] == expected
    assert {m["id"] for m in written["missing_images"]} == gone


@pytest.fixture
def circo_root(shared_benchmarks: Path, tmp_path: Path, pngs) -> Path:
    return placeholder_data.circo_root(tmp_path / "circo", shared_benchmarks, pngs)


def test_circo_val_several_ground_truths(circo_root: Path):
    records = json.loads((circo_root / "annotations/val.json").read_text())
    split = load_split("circo", circo_root, "val")
    assert len(split.queries) == 220
    for q, rec in zip(split.queries, records, strict=True):
        assert q.targets[0] == str(rec["target_img_id"])
        assert sorted(q.targets) == sorted(map(str, rec["gt_img_ids"]))
    sizes = Counter(len(q.targets) for q in split.queries)
    assert max(sizes) > 1 and sum(n > 1 for n in sizes.elements()) > 100


def test_circo_test_queries(circo_root: Path):
    split = load_split("circo", circo_root, "test")
    assert [q.query_id for q in split.queries] == [str(i) for i in range(800)]
    assert not split.has_targets and not split.exclude_reference  # the official code ranks it

"""Per-modification-type metrics and the text-blind ceiling, on hand-built splits."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.errors import ConfigError
from csmcir.evaluation.bounds import text_blind_scores
from csmcir.evaluation.protocols import (
    by_type,
    compute,
    main_target_ranks,
    prepare,
    query_groups,
    top1_in_subset,
)
from csmcir.evaluation.runner import SplitScores
from csmcir.quickstart import a_miss

GALLERY = ["r1", "a", "b", "c", "r2", "d"]


def query(i: int, ref: str, target: str, kind: str, changed: str | None = None) -> CIRQuery:
    extra = {"mod_type": kind} | ({"mod_attribute": changed} if changed else {})
    subset = ("r1", "a", "b", "c") if ref == "r1" else ("r2", "d", "a", "b")
    return CIRQuery(str(i), ref, (f"text {i}",), (target,), subset, extra)


def split(queries: list[CIRQuery], benchmark: str = "synthcir") -> CIRSplit:
    paths = {g: Path(f"{g}.png") for g in GALLERY}
    return CIRSplit(benchmark, "test", queries, GALLERY, paths, exclude_reference=True)


QUERIES = [
    query(0, "r1", "a", "add"),
    query(1, "r1", "b", "change", "color"),
    query(2, "r2", "d", "change", "shape"),
    query(3, "r2", "a", "remove"),
]
# Rows: each query's scores over GALLERY; the reference (r1 / r2) scores high but is excluded.
SCORES = torch.tensor(
    [
        [9.0, 5.0, 4.0, 1.0, 0.0, 0.0],  # target a first: rank 1 (subset rank 1)
        [9.0, 5.0, 4.0, 1.0, 0.0, 0.0],  # target b second: rank 2 (subset rank 2)
        [0.0, 5.0, 4.0, 3.0, 9.0, 1.0],  # target d: rank 4 (r2 excluded), subset {d, a, b}: 3
        [0.0, 5.0, 4.0, 3.0, 9.0, 1.0],  # target a first: rank 1
    ]
)


def test_groups_by_type_then_changed_attribute():
    assert query_groups(split(QUERIES)) == {
        "add": [0],
        "change": [1, 2],
        "change:color": [1],
        "change:shape": [2],
        "remove": [3],
    }
    plain = [CIRQuery("0", "r1", ("t",), ("a",), ("r1", "a"))]
    assert query_groups(split(plain)) == {}


def test_per_type_metrics_by_hand_and_consistent_with_the_total():
    prepared = prepare(split(QUERIES))
    types = by_type(SCORES, prepared)
    assert types["change"]["queries"] == 2
    assert types["change"]["R@1"] == 0.0 and types["change"]["R@5"] == 100.0
    assert types["change"]["Rsubset@1"] == 0.0 and types["change"]["Rsubset@2"] == 50.0
    assert types["change:shape"]["Rsubset@3"] == 100.0 and types["change:shape"]["Rsubset@2"] == 0
    assert types["remove"]["R@1"] == types["add"]["R@1"] == 100.0
    total = compute(SCORES, prepared)
    weighted = sum(types[t]["R@1"] * types[t]["queries"] for t in ("add", "change", "remove"))
    assert weighted / len(QUERIES) == pytest.approx(total["R@1"]) == 50.0


def test_per_type_ties_follow_the_whole_splits_tie_break():
    """All-equal scores: each type's figures are its queries' share of the total's random ranks."""
    prepared = prepare(split(QUERIES))
    flat = torch.zeros(len(QUERIES), len(GALLERY))
    types, total = by_type(flat, prepared, seed=3), compute(flat, prepared, seed=3)
    weighted = sum(types[t]["Rsubset@1"] * types[t]["queries"] for t in ("add", "change", "remove"))
    assert weighted / len(QUERIES) == pytest.approx(total["Rsubset@1"])


def test_main_target_ranks_by_hand_and_the_quickstarts_miss_is_one_of_them():
    prepared = prepare(split(QUERIES))
    assert main_target_ranks(SCORES, prepared).tolist() == [1, 2, 4, 1]
    scored = SplitScores(prepared, SCORES, gallery_from_cache=False)
    assert {a_miss(scored, random.Random(seed)).query_id for seed in range(20)} == {"1", "2"}
    hits_only = SplitScores(prepare(split(QUERIES[::3])), SCORES[[0, 3]], gallery_from_cache=False)
    assert a_miss(hits_only, random.Random(0)) is None


def test_per_type_metrics_need_the_cirr_protocol():
    with pytest.raises(ConfigError, match="CIRR protocol"):
        by_type(SCORES, prepare(split(QUERIES, benchmark="shoes")))


def test_top1_in_subset_by_hand_and_its_product_is_r_at_1():
    """Queries 0-3 put a subset member first (0 and 3 their target); query 4 puts c first,
    outside its subset {d, a, b}."""
    queries = [*QUERIES, query(4, "r2", "d", "move")]
    scores = torch.cat([SCORES, torch.tensor([[0.0, 1.0, 2.0, 8.0, 9.0, 5.0]])])
    prepared = prepare(split(queries))
    top1 = top1_in_subset(scores, prepared)
    assert top1 == {"top-1 in subset": 80.0, "R@1 | top-1 in subset": 50.0}
    assert compute(scores, prepared)["R@1"] == pytest.approx(80.0 * 50.0 / 100)


def test_top1_in_subset_ties_follow_r_at_1s_tie_break():
    prepared = prepare(split(QUERIES))
    flat = torch.zeros(len(QUERIES), len(GALLERY))
    for seed in range(4):
        top1 = top1_in_subset(flat, prepared, seed=seed)
        product = top1["top-1 in subset"] * top1["R@1 | top-1 in subset"] / 100
        assert product == pytest.approx(compute(flat, prepared, seed=seed)["R@1"])


def test_top1_in_subset_is_empty_without_subsets_or_the_cirr_protocol():
    assert top1_in_subset(SCORES, prepare(split(QUERIES, benchmark="shoes"))) == {}
    plain = [CIRQuery("0", "r1", ("t",), ("a",), None)]
    assert top1_in_subset(SCORES[:1], prepare(split(plain))) == {}


def test_text_blind_ceiling_is_half_when_each_reference_has_two_targets():
    prepared = prepare(split(QUERIES))
    blind = compute(text_blind_scores(prepared), prepared)
    assert blind["R@1"] == blind["Rsubset@1"] == 50.0
    assert blind["R@5"] == blind["Rsubset@2"] == 100.0


def test_text_blind_ceiling_counts_repeated_targets():
    """Three queries of one reference, two wanting 'a': the best blind ranking puts 'a' first."""
    queries = [*QUERIES[:2], query(4, "r1", "a", "move")]
    prepared = prepare(split(queries))
    scores = text_blind_scores(prepared)
    assert torch.equal(scores[0], scores[1])  # one ranking for every query of a reference
    assert compute(scores, prepared)["R@1"] == pytest.approx(200 / 3)

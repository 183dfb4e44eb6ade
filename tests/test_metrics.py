"""Metrics on small hand-made score matrices whose answers are worked out in the comments."""

from __future__ import annotations

import pytest
import torch

from csmcir.evaluation.metrics import (
    caption_match_recall,
    map_at_k,
    rank_gallery,
    recall_at_k,
    recall_subset_at_k,
    target_ranks,
)

# q0: target 2 scores 0.5, beaten by 0.9 -> rank 2. q1: target 1 is the best -> rank 1.
# q2: target 0 scores 0.3, beaten by 0.7 -> rank 2.
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.3],
        [0.2, 0.8, 0.1, 0.4],
        [0.3, 0.2, 0.1, 0.7],
    ]
)
TARGETS = [2, 1, 0]


def test_recall_by_hand():
    assert target_ranks(SCORES, TARGETS).tolist() == [2, 1, 2]
    r = recall_at_k(SCORES, TARGETS, ks=(1, 2))
    assert r == pytest.approx({"R@1": 100 / 3, "R@2": 100.0})


def test_k_above_gallery_size_finds_every_target():
    assert recall_at_k(SCORES, TARGETS, ks=(50,)) == {"R@50": 100.0}


def test_reference_top_hit_is_excluded():
    # q0's top hit (index 0, score 0.9) is its reference: excluded, the target moves to rank 1.
    r = recall_at_k(SCORES, TARGETS, ks=(1,), exclude=[0, None, None])
    assert r["R@1"] == pytest.approx(200 / 3)


def test_excluded_target_is_never_found():
    ranks = target_ranks(SCORES, TARGETS, exclude=[2, None, None])
    assert ranks[0] == float("inf")
    assert recall_at_k(SCORES, TARGETS, ks=(4,), exclude=[2, None, None])["R@4"] == pytest.approx(
        200 / 3
    )


def test_several_ground_truths_best_one_counts():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.5]])
    # gts 0 (rank 4) and 3 (rank 2): the query's rank is 2.
    assert target_ranks(scores, [[0, 3]]).tolist() == [2]
    assert recall_at_k(scores, [[0, 3]], ks=(1, 2)) == {"R@1": 0.0, "R@2": 100.0}


def test_tie_rank_is_random_among_the_tied_only():
    # The target (0.5) is beaten by 0.9 and tied with one other 0.5: rank 2 or 3, never 1 or 4.
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    seen = [int(target_ranks(scores, [1], seed=s)[0]) for s in range(200)]
    assert set(seen) == {2, 3}
    assert 60 < seen.count(2) < 140  # a fair coin over 200 seeds
    assert target_ranks(scores, [1], seed=7).tolist() == target_ranks(scores, [1], seed=7).tolist()


def test_all_equal_embeddings_score_chance_not_a_flattering_rank():
    # 2000 queries on a 40-image gallery, all scores equal: chance R@1 = 2.5%, R@10 = 25%.
    # A strict ">" count would give 100%; "ties against the target" would give 0%.
    nq, ng = 2000, 40
    scores = torch.zeros(nq, ng)
    targets = [i % ng for i in range(nq)]
    r = recall_at_k(scores, targets, ks=(1, 10))
    assert r["R@1"] == pytest.approx(2.5, abs=1.2)  # binomial sd 0.35
    assert r["R@10"] == pytest.approx(25.0, abs=3.5)  # binomial sd 0.97
    # CIRR-style subsets of 6 minus the reference: 5 candidates -> Rsubset@1 = 20%.
    subsets = [[(i + d) % ng for d in range(6)] for i in range(nq)]
    subset_targets = [(i + 1) % ng for i in range(nq)]
    references = [i % ng for i in range(nq)]
    rs = recall_subset_at_k(scores, subset_targets, subsets, ks=(1,), exclude=references)
    assert rs["Rsubset@1"] == pytest.approx(20.0, abs=3.5)  # binomial sd 0.89


def test_recall_subset_by_hand():
    # Gallery of 6. q0: reference 0 is excluded, subset {1, 2, 3} scores 0.8/0.7/0.6, target 2 is
    # second; item 4 (0.95) is outside the subset and does not count.
    # q1: target 2 is outside its subset {0, 1, 3}: a miss at every K.
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6, 0.95, 0.1],
            [0.1, 0.2, 0.9, 0.3, 0.4, 0.5],
        ]
    )
    r = recall_subset_at_k(
        scores, [2, 2], [[0, 1, 2, 3], [0, 1, 3]], ks=(1, 2, 3), exclude=[0, None]
    )
    assert r == {"Rsubset@1": 0.0, "Rsubset@2": 50.0, "Rsubset@3": 50.0}


# q0 ranks the gallery [3, 1, 4, 0, 5, 2]; its ground truths {1, 0, 2} sit at ranks 2, 4 and 6:
# rel = [0,1,0,1,0,1], P@2 = 1/2, P@4 = 2/4, P@6 = 3/6.
# AP@1 = 0, AP@2 = (1/2)/min(2,3) = 1/4, AP@4 = (1/2+1/2)/3 = 1/3, AP@10 = (3 * 1/2)/3 = 1/2.
# q1 has one ground truth (3) at rank 1: AP@K = 1 for every K.
MAP_SCORES = torch.tensor(
    [
        [0.6, 0.8, 0.4, 0.9, 0.7, 0.5],
        [0.1, 0.2, 0.3, 0.9, 0.4, 0.5],
    ]
)


def test_map_by_hand():
    m = map_at_k(MAP_SCORES, [[1, 0, 2], [3]], ks=(1, 2, 4, 10))
    assert m == pytest.approx(
        {"mAP@1": 50.0, "mAP@2": 62.5, "mAP@4": 100 * (1 / 3 + 1) / 2, "mAP@10": 75.0}
    )


def test_map_duplicates_count_once_and_exclusion_shifts_ranks():
    assert map_at_k(MAP_SCORES, [[1, 1, 0, 2], [3]], ks=(4,)) == pytest.approx(
        map_at_k(MAP_SCORES, [[1, 0, 2], [3]], ks=(4,))
    )
    # Excluding q0's top hit 3: ranking [1, 4, 0, 5, 2], rel [1,0,1,0,1].
    # AP@2 = 1/2, AP@4 = (1 + 2/3)/3 = 5/9.
    m = map_at_k(MAP_SCORES[:1], [[1, 0, 2]], ks=(2, 4), exclude=[3])
    assert m == pytest.approx({"mAP@2": 50.0, "mAP@4": 100 * 5 / 9})


def test_caption_match_recall_by_hand():
    labels = ["red dress", "blue dress", "red dress", "green top"]
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.1]])
    # The query image 0 carries the target caption itself; excluded, the next match (2) is rank 2.
    assert caption_match_recall(scores, ["red dress"], labels, ks=(1, 2), exclude=[0]) == {
        "R@1": 0.0,
        "R@2": 100.0,
    }
    assert caption_match_recall(scores, ["red dress"], labels, ks=(1,)) == {"R@1": 100.0}
    with pytest.raises(ValueError, match="no gallery image has the target caption"):
        caption_match_recall(scores, ["pink hat"], labels)


def test_rank_gallery_excludes_caps_and_breaks_ties_with_the_seed():
    ranking = rank_gallery(SCORES, exclude=[0, None, None], k=10)
    assert ranking.shape == (3, 3)  # 4 images, one excluded from q0: at most 3 for every row
    assert ranking[0].tolist() == [2, 3, 1]
    assert ranking[1].tolist() == [1, 3, 0]
    tied = torch.zeros(1, 8)
    a, b = rank_gallery(tied, seed=1), rank_gallery(tied, seed=1)
    assert a.tolist() == b.tolist() and sorted(a[0].tolist()) == list(range(8))
    assert any(rank_gallery(tied, seed=s).tolist() != a.tolist() for s in range(2, 6))


def test_the_reference_codes_rankers_do_not_break_ties_by_gallery_order():
    """docs/evaluation.md on ties: CLIP4Cir/SPRC's torch.argsort and SEARLE's torch.topk give
    tied items in an order of their own, not the gallery's (an earlier page said otherwise)."""
    tied = torch.zeros(5000)
    assert not torch.equal(torch.argsort(tied, descending=True), torch.arange(5000))
    assert not torch.equal(torch.topk(tied, 50).indices, torch.arange(50))
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    ties = page[page.index("### Ties") : page.index("## Protocols")]
    assert "by gallery order" not in ties.replace('"by gallery order"', "")
    assert "torch.topk" in ties and "torch.argsort" in ties


def test_recall_read_off_a_ranking_equals_the_counted_recall():
    # Rounded scores leave many ties; both paths must order them the same way.
    gen = torch.Generator().manual_seed(0)
    scores = (torch.rand(300, 50, generator=gen) * 4).round()
    targets = torch.randint(0, 50, (300,), generator=gen).tolist()
    exclude = [None if i % 3 else (t + 1) % 50 for i, t in enumerate(targets)]
    ranking = rank_gallery(scores, exclude=exclude, seed=3)
    for k in (1, 5, 10):
        hits = [t in row[:k].tolist() for t, row in zip(targets, ranking, strict=True)]
        expected = 100 * sum(hits) / len(hits)
        assert recall_at_k(scores, targets, ks=(k,), exclude=exclude, seed=3)[f"R@{k}"] == (
            pytest.approx(expected)
        )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: recall_at_k(torch.tensor([[float("nan"), 1.0]]), [0]), "NaN"),
        (lambda: recall_at_k(SCORES, [0, 1, 9]), r"targets\[2\]: gallery index 9"),
        (lambda: recall_at_k(SCORES, [0, 1]), "2 entries for 3 queries"),
        (lambda: recall_at_k(SCORES, TARGETS, ks=(0,)), "positive integers"),
        (lambda: recall_at_k(SCORES, [0, [], 1]), r"targets\[1\] is empty"),
        (lambda: recall_at_k(SCORES, TARGETS, exclude=[None]), "exclude has 1 entries"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()

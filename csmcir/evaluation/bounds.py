"""Rankers that bound what a model can score on a split, from its annotations alone.

A model that ignores the modification text ranks the gallery the same way for every query with
the same reference image. The best such ranking puts the reference's most frequent targets first,
so on a split where a reference has two queries with different targets, no text-blind model can
exceed 50% R@1 or Recall_subset@1. :func:`text_blind_scores` is that ranking as a score matrix:
its metrics, computed by the benchmark's own protocol, are the text-blind ceiling.
"""

from __future__ import annotations

from collections import Counter

import torch

from csmcir.evaluation.protocols import Prepared


def text_blind_scores(prepared: Prepared) -> torch.Tensor:
    """``[queries, gallery]``: how many queries of the same reference have each image as target.

    Ties are broken by gallery order, the same for every query of a reference, so no query gets
    a text-dependent ordering through the metrics' per-query random tie-break.
    """
    split = prepared.split
    targets_of: dict[str, Counter[int]] = {}
    for q in split.queries:
        targets_of.setdefault(q.reference, Counter())[prepared.index_of(q.target, q, "target")] += 1
    n = len(split.gallery)
    order = -torch.arange(n, dtype=torch.float64) / n  # in (-1, 0]: below any count difference
    scores = order.repeat(len(split.queries), 1)
    for i, q in enumerate(split.queries):
        counts = targets_of[q.reference]
        scores[i, list(counts)] += torch.tensor(list(counts.values()), dtype=torch.float64)
    return scores

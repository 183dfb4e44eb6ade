"""Evaluation: metrics on score matrices, per-benchmark protocols, submissions, ``csmcir eval``."""

from csmcir.evaluation.metrics import (
    caption_match_recall,
    map_at_k,
    rank_gallery,
    recall_at_k,
    recall_subset_at_k,
    target_ranks,
)

__all__ = [
    "caption_match_recall",
    "map_at_k",
    "rank_gallery",
    "recall_at_k",
    "recall_subset_at_k",
    "target_ranks",
]

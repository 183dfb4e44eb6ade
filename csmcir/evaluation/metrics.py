"""Retrieval metrics on score matrices: Recall@K, Recall_subset@K, mAP@K, caption-matched recall.

Every function takes a score matrix ``scores[Nq, Ng]`` (higher is more similar) and gallery
*indices*, so evaluation, training-time validation and tests share one implementation. Values are
percentages (0-100), keyed by the names the papers print (``"R@10"``, ``"Rsubset@1"``, ``"mAP@5"``).

Two rules hold everywhere:

- **Exclusion.** ``exclude[i]`` (a gallery index or None) is removed from query i's ranking, e.g.
  the reference image under the CIRR protocol. A ground truth that is excluded can never be found.
- **Ties are broken at random with a fixed seed.** Query i orders tied gallery items by a random
  permutation drawn from a generator seeded with ``(seed, i)``. An untrained model whose
  embeddings are all equal therefore scores chance (R@K ≈ K / Ng): a strict ``>`` rank count
  would put every target first, and "ties count against the target" would score 0. The same
  permutation orders :func:`rank_gallery`, so a recall read off a ranking (a submission, a faiss
  search) equals the recall computed here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

# One ground truth (an index) or several; CIRCO queries have several.
Targets = Sequence[int | Sequence[int]]

# Rows of the score matrix handled at once, so [rows, Ng] temporaries stay small on big galleries.
_CHUNK_ELEMENTS = 1 << 24


def recall_at_k(
    scores: Tensor,
    targets: Targets,
    ks: Iterable[int] = (1, 5, 10, 50),
    exclude: Sequence[int | None] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Percentage of queries with a ground truth in their top K, for each K (``"R@K"``).

    With several ground truths per query, the best-ranked one counts. K above the gallery size
    is allowed: every rankable target is then found.
    """
    return recall_from_ranks(target_ranks(scores, targets, exclude=exclude, seed=seed), ks)


def recall_subset_at_k(
    scores: Tensor,
    targets: Sequence[int],
    subsets: Sequence[Sequence[int]],
    ks: Iterable[int] = (1, 2, 3),
    exclude: Sequence[int | None] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """CIRR's Recall_subset@K: the target's rank among its query's subset (``"Rsubset@K"``).

    ``subsets[i]`` holds gallery indices (CIRR: ``img_set.members``); ``exclude[i]`` is removed
    from it (CIRR: the reference). A target outside its subset is never found: a miss.
    """
    ranks = target_ranks(scores, targets, exclude=exclude, seed=seed, subsets=subsets)
    return recall_from_ranks(ranks, ks, name="Rsubset")


def recall_from_ranks(ranks: Tensor, ks: Iterable[int], name: str = "R") -> dict[str, float]:
    """``{"<name>@K": % of ranks <= K}`` from :func:`target_ranks`' output, so one ranking can be
    summarised over any subset of its queries (per modification type) without re-ranking."""
    return {f"{name}@{k}": _percent(ranks <= k) for k in _check_ks(ks)}


def caption_match_recall(
    scores: Tensor,
    target_labels: Sequence[str],
    gallery_labels: Sequence[str],
    ks: Iterable[int] = (1, 10, 50),
    exclude: Sequence[int | None] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Fashion200k's recall (TIRG): a hit is any retrieved image whose caption equals the target's.

    ``target_labels[i]`` is the caption of query i's target; ``gallery_labels[j]`` that of gallery
    image j. Every target label must occur in the gallery, else the split is malformed.
    """
    nq, ng = _check_scores(scores).shape
    if len(gallery_labels) != ng:
        raise ValueError(f"gallery_labels has {len(gallery_labels)} entries for {ng} images")
    if len(target_labels) != nq:
        raise ValueError(f"target_labels has {len(target_labels)} entries for {nq} queries")
    by_label: dict[str, list[int]] = {}
    for j, label in enumerate(gallery_labels):
        by_label.setdefault(label, []).append(j)
    targets: list[list[int]] = []
    for i, label in enumerate(target_labels):
        if label not in by_label:
            raise ValueError(f"query {i}: no gallery image has the target caption {label!r}")
        targets.append(by_label[label])
    return recall_at_k(scores, targets, ks, exclude=exclude, seed=seed)


def map_at_k(
    scores: Tensor,
    ground_truths: Sequence[Sequence[int]],
    ks: Iterable[int] = (5, 10, 25, 50),
    exclude: Sequence[int | None] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """CIRCO's mAP@K (``"mAP@K"``), with AP@K = sum_{i<=K} P@i * rel_i / min(K, |GT|).

    Duplicate ground-truth indices count once. An excluded ground truth still counts in |GT|.
    CIRCO's reference code ranks the whole gallery, the query's reference included (which is
    never a ground truth: ranked high, it only takes a place); ``exclude`` removes it instead.
    """
    ks = _check_ks(ks)
    nq, ng = _check_scores(scores).shape
    gts = _normalise_targets(ground_truths, nq, ng)
    ranking = rank_gallery(scores, exclude=exclude, k=max(ks), seed=seed)
    gt_mask = torch.zeros(nq, ng, dtype=torch.bool)
    for i, gt in enumerate(gts):
        gt_mask[i, gt] = True
    rel = gt_mask.gather(1, ranking).double()
    precision = rel.cumsum(1) / torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    n_gt = torch.tensor([len(gt) for gt in gts], dtype=torch.float64)
    result = {}
    for k in ks:
        ap = (precision[:, :k] * rel[:, :k]).sum(1) / n_gt.clamp(max=k)
        result[f"mAP@{k}"] = 100.0 * ap.mean().item()
    return result


def target_ranks(
    scores: Tensor,
    targets: Targets,
    exclude: Sequence[int | None] | None = None,
    seed: int = 0,
    subsets: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """1-based rank of each query's best-ranked ground truth; ``inf`` when none can be ranked.

    Ranks are counted, not sorted: greater scores plus the tied items that the seeded
    permutation puts first. ``subsets`` restricts each query's ranking to those gallery indices.
    """
    masked = _masked(scores, exclude, subsets)
    nq, ng = masked.shape
    gts = _normalise_targets(targets, nq, ng)
    rows = torch.tensor([i for i, gt in enumerate(gts) for _ in gt], dtype=torch.long)
    cols = torch.tensor([j for gt in gts for j in gt], dtype=torch.long)
    pair_ranks = torch.full((len(rows),), math.inf, dtype=torch.float64)
    step = max(1, _CHUNK_ELEMENTS // max(ng, 1))
    for start in range(0, len(rows), step):
        r, c = rows[start : start + step], cols[start : start + step]
        row_scores = masked[r]
        own = row_scores.gather(1, c[:, None])
        greater = (row_scores > own).sum(1)
        tied = (row_scores == own).sum(1) - 1
        rank = (greater + 1).double()
        for p in torch.nonzero(tied > 0).flatten().tolist():
            keys = _tie_keys(int(r[p]), ng, seed)
            ties_first = (row_scores[p] == own[p]) & (keys < keys[c[p]])
            rank[p] += ties_first.sum().item()
        rank[torch.isinf(own.squeeze(1))] = math.inf
        pair_ranks[start : start + step] = rank
    ranks = torch.full((nq,), math.inf, dtype=torch.float64)
    return ranks.scatter_reduce(0, rows, pair_ranks, reduce="amin")


def rank_gallery(
    scores: Tensor,
    exclude: Sequence[int | None] | None = None,
    k: int | None = None,
    seed: int = 0,
    subsets: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """The top-k gallery indices of every query, best first: a LongTensor ``[Nq, k']``.

    Excluded items (and, with ``subsets``, non-members) are never returned, so
    ``k' = min(k, fewest rankable items of any query)``; ``k=None`` ranks everything rankable.
    Ties follow the same seeded permutation as :func:`target_ranks`.
    """
    masked = _masked(scores, exclude, subsets)
    nq, ng = masked.shape
    rankable = int(torch.isfinite(masked).sum(1).min().item()) if nq else ng
    k_out = rankable if k is None else min(_check_ks([k])[0], rankable)
    out = torch.empty(nq, k_out, dtype=torch.long)
    if k_out == 0:
        return out
    k_probe = min(k_out + 1, ng)
    step = max(1, _CHUNK_ELEMENTS // max(ng, 1))
    for start in range(0, nq, step):
        chunk = masked[start : start + step]
        values, indices = chunk.topk(k_probe, dim=1)
        out[start : start + step] = indices[:, :k_out]
        if k_probe < 2:
            continue
        # A tie anywhere in the top k (or at its boundary) needs the seeded order.
        has_tie = (values[:, :-1] == values[:, 1:]).any(1)
        for p in torch.nonzero(has_tie).flatten().tolist():
            row = start + p
            keys = _tie_keys(row, ng, seed)
            by_key = torch.argsort(keys)
            order = torch.argsort(chunk[p][by_key], descending=True, stable=True)
            out[row] = by_key[order[:k_out]]
    return out


def _tie_keys(row: int, n: int, seed: int) -> Tensor:
    """Query ``row``'s random priority of every gallery item (a permutation: no ties left)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + row) % (1 << 63))
    return torch.randperm(n, generator=generator)


def _masked(
    scores: Tensor,
    exclude: Sequence[int | None] | None,
    subsets: Sequence[Sequence[int]] | None,
) -> Tensor:
    """Scores as float64 with ``-inf`` wherever an item may not be ranked."""
    scores = _check_scores(scores)
    nq, ng = scores.shape
    masked = scores.detach().to(device="cpu", dtype=torch.float64)
    if subsets is not None:
        if len(subsets) != nq:
            raise ValueError(f"subsets has {len(subsets)} entries for {nq} queries")
        allowed = torch.zeros(nq, ng, dtype=torch.bool)
        for i, members in enumerate(subsets):
            allowed[i, _check_indices(members, ng, f"subsets[{i}]")] = True
        masked = masked.masked_fill(~allowed, -math.inf)
    else:
        masked = masked.clone()
    if exclude is not None:
        if len(exclude) != nq:
            raise ValueError(f"exclude has {len(exclude)} entries for {nq} queries")
        for i, j in enumerate(exclude):
            if j is not None:
                masked[i, _check_indices([j], ng, f"exclude[{i}]")] = -math.inf
    return masked


def _check_scores(scores: Tensor) -> Tensor:
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        raise ValueError("scores must be a 2-D tensor [queries, gallery]")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values: the model produced bad embeddings")
    return scores


def _normalise_targets(targets: Targets, nq: int, ng: int) -> list[list[int]]:
    if len(targets) != nq:
        raise ValueError(f"targets has {len(targets)} entries for {nq} queries")
    out = []
    for i, t in enumerate(targets):
        ids = [t] if isinstance(t, int) or (isinstance(t, Tensor) and t.ndim == 0) else list(t)
        if not ids:
            raise ValueError(f"targets[{i}] is empty: every query needs a ground truth")
        out.append(list(dict.fromkeys(_check_indices(ids, ng, f"targets[{i}]"))))
    return out


def _check_indices(ids: Sequence[int], ng: int, what: str) -> list[int]:
    ids = [int(j) for j in ids]
    bad = [j for j in ids if not 0 <= j < ng]
    if bad:
        raise ValueError(f"{what}: gallery index {bad[0]} outside 0..{ng - 1}")
    return ids


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"K values must be positive integers, got {ks}")
    return ks


def _percent(hits: Tensor) -> float:
    return 100.0 * hits.double().mean().item() if hits.numel() else 0.0

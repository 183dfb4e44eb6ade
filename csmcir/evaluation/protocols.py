"""Per-benchmark evaluation protocols: which metrics, which gallery, which exclusions.

A protocol turns a loaded :class:`CIRSplit` plus a score matrix into the benchmark's metrics as
the community's reference code computes them (DESIGN.md, docs/evaluation.md):

- CIRR and the synthetic benchmark: R@1/5/10/50 on the main target, Recall_subset@1/2/3 inside
  ``img_set.members`` minus the reference, and Avg = (R@5 + Rsubset@1) / 2.
- FashionIQ: R@10 and R@50 per category; over the categories their averages and the mean of the
  two averages.
- CIRCO: mAP@5/10/25/50 over all ground truths, plus R@5/10/25/50 on ``target_img_id`` (the
  cut-offs of its evaluation server), ranking the whole gallery, reference included.
- Shoes: R@1/10/50. Fashion200k: R@1/10/50 where a hit is any image with the target's caption.

The choices the literature varies (reference exclusion, FashionIQ's caption join) are options
whose defaults are the community's; the values used are recorded with every result.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from csmcir.data.fashioniq import join_captions, single_caption
from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.errors import ConfigError, DataError
from csmcir.evaluation.metrics import (
    caption_match_recall,
    map_at_k,
    rank_gallery,
    recall_at_k,
    recall_from_ranks,
    target_ranks,
)

# FashionIQ's two captions -> one text. "and" is CLIP4Cir/SPRC's evaluation rule.
CAPTION_JOINS: dict[str, Callable[[CIRQuery], str]] = {
    "and": lambda q: join_captions(q.texts[0], q.texts[1]),
    "reverse": lambda q: join_captions(q.texts[1], q.texts[0]),
    "first": lambda q: single_caption(q.texts[0]),
    "second": lambda q: single_caption(q.texts[1]),
}
DEFAULT_JOIN = "and"
# CIRCO's evaluation server reports mAP@K and Recall@K at these K (miccunifi/CIRCO evaluation.py).
CIRCO_KS = (5, 10, 25, 50)


@dataclass(frozen=True)
class Options:
    """Protocol options. ``exclude_reference=None`` keeps the benchmark's community default."""

    exclude_reference: bool | None = None
    caption_join: str = DEFAULT_JOIN
    seed: int = 0


def family(benchmark: str) -> str:
    """``fashioniq-dress`` -> ``fashioniq``: the protocol a split's benchmark name follows."""
    name = benchmark.split("-")[0]
    if name not in METRICS:
        raise ConfigError(f"no evaluation protocol for benchmark {benchmark!r}")
    return name


def apply_options(split: CIRSplit, options: Options) -> dict[str, object]:
    """Set the protocol options on a loaded split; returns the values in force, for the record."""
    if options.exclude_reference is not None:
        split.exclude_reference = options.exclude_reference
    multi = any(len(q.texts) > 1 for q in split.queries)
    if options.caption_join not in CAPTION_JOINS:
        choices = ", ".join(CAPTION_JOINS)
        raise ConfigError(f"--caption-join must be one of {choices}, got {options.caption_join!r}")
    if multi:
        split.eval_text = CAPTION_JOINS[options.caption_join]
    elif options.caption_join != DEFAULT_JOIN:
        raise ConfigError(
            f"--caption-join applies to benchmarks with two captions per query (FashionIQ); "
            f"{split.benchmark} has one"
        )
    return {
        "exclude_reference": split.exclude_reference,
        "reference": reference_rule(split),
        "caption_join": options.caption_join if multi else "n/a (one caption per query)",
        "tie_break": f"random, seed {options.seed}",
    }


def reference_rule(split: CIRSplit) -> str:
    """How the query's reference is ranked, and whether that is the benchmark's own protocol."""
    from csmcir.data.registry import spec

    name = family(split.benchmark)
    official = inspect.signature(spec(name).read).parameters["exclude_reference"].default
    rule = "removed from its ranking" if split.exclude_reference else "ranked with the gallery"
    if split.exclude_reference == official:
        return f"{rule} ({name}'s protocol)"
    flag = "yes" if split.exclude_reference else "no"
    other = "ranks it" if not official else "removes it"
    return f"{rule} by --exclude-reference {flag} (not {name}'s protocol, which {other})"


@dataclass
class Prepared:
    """A split in index form: what the metrics need besides the scores."""

    split: CIRSplit
    gallery_index: dict[str, int]
    texts: list[str]
    exclude: list[int | None]

    def index_of(self, image_id: str, query: CIRQuery, role: str) -> int:
        try:
            return self.gallery_index[image_id]
        except KeyError:
            raise DataError(
                f"{self.split.benchmark} {self.split.split}: query {query.query_id}'s {role} "
                f"{image_id!r} is not in the gallery"
            ) from None


def prepare(split: CIRSplit) -> Prepared:
    index = {image_id: i for i, image_id in enumerate(split.gallery)}
    exclude = [index.get(q.reference) if split.exclude_reference else None for q in split.queries]
    return Prepared(split, index, [split.eval_text(q) for q in split.queries], exclude)


def compute(scores: torch.Tensor, prepared: Prepared, seed: int = 0) -> dict[str, float]:
    """The benchmark's metrics for a ``[queries, gallery]`` score matrix."""
    split = prepared.split
    if not split.has_targets:
        raise DataError(
            f"{split.benchmark} {split.split} has no public answers: metrics need a split with "
            "targets (write a test-server file with --submission instead)"
        )
    return METRICS[family(split.benchmark)](scores, prepared, seed)


def query_groups(split: CIRSplit) -> dict[str, list[int]]:
    """Query rows by modification type (``extra["mod_type"]``) and, where the annotation says
    what a modification edits, by that too (``change:color`` from ``extra["mod_attribute"]``);
    empty for benchmarks without types."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(split.queries):
        kind = q.extra.get("mod_type")
        if kind is None:
            continue
        groups.setdefault(kind, []).append(i)
        if q.extra.get("mod_attribute"):
            groups.setdefault(f"{kind}:{q.extra['mod_attribute']}", []).append(i)
    return dict(sorted(groups.items()))


def by_type(scores: torch.Tensor, prepared: Prepared, seed: int = 0) -> dict[str, dict]:
    """The metrics of each query group of :func:`query_groups`, with its query count.

    Read off the same ranking as :func:`compute` (ties included), so a type's figures are those
    its queries contribute to the overall ones. Only the CIRR protocol (which the synthetic
    benchmark follows) records modification types.
    """
    groups = query_groups(prepared.split)
    if not groups:
        return {}
    if METRICS[family(prepared.split.benchmark)] is not _cirr:
        raise ConfigError(f"{prepared.split.benchmark}: per-type metrics follow the CIRR protocol")
    ranks, subset_ranks = _cirr_ranks(scores, prepared, seed)
    return {
        name: {"queries": len(rows)} | _cirr_summary(ranks[rows], subset_ranks[rows])
        for name, rows in groups.items()
    }


def top1_in_subset(scores: torch.Tensor, prepared: Prepared, seed: int = 0) -> dict[str, float]:
    """R@1 taken apart: how often the first result (reference excluded) is one of the query's
    subset (CIRR's ``img_set``, the synthetic benchmark's look-alike group), and R@1 among those
    queries. Their product is R@1, so a model behind on R@1 is shown to be behind at finding
    the group or at choosing inside it. Empty for splits without subsets."""
    queries = prepared.split.queries
    if METRICS[family(prepared.split.benchmark)] is not _cirr or not all(q.subset for q in queries):
        return {}
    members = [
        [j for j in _subset(prepared, q) if j != prepared.exclude[i]] for i, q in enumerate(queries)
    ]
    in_subset = target_ranks(scores, members, exclude=prepared.exclude, seed=seed) <= 1
    hits = main_target_ranks(scores, prepared, seed) <= 1
    found = int(in_subset.sum())
    return {
        "top-1 in subset": 100.0 * found / len(queries),
        "R@1 | top-1 in subset": 100.0 * int((hits & in_subset).sum()) / found if found else 0.0,
    }


def _subset(p: Prepared, q: CIRQuery) -> list[int]:
    return [p.index_of(m, q, "subset member") for m in q.subset or ()]


def _main_targets(p: Prepared) -> list[int]:
    return [p.index_of(q.targets[0], q, "target") for q in p.split.queries]


def main_target_ranks(scores: torch.Tensor, p: Prepared, seed: int = 0) -> torch.Tensor:
    """Each query's rank of its (first) target in the whole gallery, under the split's protocol:
    reference excluded where it asks, ties broken as the metrics break them."""
    return target_ranks(scores, _main_targets(p), exclude=p.exclude, seed=seed)


def _cirr_ranks(scores: torch.Tensor, p: Prepared, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's target rank in the gallery and inside its subset."""
    targets = _main_targets(p)
    subsets = [_subset(p, q) for q in p.split.queries]
    return (
        target_ranks(scores, targets, exclude=p.exclude, seed=seed),
        target_ranks(scores, targets, exclude=p.exclude, seed=seed, subsets=subsets),
    )


def _cirr_summary(ranks: torch.Tensor, subset_ranks: torch.Tensor) -> dict[str, float]:
    r = recall_from_ranks(ranks, (1, 5, 10, 50))
    r |= recall_from_ranks(subset_ranks, (1, 2, 3), name="Rsubset")
    r["Avg"] = (r["R@5"] + r["Rsubset@1"]) / 2
    return r


def _cirr(scores: torch.Tensor, p: Prepared, seed: int) -> dict[str, float]:
    return _cirr_summary(*_cirr_ranks(scores, p, seed))


def _fashioniq(scores: torch.Tensor, p: Prepared, seed: int) -> dict[str, float]:
    return recall_at_k(scores, _main_targets(p), (10, 50), exclude=p.exclude, seed=seed)


def _circo(scores: torch.Tensor, p: Prepared, seed: int) -> dict[str, float]:
    gts = [[p.index_of(t, q, "ground truth") for t in q.targets] for q in p.split.queries]
    r = map_at_k(scores, gts, CIRCO_KS, exclude=p.exclude, seed=seed)
    return r | recall_at_k(scores, _main_targets(p), CIRCO_KS, exclude=p.exclude, seed=seed)


def _shoes(scores: torch.Tensor, p: Prepared, seed: int) -> dict[str, float]:
    return recall_at_k(scores, _main_targets(p), (1, 10, 50), exclude=p.exclude, seed=seed)


def _fashion200k(scores: torch.Tensor, p: Prepared, seed: int) -> dict[str, float]:
    labels = p.split.gallery_labels
    if labels is None:
        raise DataError(f"{p.split.benchmark}: caption-matched recall needs gallery_labels")
    gallery_labels = [labels[g] for g in p.split.gallery]
    target_labels = [gallery_labels[t] for t in _main_targets(p)]
    return caption_match_recall(
        scores, target_labels, gallery_labels, (1, 10, 50), exclude=p.exclude, seed=seed
    )


METRICS: dict[str, Callable[[torch.Tensor, Prepared, int], dict[str, float]]] = {
    "cirr": _cirr,
    "synthcir": _cirr,
    "fashioniq": _fashioniq,
    "circo": _circo,
    "shoes": _shoes,
    "fashion200k": _fashion200k,
}
# The figure a paper's table leads with (FashionIQ's "mean" exists over all three categories).
HEADLINE = {
    "cirr": "Avg",
    "synthcir": "Avg",
    "fashioniq": "mean",
    "circo": "mAP@10",
    "shoes": "R@10",
    "fashion200k": "R@10",
}


def fashioniq_summary(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """Averages of R@10 and R@50 over the categories, and the mean of the two averages."""
    n = len(per_category)
    avg10 = sum(m["R@10"] for m in per_category.values()) / n
    avg50 = sum(m["R@50"] for m in per_category.values()) / n
    return {"R@10": avg10, "R@50": avg50, "mean": (avg10 + avg50) / 2}


def submission_rankings(
    scores: torch.Tensor, prepared: Prepared, k: int, seed: int = 0, subset: bool = False
) -> list[list[str]]:
    """Each query's top-k gallery ids (within its subset when ``subset``), for a server file."""
    split = prepared.split
    subsets = None
    if subset:
        subsets = [
            [prepared.index_of(m, q, "subset member") for m in q.subset or ()]
            for q in split.queries
        ]
    ranking = rank_gallery(scores, exclude=prepared.exclude, k=k, seed=seed, subsets=subsets)
    if ranking.shape[1] < k:
        raise DataError(
            f"{split.benchmark} {split.split}: only {ranking.shape[1]} candidates per query, "
            f"the server wants {k}"
        )
    return [[split.gallery[j] for j in row] for row in ranking.tolist()]

"""Validation figures as logged during training, from ``csmcir.evaluation.protocols``.

Each split's metrics are the evaluation protocol's own (one implementation for ``csmcir eval`` and
training). This module only names them for the logger and picks ``val/score``, the single figure
that selects the best checkpoint: CIRR/synthcir Avg = (R@5 + Rsubset@1) / 2, FashionIQ the mean
of its category-averaged R@10 and R@50, Shoes and Fashion200k the mean of R@1, R@10 and R@50.
"""

from __future__ import annotations

from csmcir.evaluation.protocols import HEADLINE, family, fashioniq_summary

SCORE = "val/score"


def summarise(benchmark: str, per_split: dict[str, dict[str, float]]) -> dict[str, float]:
    """``val/<metric>`` for one split; ``val/<split>/<metric>`` and the combination for several."""
    if family(benchmark) == "fashioniq":  # per category, also when only one is trained
        combined = fashioniq_summary(per_split)
        logged = {f"val/{name}/{k}": v for name, m in per_split.items() for k, v in m.items()}
    elif len(per_split) == 1:
        combined = next(iter(per_split.values()))
        logged = {}
    else:
        raise ValueError(f"{benchmark} validates on one split, got {sorted(per_split)}")
    logged |= {f"val/{k}": v for k, v in combined.items()}
    key = HEADLINE.get(family(benchmark))
    if key is None:
        recalls = [v for k, v in combined.items() if k.startswith("R@")]
        logged[SCORE] = sum(recalls) / len(recalls)
    else:
        logged[SCORE] = combined[key]
    return logged

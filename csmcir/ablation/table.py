"""The ablation table: per variant, mean and spread over seeds, failures named; JSON and markdown.

Every variant run appears as a row, even when all of its seeds failed: a missing row would read as
a result. The spread is the sample standard deviation over the seeds that finished (none for one).
A row with ``compare_to`` also gets its paired difference: the same seed's runs subtracted, which
removes what a seed does to every row alike (its initialisation, its data order), so an effect
smaller than the seed spread of either row can still show, in sign, seed by seed.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from csmcir.ablation.config import AblationConfig, Variant

FAILED = "failed"


def summarise(
    config: AblationConfig, variants: list[Variant], seeds: list[int], records: list[dict]
) -> dict[str, Any]:
    """The table as data: one row per variant, in run order, plus the cells it was made from."""
    by_cell = {(r["variant"], r["seed"]): r for r in records}
    metrics = list(config.eval.metrics) or _metric_names(records)
    reference = _reference_budget(variants, records)
    rows = []
    for v in variants:
        cells = [by_cell[(v.name, s)] for s in seeds if (v.name, s) in by_cell]
        ok = [c for c in cells if c["status"] == "ok"]
        failed = {
            str(c["seed"]): {"stage": c.get("stage"), "error": (c.get("error") or [""])[-1]}
            for c in cells
            if c["status"] != "ok"
        }
        rows.append(
            {
                "variant": v.name,
                "label": v.label,
                "regime": v.regime(),
                "status": "ok" if not failed else ("partial" if ok else FAILED),
                "seeds_ok": [c["seed"] for c in ok],
                "seeds_failed": failed,
                "metrics": {
                    m: _spread({c["seed"]: c["metrics"].get(m) for c in ok}) for m in metrics
                },
                "train_s_mean": _mean([c["train_s"] for c in ok]),
                "budget_changes": {k: ok[0]["budget"].get(k) for k in v.changes_budget}
                if ok
                else {},
                "unequal_budget": _unequal(v, ok, reference),
            }
        )
    paired = list(config.eval.paired) or (["Avg"] if "Avg" in metrics else metrics[:1])
    by_name = {row["variant"]: row for row in rows}
    for v, row in zip(variants, rows, strict=True):
        other = by_name.get(v.compare_to)
        row["paired"] = [_paired(row, other, m) for m in paired] if v.compare_to else None
    return {
        "benchmark": config.benchmark,
        "config": str(config.path),
        "eval": {"split": config.eval.split, "weights": config.eval.weights},
        "budget": config.budget,
        "seeds": seeds,
        "metrics": metrics,
        "paired": paired,
        "rows": rows,
        "cells": records,
    }


def _metric_names(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(m for r in records if r["status"] == "ok" for m in r["metrics"]))


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def _spread(per_seed: dict[int, float | None]) -> dict[str, Any]:
    present = [v for v in per_seed.values() if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "values": {str(seed): v for seed, v in per_seed.items()},
    }


def _paired(row: dict[str, Any], other: dict[str, Any] | None, metric: str) -> dict:
    """``row - other`` on ``metric``, seed by seed, over the seeds both finished."""
    diffs: dict[int, float] = {}
    if other is not None:
        mine, theirs = row["metrics"][metric]["values"], other["metrics"][metric]["values"]
        for seed, value in mine.items():
            if value is not None and theirs.get(seed) is not None:
                diffs[int(seed)] = value - theirs[seed]
    spread = _spread(diffs)
    return {
        "against": other["variant"] if other is not None else None,
        "metric": metric,
        **spread,
        "ci95": _ci95(spread["mean"], spread["std"], len(diffs)),
        "higher": sum(d > 0 for d in diffs.values()),
        "lower": sum(d < 0 for d in diffs.values()),
    }


def _ci95(mean: float | None, std: float | None, n: int) -> list[float] | None:
    """Student-t 95% interval of a mean paired difference: a part "helps beyond the seed spread"
    when it excludes 0. With 5 seeds its half-width is 1.24 standard deviations."""
    if mean is None or std is None:
        return None
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return [mean - half, mean + half]


def fmt_paired(paired: dict[str, Any]) -> str:
    """``-3.1 ± 0.4 (3 of 3 lower)``."""
    if paired["against"] is None:
        return "its compare_to row was not run"
    if paired["mean"] is None:
        return "no seed of both rows finished"
    n = len(paired["values"])
    if paired["mean"] > 0:
        sign = f"{paired['higher']} of {n} higher"
    else:
        sign = f"{paired['lower']} of {n} lower"
    return f"{fmt(paired)} ({sign})"


def _by_seed(table: dict[str, Any]) -> list[str]:
    """The paired differences seed by seed, one line per row and metric: what the means hide."""
    rows = [r for r in table["rows"] if r.get("paired") and r["paired"][0]["against"]]
    if not rows:
        return []
    seeds = [str(s) for s in table["seeds"]]
    header = ["variant", "vs", "Δ", *(f"seed {s}" for s in seeds), "mean", "95% CI"]
    lines = [
        "",
        "Paired differences by seed (row minus its compare_to row), their mean and its Student-t "
        "95% interval:",
        "",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        for p in row["paired"]:
            values = [p["values"].get(s) for s in seeds]
            shown = ["" if v is None else f"{v:+.1f}" for v in values]
            mean = "" if p["mean"] is None else f"{p['mean']:+.1f}"
            ci = "" if p["ci95"] is None else f"{p['ci95'][0]:+.1f} to {p['ci95'][1]:+.1f}"
            cells = [row["variant"], p["against"], p["metric"], *shown, mean, ci]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reference_budget(variants: list[Variant], records: list[dict]) -> dict[str, Any] | None:
    """The effective budget of the first finished run of a row that keeps the equal budget."""
    equal = {v.name for v in variants if not v.changes_budget}
    for r in records:
        if r["status"] == "ok" and r["variant"] in equal:
            return r["budget"]
    return None


def _unequal(v: Variant, ok: list[dict], reference: dict[str, Any] | None) -> dict[str, Any]:
    """Budget keys a row's runs really had that differ from the grid's, where it did not say so:
    the runner's checks before training make this empty unless something slipped past them."""
    if reference is None:
        return {}
    differ: dict[str, Any] = {}
    for cell in ok:
        for key, value in cell["budget"].items():
            if key not in v.changes_budget and reference.get(key) != value:
                differ[key] = value
    return differ


def fmt(spread: dict[str, Any]) -> str:
    if spread["mean"] is None:
        return FAILED
    if spread["std"] is None:
        return f"{spread['mean']:.1f}"
    return f"{spread['mean']:.1f} ± {spread['std']:.1f}"


def cell_text(text: str) -> str:
    """Text that cannot break a markdown table row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(table: dict[str, Any], command: str, machine: str) -> str:
    seeds = ", ".join(map(str, table["seeds"]))
    budget = ", ".join(f"{k}={v}" for k, v in table["budget"].items())
    weights = {"model": "final weights", "best": "best-validation weights"}[
        table["eval"]["weights"]
    ]
    lines = [
        f"Ablation on {table['benchmark']}, {table['eval']['split']} split, {weights}. "
        f"Mean ± sample std over seeds {seeds} (one value: one seed finished).",
        f"Every row trains with {budget} unless its notes say otherwise.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}",
        "",
    ]
    compared = any(row.get("paired") for row in table["rows"])
    paired = table.get("paired", []) if compared else []
    header = ["variant", "what", "regime", "seeds ok", *table["metrics"]]
    header += ["paired with", *(f"Δ {m}" for m in paired)] if paired else []
    header += ["train s", "notes"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        tried = len(row["seeds_ok"]) + len(row["seeds_failed"])
        notes = [
            f"seed {seed} failed ({f['stage']}): {f['error']}"
            for seed, f in row["seeds_failed"].items()
        ]
        notes += [f"budget changed: {k}={v}" for k, v in row["budget_changes"].items()]
        notes += [f"UNEQUAL BUDGET: {k}={v}" for k, v in row["unequal_budget"].items()]
        deltas = row.get("paired") or []
        cells = [
            row["variant"],
            row["label"],
            row["regime"],
            f"{len(row['seeds_ok'])}/{tried}",
            *(fmt(row["metrics"][m]) for m in table["metrics"]),
            *([(deltas[0]["against"] or "") if deltas else ""] if paired else []),
            *((fmt_paired(d) for d in deltas) if deltas else [""] * len(paired)),
            "" if row["train_s_mean"] is None else f"{row['train_s_mean']:.0f}",
            "; ".join(notes),
        ]
        lines.append("| " + " | ".join(cell_text(c) for c in cells) + " |")
    lines += _by_seed(table)
    return "\n".join(lines) + "\n"

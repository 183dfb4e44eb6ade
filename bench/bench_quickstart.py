"""The README's main job, seed by seed: `csmcir quickstart --seed S` from nothing, timed.

Each seed runs the whole quickstart in a fresh process and fresh folders (its own synthetic
benchmark, captions, training, evaluation, index, grids and plot), as a user's first run does,
and reports the test-split recalls it printed and its wall time. The table gives each seed, then
the mean, standard deviation and minimum over the seeds.

    python -m bench.bench_quickstart [--seeds 0 1 2 3 4] [--device cpu] [--keep DIR]

``--keep DIR`` leaves each seed's folders in ``DIR/seed-S`` (the README's grids and tables come
from seed 0's); by default they go to a temporary folder that is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import update_section

COLUMNS = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Avg")
SUMMARY = Path("quickstart") / "summary.json"  # in the run folder, written by the quickstart


def run_seed(seed: int, folder: Path, device: str, extra: list[str] | None = None) -> dict:
    """One quickstart from nothing; its summary (recalls, stage times) and its wall time.
    ``extra``: more quickstart flags (a dry run's ``--size small --steps 4``)."""
    run_dir = folder / "run"
    command = [sys.executable, "-m", "csmcir", "quickstart", "--seed", str(seed)]
    command += ["--root", str(folder / "data"), "--run-dir", str(run_dir), "--device", device]
    command += extra or []
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"quickstart --seed {seed} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / SUMMARY).read_text())
    return {"seed": seed, "seconds": seconds, **summary}


def table(results: list[dict]) -> list[str]:
    def row(label: str, values: dict[str, float], seconds: float) -> str:
        cells = " | ".join(f"{values[c]:.1f}" for c in COLUMNS)
        return f"| {label} | {cells} | {seconds / 60:.2f} |"

    rows = [row(str(r["seed"]), r["table"]["trained"], r["seconds"]) for r in results]
    if len(results) > 1:
        metrics = [r["table"]["trained"] for r in results]
        seconds = [r["seconds"] for r in results]
        for label, stat in (("mean", statistics.mean), ("std", statistics.stdev), ("min", min)):
            values = {c: stat([m[c] for m in metrics]) for c in COLUMNS}
            rows.append(row(f"**{label}**", values, stat(seconds)))
    head = "| seed | " + " | ".join(COLUMNS) + " | wall time (min) |"
    return [head, "|" + " ---: |" * (len(COLUMNS) + 2), *rows]


TYPES = ("add", "remove", "change", "move")


def type_table(results: list[dict]) -> list[str]:
    """R@1 by modification type, seed by seed, and the lowest over the seeds."""
    rows = [
        f"| {r['seed']} | " + " | ".join(f"{r['by_type'][t]['R@1']:.1f}" for t in TYPES) + " |"
        for r in results
    ]
    lowest = [min(r["by_type"][t]["R@1"] for r in results) for t in TYPES]
    rows.append("| **min** | " + " | ".join(f"{v:.1f}" for v in lowest) + " |")
    head = "| seed | " + " | ".join(f"{t} R@1" for t in TYPES) + " |"
    return [head, "|" + " ---: |" * (len(TYPES) + 1), *rows]


def stage_times(results: list[dict]) -> str:
    stages = results[0]["stages"]
    mean = {s: statistics.mean(r["stages"][s] for r in results) for s in stages}
    return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in mean.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--device", default="cpu", help="cpu (the README's figures) or cuda")
    parser.add_argument(
        "--size", help="the quickstart's --size (default its own; small: a dry run)"
    )
    parser.add_argument("--steps", type=int, help="the quickstart's --steps (default its own)")
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--keep", type=Path, help="leave each seed's folders in DIR/seed-S")
    args = parser.parse_args()
    extra = ["--size", args.size] if args.size else []
    extra += ["--steps", str(args.steps)] if args.steps else []
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            results.append(
                run_seed(seed, (args.keep or Path(tmp)) / f"seed-{seed}", args.device, extra)
            )
            r = results[-1]
            print(
                f"seed {seed}: R@10 {r['table']['trained']['R@10']:.1f}, Rsubset@1 "
                f"{r['table']['trained']['Rsubset@1']:.1f}, {r['seconds'] / 60:.2f} min",
                flush=True,
            )
    body = [
        f"## Quickstart: test recall and wall time, seeds {', '.join(map(str, args.seeds))}",
        "",
        f"`csmcir quickstart --seed S --device {args.device}{''.join(' ' + e for e in extra)}` "
        "from nothing, one fresh process per seed: the seed's own synthetic "
        "benchmark, oracle MCoT captions, training (config synthcir), evaluation on the "
        "test split (768 queries, 2,304 images, CIRR protocol), index, retrieval grids and the "
        "embedding plot. Recall in %; wall time end to end.",
        "",
        *table(results),
        "",
        "By modification type (test split):",
        "",
        *type_table(results),
        "",
        f"Mean time per stage: {stage_times(results)}. Load average (1 min) of the machine: "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after.",
    ]
    print("\n".join(body))
    if not args.no_report:
        name = "quickstart" if args.device == "cpu" else "quickstart_cuda"
        update_section(name, "\n".join(body))


if __name__ == "__main__":
    main()

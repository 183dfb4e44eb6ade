"""``csmcir ablate``: train and evaluate a grid of variants over seeds, then write the table.

csmcir ablate --config ablation/synthcir --seeds 0 1 2
csmcir ablate --config ablation/synthcir --variants full no-bank --dry-run

Writes under --out (default: the config's ``out``, else runs/ablation/<config name>):
``ablation.md`` and ``ablation.json`` (the table; the config's ``table`` key renames them, so
grids that share an out keep their own tables and reuse each other's finished cells),
``cells/<variant>/seed<N>/`` (each run's log.txt, result.json, run folder and eval.json) and
``captions/`` (caption files it built).
A rerun skips the cells that finished with the same key (the csmcir version, each run's fit
config with every default filled in, its model config, eval command, captions and starting
weights), says why it reruns the others, and --force reruns them all. --dry-run prints each cell's
commands and whether it would run, and why. The exit status is 1 when any cell failed (the table
still lists it, with its error), or, with --dry-run, when any cell's settings are invalid.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
from importlib.metadata import version
from pathlib import Path

from csmcir.ablation.config import load_config
from csmcir.ablation.runner import INVALID, Grid
from csmcir.ablation.table import markdown, summarise
from csmcir.errors import ConfigError
from csmcir.io import atomic_write_json, atomic_write_text
from csmcir.threads import LANES_ENV, available_cores


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="ablation YAML: a file, or a packaged grid's name (ablation/synthcir, ablation/cirr)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the config's seeds)")
    p.add_argument("--out", type=Path, help="output folder (default: the config's out)")
    p.add_argument("--variants", nargs="+", help="run only these (and what they start from)")
    p.add_argument("--force", action="store_true", help="rerun cells that already finished")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each run's commands, whether it would run and why, and stop",
    )
    p.add_argument("--timeout", type=float, help="seconds after which one command is killed")
    p.add_argument(
        "--lanes",
        type=int,
        default=1,
        help="runs side by side (default 1); each run's torch threads are the cores divided by "
        "the lanes (docs/ablation.md)",
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="csmcir ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    seeds = list(dict.fromkeys(args.seeds or config.seeds))
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    if args.lanes < 1:
        raise ConfigError(f"--lanes must be at least 1, got {args.lanes}")
    out = args.out or config.out or Path("runs") / "ablation" / config.path.stem
    grid = Grid(config, out, seeds, args.variants, force=args.force, timeout=args.timeout)
    grid.check_inputs()
    if args.dry_run:
        planned = grid.plan()
        for cell, fit, evaluate, reason in planned:
            todo = f"runs: {reason}" if reason else "reuses its finished run"
            print(f"# {cell.key} ({cell.variant.regime()}): {todo}")
            print(shlex.join(fit))
            print(shlex.join(evaluate))
        invalid = sum(bool(r and r.startswith(INVALID)) for *_, r in planned)
        if invalid:
            print(f"invalid settings in {invalid} of {len(planned)} runs (the INVALID lines above)")
            return 1
        return 0
    os.environ[LANES_ENV] = str(args.lanes)  # each fit divides the cores by it
    records = grid.run_all(args.lanes)
    table = summarise(config, grid.variants, seeds, records)
    command = shlex.join(["csmcir", "ablate", *argv])
    machine = describe_machine()
    table = {"command": command, "machine": machine, **table}
    md, js = out / f"{config.table}.md", out / f"{config.table}.json"
    atomic_write_json(js, table)
    text = markdown(table, command, machine)
    atomic_write_text(md, text)
    print()
    print(text)
    failed = [r for r in records if r["status"] != "ok"]
    print(f"table: {md} and {js}")
    if failed:
        print(f"{len(failed)} of {len(records)} runs failed; their errors are in the notes column")
        return 1
    return 0


def describe_machine() -> str:
    """What the timings were measured on: OS, CPU model and count, Python, torch."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    threads = available_cores()
    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {threads} CPU threads, "
        f"Python {platform.python_version()}, torch {version('torch')}"
    )

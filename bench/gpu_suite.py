"""The GPU suite: every real-size figure the project needs from a CUDA machine, in one command.

Stages, each a process of its own with a time limit, in this order (a failing stage is
recorded and the next one runs):

1. ``tests``: ``pytest tests/test_cuda.py``;
2. ``cached_step``: the real-size cached training step at batch 32 and 128, fp32 and bf16, old
   and new data paths, profiled, TFLOP/s and MFU (``bench.bench_cached_step``);
3. ``loader``: the feature loader against the host's memory-copy limit, fit's prefetch thread
   included (``bench.bench_feature_loader``);
4. ``quickstart``: ``csmcir quickstart --device cuda`` once, recalls and time
   (``bench.bench_quickstart``);
5. ``extraction``: ViT-g feature extraction in bf16, batch 64-256, sdpa and eager attention,
   decoding and ``extract_features`` end to end, then with ``torch.compile``
   (``bench.bench_extraction``);
6. ``rehearsal``: the FashionIQ-shaped rehearsal, real annotation files, the whole ``fit``
   path with the bank (``bench.fiq_rehearsal``); skipped where the annotations are not found.

Each stage writes its own ``*_cuda`` section of BENCHMARKS.md naming the card; the suite adds
``gpu_suite_cuda``: the card, its bf16 peak and where the figure comes from, every stage's
status and time, the tests' result and the rehearsal's step rate against the benchmark's.
``--budget`` seconds bound the whole run (a stage is cut at what is left of it). ``--out DIR``
collects the log, ``suite.json`` and a copy of BENCHMARKS.md after every stage, so a run cut
short still hands back what it measured.

``--dry-run`` runs the same stages on the CPU with tiny shapes, into a copy of BENCHMARKS.md
under ``--out``: a test runs it, so a device call never fails on a typo.

    python -m bench.gpu_suite --out OUT            # on a CUDA machine, about 8 minutes
    python -m bench.gpu_suite --dry-run --out OUT  # anywhere, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.report import BENCHMARKS_MD, PEAK_SOURCE, peak_tflops, update_section
from csmcir.io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
# what the stages import beyond torch; a device image may lack some (carry them as wheels)
NEEDED = (
    "transformers", "lightning", "jsonargparse", "faiss", "open_clip", "safetensors",
    "tokenizers", "PIL", "matplotlib", "sklearn", "pytest",
)  # fmt: skip


@dataclass
class Stage:
    name: str
    full: list[str]  # arguments after `python -m`, on a CUDA machine
    dry: list[str]  # the same on the CPU with tiny shapes
    limit: float  # seconds at most, on a CUDA machine


def stages(json_dir: Path) -> list[Stage]:
    step, rehearsal = json_dir / "cached_step.json", json_dir / "rehearsal.json"
    return [
        Stage(
            "tests",
            ["pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
            ["pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
            100,
        ),
        Stage(
            "cached_step",
            [
                "bench.bench_cached_step",
                "--device",
                "cuda",
                "--batch-sizes",
                "32",
                "128",
                "--precisions",
                "fp32",
                "bf16",
                "--steps",
                "10",
                "--rounds",
                "2",
                "--warmup",
                "2",
                "--workers",
                "4",
                "--json",
                str(step),
            ],
            [
                "bench.bench_cached_step",
                "--size",
                "tiny",
                "--batch-sizes",
                "2",
                "--precisions",
                "bf16",
                "--steps",
                "1",
                "--rounds",
                "1",
                "--warmup",
                "1",
                "--workers",
                "1",
                "--json",
                str(step),
            ],
            90,
        ),
        Stage(
            "loader",
            [
                "bench.bench_feature_loader",
                "--threads",
                "1",
                "--rounds",
                "3",
                "--section",
                "feature_loader_cuda",
            ],
            [
                "bench.bench_feature_loader",
                "--images",
                "64",
                "--batch-sizes",
                "4",
                "--rounds",
                "1",
                "--batches",
                "4",
                "--section",
                "feature_loader_cuda",
            ],
            30,
        ),
        Stage(
            "quickstart",
            ["bench.bench_quickstart", "--seeds", "0", "--device", "cuda"],
            [
                "bench.bench_quickstart",
                "--seeds",
                "0",
                "--device",
                "cpu",
                "--size",
                "small",
                "--steps",
                "4",
            ],
            80,
        ),
        Stage(
            "extraction",
            ["bench.bench_extraction", "--device", "cuda"],
            [
                "bench.bench_extraction",
                "--size",
                "tiny",
                "--batch-sizes",
                "2",
                "4",
                "--repeats",
                "1",
                "--warmup",
                "1",
                "--images",
                "8",
                "--workers",
                "2",
                "--compile-backend",
                "eager",
            ],
            150,
        ),
        Stage(
            "rehearsal",
            ["bench.fiq_rehearsal", "--device", "cuda", "--json", str(rehearsal)],
            [
                "bench.fiq_rehearsal",
                "--device",
                "cpu",
                "--size",
                "tiny",
                "--steps",
                "3",
                "--skip",
                "1",
                "--batch-size",
                "4",
                "--train-queries",
                "8",
                "--val-queries",
                "4",
                "--precision",
                "fp32",
                "--json",
                str(rehearsal),
            ],
            150,
        ),
    ]


@dataclass
class Result:
    name: str
    status: str  # ok | failed (exit N) | timed out | skipped: why
    seconds: float = 0.0
    tail: list[str] = field(default_factory=list)


def preflight() -> list[str]:
    """The packages the stages need that this Python lacks (named as pip knows them)."""
    missing = []
    for module in NEEDED:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def run_stage(stage: Stage, args: argparse.Namespace, left: float, env: dict, log) -> Result:
    given = stage.name == "rehearsal" and args.annotations is not None
    extra = ["--annotations", str(args.annotations)] if given else []
    command = [sys.executable, "-m", *(stage.dry if args.dry_run else stage.full), *extra]
    limit = min(stage.limit * args.limit_scale, left)
    if limit < 10:
        return Result(stage.name, "skipped: the budget is spent")
    log.write(f"\n=== {stage.name} (limit {limit:.0f} s): {' '.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=limit,
        )  # fmt: skip
        output, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as e:
        output, code = (e.stdout or b"").decode(errors="replace"), None
    seconds = time.perf_counter() - start
    log.write(output)
    log.flush()
    tail = [line for line in output.splitlines() if line.strip()][-3:]
    if code is None:
        status = "timed out"
    elif code == 0:
        status = "ok"
    elif stage.name == "rehearsal" and code == 3:
        status = tail[-1] if tail else "skipped: no annotation files"
    else:
        status = f"failed (exit {code})"
    print(f"[suite] {stage.name}: {status} in {seconds:.0f} s", flush=True)
    return Result(stage.name, status, seconds, tail)


def card(device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU (dry run)"
    top = peak_tflops(device, "bf16")
    peak = f"{top:.0f} TFLOP/s bf16 dense ({PEAK_SOURCE})" if top else "peak unknown: no MFU"
    return f"{torch.cuda.get_device_name(device)}, {peak}"


def comparison(json_dir: Path) -> str | None:
    """The rehearsal's step through ``fit`` against the benchmark's bf16 batch-128 step."""
    try:
        rehearsal = json.loads((json_dir / "rehearsal.json").read_text())
        rows = json.loads((json_dir / "cached_step.json").read_text())
    except (OSError, ValueError):
        return None
    batch = rehearsal["batch_size"]
    bench = [r for r in rows if (r["batch"], r["precision"], r["path"]) == (batch, "bf16", "new")]
    if not bench:
        return None
    ratio = rehearsal["ms_per_step"] / bench[0]["loop_ms"]
    return (
        f"The rehearsal's step through `fit` (bank open, Lightning, logging) took "
        f"{rehearsal['ms_per_step']:.1f} ms at batch {batch}, the benchmark's bf16 step through "
        f"the same loader {bench[0]['loop_ms']:.1f} ms: {ratio:.2f}x."
    )


def summary(results: list[Result], args: argparse.Namespace, json_dir: Path) -> str:
    device = torch.device("cpu" if args.dry_run else "cuda")
    rows = [
        f"| {r.name} | {r.status} | {r.seconds:.0f} | {(r.tail or [''])[-1].replace('|', '/')} |"
        for r in results
    ]
    compared = comparison(json_dir)
    return "\n".join(
        [
            "## GPU suite",
            "",
            f"On {card(device)}. `python -m bench.gpu_suite` ran each stage in a process of "
            f"its own, {sum(r.seconds for r in results) / 60:.1f} minutes in all; each stage's "
            "figures are in its own `*_cuda` section (`cached_step_cuda`, "
            "`feature_loader_cuda`, `extraction_cuda`, `fiq_rehearsal_cuda`, "
            "`quickstart_cuda`).",
            "",
            "| stage | status | seconds | last line of its output |",
            "| --- | --- | ---: | --- |",
            *rows,
            *([] if compared is None else ["", compared]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU with tiny shapes")
    parser.add_argument("--out", type=Path, help="log, suite.json and BENCHMARKS.md copies")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all stages")
    parser.add_argument("--stages", nargs="+", help="run only these (default: all)")
    parser.add_argument("--annotations", type=Path, help="FashionIQ folder for the rehearsal")
    args = parser.parse_args()
    args.limit_scale = 3.0 if args.dry_run else 1.0  # a slow shared CPU
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or --dry-run")
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"[suite] log, suite.json and stage figures in {out}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    report = BENCHMARKS_MD
    if args.dry_run:  # never the repository's figures
        report = out / "BENCHMARKS.md"
        shutil.copyfile(BENCHMARKS_MD, report)
        env["CSMCIR_BENCHMARKS"] = str(report)
    missing = preflight()
    if missing:
        sys.exit(
            f"the stages need Python packages this machine lacks: {', '.join(missing)}; "
            "install them (pip install -e .) or carry them as wheels, then run again"
        )
    chosen = [s for s in stages(out) if not args.stages or s.name in args.stages]
    unknown = set(args.stages or ()) - {s.name for s in stages(out)}
    if unknown:
        parser.error(f"no such stage(s): {', '.join(sorted(unknown))}")
    deadline = time.perf_counter() + args.budget * args.limit_scale
    results: list[Result] = []
    with (out / "suite.log").open("a") as log:
        for stage in chosen:
            left = deadline - time.perf_counter()
            results.append(run_stage(stage, args, left, env, log))
            atomic_write_json(out / "suite.json", [asdict(r) for r in results])
            if args.out and not args.dry_run:
                shutil.copyfile(report, out / "BENCHMARKS.md")
    body = summary(results, args, out)
    print(body)
    update_section("gpu_suite_cuda", body, path=report)
    if args.out and not args.dry_run:
        shutil.copyfile(report, out / "BENCHMARKS.md")
    if any(r.status.startswith(("failed", "timed out")) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

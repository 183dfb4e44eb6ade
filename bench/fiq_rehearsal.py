"""A FashionIQ-shaped rehearsal of the real-size path, through the commands a user types.

The real FashionIQ annotation files (linked, never copied) with placeholder images written for
the first ``--train-queries`` training and ``--val-queries`` validation queries of each category
(every command drops the rest with ``--drop-missing``, counting them), a BLIP-2 retrieval folder
of the real architecture with random weights (written by ``csmcir export hf`` as the hub lays
it out), then ``csmcir features extract``, ``csmcir fit`` for ``--steps`` steps at the
configs' batch 128 in bf16 with the memory bank open from the first step, and ``csmcir eval``
on the three validation categories. Stage times, the step rate (from :class:`StepClock`, after
``--skip`` steps) and the figures go to the ``fiq_rehearsal`` section of BENCHMARKS.md and, with
``--json``, to a file.

The recalls mean nothing (random weights, placeholder images): the rehearsal proves the path
runs and measures its pace. ``--size tiny`` is a dry run on the CPU in seconds.

    python -m bench.fiq_rehearsal --device cuda
    python -m bench.fiq_rehearsal --size tiny --steps 3 --batch-size 4 --no-report
"""

from __future__ import annotations

import argparse
import colorsys
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image

from bench.bench_feature_cache import TEXTS
from bench.report import device_label, section_name, update_section
from csmcir.cli import main as csmcir_main
from csmcir.data.fashioniq import CATEGORIES
from csmcir.io import atomic_write_json
from csmcir.model import CSMCIR, build_wordpiece_tokenizer, load_preset
from csmcir.model.hf_export import export_hf

REPO = Path(__file__).resolve().parents[1]
# A checkout's own shared/ (the one that travels to a device machine), then the one beside it.
ANNOTATION_DIRS = [
    REPO / "shared" / "benchmarks" / "fashioniq",
    REPO.parent / "shared" / "benchmarks" / "fashioniq",
]
PRESETS = {"real": "blip2-vitg", "tiny": "tiny"}
SKIPPED = 3  # exit status: no annotation files, nothing ran


class StepClock(L.Callback):
    """Seconds from the end of training step ``skip`` to the end of the last one, both
    synchronised with the GPU, written to ``out`` as JSON: the steady training rate through
    ``fit`` itself (loader, bank, logging and all), validation left out."""

    def __init__(self, out: str, skip: int = 20) -> None:
        self.out, self.skip = Path(out), skip
        self.start: float | None = None

    def _now(self, module: L.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.skip:
            self.start = self._now(module)
        elif step == trainer.max_steps and self.start is not None:
            steps = step - self.skip
            seconds = self._now(module) - self.start
            atomic_write_json(self.out, {"steps": steps, "seconds": seconds})


def annotations(given: Path | None) -> Path | None:
    for folder in [given] if given else ANNOTATION_DIRS:
        if folder and (folder / "captions").is_dir() and (folder / "image_splits").is_dir():
            return folder
    return None


def fashioniq_subset(root: Path, source: Path, train: int, val: int) -> dict[str, Any]:
    """Link the annotation folders, write a placeholder PNG (a colour of its own) for each image
    of the first queries; the captions the model reads for those targets."""
    root.mkdir(parents=True)
    for name in ("captions", "image_splits"):
        (root / name).symlink_to(source / name, target_is_directory=True)
    ids: dict[str, set[str]] = {"train": set(), "val": set()}
    captions: dict[str, str] = {}
    queries = {"train": 0, "val": 0}
    for category in CATEGORIES:
        for split, n in (("train", train), ("val", val)):
            records = json.loads((root / f"captions/cap.{category}.{split}.json").read_text())
            for record in records[:n]:
                ids[split] |= {record["candidate"], record["target"]}
                # a modification text stands in for the target's MCoT caption: a real length
                captions.setdefault(record["target"], " and ".join(record["captions"]).strip())
                captions.setdefault(record["candidate"], record["captions"][0] or "a garment")
            queries[split] += len(records[:n])
    every = sorted(ids["train"] | ids["val"])
    (root / "images").mkdir()
    for k, image_id in enumerate(every):
        rgb = colorsys.hsv_to_rgb(k / len(every), 0.8, 0.9)
        Image.new("RGB", (8, 8), tuple(int(255 * c) for c in rgb)).save(
            root / "images" / f"{image_id}.png"
        )
    return {"images": len(every), "queries": queries, "captions": captions}


def blip2_folder(folder: Path, size: str, corpus: list[str], device: torch.device) -> None:
    """A BLIP-2 retrieval folder of the preset's architecture, random weights: built on
    ``device`` (seconds on a GPU) and written by ``csmcir export hf``'s code."""
    torch.manual_seed(0)
    config = load_preset(PRESETS[size]).config
    tokenizer = build_wordpiece_tokenizer(corpus + TEXTS, vocab_size=4096)
    with device:
        model = CSMCIR(config, tokenizer)
    export_hf(model.cpu(), folder)


def fit_config(path: Path, args: argparse.Namespace, folders: dict[str, Path]) -> None:
    accelerator = "gpu" if torch.device(args.device).type == "cuda" else "cpu"
    path.write_text(
        f"seed_everything: 0\ncheckpoint_every: 0\n"
        f"trainer:\n  accelerator: {accelerator}\n  devices: 1\n  max_steps: {args.steps}\n"
        f"  val_check_interval: {args.steps}\n  check_val_every_n_epoch: null\n"
        f"  num_sanity_val_steps: 0\n  log_every_n_steps: 50\n  enable_progress_bar: false\n"
        f"  default_root_dir: {folders['run']}\n"
        f"  callbacks:\n    - class_path: bench.fiq_rehearsal.StepClock\n"
        f"      init_args: {{out: {folders['clock']}, skip: {args.skip}}}\n"
        f"model:\n  init_from: {folders['blip2']}\n  lr: 2.0e-5\n  warmup_steps: 10\n"
        f"  model_options: {{precision: {args.precision}}}\n"
        f"  bank: {{enabled: true, open_entropy: null}}\n"
        f"data:\n  benchmark: fashioniq\n  root: {folders['root']}\n"
        f"  captions: {folders['captions']}\n  features: {folders['features']}\n"
        f"  drop_missing: true\n  batch_size: {args.batch_size}\n  val_batch_size: 256\n"
        f"  num_workers: 4\n"
    )


def run(argv: list[str]) -> None:
    code = csmcir_main(argv)
    if code != 0:
        raise SystemExit(f"csmcir {' '.join(argv[:2])} failed with status {code}")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rehearse(args: argparse.Namespace, source: Path, tmp: Path) -> dict[str, Any]:
    folders = {
        name: tmp / name
        for name in ("root", "blip2", "features", "run", "captions.json", "eval.json")
    }
    folders |= {"captions": folders["captions.json"], "clock": tmp / "clock.json"}
    device = args.device
    seconds: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - start
        print(f"[rehearsal] {name}: {seconds[name]:.1f} s", flush=True)
        return out

    subset = stage(
        "placeholder data",
        lambda: fashioniq_subset(folders["root"], source, args.train_queries, args.val_queries),
    )
    atomic_write_json(folders["captions"], subset["captions"])
    corpus = sorted(set(subset["captions"].values()))
    stage(
        "BLIP-2 folder",
        lambda: blip2_folder(folders["blip2"], args.size, corpus, torch.device(device)),
    )
    common = ["--benchmark", "fashioniq", "--root", str(folders["root"]), "--drop-missing"]
    stage(
        "features extract",
        lambda: run(
            [
                "features",
                "extract",
                "--model",
                str(folders["blip2"]),
                *common,
                "--split",
                "train",
                "--split",
                "val",
                "--device",
                device,
                "--out",
                str(folders["features"]),
            ]
        ),
    )
    fit_config(tmp / "fit.yaml", args, folders)
    stage("fit", lambda: run(["fit", "--config", str(tmp / "fit.yaml")]))
    stage(
        "eval",
        lambda: run(
            [
                "eval",
                "--model",
                str(folders["run"] / "model"),
                *common,
                "--captions",
                str(folders["captions"]),
                "--features",
                str(folders["features"]),
                "--no-cache",
                "--device",
                device,
                "--out",
                str(folders["eval.json"]),
            ]
        ),
    )
    clock = json.loads(folders["clock"].read_text())
    metrics = json.loads(folders["eval.json"].read_text())["metrics"]
    return {
        "device": device_label(torch.device(device)),
        "images": subset["images"],
        "queries": subset["queries"],
        "batch_size": args.batch_size,
        "steps": args.steps,
        "seconds": seconds,
        "ms_per_step": clock["seconds"] / clock["steps"] * 1e3,
        "timed_steps": clock["steps"],
        "metrics": metrics,
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
    pairs = result["batch_size"] / result["ms_per_step"] * 1e3
    fiq = {k: v for k, v in result["metrics"].items() if k.startswith("fashioniq")}
    recalls = "; ".join(
        f"{split.removeprefix('fashioniq-')} R@10 {m['R@10']:.1f}, R@50 {m['R@50']:.1f}"
        for split, m in fiq.items()
    )
    return "\n".join(
        [
            "## FashionIQ-shaped rehearsal of the real-size path",
            "",
            f"On {result['device']}: the real FashionIQ annotation files, placeholder images for "
            f"the first {args.train_queries} training and {args.val_queries} validation queries "
            f"of each category ({result['queries']['train']:,} and "
            f"{result['queries']['val']:,} queries, {result['images']:,} images; the commands "
            f"drop the rest with `--drop-missing`), a BLIP-2 retrieval folder of the "
            f"`{PRESETS[args.size]}` architecture with random weights, then `csmcir features "
            f"extract`, `csmcir fit` ({result['steps']} steps of batch {result['batch_size']}, "
            f"{args.precision}, memory bank open from step 1, a validation at the end) and "
            "`csmcir eval` on the three validation categories.",
            "",
            f"- training rate through `fit` (steps {args.skip}-{result['steps']}, synchronised "
            f"at both ends, validation excluded): **{result['ms_per_step']:.1f} ms a step**, "
            f"{pairs:,.0f} queries/s",
            f"- wall time per stage: {stages}",
            f"- recalls (random weights, placeholders: they prove the path, not the model): "
            f"{recalls}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=PRESETS, default="real", help="tiny: a dry run")
    parser.add_argument("--annotations", type=Path, help="a FashionIQ folder (captions/ ...)")
    parser.add_argument("--train-queries", type=int, default=400, help="per category")
    parser.add_argument("--val-queries", type=int, default=200, help="per category")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=50, help="steps before the clock starts")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    if args.skip >= args.steps:
        parser.error("--skip must be below --steps")
    source = annotations(args.annotations)
    if source is None:
        where = args.annotations or " or ".join(map(str, ANNOTATION_DIRS))
        print(f"skipped: no FashionIQ annotation files (captions/, image_splits/) at {where}")
        sys.exit(SKIPPED)
    with tempfile.TemporaryDirectory() as tmp:
        result = rehearse(args, source, Path(tmp))
    body = report(result, args)
    print(body)
    if args.json:
        atomic_write_json(args.json, result)
    if not args.no_report:
        update_section(section_name("fiq_rehearsal", torch.device(args.device)), body)


if __name__ == "__main__":
    main()

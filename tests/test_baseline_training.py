"""The CLIP4Cir baseline through the project's own trainer, exporter and ``csmcir eval``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from csmcir.baselines import CLIP4Cir
from csmcir.cli import main as csmcir_main
from csmcir.model import CSMCIR
from csmcir.packaged import config_file
from csmcir.train.cli import run
from csmcir.train.export import model_from_checkpoint

CONFIG = config_file("synthcir_clip4cir")
STEPS = 16


def losses(run_dir: Path) -> list[float]:
    with (run_dir / "logs" / "version_0" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


@pytest.mark.slow
def test_fit_lowers_the_loss_exports_and_evaluates(synthcir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["fit", "--config", str(CONFIG), "--data.root", str(synthcir)]
    args += ["--data.batch_size", "8", "--data.val_batch_size", "64"]
    args += ["--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(STEPS)]
    args += ["--trainer.val_check_interval", "8", "--trainer.log_every_n_steps", "1"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    args += ["--model.warmup_steps", "2", "--checkpoint_every", "0"]
    cli = run(args)  # no --data.captions: image-only targets need none
    trained = cli.model.model
    assert isinstance(trained, CLIP4Cir) and trained.config.preset == "clip4cir-tiny"

    curve = losses(run_dir)
    assert len(curve) == STEPS
    first, later = sum(curve[:4]) / 4, sum(curve[STEPS // 2 :]) / (STEPS - STEPS // 2)
    assert later < first - 0.3, curve  # InfoNCE at batch 8 starts near log(8) = 2.08

    # the exported folder and the best checkpoint rebuild the baseline, not a CSMCIR
    exported = CSMCIR.from_pretrained(run_dir / "model").eval()
    assert isinstance(exported, CLIP4Cir)
    assert exported.fingerprint() == trained.eval().fingerprint()
    best = model_from_checkpoint(run_dir / "best.ckpt")
    assert isinstance(best, CLIP4Cir)
    assert CSMCIR.from_pretrained(run_dir / "best").fingerprint() == best.fingerprint()

    # csmcir eval runs on the exported baseline without a caption file
    out = tmp_path / "eval.json"
    eval_args = ["eval", "--model", str(run_dir / "model"), "--benchmark", "synthcir"]
    eval_args += ["--root", str(synthcir), "--no-cache", "--device", "cpu", "--out", str(out)]
    assert csmcir_main(eval_args) == 0
    results = json.loads(out.read_text())
    assert results["model"]["target_text"] == "none"
    assert results["model"]["fingerprint"] == exported.fingerprint()
    metrics = results["metrics"]["synthcir"]
    assert metrics["Avg"] == pytest.approx((metrics["R@5"] + metrics["Rsubset@1"]) / 2)
    # the trainer's last validation saw the same split and model: the same recalls
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    for key in ("R@1", "R@5", "Rsubset@1"):
        assert metrics[key] == pytest.approx(logged[f"val/{key}"], abs=1e-4), key


def test_untrained_baseline_preset_evaluates_zero_shot(synthcir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    args = ["eval", "--model", "clip4cir-tiny", "--benchmark", "synthcir", "--root", str(synthcir)]
    args += ["--no-cache", "--device", "cpu", "--out", str(out)]
    assert csmcir_main(args) == 0
    results = json.loads(out.read_text())
    assert results["model"]["preset"] == "clip4cir-tiny"
    assert set(results["metrics"]["synthcir"]) >= {"R@1", "R@5", "Rsubset@1", "Avg"}
    assert all(0 <= v <= 100 for v in results["metrics"]["synthcir"].values())

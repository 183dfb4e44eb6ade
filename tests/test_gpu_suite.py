"""The GPU suite (``bench/gpu_suite.py``) runs every stage on the CPU with tiny shapes, so that
the call on a lent GPU machine never fails on a typo; its parts: the card's peak, the
rehearsal's skip without annotation files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED_BENCHMARKS

from bench import report
from bench.gpu_suite import stages

SECTIONS = ("cached_step", "feature_loader_cuda", "extraction", "fiq_rehearsal", "quickstart")


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=900
    )


def test_every_stage_runs_the_same_module_on_the_gpu_as_in_its_dry_run(tmp_path) -> None:
    for stage in stages(tmp_path):
        assert stage.full[0] == stage.dry[0], stage.name
        uses_gpu = "cuda" in stage.full or stage.name in ("tests", "loader")
        assert uses_gpu and "cuda" not in stage.dry, stage.name


@pytest.mark.parametrize(
    ("name", "bf16"),
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None)],
)  # fmt: skip
def test_the_cards_bf16_peak_comes_from_the_table(monkeypatch, name, bf16) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert report.peak_tflops(torch.device("cuda"), "bf16") == bf16
    assert report.peak_tflops(torch.device("cpu"), "bf16") is None
    expected = "-" if bf16 is None else f"{50e12 / (bf16 * 1e12) * 100:.1f}%"
    assert report.mfu(50e12, torch.device("cuda"), "bf16") == expected


def test_the_rehearsal_is_skipped_without_annotation_files(tmp_path) -> None:
    done = run("bench.fiq_rehearsal", "--annotations", str(tmp_path), "--no-report")
    assert done.returncode == 3 and "skipped: no FashionIQ annotation files" in done.stdout


@pytest.mark.slow
def test_the_dry_run_runs_every_stage_into_a_copy_of_the_report(tmp_path) -> None:
    before = report.BENCHMARKS_MD.read_bytes()
    argv = ["bench.gpu_suite", "--dry-run", "--out", str(tmp_path)]
    annotations = SHARED_BENCHMARKS / "fashioniq"
    if annotations.is_dir():
        argv += ["--annotations", str(annotations)]
    done = run(*argv)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {r["name"]: r["status"] for r in json.loads((tmp_path / "suite.json").read_text())}
    assert list(results) == [s.name for s in stages(tmp_path)]
    rehearsal = "ok" if annotations.is_dir() else "skipped: no FashionIQ"
    assert results.pop("rehearsal").startswith(rehearsal)
    assert set(results.values()) == {"ok"}
    copy = (tmp_path / "BENCHMARKS.md").read_text()
    for section in [*SECTIONS, "gpu_suite_cuda"]:
        if section == "fiq_rehearsal" and not annotations.is_dir():
            continue
        assert f"<!-- bench:{section} -->" in copy, section
    assert "| tests | ok |" in copy and "On CPU (dry run)" in copy
    assert report.BENCHMARKS_MD.read_bytes() == before  # the repository's figures untouched
    assert Path(tmp_path / "suite.log").stat().st_size > 0

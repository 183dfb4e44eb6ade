"""``--device`` (and ``fit``'s ``--trainer.accelerator``): a GPU the machine lacks is refused
by every command in one message, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from csmcir.cli import main as csmcir_main
from csmcir.device import check_accelerator, resolve_device
from csmcir.errors import ConfigError


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a CUDA GPU, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def commands(tmp: Path) -> dict[str, list[str]]:
    """Every command that takes --device, with arguments that would otherwise start work in
    ``tmp`` (or fail later, on the data they name)."""
    data = ["--benchmark", "synthcir", "--root", str(tmp / "data")]
    return {
        "quickstart": ["quickstart", "--root", str(tmp / "qs"), "--run-dir", str(tmp / "run")],
        "eval": ["eval", "--model", "tiny", *data],
        "index": ["index", "build", "--model", "tiny", *data, "--out", str(tmp / "index")],
        "search": ["search", "--index", str(tmp / "index"), "--ref", "r.png", "--text", "red"],
        "demo": ["demo", "--index", str(tmp / "index")],
        "features": ["features", "extract", "--model", "tiny", *data, "--out", str(tmp / "f")],
        "plot": ["plot", "embeddings", "--models", "tiny", *data, "--out", str(tmp / "p.png")],
        "caption": [
            "caption",
            "run",
            "--backend",
            "hf",
            "--model-dir",
            str(tmp),
            *data,
            "--split",
            "val",
            "--out",
            str(tmp / "shards"),
        ],
    }


@pytest.mark.parametrize("command", list(commands(Path())))
def test_every_device_command_refuses_a_missing_gpu_before_any_work(
    command, no_gpu, tmp_path, capsys
):
    argv = [*commands(tmp_path)[command], "--device", "cuda"]
    assert csmcir_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert "--device cuda: " in lines[0]
    assert "NVIDIA" in lines[0] or "CPU-only" in lines[0]
    assert "--device cpu" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was made


def test_fit_refuses_a_gpu_accelerator_before_building_anything(no_gpu, tmp_path, capsys):
    argv = ["fit", "--config", "synthcir"]
    argv += ["--trainer.accelerator", "gpu", "--trainer.default_root_dir", str(tmp_path / "run")]
    assert csmcir_main([*argv, "--data.root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "csmcir fit: error: --trainer.accelerator gpu: " in err
    assert "--trainer.accelerator cpu" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_auto_and_cpu_resolve_without_a_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    check_accelerator("cpu", 2)
    check_accelerator("auto", "auto")


def test_gpu_numbers_the_machine_lacks_are_named(one_gpu):
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"--device cuda:1: this machine has 1 CUDA GPU\(s\)"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"--trainer.devices \[0, 2\]: .* numbered 0 to 0"):
        check_accelerator("gpu", [0, 2])
    with pytest.raises(ConfigError, match=r"--trainer.devices 2: this machine has 1"):
        check_accelerator("cuda", 2)
    check_accelerator("gpu", "0")


def test_a_name_that_is_no_device_is_refused():
    with pytest.raises(ConfigError, match="--device 'gpu0' is not a device: use auto"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match=r"runs on .* not meta"):
        resolve_device("meta")

"""Raw error paths turned into one message that names the file or flag and how to go on
(issue 23): errors from DataLoader workers, outputs checked before work, ports in use,
interrupted runs, empty splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from csmcir.cli import main as csmcir_main


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthcir")
    args = ["data", "synth", "--out", str(root), "--train-refs", "4", "--val-refs", "4"]
    assert csmcir_main([*args, "--test-refs", "2"]) == 0
    return root


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("csmcir ")]


def test_a_worker_error_is_the_same_one_message_as_in_the_main_process(
    tiny_synth, tmp_path, capsys
):
    root = tmp_path / "synthcir"
    shutil.copytree(tiny_synth, root)
    image = sorted((root / "val").glob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:200])  # truncated
    said = []
    for workers in ("0", "1"):
        argv = ["eval", "--model", "tiny", "--benchmark", "synthcir", "--root", str(root)]
        argv += ["--empty-captions", "--no-cache", "--workers", workers, "--device", "cpu"]
        assert csmcir_main([*argv, "--out", str(tmp_path / f"eval{workers}.json")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "worker process" not in err
        said.append(error_lines(err))
    assert said[0] == said[1]
    assert len(said[0]) == 1 and f"unreadable image {image}" in said[0][0]

"""The README's main job, end to end on a small benchmark: every stage runs and writes its files."""

from __future__ import annotations

import pytest
from PIL import Image

from csmcir.cli import main


@pytest.mark.slow
def test_quickstart_small(tmp_path, capsys):
    root, run_dir = tmp_path / "data", tmp_path / "run"
    argv = ["quickstart", "--root", str(root), "--run-dir", str(run_dir), "--size", "small"]
    assert main([*argv, "--steps", "12"]) == 0
    out = capsys.readouterr().out
    for stage in range(1, 8):
        assert f"[{stage}/7]" in out
    table = out.split("Synthetic test split")[1]
    rows = [line.split()[0] for line in table.splitlines()[3:6]]
    assert rows == ["trained", "untrained", "chance"]
    grid = run_dir / "quickstart" / "retrieval_grid.png"
    plot = run_dir / "quickstart" / "embeddings.png"
    with Image.open(grid) as g, Image.open(plot) as p:
        g.load()
        p.load()
        assert g.width > 400 and p.size == (500, 560)
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "index").is_dir()

    # A second run reuses data, captions and the trained model.
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "reusing" in again and "--retrain to train again" in again

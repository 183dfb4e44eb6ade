"""The README's main job, end to end on a small benchmark: every stage runs and writes its files;
a rerun reuses what the same settings made, and refuses what other settings made."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
from pathlib import Path
from unittest.mock import patch

import pytest
from PIL import Image

from csmcir import quickstart
from csmcir.cli import main
from csmcir.data.synth import is_complete, recorded_config
from csmcir.errors import ConfigError


def args_of(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    return parser.parse_args(["--size", "small", *argv])


def test_a_generation_killed_midway_is_completed_by_the_next_run(tmp_path):
    root = tmp_path / "data"
    killed = patch("csmcir.data.synth.write_images", side_effect=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt), killed:
        quickstart.make_data(root, args_of("--root", str(root)))
    assert not is_complete(root) and any(root.iterdir())
    # the old advice, "pass --overwrite", was a flag the quickstart did not have: none is needed
    _, summary = quickstart.make_data(root, args_of("--root", str(root)))
    assert "completed the generation an earlier run left unfinished" in summary
    assert is_complete(root) and recorded_config(root) == quickstart.data_config(args_of())


def test_a_benchmark_of_other_settings_is_refused_or_regenerated(tmp_path):
    root = tmp_path / "data"
    quickstart.make_data(root, args_of())
    (root / "mcot_captions_shards").mkdir()  # captions of seed 0's images
    (root / "mcot_captions.json").write_text("{}")
    _, summary = quickstart.make_data(root, args_of())
    assert "reusing" in summary and (root / "mcot_captions.json").is_file()

    with pytest.raises(ConfigError) as refused:
        quickstart.make_data(root, args_of("--seed", "1"))
    message = str(refused.value)
    assert "generated with other settings (seed 0 (now 1))" in message
    assert "--overwrite" in message and "--root DIR --run-dir DIR" in message
    assert recorded_config(root).seed == 0  # untouched

    _, summary = quickstart.make_data(root, args_of("--seed", "1", "--overwrite"))
    assert "regenerated" in summary and recorded_config(root).seed == 1
    assert not list(root.glob("mcot_captions*"))  # stale captions go with the old images

    other = tmp_path / "cirr"
    (other / "captions").mkdir(parents=True)
    (other / "captions" / "cap.rc2.train.json").write_text("[]")  # someone's real data
    with pytest.raises(ConfigError, match="holds no synthetic benchmark"):
        quickstart.make_data(other, args_of("--overwrite"))
    assert (other / "captions" / "cap.rc2.train.json").read_text() == "[]"


def test_stale_captions_get_advice_that_works_in_the_quickstart(tmp_path):
    root = tmp_path / "data"
    quickstart.make_data(root, args_of())
    shards, captions = root / "mcot_captions_shards", root / "mcot_captions.json"
    shards.mkdir()  # captions begun by an older csmcir with another prompt
    (shards / "run.json").write_text('{"prompt_version": "0", "model": "oracle"}')
    with pytest.raises(ConfigError, match=f"delete {shards} and {captions}, and the next run"):
        quickstart.make_captions(root, captions)
    shutil.rmtree(shards)
    _, summary = quickstart.make_captions(root, captions)
    assert captions.is_file() and "captions in" in summary


class FakeFit:
    """Stands in for csmcir fit: records the command line, writes what a finished fit writes."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]):
        self.calls.append(argv)
        run_dir = Path(argv[argv.index("--trainer.default_root_dir") + 1])
        (run_dir / "model").mkdir(parents=True, exist_ok=True)
        (run_dir / "model" / "config.json").write_text("{}")
        (run_dir / "last.ckpt").write_text("")
        return argparse.Namespace(trainer=argparse.Namespace(global_step=12))


def test_a_model_of_other_settings_is_refused_retrained_or_resumed(tmp_path, monkeypatch):
    fit = FakeFit()
    monkeypatch.setattr("csmcir.train.cli.run", fit)
    run_dir = tmp_path / "run"
    base = ("--run-dir", str(run_dir), "--steps", "12")
    captions = tmp_path / "captions.json"

    quickstart.train(args_of(*base), captions)
    assert len(fit.calls) == 1 and "--overwrite" not in fit.calls[0]
    record = json.loads((run_dir / "quickstart.json").read_text())
    assert record["settings"]["seed"] == 0 and record["settings"]["steps"] == 12

    _, summary = quickstart.train(args_of(*base), captions)
    assert "reusing" in summary and len(fit.calls) == 1

    with pytest.raises(ConfigError) as refused:
        quickstart.train(args_of(*base[:2], "--steps", "30"), captions)
    assert "trained with other settings (steps 12 (now 30))" in str(refused.value)
    assert "--retrain" in str(refused.value) and len(fit.calls) == 1

    quickstart.train(args_of(*base[:2], "--steps", "30", "--retrain"), captions)
    assert fit.calls[-1][-2:] == ["--overwrite", "true"]  # csmcir fit replaces the old run

    # another csmcir fit (20 steps, say) replaced the model in the run folder: not reused
    (run_dir / "model" / "config.json").write_text('{"another": "fit"}')
    with pytest.raises(ConfigError) as refused:
        quickstart.train(args_of(*base[:2], "--steps", "30"), captions)
    assert f"{run_dir / 'model'} is not the model the quickstart trained" in str(refused.value)
    assert "--retrain" in str(refused.value) and len(fit.calls) == 2
    quickstart.train(args_of(*base[:2], "--steps", "30", "--retrain"), captions)
    _, summary = quickstart.train(args_of(*base[:2], "--steps", "30"), captions)
    assert "reusing" in summary and len(fit.calls) == 3

    # killed mid-training: its settings are recorded, last.ckpt is there, no model yet
    (run_dir / "model" / "config.json").unlink()
    _, summary = quickstart.train(args_of(*base[:2], "--steps", "30"), captions)
    assert fit.calls[-1][-2:] == ["--ckpt_path", str(run_dir / "last.ckpt")]
    assert "resumed from last.ckpt" in summary


@pytest.mark.slow
def test_quickstart_small(tmp_path, capsys, monkeypatch):
    root, run_dir = tmp_path / "data", tmp_path / "run"
    argv = ["quickstart", "--root", str(root), "--run-dir", str(run_dir), "--size", "small"]
    argv += ["--steps", "12"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for stage in range(1, 8):
        assert f"[{stage}/7]" in out
    table = out.split("Synthetic test split")[1]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[3:9]}
    assert list(rows) == ["trained", "stage-1", "untrained", "chance", "text-blind", "oracle"]
    assert rows["oracle"] == ["100.0"] * 8  # every text read right finds every target
    assert float(rows["text-blind"][0]) <= 50.0  # two queries per reference, one ranking
    by_type = out.split("by modification type")[1]
    assert all(f"\n{kind} " in by_type for kind in ("add", "remove", "change", "move"))
    pictures = run_dir / "quickstart"
    grids = sorted(p.name for p in pictures.glob("retrieval_*.png"))
    assert {f"retrieval_{k}.png" for k in ("add", "remove", "change", "move")} <= set(grids)
    with (
        Image.open(pictures / "retrieval_move.png") as g,
        Image.open(pictures / "embeddings.png") as p,
    ):
        g.load()
        p.load()
        assert g.width > 400 and p.size == (500, 560)
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "index").is_dir()
    # the whole recipe trained: the memory bank and the two-way loss
    logged = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "bank/open" in logged and "train/target_to_query_loss" in logged

    # The summary ends with the command that opens the demo on its model, and it does.
    demo_command = out.strip().splitlines()[-1].split(":  ")[1]
    assert demo_command == f"csmcir demo --index {run_dir / 'index'}"
    served = []

    def serve(demo, host, port):  # the page itself is tested in test_demo.py
        served.append(demo)
        page = argparse.Namespace(local_url="", block_thread=lambda: None)
        return contextlib.nullcontext(page)

    monkeypatch.setattr("csmcir.demo.app.serve", serve)
    assert main(shlex.split(demo_command)[1:]) == 0
    assert served[0].index.model_folder() == (run_dir / "model").resolve()

    # A second run with the same settings reuses data, captions and the trained model.
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "reusing" in again and "--retrain to train again" in again
    # Another seed is refused at the first stage its data would be stale, naming the flags.
    assert main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "generated with other settings (seed 0 (now 1))" in err and "--overwrite" in err

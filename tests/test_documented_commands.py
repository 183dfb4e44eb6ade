"""Every documented command that names the quickstart's run folder runs, word for word.

The docs and the commands' help show ``--model checkpoints/synthcir-tiny``: the run folder the
quickstart and ``csmcir fit`` write, whose model is in ``model/``. Each such command line is
collected from README.md, docs/ and the package's docstrings, and run in a folder laid out as the
quickstart leaves it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from pathlib import Path

import pytest

from csmcir.cli import main as csmcir_main
from csmcir.data.registry import load_split
from csmcir.data.synth import SynthConfig, generate
from csmcir.model import CSMCIR

REPO = Path(__file__).resolve().parents[1]
RUN = "checkpoints/synthcir-tiny"
ORDER = ("index", "eval", "demo", "search")  # an index before the commands that open it


def documented_commands(marker: str = f"--model {RUN}") -> list[tuple[Path, str]]:
    """(file, command line) of every ``csmcir ...`` line with ``marker``, continuations joined."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "csmcir").rglob("*.py"))
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8").replace("\\\\\n", "\\\n")
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            line = line.strip().strip("`")
            if line.startswith("csmcir ") and marker in line:
                found.append((path, line.split("  #")[0].split(" # ")[0].strip()))
    return sorted(found, key=lambda item: ORDER.index(shlex.split(item[1])[1]))


def test_the_documented_forms_are_found():
    verbs = {shlex.split(command)[1] for _, command in documented_commands()}
    assert {"eval", "index", "demo"} <= verbs


@pytest.fixture
def quickstart_layout(tmp_path: Path, monkeypatch) -> Path:
    """datasets/synthcir with its caption file and checkpoints/synthcir-tiny/model, as the
    quickstart leaves them (a small benchmark, an untrained tiny model)."""
    root = tmp_path / "datasets/synthcir"
    generate(root, SynthConfig(train_refs=2, val_refs=2, test_refs=2))
    scenes = json.loads((root / "scenes.json").read_text())["images"]
    captions = {name: f"{len(scene['objects'])} objects" for name, scene in scenes.items()}
    (root / "mcot_captions.json").write_text(json.dumps(captions))
    split = load_split("synthcir", root, "val")
    corpus = [q.texts[0] for q in split.queries] + list(captions.values())
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=corpus, seed=0)
    model.save_pretrained(tmp_path / RUN / "model")
    monkeypatch.chdir(tmp_path)
    for module in ("csmcir.evaluation.cli", "csmcir.retrieval.cli"):  # keep ~/.cache clean
        monkeypatch.setattr(f"{module}.DEFAULT_CACHE_DIR", tmp_path / "cache")
    return tmp_path


class ServedApp:
    """What csmcir demo needs of a launched page, without serving one."""

    local_url = "http://127.0.0.1:0/"

    def block_thread(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_every_documented_run_folder_command_runs(quickstart_layout, monkeypatch, capsys):
    monkeypatch.setattr(
        "csmcir.demo.app.serve", lambda demo, host, port: contextlib.nullcontext(ServedApp())
    )
    commands = documented_commands()
    for path, command in commands:
        code = csmcir_main(shlex.split(command)[1:])
        err = capsys.readouterr().err
        assert code == 0, f"{path.relative_to(REPO)}: {command}\n{err[-2000:]}"
        assert f"--model {RUN} is a training run folder: using its exported final model" in err
    # the index records the model folder itself, so the demo opens it without --model
    for meta in Path("runs/index").glob("*/meta.json"):
        recorded = json.loads(meta.read_text())["model_dir"]
        assert recorded == str((quickstart_layout / RUN / "model").resolve())


def test_model_folder_takes_a_run_folder_for_its_model(tmp_path: Path, capsys):
    from csmcir.model.run_folder import model_folder

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    assert model_folder(run / "model") == run / "model"  # a model folder: itself, silently
    assert capsys.readouterr().err == ""
    assert model_folder(run, "--model.init_from") == run / "model"
    err = capsys.readouterr().err
    assert f"--model.init_from {run} is a training run folder" in err and str(run / "best") in err
    assert model_folder(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # named by the loader

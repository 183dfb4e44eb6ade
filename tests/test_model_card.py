"""The README.md model card of ``csmcir export hf``: hub metadata the hub's own parser accepts,
the results measured on this model (and no other's), and a usage section that runs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from blip2_folder import CORPUS, make_blip2_folder
from huggingface_hub import ModelCard, metadata_load
from PIL import Image

from csmcir.cli import main as csmcir_main
from csmcir.model import CSMCIR


def eval_file(path: Path, fingerprint: str, benchmark: str, split: str, metrics: dict) -> Path:
    """A results file as ``csmcir eval`` writes it (the fields the card reads, and a few more)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "@csmcir": {"kind": "results file", "command": "csmcir eval", "identity": {}},
                "benchmark": benchmark,
                "split": split,
                "model": {"source": "x", "fingerprint": fingerprint, "preset": "tiny"},
                "metrics": metrics,
                "headline": None,
            }
        )
    )
    return path


@pytest.fixture
def run(tmp_path: Path, monkeypatch) -> tuple[Path, CSMCIR]:
    """A run folder of a tiny model as ``csmcir fit`` leaves it, the working directory beside it."""
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0)
    root = tmp_path / "run"
    model.save_pretrained(root / "model")
    (root / "last.ckpt").write_bytes(b"")
    (root / "logs" / "version_0").mkdir(parents=True)
    fit = {"model": {"preset": "tiny"}, "data": {"benchmark": "synthcir", "root": "d"}}
    (root / "logs" / "version_0" / "config.yaml").write_text(yaml.safe_dump(fit))
    monkeypatch.chdir(tmp_path)
    return root, model


def export(model: Path, out: Path, *extra: str) -> None:
    assert csmcir_main(["export", "hf", str(model), "--out", str(out), *extra]) == 0


def front_matter(card: Path) -> dict:
    text = card.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_card_carries_this_models_results_and_the_hub_parses_it(run, capsys):
    root, model = run
    fp = model.fingerprint()
    eval_file(root / "eval-test.json", fp, "synthcir", "test", {"synthcir": {"R@1": 61.234}})
    eval_file(  # eval's default folder; FashionIQ has a row per category and their average
        Path("runs/eval/fiq.json"),
        fp,
        "fashioniq",
        "val",
        {"fashioniq-dress": {"R@10": 20.0}, "average": {"R@10": 25.5, "mean": 30.25}},
    )
    eval_file(Path("runs/eval/other.json"), "0" * 32, "cirr", "val", {"cirr": {"R@1": 99.0}})
    (root / "quickstart").mkdir()
    summary = {"table": {"trained": {"R@1": 50.0}}, "model": {"fingerprint": fp}}
    (root / "quickstart" / "summary.json").write_text(json.dumps(summary))
    os.utime(root / "quickstart" / "summary.json", (1e9, 1e9))  # older than eval-test.json
    export(root, Path("hf"))
    assert "results: fashioniq average val, fashioniq dress val, synthcir test" in (
        capsys.readouterr().out
    )

    meta = front_matter(Path("hf/README.md"))
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert "composed-image-retrieval" in meta["tags"]
    assert meta["datasets"] == ["synthcir", "fashioniq"]  # trained on, then evaluated on
    assert "base_model" not in meta  # the tiny preset starts from random weights
    assert metadata_load(Path("hf/README.md")) == meta

    card = ModelCard.load(Path("hf/README.md"))
    found = {
        (r.dataset_type, r.dataset_config, r.dataset_split, r.metric_name): r.metric_value
        for r in card.data.eval_results
    }
    # the quickstart's 50.0 and the eval file's 61.234 are one split: the newer file wins
    assert found == {
        ("fashioniq", "average", "val", "R@10"): 25.5,
        ("fashioniq", "average", "val", "mean"): 30.25,
        ("fashioniq", "dress", "val", "R@10"): 20.0,
        ("synthcir", None, "test", "R@1"): 61.23,
    }
    assert card.data.eval_results[0].metric_type == "recall_at_10"
    assert "| FashionIQ dress | val | 20.00 |" in card.text
    assert "99.0" not in card.content  # another model's results stay out


def test_given_results_must_be_this_models(run, capsys):
    root, model = run
    other = eval_file(Path("other.json"), "0" * 32, "cirr", "val", {"cirr": {"R@1": 1.0}})
    argv = ["export", "hf", str(root), "--out", "hf", "--results", str(other)]
    assert csmcir_main(argv) == 2
    assert "--results other.json: measured on another model" in capsys.readouterr().err
    Path("notes.json").write_text("{}")
    assert csmcir_main([*argv[:-1], "notes.json"]) == 2
    assert "not a csmcir eval results file" in capsys.readouterr().err
    assert not Path("hf").exists()

    mine = eval_file(Path("mine.json"), model.fingerprint(), "cirr", "val", {"cirr": {"Avg": 7.0}})
    export(root, Path("hf"), "--results", str(mine), "--license", "mit", "--name", "me/tiny")
    meta = front_matter(Path("hf/README.md"))
    assert meta["license"] == "mit" and meta["model-index"][0]["name"] == "me/tiny"


def test_a_blip2_start_names_its_base_model(tmp_path, monkeypatch):
    source, _ = make_blip2_folder(tmp_path / "blip2-itm")
    monkeypatch.chdir(tmp_path)
    export(source, Path("hf"))
    assert front_matter(Path("hf/README.md"))["base_model"] == "Salesforce/blip2-itm-vit-g"
    export(source, Path("hf2"), "--base-model", "Salesforce/blip2-itm-vit-g-coco")
    assert front_matter(Path("hf2/README.md"))["base_model"] == "Salesforce/blip2-itm-vit-g-coco"


def usage_code(card: Path, repo: Path) -> str:
    block = re.search(r"```python\n(.*?)```", card.read_text(encoding="utf-8"), re.S)
    assert block is not None
    return block.group(1).replace('repo = "hf"', f'repo = "{repo}"')


@pytest.mark.parametrize("target_text", ["caption", "none"])
def test_the_cards_usage_runs_and_scores_as_csmcir_does(target_text, tmp_path, monkeypatch):
    """The card's Python block, run as written on the exported folder, ranks as the model."""
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0, target_text=target_text)
    folder = model.save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    export(folder, Path("hf"))
    torch.manual_seed(0)
    pictures = {}
    for name, size in (("reference", (90, 60)), ("a", (64, 64)), ("b", (50, 80))):
        pixels = (torch.rand(size[1], size[0], 3) * 255).to(torch.uint8).numpy()
        pictures[name] = Image.fromarray(pixels)
        pictures[name].save(f"{name}.jpg")  # read back, JPEG-decoded, by both sides
    scope: dict = {}
    exec(usage_code(Path("hf/README.md"), tmp_path / "hf"), scope)

    model = CSMCIR.from_pretrained(folder).eval()
    read = {name: Image.open(f"{name}.jpg") for name in pictures}
    with torch.no_grad():
        query = model.encode_query(
            ["make the dress red and sleeveless"], images=[read["reference"]]
        )
        captions = ["a red sleeveless dress", "a blue shirt"]
        targets = model.encode_target(captions, images=[read["a"], read["b"]])
    ours = model.similarity(query, targets)
    assert scope["scores"].shape == (1, 2)
    assert (scope["scores"] - ours).abs().max() <= 1e-6

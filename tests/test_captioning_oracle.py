"""The oracle backend, the runner's retry rules and the whole `caption run -> merge` path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from captioning.backends.base import Answer, Backend, BackendFailure, Request
from captioning.backends.oracle import OracleBackend
from captioning.parsing import parse_answer
from captioning.prompts import PromptSpec
from captioning.runner import caption_images
from captioning.store import CaptionStore
from csmcir.cli import main as csmcir_main
from csmcir.data.captions import load_captions
from csmcir.data.registry import load_split
from csmcir.data.synth import SynthConfig, generate
from csmcir.errors import ConfigError, DataError

ATTRS = {
    "shape": ["circle", "square", "triangle", "cross"],
    "color": ["red", "green", "blue"],
    "size": ["small", "large"],
}


def obj(shape, color, size, row, col):
    return {"shape": shape, "color": color, "size": size, "row": row, "col": col}


@pytest.fixture
def scenes(tmp_path) -> Path:
    images = {
        "s1": {
            "objects": [
                obj("circle", "red", "small", 0, 0),
                obj("square", "blue", "large", 1, 1),
                obj("circle", "green", "large", 2, 2),
            ]
        },
        "s2": {"objects": [obj("cross", "red", "small", 0, 2)]},
        "s5": {
            "objects": [
                obj("circle", "red", "small", 0, 0),
                obj("square", "red", "small", 0, 1),
                obj("triangle", "red", "small", 0, 2),
                obj("cross", "red", "small", 1, 0),
                obj("circle", "blue", "large", 2, 1),
            ]
        },
    }
    path = tmp_path / "scenes.json"
    path.write_text(json.dumps({"version": 1, "grid": 3, "attributes": ATTRS, "images": images}))
    return path


def answer(backend: OracleBackend, image_id: str, spec: PromptSpec) -> dict:
    return json.loads(backend.answer(image_id, spec))


def test_noise_free_levels_and_final_caption_are_exact(scenes):
    oracle = OracleBackend(scenes)
    assert answer(oracle, "s1", PromptSpec("synthetic")) == {
        "global": "three objects on a 3x3 grid: two circles and a square.",
        "attributes": "small red circle; large blue square; large green circle.",
        "details": "small red circle top left; large blue square center; "
        "large green circle bottom right.",
        "Final_Caption": "small red circle top left, large blue square center and "
        "large green circle bottom right",
    }
    assert answer(oracle, "s2", PromptSpec("synthetic"))["global"] == (
        "an object on a 3x3 grid: a cross."
    )
    assert oracle.model == "oracle(noise=0,seed=0)"


def test_levels_and_plain_style_change_what_the_caption_carries(scenes):
    oracle = OracleBackend(scenes)
    only_global = answer(oracle, "s1", PromptSpec("synthetic", levels=("global",)))
    assert only_global == {
        "global": "three objects on a 3x3 grid: two circles and a square.",
        "Final_Caption": "two circles and a square",
    }
    attrs = answer(oracle, "s1", PromptSpec("synthetic", levels=("global", "attributes")))
    assert attrs["Final_Caption"] == "small red circle, large blue square and large green circle"
    plain = answer(oracle, "s1", PromptSpec("synthetic", style="plain"))
    assert plain == {"Final_Caption": "two circles and a square"}


def test_long_scenes_are_shortened_to_the_word_limit(scenes):
    oracle = OracleBackend(scenes)
    full = answer(oracle, "s5", PromptSpec("synthetic", max_words=25))["Final_Caption"]
    assert full == (
        "small red circle top left, small red square top middle, small red triangle top right, "
        "small red cross middle left, large blue circle bottom middle"
    )  # 25 words: the "and" form (26) did not fit
    short = answer(oracle, "s5", PromptSpec("synthetic", max_words=12))["Final_Caption"]
    assert short == "red circle top left, red square top middle and three more objects"
    for words in (3, 8, 12, 25):
        spec = PromptSpec("synthetic", max_words=words)
        assert len(parse_answer(oracle.answer("s5", spec), spec).final.split()) <= words


def test_noise_is_deterministic_per_image_and_seed_and_has_the_asked_rate(tmp_path):
    images = {
        f"i{k}": {"objects": [obj("circle", "red", "small", r, r) for r in range(3)]}
        for k in range(400)
    }
    path = tmp_path / "scenes.json"
    path.write_text(json.dumps({"grid": 3, "attributes": ATTRS, "images": images}))
    a, b = OracleBackend(path, noise=0.3, seed=1), OracleBackend(path, noise=0.3, seed=1)
    assert [a.perceive(i) for i in reversed(images)] == [b.perceive(i) for i in reversed(images)]
    c = OracleBackend(path, noise=0.3, seed=2)
    assert [a.perceive(i) for i in images] != [c.perceive(i) for i in images]
    truth = ("circle", "red", "small")
    wrong = total = 0
    for image_id in images:
        for r, seen in enumerate(a.perceive(image_id)):
            fields = (seen.shape, seen.color, seen.size, seen.cell)
            wrong += sum(f != t for f, t in zip(fields, (*truth, (r, r)), strict=True))
            total += 4
    assert 0.27 < wrong / total < 0.33
    always = OracleBackend(path, noise=1.0)
    for seen in always.perceive("i0"):
        assert seen.shape != "circle" and seen.color != "red" and seen.size != "small"
    spec = PromptSpec("synthetic")
    for image_id in list(images)[:50]:  # even fully wrong perception gives a checkable caption
        parse_answer(always.answer(image_id, spec), spec)


def test_oracle_refuses_what_it_cannot_describe(scenes, tmp_path):
    with pytest.raises(ConfigError, match="scenes file"):
        OracleBackend(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="--noise"):
        OracleBackend(scenes, noise=1.5)
    oracle = OracleBackend(scenes)
    with pytest.raises(ConfigError, match="synthetic"):
        oracle.check(PromptSpec("fashion"), ["s1"])
    with pytest.raises(DataError, match=r"no scene for 2 image\(s\): x, y"):
        oracle.check(PromptSpec("synthetic"), ["s1", "x", "y"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"grid": 3, "images": {}}))
    with pytest.raises(DataError, match="attributes"):
        OracleBackend(bad)


class Scripted(Backend):
    """Answers from a per-image list, one entry per attempt (the last one repeats)."""

    name = "scripted"
    batch_size = 3

    def __init__(self, script: dict[str, list]):
        self.script = script
        self.calls: list[tuple[str, int]] = []

    @property
    def model(self) -> str:
        return "scripted"

    async def generate(self, requests: Sequence[Request]):
        out = []
        for r in requests:
            self.calls.append((r.image_id, r.attempt))
            item = self.script[r.image_id][min(r.attempt, len(self.script[r.image_id]) - 1)]
            if item is RuntimeError:
                raise RuntimeError("backend bug")
            out.append(item if isinstance(item, BackendFailure) else Answer(*item))
        return out


NOT_EN = '{"Final_Caption": "无法描述这张图片"}'
GOOD = ('{"global": "a circle", "Final_Caption": "one small red circle"}', False)


def run(backend, ids, tmp_path, max_attempts=3):
    spec = PromptSpec("synthetic", levels=("global",))
    with CaptionStore(tmp_path) as store:
        summary = asyncio.run(
            caption_images(
                backend, {i: tmp_path / i for i in ids}, spec, store, max_attempts, progress=False
            )
        )
        return summary, dict(store.records)


def test_runner_retries_unusable_answers_then_records_a_failure(tmp_path):
    backend = Scripted(
        {
            "good": [GOOD],
            "late": [("", False), ("chatter", False), GOOD],
            "never": [("{}", False), ('{"Final_Caption": "', True), (NOT_EN, False)],
            "gone": [BackendFailure("HTTP 500: boom (after 6 tries)")],
        }
    )
    summary, records = run(backend, ["good", "late", "never", "gone"], tmp_path)
    assert (summary.captioned, summary.failed) == (2, 2)
    assert records["good"]["attempts"] == 1 and records["late"]["attempts"] == 3
    assert records["late"]["Final_Caption"] == "one small red circle"
    never = records["never"]
    assert never["status"] == "failed" and never["attempts"] == 3
    assert never["reasons"][0].startswith("answer has no Final_Caption key")
    assert never["reasons"][1].endswith("(answer cut off at the token limit)")
    assert never["reason"].startswith("Final_Caption is not in English") and never["raw"] == NOT_EN
    assert records["gone"]["reasons"] == ["HTTP 500: boom (after 6 tries)"]
    assert sorted(c for c in backend.calls if c[0] == "never") == [
        ("never", 0),
        ("never", 1),
        ("never", 2),
    ]
    lines = (tmp_path / "shard-0000-of-0001.jsonl").read_text().splitlines()
    written = sorted(json.loads(line)["image_id"] for line in lines)
    assert written == ["gone", "good", "late", "never"]


def test_runner_stops_on_a_backend_error_it_cannot_record(tmp_path):
    backend = Scripted({"a": [GOOD], "b": [RuntimeError]})
    backend.batch_size = 1
    with pytest.raises(RuntimeError, match="backend bug"):
        run(backend, ["a", "b"], tmp_path)


@pytest.fixture
def synth(tmp_path) -> Path:
    root = tmp_path / "synthcir"
    generate(root, SynthConfig(train_refs=4, val_refs=3, test_refs=3, image_size=32))
    return root


def caption(*args: str) -> int:
    return csmcir_main(["caption", *map(str, args)])


def test_synthetic_benchmark_captioned_merged_and_read_back(synth, tmp_path, capsys):
    out, merged = tmp_path / "caps", tmp_path / "captions.json"
    base = ["run", "--benchmark", "synthcir", "--root", synth, "--backend", "oracle"]
    for shard in ("0/2", "1/2"):  # two processes share the work
        assert caption(*base, "--split", "all", "--out", out, "--shard", shard) == 0
    assert caption("merge", out, "--out", merged) == 0
    captions = load_captions(merged)
    gallery = set()
    for split in ("train", "val", "test"):
        gallery |= set(load_split("synthcir", synth, split).gallery)
    assert set(captions) == gallery
    scenes = json.loads((synth / "scenes.json").read_text())["images"]
    some = next(iter(captions))
    first = scenes[some]["objects"][0]
    assert f"{first['color']} {first['shape']}" in captions[some]
    assert "0 failure(s)" in capsys.readouterr().out

    lines = sum(len(p.read_text().splitlines()) for p in out.glob("*.jsonl"))
    assert caption(*base, "--split", "all", "--out", out, "--no-progress") == 0  # nothing left
    assert "0 to caption" in capsys.readouterr().out
    assert sum(len(p.read_text().splitlines()) for p in out.glob("*.jsonl")) == lines

    assert caption("show", some, "--from", out) == 0
    shown = capsys.readouterr().out
    assert f"{some}  [ok]" in shown and "details:" in shown
    assert caption("show", some, "--from", merged) == 0
    assert captions[some] in capsys.readouterr().out

    assert caption(*base, "--split", "all", "--out", out, "--style", "plain") == 2
    assert "Use a new --out folder" in capsys.readouterr().err
    assert caption("show", "nope", "--from", out) == 2
    assert "no record for image id 'nope'" in capsys.readouterr().err


def test_single_split_plain_style_and_noise(synth, tmp_path, capsys):
    out, merged = tmp_path / "plain", tmp_path / "plain.json"
    args = ["--benchmark", "synthcir", "--root", synth, "--split", "val", "--backend", "oracle"]
    assert caption("run", *args, "--out", out, "--style", "plain", "--noise", "0.2") == 0
    assert caption("merge", out, "--out", merged) == 0
    data = json.loads(merged.read_text())
    assert set(data) == set(load_split("synthcir", synth, "val").gallery)
    entry = next(iter(data.values()))
    assert entry["benchmark"] == "synthcir" and len(entry["image_sha256"]) == 16
    assert entry["levels"] == {}
    assert entry["prompt_version"] == "synthetic/plain-r1/none/w25"
    assert entry["model"] == "oracle(noise=0.2,seed=0)"


def test_train_targets_only_captions_what_training_and_evaluation_read(synth, tmp_path):
    out, merged = tmp_path / "needed", tmp_path / "needed.json"
    args = ["--benchmark", "synthcir", "--root", synth, "--split", "all", "--backend", "oracle"]
    assert caption("run", *args, "--out", out, "--train-targets-only") == 0
    assert caption("merge", out, "--out", merged) == 0
    train = load_split("synthcir", synth, "train")
    targets = {q.target for q in train.queries}
    wanted = targets | set(load_split("synthcir", synth, "val").gallery)
    wanted |= set(load_split("synthcir", synth, "test").gallery)
    assert set(load_captions(merged)) == wanted
    assert len(targets) < len(train.gallery)  # references and distractors are left out

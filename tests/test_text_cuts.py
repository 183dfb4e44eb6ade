"""A text longer than the model reads is cut at its token limit: every command says where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from csmcir.baselines.text import OpenCLIPTokenizer
from csmcir.cli import main as csmcir_main
from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.model import CSMCIR
from csmcir.retrieval import GalleryIndex

CORPUS = ["make the small circle red", "add a blue cube", "remove the triangle"]
LONG = "make the small circle red and " * 400  # 12,000 characters


@pytest.fixture(scope="module")
def tiny() -> CSMCIR:
    return CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0).eval()


def test_the_kept_start_is_exactly_what_the_model_encodes(tiny):
    short, kept = tiny.truncated(["make it red", LONG])
    assert short is None and LONG.startswith(kept) and 0 < len(kept) < 200
    assert (
        tiny.tokenize([kept])["input_ids"].tolist() == tiny.tokenize([LONG])["input_ids"].tolist()
    )
    assert len(tiny.tokenize([LONG])["input_ids"][0]) == tiny.config.max_text_length


def test_the_baseline_tokenizers_say_it_too():
    baseline = CSMCIR.from_preset("clip4cir-tiny", tokenizer_corpus=CORPUS, seed=0)
    short, kept = baseline.truncated(["add a cube", LONG])
    assert short is None and LONG.startswith(kept)
    length = baseline.config.context_length
    assert torch.equal(
        baseline.tokenizer.encode([kept], length), baseline.tokenizer.encode([LONG], length)
    )
    clip = OpenCLIPTokenizer()
    short, kept = clip.kept_texts(["a red dress", LONG.upper()], 77)
    assert short is None and LONG.startswith(kept + " ")  # CLIP's BPE lower-cases
    assert torch.equal(clip.encode([kept], 77), clip.encode([LONG.upper()], 77))


def test_search_says_where_the_text_was_cut_and_echoes_a_bounded_prefix(tiny, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 20, 200)).save(images / f"g{i}.png")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({f"g{i}": CORPUS[i % 3] for i in range(4)}))
    model = tiny.save_pretrained(tmp_path / "model")
    build = ["index", "build", "--model", str(model), "--images", str(images)]
    assert csmcir_main([*build, "--captions", str(captions), "--out", str(tmp_path / "index")]) == 0
    search = ["search", "--index", str(tmp_path / "index"), "--ref", str(images / "g0.png")]
    search += ["--grid", str(tmp_path / "grid.png"), "--device", "cpu"]
    capsys.readouterr()
    assert csmcir_main([*search, "--text", LONG]) == 0
    out, err = capsys.readouterr()
    (kept,) = tiny.truncated([LONG])
    assert "--text: the text is longer than the model reads: it was cut after" in err
    assert f"({len(kept)} of its 12,000 characters read, the rest ignored)" in err
    query_line = next(line for line in out.splitlines() if line.startswith("query:"))
    assert len(query_line) < 300 and query_line.endswith('…"')
    assert csmcir_main([*search, "--text", "make it red"]) == 0
    assert "cut after" not in capsys.readouterr().err


def test_the_demo_status_line_is_bounded_and_says_where_the_text_was_cut(tiny, tmp_path):
    from csmcir.demo.app import build_app
    from csmcir.demo.engine import RetrievalDemo

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"g{i}.png")
        Image.new("RGB", (16, 16), (60 * i, 20, 200)).save(paths[-1])
    captions = {p.stem: CORPUS[i % 3] for i, p in enumerate(paths)}
    demo = RetrievalDemo(tiny, GalleryIndex.build(tiny, paths, captions))
    search = next(f.fn for f in build_app(demo).fns.values() if f.name == "search")
    _, _, status = search({"gallery": "g0"}, LONG, 3, True)
    assert len(status) < 600 and "cut after" in status
    assert f"of its {len(LONG.strip()):,} characters read" in status  # the text is stripped
    _, _, status = search({"gallery": "g0"}, "make it red", 3, True)
    assert status == 'Top 3 for "make it red"'


def test_eval_counts_the_texts_it_cut(tiny, capsys):
    from csmcir.evaluation.cli import texts_cut

    queries = [CIRQuery(str(i), "a", (t,), targets=("b",)) for i, t in enumerate(["x", LONG])]
    split = CIRSplit("synthcir", "val", queries, ["a", "b"], {"a": Path("a"), "b": Path("b")})
    captions = {"a": "a red cube", "b": LONG}
    assert texts_cut(tiny, split, [q.texts[0] for q in queries], captions) == {
        "queries": 1,
        "captions": 1,
    }
    assert "synthcir val: 1 of 2 query texts and 1 gallery captions are longer" in (
        capsys.readouterr().err
    )

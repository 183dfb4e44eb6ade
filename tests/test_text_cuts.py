"""What the model reads of a text, and every command says when it is not all of it: a text
longer than the model reads is cut at its token limit (where, and how much is read); a text
mostly unknown to the tokenizer (emoji, a script its vocabulary lacks) is read as [UNK]."""

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
from csmcir.model.tokenizer import mostly_unknown
from csmcir.retrieval import GalleryIndex

CORPUS = ["make the small circle red", "add a blue cube", "remove the triangle"]
LONG = "make the small circle red and " * 400  # 12,000 characters
EMOJI = "🔴🔵🟢"


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


@pytest.fixture(scope="module")
def small_index(tiny, tmp_path_factory) -> Path:
    """An index of four plain images, built by the tiny model."""
    tmp = tmp_path_factory.mktemp("texts")
    images = tmp / "imgs"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 20, 200)).save(images / f"g{i}.png")
    captions = tmp / "captions.json"
    captions.write_text(json.dumps({f"g{i}": CORPUS[i % 3] for i in range(4)}))
    model = tiny.save_pretrained(tmp / "model")
    build = ["index", "build", "--model", str(model), "--images", str(images)]
    assert csmcir_main([*build, "--captions", str(captions), "--out", str(tmp / "index")]) == 0
    return tmp / "index"


def search_argv(index: Path, tmp_path: Path) -> list[str]:
    reference = GalleryIndex.load(index).path_of("g0")
    search = ["search", "--index", str(index), "--ref", str(reference)]
    return [*search, "--grid", str(tmp_path / "grid.png"), "--device", "cpu"]


def test_search_says_where_the_text_was_cut_and_echoes_a_bounded_prefix(
    tiny, small_index, tmp_path, capsys
):
    search = search_argv(small_index, tmp_path)
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


def demo_search(tiny, index: Path):
    """The demo page's search handler over ``index``."""
    from csmcir.demo.app import build_app
    from csmcir.demo.engine import RetrievalDemo

    demo = RetrievalDemo(tiny, GalleryIndex.load(index))
    return demo, next(f.fn for f in build_app(demo).fns.values() if f.name == "search")


def test_the_demo_status_line_is_bounded_and_says_where_the_text_was_cut(tiny, small_index):
    _, search = demo_search(tiny, small_index)
    _, _, status = search({"gallery": "g0"}, LONG, 3, True)
    assert len(status) < 600 and "cut after" in status
    assert f"of its {len(LONG.strip()):,} characters read" in status  # the text is stripped
    _, _, status = search({"gallery": "g0"}, "make it red", 3, True)
    assert status == "<p>Top 3 for &quot;make it red&quot;</p>"  # HTML: the text is shown as typed


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


def test_the_share_counts_the_characters_read_as_unk(tiny):
    tokenizer = tiny.tokenizer
    # the case of the issue: a text of emoji is one [UNK], whatever the emoji
    ids = tokenizer([EMOJI])["input_ids"][0]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "[UNK]", "[SEP]"]
    with torch.inference_mode():
        a, b = tiny.encode_query([EMOJI, "🟡"], images=[Image.new("RGB", (32, 32))] * 2)
    assert torch.equal(a, b)  # the text adds nothing: the reference image decides alone
    texts = [EMOJI, "红色的圆", "🔴 red", "🔴🔴🔴 red", "🔴🔴🔴🔴 red", "make it red", "  "]
    # 3 of 6 written characters unknown is half, not most; 4 of 7 is most
    assert mostly_unknown(tokenizer, texts) == [1.0, 1.0, None, None, 4 / 7, None, None]
    assert tiny.mostly_unknown(texts) == mostly_unknown(tokenizer, texts)


def test_the_baseline_says_it_too_and_clip_bpe_knows_every_text():
    baseline = CSMCIR.from_preset("clip4cir-tiny", tokenizer_corpus=CORPUS, seed=0)
    assert baseline.mostly_unknown([EMOJI, "add a cube"]) == [1.0, None]
    assert OpenCLIPTokenizer().mostly_unknown([EMOJI, "红色的圆"]) == [None, None]


def test_search_warns_when_most_of_the_text_is_unknown(small_index, tmp_path, capsys):
    search = search_argv(small_index, tmp_path)
    capsys.readouterr()
    assert csmcir_main([*search, "--text", EMOJI]) == 0
    err = capsys.readouterr().err
    assert "--text: 100% of the text is unknown to the model's tokenizer (read as [UNK]" in err
    assert "ranks by the reference image almost alone" in err
    assert csmcir_main([*search, "--text", "make it red 🔴"]) == 0
    assert "unknown to the model's tokenizer" not in capsys.readouterr().err


def test_the_demo_status_line_notes_an_unknown_text(tiny, small_index):
    demo, search = demo_search(tiny, small_index)
    assert demo.unknown_note("make it red") is None
    _, _, status = search({"gallery": "g0"}, f"  {EMOJI} ", 3, True)
    assert "<strong>Note:</strong> 100% of the text is unknown" in status
    _, _, status = search({"gallery": "g0"}, "make it red", 3, True)
    assert "unknown" not in status


def test_eval_counts_the_texts_it_cannot_read(tiny, capsys):
    from csmcir.evaluation.cli import texts_unknown

    texts = ["make it red", EMOJI, "红色的圆"]
    queries = [CIRQuery(str(i), "a", (t,), targets=("b",)) for i, t in enumerate(texts)]
    split = CIRSplit("synthcir", "val", queries, ["a", "b"], {"a": Path("a"), "b": Path("b")})
    captions = {"a": "a red cube", "b": "🟥🟦"}
    assert texts_unknown(tiny, split, texts, captions) == {"queries": 2, "captions": 1}
    err = capsys.readouterr().err
    assert "synthcir val: 2 of 3 query texts and 1 gallery captions are mostly unknown" in err
    assert texts_unknown(tiny, split, texts[:1], {"a": "a cube"}) == {"queries": 0, "captions": 0}
    assert "unknown" not in capsys.readouterr().err

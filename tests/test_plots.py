"""Embedding plots: hand-computed separation numbers, the CLI's PNG and JSON, the result grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csmcir.cli import main as csmcir_main
from csmcir.data.captions import load_captions
from csmcir.data.registry import load_split
from csmcir.errors import ConfigError
from csmcir.model import CSMCIR
from csmcir.plots.embeddings import (
    KindEmbeddings,
    embed_kinds,
    pooled,
    project,
    sample_queries,
    separation,
)
from csmcir.retrieval.grid import GridItem, save_grid


def basis(*rows: int, dim: int = 4) -> torch.Tensor:
    return torch.eye(dim)[list(rows)]


def test_separation_numbers_by_hand():
    # queries = their targets = e0, e1, e2; every reference = e3 (cosine distance 1 - cos).
    emb = KindEmbeddings(reference=basis(3, 3, 3), query=basis(0, 1, 2), target=basis(0, 1, 2))
    stats = separation(emb)
    # reference: a = 0, b = 1 -> 1. query/target: a = 1 (others orthogonal), b = min(1, 2/3)
    # -> (2/3 - 1) / 1 = -1/3. Mean over 9 points: (3 * 1 + 6 * -1/3) / 9 = 1/9.
    assert stats["silhouette_by_kind"] == pytest.approx(1 / 9)
    assert stats["cos_query_target"] == pytest.approx(1.0)
    assert stats["cos_query_other_targets"] == pytest.approx(0.0)
    assert stats["cos_query_reference"] == pytest.approx(0.0)
    assert stats["recall_at_1_among_plotted"] == 1.0

    # three tight, mutually orthogonal clusters: perfectly separated kinds
    apart = KindEmbeddings(reference=basis(0, 0), query=basis(1, 1), target=basis(2, 2))
    assert separation(apart)["silhouette_by_kind"] == pytest.approx(1.0)
    assert separation(apart)["cos_query_target"] == pytest.approx(0.0)


def test_pooled_averages_query_tokens_and_normalises():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [3.0, 0.0]]])
    expected = torch.tensor([[2**-0.5, 2**-0.5], [1.0, 0.0]])
    torch.testing.assert_close(pooled(tokens), expected)
    torch.testing.assert_close(pooled(torch.tensor([[0.0, 2.0]])), torch.tensor([[0.0, 1.0]]))


def test_projection_shapes_and_methods():
    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    for method in ("tsne", "pca"):
        xy = project(x, method, seed=0)
        assert xy.shape == (30, 2) and np.isfinite(xy).all()
    with pytest.raises(ConfigError, match="--method must be one of tsne, pca, umap"):
        project(x, "mds")
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install umap-learn"):
            project(x, "umap")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic benchmark with plain captions and two untrained tiny models."""
    tmp = tmp_path_factory.mktemp("plots")
    root = tmp / "synth"
    synth = ["data", "synth", "--out", str(root), "--seed", "1", "--train-refs", "1"]
    assert csmcir_main([*synth, "--val-refs", "12", "--test-refs", "1"]) == 0
    scenes = json.loads((root / "scenes.json").read_text())["images"]
    captions = {
        name: " and ".join(f"a {o['color']} {o['shape']}" for o in scene["objects"])
        for name, scene in scenes.items()
    }
    (tmp / "captions.json").write_text(json.dumps(captions))
    split = load_split("synthcir", root, "val")
    corpus = [q.texts[0] for q in split.queries] + list(captions.values())
    for tower, seed in (("shared", 0), ("separate", 1)):
        model = CSMCIR.from_preset("tiny", tokenizer_corpus=corpus, seed=seed, tower=tower)
        model.save_pretrained(tmp / tower)
    return {"root": root, "captions": tmp / "captions.json", "tmp": tmp}


def plot_args(bench, out: Path, *models: str) -> list[str]:
    args = ["plot", "embeddings", *models, "--benchmark", "synthcir", "--root"]
    args += [str(bench["root"]), "--split", "val", "--captions", str(bench["captions"])]
    return [*args, "--queries", "16", "--out", str(out), "--device", "cpu"]


def test_plot_side_by_side_png_and_numbers(bench, tmp_path):
    shared, separate = str(bench["tmp"] / "shared"), str(bench["tmp"] / "separate")
    out = tmp_path / "towers.png"
    assert csmcir_main(plot_args(bench, out, "--models", shared, separate)) == 0
    with Image.open(out) as png:
        png.load()
        assert png.format == "PNG" and png.size == (1000, 560)
        # both panels were drawn on: coloured points, not a blank canvas
        pixels = np.asarray(png.convert("RGB")).astype(int)
        for half in (pixels[:, :500], pixels[:, 500:]):
            r, g, b = half[..., 0], half[..., 1], half[..., 2]
            reds, blues = (r - g > 80) & (r - b > 80), (b - r > 60) & (b - g > 20)
            assert reds.sum() > 50 and blues.sum() > 50

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["queries"] == 16 and report["method"] == "tsne"
    assert [m["tower"] for m in report["models"]] == ["shared", "separate"]
    assert report["models"][0]["title"] == "tower: shared · shared"

    # the numbers are those of the embeddings the library computes for the same queries
    split = load_split("synthcir", bench["root"], "val")
    queries = sample_queries(split, 16, seed=0)
    model = CSMCIR.from_pretrained(separate)
    assert report["models"][1]["fingerprint"] == model.fingerprint()
    with torch.inference_mode():
        emb = embed_kinds(model, split, queries, load_captions(bench["captions"]))
        ref = model.encode_target([""], images=[Image.open(split.image_path(queries[0].reference))])
    torch.testing.assert_close(emb.reference[0], ref[0], atol=1e-5, rtol=0)
    for key, value in separation(emb).items():
        assert report["models"][1]["stats"][key] == pytest.approx(value, abs=1e-5)


def test_plot_single_model_repeated_flag_and_errors(bench, tmp_path, capsys):
    shared = str(bench["tmp"] / "shared")
    out = tmp_path / "one.png"
    args = plot_args(bench, out, "--model", shared)
    assert csmcir_main([*args, "--method", "pca"]) == 0
    with Image.open(out) as png:
        assert png.size == (500, 560)
    assert "tower: shared · shared: silhouette by kind" in capsys.readouterr().out

    two = plot_args(bench, tmp_path / "two.png", "--model", shared, "--model", shared)
    assert csmcir_main([*two, "--method", "pca"]) == 0
    assert len(json.loads((tmp_path / "two.json").read_text())["models"]) == 2

    assert csmcir_main(plot_args(bench, tmp_path / "x.jpg", "--model", shared)) == 2
    assert "--out must name a .png file" in capsys.readouterr().err
    no_captions = [a for a in args if a not in ("--captions", str(bench["captions"]))]
    assert csmcir_main(no_captions) == 2
    assert "this model reads target captions" in capsys.readouterr().err
    assert csmcir_main([*no_captions, "--empty-captions", "--method", "pca"]) == 0
    assert csmcir_main([*args, "--queries", "1"]) == 2
    assert "--queries must be at least 2" in capsys.readouterr().err


def test_sample_queries_is_seeded_and_keeps_split_order(bench):
    split = load_split("synthcir", bench["root"], "val")
    picked = sample_queries(split, 5, seed=3)
    assert picked == sample_queries(split, 5, seed=3) != sample_queries(split, 5, seed=4)
    order = [split.queries.index(q) for q in picked]
    assert order == sorted(order) and len(set(order)) == 5
    assert sample_queries(split, 10_000) == split.queries


def test_result_grid_png_size(tmp_path):
    # the retrieval grid (csmcir search): 5 columns of 160 px tiles, a query row above
    images = []
    for i in range(7):
        path = tmp_path / f"g{i}.png"
        Image.new("RGB", (40, 30), (30 * i, 80, 160)).save(path)
        images.append(GridItem(f"g{i}", path, 0.9 - 0.1 * i))
    out = save_grid(
        tmp_path / "grid.png", Image.new("RGB", (40, 30)), "make it red", images, target="g2"
    )
    with Image.open(out) as png:
        png.load()
        assert png.size == (8 + 5 * 168, 8 + 208 * 3)  # 2 result rows + the query row
        assert png.getpixel((8 + 2 * 168 + 80, 8 + 208 - 2)) == (0, 170, 60)  # target frame

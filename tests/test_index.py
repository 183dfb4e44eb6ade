"""The faiss gallery index: brute-force-equal rankings, files, model checks, the CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csmcir.cli import main as csmcir_main
from csmcir.errors import ConfigError, DataError
from csmcir.evaluation.metrics import rank_gallery
from csmcir.model import CSMCIR
from csmcir.retrieval import GalleryIndex
from csmcir.retrieval.index import recall_against_exact

CORPUS = ["a red square", "a blue circle on the left", "make it green", "remove the circle"]


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1)


def test_exact_search_matches_the_brute_force_ranking():
    gallery, queries = unit(300, 32), unit(40, 32, seed=1)
    ids = [f"img{i}" for i in range(300)]
    index = GalleryIndex.from_embeddings(gallery, ids, fingerprint="f")
    hits = index.search(queries, k=25)
    expected = rank_gallery(queries @ gallery.T, k=25)
    assert hits.indices.tolist() == expected.tolist()
    assert hits.ids[3] == [ids[j] for j in expected[3]]
    np.testing.assert_allclose(hits.scores, (queries @ gallery.T).gather(1, expected), atol=1e-5)


def test_multi_vector_targets_match_max_over_tokens():
    # target_text="none": 4 embeddings per image, an image scores its best token.
    gallery, queries = unit(120, 4, 16), unit(30, 16, seed=2)
    index = GalleryIndex.from_embeddings(gallery, [str(i) for i in range(120)], fingerprint="f")
    hits = index.search(queries, k=10)
    scores = CSMCIR.similarity(queries, gallery)
    assert hits.indices.tolist() == rank_gallery(scores, k=10).tolist()
    assert index.search(queries, k=500).indices.shape == (30, 120)  # k above the gallery size


def test_ivf_and_hnsw_recall_against_exact():
    gallery, queries = unit(2000, 32), unit(100, 32, seed=3)
    ids = [str(i) for i in range(2000)]
    exact = GalleryIndex.from_embeddings(gallery, ids, fingerprint="f").search(queries, 10)
    full = GalleryIndex.from_embeddings(
        gallery, ids, fingerprint="f", kind="ivf", nlist=16, nprobe=16
    )
    assert recall_against_exact(full.search(queries, 10), exact) == 1.0  # every cell searched
    partial = GalleryIndex.from_embeddings(
        gallery, ids, fingerprint="f", kind="ivf", nlist=16, nprobe=1
    )
    assert 0.0 < recall_against_exact(partial.search(queries, 10), exact) < 1.0
    hnsw = GalleryIndex.from_embeddings(gallery, ids, fingerprint="f", kind="hnsw")
    assert recall_against_exact(hnsw.search(queries, 10), exact) > 0.9


def write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (32, 32), (40 * (i % 6), 25 * (i % 10), 255 - 20 * (i % 12)))
        img.paste((255, 255, 255), (i % 24, (3 * i) % 24, i % 24 + 8, (3 * i) % 24 + 8))
        img.save(folder / f"g{i:03d}.png")
        paths.append(folder / f"g{i:03d}.png")
    return paths


@pytest.fixture(scope="module")
def tiny():
    return CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0).eval()


def test_build_save_load_round_trip_and_model_check(tiny, tmp_path):
    paths = write_images(tmp_path / "imgs", 12)
    captions = {p.stem: CORPUS[i % 4] for i, p in enumerate(paths)}
    index = GalleryIndex.build(tiny, paths, captions, kind="hnsw")
    with torch.inference_mode():
        q = tiny.encode_query(["make it green"], images=[Image.open(paths[0]).convert("RGB")])
        direct = tiny.encode_target(
            [captions[p.stem] for p in paths],
            images=[Image.open(p).convert("RGB") for p in paths],
        )
    # The untrained model's scores nearly tie, and the order of near-ties depends on the BLAS
    # (a 16-core machine swapped two): compare scores, each hit's and the whole ranking's.
    hits, exact = index.search(q, 12), (q @ direct.T)[0]
    found = torch.from_numpy(hits.scores[0]).float()
    torch.testing.assert_close(found, exact[torch.from_numpy(hits.indices[0])], atol=1e-5, rtol=0)
    torch.testing.assert_close(found, exact.sort(descending=True).values, atol=1e-5, rtol=0)
    index.save(tmp_path / "index")
    loaded = GalleryIndex.load(tmp_path / "index", model=tiny)
    assert loaded.meta["options"]["kind"] == "hnsw" and loaded.path_of("g003") == str(paths[3])
    assert loaded.search(q, 5).ids == index.search(q, 5).ids
    other = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=1)
    with pytest.raises(DataError, match=r"the index was built by model .* not by this one"):
        GalleryIndex.load(tmp_path / "index", model=other)
    with pytest.raises(DataError, match="have none"):
        GalleryIndex.build(tiny, paths, {"g000": "x"})
    (tmp_path / "index" / "ids.json").unlink()
    with pytest.raises(DataError, match=r"not a gallery index \(missing ids.json\)"):
        GalleryIndex.load(tmp_path / "index")


def test_index_and_search_commands(tiny, tmp_path, capsys):
    paths = write_images(tmp_path / "imgs", 15)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({p.stem: CORPUS[i % 4] for i, p in enumerate(paths)}))
    model_dir = tiny.save_pretrained(tmp_path / "model")
    out = tmp_path / "index"
    build = ["index", "build", "--model", str(model_dir), "--images", str(tmp_path / "imgs")]
    build += ["--captions", str(captions), "--out", str(out), "--no-cache", "--device", "cpu"]
    assert csmcir_main(build) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["images"] == 15 and meta["model_fingerprint"] == tiny.fingerprint()

    grid = tmp_path / "grid.png"
    search = ["search", "--index", str(out), "--ref", str(paths[2]), "--text", "make it green"]
    search += ["-k", "4", "--target", "g007", "--grid", str(grid), "--device", "cpu"]
    capsys.readouterr()
    assert csmcir_main(search) == 0
    printed = capsys.readouterr().out.splitlines()
    ranked = [line.split() for line in printed if line.strip()[:1].isdigit()]
    assert [r[0] for r in ranked] == ["1", "2", "3", "4"]
    index = GalleryIndex.load(out)
    with torch.inference_mode():
        q = tiny.encode_query(["make it green"], images=[Image.open(paths[2]).convert("RGB")])
    assert [r[2] for r in ranked] == index.search(q, 4).ids[0]
    with Image.open(grid) as img:
        assert img.size[0] > 500 and img.size[1] > 300

    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    bad_ref = search.copy()
    bad_ref[bad_ref.index("--ref") + 1] = str(not_image)
    assert csmcir_main(bad_ref) == 2
    assert f"unreadable image {not_image}" in capsys.readouterr().err

    other = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=5).save_pretrained(
        tmp_path / "other"
    )
    assert csmcir_main([*search, "--model", str(other)]) == 2
    assert "the index was built by model" in capsys.readouterr().err


def test_approximate_search_that_finds_fewer_than_k_pads_with_minus_one():
    # 1 of 64 IVF cells searched over 100 vectors: far fewer than 50 results come back.
    gallery, queries = unit(100, 8), unit(3, 8, seed=4)
    ids = [str(i) for i in range(100)]
    index = GalleryIndex.from_embeddings(
        gallery, ids, fingerprint="f", kind="ivf", nlist=64, nprobe=1
    )
    hits = index.search(queries, 50)
    for row_ids, row in zip(hits.ids, hits.indices, strict=True):
        found = row[row >= 0]
        assert len(row_ids) == len(found) < 50 and row_ids == [ids[j] for j in found]


def test_every_index_records_the_model_it_was_built_with(tiny, tmp_path):
    paths = write_images(tmp_path / "imgs", 6)
    captions = {p.stem: CORPUS[i % 4] for i, p in enumerate(paths)}
    folder = tiny.save_pretrained(tmp_path / "model")
    # from a folder: recorded, and what search and the demo open
    GalleryIndex.build(tiny, paths, captions, model_dir=folder).save(tmp_path / "a")
    assert GalleryIndex.load(tmp_path / "a").model_folder() == folder.resolve()
    # from a model object alone (the Python API, as the quickstart used it): kept in INDEX/model
    GalleryIndex.build(tiny, paths, captions).save(tmp_path / "b")
    kept = GalleryIndex.load(tmp_path / "b").model_folder()
    assert kept == (tmp_path / "b" / "model").resolve()
    assert CSMCIR.from_pretrained(kept).fingerprint() == tiny.fingerprint()
    # an index without one (older, or from embeddings) says what to pass, not "folder ."
    bare = GalleryIndex.from_embeddings(unit(3, 8), ["x", "y", "z"], fingerprint="f")
    bare.save(tmp_path / "c")
    with pytest.raises(ConfigError, match=r"records no model folder .*: pass --model"):
        GalleryIndex.load(tmp_path / "c").model_folder()
    assert GalleryIndex.load(tmp_path / "c").model_folder(folder) == folder


def test_search_from_another_folder_finds_relative_image_paths(tiny, tmp_path, monkeypatch, capsys):
    """An index built with relative paths (``--root datasets/...``) and searched elsewhere."""
    build_dir, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    paths = write_images(build_dir / "imgs", 6)
    captions = build_dir / "captions.json"
    captions.write_text(json.dumps({p.stem: CORPUS[i % 4] for i, p in enumerate(paths)}))
    tiny.save_pretrained(build_dir / "model")
    monkeypatch.chdir(build_dir)
    build = ["index", "build", "--model", "model", "--images", "imgs", "--captions", str(captions)]
    assert csmcir_main([*build, "--out", "index", "--no-cache", "--device", "cpu"]) == 0
    assert json.loads(Path("index/ids.json").read_text())["paths"][0] == "imgs/g000.png"

    monkeypatch.chdir(elsewhere)
    search = ["search", "--index", str(build_dir / "index"), "--ref", str(paths[0])]
    search += ["--text", "make it green", "-k", "6", "--grid", "grid.png", "--device", "cpu"]
    capsys.readouterr()
    assert csmcir_main(search) == 0
    captured = capsys.readouterr()
    assert (
        str(build_dir / "imgs" / "g000.png") in captured.out and captured.err.count("warning") == 0
    )
    index = GalleryIndex.load(build_dir / "index")
    assert index.path_of("g003") == str(build_dir / "imgs" / "g003.png")

    (build_dir / "imgs" / "g004.png").unlink()  # a result image gone: said, and status 1
    assert csmcir_main(search) == 1
    err = capsys.readouterr().err
    assert "1 of the 6 results are not on disk" in err and str(build_dir / "imgs/g004.png") in err

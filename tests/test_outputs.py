"""The one output rule (csmcir.outputs) and the identity captions carry, command by command:
each refused output kind and each identity check has its case here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from csmcir.cli import main as csmcir_main
from csmcir.data.captions import load_captions
from csmcir.data.registry import load_split
from csmcir.data.synth import SynthConfig, generate
from csmcir.errors import ConfigError, DataError

TINY = dict(train_refs=4, val_refs=3, test_refs=3, image_size=32)


def caption(*args) -> int:
    return csmcir_main(["caption", *map(str, args)])


def captioned(root: Path, seed: int, split: str = "val", **sizes) -> tuple[Path, Path]:
    """A synthetic benchmark of ``seed`` with its oracle captions: (shard folder, merged file)."""
    generate(root, SynthConfig(seed=seed, **(TINY | sizes)))
    shards, merged = root / "shards", root / "captions.json"
    run = ["run", "--benchmark", "synthcir", "--root", root, "--split", split]
    assert caption(*run, "--backend", "oracle", "--out", shards, "--no-progress") == 0
    assert caption("merge", shards, "--out", merged) == 0
    return shards, merged


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[Path, Path]:
    """Two synthetic benchmarks with the same image ids and other pictures (seeds 0 and 1)."""
    base = tmp_path_factory.mktemp("twins")
    a, b = base / "a", base / "b"
    captioned(a, 0)
    captioned(b, 1)
    return a, b


# -- caption merge: one run, one benchmark, never over its inputs --------------------------


def test_merge_refuses_a_shard_of_another_benchmark_with_the_same_ids(twins, tmp_path):
    a, b = twins
    mixed = tmp_path / "mixed"
    shutil.copytree(a / "shards", mixed)
    for shard in mixed.glob("shard-*.jsonl"):
        shard.unlink()
    shutil.copy(next((b / "shards").glob("shard-*.jsonl")), mixed)  # b's captions, a's run.json
    with pytest.raises(DataError, match=r"shard-0000-of-0001.jsonl holds captions of another"):
        csmcir_merge(mixed, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_merge_refuses_a_shard_of_images_its_run_does_not_list(tmp_path):
    small, full = tmp_path / "small", tmp_path / "full"
    captioned(small, 0)
    captioned(full, 0, split="all")
    shutil.copy(
        next((full / "shards").glob("shard-*.jsonl")), small / "shards" / "shard-0000-of-0002.jsonl"
    )
    with pytest.raises(DataError, match=r"record\(s\) of images .*run.json does not list"):
        csmcir_merge(small / "shards", tmp_path / "out.json")


def test_merge_never_writes_over_an_annotation_file_or_its_inputs(twins, tmp_path, capsys):
    a, _ = twins
    annotations = a / "captions" / "cap.rc2.val.json"
    before = annotations.read_bytes()
    assert caption("merge", a / "shards", "--out", annotations) == 2
    err = capsys.readouterr().err
    assert f"--out {annotations} holds a JSON list csmcir did not write" in err
    assert "Give --out a new file" in err and annotations.read_bytes() == before
    image_list = a / "image_splits" / "split.rc2.val.json"  # id -> file, like a caption map
    assert caption("merge", a / "shards", "--out", image_list) == 2
    err = capsys.readouterr().err
    assert f"--out {image_list} holds a JSON map of image ids to image files" in err
    run_json = a / "shards" / "run.json"
    assert caption("merge", a / "shards", "--out", run_json) == 2
    assert "is also its caption run's run.json: writing" in capsys.readouterr().err
    (shard,) = (a / "shards").glob("shard-*.jsonl")
    assert caption("merge", a / "shards", "--out", shard) == 2
    err = capsys.readouterr().err
    assert f"is also the shard {shard.name} being merged: writing the caption file" in err
    assert caption("merge", a / "shards", "--out", a / "shards") == 2
    err = capsys.readouterr().err
    assert "is also the shard folder: writing the caption file there would destroy it" in err


def test_merge_replaces_its_own_file_but_not_the_captions_of_another_run(twins, capsys):
    a, b = twins
    assert caption("merge", a / "shards", "--out", a / "captions.json") == 0  # made again
    before = b.joinpath("captions.json").read_bytes()
    assert caption("merge", a / "shards", "--out", b / "captions.json") == 2
    err = capsys.readouterr().err
    assert "holds the caption file of " in err and "delete" in err
    assert b.joinpath("captions.json").read_bytes() == before


def test_caption_run_refuses_other_images_with_the_same_ids_in_its_folder(twins, capsys):
    a, b = twins
    run = ["run", "--benchmark", "synthcir", "--root", b, "--split", "val", "--backend", "oracle"]
    assert caption(*run, "--out", a / "shards") == 2
    assert "other images: a new --out folder" in capsys.readouterr().err


def test_caption_run_refuses_a_folder_it_did_not_make(twins, capsys):
    a, _ = twins
    run = ["run", "--benchmark", "synthcir", "--root", a, "--split", "val", "--backend", "oracle"]
    assert caption(*run, "--out", a) == 2  # the benchmark's own folder
    assert "not a caption shard folder csmcir wrote" in capsys.readouterr().err
    assert not list(a.glob("shard-*"))


def csmcir_merge(folder: Path, out: Path) -> None:
    from captioning.merge import merge_folder

    merge_folder(folder, out)


# -- captions are checked against the images they are used for ---------------------------


def test_captions_of_other_pictures_with_the_same_ids_are_refused(twins):
    a, b = twins
    gallery = load_split("synthcir", a, "val")
    images = {g: gallery.image_path(g) for g in gallery.gallery}
    assert load_captions(a / "captions.json", images, benchmark="synthcir")
    with pytest.raises(DataError, match=r"describes other images than these: \d+ of the \d+"):
        load_captions(b / "captions.json", images, benchmark="synthcir")
    with pytest.raises(DataError, match=r"holds captions of synthcir, not of cirr"):
        load_captions(a / "captions.json", images, benchmark="cirr")


def test_the_released_caption_form_is_read_saying_what_was_not_checked(twins, tmp_path, capsys):
    a, _ = twins
    merged = json.loads((a / "captions.json").read_text())
    released = {k: {"Final_Caption": v["Final_Caption"]} for k, v in merged.items()}
    path = tmp_path / "released.json"
    path.write_text(json.dumps(released))
    gallery = load_split("synthcir", a, "val")
    images = {g: gallery.image_path(g) for g in gallery.gallery}
    assert load_captions(path, images, benchmark="synthcir") == {
        k: v["Final_Caption"] for k, v in released.items()
    }
    assert "records no image fingerprints" in capsys.readouterr().err


def test_eval_refuses_the_caption_file_of_another_benchmark(twins, tmp_path, capsys):
    a, b = twins
    args = ["eval", "--model", "tiny", "--benchmark", "synthcir", "--root", a, "--no-cache"]
    args += ["--device", "cpu", "--out", tmp_path / "r.json", "--captions", b / "captions.json"]
    assert csmcir_main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    assert f"--captions {b / 'captions.json'} describes other images than these" in err
    run_b = json.loads((b / "shards" / "run.json").read_text())["identity"]["images"]
    assert f"caption run {run_b})" in err


# -- eval: --out never over an input, a default name per caption file ----------------------


def test_eval_refuses_to_write_its_results_over_its_own_captions(twins, capsys):
    a, _ = twins
    caps = a / "captions.json"
    before = caps.read_bytes()
    args = ["eval", "--model", "tiny", "--benchmark", "synthcir", "--root", a, "--no-cache"]
    args += ["--device", "cpu", "--captions", caps, "--out", caps]
    assert csmcir_main(list(map(str, args))) == 2
    assert f"--out {caps} is also the --captions file: writing the" in (capsys.readouterr().err)
    assert caps.read_bytes() == before


def test_eval_default_names_tell_caption_files_apart(twins, tmp_path, monkeypatch, capsys):
    a, _ = twins
    other = tmp_path / "other.json"
    data = json.loads((a / "captions.json").read_text())
    data = {k: v | {"Final_Caption": "a scene"} for k, v in data.items()}
    other.write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--model", "tiny", "--benchmark", "synthcir", "--root", str(a)]
    args += ["--no-cache", "--device", "cpu"]
    for caps in (a / "captions.json", other):
        assert csmcir_main([*args, "--captions", str(caps)]) == 0
    written = sorted(p.name for p in (tmp_path / "runs" / "eval").iterdir())
    assert len(written) == 2 and "replacing" not in capsys.readouterr().err
    assert any("-captions-captions-" in w for w in written)
    assert any("-captions-other-" in w for w in written)


def test_eval_refuses_an_out_file_it_did_not_write(twins, tmp_path, capsys):
    a, _ = twins
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": ["notes"]}')
    args = ["eval", "--model", "tiny", "--benchmark", "synthcir", "--root", a, "--no-cache"]
    args += ["--device", "cpu", "--empty-captions", "--out", notes]
    assert csmcir_main(list(map(str, args))) == 2
    assert "holds a JSON dict csmcir did not write" in capsys.readouterr().err
    assert notes.read_text() == '{"my": ["notes"]}'


def test_claim_allows_new_paths_and_refuses_the_wrong_sort_of_path(tmp_path):
    from csmcir.outputs import CAPTION_FILE, claim

    assert claim(tmp_path / "new.json", CAPTION_FILE, flag="--out") is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is a folder; give --out a file path"):
        claim(tmp_path / "empty", CAPTION_FILE, flag="--out")


def test_a_refusal_names_what_differs_even_a_key_only_the_old_output_had(tmp_path):
    """An identity that lost a key read "holds the caption file of ; it is left as it is"."""
    from csmcir.outputs import EVAL_RESULTS, RECORD_KEY, claim, record

    path = tmp_path / "results.json"
    old = {"model": "m", "captions": "c1"}
    path.write_text(json.dumps({RECORD_KEY: record(EVAL_RESULTS, "eval", old)}))
    with pytest.raises(ConfigError, match=r"holds the results file of captions c1 \(now none\);"):
        claim(path, EVAL_RESULTS, flag="--out", identity={"model": "m"}, other_identity="refuse")


# -- index build and search ----------------------------------------------------------------


@pytest.fixture(scope="module")
def models(twins, tmp_path_factory) -> tuple[Path, Path]:
    """Two untrained tiny models (seeds 0 and 1) saved as folders."""
    from csmcir.model import CSMCIR

    split = load_split("synthcir", twins[0], "val")
    corpus = [q.texts[0] for q in split.queries]
    base = tmp_path_factory.mktemp("models")
    return tuple(
        CSMCIR.from_preset("tiny", tokenizer_corpus=corpus, seed=s).save_pretrained(base / f"m{s}")
        for s in (0, 1)
    )


def build_index(model: Path, root: Path, out: Path, split: str = "val") -> int:
    args = ["index", "build", "--model", model, "--benchmark", "synthcir", "--root", root]
    args += ["--split", split, "--captions", root / "captions.json", "--out", out]
    return csmcir_main(list(map(str, [*args, "--no-cache", "--device", "cpu"])))


def test_index_build_refuses_a_dataset_root_and_another_models_index(
    twins, models, tmp_path, capsys
):
    a, _ = twins
    m0, m1 = models
    assert build_index(m0, a, a) == 2
    assert f"--out {a} holds a synthetic benchmark, not a gallery index" in (
        capsys.readouterr().err
    )
    assert not (a / "index.faiss").exists()
    photos = tmp_path / "photos"
    shutil.copytree(a / "val", photos)
    assert build_index(m0, a, photos) == 2
    assert "a folder of files csmcir did not write (val-00000.png" in capsys.readouterr().err

    out = tmp_path / "index"
    assert build_index(m0, a, out) == 0
    before = (out / "meta.json").read_bytes()
    assert build_index(m1, a, out) == 2  # another model's index stays
    err = capsys.readouterr().err
    assert (
        f"--out {out} holds the gallery index of model {m0.resolve()} (now {m1.resolve()})" in err
    )
    assert (out / "meta.json").read_bytes() == before
    assert build_index(m0, a, out) == 0  # its own index, built again
    assert build_index(m0, a, out, split="test") == 2  # another split's gallery
    assert "gallery synthcir val at" in capsys.readouterr().err


def test_search_grids_are_named_per_query_and_replace_only_grids(
    twins, models, tmp_path, monkeypatch, capsys
):
    a, _ = twins
    index = tmp_path / "index"
    assert build_index(models[0], a, index) == 0
    ref = a / "val" / "val-00000.png"
    monkeypatch.chdir(tmp_path)
    search = ["search", "--index", str(index), "--ref", str(ref), "--device", "cpu", "-k", "3"]
    for text in ("add a red circle", "remove the square"):
        assert csmcir_main([*search, "--text", text]) == 0
    grids = sorted(p.name for p in (tmp_path / "runs" / "search").iterdir())
    assert len(grids) == 2 and all(g.startswith("val-00000-") for g in grids)
    assert "add-a-red-circle" in grids[0] and "remove-the-square" in grids[1]

    assert csmcir_main([*search, "--text", "x", "--grid", str(ref)]) == 2
    err = capsys.readouterr().err
    assert f"--grid {ref} is also the --ref image: writing the search grid there" in err
    photo = tmp_path / "photo.png"
    shutil.copy(a / "val" / "val-00001.png", photo)
    assert csmcir_main([*search, "--text", "x", "--grid", str(photo)]) == 2
    assert "holds a file csmcir did not write" in capsys.readouterr().err
    mine = tmp_path / "runs" / "search" / grids[0]
    assert csmcir_main([*search, "--text", "x", "--grid", str(mine)]) == 0
    assert f"replacing {mine}: it held the search grid of text add a red circle (now x)" in (
        capsys.readouterr().err
    )


# -- data synth ----------------------------------------------------------------------------


def test_data_synth_refuses_a_training_run_folder_even_with_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "last.ckpt").write_bytes(b"weights")
    synth = ["data", "synth", "--out", str(run), "--train-refs", "2", "--val-refs", "2"]
    synth += ["--test-refs", "2", "--image-size", "32"]
    for extra in ([], ["--overwrite"]):
        assert csmcir_main([*synth, *extra]) == 2
        err = capsys.readouterr().err
        assert f"--out {run} holds a training run folder (holding model, last.ckpt)" in err
        assert "Give --out a new folder" in err and "pass --overwrite" not in err
    assert sorted(p.name for p in run.iterdir()) == ["last.ckpt", "model"]
    # its own benchmark: --overwrite regenerates it, and says so when missing
    bench = tmp_path / "bench"
    assert csmcir_main([*synth[:3], str(bench), *synth[4:]]) == 0
    assert csmcir_main([*synth[:3], str(bench), *synth[4:]]) == 2
    assert "holds a synthetic benchmark; pass --overwrite" in capsys.readouterr().err
    assert csmcir_main([*synth[:3], str(bench), *synth[4:], "--overwrite"]) == 0


# -- plot embeddings and features extract -------------------------------------------------


def test_plot_embeddings_refuses_its_captions_and_pictures_it_did_not_draw(
    twins, models, tmp_path, capsys
):
    a, _ = twins
    plot = ["plot", "embeddings", "--model", str(models[0]), "--benchmark", "synthcir"]
    plot += ["--root", str(a), "--queries", "6", "--method", "pca", "--device", "cpu"]
    caps = tmp_path / "caps.json"
    shutil.copy(a / "captions.json", caps)
    # the JSON report beside caps.png would be the caption file itself
    assert csmcir_main([*plot, "--captions", str(caps), "--out", str(tmp_path / "caps.png")]) == 2
    assert f"--out {caps} is also the --captions file: writing the" in (capsys.readouterr().err)
    photo = tmp_path / "photo.png"
    shutil.copy(a / "val" / "val-00001.png", photo)
    assert csmcir_main([*plot, "--captions", str(caps), "--out", str(photo)]) == 2
    assert "holds a file csmcir did not write" in capsys.readouterr().err
    out = tmp_path / "plot.png"
    assert csmcir_main([*plot, "--captions", str(caps), "--out", str(out)]) == 0
    assert csmcir_main([*plot, "--captions", str(caps), "--out", str(out)]) == 0  # its own


def test_features_extract_refuses_a_dataset_root(twins, models, capsys):
    a, _ = twins
    extract = ["features", "extract", "--model", str(models[0]), "--benchmark", "synthcir"]
    assert csmcir_main([*extract, "--root", str(a), "--split", "val", "--out", str(a)]) == 2
    assert f"--out {a} holds a synthetic benchmark, not a feature cache" in (
        capsys.readouterr().err
    )
    assert not (a / "meta.json").exists()


def test_training_refuses_the_caption_file_of_another_benchmark(twins):
    from csmcir.train.datamodule import CIRDataModule

    a, b = twins
    CIRDataModule("synthcir", a, a / "captions.json").setup("validate")
    with pytest.raises(DataError, match=r"--data.captions .* describes other images than these"):
        CIRDataModule("synthcir", a, b / "captions.json").setup("validate")


def test_outputs_of_an_older_csmcir_are_recognised_and_made_again(tmp_path):
    """Written before the provenance records: replaced by the command that made them, so a
    rerun of the quickstart in an old run folder is not refused."""
    from PIL import Image

    from csmcir import outputs

    plot = tmp_path / "embeddings.png"
    Image.new("RGB", (4, 4)).save(plot)
    plot.with_suffix(".json").write_text('{"png": "x", "models": [], "method": "pca"}')
    results = tmp_path / "results.json"
    results.write_text('{"benchmark": "synthcir", "model": {}, "metrics": {}}')
    captions = tmp_path / "captions.json"
    entry = {"Final_Caption": "a red circle", "prompt_version": "v", "model": "oracle"}
    captions.write_text(json.dumps({"a": entry}))
    index = tmp_path / "index"
    index.mkdir()
    (index / "meta.json").write_text('{"model_fingerprint": "abc"}')
    for path, kind in (
        (plot, outputs.EMBEDDING_PLOT),
        (plot.with_suffix(".json"), outputs.EMBEDDING_PLOT),
        (results, outputs.EVAL_RESULTS),
        (captions, outputs.CAPTION_FILE),
        (index, outputs.GALLERY_INDEX),
    ):
        assert outputs.claim(path, kind, flag="--out", identity={"x": 1})["kind"] == kind
    with pytest.raises(ConfigError, match="not a search grid csmcir wrote"):
        outputs.claim(plot, outputs.SEARCH_GRID, flag="--grid")


def test_fit_refuses_to_write_its_run_into_a_dataset(twins, capsys):
    from csmcir.packaged import config_file

    a, _ = twins
    fit = ["fit", "--config", str(config_file("synthcir")), "--data.root", str(a)]
    fit += ["--data.captions", str(a / "captions.json"), "--trainer.default_root_dir", str(a)]
    assert csmcir_main([*fit, "--trainer.max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--trainer.default_root_dir {a} holds a synthetic benchmark, not a training run" in err
    assert not (a / "model").exists() and not (a / "logs").exists()

"""The synthetic benchmark generator: layout, determinism, and that every query has one answer.

The query checks read the texts back with csmcir.data.synth_truth's reader, which knows the scene
vocabulary (attribute values, cell names) but not the generator's templates, so a text that names
the wrong object, or an object that two scene objects fit, fails.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from unittest.mock import patch

import pytest

from csmcir.cli import main as csmcir_main
from csmcir.data.images import load_image
from csmcir.data.synth import generate, is_complete, recorded_config
from csmcir.data.synth_build import SynthConfig
from csmcir.data.synth_render import BACKGROUND, RGB, png_bytes, render_scene
from csmcir.data.synth_scenes import COLORS, SHAPES, SIZES, Modification, Obj, make_scene
from csmcir.data.synth_text import modification_text
from csmcir.data.synth_truth import load_scenes, oracle_scores, read_modification
from csmcir.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
TINY = {"train_refs": 30, "val_refs": 12, "test_refs": 20}
RECORD_KEYS = [
    "pairid",
    "reference",
    "target_hard",
    "target_soft",
    "caption",
    "img_set",
    "mod_type",
]


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "synthcir"
    generate(root, SynthConfig(seed=0, **TINY))
    return root


def captions(root: Path, split: str) -> list[dict]:
    return json.loads((root / "captions" / f"cap.rc2.{split}.json").read_text())


def image_split(root: Path, split: str) -> dict[str, str]:
    return json.loads((root / "image_splits" / f"split.rc2.{split}.json").read_text())


def scenes(root: Path) -> dict:
    return json.loads((root / "scenes.json").read_text())


def canonical(objects: list[dict]) -> frozenset[tuple]:
    return frozenset((o["shape"], o["color"], o["size"], o["row"], o["col"]) for o in objects)


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(bench, tmp_path):
    generate(tmp_path / "again", SynthConfig(seed=0, **TINY))
    generate(tmp_path / "seed1", SynthConfig(seed=1, **TINY))
    first, again = file_hashes(bench), file_hashes(tmp_path / "again")
    assert len(first) == 3 * 2 + 2 + sum(len(image_split(bench, s)) for s in SPLITS)
    assert first == again
    other = file_hashes(tmp_path / "seed1")
    assert first.keys() == other.keys()  # same sizes give the same names...
    for name in ("scenes.json", *(f"captions/cap.rc2.{s}.json" for s in SPLITS)):
        assert first[name] != other[name]  # ...but different content


def test_the_settings_are_recorded_first_so_an_interrupted_run_is_known(bench, tmp_path):
    assert recorded_config(bench) == SynthConfig(seed=0, **TINY) and is_complete(bench)
    # killed while rendering: the settings are there, scenes.json (written last) is not
    (tmp_path / "killed").mkdir()
    killed = patch("csmcir.data.synth.write_images", side_effect=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt), killed:
        generate(tmp_path / "killed", SynthConfig(seed=3, **TINY))
    assert recorded_config(tmp_path / "killed") == SynthConfig(seed=3, **TINY)
    assert not is_complete(tmp_path / "killed")
    assert recorded_config(tmp_path) is None  # a folder no generator wrote


def test_test_split_does_not_depend_on_train_size(bench, tmp_path):
    generate(tmp_path / "big", SynthConfig(seed=0, **{**TINY, "train_refs": 45}))
    big = file_hashes(tmp_path / "big")
    small = file_hashes(bench)
    test_files = [k for k in small if "test" in k]
    assert len(test_files) > 2
    assert {k: small[k] for k in test_files} == {k: big[k] for k in test_files}
    assert small["captions/cap.rc2.train.json"] != big["captions/cap.rc2.train.json"]


# --- layout ----------------------------------------------------------------------------------


def test_cirr_fields_and_types_follow_the_contract(bench):
    pairids = []
    for split in SPLITS:
        records = captions(bench, split)
        assert len(records) == 2 * TINY[f"{split}_refs"]
        names = image_split(bench, split)
        assert names == {n: f"./{split}/{n}.png" for n in names}
        for rec in records:
            assert list(rec) == RECORD_KEYS + (
                ["mod_attribute"] if rec["mod_type"] == "change" else []
            )
            assert type(rec["pairid"]) is int
            assert isinstance(rec["reference"], str) and isinstance(rec["target_hard"], str)
            assert rec["target_soft"] == {rec["target_hard"]: 1.0}
            assert isinstance(rec["caption"], str) and rec["caption"].strip()
            assert rec["mod_type"] in {"add", "remove", "change", "move"}
            img_set = rec["img_set"]
            assert list(img_set) == ["id", "members", "reference_rank", "target_rank"]
            assert all(type(img_set[k]) is int for k in ("id", "reference_rank", "target_rank"))
            assert all(isinstance(m, str) for m in img_set["members"])
            assert {rec["reference"], rec["target_hard"]} <= names.keys()
            pairids.append(rec["pairid"])
    assert len(set(pairids)) == len(pairids)


def test_scenes_json_describes_every_image_exactly(bench):
    data = scenes(bench)
    assert list(data) == ["version", "grid", "attributes", "images"]
    assert data["version"] == 1 and data["grid"] == 3
    assert data["attributes"] == {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES)}
    all_names = [n for s in SPLITS for n in image_split(bench, s)]
    assert sorted(data["images"]) == sorted(all_names)
    for record in data["images"].values():
        assert list(record) == ["objects"]
        objects = record["objects"]
        assert 2 <= len(objects) <= 5
        assert len({(o["row"], o["col"]) for o in objects}) == len(objects)
        for o in objects:
            assert list(o) == ["shape", "color", "size", "row", "col"]
            assert all(o[a] in data["attributes"][a] for a in ("shape", "color", "size"))
            assert 0 <= o["row"] < 3 and 0 <= o["col"] < 3


def test_every_image_exists_decodes_and_nothing_else_is_written(bench):
    for split in SPLITS:
        names = image_split(bench, split)
        for rel in names.values():
            image = load_image(bench / rel)
            assert image.size == (64, 64)
        on_disk = {p.stem for p in (bench / split).iterdir()}
        assert on_disk == names.keys()
    assert {p.name for p in bench.iterdir()} == {
        "captions",
        "image_splits",
        "scenes.json",
        "synth_config.json",
        *SPLITS,
    }


def test_splits_are_disjoint_in_names_and_scenes(bench):
    data = scenes(bench)["images"]
    seen_names: set[str] = set()
    seen_scenes: set[frozenset] = set()
    for split in SPLITS:
        names = set(image_split(bench, split))
        split_scenes = {canonical(data[n]["objects"]) for n in names}
        assert len(split_scenes) == len(names)  # no two images of a split show the same scene
        assert not names & seen_names and not split_scenes & seen_scenes
        seen_names |= names
        seen_scenes |= split_scenes


def test_members_are_six_look_alikes_with_reference_and_target(bench):
    data = scenes(bench)["images"]
    for split in SPLITS:
        by_set: dict[int, list[str]] = {}
        names = image_split(bench, split)
        for rec in captions(bench, split):
            members = rec["img_set"]["members"]
            assert len(members) == 6 == len(set(members))
            assert set(members) <= names.keys()
            assert members[rec["img_set"]["reference_rank"]] == rec["reference"]
            assert members[rec["img_set"]["target_rank"]] == rec["target_hard"]
            assert by_set.setdefault(rec["img_set"]["id"], members) == members
            # Look-alikes: every member shares most objects with the reference.
            ref = canonical(data[rec["reference"]]["objects"])
            for m in members:
                assert len(ref ^ canonical(data[m]["objects"])) <= 4


# --- every query has exactly one answer ------------------------------------------------------


def test_each_target_is_the_only_gallery_image_satisfying_its_query(bench):
    scenes_by_name = load_scenes(bench)
    for split in SPLITS:
        gallery = {n: scenes_by_name[n] for n in image_split(bench, split)}
        for rec in captions(bench, split):
            wanted = read_modification(
                rec["caption"], rec["mod_type"], scenes_by_name[rec["reference"]]
            )
            satisfying = [n for n, s in gallery.items() if s == wanted]
            assert satisfying == [rec["target_hard"]], rec


def test_reader_refuses_texts_that_name_no_object_or_several():
    twins = make_scene([Obj(0, 0, "square", "red", "small"), Obj(2, 2, "square", "red", "small")])
    with pytest.raises(DataError, match="fits 2 objects"):
        read_modification("make the small red square green", "change", twins)
    assert read_modification(
        "make the small red square in the top left green", "change", twins
    ) == make_scene([Obj(0, 0, "square", "green", "small"), Obj(2, 2, "square", "red", "small")])
    with pytest.raises(DataError, match="names no object"):
        read_modification("make it green", "change", twins)
    with pytest.raises(DataError, match="one free cell"):
        read_modification("add a large blue circle in the top left", "add", twins)


def test_oracle_scores_every_query_right_and_types_are_recorded(bench):
    from csmcir.data.registry import load_split
    from csmcir.evaluation.protocols import by_type, compute, prepare

    split = load_split("synthcir", bench, "test")
    prepared = prepare(split)
    oracle = oracle_scores(split, load_scenes(bench))
    assert compute(oracle, prepared) == pytest.approx(dict.fromkeys(compute(oracle, prepared), 100))
    types = by_type(oracle, prepared)
    assert sum(types[t]["queries"] for t in ("add", "remove", "change", "move")) == len(
        split.queries
    )
    changes = [q for q in split.queries if q.extra["mod_type"] == "change"]
    scenes_by_name = load_scenes(bench)
    for q in changes:  # mod_attribute names the one attribute of one object that differs
        (old,) = set(scenes_by_name[q.reference]) - set(scenes_by_name[q.target])
        (new,) = set(scenes_by_name[q.target]) - set(scenes_by_name[q.reference])
        differ = [a for a in ("shape", "color", "size") if getattr(old, a) != getattr(new, a)]
        assert old.cell == new.cell and differ == [q.extra["mod_attribute"]]
    attributes = {q.extra["mod_attribute"] for q in changes}
    assert sum(types[f"change:{a}"]["queries"] for a in attributes) == len(changes) > 0


def test_every_target_has_a_gallery_near_duplicate(bench):
    """A distractor per query: an image differing from the target in one object's attribute."""
    images = scenes(bench)["images"]
    for split in SPLITS:
        gallery = {n: canonical(images[n]["objects"]) for n in image_split(bench, split)}
        for rec in captions(bench, split):
            target = gallery[rec["target_hard"]]
            near = [
                n
                for n, s in gallery.items()
                if n != rec["reference"] and len(s) == len(target) and len(s - target) == 1
            ]
            assert near, rec


def test_text_names_duplicate_objects_by_position_and_removals_always():
    twin_a = Obj(0, 0, "square", "red", "small")
    twin_b = Obj(2, 2, "square", "red", "small")
    single = Obj(1, 1, "circle", "blue", "large")
    scene = make_scene([twin_a, twin_b, single])
    rng = random.Random(0)
    for _ in range(20):
        text = modification_text(rng, scene, Modification("change", twin_b, "color", "green"))
        assert "small red square in the bottom right" in text and "green" in text
        text = modification_text(rng, scene, Modification("remove", single))
        assert "large blue circle in the center" in text
    move = Modification("move", single, dest=(0, 2))
    assert move.apply(scene) == make_scene([twin_a, twin_b, single._replace(row=0, col=2)])
    assert "to the top right" in modification_text(rng, scene, move)


def test_rendering_known_pixels_and_distinct_objects():
    red = Obj(1, 1, "square", "red", "large")
    image = render_scene(make_scene([red, Obj(0, 0, "circle", "blue", "small")]), 3, 64)
    assert image.size == (64, 64)
    assert image.getpixel((32, 32)) == RGB["red"]
    assert image.getpixel((10, 10)) == RGB["blue"]
    assert image.getpixel((63, 0)) == BACKGROUND
    looks = {
        png_bytes(render_scene((Obj(1, 1, shape, color, size),), 3, 64))
        for shape in SHAPES
        for color in COLORS
        for size in SIZES
    }
    assert len(looks) == len(SHAPES) * len(COLORS) * len(SIZES)


# --- files on disk and the command line ------------------------------------------------------


def test_overwrite_guard_and_clean_replacement(bench, tmp_path):
    root = tmp_path / "out"
    generate(root, SynthConfig(seed=3, **{**TINY, "test_refs": 30}))
    with pytest.raises(ConfigError, match="--overwrite"):
        generate(root, SynthConfig(seed=0, **TINY))
    (root / "notes.txt").write_text("mine")
    generate(root, SynthConfig(seed=0, **TINY), overwrite=True)
    assert (root / "notes.txt").read_text() == "mine"
    (root / "notes.txt").unlink()
    assert file_hashes(root) == file_hashes(bench)  # stale images of the larger run are gone


def test_cli_generates_and_reports_errors_cleanly(tmp_path, capsys):
    out = tmp_path / "cli"
    sizes = ["--train-refs", "4", "--val-refs", "3", "--test-refs", "5", "--seed", "7"]
    assert csmcir_main(["data", "synth", "--out", str(out), *sizes]) == 0
    printed = capsys.readouterr().out
    assert "test: 5 references, 10 queries, 30 images" in printed
    assert len(captions(out, "val")) == 6
    assert csmcir_main(["data", "synth", "--out", str(out), *sizes]) == 2
    assert "--overwrite" in capsys.readouterr().err
    bad = [
        "data",
        "synth",
        "--out",
        str(tmp_path / "bad"),
        "--min-objects",
        "3",
        "--max-objects",
        "4",
    ]
    assert csmcir_main(bad) == 2
    assert "--max-objects" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_registry_loads_the_generated_split(bench):
    from csmcir.data.registry import load_split

    split = load_split("synthcir", bench, "test")
    assert len(split.queries) == 2 * TINY["test_refs"]
    assert sorted(split.gallery) == sorted(image_split(bench, "test"))
    assert split.exclude_reference
    first = captions(bench, "test")[0]
    q = split.queries[0]
    assert (q.reference, q.target, q.texts) == (
        first["reference"],
        first["target_hard"],
        (first["caption"],),
    )
    assert q.extra["mod_type"] == first["mod_type"]

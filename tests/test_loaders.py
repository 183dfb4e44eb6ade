"""Loaders on tiny datasets written in each benchmark's official format: counts, fields, rules."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from csmcir.data import fashion200k, fashioniq
from csmcir.data.registry import BENCHMARKS, load_split, read_split
from csmcir.errors import ConfigError, DataError
from csmcir.evaluation.protocols import compute, prepare


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), (200, 30, 30)).save(path)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_registry_lists_every_benchmark():
    assert set(BENCHMARKS) == {"synthcir", "cirr", "fashioniq", "circo", "shoes", "fashion200k"}
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        read_split("nope", ".", "val")


# --- FashionIQ -------------------------------------------------------------------------------


@pytest.fixture
def fiq(tmp_path: Path) -> Path:
    write_json(tmp_path / "image_splits/split.dress.val.json", ["A", "B", "C", "D", "E"])
    write_json(
        tmp_path / "captions/cap.dress.val.json",
        [
            {"target": "B", "candidate": "A", "captions": ["is red.", "has short sleeves?"]},
            {"target": "C", "candidate": "D", "captions": ["", "has buttons on it"]},
            {"target": "A", "candidate": "E", "captions": [" longer, ", "is blue"]},
        ],
    )
    write_json(tmp_path / "image_splits/split.dress.test.json", ["A", "B"])
    write_json(
        tmp_path / "captions/cap.dress.test.json", [{"candidate": "A", "captions": ["x", "y"]}]
    )
    for name in "ABCE":
        write_image(tmp_path / f"images/{name}.png")
    write_image(tmp_path / "images/D.jpg")  # a jpg mirror for one image
    write_image(tmp_path / "images/E.jpg")  # both forms: the png is used
    return tmp_path


def test_fashioniq_counts_fields_and_paths(fiq: Path):
    split = load_split("fashioniq", fiq, "val", category="dress")
    assert split.benchmark == "fashioniq-dress"
    assert (len(split.queries), len(split.gallery)) == (3, 5)
    q = split.queries[0]
    assert (q.reference, q.targets, q.texts) == ("A", ("B",), ("is red.", "has short sleeves?"))
    assert split.exclude_reference is False
    assert split.image_paths["D"] == fiq / "images/D.jpg"
    assert split.image_paths["E"] == fiq / "images/E.png"
    excluded = read_split("fashioniq", fiq, "val", category="dress", exclude_reference=True)
    assert excluded.exclude_reference is True


def test_fashioniq_join_rule_including_empty_caption(fiq: Path):
    split = read_split("fashioniq", fiq, "val", category="dress")
    texts = [split.eval_text(q) for q in split.queries]
    assert texts == [
        "Is red and has short sleeves",
        " and has buttons on it",
        "Longer and is blue",
    ]


def test_fashioniq_train_text_covers_the_four_forms(fiq: Path):
    q = read_split("fashioniq", fiq, "val", category="dress").queries[0]
    rng = random.Random(0)
    seen = {fashioniq.train_text(q, rng) for _ in range(200)}
    assert seen == {
        "Is red and has short sleeves",
        "Has short sleeves and is red",
        "Is red",
        "Has short sleeves",
    }
    a = [fashioniq.train_text(q, random.Random(7)) for _ in range(3)]
    assert a == [fashioniq.train_text(q, random.Random(7)) for _ in range(3)]


def test_fashioniq_train_text_never_empty_for_an_empty_caption(fiq: Path):
    q = read_split("fashioniq", fiq, "val", category="dress").queries[1]
    rng = random.Random(0)
    seen = {fashioniq.train_text(q, rng) for _ in range(200)}
    assert seen == {" and has buttons on it", "Has buttons on it and ", "Has buttons on it"}


def test_fashioniq_test_split_has_no_targets(fiq: Path):
    split = load_split("fashioniq", fiq, "test", category="dress")
    assert not split.has_targets and split.queries[0].target is None


def test_fashioniq_options_are_checked(fiq: Path):
    with pytest.raises(ConfigError, match="category must be one of dress, shirt, toptee"):
        read_split("fashioniq", fiq, "val")
    with pytest.raises(ConfigError, match=r"unknown option.*colour"):
        read_split("fashioniq", fiq, "val", category="dress", colour="red")
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        read_split("fashioniq", fiq, "dev", category="dress")


def test_fashioniq_wrong_field_names_the_file_record_and_key(fiq: Path):
    path = fiq / "captions/cap.dress.val.json"
    records = json.loads(path.read_text())
    records[1]["reference"] = records[1].pop("candidate")
    write_json(path, records)
    with pytest.raises(DataError, match=r"cap\.dress\.val\.json: record #1 has no key 'candidate'"):
        read_split("fashioniq", fiq, "val", category="dress")


def test_malformed_json_names_file_and_position(fiq: Path):
    (fiq / "image_splits/split.dress.val.json").write_text('["A", "B",\n  "C" "D"]')
    with pytest.raises(DataError, match=r"split\.dress\.val\.json.*line 2, column 7"):
        read_split("fashioniq", fiq, "val", category="dress")


def test_missing_image_is_an_error_naming_it(fiq: Path):
    (fiq / "images/C.png").unlink()
    with pytest.raises(DataError, match=r"1 of 5 images are missing: .*images/C\.png"):
        load_split("fashioniq", fiq, "val", category="dress")


def test_drop_missing_drops_queries_and_writes_the_list(fiq: Path, tmp_path: Path, capsys):
    (fiq / "images/C.png").unlink()
    (fiq / "images/E.png").unlink()
    (fiq / "images/E.jpg").unlink()
    report = tmp_path / "out/dropped.json"
    split = load_split(
        "fashioniq", fiq, "val", category="dress", drop_missing=True, dropped_report=report
    )
    # query 1 targets C, query 2 starts from E: only query 0 survives
    assert [q.query_id for q in split.queries] == ["dress-0"]
    assert split.gallery == ["A", "B", "D"]
    assert split.dropped == ["C", "E"] and split.dropped_queries == ["dress-1", "dress-2"]
    assert split.summary()["dropped_queries"] == 2
    # said, not silent: the count and the first ids
    assert (
        "fashioniq-dress/val: drop_missing dropped 2 of 3 queries, which use 2 missing images; "
        f"queries: dress-1, dress-2; images: {fiq / 'images/C.png'}, "
    ) in capsys.readouterr().err
    written = json.loads(report.read_text())
    assert [m["id"] for m in written["missing_images"]] == ["C", "E"]
    assert written["missing_images"][0]["path"] == str(fiq / "images/C.png")
    assert written["dropped_queries"] == ["dress-1", "dress-2"]
    assert written["kept_queries"] == 1


def test_missing_image_folder_is_pointed_out(fiq: Path):
    for p in (fiq / "images").iterdir():
        p.unlink()
    (fiq / "images").rmdir()
    with pytest.raises(DataError, match=r"5 of 5 images are missing.*folder not found: .*images"):
        load_split("fashioniq", fiq, "val", category="dress")


def test_missing_root_is_named(tmp_path: Path):
    with pytest.raises(DataError, match=r"dataset root .*nowhere is not a folder"):
        read_split("circo", tmp_path / "nowhere", "val")


# --- CIRR and the synthetic benchmark --------------------------------------------------------


def cirr_record(pairid, ref, target, members, **extra):
    rec = {"pairid": pairid, "reference": ref, "caption": f"caption {pairid}"}
    if target is not None:
        rec |= {"target_hard": target, "target_soft": {target: 1.0}}
    rec["img_set"] = {"id": 7, "members": members, "reference_rank": 0}
    return rec | extra


@pytest.fixture
def cirr_root(tmp_path: Path) -> Path:
    names = [f"dev-{i}-0-img0" for i in range(6)]
    write_json(tmp_path / "image_splits/split.rc2.val.json", {n: f"./dev/{n}.png" for n in names})
    write_json(
        tmp_path / "captions/cap.rc2.val.json",
        [cirr_record(10, names[0], names[1], names), cirr_record(11, names[2], names[3], names)],
    )
    test_names = [f"test1-{i}-0-img1" for i in range(6)]
    write_json(
        tmp_path / "image_splits/split.rc2.test1.json",
        {n: f"./test1/{n}.png" for n in test_names},
    )
    write_json(
        tmp_path / "captions/cap.rc2.test1.json", [cirr_record(20, test_names[1], None, test_names)]
    )
    for n in names:
        write_image(tmp_path / f"dev/{n}.png")
    for n in test_names:
        write_image(tmp_path / f"test1/{n}.png")
    return tmp_path


def test_cirr_fields_subset_and_exclusion(cirr_root: Path):
    split = load_split("cirr", cirr_root, "val")
    assert (len(split.queries), len(split.gallery)) == (2, 6)
    q = split.queries[1]
    assert q.query_id == "11" and q.reference == "dev-2-0-img0" and q.target == "dev-3-0-img0"
    assert q.subset == tuple(f"dev-{i}-0-img0" for i in range(6))
    assert q.texts == ("caption 11",)
    assert q.extra["pairid"] == 11 and q.extra["img_set_id"] == 7
    assert q.extra["target_soft"] == {"dev-3-0-img0": 1.0}
    assert split.exclude_reference is True
    assert split.image_paths["dev-5-0-img0"] == cirr_root / "dev/dev-5-0-img0.png"


def test_cirr_paths_follow_the_root_not_the_working_directory(cirr_root: Path, monkeypatch):
    monkeypatch.chdir(cirr_root.parent)
    split = read_split("cirr", Path(cirr_root.name), "val")
    assert split.image_paths["dev-0-0-img0"] == Path(cirr_root.name) / "dev/dev-0-0-img0.png"


def test_cirr_test1_has_no_targets(cirr_root: Path):
    split = load_split("cirr", cirr_root, "test1")
    assert split.queries[0].targets == () and not split.has_targets
    assert split.queries[0].subset is not None and len(split.queries[0].subset) == 6


def test_cirr_val_without_target_is_malformed(cirr_root: Path):
    path = cirr_root / "captions/cap.rc2.val.json"
    records = json.loads(path.read_text())
    del records[1]["target_hard"]
    write_json(path, records)
    with pytest.raises(DataError, match="record #1 has no key 'target_hard'"):
        read_split("cirr", cirr_root, "val")


def test_cirr_missing_train_captions_name_the_file(cirr_root: Path):
    with pytest.raises(DataError, match=r"captions/cap\.rc2\.train\.json not found"):
        read_split("cirr", cirr_root, "train")


def test_cirr_unknown_image_name_is_reported(cirr_root: Path):
    path = cirr_root / "captions/cap.rc2.val.json"
    records = json.loads(path.read_text())
    records[0]["reference"] = "dev-99-0-img0"
    write_json(path, records)
    with pytest.raises(DataError, match=r"record #0 reference 'dev-99-0-img0' is not in"):
        read_split("cirr", cirr_root, "val")


def test_cirr_image_paths_must_stay_inside_the_root(cirr_root: Path):
    path = cirr_root / "image_splits/split.rc2.val.json"
    write_json(path, json.loads(path.read_text()) | {"dev-0-0-img0": "../elsewhere.png"})
    with pytest.raises(DataError, match=r"'dev-0-0-img0' path '\.\./elsewhere\.png' must stay"):
        read_split("cirr", cirr_root, "val")


def test_synthcir_reads_the_cirr_layout_with_answers_on_test(tmp_path: Path):
    for split in ("train", "val", "test"):
        names = [f"{split}-{i}" for i in range(6)]
        write_json(
            tmp_path / f"image_splits/split.rc2.{split}.json",
            {n: f"./{split}/{n}.png" for n in names},
        )
        write_json(
            tmp_path / f"captions/cap.rc2.{split}.json",
            [cirr_record(1, names[0], names[4], names, mod_type="add")],
        )
        for n in names:
            write_image(tmp_path / f"{split}/{n}.png")
    split = load_split("synthcir", tmp_path, "test")
    assert split.benchmark == "synthcir" and split.queries[0].target == "test-4"
    assert split.queries[0].extra["mod_type"] == "add"
    with pytest.raises(ConfigError, match="choose one of train, val, test"):
        read_split("synthcir", tmp_path, "test1")


# --- CIRCO -----------------------------------------------------------------------------------


def write_circo(root: Path, info_dir: Path, ids: list[int]) -> None:
    write_json(
        info_dir / "annotations/image_info_unlabeled2017.json",
        {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]},
    )
    for i in ids:
        write_image(info_dir / f"unlabeled2017/{i:012d}.jpg")
    write_json(
        root / "annotations/val.json",
        [
            {
                "id": 0,
                "reference_img_id": 1,
                "target_img_id": 5,
                "relative_caption": "has two dogs",
                "shared_concept": "a dog",
                "gt_img_ids": [5, 3, 4],
            },
            {
                "id": 1,
                "reference_img_id": 2,
                "target_img_id": 6,
                "relative_caption": "is at night",
                "shared_concept": "a street",
                "gt_img_ids": [6],
            },
        ],
    )
    write_json(
        root / "annotations/test.json",
        [
            {"id": i, "reference_img_id": 7, "relative_caption": "x", "shared_concept": "y"}
            for i in range(3)
        ],
    )


def test_circo_multiple_ground_truths_target_first(tmp_path: Path):
    write_circo(tmp_path, tmp_path / "COCO2017_unlabeled", list(range(1, 9)))
    split = load_split("circo", tmp_path, "val")
    assert split.gallery == [str(i) for i in range(1, 9)]
    q0, q1 = split.queries
    assert (q0.query_id, q0.reference, q0.targets) == ("0", "1", ("5", "3", "4"))
    assert q1.targets == ("6",)
    assert q0.extra["shared_concept"] == "a dog"
    assert split.exclude_reference is False  # the official code ranks the reference
    assert split.image_paths["3"] == tmp_path / "COCO2017_unlabeled/unlabeled2017/000000000003.jpg"


def test_circo_test_has_no_answers_and_flat_layout_works(tmp_path: Path):
    write_circo(tmp_path, tmp_path, list(range(1, 9)))
    split = load_split("circo", tmp_path, "test")
    assert [q.query_id for q in split.queries] == ["0", "1", "2"]
    assert not split.has_targets


def test_circo_ids_missing_from_the_image_info_are_named(tmp_path: Path):
    write_circo(tmp_path, tmp_path / "COCO2017_unlabeled", [1, 2, 3, 5, 6, 7])
    with pytest.raises(DataError, match=r"record #0 gt_img_ids entry 4 is not in .*image_info"):
        read_split("circo", tmp_path, "val")


def test_circo_without_image_info_says_where_it_looked(tmp_path: Path):
    write_json(tmp_path / "annotations/val.json", [])
    with pytest.raises(DataError, match=r"image_info_unlabeled2017\.json not found \(tried"):
        read_split("circo", tmp_path, "val")


# --- Shoes -----------------------------------------------------------------------------------


@pytest.fixture
def shoes_root(tmp_path: Path) -> Path:
    train = [f"img_womens_boots_{i}.jpg" for i in range(4)]
    evals = [f"img_womens_pumps_{i}.jpg" for i in range(3)]
    for n in train:
        write_image(tmp_path / "womens_boots/0" / n)
    for n in evals:
        write_image(tmp_path / "attributedata/womens_pumps/1" / n)
    (tmp_path / "train_im_names.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "eval_im_names.txt").write_text("\n".join(evals) + "\n")
    write_json(
        tmp_path / "relative_captions_shoes.json",
        [
            {"ImageName": train[1], "ReferenceImageName": train[0], "RelativeCaption": "taller "},
            {"ImageName": evals[1], "ReferenceImageName": evals[0], "RelativeCaption": "is red"},
            {"ImageName": train[3], "ReferenceImageName": train[2], "RelativeCaption": "flat"},
            {"ImageName": evals[2], "ReferenceImageName": evals[1], "RelativeCaption": "has laces"},
        ],
    )
    return tmp_path


def test_shoes_splits_gallery_and_paths(shoes_root: Path):
    test = load_split("shoes", shoes_root, "test")
    assert [q.query_id for q in test.queries] == ["1", "3"]
    assert test.gallery == [f"img_womens_pumps_{i}.jpg" for i in range(3)]
    q = test.queries[0]
    assert (q.reference, q.target, q.texts) == (
        "img_womens_pumps_0.jpg",
        "img_womens_pumps_1.jpg",
        ("is red",),
    )
    assert test.exclude_reference is True
    assert test.image_paths[q.reference] == (
        shoes_root / "attributedata/womens_pumps/1/img_womens_pumps_0.jpg"
    )
    train = load_split("shoes", shoes_root, "train")
    assert [q.texts[0] for q in train.queries] == ["taller", "flat"]
    assert len(train.gallery) == 4
    assert load_split("shoes", shoes_root, "eval").split == "test"


def test_shoes_duplicate_file_names_are_an_error(shoes_root: Path):
    write_image(shoes_root / "copy/img_womens_boots_2.jpg")
    with pytest.raises(DataError, match=r"'img_womens_boots_2\.jpg' occurs twice"):
        read_split("shoes", shoes_root, "train")


def test_shoes_record_across_splits_is_an_error(shoes_root: Path):
    path = shoes_root / "relative_captions_shoes.json"
    records = json.loads(path.read_text())
    records[2]["ReferenceImageName"] = "img_womens_pumps_0.jpg"
    write_json(path, records)
    with pytest.raises(DataError, match=r"1 records pair images that are not both in.*#2"):
        read_split("shoes", shoes_root, "test")


def test_shoes_missing_image_is_named(shoes_root: Path):
    (shoes_root / "womens_boots/0/img_womens_boots_3.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of 4 images are missing: .*img_womens_boots_3\.jpg"):
        load_split("shoes", shoes_root, "train")


# --- Fashion200k -----------------------------------------------------------------------------

TRAIN_LABELS = {
    "women/dresses/1/1_0.jpeg": "red floral dress",
    "women/dresses/2/2_0.jpeg": "blue floral dress",
    "women/dresses/3/3_0.jpeg": "blue floral dress",
    "women/skirts/4/4_0.jpeg": "red floral skirt",
    "women/dresses/5/5_0.jpeg": "floral red dress",
    "women/jackets/6/6_0.jpeg": "long black coat",
}


def write_labels(path: Path, labels: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p}\t0.5{i}\t{c}\n" for i, (p, c) in enumerate(labels.items())))


@pytest.fixture
def f200k(tmp_path: Path) -> Path:
    items = list(TRAIN_LABELS.items())
    write_labels(tmp_path / "labels/dress_train_detect_all.txt", dict(items[:3] + items[4:5]))
    write_labels(tmp_path / "labels/skirt_train_detect_all.txt", dict([items[3]]))
    write_labels(tmp_path / "labels/jacket_train_detect_all.txt", dict([items[5]]))
    test = {
        "women/dresses/7/7_0.jpeg": "black cotton dress",
        "women/dresses/8/8_0.jpeg": "white cotton dress",
        "women/dresses/9/9_0.jpeg": "white cotton dress",
    }
    write_labels(tmp_path / "labels/dress_test_detect_all.txt", test)
    write_labels(
        tmp_path / "labels/top_test_detect_all.txt", {"women/tops/10/10_0.jpeg": "silk top"}
    )
    (tmp_path / "test_queries.txt").write_text(
        "women/dresses/7/7_0.jpeg women/dresses/8/8_0.jpeg\n"
        "women/dresses/9/9_0.jpeg women/dresses/7/7_0.jpeg\n"
    )
    for p in [*TRAIN_LABELS, *test, "women/tops/10/10_0.jpeg"]:
        write_image(tmp_path / p)
    return tmp_path


def test_word_diff_follows_tirg():
    assert fashion200k.word_diff("black cotton dress", "white cotton dress") == ("black", "white")
    assert fashion200k.modification_text("a b c", "a x c") == "replace b with x"
    # every word shared: TIRG's loop ends on the last word
    assert fashion200k.word_diff("red floral dress", "floral red dress") == ("dress", "dress")


def test_fashion200k_test_queries_labels_and_gallery(f200k: Path):
    split = load_split("fashion200k", f200k, "test")
    assert len(split.gallery) == 4 and split.exclude_reference is True
    assert [q.texts[0] for q in split.queries] == [
        "replace black with white",
        "replace white with black",
    ]
    assert split.queries[0].targets == ("women/dresses/8/8_0.jpeg",)
    assert split.gallery_labels is not None
    assert split.gallery_labels["women/dresses/9/9_0.jpeg"] == "white cotton dress"
    assert split.gallery_labels["women/tops/10/10_0.jpeg"] == "silk top"
    assert split.image_paths["women/tops/10/10_0.jpeg"] == f200k / "women/tops/10/10_0.jpeg"


def test_fashion200k_keeps_every_label_line_as_tirg_does(f200k: Path):
    """An image listed twice (here with another caption, and once more with the same one) is a
    gallery entry per line; a query path means its last line, the only entry excluded."""
    with (f200k / "labels/top_test_detect_all.txt").open("a") as f:
        f.write("women/dresses/7/7_0.jpeg\t0.9\tblack silk dress\n")
        f.write("women/dresses/8/8_0.jpeg\t0.9\twhite cotton dress\n")
    split = load_split("fashion200k", f200k, "test")
    seven, eight = "women/dresses/7/7_0.jpeg", "women/dresses/8/8_0.jpeg"
    nine, ten = "women/dresses/9/9_0.jpeg", "women/tops/10/10_0.jpeg"
    assert split.gallery == [seven, eight, nine, ten, f"{seven}#2", f"{eight}#2"]
    assert split.gallery_labels[seven] == "black cotton dress"
    assert split.gallery_labels[f"{seven}#2"] == "black silk dress"
    assert split.image_paths[f"{seven}#2"] == split.image_paths[seven] == f200k / seven
    # query 0 (7 -> 8): source and target are the last lines of 7 and 8
    q0, q1 = split.queries
    assert (q0.reference, q0.targets) == (f"{seven}#2", (f"{eight}#2",))
    assert q0.texts == ("replace black with white",)  # "black silk dress" vs "white cotton dress"
    assert q1.targets == (f"{seven}#2",) and q1.texts == ("replace white with black",)
    # only the reference's own entry leaves the ranking: its first line stays a candidate
    prepared = prepare(split)
    assert [split.gallery[i] for i in prepared.exclude] == [f"{seven}#2", nine]
    # TIRG's hit rule over the duplicated gallery: a hit is any entry with the target's caption
    scores = torch.zeros(2, 6)
    scores[0, 1] = 1.0  # query 0 (target caption "white cotton dress"): entry 8, line 1: a hit
    scores[1, 0] = 1.0  # query 1 (target "black silk dress"): entry 7, line 1, "black cotton"
    assert compute(scores, prepared)["R@1"] == 50.0


def test_one_word_partners_known_answer():
    partners = fashion200k.one_word_partners(sorted(set(TRAIN_LABELS.values())))
    assert {k: sorted(v) for k, v in partners.items()} == {
        "red floral dress": ["blue floral dress", "red floral skirt"],
        "blue floral dress": ["floral red dress", "red floral dress"],
        "red floral skirt": ["red floral dress"],
        "floral red dress": ["blue floral dress"],
    }


def test_fashion200k_train_pairs_are_seeded_and_one_word_apart(f200k: Path):
    split = load_split("fashion200k", f200k, "train")
    # label files in name order (dress, jacket, skirt); every image but the coat has a partner
    assert [q.reference.split("/")[2] for q in split.queries] == ["1", "2", "3", "5", "4"]
    for q in split.queries:
        src, tgt = TRAIN_LABELS[q.reference], TRAIN_LABELS[q.target]
        assert tgt in fashion200k.one_word_partners(list(set(TRAIN_LABELS.values())))[src]
        assert q.texts[0] == fashion200k.modification_text(src, tgt)
    again = read_split("fashion200k", f200k, "train")
    assert [(q.reference, q.target) for q in again.queries] == [
        (q.reference, q.target) for q in split.queries
    ]
    draws = {
        tuple(q.target for q in read_split("fashion200k", f200k, "train", seed=s).queries)
        for s in range(20)
    }
    assert len(draws) > 1


def test_fashion200k_bad_lines_are_named(f200k: Path):
    with (f200k / "test_queries.txt").open("a") as f:
        f.write("women/dresses/7/7_0.jpeg women/nowhere.jpeg\n")
    with pytest.raises(DataError, match=r"test_queries\.txt:3: women/nowhere\.jpeg not in"):
        read_split("fashion200k", f200k, "test")
    (f200k / "labels/top_test_detect_all.txt").write_text("women/tops/10/10_0.jpeg 0.5 silk top\n")
    with pytest.raises(DataError, match=r"top_test_detect_all\.txt:1: expected 'path<TAB>"):
        read_split("fashion200k", f200k, "test")

"""Training data: sampler order and resume, per-sample randomness, datasets, collate, plans."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from csmcir.data.batches import ImageSource, InMemoryImages, collate
from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.errors import ConfigError
from csmcir.train.datamodule import PLANS, CIRDataModule, caption_command
from csmcir.train.datasets import (
    GALLERY,
    QUERY,
    TrainTriplets,
    ValidationItems,
    first_clauses,
    sample_rng,
)
from csmcir.train.sampler import EpochShuffleSampler


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.getdata()), dtype=torch.float32).T.reshape(3, *image.size)


@pytest.fixture
def split(tmp_path: Path) -> CIRSplit:
    """Four images of flat colours; three queries; a text rule that draws from the generator."""
    paths = {}
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]):
        paths[f"img{i}"] = tmp_path / f"img{i}.png"
        Image.new("RGB", (2, 2), colour).save(paths[f"img{i}"])
    queries = [
        CIRQuery("q0", "img0", ("a", "b"), ("img1",)),
        CIRQuery("q1", "img1", ("c", "d"), ("img2",)),
        CIRQuery("q2", "img2", ("e", "f"), ("img1",)),
    ]
    return CIRSplit(
        benchmark="toy",
        split="train",
        queries=queries,
        gallery=["img1", "img2", "img3"],
        image_paths=paths,
        train_text=lambda q, rng: rng.choice(q.texts),
        eval_text=lambda q: " and ".join(q.texts),
    )


def test_sampler_is_a_pure_function_of_seed_and_epoch():
    data = range(10)
    a = EpochShuffleSampler(data, seed=3)
    b = EpochShuffleSampler(data, seed=3)
    assert list(a) == list(b)
    first = list(a)
    assert sorted(i for i, _ in first) == list(range(10))
    assert {e for _, e in first} == {0}
    a.set_epoch(1)
    second = list(a)
    assert {e for _, e in second} == {1}
    assert [i for i, _ in second] != [i for i, _ in first]
    assert list(EpochShuffleSampler(data, seed=4)) != first


def test_sampler_shards_ranks_disjointly_with_equal_lengths():
    data = range(11)
    ranks = [list(EpochShuffleSampler(data, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5  # drop_last: 11 -> 2 x 5
    seen = [i for rank in ranks for i, _ in rank]
    assert len(set(seen)) == 10


def test_sampler_resume_skips_consumed_samples_once():
    data = range(12)
    full = list(EpochShuffleSampler(data, seed=1).__iter__())
    sampler = EpochShuffleSampler(data, seed=1)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    resumed = EpochShuffleSampler(data, seed=1)
    resumed.resume(epoch=2, skip=5)
    assert list(resumed) == epoch2[5:]
    assert list(resumed) == epoch2  # the skip applies to the resumed epoch only once
    resumed.set_epoch(0)
    assert list(resumed) == full


def test_grouped_sampler_keeps_groups_together_and_shuffles_them_per_epoch():
    groups = ["a", "b", "a", "c", "b", "c", "d", "d", "e", "e"]
    sampler = EpochShuffleSampler(range(10), seed=0, groups=groups)
    order = [i for i, _ in sampler]
    assert sorted(order) == list(range(10))
    keys = [groups[i] for i in order]
    assert all(keys[j] == keys[j + 1] for j in range(0, 10, 2))  # pairs stay adjacent
    sampler.set_epoch(1)
    again = [i for i, _ in sampler]
    assert again != order and [groups[i] for i in again][::2] != keys[::2]
    # Sharded: each rank takes every other sample, and together they cover the data once.
    ranks = [
        [
            i
            for i, _ in EpochShuffleSampler(
                range(10), seed=0, groups=groups, num_replicas=2, rank=r
            )
        ]
        for r in (0, 1)
    ]
    assert sorted(ranks[0] + ranks[1]) == list(range(10)) and ranks[0] == order[0::2]


def test_sample_rng_depends_only_on_seed_epoch_index():
    draw = [sample_rng(0, 1, 2).random() for _ in range(2)]
    assert draw[0] == draw[1]
    assert sample_rng(0, 1, 2).random() != sample_rng(0, 2, 2).random()
    assert sample_rng(0, 1, 2).random() != sample_rng(1, 1, 2).random()


def test_train_triplets(split: CIRSplit):
    images = ImageSource(split.image_paths, to_tensor)
    captions = {"img1": "green", "img2": "blue"}
    data = TrainTriplets([split], images, captions, seed=7)
    assert len(data) == 3
    item = data[(1, 4)]
    assert item["text"] == random.Random("7/4/1").choice(("c", "d"))
    assert item["target_caption"] == "blue"
    assert (item["reference_image"], item["target_image"]) == ("img1", "img2")
    batch = data.collate([data[(1, 4)], data[(0, 4)]])  # a batch reads its images at once
    green, blue, red = [0.0, 255, 0], [0.0, 0, 255], [255.0, 0, 0]
    assert torch.equal(batch["reference_image"][:, :, 0, 0], torch.tensor([green, red]))
    assert torch.equal(batch["target_image"][:, :, 0, 0], torch.tensor([blue, green]))
    assert batch["text"] == [item["text"], data[(0, 4)]["text"]]
    # keys number the images; equal targets (q0 and q2 both want img1) get equal keys
    assert data[0]["target_key"] == data[2]["target_key"] != data[1]["target_key"]
    assert data[1]["reference_key"] == data[0]["target_key"]
    texts = {data[(0, epoch)]["text"] for epoch in range(20)}
    assert texts == {"a", "b"}  # the text changes with the epoch, deterministically
    assert TrainTriplets([split], images, None)[0]["target_caption"] is None


def test_first_clauses_cut_a_caption_at_its_clause_breaks():
    caption = "large red circle top left, small blue square center and a cyan cross; two dots."
    assert first_clauses(caption, 1) == "large red circle top left"
    assert (
        first_clauses(caption, 3)
        == "large red circle top left, small blue square center, a cyan cross"
    )
    assert first_clauses(caption, 4) == caption  # no more clauses than asked: whole


def test_train_triplets_cut_their_captions_and_nothing_else(split: CIRSplit):
    images = ImageSource(split.image_paths, to_tensor)
    captions = {"img1": "red ball, blue cube and green cone", "img2": "one dot"}
    whole = TrainTriplets([split], images, captions, seed=7)
    cut = TrainTriplets([split], images, captions, seed=7, caption_clauses=1)
    assert [cut[(i, 3)]["target_caption"] for i in range(3)] == ["red ball", "one dot", "red ball"]
    assert captions["img1"] == "red ball, blue cube and green cone"  # the caller's dict kept
    for key in ((0, 3), (1, 5), (2, 0)):
        assert {**cut[key], "target_caption": None} == {**whole[key], "target_caption": None}
    with pytest.raises(ConfigError, match=r"--data\.caption_clauses"):
        CIRDataModule("synthcir", Path(), caption_clauses=-1)


def test_in_memory_images_decode_once(split: CIRSplit):
    calls = []

    def counting(image):
        calls.append(1)
        return to_tensor(image)

    cached = InMemoryImages(split.image_paths, counting)
    assert len(calls) == 4
    assert torch.equal(cached["img3"], ImageSource(split.image_paths, to_tensor)["img3"])
    cached["img3"]
    assert len(calls) == 4


def test_validation_items_put_the_gallery_before_the_queries(split: CIRSplit):
    images = ImageSource(split.image_paths, to_tensor)
    items = ValidationItems(split, images, {"img1": "g", "img2": "b", "img3": "x"})
    assert len(items) == 6
    kinds = [items[i]["kind"] for i in range(6)]
    assert kinds == [GALLERY] * 3 + [QUERY] * 3
    assert items[2]["text"] == "x" and items[2]["position"] == 2
    assert items[4]["text"] == "c and d" and items[4]["position"] == 1
    assert items[4]["image"] == "img1"
    batch = items.collate([items[4], items[2]])
    assert torch.equal(batch["image"], torch.stack([images["img1"], images["img3"]]))
    assert ValidationItems(split, images, None)[0]["text"] is None


def test_collate_stacks_tensors_and_keeps_texts():
    batch = collate(
        [
            {"x": torch.zeros(2), "k": 1, "text": "a", "cap": None},
            {"x": torch.ones(2), "k": 5, "text": "b", "cap": None},
        ]
    )
    assert batch["x"].shape == (2, 2)
    assert batch["k"].dtype == torch.long and batch["k"].tolist() == [1, 5]
    assert batch["text"] == ["a", "b"] and batch["cap"] == [None, None]


def test_plans():
    fiq = PLANS["fashioniq"](("dress", "shirt", "toptee"))
    assert [s for _, s, _ in fiq.train] == ["train"] * 3
    assert [o["category"] for _, _, o in fiq.val] == ["dress", "shirt", "toptee"]
    assert PLANS["shoes"](()).val == (("test", "test", {}),)
    assert PLANS["cirr"](()).val == (("val", "val", {}),)


def test_datamodule_rejects_bad_options(tmp_path: Path):
    with pytest.raises(ConfigError, match="CIRCO has no training split"):
        CIRDataModule("circo", tmp_path)
    with pytest.raises(ConfigError, match=r"--data\.batch_size"):
        CIRDataModule("synthcir", tmp_path, batch_size=0)
    with pytest.raises(ConfigError, match="fashioniq only"):
        CIRDataModule("cirr", tmp_path, categories=["dress"])
    only_dress = CIRDataModule("fashioniq", tmp_path, categories=["dress"])
    assert [name for name, _, _ in only_dress.plan.val] == ["dress"]


def test_caption_command():
    synth = caption_command("synthcir", Path("d/s"), Path("d/s/caps.json"))
    assert synth == (
        "csmcir caption run --benchmark synthcir --root d/s --split all --backend oracle "
        "--out d/s/caps_shards && csmcir caption merge d/s/caps_shards --out d/s/caps.json"
    )
    fiq = caption_command("fashioniq", Path("f"), Path("f/c.json"), ("dress", "shirt"))
    assert fiq.count("csmcir caption run") == 2
    assert "--category dress" in fiq and "--category shirt" in fiq
    assert "--backend hf --model-dir MLLM_DIR" in fiq


def test_summarise_names_and_combines_the_figures():
    from csmcir.train.validation import summarise

    one = summarise("synthcir", {"val": {"R@5": 40.0, "Rsubset@1": 60.0, "Avg": 50.0}})
    assert one == {"val/R@5": 40.0, "val/Rsubset@1": 60.0, "val/Avg": 50.0, "val/score": 50.0}
    fiq = summarise(
        "fashioniq",
        {
            "dress": {"R@10": 10.0, "R@50": 30.0},
            "shirt": {"R@10": 20.0, "R@50": 40.0},
            "toptee": {"R@10": 30.0, "R@50": 50.0},
        },
    )
    assert fiq["val/shirt/R@50"] == 40.0
    assert fiq["val/R@10"] == 20.0 and fiq["val/R@50"] == 40.0
    assert fiq["val/score"] == 30.0  # mean of the two category averages
    shoes = summarise("shoes", {"test": {"R@1": 10.0, "R@10": 40.0, "R@50": 70.0}})
    assert shoes["val/score"] == 40.0
    # FashionIQ trained on one category (--data.categories [dress]) validates on that one
    dress = summarise("fashioniq", {"dress": {"R@10": 10.0, "R@50": 30.0}})
    assert dress["val/dress/R@10"] == 10.0 and dress["val/R@50"] == 30.0
    assert dress["val/score"] == 20.0


@pytest.mark.slow
def test_fashioniq_trains_on_the_union_and_validates_per_category(shared_benchmarks, tmp_path):
    """The real FashionIQ annotation files with a placeholder PNG for every image."""
    import json

    import placeholder_data
    from placeholder_data import placeholder_pngs

    from csmcir.data.fashioniq import train_forms
    from csmcir.model import CSMCIR

    root = placeholder_data.fashioniq_root(
        tmp_path / "fashioniq", shared_benchmarks, placeholder_pngs(), splits=("train", "val")
    )
    counts = {}
    for category in ("dress", "shirt", "toptee"):
        for split in ("train", "val"):
            records = json.loads((root / f"captions/cap.{category}.{split}.json").read_text())
            gallery = json.loads((root / f"image_splits/split.{category}.{split}.json").read_text())
            counts[category, split] = (len(records), len(gallery))
    ids = {p.stem for p in (root / "images").iterdir()}
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({i: "a garment" for i in ids}))

    data = CIRDataModule("fashioniq", root, captions, batch_size=4, val_batch_size=512)
    data.setup("fit")
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=data.text_corpus())
    data.attach(model)
    train = data.train_dataloader()
    assert len(train.dataset) == sum(counts[c, "train"][0] for c in ("dress", "shirt", "toptee"))
    batch = next(iter(train))
    assert batch["reference_image"].shape == (4, 3, 64, 64)
    queries = {q.query_id: q for split in data.splits.train for q in split.queries}
    assert len(queries) == len(train.dataset)
    val = data.val_dataloader()
    assert [name for name, _ in data.val_splits()] == ["dress", "shirt", "toptee"]
    for loader, category in zip(val, ("dress", "shirt", "toptee"), strict=True):
        n_queries, n_gallery = counts[category, "val"]
        assert len(loader.dataset) == n_queries + n_gallery
    item = train.dataset[(0, 3)]
    query = train.dataset.items[0].query
    assert item["text"] in train_forms(query)


def test_the_vit_runs_once_per_distinct_reference_and_gives_the_same_features():
    from csmcir.model import CSMCIR
    from csmcir.train.module import CSMCIRModule

    module = CSMCIRModule()
    module.model = CSMCIR.from_preset("tiny", tokenizer_corpus=["add a red circle"], seed=0)
    pixels = torch.randn(3, 3, 64, 64)
    batch = {
        "reference_image": pixels[[0, 0, 1, 2, 1]],
        "reference_key": torch.tensor([7, 7, 3, 9, 3]),
    }
    rows = []
    patches = module.model.vision_model.embeddings.patch_embedding
    patches.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    given = module._references(batch, "pixel_values")["vision_features"]
    assert rows == [3]  # three distinct references of five queries
    expected = module.model.vision_features(batch["reference_image"])
    assert torch.allclose(given, expected, atol=1e-6)
    distinct = {"reference_image": pixels, "reference_key": torch.tensor([1, 2, 3])}
    assert module._references(distinct, "pixel_values") == {"pixel_values": pixels}

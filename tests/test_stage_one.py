"""The shipped stage-1 weights of the tiny preset: regenerated bit for bit, checked by record."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from csmcir.data.captions import load_captions
from csmcir.data.synth_scenes import ATTRIBUTES
from csmcir.errors import DataError
from csmcir.io import read_json
from csmcir.model import CSMCIR
from csmcir.train.stage_one import (
    NAMES,
    PRETRAINED,
    RECIPES,
    SHIPPED,
    WEIGHTS,
    make,
    sha256,
    shipped_record,
)


@pytest.mark.parametrize("preset", ["tiny", "clip4cir-tiny"])
def test_stage_one_regenerates_bit_for_bit(preset: str, tmp_path: Path):
    recipe = {**RECIPES[preset], "steps": 2, "batch_size": 8}
    sizes = {"train_refs": 12, "val_refs": 4, "test_refs": 4}
    first = make(tmp_path / "a", tmp_path / "work_a", recipe, sizes, preset)
    second = make(tmp_path / "b", tmp_path / "work_b", recipe, sizes, preset)
    assert first["sha256"] == second["sha256"] == sha256(tmp_path / "a" / WEIGHTS)
    assert first["sizes"] == sizes and first["recipe"] == recipe and first["preset"] == preset
    assert first["sha256"] != sha256(tmp_path / "work_a" / "start" / WEIGHTS)  # it trained
    # the baseline's CLIP reads each caption's first clause; CSMCIR's contrastive loss its
    # first clause and its matching loss all of it
    config = next((tmp_path / "work_a" / "run").glob("logs/version_*/config.yaml"))
    cut = RECIPES[preset].get("caption_clauses", 0)
    contrastive = RECIPES[preset].get("contrastive_clauses", 0)
    fitted = yaml.safe_load(config.read_text())
    assert fitted["data"]["caption_clauses"] == cut
    assert fitted["model"]["contrastive_clauses"] == contrastive
    assert ("(their first clause)" in first["trained_on"]) == (cut == 1)
    said = "(the contrastive loss reading their first clause, matching them whole)"
    assert (said in first["trained_on"]) == (contrastive == 1)
    model = CSMCIR.from_pretrained(tmp_path / "a")
    assert model.config.preset == preset
    # the vocabulary reads modification texts it never saw without unknown tokens
    wordpiece = model.tokenizer if preset == "tiny" else model.tokenizer.tokenizer
    ids = wordpiece("take away the small red square in the top left, leaving two objects")
    assert wordpiece.unk_token_id not in ids["input_ids"]
    # ...and is built from the training captions: their words are whole tokens and every caption
    # is read to its end (template words alone spell colours and shapes letter by letter, which
    # cut a caption after its first object)
    data = tmp_path / "work_a" / "data"
    train = read_json(data / "image_splits" / "split.rc2.train.json", "split")
    captions = [c for i, c in load_captions(data / "mcot_captions.json").items() if i in train]
    assert captions and not any(t.startswith("##") for c in captions for t in wordpiece.tokenize(c))
    assert model.truncated(captions) == [None] * len(captions)
    assert shipped_record(tmp_path / "a") == first
    (tmp_path / "a" / WEIGHTS).write_bytes(b"not the weights")
    with pytest.raises(DataError, match="SHA-256 differs"):
        shipped_record(tmp_path / "a")


@pytest.mark.parametrize("preset", sorted(NAMES))
def test_the_shipped_weights_are_the_ones_their_record_names(preset: str):
    """Each preset's shipped weights match their record and load by their name alone."""
    record = shipped_record(PRETRAINED / NAMES[preset])
    assert record["recipe"] == RECIPES[preset] and record["sizes"] is None
    assert record["preset"] == preset
    model = CSMCIR.from_pretrained(NAMES[preset])
    assert model.config.preset == preset
    wordpiece = model.tokenizer if preset == "tiny" else model.tokenizer.tokenizer
    assert all(
        wordpiece.tokenize(word) == [word] for values in ATTRIBUTES.values() for word in values
    )
    assert PRETRAINED / NAMES["tiny"] == SHIPPED  # the quickstart's start

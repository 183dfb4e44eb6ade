"""Tokenizer folders as the hub lays them out load as ``AutoTokenizer`` loads them."""

from __future__ import annotations

import pytest
from hub_layouts import DEC, bert_base_uncased_files, blip2_itm_tokenizer_files, write
from transformers import AutoTokenizer, Blip2Processor, BlipImageProcessor

from csmcir.model.tokenizer import load_tokenizer

TEXTS = ["Make the RED circle blue", "remove the small green square", "zebra!"]


def blip2_processor_resave(folder, out):
    """What ``Blip2Processor.save_pretrained`` writes over the hub's tokenizer: ``<image>``
    added after [DEC], the processor's own config."""
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(), tokenizer=AutoTokenizer.from_pretrained(str(folder))
    )
    processor.num_query_tokens = 4
    processor.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("layout", ["bert-base-uncased", "blip2-itm-vit-g", "blip2-processor"])
def test_hub_tokenizer_layouts_load_with_their_special_tokens(layout, tmp_path) -> None:
    if layout == "bert-base-uncased":
        folder = write(tmp_path / layout, bert_base_uncased_files())
    else:
        folder = write(tmp_path / "blip2", blip2_itm_tokenizer_files())
        if layout == "blip2-processor":
            folder = blip2_processor_resave(folder, tmp_path / layout)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(folder)
    assert ours(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]
    ids = ours("make the red circle")["input_ids"]
    assert ids[0] == ours.cls_token_id == ours.convert_tokens_to_ids("[CLS]")
    assert ids[-1] == ours.sep_token_id == ours.convert_tokens_to_ids("[SEP]")
    assert ours.pad_token_id == 0 and ours.unk_token == "[UNK]"
    assert ours.decode(ids, skip_special_tokens=True) == "make the red circle"  # lower-cased
    if layout != "bert-base-uncased":
        assert ours.bos_token == DEC

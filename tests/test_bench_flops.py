"""The model-FLOPs count of ``bench/bench_cached_step.py`` (the basis of its utilisation figure)
equals torch's own count of a real training step's matrix products."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_cached_step import step_flops
from csmcir.model import CSMCIR
from csmcir.train.loss import info_nce

TEXTS = ["make it red and small", "add a blue circle on the left side of it", "the same"]
CAPTIONS = ["a red square", "two blue circles and a small green triangle at the top", "one"]


@pytest.mark.parametrize("frequency", [1, 2])  # every layer cross-attends; every other (BLIP-2)
def test_step_flops_equal_torchs_count_of_a_training_step(frequency: int) -> None:
    model = CSMCIR.from_preset(
        "tiny",
        tokenizer_corpus=TEXTS + CAPTIONS,
        seed=0,
        freeze_vision=True,
        qformer={"cross_attention_frequency": frequency},
    ).train()
    # eager attention: its products are matmuls torch counts (the CPU's fused kernel it skips)
    for tower in model.towers():
        tower.qformer.config._attn_implementation = "eager"
    config = model.config
    assert config.qformer["cross_attention_frequency"] == frequency
    patches = (config.vision["image_size"] // config.vision["patch_size"]) ** 2 + 1
    batch = len(TEXTS)
    features = torch.randn(batch, patches, config.vision["hidden_size"])
    with FlopCounterMode(display=False) as counter:
        q = model.encode_query(TEXTS, vision_features=features)
        t = model.encode_target(CAPTIONS, vision_features=features)
        info_nce(model.similarity(q, t), 0.07).backward()
    lengths = [model.tokenize(x)["input_ids"].shape[1] for x in (TEXTS, CAPTIONS)]
    similarity = 3 * 2 * batch * batch * config.embed_dim  # the loss's product, left out
    assert counter.get_total_flops() == batch * step_flops(config, *lengths) + similarity


def test_vit_flops_equal_torchs_count_of_the_vits_forward_pass() -> None:
    from bench.bench_extraction import vit_flops

    model = CSMCIR.from_preset("tiny", tokenizer_corpus=TEXTS, seed=0, freeze_vision=True).eval()
    model.vision_model.config._attn_implementation = "eager"  # matmuls torch counts
    size = model.config.image.size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.vision_features(torch.randn(3, 3, size, size))
    assert counter.get_total_flops() == 3 * vit_flops(model.config.vision)

"""A BLIP-2 retrieval folder as the Hugging Face hub lays it out, built small and random.

``Salesforce/blip2-itm-vit-g`` holds ``config.json``, ``model.safetensors``, a BERT tokenizer
(with LAVIS's ``[DEC]`` after the vocabulary), ``preprocessor_config.json`` and, once re-saved by
``Blip2Processor``, ``<image>`` added after ``[DEC]``. This builds the same layout at test time:
the tiny preset's sizes, dropout ON (the hub checkpoint's 0.1), every weight random (layer norms
too, so that a swapped key changes the output) and a processor whose mean, std and resampling
differ from CLIP's, so that a loader ignoring them is caught.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    BlipImageProcessor,
)

from csmcir.model import build_wordpiece_tokenizer, load_preset

CORPUS = [
    "make the red circle blue",
    "remove the small green square",
    "add a big yellow triangle at the top left",
    "move the blue circle to the bottom right",
    "change the square into a circle",
    "a small red circle and a big green square",
]
DROPOUT = 0.1
MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)
RESAMPLE = 2  # PIL bilinear: the processor's choice, not our bicubic default


def hub_tokenizer(corpus=CORPUS):
    """A BERT-style WordPiece tokenizer with LAVIS's ``[DEC]`` added as bos, as on the hub."""
    tokenizer = build_wordpiece_tokenizer(corpus, vocab_size=400)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def blip2_config(vocab_size: int, dropout: float = DROPOUT) -> Blip2Config:
    tiny = load_preset("tiny").config
    qformer = dict(tiny.qformer) | {
        "vocab_size": vocab_size,
        "cross_attention_frequency": 2,  # as ViT-g's: layer 1 has no cross-attention
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
        "use_qformer_text_input": True,
    }
    return Blip2Config(
        vision_config=dict(tiny.vision) | {"attention_dropout": dropout},
        qformer_config=qformer,
        num_query_tokens=tiny.num_query_tokens,
        image_text_hidden_size=tiny.embed_dim,
    )


def random_blip2(vocab_size: int, seed: int = 0, dropout: float = DROPOUT):
    """A ``Blip2ForImageTextRetrieval`` with every weight random, in eval mode.

    The vision ``qkv.bias`` keeps a zero key part: BLIP-2's ViT has only query and value
    biases (LAVIS builds the bias as [q_bias, 0, v_bias]).
    """
    torch.manual_seed(seed)
    blip = Blip2ForImageTextRetrieval(blip2_config(vocab_size, dropout)).eval()
    with torch.no_grad():
        for name, param in blip.named_parameters():
            param.add_(torch.randn_like(param) * 0.1)
            if name.endswith("self_attn.qkv.bias"):
                third = param.shape[0] // 3
                param[third : 2 * third] = 0
    return blip


def image_processor(size: int) -> BlipImageProcessor:
    return BlipImageProcessor(
        size={"height": size, "width": size}, image_mean=MEAN, image_std=STD, resample=RESAMPLE
    )


def save_hub_folder(blip, tokenizer, folder: Path, processor_layout: str = "hub") -> Path:
    """Save like the hub: weights and config by transformers, the tokenizer re-saved by
    ``Blip2Processor`` (which adds ``<image>``), the image processor's own file."""
    blip.save_pretrained(folder)
    size = blip.config.vision_config.image_size
    processor = Blip2Processor(
        image_processor=image_processor(size),
        tokenizer=tokenizer,
        num_query_tokens=blip.config.num_query_tokens,
    )
    processor.save_pretrained(folder)  # tokenizer files + processor_config.json
    if processor_layout == "hub":
        (folder / "processor_config.json").unlink()
        image_processor(size).save_pretrained(folder)  # preprocessor_config.json
    return folder


def make_blip2_folder(folder: Path, seed: int = 0, dropout: float = DROPOUT, **kwargs):
    """(folder, the transformers model it holds)."""
    tokenizer = hub_tokenizer()
    blip = random_blip2(len(tokenizer), seed, dropout)
    save_hub_folder(blip, tokenizer, folder, **kwargs)
    return folder, blip

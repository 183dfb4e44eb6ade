"""The `hf` backend end to end on a tiny random Qwen2-VL built offline from configs.

The real processor, chat template, batched ``generate`` and parser run; a random model writes
nonsense, which must be recorded as a parse failure and never stored as a caption.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioning.backends.base import Request
from captioning.backends.hf import HFBackend
from captioning.prompts import PromptSpec
from csmcir.cli import main as csmcir_main
from csmcir.data.captions import load_captions
from csmcir.data.registry import load_split
from csmcir.data.synth import SynthConfig, generate
from csmcir.errors import ConfigError

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = ["user", "assistant", "red", "blue", "circle", "square", "the", "a", "of", "image"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def build_tiny_qwen2_vl(folder: Path) -> Path:
    """A 2-layer Qwen2-VL with a word-level tokenizer: no JSON braces in its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {token: i for i, token in enumerate([*SPECIALS, *WORDS, "[UNK]"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": [2, 3, 3],
            },
            "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": vocab["<|endoftext|>"],
            "bos_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "embed_dim": 16,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():  # never emit special tokens, so it writes words (nonsense) to the end
        model.lm_head.weight[: len(SPECIALS)] = 0.0
        model.lm_head.weight[len(SPECIALS) :] *= 5.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_mllm(tmp_path_factory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


def test_nonsense_from_a_real_generate_is_recorded_as_failures(tiny_mllm, tmp_path, capsys):
    root = tmp_path / "synthcir"
    generate(root, SynthConfig(train_refs=3, val_refs=2, test_refs=2, image_size=40))
    gallery = load_split("synthcir", root, "val").gallery
    out = tmp_path / "caps"
    args = [
        "caption", "run", "--benchmark", "synthcir", "--root", str(root), "--split", "val",
        "--backend", "hf", "--model-dir", str(tiny_mllm), "--dtype", "float32", "--device", "cpu",
        "--batch-size", "8", "--max-new-tokens", "12", "--max-attempts", "2", "--out", str(out),
    ]  # fmt: skip
    assert csmcir_main(args) == 0
    records = [json.loads(x) for x in (out / "shard-0000-of-0001.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in records) == sorted(gallery)
    for r in records:
        assert r["status"] == "failed" and "Final_Caption" not in r
        assert r["attempts"] == 2 and r["model"] == f"hf:{tiny_mllm.name}"
        greedy, sampled = r["reasons"]  # a retry samples, so it may stop earlier
        assert greedy == (
            "no JSON object and no Final_Caption line in the answer (answer cut off at the "
            "token limit)"
        )
        assert sampled.startswith("no JSON object") and r["raw"].strip()
    merged = tmp_path / "captions.json"
    assert csmcir_main(["caption", "merge", str(out), "--out", str(merged)]) == 0
    assert load_captions(merged) == {}
    failures = json.loads((tmp_path / "captions.failures.json").read_text())
    assert set(failures) == set(gallery)
    assert f"{len(gallery)} failure(s)" in capsys.readouterr().out


def test_batched_generation_matches_one_image_at_a_time(tiny_mllm, tmp_path):
    sizes = [(40, 40), (90, 50), (64, 112)]  # different image-token counts: left padding matters
    spec = PromptSpec("scene")
    requests = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"im{i}.png"
        Image.new("RGB", (w, h), (40 * i, 200 - 30 * i, 90)).save(path)
        requests.append(Request(f"im{i}", path, spec))
    requests.append(Request("broken", tmp_path / "absent.png", spec))
    backend = HFBackend(tiny_mllm, dtype="float32", device="cpu", batch_size=4, max_new_tokens=8)
    backend.load()
    batched = backend.generate_batch(requests)
    single = [backend.generate_batch([r])[0] for r in requests]
    assert [a.text for a in batched[:3]] == [a.text for a in single[:3]]
    assert all(len(a.text.split()) == 8 and a.truncated for a in batched[:3])
    assert "image not found" in batched[3].reason


def test_missing_or_template_less_model_folders_are_config_errors(tiny_mllm, tmp_path):
    with pytest.raises(
        ConfigError, match=r'hf download Qwen/Qwen2-VL-2B-Instruct --include "\*\.json"'
    ):
        HFBackend(tmp_path / "nowhere")
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in tiny_mllm.iterdir():
        if "chat_template" not in path.name:
            (bare / path.name).write_bytes(path.read_bytes())
    config = json.loads((bare / "processor_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "processor_config.json").write_text(json.dumps(config))
    backend = HFBackend(bare, dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="no chat template"):
        backend.load()

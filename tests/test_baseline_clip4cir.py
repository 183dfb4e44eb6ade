"""The CLIP4Cir baseline: combiner formula, encoder API, freezing, save/load, OpenCLIP files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from csmcir.baselines import CLIP4Cir, CLIP4CirConfig, Combiner
from csmcir.baselines.text import OpenCLIPTokenizer
from csmcir.errors import ConfigError, DataError
from csmcir.model import CSMCIR, list_presets, load_preset

CORPUS = [
    "make the red circle blue",
    "remove the small green square",
    "add a big yellow triangle at the top left",
    "move the blue circle to the bottom right",
]
TEXTS = ["make the circle blue", "remove the green square", "add a big triangle"]
# A tiny OpenAI-style CLIP with CLIP's own 49408-token BPE vocabulary, built at test time.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def images(n: int = 3) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 128, 255), (20, 200, 60)]
    out = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), colours[i % len(colours)])
        img.paste((255, 255, 255), (8 * i, 8, 8 * i + 16, 30))
        out.append(img)
    return out


@pytest.fixture(scope="module")
def model() -> CLIP4Cir:
    return CSMCIR.from_preset("clip4cir-tiny", tokenizer_corpus=CORPUS, seed=0).eval()


@pytest.fixture(scope="module")
def pixels(model: CLIP4Cir) -> torch.Tensor:
    return model.preprocess(images())


def test_combiner_formula_by_hand() -> None:
    """Zero fusion output and a constant lambda leave the residual mix: hand-computable."""
    combiner = Combiner(dim=2, projection_dim=3, hidden_dim=4, dropout=0.0)
    with torch.no_grad():
        combiner.fusion[-1].weight.zero_()
        combiner.fusion[-1].bias.zero_()
        combiner.dynamic_scalar[1].weight.zero_()
        combiner.dynamic_scalar[1].bias.fill_(torch.logit(torch.tensor(0.25)))
    image, text = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out, weight = combiner(image, text)
    torch.testing.assert_close(weight, torch.tensor([0.25]))
    # 0.25 * text + 0.75 * image = (0.75, 0.25), normalised
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.25]]) / (0.75**2 + 0.25**2) ** 0.5)
    with torch.no_grad():
        combiner.fusion[-1].bias.copy_(torch.tensor([0.0, 0.5]))
    out, _ = combiner(image, text)  # the learned branch adds to the mix
    torch.testing.assert_close(out, F.normalize(torch.tensor([[0.75, 0.75]]), dim=-1))
    with pytest.raises(ValueError, match="differ"):
        combiner(image, torch.zeros(1, 3))


def test_presets_share_the_model_namespace(model: CLIP4Cir) -> None:
    assert {"clip4cir-tiny", "clip4cir-openclip", "tiny"} <= set(list_presets())
    preset = load_preset("clip4cir-tiny")
    assert (preset.model_type, preset.tokenizer, preset.config.target_text) == (
        "clip4cir",
        "wordpiece",
        "none",
    )
    assert load_preset("clip4cir-openclip").config.clip == open_clip.get_model_config("ViT-B-32")
    assert isinstance(model, CLIP4Cir)
    assert model.config.clip["text_cfg"]["vocab_size"] == len(model.tokenizer)
    assert model.config.clip["text_cfg"]["eos_id"] == model.tokenizer.tokenizer.sep_token_id
    with pytest.raises(ConfigError, match="tokenizer_corpus"):
        CSMCIR.from_preset("clip4cir-tiny")
    with pytest.raises(ConfigError, match="unknown baseline option 'target_text'"):
        CSMCIR.from_preset("clip4cir-tiny", tokenizer_corpus=CORPUS, target_text="caption")


def test_shapes_and_normalisation(model: CLIP4Cir, pixels: torch.Tensor) -> None:
    assert pixels.shape == (3, 3, 64, 64)
    q = model.encode_query(TEXTS, pixel_values=pixels)
    t = model.encode_target(None, pixel_values=pixels)
    assert q.shape == t.shape == (3, 64)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(model.similarity(q, t), q @ t.T)
    # the target is CLIP's image feature, normalised; the query is not the same function
    raw = model.clip.encode_image(pixels)
    torch.testing.assert_close(t, F.normalize(raw, dim=-1))
    assert not torch.allclose(q, t)


def test_inputs_as_images_pixels_or_features_agree(model: CLIP4Cir, pixels: torch.Tensor) -> None:
    feats = model.vision_features(pixels)
    assert feats.shape == (3, 1, 64)
    q = model.encode_query(TEXTS, pixel_values=pixels)
    torch.testing.assert_close(model.encode_query(TEXTS, vision_features=feats), q)
    torch.testing.assert_close(model.encode_query(TEXTS, images=images()), q)
    with pytest.raises(ValueError, match="exactly one"):
        model.encode_query(TEXTS, pixel_values=pixels, vision_features=feats)
    with pytest.raises(ValueError, match=r"\[B, 1, 64\]"):
        model.encode_query(TEXTS, vision_features=torch.zeros(3, 65, 64))
    with pytest.raises(ValueError, match="2 texts for 3 images"):
        model.encode_query(TEXTS[:2], pixel_values=pixels)


def test_gallery_index_ranks_like_the_similarity(tmp_path: Path, model: CLIP4Cir) -> None:
    from csmcir.retrieval.index import GalleryIndex

    paths = {}
    for i, image in enumerate(images(3)):
        paths[f"g{i}"] = tmp_path / f"g{i}.png"
        image.save(paths[f"g{i}"])
    index = GalleryIndex.build(model, paths)  # image-only targets: no captions asked for
    with torch.no_grad():
        q = model.encode_query(TEXTS, images=images(3))
        expected = model.similarity(q, model.encode_target(None, images=images(3)))
    hits = index.search(q, k=3)
    for row, ranked in enumerate(hits.ids):
        assert ranked == [f"g{i}" for i in expected[row].argsort(descending=True).tolist()]
    np.testing.assert_allclose(hits.scores, expected.sort(descending=True).values, atol=1e-5)


def test_lambda_lies_strictly_between_zero_and_one(model: CLIP4Cir, pixels: torch.Tensor) -> None:
    weights = model.mixing_weights(TEXTS, pixel_values=pixels)
    assert weights.shape == (3,)
    assert bool(((weights > 0) & (weights < 1)).all())


def test_targets_ignore_text_and_queries_read_it(model: CLIP4Cir, pixels: torch.Tensor) -> None:
    none = model.encode_target(None, pixel_values=pixels)
    torch.testing.assert_close(model.encode_target(TEXTS, pixel_values=pixels), none)
    torch.testing.assert_close(model.encode_target(["x", "y", "z"], pixel_values=pixels), none)
    q = model.encode_query(TEXTS, pixel_values=pixels)
    other = model.encode_query(list(reversed(TEXTS)), pixel_values=pixels)
    assert not torch.allclose(q[0], other[0])
    torch.testing.assert_close(q[1], other[1])  # the middle text did not move


def test_image_text_similarity_is_clips_cosine(model: CLIP4Cir, pixels: torch.Tensor) -> None:
    """The baseline's stage 1 scores each image against each text by CLIP's own cosine."""
    with torch.no_grad():
        sim = model.image_text_similarity(TEXTS, pixels)
        image = F.normalize(model.clip.encode_image(pixels), dim=-1)
        text = F.normalize(model.clip.encode_text(model.tokenize(TEXTS)), dim=-1)
        swapped = model.image_text_similarity(TEXTS[::-1], pixels.flip(0))
    assert sim.shape == (3, 3)
    torch.testing.assert_close(sim, image @ text.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(swapped, sim.flip(0, 1), atol=1e-6, rtol=0)


def test_long_texts_keep_the_pooled_end_token(model: CLIP4Cir) -> None:
    tokens = model.tokenize([" ".join(["circle"] * 100), "red"])
    assert tokens.shape == (2, model.config.context_length)
    sep = model.tokenizer.tokenizer.sep_token_id
    assert tokens[0, -1] == sep and tokens[1].tolist().count(sep) == 1
    with pytest.raises(TypeError, match="sequence of str"):
        model.tokenize("red")


def test_tiny_preset_trains_everything_and_gets_gradients(pixels: torch.Tensor) -> None:
    model = CSMCIR.from_preset("clip4cir-tiny", tokenizer_corpus=CORPUS, seed=0, dropout=0.0)
    loss = (
        model.encode_query(TEXTS, pixel_values=pixels) * model.encode_target(None, pixels)
    ).sum()
    loss.backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"clip.logit_scale"}  # the trainer has its own temperature
    silent = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert silent == []


def test_frozen_encoders_train_only_the_combiner(pixels: torch.Tensor) -> None:
    model = CSMCIR.from_preset(
        "clip4cir-tiny",
        tokenizer_corpus=CORPUS,
        seed=0,
        train_image_encoder=False,
        train_text_encoder=True,
    ).train()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"clip", "combiner"}
    assert not any(p.requires_grad for p in model.clip.visual.parameters())
    assert not model.clip.visual.training and model.clip.transformer.training
    assert model.combiner.training
    feats = model.vision_features(pixels)
    assert not feats.requires_grad  # a frozen tower builds no graph
    visual = sum(p.numel() for p in model.clip.visual.parameters())
    assert model.num_parameters(trainable_only=True) == model.num_parameters() - visual - 1


def test_save_and_load_round_trip(tmp_path: Path, model: CLIP4Cir, pixels: torch.Tensor) -> None:
    folder = model.save_pretrained(tmp_path / "baseline")
    saved = json.loads((folder / "config.json").read_text())
    assert (saved["model_type"], saved["config"]["model_type"]) == ("clip4cir", "clip4cir")
    loaded = CSMCIR.from_pretrained(folder).eval()  # the project's loader picks the class
    assert isinstance(loaded, CLIP4Cir)
    assert loaded.config == model.config and loaded.fingerprint() == model.fingerprint()
    for encode in ("encode_query", "encode_target"):
        ours = getattr(model, encode)(TEXTS, pixel_values=pixels)
        theirs = getattr(loaded, encode)(TEXTS, pixel_values=pixels)
        assert torch.equal(ours, theirs)
    tuned = CLIP4Cir.from_pretrained(folder, train_image_encoder=False, precision="bf16")
    assert (tuned.config.train_image_encoder, tuned.config.precision) == (False, "bf16")
    with pytest.raises(ConfigError, match="can change only"):
        CLIP4Cir.from_pretrained(folder, projection_dim=8)
    # saving again over a baseline folder is allowed; over unrelated files it is refused
    model.save_pretrained(folder)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to replace"):
        model.save_pretrained(tmp_path / "notes")


def test_from_pretrained_refuses_bad_folders(tmp_path: Path, model: CLIP4Cir) -> None:
    folder = model.save_pretrained(tmp_path / "m")
    other = CSMCIR.from_preset("clip4cir-tiny", tokenizer_corpus=CORPUS, projection_dim=128)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, folder / "x.safetensors")
    (folder / "x.safetensors").replace(folder / "model.safetensors")
    with pytest.raises(DataError, match="does not match"):
        CLIP4Cir.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(DataError, match=r"missing: model\.safetensors"):
        CLIP4Cir.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "clip4cir", "format_version": 9}))
    with pytest.raises(DataError, match="format_version 9"):
        CSMCIR.from_pretrained(folder)


def test_feature_cache_is_refused_by_name(tmp_path: Path, model: CLIP4Cir) -> None:
    from csmcir.model.features import extract_features

    with pytest.raises(ConfigError, match="does not read the frozen-ViT feature cache"):
        extract_features(model, {}, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_fingerprint_follows_the_weights(model: CLIP4Cir) -> None:
    copy = CSMCIR.from_preset("clip4cir-tiny", tokenizer_corpus=CORPUS, seed=0)
    assert copy.fingerprint() == model.fingerprint()
    with torch.no_grad():
        copy.combiner.fusion[-1].bias[0] += 1e-3
    assert copy.fingerprint() != model.fingerprint()


def test_config_errors() -> None:
    base = load_preset("clip4cir-tiny").config.to_dict()
    assert CLIP4CirConfig.from_dict(base) == load_preset("clip4cir-tiny").config
    with pytest.raises(ConfigError, match="unknown key"):
        CLIP4CirConfig.from_dict({**base, "lamda": 1})
    hub = {**base, "clip": {**base["clip"], "text_cfg": {"hf_tokenizer_name": "bert-base"}}}
    with pytest.raises(ConfigError, match="hf_tokenizer_name"):
        CLIP4CirConfig.from_dict(hub)
    with pytest.raises(ConfigError, match="dropout"):
        CLIP4CirConfig.from_dict({**base, "dropout": 1.0})
    with pytest.raises(ConfigError, match="tokenizer has 49408 tokens"):
        CLIP4Cir(
            CLIP4CirConfig.from_dict({**base, "tokenizer": "open_clip"}),
            OpenCLIPTokenizer(),
        )


# -- a local OpenCLIP checkpoint (the clip4cir-openclip preset) ------------------------------


@pytest.fixture(scope="module")
def tiny_clip() -> torch.nn.Module:
    torch.manual_seed(1)
    return open_clip.CLIP(**TINY_CLIP).eval()


def assert_same_clip(model: CLIP4Cir, clip: torch.nn.Module) -> None:
    ours = model.clip.state_dict()
    assert set(ours) == set(clip.state_dict())
    for name, value in clip.state_dict().items():
        assert torch.equal(ours[name], value), name


def test_openclip_folder_checkpoint(tmp_path: Path, tiny_clip: torch.nn.Module) -> None:
    """A Hugging Face style open_clip folder: open_clip_config.json + the weights."""
    folder = tmp_path / "openclip"
    folder.mkdir()
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": preprocess}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(tiny_clip.state_dict(), str(folder / "open_clip_model.safetensors"))
    model = CSMCIR.from_preset("clip4cir-openclip", weights=folder)
    assert isinstance(model, CLIP4Cir)
    assert_same_clip(model, tiny_clip)
    assert (model.config.image.size, model.config.image.mean) == (32, (0.5, 0.5, 0.5))
    assert model.config.tokenizer == "open_clip" and len(model.tokenizer) == 49408
    # CLIP4Cir stage 2: CLIP frozen, the combiner trained
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"combiner"}
    model.eval()
    pixels = model.preprocess(images(2))
    assert pixels.shape == (2, 3, 32, 32)
    texts = ["a red circle", "a blue square"]
    # CLIP's own text tower on CLIP's own tokens (pooled at <eot>, the largest id)
    tokens = open_clip.tokenizer.SimpleTokenizer()(texts, context_length=16)
    expected = F.normalize(tiny_clip.encode_text(tokens), dim=-1)
    torch.testing.assert_close(F.normalize(model.text_features(texts), dim=-1), expected)
    q = model.encode_query(texts, pixel_values=pixels)
    # stage 1: fine-tune the text tower; exported folder round trip with the BPE tokenizer
    tuned = CSMCIR.from_preset("clip4cir-openclip", weights=folder, train_text_encoder=True)
    assert tuned.clip.transformer.resblocks[0].attn.in_proj_weight.requires_grad
    loaded = CSMCIR.from_pretrained(model.save_pretrained(tmp_path / "export")).eval()
    torch.testing.assert_close(loaded.encode_query(texts, pixel_values=pixels), q)
    assert loaded.fingerprint() == model.fingerprint()


def test_openclip_file_checkpoint_with_a_registered_architecture(
    tmp_path: Path, tiny_clip: torch.nn.Module
) -> None:
    """A bare .bin of an architecture open_clip knows by name (here registered at test time)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "csmcir-test-tiny.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "configs")
    checkpoint = tmp_path / "tiny.bin"
    torch.save({"state_dict": tiny_clip.state_dict()}, checkpoint)
    model = CSMCIR.from_preset(
        "clip4cir-openclip", weights=checkpoint, clip_model="csmcir-test-tiny"
    )
    assert_same_clip(model, tiny_clip)
    assert model.config.clip_model == "csmcir-test-tiny"
    wider = open_clip.CLIP(**{**TINY_CLIP, "embed_dim": 16})
    torch.save(wider.state_dict(), checkpoint)
    with pytest.raises(DataError, match="does not load into the csmcir-test-tiny architecture"):
        CSMCIR.from_preset("clip4cir-openclip", weights=checkpoint, clip_model="csmcir-test-tiny")
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        CSMCIR.from_preset("clip4cir-openclip", weights=checkpoint, clip_model="ViT-Huge-999")


def test_missing_openclip_checkpoint_says_what_to_download(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CSMCIR_OPENCLIP_WEIGHTS", raising=False)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="OpenCLIP checkpoint not found") as error:
        CSMCIR.from_preset("clip4cir-openclip", weights=missing)
    message = str(error.value)
    assert "hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    assert str(missing) in message and "CSMCIR_OPENCLIP_WEIGHTS" in message
    monkeypatch.setenv("CSMCIR_OPENCLIP_WEIGHTS", str(tmp_path))  # a folder without weights
    with pytest.raises(DataError, match="holds no weights"):
        CSMCIR.from_preset("clip4cir-openclip")

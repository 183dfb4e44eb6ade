"""The CSMCIR encoder: the fused pass, the ablation switches, gradients, presets, save/load."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from blip2_folder import CORPUS
from PIL import Image
from transformers import Blip2ForImageTextRetrieval

from csmcir.errors import ConfigError, DataError
from csmcir.model import CSMCIR, CSMCIRConfig, build_wordpiece_tokenizer, load_preset
from csmcir.model.encoder import blip2_config, enable_checkpointing

TEXTS = ["make the circle blue", "remove the green square", "add a big triangle"]


def images(n: int = 3) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 128, 255), (20, 200, 60), (250, 250, 0)]
    out = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), colours[i % len(colours)])
        img.paste((255, 255, 255), (8 * i, 8, 8 * i + 16, 30))
        out.append(img)
    return out


def tiny(**overrides) -> CSMCIR:
    return CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0, **overrides).eval()


@pytest.fixture(scope="module")
def model() -> CSMCIR:
    return tiny()


@pytest.fixture(scope="module")
def pixels(model: CSMCIR) -> torch.Tensor:
    return model.preprocess(images())


def test_tiny_preset_sizes(model: CSMCIR, pixels: torch.Tensor) -> None:
    assert 300_000 < model.num_parameters() < 400_000  # the brief's 0.34M
    assert model.config.qformer["vocab_size"] == len(model.tokenizer)
    assert pixels.shape == (3, 3, 64, 64)
    assert model.vision_features(pixels).shape == (3, 65, 64)  # 8x8 patches + [CLS]
    q = model.encode_query(TEXTS, pixels)
    assert q.shape == (3, 64)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3))
    # query tokens must not stay zero-initialised (transformers' default)
    assert model.tower.query_tokens.std() > 0.01


def test_fused_pass_is_the_same_function_on_both_sides(model: CSMCIR, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        q = model.encode_query(TEXTS, pixels)
        t = model.encode_target(TEXTS, pixels)
        assert torch.equal(q, t)
        # and it does not depend on the batch it is in (padding is masked)
        alone = model.encode_target(TEXTS[1:2], pixels[1:2])
    torch.testing.assert_close(alone[0], q[1], atol=1e-5, rtol=0)


def test_fused_pass_reads_image_and_text(model: CSMCIR, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        base = model.encode_query(TEXTS[:1] * 2, pixels[:2])
        texts = model.encode_query(TEXTS[:2], pixels[:1].repeat(2, 1, 1, 1))
    assert not torch.allclose(base[0], base[1])
    assert not torch.allclose(texts[0], texts[1])


def test_inputs_as_images_pixels_or_features_agree(model: CSMCIR, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        from_pixels = model.encode_query(TEXTS, pixels)
        from_images = model.encode_query(TEXTS, images=images())
        from_features = model.encode_query(TEXTS, vision_features=model.vision_features(pixels))
    assert torch.equal(from_pixels, from_images)
    assert torch.equal(from_pixels, from_features)
    with pytest.raises(ValueError, match="exactly one"):
        model.encode_query(TEXTS, pixels, vision_features=model.vision_features(pixels))
    with pytest.raises(ValueError, match="texts for"):
        model.encode_query(TEXTS[:2], pixels)
    with pytest.raises(ValueError, match="vision_features must be"):
        model.encode_query(TEXTS, vision_features=torch.zeros(3, 65, 32))
    with pytest.raises(ValueError, match="pass texts"):
        model.encode_target(None, pixels)


def test_image_text_similarity_pairs_images_with_texts(model: CSMCIR, pixels: torch.Tensor) -> None:
    """Stage 1's scores: rows are images, columns texts, each image's text read alone."""
    with torch.no_grad():
        sim = model.image_text_similarity(TEXTS, pixels)
        swapped = model.image_text_similarity(TEXTS[::-1], pixels.flip(0))
        alone = model.image_text_similarity(TEXTS[1:2], pixels[2:3])
    assert sim.shape == (3, 3)
    torch.testing.assert_close(swapped, sim.flip(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[0, 0], sim[2, 1], atol=1e-5, rtol=0)


def test_matching_features_are_the_query_embedding_before_its_projection(
    model: CSMCIR, pixels: torch.Tensor
) -> None:
    """Stage 1's matching head reads the very position the CIR embedding reads."""
    with torch.no_grad():
        hidden = model.matching_features(TEXTS, pixels)
        queries = model.encode_query(TEXTS, pixels)
    assert hidden.shape == (3, model.config.qformer["hidden_size"])
    projected = F.normalize(model.tower.text_projection(hidden), dim=-1)
    torch.testing.assert_close(projected, queries, atol=1e-6, rtol=0)


def test_image_text_training_learns_which_text_goes_with_which_image() -> None:
    torch.manual_seed(0)
    model = tiny().train()
    pixels = model.preprocess(images(3))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    labels = torch.arange(3)
    for _ in range(40):
        logits = model.image_text_similarity(TEXTS, pixels) / 0.07
        loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        sim = model.image_text_similarity(TEXTS, pixels)
    assert torch.equal(sim.argmax(dim=1), labels) and torch.equal(sim.argmax(dim=0), labels)


def test_similarity_known_values() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    torch.testing.assert_close(
        CSMCIR.similarity(q, t), torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.8, -1.0]])
    )
    # multi-vector targets [Nt, K, D]: the best of each target's K vectors
    t3 = torch.tensor([[[1.0, 0.0], [0.0, -1.0]], [[0.6, 0.8], [-0.6, 0.8]]])
    torch.testing.assert_close(CSMCIR.similarity(q, t3), torch.tensor([[1.0, 0.6], [0.0, 0.8]]))


def test_image_only_targets(pixels: torch.Tensor) -> None:
    m = tiny(target_text="none")
    with torch.no_grad():
        t = m.encode_target(None, pixels)
        assert torch.equal(t, m.encode_target(["texts are not read"] * 3, pixels))
        q = m.encode_query(TEXTS, pixels)
    assert t.shape == (3, 8, 64)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3, 8))
    s = m.similarity(q, t)
    assert s.shape == (3, 3)
    torch.testing.assert_close(s[1, 2], (t[2] @ q[1]).max())


def test_separate_tower_has_two_parameter_sets(model: CSMCIR, pixels: torch.Tensor) -> None:
    sep = tiny(tower="separate")
    tower_params = sum(p.numel() for p in model.tower.parameters())
    assert model.target_tower is None
    assert sep.num_parameters() == model.num_parameters() + tower_params
    query_ptrs = {p.data_ptr() for p in sep.tower.parameters()}
    assert not query_ptrs & {p.data_ptr() for p in sep.target_tower.parameters()}
    # a step on a target-only loss moves the target tower and leaves the query tower alone
    before = {k: v.clone() for k, v in sep.tower.state_dict().items()}
    t_before = sep.encode_target(TEXTS, pixels).detach()
    opt = torch.optim.SGD(sep.parameters(), lr=1.0)
    sep.encode_target(TEXTS, pixels).sum().backward()
    assert all(p.grad is None for p in sep.tower.parameters())
    opt.step()
    assert all(torch.equal(v, sep.tower.state_dict()[k]) for k, v in before.items())
    assert not torch.allclose(sep.encode_target(TEXTS, pixels), t_before)


def test_shared_tower_gets_gradients_from_both_sides(pixels: torch.Tensor) -> None:
    m = tiny()
    m.encode_target(TEXTS, pixels).sum().backward()
    assert m.tower.qformer.encoder.layer[0].attention.attention.query.weight.grad.abs().sum() > 0


def test_gradients_reach_qformer_not_frozen_vit(pixels: torch.Tensor) -> None:
    m = tiny(freeze_vision=True).train()
    assert not m.vision_model.training  # a frozen ViT stays in eval mode
    q, t = m.encode_query(TEXTS, pixels), m.encode_target(TEXTS[::-1], pixels)
    F.cross_entropy(q @ t.T / 0.07, torch.arange(3)).backward()
    assert all(p.grad is None and not p.requires_grad for p in m.vision_model.parameters())
    assert m.tower.query_tokens.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.tower.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in m.vision_model.parameters())
    frozen += sum(p.numel() for p in m.tower.vision_projection.parameters())  # unused here
    assert m.num_parameters(trainable_only=True) == m.num_parameters() - frozen


@pytest.mark.parametrize("tower", ["shared", "separate"])
@pytest.mark.parametrize("target_text", ["caption", "none"])
def test_every_trainable_weight_gets_a_gradient(tower, target_text, pixels) -> None:
    """DDP requires it: weights no configured pass reads are frozen, the rest all learn."""
    m = tiny(tower=tower, target_text=target_text).train()
    q, t = m.encode_query(TEXTS, pixels), m.encode_target(TEXTS[::-1], pixels)
    F.cross_entropy(m.similarity(q, t) / 0.07, torch.arange(3)).backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert all(p.grad is None for n, p in m.named_parameters() if n in frozen)
    if tower == "shared" and target_text == "none":
        assert frozen == set()  # both passes run on the one tower
    if tower == "separate" and target_text == "none":
        assert "target_tower.embeddings.word_embeddings.weight" in frozen
        assert "target_tower.vision_projection.weight" not in frozen


def test_tiny_vit_is_trainable(pixels: torch.Tensor) -> None:
    m = tiny().train()
    assert m.vision_model.training
    m.encode_query(TEXTS, pixels).sum().backward()
    assert m.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(pixels: torch.Tensor) -> None:
    grads = []
    for checkpointing in (False, True):
        m = tiny(gradient_checkpointing=checkpointing).train()
        m.encode_query(TEXTS, pixels).pow(2).sum().backward()
        grads.append(m.tower.qformer.encoder.layer[1].crossattention.attention.key.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_checkpointing_uses_the_method_name_this_transformers_has() -> None:
    class BeforeTheRename(torch.nn.Module):  # transformers 5 releases with only the old name
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs

    old = BeforeTheRename()
    enable_checkpointing(old)
    assert old.kwargs == {"use_reentrant": False}
    with warnings.catch_warnings():  # the new name where it exists: no deprecation warning
        warnings.simplefilter("error", FutureWarning)
        tiny(gradient_checkpointing=True)


def test_bf16_autocast_is_close_to_fp32(model: CSMCIR, pixels: torch.Tensor) -> None:
    m = tiny(precision="bf16")
    with torch.no_grad():
        low, full = m.encode_query(TEXTS, pixels), model.encode_query(TEXTS, pixels)
    assert low.dtype == torch.float32
    assert (low * full).sum(-1).min() > 0.99


def test_save_and_load_round_trip(tmp_path, model: CSMCIR, pixels: torch.Tensor) -> None:
    sep = tiny(tower="separate", target_text="none")
    for m, name in ((model, "shared"), (sep, "separate")):
        folder = m.save_pretrained(tmp_path / name)
        assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {
            p.name for p in folder.iterdir()
        }
        loaded = CSMCIR.from_pretrained(folder).eval()
        assert loaded.config == m.config
        assert loaded.fingerprint() == m.fingerprint()
        with torch.no_grad():
            assert torch.equal(loaded.encode_query(TEXTS, pixels), m.encode_query(TEXTS, pixels))
            assert torch.equal(loaded.encode_target(TEXTS, pixels), m.encode_target(TEXTS, pixels))
    # saving again replaces the folder; a leftover file of the old save is gone
    (tmp_path / "shared" / "stale.txt").write_text("x")
    model.save_pretrained(tmp_path / "shared")
    assert not (tmp_path / "shared" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_runtime_options_on_load(tmp_path, model: CSMCIR) -> None:
    folder = model.save_pretrained(tmp_path / "m")
    loaded = CSMCIR.from_pretrained(folder, precision="bf16", freeze_vision=True)
    assert loaded.config.precision == "bf16" and loaded.config.freeze_vision
    with pytest.raises(ConfigError, match="can change only"):
        CSMCIR.from_pretrained(folder, tower="separate")


def test_from_pretrained_refuses_bad_folders(tmp_path, model: CSMCIR) -> None:
    with pytest.raises(DataError, match="not found"):
        CSMCIR.from_pretrained(tmp_path / "nowhere")
    folder = model.save_pretrained(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(DataError, match=r"missing: model\.safetensors"):
        CSMCIR.from_pretrained(folder)
    folder = model.save_pretrained(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.json or vocab\.txt"):
        CSMCIR.from_pretrained(folder)
    # weights that do not fit the config
    folder = model.save_pretrained(tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    data["config"]["qformer"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="does not match"):
        CSMCIR.from_pretrained(folder)
    # a folder of other files is not replaced by save_pretrained
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="refusing to replace"):
        model.save_pretrained(other)
    assert (other / "thesis.tex").read_text() == "precious"


def test_blip2_preset_loads_a_local_blip2_folder(tmp_path, pixels: torch.Tensor) -> None:
    """The blip2-vitg path on a tiny Blip2ForImageTextRetrieval saved by transformers."""
    tiny_cfg = load_preset("tiny").config.replace(qformer={"vocab_size": 200})
    torch.manual_seed(0)
    blip = Blip2ForImageTextRetrieval(blip2_config(tiny_cfg)).eval()
    torch.nn.init.normal_(blip.query_tokens, std=0.5)
    blip.save_pretrained(tmp_path / "blip")
    tokenizer = build_wordpiece_tokenizer(CORPUS, vocab_size=200)
    tokenizer.save_pretrained(str(tmp_path / "blip"))

    m = CSMCIR.from_preset("blip2-vitg", weights=tmp_path / "blip", image={"pad_ratio": 1.5})
    m.eval()
    assert m.config.image.pad_ratio == 1.5  # overrides merge with what the folder gives
    assert m.config.preset == "blip2-vitg" and m.config.freeze_vision
    assert m.config.vision["hidden_size"] == 64 and m.config.num_query_tokens == 8
    assert m.config.image.mode == "resize" and m.config.image.size == 64  # BLIP-2's processor
    tokens = m.tokenize(TEXTS)
    with torch.no_grad():
        ours = m.encode_query(TEXTS, pixels)
        # transformers' own multimodal (ITM) pass: the same Q-Former call, read at [CLS]
        itm = blip(pixels, use_image_text_matching_head=True, **tokens)
        h = itm.text_model_output.last_hidden_state[:, 8]
        torch.testing.assert_close(ours, F.normalize(blip.text_projection(h), dim=-1))
        # and its ITC image embedding is the image-only target
        image_only = CSMCIR.from_pretrained(tmp_path / "blip", target_text="none")
        itc = blip(pixels, use_image_text_matching_head=False, **tokens)
        torch.testing.assert_close(image_only.eval().encode_target(None, pixels), itc.image_embeds)


def test_blip2_preset_missing_weights_gives_the_download_command(tmp_path) -> None:
    with pytest.raises(DataError) as err:
        CSMCIR.from_preset("blip2-vitg", weights=tmp_path / "blip2")
    message = str(err.value)
    assert "hf download Salesforce/blip2-itm-vit-g --include" in message
    assert (
        f'--include "*.safetensors" --include "*.safetensors.index.json" --local-dir {tmp_path}'
        in message
    )
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"incomplete, missing: tokenizer_config\.json"):
        CSMCIR.from_preset("blip2-vitg", weights=tmp_path / "partial")


def test_preset_errors() -> None:
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        CSMCIR.from_preset("huge")
    with pytest.raises(ConfigError, match="tokenizer_corpus"):
        CSMCIR.from_preset("tiny")
    with pytest.raises(ConfigError, match="unknown model option 'towers'"):
        CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, towers="separate")
    with pytest.raises(ConfigError, match="tower must be one of shared, separate"):
        CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, tower="both")


def test_config_json_round_trip_and_errors() -> None:
    cfg = load_preset("tiny").config.replace(tower="separate", qformer={"vocab_size": 99})
    assert cfg.qformer["num_hidden_layers"] == 2  # merged, not replaced
    assert cfg.qformer["use_qformer_text_input"] is True  # the fused pass needs it
    assert CSMCIRConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    data = cfg.to_dict()
    data["image"]["colour"] = 1
    with pytest.raises(ConfigError, match=r"unknown key\(s\) image\.colour"):
        CSMCIRConfig.from_dict(data)
    del data["image"]["colour"], data["embed_dim"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) embed_dim"):
        CSMCIRConfig.from_dict(data)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        cfg.replace(max_text_length=40)


def test_fingerprints_follow_the_weights(model: CSMCIR) -> None:
    m = tiny()
    assert m.fingerprint() == model.fingerprint()
    assert tiny(tower="separate").fingerprint() != model.fingerprint()
    vision = m.vision_fingerprint()
    with torch.no_grad():
        m.tower.text_projection.weight.data[0, 0] += 1  # through .data: no version bump
    assert m.fingerprint() != model.fingerprint()
    assert m.vision_fingerprint() == vision  # the feature cache survives Q-Former training
    with torch.no_grad():
        m.vision_model.post_layernorm.bias.data[0] += 1
    assert m.vision_fingerprint() != vision
    assert tiny(image={"size": 48}).vision_fingerprint() != model.vision_fingerprint()
    assert tiny(qformer={"num_hidden_layers": 1}).config.qformer["vocab_size"] == len(m.tokenizer)

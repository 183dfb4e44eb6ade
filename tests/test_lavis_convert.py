"""``csmcir convert lavis``: LAVIS / SPRC state dicts in, transformers' BLIP-2 folder out.

The LAVIS state dicts are built here by writing a random ``Blip2ForImageTextRetrieval``'s weights
under the names LAVIS's modules give them (``Blip2Qformer``: ``visual_encoder`` = EVA ViT,
``ln_vision``, ``Qformer`` = BertLMHeadModel, ``vision_proj``, ``text_proj``, ``itm_head``,
``temp``), spelled out below independently of the converter's table. Converting back must give
the same weights bit for bit, and embeddings equal to transformers' own computation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from blip2_folder import CORPUS, blip2_config, hub_tokenizer, random_blip2, save_hub_folder
from hub_layouts import bert_base_uncased_files, bert_vocab, write
from transformers import Blip2ForImageTextRetrieval

from csmcir.cli import main as csmcir_main
from csmcir.model import CSMCIR, build_wordpiece_tokenizer
from csmcir.model.lavis import RENAMES

HEADS = ["--vision-heads", "4", "--qformer-heads", "4"]
TEXTS = ["make the circle blue", "remove the green square"]
EXTRAS = [  # LAVIS keys with no place in transformers' BLIP-2 (and SPRC's own)
    "temp",
    "Qformer.cls.predictions.bias",
    "Qformer.cls.predictions.transform.dense.weight",
    "Qformer.cls.predictions.transform.dense.bias",
    "Qformer.cls.predictions.transform.LayerNorm.weight",
    "Qformer.cls.predictions.transform.LayerNorm.bias",
    "Qformer.cls.predictions.decoder.weight",
    "Qformer.cls.predictions.decoder.bias",
]


def to_lavis(blip: Blip2ForImageTextRetrieval) -> dict[str, torch.Tensor]:
    """The state dict LAVIS's Blip2Qformer holds for these weights."""
    hf = dict(blip.state_dict())
    taken: set[str] = set()

    def take(name: str) -> torch.Tensor:
        taken.add(name)
        return hf[name].clone()

    wb = ("weight", "bias")
    sd = {
        "visual_encoder.cls_token": take("vision_model.embeddings.class_embedding"),
        "visual_encoder.pos_embed": take("vision_model.embeddings.position_embedding"),
        "query_tokens": take("query_tokens"),
    }
    for p in wb:
        sd[f"visual_encoder.patch_embed.proj.{p}"] = take(
            f"vision_model.embeddings.patch_embedding.{p}"
        )
        sd[f"ln_vision.{p}"] = take(f"vision_model.post_layernorm.{p}")
        sd[f"Qformer.bert.embeddings.LayerNorm.{p}"] = take(f"qformer.layernorm.{p}")
        for ours, theirs in (
            ("vision_proj", "vision_projection"),
            ("text_proj", "text_projection"),
        ):
            sd[f"{ours}.{p}"] = take(f"{theirs}.{p}")
        sd[f"itm_head.{p}"] = take(f"itm_head.{p}")
    for i in range(blip.config.vision_config.num_hidden_layers):
        lavis, ours = f"visual_encoder.blocks.{i}.", f"vision_model.encoder.layers.{i}."
        sd[lavis + "attn.qkv.weight"] = take(ours + "self_attn.qkv.weight")
        q, k, v = take(ours + "self_attn.qkv.bias").chunk(3)
        assert not k.any()  # EVA has no key bias
        sd[lavis + "attn.q_bias"], sd[lavis + "attn.v_bias"] = q, v
        for p in wb:
            sd[f"{lavis}norm1.{p}"] = take(f"{ours}layer_norm1.{p}")
            sd[f"{lavis}norm2.{p}"] = take(f"{ours}layer_norm2.{p}")
            sd[f"{lavis}attn.proj.{p}"] = take(f"{ours}self_attn.projection.{p}")
            sd[f"{lavis}mlp.fc1.{p}"] = take(f"{ours}mlp.fc1.{p}")
            sd[f"{lavis}mlp.fc2.{p}"] = take(f"{ours}mlp.fc2.{p}")
    bert = "Qformer.bert."
    sd[bert + "embeddings.word_embeddings.weight"] = take("embeddings.word_embeddings.weight")
    positions = take("embeddings.position_embeddings.weight")
    sd[bert + "embeddings.position_embeddings.weight"] = positions
    sd[bert + "embeddings.position_ids"] = torch.arange(positions.shape[0]).expand(1, -1)
    for i in range(blip.config.qformer_config.num_hidden_layers):
        lavis, ours = f"{bert}encoder.layer.{i}.", f"qformer.encoder.layer.{i}."
        blocks = ["attention"] + (
            ["crossattention"] if f"{ours}crossattention.output.dense.weight" in hf else []
        )
        for p in wb:
            for block in blocks:
                for proj in ("query", "key", "value"):
                    sd[f"{lavis}{block}.self.{proj}.{p}"] = take(
                        f"{ours}{block}.attention.{proj}.{p}"
                    )
                sd[f"{lavis}{block}.output.dense.{p}"] = take(f"{ours}{block}.output.dense.{p}")
                sd[f"{lavis}{block}.output.LayerNorm.{p}"] = take(
                    f"{ours}{block}.output.LayerNorm.{p}"
                )
            for ffn in ("", "_query"):
                sd[f"{lavis}intermediate{ffn}.dense.{p}"] = take(
                    f"{ours}intermediate{ffn}.dense.{p}"
                )
                sd[f"{lavis}output{ffn}.dense.{p}"] = take(f"{ours}output{ffn}.dense.{p}")
                sd[f"{lavis}output{ffn}.LayerNorm.{p}"] = take(f"{ours}output{ffn}.LayerNorm.{p}")
    assert taken == set(hf), set(hf) - taken  # every transformers weight has its LAVIS name
    width, vocab = positions.shape[1], sd[bert + "embeddings.word_embeddings.weight"].shape[0]
    shapes = {"temp": (), "Qformer.cls.predictions.bias": (vocab,)}
    shapes |= {k: (width, width) if k.endswith("dense.weight") else (width,) for k in EXTRAS[2:6]}
    shapes |= {EXTRAS[6]: (vocab, width), EXTRAS[7]: (vocab,)}
    sd |= {k: torch.randn(shape) for k, shape in shapes.items()}
    return sd


@pytest.fixture(scope="module")
def lavis(tmp_path_factory) -> tuple[Path, Blip2ForImageTextRetrieval, dict]:
    """(a BERT tokenizer folder without [DEC], the random model, its LAVIS state dict)."""
    root = tmp_path_factory.mktemp("lavis")
    build_wordpiece_tokenizer(CORPUS, vocab_size=400).save_pretrained(str(root / "bert"))
    blip = random_blip2(len(hub_tokenizer()), seed=3)
    return root / "bert", blip, to_lavis(blip)


def convert(checkpoint: Path, bert: Path, out: Path, *extra: str) -> int:
    argv = ["convert", "lavis", str(checkpoint), "--tokenizer", str(bert), "--out", str(out)]
    return csmcir_main([*argv, *HEADS, *extra])


def check_same_model(out: Path, blip: Blip2ForImageTextRetrieval) -> None:
    """Bit-identical weights, and CSMCIR's embeddings are transformers' own pass on them with
    LAVIS's ln_vision eps (1e-5; transformers' BLIP-2 applies the ViT's 1e-6 there)."""
    again = Blip2ForImageTextRetrieval.from_pretrained(out)
    theirs = blip.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in again.state_dict().items())
    model = CSMCIR.from_preset("blip2-vitg", weights=out).eval()  # what --model.weights does
    assert model.vision_model.post_layernorm.eps == 1e-5
    blip = copy.deepcopy(blip)
    blip.vision_model.post_layernorm.eps = 1e-5
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        ours = model.encode_query(TEXTS, pixels)
        itm = blip(pixels, use_image_text_matching_head=True, **tokens)
        h = itm.text_model_output.last_hidden_state[:, blip.config.num_query_tokens]
    assert (ours - F.normalize(blip.text_projection(h), dim=-1)).abs().max() <= 1e-6


def test_a_lavis_checkpoint_converts_exactly_and_lists_what_has_no_place(
    lavis, tmp_path, capsys
) -> None:
    bert, blip, sd = lavis
    pth = tmp_path / "blip2_pretrained.pth"
    torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 9}, pth)
    assert convert(pth, bert, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "(the 'model' entry)" in printed
    assert f"{len(EXTRAS)} key(s) with no place in BLIP-2" in printed
    assert all(f"  {k}\n" in printed + "\n" for k in EXTRAS)
    assert "Qformer.bert.embeddings.position_ids" in printed  # recomputed, said so
    assert "added [DEC]" in printed
    check_same_model(tmp_path / "out", blip)
    record = json.loads((tmp_path / "out" / "lavis_conversion.json").read_text())
    assert sorted(record["unmapped"]) == sorted(EXTRAS) and record["itm_head"] == "kept"
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }


def test_an_sprc_checkpoint_converts_and_its_prompt_tokens_are_listed(
    lavis, tmp_path, capsys
) -> None:
    bert, blip, sd = lavis
    sprc = {k: v for k, v in sd.items() if not k.startswith("itm_head")}
    sprc["prompt_tokens"] = torch.randn(1, 8, 64)
    pt = tmp_path / "tuned_clip_best.pt"
    torch.save({"epoch": 3, "Blip2QformerCirAlignPrompt": sprc}, pt)
    assert convert(pt, bert, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "(the 'Blip2QformerCirAlignPrompt' entry)" in printed and "  prompt_tokens" in printed
    assert "itm_head: not in the checkpoint, freshly initialised" in printed
    exported = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "out")
    assert torch.equal(exported.text_projection.weight, blip.text_projection.weight)
    assert not torch.equal(exported.itm_head.weight, blip.itm_head.weight)


def test_a_checkpoint_without_its_vit_takes_it_from_a_blip2_folder(lavis, tmp_path, capsys) -> None:
    """LAVIS saves only trainable weights, so a stage-1 checkpoint lacks the frozen ViT."""
    bert, blip, sd = lavis
    stage1 = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")}
    pth = tmp_path / "stage1.pth"
    torch.save({"model": stage1}, pth)
    assert convert(pth, bert, tmp_path / "no-vit") == 2
    assert "--vision" in capsys.readouterr().err
    # the folder's ViT, but the checkpoint's ln_vision (trained in stage 1)
    other = copy.deepcopy(blip)
    with torch.no_grad():
        other.vision_model.post_layernorm.weight.add_(1.0)
    save_hub_folder(other, hub_tokenizer(), tmp_path / "blip2-itm")
    assert convert(pth, bert, tmp_path / "out", "--vision", str(tmp_path / "blip2-itm")) == 0
    check_same_model(tmp_path / "out", blip)


def test_a_bare_eva_vit_needs_the_layers_blip2_keeps(lavis, tmp_path, capsys) -> None:
    bert, blip, sd = lavis
    stage1 = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")}
    torch.save({"model": stage1}, tmp_path / "stage1.pth")
    eva = {k.removeprefix("visual_encoder."): v for k, v in sd.items() if "visual_encoder" in k}
    eva |= {k.replace("blocks.1.", "blocks.2."): v for k, v in eva.items() if "blocks.1." in k}
    torch.save(eva, tmp_path / "eva_vit_g.pth")  # one block more than BLIP-2 keeps
    args = ("--vision", str(tmp_path / "eva_vit_g.pth"))
    assert convert(tmp_path / "stage1.pth", bert, tmp_path / "a", *args) == 2
    assert "--vision-layers" in capsys.readouterr().err
    assert (
        convert(tmp_path / "stage1.pth", bert, tmp_path / "b", *args, "--vision-layers", "2") == 0
    )
    printed = capsys.readouterr().out
    assert "eva_vit_g.pth: visual_encoder.blocks.2.mlp.fc1.weight" in printed
    check_same_model(tmp_path / "b", blip)


def test_what_is_not_lavis_blip2_is_refused_by_name(lavis, tmp_path, capsys) -> None:
    bert, blip, sd = lavis
    cases = {
        "hf.pth": (blip.state_dict(), "no LAVIS Q-Former"),
        "gamma.pth": (sd | {"visual_encoder.blocks.0.gamma_1": torch.ones(64)}, "gamma_1"),
        "junk.pth": ({"epoch": 1, "step": 2}, "no state dict found"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        assert convert(tmp_path / name, bert, tmp_path / f"out-{name}") == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / f"out-{name}").exists()
    other = tmp_path / "cased"
    build_wordpiece_tokenizer(["Other Words Entirely"], vocab_size=150).save_pretrained(str(other))
    torch.save({"model": sd}, tmp_path / "ok.pth")
    assert convert(tmp_path / "ok.pth", tmp_path / "nowhere", tmp_path / "out") == 2
    assert "hf download google-bert/bert-base-uncased --include" in capsys.readouterr().err
    assert convert(tmp_path / "ok.pth", other, tmp_path / "out") == 2
    assert "bert-base-uncased plus [DEC]" in capsys.readouterr().err


def test_the_docs_show_the_mapping_table() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text()
    for lavis_name, ours in RENAMES:
        assert f"| `{lavis_name}` | `{ours}` |" in docs, lavis_name


def test_the_hub_bert_tokenizer_layout_converts(tmp_path, capsys) -> None:
    """google-bert/bert-base-uncased as the hub holds it (no tokenizer_class): it was refused
    with "lacks a [PAD] or [CLS] token"."""
    bert = write(tmp_path / "bert-base-uncased", bert_base_uncased_files())
    blip = random_blip2(len(bert_vocab()) + 1, seed=4)  # + LAVIS's [DEC]
    torch.save({"model": to_lavis(blip)}, tmp_path / "stage1.pth")
    assert convert(tmp_path / "stage1.pth", bert, tmp_path / "out") == 0
    assert "added [DEC]" in capsys.readouterr().out
    check_same_model(tmp_path / "out", blip)


def test_what_the_shapes_cannot_tell_is_printed_and_recorded(tmp_path, capsys) -> None:
    """Head counts and epsilons: in the summary and lavis_conversion.json; a head count that
    divides the width but is not what LAVIS builds at that width is said to be a guess."""
    bert = write(tmp_path / "bert", bert_base_uncased_files())
    config = blip2_config(len(bert_vocab()) + 1)
    config.qformer_config.hidden_size = 768  # BERT-base's width: LAVIS builds it with 12 heads
    config.qformer_config.num_attention_heads = 8
    config.qformer_config.intermediate_size = 32
    config.qformer_config.num_hidden_layers = 1
    torch.manual_seed(0)
    blip = Blip2ForImageTextRetrieval(config).eval()
    torch.save(to_lavis(blip), tmp_path / "wide.pth")
    argv = ["convert", "lavis", str(tmp_path / "wide.pth"), "--tokenizer", str(bert)]
    assert csmcir_main([*argv, "--out", str(tmp_path / "a"), "--vision-heads", "4"]) == 0
    printed = capsys.readouterr().out
    assert "qformer_heads = 12: BERT-base's, as LAVIS builds width 768" in printed
    assert "vision_heads = 4: --vision-heads" in printed and "ln_vision_eps = 1e-05" in printed
    more = ["--vision-heads", "4", "--qformer-heads", "8"]
    assert csmcir_main([*argv, "--out", str(tmp_path / "b"), *more]) == 0
    printed = capsys.readouterr().out
    assert "qformer_heads = 8: --qformer-heads; LAVIS's BERT-base of width 768 has 12" in printed
    record = json.loads((tmp_path / "b" / "lavis_conversion.json").read_text())
    assert record["assumed"]["qformer_heads"]["value"] == 8
    assert record["assumed"]["ln_vision_eps"]["value"] == 1e-5
    assert record["assumed"]["vision_layer_norm_eps"]["value"] == 1e-6
    vision = json.loads((tmp_path / "b" / "config.json").read_text())["vision_config"]
    assert vision["post_layernorm_eps"] == 1e-5 and vision["layer_norm_eps"] == 1e-6
    assert csmcir_main([*argv, "--out", str(tmp_path / "c"), *more[:2], "--qformer-heads", "7"])
    assert "--qformer-heads 7: does not divide the qformer width 768" in capsys.readouterr().err


def test_ln_vision_eps_changes_the_features_measurably(lavis, tmp_path) -> None:
    """CSMCIR runs ln_vision with LAVIS's 1e-5; with transformers' 1e-6 the ViT output moves."""
    bert, blip, sd = lavis
    torch.save(sd, tmp_path / "a.pth")
    assert convert(tmp_path / "a.pth", bert, tmp_path / "out") == 0
    model = CSMCIR.from_preset("blip2-vitg", weights=tmp_path / "out").eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.vision_features(pixels)
        lavis_eps = copy.deepcopy(blip.vision_model)
        lavis_eps.post_layernorm.eps = 1e-5
        assert (ours - lavis_eps(pixels).last_hidden_state).abs().max() <= 1e-6
        assert not torch.allclose(ours, blip.vision_model(pixels).last_hidden_state, atol=1e-7)


def test_broken_checkpoints_get_one_message_naming_the_file(lavis, tmp_path, capsys) -> None:
    """Issue 23: a raw KeyError, a raw size mismatch and torch's weights_only=False advice."""
    bert, _, sd = lavis
    no_proj = {k: v for k, v in sd.items() if not k.startswith("text_proj.")}
    wide = sd | {"query_tokens": torch.randn(1, 8, 32)}
    clip_vit = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")}
    clip_vit |= {
        "visual_encoder.conv1.weight": torch.randn(64, 3, 8, 8),
        "visual_encoder.class_embedding": torch.randn(64),
        "visual_encoder.positional_embedding": torch.randn(65, 64),
        "visual_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.randn(192, 64),
        "visual_encoder.transformer.resblocks.0.ln_1.weight": torch.ones(64),
    }
    cases = {
        "no_proj.pth": (no_proj, "has no text_proj.weight"),
        "wide.pth": (wide, "query_tokens [1, 8, 32] where [1, 8, 64] fits"),
        "vitl.pth": (clip_vit, "its visual_encoder is a CLIP ViT-L"),
    }
    for name, (state, message) in cases.items():
        torch.save({"model": state}, tmp_path / name)
        assert convert(tmp_path / name, bert, tmp_path / f"out-{name}") == 2
        err = capsys.readouterr().err
        assert message in err and str(tmp_path / name) in err, err
        assert "Traceback" not in err and not (tmp_path / f"out-{name}").exists()
    (tmp_path / "random.pth").write_bytes(torch.randint(0, 256, (4096,)).byte().numpy().tobytes())
    assert convert(tmp_path / "random.pth", bert, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'random.pth'} is not a PyTorch checkpoint" in err
    assert "weights_only=False" not in err and "weights_only` set to `False`" not in err
    torch.save({"model": sd, "hook": print}, tmp_path / "pickled.pth")  # a Python object
    assert convert(tmp_path / "pickled.pth", bert, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'pickled.pth'}: it holds a pickled Python object of type" in err
    assert "weights_only=False" not in err and not (tmp_path / "out").exists()

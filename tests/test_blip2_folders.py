"""Loading BLIP-2 folders laid out as the hub does: exact, strict, processor and tokenizer read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from blip2_folder import CORPUS, MEAN, STD, image_processor, make_blip2_folder
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessorPil

from csmcir.errors import ConfigError, DataError
from csmcir.evaluation.encode import load_model as eval_model
from csmcir.model import CSMCIR
from csmcir.model.features_cli import load_model as features_model

TEXTS = ["make the circle blue", "remove the green square", "add a big triangle"]
SPURIOUS = "You are using a model of type"


def photos() -> list[Image.Image]:
    """Non-square photos with detail, so that resize filters and geometry make a difference."""
    out = []
    for i, (w, h) in enumerate([(90, 60), (64, 64), (50, 120)]):
        torch.manual_seed(i)
        pixels = (torch.rand(h, w, 3) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(pixels))
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    return make_blip2_folder(tmp_path_factory.mktemp("hub") / "blip2-itm")


@pytest.fixture
def transformers_logs(caplog):
    """Let caplog see transformers' records: its logger propagates only when CI is set."""
    transformers.logging.enable_propagation()
    yield caplog
    transformers.logging.disable_propagation()


def test_hub_folder_loads_exactly_with_its_processor_and_tokenizer(hub, transformers_logs) -> None:
    caplog = transformers_logs
    folder, blip = hub
    model = CSMCIR.from_pretrained(folder).eval()
    assert SPURIOUS not in caplog.text
    image = model.config.image
    assert (image.size, image.mode, image.resample) == (64, "resize", "bilinear")
    assert image.mean == pytest.approx(MEAN) and image.std == pytest.approx(STD)
    # the preprocessing is transformers' own image processor's (PIL backend), to float precision
    pixels = model.preprocess(photos())
    reference = BlipImageProcessorPil(**image_processor(64).to_dict())
    theirs = reference(photos(), return_tensors="pt")["pixel_values"]
    assert (pixels - theirs).abs().max() < 1e-5
    # the tokenizer re-saved by Blip2Processor has <image> beyond the Q-Former's rows
    vocab = model.config.qformer["vocab_size"]
    assert len(model.tokenizer) == vocab + 1
    assert model.tokenizer.convert_tokens_to_ids("<image>") == vocab
    ids = model.tokenize(["a <image> circle"])["input_ids"]
    assert ids.max() < vocab and model.tokenizer.unk_token_id in ids.tolist()[0]
    # the embeddings are transformers' own multimodal pass, read at [CLS]
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        ours = model.encode_query(TEXTS, pixels)
        itm = blip(pixels, use_image_text_matching_head=True, **tokens)
        h = itm.text_model_output.last_hidden_state[:, model.config.num_query_tokens]
    assert (ours - F.normalize(blip.text_projection(h), dim=-1)).abs().max() == 0
    # the unused ITM head is carried, frozen, for `csmcir export hf`
    assert model.config.itm_head and torch.equal(model.itm_head.weight, blip.itm_head.weight)
    assert not model.itm_head.weight.requires_grad


def test_processor_config_json_layout_is_read_too(tmp_path) -> None:
    """Blip2Processor.save_pretrained now writes processor_config.json, no preprocessor file."""
    folder, _ = make_blip2_folder(tmp_path / "resaved", processor_layout="processor")
    assert not (folder / "preprocessor_config.json").exists()
    image = CSMCIR.from_pretrained(folder).config.image
    assert image.resample == "bilinear" and image.mean == pytest.approx(MEAN)
    # SPRC's target-pad stays available, explicitly
    padded = CSMCIR.from_preset(
        "blip2-vitg", weights=folder, image={"mode": "target_pad", "pad_ratio": 1.25}
    )
    assert padded.config.image.mode == "target_pad" and padded.config.image.std == pytest.approx(
        STD
    )


def test_processors_csmcir_cannot_reproduce_are_refused(tmp_path) -> None:
    folder, _ = make_blip2_folder(tmp_path / "b")
    path = folder / "preprocessor_config.json"
    settings = json.loads(path.read_text())
    for change, message in (
        ({"size": {"height": 64, "width": 48}}, "not square"),
        ({"size": {"height": 32, "width": 32}}, "image_size 64"),
        ({"do_center_crop": True}, "do_center_crop"),
    ):
        path.write_text(json.dumps(settings | change))
        with pytest.raises(ConfigError, match=message):
            CSMCIR.from_pretrained(folder)
    path.write_text(json.dumps(settings | {"do_normalize": False}))
    image = CSMCIR.from_pretrained(folder).config.image
    assert image.mean == (0.0, 0.0, 0.0) and image.std == (1.0, 1.0, 1.0)


def test_missing_weights_are_an_error_naming_them(hub, tmp_path) -> None:
    folder, blip = hub
    state = load_file(str(folder / "model.safetensors"))
    gone = [
        "text_projection.weight",
        "embeddings.word_embeddings.weight",
        "qformer.encoder.layer.1.intermediate.dense.weight",
        "qformer.encoder.layer.1.output.dense.weight",
        "qformer.encoder.layer.1.output.dense.bias",
        "qformer.encoder.layer.1.output.LayerNorm.weight",
    ]
    partial = tmp_path / "partial"
    blip.save_pretrained(partial)
    save_file({k: v for k, v in state.items() if k not in gone}, str(partial / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (partial / name).write_text((folder / name).read_text())
    with pytest.raises(DataError, match=r"lacks 6 weight\(s\) CSMCIR needs") as err:
        CSMCIR.from_pretrained(partial)
    assert "and 1 more" in str(err.value)
    assert sum(name in str(err.value) for name in gone) == 5


def test_a_missing_itm_head_is_fine_and_real_warnings_still_show(
    hub, tmp_path, transformers_logs
) -> None:
    caplog = transformers_logs
    folder, blip = hub
    state = load_file(str(folder / "model.safetensors"))
    no_itm = tmp_path / "no-itm"
    blip.save_pretrained(no_itm)
    save_file(
        {k: v for k, v in state.items() if not k.startswith("itm_head")},
        str(no_itm / "model.safetensors"),
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_itm / name).write_text((folder / name).read_text())
    model = CSMCIR.from_pretrained(no_itm)
    assert not model.config.itm_head and model.itm_head is None
    assert "itm_head.weight | MISSING" in caplog.text  # transformers' own report still shows
    assert SPURIOUS not in caplog.text


def test_a_generation_checkpoint_is_refused_naming_the_retrieval_one(tmp_path) -> None:
    tiny = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "vocab_size": 99},
        text_config={"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1,
                     "ffn_dim": 64, "num_attention_heads": 2, "vocab_size": 99,
                     "word_embed_proj_dim": 32},
        num_query_tokens=4,
    )  # fmt: skip
    folder = tmp_path / "blip2-opt"
    Blip2ForConditionalGeneration(tiny).save_pretrained(folder)
    from blip2_folder import hub_tokenizer

    hub_tokenizer(CORPUS).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "blip-2"
    with pytest.raises(DataError, match="Blip2ForConditionalGeneration") as err:
        CSMCIR.from_pretrained(folder)
    assert "Salesforce/blip2-itm-vit-g" in str(err.value)


def test_a_checkpoint_file_where_a_folder_belongs_names_the_converter(tmp_path) -> None:
    pth = tmp_path / "blip2_pretrained.pth"
    torch.save({"model": {}}, pth)
    for load in (
        lambda: CSMCIR.from_pretrained(pth),
        lambda: CSMCIR.from_preset("blip2-vitg", weights=pth),
        lambda: eval_model(str(pth), list),  # csmcir eval / index --model
        lambda: features_model(str(pth), None),  # csmcir features --model
    ):
        with pytest.raises(DataError, match="LAVIS") as err:
            load()
        assert f"csmcir convert lavis {pth}" in str(err.value)


def test_exported_folders_load_without_the_spurious_warning(tmp_path, transformers_logs) -> None:
    caplog = transformers_logs
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0)
    folder = model.save_pretrained(tmp_path / "tiny")
    caplog.clear()
    CSMCIR.from_pretrained(folder)
    assert SPURIOUS not in caplog.text

"""``csmcir export hf``: a shared-tower model as a folder transformers loads and computes alike."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from blip2_folder import CORPUS, make_blip2_folder
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, Blip2ForImageTextRetrieval

from csmcir.cli import main as csmcir_main
from csmcir.model import CSMCIR
from csmcir.model.blip2 import image_processor

TEXTS = ["make the circle blue", "remove the green square", "a <image> test"]


def images(n: int = 3) -> list[Image.Image]:
    torch.manual_seed(1)
    return [
        Image.fromarray((torch.rand(40 + 10 * i, 70, 3) * 255).to(torch.uint8).numpy())
        for i in range(n)
    ]


def transformers_embeddings(folder: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query embeddings by transformers' own multimodal pass (read at [CLS]) and its ITC image
    embeddings, with its own processor loaded from the folder. The processor puts the query
    tokens' <image> ids first (the model drops them); one written in a text is mapped to [UNK],
    as csmcir's tokenizer maps it."""
    blip = Blip2ForImageTextRetrieval.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    inputs = processor(images=images(len(texts)), text=texts, padding=True, return_tensors="pt")
    n = blip.config.num_query_tokens
    vocab = blip.config.qformer_config.vocab_size
    text_ids = inputs["input_ids"][:, n:]
    text_ids.masked_fill_(text_ids >= vocab, tokenizer.unk_token_id)
    with torch.no_grad():
        itm = blip(**inputs, use_image_text_matching_head=True)
        queries = F.normalize(blip.text_projection(itm.text_model_output.last_hidden_state[:, n]))
        itc = blip(**inputs, use_image_text_matching_head=False)
    return queries, itc.image_embeds


def export(model_dir: Path, out: Path, capsys) -> str:
    assert csmcir_main(["export", "hf", str(model_dir), "--out", str(out)]) == 0
    return capsys.readouterr().out


def test_a_fine_tuned_blip2_model_exports_with_its_itm_head(tmp_path, capsys) -> None:
    source, blip = make_blip2_folder(tmp_path / "blip2-itm")
    model = CSMCIR.from_pretrained(source)
    with torch.no_grad():  # stand-in for fine-tuning: every trainable weight moves
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    trained = model.save_pretrained(tmp_path / "trained")
    printed = export(trained, tmp_path / "hf", capsys)
    assert "itm_head: the source checkpoint's" in printed and "verified" in printed

    ours_model = CSMCIR.from_pretrained(trained).eval()
    with torch.no_grad():
        ours = ours_model.encode_query(TEXTS, images=images())
    theirs, _ = transformers_embeddings(tmp_path / "hf", TEXTS)
    assert (ours - theirs).abs().max() <= 1e-6
    exported = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf")
    assert torch.equal(exported.itm_head.weight, blip.itm_head.weight)
    assert not torch.equal(exported.text_projection.weight, blip.text_projection.weight)


def test_a_random_model_exports_with_a_fresh_itm_head_and_says_so(tmp_path, capsys) -> None:
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0, target_text="none")
    folder = model.save_pretrained(tmp_path / "tiny")
    printed = export(folder, tmp_path / "hf", capsys)
    assert "itm_head: freshly initialised" in printed
    assert "ITC image_embeds are this model's target embeddings" in printed
    model = CSMCIR.from_pretrained(folder).eval()
    with torch.no_grad():
        # TEXTS[2] writes "<image>": the processor's token, which this tokenizer never had
        queries = model.encode_query(TEXTS[:2], images=images(2))
        targets = model.encode_target(None, images=images(2))
    theirs_q, theirs_t = transformers_embeddings(tmp_path / "hf", TEXTS[:2])
    assert (queries - theirs_q).abs().max() <= 1e-6
    assert (targets - theirs_t).abs().max() <= 1e-6


def test_separate_towers_and_occupied_folders_are_refused(tmp_path, capsys) -> None:
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0, tower="separate")
    folder = model.save_pretrained(tmp_path / "separate")
    assert csmcir_main(["export", "hf", str(folder), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "separate query and target towers" in err and "two Q-Formers" in err
    assert not (tmp_path / "hf").exists()
    shared = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0)
    folder = shared.save_pretrained(tmp_path / "shared")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    assert csmcir_main(["export", "hf", str(folder), "--out", str(tmp_path / "busy")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep"


def test_a_blip2_folder_round_trips_unchanged(tmp_path, capsys) -> None:
    """Loading a hub folder and exporting it gives back the same weights, bit for bit."""
    source, blip = make_blip2_folder(tmp_path / "blip2-itm")
    export(source, tmp_path / "hf", capsys)
    again = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf")
    theirs = blip.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in again.state_dict().items())


def test_the_documented_processor_usage_runs_and_gives_the_model_embeddings(tmp_path, capsys):
    """``AutoProcessor(images=..., text=...)`` with ``max_length`` raised TypeError (the folder
    had no processor config, so num_query_tokens was None); now the processor puts the query
    tokens' <image> ids first and the model drops them again."""
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0)
    folder = model.save_pretrained(tmp_path / "tiny")
    export(folder, tmp_path / "hf", capsys)
    blip = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    n = blip.config.num_query_tokens
    texts = [*TEXTS[:2], "make the circle blue " * 40]  # the last one is cut
    inputs = processor(
        images=images(),
        text=texts,
        padding="max_length",
        max_length=n + 32,
        truncation=True,
        return_tensors="pt",
    )
    assert inputs["input_ids"].shape == (3, n + 32)
    assert (inputs["input_ids"][:, :n] == blip.config.image_token_index).all()
    with torch.no_grad():
        out = blip(**inputs, use_image_text_matching_head=True)
        theirs = F.normalize(blip.text_projection(out.text_model_output.last_hidden_state[:, n]))
        ours = CSMCIR.from_pretrained(folder).eval().encode_query(texts, images=images())
    assert (ours - theirs).abs().max() <= 1e-6


def test_a_model_that_has_cut_texts_exports_a_processor_that_cuts_as_it_does(tmp_path, capsys):
    """Tokenizing with truncation (as training does) leaves ``max_length`` in the saved
    tokenizer, and Blip2Processor takes its query tokens out of that: a trained quickstart
    model's export cut long texts 8 tokens short, and its check refused the folder (2.2e-02)."""
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0)
    long_text = "make the circle blue " * 40
    model.tokenize([long_text])
    folder = model.save_pretrained(tmp_path / "tiny")
    export(folder, tmp_path / "hf", capsys)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    n = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf").config.num_query_tokens
    inputs = processor(images=images(1), text=[long_text], truncation=True, return_tensors="pt")
    ours = CSMCIR.from_pretrained(folder).tokenize([long_text])["input_ids"]
    assert ours.shape[1] == model.config.max_text_length
    assert torch.equal(inputs["input_ids"][:, n:], ours)


def test_a_run_folder_exports_its_final_model(tmp_path, capsys) -> None:
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0)
    model.save_pretrained(tmp_path / "run" / "model")
    (tmp_path / "run" / "last.ckpt").write_bytes(b"")
    printed = export(tmp_path / "run", tmp_path / "hf", capsys)
    assert "verified with transformers" in printed
    exported = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf")
    assert torch.equal(exported.query_tokens, model.tower.query_tokens)


def test_verification_fails_when_the_folder_does_not_reproduce_the_model(
    tmp_path, capsys, monkeypatch
) -> None:
    """The check is not a formality: a folder whose processor normalises otherwise is refused."""
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=CORPUS, seed=0)
    folder = model.save_pretrained(tmp_path / "tiny")
    wrong = dataclasses.replace(model.config.image, mean=(0.5, 0.5, 0.5))
    monkeypatch.setattr(
        "csmcir.model.hf_export.image_processor", lambda image: image_processor(wrong)
    )
    assert csmcir_main(["export", "hf", str(folder), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "transformers' embeddings from the exported folder differ" in err
    assert "do not publish it" in err

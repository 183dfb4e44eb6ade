"""A trained shared-tower CSMCIR as a transformers ``Blip2ForImageTextRetrieval`` folder.

The shared-tower model is exactly that architecture (ViT, query tokens, Q-Former text
embeddings, Q-Former, both projections): its weights change names (``tower.X`` -> ``X``) and
nothing else, so transformers' own multimodal pass gives our embeddings. The ``itm_head`` CSMCIR
never reads comes back from the source checkpoint when the model carried it; otherwise it is
freshly initialised, and the report says so. The export is checked by running the usage the
model card documents (``AutoProcessor`` + ``Blip2ForImageTextRetrieval``) on the folder alone.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, Blip2ForImageTextRetrieval

from csmcir.errors import ConfigError, DataError
from csmcir.model.blip2 import image_processor, write_retrieval_folder
from csmcir.model.config import ImageConfig
from csmcir.model.encoder import CSMCIR, blip2_config
from csmcir.model.modes import eval_mode

CARD_FILE = "README.md"
# transformers and csmcir compute the same float32 operations in another order: measured
# <= 1e-6 on the tiny and BLIP-2-shaped test models.
VERIFY_TOLERANCE = 1e-5


@dataclass
class HFExport:
    """What ``export_hf`` wrote, and what a user of the folder should know."""

    folder: Path
    itm_head: str  # "kept" (the source checkpoint's) or "fresh" (random, untrained)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote a Blip2ForImageTextRetrieval folder: {self.folder}"]
        if self.itm_head == "kept":
            lines.append("itm_head: the source checkpoint's (CSMCIR never trains it)")
        else:
            lines.append(
                "itm_head: freshly initialised (the model had none); "
                "use_image_text_matching_head=True scores are meaningless until it is trained"
            )
        return "\n".join(lines + self.notes)


def check_exportable(model) -> None:
    """Only a shared-tower CSMCIR is one Blip2ForImageTextRetrieval; say why otherwise."""
    if not isinstance(model, CSMCIR):
        raise ConfigError(
            f"only CSMCIR models export to transformers' BLIP-2; this is a {model.model_type}"
        )
    if model.config.tower == "separate":
        raise ConfigError(
            "this model has separate query and target towers (the ablation of the shared "
            "encoder): two Q-Formers, query tokens and projections, while "
            "Blip2ForImageTextRetrieval has one set used for both sides, so no transformers "
            "BLIP-2 folder can hold it. Keep its csmcir folder (CSMCIR.from_pretrained)"
        )


def export_hf(model: CSMCIR, folder: str | Path, card: str | None = None) -> HFExport:
    """Write ``folder`` (new or empty): config.json, model.safetensors, tokenizer files,
    processor_config.json and preprocessor_config.json, as the hub's
    ``Salesforce/blip2-itm-vit-g`` is laid out, and ``card`` as its README.md. The tokenizer
    truncates at the model's ``max_text_length``, so ``truncation=True`` cuts as csmcir does."""
    check_exportable(model)
    state = {k.removeprefix("tower."): v for k, v in model.state_dict().items()}
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.model_max_length = model.config.max_text_length
    # A tokenizer that has cut texts saves that max_length with itself, and Blip2Processor
    # takes its <image> ids out of it: texts would be cut num_query_tokens short of csmcir's.
    tokenizer.init_kwargs.pop("max_length", None)
    folder = Path(folder)
    kept = write_retrieval_folder(
        blip2_config(model.config),
        state,
        tokenizer,
        image_processor(model.config.image),
        folder,
        source="the model",
        extra={CARD_FILE: card} if card is not None else None,
    )
    report = HFExport(folder, "kept" if kept else "fresh")
    report.notes += notes(model)
    return report


def notes(model: CSMCIR) -> list[str]:
    """What a transformers user of the exported folder must know about this model."""
    found = []
    if model.config.image.mode == "target_pad":
        found.append(
            f"preprocessing: the model was trained on target-padded images (ratio "
            f"{model.config.image.pad_ratio}); BlipImageProcessor only resizes, so pad "
            "elongated images the same way before it to get the same embeddings"
        )
    if model.config.target_text == "none":
        found.append(
            "targets are image-only (target_text none): transformers' ITC image_embeds are "
            "this model's target embeddings"
        )
    return found


def documented_embeddings(
    folder: Path, images: list[Image.Image], texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The usage the model card and docs/model.md give, on the exported folder alone:
    ``AutoProcessor(images=..., text=...)`` into ``Blip2ForImageTextRetrieval``; the fused
    pass read at the text's [CLS] (queries, and targets with captions) and the ITC image
    embeddings (image-only targets)."""
    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True, backend="pil")
    blip = Blip2ForImageTextRetrieval.from_pretrained(
        str(folder), local_files_only=True, dtype=torch.float32
    ).eval()
    n = blip.config.num_query_tokens
    inputs = processor(
        images=images, text=texts, padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        fused = blip(**inputs, use_image_text_matching_head=True)
        itc = blip(**inputs, use_image_text_matching_head=False)
    queries = F.normalize(
        blip.text_projection(fused.text_model_output.last_hidden_state[:, n]), dim=-1
    )
    return queries, itc.image_embeds


def verify_images(image: ImageConfig, n: int, seed: int = 0) -> list[Image.Image]:
    """Seeded random images: elongated where the model squashes them as BlipImageProcessor
    does, square where it pads (which the processor cannot)."""
    generator = torch.Generator().manual_seed(seed)
    width = image.size if image.mode == "target_pad" else image.size * 4 // 3 + 1
    return [
        Image.fromarray(
            torch.randint(
                0, 256, (image.size, width, 3), generator=generator, dtype=torch.uint8
            ).numpy()
        )
        for _ in range(n)
    ]


def verify(model: CSMCIR, folder: Path, texts: list[str]) -> float:
    """Largest |difference| between this model's embeddings (in fp32) and what the documented
    transformers usage computes from the folder; a DataError above ``VERIFY_TOLERANCE``."""
    images = verify_images(model.config.image, len(texts))
    queries, image_embeds = documented_embeddings(folder, images, texts)
    with torch.no_grad(), eval_mode(model), full_precision(model):
        diffs = [(model.encode_query(texts, images=images).cpu() - queries).abs().max()]
        if model.config.target_text == "none":
            ours = model.encode_target(None, images=images).cpu()
            diffs.append((ours - image_embeds).abs().max())
    diff = float(max(diffs))
    if not diff <= VERIFY_TOLERANCE:
        raise DataError(
            f"{folder}: transformers' embeddings from the exported folder differ from the "
            f"model's by up to {diff:.2e} (allowed {VERIFY_TOLERANCE:.0e}); the folder is left "
            "there for inspection but does not reproduce the model, so do not publish it"
        )
    return diff


@contextlib.contextmanager
def full_precision(model: CSMCIR) -> Iterator[None]:
    """The model without autocast (transformers computes the folder in fp32)."""
    config = model.config
    model.config = config.replace(precision="fp32")
    try:
        yield
    finally:
        model.config = config

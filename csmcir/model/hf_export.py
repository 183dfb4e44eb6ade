"""A trained shared-tower CSMCIR as a transformers ``Blip2ForImageTextRetrieval`` folder.

The shared-tower model is exactly that architecture (ViT, query tokens, Q-Former text
embeddings, Q-Former, both projections): its weights change names (``tower.X`` -> ``X``) and
nothing else, so transformers' own multimodal pass gives our embeddings. The ``itm_head`` CSMCIR
never reads comes back from the source checkpoint when the model carried it; otherwise it is
freshly initialised, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Blip2ForImageTextRetrieval

from csmcir.errors import ConfigError
from csmcir.model.blip2 import image_processor, write_retrieval_folder
from csmcir.model.encoder import CSMCIR, blip2_config
from csmcir.model.modes import eval_mode


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


def export_hf(model: CSMCIR, folder: str | Path) -> HFExport:
    """Write ``folder`` (new or empty): config.json, model.safetensors, tokenizer files and
    preprocessor_config.json, as the hub's ``Salesforce/blip2-itm-vit-g`` is laid out."""
    check_exportable(model)
    state = {k.removeprefix("tower."): v for k, v in model.state_dict().items()}
    folder = Path(folder)
    kept = write_retrieval_folder(
        blip2_config(model.config),
        state,
        model.tokenizer,
        image_processor(model.config.image),
        folder,
        source="the model",
    )
    report = HFExport(folder, "kept" if kept else "fresh")
    if model.config.image.mode == "target_pad":
        report.notes.append(
            f"preprocessing: the model was trained on target-padded images (ratio "
            f"{model.config.image.pad_ratio}); BlipImageProcessor only resizes, so pad "
            "elongated images the same way before it to get the same embeddings"
        )
    if model.config.target_text == "none":
        report.notes.append(
            "targets are image-only (target_text none): transformers' ITC image_embeds are "
            "this model's target embeddings"
        )
    return report


def max_difference(model: CSMCIR, folder: Path, texts: list[str], seed: int = 0) -> float:
    """Largest |difference| between our query embeddings and transformers' multimodal pass on
    the exported folder, for seeded random pixels: the export's proof."""
    blip = Blip2ForImageTextRetrieval.from_pretrained(
        str(folder), local_files_only=True, dtype=torch.float32
    ).eval()
    size = model.config.image.size
    pixels = torch.randn(len(texts), 3, size, size, generator=torch.Generator().manual_seed(seed))
    tokens = {k: v.cpu() for k, v in model.tokenize(texts).items()}
    n = blip.config.num_query_tokens
    with torch.no_grad(), eval_mode(model):
        ours = model.encode_query(texts, pixels).cpu()
        out = blip(pixels, use_image_text_matching_head=True, **tokens)
        theirs = F.normalize(
            blip.text_projection(out.text_model_output.last_hidden_state[:, n]), dim=-1
        )
    return float((ours - theirs).abs().max())

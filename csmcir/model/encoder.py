"""The CSMCIR encoder: one BLIP-2 Q-Former that embeds (image, text) pairs on both sides.

query  = E(reference image, modification text)
target = E(target image, target caption)     the same function E, the same weights

E is LAVIS's "multimodal" pass: the learned query tokens and the text tokens go through the
Q-Former together (queries cross-attend to the ViT features, text and queries attend to each
other), and the embedding is ``normalize(text_projection(h[:, n_queries]))``, the output at the
text's [CLS] position. Built from ``transformers``' ``Blip2ForImageTextRetrieval`` modules.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Blip2Config, Blip2ForImageTextRetrieval, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from csmcir.model.config import CSMCIRConfig
from csmcir.model.fingerprint import tensor_fingerprint
from csmcir.model.init import init_random_weights
from csmcir.model.tokenizer import (
    TokenMemo,
    check_vocabulary,
    clamp_ids,
    kept_texts,
    mostly_unknown,
)
from csmcir.model.transforms import ImageTransform

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def blip2_config(config: CSMCIRConfig) -> Blip2Config:
    """The transformers config of the BLIP-2 retrieval model our modules come from."""
    return Blip2Config(
        vision_config=dict(config.vision),
        qformer_config=dict(config.qformer),
        num_query_tokens=config.num_query_tokens,
        image_text_hidden_size=config.embed_dim,
    )


class QFormerTower(nn.Module):
    """One side's encoder above the ViT: query tokens, text embeddings, Q-Former, projections."""

    def __init__(self, blip: Blip2ForImageTextRetrieval) -> None:
        super().__init__()
        self.query_tokens = blip.query_tokens
        self.embeddings = blip.embeddings
        self.qformer = blip.qformer
        self.text_projection = blip.text_projection
        self.vision_projection = blip.vision_projection

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    def fused(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: torch.Tensor
    ) -> torch.Tensor:
        """[B, D] embedding of (image, text): the text's [CLS] output after the joint pass."""
        hidden = self.fused_cls(input_ids, attention_mask, vision)
        return F.normalize(self.text_projection(hidden).float(), dim=-1)

    def fused_cls(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: torch.Tensor
    ) -> torch.Tensor:
        """[B, H] the text's [CLS] output of the joint pass, before the projection."""
        n = self.num_queries
        queries = self.query_tokens.expand(vision.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        query_mask = attention_mask.new_ones(attention_mask.shape[0], n)
        hidden = self.qformer(
            query_embeds=embeds,
            # Without query_length the text tokens would be treated as queries and cross-attend
            # to the image through the query-only weights: wrong features, no error.
            query_length=n,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=vision,
        ).last_hidden_state
        return hidden[:, n]

    def image_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-1 (image-text contrastive) embeddings: ``[B, n_queries, D]`` query-token outputs
        of the image and ``[B, D]`` text-only [CLS] outputs of the text, BLIP-2's two ITC sides,
        both through ``text_projection`` (the projection the fused pass reads, so that stage 1
        trains only weights that CIR training goes on to use)."""
        queries = self.query_tokens.expand(vision.shape[0], -1, -1)
        image = self.qformer(
            query_embeds=queries, query_length=self.num_queries, encoder_hidden_states=vision
        ).last_hidden_state
        text = self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids),
            query_length=0,
            attention_mask=attention_mask,
        ).last_hidden_state[:, 0]
        project = self.text_projection
        return F.normalize(project(image).float(), dim=-1), F.normalize(
            project(text).float(), dim=-1
        )

    def unused_parameters(self, fused: bool, image_only: bool) -> list[nn.Parameter]:
        """Weights that none of the passes this tower runs will read.

        The fused pass never reads ``vision_projection``; the image-only pass never reads the
        text embeddings, the text feed-forward layers or ``text_projection``. They are frozen
        so that every trainable weight gets a gradient, which DDP requires.
        """
        unused = [] if image_only else [*self.vision_projection.parameters()]
        if not fused:
            unused += [*self.embeddings.parameters(), *self.text_projection.parameters()]
            for layer in self.qformer.encoder.layer:
                unused += [*layer.intermediate.parameters(), *layer.output.parameters()]
        return unused

    def image_only(self, vision: torch.Tensor) -> torch.Tensor:
        """[B, n_queries, D]: every query token's projected output, BLIP-2's image embedding."""
        queries = self.query_tokens.expand(vision.shape[0], -1, -1)
        hidden = self.qformer(
            query_embeds=queries, query_length=self.num_queries, encoder_hidden_states=vision
        ).last_hidden_state
        return F.normalize(self.vision_projection(hidden).float(), dim=-1)


def enable_checkpointing(module: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model. transformers 5 renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (keeping the old name
    as a deprecated alias); releases before the rename have only the old one."""
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def vision_from_inputs(
    model,
    pixel_values: torch.Tensor | None,
    vision_features: torch.Tensor | None,
    images: Sequence[Image.Image] | None,
) -> torch.Tensor:
    """The vision features of exactly one kind of input: PIL images, pixels or given features.

    Shared by every encoder with the project's model API (CSMCIR, the CLIP4Cir baseline): the
    model supplies ``preprocess``, ``vision_features`` and ``check_vision_features``.
    """
    given = [x is not None for x in (pixel_values, vision_features, images)]
    if sum(given) != 1:
        raise ValueError("give exactly one of pixel_values, vision_features or images")
    if images is not None:
        pixel_values = model.preprocess(images)
    if pixel_values is not None:
        return model.vision_features(pixel_values)
    return model.check_vision_features(vision_features)


class CSMCIR(nn.Module):
    """The encoder of queries and targets (see the module docstring and docs/model.md).

    Build it with :meth:`from_preset` (random ``tiny``, pretrained ``blip2-vitg``) or load an
    exported folder with :meth:`from_pretrained`; ``CSMCIR(config, tokenizer)`` gives random
    weights of any architecture.
    """

    model_type = "csmcir"

    @classmethod
    def skeleton(cls, config: CSMCIRConfig, tokenizer: PreTrainedTokenizerBase) -> CSMCIR:
        """A model whose weights will be loaded next: no random init (ViT-g's takes ~40 s)."""
        with no_init_weights():
            return cls(config, tokenizer)

    def __init__(
        self,
        config: CSMCIRConfig,
        tokenizer: PreTrainedTokenizerBase,
        blip: Blip2ForImageTextRetrieval | None = None,
    ) -> None:
        """Adopt the modules of ``blip`` (pretrained weights), or of a random-initialised one."""
        super().__init__()
        check_vocabulary(tokenizer, config.qformer.get("vocab_size", 30522))
        self.config = config
        self.tokenizer = tokenizer
        self.token_memo = TokenMemo(tokenizer, config.max_text_length)
        self.transform = ImageTransform(config.image)
        if blip is None:
            blip = Blip2ForImageTextRetrieval(blip2_config(config))
            init_random_weights(blip)  # scaled to the width: see csmcir/model/init.py
        self.vision_model = blip.vision_model
        if "post_layernorm_eps" in config.vision:  # LAVIS's ln_vision: 1e-5, the ViT's 1e-6
            self.vision_model.post_layernorm.eps = config.vision["post_layernorm_eps"]
        self.tower = QFormerTower(blip)
        self.target_tower = copy.deepcopy(self.tower) if config.tower == "separate" else None
        # Never read by CSMCIR; kept, frozen, for `csmcir export hf` (see config.itm_head).
        self.itm_head = blip.itm_head.requires_grad_(False) if config.itm_head else None
        image_targets = config.target_text == "none"
        if self.target_tower is None:
            unused = self.tower.unused_parameters(fused=True, image_only=image_targets)
        else:
            unused = self.tower.unused_parameters(fused=True, image_only=False)
            unused += self.target_tower.unused_parameters(
                fused=not image_targets, image_only=image_targets
            )
        for param in unused:
            param.requires_grad_(False)
        if config.freeze_vision:
            self.vision_model.requires_grad_(False)
            self.vision_model.eval()
        if config.gradient_checkpointing:
            for tower in self.towers():
                enable_checkpointing(tower.qformer)
            if not config.freeze_vision:
                enable_checkpointing(self.vision_model)
        # One mode for every module whatever built them: from_pretrained hands over
        # transformers modules in eval mode.
        self.train()

    # construction and files (csmcir.model.registry dispatches to the model kind)

    @classmethod
    def from_preset(
        cls,
        name: str,
        tokenizer_corpus: Sequence[str] | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        weights: str | Path | None = None,
        vocab_size: int = 2048,
        seed: int | None = None,
        **overrides: Any,
    ) -> CSMCIR:
        """A preset: ``tiny`` (random; tokenizer from ``tokenizer_corpus``) or ``blip2-vitg``.

        ``weights`` is the BLIP-2 folder (default ``$CSMCIR_BLIP2_DIR`` or
        ``checkpoints/blip2-itm-vit-g``); ``overrides`` change config fields, e.g.
        ``tower="separate"``, ``target_text="none"``, ``precision="bf16"``. A baseline preset
        (``clip4cir-*``) gives that model kind.
        """
        from csmcir.model.registry import from_preset

        return from_preset(
            name,
            tokenizer_corpus=tokenizer_corpus,
            tokenizer=tokenizer,
            weights=weights,
            vocab_size=vocab_size,
            seed=seed,
            overrides=overrides,
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> CSMCIR:
        """Load an exported folder (of any model kind) or a downloaded BLIP-2 folder."""
        from csmcir.model.registry import from_pretrained

        return from_pretrained(folder, overrides)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write model.safetensors, config.json and the tokenizer; the folder is swapped in."""
        from csmcir.model.folder import save_pretrained

        return save_pretrained(self, folder)

    # inputs

    @property
    def device(self) -> torch.device:
        return self.tower.query_tokens.device

    def towers(self) -> list[QFormerTower]:
        return [self.tower] if self.target_tower is None else [self.tower, self.target_tower]

    def train(self, mode: bool = True) -> CSMCIR:
        """Switch modes, but a frozen ViT stays in eval mode (no dropout, fixed features)."""
        super().train(mode)
        if self.config.freeze_vision:
            self.vision_model.eval()
        return self

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> ``[B, 3, H, W]`` normalised pixels (on the CPU; see config.image)."""
        return self.transform(images)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pad to the longest text, truncate to ``max_text_length``; on the model's device."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of str")
        ids, mask = self.token_memo(texts)
        vocab = self.config.qformer.get("vocab_size", 30522)
        ids = clamp_ids(ids, vocab, self.tokenizer.unk_token_id)
        # non-blocking: a host-to-device copy from pageable memory is staged at once, and a
        # blocking one would make the host wait for every kernel queued before it
        return {
            "input_ids": ids.to(self.device, non_blocking=True),
            "attention_mask": mask.to(self.device, non_blocking=True),
        }

    def truncated(self, texts: Sequence[str]) -> list[str | None]:
        """Per text: None when the model reads all of it, else the start it reads (texts are
        cut at ``max_text_length`` tokens), so a command can say a query was cut."""
        return kept_texts(self.tokenizer, texts, self.config.max_text_length)

    def mostly_unknown(self, texts: Sequence[str]) -> list[float | None]:
        """Per text: None when the tokenizer knows most of it, else the share it reads as [UNK]
        (see :func:`csmcir.model.tokenizer.mostly_unknown`)."""
        return mostly_unknown(self.tokenizer, texts)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES.get(self.config.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's last hidden state ``[B, P, Dv]`` in fp32: what the feature cache stores."""
        grad = torch.is_grad_enabled() and not self.config.freeze_vision
        with torch.set_grad_enabled(grad), self._autocast():
            pixels = pixel_values.to(self.device, non_blocking=True)
            out = self.vision_model(pixel_values=pixels).last_hidden_state
        return out.float()

    def _vision(
        self,
        pixel_values: torch.Tensor | None,
        vision_features: torch.Tensor | None,
        images: Sequence[Image.Image] | None,
    ) -> torch.Tensor:
        return vision_from_inputs(self, pixel_values, vision_features, images)

    def check_vision_features(self, features: torch.Tensor) -> torch.Tensor:
        """Given (cached) features must be the ViT's ``[B, patches, hidden]`` output; float16
        ones from the cache are copied to the device as they are and widened there."""
        expected = self.config.vision["hidden_size"]
        if features.dim() != 3 or features.shape[-1] != expected:
            shape = tuple(features.shape)
            raise ValueError(f"vision_features must be [B, patches, {expected}], got {shape}")
        return features.to(self.device, non_blocking=True).float()

    # the encoder

    def encode_query(
        self,
        texts: Sequence[str],
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        *,
        images: Sequence[Image.Image] | None = None,
    ) -> torch.Tensor:
        """``[B, D]`` L2-normalised embeddings of (reference image, modification text) pairs."""
        vision = self._vision(pixel_values, vision_features, images)
        return self._fused(self.tower, texts, vision)

    def encode_target(
        self,
        texts: Sequence[str] | None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        *,
        images: Sequence[Image.Image] | None = None,
    ) -> torch.Tensor:
        """Target embeddings: ``[B, D]`` from (image, caption), or ``[B, n_queries, D]``.

        With ``config.target_text == "none"`` the target is the image alone (the texts are not
        read) and keeps one embedding per query token, scored by :meth:`similarity`.
        """
        vision = self._vision(pixel_values, vision_features, images)
        tower = self.target_tower or self.tower
        if self.config.target_text == "none":
            with self._autocast():
                return tower.image_only(vision)
        if texts is None:
            raise ValueError("this model reads target captions (target_text='caption'): pass texts")
        return self._fused(tower, texts, vision)

    def image_text_similarity(
        self,
        texts: Sequence[str],
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, B]`` stage-1 similarities of images (rows) to texts (columns): each pair's
        best-matching query token, as BLIP-2's image-text contrastive loss scores them."""
        vision = self._vision(pixel_values, vision_features, None)
        tokens = self.tokenize(texts)
        with self._autocast():
            image, text = self.tower.image_text(
                tokens["input_ids"], tokens["attention_mask"], vision
            )
        return torch.einsum("iqd,jd->ijq", image, text).amax(dim=-1)

    def matching_features(
        self,
        texts: Sequence[str],
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, H]`` the query tower's joint-pass [CLS] outputs of (image, text) pairs, before
        the projection: what stage 1's image-text matching head reads. It is the position the
        CIR embedding reads, so matching trains the pass that CIR fine-tuning starts from."""
        vision = self._vision(pixel_values, vision_features, None)
        return self._fused(self.tower, texts, vision, QFormerTower.fused_cls)

    def _fused(
        self,
        tower: QFormerTower,
        texts: Sequence[str],
        vision: torch.Tensor,
        output: Callable[..., torch.Tensor] = QFormerTower.fused,
    ) -> torch.Tensor:
        tokens = self.tokenize(texts)
        if tokens["input_ids"].shape[0] != vision.shape[0]:
            raise ValueError(f"{len(texts)} texts for {vision.shape[0]} images")
        with self._autocast():
            return output(tower, tokens["input_ids"], tokens["attention_mask"], vision)

    @staticmethod
    def similarity(queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[Nq, Nt]`` cosine scores; for ``[Nt, n_queries, D]`` targets, the best query token."""
        if targets.dim() == 3:
            return torch.einsum("qd,tkd->qtk", queries, targets).amax(dim=-1)
        return queries @ targets.T

    # identity

    def fingerprint(self) -> str:
        """Hash of config, tokenizer vocabulary and all weights: keys caches and indexes."""
        meta = {"config": self.config.to_dict(), "vocab": self.tokenizer.get_vocab()}
        return tensor_fingerprint("csmcir", meta, self.state_dict().items())

    def vision_fingerprint(self) -> str:
        """Hash of what determines :meth:`vision_features`: ViT config + weights + preprocessing.

        The feature cache is keyed by this, not by :meth:`fingerprint`, so training the
        Q-Former does not invalidate features of a frozen ViT.
        """
        meta = {"vision": self.config.vision, "image": self.config.to_dict()["image"]}
        return tensor_fingerprint("vision", meta, self.vision_model.state_dict().items())

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

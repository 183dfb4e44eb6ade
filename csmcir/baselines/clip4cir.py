"""The CLIP4Cir-style baseline: an open_clip image/text encoder pair and a combiner network.

query  = Combiner(CLIP_image(reference), CLIP_text(modification text))
target = normalize(CLIP_image(target))                 image only: captions are never read

It has the encoder API of :class:`csmcir.model.CSMCIR` (``preprocess``, ``encode_query``,
``encode_target``, ``similarity``, ``fingerprint``, ``save_pretrained`` / ``from_pretrained``,
``config.target_text == "none"``), so the training module, ``csmcir eval`` and the index use it
unchanged. ``CSMCIR.from_preset("clip4cir-tiny")`` and ``CSMCIR.from_pretrained(folder)`` of
an exported baseline return this class (see ``csmcir.model.registry``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from csmcir.baselines.combiner import Combiner
from csmcir.baselines.config import MODEL_TYPE, CLIP4CirConfig
from csmcir.baselines.text import TextTokenizer
from csmcir.errors import ConfigError
from csmcir.model.encoder import vision_from_inputs
from csmcir.model.fingerprint import tensor_fingerprint
from csmcir.model.transforms import ImageTransform

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CLIP's contrastive scale and bias: the trainer has its own temperature, so they stay fixed.
UNUSED_CLIP_PARAMETERS = ("logit_scale", "logit_bias")


def build_clip(clip_config: dict[str, Any]) -> nn.Module:
    """A random-initialised open_clip model of a model config (the class create_model picks)."""
    kwargs = copy.deepcopy(clip_config)
    model_class = open_clip.CustomTextCLIP if kwargs.pop("custom_text", False) else open_clip.CLIP
    try:
        return model_class(**kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(
            f"baseline config: clip is not a valid open_clip model config: {e}"
        ) from None


class CLIP4Cir(nn.Module):
    """CLIP4Cir-style composed-image-retrieval baseline (see the module docstring).

    Build it with :meth:`from_preset` (``clip4cir-tiny``: random; ``clip4cir-openclip``: a local
    OpenCLIP checkpoint) or load an exported folder with :meth:`from_pretrained`;
    ``CLIP4Cir(config, tokenizer)`` gives random weights of any architecture.
    """

    model_type = MODEL_TYPE

    def __init__(
        self, config: CLIP4CirConfig, tokenizer: TextTokenizer, clip: nn.Module | None = None
    ) -> None:
        """Adopt ``clip`` (pretrained weights), or a random-initialised one of ``config.clip``."""
        super().__init__()
        vocab = config.clip["text_cfg"].get("vocab_size", 49408)
        if len(tokenizer) > vocab:
            raise ConfigError(
                f"tokenizer has {len(tokenizer)} tokens but CLIP's text vocab_size is {vocab}"
            )
        if tokenizer.kind != config.tokenizer:
            raise ConfigError(
                f"the config wants a {config.tokenizer} tokenizer, got a {tokenizer.kind} one"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.transform = ImageTransform(config.image)
        self.clip = clip if clip is not None else build_clip(config.clip)
        self.combiner = Combiner(
            config.embed_dim, config.projection_dim, config.hidden_dim, config.dropout
        )
        for name, param in self.clip.named_parameters():
            if name in UNUSED_CLIP_PARAMETERS:
                param.requires_grad_(False)
            elif name.startswith("visual."):
                param.requires_grad_(config.train_image_encoder)
            else:
                param.requires_grad_(config.train_text_encoder)
        self.train(self.training)

    # construction and files (implemented in csmcir.baselines.loading, found by the registry)

    @classmethod
    def from_preset(
        cls,
        name: str,
        tokenizer_corpus: Sequence[str] | None = None,
        *,
        tokenizer: Any = None,
        weights: str | Path | None = None,
        vocab_size: int = 2048,
        seed: int | None = None,
        **overrides: Any,
    ) -> CLIP4Cir:
        """``clip4cir-tiny`` (random; tokenizer from ``tokenizer_corpus``) or ``clip4cir-openclip``.

        ``weights`` is the OpenCLIP checkpoint: a folder holding ``open_clip_config.json`` and
        the weights (a Hugging Face download of an open_clip model), or a ``.safetensors`` /
        ``.bin`` / ``.pt`` file of the built-in architecture ``clip_model`` (default
        ``$CSMCIR_OPENCLIP_WEIGHTS`` or ``checkpoints/openclip-vit-b-32``). ``overrides`` change
        config fields, e.g. ``train_text_encoder=True``, ``clip_model="ViT-B-16"``.
        """
        from csmcir.model.registry import kind

        baseline = kind(MODEL_TYPE)
        return baseline.from_preset(
            baseline.load_preset(name),
            tokenizer_corpus=tokenizer_corpus,
            tokenizer=tokenizer,
            weights=weights,
            vocab_size=vocab_size,
            seed=seed,
            overrides=overrides,
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> CLIP4Cir:
        """Load an exported baseline folder (model.safetensors, config.json, tokenizer file)."""
        from csmcir.model.registry import kind

        return kind(MODEL_TYPE).from_pretrained(Path(folder), overrides)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write model.safetensors, config.json and the tokenizer; the folder is swapped in."""
        from csmcir.model.folder import save_pretrained

        return save_pretrained(self, folder)

    # inputs

    @property
    def device(self) -> torch.device:
        return self.combiner.fusion[-1].weight.device

    def train(self, mode: bool = True) -> CLIP4Cir:
        """Switch modes, but frozen CLIP towers stay in eval mode (fixed features)."""
        super().train(mode)
        for name, child in self.clip.named_children():
            trainable = (
                self.config.train_image_encoder
                if name == "visual"
                else self.config.train_text_encoder
            )
            if not trainable:
                child.eval()
        return self

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> ``[B, 3, H, W]`` normalised pixels (on the CPU; see config.image)."""
        return self.transform(images)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``[B, context_length]`` token ids on the model's device (CLIP's fixed length)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of str")
        return self.tokenizer.encode(texts, self.config.context_length).to(self.device)

    def truncated(self, texts: Sequence[str]) -> list[str | None]:
        """Per text: None when the model reads all of it, else the start it reads (texts are
        cut at ``context_length`` tokens), so a command can say a query was cut."""
        return self.tokenizer.kept_texts(texts, self.config.context_length)

    def mostly_unknown(self, texts: Sequence[str]) -> list[float | None]:
        """Per text: None when the tokenizer knows most of it, else the share it reads as
        unknown (CLIP's byte-level BPE knows every text)."""
        return self.tokenizer.mostly_unknown(texts)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES.get(self.config.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's projected image embedding ``[B, 1, D]`` in fp32, before normalisation.

        CLIP4Cir keeps only the pooled embedding, so that is what a cache of a frozen image
        encoder would hold; ``encode_query`` / ``encode_target`` accept it back.
        """
        grad = torch.is_grad_enabled() and self.config.train_image_encoder
        with torch.set_grad_enabled(grad), self._autocast():
            out = self.clip.encode_image(pixel_values.to(self.device))
        return out.float().unsqueeze(1)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP's projected text embedding ``[B, D]`` in fp32, before normalisation."""
        tokens = self.tokenize(texts)
        grad = torch.is_grad_enabled() and self.config.train_text_encoder
        with torch.set_grad_enabled(grad), self._autocast():
            out = self.clip.encode_text(tokens)
        return out.float()

    def _image(
        self,
        pixel_values: torch.Tensor | None,
        vision_features: torch.Tensor | None,
        images: Sequence[Image.Image] | None,
    ) -> torch.Tensor:
        """``[B, D]`` L2-normalised CLIP image features from exactly one kind of input."""
        features = vision_from_inputs(self, pixel_values, vision_features, images)
        return F.normalize(features[:, 0].to(self.device, torch.float32), dim=-1)

    def check_vision_features(self, features: torch.Tensor) -> torch.Tensor:
        """Given (cached) features must be CLIP's pooled ``[B, 1, D]`` image embedding."""
        expected = (1, self.config.embed_dim)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            shape = tuple(features.shape)
            raise ValueError(f"vision_features must be [B, 1, {expected[1]}], got {shape}")
        return features

    def _combine(
        self, texts: Sequence[str], image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = F.normalize(self.text_features(texts), dim=-1)
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"{text.shape[0]} texts for {image.shape[0]} images")
        with self._autocast():
            return self.combiner(image, text)

    # the encoder

    def encode_query(
        self,
        texts: Sequence[str],
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        *,
        images: Sequence[Image.Image] | None = None,
    ) -> torch.Tensor:
        """``[B, D]`` L2-normalised combiner outputs of (reference image, modification text)."""
        query, _ = self._combine(texts, self._image(pixel_values, vision_features, images))
        return query

    def encode_target(
        self,
        texts: Sequence[str] | None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        *,
        images: Sequence[Image.Image] | None = None,
    ) -> torch.Tensor:
        """``[B, D]`` L2-normalised CLIP image features; ``texts`` are not read (image-only)."""
        return self._image(pixel_values, vision_features, images)

    def image_text_similarity(
        self,
        texts: Sequence[str],
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, B]`` cosine similarities of images (rows) to texts (columns): CLIP's own
        contrastive pretraining, the baseline's stage 1 (``--model.objective image_text``)."""
        image = self._image(pixel_values, vision_features, None)
        text = F.normalize(self.text_features(texts), dim=-1)
        return image @ text.T

    def mixing_weights(
        self,
        texts: Sequence[str],
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        *,
        images: Sequence[Image.Image] | None = None,
    ) -> torch.Tensor:
        """``[B]`` the combiner's lambda per query: its weight on the text's feature, in (0, 1)."""
        _, weight = self._combine(texts, self._image(pixel_values, vision_features, images))
        return weight.float()

    @staticmethod
    def similarity(queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[Nq, Nt]`` cosine scores of normalised queries and targets."""
        return queries @ targets.T

    # identity

    def fingerprint(self) -> str:
        """Hash of config, tokenizer and all weights: keys caches and indexes."""
        meta = {"config": self.config.to_dict(), "vocab": self.tokenizer.identity()}
        return tensor_fingerprint(MODEL_TYPE, meta, self.state_dict().items())

    def vision_fingerprint(self) -> str:
        """Refuse the frozen-ViT feature cache, whose shards are laid out for BLIP-2's patch tokens.

        The cache calls this first when it is opened or filled, so a baseline given
        ``--features`` / ``--data.features`` stops with this message instead of mixing layouts.
        """
        raise ConfigError(
            "the CLIP4Cir baseline does not read the frozen-ViT feature cache (it stores BLIP-2 "
            "patch features): drop --features / --data.features"
        )

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

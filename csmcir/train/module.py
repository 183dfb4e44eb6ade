"""The LightningModule: one shared encoder trained with InfoNCE on (query, target) pairs.

Each query is scored against its own target and every other target of the batch (all ranks'
under DDP, gathered with gradients), with a learnt, clamped temperature. Validation encodes each
split's gallery targets, then its queries, and reports the benchmark's recalls.

The model is built in :meth:`setup`, not in ``__init__``: the tiny preset's tokenizer is trained
on the DataModule's texts, which exist only once the data is read. A checkpoint carries the model
config and tokenizer files, so it rebuilds the exact model without the data.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal, Protocol

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from csmcir.errors import ConfigError
from csmcir.model.modes import eval_mode
from csmcir.train.datasets import GALLERY, QUERY, first_clauses
from csmcir.train.export import CHECKPOINT_KEY, checkpoint_entry, model_from_entry, tokenizer_files
from csmcir.train.loss import (
    Temperature,
    hard_negatives,
    info_nce,
    matching_loss,
    prediction_entropy,
    target_to_query,
)
from csmcir.train.memory_bank import MemoryBank, MemoryBankConfig
from csmcir.train.schedule import warmup_cosine_scheduler
from csmcir.train.validation import summarise

Objective = Literal["cir", "image_text"]


class NegativeSource(Protocol):
    """What the LightningModule asks of a memory bank once per training step.

    ``extra_negatives`` gets this rank's L2-normalised queries and targets ``[B, D]``, the
    in-batch logits ``[B, N]`` (similarity / temperature), the integer image keys of the
    targets and references, the global step and the temperature. It returns keyword arguments
    of :func:`~csmcir.train.loss.info_nce` (``extra_logits``, ``extra_bias``, ``extra_mask``),
    optionally with ``stats``, a dict of scalars to log; it may store the targets for later.
    """

    def extra_negatives(
        self,
        *,
        queries: Tensor,
        targets: Tensor,
        in_batch_logits: Tensor,
        target_keys: Tensor,
        reference_keys: Tensor,
        step: int,
        temperature: Tensor,
    ) -> dict[str, Any]: ...


def refuse_unread(init_from: Path | None, **given: Any) -> None:
    """No option is dropped: weights are refused for a preset that reads none, and with
    ``--model.init_from`` (which starts from that folder's model and config) the options only
    a preset reads are refused when set away from their defaults. ``preset`` is checked against
    the folder's model once it is loaded (:func:`check_init_preset`): the packaged fit configs
    name one, and starting from a model of that preset is what they mean."""
    from csmcir.model.registry import load_preset, refuse_unread_weights

    if init_from is None:
        refuse_unread_weights(load_preset(given["preset"]), given["weights"])
        return
    defaults = inspect.signature(CSMCIRModule.__init__).parameters
    unread = [
        f"--model.{k} {v}" for k, v in given.items() if k != "preset" and v != defaults[k].default
    ]
    if unread:
        raise ConfigError(
            f"--model.init_from {init_from} starts from that model as it is, so "
            f"{', '.join(unread)} would be ignored: they are read only when a model is built "
            "from --model.preset (e.g. blip2-vitg with --model.weights). Give one or the other"
        )


def check_init_preset(init_from: Path | str, model: Any, preset: str) -> None:
    """A ``--model.preset`` other than the default must be the preset of the ``init_from``
    model: otherwise the run would silently train another model than the one named."""
    default = inspect.signature(CSMCIRModule.__init__).parameters["preset"].default
    own = getattr(model.config, "preset", None)
    if preset != default and own is not None and own != preset:
        raise ConfigError(
            f"--model.init_from {init_from} holds a {own!r} model, but --model.preset is "
            f"{preset!r}, which it would ignore: set --model.preset {own} (or leave it out), or "
            "start from a model of that preset"
        )


class CSMCIRModule(L.LightningModule):
    """Training and validation of a :class:`~csmcir.model.CSMCIR` encoder.

    Args:
        preset: model preset to start from (``tiny``: random weights, tokenizer built from the
            training texts; ``blip2-vitg``: BLIP-2 stage-1 weights from ``weights``).
        init_from: an exported model folder (or a BLIP-2 download) to start from instead.
        weights: folder of the preset's pretrained weights (default: the preset's own rule).
        model_options: model config overrides, e.g. ``{"tower": "separate"}``,
            ``{"target_text": "none"}``, ``{"precision": "bf16"}``.
        vocab_size: WordPiece vocabulary size of a tokenizer built from the corpus.
        lr: peak AdamW learning rate (reached after ``warmup_steps``, then cosine decay).
        weight_decay: AdamW weight decay of matrices (biases, norms, the temperature: none).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio`` at ``max_steps``.
        temperature: initial softmax temperature.
        learn_temperature: learn it (clamped to ``temperature_range``) or keep it fixed.
        temperature_range: (min, max) of the learnt temperature.
        mask_duplicate_targets: do not count another copy of a query's target image in the
            batch as a negative.
        symmetric_loss: add the target-to-query direction of the in-batch InfoNCE (each
            target picks its query among the batch's, as BLIP-2's and CLIP's contrastive losses
            do both ways); the loss is the mean of the two directions. Under
            ``data.group_by_reference`` a target's hardest wrong query is its sibling, the same
            reference under another text.
        bank: the memory bank of hard negatives (docs/memory_bank.md); off unless
            ``enabled: true``.
        objective: ``cir`` (queries against targets) or ``image_text``: a stage-1 run that
            trains an image-text contrastive loss on the batch's target images and their
            captions alone (no modification text, no reference image): BLIP-2's for CSMCIR,
            CLIP's for the CLIP4Cir baseline. A CIR run starts from its exported model with
            ``init_from`` (docs/training.md).
        image_text_matching: with ``objective: image_text``, add BLIP-2's image-text matching
            loss: a match / no-match head on the joint pass of each image with its caption and
            with a hard negative caption, and of each caption with a hard negative image (drawn
            by contrastive similarity). The contrastive loss trains only the image-only and
            text-only passes; this trains the joint pass, the one CSMCIR's embeddings read. The
            head is stage 1's own and is not exported. Models with a joint pass only (CSMCIR).
        contrastive_clauses: with ``objective: image_text``, the contrastive loss reads each
            caption's first this many clauses (:func:`~csmcir.train.datasets.first_clauses`)
            and the matching loss reads it whole (0: both whole). The contrastive loss then
            aligns each image with one object, and the joint pass, the one CIR fine-tuning
            reads, still sees the whole captions the targets are encoded with
            (docs/training.md).
    """

    def __init__(
        self,
        preset: str = "tiny",
        init_from: Path | None = None,
        weights: Path | None = None,
        model_options: dict[str, Any] | None = None,
        vocab_size: int = 2048,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        temperature_range: tuple[float, float] = (0.01, 0.5),
        mask_duplicate_targets: bool = True,
        symmetric_loss: bool = False,
        bank: MemoryBankConfig | None = None,
        objective: Objective = "cir",
        image_text_matching: bool = False,
        contrastive_clauses: int = 0,
    ) -> None:
        super().__init__()
        if objective not in ("cir", "image_text"):
            raise ConfigError(f"--model.objective must be cir or image_text, got {objective!r}")
        for name, given in (
            ("image_text_matching", image_text_matching),
            ("contrastive_clauses", contrastive_clauses),
        ):
            if given and objective != "image_text":
                raise ConfigError(
                    f"--model.{name} is a stage-1 option: set --model.objective image_text"
                )
        if contrastive_clauses < 0:
            raise ConfigError(
                f"--model.contrastive_clauses must be 0 (whole captions) or more, "
                f"got {contrastive_clauses}"
            )
        if lr <= 0:
            raise ConfigError(f"--model.lr must be positive, got {lr}")
        if warmup_steps < 0:
            raise ConfigError(f"--model.warmup_steps must be 0 or more, got {warmup_steps}")
        refuse_unread(init_from, preset=preset, weights=weights, vocab_size=vocab_size)
        low, high = temperature_range
        if not 0 < low <= temperature <= high:
            raise ConfigError(
                f"--model.temperature {temperature} must lie in --model.temperature_range "
                f"[{low}, {high}] with a positive minimum"
            )
        self.save_hyperparameters(
            {
                "preset": preset,
                "init_from": None if init_from is None else str(init_from),
                "weights": None if weights is None else str(weights),
                "model_options": model_options,
                "vocab_size": vocab_size,
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": list(betas),
                "warmup_steps": warmup_steps,
                "min_lr_ratio": min_lr_ratio,
                "temperature": temperature,
                "learn_temperature": learn_temperature,
                "temperature_range": list(temperature_range),
                # a dict, not the dataclass: checkpoints load with weights_only=True
                "bank": dataclasses.asdict(bank) if isinstance(bank, MemoryBankConfig) else bank,
                "mask_duplicate_targets": mask_duplicate_targets,
                "symmetric_loss": symmetric_loss,
                "objective": objective,
                "image_text_matching": image_text_matching,
                "contrastive_clauses": contrastive_clauses,
            }
        )
        self.model = None  # built in setup() or from a checkpoint
        self.temperature = Temperature(temperature, low, high, learn=learn_temperature)
        # The memory bank plugs in here (see NegativeSource): each training step asks it for
        # extra negatives of this batch's queries and hands it this batch's targets.
        self.memory_bank: NegativeSource | None = None
        self.matching_head: torch.nn.Linear | None = None  # built with the model (its width)
        self.bank_config = MemoryBankConfig(**bank) if isinstance(bank, dict) else bank
        self._probe: tuple[list[str], dict[str, Tensor]] | None = None
        self._val_outputs: dict[int, dict[int, list[tuple[Tensor, Tensor]]]] = {}
        self._rng_to_restore: dict[str, Any] | None = None

    # -- building the model ---------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = self._datamodule()
        stage_one = self.hparams.get("objective") == "image_text"  # reads captions, any model
        if self.model is None:
            if stage_one or self._expected_target_text() == "caption":
                datamodule.require_captions()  # before the (possibly slow) model build
            self.model = self._build_model(datamodule)
        self._build_bank()
        self._build_matching_head()
        datamodule.attach(self.model, target_captions=stage_one)
        if stage == "fit":
            self._check_precision()
            datamodule.say_cut_texts(modification_texts=not stage_one)

    def _check_precision(self) -> None:
        """The model's ``precision`` is its own autocast (the same in training, validation,
        eval and export), on float32 weights. Lightning's ``*-true`` precisions would cast the
        weights themselves, and fp16 autocast needs the loss scaling only Lightning's
        ``16-mixed`` brings (a gradient under 6e-8 is zero in fp16)."""
        lightning = str(self.trainer.precision)
        if lightning.endswith("-true") and lightning not in ("32-true", "64-true"):
            raise ConfigError(
                f"--trainer.precision {lightning} casts the weights; keep float32 weights and set "
                "the autocast with --model.model_options '{precision: bf16}'"
            )
        if self.model.config.precision == "fp16" and lightning != "16-mixed":
            raise ConfigError(
                "model precision fp16 trains without loss scaling; use precision bf16, or model "
                "precision fp32 with --trainer.precision 16-mixed (autocast + gradient scaler)"
            )

    def _datamodule(self):
        from csmcir.train.datamodule import CIRDataModule

        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, CIRDataModule):
            raise ConfigError("CSMCIRModule trains with a csmcir.train.datamodule.CIRDataModule")
        return datamodule

    def _expected_target_text(self) -> str | None:
        """What the model will read on the target side, when known before building it."""
        from csmcir.model.registry import load_preset

        hp = self.hparams
        options = hp.model_options or {}
        if "target_text" in options:
            return options["target_text"]
        return None if hp.init_from is not None else load_preset(hp.preset).config.target_text

    def _build_bank(self) -> None:
        """The memory bank, when enabled; DDP does not broadcast its buffers, because every rank
        writes the same all-gathered batches and so holds the same bank already."""
        if self.memory_bank is not None or not (self.bank_config and self.bank_config.enabled):
            return
        self.memory_bank = MemoryBank.for_model(self.bank_config, self.model)
        self._ddp_params_and_buffers_to_ignore = [
            f"memory_bank.{name}" for name, _ in self.memory_bank.named_buffers()
        ]

    def _build_matching_head(self) -> None:
        if self.matching_head is not None or not self.hparams.get("image_text_matching"):
            return
        if not hasattr(self.model, "matching_features"):
            raise ConfigError(
                f"--model.image_text_matching needs a model with a joint image-text pass; a "
                f"{type(self.model).__name__} has none"
            )
        width = self.model.config.qformer["hidden_size"]
        self.matching_head = torch.nn.Linear(width, 2).to(self.model.device)

    def _build_model(self, datamodule):
        from csmcir.hub import MODEL, resolve
        from csmcir.model import CSMCIR
        from csmcir.model.registry import load_preset
        from csmcir.model.run_folder import model_folder

        hp = self.hparams
        options = dict(hp.model_options or {})
        if hp.init_from is not None:
            given = resolve(hp.init_from, MODEL, "--model.init_from")
            folder = model_folder(given, "--model.init_from")
            model = CSMCIR.from_pretrained(folder, **options)
            check_init_preset(hp.init_from, model, hp.preset)
            return model
        preset = load_preset(hp.preset)
        corpus = datamodule.text_corpus() if preset.tokenizer == "wordpiece" else None
        return CSMCIR.from_preset(
            hp.preset,
            tokenizer_corpus=corpus,
            weights=hp.weights,
            vocab_size=hp.vocab_size,
            seed=torch.initial_seed() % (1 << 63),
            **options,
        )

    # -- training -------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        model, image = self.model, self._datamodule().model_input
        if self.hparams.get("objective") == "image_text":
            return self._image_text_step(batch, image)
        queries = model.encode_query(batch["text"], **self._references(batch, image))
        targets = model.encode_target(batch["target_caption"], **{image: batch["target_image"]})
        all_targets, all_keys, offset = self._gather_targets(targets, batch["target_key"])
        similarities = model.similarity(queries, all_targets)
        labels = offset + torch.arange(queries.shape[0], device=queries.device)
        ignore = None
        if self.hparams.mask_duplicate_targets:
            ignore = all_keys[None, :] == batch["target_key"][:, None]
        tau = self.temperature()
        extra = self._bank_negatives(queries, targets, similarities / tau, batch, tau)
        loss = info_nce(similarities, tau, labels, ignore_mask=ignore, **extra)
        batch_size = queries.shape[0]
        if self.hparams.get("symmetric_loss"):
            reverse = target_to_query(similarities, tau, offset, ignore)
            self.log("train/target_to_query_loss", reverse, batch_size=batch_size)
            loss = (loss + reverse) / 2
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/temperature", tau.detach(), batch_size=batch_size)
        self.log("train/entropy", prediction_entropy(similarities, tau), batch_size=batch_size)
        self.log("train/candidates", float(similarities.shape[1]), batch_size=batch_size)
        return loss

    def _image_text_step(self, batch: dict[str, Any], image: str) -> Tensor:
        """Stage 1: symmetric image-text InfoNCE over the batch's target images and captions
        (their first ``contrastive_clauses`` clauses, if set), plus image-text matching on the
        whole captions when asked. A target that occurs twice in the batch is not its own
        copy's negative."""
        texts, inputs = batch["target_caption"], {image: batch["target_image"]}
        if self.matching_head is not None and image == "pixel_values":
            inputs = {"vision_features": self.model.vision_features(inputs[image])}  # once
        clauses = self.hparams.get("contrastive_clauses", 0)
        contrastive = [first_clauses(t, clauses) for t in texts] if clauses else texts
        similarities = self.model.image_text_similarity(contrastive, **inputs)
        keys = batch["target_key"]
        ignore = keys[None, :] == keys[:, None]
        tau = self.temperature()
        loss = (
            info_nce(similarities, tau, ignore_mask=ignore)
            + info_nce(similarities.T, tau, ignore_mask=ignore)
        ) / 2
        batch_size = similarities.shape[0]
        self.log("train/image_text_loss", loss, batch_size=batch_size)
        self.log("train/temperature", tau.detach(), batch_size=batch_size)
        if self.matching_head is not None:
            matching = self._matching_loss(texts, inputs["vision_features"], similarities / tau)
            self.log("train/matching_loss", matching, batch_size=batch_size)
            loss = loss + matching
        return loss

    def _matching_loss(self, texts: list[str], vision: Tensor, logits: Tensor) -> Tensor:
        """BLIP-2's ITM: the batch's pairs, each image with a hard negative caption and each
        caption with a hard negative image. A caption another image shares is no negative."""
        same = torch.tensor([[a == b for b in texts] for a in texts], device=logits.device)
        image_rows, negative_texts = hard_negatives(logits, same)
        text_rows, negative_images = hard_negatives(logits.T, same)
        images = torch.cat(
            [torch.arange(len(texts), device=vision.device), image_rows, negative_images]
        )
        paired = [
            *texts,
            *(texts[i] for i in negative_texts.tolist()),
            *(texts[i] for i in text_rows.tolist()),
        ]
        features = self.model.matching_features(paired, vision_features=vision[images])
        return matching_loss(self.matching_head(features.float()), len(texts))

    def _references(self, batch: dict[str, Any], image: str) -> dict[str, Tensor]:
        """The query side's image input. From pixels the ViT runs once per distinct reference:
        a reference's queries share a batch under ``data.group_by_reference`` (CIRR, with up
        to nine queries per reference, repeats them too), which made the step 16% faster."""
        pixels = batch["reference_image"]
        if image != "pixel_values":
            return {image: pixels}
        keys, inverse = torch.unique(batch["reference_key"], return_inverse=True)
        if len(keys) == len(inverse):
            return {image: pixels}
        rows = torch.arange(len(inverse), device=inverse.device)
        first = torch.full_like(keys, len(inverse)).scatter_reduce(0, inverse, rows, "amin")
        return {"vision_features": self.model.vision_features(pixels[first])[inverse]}

    def _gather_targets(self, targets: Tensor, keys: Tensor) -> tuple[Tensor, Tensor, int]:
        """Every rank's targets (with gradients) and image keys; this rank's offset in them."""
        if self.trainer.world_size == 1:
            return targets, keys, 0
        gathered = self.all_gather(targets, sync_grads=True).flatten(0, 1)
        all_keys = self.all_gather(keys).flatten(0, 1)
        return gathered, all_keys, self.trainer.global_rank * targets.shape[0]

    def _bank_negatives(
        self, queries: Tensor, targets: Tensor, in_batch_logits: Tensor, batch: dict, tau: Tensor
    ) -> dict[str, Tensor]:
        """Extra negatives for :func:`info_nce` from the memory bank, if one is configured."""
        if self.memory_bank is None:
            return {}
        extra = self.memory_bank.extra_negatives(
            queries=queries,
            targets=targets,
            in_batch_logits=in_batch_logits,
            target_keys=batch["target_key"],
            reference_keys=batch["reference_key"],
            step=self.global_step,
            temperature=tau,
        )
        self.log_dict(extra.pop("stats", {}), batch_size=queries.shape[0])
        if isinstance(self.memory_bank, MemoryBank):
            self._log_probe_drift(batch)
        return extra

    def _log_probe_drift(self, batch: dict[str, Any]) -> None:
        """Every ``probe_every`` steps, re-encode the first batch's first targets (no gradient,
        eval mode): their drift is the bank's early warning of a runaway encoder."""
        config = self.memory_bank.config
        if not config.probe_every or self.global_step % config.probe_every:
            return
        if self._probe is None:
            n = config.probe_size
            image = self._datamodule().model_input
            self._probe = (
                list(batch["target_caption"][:n]),
                {image: batch["target_image"][:n].detach().clone()},
            )
        texts, inputs = self._probe
        with eval_mode(self.model), torch.no_grad():
            embeddings = self.model.encode_target(texts, **inputs)
        drift = self.memory_bank.probe_drift(embeddings)
        if drift is not None:
            self.log("bank/drift", drift, batch_size=len(texts))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.temperature.clamp_()

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        # Lightning's mixed-precision plugins clip gradients only for optimizers that leave
        # unscaling to it, which a fused one does not
        trainer = self.trainer
        clips = bool(trainer.gradient_clip_val) and isinstance(
            trainer.precision_plugin, MixedPrecision
        )
        optimizer = adamw(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            fused=not clips,
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = self.trainer.estimated_stepping_batches
        if not np.isfinite(total) or total < 1:
            raise ConfigError("set --trainer.max_steps (the schedule is laid out in steps)")
        scheduler = warmup_cosine_scheduler(
            optimizer, min(hp.warmup_steps, int(total)), int(total), hp.min_lr_ratio
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- validation -----------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = defaultdict(lambda: {GALLERY: [], QUERY: []})

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        model, image = self.model, self._datamodule().model_input
        kinds, positions = batch["kind"], batch["position"]
        for kind in (GALLERY, QUERY):
            rows = (kinds == kind).nonzero().flatten()
            if len(rows) == 0:
                continue
            images = {image: batch["image"][rows]}
            texts = [batch["text"][i] for i in rows.tolist()]
            if kind == GALLERY:
                captions = None if texts[0] is None else texts
                embeddings = model.encode_target(captions, **images)
            else:
                embeddings = model.encode_query(texts, **images)
            self._val_outputs[dataloader_idx][kind].append((positions[rows].cpu(), embeddings))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return  # a few batches only: the gallery is incomplete
        from csmcir.evaluation.protocols import compute, prepare

        datamodule = self._datamodule()
        per_split: dict[str, dict[str, float]] = {}
        for index, (name, split) in enumerate(datamodule.val_splits()):
            outputs = self._val_outputs.get(index)
            gallery = _ordered(outputs[GALLERY] if outputs else [], len(split.gallery))
            queries = _ordered(outputs[QUERY] if outputs else [], len(split.queries))
            if gallery is None or queries is None:
                raise ConfigError(
                    f"validation of {name} saw part of its gallery or queries; recall needs "
                    "all of them: leave --trainer.limit_val_batches at 1.0"
                )
            scores = self.model.similarity(queries, gallery).float().cpu()
            per_split[name] = compute(scores, prepare(split))
        self._val_outputs = {}
        self.log_dict(summarise(datamodule.benchmark, per_split), sync_dist=True)

    # -- checkpoints ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what rebuilds the model without the data, and the RNG states of this step."""
        checkpoint[CHECKPOINT_KEY] = {**checkpoint_entry(self.model), "rng": _rng_states()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(CHECKPOINT_KEY)
        if stored is None:
            raise ConfigError("this checkpoint was not written by csmcir fit (no model config)")
        if (
            self.model is None
            or self.model.config.to_dict() != stored["model_config"]
            or tokenizer_files(self.model.tokenizer) != stored["tokenizer_files"]
        ):
            self.model = model_from_entry(stored)
            if self._trainer is not None and self.trainer.datamodule is not None:
                self.setup("fit")
        self._rng_to_restore = stored["rng"]

    def on_train_start(self) -> None:
        # Lightning does not put the module in train mode, and a model loaded with
        # transformers' from_pretrained arrives in eval mode. CSMCIR.train keeps a frozen ViT in
        # eval mode; validation restores whatever modes it found.
        self.train()
        if self._rng_to_restore is not None:
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def adamw(groups: list[dict[str, Any]], fused: bool = True, **options: Any) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where allowed and the parameters' device has one (CUDA;
    CPU since torch 2.4), else the multi-tensor one. The fused step is one kernel over all
    parameters instead of a dozen per tensor: 4.5x faster than the per-tensor loop for the
    BLIP-2 Q-Former on a CPU (docs/training.md); its updates agree with it to float32 rounding."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = {p.device.type for group in groups for p in group["params"]}
    if fused and devices <= set(_get_fused_kernels_supported_devices()):
        return torch.optim.AdamW(groups, fused=True, **options)
    return torch.optim.AdamW(groups, foreach=True, **options)


def _rng_states() -> dict[str, Any]:
    """torch, numpy and Python RNG states in forms ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _ordered(parts: list[tuple[Tensor, Tensor]], expected: int) -> Tensor | None:
    """Embeddings in position order, or None unless every position 0..expected-1 came once."""
    if not parts:
        return None if expected else torch.empty(0)
    positions = torch.cat([p for p, _ in parts])
    embeddings = torch.cat([e for _, e in parts])
    if len(positions) != expected or not torch.equal(
        positions.sort().values, torch.arange(expected)
    ):
        return None
    return embeddings[positions.argsort()]

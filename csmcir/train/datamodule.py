"""One LightningDataModule for every benchmark, built on the registry's ``load_split``.

What differs between benchmarks is only which splits train and which validate (FashionIQ trains
on the union of its three categories and validates per category; Shoes and Fashion200k have no
val split and validate on test, as their papers do) and which recalls are reported. That lives
in :data:`PLANS`; the loading, caching and batching code is shared.

The model hands its image preprocessing to the DataModule (:meth:`CIRDataModule.attach`) when it
is built, because the tiny preset's tokenizer is built from this DataModule's texts first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from csmcir.data.batches import BatchSource, ImageSource, InMemoryImages
from csmcir.data.captions import load_captions
from csmcir.data.layout import first_few
from csmcir.data.prefetch import PrefetchLoader, loader_options
from csmcir.data.records import CIRSplit
from csmcir.errors import ConfigError, DataError, warn
from csmcir.model.features import CachedFeatures
from csmcir.train.datasets import TrainTriplets, ValidationItems, first_clauses
from csmcir.train.sampler import EpochShuffleSampler


@dataclass(frozen=True)
class SplitPlan:
    """Which splits a benchmark trains and validates on: ``(name, split, loader options)``.

    Several ``train`` entries are concatenated; several ``val`` entries are validated and logged
    one by one (``val/<name>/...``) and then combined.
    """

    train: tuple[tuple[str, str, dict[str, Any]], ...]
    val: tuple[tuple[str, str, dict[str, Any]], ...]


def _one(train: str, val: str) -> Callable[[tuple[str, ...]], SplitPlan]:
    return lambda _: SplitPlan(train=((train, train, {}),), val=((val, val, {}),))


def _fashioniq(categories: tuple[str, ...]) -> SplitPlan:
    return SplitPlan(
        train=tuple((c, "train", {"category": c}) for c in categories),
        val=tuple((c, "val", {"category": c}) for c in categories),
    )


PLANS: dict[str, Callable[[tuple[str, ...]], SplitPlan]] = {
    "synthcir": _one("train", "val"),
    "cirr": _one("train", "val"),
    "fashioniq": _fashioniq,
    "shoes": _one("train", "test"),
    "fashion200k": _one("train", "test"),
}


def caption_command(benchmark: str, root: Path, out: Path, categories: tuple[str, ...] = ()) -> str:
    """The commands that write the target-caption file ``out`` this run needs.

    The synthetic benchmark is captioned by the ``oracle`` backend (from its scenes); real
    benchmarks need a local MLLM (``--backend hf --model-dir DIR``) or an OpenAI-compatible
    server (``--backend openai --base-url URL --model NAME``).
    """
    shards = out.parent / f"{out.stem}_shards"
    backend = "oracle" if benchmark == "synthcir" else "hf --model-dir MLLM_DIR"
    runs = [
        f"csmcir caption run --benchmark {benchmark} --root {root} --split all"
        + (f" --category {c}" if c else "")
        + f" --backend {backend} --out {shards}"
        for c in categories or ("",)
    ]
    return " && ".join([*runs, f"csmcir caption merge {shards} --out {out}"])


@dataclass
class LoadedSplits:
    train: list[CIRSplit] = field(default_factory=list)
    val: list[tuple[str, CIRSplit]] = field(default_factory=list)


class CIRDataModule(L.LightningDataModule):
    """Training triplets and validation galleries of one benchmark.

    Args:
        benchmark: registry name (synthcir, cirr, fashioniq, shoes, fashion200k).
        root: the dataset folder (see datasets/README.md for each layout).
        captions: merged MCoT caption file (``csmcir caption merge``); required when the model
            reads target captions.
        batch_size: training queries per step and rank (in-batch negatives = batch x ranks).
        val_batch_size: images per validation step.
        num_workers: DataLoader worker processes decoding images (0 = in the training
            process); a feature cache is read by a thread of the training process instead.
        cache_images: decode every image once into memory (small benchmarks only).
        features: a frozen-ViT feature cache (``csmcir features extract``) to read instead of
            the images; the model must keep its ViT frozen.
        categories: FashionIQ categories to train and validate on (default: all three).
        drop_missing: drop queries whose images are missing instead of stopping (they are
            counted and listed on the split).
        seed: data-order seed; default the ``seed_everything`` seed.
        group_by_reference: batch the queries of one reference image together, so each one's
            siblings (same image, another modification) are in-batch hard negatives.
        caption_clauses: cut each training target caption to its first this many clauses (0:
            whole; validation reads them whole): a stage-1 option (docs/training.md).
    """

    def __init__(
        self,
        benchmark: str,
        root: Path,
        captions: Path | None = None,
        batch_size: int = 128,
        val_batch_size: int = 256,
        num_workers: int = 0,
        cache_images: bool = False,
        features: Path | None = None,
        categories: list[str] | None = None,
        drop_missing: bool = False,
        seed: int | None = None,
        group_by_reference: bool = False,
        caption_clauses: int = 0,
    ) -> None:
        super().__init__()
        if benchmark not in PLANS:
            raise ConfigError(
                f"--data.benchmark: cannot train on {benchmark!r}; choose one of "
                f"{', '.join(PLANS)} (CIRCO has no training split: evaluate on it)"
            )
        for key, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise ConfigError(f"--data.{key} must be at least 1, got {value}")
        for key, value in (("num_workers", num_workers), ("caption_clauses", caption_clauses)):
            if value < 0:
                raise ConfigError(f"--data.{key} must be 0 or more, got {value}")
        if categories is not None and benchmark != "fashioniq":
            raise ConfigError("--data.categories applies to fashioniq only")
        # strings, not Paths: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "benchmark": benchmark,
                "root": str(root),
                "captions": None if captions is None else str(captions),
                "batch_size": batch_size,
                "val_batch_size": val_batch_size,
                "num_workers": num_workers,
                "cache_images": cache_images,
                "features": None if features is None else str(features),
                "categories": categories,
                "drop_missing": drop_missing,
                "seed": seed,
                "group_by_reference": group_by_reference,
                "caption_clauses": caption_clauses,
            }
        )
        self.benchmark = benchmark
        self.root = Path(root)
        self.captions_path = Path(captions) if captions is not None else None
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.cache_images = cache_images
        self.features = Path(features) if features is not None else None
        self.drop_missing = drop_missing
        self.group_by_reference = group_by_reference
        self.caption_clauses = caption_clauses
        self.seed = seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        from csmcir.data.fashioniq import CATEGORIES

        self.plan = PLANS[benchmark](tuple(categories or CATEGORIES))
        self.splits: LoadedSplits | None = None
        self.captions: dict[str, str] | None = None
        self.model = None
        self.needs_captions = False
        self._images: BatchSource | None = None
        self._resume: tuple[int, int] | None = None

    # -- loading --------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Read the annotation files and captions once (both training and validation need them)."""
        if self.splits is None:
            self.splits = LoadedSplits(
                val=[(name, self._load(s, o)) for name, s, o in self.plan.val]
            )
            if self.captions_path is not None:
                if not self.captions_path.is_file():
                    raise DataError(
                        f"--data.captions: caption file not found: {self.captions_path}. "
                        f"Make it with: {self._caption_command()}"
                    )
                gallery = {g: s.image_path(g) for _, s in self.splits.val for g in s.gallery}
                self.captions = load_captions(
                    self.captions_path, gallery, benchmark=self.benchmark, flag="--data.captions"
                )
        if stage == "fit":
            self._load_train()

    def _load(self, split: str, options: dict[str, Any]) -> CIRSplit:
        from csmcir.data.registry import load_split

        return load_split(
            self.benchmark, self.root, split, drop_missing=self.drop_missing, **options
        )

    def _load_train(self) -> list[CIRSplit]:
        """The training splits, read on first need (validation alone needs them only for a
        tokenizer built from their texts)."""
        loaded = self._loaded()
        if not loaded.train:
            loaded.train = [self._load(s, o) for _, s, o in self.plan.train]
            for split in loaded.train:
                unanswered = [q.query_id for q in split.queries if not q.targets]
                if unanswered:
                    raise DataError(
                        f"{split.benchmark}/{split.split}: {len(unanswered)} training queries "
                        f"have no target: {first_few(unanswered)}"
                    )
        return loaded.train

    def _loaded(self) -> LoadedSplits:
        if self.splits is None:
            raise RuntimeError("CIRDataModule.setup() has not run")
        return self.splits

    def dropped(self) -> dict[str, dict[str, list[str]]]:
        """What ``drop_missing`` dropped from each split read so far: the missing image ids and
        the query ids that used them (for the run's ``training.json``)."""
        loaded = self._loaded()
        splits = [*loaded.train, *(split for _, split in loaded.val)]
        return {
            f"{s.benchmark}/{s.split}": {"images": s.dropped, "queries": s.dropped_queries}
            for s in splits
            if s.dropped
        }

    def text_corpus(self) -> list[str]:
        """Training texts for building a tokenizer: modification texts and target captions."""
        train = self._load_train()
        texts = [t for split in train for q in split.queries for t in q.texts]
        if self.captions is not None:
            targets = {q.target for split in train for q in split.queries}
            texts += [self.captions[t] for t in sorted(targets) if t in self.captions]
        return texts

    def attach(self, model, target_captions: bool = False) -> None:
        """Take the model's preprocessing (or check its features); check the captions it reads.
        ``target_captions``: batches carry them even to a model whose targets are images alone
        (a stage-1 image-text run of the baseline)."""
        needs_captions = target_captions or model.config.target_text == "caption"
        if needs_captions:
            self.require_captions()
        if self.features is not None and not model.config.freeze_vision:
            raise ConfigError(
                "--data.features: cached ViT features need a frozen ViT, but this model trains "
                "its ViT (freeze_vision is false); drop --data.features"
            )
        self.model = model
        self.needs_captions = needs_captions
        self._images = None

    def say_cut_texts(self, modification_texts: bool = True) -> dict[str, int]:
        """Warn before training when the attached model reads only the start of its training
        texts (longer than its text length, or split by its vocabulary into many pieces):
        eval says so too, but only after the training it spoiled. Returns the counts."""
        train = self._load_train()
        texts = {}
        if modification_texts:
            texts["modification texts"] = sorted({s.eval_text(q) for s in train for q in s.queries})
        if self.needs_captions and self.captions is not None:
            targets = {q.target for s in train for q in s.queries} & self.captions.keys()
            captions = [self.captions[t] for t in sorted(targets)]
            if self.caption_clauses:  # what training reads of them
                captions = [first_clauses(c, self.caption_clauses) for c in captions]
            texts["target captions"] = captions
        total = {name: len(group) for name, group in texts.items()}
        cut = {
            name: sum(kept is not None for kept in self.model.truncated(group))
            for name, group in texts.items()
        }
        if any(cut.values()):
            counts = " and ".join(f"{cut[n]} of {total[n]} {n}" for n in texts if cut[n])
            warn(
                f"{counts} of the training data are longer than the model reads and are cut to "
                "their first tokens (a longer text length, or a vocabulary with their words, "
                "lets it read them whole)"
            )
        return cut

    def require_captions(self) -> None:
        """A DataError with the command that makes them, unless every target has a caption."""
        loaded = self._loaded()
        if self.captions is None:
            raise DataError(
                "this model reads target captions, but no caption file was given "
                f"(--data.captions FILE). Make one with: {self._caption_command()}"
            )
        needed: dict[str, None] = {}
        for split in loaded.train:
            needed.update(dict.fromkeys(q.target for q in split.queries))
        for _, split in loaded.val:
            needed.update(dict.fromkeys(split.gallery))
        missing = [i for i in needed if i not in self.captions]
        if missing:
            raise DataError(
                f"{self.captions_path}: {len(missing)} of {len(needed)} target images have no "
                f"caption: {first_few(missing)}. Caption them with: {self._caption_command()}"
            )

    def _caption_command(self) -> str:
        out = self.captions_path or self.root / "mcot_captions.json"
        categories = tuple(o["category"] for _, _, o in self.plan.train if "category" in o)
        return caption_command(self.benchmark, self.root, out, categories)

    @property
    def model_input(self) -> str:
        """The encode_query/encode_target keyword the batches' image tensors feed."""
        return (CachedFeatures if self.features is not None else ImageSource).model_input

    def _image_source(self, splits: list[CIRSplit], queries_only: bool = False) -> BatchSource:
        """The images of ``splits`` (only their queries' references and targets when
        ``queries_only``: training never sees a distractor), added to those already available."""
        if self.model is None:
            raise RuntimeError("CIRDataModule.attach(model) must come before the dataloaders")
        paths: dict[str, Path] = {}
        for split in splits:
            if queries_only:
                ids = [i for q in split.queries for i in (q.reference, q.target)]
            else:
                ids = split.referenced_images()
            for image_id in ids:
                paths.setdefault(image_id, split.image_path(image_id))
        if self._images is None:
            if self.features is not None:
                from csmcir.model.features import FeatureCache

                cache = FeatureCache.open(self.features, self.model)
                self._images = CachedFeatures(cache, paths)
            else:
                source = InMemoryImages if self.cache_images else ImageSource
                self._images = source(paths, self.model.transform.one)
        else:
            self._images.add(paths)
        return self._images

    def _captions_for_model(self) -> dict[str, str] | None:
        return self.captions if self.needs_captions else None

    # -- loaders --------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        loaded = self._loaded()
        dataset = TrainTriplets(
            loaded.train,
            self._image_source(loaded.train, queries_only=True),
            self._captions_for_model(),
            self.seed,
            self.caption_clauses,
        )
        world, rank = self._world()
        if len(dataset) < self.batch_size * world:
            raise ConfigError(
                f"--data.batch_size {self.batch_size} x {world} rank(s) exceeds the "
                f"{len(dataset)} training queries of {self.benchmark}"
            )
        groups = None
        if self.group_by_reference:
            groups = [item.query.reference for item in dataset.items]
        sampler = EpochShuffleSampler(
            dataset, seed=self.seed, num_replicas=world, rank=rank, groups=groups
        )
        if self._resume is not None:
            epoch, batches = self._resume
            sampler.resume(epoch, batches * self.batch_size)
            self._resume = None
        options = self._loader_options()
        return PrefetchLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=dataset.collate,
            persistent_workers=options["num_workers"] > 0,
            **options,
        )

    def val_dataloader(self) -> list[DataLoader]:
        images = self._image_source([split for _, split in self._loaded().val])
        loaders = []
        for _, split in self._loaded().val:
            dataset = ValidationItems(split, images, self._captions_for_model())
            # Every rank validates the whole split (a one-replica DistributedSampler, which
            # Lightning leaves alone): metrics need the full gallery, and it is small.
            sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
            loaders.append(
                PrefetchLoader(
                    dataset,
                    batch_size=self.val_batch_size,
                    sampler=sampler,
                    collate_fn=dataset.collate,
                    **self._loader_options(),
                )
            )
        return loaders

    def _loader_options(self) -> dict[str, Any]:
        """Workers, a prefetch thread and pinning as :func:`loader_options` decides."""
        trainer = self.trainer
        on_cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return loader_options(
            features=self.features is not None, num_workers=self.num_workers, on_cuda=on_cuda
        )

    def val_splits(self) -> list[tuple[str, CIRSplit]]:
        """(name, split) of each validation loader, in loader order."""
        return list(self._loaded().val)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    # -- resuming mid-epoch ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the training data order stands, so a resumed run continues it exactly."""
        trainer = self.trainer
        if trainer is None:
            return {}
        epoch = trainer.current_epoch
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= trainer.num_training_batches:  # saved at the end of an epoch
            epoch, batches = epoch + 1, 0
        world = self._world()[0]
        return {
            "epoch": epoch,
            "batches": batches,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": world,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the data order where the checkpoint stopped; refuse a run whose order would
        differ (the seed, or the batch shape: the same position means other samples then)."""
        if not state:
            return
        if state["seed"] != self.seed:
            raise ConfigError(
                f"the checkpoint's data seed is {state['seed']}, this run's is {self.seed}: "
                "resume with the same seed_everything / --data.seed"
            )
        # Checkpoints written before these were stored carry neither: nothing to compare.
        for key, flag, ours in (
            ("batch_size", "--data.batch_size", self.batch_size),
            ("world_size", "--trainer.devices x --trainer.num_nodes (ranks)", self._world()[0]),
        ):
            if key in state and state[key] != ours:
                raise ConfigError(
                    f"the checkpoint was trained with {key} {state[key]}, this run has {ours}: "
                    f"the data would not continue where it stopped (batch {state['batches']} of "
                    f"epoch {state['epoch']} holds other samples). Resume with the same {flag}, "
                    "or start a new run from its weights with --model.init_from RUN/model"
                )
        self._resume = (state["epoch"], state["batches"])

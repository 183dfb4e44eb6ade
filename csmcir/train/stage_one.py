"""The tiny presets' stage-1 weights: image-text pretraining on synthetic images and their
captions. ``csmcir quickstart`` fine-tunes the CSMCIR one, as the real method fine-tunes
BLIP-2's stage-1 Q-Former instead of random weights; the CLIP4Cir baseline's comparison starts its
tiny CLIP from the other, as CLIP4Cir starts from a pretrained CLIP.

    python -m csmcir.train.stage_one            # regenerates csmcir/pretrained/synthcir-tiny-stage1
    python -m csmcir.train.stage_one --check    # regenerates in a temporary folder and compares
    python -m csmcir.train.stage_one --preset clip4cir-tiny    # synthcir-clip4cir-tiny-stage1

What the weights have seen: the training-split images of their own synthetic benchmark (seed
1000) and the oracle captions of those images, nothing else. No modification text, no triplet
(batches are drawn at random, not a reference's queries together) and no val or test image
trains them. Both presets train on the same data with the same batch and rate; the loss is
BLIP-2's image-text contrastive and matching losses for CSMCIR (matching trains the joint
image-text pass that CSMCIR's embeddings read) and CLIP's contrastive loss for the baseline,
which has no joint pass. Both contrastive losses read each caption's first clause (its first
object in reading order); CSMCIR's matching loss reads the whole caption, as CIR fine-tuning
encodes its targets. The baseline trains 6,000 steps, CSMCIR 3,000: each the texts and length
that served it best on val (docs/training.md). The tokenizer's vocabulary
is built from those captions and the words of the modification templates
(:func:`~csmcir.data.synth_text.template_words`), not from any modification text. One torch
thread, so the sums run in one order: the same CPU kind gives the same bytes (``--check`` says
whether this machine does).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from csmcir import packaged
from csmcir.errors import DataError
from csmcir.io import atomic_write_json, read_json

PRETRAINED = Path(__file__).resolve().parents[1] / packaged.PRETRAINED  # written to: the source
# preset -> the name of its shipped stage-1 weights (a folder in csmcir/pretrained/)
NAMES = {"tiny": "synthcir-tiny-stage1", "clip4cir-tiny": "synthcir-clip4cir-tiny-stage1"}
SHIPPED = PRETRAINED / NAMES["tiny"]  # the quickstart's start
RECORD = "stage_one.json"  # in the shipped folder: how it was made and its weights' SHA-256
WEIGHTS = "model.safetensors"
RECIPE: dict[str, Any] = {"seed": 1000, "steps": 3000, "batch_size": 64, "lr": 1.0e-3}
# BLIP-2's stage 1 also trains image-text matching on its joint pass; CLIP has no joint pass.
# The contrastive losses read each caption's first clause (its first object): +10.1 val R@1 after
# fine-tuning for the baseline, +3.9 for CSMCIR, whose matching loss reads the whole caption
# (-4.9 when it read the first clause too). The baseline trains 6,000 steps: +0.9 val R@1, where
# CSMCIR's start lost 3.4 from them (docs/training.md)
RECIPES = {
    "tiny": {**RECIPE, "image_text_matching": True, "contrastive_clauses": 1},
    "clip4cir-tiny": {**RECIPE, "caption_clauses": 1, "steps": 6000},
}
SMALL = {"train_refs": 300, "val_refs": 24, "test_refs": 24}  # --small: a smoke test


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(
    out: Path,
    work: Path,
    recipe: dict[str, Any],
    sizes: dict[str, int] | None = None,
    preset: str = "tiny",
) -> dict[str, Any]:
    """Generate the benchmark (``sizes``: split sizes other than the default ones, for a smoke
    test), caption it, train stage 1 of ``preset`` and save the model to ``out``."""
    from captioning.cli import main as caption_main
    from csmcir.data.captions import load_captions
    from csmcir.data.synth import generate
    from csmcir.data.synth_build import SynthConfig
    from csmcir.data.synth_text import template_words
    from csmcir.model import CSMCIR
    from csmcir.train.cli import run as fit

    seed = recipe["seed"]
    data = work / "data"
    splits = generate(data, SynthConfig(seed=seed, **(sizes or {})), overwrite=True)
    shards, captions = data / "mcot_captions_shards", data / "mcot_captions.json"
    common = ["--benchmark", "synthcir", "--root", str(data), "--split", "all"]
    caption_main(
        ["run", *common, "--train-targets-only", "--backend", "oracle", "--out", str(shards)]
    )
    caption_main(["merge", str(shards), "--out", str(captions)])
    train_images = set(splits["train"].names.values())  # names maps scene -> image id
    texts = [c for i, c in sorted(load_captions(captions).items()) if i in train_images]
    if not texts:
        raise DataError(f"{captions} has no caption of a training image: no corpus to build on")
    start = CSMCIR.from_preset(
        preset, tokenizer_corpus=[*texts, *template_words()], vocab_size=2048, seed=seed
    )
    start.save_pretrained(work / "start")
    steps = str(recipe["steps"])
    # fmt: off
    fit([
        "fit", "--config", "synthcir", "--seed_everything", str(seed),
        "--threads", "1", "--model.init_from", str(work / "start"),
        "--model.objective", "image_text", "--model.lr", str(recipe["lr"]),
        "--model.image_text_matching", str(recipe.get("image_text_matching", False)).lower(),
        "--model.contrastive_clauses", str(recipe.get("contrastive_clauses", 0)),
        "--model.bank.enabled", "false", "--data.root", str(data),
        "--data.captions", str(captions), "--data.group_by_reference", "false",
        "--data.caption_clauses", str(recipe.get("caption_clauses", 0)),
        "--data.batch_size", str(recipe["batch_size"]), "--trainer.max_steps", steps,
        "--trainer.val_check_interval", steps, "--trainer.default_root_dir", str(work / "run"),
        "--trainer.enable_progress_bar", "false", "--checkpoint_every", "0",
    ])
    # fmt: on
    CSMCIR.from_pretrained(work / "run" / "model").save_pretrained(out)
    clauses = ""
    if cut := recipe.get("caption_clauses", 0):
        clauses = f" ({their_first(cut)})"
    elif cut := recipe.get("contrastive_clauses", 0):
        clauses = f" (the contrastive loss reading {their_first(cut)}, matching them whole)"
    record = {
        "preset": preset,
        "recipe": recipe,
        "sizes": sizes,
        "trained_on": f"the training-split images of synthcir seed {seed} and their oracle "
        f"captions{clauses}; no modification text, no triplet, no val or test image",
        "command": "python -m csmcir.train.stage_one"
        + ("" if preset == "tiny" else f" --preset {preset}"),
        "sha256": sha256(out / WEIGHTS),
    }
    atomic_write_json(out / RECORD, record)
    return record


def their_first(clauses: int) -> str:
    """'their first clause', 'their first 2 clauses': what a stage 1 read of its captions."""
    return "their first clause" if clauses == 1 else f"their first {clauses} clauses"


def shipped_record(folder: Path = SHIPPED) -> dict[str, Any]:
    """The shipped weights' record, after checking that the weights are the ones it names."""
    record = read_json(folder / RECORD, "stage-1 record")
    if sha256(folder / WEIGHTS) != record["sha256"]:
        raise DataError(
            f"{folder / WEIGHTS} is not the file {folder / RECORD} names (SHA-256 differs): "
            "regenerate it with python -m csmcir.train.stage_one"
        )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csmcir.train.stage_one", description=__doc__)
    parser.add_argument(
        "--preset", choices=sorted(NAMES), default="tiny", help="the model kind to pretrain"
    )
    parser.add_argument(
        "--out", type=Path, help="where the weights go (default: the preset's shipped folder)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate in a temporary folder and compare with the weights at --out",
    )
    parser.add_argument("--small", action="store_true", help="a tiny benchmark (a smoke test)")
    parser.add_argument("--steps", type=int, help="stage-1 steps (default: the preset's recipe)")
    args = parser.parse_args(argv)
    recipe = {**RECIPES[args.preset], **({"steps": args.steps} if args.steps else {})}
    out = args.out or PRETRAINED / NAMES[args.preset]
    with tempfile.TemporaryDirectory(prefix="csmcir-stage1-") as tmp:
        work = Path(tmp)
        if not args.check:
            record = make(out, work, recipe, SMALL if args.small else None, args.preset)
            print(f"stage-1 weights in {out} (sha256 {record['sha256']})")
            return 0
        shipped = shipped_record(out)
        made = make(
            work / "made", work / "work", shipped["recipe"], shipped["sizes"], shipped["preset"]
        )
        same = made["sha256"] == shipped["sha256"]
        print(f"regenerated sha256 {made['sha256']}: {'the same' if same else 'DIFFERENT'}")
        if not same:
            kept = out.with_name(out.name + ".regenerated")
            shutil.copytree(work / "made", kept, dirs_exist_ok=True)
            print(f"the regenerated weights are in {kept}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

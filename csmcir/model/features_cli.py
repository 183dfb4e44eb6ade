"""``csmcir features``: extract the frozen-ViT feature cache of a benchmark, or inspect one.

csmcir features extract --model DIR|blip2-vitg [--weights DIR] --benchmark NAME --root DIR
                        [--split S ...] [--option KEY=VALUE ...] --out DIR
                        [--batch-size N] [--workers N] [--precision P] [--compile]
csmcir features extract --config cirr --out DIR   (model + data from a fit YAML or packaged config)
csmcir features info DIR [--model DIR]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from csmcir.device import add_device_argument
from csmcir.errors import ConfigError, DataError
from csmcir.hub import MODEL, is_hub_name, resolve
from csmcir.model.config import PRECISIONS
from csmcir.model.run_folder import model_folder
from csmcir.packaged import config_file


def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="a `csmcir fit` YAML or packaged config's name (cirr): model and data come from it",
    )
    p.add_argument(
        "--model", help="exported model folder, BLIP-2 folder or hub name, or preset blip2-vitg"
    )
    p.add_argument(
        "--weights", type=Path, help="BLIP-2 weights folder or hub name for --model blip2-vitg"
    )
    p.add_argument("--benchmark", help="benchmark name (synthcir, cirr, fashioniq, ...)")
    p.add_argument("--root", type=Path, help="the benchmark's root folder")
    p.add_argument(
        "--split", action="append", help="split to extract (repeatable; default: every split)"
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="loader option, e.g. category=dress (FashionIQ default: all three categories)",
    )
    p.add_argument("--out", type=Path, required=True, help="cache folder (created or resumed)")
    p.add_argument(
        "--batch-size", type=int, help=f"images per ViT pass (default {GPU_BATCH} on a GPU, 32)"
    )
    p.add_argument("--shard-size", type=int, default=512, help="images per shard file")
    add_device_argument(p)
    p.add_argument(
        "--workers",
        type=int,
        help="processes decoding images ahead of the ViT (default: up to 8 on a GPU, 0)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="the ViT's autocast (default bf16 on a GPU, else the model's own)",
    )
    p.add_argument("--compile", action="store_true", help="run the ViT through torch.compile")
    p.add_argument(
        "--drop-missing", action="store_true", help="skip (and count) images missing on disk"
    )


GPU_BATCH = 256  # ViT-g at 224 px in bf16 without gradients: about 2 GB of activations


def gpu_defaults(args: argparse.Namespace, model_precision: str) -> dict[str, Any]:
    """Batch size, workers and precision: what the flags say, else what keeps a GPU busy (large
    batches, decoding in parallel, bf16) or, on a CPU, the model's own settings."""
    gpu = args.device.type == "cuda"
    workers = (
        args.workers if args.workers is not None else min(8, os.cpu_count() or 1) if gpu else 0
    )
    if workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {workers}")
    batch = args.batch_size or (GPU_BATCH if gpu else 32)
    if batch < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch}")
    return {
        "batch_size": batch,
        "workers": workers,
        "precision": args.precision or ("bf16" if gpu else model_precision),
    }


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a feature-cache folder")
    p.add_argument("--model", help="also check the cache is valid for this model")
    p.add_argument(
        "--weights", type=Path, help="BLIP-2 weights folder or hub name for --model blip2-vitg"
    )


def load_model(name: str, weights: Path | None, options: dict[str, Any] | None = None):
    """An exported/BLIP-2 folder, a preset with weights or a hub name; a random preset makes no
    cache."""
    from csmcir.model import CSMCIR
    from csmcir.model.registry import list_presets, load_preset

    options = options or {}
    if weights is not None and name not in list_presets():
        raise ConfigError(
            f"--weights {weights} is read only with a preset (--model blip2-vitg); --model {name} "
            "is a model of its own, so it would be ignored: leave out one of them"
        )
    if Path(name).exists():  # a folder (or run folder), or a file from_pretrained explains
        return CSMCIR.from_pretrained(model_folder(name), **options)
    if name in list_presets():
        if load_preset(name).weights is None:
            raise ConfigError(
                f"--model {name}: this preset is random-initialised, so its features would "
                "belong to no trained model; pass an exported model folder instead"
            )
        return CSMCIR.from_preset(name, weights=weights, **options)
    if is_hub_name(name):
        return CSMCIR.from_pretrained(resolve(name, MODEL, "--model"), **options)
    raise ConfigError(
        f"--model {name}: no such folder, not a preset ({', '.join(list_presets())}) and not "
        "a hub name (org/name)"
    )


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    """A LightningCLI section, flat or in class_path/init_args form."""
    value = config.get(key) or {}
    return value.get("init_args", value) if isinstance(value, dict) else {}


def apply_fit_config(args: argparse.Namespace) -> None:
    """Fill the model and data arguments from a fit YAML; flags given explicitly win."""
    path = config_file(args.config)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {args.config}: malformed YAML: {e}") from None
    model, data = _section(config, "model"), _section(config, "data")
    args.model_options = {
        k: v
        for k, v in (model.get("model_options") or {}).items()
        if k in ("precision", "max_text_length", "image")
    }
    if args.model is None:
        args.model = model.get("init_from") or model.get("preset")
        args.weights = args.weights or model.get("weights")
    args.benchmark = args.benchmark or data.get("benchmark")
    args.root = args.root or data.get("root")
    args.drop_missing = args.drop_missing or bool(data.get("drop_missing"))
    if data.get("categories") and not args.option:
        args.option = [f"category={c}" for c in data["categories"]]


def image_paths(args: argparse.Namespace) -> dict[str, Path]:
    """Every image the chosen splits refer to; one id naming two different files is an error."""
    from csmcir.data.fashioniq import CATEGORIES
    from csmcir.data.registry import load_split, spec

    options: dict[str, list[str]] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        options.setdefault(key, []).append(value)
    if args.benchmark == "fashioniq":
        options.setdefault("category", list(CATEGORIES))
    variants: list[dict[str, str]] = [{}]
    for key, values in options.items():
        variants = [{**v, key: value} for v in variants for value in values]
    paths: dict[str, Path] = {}
    for split in args.split or spec(args.benchmark).splits:
        for variant in variants:
            cir = load_split(
                args.benchmark, args.root, split, drop_missing=args.drop_missing, **variant
            )
            for image_id in cir.referenced_images():
                path = cir.image_path(image_id)
                if paths.setdefault(image_id, path) != path:
                    raise DataError(
                        f"{args.benchmark}: image id {image_id!r} names two files, "
                        f"{paths[image_id]} and {path}; the cache is keyed by id"
                    )
    return paths


def run_extract(args: argparse.Namespace) -> None:
    from csmcir.model.features import extract_features
    from csmcir.outputs import FEATURE_CACHE, claim

    args.model_options = {}
    if args.config is not None:
        apply_fit_config(args)
    for flag in ("model", "benchmark", "root"):
        if getattr(args, flag) is None:
            raise ConfigError(f"--{flag} is required (or a --config that names it)")
    claim(args.out, FEATURE_CACHE, flag="--out")  # a new folder or a cache to resume
    model = load_model(str(args.model), args.weights, args.model_options).to(args.device)
    if not model.config.freeze_vision:
        print("note: this model's ViT is trainable; the cache is valid only for these weights")
    settings = gpu_defaults(args, model.config.precision)
    model.config = model.config.replace(precision=settings.pop("precision"))
    paths = image_paths(args)
    cache = extract_features(
        model, paths, args.out, shard_size=args.shard_size, compile=args.compile, **settings
    )
    print(
        f"feature cache {args.out}: {len(cache)} images, features {list(cache.feature_shape)} "
        f"float16, vision fingerprint {cache.fingerprint}"
    )


def run_info(args: argparse.Namespace) -> None:
    from csmcir.model.features import FeatureCache

    model = load_model(args.model, args.weights) if args.model else None
    cache = FeatureCache.open(args.folder, model)
    made = cache.meta.get("extracted_with", {})
    print(f"feature cache {args.folder}")
    print(f"  images: {len(cache)}")
    print(f"  features: {list(cache.feature_shape)} {cache.meta['dtype']}")
    print(f"  vision fingerprint: {cache.fingerprint}")
    print(f"  extracted with: preset {made.get('preset')}, precision {made.get('precision')}")
    if model is not None:
        print("  valid for the given model: yes")


def resume_hint(argv: list[str]) -> str | None:
    """After Ctrl+C in ``features extract``: finished shards are kept and skipped next time."""
    return "its finished shards are kept" if argv[:1] == ["extract"] else None


def main(argv: list[str]) -> int | None:
    parser = argparse.ArgumentParser(prog="csmcir features", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    add_extract_arguments(sub.add_parser("extract", help="run the frozen ViT once per image"))
    add_info_arguments(sub.add_parser("info", help="describe a cache; check it against a model"))
    args = parser.parse_args(argv)
    {"extract": run_extract, "info": run_info}[args.action](args)
    return 0

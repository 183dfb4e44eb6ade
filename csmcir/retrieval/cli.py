"""``csmcir index build``: embed a gallery (with its captions) into a faiss index folder.

    csmcir index build --model checkpoints/synthcir-tiny --benchmark synthcir \\
        --root datasets/synthcir --split test \\
        --captions datasets/synthcir/mcot_captions.json --out runs/index/synth
    csmcir index build --model DIR --images photos/ --captions caps.json --kind hnsw --out idx/

An index built with an untrained preset (``--model tiny``) keeps that model in ``INDEX/model``,
so ``csmcir search`` queries it with the same weights and vocabulary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from csmcir.data.captions import load_captions
from csmcir.device import add_device_argument
from csmcir.errors import ConfigError, DataError
from csmcir.evaluation.encode import DEFAULT_CACHE_DIR, load_model
from csmcir.hub import MODEL, is_hub_name, resolve
from csmcir.model.run_folder import model_folder
from csmcir.outputs import GALLERY_INDEX, RECORD_KEY, claim, record
from csmcir.retrieval.index import KINDS, GalleryIndex

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="csmcir index",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="embed a gallery into a faiss index")
    build.add_argument(
        "--model",
        required=True,
        help="exported model folder, a training run folder (its model/), a preset (tiny), or a hub "
        "name (org/name, fetched into the hub cache)",
    )
    build.add_argument(
        "--out",
        required=True,
        type=Path,
        help="index folder to write: a new or empty one, or this model's index of this gallery",
    )
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of images (ids = file stems)")
    source.add_argument("--benchmark", help="index a benchmark split's gallery")
    build.add_argument("--root", type=Path, help="with --benchmark: the benchmark's folder")
    build.add_argument("--split", default="val", help="with --benchmark (default val)")
    build.add_argument("--category", help="with --benchmark fashioniq")
    build.add_argument("--captions", type=Path, help="target-caption file keyed by image id")
    build.add_argument("--empty-captions", action="store_true", help="empty text where none")
    build.add_argument("--kind", choices=KINDS, default="flat", help="flat = exact (default)")
    build.add_argument("--nlist", type=int, help="ivf: cells (default 4*sqrt(N))")
    build.add_argument("--nprobe", type=int, default=16, help="ivf: cells searched")
    build.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    build.add_argument("--ef-search", type=int, default=128, help="hnsw: search breadth")
    build.add_argument("--batch-size", type=int, default=64)
    add_device_argument(build)
    build.add_argument("--seed", type=int, default=0, help="seed of an untrained preset")
    build.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    build.add_argument("--no-cache", action="store_true")
    args = parser.parse_args(argv)
    index = run_build(args)
    print(f"indexed {len(index)} images ({index.meta['options']}) into {args.out}")
    return 0


def run_build(args: argparse.Namespace) -> GalleryIndex:
    images, texts = gallery_images(args)
    spec = str(model_folder(args.model)) if Path(args.model).is_dir() else args.model
    source = str(args.images) if args.images else f"{args.benchmark} {args.split}"
    identity = {
        "model": str(Path(spec).resolve()) if Path(spec).is_dir() else f"{spec} (seed {args.seed})",
        "gallery": str(args.images.resolve())
        if args.images
        else f"{source} at {Path(args.root).resolve()}",
    }
    # another model's or gallery's index is someone's result: refused, not replaced
    claim(args.out, GALLERY_INDEX, flag="--out", identity=identity, other_identity="refuse")
    captions = (
        load_captions(args.captions, images, benchmark=args.benchmark) if args.captions else None
    )

    def corpus() -> list[str]:
        return texts + list((captions or {}).values())

    model = load_model(spec, corpus, seed=args.seed).to(args.device)
    options = {
        "nlist": args.nlist,
        "nprobe": args.nprobe,
        "hnsw_m": args.hnsw_m,
        "ef_search": args.ef_search,
    }
    index = GalleryIndex.build(
        model,
        images,
        captions,
        kind=args.kind,
        # an untrained preset has no folder: the index then keeps the model in INDEX/model; a
        # hub name's is its snapshot in the hub cache
        model_dir=spec if Path(spec).is_dir() else hub_folder(spec),
        empty_captions=args.empty_captions,
        batch_size=args.batch_size,
        cache_dir=None if args.no_cache else args.cache_dir,
        **options,
    )
    index.meta |= {
        RECORD_KEY: record(GALLERY_INDEX, "csmcir index build", identity),
        "model_source": args.model,
        "source": source,
        "captions": str(args.captions) if args.captions else None,
        "empty_captions": args.empty_captions,
    }
    index.save(args.out)
    return index


def gallery_images(args: argparse.Namespace) -> tuple[dict[str, Path], list[str]]:
    """The images to index (id -> path) and the query texts of a benchmark (tokenizer corpus)."""
    if args.images:
        if not args.images.is_dir():
            raise DataError(f"--images: {args.images} is not a folder")
        files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files under {args.images}")
        images: dict[str, Path] = {}
        for f in files:
            if f.stem in images:
                raise DataError(f"--images: {images[f.stem]} and {f} share the id {f.stem!r}")
            images[f.stem] = f
        return images, []
    if args.root is None:
        raise ConfigError("--benchmark needs --root (the benchmark's folder)")
    from csmcir.data.registry import load_split

    options = {"category": args.category} if args.category else {}
    split = load_split(args.benchmark, args.root, args.split, **options)
    return {g: split.image_path(g) for g in split.gallery}, [
        split.eval_text(q) for q in split.queries
    ]


def hub_folder(spec: str) -> Path | None:
    """The cached snapshot a hub name was loaded from (already fetched), else None."""
    return resolve(spec, MODEL, "--model") if is_hub_name(spec) else None

"""``csmcir search``: query a gallery index with a reference image and a modification text.

    csmcir search --index runs/index/synth --ref query.png --text "make the cube red" -k 10

Prints the top-k with scores and writes a PNG grid (reference, text, ranked results; the true
target, given with --target, is outlined). Relative image paths of the index are found from the
folder it was built in; results whose file is gone are named, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from csmcir.data.images import load_image
from csmcir.data.layout import first_few
from csmcir.device import add_device_argument
from csmcir.errors import ConfigError, DataError, warn
from csmcir.model.run_folder import model_folder
from csmcir.model.tokenizer import describe_cut, describe_unknown
from csmcir.outputs import SEARCH_GRID, claim, short_digest
from csmcir.retrieval.grid import ECHOED, GridItem, check_grid_path, save_grid, shorten
from csmcir.retrieval.index import GalleryIndex


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="csmcir search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--index", required=True, type=Path, help="folder from csmcir index build")
    parser.add_argument("--ref", required=True, type=Path, help="the reference image")
    parser.add_argument("--text", required=True, help="the modification text")
    parser.add_argument("-k", type=int, default=10, help="results to show (default 10)")
    parser.add_argument(
        "--model",
        type=Path,
        help="model folder, training run folder (its model/) or hub name; default: the index's own",
    )
    parser.add_argument("--target", help="id of the true target, outlined in the grid")
    parser.add_argument(
        "--grid",
        type=Path,
        help="PNG to write (default runs/search/<ref>-<text>-<digest>.png); only a new file or "
        "an earlier search grid is written over",
    )
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.k < 1:
        raise ConfigError(f"-k must be at least 1, got {args.k}")
    if not args.text.strip():
        raise ConfigError("--text is empty: a composed query needs a modification text")

    reference = load_image(args.ref)  # not an image: a DataError naming the file
    identity = {"ref": str(args.ref.resolve()), "text": args.text, "index": str(args.index)}
    grid = args.grid or default_grid(args)
    check_grid_path(grid, "--grid")
    claim(grid, SEARCH_GRID, flag="--grid", reads={"the --ref image": args.ref}, identity=identity)
    index = GalleryIndex.load(args.index)
    from csmcir.model import CSMCIR

    model_dir = index.model_folder(model_folder(args.model) if args.model else None)
    model = CSMCIR.from_pretrained(model_dir).to(args.device).eval()
    index.check_model(model)
    (kept,) = model.truncated([args.text])
    if kept is not None:
        warn(f"--text: {describe_cut(args.text, kept)}")
    (unknown,) = model.mostly_unknown([args.text])
    if unknown is not None:
        warn(f"--text: {describe_unknown(unknown)}")
    with torch.inference_mode():
        query = model.encode_query([args.text], pixel_values=model.preprocess([reference]))
    hits = index.search(query, args.k)

    items = [
        GridItem(image_id, index.path_of(image_id), float(score))
        for image_id, score in zip(hits.ids[0], hits.scores[0], strict=False)
    ]
    if not items:
        raise DataError(f"the index {args.index} returned nothing for this query")
    width = max(len(i.image_id) for i in items)
    print(f'query: {args.ref} + "{shorten(args.text, ECHOED)}"')
    for rank, item in enumerate(items, start=1):
        mark = "  <- target" if item.image_id == args.target else ""
        print(f"{rank:>3}  {item.score:8.4f}  {item.image_id:<{width}}  {item.path or ''}{mark}")
    if args.target is not None and args.target not in index.positions:
        print(f"note: --target {args.target!r} is not in the index")
    save_grid(grid, reference, args.text, items, target=args.target, identity=identity)
    print(f"grid: {grid}")
    absent = [i for i in items if i.path is None or not Path(i.path).is_file()]
    if absent:
        root = index.meta.get("image_root", "the folder it was built from")
        warn(
            f"{len(absent)} of the {len(items)} results are not on disk, drawn as 'image not "
            f"found' in the grid: {first_few(i.path or i.image_id for i in absent)}. The index "
            f"found them relative to {root}; rebuild it with csmcir index build where they are"
        )
        return 1
    return 0


def default_grid(args: argparse.Namespace) -> Path:
    """``runs/search/<ref>-<text>-<digest>.png``: a name of its own per query (reference image
    and text) and index, so one search never replaces another's grid."""
    words = re.sub(r"[^a-z0-9]+", "-", args.text.lower()).strip("-")[:40].rstrip("-")
    digest = short_digest(str(args.ref.resolve()), args.text, str(args.index.resolve()))
    return Path("runs") / "search" / f"{args.ref.stem}-{words or 'text'}-{digest}.png"

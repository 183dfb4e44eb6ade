"""``csmcir plot embeddings``: a 2-D map of reference, query and target embeddings per model.

    csmcir plot embeddings --models runs/shared/model runs/separate/model \\
        --benchmark synthcir --root datasets/synthcir --split val \\
        --captions datasets/synthcir/mcot_captions.json --out runs/plots/towers.png

Writes the PNG and, beside it, a JSON with each model's separation numbers (silhouette score of
the three kinds and mean cosines, computed in the original space, not in the 2-D projection).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from csmcir.device import add_device_argument
from csmcir.errors import ConfigError
from csmcir.io import atomic_write_json
from csmcir.outputs import EMBEDDING_PLOT, RECORD_KEY, claim, record


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="csmcir plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    emb = sub.add_parser("embeddings", help="2-D projection of the three kinds of embedding")
    emb.add_argument(
        "--model",
        "--models",
        dest="models",
        nargs="+",
        action="extend",
        required=True,
        help="model folder(s) or a preset (tiny); several give panels side by side",
    )
    emb.add_argument("--benchmark", required=True, help="registry name, e.g. synthcir")
    emb.add_argument("--root", required=True, type=Path, help="the benchmark's folder")
    emb.add_argument("--split", default="val", help="split to sample queries from (default val)")
    emb.add_argument("--category", help="with --benchmark fashioniq")
    emb.add_argument("--captions", type=Path, help="target-caption file keyed by image id")
    emb.add_argument("--empty-captions", action="store_true", help="empty text where none")
    emb.add_argument("--queries", type=int, default=300, help="queries sampled (default 300)")
    emb.add_argument("--method", default="tsne", help="tsne (default), pca or umap")
    emb.add_argument("--seed", type=int, default=0, help="query sample, projection, presets")
    emb.add_argument("--out", required=True, type=Path, help="PNG to write (JSON beside it)")
    emb.add_argument("--batch-size", type=int, default=64)
    add_device_argument(emb)
    args = parser.parse_args(argv)
    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got {args.out}")
    report = plot_embeddings(args)
    for entry in report["models"]:
        s = entry["stats"]
        print(
            f"{entry['title']}: silhouette by kind {s['silhouette_by_kind']:.3f}, "
            f"cos(query, target) {s['cos_query_target']:.3f}, "
            f"cos(query, other targets) {s['cos_query_other_targets']:.3f}"
        )
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def plot_embeddings(args: argparse.Namespace) -> dict:
    """Embed the same sampled queries with every model, project, draw, and write the numbers."""
    import torch

    from csmcir.data.captions import load_captions
    from csmcir.data.registry import load_split
    from csmcir.evaluation.encode import load_model
    from csmcir.plots.embeddings import (
        METHODS,
        Panel,
        embed_kinds,
        project,
        sample_queries,
        save_panels,
        separation,
    )

    if args.method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    options = {"category": args.category} if args.category else {}
    split = load_split(args.benchmark, args.root, args.split, **options)
    identity = {"models": args.models, "benchmark": args.benchmark, "split": split.split}
    for out in (args.out, args.out.with_suffix(".json")):  # checked before any embedding
        reads = {"the --captions file": args.captions}
        claim(out, EMBEDDING_PLOT, flag="--out", reads=reads, identity=identity)
    gallery = {g: split.image_path(g) for g in split.gallery}
    captions = (
        load_captions(args.captions, gallery, benchmark=args.benchmark) if args.captions else None
    )
    queries = sample_queries(split, args.queries, args.seed)

    def corpus() -> list[str]:
        return [split.eval_text(q) for q in split.queries] + list((captions or {}).values())

    panels, entries = [], []
    for spec in args.models:
        model = load_model(spec, corpus, seed=args.seed).to(args.device).eval()
        with torch.inference_mode():
            emb = embed_kinds(
                model,
                split,
                queries,
                captions,
                empty_captions=args.empty_captions,
                batch_size=args.batch_size,
            )
        stats = separation(emb)
        x, labels = emb.stacked()
        title = f"tower: {model.config.tower} · {Path(spec).name}"
        panels.append(Panel(title, project(x, args.method, args.seed), labels, stats))
        entries.append(
            {
                "model": spec,
                "title": title,
                "tower": model.config.tower,
                "target_text": model.config.target_text,
                "fingerprint": model.fingerprint(),
                "stats": stats,
            }
        )
    made = record(EMBEDDING_PLOT, "csmcir plot embeddings", identity)
    save_panels(panels, args.out, args.method, made)
    report = {
        RECORD_KEY: made,
        "benchmark": args.benchmark,
        "split": split.split,
        "queries": len(queries),
        "method": args.method,
        "seed": args.seed,
        "captions": str(args.captions) if args.captions else None,
        "png": str(args.out),
        "models": entries,
    }
    atomic_write_json(args.out.with_suffix(".json"), report)
    return report

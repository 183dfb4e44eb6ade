"""``csmcir eval``: a benchmark's metrics for a model, or its test-server submission files.

csmcir eval --model checkpoints/synthcir-tiny --benchmark synthcir --root datasets/synthcir
csmcir eval --model DIR --benchmark fashioniq --root data/fashioniq --captions caps.json
csmcir eval --model DIR --benchmark cirr --root data/cirr --split test1 --submission out/
csmcir eval --model tiny ...      # untrained zero-shot baseline: what training adds
"""

from __future__ import annotations

import argparse
from pathlib import Path

from csmcir.data.captions import load_captions
from csmcir.data.records import CIRSplit
from csmcir.errors import ConfigError
from csmcir.evaluation import protocols, submission
from csmcir.evaluation.encode import DEFAULT_CACHE_DIR, load_model, pick_device
from csmcir.evaluation.runner import score_split
from csmcir.io import atomic_write_json

DEFAULT_SPLIT = {"shoes": "test", "fashion200k": "test"}  # the others: val
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported model folder, or a preset (tiny)")
    p.add_argument("--benchmark", required=True, help="synthcir, cirr, fashioniq, circo, ...")
    p.add_argument("--root", required=True, type=Path, help="the benchmark's folder")
    p.add_argument("--split", help="split to evaluate (default: val; shoes, fashion200k: test)")
    p.add_argument("--category", help="FashionIQ category (default: all three, and their means)")
    p.add_argument("--captions", type=Path, help="target-caption file (csmcir caption merge)")
    p.add_argument(
        "--empty-captions",
        action="store_true",
        help="encode gallery images without a caption with empty text instead of refusing",
    )
    p.add_argument(
        "--exclude-reference",
        choices=("default", "yes", "no"),
        default="default",
        help="remove the query's reference from its ranking (default: the benchmark's protocol)",
    )
    p.add_argument(
        "--caption-join",
        choices=tuple(protocols.CAPTION_JOINS),
        default=protocols.DEFAULT_JOIN,
        help="FashionIQ: how the two captions form one text (default 'and', CLIP4Cir/SPRC)",
    )
    p.add_argument(
        "--features", type=Path, help="frozen-ViT feature cache (csmcir features extract)"
    )
    p.add_argument("--submission", type=Path, help="write test-server files to this folder")
    p.add_argument("--name", default="csmcir", help="suffix of the submission file names")
    p.add_argument("--out", type=Path, help="results JSON (default runs/eval/<...>.json)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="gallery cache")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers reading images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0, help="tie-breaking and untrained-preset seed")
    p.add_argument("--drop-missing", action="store_true", help="drop queries with missing images")
    p.add_argument("--dropped-report", type=Path, help="where --drop-missing lists what it dropped")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="csmcir eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    print(format_results(results))
    return 0


def run(args: argparse.Namespace) -> dict:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    split_name = args.split or DEFAULT_SPLIT.get(args.benchmark, "val")
    if args.submission:
        submission.check_submission_split(args.benchmark, split_name)
    options = protocols.Options(
        exclude_reference={"default": None, "yes": True, "no": False}[args.exclude_reference],
        caption_join=args.caption_join,
        seed=args.seed,
    )
    splits = load_splits(args, split_name)
    protocol = {s.benchmark: protocols.apply_options(s, options) for s in splits}
    for s in splits:
        if not args.submission and not s.has_targets:
            raise ConfigError(
                f"{s.benchmark} {s.split} has no public answers: pass --submission DIR to write "
                "the test-server files, or evaluate a split with answers"
            )
    captions = load_captions(args.captions) if args.captions else None

    def corpus() -> list[str]:
        return [s.eval_text(q) for s in splits for q in s.queries] + list((captions or {}).values())

    model = load_model(args.model, corpus, seed=args.seed).to(pick_device(args.device))
    fingerprint = model.fingerprint()
    features = None
    if args.features:
        from csmcir.model.features import FeatureCache

        features = FeatureCache.open(args.features, model)  # another ViT's cache is refused
    metrics: dict[str, dict[str, float]] = {}
    types: dict[str, dict[str, dict]] = {}
    data: dict[str, dict] = {}
    written: list[str] = []
    for s in splits:
        scored = score_split(
            model,
            s,
            captions,
            empty_captions=args.empty_captions,
            cache_dir=None if args.no_cache else args.cache_dir,
            batch_size=args.batch_size,
            fingerprint=fingerprint,
            features=features,
            num_workers=args.workers,
        )
        data[s.benchmark] = s.summary() | {"gallery_from_cache": scored.gallery_from_cache}
        if args.submission:
            written += [str(p) for p in write_submission(s, scored, args)]
        else:
            metrics[s.benchmark] = protocols.compute(scored.scores, scored.prepared, args.seed)
            if protocols.query_groups(s):
                types[s.benchmark] = protocols.by_type(scored.scores, scored.prepared, args.seed)
    if args.benchmark == "fashioniq" and len(metrics) > 1:
        metrics["average"] = protocols.fashioniq_summary(metrics)
    results = {
        "benchmark": args.benchmark,
        "split": split_name,
        "model": {
            "source": args.model,
            "fingerprint": fingerprint,
            "preset": model.config.preset,
            "tower": model.config.tower,
            "target_text": model.config.target_text,
        },
        "data": {
            "root": str(args.root),
            "captions": str(args.captions) if args.captions else None,
            "empty_captions": args.empty_captions,
            "features": str(args.features) if args.features else None,
            "splits": data,
        },
        "protocol": protocol,
        "metrics": metrics,
        "by_type": types,
        "headline": headline(args.benchmark, metrics),
        "submission": written,
        "options": {
            k: v if v is None or isinstance(v, bool | int) else str(v)
            for k, v in vars(args).items()
        },
    }
    out = args.out or default_out(args, split_name)
    atomic_write_json(out, results)
    results["written_to"] = str(out)
    return results


def headline(benchmark: str, metrics: dict[str, dict[str, float]]) -> dict | None:
    """The benchmark's lead figure, e.g. CIRR's Avg or FashionIQ's mean of the averages."""
    name = protocols.HEADLINE.get(benchmark)
    row = metrics.get("average") or (next(iter(metrics.values())) if len(metrics) == 1 else {})
    return {"name": name, "value": row[name]} if name in row else None


def load_splits(args: argparse.Namespace, split_name: str) -> list[CIRSplit]:
    from csmcir.data.registry import load_split

    common = {"drop_missing": args.drop_missing, "dropped_report": args.dropped_report}
    if args.benchmark == "fashioniq":
        categories = [args.category] if args.category else list(FASHIONIQ_CATEGORIES)
        return [
            load_split("fashioniq", args.root, split_name, category=c, **common) for c in categories
        ]
    if args.category:
        raise ConfigError(f"--category applies to fashioniq, not {args.benchmark}")
    return [load_split(args.benchmark, args.root, split_name, **common)]


def write_submission(split: CIRSplit, scored, args: argparse.Namespace) -> list[Path]:
    p, seed = scored.prepared, args.seed
    if split.benchmark == "cirr":
        top50 = protocols.submission_rankings(scored.scores, p, submission.CIRR_RECALL_TOP, seed)
        top3 = protocols.submission_rankings(
            scored.scores, p, submission.CIRR_SUBSET_TOP, seed, subset=True
        )
        return submission.write_cirr_submission(split, top50, top3, args.submission, args.name)
    top = protocols.submission_rankings(scored.scores, p, submission.CIRCO_TOP, seed)
    return [submission.write_circo_submission(split, top, args.submission, args.name)]


def default_out(args: argparse.Namespace, split_name: str) -> Path:
    model_name = Path(args.model).name or "model"
    category = f"-{args.category}" if args.category else ""
    return Path("runs") / "eval" / f"{model_name}-{args.benchmark}{category}-{split_name}.json"


def format_by_type(groups: dict[str, dict], columns: tuple[str, ...] = ()) -> str:
    """One row per query group of :func:`protocols.by_type`: its query count, then its metrics."""
    columns = columns or tuple(k for k in next(iter(groups.values())) if k != "queries")
    width = max(len(g) for g in groups) + 2
    lines = [" " * width + f"{'queries':>9}" + "".join(f"{c:>11}" for c in columns)]
    for group, values in groups.items():
        cells = "".join(f"{values[c]:>11.2f}" for c in columns)
        lines.append(f"{group:<{width}}{values['queries']:>9}{cells}")
    return "\n".join(lines)


def format_results(results: dict) -> str:
    """The metrics as a text table, then the protocol values in force and where things went."""
    lines = [
        f"{results['benchmark']} {results['split']}, model {results['model']['source']} "
        f"({results['model']['fingerprint'][:12]}, target_text={results['model']['target_text']})"
    ]
    for name, summary in results["data"]["splits"].items():
        cached = " (gallery from cache)" if summary["gallery_from_cache"] else ""
        lines.append(
            f"  {name}: {summary['queries']} queries, gallery {summary['gallery']} images, "
            f"{summary['dropped']} dropped{cached}"
        )
    metrics = results["metrics"]
    if metrics:
        columns = list(dict.fromkeys(k for m in metrics.values() for k in m))
        width = max(len(r) for r in metrics) + 2
        lines.append("")
        lines.append(" " * width + "".join(f"{c:>11}" for c in columns))
        for row, values in metrics.items():
            cells = "".join(f"{values[c]:>11.2f}" if c in values else " " * 11 for c in columns)
            lines.append(f"{row:<{width}}{cells}")
    for name, groups in results.get("by_type", {}).items():
        lines.append("")
        lines.append(f"{name} by modification type (change:<attribute> = what a change edits):")
        lines.append(format_by_type(groups))
    if results["headline"]:
        lines.append(f"headline {results['headline']['name']}: {results['headline']['value']:.2f}")
    lines.append("")
    for name, values in results["protocol"].items():
        lines.append(f"protocol {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    if results["data"]["captions"] or results["model"]["target_text"] == "caption":
        lines.append(
            f"target captions: {results['data']['captions']}"
            + (" (missing ones encoded as empty text)" if results["data"]["empty_captions"] else "")
        )
    for path in results["submission"]:
        lines.append(f"submission written and checked: {path}")
    lines.append(f"results: {results['written_to']}")
    return "\n".join(lines)

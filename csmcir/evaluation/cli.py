"""``csmcir eval``: a benchmark's metrics for a model, or its test-server submission files.

csmcir eval --model checkpoints/synthcir-tiny --benchmark synthcir --root datasets/synthcir \\
    --captions datasets/synthcir/mcot_captions.json   # a run folder: its model/ is evaluated
csmcir eval --model DIR --benchmark fashioniq --root data/fashioniq --captions caps.json
csmcir eval --model DIR --benchmark cirr --root data/cirr --split test1 --submission out/
csmcir eval --model tiny ...      # untrained zero-shot baseline: what training adds
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from csmcir.data.captions import load_captions
from csmcir.data.records import CIRSplit
from csmcir.device import add_device_argument
from csmcir.errors import ConfigError, warn
from csmcir.evaluation import protocols, submission
from csmcir.evaluation.encode import DEFAULT_CACHE_DIR, load_model
from csmcir.evaluation.runner import score_split
from csmcir.io import atomic_write_json
from csmcir.model.run_folder import BEST_MODEL, FINAL_MODEL, model_folder
from csmcir.outputs import EVAL_RESULTS, RECORD_KEY, claim, file_digest, record

DEFAULT_SPLIT = {"shoes": "test", "fashion200k": "test"}  # the others: val
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="exported model folder, a training run folder (its model/), a preset (tiny), or a hub "
        "name (org/name, fetched into the hub cache)",
    )
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
    p.add_argument(
        "--out",
        type=Path,
        help="results JSON (default: runs/eval/<model>-<fingerprint>-<benchmark>-<split>"
        "[-captions-<name>-<digest>].json, <model> being <run>-model for a run's export); only "
        "a new file or earlier results are written over, never an input or another file",
    )
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="gallery cache")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers reading images")
    add_device_argument(p)
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
                f"{s.benchmark} {s.split} has no public answers: "
                + submission.how_to_score(args.benchmark, split_name)
            )
    gallery = {g: s.image_path(g) for s in splits for g in s.gallery}
    captions = (
        load_captions(args.captions, gallery, benchmark=args.benchmark) if args.captions else None
    )
    caption_id = f"{args.captions.stem}-{file_digest(args.captions, 8)}" if args.captions else None

    def corpus() -> list[str]:
        return [s.eval_text(q) for s in splits for q in s.queries] + list((captions or {}).values())

    spec = str(model_folder(args.model)) if Path(args.model).is_dir() else args.model
    model = load_model(spec, corpus, seed=args.seed).to(args.device)
    fingerprint = model.fingerprint()
    identity = {
        "model": f"{args.model} ({fingerprint[:12]})",
        "benchmark": args.benchmark,
        "split": split_name,
        "captions": caption_id,
    }
    out = args.out or default_out(args, split_name, spec, fingerprint, caption_id)
    claim(out, EVAL_RESULTS, flag="--out", reads=inputs(args), identity=identity)
    features = None
    if args.features:
        from csmcir.model.features import FeatureCache

        features = FeatureCache.open(args.features, model)  # another ViT's cache is refused
    metrics: dict[str, dict[str, float]] = {}
    types: dict[str, dict[str, dict]] = {}
    first: dict[str, dict[str, float]] = {}
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
        data[s.benchmark] = s.summary() | {
            "gallery_from_cache": scored.gallery_from_cache,
            "texts_cut": texts_cut(model, s, scored.prepared.texts, captions),
            "texts_unknown": texts_unknown(model, s, scored.prepared.texts, captions),
        }
        if args.submission:
            written += [str(p) for p in write_submission(s, scored, args)]
        else:
            metrics[s.benchmark] = protocols.compute(scored.scores, scored.prepared, args.seed)
            if protocols.query_groups(s):
                types[s.benchmark] = protocols.by_type(scored.scores, scored.prepared, args.seed)
            if top1 := protocols.top1_in_subset(scored.scores, scored.prepared, args.seed):
                first[s.benchmark] = top1
    if args.benchmark == "fashioniq" and len(metrics) > 1:
        metrics["average"] = protocols.fashioniq_summary(metrics)
    results = {
        RECORD_KEY: record(EVAL_RESULTS, "csmcir eval", identity),
        "benchmark": args.benchmark,
        "split": split_name,
        "model": {
            "source": args.model,
            "folder": str(Path(spec).resolve()) if Path(spec).is_dir() else None,
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
        "top1": first,
        "headline": headline(args.benchmark, metrics),
        "submission": written,
        "options": {
            k: v if v is None or isinstance(v, bool | int) else str(v)
            for k, v in vars(args).items()
        },
    }
    atomic_write_json(out, results)
    results["written_to"] = str(out)
    return results


def texts_cut(model, split: CIRSplit, queries: list[str], captions) -> dict[str, int]:
    """How many query texts and gallery captions are longer than the model reads (it reads
    their first ``max_text_length`` tokens, as every CIR codebase does); said when any."""
    said = "are longer than the model reads and were cut to their first tokens"
    texts = gallery_captions(model, split, captions)
    return count_texts(split, queries, texts, model.truncated, said)


def texts_unknown(model, split: CIRSplit, queries: list[str], captions) -> dict[str, int]:
    """How many query texts and gallery captions are mostly unknown to the tokenizer (read as
    [UNK]: such a query is answered by its reference image alone); said when any."""
    said = (
        "are mostly unknown to the model's tokenizer (read as [UNK]): the model reads little "
        "or nothing of them"
    )
    texts = gallery_captions(model, split, captions)
    return count_texts(split, queries, texts, model.mostly_unknown, said)


def count_texts(
    split: CIRSplit,
    queries: list[str],
    captions: list[str],
    flag: Callable[[list[str]], list],
    said: str,
) -> dict[str, int]:
    """Count the queries and captions ``flag`` marks (not None) and warn with ``said`` if any."""
    counts = {"queries": sum(f is not None for f in flag(queries))}
    if captions:
        counts["captions"] = sum(f is not None for f in flag(captions))
    if any(counts.values()):
        warn(
            f"{split.benchmark} {split.split}: {counts['queries']} of {len(queries)} query texts"
            + (f" and {counts['captions']} gallery captions" if counts.get("captions") else "")
            + f" {said}"
        )
    return counts


def gallery_captions(model, split: CIRSplit, captions) -> list[str]:
    """The captions the model reads with the gallery images (none for image-only targets)."""
    if model.config.target_text != "caption" or not captions:
        return []
    return [captions[g] for g in split.gallery if g in captions]


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


def inputs(args: argparse.Namespace) -> dict[str, Path | None]:
    """The files eval reads or writes besides its results, which its --out must never be."""
    return {
        "the --captions file": args.captions,
        "the --features cache": args.features,
        "the --dropped-report file": args.dropped_report,
        "the --model folder": Path(args.model) if Path(args.model).exists() else None,
    }


def default_out(
    args: argparse.Namespace,
    split_name: str,
    spec: str,
    fingerprint: str,
    caption_id: str | None = None,
) -> Path:
    """A name of its own per model, protocol and caption file: every run exports a folder
    called ``model``, so the folder's name alone would give ``runs/A/model`` and
    ``runs/B/model`` one file, and two caption files would give one model one file."""
    folder = Path(spec)
    if not folder.is_dir():
        label = spec  # a preset
    elif folder.name in (FINAL_MODEL, BEST_MODEL):
        label = f"{folder.resolve().parent.name}-{folder.name}"
    else:
        label = folder.resolve().name
    parts = [label, fingerprint[:8], args.benchmark, args.category, split_name]
    if args.exclude_reference != "default":
        parts.append(f"exclude-reference-{args.exclude_reference}")
    if args.caption_join != protocols.DEFAULT_JOIN:
        parts.append(f"join-{args.caption_join}")
    if caption_id:
        parts.append(f"captions-{caption_id}")
    return Path("runs") / "eval" / ("-".join(p for p in parts if p) + ".json")


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
            f"{summary['dropped_queries']} queries dropped ({summary['dropped']} missing "
            f"images){cached}"
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
    for name, top1 in results.get("top1", {}).items():
        lines.append(
            f"{name}: the first result is in the query's subset for "
            f"{top1['top-1 in subset']:.2f}% of queries; R@1 among those "
            f"{top1['R@1 | top-1 in subset']:.2f}%"
        )
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

"""``csmcir caption``: run a captioning backend over a gallery, merge its shards, show a record."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from captioning.prompts import DEFAULT_MAX_WORDS, DOMAINS, LEVELS, STYLES, PromptSpec, domain_for
from csmcir.device import DEVICE_HELP, resolve_device
from csmcir.errors import ConfigError, DataError

BACKENDS = ("oracle", "hf", "openai")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to caption")
    g.add_argument("--benchmark", required=True, help="registry name, e.g. synthcir, cirr")
    g.add_argument("--root", type=Path, required=True, help="the benchmark's root folder")
    g.add_argument("--split", required=True, help="a split name, or 'all' for every split")
    g.add_argument("--category", help="FashionIQ category (dress, shirt, toptee)")
    g.add_argument("--drop-missing", action="store_true", help="skip (and list) missing images")
    g.add_argument(
        "--train-targets-only",
        action="store_true",
        help="of the train split, caption only the images its queries target (all that "
        "training reads); evaluation splits still get their whole gallery",
    )
    g = p.add_argument_group("where and how")
    g.add_argument("--backend", choices=BACKENDS, required=True)
    g.add_argument("--out", type=Path, required=True, help="folder of JSONL caption shards")
    g.add_argument("--shard", default="0/1", help="i/n: this process takes shard i (from 0) of n")
    g.add_argument(
        "--retry-failed", action="store_true", help="try again the ids recorded as failures"
    )
    g.add_argument("--max-attempts", type=int, default=3, help="asks per image (default 3)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("prompt")
    g.add_argument("--domain", choices=tuple(DOMAINS), help="default: from --benchmark")
    g.add_argument("--style", choices=STYLES, default="mcot", help="mcot levels, or plain")
    g.add_argument(
        "--levels",
        default=",".join(LEVELS),
        help=f"mcot levels to ask (default {','.join(LEVELS)})",
    )
    g.add_argument(
        "--max-words",
        type=int,
        default=DEFAULT_MAX_WORDS,
        help=f"Final_Caption word limit (default {DEFAULT_MAX_WORDS}, ~30 Q-Former tokens)",
    )
    g = p.add_argument_group("oracle backend")
    g.add_argument("--scenes", type=Path, help="scenes file (default <root>/scenes.json)")
    g.add_argument("--noise", type=float, default=0.0, help="chance of misperceiving an attribute")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise and of hf sampling")
    g = p.add_argument_group("hf backend")
    g.add_argument(
        "--model-dir",
        help="AutoModelForImageTextToText: a local folder, or a hub name (Qwen/Qwen2-VL-2B-Instruct"
        ", org/name@revision) fetched into the hub cache",
    )
    g.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--batch-size", type=int, default=4, help="images per generate call")
    g.add_argument("--max-new-tokens", type=int, default=384)
    g.add_argument("--retry-temperature", type=float, default=0.7, help="sampling on retries")
    g = p.add_argument_group("openai backend")
    g.add_argument("--base-url", help="server URL up to /v1, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", help="model name the server serves")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env variable with the key")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--http-retries", type=int, default=5, help="retries on 429/5xx/timeouts")
    g.add_argument("--max-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.0, help="first attempt's temperature")
    g.add_argument("--json-mode", action="store_true", help="send response_format json_object")


# The options each backend reads (--seed: the oracle's noise and hf's sampling).
BACKEND_OPTIONS = {
    "oracle": ("scenes", "noise", "seed"),
    "hf": (
        *("model_dir", "dtype", "device", "batch_size", "max_new_tokens", "retry_temperature"),
        "seed",
    ),
    "openai": (
        *("base_url", "model", "api_key_env", "concurrency", "timeout", "http_retries"),
        *("max_tokens", "temperature", "json_mode"),
    ),
}


def refuse_unread_options(args: argparse.Namespace) -> None:
    """An option of another backend, set, would be dropped: say which backend reads it."""
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    read = BACKEND_OPTIONS[args.backend]
    unread = [
        f"--{dest.replace('_', '-')} (read by --backend {backend})"
        for backend, dests in BACKEND_OPTIONS.items()
        for dest in dests
        if dest not in read and getattr(args, dest) != parser.get_default(dest)
    ]
    if unread:
        raise ConfigError(
            f"--backend {args.backend} does not read {', '.join(dict.fromkeys(unread))}: "
            "leave them out, or pick that backend"
        )


def make_backend(args: argparse.Namespace):
    """The backend the flags ask for; imports only that backend's dependencies."""
    refuse_unread_options(args)
    if args.backend == "oracle":
        from captioning.backends.oracle import OracleBackend

        return OracleBackend(args.scenes or args.root / "scenes.json", args.noise, args.seed)
    if args.backend == "hf":
        if args.model_dir is None:
            raise ConfigError("--backend hf needs --model-dir (a local model folder or a hub name)")
        from captioning.backends.hf import HFBackend

        return HFBackend(
            args.model_dir,
            dtype=args.dtype,
            device=str(resolve_device(args.device)),
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            retry_temperature=args.retry_temperature,
            seed=args.seed,
        )
    if not args.base_url or not args.model:
        raise ConfigError("--backend openai needs --base-url and --model")
    from captioning.backends.openai import OpenAIBackend

    return OpenAIBackend(
        args.base_url,
        args.model,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        timeout=args.timeout,
        http_retries=args.http_retries,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        retry_temperature=args.retry_temperature,
        json_mode=args.json_mode,
    )


def run(args: argparse.Namespace) -> int:
    from captioning.runner import run_captioning
    from captioning.store import CaptionStore, Shard, run_identity
    from captioning.targets import gallery_images
    from csmcir.data import registry
    from csmcir.outputs import CAPTION_SHARDS, claim, file_digest

    if args.max_attempts < 1:
        raise ConfigError("--max-attempts must be at least 1")
    registry.spec(args.benchmark)  # an unknown name is reported before anything slow runs
    claim(args.out, CAPTION_SHARDS, flag="--out")  # a new folder, or one of caption run's
    shard = Shard.parse(args.shard)
    levels = tuple(lv.strip() for lv in args.levels.split(",") if lv.strip())
    spec = PromptSpec(args.domain or domain_for(args.benchmark), args.style, levels, args.max_words)
    backend = make_backend(args)
    options = {"category": args.category} if args.category else {}
    images, dropped = gallery_images(
        args.benchmark,
        args.root,
        args.split,
        drop_missing=args.drop_missing,
        train_targets_only=args.train_targets_only,
        **options,
    )
    if dropped:
        print(
            f"dropped {len(dropped)} missing image(s) (--drop-missing): {', '.join(dropped[:10])}"
        )
    ids = list(images)
    backend.check(spec, ids)
    fingerprints = {i: file_digest(path) for i, path in images.items()}
    identity = run_identity(args.benchmark, args.root, args.split, fingerprints, **options)
    with CaptionStore(args.out, shard) as store:
        store.check_settings(spec.version, backend.model, ids, identity, fingerprints)
        if store.repaired:
            print(f"cut a torn last line in {store.path} (killed run); that image is redone")
        todo = store.pending(ids, retry_failed=args.retry_failed)
        mine = sum(shard.owns(i) for i in ids)
        print(
            f"{len(ids)} images; shard {args.shard} holds {mine}, {mine - len(todo)} done, "
            f"{len(todo)} to caption with {backend.model} (prompt {spec.version})"
        )
        summary = run_captioning(
            backend,
            {i: images[i] for i in todo},
            spec,
            store,
            max_attempts=args.max_attempts,
            progress=not args.no_progress,
        )
    print(
        f"captioned {summary.captioned}, failed {summary.failed} in {summary.seconds:.1f} s "
        f"({summary.rate:.1f} img/s) -> {store.path}"
    )
    return 0


def merge(args: argparse.Namespace) -> int:
    from captioning.merge import merge_folder

    report = merge_folder(args.shards_dir, args.out, allow_partial=args.allow_partial)
    print(report.summary())
    return 0


def show(args: argparse.Namespace) -> int:
    from captioning.merge import failures_path_for
    from captioning.store import iter_history
    from csmcir.io import read_json

    source: Path = args.source
    if source.is_dir():
        records = list(iter_history(source, args.image_id))
    elif source.is_file():
        records = []
        for path, status in ((source, "ok"), (failures_path_for(source), "failed")):
            data = read_json(path, "caption file") if path.is_file() else {}
            if isinstance(data, dict) and args.image_id in data:
                entry = data[args.image_id]
                entry = entry if isinstance(entry, dict) else {"Final_Caption": entry}
                records.append({"image_id": args.image_id, "status": status, **entry})
    else:
        raise DataError(f"--from: no caption folder or file at {source}")
    if not records:
        raise DataError(f"no record for image id {args.image_id!r} in {source}")
    for rec in records:
        print(format_record(rec))
    return 0


def format_record(rec: dict) -> str:
    """A record as a person reads it: settings first, then levels, then the caption or reason."""
    head = f"{rec['image_id']}  [{rec.get('status', 'ok')}]"
    meta = [f"{k}: {rec[k]}" for k in ("prompt_version", "model", "attempts", "time") if k in rec]
    lines = [head, *(f"  {m}" for m in meta)]
    for level, text in (rec.get("levels") or {}).items():
        lines.append(f"  {level}: {text}")
    if rec.get("missing_levels"):
        lines.append(f"  missing levels: {', '.join(rec['missing_levels'])}")
    if "Final_Caption" in rec:
        lines.append(f"  Final_Caption: {rec['Final_Caption']}")
    for i, reason in enumerate(
        rec.get("reasons") or ([rec["reason"]] if "reason" in rec else []), 1
    ):
        lines.append(f"  attempt {i}: {reason}")
    if rec.get("raw"):
        lines.append(f"  last answer: {rec['raw'][:500]!r}")
    return "\n".join(lines)


def resume_hint(argv: list[str]) -> str | None:
    """After Ctrl+C in ``caption run``: the shards keep every finished record."""
    return "the captions it wrote are kept" if argv[:1] == ["run"] else None


def main(argv: list[str]) -> int | None:
    parser = argparse.ArgumentParser(prog="csmcir caption", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    add_run_arguments(sub.add_parser("run", help="caption a benchmark's gallery images"))
    p = sub.add_parser("merge", help="merge a folder of shards into one caption file")
    p.add_argument("shards_dir", type=Path, help="the --out folder of 'caption run'")
    p.add_argument("--out", type=Path, required=True, help="merged caption JSON file")
    p.add_argument(
        "--allow-partial", action="store_true", help="write even if some images have no record"
    )
    p = sub.add_parser("show", help="print the record(s) of one image")
    p.add_argument("image_id")
    p.add_argument(
        "--from", dest="source", type=Path, required=True, help="shard folder or merged file"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    code = {"run": run, "merge": merge, "show": show}[args.action](args)
    if args.action == "run":
        print(f"done in {time.perf_counter() - start:.1f} s")
    return code

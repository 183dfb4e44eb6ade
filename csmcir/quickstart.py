"""``csmcir quickstart``: the whole method end to end on the synthetic benchmark, on a CPU
(or a GPU: ``--device cuda``).

Data -> oracle MCoT captions -> fine-tuning the tiny preset from its shipped stage-1 weights
(csmcir/train/stage_one.py) with the gated memory bank and the two-way loss (the recipe chosen on
val: docs/training.md) -> evaluation against its start, an
untrained model and chance -> a faiss index -> an example search (grid PNG) -> an embedding
plot. Every stage reuses what an earlier run with the same settings left (the generator is
deterministic, captioning resumes, training is skipped when the exported model exists unless
``--retrain``, and resumes from ``last.ckpt`` when it was interrupted), so a second run is
quick. The benchmark records its settings (``synth_config.json``) and the run folder its
training settings (``quickstart.json``): a run with other settings (``--seed``, ``--steps``,
``--size``, another ``--config``) is refused with what differs, never answered with the old data
or model, unless ``--overwrite`` regenerates them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from csmcir.device import resolve_device
from csmcir.errors import ConfigError
from csmcir.io import atomic_write_json
from csmcir.packaged import config_file

RECORD = "quickstart.json"  # in the run folder: the settings its model was trained with
CAPTIONS = Path("mcot_captions.json")  # in the benchmark folder, with mcot_captions_shards/
# What the quickstart adds to its config's recipe, besides the shipped stage-1 start: the gated
# memory bank (the whole method; +1.4% a step), the two-way loss and an initial temperature of
# 0.1 (both chosen on val, docs/training.md). The comparison with the baseline trains the same.
RECIPE = {"model.bank.enabled": True, "model.symmetric_loss": True, "model.temperature": 0.1}
METRIC_COLUMNS = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "Avg")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=Path("datasets/synthcir"), help="benchmark folder")
    p.add_argument(
        "--run-dir", type=Path, default=Path("checkpoints/synthcir-tiny"), help="training output"
    )
    p.add_argument(
        "--config",
        type=config_file,
        default="synthcir",
        help="fit config to train: a YAML file or a packaged config's name (default: synthcir)",
    )
    p.add_argument("--steps", type=int, help="training steps (default: the config's max_steps)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, training and the example")
    p.add_argument(
        "--device",
        type=resolve_device,
        default="cpu",
        help="cpu (default; the README's figures), cuda, cuda:1 or auto: where to train and "
        "encode, checked before anything is made. GPU arithmetic differs from the CPU's in the "
        "last bits, and so do the trained model's recalls",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train again even if the run has a model (replacing it)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="regenerate the benchmark (and its captions) and retrain when the ones there were "
        "made with other settings; without it such a run is refused",
    )
    p.add_argument(
        "--size",
        choices=("default", "small"),
        default="default",
        help="'small' generates a tiny benchmark (a smoke test, not a result)",
    )


def resume_hint(argv: list[str]) -> str:
    """After Ctrl+C: every stage reuses or finishes what an earlier run of its settings left."""
    return "the stages it finished are kept"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="csmcir quickstart", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


class Stages:
    """Times each stage and prints its one-line summary."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.times: dict[str, float] = {}

    def run(self, name: str, work: Callable[[], tuple[Any, str]]) -> Any:
        self.done += 1
        print(f"\n[{self.done}/{self.total}] {name}", flush=True)
        t0 = time.perf_counter()
        result, summary = work()
        self.times[name] = time.perf_counter() - t0
        print(
            f"[{self.done}/{self.total}] {name}: {summary} ({self.times[name]:.1f} s)", flush=True
        )
        return result

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def run(args: argparse.Namespace) -> dict[str, Any]:
    root, run_dir = args.root, args.run_dir
    captions_file = root / CAPTIONS
    pictures = run_dir / "quickstart"
    stages = Stages(total=7)

    stages.run("synthetic benchmark", lambda: make_data(root, args))
    stages.run("MCoT captions (oracle)", lambda: make_captions(root, captions_file))
    model_dir = stages.run(
        "fine-tuning the tiny preset from its stage-1 weights", lambda: train(args, captions_file)
    )
    evaluated = stages.run("evaluation on the test split", lambda: evaluate(args, model_dir))
    index_dir = stages.run("faiss index of the test gallery", lambda: build_index(args, model_dir))
    grids = stages.run(
        "example searches",
        lambda: example_searches(args, model_dir, index_dir, evaluated, pictures),
    )
    plot = stages.run("embedding plot", lambda: embedding_plot(args, model_dir, pictures))

    from csmcir.evaluation.cli import format_by_type

    table = evaluated["table"]
    print("\nSynthetic test split (recall in %; the reference is excluded from its ranking):")
    print(format_table(table))
    print(
        "(stage-1: the shipped image-text start before fine-tuning; text-blind: the best "
        "ranking that ignores the text,\n the same for every query of a reference; oracle: "
        "reads scenes.json and the text's words, docs/synthcir.md)"
    )
    print("\nThe trained model by modification type (change:<attribute>: what a change edits):")
    print(format_by_type(evaluated["by_type"], columns=("R@1", "R@10", "Rsubset@1", "Avg")))
    summary = {
        "table": table,
        "by_type": evaluated["by_type"],
        "stages": stages.times,
        "model": {"folder": str(model_dir), "fingerprint": evaluated["fingerprint"]},
    }
    atomic_write_json(pictures / "summary.json", summary)
    print(f"\nquickstart finished in {stages.elapsed / 60:.1f} min. It wrote:")
    for label, path in (
        ("benchmark", root),
        ("captions", captions_file),
        ("trained model", model_dir),
        ("index", index_dir),
        ("retrieval grids", pictures / "retrieval_*.png"),
        ("summary", pictures / "summary.json"),
        ("embedding plot", plot),
        ("training logs", run_dir / "logs"),
    ):
        print(f"  {label:<15} {path}")
    print(f"\nTry the model in a browser:  csmcir demo --index {index_dir}")
    return {**summary, "grids": grids, "seconds": stages.elapsed, "model": model_dir}


def data_config(args: argparse.Namespace):
    from csmcir.data.synth_build import SynthConfig

    sizes = dict(train_refs=300, val_refs=24, test_refs=24) if args.size == "small" else {}
    return SynthConfig(seed=args.seed, **sizes)


def make_data(root: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """The benchmark of these settings: reused, completed after an interruption, or (with
    --overwrite) regenerated over one made with other settings, never reused in its place."""
    from csmcir.data.synth import generate, is_complete, recorded_config

    wanted, recorded = data_config(args), recorded_config(root)
    if is_complete(root):
        if recorded == wanted:
            return root, f"reusing {root} (generated with these settings)"
        if not args.overwrite:
            raise ConfigError(
                f"--root {root} holds a synthetic benchmark generated with other settings "
                f"({differences(recorded, wanted)}); reusing it would answer for the old "
                "settings. Pass --overwrite to regenerate it (the captions and the model made "
                "from it are then made again too), or give these settings their own folders: "
                "--root DIR --run-dir DIR"
            )
        done = f"regenerated {root} (--overwrite)"
    elif recorded is not None:
        done = f"completed the generation an earlier run left unfinished in {root}"
    elif root.is_dir() and any(root.iterdir()):
        raise ConfigError(
            f"--root {root} is not empty and holds no synthetic benchmark: give the quickstart "
            "an empty or new folder (--root DIR)"
        )
    else:
        done = f"generated in {root}"
    for stale in root.glob(f"{CAPTIONS.stem}*"):  # captions of other images, keyed by image id
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    splits = generate(root, wanted, overwrite=True)
    images = sum(len(s.names) for s in splits.values())
    queries = sum(len(s.queries()) for s in splits.values())
    return root, f"{images:,} images, {queries:,} queries {done}"


def differences(recorded, wanted) -> str:
    """``seed 0 (now 1), ...``: what an earlier run's settings and this run's disagree on."""
    if recorded is None:
        return "not recorded: made by an older csmcir"
    old = recorded if isinstance(recorded, dict) else dataclasses.asdict(recorded)
    new = wanted if isinstance(wanted, dict) else dataclasses.asdict(wanted)
    return ", ".join(
        f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in new if old.get(k) != new.get(k)
    )


def make_captions(root: Path, captions_file: Path) -> tuple[Path, str]:
    from captioning.cli import main as caption_main
    from csmcir.data.captions import load_captions

    shards = root / "mcot_captions_shards"
    common = ["--benchmark", "synthcir", "--root", str(root), "--split", "all"]
    common.append("--train-targets-only")  # training reads the captions of its targets only
    try:
        caption_main(["run", *common, "--backend", "oracle", "--out", str(shards)])
    except ConfigError as e:  # captions of another prompt version or image set: its advice
        raise ConfigError(  # is a flag of csmcir caption, so say what works here
            f"{e}\nThese are the quickstart's own captions: delete {shards} and {captions_file}, "
            "and the next run makes them again (seconds, with the oracle)"
        ) from None
    caption_main(["merge", str(shards), "--out", str(captions_file)])
    return captions_file, f"{len(load_captions(captions_file)):,} captions in {captions_file}"


def training_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that changes the trained model (the device only changes its last bits)."""
    config = args.config.read_bytes()
    default_steps = (yaml.safe_load(config) or {}).get("trainer", {}).get("max_steps")
    return {
        "data": dataclasses.asdict(data_config(args)),
        "seed": args.seed,
        "steps": args.steps or default_steps,
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "start_sha256": stage_one_start()["sha256"],
    }


def stage_one_start() -> dict[str, Any]:
    """The record of the shipped stage-1 weights the quickstart fine-tunes (checked against
    them), as the real method fine-tunes BLIP-2's stage-1 Q-Former (docs/training.md)."""
    from csmcir.train.stage_one import shipped_record

    return shipped_record()


def train(args: argparse.Namespace, captions_file: Path) -> tuple[Path, str]:
    """The model of these settings: reused, resumed after an interruption, or trained (over one
    trained with other settings only with --retrain or --overwrite)."""
    from csmcir.io import atomic_write_json, read_json
    from csmcir.model.run_folder import FINAL_MODEL, LAST_CKPT, MODEL_CONFIG, earlier_run
    from csmcir.train.cli import run as fit
    from csmcir.train.stage_one import SHIPPED as STAGE_ONE

    model_dir = args.run_dir / FINAL_MODEL
    wanted = training_settings(args)
    record = args.run_dir / RECORD
    recorded = read_json(record, "quickstart record")["settings"] if record.is_file() else None
    same = recorded == wanted
    if (model_dir / MODEL_CONFIG).is_file() and same and not args.retrain:
        trained = read_json(record, "quickstart record").get("model")
        if trained != model_digest(model_dir):
            why = (
                f"another csmcir fit in --run-dir {args.run_dir} replaced it"
                if trained
                else "the quickstart record names none: written by an older csmcir, or "
                "training stopped before it was finished"
            )
            raise ConfigError(
                f"{model_dir} is not the model the quickstart trained with these settings "
                f"({why}); reporting it would report another model. Pass --retrain to train "
                "it again with these settings, or give them their own folder: --run-dir DIR"
            )
        return model_dir, f"reusing {model_dir} (same settings; --retrain to train again)"
    earlier = earlier_run(args.run_dir)
    if earlier and not same and not (args.retrain or args.overwrite):
        raise ConfigError(
            f"--run-dir {args.run_dir} holds a model trained with other settings "
            f"({differences(recorded, wanted)}); reusing it would report the old model. Pass "
            "--retrain to train it again with these settings (replacing it), or give them their "
            "own folder: --run-dir DIR"
        )
    resume = same and not args.retrain and (args.run_dir / LAST_CKPT).is_file()
    atomic_write_json(record, {"settings": wanted, "device": str(args.device)})
    argv = [
        "fit",
        "--config",
        str(args.config),
        "--seed_everything",
        str(args.seed),
        "--trainer.default_root_dir",
        str(args.run_dir),
        "--data.root",
        str(args.root),
        "--data.captions",
        str(captions_file),
        "--model.init_from",
        str(STAGE_ONE),
    ]
    for flag, value in RECIPE.items():
        argv += [f"--{flag}", str(value).lower()]
    if args.steps:
        argv += ["--trainer.max_steps", str(args.steps)]
    if args.device.type == "cuda":
        argv += ["--trainer.accelerator", "gpu", "--trainer.devices", f"[{args.device.index or 0}]"]
    if args.size == "small":
        argv += ["--trainer.val_check_interval", str(args.steps or 20), "--data.batch_size", "32"]
    if resume:  # an earlier run of these settings was stopped mid-training
        argv += ["--ckpt_path", str(args.run_dir / LAST_CKPT)]
    elif earlier:
        argv += ["--overwrite", "true"]
    cli = fit(argv)
    trained = {"settings": wanted, "device": str(args.device), "model": model_digest(model_dir)}
    atomic_write_json(record, trained)  # what a later run may reuse, and only that
    steps = cli.trainer.global_step
    how = f"resumed from {LAST_CKPT}, " if resume else ""
    return model_dir, f"{steps} steps ({how}exported to {model_dir})"


def model_digest(model_dir: Path) -> str:
    """The identity of an exported model folder: a digest of its config and weights files."""
    from csmcir.model.folder import WEIGHTS_FILE
    from csmcir.model.run_folder import MODEL_CONFIG
    from csmcir.outputs import file_digest, short_digest

    files = [model_dir / name for name in (MODEL_CONFIG, WEIGHTS_FILE)]
    return short_digest(*(file_digest(f) for f in files if f.is_file()), length=16)


def evaluate(args: argparse.Namespace, model_dir: Path) -> tuple[dict[str, Any], str]:
    """Overall and per-type recall of the trained model, beside the rows that frame them:
    its stage-1 start before fine-tuning, an untrained model, chance, the best any text-blind
    ranking can do, and the oracle."""
    from csmcir.data.captions import load_captions
    from csmcir.data.registry import load_split
    from csmcir.data.synth_truth import load_scenes, oracle_scores
    from csmcir.evaluation.bounds import text_blind_scores
    from csmcir.evaluation.protocols import by_type, compute
    from csmcir.evaluation.runner import score_split
    from csmcir.model import CSMCIR
    from csmcir.train.stage_one import SHIPPED as STAGE_ONE

    split = load_split("synthcir", args.root, "test")
    gallery = {g: split.image_path(g) for g in split.gallery}
    captions = load_captions(args.root / CAPTIONS, gallery, benchmark="synthcir")
    trained = CSMCIR.from_pretrained(model_dir).to(args.device).eval()
    # The untrained baseline: same architecture and tokenizer, fresh random weights.
    torch.manual_seed(args.seed)
    untrained = CSMCIR(trained.config, trained.tokenizer).to(args.device).eval()
    scored = score_split(trained, split, captions, cache_dir=gallery_cache(args))
    prepared = scored.prepared
    blank = score_split(untrained, split, captions, cache_dir=None)
    start = CSMCIR.from_pretrained(STAGE_ONE).to(args.device).eval()
    before = score_split(start, split, captions, cache_dir=None)
    table = {
        "trained": compute(scored.scores, prepared),
        "stage-1": compute(before.scores, prepared),
        "untrained": compute(blank.scores, prepared),
        "chance": chance(split),
        "text-blind": compute(text_blind_scores(prepared), prepared),
        "oracle": compute(oracle_scores(split, load_scenes(args.root)), prepared),
    }
    r = table["trained"]
    summary = f"R@1 {r['R@1']:.1f}, R@10 {r['R@10']:.1f}, Rsubset@1 {r['Rsubset@1']:.1f}"
    result = {
        "table": table,
        "by_type": by_type(scored.scores, prepared),
        "scores": scored,
        "fingerprint": trained.fingerprint(),  # whose numbers these are (csmcir export hf)
    }
    return result, summary + f" over {len(split.queries)} queries, {len(split.gallery)} images"


def gallery_cache(args: argparse.Namespace) -> Path:
    """The trained model's gallery embeddings, kept in the run folder so that building the
    index reads them instead of encoding the gallery again."""
    return args.run_dir / "gallery_cache"


def chance(split) -> dict[str, float]:
    """Expected recall of a random ranking: K of the gallery (reference removed), K of a subset."""
    n = len(split.gallery) - 1
    sub = [len(q.subset) - 1 for q in split.queries]
    row = {f"R@{k}": 100 * min(k, n) / n for k in (1, 5, 10, 50)}
    for k in (1, 2, 3):
        row[f"Rsubset@{k}"] = 100 * sum(min(k, s) / s for s in sub) / len(sub)
    row["Avg"] = (row["R@5"] + row["Rsubset@1"]) / 2
    return row


def format_table(table: dict[str, dict[str, float]]) -> str:
    head = f"{'ranking':<12}" + "".join(f"{c:>11}" for c in METRIC_COLUMNS)
    rows = [head, "-" * len(head)]
    for name, metrics in table.items():
        rows.append(f"{name:<12}" + "".join(f"{metrics[c]:>11.1f}" for c in METRIC_COLUMNS))
    return "\n".join(rows)


def build_index(args: argparse.Namespace, model_dir: Path) -> tuple[Path, str]:
    """``csmcir index build``, so the index records its model and opens in ``csmcir demo``."""
    from csmcir.retrieval.cli import main as index_main
    from csmcir.retrieval.index import GalleryIndex

    out = args.run_dir / "index"
    common = ["--benchmark", "synthcir", "--root", str(args.root), "--split", "test"]
    captions = ["--captions", str(args.root / CAPTIONS), "--device", str(args.device)]
    cache = ["--cache-dir", str(gallery_cache(args))]  # the evaluation's gallery embeddings
    index_main(["build", "--model", str(model_dir), *common, *captions, *cache, "--out", str(out)])
    return out, f"{len(GalleryIndex.load(out)):,} images, exact inner product, saved to {out}"


MOD_TYPES = ("add", "remove", "change", "move")


def example_searches(
    args: argparse.Namespace, model_dir: Path, index_dir: Path, evaluated: dict, pictures: Path
) -> tuple[list[Path], str]:
    """A retrieval grid for one query of each modification type, and one for a query whose
    target the model does not rank first (a miss shows what it confuses), searched in the
    faiss index as ``csmcir search`` would."""
    from csmcir.data.images import load_image
    from csmcir.model import CSMCIR
    from csmcir.retrieval.grid import GridItem, save_grid
    from csmcir.retrieval.index import GalleryIndex

    scored = evaluated["scores"]
    split = scored.prepared.split
    rng = random.Random(args.seed)
    picks = {
        kind: rng.choice([q for q in split.queries if q.extra["mod_type"] == kind])
        for kind in MOD_TYPES
    }
    model = CSMCIR.from_pretrained(model_dir).to(args.device).eval()
    index = GalleryIndex.load(index_dir, model)
    paths, said = [], []
    for name, query in [*picks.items(), ("miss", a_miss(scored, rng))]:
        if query is None:
            continue
        reference = load_image(split.image_path(query.reference))
        text = split.eval_text(query)
        q = model.encode_query([text], pixel_values=model.preprocess([reference]))
        hits = index.search(q.detach(), k=11)
        ranked = [(i, s) for i, s in zip(hits.ids[0], hits.scores[0], strict=False)]
        ranked = [(i, s) for i, s in ranked if i != query.reference][:10]  # CIRR protocol
        items = [GridItem(i, index.path_of(i), float(s)) for i, s in ranked]
        grid = pictures / f"retrieval_{name}.png"
        paths.append(save_grid(grid, reference, text, items, target=query.target))
        rank = next((r for r, (i, _) in enumerate(ranked, 1) if i == query.target), None)
        said.append(f"{name} {rank}" if rank else f"{name} >10")
    return paths, f"target ranks: {', '.join(said)}; grids in {pictures}"


def a_miss(scored, rng: random.Random):
    """One query, drawn by ``rng``, whose target the metrics do not rank first; None if none."""
    from csmcir.evaluation.protocols import main_target_ranks

    queries = scored.prepared.split.queries
    ranks = main_target_ranks(scored.scores, scored.prepared)
    missed = [q for q, r in zip(queries, ranks.tolist(), strict=True) if r > 1]
    return rng.choice(missed) if missed else None


def embedding_plot(args: argparse.Namespace, model_dir: Path, pictures: Path) -> tuple[Path, str]:
    from csmcir.plots.cli import main as plot_main

    out = pictures / "embeddings.png"
    root = str(args.root)
    captions = str(args.root / "mcot_captions.json")
    common = ["--benchmark", "synthcir", "--root", root, "--split", "test", "--captions", captions]
    device = ["--device", str(args.device)]
    plot_main(["embeddings", "--model", str(model_dir), *common, *device, "--out", str(out)])
    return out, f"t-SNE of reference, query and target embeddings in {out}"

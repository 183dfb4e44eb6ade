"""``csmcir data synth``: write the synthetic CIR benchmark in the CIRR rc2 layout.

Layout under ``--out``: ``<split>/<name>.png`` images, ``image_splits/split.rc2.<split>.json``,
``captions/cap.rc2.<split>.json`` (CIRR records plus ``mod_type``), ``scenes.json``, the ground
truth of every image, and ``synth_config.json``, the settings that made it. The settings go
first, then the images, and the annotations last, so a killed run never leaves annotations that
point at unwritten images, and a folder with settings but no ``scenes.json`` is an interrupted
generation. See ``docs/synthcir.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
from pathlib import Path

from tqdm import tqdm

from csmcir.data.synth_build import SPLITS, SplitData, SynthConfig, build_splits
from csmcir.data.synth_render import png_bytes, render_scene
from csmcir.data.synth_scenes import ATTRIBUTES, GRID, Scene
from csmcir.errors import ConfigError, DataError
from csmcir.io import atomic_write_json, atomic_write_text, read_json
from csmcir.outputs import SYNTH_BENCHMARK, claim
from csmcir.workers import process_pool

SCENES_VERSION = 1
CONFIG_FILE = "synth_config.json"
SCENES_FILE = "scenes.json"
RENDER_CHUNK = 1000  # images a worker renders per task
MAX_RENDER_WORKERS = 4


def annotation_paths(out: Path) -> list[Path]:
    return [
        out / CONFIG_FILE,
        out / SCENES_FILE,
        *(out / "captions" / f"cap.rc2.{s}.json" for s in SPLITS),
        *(out / "image_splits" / f"split.rc2.{s}.json" for s in SPLITS),
    ]


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds anything but a synthetic benchmark (csmcir.outputs), and a
    benchmark unless ``overwrite``; then clear what an earlier run wrote.

    Annotations go first, so an interrupted overwrite never leaves old annotations beside new
    images. Only files this generator writes are removed; anything else in ``out`` stays.
    """
    if claim(out, SYNTH_BENCHMARK, flag="--out") is None:
        return
    if not overwrite:
        raise ConfigError(
            f"--out {out} holds a synthetic benchmark; pass --overwrite to regenerate it "
            "there, or give --out a new folder"
        )
    for path in annotation_paths(out):
        path.unlink(missing_ok=True)
    for split in SPLITS:
        for image in sorted((out / split).glob(f"{split}-*.png")):
            image.unlink()


def scene_record(scene: Scene) -> dict[str, list[dict[str, str | int]]]:
    return {
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "row": o.row, "col": o.col}
            for o in scene
        ]
    }


def scenes_json(splits: dict[str, SplitData]) -> str:
    """``scenes.json`` with one image per line: valid JSON that stays readable and greppable."""
    head = {"version": SCENES_VERSION, "grid": GRID, "attributes": ATTRIBUTES}
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in head.items()]
    images = [
        f"    {json.dumps(name)}: {json.dumps(scene_record(scene))}"
        for split in SPLITS
        for scene, name in sorted(splits[split].names.items(), key=lambda item: item[1])
    ]
    return "{\n" + "\n".join(lines) + '\n  "images": {\n' + ",\n".join(images) + "\n  }\n}\n"


def caption_records(split: SplitData, first_pairid: int, first_set: int) -> list[dict]:
    """CIRR rc2 caption records plus ``mod_type`` (and, for a change, ``mod_attribute``: shape,
    color or size); pair and set ids continue across splits."""
    records = []
    for set_offset, group in enumerate(split.groups):
        members = [split.names[s] for s in group.members]
        reference = split.names[group.reference]
        for query in group.queries:
            target = split.names[query.target]
            records.append(
                {
                    "pairid": first_pairid + len(records),
                    "reference": reference,
                    "target_hard": target,
                    "target_soft": {target: 1.0},
                    "caption": query.text,
                    "img_set": {
                        "id": first_set + set_offset,
                        "members": members,
                        "reference_rank": members.index(reference),
                        "target_rank": members.index(target),
                    },
                    "mod_type": query.modification.kind,
                }
            )
            if query.modification.attribute is not None:  # what a change edits
                records[-1]["mod_attribute"] = query.modification.attribute
    return records


def write_images(out: Path, splits: dict[str, SplitData], image_size: int) -> None:
    """Render every scene to ``<split>/<name>.png``, in chunks over the CPU's cores: an image is
    a pure function of its scene, so the files are the same whichever process writes them."""
    jobs = []
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        items = sorted(splits[split].names.items(), key=lambda item: item[1])
        jobs += [(out / split / f"{name}.png", scene) for scene, name in items]
    chunks = [jobs[i : i + RENDER_CHUNK] for i in range(0, len(jobs), RENDER_CHUNK)]
    workers = min(len(chunks), os.cpu_count() or 1, MAX_RENDER_WORKERS)
    with tqdm(total=len(jobs), desc="rendering", unit="img") as bar:
        if workers < 2:
            for chunk in chunks:
                bar.update(render_chunk(chunk, image_size))
            return
        with process_pool(workers) as pool:  # its workers end if this process is killed
            for done in pool.map(render_chunk, chunks, itertools.repeat(image_size)):
                bar.update(done)


def render_chunk(jobs: list[tuple[Path, Scene]], image_size: int) -> int:
    for path, scene in jobs:
        path.write_bytes(png_bytes(render_scene(scene, GRID, image_size)))
    return len(jobs)


def write_annotations(out: Path, splits: dict[str, SplitData]) -> None:
    pairid = set_id = 0
    for name, split in splits.items():  # generation order, so test ids do not depend on train
        records = caption_records(split, pairid, set_id)
        pairid += len(records)
        set_id += len(split.groups)
        paths = {n: f"./{name}/{n}.png" for n in sorted(split.names.values())}
        atomic_write_json(out / "image_splits" / f"split.rc2.{name}.json", paths)
        atomic_write_json(out / "captions" / f"cap.rc2.{name}.json", records)
    atomic_write_text(out / SCENES_FILE, scenes_json(splits))


def summary_line(split: SplitData) -> str:
    stats = split.stats()
    shares = ", ".join(f"{k} {v / stats['queries']:.0%}" for k, v in stats["types"].items())
    return (
        f"{split.name}: {stats['references']} references, {stats['queries']} queries, "
        f"{stats['images']} images ({shares}); "
        f"{stats['near_duplicates_per_target']:.2f} one-attribute near-duplicates per target"
    )


def generate(out: str | Path, config: SynthConfig, overwrite: bool = False) -> dict[str, SplitData]:
    """Generate the benchmark under ``out``; the same config always gives byte-identical files."""
    out = Path(out)
    config.validate()
    prepare_out(out, overwrite)
    atomic_write_json(out / CONFIG_FILE, dataclasses.asdict(config))
    splits = build_splits(config)
    write_images(out, splits, config.image_size)
    write_annotations(out, splits)
    return splits


def recorded_config(out: str | Path) -> SynthConfig | None:
    """The settings a benchmark folder was generated with (None: no ``synth_config.json``, as
    in folders generated before it was written)."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        return None
    fields = read_json(path, "synthetic benchmark settings")
    try:
        return SynthConfig(**fields)
    except TypeError as e:
        raise DataError(f"{path}: not the settings of this generator ({e})") from None


def regenerate_command(out: str | Path) -> str:
    """The ``csmcir data synth`` line that makes the benchmark in ``out`` again with the
    settings it records (the flags that differ from the defaults), in place."""
    config, default = recorded_config(out) or SynthConfig(), SynthConfig()
    flags = [
        f"--{field.name.replace('_', '-')} {getattr(config, field.name)}"
        for field in dataclasses.fields(config)
        if getattr(config, field.name) != getattr(default, field.name)
    ]
    return " ".join(["csmcir data synth --out", str(out), *flags, "--overwrite"])


def is_complete(out: str | Path) -> bool:
    """Whether a generation finished there (its last file, ``scenes.json``, exists)."""
    return (Path(out) / SCENES_FILE).is_file()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument("--out", type=Path, default=Path("datasets/synthcir"), help="output folder")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    for split in SPLITS:
        parser.add_argument(
            f"--{split}-refs",
            type=int,
            default=d.refs(split),
            help=f"reference scenes in {split}; each gives --mods-per-ref queries",
        )
    parser.add_argument(
        "--mods-per-ref",
        type=int,
        default=d.mods_per_ref,
        help="queries per reference, each of a different type (1-4)",
    )
    parser.add_argument(
        "--distractors-per-query",
        type=int,
        default=d.distractors_per_query,
        help="gallery near-duplicates per target: the target with one attribute changed",
    )
    parser.add_argument("--min-objects", type=int, default=d.min_objects, help="objects per image")
    parser.add_argument("--max-objects", type=int, default=d.max_objects, help="objects per image")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="image side in px")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="regenerate the synthetic benchmark in --out (any other folder is refused)",
    )


def run(args: argparse.Namespace) -> int:
    config = SynthConfig(
        seed=args.seed,
        train_refs=args.train_refs,
        val_refs=args.val_refs,
        test_refs=args.test_refs,
        mods_per_ref=args.mods_per_ref,
        distractors_per_query=args.distractors_per_query,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        image_size=args.image_size,
    )
    splits = generate(args.out, config, overwrite=args.overwrite)
    for name in SPLITS:
        print(summary_line(splits[name]))
    print(f"wrote {args.out}")
    return 0

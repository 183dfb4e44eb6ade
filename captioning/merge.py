"""Merging a caption store's shards into the one caption file training and evaluation read.

The merged file maps image id -> ``{"levels", "Final_Caption", "prompt_version", "model",
"benchmark", "run", "image_sha256"}``: each caption names its benchmark, the run that made it
(run.json's digest) and its image's fingerprint, which is the file's provenance record
(csmcir.outputs) and what a reader checks it by. It holds captions only: failures go to a
sibling ``<name>.failures.json`` with their reasons, and images with no record at all are an
error unless the caller accepts a partial file. Only the shards of the folder's own run are
merged: a record of an image that ``run.json`` does not list, or stamped by another run, is
refused with its shard file named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioning.prompts import FINAL_KEY
from captioning.store import MANIFEST, describe_run, latest, read_shard, shard_files
from csmcir.data.captions import BENCHMARK_KEY, IMAGE_KEY, RUN_KEY
from csmcir.data.layout import first_few
from csmcir.errors import ConfigError, DataError
from csmcir.io import atomic_write_json, read_json
from csmcir.outputs import CAPTION_FILE, claim


@dataclass
class MergeReport:
    """What a merge wrote and what it could not."""

    out: Path
    failures_path: Path
    captions: int
    failures: dict[str, dict[str, Any]]
    missing: list[str] = field(default_factory=list)
    torn: list[Path] = field(default_factory=list)
    shards: int = 0

    def summary(self, shown: int = 10) -> str:
        lines = [
            f"merged {self.captions} captions from {self.shards} shard file(s) into {self.out}",
            f"{len(self.failures)} failure(s) listed in {self.failures_path}",
        ]
        for image_id, rec in list(self.failures.items())[:shown]:
            lines.append(f"  {image_id}: {rec['reason']} ({rec['attempts']} attempt(s))")
        if len(self.failures) > shown:
            lines.append(f"  ... and {len(self.failures) - shown} more")
        if self.missing:
            lines.append(
                f"WARNING: {len(self.missing)} image(s) have no record yet (first: "
                f"{', '.join(self.missing[:5])}); rerun 'csmcir caption run' to finish them"
            )
        for path in self.torn:
            lines.append(
                f"note: ignored a torn last line in {path} (a killed run; a rerun redoes it)"
            )
        return "\n".join(lines)


def failures_path_for(out: Path) -> Path:
    return out.with_name(f"{out.stem}.failures.json")


def merge_folder(folder: str | Path, out: str | Path, allow_partial: bool = False) -> MergeReport:
    """Write the merged caption file and the failures file; return what was done."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise DataError(f"caption folder not found: {folder}")
    shards = shard_files(folder)
    if not shards:
        raise DataError(f"{folder} holds no caption shards (shard-*-of-*.jsonl)")
    manifest_path = folder / MANIFEST
    manifest = read_json(manifest_path, "caption run manifest") if manifest_path.exists() else {}
    run = manifest.get("identity")
    made = {RUN_KEY: run["images"]} if run else {}  # what read_record finds in the file
    claim(
        out,
        CAPTION_FILE,
        flag="--out",
        reads={
            "the shard folder": folder,
            f"its caption run's {MANIFEST}": manifest_path,
            **{f"the shard {shard.name} being merged": shard for shard in shards},
        },
        identity=made,
        other_identity="refuse",
    )
    records, torn = read_own_shards(folder, shards, manifest)
    best = latest(records)
    settings = {(r["prompt_version"], r["model"]) for r in best.values() if r["status"] == "ok"}
    if len(settings) > 1:
        raise ConfigError(
            f"{folder} mixes captions made with different prompt versions or models "
            f"{sorted(settings)}; merge each setting from its own folder"
        )
    expected = manifest.get("image_ids") or sorted(best)
    missing = [i for i in expected if i not in best]
    if missing and not allow_partial:
        raise DataError(
            f"{len(missing)} of {len(expected)} images in {folder} have no caption record yet "
            f"(first: {', '.join(missing[:5])}); finish them with 'csmcir caption run' (same "
            f"options; every --shard) or pass --allow-partial"
        )
    order = list(dict.fromkeys([*expected, *sorted(best)]))
    captions: dict[str, dict[str, Any]] = {}
    failures: dict[str, dict[str, Any]] = {}
    for image_id in order:
        rec = best.get(image_id)
        if rec is None:
            continue
        if rec["status"] == "ok":
            captions[image_id] = {
                "levels": rec.get("levels", {}),
                FINAL_KEY: rec[FINAL_KEY],
                "prompt_version": rec["prompt_version"],
                "model": rec["model"],
            }
            if run:
                captions[image_id] |= {BENCHMARK_KEY: run["benchmark"], RUN_KEY: run["images"]}
            if IMAGE_KEY in rec:
                captions[image_id][IMAGE_KEY] = rec[IMAGE_KEY]
        else:
            failures[image_id] = {
                k: rec[k]
                for k in ("reason", "reasons", "attempts", "prompt_version", "model", "raw")
                if k in rec
            }
    atomic_write_json(out, captions)
    fail_path = failures_path_for(out)
    atomic_write_json(fail_path, failures)
    return MergeReport(out, fail_path, len(captions), failures, missing, torn, len(shards))


def read_own_shards(
    folder: Path, shards: list[Path], manifest: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every record of the folder's shards, refusing a shard of another run: one with images
    ``run.json`` does not list, or with records another run stamped."""
    listed = set(manifest.get("image_ids") or ())
    run = (manifest.get("identity") or {}).get("images")
    records: list[dict[str, Any]] = []
    torn: list[Path] = []
    for path in shards:
        recs, was_torn = read_shard(path)
        foreign = [r["image_id"] for r in recs if listed and r["image_id"] not in listed]
        if foreign:
            raise DataError(
                f"{path} holds {len(foreign)} record(s) of images {folder / MANIFEST} does not "
                f"list ({first_few(foreign)}): a shard of another caption run. Move it to its "
                "own run's folder and merge each folder on its own"
            )
        other = sorted({r[RUN_KEY] for r in recs if run and r.get(RUN_KEY, run) != run})
        if other:
            raise DataError(
                f"{path} holds captions of another caption run (images {', '.join(other)}), "
                f"not of this folder's {describe_run(manifest['identity'])}: other pictures "
                "with the same ids. Move it to its own run's folder and merge each on its own"
            )
        records += recs
        if was_torn:
            torn.append(path)
    return records, torn

"""The caption store: append-only JSONL shards in one folder, safe to kill at any moment.

Each process appends to its own shard file ``shard-<i>-of-<n>.jsonl``, one JSON record per line,
written with a single ``write`` and flushed, so a killed run loses at most the line it was
writing. Reopening a shard cuts a torn last line (the image is captioned again); a rerun skips
every image id that already has a record in any shard of the folder, so nothing is captioned
twice. A record is a caption (``status: ok``) or a failure with its reason (``status: failed``).
Failed ids are skipped on rerun too, so resuming is cheap; ``retry_failed`` opts into trying them
again, and the newer record then supersedes the failure when merging.

``run.json`` in the folder pins the prompt version, the model, the full (unsharded) list of
image ids and the run's identity (benchmark, root, split and a digest of every image's
fingerprint), so that a rerun with other settings or on other images is refused instead of
mixing captions, and so that ``merge`` can tell when some images have no record yet. Every
record carries the fingerprint of its image and the run's digest, so ``merge`` refuses the
shards of another run that were copied into the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from captioning.parsing import Caption
from captioning.prompts import FINAL_KEY
from csmcir.data.captions import IMAGE_KEY, RUN_KEY
from csmcir.errors import ConfigError, DataError
from csmcir.io import atomic_write_json, read_json
from csmcir.outputs import short_digest

SHARD_GLOB = "shard-*-of-*.jsonl"
MANIFEST = "run.json"
RAW_CHARS = 2000  # how much of a failed answer is kept for inspection


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the image ids whose CRC32 is ``index`` modulo ``count``.

    Hashing the id (not its position) keeps the assignment stable when the id list grows.
    """

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard must look like i/n, e.g. 0/4 (got {text!r})") from None
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"--shard {text}: need n >= 1 and 0 <= i < n (i counts from 0)")
        return cls(index, count)

    def owns(self, image_id: str) -> bool:
        return zlib.crc32(image_id.encode("utf-8")) % self.count == self.index

    @property
    def filename(self) -> str:
        return f"shard-{self.index:04d}-of-{self.count:04d}.jsonl"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def ok_record(
    image_id: str, caption: Caption, prompt_version: str, model: str, attempts: int
) -> dict[str, Any]:
    record = {
        "image_id": image_id,
        "status": "ok",
        "levels": caption.levels,
        FINAL_KEY: caption.final,
        "prompt_version": prompt_version,
        "model": model,
        "attempts": attempts,
        "time": now(),
    }
    if caption.missing_levels:
        record["missing_levels"] = list(caption.missing_levels)
    return record


def failure_record(
    image_id: str,
    reasons: list[str],
    prompt_version: str,
    model: str,
    raw: str | None = None,
) -> dict[str, Any]:
    record = {
        "image_id": image_id,
        "status": "failed",
        "reason": reasons[-1],
        "reasons": reasons,
        "prompt_version": prompt_version,
        "model": model,
        "attempts": len(reasons),
        "time": now(),
    }
    if raw is not None:
        record["raw"] = raw[:RAW_CHARS]
    return record


def _check_record(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or not isinstance(obj.get("image_id"), str):
        raise DataError(f"{where}: not a caption record (needs a JSON object with an image_id)")
    status = obj.get("status")
    if status == "ok":
        final = obj.get(FINAL_KEY)
        if not isinstance(final, str) or not final.strip():
            raise DataError(f"{where}: record marked ok has no {FINAL_KEY}")
    elif status == "failed":
        if not isinstance(obj.get("reason"), str):
            raise DataError(f"{where}: failure record has no reason")
    else:
        raise DataError(f"{where}: status must be 'ok' or 'failed' (got {status!r})")
    return obj


# How to go on from a bad line inside a shard (a torn last line is repaired by itself).
CORRUPT = (
    "; the caption store is corrupt. Delete that line (or the whole shard file) and run the same "
    "csmcir caption run again: it captions the images whose records are gone"
)


def read_shard(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of one shard file and whether its last line was torn (and so ignored).

    Only the last line can be torn by a kill; a bad line anywhere else is corruption and an error.
    """
    data = path.read_bytes()
    torn = bool(data) and not data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    records = []
    for lineno, line in enumerate(lines, 1):
        where = f"{path}, line {lineno}"
        try:
            records.append(_check_record(json.loads(line), where))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: malformed record ({e}){CORRUPT}") from None
        except DataError as e:
            raise DataError(f"{e}{CORRUPT}") from None
    return records, torn


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(SHARD_GLOB))


def read_folder(folder: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every record of every shard in file-name then line order, and the files with a torn tail."""
    records: list[dict[str, Any]] = []
    torn: list[Path] = []
    for path in shard_files(folder):
        recs, was_torn = read_shard(path)
        records += recs
        if was_torn:
            torn.append(path)
    return records, torn


def latest(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One record per image id: the last caption if there is one, else the last failure."""
    best: dict[str, dict[str, Any]] = {}
    for rec in records:
        old = best.get(rec["image_id"])
        if old is None or rec["status"] == "ok" or old["status"] == "failed":
            best[rec["image_id"]] = rec
    return best


@dataclass
class CaptionStore:
    """One process's writable view of an output folder (see the module docstring).

    Use as a context manager: entering locks this shard's file (a second process on the same
    shard is refused), cuts a torn last line and reads what every shard already holds.
    """

    folder: Path
    shard: Shard = field(default_factory=Shard)
    records: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    repaired: bool = field(default=False, init=False)
    fingerprints: dict[str, str] = field(default_factory=dict, init=False)
    run_digest: str | None = field(default=None, init=False)
    _fd: int | None = field(default=None, init=False, repr=False)

    @property
    def path(self) -> Path:
        return self.folder / self.shard.filename

    def __enter__(self) -> CaptionStore:
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{self.path} is being written by another running process; give each process "
                f"its own --shard i/n"
            ) from None
        self._fd = fd
        try:
            self._cut_torn_tail()
            records, _ = read_folder(self.folder)
        except BaseException:
            self.close()
            raise
        self.records = latest(records)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None

    def _cut_torn_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        data = os.pread(self._fd, size, 0)
        if data.endswith(b"\n"):
            return
        os.ftruncate(self._fd, data.rfind(b"\n") + 1)
        self.repaired = True

    def check_settings(
        self,
        prompt_version: str,
        model: str,
        image_ids: list[str],
        identity: dict[str, Any] | None = None,
        fingerprints: dict[str, str] | None = None,
    ) -> None:
        """Refuse to add captions made with another prompt or model, or for another image set.

        ``identity`` (:func:`run_identity`) and ``fingerprints`` (image id -> fingerprint) are
        recorded in ``run.json`` and stamped on every record this store appends.
        """
        manifest_path = self.folder / MANIFEST
        wanted = {"prompt_version": prompt_version, "model": model, "image_ids": image_ids}
        if identity is not None:
            wanted["identity"] = identity
            self.run_digest = identity["images"]
        self.fingerprints = dict(fingerprints or {})
        for rec in self.records.values():
            for key in ("prompt_version", "model"):
                if rec.get(key) != wanted[key]:
                    raise ConfigError(
                        f"{self.folder} holds captions made with {key} {rec.get(key)!r}; this run "
                        f"uses {wanted[key]!r}. Use a new --out folder for a new setting."
                    )
        if manifest_path.exists():
            manifest = read_json(manifest_path, "caption run manifest")
            for key in ("prompt_version", "model"):
                if manifest.get(key) != wanted[key]:
                    raise ConfigError(
                        f"{manifest_path} was started with {key} {manifest.get(key)!r}; this run "
                        f"uses {wanted[key]!r}. Use a new --out folder for a new setting."
                    )
            old = manifest.get("image_ids")
            if old != image_ids:
                raise ConfigError(
                    f"{manifest_path} was started for another image set ({len(old or [])} images, "
                    f"now {len(image_ids)}): same --benchmark/--root/--split, or a new --out folder"
                )
            old_identity = manifest.get("identity")
            if identity is not None and old_identity is None:  # started by an older csmcir
                atomic_write_json(manifest_path, manifest | {"identity": identity}, indent=None)
            elif identity is not None and not same_run(old_identity, identity):
                raise ConfigError(
                    f"{manifest_path} was started for {describe_run(old_identity)}; this run "
                    f"captions {describe_run(identity)}, other images: a new --out folder for them"
                )
        else:
            atomic_write_json(manifest_path, wanted, indent=None)

    def pending(self, image_ids: Iterable[str], retry_failed: bool = False) -> list[str]:
        """The ids of this shard that still need a caption, in the given order."""
        todo = []
        for image_id in image_ids:
            if not self.shard.owns(image_id):
                continue
            rec = self.records.get(image_id)
            if rec is None or (retry_failed and rec["status"] == "failed"):
                todo.append(image_id)
        return todo

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line with one ``write`` call: a kill cannot split it in two."""
        if self._fd is None:
            raise RuntimeError("CaptionStore.append outside its 'with' block")
        image_id = record["image_id"]
        if image_id in self.fingerprints:
            record = {**record, IMAGE_KEY: self.fingerprints[image_id]}
        if self.run_digest is not None:
            record = {**record, RUN_KEY: self.run_digest}
        line = (json.dumps(_check_record(record, "new record"), ensure_ascii=False) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
        self.records[record["image_id"]] = record


def run_identity(
    benchmark: str, root: Path, split: str, fingerprints: dict[str, str], **options: Any
) -> dict[str, Any]:
    """What a caption run describes: the benchmark, where it is, the split, and a digest of the
    fingerprint of every image (two benchmarks with the same ids differ in it)."""
    return {
        "benchmark": benchmark,
        "root": str(Path(root).resolve()),
        "split": split,
        **{k: v for k, v in options.items() if v is not None},
        "images": short_digest(
            *(f"{i}={fingerprints[i]}" for i in sorted(fingerprints)), length=16
        ),
    }


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two run identities describe the same images (a moved benchmark folder is)."""
    return {k: v for k, v in a.items() if k != "root"} == {
        k: v for k, v in b.items() if k != "root"
    }


def describe_run(identity: dict[str, Any]) -> str:
    """``synthcir test at /data/synthcir (images 1a2b...)``, as refusals name a run."""
    return (
        f"{identity.get('benchmark')} {identity.get('split')} at {identity.get('root')} "
        f"(images {str(identity.get('images'))[:8]})"
    )


def iter_history(folder: Path, image_id: str) -> Iterator[dict[str, Any]]:
    """Every record of one image id, oldest first (``csmcir caption show``)."""
    records, _ = read_folder(folder)
    return (rec for rec in records if rec["image_id"] == image_id)

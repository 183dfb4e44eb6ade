"""Run the grid: for each (seed, variant) cell, train with ``csmcir fit`` and score the result with
``csmcir eval``, each in a subprocess with its log kept, so a crash in one run cannot take the grid
down. Each cell's outcome is one ``result.json`` written atomically at its end, with the cell's key:
what decides its outcome (the csmcir version, the fit config as LightningCLI resolves it with every
default filled in, the model config, the eval command, the captions' content, the starting
weights). A rerun skips the cells whose key is unchanged (a setting added to csmcir since, at its
default, is no change), says why it reruns the others, and a killed cell simply runs again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from csmcir import __version__, hub
from csmcir.ablation.config import (
    BUDGET_KEYS,
    AblationConfig,
    CaptionSpec,
    Variant,
    deep_merge,
    flatten,
    read_yaml,
)
from csmcir.errors import ConfigError
from csmcir.io import atomic_write_json, read_json
from csmcir.train.resolve import Resolved, resolve_in_subprocess

LOG_TAIL = 20  # log lines kept in a failed cell's record
RESULT = "result.json"
SHOWN_CHANGES = 3  # changed settings named in a rerun's reason
INVALID = "INVALID:"  # starts the dry-run reason of a cell whose fit command does not resolve


def flag_value(value: Any) -> str:
    """A YAML value as one command-line token jsonargparse reads back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def log_tail(path: Path, lines: int = LOG_TAIL) -> list[str]:
    """The last non-empty lines of a log, progress-bar redraws (carriage returns) collapsed."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    return [line for line in kept if line.strip()][-lines:]


def run_logged(argv: list[str], log: Path, timeout: float | None = None) -> tuple[int, float]:
    """Run ``argv`` with stdout and stderr appended to ``log``; (exit status, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        try:
            code = subprocess.run(
                argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nkilled by the ablation runner after --timeout {timeout:g} s\n")
            code = -9
    return code, time.perf_counter() - start


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    """``tree["model"]["bank"]`` for ``"model.bank"``; None where the path does not exist."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def csmcir_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "csmcir", *args]


# The fit command whose resolution holds every setting's default, the bank's included (a bank
# that is not enabled resolves to None, which would hide the defaults of its settings).
DEFAULTS_FIT = csmcir_argv("fit", "--model.bank.enabled", "true")


@dataclass
class Cell:
    variant: Variant
    seed: int
    folder: Path

    @property
    def key(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    @property
    def log(self) -> Path:
        return self.folder / "log.txt"


class Grid:
    """One ablation config's cells under ``out``, run in dependency order."""

    def __init__(
        self,
        config: AblationConfig,
        out: Path,
        seeds: list[int],
        variants: list[str] | None = None,
        *,
        force: bool = False,
        timeout: float | None = None,
        run: Callable[[list[str], Path, float | None], tuple[int, float]] = run_logged,
        resolve: Callable[[list[list[str]]], list[Resolved]] = resolve_in_subprocess,
    ) -> None:
        self.config = config
        self.out = out
        self.seeds = seeds
        self.variants = config.run_order(variants)
        self.force = force
        self.timeout = timeout
        self.run = run
        self.resolver = resolve
        self.root = config.root.resolve()
        self._captions: dict[str, Path | str] = {}  # name -> file, or the error that stopped it
        self._caption_lock = threading.Lock()
        self._resolved: dict[tuple[str, ...], Resolved] = {}  # fit command -> its resolution
        self._start_fingerprints: dict[Path, str] = {}  # init_from model -> its fingerprint

    def check_inputs(self) -> None:
        """Stop before any run when the data is missing: every cell needs it (the fit configs
        were found when the grid's YAML was read)."""
        if not self.root.is_dir():
            hint = (
                " (make it with: csmcir data synth --out ROOT)"
                if self.config.benchmark == "synthcir"
                else ""
            )
            raise ConfigError(f"{self.config.path}: root {self.root} is not a folder{hint}")

    def cells(self) -> list[Cell]:
        """Seeds outermost: after the first seed the table already holds every row."""
        return [Cell(v, s, self.cell_folder(v.name, s)) for s in self.seeds for v in self.variants]

    # -- commands -------------------------------------------------------------------------

    def weights_dir(self, cell: Cell) -> Path:
        return cell.run_dir / self.config.eval.weights

    def fit_argv(self, cell: Cell, captions: Path | None, init_from: Path | None) -> list[str]:
        config, v = self.config, cell.variant
        fit_config = (v.fit_config or config.fit_config).resolve()
        flags: dict[str, Any] = {
            "data.benchmark": config.benchmark,
            "data.root": str(self.root),
            **config.budget,
            **self.merged_overrides(v),
            "data.captions": str(captions) if captions else None,
            "trainer.default_root_dir": str(cell.run_dir.resolve()),
            "seed_everything": cell.seed,  # the model's initialisation
            "data.seed": cell.seed,  # the data order, whatever the fit config says
        }
        if init_from is not None:
            flags["model.init_from"] = str(init_from.resolve())
        argv = csmcir_argv("fit", "--config", str(fit_config))
        for key, value in flags.items():
            argv += [f"--{key}", flag_value(value)]
        return argv

    def merged_overrides(self, v: Variant) -> dict[str, Any]:
        """The grid's and the variant's overrides. A mapping merges into the fit config's mapping
        of the same key: a flag replaces a whole mapping, and ``model.model_options: {tower:
        separate}`` must not drop the fit config's ``precision: bf16``."""
        fit = read_yaml(v.fit_config or self.config.fit_config, "fit config")
        merged = {}
        for key, value in deep_merge(self.config.overrides, v.overrides).items():
            if isinstance(value, dict):
                base = lookup(fit, key)
                value = deep_merge(base, value) if isinstance(base, dict) else value
            merged[key] = value
        return merged

    def eval_argv(self, cell: Cell, captions: Path | None) -> list[str]:
        config = self.config
        argv = csmcir_argv(
            "eval",
            "--model",
            str(self.weights_dir(cell).resolve()),
            "--benchmark",
            config.benchmark,
            "--root",
            str(self.root),
            "--split",
            config.eval.split,
            "--out",
            str((cell.folder / "eval.json").resolve()),
            "--no-cache",
        )
        if captions is not None:
            argv += ["--captions", str(captions)]
        return argv + list(config.eval.args)

    def caption_argvs(self, spec: CaptionSpec, out: Path) -> list[list[str]]:
        shards = out.with_suffix("")
        oracle = spec.oracle or {}
        run = [
            "caption",
            "run",
            "--benchmark",
            self.config.benchmark,
            "--root",
            str(self.root),
            "--split",
            "all",
            "--backend",
            "oracle",
            "--out",
            str(shards),
            "--no-progress",
        ]
        if "style" in oracle:
            run += ["--style", str(oracle["style"])]
        if "levels" in oracle:
            levels = oracle["levels"]
            run += ["--levels", ",".join(levels) if isinstance(levels, list) else str(levels)]
        for key in ("noise", "seed", "max_words"):
            if key in oracle:
                run += [f"--{key.replace('_', '-')}", str(oracle[key])]
        merge = ["caption", "merge", str(shards), "--out", str(out)]
        return [csmcir_argv(*run), csmcir_argv(*merge)]

    # -- prerequisites --------------------------------------------------------------------

    def caption_file(self, name: str | None) -> Path | None:
        """The variant's caption file, built on first need; raises CellError if it cannot be."""
        if name is None:
            return None
        with self._caption_lock:  # lanes that need the same file build it once
            if name not in self._captions:
                self._captions[name] = self._build_captions(self.config.captions[name])
        made = self._captions[name]
        if isinstance(made, str):
            raise CellError("captions", made)
        return made

    def caption_path(self, name: str | None) -> Path | None:
        """Where the caption file named ``name`` is, or will be once built."""
        if name is None:
            return None
        spec = self.config.captions[name]
        if spec.file is not None:
            return spec.file.resolve()
        digest = spec.digest(self.config.benchmark, self.root)
        return (self.out / "captions" / f"{spec.name}-{digest}.json").resolve()

    def _build_captions(self, spec: CaptionSpec) -> Path | str:
        out = self.caption_path(spec.name)
        if spec.file is not None:
            return out if out.is_file() else f"caption file {spec.name!r} not found: {out}"
        if out.is_file():
            return out
        log = out.with_suffix(".log")
        for argv in self.caption_argvs(spec, out):
            code, _ = self.run(argv, log, self.timeout)
            if code != 0:
                last = (log_tail(log, 1) or [f"exit status {code}"])[-1]
                return f"building captions {spec.name!r} failed: {last} ({log})"
        return out

    def starting_weights(self, cell: Cell) -> tuple[Path | None, str | None]:
        """The weights a fine-tuning cell starts from and their fingerprint."""
        parent = self.parent(cell)
        if parent is None:
            model = self.start_model(cell)
            if model is None:
                return None, None
            if model not in self._start_fingerprints:  # every seed's cell starts from it
                from csmcir.model import CSMCIR

                self._start_fingerprints[model] = CSMCIR.from_pretrained(model).fingerprint()
            return model, self._start_fingerprints[model]
        record = self.read_result(parent.folder)
        if record is None or record["status"] != "ok":
            raise CellError("init_from", f"its starting run {parent.key} failed")
        return Path(record["weights"]), record["fingerprint"]

    def start_model(self, cell: Cell) -> Path | None:
        """The model (not a variant's run) every seed of this cell's row fine-tunes, if any."""
        name = cell.variant.init_model
        if name is None:
            return None
        return hub.resolve(name, hub.MODEL, f"variants.{cell.variant.name}.init_from")

    def parent(self, cell: Cell) -> Cell | None:
        """The cell whose trained weights this one starts from (same seed), if any."""
        name = cell.variant.init_from
        if name is None:
            return None
        return Cell(self.config.variant(name), cell.seed, self.cell_folder(name, cell.seed))

    def cell_folder(self, variant: str, seed: int) -> Path:
        return self.out / "cells" / variant / f"seed{seed}"

    def plan(self) -> list[tuple[Cell, list[str], list[str], str | None]]:
        """Each cell's fit and eval commands and why it would run (None: its finished result
        would be reused), without running anything (``--dry-run``)."""
        planned = self._commands(self.cells())
        self.resolve([DEFAULTS_FIT, *(fit for _, fit, _ in planned)])
        reasons: dict[str, str | None] = {}
        for cell, fit, evaluate in planned:
            reasons[cell.key] = self._planned_reason(cell, fit, evaluate, reasons)
        return [(c, fit, evaluate, reasons[c.key]) for c, fit, evaluate in planned]

    def _commands(self, cells: list[Cell]) -> list[tuple[Cell, list[str], list[str]]]:
        """Each cell's fit and eval commands, with its caption file and starting weights where
        they are or will be."""
        commands = []
        for cell in cells:
            captions = self.caption_path(cell.variant.captions)
            parent = self.parent(cell)
            init_from = self.weights_dir(parent) if parent else self.start_model(cell)
            fit = self.fit_argv(cell, captions, init_from)
            commands.append((cell, fit, self.eval_argv(cell, captions)))
        return commands

    def _planned_reason(
        self, cell: Cell, fit: list[str], evaluate: list[str], earlier: dict[str, str | None]
    ) -> str | None:
        """Why ``cell`` would run, given what the cells before it would do."""
        try:
            self.resolved(fit)
        except CellError as failure:
            return f"{INVALID} {failure.error}"
        parent = self.parent(cell)
        if parent is not None and earlier[parent.key] is not None:
            return f"its starting run {parent.key} runs first"
        captions = self.caption_path(cell.variant.captions)
        if captions is not None and not captions.is_file():
            if self.config.captions[cell.variant.captions].file is None:
                return "its caption file is built first"
            return f"caption file {cell.variant.captions!r} not found: {captions} (make it first)"
        if parent is not None:
            fingerprint = self.read_result(parent.folder)["fingerprint"]
        else:  # a start model's, as the run keys it (None when the row starts from a preset)
            fingerprint = self.starting_weights(cell)[1]
        key = self.cell_key(fit, evaluate, captions, fingerprint)
        return stale_reason(self.read_result(cell.folder), key, self.force, self.defaults())

    def resolve(self, fits: list[list[str]]) -> None:
        """Resolve the fit commands not resolved yet, together (one subprocess by default)."""
        todo = [c for c in dict.fromkeys(tuple(f[3:]) for f in fits) if c not in self._resolved]
        if todo:
            resolved = self.resolver([list(command) for command in todo])
            self._resolved.update(zip(todo, resolved, strict=True))

    def resolved(self, fit: list[str]) -> dict[str, Any]:
        """The fit command's resolved fit and model configs; CellError when it is invalid."""
        self.resolve([fit])
        resolved = self._resolved[tuple(fit[3:])]
        if isinstance(resolved, str):
            raise CellError("config", resolved)
        return resolved

    def defaults(self) -> dict[str, Any]:
        """Every fit setting's default and the default preset's model config, flattened like a
        cell key's parts: a setting added to csmcir after a cell ran is missing from its key,
        and it changes nothing when it holds its default."""
        resolved = self.resolved(DEFAULTS_FIT)
        return {"fit": flatten(resolved["fit"]), "model": flatten(resolved["model"])}

    def cell_key(
        self,
        fit: list[str],
        evaluate: list[str],
        captions: Path | None,
        init_fingerprint: str | None,
    ) -> dict[str, Any]:
        """What decides a cell's outcome: the csmcir version, the fit config with every default
        filled in, the model config, the eval command, the captions' content and the weights it
        starts from (commands without the interpreter: ``python -m csmcir`` is not part of it).
        Raises CellError when the fit command is invalid."""
        resolved = self.resolved(fit)
        return {
            "csmcir": __version__,
            "fit": flatten(resolved["fit"]),
            "model": flatten(resolved["model"]) if resolved["model"] is not None else None,
            "eval": evaluate[3:],
            "captions": hashlib.sha256(captions.read_bytes()).hexdigest() if captions else None,
            "init_from": init_fingerprint,
        }

    # -- cells ----------------------------------------------------------------------------

    @staticmethod
    def read_result(folder: Path) -> dict[str, Any] | None:
        path = folder / RESULT
        return read_json(path, "ablation cell result") if path.is_file() else None

    def run_cell(self, cell: Cell, say: Callable[[str], Any] = print) -> tuple[dict, bool]:
        """The cell's record and whether it ran now (False: a finished result was reused).
        ``say`` gets one line on why a cell with an earlier result runs again."""
        previous = self.read_result(cell.folder)
        try:
            captions = self.caption_file(cell.variant.captions)
            init_from, init_fingerprint = self.starting_weights(cell)
            fit, evaluate = self.fit_argv(cell, captions, init_from), self.eval_argv(cell, captions)
            key = self.cell_key(fit, evaluate, captions, init_fingerprint)
        except CellError as failure:
            record = self._record(cell, "failed", {}, stage=failure.stage, error=[failure.error])
            atomic_write_json(cell.folder / RESULT, record)
            return record, True
        reason = stale_reason(previous, key, self.force, self.defaults())
        if reason is None:
            return previous, False
        if previous is not None:
            say(f"{cell.key}: runs again: {reason}")
        if cell.folder.exists():
            shutil.rmtree(cell.folder)  # a stale or failed run: start clean
        cell.folder.mkdir(parents=True)
        record = self._train_and_evaluate(cell, fit, evaluate)
        record["key"] = key
        atomic_write_json(cell.folder / RESULT, record)
        return record, True

    def _train_and_evaluate(self, cell: Cell, fit: list[str], evaluate: list[str]):
        times: dict[str, float] = {}
        code, times["train_s"] = self.run(fit, cell.log, self.timeout)
        if code != 0:
            return self._record(cell, "failed", times, stage="train", error=log_tail(cell.log))
        try:
            budget, steps = self._check_run(cell)
        except CellError as failure:
            return self._record(cell, "failed", times, stage=failure.stage, error=[failure.error])
        code, times["eval_s"] = self.run(evaluate, cell.log, self.timeout)
        if code != 0:
            return self._record(cell, "failed", times, stage="eval", error=log_tail(cell.log))
        results = read_json(cell.folder / "eval.json", "evaluation results")
        try:
            metrics = pick_metrics(results["metrics"], self.config.eval.metrics)
        except CellError as failure:
            return self._record(cell, "failed", times, stage="eval", error=[failure.error])
        if not self.config.keep_checkpoints:
            for ckpt in cell.run_dir.glob("*.ckpt"):
                ckpt.unlink()
        return self._record(
            cell,
            "ok",
            times,
            metrics=metrics,
            weights=str(self.weights_dir(cell).resolve()),
            fingerprint=results["model"]["fingerprint"],
            budget=budget,
            steps=steps,
        )

    def _check_run(self, cell: Cell) -> tuple[dict[str, Any], int]:
        """The budget the run really had (its saved config) and the steps it really took."""
        saved = sorted(cell.run_dir.glob("logs/version_*/config.yaml"))
        if not saved or not (self.weights_dir(cell) / "training.json").is_file():
            raise CellError("train", f"fit ended without a config or {self.weights_dir(cell)}")
        effective = flatten(yaml.safe_load(saved[-1].read_text(encoding="utf-8")))
        budget = {k: effective.get(k) for k in BUDGET_KEYS if k in effective}
        record = read_json(cell.run_dir / "model" / "training.json", "training record")
        steps, wanted = record["global_step"], budget.get("trainer.max_steps")
        if steps != wanted:
            raise CellError(
                "train", f"training stopped at step {steps} of {wanted}: not the equal budget"
            )
        return budget, steps

    def _record(self, cell: Cell, status: str, times: dict[str, float], **fields) -> dict:
        return {
            "variant": cell.variant.name,
            "seed": cell.seed,
            "status": status,
            "regime": cell.variant.regime(),
            **{k: round(v, 1) for k, v in times.items()},
            **fields,
            "log": str(cell.log),
        }

    def run_all(self, lanes: int = 1) -> list[dict[str, Any]]:
        """Every cell, up to ``lanes`` side by side, with a progress bar; a failed cell is
        recorded and the grid goes on. A cell that starts from another's weights runs in a
        later wave than that cell; the records come back in :meth:`cells` order."""
        cells = self.cells()
        bar = tqdm(total=len(cells), desc="ablation", unit="run")
        self.resolve([DEFAULTS_FIT, *(fit for _, fit, _ in self._commands(cells))])  # in one go
        records: dict[str, dict[str, Any]] = {}

        def one(cell: Cell) -> None:
            record, ran = self.run_cell(cell, bar.write)
            records[cell.key] = record
            if not ran:
                outcome = "done earlier, skipped"
            elif record["status"] == "ok":
                outcome = f"ok in {record.get('train_s', 0) + record.get('eval_s', 0):.0f} s"
            else:
                error = (record["error"] or [""])[-1]
                outcome = f"FAILED ({record['stage']}): {error}"
            bar.write(f"{cell.key}: {outcome}")
            bar.update()

        with ThreadPoolExecutor(max_workers=lanes) as pool:
            for wave in self.waves(cells):
                list(pool.map(one, wave))  # list(): a bug in a lane is raised here
        bar.close()
        return [records[cell.key] for cell in cells]

    def waves(self, cells: list[Cell]) -> list[list[Cell]]:
        """``cells`` in groups that may run side by side: each cell one wave after the cell
        whose weights it starts from (its ``init_from``), in the order given within a wave."""
        depth: dict[str, int] = {}

        def level(cell: Cell) -> int:
            if cell.key not in depth:
                parent = self.parent(cell)
                depth[cell.key] = 0 if parent is None else level(parent) + 1
            return depth[cell.key]

        grouped: dict[int, list[Cell]] = {}
        for cell in cells:
            grouped.setdefault(level(cell), []).append(cell)
        return [grouped[d] for d in sorted(grouped)]


class CellError(Exception):
    """Why one cell could not produce metrics; recorded in its result, never raised to the CLI."""

    def __init__(self, stage: str, error: str) -> None:
        super().__init__(error)
        self.stage = stage
        self.error = error


def pick_metrics(metrics: dict[str, dict[str, float]], wanted: tuple[str, ...]) -> dict:
    """The row of metrics the table shows: FashionIQ's average over categories, else the one
    split's; ``wanted`` (empty: all) in that order."""
    row = metrics.get("average") or (next(iter(metrics.values())) if len(metrics) == 1 else None)
    if row is None:
        raise CellError("eval", f"cannot tell which metrics row to report: {', '.join(metrics)}")
    missing = [m for m in wanted if m not in row]
    if missing:
        raise CellError(
            "eval", f"evaluation gave no {', '.join(missing)} (it gave {', '.join(row)})"
        )
    return {m: row[m] for m in wanted or row}


def stale_reason(
    previous: dict[str, Any] | None,
    key: dict[str, Any],
    force: bool,
    defaults: dict[str, dict[str, Any]] | None = None,
) -> str | None:
    """Why a cell runs (again); None when its earlier result holds for ``key``. A setting that
    the earlier key lacks and ``key`` holds at its default (``defaults``: the fit and model
    parts' defaults, see :meth:`Grid.defaults`) was added to csmcir since, and changes nothing."""
    if previous is None:
        return "no earlier run"
    if force:
        return "--force"
    if previous["status"] != "ok":
        return f"its earlier run failed ({previous.get('stage')})"
    old = previous.get("key")
    if old is None:
        return (
            "recorded by an older csmcir ablate, whose key held the commands only, not the "
            "resolved config"
        )
    key = without_new_defaults(old, key, defaults or {})
    return None if old == key else changes(old, key)


def without_new_defaults(
    old: dict[str, Any], key: dict[str, Any], defaults: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """``key`` less the settings that ``old`` lacks and that hold their default."""
    trimmed = dict(key)
    for part in ("fit", "model"):
        before, after, default = old.get(part), key[part], defaults.get(part, {})
        if before is None or after is None:
            continue
        trimmed[part] = {
            k: v for k, v in after.items() if k in before or default.get(k, ABSENT) != v
        }
    return trimmed


def changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two cell keys, on one line: ``fit config changed:
    model.bank.open_entropy 0.4 -> 0.2``."""
    said = []
    if old.get("csmcir") != new["csmcir"]:
        said.append(f"csmcir version changed: {old.get('csmcir')} -> {new['csmcir']}")
    for part in ("fit", "model"):
        before, after = old.get(part) or {}, new[part] or {}
        changed = [
            f"{k} {show(before, k)} -> {show(after, k)}"
            for k in sorted(before.keys() | after.keys())
            if before.get(k, ABSENT) != after.get(k, ABSENT)
        ]
        if changed:
            more = len(changed) - SHOWN_CHANGES
            tail = f" and {more} more" if more > 0 else ""
            said.append(f"{part} config changed: {', '.join(changed[:SHOWN_CHANGES])}{tail}")
    for part, what in (
        ("eval", "eval command changed"),
        ("captions", "caption file content changed"),
        ("init_from", "starting weights changed"),
    ):
        if old.get(part) != new[part]:
            said.append(what)
    return "; ".join(said) or "its key changed"


ABSENT = object()


def show(settings: dict[str, Any], key: str) -> str:
    """A setting's value as JSON (``"hardest"``, ``null``), or ``(absent)``."""
    value = settings.get(key, ABSENT)
    return "(absent)" if value is ABSENT else json.dumps(value)

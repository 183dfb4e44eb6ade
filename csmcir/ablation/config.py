"""The ablation grid's YAML: a base fit config, an equal budget, caption files, named variants.

A variant is a set of ``csmcir fit`` overrides on the base (``model.model_options: {tower:
separate}``), plus what it needs first: a caption file (``captions: <name>``, built once by the
oracle or given as a file) and, for fine-tuning rows, another variant's trained weights
(``init_from: <variant>``, the same seed's run) or a model (``init_from: synthcir-tiny-stage1``:
a shipped model's name, a model folder or a hub name). ``extends: <variant>`` copies another
variant's settings, so "full minus one part" rows stay short. Every check that can fail before
hours of training runs here, with the key at fault named.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from csmcir.errors import ConfigError
from csmcir.hub import is_hub_name
from csmcir.packaged import config_file, packaged_model, pretrained_names

# Fit keys that decide how much training a run gets and on what data. A variant changes one only
# when it lists the key under ``changes_budget``; the rest of the grid then stays comparable.
BUDGET_KEYS: tuple[str, ...] = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.accumulate_grad_batches",
    "trainer.limit_train_batches",
    "trainer.devices",
    "trainer.num_nodes",
    "data.batch_size",
    "data.benchmark",
    "data.root",
    "data.categories",
    "data.drop_missing",
)
REQUIRED_BUDGET = ("trainer.max_steps", "data.batch_size")
# Keys the runner sets for every run; a variant says these through its own fields instead.
RUNNER_KEYS: dict[str, str] = {
    "config": "fit_config",
    "seed_everything": "the --seeds flag",
    "data.seed": "the --seeds flag",
    "trainer.default_root_dir": "the runner (one folder per cell)",
    "model.init_from": "init_from",
    "data.captions": "captions",
}
WEIGHTS = ("model", "best")
ORACLE_KEYS = {"style", "levels", "noise", "seed", "max_words"}


@dataclass(frozen=True)
class CaptionSpec:
    """A caption file the grid needs: an existing ``file``, or one the oracle backend writes."""

    name: str
    file: Path | None = None
    oracle: dict[str, Any] | None = None

    def digest(self, benchmark: str, root: Path) -> str:
        """Short hash of what the file is made from: new settings give a new file."""
        if self.file is not None:
            return ""
        blob = json.dumps([benchmark, str(root.resolve()), self.oracle], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclass
class Variant:
    name: str
    label: str = ""
    fit_config: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    captions: str | None = None
    init_from: str | None = None
    """Another variant whose same-seed run this one fine-tunes."""
    init_model: str | None = None
    """A model every seed fine-tunes: a shipped model's name, a folder or a hub name."""
    changes_budget: tuple[str, ...] = ()
    compare_to: str | None = None
    """The row this one is paired with, seed by seed, in the table's paired-difference column."""

    def regime(self) -> str:
        start = self.init_from or self.init_model
        return "from scratch" if start is None else f"fine-tuned from {start}"


@dataclass
class EvalSpec:
    split: str
    weights: str = "model"
    metrics: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    paired: tuple[str, ...] = ()
    """The metrics of the paired-difference columns (default: Avg if listed, else the first)."""


@dataclass
class AblationConfig:
    path: Path
    benchmark: str
    root: Path
    fit_config: Path
    budget: dict[str, Any]
    overrides: dict[str, Any]
    captions: dict[str, CaptionSpec]
    eval: EvalSpec
    variants: list[Variant]
    seeds: tuple[int, ...] = (0,)
    out: Path | None = None
    keep_checkpoints: bool = False
    table: str = "ablation"
    """Name of the table files (``<table>.md``, ``<table>.json``) under ``out``: grids that share
    an ``out`` share its finished cells (a variant name must mean the same run in each) and keep
    their own tables."""

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def fit_yaml(self, variant: Variant) -> dict[str, Any]:
        """The variant's fit YAML, flattened to dotted keys."""
        return flatten(read_yaml(variant.fit_config or self.fit_config, "fit config"))

    def run_order(self, names: list[str] | None = None) -> list[Variant]:
        """The chosen variants (default: all) with their ``init_from`` prerequisites: each after
        what it starts from, as early in file order as that allows."""
        wanted = set(names) if names else {v.name for v in self.variants}
        unknown = sorted(wanted - {v.name for v in self.variants})
        if unknown:
            raise ConfigError(
                f"--variants: no variant named {', '.join(unknown)} in {self.path} "
                f"(variants: {', '.join(v.name for v in self.variants)})"
            )
        stack = list(wanted)
        while stack:
            parent = self.variant(stack.pop()).init_from
            if parent and parent not in wanted:
                wanted.add(parent)
                stack.append(parent)
        ordered: list[Variant] = []
        placed: set[str] = set()
        while len(ordered) < len(wanted):  # the first ready one in file order, each time
            ready = next(
                v
                for v in self.variants
                if v.name in wanted and v.name not in placed and v.init_from in (None, *placed)
            )
            ordered.append(ready)
            placed.add(ready.name)
        return ordered


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of keys to values")
    return data


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"trainer": {"max_steps": 5}}`` -> ``{"trainer.max_steps": 5}`` (leaves: non-dicts)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; mappings under the same key merge key by key."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def overlaps(a: str, b: str) -> bool:
    """Whether two dotted keys name the same setting or one holds the other."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def load_config(path: str | Path) -> AblationConfig:
    """Read and check an ablation YAML (a file, or a packaged config's name such as
    ``ablation/synthcir``). Paths in it are relative to the working directory, like a fit
    config's; its ``fit_config`` may name a packaged fit config (``synthcir``)."""
    path = config_file(path)
    raw = read_yaml(path, "ablation config")

    def where(key: str) -> str:
        return f"{path}: {key}"

    known = {
        "benchmark",
        "root",
        "fit_config",
        "budget",
        "overrides",
        "captions",
        "eval",
        "variants",
        "seeds",
        "out",
        "keep_checkpoints",
        "table",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where(unknown[0])}: unknown key (keys: {', '.join(sorted(known))})")
    for key in ("benchmark", "root", "fit_config", "budget", "eval", "variants"):
        if key not in raw:
            raise ConfigError(f"{where(key)} is required")
    budget = _mapping(raw["budget"], where("budget"))
    for key in REQUIRED_BUDGET:
        if key not in budget:
            raise ConfigError(f"{where('budget')} must set {key} (the equal budget of every row)")
    for key in budget:
        if key in ("data.root", "data.benchmark"):
            raise ConfigError(f"{where('budget.' + key)}: give it as {key.split('.')[1]}")
        if not any(overlaps(key, b) for b in BUDGET_KEYS):
            raise ConfigError(
                f"{where('budget.' + key)} is not a budget key ({', '.join(BUDGET_KEYS)}); "
                "put other settings of every run under 'overrides'"
            )
    overrides = _overrides(raw.get("overrides") or {}, where("overrides"))
    for key in overrides:
        _check_not_runner_key(key, where(f"overrides.{key}"))
        _check_not_budget_key(key, where(f"overrides.{key}"), "budget")
    captions = {
        name: _caption_spec(name, spec, where(f"captions.{name}"))
        for name, spec in _mapping(raw.get("captions") or {}, where("captions")).items()
    }
    config = AblationConfig(
        path=path,
        benchmark=str(raw["benchmark"]),
        root=Path(raw["root"]),
        fit_config=config_file(raw["fit_config"], where("fit_config")),
        budget=budget,
        overrides=overrides,
        captions=captions,
        eval=_eval_spec(raw["eval"], where("eval")),
        variants=_variants(raw["variants"], where("variants"), captions),
        seeds=_seeds(raw.get("seeds", [0]), where("seeds")),
        out=Path(raw["out"]) if raw.get("out") else None,
        keep_checkpoints=bool(raw.get("keep_checkpoints", False)),
        table=_table_name(raw.get("table", "ablation"), where("table")),
    )
    for v in config.variants:
        _overrides(deep_merge(overrides, v.overrides), f"{where('variants')}.{v.name}.overrides")
        _check_budget(config, v)
    return config


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _overrides(value: Any, where: str) -> dict[str, Any]:
    """Fit overrides keyed by flag name (``model.bank``, with or without a leading ``--``)."""
    flags = {str(k).removeprefix("--"): v for k, v in _mapping(value, where).items()}
    keys = sorted(flags)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if overlaps(a, b):
                raise ConfigError(
                    f"{where}: {a} and {b} set the same setting twice; write one mapping "
                    f"under the shorter key"
                )
    return flags


def _check_not_runner_key(key: str, where: str) -> None:
    for runner_key, instead in RUNNER_KEYS.items():
        if overlaps(key, runner_key):
            raise ConfigError(f"{where}: {runner_key} is set by the runner; use {instead}")


def _check_not_budget_key(key: str, where: str, instead: str) -> None:
    for budget_key in BUDGET_KEYS:
        if overlaps(key, budget_key):
            raise ConfigError(f"{where} changes the budget key {budget_key}; set it in {instead}")


def _caption_spec(name: str, spec: Any, where: str) -> CaptionSpec:
    spec = _mapping(spec, where)
    if set(spec) == {"file"}:
        return CaptionSpec(name, file=Path(spec["file"]))
    if set(spec) == {"oracle"}:
        oracle = _mapping(spec["oracle"] or {}, f"{where}.oracle")
        unknown = sorted(set(oracle) - ORACLE_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}.oracle.{unknown[0]}: unknown key (keys: {', '.join(sorted(ORACLE_KEYS))})"
            )
        return CaptionSpec(name, oracle=oracle)
    raise ConfigError(f"{where} must be either {{file: PATH}} or {{oracle: {{style: ...}}}}")


def _eval_spec(value: Any, where: str) -> EvalSpec:
    value = _mapping(value, where)
    unknown = sorted(set(value) - {"split", "weights", "metrics", "args", "paired"})
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown key (keys: split, weights, metrics, args, paired)"
        )
    if "split" not in value:
        raise ConfigError(f"{where}.split is required (a split with answers, e.g. test or val)")
    weights = value.get("weights", "model")
    if weights not in WEIGHTS:
        raise ConfigError(
            f"{where}.weights must be model (final weights) or best (best validation), "
            f"got {weights!r}"
        )
    metrics = tuple(str(m) for m in value.get("metrics") or ())
    paired = value.get("paired") or ()
    paired = (paired,) if isinstance(paired, str) else paired
    if not isinstance(paired, list | tuple) or not all(isinstance(m, str) for m in paired):
        raise ConfigError(f"{where}.paired must be a metric or a list of metrics, got {paired!r}")
    for metric in paired:
        if metrics and metric not in metrics:
            raise ConfigError(f"{where}.paired: {metric!r} is not one of the metrics ({metrics})")
    return EvalSpec(
        split=str(value["split"]),
        weights=weights,
        metrics=metrics,
        args=tuple(str(a) for a in value.get("args") or ()),
        paired=tuple(paired),
    )


def _table_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", value):
        raise ConfigError(
            f"{where} must be a file name stem (letters, digits, _ and -), got {value!r}"
        )
    return value


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) for s in value):
        raise ConfigError(f"{where} must be a non-empty list of integers, got {value!r}")
    return tuple(value)


VARIANT_KEYS = {
    "name",
    "label",
    "extends",
    "fit_config",
    "overrides",
    "captions",
    "init_from",
    "changes_budget",
    "compare_to",
}


def _variants(value: Any, where: str, captions: dict[str, CaptionSpec]) -> list[Variant]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of variants")
    raw: dict[str, dict[str, Any]] = {}
    for i, item in enumerate(value):
        item = _mapping(item, f"{where}[{i}]")
        name = item.get("name")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"{where}[{i}].name must be a folder-safe name, got {name!r}")
        if name in raw:
            raise ConfigError(f"{where}[{i}]: a second variant named {name!r}")
        unknown = sorted(set(item) - VARIANT_KEYS)
        if unknown:
            keys = ", ".join(sorted(VARIANT_KEYS))
            raise ConfigError(f"{where}.{name}.{unknown[0]}: unknown key (keys: {keys})")
        raw[name] = item
    variants = [_resolve(name, raw, where, ()) for name in raw]
    names = set(raw)
    for v in variants:
        at = f"{where}.{v.name}"
        if v.captions is not None and v.captions not in captions:
            raise ConfigError(
                f"{at}.captions: no caption file named {v.captions!r} under 'captions' "
                f"({', '.join(captions) or 'none defined'})"
            )
        if v.init_from is not None and v.init_from not in names:
            if not is_model_name(v.init_from):
                raise ConfigError(
                    f"{at}.init_from: {v.init_from!r} is no variant, model folder, shipped "
                    f"model ({', '.join(pretrained_names())}) or hub name"
                )
            v.init_from, v.init_model = None, v.init_from
        if v.compare_to is not None and (v.compare_to not in names or v.compare_to == v.name):
            raise ConfigError(f"{at}.compare_to: no other variant named {v.compare_to!r}")
    _check_no_init_cycle(variants, where)
    return variants


def _resolve(name: str, raw: dict[str, dict[str, Any]], where: str, seen: tuple[str, ...]):
    """A variant with what it ``extends`` filled in: every field but name, label and compare_to
    is inherited, overrides merge key by key."""
    if name in seen:
        raise ConfigError(f"{where}.{name}.extends: a cycle ({' -> '.join((*seen, name))})")
    item = raw[name]
    at = f"{where}.{name}"
    parent_name = item.get("extends")
    if parent_name is not None and parent_name not in raw:
        raise ConfigError(f"{at}.extends: no variant named {parent_name!r}")
    parent = _resolve(parent_name, raw, where, (*seen, name)) if parent_name else Variant(name)
    overrides = _overrides(item.get("overrides") or {}, f"{at}.overrides")
    for key in overrides:
        _check_not_runner_key(key, f"{at}.overrides.{key}")
    changes = item.get("changes_budget", list(parent.changes_budget))
    if not isinstance(changes, list) or not all(k in BUDGET_KEYS for k in changes):
        raise ConfigError(f"{at}.changes_budget must list budget keys ({', '.join(BUDGET_KEYS)})")
    merged = deep_merge(parent.overrides, overrides)
    return Variant(
        name=name,
        label=str(item.get("label", "")),
        fit_config=(
            config_file(item["fit_config"], f"{at}.fit_config")
            if item.get("fit_config")
            else parent.fit_config
        ),
        overrides=_overrides(merged, f"{at}.overrides"),
        captions=item.get("captions", parent.captions),
        init_from=item.get("init_from", parent.init_from),
        changes_budget=tuple(changes),
        compare_to=item.get("compare_to"),
    )


def _check_no_init_cycle(variants: list[Variant], where: str) -> None:
    parents = {v.name: v.init_from for v in variants}
    for v in variants:
        chain, name = [v.name], v.init_from
        while name is not None:
            if name in chain:
                raise ConfigError(f"{where}.{v.name}.init_from: a cycle ({' -> '.join(chain)})")
            chain.append(name)
            name = parents[name]


def _check_budget(config: AblationConfig, v: Variant) -> None:
    """Refuse a row whose overrides or fit YAML would give it another budget, unless it says so."""
    at = f"{config.path}: variants.{v.name}"
    for key in v.overrides:
        for budget_key in BUDGET_KEYS:
            if overlaps(key, budget_key) and budget_key not in v.changes_budget:
                raise ConfigError(
                    f"{at}.overrides.{key} changes the equal budget ({budget_key}); list "
                    f"{budget_key} under changes_budget if this row is meant to differ"
                )
    if v.fit_config is None:
        return
    base, own = config.fit_yaml(Variant("base")), config.fit_yaml(v)
    for key in BUDGET_KEYS:
        pinned = any(overlaps(key, b) for b in config.budget)
        if not pinned and base.get(key) != own.get(key) and key not in v.changes_budget:
            raise ConfigError(
                f"{at}.fit_config {v.fit_config} sets {key} to {own.get(key)!r}, the base "
                f"{config.fit_config} to {base.get(key)!r}: pin it under 'budget' or list it "
                "under changes_budget"
            )


def is_model_name(name: str) -> bool:
    """Whether ``name`` names a model rather than a variant: a folder, a shipped model or a hub
    repo (fetched when the run starts, not here)."""
    return Path(name).is_dir() or packaged_model(name) is not None or is_hub_name(name)

"""One entry point for every benchmark: ``load_split(name, root, split, **options)``.

Training, evaluation and ``csmcir data check`` look benchmarks up here by name, so adding a
benchmark means one module and one line in :data:`SPECS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from csmcir.data import circo, cirr, fashion200k, fashioniq, shoes
from csmcir.data.layout import apply_missing_policy
from csmcir.data.records import CIRSplit
from csmcir.errors import ConfigError, DataError


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark's reader, its official split names and any split-name aliases."""

    name: str
    read: Callable[..., CIRSplit]
    splits: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword options the reader accepts (category, exclude_reference, seed...)."""
        params = inspect.signature(self.read).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def split_name(self, split: str) -> str:
        split = self.aliases.get(split, split)
        if split not in self.splits:
            raise ConfigError(
                f"{self.name}: unknown split {split!r}; choose one of {', '.join(self.splits)}"
            )
        return split


SPECS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("synthcir", cirr.read_synthcir, cirr.SYNTHCIR_SPLITS),
        BenchmarkSpec("cirr", cirr.read, cirr.CIRR_SPLITS),
        BenchmarkSpec("fashioniq", fashioniq.read, fashioniq.SPLITS),
        BenchmarkSpec("circo", circo.read, circo.SPLITS),
        BenchmarkSpec("shoes", shoes.read, shoes.SPLITS, shoes.ALIASES),
        BenchmarkSpec("fashion200k", fashion200k.read, fashion200k.SPLITS),
    )
}
BENCHMARKS: tuple[str, ...] = tuple(SPECS)


def spec(benchmark: str) -> BenchmarkSpec:
    try:
        return SPECS[benchmark]
    except KeyError:
        raise ConfigError(
            f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}"
        ) from None


def read_split(benchmark: str, root: str | Path, split: str, **options) -> CIRSplit:
    """The split as its annotation files describe it, before any image is looked at."""
    s = spec(benchmark)
    unknown = sorted(set(options) - set(s.options))
    if unknown:
        raise ConfigError(
            f"{benchmark}: unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(s.options) or 'none'}"
        )
    data = s.read(root, s.split_name(split), **options)
    if not data.queries:  # else "ok" in data check, a shape error in fit, wrong advice in eval
        regenerate = ""
        if benchmark == "synthcir":
            from csmcir.data.synth import regenerate_command

            regenerate = f"; {regenerate_command(root)} regenerates it"
        raise DataError(
            f"{data.benchmark}/{data.split}: the annotation files under {root} hold no queries (an "
            "empty list), so there is nothing to train on or evaluate. Restore them "
            f"(datasets/README.md gives each file's layout{regenerate})"
        )
    return data


def load_split(
    benchmark: str,
    root: str | Path,
    split: str,
    *,
    drop_missing: bool = False,
    dropped_report: Path | None = None,
    require_queries: bool = True,
    **options,
) -> CIRSplit:
    """Read a benchmark split and make sure every image it refers to exists.

    A missing image is a DataError naming the first ones; ``drop_missing=True`` drops them and
    the queries that use them, lists them in ``CIRSplit.dropped`` and, with ``dropped_report``,
    writes them to that JSON file. Dropping every query is an error unless ``require_queries``
    is False (a reader of the gallery alone).
    """
    split_obj = read_split(benchmark, root, split, **options)
    return apply_missing_policy(
        split_obj,
        drop_missing=drop_missing,
        dropped_report=dropped_report,
        require_queries=require_queries,
    )

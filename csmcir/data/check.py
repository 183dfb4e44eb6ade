"""``csmcir data check``: is a benchmark on disk complete and readable before hours of training?

For each split it reads the annotation files (malformed JSON and wrong field names are reported
with file and position), counts queries, gallery and images, stats every image, and by default
decodes each one so a truncated file is found now rather than mid-epoch. It prints a table and
fails with a message that names the first missing or broken files.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from csmcir.data import fashioniq
from csmcir.data.images import verify_image
from csmcir.data.layout import first_few, missing_images
from csmcir.data.registry import BENCHMARKS, read_split, spec
from csmcir.errors import ConfigError, CsmcirError, DataError


@dataclass
class SplitReport:
    """What the check found for one split (one category of FashionIQ counts as its own)."""

    name: str
    queries: int | None = None
    gallery: int | None = None
    images: int | None = None
    missing: list[Path] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unreadable or self.error)

    def status(self) -> str:
        if self.error:
            return "ERROR"
        return "ok" if self.ok else "FAILED"

    def problems(self) -> str:
        parts = []
        if self.error:
            parts.append(self.error.removeprefix(f"{self.name}: "))
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {first_few(self.missing)}")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable: {first_few(self.unreadable, n=3)}")
        return f"  {self.name}: " + "; ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark's layout to expect")
    parser.add_argument("--root", type=Path, required=True, help="the benchmark's root folder")
    parser.add_argument(
        "--split", default="all", help="a split name, or 'all' (default) for every split"
    )
    parser.add_argument(
        "--category",
        choices=fashioniq.CATEGORIES,
        help="FashionIQ category to check (default: all three)",
    )
    parser.add_argument(
        "--decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode every image to find truncated or corrupt files (default: on; "
        "--no-decode only checks that files exist)",
    )


def check_split(
    benchmark: str, root: Path, split: str, options: dict, decode: bool, verdicts: dict
) -> SplitReport:
    """Check one split; ``verdicts`` caches decode results by path across splits."""
    label = f"{benchmark}-{options['category']}" if "category" in options else benchmark
    report = SplitReport(name=f"{label}/{split}")
    try:
        data = read_split(benchmark, root, split, **options)
    except CsmcirError as e:
        report.error = str(e)
        return report
    report.queries, report.gallery = len(data.queries), len(data.gallery)
    report.images = len(data.referenced_images())
    missing = set(missing_images(data))
    report.missing = [data.image_paths[i] for i in data.referenced_images() if i in missing]
    if decode:
        present = [data.image_paths[i] for i in data.referenced_images() if i not in missing]
        for path in tqdm(present, desc=f"{report.name}: decoding", unit="img", leave=False):
            if path not in verdicts:
                verdicts[path] = verify_image(path)
            if verdicts[path]:
                report.unreadable.append(verdicts[path])
    return report


def check(
    benchmark: str,
    root: Path,
    split: str = "all",
    category: str | None = None,
    decode: bool = True,
) -> list[SplitReport]:
    s = spec(benchmark)
    if category is not None and benchmark != "fashioniq":
        raise ConfigError(f"--category applies to fashioniq only, not {benchmark}")
    splits = list(s.splits) if split == "all" else [s.split_name(split)]
    option_sets = (
        [{"category": c} for c in ([category] if category else fashioniq.CATEGORIES)]
        if benchmark == "fashioniq"
        else [{}]
    )
    verdicts: dict[Path, str | None] = {}
    return [
        check_split(benchmark, root, sp, opts, decode, verdicts)
        for opts in option_sets
        for sp in splits
    ]


def format_table(reports: list[SplitReport], decode: bool) -> str:
    header = ["split", "queries", "gallery", "images", "missing", "unreadable", "status"]

    def cell(value: int | None) -> str:
        return "-" if value is None else str(value)

    rows = [
        [
            r.name,
            cell(r.queries),
            cell(r.gallery),
            cell(r.images),
            cell(None if r.error else len(r.missing)),
            cell(None if r.error or not decode else len(r.unreadable)),
            r.status(),
        ]
        for r in reports
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    )


def run(args: argparse.Namespace) -> int:
    reports = check(args.benchmark, args.root, args.split, args.category, args.decode)
    print(format_table(reports, args.decode))
    failed = [r for r in reports if not r.ok]
    if failed:
        raise DataError(
            f"{len(failed)} of {len(reports)} splits failed the check:\n"
            + "\n".join(r.problems() for r in failed)
        )
    print(f"{args.benchmark}: all {len(reports)} splits complete")
    return 0

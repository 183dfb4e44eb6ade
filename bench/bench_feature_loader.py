"""Throughput of the training DataLoader over the feature cache, against the memory-copy limit.

Reads (reference, target) feature pairs of ViT-g's shape (``[257, 1408]`` float16, 707 KB an
image) from a real on-disk cache through the training DataLoader, shuffled as training reads
them, for two data paths (see ``bench/feature_data.py``): ``old``, the path before issue 17
(per-sample reads widened to float32 on the host, then stacked), and ``new``, the default
(float16 rows copied straight into one batch tensor: a reused one in the training process, shared
memory in a worker).
The limit is this machine's own memory-copy bandwidth for the same bytes: a memcpy (numpy's copy)
of the batch's float16 bytes between two arrays already in memory, timed in the same rounds. The
cache sits in the page cache (as after a first epoch), so the loader's work is copying too.

The arms alternate round by round, so other processes' load falls on all alike; the figure is
the median round.

    python -m bench.bench_feature_loader --threads 1 [--batch-sizes 32 128] [--workers 0 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.feature_data import PATHS, VITG_FEATURES, endless, loader, synthetic_cache, triplets
from bench.report import update_section

THREAD_ARM = "new, 0 workers, prefetch thread (what fit runs)"
TEXTS = ["make it red", "add a second one on the left", "the same but smaller"]


def rate(fn: Callable[[], object], batches: int, pairs: int, ready: int = 0) -> float:
    """Pairs per second of ``batches`` calls, each delivering ``pairs`` pairs; the first
    ``ready`` were made ahead (a worker's prefetched batches) and only the others count."""
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    return (batches - ready) * pairs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--images", type=int, default=2048, help="rows in the cache")
    parser.add_argument("--batches", type=int, default=8, help="batches per arm and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument(
        "--section", default="feature_loader", help="BENCHMARKS.md section (the GPU suite's own)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    row_bytes = VITG_FEATURES[0] * VITG_FEATURES[1] * 2
    load_before = os.getloadavg()[0]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = triplets(synthetic_cache(Path(tmp), args.images), TEXTS, TEXTS)
        for batch in args.batch_sizes:
            src = torch.randn(2 * batch, *VITG_FEATURES).half().numpy()
            dst = np.empty_like(src)
            # numpy's copy of contiguous arrays is libc's memcpy (torch's copy_ of float16 ran
            # at half its speed here)
            arms: dict[str, Callable[[], object]] = {"memcpy": lambda d=dst, s=src: np.copyto(d, s)}
            ready = {"memcpy": 0}
            baseline = {}  # arm -> the old path's arm it is compared with
            for workers in args.workers:
                for path in PATHS:
                    threads = (False, True) if path == "new" and workers == 0 else (False,)
                    for thread in threads:
                        arm = THREAD_ARM if thread else f"{path}, {workers} worker(s)"
                        made = endless(loader(data, path, batch, workers, False, thread=thread))
                        arms[arm] = lambda b=made: next(b)
                        ready[arm] = 2 if thread else 2 * workers  # prefetch depth, factor 2
                        baseline[arm] = f"old, {workers} worker(s)"
            for fn in arms.values():
                fn()  # workers started, memory touched
            rates: dict[str, list[float]] = {arm: [] for arm in arms}
            for _ in tqdm(range(args.rounds), desc=f"batch {batch}", unit="round"):
                for arm, fn in arms.items():
                    rates[arm].append(rate(fn, args.batches, batch, ready[arm]))
                    # let a worker refill its prefetch queue before the next arm is timed
                    time.sleep(ready[arm] * batch / rates[arm][-1] * 1.2)
            limit = statistics.median(rates.pop("memcpy"))
            rows.append(
                f"| {batch} | memory copy of the same bytes (the limit) | {limit:,.0f} | "
                f"{limit * 2 * row_bytes / 1e9:.2f} | 1.00 | |"
            )
            for arm, values in rates.items():
                pairs = statistics.median(values)
                old = statistics.median(rates[baseline[arm]])
                rows.append(
                    f"| {batch} | {arm} | {pairs:,.0f} | {pairs * 2 * row_bytes / 1e9:.2f} | "
                    f"**{pairs / limit:.2f}** | {pairs / old:.1f}x |"
                )
            print("\n".join(rows[-len(arms) :]))
    load_after = os.getloadavg()[0]
    body = "\n".join(
        [
            "## Feature loader throughput against the memory-copy limit",
            "",
            "(reference, target) pairs of cached ViT-g features (`[257, 1408]` float16, "
            f"{row_bytes / 1024:.0f} KB an image) per second through the training DataLoader "
            f"(shuffled, {args.images} images in a real on-disk cache, in the page cache), "
            f"torch {args.threads} thread(s). Median of {args.rounds} alternating rounds of "
            f"{args.batches} batches per arm (with workers or the prefetch thread, less the 2 "
            "batches made ahead before its turn; the next arm waits until they are made). "
            "`old`: the path before issue 17 (per-sample reads widened to float32 on the host, "
            "stacked); `new`: float16 rows copied straight into one batch tensor (a reused one "
            "in the training process, fresh shared memory in a worker). `prefetch thread`: "
            "the same collate in a thread of the training process, 2 batches ahead of the step "
            "(`csmcir.data.prefetch`), what `fit` reads a feature cache with; `vs old`: "
            "against the old path with the same number of workers. The limit: a memcpy "
            "(numpy's copy) of the batch's float16 bytes between two arrays in memory, timed "
            "in the same rounds. "
            "GB/s counts the float16 bytes delivered.",
            "",
            "| batch | arm | pairs/s | GB/s | of the limit | vs old |",
            "| ---: | --- | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            f"Load average (1 min) of the shared machine: {load_before:.1f} before, "
            f"{load_after:.1f} after.",
        ]
    )
    print(body)
    if not args.no_report:
        update_section(args.section, body)


if __name__ == "__main__":
    main()

"""Gallery search speed: faiss flat, IVF and HNSW against a plain torch matmul + topk.

    python -m bench.bench_search [--gallery 100000] [--dim 256] [--data both|clustered|uniform]

Every method searches the same L2-normalised gallery (built through ``GalleryIndex``, the code
path ``csmcir index build`` uses) in one run: single-query latency (median), throughput on
batches of queries, build time, and recall@10 of the approximate indexes against exact search.
``clustered`` embeddings (points around 1,000 centres, queries near gallery points) resemble a
trained model's; ``uniform`` random vectors are the worst case for IVF and HNSW.
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np
import torch

from bench.report import update_section
from csmcir.retrieval.index import GalleryIndex, Hits, recall_against_exact

K = 10


def embeddings(n: int, n_queries: int, dim: int, data: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    if data == "uniform":
        gallery = rng.standard_normal((n, dim), dtype=np.float32)
        queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((1000, dim), dtype=np.float32)
        gallery = centres[rng.integers(0, 1000, n)] + 0.6 * rng.standard_normal(
            (n, dim), dtype=np.float32
        )
        picks = gallery[rng.integers(0, n, n_queries)]
        queries = picks + 0.4 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return gallery, queries


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (after one warm-up) and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(search, queries: np.ndarray, batch: int, singles: int) -> dict:
    one = [timed(lambda i=i: search(queries[i : i + 1]), 3)[0] for i in range(singles)]
    batch_s, _ = timed(lambda: search(queries[:batch]), 3)
    return {"latency_ms": 1000 * statistics.median(one), "qps": batch / batch_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1024, help="batch for throughput")
    parser.add_argument("--singles", type=int, default=100, help="single queries for latency")
    parser.add_argument("--data", choices=("both", "clustered", "uniform"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-report", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    datasets = ("clustered", "uniform") if args.data == "both" else (args.data,)
    rows = {data: bench_one(args, data) for data in datasets}
    lines = [
        f"## Gallery search ({args.gallery:,} x {args.dim}, top-{K}, {args.threads} threads)",
        "",
        f"| embeddings | method | options | build (s) | 1-query latency (ms) | throughput "
        f"(queries/s, batch {args.queries}) | vs torch | recall@{K} vs exact |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for data, by_method in rows.items():
        base = by_method["torch matmul + topk"]
        for name, r in by_method.items():
            opts = ", ".join(f"{k}={v}" for k, v in r.get("options", {}).items()) or "-"
            recall = f"{r['recall']:.4f}" if "recall" in r else "1 (reference)"
            lines.append(
                f"| {data} | {name} | {opts} | {r['build_s']:.1f} | {r['latency_ms']:.2f} | "
                f"{r['qps']:,.0f} | {r['qps'] / base['qps']:.1f}x | {recall} |"
            )
    lines += [
        "",
        "Latency is the median of single-query searches; throughput is the median of three "
        "batched searches. Exact search (torch or faiss flat) returns the same top-k, so recall "
        "is measured against torch's. `clustered`: points around 1,000 centres, queries near "
        "gallery points (like a trained model's embeddings); `uniform`: random directions, the "
        "worst case for IVF and HNSW. The machine's 2 cores are shared, so absolute times are "
        "noisy; compare within a row group.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_report:
        update_section("search", body)


def bench_one(args: argparse.Namespace, data: str) -> dict[str, dict]:
    gallery, queries = embeddings(args.gallery, args.queries, args.dim, data)
    ids = [str(i) for i in range(args.gallery)]
    g_torch, q_torch = torch.from_numpy(gallery), torch.from_numpy(queries)

    def torch_search(q: np.ndarray):
        return torch.topk(torch.from_numpy(q) @ g_torch.T, K, dim=1)

    timing = measure(torch_search, queries, args.queries, args.singles)
    rows: dict[str, dict] = {"torch matmul + topk": {"build_s": 0.0, **timing}}
    exact_top = torch.topk(q_torch @ g_torch.T, K, dim=1).indices.numpy()
    exact = Hits([[ids[j] for j in row] for row in exact_top], np.zeros(0), exact_top)
    for name, options in (
        ("faiss flat (exact)", {"kind": "flat"}),
        ("faiss IVF", {"kind": "ivf", "nprobe": 16}),
        ("faiss HNSW", {"kind": "hnsw", "hnsw_m": 32, "ef_search": 128}),
    ):
        start = time.perf_counter()
        index = GalleryIndex.from_embeddings(gallery, ids, fingerprint="bench", **options)
        build_s = time.perf_counter() - start
        timing = measure(
            lambda q, ix=index: ix.index.search(q, K), queries, args.queries, args.singles
        )
        rows[name] = {
            "build_s": build_s,
            **timing,
            "recall": recall_against_exact(index.search(queries, K), exact),
            "options": {k: v for k, v in index.meta["options"].items() if k != "kind"},
        }
        print(data, name, rows[name], flush=True)
    return rows


if __name__ == "__main__":
    main()

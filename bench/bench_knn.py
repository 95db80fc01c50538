"""Exact top-k search: ranking.retrieval.metrics (chunked torch)
vs. sklearn NearestNeighbors (brute) vs. faiss IndexFlatL2.

    python bench/bench_knn.py                       # 10,000 queries x 100,000 gallery, dim 128 and 4096, top-30
    python bench/bench_knn.py --queries 1000 --gallery 10000 --dims 64

Random unit vectors (seeded). Every method runs in a fresh subprocess that generates the same data, so its peak
resident memory (ru_maxrss) is its own; "extra" is that peak minus the resident memory just before the search
(library imported, data generated): what the search itself allocates.
sklearn is slow at high dimension: above --slow-dim it searches only --slow-queries queries and its time is
extrapolated linearly to all queries (search time is linear in the number of queries; its memory is not scaled).
Agreement is the share of top-k index sets identical to faiss's on the queries both searched.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("ours", "sklearn", "faiss")
LIBRARY = {"ours": "ranking.retrieval.metrics", "sklearn": "sklearn.neighbors", "faiss": "faiss"}


def unit_vectors(n: int, dim: int, seed: int, block: int = 8192) -> np.ndarray:
    """Generated in blocks into one array, so the data costs its own size and no temporary copy."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        rows = out[start : start + block]
        rows[:] = rng.standard_normal(rows.shape, dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): less disturbed than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_mb() -> float:
    """Resident memory now (Linux); the peak after the search minus this is what the search itself added."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def search(method: str, queries: np.ndarray, gallery: np.ndarray, k: int, threads: int, chunk_size: int) -> np.ndarray:
    if method == "ours":
        import torch

        from ranking.retrieval.metrics import nearest_neighbors

        torch.set_num_threads(threads)
        return nearest_neighbors(torch.from_numpy(queries), torch.from_numpy(gallery), k, chunk_size)[1].numpy()
    if method == "sklearn":
        from sklearn.neighbors import NearestNeighbors
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads):
            index = NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=threads).fit(gallery)
            return index.kneighbors(queries, return_distance=True)[1]
    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatL2(gallery.shape[1])
        index.add(gallery)
        return index.search(queries, k)[1]
    raise ValueError(method)


def worker(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line. The import is neither timed nor "extra" memory."""
    importlib.import_module(LIBRARY[args.worker])
    queries = unit_vectors(args.queries, args.dim, seed=1)[: args.measure_queries]
    gallery = unit_vectors(args.gallery, args.dim, seed=2)
    before = current_rss_mb()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    indices = search(args.worker, queries, gallery, args.k, args.threads, args.chunk_size)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    np.save(args.indices_out, indices.astype(np.int64))
    print(
        json.dumps(
            {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak_rss_mb(), "extra_mb": peak_rss_mb() - before}
        )
    )


def measure(method: str, dim: int, measured: int, args: argparse.Namespace, indices_out: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--dim",
        str(dim),
        "--measure-queries",
        str(measured),
        "--queries",
        str(args.queries),
        "--gallery",
        str(args.gallery),
        "--k",
        str(args.k),
        "--threads",
        str(args.threads),
        "--chunk-size",
        str(args.chunk_size),
        "--indices-out",
        str(indices_out),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        OPENBLAS_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
    )
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{method} at dim {dim} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def agreement(a: np.ndarray, b: np.ndarray | None) -> str:
    if b is None:
        return "-"
    n = min(len(a), len(b))
    return f"{100 * np.mean([set(x) == set(y) for x, y in zip(a[:n], b[:n])]):.1f}%"


def ratio(row: dict, ours: dict | None, key: str) -> str:
    return "-" if ours is None else f"{row[key] / max(ours[key], 1e-9):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=1024, help="our queries per distance block")
    parser.add_argument("--slow-dim", type=int, default=512, help="above this dim, sklearn searches a subset")
    parser.add_argument("--slow-queries", type=int, default=1000, help="sklearn's query subset above --slow-dim")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure-queries", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--indices-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    print(f"top-{args.k} of {args.queries:,} queries in {args.gallery:,} gallery vectors, {args.threads} threads\n")
    print(
        "| dim | method | queries searched | seconds (all queries) | CPU seconds | peak RSS MB | extra MB "
        "| time / ours | extra memory / ours | same top-k as faiss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for dim in args.dims:
            rows, indices = {}, {}
            for method in args.methods:
                measured = args.queries
                if method == "sklearn" and dim > args.slow_dim:
                    measured = min(args.queries, args.slow_queries)
                out = Path(tmp) / f"{method}-{dim}.npy"
                row = measure(method, dim, measured, args, out)
                row["measured"], scale = measured, args.queries / measured
                row["full_seconds"], row["full_cpu"] = row["seconds"] * scale, row["cpu_seconds"] * scale
                rows[method], indices[method] = row, np.load(out)
            for method, row in rows.items():
                estimated = "" if row["measured"] == args.queries else " (extrapolated)"
                print(
                    f"| {dim} | {method} | {row['measured']:,} | {row['full_seconds']:.1f}{estimated} "
                    f"| {row['full_cpu']:.1f} | {row['peak_mb']:.0f} | {row['extra_mb']:.0f} "
                    f"| {ratio(row, rows.get('ours'), 'full_seconds')} | {ratio(row, rows.get('ours'), 'extra_mb')} "
                    f"| {agreement(indices[method], indices.get('faiss'))} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

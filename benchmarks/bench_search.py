"""Exact k-NN search (:class:`aion.discovery.search.NeighbourIndex`): queries/s, build time, peak memory, exactness.

    OMP_NUM_THREADS=1 python benchmarks/bench_search.py                  # 100k x 64, 1000 queries, k=10
    OMP_NUM_THREADS=2 python benchmarks/bench_search.py --dim 768
    python benchmarks/bench_search.py --device cuda --n 1000000

Vectors are a seeded mixture of Gaussian clusters (``--clusters``), so neighbours have structure
like real embeddings rather than the near-equidistant points of isotropic noise. Queries are
objects of the index asked by object_id (each leaves itself out), the ``aion search --ids`` case.
Exactness is checked against a float64 brute force (full distance rows) on ``--check`` queries;
the cluster labels also give precision@k, a sanity check that neighbours share a population.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import describe_machine  # noqa: E402

from aion.discovery.search import NeighbourIndex, precision_at_k  # noqa: E402


def clustered(n: int, dim: int, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, dim) float32, cluster label (n,)); cluster widths vary so densities differ."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    widths = rng.uniform(0.1, 0.4, n_clusters).astype(np.float32)
    labels = rng.integers(0, n_clusters, n)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 65536):  # in blocks: no float64 copy of the whole table
        e = min(n, s + 65536)
        x[s:e] = centres[labels[s:e]] + widths[labels[s:e], None] * rng.standard_normal((e - s, dim), np.float32)
    return x, labels


def peak_rss_mib() -> float:
    """VmHWM of this process (peak resident memory), in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def brute_force(x: np.ndarray, rows: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 distances of rows ``rows`` to every row, self left out; (rows (Q, k), distances (Q, k)).
    The table is converted in blocks, so the check adds little to the peak memory."""
    q = x[rows].astype(np.float64)
    if metric == "cosine":
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    d = np.empty((len(rows), len(x)))
    for s in range(0, len(x), 8192):
        block = x[s:s + 8192].astype(np.float64)
        if metric == "cosine":
            d[:, s:s + 8192] = 1.0 - q @ (block / np.linalg.norm(block, axis=1, keepdims=True)).T
        else:
            sq = (q**2).sum(1)[:, None] + (block**2).sum(1)[None, :] - 2.0 * q @ block.T  # float64: no cancellation
            d[:, s:s + 8192] = np.sqrt(np.maximum(sq, 0.0))
    d[np.arange(len(rows)), rows] = np.inf
    r = np.argsort(d, axis=1, kind="stable")[:, :k]
    return r, np.take_along_axis(d, r, 1)


def check_exact(index: NeighbourIndex, x: np.ndarray, rows: np.ndarray, metric: str, k: int) -> str:
    got_r, got_d = index.search(x[rows], k, exclude=rows)
    want_r, want_d = brute_force(x, rows, metric, k)
    same = (got_r == want_r).all(axis=1)
    max_dd = float(np.abs(got_d - want_d).max())
    # a different row is only acceptable where float32 rounding swaps two (nearly) equal distances
    swaps = ~same
    explained = all(np.abs(np.sort(want_d[i]) - np.sort(got_d[i])).max() < 1e-5 for i in np.nonzero(swaps)[0])
    verdict = "EXACT" if same.all() else ("exact up to float32 near-ties" if explained else "MISMATCH")
    return (f"{verdict}: {int(same.sum())}/{len(rows)} queries with identical neighbours, "
            f"max |d - d_float64| {max_dd:.2e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="objects in the index (default 100000)")
    ap.add_argument("--dim", type=int, default=64, help="embedding dimension (default 64)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--metrics", default="cosine,euclidean")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-rows", type=int, default=None, help="default: the device's (search.BLOCKS)")
    ap.add_argument("--query-rows", type=int, default=None, help="default: the device's (search.BLOCKS)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per metric; the best is reported")
    ap.add_argument("--check", type=int, default=50, help="queries checked against a float64 brute force")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS / torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(describe_machine())
    t = time.perf_counter()
    x, labels = clustered(args.n, args.dim, args.clusters, args.seed)
    ids = np.arange(args.n, dtype=np.int64) + 10**15
    print(f"data: {args.n} x {args.dim} float32 in {args.clusters} clusters ({time.perf_counter() - t:.1f} s to make)")
    rng = np.random.default_rng(args.seed + 1)
    query_rows = rng.choice(args.n, args.queries, replace=False)
    probe = NeighbourIndex(x[:1], metric="euclidean", device=args.device, chunk_rows=args.chunk_rows,
                           query_rows=args.query_rows)
    print(f"{args.queries} queries by object_id (self excluded), k={args.k}, device {args.device}, "
          f"chunk_rows {probe.chunk_rows}, query_rows {probe.query_rows}, torch threads {torch.get_num_threads()}")
    for metric in args.metrics.split(","):
        t = time.perf_counter()
        index = NeighbourIndex(x, ids, metric=metric, device=args.device, chunk_rows=args.chunk_rows,
                               query_rows=args.query_rows)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        build = time.perf_counter() - t
        index.query_ids(ids[query_rows[:8]], args.k)  # warm-up (allocator, kernels)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            nb, _ = index.query_ids(ids[query_rows], args.k)
            times.append(time.perf_counter() - t)
        best = min(times)
        p = precision_at_k(labels[query_rows], labels[nb - 10**15])
        exact = check_exact(index, x, query_rows[: args.check], metric, args.k)
        print(f"{metric:>9}: {args.queries / best:10.1f} queries/s (best of {args.repeats}: {best:.3f} s; "
              f"all {', '.join(f'{v:.3f}' for v in times)} s), build {build:.3f} s, precision@{args.k} "
              f"(cluster labels) {p:.4f}; {exact}")
        del index
    print(f"peak resident memory (VmHWM): {peak_rss_mib():.0f} MiB"
          + (f"; peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
             if args.device.startswith("cuda") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Exact nearest neighbours in embedding space, for catalogues of up to millions of objects.

Why exact and chunked: approximate indexes trade recall for speed and need tuning per data set,
while a blocked brute force is exact, has no parameters that change the answer, and on a CPU or a
GPU is fast enough for millions of rows. Distances are computed for a block of queries against a
chunk of the index at a time (one matrix product) and merged into a running top-k, so memory is
``query_rows x chunk_rows`` floats whatever the catalogue size; the full N x N matrix never exists.

Ties (equal distances) are broken by index row, smallest first, so the answer does not depend on
the block or chunk sizes beyond float rounding of the distances themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

METRICS = ("cosine", "euclidean")
BLOCKS = {"cpu": (4096, 256), "cuda": (65536, 4096)}
"""Default (chunk_rows, query_rows) per device type: on a CPU a 4 MiB distance block stays in cache
(measured fastest at D=64 and as fast as larger blocks at D=768); a GPU wants large products."""


def _as_matrix(x, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty (rows, dim) array, got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        first = np.nonzero(bad)[0][:5].tolist()
        raise ValueError(f"{what}: {int(bad.sum())} row(s) hold NaN or inf (first rows: {first})")
    return np.ascontiguousarray(arr)


def _sort_pairs(dist: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row's (distance, index) pairs by distance, then index (a stable sort after an index sort)."""
    by_row = torch.argsort(rows, dim=1, stable=True)
    dist, rows = dist.gather(1, by_row), rows.gather(1, by_row)
    by_dist = torch.argsort(dist, dim=1, stable=True)
    return dist.gather(1, by_dist), rows.gather(1, by_dist)


def _chunk_topk(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest of each row of ``block`` with ties at the k-th value resolved to the smallest columns.

    ``torch.topk`` picks arbitrarily among equal values at the cut. Asking it for k + 1 shows where
    that can matter (the (k+1)-th value equals the k-th); only those rows are redone with a stable
    sort, which is exact. Rows without such a tie pay nothing extra.
    """
    n_cols = block.shape[1]
    if n_cols <= k:  # everything is kept: a stable sort is the whole answer
        order = torch.argsort(block, dim=1, stable=True)
        return block.gather(1, order), order
    vals, cols = torch.topk(block, k + 1, dim=1, largest=False, sorted=True)
    crowded = vals[:, k] == vals[:, k - 1]
    vals, cols = vals[:, :k], cols[:, :k]
    if bool(crowded.any()):
        rows = torch.nonzero(crowded).squeeze(1)
        order = torch.argsort(block[rows], dim=1, stable=True)[:, :k]
        cols[rows] = order
        vals[rows] = block[rows].gather(1, order)
    return vals, cols


class NeighbourIndex:
    """Exact k-nearest-neighbour search over ``vectors`` (N, D), answering with ``ids`` (N,).

    ``metric``: ``"cosine"`` (distance 1 - cos, in [0, 2]; zero vectors are an error) or
    ``"euclidean"`` (the L2 distance). ``device``: where the index lives and the products run
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``...). ``chunk_rows`` index rows and ``query_rows`` queries are
    compared at a time (default: :data:`BLOCKS` of the device); together they bound the working memory
    (``4 * query_rows * chunk_rows`` bytes for the distance block, about twice that at peak) besides
    the index itself (a float32 copy of ``vectors``; unit vectors for cosine).

    Euclidean search works on vectors minus the index mean (distances are unchanged): the expansion
    ``|q|^2 + |x|^2 - 2 q.x`` then does not lose the small distances to float32 rounding of the large
    norms that embeddings with a common offset have.
    """

    def __init__(self, vectors, ids=None, metric: str = "cosine", device: str | torch.device = "cpu",
                 chunk_rows: int | None = None, query_rows: int | None = None):
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        default_chunk, default_query = BLOCKS["cuda" if torch.device(device).type == "cuda" else "cpu"]
        chunk_rows = default_chunk if chunk_rows is None else chunk_rows
        query_rows = default_query if query_rows is None else query_rows
        if int(chunk_rows) < 1 or int(query_rows) < 1:
            raise ValueError(f"chunk_rows and query_rows must be >= 1, got {chunk_rows} and {query_rows}")
        x = _as_matrix(vectors, "vectors")
        n = x.shape[0]
        ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids)
        if ids.shape != (n,) or ids.dtype.kind not in "iu":
            raise ValueError(f"ids: expected {n} integer ids (one per vector), got dtype {ids.dtype} shape {ids.shape}")
        ids = ids.astype(np.int64)
        order = np.argsort(ids, kind="stable")
        dup = np.diff(ids[order]) == 0
        if dup.any():
            raise ValueError(f"ids: not unique (repeated: {np.unique(ids[order][1:][dup])[:5].tolist()})")
        self.metric = metric
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} was asked for but torch sees no CUDA device")
        self.chunk_rows = int(chunk_rows)
        self.query_rows = int(query_rows)
        self.ids = ids
        self._id_order = order
        self._sorted_ids = ids[order]
        self._centre = x.mean(axis=0, dtype=np.float64).astype(np.float32) if metric == "euclidean" else None
        self._x = self._prepare(torch.from_numpy(x), "vectors").to(self.device)
        self._sq = (self._x * self._x).sum(dim=1) if metric == "euclidean" else None

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def dim(self) -> int:
        return int(self._x.shape[1])

    def _prepare(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """Vectors as the index compares them: centred (euclidean) or unit length (cosine); always a new tensor."""
        if self.metric == "euclidean":
            return x - torch.from_numpy(self._centre)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        zero = (norm.squeeze(1) == 0).nonzero().squeeze(1)
        if zero.numel():
            raise ValueError(f"{what}: {zero.numel()} zero vector(s) have no direction for the cosine metric "
                             f"(first rows: {zero[:5].tolist()}); use metric='euclidean'")
        return x / norm

    # ---------------------------------------------------------------- lookups
    def rows_of(self, object_ids) -> np.ndarray:
        """Index rows of ``object_ids``; unknown ids are an error that names (a few of) them."""
        want = np.asarray(object_ids)
        if want.ndim != 1 or (want.size and want.dtype.kind not in "iu"):
            raise ValueError(f"object ids: expected a 1-d array of integers, got dtype {want.dtype} shape {want.shape}")
        want = want.astype(np.int64)
        pos = np.clip(np.searchsorted(self._sorted_ids, want), 0, len(self) - 1)
        found = self._sorted_ids[pos] == want
        if not found.all():
            missing = want[~found]
            raise KeyError(f"{missing.size} object id(s) are not in the index, e.g. {missing[:5].tolist()} "
                           f"(the index holds {len(self)} objects)")
        return self._id_order[pos]

    # ---------------------------------------------------------------- search
    def _scores(self, q: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """What is ranked for index rows ``start:stop``: the distance less a per-query constant
        (-cos for cosine, |x|^2 - 2 q.x for euclidean), one fused product, no extra temporaries."""
        chunk = self._x[start:stop]
        if self.metric == "cosine":
            return torch.mm(q, chunk.T).neg_()
        return torch.addmm(self._sq[start:stop], q, chunk.T, beta=1.0, alpha=-2.0)

    def _finish(self, q: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Ranked scores -> distances (1 - cos clamped to [0, 2]; sqrt(|q|^2 + score) clamped at 0)."""
        if self.metric == "cosine":
            return (score + 1.0).clamp_(0.0, 2.0)
        return ((q * q).sum(dim=1, keepdim=True) + score).clamp_(min=0.0).sqrt_()

    def search(self, queries, k: int, exclude=None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest index rows of each query: ``(rows (Q, k) int64, distances (Q, k) float32)``,
        nearest first, ties by row. ``exclude``: one index row per query to leave out (-1: none)."""
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries: dimension {q.shape[1]} does not match the index dimension {self.dim}")
        with torch.inference_mode():
            return self._search(self._prepare(torch.from_numpy(q), "queries").to(self.device), k, exclude, progress)

    def _search(self, qt: torch.Tensor, k: int, exclude, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` for queries already prepared like the index (centred or unit length, on its device)."""
        n_q = qt.shape[0]
        if exclude is not None:
            exclude = np.asarray(exclude)
            if exclude.shape != (n_q,) or exclude.dtype.kind not in "iu":
                raise ValueError(f"exclude: expected {n_q} integer rows (one per query), got dtype {exclude.dtype} "
                                 f"shape {exclude.shape}")
            if exclude.size and (exclude.max() >= len(self) or exclude.min() < -1):
                raise ValueError(f"exclude: rows must be in [-1, {len(self)}), got [{exclude.min()}, {exclude.max()}]")
        k = int(k)
        available = len(self) - (1 if exclude is not None and exclude.size and (exclude >= 0).any() else 0)
        if not 1 <= k <= available:
            raise ValueError(f"k must be in [1, {available}] for an index of {len(self)} objects"
                             f"{' with the query itself left out' if available < len(self) else ''}, got {k}")
        from tqdm.auto import tqdm

        out_rows = np.empty((n_q, k), dtype=np.int64)
        out_dist = np.empty((n_q, k), dtype=np.float32)
        with torch.inference_mode():
            for s in tqdm(range(0, n_q, self.query_rows), desc="search", unit="block", disable=not progress):
                e = min(n_q, s + self.query_rows)
                ex = None if exclude is None else torch.from_numpy(exclude[s:e].astype(np.int64)).to(self.device)
                score, rows = self._search_block(qt[s:e], k, ex)
                dist = self._finish(qt[s:e], score)
                out_rows[s:e] = rows.cpu().numpy()
                out_dist[s:e] = dist.cpu().numpy()
        return out_rows, out_dist

    def _search_block(self, q: torch.Tensor, k: int, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b = q.shape[0]
        best_d = torch.full((b, k), float("inf"), device=self.device)
        best_i = torch.full((b, k), -1, dtype=torch.int64, device=self.device)
        for start in range(0, len(self), self.chunk_rows):
            stop = min(len(self), start + self.chunk_rows)
            block = self._scores(q, start, stop)
            if exclude is not None:
                inside = (exclude >= start) & (exclude < stop)
                if bool(inside.any()):
                    r = inside.nonzero().squeeze(1)
                    block[r, exclude[r] - start] = float("inf")
            vals, cols = _chunk_topk(block, k)
            # earlier chunks hold smaller rows, so (best, chunk) stays in row order among equal distances
            cand_d, cand_i = _sort_pairs(vals, cols + start)
            dist, rows = torch.cat([best_d, cand_d], dim=1), torch.cat([best_i, cand_i], dim=1)
            keep = torch.argsort(dist, dim=1, stable=True)[:, :k]
            best_d, best_i = dist.gather(1, keep), rows.gather(1, keep)
        return best_d, best_i

    def query(self, queries, k: int, exclude=None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` but answering with object ids: ``(neighbour ids (Q, k), distances (Q, k))``."""
        rows, dist = self.search(queries, k, exclude=exclude, progress=progress)
        return self.ids[rows], dist

    def query_ids(self, object_ids, k: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of objects already in the index, each leaving itself out."""
        rows = self.rows_of(object_ids)
        with torch.inference_mode():
            stored = self._x[torch.from_numpy(rows).to(self.device)]
            found, dist = self._search(stored, k, rows, progress)
        return self.ids[found], dist

    def search_self(self, k: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Every indexed object's k nearest others: ``(rows (N, k), distances (N, k))`` (the k-NN graph)."""
        with torch.inference_mode():
            return self._search(self._x, k, np.arange(len(self)), progress)


# -------------------------------------------------------------------- retrieval quality
def _label_matches(query_labels, neighbour_labels) -> tuple[np.ndarray, np.ndarray]:
    ql = np.asarray(query_labels)
    nl = np.asarray(neighbour_labels)
    if ql.ndim != 1 or nl.ndim != 2 or nl.shape[0] != ql.shape[0] or ql.size == 0:
        raise ValueError(f"labels: expected query labels (Q,) and neighbour labels (Q, k) with Q >= 1, got shapes "
                         f"{ql.shape} and {nl.shape}")
    if ql.dtype.kind == "f" and np.isnan(ql).any():
        raise ValueError(f"query labels: {int(np.isnan(ql).sum())} are NaN; leave queries without a label out first")
    return ql, nl == ql[:, None]


def precision_at_k(query_labels, neighbour_labels) -> float:
    """Fraction of each query's neighbours that share its label, averaged over queries.

    A NaN neighbour label never matches; a NaN query label is an error (there is nothing to match).
    """
    _, match = _label_matches(query_labels, neighbour_labels)
    return float(match.mean(axis=1).mean())


@dataclass
class LabelPrecision:
    label: object
    n_queries: int
    precision: float
    """Mean fraction of neighbours with this label, over the queries that have it."""
    base_rate: float
    """Chance level: the fraction of a random (other) member of the population that has this label."""


def precision_by_label(query_labels, neighbour_labels, population_labels: Sequence | np.ndarray | None = None,
                       queries_in_population: bool = True) -> list[LabelPrecision]:
    """Precision@k per query label next to its chance level, most common label first.

    ``population_labels``: labels of every indexed object (default: the query labels, i.e. every
    object was a query). ``queries_in_population``: the queries are indexed objects searched with
    themselves left out, so chance for label L is (n_L - 1) / (N - 1) rather than n_L / N.
    """
    ql, match = _label_matches(query_labels, neighbour_labels)
    pop = ql if population_labels is None else np.asarray(population_labels)
    if pop.ndim != 1 or pop.size < 2:
        raise ValueError(f"population labels: expected a 1-d array of at least 2 labels, got shape {pop.shape}")
    per_query = match.mean(axis=1)
    labels, counts = np.unique(ql, return_counts=True)
    out = []
    for label, n_q in sorted(zip(labels.tolist(), counts.tolist(), strict=True), key=lambda t: (-t[1], str(t[0]))):
        n_l = int((pop == label).sum())
        base = (n_l - 1) / (pop.size - 1) if queries_in_population else n_l / pop.size
        out.append(LabelPrecision(label=label, n_queries=int(n_q), precision=float(per_query[ql == label].mean()),
                                  base_rate=float(base)))
    return out

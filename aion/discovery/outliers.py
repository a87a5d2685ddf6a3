"""Outlier scores on embeddings: how far an object sits from the crowd, and how unlikely a flow finds it.

Two views, because they fail differently: the k-NN density score is local and assumption-free but
treats every embedding dimension as equally important once standardized; the flow's negative
log-likelihood models the joint density (correlations included) but can be fooled where the flow
underfits. Objects both scores rank high are the strongest candidates.

Scores are larger = more outlying. :func:`rank_outliers` turns them into the ranked table that
``aion outliers`` writes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

STANDARDIZE = ("robust", "std", "none")
MAD_TO_SIGMA = 1.4826
"""Median absolute deviation -> standard deviation for a Gaussian."""


@dataclass
class Standardizer:
    centre: np.ndarray
    scale: np.ndarray

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return ((np.asarray(vectors, dtype=np.float64) - self.centre) / self.scale).astype(np.float32)


def fit_standardizer(vectors: np.ndarray, method: str = "robust") -> Standardizer:
    """Per-dimension centre and scale.

    ``robust``: median and 1.4826 x MAD, so the outliers being looked for do not widen the scale
    that measures them (a dimension whose MAD is 0, i.e. more than half its values are equal,
    uses its standard deviation instead). ``std``: mean and standard deviation. ``none``: unchanged.
    A constant dimension keeps scale 1 (it adds nothing to any distance). Both substitutions are warned about.
    """
    if method not in STANDARDIZE:
        raise ValueError(f"standardize: expected one of {STANDARDIZE}, got {method!r}")
    x = np.asarray(vectors, dtype=np.float64)
    if method == "none":
        return Standardizer(np.zeros(x.shape[1]), np.ones(x.shape[1]))
    std = x.std(axis=0)
    if method == "robust":
        centre = np.median(x, axis=0)
        scale = MAD_TO_SIGMA * np.median(np.abs(x - centre), axis=0)
        no_mad = (scale == 0) & (std > 0)
        if no_mad.any():
            warnings.warn(f"{int(no_mad.sum())} dimension(s) have MAD 0 (mostly one value); their standard deviation "
                          f"is used as the scale", stacklevel=2)
            scale = np.where(no_mad, std, scale)
    else:
        centre, scale = x.mean(axis=0), std
    constant = scale == 0
    if constant.any():
        warnings.warn(f"{int(constant.sum())} constant dimension(s) carry no information and are left unscaled",
                      stacklevel=2)
        scale = np.where(constant, 1.0, scale)
    return Standardizer(centre, scale)


def knn_density_score(vectors, k: int = 10, standardize: str = "robust", device: str = "cpu",
                      chunk_rows: int | None = None, query_rows: int | None = None,
                      progress: bool = False) -> np.ndarray:
    """Mean euclidean distance from each object to its ``k`` nearest other objects (float64, (N,)),
    after per-dimension standardization (default ``robust``: median and 1.4826 x MAD, so the outliers
    do not set the scale; see :func:`fit_standardizer`). Low density = large score.

    Exact and chunked (:class:`~aion.discovery.search.NeighbourIndex`), so it scales to millions of rows.
    """
    from aion.discovery.search import NeighbourIndex, _as_matrix

    x = _as_matrix(vectors, "vectors")
    z = fit_standardizer(x, standardize)(x)
    index = NeighbourIndex(z, metric="euclidean", device=device, chunk_rows=chunk_rows, query_rows=query_rows)
    _, dist = index.search_self(k, progress=progress)
    return dist.astype(np.float64).mean(axis=1)


def fit_flow(vectors, steps: int | None = None, seed: int = 0, device: str = "cpu", progress: bool = False):
    """An unconditional flow (:class:`aion.discovery.flow.ConditionalFlow`) fitted to ``vectors``, seeded;
    ``steps``: training steps (default: :class:`~aion.discovery.flow.FlowConfig`'s)."""
    from aion.discovery.flow import ConditionalFlow, FlowConfig

    cfg = FlowConfig(seed=int(seed)) if steps is None else FlowConfig(seed=int(seed), steps=int(steps))
    return ConditionalFlow.fit(np.asarray(vectors, dtype=np.float32), None, cfg, progress=progress, device=device)


def flow_nll_score(flow, vectors, ode_steps: int | None = None, progress: bool = False) -> np.ndarray:
    """Negative log-likelihood (nats per object, float64 (N,)) of ``vectors`` under an unconditional flow
    (for a conditional one, its unconditional branch). ``ode_steps``: solver steps of the density
    integral (default: the flow's own); the exact divergence makes each step cost D backward passes,
    so fewer steps are the lever on large catalogues."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != flow.dim:
        raise ValueError(f"the flow models {flow.dim}-dim vectors, the embeddings have shape {x.shape}")
    if ode_steps is not None and int(ode_steps) < 1:
        raise ValueError(f"flow ODE steps must be >= 1, got {ode_steps}")
    nll = -np.asarray(flow.log_prob(x, None, ode_steps=ode_steps, progress=progress), dtype=np.float64)
    if nll.shape != (len(vectors),):
        raise RuntimeError(f"flow.log_prob returned shape {nll.shape}, expected ({len(vectors)},)")
    if np.isnan(nll).any():
        raise ValueError(f"the flow gave NaN log-likelihoods for {int(np.isnan(nll).sum())} object(s)")
    return nll


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for finding ``labels == 1`` (0.5 = chance, 1 = perfect)."""
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"auroc: scores and labels must be 1-d of one length, got {s.shape} and {y.shape}")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1} or len(values) != 2:
        raise ValueError(f"auroc: labels must be 0/1 with both present, got values {sorted(values)[:5]}")
    return float(roc_auc_score(y.astype(int), s))


def percentile(scores) -> np.ndarray:
    """Percentage of objects whose score is <= each object's (100 = the most outlying)."""
    s = np.asarray(scores, dtype=np.float64)
    return 100.0 * np.searchsorted(np.sort(s), s, side="right") / s.size


SCORE_COLUMNS = {"knn": ("knn_score", "knn_percentile"), "flow": ("flow_nll", "flow_percentile")}


def rank_outliers(ids, scores: Mapping[str, np.ndarray], rank_by: str) -> dict[str, np.ndarray]:
    """The ranked table: object_id, rank (1 = most outlying by ``rank_by``), and per score
    (``knn``, ``flow``) its value and percentile. Equal scores keep input order."""
    ids = np.asarray(ids, dtype=np.int64)
    unknown = sorted(set(scores) - set(SCORE_COLUMNS))
    if unknown:
        raise ValueError(f"scores: unknown name(s) {unknown}, expected {sorted(SCORE_COLUMNS)}")
    if rank_by not in scores:
        raise ValueError(f"rank_by: {rank_by!r} was not computed (scores: {sorted(scores)})")
    for name, s in scores.items():
        if np.shape(s) != ids.shape:
            raise ValueError(f"scores[{name!r}]: expected shape {ids.shape}, got {np.shape(s)}")
        if np.isnan(s).any():
            raise ValueError(f"scores[{name!r}]: {int(np.isnan(s).sum())} NaN value(s)")
    order = np.argsort(-np.asarray(scores[rank_by], dtype=np.float64), kind="stable")
    out: dict[str, np.ndarray] = {"object_id": ids[order], "rank": np.arange(1, ids.size + 1, dtype=np.int64)}
    for name in SCORE_COLUMNS:
        if name in scores:
            value, pct = SCORE_COLUMNS[name]
            s = np.asarray(scores[name], dtype=np.float64)
            out[value] = s[order]
            out[pct] = percentile(s)[order]
    return out

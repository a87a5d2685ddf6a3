"""Fitted quantizers for scalar modalities: value <-> bin index, no training loop.

Two kinds, both implementing ``aion.tokenizers.quantizers.Quantizer`` on float tensors of
any shape (indices are ``LongTensor``; codes are the bins' representative values in
physical units):

- :class:`QuantileBinning`: bin edges from the empirical distribution of training values
  (AION-1: empirical CDF -> 1024 equally populated bins), in a chosen transformed space,
  optionally with bins spread by ``density ** density_power`` instead of by density;
- :class:`LinearGridBinning`: a fixed uniform grid (redshift), nothing fitted.

Transforms (``scale`` sets where each bends):
- ``none``;
- ``log``: log10, for strictly positive quantities;
- ``asinh``: ``asinh(x / scale)``, linear within ``|x| < scale`` and logarithmic beyond,
  so it takes negative fluxes;
- ``sqrt``: ``sign(x) 2 scale (sqrt(1 + |x| / scale) - 1)``, linear near 0 and growing like
  ``sqrt(|x|)`` beyond ``scale``: the variance-stabilising transform of photometric noise
  ``sigma^2 ~ background + source Poisson``, ``scale`` being the flux at which both are equal.

Why transforms matter less than one might expect: equally populated bins are invariant
under any monotonic transform (a quantile of ``asinh(x)`` is ``asinh`` of a quantile of
``x``), so with ``density_power=1`` the transform only decides where edges fall between
two neighbouring training values. It decides much more with ``density_power < 1``, where
bins follow the density *in the transformed space*: ``density_power=1/3`` is the
mean-squared-error optimal allocation of the transformed value (Panter & Dite 1951), so
``sqrt`` + ``1/3`` sizes flux bins to the measurement noise, in the bulk and in the sparse
bright tail alike, where equally populated bins are many sigma wide.

Values outside the fitted range are never silently clipped: they go to the first or last
bin and are counted in ``last_clip_counts`` (per call) and ``clip_totals`` (cumulative).
Non-finite inputs go to index 0 and are counted as ``nonfinite``.

Streaming fit: :meth:`QuantileBinning.update` feeds values into a bounded, seeded
reservoir sample (bottom-k random keys, so the sample does not depend on how the stream
is chunked) and :meth:`QuantileBinning.finalize` computes the bins from it; with fewer
values than ``reservoir_size`` the fit is exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

Transform = Literal["none", "log", "asinh", "sqrt"]
TRANSFORMS: tuple[str, ...] = ("none", "log", "asinh", "sqrt")


# ------------------------------------------------------------------------------ bookkeeping
@dataclass
class ClipCounts:
    """How many values of a quantize call fell outside the fitted range (or were not finite)."""

    n: int = 0
    below: int = 0
    above: int = 0
    nonfinite: int = 0

    @property
    def clipped(self) -> int:
        return self.below + self.above

    def __iadd__(self, other: ClipCounts) -> ClipCounts:
        self.n += other.n
        self.below += other.below
        self.above += other.above
        self.nonfinite += other.nonfinite
        return self

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class FitStats:
    """What a fit saw, so a user can tell a healthy fit from a degenerate one."""

    n_seen: int
    """Finite values offered to the fit."""
    n_used: int
    """Values the bins were computed from (the reservoir sample)."""
    n_out_of_domain: int
    """Finite values not used: ``log`` of values <= 0 (quantile bins), values off the grid (linear grids)."""
    n_nonfinite: int
    """NaN / inf values offered and dropped."""
    n_effective_bins: int
    """Distinct bins after merging ties (<= ``n_bins``)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Reservoir:
    """A uniform random sample of at most ``size`` values from a stream, reproducible from ``seed``.

    Each value draws a uniform key and the ``size`` smallest keys are kept (bottom-k
    sampling). Keys come from one seeded generator in stream order, so the sample depends on
    the seed and the order of the values but not on how they were chunked. Memory: 16 bytes
    per held value (value + key, float64), up to twice ``size`` between compactions.
    """

    def __init__(self, size: int = 1_000_000, seed: int = 0) -> None:
        if int(size) < 1:
            raise ValueError(f"reservoir size must be >= 1, got {size}")
        self.size = int(size)
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._keys: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []
        self._held = 0
        self._threshold = math.inf
        self.n_seen = 0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        keys = self._rng.random(v.size)
        self.n_seen += v.size
        if self._threshold < math.inf:
            keep = keys < self._threshold
            v, keys = v[keep], keys[keep]
        self._keys.append(keys)
        self._vals.append(v)
        self._held += v.size
        if self._held > 2 * self.size:
            self._compact()

    def _compact(self) -> None:
        keys = np.concatenate(self._keys) if self._keys else np.empty(0)
        vals = np.concatenate(self._vals) if self._vals else np.empty(0)
        if keys.size > self.size:
            idx = np.argpartition(keys, self.size - 1)[: self.size]
            keys, vals = keys[idx], vals[idx]
            self._threshold = float(keys.max())
        self._keys, self._vals, self._held = [keys], [vals], keys.size

    def sample(self) -> np.ndarray:
        """The held values (a copy; order is arbitrary but reproducible)."""
        self._compact()
        return self._vals[0].copy()


# ------------------------------------------------------------------------------ transforms
def _forward_np(x: np.ndarray, transform: str, scale: float) -> np.ndarray:
    if transform == "none":
        return x
    if transform == "asinh":
        return np.arcsinh(x / scale)
    if transform == "sqrt":
        return np.sign(x) * (2.0 * scale) * (np.sqrt(1.0 + np.abs(x) / scale) - 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, np.log10(np.where(x > 0, x, 1.0)), -np.inf)


def _inverse_np(u: np.ndarray, transform: str, scale: float) -> np.ndarray:
    if transform == "none":
        return u
    if transform == "asinh":
        return np.sinh(u) * scale
    if transform == "sqrt":
        a = np.abs(u) / (2.0 * scale) + 1.0
        return np.sign(u) * scale * (a * a - 1.0)
    return 10.0**u


def _forward_torch(x: torch.Tensor, transform: str, scale: float) -> torch.Tensor:
    if transform == "none":
        return x
    if transform == "asinh":
        return torch.asinh(x / scale)
    if transform == "sqrt":
        return torch.sign(x) * (2.0 * scale) * (torch.sqrt(1.0 + x.abs() / scale) - 1.0)
    return torch.where(x > 0, torch.log10(torch.where(x > 0, x, torch.ones_like(x))), -torch.inf)


# ------------------------------------------------------------------------------ bin layouts
def _atoms(counts: np.ndarray, n_bins: int) -> np.ndarray:
    """Distinct values repeated at least as often as an equal share of the other values' bins."""
    atom = np.zeros(counts.size, dtype=bool)
    while True:
        free_bins = n_bins - int(atom.sum())
        if free_bins <= 0:
            return atom
        share = (counts.sum() - counts[atom].sum()) / free_bins
        new = atom | (counts >= share)
        if np.array_equal(new, atom):
            return atom
        atom = new


def equal_count_bins(u_sorted: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Equally populated bins over sorted values with ties handled explicitly.

    Returns ``(edges, counts)``; bin ``k`` is ``[edges[k], edges[k+1])`` except the last,
    which is closed. Identical values never straddle an edge: bins are formed greedily over
    the distinct values. A value repeated at least as often as an equal share of the rest
    (an atom, e.g. a constant EBV or fluxes of exactly 0) gets a bin of its own, and the
    other values share the remaining bins equally (each bin takes the remaining count over
    the remaining bins, closing on whichever side of the target is nearer, and always
    before an atom). With fewer distinct values than bins every distinct value gets its own
    bin and the surplus bins are merged away: bins are never empty, but there may be fewer
    of them (``n_effective_bins``). Inner edges lie half-way between the last value of one
    bin and the first of the next.
    """
    vals, counts = np.unique(u_sorted, return_counts=True)
    m = vals.size
    if m == 0:
        raise ValueError("cannot fit bins: no values")
    cum = np.cumsum(counts)
    atom = _atoms(counts, n_bins) if m > n_bins else np.zeros(m, dtype=bool)
    atom_idx = np.flatnonzero(atom)
    cw = np.cumsum(np.where(atom, 0, counts))  # cumulative count of the non-atom values
    last: list[int] = []
    i = 0
    while i < m:
        bins_left = n_bins - len(last)
        if bins_left == 1:
            j = m - 1
        elif m - i <= bins_left or atom[i]:
            j = i
        else:
            k = int(np.searchsorted(atom_idx, i))
            next_atom = int(atom_idx[k]) if k < atom_idx.size else m
            shared_bins = max(1, bins_left - (atom_idx.size - k))
            done = float(cw[i - 1]) if i else 0.0
            goal = done + (float(cw[-1]) - done) / shared_bins
            j = min(max(int(np.searchsorted(cw, goal, side="left")), i), next_atom - 1)
            if j > i and cw[j] >= goal and goal - cw[j - 1] < cw[j] - goal:
                j -= 1  # stop nearer the target
        last.append(j)
        i = j + 1
    ends = np.asarray(last, dtype=np.int64)
    lo, hi = vals[ends[:-1]], vals[ends[:-1] + 1]
    inner = 0.5 * (lo + hi)
    inner = np.where((inner > lo) & (inner <= hi), inner, hi)  # adjacent floats: edge on the upper value
    edges = np.concatenate([[vals[0]], inner, [vals[-1]]])
    bin_counts = np.diff(np.concatenate([[0], cum[ends]]))
    return edges, bin_counts


def density_power_edges(u_sorted: np.ndarray, n_bins: int, power: float, cells: int | None = None) -> np.ndarray:
    """Edges spread in proportion to ``density ** power`` of the (transformed) values.

    The density is estimated on cells holding equal numbers of training values (at least 8
    each, at most ``16 * n_bins`` cells), so it follows the data in the bulk and in sparse
    tails alike; ``density ** power`` is integrated piecewise linearly and inverted at
    ``n_bins`` equal steps. ``power = 1`` gives (smoothed) equal-count bins, ``power = 1/3``
    minimises the mean squared quantisation error of the transformed value, ``power = 0``
    gives a uniform grid between the extremes. Bins may be empty (sparse tails); repeated
    values (atoms) fall inside one narrow bin whose median representative is the atom.
    """
    n = u_sorted.size
    lo, hi = float(u_sorted[0]), float(u_sorted[-1])
    if hi <= lo:
        return np.array([lo, hi])
    n_cells = int(cells or min(16 * n_bins, max(1, n // 8)))
    cell_edges = np.quantile(u_sorted, np.linspace(0.0, 1.0, n_cells + 1))
    cell_edges[0], cell_edges[-1] = lo, hi
    cell_edges = np.maximum.accumulate(cell_edges)
    mass = np.diff(np.searchsorted(u_sorted, cell_edges, side="left").astype(np.float64))
    mass[-1] += n - mass.sum()  # values equal to the maximum
    width = np.diff(cell_edges)
    keep = width > 0
    if not keep.any():
        return np.array([lo, hi])
    # zero-width cells (ties) hand their mass to the next cell that has a width
    owner = np.minimum(np.searchsorted(np.flatnonzero(keep), np.arange(width.size)), keep.sum() - 1)
    mass = np.bincount(owner, weights=mass, minlength=int(keep.sum()))
    grid = np.concatenate([[lo], cell_edges[1:][keep]])
    width = np.diff(grid)
    density = mass / (n * width)
    floor = 1e-9 * density.max()
    weight = np.maximum(density, floor) ** power * width
    cdf = np.concatenate([[0.0], np.cumsum(weight)])
    cdf /= cdf[-1]
    edges = np.interp(np.linspace(0.0, 1.0, n_bins + 1), cdf, grid)
    edges[0], edges[-1] = lo, hi
    return np.unique(edges)


def optimal_rms_error(values: np.ndarray, n_bins: int) -> float:
    """Smallest RMS error (physical units) any ``n_bins``-level scalar quantizer can reach on ``values``.

    High-resolution approximation of the optimum (Panter & Dite 1951):
    ``D = (integral p^(1/3) dx)^3 / (12 n_bins^2)``, with the density estimated on
    equal-count cells as in :func:`density_power_edges`. Used by reports to tell a field
    that needs a better binning from one that no 1024-token binning can serve.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    x = x[np.isfinite(x)]
    if x.size < 2 or x[-1] <= x[0]:
        return 0.0
    n_cells = min(16 * n_bins, max(1, x.size // 8))
    cell_edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n_cells + 1)))
    mass = np.diff(np.searchsorted(x, cell_edges, side="left").astype(np.float64))
    mass[-1] += x.size - mass.sum()
    width = np.diff(cell_edges)
    integral = float(np.sum((mass / (x.size * width)) ** (1.0 / 3.0) * width))
    return math.sqrt(integral**3 / 12.0) / n_bins


def _bin_medians(x_sorted: np.ndarray, u_sorted: np.ndarray, edges: np.ndarray, transform: str,
                 scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(median of the training values in each bin, count); empty bins get their transformed midpoint."""
    k = edges.size - 1
    idx = np.clip(np.searchsorted(edges[1:-1], u_sorted, side="right"), 0, k - 1)
    counts = np.bincount(idx, minlength=k)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    centers = _inverse_np(0.5 * (edges[:-1] + edges[1:]), transform, scale)
    nonempty = counts > 0
    lo_i = starts + (counts - 1) // 2
    hi_i = starts + counts // 2
    med = 0.5 * (x_sorted[np.minimum(lo_i, x_sorted.size - 1)] + x_sorted[np.minimum(hi_i, x_sorted.size - 1)])
    centers[nonempty] = med[nonempty]
    return centers, counts


# ------------------------------------------------------------------------------ quantizers
class _Binning:
    """Shared machinery: a transform, ``edges`` in the transformed space, ``centers`` in physical units."""

    kind: str = ""

    def __init__(self, n_bins: int, transform: str = "none", scale: float = 1.0) -> None:
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"scale must be a positive number, got {scale}")
        self.n_bins = int(n_bins)
        self.transform = str(transform)
        self.scale = float(scale)
        self.edges: torch.Tensor | None = None
        """(n_effective_bins + 1,) float64 edges in the transformed space; bin k = [edges[k], edges[k+1])."""
        self.centers: torch.Tensor | None = None
        """(n_effective_bins,) float64 representative value of each bin, physical units."""
        self.counts: torch.Tensor | None = None
        """(n_effective_bins,) int64 training values per bin (diagnostics)."""
        self.last_clip_counts = ClipCounts()
        self.clip_totals = ClipCounts()

    # -- protocol
    @property
    def codebook_size(self) -> int:
        return self.n_bins

    @property
    def fitted(self) -> bool:
        return self.edges is not None

    @property
    def n_effective_bins(self) -> int:
        self._require_fitted()
        assert self.centers is not None
        return int(self.centers.numel())

    def _require_fitted(self) -> None:
        if self.edges is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit()/finalize() or load its state")

    def edges_physical(self) -> torch.Tensor:
        """The edges in physical units (for plots and reports; tokens are decided in the transformed space)."""
        self._require_fitted()
        assert self.edges is not None
        return torch.from_numpy(_inverse_np(self.edges.numpy(), self.transform, self.scale))

    def transform_values(self, x: torch.Tensor) -> torch.Tensor:
        return _forward_torch(x.to(torch.float64), self.transform, self.scale)

    def _locate(self, x: torch.Tensor) -> tuple[torch.Tensor, ClipCounts]:
        """Bin indices of ``x`` and what fell outside, without recording anything."""
        self._require_fitted()
        assert self.edges is not None
        edges = self.edges.to(x.device)
        u = self.transform_values(x)
        idx = torch.searchsorted(edges[1:-1].contiguous(), u.contiguous(), right=True)
        idx = torch.where(torch.isnan(u), torch.zeros_like(idx), idx)
        counts = ClipCounts(n=int(x.numel()), below=int((u < edges[0]).sum()), above=int((u > edges[-1]).sum()),
                            nonfinite=int((~torch.isfinite(x.to(torch.float64))).sum()))
        return idx, counts

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values (any shape) -> (representative values, bin indices); clipped values are counted."""
        x = torch.as_tensor(x)
        idx, counts = self._locate(x)
        self.last_clip_counts = counts
        self.clip_totals += counts
        assert self.centers is not None
        codes = self.centers.to(x.device)[idx]
        out_dtype = x.dtype if x.is_floating_point() else torch.float64
        return codes.to(out_dtype), idx

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Bin indices -> representative values (float64, physical units).

        Indices past the last effective bin (possible when ties merged bins) decode to the
        last bin; indices outside ``[0, n_bins)`` are an error.
        """
        self._require_fitted()
        assert self.centers is not None
        indices = torch.as_tensor(indices)
        if indices.is_floating_point():
            raise TypeError(f"indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.n_bins):
            raise ValueError(f"indices must lie in [0, {self.n_bins}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        centers = self.centers.to(indices.device)
        return centers[indices.long().clamp(max=centers.numel() - 1)]

    def bin_widths(self) -> torch.Tensor:
        """Physical width of each bin (diagnostics, tests)."""
        return torch.diff(self.edges_physical())

    def reset_clip_counts(self) -> None:
        self.last_clip_counts = ClipCounts()
        self.clip_totals = ClipCounts()

    # -- persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._require_fitted()
        assert self.edges is not None and self.centers is not None and self.counts is not None
        return {"edges": self.edges.clone(), "centers": self.centers.clone(), "counts": self.counts.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            edges = tensors["edges"].to(torch.float64)
            centers = tensors["centers"].to(torch.float64)
        except KeyError as err:
            raise ValueError(f"{type(self).__name__}: state lacks tensor {err.args[0]!r}") from None
        if edges.ndim != 1 or centers.ndim != 1 or edges.numel() != centers.numel() + 1:
            raise ValueError(f"{type(self).__name__}: expected edges of length len(centers) + 1, got "
                             f"{tuple(edges.shape)} and {tuple(centers.shape)}")
        if not 1 <= centers.numel() <= self.n_bins:
            raise ValueError(f"{type(self).__name__}: {centers.numel()} bins stored, n_bins is {self.n_bins}")
        if bool((torch.diff(edges) < 0).any()):
            raise ValueError(f"{type(self).__name__}: stored edges are not sorted")
        counts = tensors.get("counts")
        self.edges, self.centers = edges.contiguous(), centers.contiguous()
        self.counts = (counts.to(torch.int64) if counts is not None
                       else torch.zeros(centers.numel(), dtype=torch.int64))


class QuantileBinning(_Binning):
    """Bins from the empirical distribution of training values (see the module docstring).

    ``transform`` / ``scale``: the space the bins are laid out in (``none``, ``log``,
    ``asinh``, ``sqrt``). ``density_power=1`` (AION-1): equally populated bins, ties handled by
    :func:`equal_count_bins` (atoms get their own bin, surplus bins are merged, none is
    empty). ``density_power < 1``: :func:`density_power_edges` (bins may be empty).
    The representative value of a bin is the median of the training values in it (the
    transformed-space midpoint for an empty bin). ``log`` ignores values <= 0 when fitting
    (counted in ``fit_stats.n_out_of_domain``) and clips them to bin 0 when quantizing.
    """

    kind = "quantile"

    def __init__(self, n_bins: int = 1024, transform: Transform = "none", scale: float = 1.0,
                 density_power: float = 1.0, reservoir_size: int = 1_000_000, seed: int = 0,
                 tail_margin: float = 0.0) -> None:
        super().__init__(n_bins, transform, scale)
        if not 0.0 <= float(density_power) <= 1.0:
            raise ValueError(f"density_power must lie in [0, 1], got {density_power}")
        if not (math.isfinite(float(tail_margin)) and float(tail_margin) >= 0):
            raise ValueError(f"tail_margin must be a finite number >= 0, got {tail_margin}")
        self.density_power = float(density_power)
        self.tail_margin = float(tail_margin)
        """The outer edges move out by this fraction of the fitted (transformed) range, so values
        a little beyond the training sample are still placed, not clipped (fine tokens resolve
        the wider edge bins)."""
        self.reservoir_size = int(reservoir_size)
        self.seed = int(seed)
        self._reservoir = Reservoir(self.reservoir_size, self.seed)
        self._n_nonfinite = 0
        self.fit_stats: FitStats | None = None

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_bins": self.n_bins, "transform": self.transform,
                "scale": self.scale, "density_power": self.density_power,
                "reservoir_size": self.reservoir_size, "seed": self.seed, "tail_margin": self.tail_margin}

    def update(self, values: np.ndarray | torch.Tensor) -> None:
        """Stream values into the reservoir; non-finite ones are dropped and counted."""
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        v = np.asarray(values, dtype=np.float64).ravel()
        ok = np.isfinite(v)
        self._n_nonfinite += int(v.size - ok.sum())
        self._reservoir.add(v[ok])

    def finalize(self) -> FitStats:
        """Compute the bins from everything streamed so far."""
        x = np.sort(self._reservoir.sample())
        u = _forward_np(x, self.transform, self.scale)
        ok = np.isfinite(u)
        n_out = int(x.size - ok.sum())
        x, u = x[ok], u[ok]  # still sorted: the transform is increasing
        if x.size == 0:
            raise ValueError("cannot fit quantile bins: no finite values"
                             + (f" ({n_out} values <= 0 rejected by the log transform)" if n_out else ""))
        if self.density_power == 1.0:
            edges, _ = equal_count_bins(u, self.n_bins)
        else:
            edges = density_power_edges(u, self.n_bins, self.density_power)
        centers, counts = _bin_medians(x, u, edges, self.transform, self.scale)
        if self.tail_margin > 0:
            span = float(edges[-1] - edges[0])
            edges = edges.astype(np.float64).copy()
            edges[0] -= self.tail_margin * span
            edges[-1] += self.tail_margin * span  # every transform maps all reals back to the domain
        self.edges = torch.from_numpy(edges.astype(np.float64))
        self.centers = torch.from_numpy(centers.astype(np.float64))
        self.counts = torch.from_numpy(counts.astype(np.int64))
        self.fit_stats = FitStats(n_seen=self._reservoir.n_seen, n_used=int(x.size), n_out_of_domain=n_out,
                                  n_nonfinite=self._n_nonfinite, n_effective_bins=int(centers.size))
        return self.fit_stats

    def fit(self, values: np.ndarray | torch.Tensor) -> QuantileBinning:
        """Fit from one array (a fresh reservoir: previous updates are discarded)."""
        self._reservoir = Reservoir(self.reservoir_size, self.seed)
        self._n_nonfinite = 0
        self.update(values)
        self.finalize()
        return self


class LinearGridBinning(_Binning):
    """``n_bins`` equal bins on ``[low, high]`` (e.g. redshift 0..1.6); centres are bin midpoints."""

    kind = "linear"

    def __init__(self, low: float, high: float, n_bins: int = 1024) -> None:
        super().__init__(n_bins, "none", 1.0)
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"linear grid needs finite low < high, got low={low}, high={high}")
        self.low, self.high = low, high
        edges = torch.linspace(low, high, self.n_bins + 1, dtype=torch.float64)
        edges[0], edges[-1] = low, high
        self.edges = edges
        self.centers = 0.5 * (edges[:-1] + edges[1:])
        self.counts = torch.zeros(self.n_bins, dtype=torch.int64)
        self.fit_stats: FitStats | None = None
        self._fit_counts = ClipCounts()

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_bins": self.n_bins, "low": self.low, "high": self.high}

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.n_bins

    def update(self, values: np.ndarray | torch.Tensor) -> None:
        """Count training values per bin (nothing is fitted; the counts are diagnostics)."""
        t = torch.as_tensor(np.asarray(values, dtype=np.float64).ravel())
        finite = torch.isfinite(t)
        self._fit_counts.nonfinite += int((~finite).sum())
        t = t[finite]
        assert self.counts is not None
        if t.numel():
            idx, clips = self._locate(t)
            self.counts += torch.bincount(idx, minlength=self.n_bins)
            self._fit_counts += clips

    def finalize(self) -> FitStats:
        """Freeze the training statistics (values per bin, how many fell off the grid)."""
        assert self.counts is not None
        n = int(self.counts.sum())
        self.fit_stats = FitStats(n_seen=n, n_used=n, n_out_of_domain=self._fit_counts.clipped,
                                  n_nonfinite=self._fit_counts.nonfinite, n_effective_bins=self.n_bins)
        return self.fit_stats

    def fit(self, values: np.ndarray | torch.Tensor) -> LinearGridBinning:
        self.update(values)
        self.finalize()
        return self

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        assert self.edges is not None
        expected = torch.linspace(self.low, self.high, self.n_bins + 1, dtype=torch.float64)
        if self.edges.numel() != expected.numel() or not torch.allclose(self.edges, expected, rtol=0, atol=1e-12):
            raise ValueError("LinearGridBinning: stored edges do not match low/high/n_bins of the config")


Binning = QuantileBinning | LinearGridBinning


def binning_from_config(config: dict[str, Any]) -> Binning:
    """Rebuild an unfitted binning from ``Binning.config()``."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind == "quantile":
        return QuantileBinning(**cfg)
    if kind == "linear":
        return LinearGridBinning(**cfg)
    raise ValueError(f"unknown binning kind {kind!r}; expected 'quantile' or 'linear'")

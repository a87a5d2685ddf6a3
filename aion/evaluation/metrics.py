"""Regression metrics shared by every method of the evaluation suite (foundation model heads and
supervised baselines), so that all methods are scored by one implementation.

Residuals are ``pred - true``. Robust statistics (median bias, 1.4826 MAD scatter) sit next to
R^2 and RMSE because a few catastrophic failures dominate the latter on small test sets. For
redshift targets the photo-z conventions on dz = (z_pred - z_true) / (1 + z_true) are added.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MAD_TO_SIGMA = 1.4826
OUTLIER_DZ = 0.15


def robust_stats(x: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD): a Gaussian sigma that ignores a minority of outliers."""
    med = float(np.median(x))
    return med, float(MAD_TO_SIGMA * np.median(np.abs(x - med)))


def regression_metrics(y_pred: np.ndarray, y_true: np.ndarray, redshift: bool = False) -> dict[str, float | int]:
    """Scores of point predictions against truths; rows with a NaN truth are skipped and counted
    (``n_skipped``). A non-finite prediction where the truth is known is an error: dropping it would
    flatter the method that failed.

    Keys: ``n``, ``n_skipped``, ``r2`` (1 - SS_res / SS_tot about the mean truth), ``bias`` (median
    residual), ``scatter`` (1.4826 MAD of the residual), ``rmse``; with ``redshift`` also
    ``bias_dz``, ``nmad`` and ``outlier_fraction`` (|dz| > 0.15). Undefined values (no rows, or
    constant truths for R^2) are NaN.
    """
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    if y_pred.shape != y_true.shape:
        raise ValueError(f"y_pred has {y_pred.size} rows but y_true has {y_true.size}")
    known = np.isfinite(y_true)
    bad = known & ~np.isfinite(y_pred)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} predictions are NaN/inf where the truth is known "
                         f"(first at row {int(np.nonzero(bad)[0][0])})")
    p, t = y_pred[known], y_true[known]
    n = int(t.size)
    nan = float("nan")
    out: dict[str, float | int] = {"n": n, "n_skipped": int((~known).sum()),
                                   "r2": nan, "bias": nan, "scatter": nan, "rmse": nan}
    if redshift:
        out.update(bias_dz=nan, nmad=nan, outlier_fraction=nan)
    if n == 0:
        return out
    resid = p - t
    out["bias"], out["scatter"] = robust_stats(resid)
    out["rmse"] = float(np.sqrt(np.mean(resid**2)))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    if ss_tot > 0:
        out["r2"] = 1.0 - float(np.sum(resid**2)) / ss_tot
    if redshift:
        if (t <= -1).any():
            raise ValueError("redshift truths must be > -1 (dz divides by 1 + z_true)")
        dz = resid / (1.0 + t)
        out["bias_dz"], out["nmad"] = robust_stats(dz)
        out["outlier_fraction"] = float(np.mean(np.abs(dz) > OUTLIER_DZ))
    return out


def paired_bootstrap(score: Callable[[np.ndarray], float], n: int, draws: int = 2000, seed: int = 0
                     ) -> tuple[float, float]:
    """(2.5%, 97.5%) percentiles of ``score(rows)`` over resamples of ``n`` objects with replacement.

    ``score`` compares two predictors on the same resampled objects (paired), so their shared
    test-set luck cancels: "clearly better" means the whole 95% interval favours one of them.
    Resamples where the score is undefined (NaN) are left out.
    """
    rng = np.random.default_rng(seed)
    vals = np.array([score(rng.integers(0, n, n)) for _ in range(draws)])
    vals = vals[np.isfinite(vals)]
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))

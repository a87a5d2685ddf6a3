"""Figures of ``aion zeroshot``: predicted vs true redshift, PIT histograms, example PDFs and
generated vs observed spectra (matplotlib, Agg backend, written via temp file + rename)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aion.evaluation.report import save_figure


def _methods(sets) -> list[tuple[str, str]]:
    from aion.evaluation.zeroshot import _tag

    return [(f"FM: {s}", _tag(s)) for s in sets] + [("GBM: photometry, all labels", "gbm")]


def plot_all(out: Path, a: dict[str, np.ndarray], examples: dict[str, Any], wave: np.ndarray, sets, cfg) -> None:
    import matplotlib

    matplotlib.use("Agg")
    plot_redshift(out / "redshift_pred_vs_true.png", a, sets)
    plot_pit(out / "pit.png", a, sets)
    if examples["pdf"]:
        plot_pdfs(out / "pdf_examples.png", examples["pdf"])
    if examples["spectra"]:
        plot_spectra(out / "spectra_examples.png", examples["spectra"], wave)


def plot_redshift(path: Path, a: dict[str, np.ndarray], sets) -> None:
    import matplotlib.pyplot as plt

    from aion.evaluation.zeroshot import redshift_metrics

    methods = _methods(sets)
    z = a["z_true"]
    hi = float(np.percentile(z, 99.5)) * 1.1
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4.2), squeeze=False)
    for ax, (label, key) in zip(axes[0], methods, strict=True):
        zp = a[f"{key}_median"]
        lo_err = np.clip(zp - a[f"{key}_p16"], 0, None)
        hi_err = np.clip(a[f"{key}_p84"] - zp, 0, None)
        ax.errorbar(z, zp, yerr=[lo_err, hi_err], fmt=".", ms=3, alpha=0.5, elinewidth=0.5, color="C0")
        grid = np.linspace(0, hi, 50)
        ax.plot(grid, grid, "k-", lw=0.8)
        for sign in (1, -1):
            ax.plot(grid, grid + sign * 0.15 * (1 + grid), "k:", lw=0.6)
        m = redshift_metrics(zp, z, a[f"{key}_p16"], a[f"{key}_p84"])
        ax.set_title(f"{label}\nNMAD {m['nmad']:.4f}, outl. {m['outlier_fraction']:.3f}, "
                     f"68% cov. {m['coverage_68']:.2f}", fontsize=9)
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_xlabel("spectroscopic z")
    axes[0][0].set_ylabel("predicted z (median, 68% interval)")
    save_figure(fig, path)


def plot_pit(path: Path, a: dict[str, np.ndarray], sets) -> None:
    import matplotlib.pyplot as plt

    from aion.evaluation.zeroshot import _tag

    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(4 * (len(sets) + 1), 3.4), squeeze=False)
    n = a["z_true"].size
    for ax, s in zip(axes[0], sets, strict=False):
        pit = a[f"{_tag(s)}_pit"]
        ax.hist(pit[np.isfinite(pit)], bins=10, range=(0, 1), color="C0", alpha=0.8)
        ax.axhline(n / 10, color="k", lw=0.8)
        ax.fill_between([0, 1], n / 10 - np.sqrt(n / 10), n / 10 + np.sqrt(n / 10), color="k", alpha=0.1)
        ax.set_title(f"PIT, FM: {s}", fontsize=9)
        ax.set_xlabel("CDF of the posterior at the true z")
    # the baseline has quantiles only: show the coverage of central intervals instead
    ax = axes[0][-1]
    nominal = np.array([0.68, 0.95])
    rows = [("FM " + s, _tag(s)) for s in sets] + [("GBM", "gbm")]
    for i, (label, key) in enumerate(rows):
        z = a["z_true"]
        cov = [np.mean((z >= a[f"{key}_p16"]) & (z <= a[f"{key}_p84"])),
               np.mean((z >= a[f"{key}_p2_5"]) & (z <= a[f"{key}_p97_5"]))]
        ax.plot(nominal, cov, "o-", label=label, color=f"C{i}")
    ax.plot([0.6, 1], [0.6, 1], "k-", lw=0.8)
    ax.fill_between([0.6, 1], [0.55, 0.95], [0.65, 1.05], color="k", alpha=0.1, label="+-5 points")
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("fraction of truths inside")
    ax.legend(fontsize=7)
    ax.set_title("interval calibration", fontsize=9)
    save_figure(fig, path)


def plot_pdfs(path: Path, pdfs: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5), squeeze=False)
    for ax, p in zip(axes.flat, pdfs, strict=False):
        e, pr = p["edges"], p["probs"]
        width = np.diff(e)
        dens = pr / np.where(width > 0, width, np.inf)
        ax.stairs(dens, e, fill=True, alpha=0.5)
        ax.axvline(p["z_true"], color="k", lw=1, label="spectroscopic z")
        ax.axvline(p["median"], color="C3", lw=1, ls="--", label="median")
        ax.axvspan(p["p16"], p["p84"], color="C3", alpha=0.15, label="68%")
        lo = max(float(e[0]), min(p["p16"], p["z_true"]) - 0.15)
        hi = min(float(e[-1]), max(p["p84"], p["z_true"]) + 0.15)
        ax.set_xlim(lo, hi)
        ax.set_xlabel("z")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Zero-shot redshift posteriors (photometry + images), coarse bins", fontsize=10)
    save_figure(fig, path)


def plot_spectra(path: Path, spectra: list[dict[str, Any]], wave: np.ndarray) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(spectra), 1, figsize=(11, 2.6 * len(spectra)), squeeze=False)
    for ax, s in zip(axes[:, 0], spectra, strict=True):
        obs = np.where(s["valid"], s["observed"], np.nan)

        def smooth_(x: np.ndarray, k: int = 16) -> np.ndarray:  # for display only: noisy spectra
            return np.convolve(np.nan_to_num(x), np.ones(k) / k, mode="same")

        smooth = smooth_(obs)
        ax.plot(wave, smooth, color="0.6", lw=0.6, label="observed (16-px mean)")
        if s["truth"] is not None:
            ax.plot(wave, s["truth"], color="k", lw=0.8, label="noiseless truth")
        for j, sample in enumerate(s["samples"][:2]):
            ax.plot(wave, sample, color="C3", lw=0.8, alpha=0.9 if j == 0 else 0.5,
                    label="generated" if j == 0 else None)
        for k_nn, nn in s["nn"].items():
            ax.plot(wave, smooth_(nn), color="C0", lw=0.7, alpha=0.7, label=f"{k_nn}-NN in photometry (16-px mean)")
            break
        lo, hi = np.nanpercentile(smooth, [1, 99.5])
        ax.set_ylim(min(0, lo), hi * 1.3)
        ax.set_title(f"z = {s['z']:.3f}", fontsize=9)
        ax.set_ylabel("1e-17 erg/s/cm2/A")
    axes[0][0].legend(fontsize=7, ncol=4)
    axes[-1][0].set_xlabel("observed wavelength (A)")
    save_figure(fig, path)

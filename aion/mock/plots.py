"""A PNG gallery of a mock universe: colour cutouts, spectra with photometry, label distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _rgb(image: np.ndarray, valid: np.ndarray, scale: float) -> np.ndarray:
    """Lupton-style asinh colour composite from (3, H, W) flux in (blue, green, red) order."""
    img = np.where(valid, image, 0.0)
    total = img.sum(axis=0) / 3
    stretch = np.arcsinh(np.clip(total, 0, None) / scale) / np.where(total > 0, total, 1)
    rgb = np.clip(img[::-1] * stretch[None] / np.arcsinh(60), 0, 1)
    return np.moveaxis(rgb, 0, -1)


def gallery(data_dir: str | Path, out: str | Path | None = None, n_show: int = 8) -> list[Path]:
    """Write gallery PNGs for the mock universe in ``data_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aion.data.mmu import iter_mmu_hdf5
    from aion.mock import sed
    from aion.mock.spectra import desi_wavelength

    data_dir = Path(data_dir)
    out = Path(out) if out is not None else data_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    # --- colour cutouts: Legacy Survey and, where available, HSC of the same galaxies
    leg = next(iter_mmu_hdf5(data_dir, "legacysurvey", batch_size=64))
    truth = next(iter_mmu_hdf5(data_dir, "truth", batch_size=64))
    order = np.argsort(-leg.columns["FLUX_R"])[:n_show]
    hsc_by_id = {}
    try:
        for batch in iter_mmu_hdf5(data_dir, "hsc", batch_size=256):
            for i, oid in enumerate(batch.columns.get("object_id", batch.object_id)):
                hsc_by_id[int(oid)] = (batch, i)
            break
    except FileNotFoundError:
        pass
    img = leg.modalities["legacysurvey_image"]
    fig, axes = plt.subplots(2, n_show, figsize=(2.0 * n_show, 4.4))
    for col, i in enumerate(order):
        ax = axes[0, col]
        ax.imshow(_rgb(img.flux[i, :3], img.valid[i, :3], 0.05), origin="lower")
        ax.set_title(f"z={truth.columns['Z'][i]:.2f}\nlogM={truth.columns['LOG_MSTAR'][i]:.1f}", fontsize=8)
        ax.axis("off")
        ax = axes[1, col]
        hsc_id = int(truth.columns["hsc_object_id"][i])
        if hsc_id in hsc_by_id:
            b, j = hsc_by_id[hsc_id]
            h = b.modalities["hsc_image"]
            # same surface-brightness stretch: zero point 27 units and smaller pixels
            scale = 0.05 * 10 ** (0.4 * 4.5) * (h.pixel_scale / img.pixel_scale) ** 2
            ax.imshow(_rgb(h.flux[j, :3], h.valid[j, :3], scale), origin="lower")
            ax.set_title("HSC", fontsize=8)
        else:
            ax.text(0.5, 0.5, "outside HSC", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.axis("off")
    fig.suptitle("Mock Legacy Survey g,r,i (top) and HSC g,r,i (bottom), brightest objects of the first shard")
    fig.tight_layout()
    paths.append(out / "cutouts.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # --- spectra with fibre photometry
    try:
        desi = next(iter_mmu_hdf5(data_dir, "desi", batch_size=16))
    except (FileNotFoundError, StopIteration):
        desi = None
    if desi is not None:
        spec = desi.modalities["desi_spectrum"]
        wave = desi_wavelength()
        # truth rows are aligned with Legacy Survey rows and know each object's DESI id
        leg_by_desi = {int(d): i for i, d in enumerate(truth.columns["desi_object_id"]) if d >= 0}
        n = min(4, len(desi))
        fig, axes = plt.subplots(n, 1, figsize=(10, 2.4 * n), sharex=True)
        axes = np.atleast_1d(axes)
        for k in range(n):
            ax = axes[k]
            f = np.where(spec.valid[k], spec.flux[k], np.nan)
            kernel = np.ones(9) / 9
            ax.plot(wave, np.convolve(np.nan_to_num(f), kernel, mode="same"), lw=0.6, color="0.3",
                    label="DESI-like spectrum (9-px boxcar)")
            li = leg_by_desi.get(int(desi.object_id[k]))
            if li is not None:
                for band, letter in zip(("des-g", "des-r", "des-i"), "GRI", strict=True):
                    name = f"decamDR1-{band[-1]}"
                    lam_eff = _effective_wavelength(name)
                    fnu_nmgy = leg.columns[f"FIBERFLUX_{letter}"][li]
                    flam = fnu_nmgy * 1e-9 * sed.AB_FNU * sed.C_AA_S / lam_eff**2 / 1e-17
                    ax.plot(lam_eff, flam, "o", color="C3", ms=6, label="fibre photometry" if band == "des-g" else None)
            ax.set_ylabel("f_lambda [1e-17 cgs]")
            ax.set_title(f"Z = {desi.columns['Z'][k]:.3f}  {desi.columns['TARGET'][k].decode()}", fontsize=9)
            ax.legend(fontsize=7, loc="upper right")
        axes[-1].set_xlabel("observed wavelength [A]")
        fig.tight_layout()
        paths.append(out / "spectra.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # --- label distributions over the whole truth table (streamed)
    cols = {k: [] for k in ("Z", "LOG_MSTAR", "sSFR", "QUENCHED", "TAGE_MW")}
    rmag = []
    for batch in iter_mmu_hdf5(data_dir, "truth", batch_size=1024,
                               columns=["object_id", "ra", "dec", *cols, "LEGACY_FLUX_TRUE"]):
        for k in cols:
            cols[k].append(batch.columns[k])
        rmag.append(22.5 - 2.5 * np.log10(np.clip(batch.columns["LEGACY_FLUX_TRUE"][:, 1], 1e-6, None)))
    arr = {k: np.concatenate(v) for k, v in cols.items()}
    r = np.concatenate(rmag)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].hist(arr["Z"], bins=40, color="C0")
    axes[0].set_xlabel("redshift")
    axes[1].hist(arr["LOG_MSTAR"], bins=40, color="C1")
    axes[1].set_xlabel("log10 M* [Msun]")
    axes[2].scatter(arr["LOG_MSTAR"], arr["sSFR"], s=2, c=np.where(arr["QUENCHED"], "C3", "C0"))
    axes[2].set_xlabel("log10 M*")
    axes[2].set_ylabel("log10 sSFR [1/yr]")
    sc = axes[3].scatter(r, arr["LOG_MSTAR"], s=2, c=arr["Z"], cmap="viridis")
    axes[3].set_xlabel("r [AB mag, true]")
    axes[3].set_ylabel("log10 M*")
    fig.colorbar(sc, ax=axes[3], label="z")
    fig.suptitle(f"{arr['Z'].size} mock galaxies (parent sample, z < {21})")
    fig.tight_layout()
    paths.append(out / "labels.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _effective_wavelength(filter_name: str) -> float:
    from aion.mock.sed import _filter_curve

    lam, resp = _filter_curve(filter_name)
    return float(np.trapezoid(lam * resp * lam, lam) / np.trapezoid(resp * lam, lam))

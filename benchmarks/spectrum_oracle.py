"""What R^2 against the noiseless truth can any spectrum denoiser reach on the mock's DESI spectra?

The mock's noiseless spectrum is linear in 25 numbers once redshift and kinematics are fixed
(5 bulge and 5 disk template coefficients, 14 line fluxes, an AGN amplitude). This script fits
exactly that model, with the *true* redshift, velocity dispersions, fibre fractions and
extinction, to each observed spectrum by inverse-variance weighted least squares. The fit is
unbiased and, among unbiased estimators, has the smallest variance: an oracle that knows the
generating physics and everything non-linear about the object. A tokenizer that knows none of
that should not expect to beat it; a target above the oracle's R^2 is out of reach at this noise.

Prints the same metrics as ``aion tokenizer eval`` for spectra (median and pooled R^2, fraction of
spectra with R^2 >= 0.99, H-alpha and [OII] decoded/true ratios for truth line S/N > 5).

    python benchmarks/spectrum_oracle.py --data runs/mock_eval [--max-spectra 500]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _basis(sub: dict[str, np.ndarray], i: int) -> np.ndarray:
    """(n_params, n_pix) noiseless spectra of object ``i`` with one linear parameter at 1, the rest 0."""
    from aion.mock import spectra
    from aion.mock.universe import _agn_fibre_flambda

    row = {k: np.asarray(v)[i:i + 1] for k, v in sub.items()}
    linear = ("COEFFS_BULGE", "COEFFS_DISK", "LINE_FLUX")

    def spectrum(values: dict[str, np.ndarray], agn: np.ndarray | None = None) -> np.ndarray:
        return spectra.noiseless_spectra(
            values["COEFFS_BULGE"], values["COEFFS_DISK"], row["FIBER_FRAC_BULGE"], row["FIBER_FRAC_DISK"],
            row["Z"], row["VDISP"], row["SIGMA_GAS"], values["LINE_FLUX"], row["EBV"], agn_flambda=agn)[0]

    cols = []
    for part in linear:
        for j in range(row[part].shape[1]):
            unit = {k: np.zeros_like(row[k], dtype=np.float64) for k in linear}
            unit[part][0, j] = row[part][0, j] if row[part][0, j] != 0 else 1.0  # scaled so the fit is ~1
            cols.append(spectrum(unit))
    if "AGN_AMP" in row and row["AGN_AMP"][0] > 0:
        zero = {k: np.zeros_like(row[k], dtype=np.float64) for k in linear}
        cols.append(spectrum(zero, _agn_fibre_flambda(np.asarray(row["AGN_AMP"], dtype=np.float64), row["Z"])))
    return np.stack(cols)


def main() -> None:
    from aion.mock.spectra import desi_wavelength
    from aion.tokenizers.spectrum import LINES_FOR_EVAL, line_fluxes, load_mock_desi_with_truth, r2_scores

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a mock universe the numbers are measured on")
    ap.add_argument("--max-spectra", type=int, default=None)
    args = ap.parse_args()

    obs, sub, truth = load_mock_desi_with_truth(args.data, args.max_spectra)
    wave = desi_wavelength()
    present = np.nonzero(obs.present)[0]
    fit = np.zeros_like(truth)
    for i in present:
        a = _basis(sub, int(i))
        w = np.where(obs.valid[i], obs.ivar[i], 0.0).astype(np.float64)
        sw = np.sqrt(w)
        coef, *_ = np.linalg.lstsq((a * sw).T, obs.flux[i].astype(np.float64) * sw, rcond=None)
        fit[i] = coef @ a
    d, t = fit[present], truth[present]
    r2, r2_pool = r2_scores(d, t)
    ov, oi = obs.valid[present], obs.ivar[present].astype(np.float64)
    z = np.asarray(sub["Z"], dtype=np.float64)[present]
    target = np.asarray(sub["desi_target"])[present]
    out: dict[str, object] = {
        "n_spectra": int(present.size), "r2_median": float(np.median(r2)), "r2_pooled": r2_pool,
        "r2_frac_ge_0.99": float(np.mean(r2 >= 0.99)),
        "r2_median_by_target": {k: float(np.median(r2[target == v])) for k, v in (("BGS", 1), ("LRG", 2))
                                if (target == v).any()},
    }
    for name, rest in LINES_FOR_EVAL.items():
        f_true, sig = line_fluxes(wave, t, ov, z, rest, ivar=np.where(ov, oi, np.inf))
        f_fit, _ = line_fluxes(wave, d, ov, z, rest)
        strong = np.isfinite(f_true) & (sig > 0) & (f_true / sig > 5)
        out[f"{name}_ratio_median"] = float(np.median(f_fit[strong] / f_true[strong])) if strong.any() else None
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Real-galaxy SED mixtures: kcorrect NMF template coefficients fitted to real SDSS galaxies.

The mock universe draws each galaxy's spectral shape from this library, so colours,
mass-to-light ratios and the star-forming / quenched bimodality come from real
galaxies rather than from hand-tuned distributions.

Source: the 10,000 SDSS main-sample galaxies (ugriz model fluxes, spectroscopic
redshifts) shipped with the ``kcorrect`` package (``data/test/gst_tests_small.fits``),
fitted with kcorrect's non-negative least squares to its default v4 templates
(Blanton & Roweis 2007). The result is shipped as a small CSV because the fit needs
kcorrect's ~30 s projection set-up; rebuild it with ``python -m aion.mock.sed_library``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np

LIBRARY_FILE = "sdss_sed_library.csv"
COLUMNS = ("z_sdss", "log_mstar_sdss", "c0", "c1", "c2", "c3", "c4")


def library_path() -> Path:
    return Path(str(resources.files("aion.mock") / "data" / LIBRARY_FILE))


def load_library() -> dict[str, np.ndarray]:
    """Columns of the shipped library; c0..c4 are fractions of mass formed per template (sum 1)."""
    data = np.loadtxt(library_path(), delimiter=",", comments="#", skiprows=0, ndmin=2)
    if data.shape[1] != len(COLUMNS):
        raise ValueError(f"{library_path()}: expected {len(COLUMNS)} columns {COLUMNS}, got {data.shape[1]}")
    return {name: data[:, i] for i, name in enumerate(COLUMNS)}


def build(out: Path | None = None) -> Path:
    """Fit the SDSS sample with kcorrect and write the library CSV (atomic)."""
    import kcorrect
    import kcorrect.kcorrect as kk
    from astropy.io import fits

    src = os.path.join(os.path.dirname(kcorrect.__file__), "data", "test", "gst_tests_small.fits")
    d = fits.open(src)[1].data
    z = np.asarray(d["Z"], dtype=np.float64)
    # nanomaggies -> maggies, corrected for Milky Way extinction
    ext = np.asarray(d["EXTINCTION"], dtype=np.float64)
    maggies = np.asarray(d["MODELFLUX"], dtype=np.float64) * 1e-9 * 10 ** (0.4 * ext)
    ivar = np.asarray(d["MODELFLUX_IVAR"], dtype=np.float64) * 1e18 * 10 ** (-0.8 * ext)
    good = (z > 0.01) & (z < 0.4) & np.all(ivar > 0, axis=1) & np.all(maggies > 0, axis=1)
    kc = kk.Kcorrect(responses=[f"sdss_{b}0" for b in "ugriz"], redshift_range=[0.0, 0.45], nredshift=450)
    coeffs = kc.fit_coeffs(redshift=z[good], maggies=maggies[good], ivar=ivar[good])
    derived = kc.derived(redshift=z[good], coeffs=coeffs)
    total = coeffs.sum(axis=1)
    ok = total > 0
    frac = coeffs[ok] / total[ok, None]
    table = np.column_stack([z[good][ok], np.log10(derived["mremain"][ok]), frac])
    out = out or library_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    header = (
        "Real-galaxy SED mixtures: kcorrect v4 template coefficients (fractions of mass formed) fitted\n"
        "to the SDSS ugriz model fluxes of the galaxies in kcorrect's data/test/gst_tests_small.fits.\n"
        "Built by `python -m aion.mock.sed_library`. Columns: " + ",".join(COLUMNS)
    )
    np.savetxt(tmp, table, delimiter=",", fmt="%.5g", header=header)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    print(f"wrote {build()}")

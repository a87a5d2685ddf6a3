"""Galaxy SEDs for the mock universe: kcorrect templates, emission lines, dust, filters.

Physical ingredients and sources
- Continuum: the five kcorrect v4 NMF templates (Blanton & Roweis 2007), each the
  spectrum (erg/s/cm^2/A at 10 pc) of one solar mass formed, with per-template surviving
  mass (MREMAIN), metallicity (METS) and mass formed in the last 300 Myr / 1 Gyr
  (M300, M1000). Their nebular lines are interpolated out and replaced by the line
  model below, so line strength follows the star formation rate at DESI resolution.
- Emission lines: L(H-alpha) = 2.0e41 erg/s per Msun/yr (Kennicutt 1998 converted from
  Salpeter to Chabrier, /1.59... i.e. 1.26e41 * 1.59); Case B Balmer ratios; nebular
  attenuation from stellar mass (Garn & Best 2010) with a Calzetti et al. (2000) curve;
  [NII]/H-alpha and [OIII]/H-beta trends with mass following the mass-metallicity
  relation (typical SDSS values, e.g. Kewley & Ellison 2008), fixed doublet ratios.
- Milky Way dust: Cardelli, Clayton & Mathis (1989) with O'Donnell (1994) optical
  coefficients, R_V = 3.1, for spectra; per-band coefficients from the registry for
  broadband fluxes.
- Filters: speclite's curves (DECam DR1, HSC 2017, WISE 2010); AB magnitudes.
- Cosmology: astropy Planck18.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from astropy.cosmology import Planck18

C_KMS = 299792.458
C_AA_S = 2.99792458e18  # speed of light in Angstrom / s
PC_CM = 3.0856775814913673e18
AB_FNU = 3631e-23  # erg/s/cm^2/Hz
NANOMAGGY = 1e-9

# rest-frame vacuum-ish wavelengths (Angstrom) of the lines we model
LINES: dict[str, float] = {
    "OII_3726": 3727.09, "OII_3729": 3729.88, "NeIII_3869": 3870.16,
    "Hdelta": 4102.89, "Hgamma": 4341.69, "Hbeta": 4862.68,
    "OIII_4959": 4960.30, "OIII_5007": 5008.24, "OI_6300": 6302.05,
    "NII_6548": 6549.86, "Halpha": 6564.61, "NII_6584": 6585.27,
    "SII_6717": 6718.29, "SII_6731": 6732.67,
}
# windows (rest frame, Angstrom) interpolated over to remove the templates' own lines
_LINE_WINDOWS = [(3715, 3742), (3860, 3880), (4092, 4112), (4331, 4352), (4850, 4876), (4950, 4970),
                 (4996, 5020), (6292, 6312), (6535, 6600), (6705, 6745), (9058, 9080), (9520, 9545)]
HALPHA_PER_SFR = 1.26e41 * 1.59  # erg/s per (Msun/yr), Chabrier IMF


@dataclass(frozen=True)
class Templates:
    """kcorrect templates with their nebular lines removed."""

    wave: np.ndarray  # (W,) rest-frame Angstrom
    flux: np.ndarray  # (5, W) erg/s/cm^2/A at 10 pc per Msun formed
    mremain: np.ndarray  # (5,) surviving stellar mass per Msun formed
    mets: np.ndarray  # (5,) metallicity (mass fraction)
    m300: np.ndarray  # (5,) mass fraction formed in the last 300 Myr
    m1000: np.ndarray  # (5,) mass fraction formed in the last 1 Gyr


@lru_cache(maxsize=1)
def load_templates() -> Templates:
    from astropy.io import fits

    # locate kcorrect's data without importing it (its import pulls in matplotlib, ~1.5 s)
    spec = importlib.util.find_spec("kcorrect")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the mock universe needs the 'kcorrect' package for its SED templates")
    path = os.path.join(spec.submodule_search_locations[0], "data", "templates", "kcorrect-default-v4.fits")
    with fits.open(path) as hdul:
        wave = np.asarray(hdul["FLUX"].data["wave"][0], dtype=np.float64)
        flux = np.asarray(hdul["FLUX"].data["flux"][0], dtype=np.float64).copy()
        extra = {k: np.asarray(hdul[k.upper()].data, dtype=np.float64) for k in ("mremain", "mets", "m300", "m1000")}
    keep = np.ones(wave.size, dtype=bool)
    for lo, hi in _LINE_WINDOWS:
        keep &= ~((wave >= lo) & (wave <= hi))
    for t in range(flux.shape[0]):
        logf = np.log(np.clip(flux[t], 1e-300, None))
        flux[t, ~keep] = np.exp(np.interp(wave[~keep], wave[keep], logf[keep]))
    return Templates(wave=wave, flux=flux, **extra)


@lru_cache(maxsize=64)
def _filter_curve(name: str) -> tuple[np.ndarray, np.ndarray]:
    import speclite.filters

    f = speclite.filters.load_filter(name)
    return np.asarray(f.wavelength, dtype=np.float64), np.asarray(f.response, dtype=np.float64)


def ab_norm(filter_name: str) -> float:
    """Denominator of AB maggies for a photon-counting filter: int f_AB,lambda R lambda dlambda."""
    lam, resp = _filter_curve(filter_name)
    return float(np.trapezoid(AB_FNU * C_AA_S / lam**2 * resp * lam, lam))


def synthetic_maggies(wave: np.ndarray, flux_lambda: np.ndarray, filter_name: str) -> np.ndarray:
    """AB maggies of spectra f_lambda (erg/s/cm^2/A, rows) sampled on ``wave``; zero outside coverage."""
    lam, resp = _filter_curve(filter_name)
    f = np.atleast_2d(flux_lambda)
    on = np.stack([np.interp(lam, wave, row, left=0.0, right=0.0) for row in f])
    return np.trapezoid(on * resp * lam, lam, axis=-1) / ab_norm(filter_name)


def luminosity_distance_cm(z: np.ndarray) -> np.ndarray:
    return _distance_grid("lum", z)


def angular_diameter_distance_kpc(z: np.ndarray) -> np.ndarray:
    return _distance_grid("ang", z)


@lru_cache(maxsize=1)
def _distance_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    zg = np.linspace(1e-4, 3.0, 6000)
    dl = Planck18.luminosity_distance(zg).to_value("cm")
    da = Planck18.angular_diameter_distance(zg).to_value("kpc")
    return zg, dl, da


def _distance_grid(kind: str, z: np.ndarray) -> np.ndarray:
    zg, dl, da = _distance_tables()
    return np.interp(z, zg, dl if kind == "lum" else da)


@lru_cache(maxsize=1)
def _age_table() -> tuple[np.ndarray, np.ndarray]:
    zg = np.linspace(0.0, 3.0, 601)
    return zg, Planck18.age(zg).to_value("Gyr")


def age_of_universe_gyr(z: np.ndarray) -> np.ndarray:
    zg, age = _age_table()
    return np.interp(z, zg, age)


class PhotometryTable:
    """Template maggies through each filter on a redshift grid (linear in template coefficients).

    ``maggies(coeffs, z)`` is the continuum AB flux (maggies) of a galaxy whose template
    coefficients are solar masses formed; evaluated by linear interpolation in z.
    """

    def __init__(self, filters: tuple[str, ...], z_max: float = 1.6, dz: float = 0.002):
        tpl = load_templates()
        self.filters = filters
        self.z = np.arange(dz, z_max + dz, dz)
        table = np.zeros((self.z.size, tpl.flux.shape[0], len(filters)))
        dl = luminosity_distance_cm(self.z)
        for j, name in enumerate(filters):
            lam, resp = _filter_curve(name)
            norm = ab_norm(name)
            rest = lam[None, :] / (1.0 + self.z[:, None])  # (Z, Lf)
            for t in range(tpl.flux.shape[0]):
                f_rest = np.interp(rest, tpl.wave, tpl.flux[t])  # (Z, Lf)
                f_obs = f_rest * (10 * PC_CM / dl[:, None]) ** 2 / (1.0 + self.z[:, None])
                table[:, t, j] = np.trapezoid(f_obs * resp * lam, lam, axis=-1) / norm
        self.table = table

    def maggies(self, coeffs: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(B, 5) coefficients (Msun formed) at redshifts (B,) -> (B, n_filters) maggies."""
        if np.any(z < self.z[0]) or np.any(z > self.z[-1]):
            raise ValueError(f"redshift outside the photometry table range [{self.z[0]}, {self.z[-1]}]")
        pos = (z - self.z[0]) / (self.z[1] - self.z[0])
        i0 = np.clip(np.floor(pos).astype(int), 0, self.z.size - 2)
        w = (pos - i0)[:, None, None]
        t = self.table[i0] * (1 - w) + self.table[i0 + 1] * w  # (B, 5, F)
        return np.einsum("bt,btf->bf", coeffs, t)

    def line_maggies(self, line_flux: np.ndarray, line_wave_obs: np.ndarray) -> np.ndarray:
        """Maggies of emission lines: (B, n_lines) fluxes (erg/s/cm^2) at (B, n_lines) wavelengths."""
        out = np.zeros((line_flux.shape[0], len(self.filters)))
        for j, name in enumerate(self.filters):
            lam, resp = _filter_curve(name)
            r = np.interp(line_wave_obs, lam, resp, left=0.0, right=0.0)
            out[:, j] = (line_flux * r * line_wave_obs).sum(axis=1) / ab_norm(name)
        return out


def calzetti_k(wave_aa: np.ndarray) -> np.ndarray:
    """Calzetti et al. (2000) attenuation curve k(lambda), R_V = 4.05."""
    x = 1.0 / (np.asarray(wave_aa, dtype=np.float64) / 1e4)  # inverse micron
    lam = 1.0 / x
    blue = 2.659 * (-2.156 + 1.509 * x - 0.198 * x**2 + 0.011 * x**3) + 4.05
    red = 2.659 * (-1.857 + 1.040 * x) + 4.05
    return np.where(lam < 0.63, blue, red)


def ccm_odonnell_a_over_av(wave_aa: np.ndarray, r_v: float = 3.1) -> np.ndarray:
    """Milky Way A(lambda)/A(V): CCM89 infrared + O'Donnell (1994) optical, valid 0.9-3.3 um^-1 (and IR)."""
    x = 1e4 / np.asarray(wave_aa, dtype=np.float64)
    a = np.zeros_like(x)
    b = np.zeros_like(x)
    ir = x < 1.1
    a[ir] = 0.574 * x[ir] ** 1.61
    b[ir] = -0.527 * x[ir] ** 1.61
    opt = ~ir
    y = np.clip(x[opt], 1.1, 3.3) - 1.82
    a[opt] = (1 + 0.104 * y - 0.609 * y**2 + 0.701 * y**3 + 1.137 * y**4 - 1.718 * y**5
              - 0.827 * y**6 + 1.647 * y**7 - 0.505 * y**8)
    b[opt] = (1.952 * y + 2.908 * y**2 - 3.989 * y**3 - 7.985 * y**4 + 11.102 * y**5
              + 5.491 * y**6 - 10.805 * y**7 + 3.347 * y**8)
    return a + b / r_v


def emission_line_fluxes(sfr: np.ndarray, log_mstar: np.ndarray, z: np.ndarray,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Observed (attenuated) line fluxes in erg/s/cm^2, shape (B, n_lines) in ``LINES`` order.

    Returns (fluxes, a_halpha) where a_halpha is the nebular H-alpha attenuation in mag.
    """
    n = sfr.shape[0]
    xm = log_mstar - 10.0
    a_ha = 0.91 + 0.77 * xm + 0.11 * xm**2 - 0.09 * xm**3  # Garn & Best (2010)
    a_ha = np.clip(a_ha + rng.normal(0, 0.28, n), 0.0, 3.0)
    ebv_gas = a_ha / calzetti_k(np.array([6564.61]))[0]
    l_ha = HALPHA_PER_SFR * np.clip(sfr, 0.0, None)
    m = np.clip(log_mstar - 8.5, 0.0, 2.5)
    log_n2 = -1.15 + 0.32 * m + rng.normal(0, 0.1, n)  # [NII]6584 / H-alpha
    log_o3 = 0.55 - 0.55 * m + rng.normal(0, 0.15, n)  # [OIII]5007 / H-beta
    ratio = {
        "Halpha": np.ones(n), "Hbeta": np.full(n, 1 / 2.86), "Hgamma": np.full(n, 0.468 / 2.86),
        "Hdelta": np.full(n, 0.259 / 2.86),
        "NII_6584": 10**log_n2, "NII_6548": 10**log_n2 / 3.05,
        "OIII_5007": 10**log_o3 / 2.86, "OIII_4959": 10**log_o3 / 2.86 / 2.98,
        "OII_3726": np.full(n, 0.43), "OII_3729": np.full(n, 0.57),  # [OII]/H-alpha ~ 1 (Kennicutt 1998)
        "NeIII_3869": 0.08 * 10**log_o3 / 2.86, "OI_6300": np.full(n, 0.03),
        "SII_6717": np.full(n, 0.175), "SII_6731": np.full(n, 0.125),
    }
    names = list(LINES)
    rest = np.array([LINES[k] for k in names])
    atten = 10 ** (-0.4 * ebv_gas[:, None] * calzetti_k(rest)[None, :])
    lum = l_ha[:, None] * np.stack([ratio[k] for k in names], axis=1) * atten
    dl = luminosity_distance_cm(z)
    return lum / (4 * np.pi * dl[:, None] ** 2), a_ha


def observed_continuum(coeffs: np.ndarray, z: float, wave_obs: np.ndarray) -> np.ndarray:
    """Continuum f_lambda (erg/s/cm^2/A) of one galaxy at observed wavelengths."""
    tpl = load_templates()
    rest = wave_obs / (1.0 + z)
    f_rest = coeffs @ np.stack([np.interp(rest, tpl.wave, tpl.flux[t]) for t in range(tpl.flux.shape[0])])
    return f_rest * (10 * PC_CM / luminosity_distance_cm(np.array([z]))[0]) ** 2 / (1.0 + z)

"""Draw a galaxy population: redshift, stellar mass, SED mixture, structure, star formation.

Sources of the relations
- Stellar mass function: GAMA double Schechter at z < 0.06 (Baldry et al. 2012,
  log M* = 10.66, phi1 = 3.96e-3, alpha1 = -0.35, phi2 = 0.79e-3, alpha2 = -1.47),
  no evolution; redshifts follow the comoving volume (Planck18).
- SED: the kcorrect coefficient mixture of a real SDSS galaxy of similar mass
  (``sed_library``), jittered; quenched mixtures get a small residual star formation.
- Sizes: van der Wel et al. (2014) size-mass relations with their redshift evolution.
- Bulge-to-total mass ratios: Beta distributions by star-forming / quenched class
  (roughly following the trends in Mendel et al. 2014), bulges taking the older stars.
- Velocity dispersion: Faber-Jackson-like scaling for the bulge.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
from astropy.cosmology import Planck18

from aion.mock import sed
from aion.mock.sed_library import load_library

LOG_MSTAR_RANGE = (8.5, 12.2)
Z_RANGE = (0.01, 1.2)


@dataclass
class Population:
    """Intrinsic properties of B galaxies (one row per galaxy, all arrays (B,) unless noted)."""

    z: np.ndarray
    log_mstar: np.ndarray
    coeffs_bulge: np.ndarray  # (B, 5) Msun formed per template
    coeffs_disk: np.ndarray  # (B, 5)
    sfr: np.ndarray  # Msun/yr, last 300 Myr
    z_mw: np.ndarray  # mass-weighted metallicity
    tage_mw: np.ndarray  # Gyr
    quenched: np.ndarray  # bool
    bulge_frac: np.ndarray  # bulge fraction of surviving stellar mass
    re_bulge: np.ndarray  # arcsec, major axis
    re_disk: np.ndarray  # arcsec
    q_bulge: np.ndarray
    q_disk: np.ndarray
    pa: np.ndarray  # radians
    vdisp: np.ndarray  # km/s, bulge stellar velocity dispersion
    sigma_gas: np.ndarray  # km/s

    def __len__(self) -> int:
        return self.z.shape[0]

    def select(self, index) -> Population:
        return Population(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def coeffs(self) -> np.ndarray:
        return self.coeffs_bulge + self.coeffs_disk

    @property
    def ssfr(self) -> np.ndarray:
        return np.log10(np.clip(self.sfr, 1e-30, None)) - self.log_mstar


@lru_cache(maxsize=1)
def _sorted_library() -> tuple[np.ndarray, np.ndarray]:
    lib = load_library()
    order = np.argsort(lib["log_mstar_sdss"])
    frac = np.column_stack([lib[f"c{i}"] for i in range(5)])[order]
    return lib["log_mstar_sdss"][order], frac


@lru_cache(maxsize=1)
def _redshift_cdf() -> tuple[np.ndarray, np.ndarray]:
    zg = np.linspace(*Z_RANGE, 2000)
    dvdz = Planck18.differential_comoving_volume(zg).value
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dvdz[1:] + dvdz[:-1]) * np.diff(zg))])
    return zg, cdf / cdf[-1]


@lru_cache(maxsize=1)
def _mass_cdf() -> tuple[np.ndarray, np.ndarray]:
    lm = np.linspace(*LOG_MSTAR_RANGE, 2000)
    x = 10 ** (lm - 10.66)
    phi = np.log(10) * np.exp(-x) * (3.96e-3 * x ** (-0.35 + 1) + 0.79e-3 * x ** (-1.47 + 1))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (phi[1:] + phi[:-1]) * np.diff(lm))])
    return lm, cdf / cdf[-1]


def sample_redshift_mass(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    zg, zc = _redshift_cdf()
    lm, mc = _mass_cdf()
    return np.interp(rng.random(n), zc, zg), np.interp(rng.random(n), mc, lm)


def _pick_mixtures(log_mstar: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fractions of mass formed per template, from library galaxies within 0.15 dex in mass."""
    lib_m, lib_frac = _sorted_library()
    lo = np.searchsorted(lib_m, log_mstar - 0.15)
    hi = np.searchsorted(lib_m, log_mstar + 0.15)
    # guarantee at least 20 candidates (the library thins out at the mass extremes)
    short = hi - lo < 20
    centre = np.clip(np.searchsorted(lib_m, log_mstar), 10, lib_m.size - 10)
    lo = np.where(short, centre - 10, lo)
    hi = np.where(short, centre + 10, hi)
    idx = lo + np.floor(rng.random(log_mstar.size) * (hi - lo)).astype(int)
    frac = lib_frac[idx] * np.exp(rng.normal(0.0, 0.2, lib_frac[idx].shape))  # jitter nonzero components
    return frac / frac.sum(axis=1, keepdims=True)


def draw_population(n: int, rng: np.random.Generator) -> Population:
    """Draw ``n`` galaxies from the mass function and volume (before any survey selection)."""
    tpl = sed.load_templates()
    z, log_mstar = sample_redshift_mass(n, rng)
    frac = _pick_mixtures(log_mstar, rng)
    # quenched mixtures have no young templates; give them residual star formation
    ssfr_raw = (frac @ tpl.m300) / 3e8 / (frac @ tpl.mremain)
    quenched = ssfr_raw < 10**-11.5
    residual = 10 ** rng.normal(-4.2, 0.4, n) * quenched
    young = int(np.argmax(tpl.m300))
    frac[:, young] += residual
    frac /= frac.sum(axis=1, keepdims=True)

    mass_formed = 10**log_mstar / (frac @ tpl.mremain)
    coeffs = frac * mass_formed[:, None]

    # bulge / disk split: bulge takes the oldest stars
    bulge_frac = np.where(quenched, rng.beta(6, 2.5, n), rng.beta(1.3, 6, n) * np.clip(log_mstar - 8.0, 0.2, 3) / 2)
    bulge_frac = np.clip(bulge_frac, 0.0, 0.98)
    oldness = 1.0 - tpl.m1000  # (5,)
    share = bulge_frac[:, None] * oldness[None, :] / np.clip((frac * oldness).sum(axis=1, keepdims=True), 1e-6, None)
    share = np.clip(share, 0.0, 1.0)
    coeffs_bulge = coeffs * share
    coeffs_disk = coeffs - coeffs_bulge
    m_bulge = coeffs_bulge @ tpl.mremain
    bulge_frac = m_bulge / 10**log_mstar

    sfr = (coeffs @ tpl.m300) / 3e8
    z_mw = (coeffs * tpl.mremain) @ tpl.mets / 10**log_mstar
    # mass-weighted age from the templates' star-formation-history moments (an approximation:
    # the kcorrect file gives only mass formed within 300 Myr and 1 Gyr)
    t_old = 1.0 + 0.6 * np.clip(sed.age_of_universe_gyr(z) - 1.0, 0.5, None)
    age_tpl = (tpl.m300[None, :] * 0.15 + (tpl.m1000 - tpl.m300)[None, :] * 0.65
               + (1 - tpl.m1000)[None, :] * t_old[:, None])  # (B, 5)
    tage_mw = ((coeffs * tpl.mremain) * age_tpl).sum(axis=1) / 10**log_mstar

    # sizes (van der Wel et al. 2014), kpc -> arcsec
    m5 = 10 ** (log_mstar - np.log10(5e10))
    re_late = 10 ** (0.86 + rng.normal(0, 0.16, n)) * m5**0.25 * ((1 + z) / 1.25) ** -0.75
    re_early = 10 ** (0.60 + rng.normal(0, 0.10, n)) * m5**0.75 * ((1 + z) / 1.25) ** -1.48
    re_kpc = np.where(quenched, re_early, re_late)
    kpc_per_arcsec = sed.angular_diameter_distance_kpc(z) * np.pi / 180 / 3600
    re_arcsec = np.clip(re_kpc / kpc_per_arcsec, 0.05, 15.0)
    re_bulge = re_arcsec * np.where(quenched, 0.85, 0.45)
    re_disk = re_arcsec * np.where(quenched, 1.6, 1.1)

    cos_i = rng.random(n)
    q_disk = np.sqrt(cos_i**2 * (1 - 0.15**2) + 0.15**2)
    q_bulge = rng.uniform(0.55, 1.0, n)
    pa = rng.uniform(0, np.pi, n)
    vdisp = 10 ** (2.2 + 0.3 * (log_mstar - 10.5) + rng.normal(0, 0.05, n))
    sigma_gas = np.clip(60 * (10 ** (log_mstar - 10)) ** 0.15 * np.exp(rng.normal(0, 0.2, n)), 25, 200)
    return Population(z=z, log_mstar=log_mstar, coeffs_bulge=coeffs_bulge, coeffs_disk=coeffs_disk,
                      sfr=sfr, z_mw=z_mw, tage_mw=tage_mw, quenched=quenched, bulge_frac=bulge_frac,
                      re_bulge=re_bulge, re_disk=re_disk, q_bulge=q_bulge, q_disk=q_disk, pa=pa,
                      vdisp=vdisp, sigma_gas=sigma_gas)

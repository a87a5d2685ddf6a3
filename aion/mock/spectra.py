"""DESI-like fibre spectra: continuum + emission lines, kinematics, sky, noise and masks.

The instrument model is deliberately simple and documented rather than exact:
- grid 3600-9824 A at 0.8 A (7781 pixels), flux in 1e-17 erg/s/cm^2/A;
- line-spread function: Gaussian, sigma ~ 0.75-0.95 A across the range (R ~ 2000-5000);
- throughput: a smooth curve peaking near 6500 A, dropping towards both ends;
- sky: a smooth continuum that rises to the red plus real bright night-sky lines
  ([OI] 5577, 6300, 6364; Na D; Hg 4358, 5461) and an OH forest above 6800 A whose line
  positions are drawn once from a fixed seed (approximate, not a line list);
- noise: Gaussian, variance from sky + object photons + read noise, ivar reported;
- masks: bad CCD columns and cosmic rays, mask True = bad (DESI convention).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.special import erf

from aion.mock import sed
from aion.modalities import survey

FLUX_UNIT = 1e-17  # erg/s/cm^2/A
FIBER_DIAMETER_ARCSEC = 1.5
FIBER_SEEING_FWHM_ARCSEC = 1.0


def desi_wavelength() -> np.ndarray:
    s = survey("desi")
    lo, _ = s.wavelength_range
    return lo + s.wavelength_step * np.arange(s.n_wavelength)


def lsf_sigma(wave: np.ndarray) -> np.ndarray:
    """Instrumental Gaussian sigma in Angstrom (DESI-like resolution, R ~ 2000 blue to ~5000 red)."""
    return 0.95 - 0.2 * (wave - wave[0]) / (wave[-1] - wave[0])


@lru_cache(maxsize=1)
def _sky_and_throughput() -> tuple[np.ndarray, np.ndarray]:
    wave = desi_wavelength()
    thr = 0.45 * np.exp(-0.5 * ((wave - 6500) / 2200) ** 2) + 0.05
    sky = 0.6 + 0.6 * (wave / 6000) ** 3  # smooth continuum, 1e-17 erg/s/cm^2/A/arcsec^2-ish units
    lines = [(4358.3, 6.0), (5460.7, 5.0), (5577.3, 60.0), (5890.0, 15.0), (5895.9, 12.0),
             (6300.3, 25.0), (6363.8, 8.0)]
    rng = np.random.default_rng(20240611)  # fixed: the sky is a property of the instrument model
    oh_wave = np.sort(rng.uniform(6800, 9824, 260))
    oh_amp = 10 ** rng.uniform(0.3, 1.6, oh_wave.size) * np.clip((oh_wave - 6500) / 2000, 0.2, 1.5)
    lines += list(zip(oh_wave, oh_amp, strict=True))
    sig = lsf_sigma(wave)
    for lam, amp in lines:
        sky += amp * np.exp(-0.5 * ((wave - lam) / np.interp(lam, wave, sig)) ** 2)
    return sky, thr


def sky_spectrum() -> np.ndarray:
    """The model night sky on the DESI grid (arbitrary flux scale); used for noise and tests."""
    return _sky_and_throughput()[0].copy()


def gaussian_lines(wave: np.ndarray, centres: np.ndarray, fluxes: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sum of pixel-integrated Gaussian lines on a uniform grid; flux-conserving.

    centres/fluxes/sigmas: (n_lines,); returns f_lambda in flux units per Angstrom.
    """
    step = wave[1] - wave[0]
    edges_lo = (wave - step / 2)[None, :]
    edges_hi = (wave + step / 2)[None, :]
    s = np.sqrt(2) * sigmas[:, None]
    frac = 0.5 * (erf((edges_hi - centres[:, None]) / s) - erf((edges_lo - centres[:, None]) / s))
    return (fluxes[:, None] * frac).sum(axis=0) / step


def noiseless_spectra(coeffs_bulge: np.ndarray, coeffs_disk: np.ndarray, fib_bulge: np.ndarray,
                      fib_disk: np.ndarray, z: np.ndarray, vdisp: np.ndarray, sigma_gas: np.ndarray,
                      line_flux: np.ndarray, ebv: np.ndarray, agn_flambda: np.ndarray | None = None) -> np.ndarray:
    """Fibre spectra (B, 7781) in 1e-17 erg/s/cm^2/A before noise.

    Bulge light is broadened by the stellar velocity dispersion, disk light by 70 km/s
    (unresolved rotation within the fibre); lines (total fluxes ``line_flux`` (B, n_lines),
    emitted by the disk, so scaled by the disk fibre fraction) by the gas dispersion and
    the instrument; Milky Way extinction from ``ebv``. ``agn_flambda``: (B, 7781) light of an
    unresolved nucleus inside the fibre (erg/s/cm^2/A, see :mod:`aion.mock.hidden`), added as is.
    """
    wave = desi_wavelength()
    # work on a log-lambda grid for velocity convolution
    loglam = np.linspace(np.log(wave[0]) - 0.01, np.log(wave[-1]) + 0.01, 16384)
    dlog = loglam[1] - loglam[0]
    wl = np.exp(loglam)
    inst = lsf_sigma(wave)
    rest_lines = np.array(list(sed.LINES.values()))
    mw = 10 ** (-0.4 * 3.1 * ebv[:, None] * sed.ccm_odonnell_a_over_av(wave)[None, :])
    out = np.zeros((z.shape[0], wave.size))
    for i in range(z.shape[0]):
        bulge = sed.observed_continuum(coeffs_bulge[i] * fib_bulge[i], z[i], wl)
        disk = sed.observed_continuum(coeffs_disk[i] * fib_disk[i], z[i], wl)
        cont = (gaussian_filter1d(bulge, vdisp[i] / sed.C_KMS / dlog, mode="nearest")
                + gaussian_filter1d(disk, 70.0 / sed.C_KMS / dlog, mode="nearest"))
        spec = np.interp(wave, wl, cont)
        centres = rest_lines * (1 + z[i])
        inside = (centres > wave[0] - 20) & (centres < wave[-1] + 20)
        if inside.any():
            c = centres[inside]
            sig = np.sqrt((c * sigma_gas[i] / sed.C_KMS) ** 2 + np.interp(c, wave, inst) ** 2)
            spec += gaussian_lines(wave, c, line_flux[i, inside] * fib_disk[i], sig)
        out[i] = spec
    if agn_flambda is not None:
        out += agn_flambda
    return out * mw / FLUX_UNIT


def observe(truth: np.ndarray, rng: np.random.Generator, exposure_scale: np.ndarray | None = None,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add noise and masks: returns (flux, ivar, mask) with mask True = bad pixel.

    Noise is calibrated so that a typical BGS galaxy (r ~ 19.5) has a continuum S/N of a
    few per pixel, as in DESI bright-time spectra. ``exposure_scale`` (B,) scales the
    effective exposure (conditions vary); default 1.
    """
    b, npix = truth.shape
    sky, thr = _sky_and_throughput()
    expo = np.ones(b) if exposure_scale is None else exposure_scale
    # variance in (1e-17)^2 units: sky + source photons + read noise, divided by throughput^2
    var = (0.9 * sky[None, :] + 0.35 * np.clip(truth, 0, None) * thr[None, :] / 0.4 + 0.15)
    var = var / (thr[None, :] / 0.4) ** 2 / expo[:, None] * 0.25
    flux = truth + rng.standard_normal(truth.shape) * np.sqrt(var)
    ivar = 1.0 / var
    mask = np.zeros(truth.shape, dtype=bool)
    # a few bad columns and cosmic-ray hits per spectrum
    n_bad = rng.poisson(3, b)
    for i in range(b):
        for _ in range(n_bad[i]):
            start = rng.integers(0, npix - 8)
            mask[i, start:start + rng.integers(1, 8)] = True
    flux[mask] = 0.0
    ivar[mask] = 0.0
    return flux.astype(np.float32), ivar.astype(np.float32), mask

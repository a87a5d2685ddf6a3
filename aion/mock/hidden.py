"""Hidden physics: properties that shape the data but appear in no catalogue column.

Discovery tools (similarity search, outlier scores, residual representations) are measured
by whether they find structure the catalogue does not name. Three kinds are planted, each
recorded only in the ``truth`` table:

- **AGN** (``AGN``, ``AGN_FRAC``): an unresolved nucleus at the galaxy centre, more common in
  massive hosts. Its SED is an accretion-disc power law (f_nu ~ nu^-0.44, Vanden Berk et al.
  2001) plus 1300 K hot dust (red W1 - W2, as in WISE AGN selection, Stern et al. 2012) and
  broad (4000 km/s FWHM) Balmer and MgII lines. It adds a point source to every image, light
  to every band (mostly WISE) and a continuum with broad lines to the fibre spectrum.
- **Bars** (``BAR_FRAC`` and geometry): in star-forming disks above 10^9.5 Msun a share of
  the disk light is redistributed into an elongated Sersic n = 0.5 component with its own
  position angle (seen directly in the sky plane: projection is not modelled). Images only.
- **A rare population** (``RARE``, ``LINE_BOOST``): extreme emission-line galaxies (green-pea
  like), about 1-2% of all galaxies, drawn among star-forming galaxies below 10^10.3 Msun: nebular
  lines 15-50x stronger and a high-ionization spectrum, [OIII]5007/Hbeta = 6 (Cardamone et al.
  2009 find EW([OIII]) of hundreds to ~1000 A). They change broadband colours, images and
  spectra. The boost is applied after the magnitude selection (selection is on continuum
  plus normal lines).

All draws come from their own random stream, so switching hidden physics on leaves every
other random draw of the universe unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

from aion.mock import sed

AGN_LINES = {"MgII": (2798.75, 40.0), "Hgamma_broad": (4341.69, 30.0), "Hbeta_broad": (4862.68, 80.0),
             "Halpha_broad": (6564.61, 300.0)}  # rest wavelength (A), rest equivalent width (A)
AGN_LINE_FWHM_KMS = 4000.0
AGN_DUST_T = 1300.0  # K
AGN_DUST_TO_DISC_2UM = 2.0  # hot dust / disc f_nu at 2.2 um rest
POINT_SOURCE_RE_ARCSEC = 0.01  # a Sersic this small renders as the PSF
BAR_MIN_LOG_MSTAR = 9.5
BAR_PROBABILITY = 0.35
RARE_PROBABILITY = 0.08
RARE_MAX_LOG_MSTAR = 10.3
RARE_OIII_HBETA = 6.0


@dataclass
class Hidden:
    """Hidden properties of B galaxies (all (B,) arrays)."""

    agn: np.ndarray  # bool
    agn_frac: np.ndarray  # AGN share of the true r-band flux
    agn_amp: np.ndarray  # amplitude of :func:`agn_rest_sed` (observed f_lambda = amp * sed(lam/(1+z))/(1+z))
    bar_frac: np.ndarray  # share of the disk light in the bar (0: no bar)
    bar_re: np.ndarray  # arcsec, major axis
    bar_q: np.ndarray
    bar_pa: np.ndarray  # radians
    rare: np.ndarray  # bool: extreme emission-line galaxy
    line_boost: np.ndarray  # factor applied to the nebular lines (1 for most)

    def select(self, index) -> Hidden:
        return Hidden(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def from_truth(cls, truth) -> Hidden | None:
        """From ``truth`` columns (None for universes made before hidden physics existed)."""
        if "AGN_AMP" not in truth:
            return None
        return cls(agn=np.asarray(truth["AGN"], dtype=bool), agn_frac=np.asarray(truth["AGN_FRAC"]),
                   agn_amp=np.asarray(truth["AGN_AMP"], dtype=np.float64),
                   bar_frac=np.asarray(truth["BAR_FRAC"], dtype=np.float64),
                   bar_re=np.asarray(truth["BAR_RE"], dtype=np.float64),
                   bar_q=np.asarray(truth["BAR_Q"], dtype=np.float64),
                   bar_pa=np.asarray(truth["BAR_PA"], dtype=np.float64), rare=np.asarray(truth["RARE"], dtype=bool),
                   line_boost=np.asarray(truth["LINE_BOOST"], dtype=np.float64))

    def truth_columns(self) -> dict[str, np.ndarray]:
        return {"AGN": self.agn, "AGN_FRAC": self.agn_frac, "AGN_AMP": self.agn_amp, "BAR_FRAC": self.bar_frac,
                "BAR_RE": self.bar_re, "BAR_Q": self.bar_q, "BAR_PA": self.bar_pa, "RARE": self.rare,
                "LINE_BOOST": self.line_boost}


def none(b: int) -> Hidden:
    """No hidden physics for B galaxies."""
    zero = np.zeros(b)
    return Hidden(agn=np.zeros(b, dtype=bool), agn_frac=zero, agn_amp=zero, bar_frac=zero, bar_re=np.ones(b),
                  bar_q=np.ones(b), bar_pa=zero, rare=np.zeros(b, dtype=bool), line_boost=np.ones(b))


@lru_cache(maxsize=1)
def _rest_grid() -> np.ndarray:
    return np.geomspace(700.0, 3.5e5, 12000)


def agn_rest_sed(wave: np.ndarray) -> np.ndarray:
    """Rest-frame AGN f_lambda (arbitrary units; 1 at 5100 A for the disc alone)."""
    wave = np.asarray(wave, dtype=np.float64)
    disc = (wave / 5100.0) ** (-2.0 + 0.44)  # f_nu ~ nu^-0.44  ->  f_lambda ~ lambda^-1.56
    h_c_over_k = 1.438777e8  # A K
    with np.errstate(over="ignore"):
        bb = 1.0 / (wave**5 * np.expm1(h_c_over_k / (wave * AGN_DUST_T)))
    ref = 2.2e4
    bb_ref = 1.0 / (ref**5 * np.expm1(h_c_over_k / (ref * AGN_DUST_T)))
    dust = AGN_DUST_TO_DISC_2UM * (ref / 5100.0) ** (-1.56) * bb / bb_ref
    lines = np.zeros_like(wave)
    for centre, ew in AGN_LINES.values():
        sigma = centre * AGN_LINE_FWHM_KMS / sed.C_KMS / 2.3548
        cont = (centre / 5100.0) ** (-1.56)
        lines += ew * cont * np.exp(-0.5 * ((wave - centre) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    return disc + dust + lines


class AgnPhotometry:
    """Maggies of a unit-amplitude AGN at redshift z through each filter (linear interpolation in z)."""

    def __init__(self, filters: tuple[str, ...], z_max: float = 1.6, dz: float = 0.002):
        self.z = np.arange(dz, z_max + dz, dz)
        rest = _rest_grid()
        f_rest = agn_rest_sed(rest)
        table = np.zeros((self.z.size, len(filters)))
        for j, name in enumerate(filters):
            lam, resp = sed._filter_curve(name)
            norm = sed.ab_norm(name)
            for i, z in enumerate(self.z):
                f_obs = np.interp(lam / (1 + z), rest, f_rest) / (1 + z)
                table[i, j] = np.trapezoid(f_obs * resp * lam, lam) / norm
        self.table = table

    def maggies(self, z: np.ndarray) -> np.ndarray:
        pos = (np.asarray(z) - self.z[0]) / (self.z[1] - self.z[0])
        i0 = np.clip(np.floor(pos).astype(int), 0, self.z.size - 2)
        w = (pos - i0)[:, None]
        return self.table[i0] * (1 - w) + self.table[i0 + 1] * w


def agn_observed_flambda(amp: np.ndarray, z: np.ndarray, wave_obs: np.ndarray) -> np.ndarray:
    """(B, L) observed AGN f_lambda in erg/s/cm^2/A (same units as the maggies' amplitude)."""
    rest = _rest_grid()
    f_rest = agn_rest_sed(rest)
    out = np.zeros((len(amp), wave_obs.size))
    for i in np.flatnonzero(amp > 0):
        out[i] = amp[i] * np.interp(wave_obs / (1 + z[i]), rest, f_rest) / (1 + z[i])
    return out


def point_source_fibre_fraction(fibre_diameter: float, seeing_fwhm: float) -> float:
    """Light of a point source inside a circular fibre under Gaussian seeing."""
    sigma = seeing_fwhm / 2.3548
    return float(1.0 - np.exp(-((fibre_diameter / 2) ** 2) / (2 * sigma**2)))


def draw(log_mstar: np.ndarray, quenched: np.ndarray, re_disk: np.ndarray, pa: np.ndarray,
         r_maggies: np.ndarray, agn_r_unit: np.ndarray, rng: np.random.Generator) -> Hidden:
    """Hidden properties of B selected galaxies.

    r_maggies: (B,) the galaxy's true r-band maggies; agn_r_unit: (B,) r-band maggies of a
    unit-amplitude AGN at each galaxy's redshift (sets the AGN amplitude for its r-band share).
    """
    b = log_mstar.shape[0]
    # AGN: incidence rising with host mass (2% at 10^9.5 to 10% above 10^11.5)
    p_agn = 0.02 + 0.08 * np.clip((log_mstar - 9.5) / 2.0, 0.0, 1.0)
    agn = rng.random(b) < p_agn
    ratio = 10 ** rng.uniform(-0.8, 0.5, b)  # AGN / host r-band flux
    agn_frac = np.where(agn, ratio / (1 + ratio), 0.0)
    agn_amp = np.where(agn, ratio * r_maggies / np.clip(agn_r_unit, 1e-300, None), 0.0)
    # bars in massive star-forming disks
    can_bar = ~quenched & (log_mstar > BAR_MIN_LOG_MSTAR)
    barred = can_bar & (rng.random(b) < BAR_PROBABILITY)
    bar_frac = np.where(barred, rng.uniform(0.1, 0.35, b), 0.0)
    bar_re = np.where(barred, re_disk * rng.uniform(0.4, 0.7, b), 1.0)
    bar_q = np.where(barred, rng.uniform(0.2, 0.35, b), 1.0)
    bar_pa = np.where(barred, (pa + rng.uniform(-np.pi / 2, np.pi / 2, b)) % np.pi, 0.0)
    # extreme emission-line galaxies among star-forming ones
    rare = ~quenched & (log_mstar < RARE_MAX_LOG_MSTAR) & (rng.random(b) < RARE_PROBABILITY)
    line_boost = np.where(rare, 10 ** rng.uniform(np.log10(15.0), np.log10(50.0), b), 1.0)
    return Hidden(agn=agn, agn_frac=agn_frac, agn_amp=agn_amp, bar_frac=bar_frac, bar_re=bar_re, bar_q=bar_q,
                  bar_pa=bar_pa, rare=rare, line_boost=line_boost)


def boosted_lines(line_flux: np.ndarray, hidden: Hidden) -> np.ndarray:
    """Nebular line fluxes with the rare population's boost and high-ionization [OIII] / [NeIII]."""
    names = list(sed.LINES)
    out = line_flux * np.where(hidden.rare, hidden.line_boost, 1.0)[:, None]
    rare = hidden.rare
    if rare.any():
        o3 = RARE_OIII_HBETA * out[rare, names.index("Hbeta")]
        out[rare, names.index("OIII_5007")] = o3
        out[rare, names.index("OIII_4959")] = o3 / 2.98
        out[rare, names.index("NeIII_3869")] = 0.1 * o3
    return out

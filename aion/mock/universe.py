"""Generate the mock universe and write it in the Multimodal Universe layout.

Surveys written under ``out`` (config ``mock``), one HDF5 file per HEALPix pixel:
- ``legacysurvey``: every galaxy (selected on true z-band magnitude < 21): g,r,i,z cutouts
  (0.262"/px, nanomaggies) with ivar and clean-pixel masks, catalogue fluxes g,r,i,z and
  WISE W1-W4 with ivar, fibre fluxes, shapes, EBV;
- ``hsc``: galaxies in the HSC sub-footprint: deeper, sharper g,r,i,z,y cutouts
  (0.168"/px, zero point 27) and cmodel magnitudes;
- ``desi``: a BGS-like (r < 19.5) and an LRG-like (red, z < 20.4) spectroscopic subset;
- ``provabgs``: physical labels for the BGS subset, computed from the SED that made the data;
- ``truth``: every intrinsic parameter needed to re-render noiseless data (not a survey).

Everything is deterministic for a given seed and configuration: each HEALPix pixel has
its own random stream, and pixels are generated and written one chunk at a time, so
memory does not grow with the number of objects.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy_healpix import HEALPix

from aion import modalities as registry
from aion.data.mmu import MMUShardWriter, shard_path
from aion.mock import hidden, imaging, population, sed, spectra

CONFIG = "mock"
NSIDE = 16
LEGACY_FILTERS = tuple(registry.band(b).filter_curve for b in registry.survey("legacysurvey").bands)
WISE_BANDS = ("wise-w1", "wise-w2", "wise-w3", "wise-w4")
WISE_FILTERS = tuple(registry.band(b).filter_curve for b in WISE_BANDS)
HSC_FILTERS = tuple(registry.band(b).filter_curve for b in registry.survey("hsc").bands)
ALL_FILTERS = LEGACY_FILTERS + WISE_FILTERS + HSC_FILTERS
Z_MAG_LIMIT = 21.0
BGS_R_LIMIT = 19.5


@dataclass(kw_only=True)
class SurveyConditions:
    """Observing conditions of an imaging survey: median PSF FWHM and 5-sigma point-source depth."""

    psf_fwhm: tuple[float, ...]
    depth: tuple[float, ...]
    gain: float  # effective detected electrons per image flux unit (source Poisson noise)
    psf_scatter: float = 0.12  # lognormal scatter of the seeing
    depth_scatter: float = 0.2  # mag


# Legacy Surveys DR10 (DECam) and HSC-SSP Wide typical values
LEGACY_CONDITIONS = SurveyConditions(psf_fwhm=(1.45, 1.3, 1.2, 1.15), depth=(24.8, 24.2, 23.7, 23.3), gain=4000.0)
HSC_CONDITIONS = SurveyConditions(psf_fwhm=(0.79, 0.75, 0.61, 0.68, 0.68), depth=(26.5, 26.1, 25.9, 25.1, 24.4),
                                  gain=1600.0, psf_scatter=0.1)
WISE_DEPTH = (20.6, 19.9, 16.5, 14.5)  # 5-sigma point-source AB depths (unWISE-like)


@dataclass(kw_only=True)
class MockConfig:
    """What to generate. ``n`` counts galaxies in the parent (Legacy-Survey-like) sample."""

    n: int = 2000
    seed: int = 0
    image_size: int = 64
    """Legacy Survey cutout side in pixels (MMU uses 160; 64 keeps the laptop default light)."""
    hsc_image_size: int = 96
    """HSC cutout side (0.168"/px, so 96 px covers about the same sky as 64 Legacy pixels)."""
    chunk_size: int = 256
    footprint_centre: tuple[float, float] = (150.0, 2.2)
    footprint_radius_deg: float = 4.0
    hsc_pixels: int = 3
    """How many of the footprint's HEALPix pixels HSC covers (an overlapping subset)."""
    bgs_completeness: float = 0.8
    lrg_completeness: float = 0.7
    hidden_physics: bool = True
    """Plant AGN, bars and a rare population recorded only in ``truth`` (see :mod:`aion.mock.hidden`)."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n: expected a positive number of galaxies, got {self.n}")
        if self.image_size < 16 or self.hsc_image_size < 16:
            raise ValueError("image_size / hsc_image_size: expected at least 16 pixels")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {self.chunk_size}")


@dataclass
class Summary:
    config: dict
    counts: dict[str, int] = field(default_factory=dict)
    pixels: list[int] = field(default_factory=list)
    seconds: float = 0.0


def footprint_pixels(cfg: MockConfig) -> list[int]:
    hp = HEALPix(nside=NSIDE, order="nested")
    ra, dec = cfg.footprint_centre
    found = hp.cone_search_lonlat(ra * u.deg, dec * u.deg, radius=cfg.footprint_radius_deg * u.deg)
    return sorted(int(p) for p in found)


def milky_way_ebv(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """A smooth, fixed Galactic reddening pattern over the sky (a stand-in for the SFD map)."""
    r, d = np.radians(ra), np.radians(dec)
    pattern = (np.sin(3.1 * r + 0.4) * np.cos(2.3 * d + 1.1) + 0.5 * np.sin(11.0 * r - 7.0 * d + 2.0)
               + 0.25 * np.cos(29.0 * r + 23.0 * d))
    return 0.012 + 0.025 * (1.0 + pattern / 1.75)


def _positions_in_pixel(hp: HEALPix, pixel: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    corners_lon, corners_lat = hp.boundaries_lonlat([pixel], step=4)
    lon = corners_lon.to_value(u.deg).ravel()
    lat = corners_lat.to_value(u.deg).ravel()
    lon = np.where(lon - lon[0] > 180, lon - 360, np.where(lon - lon[0] < -180, lon + 360, lon))
    ra_lo, ra_hi, dec_lo, dec_hi = lon.min(), lon.max(), lat.min(), lat.max()
    ras, decs = [], []
    while sum(len(x) for x in ras) < n:
        m = 4 * n + 16
        ra = rng.uniform(ra_lo, ra_hi, m)
        sin_dec = rng.uniform(np.sin(np.radians(dec_lo)), np.sin(np.radians(dec_hi)), m)
        dec = np.degrees(np.arcsin(sin_dec))
        inside = hp.lonlat_to_healpix((ra % 360) * u.deg, dec * u.deg) == pixel
        ras.append(ra[inside] % 360)
        decs.append(dec[inside])
    return np.concatenate(ras)[:n], np.concatenate(decs)[:n]


class _Generator:
    """Holds the shared, precomputed tables; generates one chunk of galaxies at a time."""

    def __init__(self, cfg: MockConfig):
        self.cfg = cfg
        self.phot = sed.PhotometryTable(ALL_FILTERS)
        self.agn_phot = hidden.AgnPhotometry(ALL_FILTERS)
        self.hp = HEALPix(nside=NSIDE, order="nested")

    # ------------------------------------------------------------------ selection
    def draw_selected(self, n: int, rng: np.random.Generator) -> tuple[population.Population, np.ndarray, np.ndarray]:
        """Galaxies with true (dust-free) z-band magnitude < 21, their band maggies and line fluxes."""
        pops, mags, lines = [], [], []
        have = 0
        while have < n:
            cand = population.draw_population(max(2048, 25 * (n - have)), rng)
            lf, _ = sed.emission_line_fluxes(cand.sfr, cand.log_mstar, cand.z, rng)
            lw = np.array(list(sed.LINES.values()))[None, :] * (1 + cand.z[:, None])
            # per component maggies: lines belong to the disk
            m_b = self.phot.maggies(cand.coeffs_bulge, cand.z)
            m_d = self.phot.maggies(cand.coeffs_disk, cand.z) + self.phot.line_maggies(lf, lw)
            zmag = 22.5 - 2.5 * np.log10(np.clip((m_b + m_d)[:, 3], 1e-30, None) * 1e9)
            keep = np.nonzero(zmag < Z_MAG_LIMIT)[0][: n - have]
            pops.append(cand.select(keep))
            mags.append(np.stack([m_b[keep], m_d[keep]], axis=1))  # (k, 2, F)
            lines.append(lf[keep])
            have += keep.size
        pop = pops[0] if len(pops) == 1 else population.Population(
            **{k: np.concatenate([getattr(p, k) for p in pops]) for k in pops[0].__dataclass_fields__})
        return pop, np.concatenate(mags), np.concatenate(lines)

    # ------------------------------------------------------------------ imaging
    def render(self, pop: population.Population, comp_flux: np.ndarray, pixel_scale: float, size: int,
               psf_fwhm: np.ndarray, offsets: np.ndarray, hid: hidden.Hidden | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """Noiseless PSF-convolved images (B, C, size, size) and per-band normalised profiles' sum p^2.

        comp_flux: (B, K, C) bulge / disk (/ AGN point source when K = 3) fluxes in image units;
        ``hid``: bars take their share of the disk light.
        """
        b, _, c = comp_flux.shape
        bulge = imaging.sersic_stamps(4.0, pop.re_bulge, pop.q_bulge, pop.pa, pixel_scale, size, offset_px=offsets)
        disk = imaging.sersic_stamps(1.0, pop.re_disk, pop.q_disk, pop.pa, pixel_scale, size, offset_px=offsets)
        psf = imaging.gaussian_psf_kernel_fft(psf_fwhm.reshape(-1), pixel_scale, size, beta=3.5)
        # convolution is linear: combine the components per band, then convolve once
        unconv = comp_flux[:, 0, :, None, None] * bulge[:, None] + comp_flux[:, 1, :, None, None] * disk[:, None]
        if hid is not None:
            barred = np.flatnonzero(hid.bar_frac > 0)
            if barred.size:
                bar = imaging.sersic_stamps(0.5, hid.bar_re[barred], hid.bar_q[barred], hid.bar_pa[barred],
                                            pixel_scale, size, offset_px=offsets[barred])
                share = hid.bar_frac[barred, None, None, None] * comp_flux[barred, 1, :, None, None]
                unconv[barred] += share * (bar[:, None] - disk[barred, None])
        if comp_flux.shape[1] > 2:
            nucleus = np.flatnonzero((comp_flux[:, 2] > 0).any(axis=1))
            if nucleus.size:
                point = imaging.sersic_stamps(1.0, np.full(nucleus.size, hidden.POINT_SOURCE_RE_ARCSEC),
                                              np.ones(nucleus.size), np.zeros(nucleus.size), pixel_scale, size,
                                              offset_px=offsets[nucleus])
                unconv[nucleus] += comp_flux[nucleus, 2, :, None, None] * point[:, None]
        model = imaging.convolve_fft(unconv.reshape(b * c, size, size), psf).reshape(b, c, size, size)
        total = comp_flux.sum(axis=1)
        prof = model / np.where(total > 0, total, 1.0)[:, :, None, None]
        return model, (prof**2).sum(axis=(2, 3))

    def fiber_fractions(self, pop: population.Population) -> tuple[np.ndarray, np.ndarray]:
        """Fraction of bulge / disk light in a 1.5" fibre under 1" Gaussian seeing."""
        scale, size = 0.1, 48
        zero = np.zeros((len(pop), 2))
        out = []
        for n_s, re, q in ((4.0, pop.re_bulge, pop.q_bulge), (1.0, pop.re_disk, pop.q_disk)):
            st = imaging.sersic_stamps(n_s, re, q, pop.pa, scale, size, offset_px=zero)
            psf = imaging.gaussian_psf_kernel_fft(np.full(len(pop), spectra.FIBER_SEEING_FWHM_ARCSEC), scale, size)
            conv = imaging.convolve_fft(st, psf)
            yy, xx = np.mgrid[:size, :size]
            r = np.hypot(xx - size // 2, yy - size // 2) * scale
            out.append((conv * (r <= spectra.FIBER_DIAMETER_ARCSEC / 2)).sum(axis=(1, 2)))
        return out[0], out[1]

    def conditions(self, cond: SurveyConditions, b: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        psf = np.array(cond.psf_fwhm)[None, :] * np.exp(rng.normal(0, cond.psf_scatter, (b, len(cond.psf_fwhm))))
        depth = np.array(cond.depth)[None, :] + rng.normal(0, cond.depth_scatter, (b, len(cond.depth)))
        # stored as float32; render with exactly the stored value so truth re-renders bit-for-bit
        return psf.astype(np.float32).astype(np.float64), depth

    def image_survey(self, pop, comp_maggies, mw, survey_name: str, cond: SurveyConditions, size: int,
                     rng: np.random.Generator, hid: hidden.Hidden | None = None) -> dict[str, np.ndarray]:
        """Cutouts + catalogue fluxes of one imaging survey, in the survey's native units."""
        srv = registry.survey(survey_name)
        unit = 10 ** (0.4 * (srv.zero_point - 22.5)) * 1e9  # image units per maggy
        b = len(pop)
        psf, depth = self.conditions(cond, b, rng)
        comp = comp_maggies * mw[:, None, :] * unit  # (B, 2, C)
        offsets = rng.uniform(-0.5, 0.5, (b, 2))
        model, sum_p2 = self.render(pop, comp, srv.pixel_scale, size, psf, offsets, hid)
        sky = imaging.sky_sigma_from_depth(depth, psf, srv.pixel_scale, zero_point=srv.zero_point)
        gain = np.full(sky.shape, cond.gain)
        noisy, ivar = imaging.add_noise(model, sky, gain, rng)
        mask = imaging.random_masks(model.shape, rng)
        ivar = np.where(mask, ivar, 0.0).astype(np.float32)
        missing = ~mask.any(axis=(2, 3))
        noisy = np.where(missing[:, :, None, None], 0.0, noisy).astype(np.float32)
        # catalogue flux: the optimal (profile-weighted) measurement's error on this image
        total = comp.sum(axis=1)
        var_cat = sky**2 / np.clip(sum_p2, 1e-12, None) + np.clip(total, 0, None) / gain
        flux_cat = total + rng.standard_normal(total.shape) * np.sqrt(var_cat)
        flux_ivar = 1.0 / var_cat
        flux_cat[missing] = 0.0
        flux_ivar[missing] = 0.0
        return {
            "image_array": noisy, "image_ivar": ivar, "image_mask": mask,
            "image_band": np.tile(np.array([b_.encode() for b_ in srv.bands], dtype="S8"), (b, 1)),
            "image_psf_fwhm": psf.astype(np.float32),
            "image_scale": np.full((b, len(srv.bands)), srv.pixel_scale, dtype=np.float32),
            "_flux": flux_cat, "_flux_ivar": flux_ivar, "_true_flux": total, "_offsets": offsets,
            "_depth": depth, "_model_sum": model.sum(axis=(2, 3)),
        }


POINT_FIBRE_FRACTION = hidden.point_source_fibre_fraction(spectra.FIBER_DIAMETER_ARCSEC,
                                                         spectra.FIBER_SEEING_FWHM_ARCSEC)


def _hidden_physics(gen: _Generator, cfg: MockConfig, pop: population.Population, comp_maggies: np.ndarray,
                    line_flux: np.ndarray, pixel: int, start: int,
                    ) -> tuple[hidden.Hidden, np.ndarray, np.ndarray]:
    """Draw the hidden properties (own random stream) and add their light: (hidden, (B, 3, F) maggies, lines)."""
    b = len(pop)
    if not cfg.hidden_physics:
        return hidden.none(b), np.concatenate([comp_maggies, np.zeros_like(comp_maggies[:, :1])], axis=1), line_flux
    hrng = np.random.default_rng([cfg.seed, 2, pixel, start])
    agn_unit = gen.agn_phot.maggies(pop.z)
    r_band = 1  # the Legacy Survey r filter in ALL_FILTERS
    draws = hidden.draw(pop.log_mstar, pop.quenched, pop.re_disk, pop.pa, comp_maggies[:, :, r_band].sum(axis=1),
                        agn_unit[:, r_band], hrng)
    boosted = hidden.boosted_lines(line_flux, draws)
    lw = np.array(list(sed.LINES.values()))[None, :] * (1 + pop.z[:, None])
    comp_maggies = comp_maggies.copy()
    comp_maggies[:, 1] += gen.phot.line_maggies(boosted - line_flux, lw)  # lines belong to the disk
    agn = draws.agn_amp[:, None] * agn_unit
    return draws, np.concatenate([comp_maggies, agn[:, None]], axis=1), boosted


def _agn_fibre_flambda(agn_amp: np.ndarray, z: np.ndarray) -> np.ndarray | None:
    """The AGN's f_lambda inside the fibre on the DESI grid (erg/s/cm^2/A), None when no AGN."""
    if not np.any(agn_amp > 0):
        return None
    return hidden.agn_observed_flambda(agn_amp * POINT_FIBRE_FRACTION, z, spectra.desi_wavelength())


def _ids(survey_index: int, pixel: int, start: int, n: int) -> np.ndarray:
    return (np.int64(survey_index) * 10**15 + np.int64(pixel) * 10**8 + start + np.arange(n)).astype(np.int64)


def _mag(flux_nmgy: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux_nmgy > 0, 22.5 - 2.5 * np.log10(flux_nmgy), np.nan)


def generate(out: str | os.PathLike, cfg: MockConfig, progress: bool = True) -> Summary:
    """Write the mock universe under ``out``; returns a summary (also written as JSON)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = _Generator(cfg)
    pixels = footprint_pixels(cfg)
    hsc_pixels = set(pixels[: cfg.hsc_pixels])
    quota = np.random.default_rng([cfg.seed, 0]).multinomial(cfg.n, np.full(len(pixels), 1 / len(pixels)))
    counts = {"legacysurvey": 0, "hsc": 0, "desi": 0, "provabgs": 0}
    meta = {"generator": "aion.mock", "seed": cfg.seed, "config": asdict(cfg)}
    bar = tqdm(total=cfg.n, desc="mock universe", unit="gal", disable=not progress)
    for pixel, n_pix in zip(pixels, quota, strict=True):
        rng = np.random.default_rng([cfg.seed, 1, pixel])
        # one shard per survey and pixel; a shard is renamed into place only when complete
        with ExitStack() as stack:
            writers: dict[str, MMUShardWriter] = {}
            done = 0
            while done < n_pix:
                k = min(cfg.chunk_size, n_pix - done)
                rows = _chunk(gen, cfg, pixel, pixel in hsc_pixels, done, k, rng)
                for name, cols in rows.items():
                    if cols is None or not len(cols["object_id"]):
                        continue
                    if name not in writers:
                        writers[name] = stack.enter_context(MMUShardWriter(shard_path(out, name, CONFIG, pixel)))
                        writers[name].attrs.update(meta)
                    writers[name].append(cols)
                    counts[name] = counts.get(name, 0) + len(cols["object_id"])
                done += k
                bar.update(k)
    bar.close()
    counts["truth"] = counts.pop("truth", 0)
    summary = Summary(config=asdict(cfg), counts=counts, pixels=pixels, seconds=time.perf_counter() - t0)
    tmp = out / "mock_universe.json.tmp"
    tmp.write_text(json.dumps({"config": summary.config, "counts": counts, "pixels": pixels}, indent=2))
    os.replace(tmp, out / "mock_universe.json")
    return summary


def _chunk(gen: _Generator, cfg: MockConfig, pixel: int, in_hsc: bool, start: int, k: int,
           rng: np.random.Generator) -> dict[str, dict[str, np.ndarray] | None]:
    pop, comp_maggies, line_flux = gen.draw_selected(k, rng)
    hid, comp_maggies, line_flux = _hidden_physics(gen, cfg, pop, comp_maggies, line_flux, pixel, start)
    ra, dec = _positions_in_pixel(gen.hp, pixel, k, rng)
    ebv = milky_way_ebv(ra, dec)
    healpix = np.full(k, pixel, dtype=np.int64)
    r_coef = np.array([registry.band(b).extinction_coefficient for b in
                       registry.survey("legacysurvey").bands + WISE_BANDS + registry.survey("hsc").bands])
    mw = 10 ** (-0.4 * ebv[:, None] * r_coef[None, :])  # (B, F) in ALL_FILTERS order
    nl, nw = len(LEGACY_FILTERS), len(WISE_FILTERS)
    leg_ids = _ids(1, pixel, start, k)

    # ---------------- Legacy Survey
    leg = gen.image_survey(pop, comp_maggies[:, :, :nl], mw[:, :nl], "legacysurvey", LEGACY_CONDITIONS,
                           cfg.image_size, rng, hid)
    fib_b, fib_d = gen.fiber_fractions(pop)
    fiber = (comp_maggies[:, 0, :nl] * fib_b[:, None] + comp_maggies[:, 1, :nl] * fib_d[:, None]
             + comp_maggies[:, 2, :nl] * POINT_FIBRE_FRACTION) * mw[:, :nl] * 1e9
    wise_true = comp_maggies[:, :, nl:nl + nw].sum(axis=1) * mw[:, nl:nl + nw] * 1e9
    wise_sigma = 10 ** (0.4 * (22.5 - np.array(WISE_DEPTH))) / 5.0
    wise = wise_true + rng.standard_normal(wise_true.shape) * wise_sigma
    true_r = (comp_maggies[:, :, 1].sum(axis=1) * mw[:, 1] * 1e9)
    snr_r = true_r * np.sqrt(leg["_flux_ivar"][:, 1])
    w_b = comp_maggies[:, 0, 1] / np.clip(comp_maggies[:, :, 1].sum(axis=1), 1e-30, None)
    w_p = comp_maggies[:, 2, 1] / np.clip(comp_maggies[:, :, 1].sum(axis=1), 1e-30, None)  # AGN: a point
    re_true = w_b * pop.re_bulge + (1 - w_b - w_p) * pop.re_disk
    q_true = w_b * pop.q_bulge + (1 - w_b - w_p) * pop.q_disk + w_p
    e_true = (1 - q_true) / (1 + q_true)
    shape_noise = np.clip(2.0 / np.clip(snr_r, 1e-3, None), 0.005, 0.5)
    shape_r = re_true * np.exp(rng.normal(0, shape_noise))
    e1 = e_true * np.cos(2 * pop.pa) + rng.normal(0, shape_noise / 2)
    e2 = e_true * np.sin(2 * pop.pa) + rng.normal(0, shape_noise / 2)
    legacy_cols = {
        "object_id": leg_ids, "ra": ra, "dec": dec, "healpix": healpix,
        **{k_: v for k_, v in leg.items() if not k_.startswith("_")},
        "EBV": ebv.astype(np.float32),
        "SHAPE_R": shape_r.astype(np.float32), "SHAPE_E1": e1.astype(np.float32), "SHAPE_E2": e2.astype(np.float32),
    }
    for j, b in enumerate("GRIZ"):
        legacy_cols[f"FLUX_{b}"] = leg["_flux"][:, j].astype(np.float32)
        legacy_cols[f"FLUX_IVAR_{b}"] = leg["_flux_ivar"][:, j].astype(np.float32)
        legacy_cols[f"FIBERFLUX_{b}"] = fiber[:, j].astype(np.float32)
    for j, b in enumerate(("W1", "W2", "W3", "W4")):
        legacy_cols[f"FLUX_{b}"] = wise[:, j].astype(np.float32)
        legacy_cols[f"FLUX_IVAR_{b}"] = np.full(k, 1 / wise_sigma[j] ** 2, dtype=np.float32)

    # ---------------- HSC (sub-footprint)
    hsc_cols = None
    hsc_true = np.full((k, 5), np.nan)
    if in_hsc:
        hsc = gen.image_survey(pop, comp_maggies[:, :, nl + nw:], mw[:, nl + nw:], "hsc", HSC_CONDITIONS,
                               cfg.hsc_image_size, rng, hid)
        to_nmgy = 10 ** (-0.4 * (27.0 - 22.5))
        hsc_true = hsc["_true_flux"] * to_nmgy
        f_nmgy = hsc["_flux"] * to_nmgy
        sig_nmgy = np.sqrt(1 / np.where(hsc["_flux_ivar"] > 0, hsc["_flux_ivar"], np.inf)) * to_nmgy
        mag = _mag(f_nmgy)
        with np.errstate(divide="ignore", invalid="ignore"):
            magerr = np.where(np.isfinite(mag), 1.0857 * sig_nmgy / np.abs(f_nmgy), np.nan)
        jitter = rng.normal(0, 0.03 / 3600, (2, k))
        hsc_cols = {
            "object_id": _ids(2, pixel, start, k), "ra": (ra + jitter[0] / np.cos(np.radians(dec))) % 360,
            "dec": dec + jitter[1], "healpix": healpix,
            **{k_: v for k_, v in hsc.items() if not k_.startswith("_")},
        }
        for j, b in enumerate("grizy"):
            hsc_cols[f"{b}_cmodel_mag"] = mag[:, j].astype(np.float32)
            hsc_cols[f"{b}_cmodel_magerr"] = magerr[:, j].astype(np.float32)
            hsc_cols[f"a_{b}"] = (registry.band(f"hsc-{b}").extinction_coefficient * ebv).astype(np.float32)

    # ---------------- DESI target selection (on dereddened, measured photometry)
    with np.errstate(divide="ignore", invalid="ignore"):
        r_mag = _mag(legacy_cols["FLUX_R"] / mw[:, 1])
        z_mag = _mag(legacy_cols["FLUX_Z"] / mw[:, 3])
    bgs = (r_mag < BGS_R_LIMIT) & (rng.random(k) < cfg.bgs_completeness)
    lrg = (~bgs & (z_mag < 20.4) & (r_mag - z_mag > 1.1) & (rng.random(k) < cfg.lrg_completeness))
    targets = np.nonzero(bgs | lrg)[0]
    desi_cols = prov_cols = None
    spec_true = None
    if targets.size:
        sub = pop.select(targets)
        spec_true = spectra.noiseless_spectra(sub.coeffs_bulge, sub.coeffs_disk, fib_b[targets], fib_d[targets],
                                              sub.z, sub.vdisp, sub.sigma_gas, line_flux[targets], ebv[targets],
                                              agn_flambda=_agn_fibre_flambda(hid.agn_amp[targets], sub.z))
        expo = np.exp(rng.normal(0, 0.25, targets.size))
        flux, ivar, mask = spectra.observe(spec_true, rng, expo)
        snr = np.median(spec_true * np.sqrt(ivar), axis=1)
        zerr = (1 + sub.z) * 3e-5 * (1 + 3 / np.clip(snr, 0.1, None))
        zwarn = np.where(rng.random(targets.size) < 0.005, 4, 0).astype(np.int64)
        z_obs = np.where(zwarn == 0, sub.z + rng.normal(0, 1, targets.size) * zerr, rng.uniform(0, 1.5, targets.size))
        wave = spectra.desi_wavelength().astype(np.float32)
        n_t = targets.size
        desi_cols = {
            "object_id": _ids(3, pixel, start, k)[targets], "ra": ra[targets], "dec": dec[targets],
            "healpix": healpix[targets],
            "spectrum_flux": flux, "spectrum_ivar": ivar, "spectrum_mask": mask,
            "spectrum_lambda": np.tile(wave, (n_t, 1)),
            "spectrum_lsf_sigma": np.tile(spectra.lsf_sigma(wave).astype(np.float32), (n_t, 1)),
            "Z": z_obs.astype(np.float32), "ZERR": zerr.astype(np.float32), "ZWARN": zwarn,
            "EBV": ebv[targets].astype(np.float32),
            "TARGET": np.where(bgs[targets], b"BGS", b"LRG").astype("S4"),
        }
        for b in "GRZ":
            desi_cols[f"FLUX_{b}"] = legacy_cols[f"FLUX_{b}"][targets]
        in_prov = bgs[targets] & (zwarn == 0)
        pt = targets[in_prov]
        prov_cols = {
            "object_id": desi_cols["object_id"][in_prov], "ra": ra[pt], "dec": dec[pt], "healpix": healpix[pt],
            "LOG_MSTAR": pop.log_mstar[pt].astype(np.float32), "Z_HP": pop.z[pt].astype(np.float32),
            "Z_MW": pop.z_mw[pt].astype(np.float32), "TAGE_MW": pop.tage_mw[pt].astype(np.float32),
            "AVG_SFR": pop.sfr[pt].astype(np.float32), "sSFR": pop.ssfr[pt].astype(np.float32),
        }

    desi_index = np.full(k, -1, dtype=np.int64)
    desi_index[targets] = np.arange(targets.size)
    truth = {
        "object_id": leg_ids, "ra": ra, "dec": dec, "healpix": healpix,
        "hsc_object_id": _ids(2, pixel, start, k) if in_hsc else np.full(k, -1, dtype=np.int64),
        "desi_object_id": np.where(desi_index >= 0, _ids(3, pixel, start, k), -1),
        "desi_target": np.where(bgs, 1, np.where(lrg, 2, 0)).astype(np.int8),
        "Z": pop.z, "LOG_MSTAR": pop.log_mstar, "SFR": pop.sfr, "sSFR": pop.ssfr, "Z_MW": pop.z_mw,
        "TAGE_MW": pop.tage_mw, "QUENCHED": pop.quenched, "BULGE_FRAC": pop.bulge_frac,
        "RE_BULGE": pop.re_bulge, "RE_DISK": pop.re_disk, "Q_BULGE": pop.q_bulge, "Q_DISK": pop.q_disk,
        "PA": pop.pa, "VDISP": pop.vdisp, "SIGMA_GAS": pop.sigma_gas, "EBV": ebv,
        "COEFFS_BULGE": pop.coeffs_bulge, "COEFFS_DISK": pop.coeffs_disk, "LINE_FLUX": line_flux,
        "FIBER_FRAC_BULGE": fib_b, "FIBER_FRAC_DISK": fib_d,
        "LEGACY_OFFSET": leg["_offsets"], "LEGACY_PSF_FWHM": leg["image_psf_fwhm"], "LEGACY_DEPTH": leg["_depth"],
        "LEGACY_FLUX_TRUE": leg["_true_flux"], "LEGACY_MODEL_SUM": leg["_model_sum"],
        "WISE_FLUX_TRUE": wise_true, "HSC_FLUX_TRUE_NMGY": hsc_true,
        "COMP_MAGGIES": comp_maggies,
        **hid.truth_columns(),
    }
    if in_hsc:
        truth["HSC_OFFSET"] = hsc["_offsets"]
        truth["HSC_PSF_FWHM"] = hsc["image_psf_fwhm"]
    else:
        truth["HSC_OFFSET"] = np.full((k, 2), np.nan)
        truth["HSC_PSF_FWHM"] = np.full((k, 5), np.nan, dtype=np.float32)
    return {"legacysurvey": legacy_cols, "hsc": hsc_cols, "desi": desi_cols, "provabgs": prov_cols, "truth": truth}


def noiseless_images(truth: dict[str, np.ndarray], survey_name: str, size: int) -> np.ndarray:
    """Re-render the noiseless, PSF-convolved cutouts of objects from their ``truth`` columns.

    This is the ground truth that noisy images were drawn from (same parameters, same code),
    e.g. for measuring a tokenizer's reconstruction against the signal rather than the noise.
    Returns (B, C, size, size) in the survey's native units; NaN rows where the object has
    no cutout in that survey (outside the HSC footprint).
    """
    srv = registry.survey(survey_name)
    nl, nw = len(LEGACY_FILTERS), len(WISE_FILTERS)
    sl = slice(0, nl) if survey_name == "legacysurvey" else slice(nl + nw, nl + nw + len(srv.bands))
    prefix = "LEGACY" if survey_name == "legacysurvey" else "HSC"
    ebv = np.asarray(truth["EBV"])
    r_coef = np.array([registry.band(b).extinction_coefficient for b in srv.bands])
    mw = 10 ** (-0.4 * ebv[:, None] * r_coef[None, :])
    unit = 10 ** (0.4 * (srv.zero_point - 22.5)) * 1e9
    comp = np.asarray(truth["COMP_MAGGIES"])[:, :, sl] * mw[:, None, :] * unit
    pop = population.Population(
        z=truth["Z"], log_mstar=truth["LOG_MSTAR"], coeffs_bulge=truth["COEFFS_BULGE"],
        coeffs_disk=truth["COEFFS_DISK"], sfr=truth["SFR"], z_mw=truth["Z_MW"], tage_mw=truth["TAGE_MW"],
        quenched=truth["QUENCHED"], bulge_frac=truth["BULGE_FRAC"], re_bulge=truth["RE_BULGE"],
        re_disk=truth["RE_DISK"], q_bulge=truth["Q_BULGE"], q_disk=truth["Q_DISK"], pa=truth["PA"],
        vdisp=truth["VDISP"], sigma_gas=truth["SIGMA_GAS"])
    offsets = np.asarray(truth[f"{prefix}_OFFSET"], dtype=np.float64)
    psf = np.asarray(truth[f"{prefix}_PSF_FWHM"], dtype=np.float64)
    have = np.isfinite(offsets).all(axis=1)
    out = np.full((len(pop), len(srv.bands), size, size), np.nan)
    if have.any():
        gen = _Generator.__new__(_Generator)  # rendering needs no precomputed tables
        hid = hidden.Hidden.from_truth(truth)
        model, _ = gen.render(pop.select(have), comp[have], srv.pixel_scale, size, psf[have], offsets[have],
                              None if hid is None else hid.select(have))
        out[have] = model
    return out


def noiseless_desi_spectra(truth: dict[str, np.ndarray]) -> np.ndarray:
    """Re-compute the noiseless DESI-like spectra (B, 7781) from ``truth`` rows (1e-17 erg/s/cm^2/A).

    The same function made the observed spectra before noise, so this is the signal a
    spectrum tokenizer should recover. Works for any truth row, targeted by DESI or not.
    """
    return spectra.noiseless_spectra(
        np.asarray(truth["COEFFS_BULGE"]), np.asarray(truth["COEFFS_DISK"]),
        np.asarray(truth["FIBER_FRAC_BULGE"]), np.asarray(truth["FIBER_FRAC_DISK"]), np.asarray(truth["Z"]),
        np.asarray(truth["VDISP"]), np.asarray(truth["SIGMA_GAS"]), np.asarray(truth["LINE_FLUX"]),
        np.asarray(truth["EBV"]),
        agn_flambda=_agn_fibre_flambda(np.asarray(truth["AGN_AMP"], dtype=np.float64), np.asarray(truth["Z"]))
        if "AGN_AMP" in truth else None)

"""Tests for the vectorised mock-survey renderer (aion.mock.imaging).

The checks compare against analytic expectations (enclosed light, moments, FWHM, S/N) so that
a wrong b_n, a swapped axis, a missing normalisation or a wrong noise formula fails loudly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft as sfft
from scipy import integrate
from scipy.interpolate import CubicSpline
from scipy.optimize import brentq
from scipy.special import gammainc, gammaincinv

from aion.mock import imaging

PIX = 0.262  # Legacy Survey pixel scale, arcsec


def _circle_weights(size: int, cx: float, cy: float, radius: float, sub: int = 16) -> np.ndarray:
    """Fraction of each pixel's area inside a circle (so apertures are free of pixelisation)."""
    o = (np.arange(sub) + 0.5) / sub - 0.5
    grid = (np.arange(size)[:, None] + o[None, :]).ravel()
    inside = (grid[None, :] - cx) ** 2 + (grid[:, None] - cy) ** 2 <= radius**2
    return inside.reshape(size, sub, size, sub).mean(axis=(1, 3))


def _moments(img: np.ndarray) -> tuple[float, float, float, float, float]:
    """Centroid and second moments (x0, y0, Ixx, Iyy, Ixy) of one image, x = column, y = row."""
    y, x = np.mgrid[: img.shape[0], : img.shape[1]]
    tot = img.sum()
    x0, y0 = (img * x).sum() / tot, (img * y).sum() / tot
    ixx = (img * (x - x0) ** 2).sum() / tot
    iyy = (img * (y - y0) ** 2).sum() / tot
    ixy = (img * (x - x0) * (y - y0)).sum() / tot
    return x0, y0, ixx, iyy, ixy


def _fwhm_px(img: np.ndarray) -> float:
    """FWHM from half-maximum crossings of cubic splines through the central row and column."""
    c = img.shape[0] // 2
    widths = []
    for prof in (img[c, :], img[:, c]):
        spl = CubicSpline(np.arange(prof.size), prof)
        half = prof[c] / 2.0
        def excess(t: float, spl: CubicSpline = spl, half: float = half) -> float:
            return float(spl(t)) - half

        lo = brentq(excess, 0.0, c)
        hi = brentq(excess, c, prof.size - 1.0)
        widths.append(hi - lo)
    return float(np.mean(widths))


# --------------------------------------------------------------------------- sersic_stamps


def test_stamps_sum_to_one_and_are_finite():
    rng = np.random.default_rng(0)
    b = 64
    for n in (1.0, 4.0, 2.5):
        st = imaging.sersic_stamps(
            n,
            rng.lognormal(np.log(0.5), 1.0, b),
            rng.uniform(0.1, 1.0, b),
            rng.uniform(0, np.pi, b),
            PIX,
            48,
            offset_px=rng.uniform(-0.5, 0.5, (b, 2)),
        )
        assert st.shape == (b, 48, 48) and st.dtype == np.float64
        assert np.all(np.isfinite(st)) and st.min() >= 0.0
        np.testing.assert_allclose(st.sum(axis=(1, 2)), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1.0, 4.0])
def test_half_light_radius_untruncated(n):
    """Round, well-resolved profile without truncation: F(<r_e) / F(<R) matches the analytic curve."""
    size, re_arcsec = 96, 1.5
    st = imaging.sersic_stamps(n, np.array([re_arcsec]), np.array([1.0]), np.array([0.0]), PIX, size,
                               truncate_re=np.inf)[0]
    re_px = re_arcsec / PIX
    c = size // 2
    big = 40.0  # px, inside the stamp
    f_re = (st * _circle_weights(size, c, c, re_px)).sum()
    f_big = (st * _circle_weights(size, c, c, big)).sum()
    b = gammaincinv(2 * n, 0.5)
    expected = 0.5 / gammainc(2 * n, b * (big / re_px) ** (1 / n))
    assert f_re / f_big == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("n", [1.0, 4.0])
def test_half_light_radius_default_truncation(n):
    """With the default soft truncation (all light inside the stamp) the enclosed fraction at r_e
    matches a 1-D integral of the tapered profile, and is within 10% of one half."""
    size, re_arcsec = 96, 1.5
    st = imaging.sersic_stamps(n, np.array([re_arcsec]), np.array([1.0]), np.array([0.0]), PIX, size)[0]
    re_px = re_arcsec / PIX
    c = size // 2
    f_re = (st * _circle_weights(size, c, c, re_px)).sum()
    b = gammaincinv(2 * n, 0.5)
    r_out = 8.0 if n >= 2 else 4.0
    r_in = r_out - 1.0

    def light(r: float) -> float:  # r in units of r_e
        t = min(max((r - r_in) / (r_out - r_in), 0.0), 1.0)
        return math.exp(-b * r ** (1 / n)) * (1 - t * t) ** 2 * r

    inner = integrate.quad(light, 0, 1, limit=200)[0]
    total = inner + integrate.quad(light, 1, r_out, limit=200)[0]
    assert f_re == pytest.approx(inner / total, rel=0.02)
    assert f_re == pytest.approx(0.5, rel=0.1)


def test_ellipticity_and_orientation():
    q = 0.5
    pas = np.array([0.0, np.pi / 2, 0.3])
    st = imaging.sersic_stamps(1.0, np.full(3, 1.0), np.full(3, q), pas, PIX, 64)
    m0, m90, m03 = (_moments(s) for s in st)
    # pa = 0: major axis along y (rows); pa = pi/2: along x (columns).
    assert m0[3] > 3 * m0[2]
    assert m90[2] > 3 * m90[3]
    np.testing.assert_allclose([m0[2], m0[3]], [m90[3], m90[2]], rtol=1e-6)
    assert math.sqrt(m0[2] / m0[3]) == pytest.approx(q, abs=0.03)
    # measured orientation: pa = 0.5 * atan2(2 Ixy, Iyy - Ixx) for pa measured from +y towards +x
    _, _, ixx, iyy, ixy = m03
    assert 0.5 * math.atan2(2 * ixy, iyy - ixx) == pytest.approx(0.3, abs=0.01)


def test_offsets_move_the_centroid():
    off = np.array([[0.3, -0.2], [-0.45, 0.1]])
    st = imaging.sersic_stamps(1.0, np.full(2, 0.8), np.full(2, 0.7), np.full(2, 0.4), PIX, 64, offset_px=off)
    for s, (dx, dy) in zip(st, off, strict=True):
        x0, y0, *_ = _moments(s)
        assert x0 == pytest.approx(32 + dx, abs=0.01)
        assert y0 == pytest.approx(32 + dy, abs=0.01)


@pytest.mark.parametrize("n", [1.0, 4.0])
def test_sub_pixel_galaxy(n):
    st = imaging.sersic_stamps(n, np.array([0.05, 1e-5]), np.array([0.6, 0.6]), np.array([0.5, 0.5]), PIX, 32)
    assert np.all(np.isfinite(st))
    for s in st:
        assert np.unravel_index(np.argmax(s), s.shape) == (16, 16)
    assert st[0, 16, 16] > 0.5  # most light in the central pixel, but not all of it
    assert st[0, 16, 16] < 0.999
    assert st[1, 16, 16] == pytest.approx(1.0, abs=1e-6)  # point-source limit


def test_sub_pixel_galaxy_is_pixel_integrated():
    """A round exponential with r_e = 0.4 px: the central pixel holds the integral of the profile
    over that pixel (from direct 2-D quadrature), not the centre value times the pixel area."""
    re_px = 0.4
    st = imaging.sersic_stamps(1.0, np.array([re_px]), np.array([1.0]), np.array([0.0]), 1.0, 32,
                               truncate_re=np.inf)[0]
    b = gammaincinv(2.0, 0.5)
    norm = 2 * math.pi * re_px**2 * math.gamma(2.0) / b**2
    quad = integrate.dblquad(lambda y, x: math.exp(-b * math.hypot(x, y) / re_px), 0, 0.5, 0, 0.5,
                             epsabs=1e-12)[0]
    expected = 4 * quad / norm
    assert st[16, 16] == pytest.approx(expected, rel=0.01)
    assert st[16, 16] < 0.95 / norm  # much less than the centre value (1 / norm) times area


# ------------------------------------------------------------------------ PSF / convolution


@pytest.mark.parametrize("beta", [None, 3.5])
def test_convolution_preserves_flux(beta):
    rng = np.random.default_rng(1)
    imgs = rng.random((6, 40, 40)) * 10
    psf = imaging.gaussian_psf_kernel_fft(rng.uniform(0.8, 1.6, 6), PIX, 40, beta=beta)
    assert psf.shape == (6, 40, 21) and np.iscomplexobj(psf)
    out = imaging.convolve_fft(imgs, psf)
    assert out.shape == imgs.shape
    np.testing.assert_allclose(out.sum(axis=(1, 2)), imgs.sum(axis=(1, 2)), rtol=1e-6)


def test_convolution_broadcasts_over_bands():
    rng = np.random.default_rng(2)
    imgs = rng.random((3, 4, 32, 32))
    psf = imaging.gaussian_psf_kernel_fft(np.array([1.0, 1.2, 1.4, 1.6]), PIX, 32)[None]
    out = imaging.convolve_fft(imgs, psf)
    ref = imaging.convolve_fft(imgs[:, 2], np.repeat(psf[:, 2], 3, axis=0))
    np.testing.assert_allclose(out[:, 2], ref, rtol=1e-12)


@pytest.mark.parametrize("beta", [None, 3.5])
def test_psf_fwhm(beta):
    fwhm = np.array([1.3, 2.0])  # arcsec -> ~5 and ~7.6 px
    size = 64
    point = imaging.sersic_stamps(1.0, np.full(2, 0.005), np.ones(2), np.zeros(2), PIX, size)
    out = imaging.convolve_fft(point, imaging.gaussian_psf_kernel_fft(fwhm, PIX, size, beta=beta))
    for img, f in zip(out, fwhm, strict=True):
        assert np.unravel_index(np.argmax(img), img.shape) == (size // 2, size // 2)  # not shifted
        assert _fwhm_px(img) * PIX == pytest.approx(f, rel=0.05)


def test_moffat_has_broader_wings_than_gaussian():
    size = 64
    g = sfft.irfft2(imaging.gaussian_psf_kernel_fft(np.array([1.2]), PIX, size), s=(size, size))[0]
    m = sfft.irfft2(imaging.gaussian_psf_kernel_fft(np.array([1.2]), PIX, size, beta=3.5), s=(size, size))[0]
    assert g[0, 0] == pytest.approx(g.max()) and m[0, 0] == pytest.approx(m.max())  # centred on (0, 0)
    assert m[0, 15] > 10 * g[0, 15]


# ------------------------------------------------------------------------------ noise


def test_sky_sigma_gives_snr_five_at_depth():
    depth, fwhm, zp = 24.0, 1.2, 22.5
    sigma = imaging.sky_sigma_from_depth(np.array(depth), np.array(fwhm), PIX, zero_point=zp)
    size = 33
    psf = sfft.irfft2(imaging.gaussian_psf_kernel_fft(np.array([fwhm]), PIX, size), s=(size, size))[0]
    psf = np.fft.fftshift(psf)
    flux = 10 ** (-0.4 * (depth - zp))
    rng = np.random.default_rng(3)
    data = flux * psf + sigma * rng.standard_normal((4000, size, size))
    est = (data * psf).sum(axis=(1, 2)) / (psf**2).sum()  # optimal PSF-weighted flux
    assert est.mean() / est.std() == pytest.approx(5.0, rel=0.1)
    assert flux * math.sqrt((psf**2).sum()) / sigma == pytest.approx(5.0, rel=0.02)


def test_sky_sigma_is_elementwise():
    depth = np.array([[23.0, 24.0], [25.0, 24.0]])
    fwhm = np.array([[1.0, 1.0], [1.0, 2.0]])
    s = imaging.sky_sigma_from_depth(depth, fwhm, PIX)
    assert s.shape == (2, 2)
    assert s[0, 0] / s[0, 1] == pytest.approx(10**0.4)  # 1 mag deeper -> 2.512x less noise
    assert s[0, 1] / s[1, 1] == pytest.approx(2.0)  # twice the FWHM -> half the per-pixel sigma


def test_add_noise_statistics_and_purity():
    rng = np.random.default_rng(4)
    b, nb, h = 16, 4, 64
    model = rng.uniform(-0.5, 1.0, (b, nb, h, h)) ** 3 * 200.0  # includes negative pixels
    sky = rng.uniform(0.5, 2.0, (b, nb))
    gain = rng.uniform(1.0, 5.0, (b, nb))
    model_copy, sky_copy, gain_copy = model.copy(), sky.copy(), gain.copy()
    noisy, ivar = imaging.add_noise(model, sky, gain, np.random.default_rng(5))
    np.testing.assert_array_equal(model, model_copy)
    np.testing.assert_array_equal(sky, sky_copy)
    np.testing.assert_array_equal(gain, gain_copy)
    assert ivar.dtype == np.float32 and noisy.shape == model.shape
    expected_var = sky[..., None, None] ** 2 + np.maximum(model, 0) / gain[..., None, None]
    np.testing.assert_allclose(ivar, 1 / expected_var, rtol=1e-5)
    chi2 = (noisy - model) ** 2 * ivar
    assert chi2.mean() == pytest.approx(1.0, abs=0.02)
    bright = model > 50  # Poisson-dominated pixels must be right too
    assert chi2[bright].mean() == pytest.approx(1.0, abs=0.03)
    again, _ = imaging.add_noise(model, sky, gain, np.random.default_rng(5))
    np.testing.assert_array_equal(noisy, again)


# ------------------------------------------------------------------------------ masks


def test_random_masks_defaults():
    shape = (64, 4, 32, 32)
    m = imaging.random_masks(shape, np.random.default_rng(6))
    assert m.dtype == np.bool_ and m.shape == shape
    assert m.mean() > 0.9
    assert (~m).any()  # something got flagged
    again = imaging.random_masks(shape, np.random.default_rng(6))
    np.testing.assert_array_equal(m, again)
    other = imaging.random_masks(shape, np.random.default_rng(7))
    assert not np.array_equal(m, other)


def test_random_masks_components():
    shape = (40, 3, 32, 32)
    rng = np.random.default_rng(8)
    missing = imaging.random_masks(shape, rng, p_cosmic=0, p_bleed=0, p_missing_band=1.0)
    assert not missing.any()
    clean = imaging.random_masks(shape, rng, p_cosmic=0, p_bleed=0, p_missing_band=0)
    assert clean.all()
    cr = imaging.random_masks(shape, rng, p_cosmic=1.0, p_bleed=0, p_missing_band=0)
    flagged = (~cr).sum(axis=(2, 3))
    assert flagged.min() >= 1 and flagged.max() <= 3 * 2 * 8 + 6  # 1-3 streaks of <= 2 x 8 px
    bleed = imaging.random_masks(shape, rng, p_cosmic=0, p_bleed=1.0, p_missing_band=0)
    for img in ~bleed.reshape(-1, 32, 32):
        cols = np.flatnonzero(img.any(axis=0))
        assert 1 <= cols.size <= 2 and np.ptp(cols) <= 1  # one vertical trail, 1-2 columns wide
        rows = np.flatnonzero(img.any(axis=1))
        assert np.all(np.diff(rows) == 1)  # contiguous in y
    mixed = imaging.random_masks(shape, rng, p_missing_band=0.5)
    band_absent = ~mixed.any(axis=(2, 3))
    assert 0 < band_absent.mean() < 1

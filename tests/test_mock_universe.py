"""The mock universe: schema, determinism, and physical consistency across surveys.

One small universe is generated per test session (a few seconds) and read back through
the same MMU reader that users use for real data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from aion import modalities as registry
from aion.data.mmu import iter_mmu_hdf5
from aion.mock import sed
from aion.mock.spectra import desi_wavelength
from aion.mock.universe import MockConfig, generate, noiseless_images

CFG = dict(n=320, seed=7, image_size=32, hsc_image_size=48, chunk_size=64)


@pytest.fixture(scope="session")
def universe(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mock")
    generate(out, MockConfig(**CFG), progress=False)
    return out


def _read_all(root: Path, survey: str, columns=None):
    batches = list(iter_mmu_hdf5(root, survey, batch_size=10_000, columns=columns))
    assert len(batches) == 1
    return batches[0]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_schema_round_trip(universe):
    leg = _read_all(universe, "legacysurvey")
    assert len(leg) == CFG["n"]
    img = leg.modalities["legacysurvey_image"]
    assert img.flux.shape == (CFG["n"], 4, 32, 32)
    assert img.bands == registry.survey("legacysurvey").bands
    assert img.pixel_scale == pytest.approx(0.262) and img.zero_point == 22.5
    for b in ("g", "r", "i", "z", "w1", "w2", "w3", "w4"):
        s = leg.modalities[f"legacysurvey_flux_{b}"]
        assert s.values.shape == (CFG["n"],) and s.ivar is not None
    for name in ("legacysurvey_shape_r", "legacysurvey_shape_e1", "legacysurvey_shape_e2", "legacysurvey_ebv"):
        assert name in leg.modalities
    assert len(np.unique(leg.object_id)) == len(leg)

    hsc = _read_all(universe, "hsc")
    h = hsc.modalities["hsc_image"]
    assert h.flux.shape[1:] == (5, 48, 48) and h.zero_point == 27.0 and h.pixel_scale == pytest.approx(0.168)
    assert {f"hsc_mag_{b}" for b in "grizy"} <= set(hsc.modalities)
    assert 0 < len(hsc) < len(leg)

    desi = _read_all(universe, "desi")
    spec = desi.modalities["desi_spectrum"]
    assert spec.flux.shape[1] == 7781
    np.testing.assert_allclose(spec.wavelength[0, [0, -1]], [3600.0, 9824.0], atol=1e-3)
    assert "desi_z" in desi.modalities
    assert 0.05 * len(leg) < len(desi) < 0.5 * len(leg)
    # DESI marks bad pixels with mask True; our batches say valid = not bad
    assert 0.97 < spec.valid.mean() < 1.0

    prov = _read_all(universe, "provabgs")
    for name in ("log_mstar", "z_mw", "tage_mw", "avg_sfr", "ssfr", "z"):
        assert registry.modality(f"provabgs_{name}").role == "label"
        assert np.isfinite(prov.modalities[f"provabgs_{name}"].values).all()
    np.testing.assert_allclose(prov.modalities["provabgs_ssfr"].values,
                               np.log10(prov.modalities["provabgs_avg_sfr"].values)
                               - prov.modalities["provabgs_log_mstar"].values, atol=1e-4)


def test_same_seed_same_bytes_other_seed_other_data(universe, tmp_path):
    again = tmp_path / "again"
    generate(again, MockConfig(**CFG), progress=False)
    assert _digest(again) == _digest(universe)
    other = tmp_path / "other"
    generate(other, MockConfig(**{**CFG, "seed": 8, "n": 40}), progress=False)
    a = _read_all(universe, "truth", columns=["Z"]).columns["Z"][:40]
    b = _read_all(other, "truth", columns=["Z"]).columns["Z"][:40]
    assert not np.allclose(a, b)


def test_images_are_the_catalogue_galaxies_with_calibrated_noise(universe):
    leg = _read_all(universe, "legacysurvey")
    truth = _read_all(universe, "truth")
    img = leg.modalities["legacysurvey_image"]
    model = noiseless_images(truth.columns, "legacysurvey", 32)
    # the noiseless image holds exactly the catalogue's true flux (flux conservation)
    np.testing.assert_allclose(model.sum(axis=(2, 3)), truth.columns["LEGACY_FLUX_TRUE"], rtol=2e-3)
    # noise: chi^2 per valid pixel against the noiseless truth is 1
    chi2 = ((img.flux - model) ** 2 * img.ivar)[img.valid]
    assert chi2.mean() == pytest.approx(1.0, abs=0.03)
    # the whole-stamp flux agrees with the catalogue flux within the combined noise
    full = img.valid.all(axis=(2, 3))
    stamp = img.flux.sum(axis=(2, 3))
    var = (1 / np.where(img.ivar > 0, img.ivar, np.inf)).sum(axis=(2, 3))
    cat = np.stack([leg.modalities[f"legacysurvey_flux_{b}"].values for b in "griz"], axis=1)
    cat_ivar = np.stack([leg.modalities[f"legacysurvey_flux_{b}"].ivar for b in "griz"], axis=1)
    pull = (stamp - cat)[full] / np.sqrt(var[full] + 1 / cat_ivar[full])
    assert abs(pull.mean()) < 0.15 and 0.8 < pull.std() < 1.2
    # catalogue errors are honest: (measured - true) * sqrt(ivar) ~ N(0, 1)
    have = cat_ivar > 0
    cpull = ((cat - truth.columns["LEGACY_FLUX_TRUE"]) * np.sqrt(cat_ivar))[have]
    assert abs(cpull.mean()) < 0.1 and 0.9 < cpull.std() < 1.1


def test_hsc_magnitudes_match_truth_within_errors(universe):
    hsc = _read_all(universe, "hsc")
    truth = _read_all(universe, "truth")
    row = {int(i): k for k, i in enumerate(truth.columns["hsc_object_id"])}
    idx = np.array([row[int(i)] for i in hsc.object_id])
    true_mag = 22.5 - 2.5 * np.log10(truth.columns["HSC_FLUX_TRUE_NMGY"][idx])
    mags = np.stack([hsc.modalities[f"hsc_mag_{b}"].values for b in "grizy"], axis=1)
    ivar = np.stack([hsc.modalities[f"hsc_mag_{b}"].ivar for b in "grizy"], axis=1)
    err = np.where(ivar > 0, 1 / np.sqrt(np.where(ivar > 0, ivar, 1)), np.inf)
    ok = np.isfinite(mags) & (err < 0.1)
    pull = (mags - true_mag)[ok] / err[ok]
    assert ok.sum() > 100 and abs(np.median(pull)) < 0.15 and 0.8 < np.std(pull) < 1.25
    # the HSC cutout of the same galaxy carries the same light as the Legacy Survey one (g, r)
    model = noiseless_images(truth.columns, "hsc", 48)
    have = np.isfinite(model[:, 0, 0, 0])
    hsc_sum_nmgy = model[have].sum(axis=(2, 3)) * 10 ** (-0.4 * 4.5)
    np.testing.assert_allclose(hsc_sum_nmgy, truth.columns["HSC_FLUX_TRUE_NMGY"][have], rtol=2e-3)


def test_spectra_agree_with_fibre_photometry(universe):
    desi = _read_all(universe, "desi")
    leg = _read_all(universe, "legacysurvey")
    truth = _read_all(universe, "truth")
    row = {int(i): k for k, i in enumerate(truth.columns["desi_object_id"]) if i >= 0}
    idx = np.array([row[int(i)] for i in desi.object_id])
    spec = desi.modalities["desi_spectrum"]
    wave = desi_wavelength()
    ratios = []
    for band in "GRI":
        filt = registry.band(f"des-{band.lower()}").filter_curve
        synth = []
        for k in range(len(desi)):
            v = spec.valid[k]
            f = np.interp(wave, wave[v], spec.flux[k, v]) * 1e-17  # interpolate over bad pixels
            synth.append(sed.synthetic_maggies(wave, f, filt)[0] * 1e9)
        ratios.append(np.array(synth) / leg.columns[f"FIBERFLUX_{band}"][idx])
    ratios = np.array(ratios)
    # noise-limited agreement of the spectrum with the imaging fibre flux, to ~1%
    assert np.all(np.abs(np.median(ratios, axis=1) - 1) < 0.03), np.median(ratios, axis=1)
    assert np.all(np.percentile(np.abs(ratios - 1), 80, axis=1) < 0.15)
    # redshifts are good to their errors apart from the flagged failures
    good = desi.columns["ZWARN"] == 0
    dz = (desi.modalities["desi_z"].values - truth.columns["Z"][idx])[good]
    assert np.all(np.abs(dz) < 5 * (1 / np.sqrt(desi.modalities["desi_z"].ivar[good])))


def test_emission_lines_follow_star_formation(universe):
    desi = _read_all(universe, "desi")
    truth = _read_all(universe, "truth")
    row = {int(i): k for k, i in enumerate(truth.columns["desi_object_id"]) if i >= 0}
    idx = np.array([row[int(i)] for i in desi.object_id])
    z = truth.columns["Z"][idx]
    wave = desi_wavelength()
    spec = desi.modalities["desi_spectrum"]
    measured, expected = [], []
    for k in np.nonzero(z < 0.45)[0]:
        centre = 6564.61 * (1 + z[k])
        core = (np.abs(wave - centre) < 12) & spec.valid[k]
        side = (np.abs(wave - centre) > 40) & (np.abs(wave - centre) < 90) & spec.valid[k]
        measured.append((spec.flux[k, core] - np.median(spec.flux[k, side])).sum() * 0.8)
        sfr = truth.columns["SFR"][idx[k]]
        dl = sed.luminosity_distance_cm(np.array([z[k]]))[0]
        expected.append(sfr * truth.columns["FIBER_FRAC_DISK"][idx[k]] / dl**2)
    assert len(measured) >= 10
    rho = spearmanr(measured, expected).statistic
    assert rho > 0.5, rho


def test_labels_follow_luminosity_and_the_star_forming_sequence(universe):
    truth = _read_all(universe, "truth")
    prov = _read_all(universe, "provabgs")
    z = truth.columns["Z"]
    dl = sed.luminosity_distance_cm(z)
    log_lz = np.log10(truth.columns["LEGACY_FLUX_TRUE"][:, 3] * dl**2)
    assert spearmanr(truth.columns["LOG_MSTAR"], log_lz).statistic > 0.8
    q = truth.columns["QUENCHED"]
    assert 0.2 < q.mean() < 0.8
    assert np.median(truth.columns["sSFR"][q]) < np.median(truth.columns["sSFR"][~q]) - 1.0
    # quenched galaxies are redder (g - r) than star-forming ones
    g, r = truth.columns["LEGACY_FLUX_TRUE"][:, 0], truth.columns["LEGACY_FLUX_TRUE"][:, 1]
    colour = -2.5 * np.log10(g / r)
    low_z = z < 0.3
    assert np.median(colour[q & low_z]) > np.median(colour[~q & low_z]) + 0.15
    # PROVABGS-like labels are a BGS (r < 19.5) subset with physical ranges
    lm = prov.modalities["provabgs_log_mstar"].values
    assert lm.min() > 8 and lm.max() < 12.5
    assert np.all((prov.modalities["provabgs_z_mw"].values > 0.001) & (prov.modalities["provabgs_z_mw"].values < 0.06))
    tage = prov.modalities["provabgs_tage_mw"].values
    assert np.all((tage > 0.1) & (tage < 13.8))


def test_noiseless_spectra_from_truth_explain_the_observed_ones(universe):
    from aion.mock.universe import noiseless_desi_spectra

    desi = _read_all(universe, "desi")
    truth = _read_all(universe, "truth")
    row = {int(i): k for k, i in enumerate(truth.columns["desi_object_id"]) if i >= 0}
    idx = np.array([row[int(i)] for i in desi.object_id])
    model = noiseless_desi_spectra({k: v[idx] for k, v in truth.columns.items()})
    spec = desi.modalities["desi_spectrum"]
    chi2 = ((spec.flux - model) ** 2 * spec.ivar)[spec.valid]
    assert chi2.mean() == pytest.approx(1.0, abs=0.03)


def test_crossmatch_recovers_the_same_galaxies_in_legacy_and_hsc(universe):
    from aion.data.crossmatch import iter_crossmatched

    truth = _read_all(universe, "truth", columns=["hsc_object_id"])
    expected = {int(leg_id): int(h) for leg_id, h in zip(truth.object_id, truth.columns["hsc_object_id"], strict=True)
                if h >= 0}
    got = {}
    for batch in iter_crossmatched(universe, "legacysurvey", "hsc", batch_size=50):
        assert "legacysurvey_image" in batch.modalities and "hsc_image" in batch.modalities
        # same-named columns of both surveys survive side by side
        assert "legacysurvey.healpix" in batch.columns and "hsc.healpix" in batch.columns
        assert np.all(batch.columns["separation_arcsec"] < 0.3)
        got.update({int(a): int(b) for a, b in zip(batch.object_id, batch.columns["hsc.object_id"], strict=True)})
    assert got == expected


# ------------------------------------------------------------------ hidden physics
HIDDEN = ("AGN", "AGN_FRAC", "AGN_AMP", "BAR_FRAC", "BAR_RE", "BAR_Q", "BAR_PA", "RARE", "LINE_BOOST")


@pytest.fixture(scope="session")
def hidden_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A bigger universe with hidden physics and the same one without (same seed)."""
    cfg = dict(n=500, seed=11, image_size=32, hsc_image_size=48, chunk_size=128)
    on, off = tmp_path_factory.mktemp("hidden_on"), tmp_path_factory.mktemp("hidden_off")
    generate(on, MockConfig(**cfg), progress=False)
    generate(off, MockConfig(**cfg, hidden_physics=False), progress=False)
    return on, off


def test_hidden_properties_live_only_in_truth(universe):
    truth = _read_all(universe, "truth")
    assert set(HIDDEN) <= set(truth.columns)
    for survey in ("legacysurvey", "hsc", "desi", "provabgs"):
        cols = set(_read_all(universe, survey).columns) | set(_read_all(universe, survey).modalities)
        assert not {c for c in cols if c.upper() in HIDDEN}, survey


def test_hidden_physics_changes_only_the_galaxies_that_have_it(hidden_pair):
    on, off = hidden_pair
    t_on, t_off = _read_all(on, "truth"), _read_all(off, "truth")
    h = t_on.columns
    agn, barred, rare = h["AGN"].astype(bool), h["BAR_FRAC"] > 0, h["RARE"].astype(bool)
    # plausible rates: a few % AGN, bars in a share of massive star-forming disks, ~1-2% rare
    assert 0.01 < agn.mean() < 0.12 and 0.05 < barred.mean() < 0.35 and 0.002 < rare.mean() < 0.04
    assert np.all(h["AGN_FRAC"][agn] > 0.1) and np.all(h["AGN_FRAC"][~agn] == 0)
    assert np.all(h["LINE_BOOST"][rare] >= 15) and np.all(h["LINE_BOOST"][~rare] == 1)
    assert not (barred & h["QUENCHED"].astype(bool)).any()
    off_cols = t_off.columns
    assert not off_cols["AGN"].any() and not (off_cols["BAR_FRAC"] > 0).any() and not off_cols["RARE"].any()
    # its own random stream: every other draw is unchanged, so plain galaxies are identical bit for bit
    np.testing.assert_array_equal(h["Z"], off_cols["Z"])
    plain = ~(agn | barred | rare)
    img_on = _read_all(on, "legacysurvey").modalities["legacysurvey_image"].flux
    img_off = _read_all(off, "legacysurvey").modalities["legacysurvey_image"].flux
    np.testing.assert_array_equal(img_on[plain], img_off[plain])
    assert np.all(np.abs(img_on[~plain] - img_off[~plain]).max(axis=(1, 2, 3)) > 0)


def test_agn_are_red_in_wise_and_point_like(hidden_pair):
    on, off = hidden_pair
    t_on, t_off = _read_all(on, "truth").columns, _read_all(off, "truth").columns
    agn = t_on["AGN"].astype(bool)
    w1, w2 = t_on["WISE_FLUX_TRUE"][:, 0], t_on["WISE_FLUX_TRUE"][:, 1]
    w1_off, w2_off = t_off["WISE_FLUX_TRUE"][:, 0], t_off["WISE_FLUX_TRUE"][:, 1]
    # hot dust: the W1 - W2 colour of the same galaxy is redder with its nucleus (AB mags)
    colour_on = -2.5 * np.log10(w1[agn] / w2[agn])
    colour_off = -2.5 * np.log10(w1_off[agn] / w2_off[agn])
    assert np.median(colour_on - colour_off) > 0.2
    # the r-band share of the nucleus is what AGN_FRAC says
    r_on, r_off = t_on["LEGACY_FLUX_TRUE"][agn, 1], t_off["LEGACY_FLUX_TRUE"][agn, 1]
    np.testing.assert_allclose(1 - r_off / r_on, t_on["AGN_FRAC"][agn], rtol=1e-6)
    # a point source concentrates the light: the peak pixel of the noiseless image rises more than the total
    img_on, img_off = noiseless_images(t_on, "legacysurvey", 32)[agn], noiseless_images(t_off, "legacysurvey", 32)[agn]
    peak_gain = img_on.max(axis=(2, 3)) / img_off.max(axis=(2, 3))
    total_gain = img_on.sum(axis=(2, 3)) / img_off.sum(axis=(2, 3))
    assert np.all(peak_gain[:, 1] > total_gain[:, 1])


def test_rare_population_has_extreme_lines_in_its_spectra(hidden_pair):
    from aion.mock.universe import noiseless_desi_spectra

    on, _ = hidden_pair
    truth = _read_all(on, "truth").columns
    rare = np.flatnonzero(truth["RARE"].astype(bool))
    assert rare.size >= 3
    sub = {k: v[rare] for k, v in truth.items()}
    plain = dict(sub, LINE_FLUX=truth["LINE_FLUX"][rare] / sub["LINE_BOOST"][:, None])
    wave = desi_wavelength()
    boosted, normal = noiseless_desi_spectra(sub), noiseless_desi_spectra(plain)
    ha = 6564.61 * (1 + sub["Z"])
    inside = (ha > wave[0] + 20) & (ha < wave[-1] - 20)
    assert inside.any()
    for i in np.flatnonzero(inside):
        win = np.abs(wave - ha[i]) < 10
        assert (boosted[i, win] - normal[i, win]).sum() > 5 * (normal[i, win].sum() - np.median(normal[i]) * win.sum())

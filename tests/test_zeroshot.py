"""Zero-shot measurements (``aion.evaluation.zeroshot``, ``aion zeroshot``).

Metrics, features and baselines are checked against hand-computed values and synthetic data with
a known answer; the end-to-end run uses two tiny mock universes and a tiny *untrained* FourM
(scalar tokenizers for the photometry and ``desi_z``, a tiny spectrum tokenizer, one tiny image
tokenizer serving both cutouts), so only structure, ranges and reproducibility are checked there.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_models import export_tiny_model

from aion.cli import main
from aion.data.batches import ScalarBatch
from aion.evaluation.zeroshot import (
    HSC_BANDS,
    LEGACY_BANDS,
    TRIVIAL,
    GBMBaseline,
    NeighbourSpectra,
    ZeroShotConfig,
    evaluate_zeroshot,
    photometry_features,
    pit_histogram,
    redshift_metrics,
    spectrum_scores,
)
from aion.inference.io import iter_objects
from aion.model import ModalitySpec
from aion.tokenizers.binning import QuantileBinning
from aion.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from aion.tokenizers.scalar import ScalarTokenizer
from aion.tokenizers.spectrum import SpectrumTokenizer, SpectrumTokenizerConfig

torch.set_num_threads(1)

N_FEAT = len(LEGACY_BANDS) + len(HSC_BANDS) + (len(LEGACY_BANDS) - 1) + (len(HSC_BANDS) - 1)


# ---------------------------------------------------------------------------- metrics
def test_redshift_metrics_hand_values():
    zt = np.array([0.0, 1.0, 0.5, 2.0, 1.0])
    zp = np.array([0.1, 1.2, 0.5, 1.4, 1.02])
    # dz = [0.1, 0.1, 0, -0.2, 0.01]: median 0.01, |dz - med| = [.09, .09, .01, .21, 0] -> median 0.09
    lo68, hi68 = np.array([0.0, 1.1, 0.4, 1.9, 0.9]), np.array([0.2, 1.3, 0.5, 2.1, 1.0])  # 4/5 inside (ends count)
    lo95, hi95 = zt - 1, zt + 1
    m = redshift_metrics(zp, zt, lo68, hi68, lo95, hi95)
    assert m["n"] == 5
    assert m["nmad"] == pytest.approx(1.4826 * 0.09)
    assert m["bias"] == pytest.approx(0.01)
    assert m["outlier_fraction"] == pytest.approx(0.2)
    assert m["mean_dz"] == pytest.approx(0.002)
    assert m["rms_dz"] == pytest.approx(math.sqrt((0.01 + 0.01 + 0.04 + 0.0001) / 5))
    assert m["coverage_68"] == pytest.approx(0.8)
    assert m["coverage_95"] == pytest.approx(1.0)
    plain = redshift_metrics(zp, zt)
    assert "coverage_68" not in plain and "coverage_95" not in plain
    assert plain["nmad"] == m["nmad"]
    # a constant offset in dz moves the bias but not the NMAD; exactly 0.15 is not an outlier
    zt2 = np.array([0.0, 0.0, 0.0])
    m2 = redshift_metrics(zt2 + np.array([0.15, 0.15, 0.5]), zt2)
    assert m2["nmad"] == pytest.approx(0.0) and m2["bias"] == pytest.approx(0.15)
    assert m2["outlier_fraction"] == pytest.approx(1 / 3)


def test_pit_histogram_counts_and_deviation():
    flat = (np.arange(1000) + 0.5) / 1000
    h = pit_histogram(flat)
    assert h["counts"] == [100] * 10 and h["max_deviation_sigma"] == pytest.approx(0.0)
    peaked = np.concatenate([np.full(100, 0.55), [np.nan, np.inf]])  # non-finite values are dropped
    h = pit_histogram(peaked)
    assert h["counts"] == [0] * 5 + [100] + [0] * 4
    assert h["max_deviation_sigma"] == pytest.approx(90 / math.sqrt(10))
    h = pit_histogram(np.array([0.0, 0.49, 0.5, 1.0]), bins=2)  # 1.0 falls in the last bin
    assert h["counts"] == [2, 2] and h["max_deviation_sigma"] == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    assert pit_histogram(rng.uniform(size=2000))["max_deviation_sigma"] < 4
    assert pit_histogram(rng.beta(8, 8, size=2000))["max_deviation_sigma"] > 10  # overdispersed posteriors
    assert math.isnan(pit_histogram(np.array([np.nan]))["max_deviation_sigma"])


def test_spectrum_scores_hand_values():
    model = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    observed = np.ones((3, 3))
    ivar = np.array([[1.0, 4.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    valid = np.array([[True, True, False], [True, True, True], [False, False, False]])
    truth = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 1.0, 5.0]])
    s = spectrum_scores(model, observed, ivar, valid, truth)
    # row 0: (0 + 4 * 1) / 2 valid pixels; row 1: pixel 2 has ivar 0 -> (1 + 1) / 2; row 2: nothing valid
    np.testing.assert_allclose(s["chi2"], [2.0, 1.0, 0.0])
    # r2 = 1 - sum (m - t)^2 / sum (t - mean t)^2: row 1 = 1 - 14 / 2, row 2 = 1 - (25 + 16) / 14
    np.testing.assert_allclose(s["r2"], [1.0, -6.0, 1 - 41 / 14])
    assert "r2" not in spectrum_scores(model, observed, ivar, valid, None)
    t = np.random.default_rng(1).normal(size=(4, 50))
    np.testing.assert_allclose(spectrum_scores(t, t, np.ones_like(t), np.ones_like(t, bool), t)["r2"], 1.0)


# ---------------------------------------------------------------------------- features
def test_photometry_features_layout():
    s = ScalarBatch
    objects = {
        "legacysurvey_flux_g": s(name="legacysurvey_flux_g", values=[1000.0, 0.0, np.nan, 10.0]),
        "legacysurvey_flux_r": s(name="legacysurvey_flux_r", values=[100.0, -1.0, 5.0, 10.0],
                                 ivar=[1.0, 1.0, 1.0, 0.0]),
        "hsc_mag_g": s(name="hsc_mag_g", values=[21.0, 22.0, np.nan, 23.0]),
        "hsc_mag_r": s(name="hsc_mag_r", values=[20.5, 21.0, 21.5, 22.0]),
    }
    f = photometry_features(objects)
    assert f.shape == (4, N_FEAT) == (4, 24)
    nl = len(LEGACY_BANDS)
    g, r, hg, hr = f[:, 0], f[:, 1], f[:, nl], f[:, nl + 1]
    # bright fluxes: the asinh magnitude is the Pogson one
    assert g[0] == pytest.approx(22.5 - 2.5 * np.log10(1000.0), abs=1e-4)
    assert r[0] == pytest.approx(22.5 - 2.5 * np.log10(100.0), abs=1e-4)
    # zero and negative fluxes stay finite (zero flux: 22.5 - 2.5 log10(softening 0.1) = 25)
    assert g[1] == pytest.approx(25.0) and np.isfinite(r[1]) and r[1] > g[1]
    # missing (NaN, zero ivar) -> NaN, and so are the colours that use it
    assert np.isnan(g[2]) and np.isnan(r[3]) and np.isnan(hg[2])
    np.testing.assert_array_equal(hg[[0, 1, 3]], [21.0, 22.0, 23.0])
    np.testing.assert_array_equal(hr, [20.5, 21.0, 21.5, 22.0])
    # bands the objects lack entirely are NaN columns
    for i in [*range(2, nl), *range(nl + 2, nl + len(HSC_BANDS))]:
        assert np.isnan(f[:, i]).all()
    # adjacent colours: Legacy g-r, r-i, ..., then HSC g-r, ...
    leg_col, hsc_col = f[:, nl + len(HSC_BANDS)], f[:, 2 * nl + len(HSC_BANDS) - 1]
    np.testing.assert_allclose(leg_col, g - r)
    np.testing.assert_allclose(hsc_col, hg - hr)
    assert leg_col[0] == pytest.approx(-2.5, abs=1e-4)
    assert np.isnan(f[:, nl + len(HSC_BANDS) + 1]).all()  # r - i: i absent


# ---------------------------------------------------------------------------- baselines
def _synthetic_z(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 4))
    z = 1.0 + 0.6 * x[:, 0] + 0.3 * np.sin(3 * x[:, 1]) + 0.1 * x[:, 2]
    z = z + rng.normal(0, 0.04, n) * (1 + z)
    x[rng.random(x.shape) < 0.05] = np.nan  # missing bands are left to the trees
    return x, z


def test_gbm_baseline_is_accurate_and_calibrated():
    x, z = _synthetic_z(3000, 0)
    xt, zt = _synthetic_z(2000, 1)
    grid = [{"learning_rate": 0.1, "max_leaf_nodes": 15, "min_samples_leaf": 20},
            {"learning_rate": 0.1, "max_leaf_nodes": 3, "min_samples_leaf": 400}]
    gbm = GBMBaseline.fit(x, z, grid, seed=0)
    assert len(gbm.validation) == 2 and gbm.params["max_leaf_nodes"] == 15  # the flexible model wins on NMAD
    assert gbm.validation[0]["val_nmad"] < gbm.validation[1]["val_nmad"]
    assert set(gbm.describe()["conformal_margin"]) == {"0.68", "0.95"}
    q = gbm.predict(xt)
    assert sorted(q) == [0.025, 0.16, 0.5, 0.84, 0.975]
    assert all(v.shape == zt.shape and np.isfinite(v).all() for v in q.values())
    # ordered quantiles (the 68% and 95% quantile models are fitted separately and may cross)
    for lo, hi in ((0.025, 0.16), (0.16, 0.5), (0.5, 0.84), (0.84, 0.975)):
        assert (q[lo] <= q[hi]).all(), (lo, hi)
    m = redshift_metrics(q[0.5], zt, q[0.16], q[0.84], q[0.025], q[0.975])
    assert abs(m["coverage_68"] - 0.68) < 0.05 and abs(m["coverage_95"] - 0.95) < 0.05
    assert m["nmad"] < 0.06  # noise 0.04 (1 + z) in z, i.e. NMAD ~0.04 in dz
    assert m["nmad"] < 0.5 * redshift_metrics(np.full_like(zt, np.median(z)), zt)["nmad"]
    assert abs(m["bias"]) < 0.01


def _knn_setup(n: int = 30, length: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = np.full((n, N_FEAT), np.nan)
    nl, nh = len(LEGACY_BANDS), len(HSC_BANDS)
    feats[:, 1] = rng.uniform(18, 22, n)  # r magnitude
    feats[:, nl + nh:nl + nh + 4] = rng.normal(0, 0.5, (n, 4))  # g-r, r-i, i-z, z-W1
    r_flux = 10 ** (-0.4 * (feats[:, 1] - 22.5))
    flux = rng.normal(1, 0.3, (n, length)) * r_flux[:, None]
    valid = np.ones((n, length), dtype=bool)
    return feats, r_flux, flux, valid


def test_neighbour_spectra():
    feats, r_flux, flux, valid = _knn_setup()
    valid[3, 10:13] = False  # a gap in object 3
    valid[4, :2] = False  # and at the start of object 4
    nn = NeighbourSpectra(feats, r_flux, flux, valid)
    own = nn.predict(feats, r_flux, k=1)
    good = np.ones(len(flux), dtype=bool)
    good[[3, 4]] = False
    np.testing.assert_array_equal(own[good], flux[good])  # k=1 on itself: its own spectrum, scale 1
    np.testing.assert_allclose(nn.predict(feats, 2 * r_flux, k=1)[good], 2 * flux[good], rtol=1e-12)
    # invalid pixels: interpolated from the valid ones (flat extrapolation at the ends)
    np.testing.assert_allclose(own[3, 10:13], np.interp([10, 11, 12], [9, 13], flux[3, [9, 13]]))
    np.testing.assert_array_equal(own[3, :10], flux[3, :10])
    np.testing.assert_allclose(own[4, :2], flux[4, 2])
    assert np.isfinite(own).all()
    # k = everything: per-pixel mean of the valid, flux-scaled spectra
    q = np.array([0])
    every = nn.predict(feats[q], r_flux[q], k=len(flux))[0]
    scaled = flux * (r_flux[0] / r_flux)[:, None]
    want = np.where(valid, scaled, 0).sum(axis=0) / valid.sum(axis=0)
    np.testing.assert_allclose(every, want, rtol=1e-10)
    # the query's missing colours are filled with the training median (finite answers)
    partial = feats[:1].copy()
    partial[0, len(LEGACY_BANDS) + len(HSC_BANDS) + 3] = np.nan
    assert np.isfinite(nn.predict(partial, r_flux[:1], k=3)).all()


def test_neighbour_spectra_picks_the_nearest_in_photometry():
    feats, r_flux, flux, valid = _knn_setup(seed=3)
    nn = NeighbourSpectra(feats, r_flux, flux, valid)
    query = feats[[7]].copy()
    query[0, len(LEGACY_BANDS) + len(HSC_BANDS)] += 1e-3  # nudge g-r: object 7 is still the nearest
    np.testing.assert_array_equal(nn.predict(query, r_flux[[7]], k=1)[0], flux[7])
    x = nn.x
    d = ((x - x[7]) ** 2).sum(axis=1)
    second = np.argsort(d)[1]
    two = nn.predict(feats[[7]], r_flux[[7]], k=2)[0]
    np.testing.assert_allclose(two, (flux[7] + flux[second] * r_flux[7] / r_flux[second]) / 2, rtol=1e-12)


# ---------------------------------------------------------------------------- end to end
SURVEYS = ["legacysurvey", "hsc", "desi"]
N_MOCK = 150  # ~14% in DESI: ~20 labelled objects in each universe


def _labelled(root) -> tuple[np.ndarray, np.ndarray]:
    ids, z = [], []
    for b_ids, objects in iter_objects(root, SURVEYS, batch_size=256, modalities=["desi_z"]):
        zb = objects.get("desi_z")
        if zb is not None:
            ids.append(np.asarray(b_ids)[zb.valid])
            z.append(zb.values[zb.valid])
    return np.concatenate(ids), np.concatenate(z)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    from aion.mock.universe import MockConfig, generate

    tmp = tmp_path_factory.mktemp("zeroshot")
    train, held = tmp / "train", tmp / "held"
    generate(train, MockConfig(n=N_MOCK, seed=1, image_size=16, hsc_image_size=16), progress=False)
    generate(held, MockConfig(n=N_MOCK, seed=2, image_size=16, hsc_image_size=16), progress=False)
    scalars = ["desi_z", *(f"legacysurvey_flux_{b}" for b in LEGACY_BANDS), *(f"hsc_mag_{b}" for b in HSC_BANDS)]
    values: dict[str, list[np.ndarray]] = {n: [] for n in scalars}
    for _, objects in iter_objects(train, SURVEYS, batch_size=256, modalities=scalars):
        for name, batch in objects.items():
            values[name].append(batch.values[batch.valid])
    toks = {}
    for name in scalars:
        batch = ScalarBatch(name=name, values=np.concatenate(values[name]))
        toks[name] = ScalarTokenizer(name, QuantileBinning(16), fine_bins=4 if name == "desi_z" else 0).fit(batch)
    torch.manual_seed(0)
    toks["desi_spectrum"] = SpectrumTokenizer(SpectrumTokenizerConfig(  # 3500-11676 A: covers the DESI grid
        wave_min=3500.0, wave_step=16.0, n_pix=512, patch=4, widths=(8, 16), depths=(1, 1), attn_blocks=1,
        attn_heads=2, mlp_ratio=2, code_dim=6, modalities=("desi_spectrum",)))
    image = ImageTokenizer(ImageTokenizerConfig(
        bands=("des-g", "des-r", "des-i", "des-z", "hsc-g", "hsc-r", "hsc-i", "hsc-z", "hsc-y"), crop_size=8,
        downsample=2, channels=(4, 8), fsq_levels=(3, 3), norm="none"))
    assert set(image.modalities) == {"legacysurvey_image", "hsc_image"}
    specs = {n: ModalitySpec(num_tokens=t.num_tokens, vocab_size=t.vocab_size) for n, t in toks.items()}
    specs.update({n: ModalitySpec(num_tokens=image.num_tokens, vocab_size=image.vocab_size) for n in image.modalities})
    model_dir = export_tiny_model(specs, tmp, seed=None)
    tok_dir = tmp / "tokenizers"
    for name, tok in toks.items():
        tok.save_pretrained(tok_dir / name)
    image.save_pretrained(tok_dir / "image")
    n_train, n_held = len(_labelled(train)[1]), len(_labelled(held)[1])
    assert n_train >= 10 and n_held >= 10, (n_train, n_held)
    return {"tmp": tmp, "train": train, "held": held, "model": model_dir, "tokenizers": tok_dir,
            "n_train": n_train, "n_held": n_held}


def _cfg(**kw) -> ZeroShotConfig:
    base = {"gen_steps": 2, "gen_samples": 2, "batch_size": 64, "knn": (1, 3),
            "gbm_grid": ({"learning_rate": 0.1, "max_leaf_nodes": 4, "min_samples_leaf": 2},)}
    return ZeroShotConfig(**{**base, **kw})


def _npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def e2e_run(e2e):
    out = e2e["tmp"] / "out_a"
    metrics = evaluate_zeroshot(e2e["model"], e2e["tokenizers"], e2e["held"], e2e["train"], out, _cfg(),
                                progress=False)
    return out, metrics


def test_zeroshot_writes_metrics_report_predictions_and_plots(e2e, e2e_run):
    out, metrics = e2e_run
    files = {p.name for p in out.iterdir()}
    assert {"metrics.json", "report.md", "predictions.npz", "redshift_pred_vs_true.png", "pit.png",
            "pdf_examples.png", "spectra_examples.png"} <= files
    assert not [f for f in files if f.startswith(".")]  # no temp files left behind
    for png in ("redshift_pred_vs_true.png", "pit.png", "pdf_examples.png", "spectra_examples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["n_heldout_with_redshift"] == metrics["n_heldout_with_redshift"] == e2e["n_held"]
    assert on_disk["n_train_labelled"] == e2e["n_train"] and on_disk["n_train_spectra"] == e2e["n_train"]

    red = on_disk["redshift"]
    assert list(red) == ["foundation model, photometry", "foundation model, photometry+image",
                         "gradient-boosted trees, photometry (all labels)", TRIVIAL]
    # the trivial predictor: one value for everyone (the training median), its quantiles as intervals
    pred = np.load(out / "predictions.npz")
    assert np.unique(pred["prior_median"]).size == 1 and np.all(pred["prior_p16"] <= pred["prior_p84"])
    assert abs(red[TRIVIAL]["bias"] - float(np.median((pred["prior_median"] - pred["z_true"])
                                                      / (1 + pred["z_true"])))) < 1e-12
    for name, r in red.items():
        assert r["n"] == e2e["n_held"]
        for key in ("coverage_68", "coverage_95", "outlier_fraction"):
            assert 0.0 <= r[key] <= 1.0, (name, key)
        assert r["coverage_95"] >= r["coverage_68"]  # nested intervals
        assert r["nmad"] >= 0 and r["rms_dz"] >= abs(r["mean_dz"])
        if name.startswith("foundation"):
            assert sum(r["pit"]["counts"]) == e2e["n_held"] and r["pit"]["max_deviation_sigma"] >= 0
            assert r["mean_tokens_used"] > 0 and r["fraction_subsampled"] == 0.0
    # images add tokens (16 per cutout) to the same objects' photometry
    assert red["foundation model, photometry+image"]["mean_tokens_used"] >= \
        red["foundation model, photometry"]["mean_tokens_used"] + 16

    spec = on_disk["spectrum_generation"]
    assert spec["n"] == e2e["n_held"]  # every mock DESI object has a spectrum
    assert set(spec) == {"n", "foundation model, 1 sample", "foundation model, median of 2 samples",
                         "1-nearest neighbour in photometry", "3-nearest neighbours (mean) in photometry",
                         "noiseless truth (floor)"}
    for name, s in spec.items():
        if name != "n":
            assert s["chi2_median"] >= 0
    # the noiseless truth matches the observed noise: reduced chi^2 ~ 1 (the model floor)
    assert 0.7 < spec["noiseless truth (floor)"]["chi2_median"] < 1.5
    assert "r2_median" not in spec["noiseless truth (floor)"]
    assert spec["1-nearest neighbour in photometry"]["r2_median"] <= 1.0

    a = _npz(out / "predictions.npz")
    ids, z = _labelled(e2e["held"])
    np.testing.assert_array_equal(a["object_id"], ids)
    np.testing.assert_array_equal(a["z_true"], z)
    n = e2e["n_held"]
    for tag in ("fm_photometry", "fm_photometry_image", "gbm"):
        for key in ("median", "p16", "p84", "p2_5", "p97_5"):
            assert a[f"{tag}_{key}"].shape == (n,) and np.isfinite(a[f"{tag}_{key}"]).all(), (tag, key)
        assert (a[f"{tag}_p2_5"] <= a[f"{tag}_p16"]).all() and (a[f"{tag}_p16"] <= a[f"{tag}_median"]).all()
        assert (a[f"{tag}_median"] <= a[f"{tag}_p84"]).all() and (a[f"{tag}_p84"] <= a[f"{tag}_p97_5"]).all()
    for tag in ("fm_photometry", "fm_photometry_image"):
        pit = a[f"{tag}_pit"]
        assert pit.shape == (n,) and ((pit >= 0) & (pit <= 1)).all()
    for key in ("gen_chi2", "genmedian_chi2", "nn1_chi2", "nn3_chi2", "truth_chi2", "gen_r2", "nn1_r2"):
        assert a[key].shape == (n,) and np.isfinite(a[key]).all(), key
    np.testing.assert_array_equal(a["spec_object_id"], ids)
    # the summary is the median of the per-object values
    assert spec["1-nearest neighbour in photometry"]["chi2_median"] == pytest.approx(np.median(a["nn1_chi2"]))
    gbm = redshift_metrics(a["gbm_median"], z, a["gbm_p16"], a["gbm_p84"], a["gbm_p2_5"], a["gbm_p97_5"])
    assert red["gradient-boosted trees, photometry (all labels)"]["nmad"] == pytest.approx(gbm["nmad"])

    report = (out / "report.md").read_text()
    assert f"## Redshift ({n} held-out objects" in report and "![PIT](pit.png)" in report
    assert report.count("| foundation model") == 4 and "| 3-nearest neighbours (mean) in photometry |" in report


def test_zeroshot_is_reproducible_and_seeded(e2e, e2e_run):
    out_a, _ = e2e_run
    out_b, out_c = e2e["tmp"] / "out_b", e2e["tmp"] / "out_c"
    evaluate_zeroshot(e2e["model"], e2e["tokenizers"], e2e["held"], e2e["train"], out_b, _cfg(plots=False),
                      progress=False)
    evaluate_zeroshot(e2e["model"], e2e["tokenizers"], e2e["held"], e2e["train"], out_c, _cfg(seed=1, plots=False),
                      progress=False)
    a, b, c = (_npz(o / "predictions.npz") for o in (out_a, out_b, out_c))
    assert list(a) == list(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not (out_b / "pit.png").exists() and "## Plots" not in (out_b / "report.md").read_text()
    # the seed drives the spectrum sampling; the redshift posteriors do not sample
    assert not np.array_equal(a["gen_chi2"], c["gen_chi2"])
    np.testing.assert_array_equal(a["fm_photometry_median"], c["fm_photometry_median"])


def test_zeroshot_max_objects_and_errors(e2e):
    out = e2e["tmp"] / "out_max"
    m = evaluate_zeroshot(e2e["model"], e2e["tokenizers"], e2e["held"], e2e["train"], out,
                          _cfg(max_objects=5, batch_size=16, plots=False), progress=False)
    assert m["n_heldout_with_redshift"] == 5 and m["spectrum_generation"]["n"] == 5
    np.testing.assert_array_equal(_npz(out / "predictions.npz")["object_id"], _labelled(e2e["held"])[0][:5])
    with pytest.raises(ValueError, match="spectrum_inputs"):
        evaluate_zeroshot(e2e["model"], e2e["tokenizers"], e2e["held"], e2e["train"], out,
                          _cfg(spectrum_inputs="images"), progress=False)
    with pytest.raises(ValueError, match="provabgs_z"):
        evaluate_zeroshot(e2e["model"], e2e["tokenizers"], e2e["held"], e2e["train"], out,
                          _cfg(redshift_target="provabgs_z"), progress=False)


def test_zeroshot_cli(e2e, capsys):
    out = e2e["tmp"] / "out_cli"
    args = ["zeroshot", "--model", str(e2e["model"]), "--tokenizers", str(e2e["tokenizers"]), "--data",
            str(e2e["held"]), "--train-data", str(e2e["train"]), "--out", str(out), "--gen-steps", "2",
            "--gen-samples", "2", "--max-objects", "8", "--coarse", "--no-plots", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "# Zero-shot prediction on held-out objects" in printed and str(out.resolve()) in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_heldout_with_redshift"] == 8
    assert m["config"]["refined"] is False and m["config"]["gen_samples"] == 2 and m["config"]["max_objects"] == 8
    assert not list(out.glob("*.png"))
    with pytest.raises(SystemExit, match="--gen-steps must be >= 1"):
        main([*args, "--gen-steps", "0"])


def test_tempered_prediction_keeps_the_mode_and_scales_the_width(e2e):
    from aion.inference import AionModel

    am = AionModel.from_pretrained(e2e["model"], e2e["tokenizers"])
    _, objects = next(iter(iter_objects(e2e["held"], SURVEYS, batch_size=64,
                                        modalities=[f"legacysurvey_flux_{b}" for b in LEGACY_BANDS])))
    pred = am.predict_scalar(*am.tokenize(objects), "desi_z")
    assert pred.refined is not None and pred.temperature == 1.0
    same = pred.tempered(1.0)
    for name in ("mean", "median", "p16", "p84", "p2_5", "p97_5"):
        np.testing.assert_allclose(getattr(same.estimates, name), getattr(pred.estimates, name), rtol=1e-9)
        np.testing.assert_allclose(getattr(same.refined, name), getattr(pred.refined, name), rtol=1e-9)
    wide, narrow = pred.tempered(3.0), pred.tempered(0.3)
    assert wide.temperature == 3.0 and pred.tempered(2.0).tempered(1.5).temperature == pytest.approx(3.0)
    np.testing.assert_allclose(pred.tempered(2.0).tempered(1.5).probs, wide.probs, rtol=1e-9)
    def entropy(p):
        return -(p.probs * np.log(np.maximum(p.probs, 1e-300))).sum(axis=1)

    # T > 1 always raises the entropy, T < 1 lowers it (interval widths need not follow for a multimodal PDF)
    assert (entropy(wide) > entropy(pred)).all() and (entropy(narrow) < entropy(pred)).all()
    for p in (wide, narrow):
        np.testing.assert_array_equal(p.estimates.mode, pred.estimates.mode)
        np.testing.assert_array_equal(p.refined.mode, pred.refined.mode)
        np.testing.assert_array_equal(p.probs.argmax(axis=1), pred.probs.argmax(axis=1))
    with pytest.raises(ValueError, match="temperature"):
        pred.tempered(0.0)


def test_zeroshot_calibration_rows(e2e, e2e_run):
    _, plain = e2e_run
    out = e2e["tmp"] / "out_cal"
    m = evaluate_zeroshot(e2e["model"], e2e["tokenizers"], e2e["held"], e2e["train"], out,
                          _cfg(plots=False, calibration_data=str(e2e["train"])), progress=False)
    fits = m["calibration"]["fits"]
    assert set(fits) == {"photometry", "photometry+image"}
    for set_name, fit in fits.items():
        assert fit["n"] == e2e["n_train"] and fit["temperature"] > 0
        row = m["redshift"][f"foundation model, {set_name}, temperature-calibrated"]
        assert row["temperature"] == fit["temperature"] and row["n"] == e2e["n_held"]
        assert 0 <= row["coverage_68"] <= 1 and sum(row["pit"]["counts"]) == e2e["n_held"]
        # the uncalibrated rows are what they were without calibration
        assert m["redshift"][f"foundation model, {set_name}"] == plain["redshift"][f"foundation model, {set_name}"]
    assert "Temperature-calibrated rows" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="calibration_data"):
        evaluate_zeroshot(e2e["model"], e2e["tokenizers"], e2e["held"], e2e["train"], out,
                          _cfg(plots=False, calibration_data=str(e2e["tmp"] / "missing")), progress=False)
    with pytest.raises(ValueError, match="calibration_objective"):
        evaluate_zeroshot(e2e["model"], e2e["tokenizers"], e2e["held"], e2e["train"], out,
                          _cfg(plots=False, calibration_data=str(e2e["train"]), calibration_objective="brier"),
                          progress=False)

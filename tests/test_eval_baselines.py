"""Evaluation metrics, splits and supervised baselines (``aion.evaluation.metrics/splits/baselines``).

Metrics are checked against hand-computed values; splits for determinism, nesting, disjointness and
stability under added objects; baselines on tiny synthetic labelled sets whose label is a known
function of the inputs (photometry colour and magnitude, image size, spectral line position), with
R^2 thresholds that a method ignoring the relevant input would fail. One tiny mock universe checks
that everything runs on the real loader's output.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from aion.data.batches import ImageBatch, ScalarBatch, SpectrumBatch
from aion.evaluation.baselines import (
    ConstantBaseline,
    GBMBaseline,
    Method,
    NetConfig,
    PhotometryMLP,
    SupervisedNet,
    asinh_mag,
    photometry_features,
)
from aion.evaluation.labelled import INPUT_SETS, LEGACY_PHOTOMETRY, LabelledSet
from aion.evaluation.metrics import regression_metrics
from aion.evaluation.splits import make_splits, n_validation, unit_hash

torch.set_num_threads(1)

T = "provabgs_log_mstar"
Z = "provabgs_z"
PHOT = INPUT_SETS["photometry"]
IMG_SET = INPUT_SETS["photometry+image"]
SPEC_SET = (*LEGACY_PHOTOMETRY, "desi_spectrum")
# Small CNN budget for tests: one configuration, few epochs (the defaults are sized for thousands of objects).
FAST = {"configs": (NetConfig(lr=3e-3, weight_decay=1e-4, width=32, channels=8, dropout=0.0),),
        "max_epochs": 40, "patience": 10, "min_steps": 0}


# ---------------------------------------------------------------------------- synthetic data
def synthetic(n: int, seed: int, *, image: bool = False, spectrum: bool = False, size_weight: float = 0.0,
              id_offset: int = 0) -> LabelledSet:
    """Galaxies with r magnitude, one colour and a size; T = 2 colour + 0.3 (r - 19) + size_weight (size - 2)
    (+ 0.05 noise); Z = a redshift that only the spectrum's emission lines reveal."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(17.0, 21.0, n)
    colour = rng.uniform(0.0, 1.5, n)
    size = rng.uniform(1.0, 3.0, n)
    z = rng.uniform(0.02, 0.4, n)
    slopes = (1.0, 0.0, -0.4, -0.6, -0.9, -1.0, -1.2, -1.3)
    flux_r = 10 ** (-0.4 * (r - 22.5))
    inputs: dict = {}
    for name, slope in zip(LEGACY_PHOTOMETRY, slopes, strict=True):
        flux = 10 ** (-0.4 * (r + slope * colour - 22.5))
        err = 0.02 * flux + 0.05
        values = flux + rng.normal(0, err)
        if name.endswith(("w3", "w4")):
            values[rng.random(n) < 0.1] = np.nan  # some objects lack the faint WISE bands
        inputs[name] = ScalarBatch(name=name, values=values, ivar=1 / err**2)
    if image:
        h = 16
        yy, xx = np.mgrid[:h, :h] - (h - 1) / 2
        s2 = size[:, None, None] ** 2
        profile = np.exp(-(xx**2 + yy**2)[None] / (2 * s2)) / (2 * np.pi * s2)
        flux = np.stack([profile * (flux_r * 10 ** (-0.4 * s * colour))[:, None, None] for s in slopes[:4]], axis=1)
        flux = flux + rng.normal(0, 0.02, flux.shape)
        valid = np.ones(flux.shape, dtype=bool)
        valid[:, :, 0, :3] = False  # a masked corner
        valid[::25] = False  # a few objects without a usable cutout
        inputs["legacysurvey_image"] = ImageBatch(
            flux=flux, ivar=np.full(flux.shape, 1 / 0.02**2), valid=valid, bands=("des-g", "des-r", "des-i", "des-z"),
            pixel_scale=0.262, psf_fwhm=np.ones((n, 4)))
    if spectrum:
        wave = np.linspace(3600.0, 9800.0, 600)
        cont = (flux_r / 10)[:, None] * (1 + 0.2 * colour[:, None] * (wave - 6000) / 4000)
        lines = sum(a * np.exp(-0.5 * ((wave[None] - w0 * (1 + z[:, None])) / 8.0) ** 2)
                    for w0, a in ((3727.0, 3.0), (5007.0, 4.0), (6563.0, 5.0)))
        flux = cont + lines * (flux_r / 10)[:, None] + rng.normal(0, 0.05, (n, wave.size))
        valid = np.ones(flux.shape, dtype=bool)
        valid[:, 300:310] = False  # a masked stretch
        valid[::25] = False  # a few objects without a spectrum
        inputs["desi_spectrum"] = SpectrumBatch(flux=flux, ivar=np.full(flux.shape, 400.0), wavelength=wave,
                                                valid=valid)
    label = 2 * colour + 0.3 * (r - 19) + size_weight * (size - 2) + rng.normal(0, 0.05, n)
    return LabelledSet(object_id=np.arange(id_offset, id_offset + n, dtype=np.int64), inputs=inputs,
                       labels={T: label, Z: z})


def r2(method: Method, train: LabelledSet, val: LabelledSet, test: LabelledSet, target: str,
       input_set: tuple[str, ...], seed: int = 0) -> float:
    method.fit(train, val, target, input_set, seed)
    return float(regression_metrics(method.predict(test), test.labels[target])["r2"])


def thirds(data: LabelledSet, n_train: int, n_val: int) -> tuple[LabelledSet, LabelledSet, LabelledSet]:
    n = len(data)
    return (data.select(np.arange(n_train)), data.select(np.arange(n_train, n_train + n_val)),
            data.select(np.arange(n_train + n_val, n)))


# ---------------------------------------------------------------------------- metrics
def test_regression_metrics_hand_computed():
    out = regression_metrics(np.array([1.5, 2.0, 2.0, 4.5, 7.0]), np.array([1.0, 2.0, 3.0, 4.0, np.nan]))
    # residuals 0.5, 0, -1, 0.5: median 0.25, |r - 0.25| median 0.25, SS_res 1.5, SS_tot 5
    assert out["n"] == 4 and out["n_skipped"] == 1
    assert out["bias"] == pytest.approx(0.25)
    assert out["scatter"] == pytest.approx(1.4826 * 0.25)
    assert out["rmse"] == pytest.approx(math.sqrt(1.5 / 4))
    assert out["r2"] == pytest.approx(0.7)
    assert "nmad" not in out


def test_regression_metrics_redshift():
    out = regression_metrics([0.1, 1.2, 0.5, 2.0], [0.0, 1.0, 0.5, 3.0], redshift=True)
    # dz = 0.1, 0.1, 0, -0.25: median 0.05, |dz - 0.05| median 0.05, one outlier of four
    assert out["bias_dz"] == pytest.approx(0.05)
    assert out["nmad"] == pytest.approx(1.4826 * 0.05)
    assert out["outlier_fraction"] == pytest.approx(0.25)
    assert out["bias"] == pytest.approx(0.05)  # residuals 0.1, 0.2, 0, -1: median 0.05


def test_regression_metrics_edge_cases():
    empty = regression_metrics([1.0, 2.0], [np.nan, np.nan], redshift=True)
    assert empty["n"] == 0 and empty["n_skipped"] == 2 and math.isnan(empty["r2"]) and math.isnan(empty["nmad"])
    assert math.isnan(regression_metrics([1.0, 2.0], [3.0, 3.0])["r2"])  # constant truth
    with pytest.raises(ValueError, match="NaN/inf where the truth is known"):
        regression_metrics([np.nan, 1.0], [1.0, 2.0])
    assert regression_metrics([np.nan, 1.0], [np.nan, 2.0])["n"] == 1  # unknown truth: the prediction is unused
    with pytest.raises(ValueError, match="rows"):
        regression_metrics([1.0], [1.0, 2.0])


# ---------------------------------------------------------------------------- splits
def _ids(n: int, offset: int = 0) -> np.ndarray:
    return 1000170000000000 + offset + 7 * np.arange(n, dtype=np.int64)


def test_splits_deterministic_nested_disjoint():
    ids = _ids(600)
    has = np.random.default_rng(0).random(600) < 0.8
    a = make_splits(ids, has, sizes=(50, 100, 200, "all"), seeds=(0, 1))
    b = make_splits(ids.copy(), has.copy(), sizes=(50, 100, 200, "all"), seeds=(0, 1))
    assert json.dumps(a.to_dict(include_ids=True)) == json.dumps(b.to_dict(include_ids=True))
    assert np.all(has[a.test]) and np.all(has[a.pool])
    assert not set(a.test) & set(a.pool) and len(a.test) + len(a.pool) == has.sum()
    assert 0.1 < len(a.test) / has.sum() < 0.3
    for seed in (0, 1):
        prev: set = set()
        for size in (50, 100, 200, "all"):
            s = a.subset(size, seed)
            train, val = set(s.train), set(s.val)
            assert not train & val and not (train | val) & set(a.test) and (train | val) <= set(a.pool)
            assert s.n == (len(a.pool) if size == "all" else size)
            assert len(val) == n_validation(s.n, 0.2, 10)
            assert prev <= train | val  # nested
            prev = train | val
    assert set(a.subset(100, 0).indices) != set(a.subset(100, 1).indices)  # seeds differ
    assert n_validation(30, 0.2, 10) == 10 and n_validation(300, 0.2, 10) == 60 and n_validation(12, 0.2, 10) == 6


def test_splits_test_set_fixed_by_object_id():
    ids = _ids(400)
    has = np.arange(400) % 3 != 0
    base = make_splits(ids, has, sizes=(50,), seeds=(0,))
    # more objects (half of them unlabelled) interleaved before and after: old objects keep their test membership
    extra = _ids(300, offset=3)
    ids2 = np.concatenate([extra[:150], ids, extra[150:]])
    has2 = np.concatenate([np.arange(150) % 2 == 0, has, np.arange(150) % 2 == 1])
    grown = make_splits(ids2, has2, sizes=(50,), seeds=(0,))
    old_in_grown = set(ids2[grown.test]) & set(ids)
    assert old_in_grown == set(ids[base.test])
    # the same hash decides for every target: test sets of two targets agree on objects labelled for both
    other = np.arange(400) % 2 == 0
    split_b = make_splits(ids, other, sizes=(50,), seeds=(0,))
    both = has & other
    assert set(np.nonzero(both)[0]) & set(base.test) == set(np.nonzero(both)[0]) & set(split_b.test)
    assert np.array_equal(unit_hash(ids[:3], "test"), unit_hash([int(x) for x in ids[:3]], "test"))


def test_splits_sizes_above_pool_collapse_to_all():
    ids = _ids(120)
    s = make_splits(ids, np.ones(120, dtype=bool), sizes=(30, 1000, 3000), seeds=(0, 1))
    assert s.effective == {30: 30, 1000: "all", 3000: "all"}
    assert s.subset(3000, 1) is s.subset(1000, 1) is s.subset("all", 1)
    assert s.subset(1000, 0).n == len(s.pool) and s.subset(1000, 0).requested == (1000, 3000)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["effective_sizes"] == {"30": 30, "1000": "all", "3000": "all"}
    assert [(e["size"], e["seed"]) for e in d["subsets"]] == [(30, 0), (30, 1), ("all", 0), ("all", 1)]
    assert d["n_test"] + d["n_pool"] == 120 and len(d["test_digest"]) == 16


def test_splits_errors():
    ids = _ids(50)
    with pytest.raises(ValueError, match="no labelled rows"):
        make_splits(ids, np.zeros(50, dtype=bool))
    with pytest.raises(ValueError, match="sizes"):
        make_splits(ids, np.ones(50, dtype=bool), sizes=(1,))
    with pytest.raises(ValueError, match="sizes"):
        make_splits(ids, np.ones(50, dtype=bool), sizes=("most",))
    with pytest.raises(ValueError, match="test_fraction"):
        make_splits(ids, np.ones(50, dtype=bool), test_fraction=1.0)
    with pytest.raises(KeyError, match="no subset"):
        make_splits(ids, np.ones(50, dtype=bool), sizes=(10,), seeds=(0,)).subset(10, 5)


# ---------------------------------------------------------------------------- baselines
def test_photometry_features():
    data = synthetic(5, 0)
    x = photometry_features(data.inputs, PHOT)
    assert x.shape == (5, 8 + 7)
    g, r = data.inputs[PHOT[0]].values, data.inputs[PHOT[1]].values
    assert np.allclose(x[:, 0], asinh_mag(g)) and np.allclose(x[:, 8], asinh_mag(g) - asinh_mag(r))
    assert abs(asinh_mag(np.array([100.0]))[0] - 17.5) < 1e-3  # ~ 22.5 - 2.5 log10 f when bright
    missing = ~data.inputs[PHOT[6]].valid
    assert np.array_equal(np.isnan(x[:, 6]), missing)


@pytest.fixture(scope="module")
def phot_data():
    return thirds(synthetic(400, 1), 240, 60)


def test_gbm_beats_mean(phot_data):
    train, val, test = phot_data
    gbm = GBMBaseline()
    assert isinstance(gbm, Method)
    assert r2(gbm, train, val, test, T, PHOT) > 0.95
    d = gbm.describe()
    assert len(d["selection"]) == 6 and d["chosen"]["n_iter"] >= 1
    json.dumps(d)


def test_constant_is_the_training_mean(phot_data):
    train, val, test = phot_data
    c = ConstantBaseline()
    assert isinstance(c, Method)
    with pytest.raises(RuntimeError, match="fit"):
        c.predict(test)
    pred = c.fit(train, val, T, PHOT, 0).predict(test)
    y = train.labels[T]
    assert pred.shape == (len(test),) and np.all(pred == np.mean(y[np.isfinite(y)]))
    assert regression_metrics(pred, test.labels[T])["r2"] <= 0.0 + 1e-12  # the floor: never explains variance


def test_mlp_beats_mean_and_is_deterministic(phot_data):
    train, val, test = phot_data
    a = PhotometryMLP(configs=FAST["configs"], max_epochs=150, patience=20, min_steps=0)
    assert r2(a, train, val, test, T, PHOT) > 0.95
    assert a.inputs_ == list(PHOT) and a.name == "mlp"
    b = PhotometryMLP(configs=FAST["configs"], max_epochs=150, patience=20, min_steps=0).fit(train, val, T, PHOT, 0)
    assert np.array_equal(a.predict(test), b.predict(test))
    c = PhotometryMLP(configs=FAST["configs"], max_epochs=150, patience=20, min_steps=0).fit(train, val, T, PHOT, 1)
    assert not np.array_equal(a.predict(test), c.predict(test))
    json.dumps(a.describe())
    # a small training set (one batch an epoch) gets its epochs and patience stretched to the step floor
    d = PhotometryMLP(configs=FAST["configs"], max_epochs=5, patience=2, min_steps=40).fit(
        train.select(np.arange(48)), val, T, PHOT, 0).describe()
    assert d["max_epochs"] == 40 and d["patience"] == 16


def test_cnn_uses_the_image():
    """Half the label's variance is the galaxy size, visible only in the image: photometry alone cannot pass."""
    train, val, test = thirds(synthetic(420, 2, image=True, size_weight=1.5), 280, 60)
    photometry_only = r2(GBMBaseline(), train, val, test, T, PHOT)
    assert photometry_only < 0.7
    net = SupervisedNet(**FAST)
    with_image = r2(net, train, val, test, T, IMG_SET)
    assert with_image > 0.85 and with_image > photometry_only + 0.2
    again = SupervisedNet(**FAST).fit(train, val, T, IMG_SET, 0)
    assert np.array_equal(net.predict(test), again.predict(test))


def test_cnn_reads_redshift_from_spectrum():
    train, val, test = thirds(synthetic(360, 3, spectrum=True), 240, 60)
    assert r2(GBMBaseline(), train, val, test, Z, PHOT) < 0.3  # photometry carries no redshift here
    net = SupervisedNet(spectrum_pixels=256, **FAST)
    assert r2(net, train, val, test, Z, SPEC_SET) > 0.85


def test_baseline_errors(phot_data):
    train, val, _ = phot_data
    with pytest.raises(ValueError, match=r"needs \['legacysurvey_image'\], which the data lacks"):
        SupervisedNet(**FAST).fit(train, val, T, IMG_SET, 0)
    for method in (GBMBaseline(), SupervisedNet(**FAST)):
        with pytest.raises(ValueError, match="unknown target 'provabgs_mass'"):
            method.fit(train, val, "provabgs_mass", PHOT, 0)
        with pytest.raises(ValueError, match="only 5 training rows have a 'provabgs_log_mstar' label"):
            method.fit(train.select(np.arange(5)), val, T, PHOT, 0)
        with pytest.raises(RuntimeError, match="call fit before predict"):
            method.predict(val)
    for method in (GBMBaseline(), PhotometryMLP()):
        with pytest.raises(ValueError, match=r"uses only \['scalar'\] modalities; the input set also has"):
            method.fit(train, val, T, IMG_SET, 0)
    with pytest.raises(ValueError, match="unknown input set"):
        GBMBaseline().fit(train, val, T, "photometry+radio", 0)  # type: ignore[arg-type]
    unlabelled = LabelledSet(object_id=val.object_id, inputs=val.inputs,
                             labels={T: np.where(np.arange(len(val)) < 1, val.labels[T], np.nan)})
    with pytest.raises(ValueError, match="only 1 validation rows"):
        GBMBaseline().fit(train, unlabelled, T, PHOT, 0)
    gbm = GBMBaseline().fit(train, val, T, PHOT, 0)
    with pytest.raises(ValueError, match="prediction data"):
        gbm.predict(LabelledSet(object_id=val.object_id, inputs={}, labels={}))


def test_mock_universe_smoke(tmp_path):
    """The real loader's output (DESI spectra, 16x16 Legacy cutouts) through splits, all baselines and metrics."""
    from aion.evaluation.labelled import load_labelled_set
    from aion.mock.universe import MockConfig, generate

    generate(tmp_path / "mock", MockConfig(n=350, seed=3, image_size=16, hsc_image_size=16), progress=False)
    data = load_labelled_set(tmp_path / "mock", targets=(T, Z))
    splits = make_splits(data.object_id, data.has_label(Z), sizes=(20, 1000), seeds=(0,))
    sub = splits.subset(1000, 0)
    assert sub.size == "all" and len(splits.test) > 0
    test = data.select(splits.test)
    small = {"configs": FAST["configs"], "max_epochs": 2, "patience": 2, "min_steps": 0}
    for method, input_set in ((GBMBaseline(), PHOT), (PhotometryMLP(**small), PHOT),
                              (SupervisedNet(**small), INPUT_SETS["photometry+image+spectrum"])):
        method.fit(data.select(sub.train), data.select(sub.val), Z, input_set, 0)
        pred = method.predict(test)
        assert pred.shape == (len(test),) and np.isfinite(pred).all()
        m = regression_metrics(pred, test.labels[Z], redshift=True)
        assert m["n"] == len(test) and np.isfinite(m["nmad"])

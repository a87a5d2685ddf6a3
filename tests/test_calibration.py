"""Temperature calibration of scalar posteriors (``aion.inference.calibration``,
``ScalarPrediction.tempered``), on posteriors with a known right answer."""

from __future__ import annotations

import numpy as np
import pytest

from aion.inference import temper_probs
from aion.inference.calibration import fit_temperature

EDGES = np.linspace(0.0, 2.0, 401)
CENTRES = 0.5 * (EDGES[1:] + EDGES[:-1])


def gaussian_posteriors(n: int, truth_sigma: float, model_sigma: float, seed: int = 0):
    """Posteriors of width ``model_sigma`` around means from which the truths scatter by ``truth_sigma``:
    calibrated when the two are equal; tempering by (truth_sigma / model_sigma)^2 makes them so."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0.5, 1.5, n)
    truth = mu + truth_sigma * rng.standard_normal(n)
    logp = -0.5 * ((CENTRES[None] - mu[:, None]) / model_sigma) ** 2
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True), truth


@pytest.mark.parametrize("objective", ["coverage", "nll"])
@pytest.mark.parametrize("model_sigma, expected", [(0.025, 4.0), (0.05, 1.0), (0.1, 0.25)],
                         ids=["overconfident", "calibrated", "underconfident"])
def test_fit_recovers_the_known_temperature(model_sigma, expected, objective):
    p, truth = gaussian_posteriors(2000, truth_sigma=0.05, model_sigma=model_sigma)
    fit = fit_temperature(p, EDGES, truth, objective=objective)
    assert fit.temperature == pytest.approx(expected, rel=0.08 if objective == "nll" else 0.15)
    assert fit.n == 2000 and not fit.at_bound and fit.objective == objective
    if objective == "nll":
        assert fit.nll_after <= fit.nll_before + 1e-9
    assert abs(fit.coverage_68_after - 0.68) < 0.03 and abs(fit.coverage_95_after - 0.95) < 0.02
    if expected != 1.0:  # miscalibrated before, by a lot
        assert abs(fit.coverage_68_before - 0.68) > 0.15


def test_coverage_objective_beats_the_likelihood_on_coverage_when_the_shape_is_wrong():
    """Gaussian posteriors, but 12% of truths are far outliers: the likelihood widens everything to
    pay for them, overshooting the 68% interval; the coverage objective balances both intervals."""
    p, truth = gaussian_posteriors(2000, truth_sigma=0.05, model_sigma=0.05, seed=3)
    far = np.random.default_rng(4).random(truth.size) < 0.12
    truth[far] = np.random.default_rng(5).uniform(0.2, 1.8, far.sum())
    by = {o: fit_temperature(p, EDGES, truth, objective=o) for o in ("coverage", "nll")}

    def worst(f):
        return max(abs(f.coverage_68_after - 0.68), abs(f.coverage_95_after - 0.95))

    assert by["nll"].temperature > 1.5 and by["nll"].coverage_68_after > 0.75
    assert worst(by["coverage"]) < worst(by["nll"]) - 0.02
    assert by["coverage"].nll_after >= by["nll"].nll_after - 1e-9  # the likelihood's own optimum


def test_temper_probs():
    p, _ = gaussian_posteriors(5, 0.05, 0.05)
    p[2] = np.nan  # an object in error
    np.testing.assert_allclose(temper_probs(p, 1.0)[[0, 1, 3, 4]], p[[0, 1, 3, 4]], rtol=1e-12, atol=1e-300)
    for t in (0.3, 3.0):
        q = temper_probs(p, t)
        assert np.isnan(q[2]).all()
        ok = [0, 1, 3, 4]
        np.testing.assert_allclose(q[ok].sum(axis=1), 1.0)
        np.testing.assert_array_equal(q[ok].argmax(axis=1), p[ok].argmax(axis=1))
        spread = ((CENTRES - (q[ok] @ CENTRES)[:, None]) ** 2 * q[ok]).sum(axis=1) ** 0.5
        np.testing.assert_allclose(spread, 0.05 * np.sqrt(t), rtol=0.02)  # Gaussian: width x sqrt(T)
    np.testing.assert_allclose(temper_probs(temper_probs(p, 2.0), 1.5)[0], temper_probs(p, 3.0)[0], rtol=1e-9)


def test_fit_errors_name_the_field():
    p, truth = gaussian_posteriors(50, 0.05, 0.05)
    with pytest.raises(ValueError, match="probs"):
        fit_temperature(p[:, :-1], EDGES, truth)
    with pytest.raises(ValueError, match="truth"):
        fit_temperature(p, EDGES, truth[:-1])
    with pytest.raises(ValueError, match="at least 20"):
        fit_temperature(p[:10], EDGES, truth[:10])
    truth[5:] = np.nan  # unlabelled objects are left out, not an error unless too few remain
    with pytest.raises(ValueError, match="5 labelled objects"):
        fit_temperature(p, EDGES, truth)
    with pytest.raises(ValueError, match="objective"):
        fit_temperature(p, EDGES, np.full(50, 1.0), objective="brier")
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(p, EDGES, np.full(50, 1.0), bounds=(2.0, 3.0))

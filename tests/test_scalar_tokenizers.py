"""Scalar tokenizers: fitted bins, absent values, clipping, persistence, recipes, survey fitting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aion.data.batches import ScalarBatch
from aion.tokenizers import load_tokenizer
from aion.tokenizers.binning import (
    LinearGridBinning,
    QuantileBinning,
    Reservoir,
    binning_from_config,
    optimal_rms_error,
)
from aion.tokenizers.quantizers import Quantizer
from aion.tokenizers.scalar import (
    ScalarRecipe,
    ScalarTokenizer,
    fit_scalar_tokenizers,
    format_report_table,
    load_scalar_recipe,
    load_scalar_tokenizers,
    quantization_report,
    save_scalar_tokenizers,
)

REPO = Path(__file__).resolve().parents[1]
FLUX = "legacysurvey_flux_g"


def _skewed(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.lognormal(0.0, 1.2, n) - 0.3  # flux-like: skewed, a few negatives


QUANTILE_VARIANTS = [
    dict(transform="none", density_power=1.0),
    dict(transform="asinh", scale=0.5, density_power=1.0),
    dict(transform="sqrt", scale=5.0, density_power=1 / 3),
    dict(transform="none", density_power=1 / 3),
]


# ------------------------------------------------------------------------------ binning
def test_binnings_implement_the_quantizer_protocol():
    assert isinstance(QuantileBinning(16).fit(_skewed(100, 0)), Quantizer)
    assert isinstance(LinearGridBinning(0.0, 1.0, 16), Quantizer)


def test_quantile_bins_are_equally_populated_on_training_data():
    x = _skewed(51_200, 0)
    b = QuantileBinning(1024).fit(x)
    assert b.n_effective_bins == 1024
    assert int(b.counts.min()) >= 49 and int(b.counts.max()) <= 51  # 50 per bin
    _, idx = b.quantize(torch.from_numpy(x))
    assert torch.equal(torch.bincount(idx, minlength=1024), b.counts)
    assert b.last_clip_counts.clipped == 0


@pytest.mark.parametrize("params", QUANTILE_VARIANTS)
def test_round_trip_error_is_bounded_by_the_bin_width(params):
    b = QuantileBinning(256, **params).fit(_skewed(20_000, 1))
    edges = b.edges_physical().numpy()
    x = _skewed(5_000, 2)
    x = x[(x >= edges[0]) & (x <= edges[-1])]
    codes, idx = b.quantize(torch.from_numpy(x))
    width = np.diff(edges)[idx.numpy()]
    err = np.abs(codes.numpy() - x)
    assert np.all(err <= width * (1 + 1e-9) + 1e-12)
    lo, hi = edges[idx.numpy()], edges[idx.numpy() + 1]  # each value lies in its own bin
    assert np.all((x >= lo - 1e-9 * np.abs(lo)) & (x <= hi + 1e-9 * np.abs(hi)))
    assert torch.equal(b.indices_to_codes(idx), codes.to(torch.float64))


def test_linear_grid_round_trip_is_within_half_a_bin():
    b = LinearGridBinning(0.0, 1.6, 1024)
    x = np.random.default_rng(3).uniform(0.0, 1.6, 10_000)
    codes, _ = b.quantize(torch.from_numpy(x))
    assert np.abs(codes.numpy() - x).max() <= 0.5 * b.width * (1 + 1e-9)


@pytest.mark.parametrize("params", QUANTILE_VARIANTS)
def test_encoding_is_monotonic(params):
    b = QuantileBinning(128, **params).fit(_skewed(5_000, 4))
    x = np.sort(np.concatenate([_skewed(5_000, 5), [-1e6, 1e6]]))
    codes, idx = b.quantize(torch.from_numpy(x))
    assert bool((torch.diff(idx) >= 0).all())
    assert bool((torch.diff(codes) >= 0).all())


def test_out_of_range_values_go_to_edge_bins_and_are_counted():
    b = QuantileBinning(64).fit(np.linspace(1.0, 2.0, 1000))
    x = torch.tensor([0.5, 0.99, 1.0, 1.5, 2.0, 2.01, 1e30, -torch.inf, torch.inf])
    _, idx = b.quantize(x)
    assert idx.tolist()[:2] == [0, 0] and idx[2] == 0 and idx[4] == 63
    assert idx.tolist()[5:] == [63, 63, 0, 63]
    c = b.last_clip_counts
    assert (c.n, c.below, c.above, c.nonfinite) == (9, 3, 3, 2)
    b.quantize(torch.tensor([5.0]))
    assert b.clip_totals.above == 4 and b.last_clip_counts.above == 1

    grid = LinearGridBinning(0.0, 1.0, 10)
    _, idx = grid.quantize(torch.tensor([-0.1, 0.0, 1.0, 1.2]))
    assert idx.tolist() == [0, 0, 9, 9]
    assert (grid.last_clip_counts.below, grid.last_clip_counts.above) == (1, 1)


def test_log_transform_counts_non_positive_values():
    x = np.concatenate([np.geomspace(0.1, 100.0, 1000), [0.0, -1.0, -5.0]])
    b = QuantileBinning(32, transform="log").fit(x)
    assert b.fit_stats.n_out_of_domain == 3 and b.fit_stats.n_used == 1000
    _, idx = b.quantize(torch.tensor([0.0, -2.0, 1.0]))
    assert idx[:2].tolist() == [0, 0] and b.last_clip_counts.below == 2


def test_linear_grid_exact_indices():
    b = LinearGridBinning(0.0, 1.6, 1024)
    k = torch.arange(1024)
    centres = 0.0 + (k.double() + 0.5) * (1.6 / 1024)
    assert torch.equal(b.quantize(centres)[1], k)
    assert torch.equal(b.quantize(b.edges[:-1])[1], k)  # bins are closed on the left
    _, idx = b.quantize(torch.tensor([0.0, 1.6, 0.8, 0.0015625, 0.0015624], dtype=torch.float64))
    assert idx.tolist() == [0, 1023, 512, 1, 0]
    assert b.last_clip_counts.clipped == 0
    assert torch.allclose(b.indices_to_codes(k), centres)


def test_constant_values_fit_one_bin():
    b = QuantileBinning(1024).fit(np.full(5000, 0.031))
    assert b.n_effective_bins == 1 and b.fit_stats.n_effective_bins == 1
    codes, idx = b.quantize(torch.tensor([0.031, 0.031], dtype=torch.float64))
    assert idx.tolist() == [0, 0] and codes.tolist() == pytest.approx([0.031, 0.031])
    assert b.last_clip_counts.clipped == 0
    # any token of the vocabulary still decodes (merged bins decode to the last real bin)
    assert b.indices_to_codes(torch.tensor([0, 1023])).tolist() == pytest.approx([0.031, 0.031])


def test_heavy_duplicates_get_their_own_bin_and_the_rest_stays_balanced():
    rng = np.random.default_rng(6)
    x = np.concatenate([np.full(30_000, 0.0), rng.normal(0.0, 1.0, 30_000), np.full(200, 2.5)])
    b = QuantileBinning(512).fit(x)
    _, idx = b.quantize(torch.tensor([0.0]))
    atom_bin = int(idx)
    assert int(b.counts[atom_bin]) == 30_000  # the atom is alone in its bin ...
    assert float(b.centers[atom_bin]) == 0.0  # ... and decodes exactly
    assert int((b.counts > 0).sum()) == b.n_effective_bins  # no empty bins
    others = np.delete(b.counts.numpy(), atom_bin)
    assert np.median(others) == pytest.approx(30_200 / 511, rel=0.1)
    for power in (1 / 3, 0.0):  # density-power layouts accept atoms too
        b2 = QuantileBinning(512, density_power=power).fit(x)
        assert float(b2.quantize(torch.tensor([0.0]))[0]) == 0.0


def test_few_distinct_values_each_get_a_bin():
    x = np.repeat(np.arange(10.0), [1, 5, 100, 3, 3, 3, 50, 1, 1, 2])
    b = QuantileBinning(1024).fit(x)
    assert b.n_effective_bins == 10
    codes, _ = b.quantize(torch.from_numpy(np.arange(10.0)))
    assert codes.tolist() == list(np.arange(10.0))


def test_reservoir_is_bounded_deterministic_and_chunking_free():
    x = np.random.default_rng(7).normal(size=10_000)
    a = Reservoir(1000, seed=3)
    a.add(x)
    b = Reservoir(1000, seed=3)
    for chunk in np.array_split(x, 37):
        b.add(chunk)
    assert a.n_seen == b.n_seen == 10_000
    assert np.array_equal(np.sort(a.sample()), np.sort(b.sample()))
    assert a.sample().size == 1000
    c = Reservoir(1000, seed=4)
    c.add(x)
    assert not np.array_equal(np.sort(a.sample()), np.sort(c.sample()))


def test_streaming_fit_equals_one_shot_fit_below_reservoir_size():
    x = _skewed(20_000, 8)
    stream = QuantileBinning(256, reservoir_size=50_000)
    for chunk in np.array_split(x, 13):
        stream.update(chunk)
    stream.update(np.array([np.nan, np.inf]))
    stats = stream.finalize()
    assert stats.n_nonfinite == 2 and stats.n_used == 20_000
    full = QuantileBinning(256).fit(x)
    assert torch.equal(stream.edges, full.edges) and torch.equal(stream.centers, full.centers)
    sampled = QuantileBinning(256, reservoir_size=5_000).fit(x)
    assert sampled.fit_stats.n_used == 5_000 and sampled.fit_stats.n_seen == 20_000


def test_unfitted_binning_and_bad_indices_raise_clearly():
    with pytest.raises(RuntimeError, match="not fitted"):
        QuantileBinning(8).quantize(torch.tensor([1.0]))
    b = QuantileBinning(8).fit(_skewed(100, 9))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        b.indices_to_codes(torch.tensor([8]))
    with pytest.raises(ValueError, match="no finite values"):
        QuantileBinning(8).fit(np.array([np.nan]))


def test_optimal_rms_error_matches_a_fitted_minimum_rms_binning():
    rng = np.random.default_rng(10)
    x = rng.normal(size=100_000)
    bound = optimal_rms_error(x, 256)
    b = QuantileBinning(256, density_power=1 / 3).fit(x)
    xe = rng.normal(size=50_000)
    rms = float(np.sqrt(np.mean((b.quantize(torch.from_numpy(xe))[0].numpy() - xe) ** 2)))
    assert bound == pytest.approx(rms, rel=0.1)
    equal_count = QuantileBinning(256).fit(x)
    rms_eq = float(np.sqrt(np.mean((equal_count.quantize(torch.from_numpy(xe))[0].numpy() - xe) ** 2)))
    assert rms_eq > 1.2 * rms


# ------------------------------------------------------------------------------ tokenizer
def _flux_batch(n: int, seed: int) -> ScalarBatch:
    rng = np.random.default_rng(seed)
    return ScalarBatch(name=FLUX, values=_skewed(n, seed), ivar=rng.uniform(50, 500, n))


def test_tokenizer_shapes_and_interface():
    tok = ScalarTokenizer(FLUX, QuantileBinning(1024)).fit(_flux_batch(3000, 0))
    assert tok.num_tokens == 1 and tok.vocab_size == 1024 and tok.modalities == (FLUX,)
    tokens = tok.encode(_flux_batch(50, 1))
    assert tokens.shape == (50, 1) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 1024
    out = tok.decode(tokens)
    assert isinstance(out, ScalarBatch) and out.name == FLUX and out.ivar is None and out.values.shape == (50,)


def test_absent_values_are_token_zero_and_never_an_error():
    tok = ScalarTokenizer(FLUX, QuantileBinning(64)).fit(_flux_batch(2000, 0))
    values = np.array([1.0, np.nan, 2.0, 3.0, np.inf, -1e9])
    ivar = np.array([10.0, 10.0, 0.0, 10.0, 10.0, 10.0])
    batch = ScalarBatch(name=FLUX, values=values, ivar=ivar)
    before = batch.values.copy()
    tokens = tok.encode(batch)
    assert batch.valid.tolist() == [True, False, False, True, False, True]
    assert tokens[~torch.from_numpy(batch.valid), 0].tolist() == [0, 0, 0]
    assert tok.last_clip_counts.n == 3 and tok.last_clip_counts.below == 1  # only present values counted
    np.testing.assert_array_equal(batch.values, before)  # the caller's data are untouched
    decoded = tok.decode(tokens, present=batch.valid)
    assert np.isnan(decoded.values[~batch.valid]).all() and np.isfinite(decoded.values[batch.valid]).all()
    nothing = ScalarBatch(name=FLUX, values=np.full(4, np.nan))
    assert tok.encode(nothing).tolist() == [[0]] * 4 and tok.last_clip_counts.n == 0
    empty = ScalarBatch(name=FLUX, values=np.zeros(0))
    assert tok.encode(empty).shape == (0, 1)


def test_non_scalar_or_unknown_modality_gives_a_clear_error():
    with pytest.raises(ValueError, match="legacysurvey_image.*image modality.*scalar"):
        ScalarTokenizer("legacysurvey_image")
    with pytest.raises(ValueError, match="unknown modality 'flux_q'.*legacysurvey_flux_g"):
        ScalarTokenizer("flux_q")
    with pytest.raises(ValueError, match="scalar"):
        load_scalar_recipe({"modalities": ["desi_spectrum"]})


def test_batch_of_another_modality_is_rejected():
    tok = ScalarTokenizer(FLUX, QuantileBinning(16)).fit(_flux_batch(200, 0))
    with pytest.raises(ValueError, match="legacysurvey_flux_r"):
        tok.encode(ScalarBatch(name="legacysurvey_flux_r", values=np.ones(3)))


@pytest.mark.parametrize("binning", [
    QuantileBinning(1024, transform="sqrt", scale=5.0, density_power=1 / 3),
    QuantileBinning(1024, transform="asinh", scale=0.1),
    LinearGridBinning(0.0, 1.6, 1024),
])
def test_save_load_round_trip_gives_identical_tokens(tmp_path, binning):
    name = "desi_z" if isinstance(binning, LinearGridBinning) else FLUX
    tok = ScalarTokenizer(name, binning)
    if name == FLUX:
        tok.fit(_flux_batch(4000, 0))
        batch = _flux_batch(1000, 1)
    else:
        batch = ScalarBatch(name=name, values=np.random.default_rng(0).uniform(-0.1, 1.8, 1000),
                            ivar=np.ones(1000))
    tok.save_pretrained(tmp_path / name)
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["tokenizer_type"] == "scalar" and config["modality"] == name
    tensors = load_file(str(tmp_path / name / "model.safetensors"))
    assert tensors["edges"].dtype == torch.float64 and tensors["centers"].dtype == torch.float64
    loaded = load_tokenizer(tmp_path / name)
    assert isinstance(loaded, ScalarTokenizer)
    assert torch.equal(loaded.encode(batch), tok.encode(batch))
    assert np.array_equal(loaded.decode(tok.encode(batch)).values, tok.decode(tok.encode(batch)).values)
    assert ScalarTokenizer.from_pretrained(tmp_path / name).get_config() == tok.get_config()


def test_fine_token_refines_within_the_coarse_bin(tmp_path):
    coarse = ScalarTokenizer(FLUX, QuantileBinning(64, transform="sqrt", scale=5.0)).fit(_flux_batch(4000, 0))
    fine = ScalarTokenizer(FLUX, QuantileBinning(64, transform="sqrt", scale=5.0), fine_bins=32).fit(
        _flux_batch(4000, 0))
    assert fine.num_tokens == 2 and fine.vocab_size == 64 + 32
    batch = _flux_batch(2000, 1)
    batch = ScalarBatch(name=FLUX, values=np.append(batch.values, np.nan), ivar=np.append(batch.ivar, 1.0))
    tokens = fine.encode(batch)
    assert tokens.shape == (len(batch), 2)
    assert torch.equal(tokens[:, :1], coarse.encode(batch))  # the first token is the one-token code
    assert int(tokens[:, 1].min()) >= 64 and int(tokens[:, 1].max()) < 96
    assert tokens[-1].tolist() == [0, 64]  # absent: token 0 and the first fine token
    edges = fine.binning.edges_physical().numpy()
    inside = batch.valid & (batch.values >= edges[0]) & (batch.values <= edges[-1])  # clipped tails aside
    assert inside.sum() > 1900
    v = batch.values[inside]
    err_fine = fine.decode(tokens).values[inside] - v
    err_coarse = coarse.decode(tokens[:, :1]).values[inside] - v
    assert np.sqrt(np.mean(err_fine**2)) < np.sqrt(np.mean(err_coarse**2)) / 10
    # in the transformed space the error is at most half a sub-bin
    u = fine.binning.transform_values(torch.from_numpy(v))
    u_dec = fine.binning.transform_values(torch.from_numpy(fine.decode(tokens).values[inside]))
    widths = torch.diff(fine.binning.edges)[tokens[torch.from_numpy(inside), 0]]
    assert bool(((u_dec - u).abs() <= widths / 64 + 1e-9).all())
    # a coarse token alone still decodes (to the bin representative)
    np.testing.assert_array_equal(fine.decode(tokens[:, :1]).values, coarse.decode(tokens[:, :1]).values)
    with pytest.raises(ValueError, match="fine tokens must lie in"):
        fine.decode(torch.tensor([[3, 5]]))
    fine.save_pretrained(tmp_path / "fine")
    assert torch.equal(load_tokenizer(tmp_path / "fine").encode(batch), tokens)


def test_tail_margin_places_values_just_beyond_the_training_range():
    train = _flux_batch(3000, 0)
    top = float(np.max(train.values))
    beyond = ScalarBatch(name=FLUX, values=np.array([top * 1.02]), ivar=np.ones(1))
    plain = ScalarTokenizer(FLUX, QuantileBinning(256)).fit(train)
    plain.encode(beyond)
    assert plain.last_clip_counts.above == 1
    padded = ScalarTokenizer(FLUX, QuantileBinning(256, tail_margin=0.05), fine_bins=16).fit(train)
    tokens = padded.encode(beyond)
    assert padded.last_clip_counts.above == 0 and int(tokens[0, 0]) == 255
    assert abs(padded.decode(tokens).values[0] - top * 1.02) < abs(plain.decode(plain.encode(beyond)).values[0]
                                                                   - top * 1.02)
    with pytest.raises(ValueError, match="tail_margin"):
        QuantileBinning(8, tail_margin=-0.1)


def test_binning_config_round_trip_and_errors():
    b = QuantileBinning(100, transform="asinh", scale=2.0, density_power=0.5, reservoir_size=10, seed=3)
    assert binning_from_config(b.config()).config() == b.config()
    with pytest.raises(ValueError, match="unknown binning kind"):
        binning_from_config({"kind": "kmeans"})
    with pytest.raises(ValueError, match="transform"):
        QuantileBinning(8, transform="log2")
    with pytest.raises(ValueError, match="low < high"):
        LinearGridBinning(1.0, 1.0, 8)


# ------------------------------------------------------------------------------ recipes and surveys
def test_shipped_recipe_resolves_every_target():
    recipe = load_scalar_recipe(REPO / "tokenizers" / "scalars.yaml")
    assert recipe.n_bins == 1024
    targets = recipe.targets()
    assert "provabgs_log_mstar" in targets and "hsc_mag_g" in targets and "legacysurvey_ebv" in targets
    for name in ("desi_z", "provabgs_z"):
        spec = recipe.binning_for(name)
        assert (spec.kind, spec.low, spec.high) == ("linear", 0.0, 1.6)
    assert recipe.binning_for("legacysurvey_flux_z").kind == "quantile"  # "*_z" patterns must not catch fluxes
    assert recipe.binning_for("legacysurvey_flux_w1").transform == "sqrt"
    assert recipe.binning_for("legacysurvey_ebv").density_power == 1.0
    with pytest.raises(ValueError, match="unknown key.*'bins'"):
        load_scalar_recipe({"overrides": {"desi_z": {"bins": 3}}})
    with pytest.raises(ValueError, match="low and high"):
        load_scalar_recipe({"overrides": {"hsc_mag_*": {"kind": "linear"}}})


@pytest.fixture(scope="module")
def tiny_surveys(tmp_path_factory) -> Path:
    """A small MMU tree (two HEALPix shards per survey) written directly, no mock rendering."""
    from aion.data.mmu import MMUShardWriter, shard_path

    root = tmp_path_factory.mktemp("scalar_mmu")
    rng = np.random.default_rng(11)
    for pixel in (100, 101):
        n = 700
        flux = _skewed(n, pixel)
        ivar = rng.uniform(50, 500, n)
        ivar[:20] = 0.0  # absent measurements
        flux[20:30] = np.nan
        with MMUShardWriter(shard_path(root, "legacysurvey", "test", pixel)) as w:
            w.append({"object_id": np.arange(n) + 10_000 * pixel, "ra": rng.uniform(0, 1, n),
                      "dec": rng.uniform(0, 1, n), "FLUX_R": flux.astype(np.float32),
                      "FLUX_IVAR_R": ivar.astype(np.float32), "EBV": np.full(n, 0.03, np.float32)})
        m = 90
        with MMUShardWriter(shard_path(root, "desi", "test", pixel)) as w:
            w.append({"object_id": np.arange(m) + 10_000 * pixel, "ra": rng.uniform(0, 1, m),
                      "dec": rng.uniform(0, 1, m), "Z": rng.uniform(0.0, 1.7, m).astype(np.float32),
                      "ZERR": np.full(m, 1e-4, np.float32)})
    return root


def _all_rows(root: Path, survey: str, name: str) -> ScalarBatch:
    from aion.data.mmu import iter_mmu_hdf5

    return next(iter_mmu_hdf5(root, survey, batch_size=100_000)).modalities[name]


def test_fit_save_load_and_report_on_surveys(tiny_surveys, tmp_path):
    recipe = ScalarRecipe(n_bins=64, batch_size=128, surveys=("legacysurvey", "desi"),
                          modalities=("legacysurvey_flux_r", "legacysurvey_ebv", "desi_z"))
    toks = fit_scalar_tokenizers(tiny_surveys, recipe)
    assert list(toks) == ["legacysurvey_flux_r", "legacysurvey_ebv", "desi_z"]
    flux = _all_rows(tiny_surveys, "legacysurvey", "legacysurvey_flux_r")
    assert toks["legacysurvey_flux_r"].fit_stats.n_used == int(flux.valid.sum()) == 2 * (700 - 30)
    assert toks["legacysurvey_flux_r"].binning.transform == "sqrt"  # built-in overrides apply
    one_shot = ScalarTokenizer("legacysurvey_flux_r", recipe.binning_for("legacysurvey_flux_r").build(64, 10**6, 0))
    assert torch.equal(one_shot.fit(flux).binning.edges, toks["legacysurvey_flux_r"].binning.edges)
    assert toks["legacysurvey_ebv"].binning.n_effective_bins == 1  # constant column
    assert isinstance(toks["desi_z"].binning, LinearGridBinning)
    assert toks["desi_z"].fit_stats.n_seen == 180 and toks["desi_z"].fit_stats.n_out_of_domain > 0  # z > 1.6
    assert toks["desi_z"].binning.clip_totals.n == 0  # fitting does not count as encoding

    save_scalar_tokenizers(toks, tmp_path / "toks")
    assert sorted(p.name for p in (tmp_path / "toks").iterdir()) == sorted(toks)
    loaded = load_scalar_tokenizers(tmp_path / "toks")
    assert torch.equal(loaded["legacysurvey_flux_r"].encode(flux), toks["legacysurvey_flux_r"].encode(flux))

    report = quantization_report(toks["legacysurvey_flux_r"], flux)
    assert report["n_valid"] == int(flux.valid.sum())
    assert report["ratio"] == pytest.approx(report["rms_error"] / report["median_sigma"])
    assert report["median_sigma"] == pytest.approx(float(np.median(1 / np.sqrt(flux.ivar[flux.valid]))))
    assert report["clipped_below"] == 0 and report["clipped_above"] == 0  # in-sample
    z_report = quantization_report(toks["desi_z"], _all_rows(tiny_surveys, "desi", "desi_z"))
    assert z_report["clipped_above"] > 0 and z_report["rms_error"] > z_report["rms_error_in_range"]
    ebv_report = quantization_report(toks["legacysurvey_ebv"], _all_rows(tiny_surveys, "legacysurvey",
                                                                         "legacysurvey_ebv"))
    assert ebv_report["median_sigma"] is None and ebv_report["ratio"] is None
    assert ebv_report["rms_error"] == pytest.approx(0.0, abs=1e-9)
    assert "legacysurvey_flux_r" in format_report_table([report, z_report, ebv_report])


def test_fitting_a_missing_survey_or_column_is_an_error(tiny_surveys):
    with pytest.raises(FileNotFoundError, match="sdss"):
        fit_scalar_tokenizers(tiny_surveys, ScalarRecipe(surveys=("sdss",), modalities=("sdss_z",)))
    with pytest.raises(ValueError, match="FLUX_G"):
        fit_scalar_tokenizers(tiny_surveys, ScalarRecipe(surveys=("legacysurvey",),
                                                         modalities=("legacysurvey_flux_g",)))
    with pytest.warns(UserWarning, match="legacysurvey_flux_g"):  # implicit targets: skipped, with a warning
        toks = fit_scalar_tokenizers(tiny_surveys, ScalarRecipe(n_bins=16, surveys=("legacysurvey",)))
    assert set(toks) == {"legacysurvey_flux_r", "legacysurvey_ebv"}

"""Spectrum tokenizer: resampling, padding invariance, amplitude token, training, persistence, edge cases.

Everything runs with a TINY tokenizer (a 4 A grid over 4000-6044 A, two narrow stages) so the
whole file takes seconds on two CPU cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aion.data.batches import BatchValidationError, SpectrumBatch
from aion.data.mmu import MMUShardWriter, shard_path
from aion.tokenizers import load_tokenizer
from aion.tokenizers.spectrum import (
    SpectrumTokenizer,
    SpectrumTokenizerConfig,
    load_recipe,
    pixel_edges,
    rebin,
    resample_spectra,
    train_spectrum_tokenizer,
)
from aion.tokenizers.trainer import TrainConfig, train

torch.set_num_threads(1)

TINY = dict(wave_min=4000.0, wave_step=4.0, n_pix=512, patch=4, widths=(8, 16), depths=(1, 1),
            attn_blocks=1, attn_heads=2, mlp_ratio=2, code_dim=6)


def tiny(**kw) -> SpectrumTokenizer:
    torch.manual_seed(0)
    return SpectrumTokenizer(SpectrumTokenizerConfig(**{**TINY, **kw}))


def galaxy(wave: np.ndarray, rng: np.random.Generator, amp: float = 5.0, noise: float = 0.3) -> tuple:
    """A smooth continuum with a break and two emission lines, plus noise: (flux, ivar)."""
    z = rng.uniform(0.0, 0.3)
    cont = amp * (1 + 0.4 * np.tanh((wave - 4000 * (1 + z)) / 50) + 0.1 * rng.normal())
    lines = sum(amp * rng.uniform(1, 6) * np.exp(-0.5 * ((wave - lam * (1 + z)) / 3.0) ** 2) for lam in (4861, 5007))
    sigma = noise * amp
    return cont + lines + rng.normal(0, sigma, wave.size), np.full(wave.size, 1 / sigma**2)


def sdss_like(rng: np.random.Generator, n: int = 700) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A log-lambda (SDSS-style, non-uniform) grid 4050-~5900 A and a noisy galaxy on it."""
    wave = 10 ** (np.log10(4050) + 1e-4 * 2.3 * np.arange(n))
    flux, ivar = galaxy(wave, rng)
    return wave, flux, ivar


def batch_of(wave, flux, ivar, valid=None) -> SpectrumBatch:
    flux = np.atleast_2d(flux)
    valid = np.ones(flux.shape, bool) if valid is None else np.atleast_2d(valid)
    return SpectrumBatch(flux=flux, ivar=np.atleast_2d(ivar), wavelength=np.atleast_2d(wave), valid=valid)


def pad(x: np.ndarray, k: int, fill) -> np.ndarray:
    return np.concatenate([x, np.full(k, fill, dtype=np.asarray(x).dtype)])


# ----------------------------------------------------------------------------- padding
def test_padded_spectrum_gives_identical_tokens_to_unpadded():
    tok = tiny()
    rng = np.random.default_rng(0)
    wave, flux, ivar = sdss_like(rng)
    valid = rng.random(wave.size) > 0.02
    ref = tok.encode(batch_of(wave, flux, ivar, valid))
    rows = []
    for k in (1, 37, 300):
        # adversarial padding: huge flux and positive ivar, marked valid; only lambda = -1 says padding
        rows.append((pad(wave, k, -1.0), pad(flux, k, 1e6), pad(ivar, k, 5.0), pad(valid, k, True)))
    width = max(r[0].size for r in rows)
    stacked = [np.stack([pad(r[j], width - r[j].size, r[j][-1]) for r in rows]) for j in range(4)]
    padded = SpectrumBatch(flux=stacked[1], ivar=stacked[2], wavelength=stacked[0], valid=stacked[3])
    tokens = tok.encode(padded)
    assert torch.equal(tokens, ref.expand(3, -1))
    prep_ref, prep_pad = tok.prepare(batch_of(wave, flux, ivar, valid)), tok.prepare(padded)
    for key in ("flux", "ivar", "valid", "amp_index"):
        assert torch.equal(prep_pad[key], prep_ref[key].expand_as(prep_pad[key])), key
    # padding is not a spectrum: a different spectrum gets different tokens (no collapse to one code)
    other = tok.encode(batch_of(wave, flux[::-1].copy(), ivar, valid))
    assert not torch.equal(other, ref)


# ----------------------------------------------------------------------------- resampling
def test_rebin_conserves_flux_and_marks_uncovered_pixels_invalid():
    rng = np.random.default_rng(1)
    wave_in = 4103.3 + np.cumsum(rng.uniform(0.6, 1.4, 1500))  # irregular 1 A-ish grid
    flux = rng.uniform(0.5, 3.0, wave_in.size)
    e_in = pixel_edges(wave_in)
    cfg = SpectrumTokenizerConfig(**TINY)
    out_f, out_iv, ok = rebin(e_in, flux[None], np.full((1, wave_in.size), 4.0), np.ones((1, wave_in.size), bool),
                              cfg.edges)
    e_out = cfg.edges
    full = (e_out[:-1] >= e_in[0]) & (e_out[1:] <= e_in[-1])
    assert ok[0, full].all()
    assert not ok[0, (e_out[1:] <= e_in[0]) | (e_out[:-1] >= e_in[-1])].any()  # outside input coverage
    assert (out_f[0, ~ok[0]] == 0).all() and (out_iv[0, ~ok[0]] == 0).all()

    def integral(lo: float, hi: float) -> float:  # exact integral of the piecewise-constant input
        overlap = np.clip(np.minimum(e_in[1:], hi) - np.maximum(e_in[:-1], lo), 0, None)
        return float((flux * overlap).sum())

    first, last = np.nonzero(full)[0][[0, -1]]
    for a, b in ((first, last + 1), (first + 7, first + 40), (first + 100, first + 101)):
        got = (out_f[0, a:b] * np.diff(e_out)[a:b]).sum()
        assert got == pytest.approx(integral(e_out[a], e_out[b]), rel=1e-10)


def test_rebin_ivar_whole_pixels_and_masked_gaps():
    e_in = np.arange(0.0, 41.0)  # 40 pixels of 1 A
    flux = np.arange(40.0)[None]
    ivar = np.full((1, 40), 2.0)
    valid = np.ones((1, 40), bool)
    valid[0, 12:20] = False  # covers output pixels [12,16) and [16,20) entirely
    f, iv, ok = rebin(e_in, flux, ivar, valid, np.arange(0.0, 41.0, 4.0))
    assert ok[0].tolist() == [True, True, True, False, False, True, True, True, True, True]
    np.testing.assert_allclose(f[0, ok[0]], flux[0].reshape(10, 4).mean(1)[ok[0]])
    np.testing.assert_allclose(iv[0, ok[0]], 8.0)  # 4 pixels of ivar 2: information adds up
    # half-covered output pixel: valid at min_coverage 0.5 (mean of its valid half), invalid above
    valid2 = np.ones((1, 40), bool)
    valid2[0, 2:4] = False
    f2, _, ok2 = rebin(e_in, flux, ivar, valid2, np.arange(0.0, 41.0, 4.0), min_coverage=0.5)
    assert ok2[0, 0] and f2[0, 0] == pytest.approx(0.5)
    _, _, ok3 = rebin(e_in, flux, ivar, valid2, np.arange(0.0, 41.0, 4.0), min_coverage=0.75)
    assert not ok3[0, 0]


def test_masked_pixels_do_not_influence_tokens_or_loss():
    tok = tiny()
    rng = np.random.default_rng(2)
    wave, flux, ivar = sdss_like(rng)
    valid = np.ones(wave.size, bool)
    valid[100:160] = False
    changed = flux.copy()
    changed[100:160] = 1e4
    t_a = tok.encode(batch_of(wave, flux, ivar, valid))
    t_b = tok.encode(batch_of(wave, changed, ivar, valid))
    assert torch.equal(t_a, t_b)
    # the network and the loss ignore whatever sits in invalid grid pixels (not only via the batch)
    prep = tok.prepare(batch_of(wave, flux, ivar, valid))
    batch = {k: v for k, v in prep.items() if k != "amp_index"}
    poked = dict(batch, flux=torch.where(batch["valid"], batch["flux"], torch.tensor(777.0)),
                 ivar=torch.where(batch["valid"], batch["ivar"], torch.tensor(3.0)))
    assert (~batch["valid"]).any()
    tok.model.eval()
    assert tok.model.loss(batch)[0].item() == tok.model.loss(poked)[0].item()
    x1 = tok.model.network_input(batch["flux"], batch["ivar"], batch["valid"])
    x2 = tok.model.network_input(poked["flux"], poked["ivar"], poked["valid"])
    assert torch.equal(x1, x2)


# ----------------------------------------------------------------------------- amplitude
def test_amplitude_token_carries_the_scale():
    tok = tiny()
    rng = np.random.default_rng(3)
    wave, flux, ivar = sdss_like(rng)
    t1 = tok.encode(batch_of(wave, flux, ivar))
    t10 = tok.encode(batch_of(wave, flux * 10, ivar / 100))
    assert t10[0, 0] - t1[0, 0] == tok.config.amp_bins_per_dex  # one dex = a whole number of bins
    assert (t10[0, 1:] == t1[0, 1:]).float().mean() >= 0.98
    d1, d10 = tok.decode(t1), tok.decode(t10)
    if torch.equal(t10[0, 1:], t1[0, 1:]):
        np.testing.assert_allclose(d10.flux, 10 * d1.flux, rtol=1e-5, atol=1e-6)
    # flux is divided by the (quantised) median of the grid flux: the normalised median is ~1
    prep = tok.prepare(batch_of(wave, flux * 10, ivar))
    assert np.median(prep["flux"][0][prep["valid"][0]].numpy()) == pytest.approx(1.0, abs=0.01)


# ----------------------------------------------------------------------------- training
def _tiny_training_set(tok: SpectrumTokenizer, n: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    wave = tok.wavelength[40:480]
    rows = [galaxy(wave, rng, amp=rng.uniform(1, 20)) for _ in range(n)]
    batch = SpectrumBatch(flux=np.stack([r[0] for r in rows]), ivar=np.stack([r[1] for r in rows]),
                          wavelength=wave, valid=rng.random((n, wave.size)) > 0.01)
    return tok.prepare(batch)


def test_short_training_makes_the_loss_fall(tmp_path):
    tok = tiny()
    data = _tiny_training_set(tok, 64, seed=4)

    def get_batch(idx):
        return {k: v[torch.as_tensor(idx)] for k, v in data.items() if k != "amp_index"}

    cfg = TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, log_every=1, checkpoint_every=60)
    tok.model.eval()
    before = tok.model.loss(get_batch(np.arange(64)))[1]["chi2"]
    train(tok.model, get_batch, 64, cfg, tmp_path, progress=False)
    after = tok.model.loss(get_batch(np.arange(64)))[1]["chi2"]
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["chi2"] for r in log[:5]]), np.mean([r["chi2"] for r in log[-5:]])
    assert last < 0.5 * first
    assert after < 0.5 * before
    assert not tok.model.training


def test_blind_spot_loss_scores_held_out_pixels_and_optionally_the_seen_ones():
    data = _tiny_training_set(tiny(), 16, seed=5)
    batch = {k: v for k, v in data.items() if k != "amp_index"}
    plain = tiny(holdout_fraction=0.3)
    mixed = tiny(holdout_fraction=0.3, seen_chi2_weight=0.5)
    mixed.model.load_state_dict(plain.model.state_dict())
    plain.model.train()
    mixed.model.train()
    torch.manual_seed(1)
    loss_plain, m_plain = plain.model.loss(batch)
    torch.manual_seed(1)  # same held-out pixels
    loss_mixed, m_mixed = mixed.model.loss(batch)
    assert "seen_chi2" not in m_plain and m_mixed["chi2"] == pytest.approx(m_plain["chi2"])
    expected = float(loss_plain.detach()) + 0.5 * m_mixed["seen_chi2"]
    assert float(loss_mixed.detach()) == pytest.approx(expected, rel=1e-5)
    mixed.model.eval()  # evaluation scores every valid pixel, no extra term
    assert "seen_chi2" not in mixed.model.loss(batch)[1]
    with pytest.raises(ValueError, match="seen_chi2_weight"):
        SpectrumTokenizerConfig(**{**TINY, "seen_chi2_weight": -1.0})


def test_noise_pair_loss_scores_the_other_draw():
    data = _tiny_training_set(tiny(), 8, seed=6)
    batch = {k: v for k, v in data.items() if k != "amp_index"}
    tok = tiny(holdout_fraction=0.3)  # ignored when a target draw is given
    tok.model.train()
    noise = torch.randn_like(batch["flux"]) / batch["ivar"].clamp_min(1e-6).sqrt()
    paired = {**batch, "target_flux": batch["flux"] + noise, "target_ivar": batch["ivar"],
              "target_valid": batch["valid"]}
    loss, metrics = tok.model.loss(paired)
    with torch.no_grad():
        pred, _, _ = tok.model(batch["flux"], batch["ivar"], batch["valid"])
    sq = batch["ivar"] * (pred - paired["target_flux"]) ** 2 * batch["valid"]
    expected = (sq.sum(1) / batch["valid"].sum(1)).mean()
    assert metrics["chi2"] == pytest.approx(float(expected), rel=1e-5)


def test_binned_chi2_matches_hand_computation_and_weights_coherent_residuals():
    tok = tiny(binned_chi2_scales=(4, 16), binned_chi2_weight=0.5)
    n = tok.config.n_pix
    target = torch.zeros(2, n)
    ivar = torch.full((2, n), 4.0)  # sigma 0.5
    scored = torch.ones(2, n, dtype=torch.bool)
    scored[1, :8] = False  # a masked stretch: its blocks sum fewer pixels, variances add accordingly
    g = torch.Generator().manual_seed(0)
    white = torch.randn(2, n, generator=g) * 0.5 * 0.3  # 0.3 sigma of white residual per pixel
    coherent = torch.full((2, n), 0.3 * 0.5)  # the same per-pixel chi^2, but all of one sign
    results = {}
    for name, pred in (("white", white), ("coherent", coherent)):
        loss, metrics = tok.model._scored_chi2(pred, target, ivar, scored)
        r = torch.where(scored, pred, 0.0)
        v = torch.where(scored, 0.25, 0.0)
        by_k = []
        for k in (4, 16):
            rb, vb = r.reshape(2, -1, k).sum(-1), v.reshape(2, -1, k).sum(-1)
            ok = vb > 0
            by_k.append(torch.stack([(rb[i][ok[i]] ** 2 / vb[i][ok[i]]).mean() for i in range(2)]).mean())
            assert metrics[f"chi2_bin{k}"] == pytest.approx(float(by_k[-1]), rel=1e-5)
        per_pixel = torch.stack([(4.0 * r[i][scored[i]] ** 2).mean() for i in range(2)]).mean()
        assert metrics["chi2"] == pytest.approx(float(per_pixel), rel=1e-5)
        assert float(loss) == pytest.approx(float(per_pixel + 0.5 * torch.stack(by_k).mean()), rel=1e-5)
        results[name] = metrics
    # a white residual's block chi^2 stays at its per-pixel level; a coherent one grows like the block size
    assert results["white"]["chi2_bin16"] < 3 * results["white"]["chi2"]
    # (row 1's first block holds 8 scored pixels, so it grows like 8 there)
    blocks_mean = (16 + (31 * 16 + 8) / 32) / 2
    assert results["coherent"]["chi2_bin16"] == pytest.approx(blocks_mean * results["coherent"]["chi2"], rel=1e-4)
    for bad in ((3,), (1,)):
        with pytest.raises(ValueError, match="binned_chi2_scales"):
            SpectrumTokenizerConfig(**{**TINY, "binned_chi2_scales": bad})


def test_quant_noise_skips_rounding_only_for_the_drawn_latents_and_only_in_training():
    from aion.tokenizers.quantizers import FSQ

    fsq = FSQ((8, 5, 3))
    z = torch.randn(4, 6, 3) * 2
    codes, idx = fsq.quantize(z)
    skip = torch.zeros(4, 6, dtype=torch.bool)
    skip[1, 2] = skip[3, 0] = True
    mixed, mixed_idx = fsq.quantize(z, skip)
    half = torch.tensor([4.0, 2.0, 1.0])
    assert torch.equal(mixed_idx, idx)  # tokens are always the rounded ones
    assert torch.equal(mixed[~skip], codes[~skip])
    assert torch.allclose(mixed[skip], fsq._bound(z)[skip] / half)
    assert not torch.allclose(mixed[skip], codes[skip])

    data = _tiny_training_set(tiny(), 8, seed=7)
    batch = {k: v for k, v in data.items() if k != "amp_index"}
    plain = tiny(quantizer="fsq", fsq_levels=(5, 4, 3))
    noisy = tiny(quantizer="fsq", fsq_levels=(5, 4, 3), quant_noise=0.5)
    noisy.model.load_state_dict(plain.model.state_dict())
    args = (batch["flux"], batch["ivar"], batch["valid"])
    with torch.no_grad():
        plain.model.eval(), noisy.model.eval()
        assert torch.equal(noisy.model(*args)[0], plain.model(*args)[0])  # evaluation always rounds
        noisy.model.train(), plain.model.train()
        assert not torch.allclose(noisy.model(*args)[0], plain.model(*args)[0])
        assert torch.equal(noisy.model(*args)[1], plain.model(*args)[1])
    for bad, match in (({"quant_noise": 1.0, "quantizer": "fsq"}, "quant_noise"),
                       ({"quant_noise": 0.3, "quantizer": "lfq"}, "needs quantizer 'fsq'")):
        with pytest.raises(ValueError, match=match):
            SpectrumTokenizerConfig(**{**TINY, **bad})


# ----------------------------------------------------------------------------- persistence / contract
def test_save_load_round_trip_and_inputs_untouched(tmp_path):
    tok = tiny(quantizer="fsq", fsq_levels=(5, 4, 3))
    rng = np.random.default_rng(5)
    wave, flux, ivar = sdss_like(rng)
    batch = batch_of(wave, flux, ivar)
    before = {k: getattr(batch, k).copy() for k in ("flux", "ivar", "wavelength", "valid")}
    tokens = tok.encode(batch)
    tok.decode(tokens)
    for k, v in before.items():
        assert np.array_equal(getattr(batch, k), v), k
    assert tokens.shape == (1, tok.num_tokens) and tok.num_tokens == 512 // 8 + 1
    assert tok.vocab_size == 60 + tok.config.n_amp_bins and int(tokens.max()) < tok.vocab_size
    tok.save_pretrained(tmp_path / "spec")
    loaded = load_tokenizer(tmp_path / "spec")
    assert isinstance(loaded, SpectrumTokenizer) and loaded.config == tok.config
    assert torch.equal(loaded.encode(batch), tokens)
    np.testing.assert_array_equal(loaded.decode(tokens).flux, tok.decode(tokens).flux)
    # decode on a requested grid: outside the tokenizer grid is invalid, padding stays padding
    req = np.stack([pad(np.linspace(3900, 5000, 50), 5, -1.0)])
    out = tok.decode(tokens, wavelength=req)
    assert out.flux.shape == (1, 55) and not out.valid[0, -5:].any()
    assert not out.valid[0, req[0] < tok.config.edges[0]].any() and out.valid[0, (req[0] > 4000)].all()


def test_empty_and_all_masked_spectra_are_handled():
    tok = tiny()
    rng = np.random.default_rng(6)
    wave = tok.wavelength[10:300]
    good, ivar = galaxy(wave, rng)
    rows_w = [wave, wave, wave + 5000.0, np.full(wave.size, -1.0)]  # ok, all masked, off-grid, all padding
    valid = np.ones((4, wave.size), bool)
    valid[1] = False
    batch = SpectrumBatch(flux=np.stack([good] * 4), ivar=np.stack([ivar] * 4), wavelength=np.stack(rows_w),
                          valid=valid)
    tokens = tok.encode(batch)
    assert tokens.shape == (4, tok.num_tokens)
    assert (tokens[1:, 0] == tok.codebook_size).all()  # amplitude bin 0 marks "nothing there"
    assert torch.equal(tokens[1], tokens[2]) and torch.equal(tokens[1], tokens[3])
    dec = tok.decode(tokens, wavelength=wave)
    assert np.isfinite(dec.flux).all() and np.isfinite(dec.ivar).all()
    prep = tok.prepare(batch)
    assert all(torch.isfinite(prep[k]).all() for k in ("flux", "ivar"))
    tok.model.eval()
    loss, _ = tok.model.loss({k: v for k, v in prep.items() if k != "amp_index"})
    assert torch.isfinite(loss)
    empty = SpectrumBatch(flux=np.zeros((0, 5)), ivar=np.zeros((0, 5)), wavelength=np.zeros((0, 5)) + 4500,
                          valid=np.zeros((0, 5), bool))
    assert tok.encode(empty).shape == (0, tok.num_tokens)


def test_clear_errors():
    tok = tiny()
    good = torch.full((2, tok.num_tokens), 0, dtype=torch.long)
    good[:, 0] = tok.codebook_size
    tok.decode(good)
    with pytest.raises(ValueError, match="expected shape"):
        tok.decode(good[:, :-1])
    with pytest.raises(ValueError, match="integer"):
        tok.decode(good.float())
    bad = good.clone()
    bad[0, 0] = 0
    with pytest.raises(ValueError, match="amplitude"):
        tok.decode(bad)
    bad = good.clone()
    bad[0, 3] = tok.codebook_size
    with pytest.raises(ValueError, match="codes"):
        tok.decode(bad)
    with pytest.raises(ValueError, match="wavelength"):
        tok.decode(good, wavelength=np.ones((3, 10)) * 4500)
    with pytest.raises(TypeError, match="SpectrumBatch"):
        tok.encode(np.zeros((2, 100)))
    with pytest.raises(BatchValidationError, match="expected shape"):
        SpectrumBatch(flux=np.zeros(100), ivar=np.zeros(100), wavelength=np.zeros(100), valid=np.ones(100, bool))
    with pytest.raises(ValueError, match="divisible"):
        SpectrumTokenizerConfig(**{**TINY, "n_pix": 500})
    with pytest.raises(ValueError, match="unknown key"):
        load_recipe({"tokenizer": {"n_pixels": 3}})


def test_resample_groups_rows_and_matches_row_by_row():
    rng = np.random.default_rng(7)
    cfg = SpectrumTokenizerConfig(**TINY)
    w1, f1, i1 = sdss_like(rng, 600)
    w2 = np.linspace(4200, 5800, 600)
    f2, i2 = galaxy(w2, rng)
    batch = SpectrumBatch(flux=np.stack([f1, f2, f1]), ivar=np.stack([i1, i2, i1]), wavelength=np.stack([w1, w2, w1]),
                          valid=np.ones((3, 600), bool))
    together = resample_spectra(batch, cfg.edges)
    for i in range(3):
        alone = resample_spectra(batch.select([i]), cfg.edges)
        for a, b in zip(together, alone, strict=True):
            assert np.array_equal(a[i], b[0])


# ----------------------------------------------------------------------------- training entry point
def test_train_entry_point_writes_a_loadable_tokenizer_and_resumes(tmp_path):
    rng = np.random.default_rng(8)
    n, width = 24, 600
    wave = np.full((n, width), -1.0, np.float32)
    flux = np.zeros((n, width), np.float32)
    ivar = np.zeros((n, width), np.float32)
    for i in range(n):
        k = int(rng.integers(400, width + 1))
        wave[i, :k] = 4100 + 3.0 * np.arange(k)
        flux[i, :k], ivar[i, :k] = galaxy(wave[i, :k].astype(np.float64), rng)
    cols = {"object_id": np.arange(n, dtype=np.int64), "ra": rng.uniform(150, 151, n), "dec": np.zeros(n),
            "healpix": np.zeros(n, np.int64), "spectrum_flux": flux, "spectrum_ivar": ivar,
            "spectrum_lambda": wave, "spectrum_mask": wave <= 0,
            "spectrum_lsf_sigma": np.ones((n, width), np.float32)}
    with MMUShardWriter(shard_path(tmp_path / "mmu", "sdss", "dr16", 1)) as w:
        w.append(cols)
    recipe = {"tokenizer": TINY, "data": {"survey": "sdss", "modality": "sdss_spectrum", "val_fraction": 0.2},
              "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1}}
    m = train_spectrum_tokenizer(recipe, tmp_path / "mmu", tmp_path / "run", progress=False)
    assert m["n_train"] + m["n_val"] == n and np.isfinite(m["loss"]) and "val_heldout_chi2_median" in m
    tok = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert isinstance(tok, SpectrumTokenizer)
    assert load_recipe(tmp_path / "run" / "recipe.yaml").train.steps == 4
    # resuming a finished run trains nothing more and gives the same tokenizer
    recipe["train"]["steps"] = 4
    train_spectrum_tokenizer(recipe, tmp_path / "mmu", tmp_path / "run", progress=False)
    again = load_tokenizer(tmp_path / "run" / "tokenizer")
    for k, v in tok.state_tensors().items():
        assert torch.equal(v, again.state_tensors()[k]), k
    # mock-only data options on a directory without a truth table: a named error, nothing written
    for key, value in (("noise_pairs", True), ("extra_from_truth", 10)):
        bad = {**recipe, "data": {**recipe["data"], key: value}}
        with pytest.raises(ValueError, match=f"data.{key}.*truth"):
            train_spectrum_tokenizer(bad, tmp_path / "mmu", tmp_path / f"bad_{key}", progress=False)
        assert not (tmp_path / f"bad_{key}").exists()


def test_balance_spectra_averages_log_chi2_per_spectrum():
    kw = dict(holdout_fraction=0.0, binned_chi2_scales=(2, 4), binned_chi2_weight=1.0, quantizer="fsq",
              fsq_levels=(5, 4, 3))  # FSQ: no auxiliary term, so the loss is the chi^2 alone
    plain, balanced = tiny(**kw), tiny(**kw, balance_spectra=True)
    balanced.model.load_state_dict(plain.model.state_dict())
    data = {k: v for k, v in _tiny_training_set(plain, 6, seed=3).items() if k != "amp_index"}
    plain.model.eval(), balanced.model.eval()
    with torch.no_grad():
        loss, metrics = balanced.model.loss(data)
        # each spectrum alone: the plain loss is that spectrum's per-pixel + binned chi^2
        singles = torch.stack([plain.model.loss({k: v[i:i + 1] for k, v in data.items()})[0] for i in range(6)])
        full_plain = plain.model.loss(data)[1]
    assert float(singles.max()) > 1.5 * float(singles.min())  # spectra fitted unequally
    torch.testing.assert_close(loss, torch.log(singles + 1e-6).mean(), rtol=1e-5, atol=1e-6)
    assert metrics["chi2"] == pytest.approx(full_plain["chi2"], rel=1e-5)
    assert metrics["chi2_bin4"] == pytest.approx(full_plain["chi2_bin4"], rel=1e-5)

"""Tests for the band-aware image tokenizer (aion.tokenizers.image), on a tiny network.

Each test targets one promise a user relies on: token shapes and ranges, physical units on
decode, per-object band subsets, a loss that sees only valid pixels and weights them by
ivar, zero-point invariance, lossless save/load, untouched inputs, and clear errors.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from aion.data.batches import ImageBatch
from aion.tokenizers import load_tokenizer
from aion.tokenizers.image import (
    ImageTokenizer,
    ImageTokenizerConfig,
    box_cox,
    evaluate_image_tokenizer,
    stack_known_bands,
    train_image_tokenizer,
)
from aion.tokenizers.trainer import TrainConfig, train

LEGACY = ("des-g", "des-r", "des-i", "des-z")
HSC = ("hsc-g", "hsc-r", "hsc-i", "hsc-z", "hsc-y")
HSC_TO_NMGY = 10 ** (-0.4 * (27.0 - 22.5))


def tiny_config(**kw) -> ImageTokenizerConfig:
    base = dict(crop_size=16, downsample=4, channels=(4, 8, 8), blocks_per_stage=1, fsq_levels=(8, 5, 5, 5),
                arcsinh_scale=(1.0,) * 9)
    base.update(kw)
    return ImageTokenizerConfig(**base)


def tiny_tokenizer(seed: int = 0, **kw) -> ImageTokenizer:
    torch.manual_seed(seed)
    return ImageTokenizer(tiny_config(**kw))


def blobs(n: int, bands: tuple[str, ...], size: int = 16, seed: int = 0, zero_point: float = 22.5,
          pixel_scale: float = 0.262) -> ImageBatch:
    """Gaussian galaxies with unit sky noise (in nanomaggies), some masked pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size // 2
    amp = rng.uniform(5, 60, (n, len(bands), 1, 1))
    sig = rng.uniform(1.0, 3.0, (n, 1, 1, 1))
    model = amp * np.exp(-(xx**2 + yy**2) / (2 * sig**2))
    flux = model + rng.standard_normal(model.shape)
    ivar = np.ones_like(flux)
    valid = rng.random(flux.shape) > 0.03
    f = 10 ** (0.4 * (zero_point - 22.5))
    return ImageBatch(flux=flux * f, ivar=ivar / f**2, valid=valid, bands=bands, pixel_scale=pixel_scale,
                      psf_fwhm=np.ones((n, len(bands))), zero_point=zero_point)


def known_layout(tok: ImageTokenizer, batch: ImageBatch) -> dict[str, torch.Tensor]:
    p = tok.prepare(batch)
    k = len(tok.config.bands)
    out = {"flux": torch.zeros(len(batch), k, *p["flux"].shape[2:]),
           "ivar": torch.zeros(len(batch), k, *p["flux"].shape[2:]),
           "valid": torch.zeros(len(batch), k, *p["flux"].shape[2:], dtype=torch.bool)}
    for key in out:
        out[key][:, p["band_index"]] = torch.from_numpy(p[key])
    return out


# ------------------------------------------------------------------------ shapes and units
def test_token_shapes_dtype_and_range():
    tok = tiny_tokenizer()
    assert tok.num_tokens == 16 and tok.vocab_size == 1000
    assert set(tok.modalities) >= {"legacysurvey_image", "hsc_image"}
    batch = blobs(6, LEGACY, size=20)
    tokens = tok.encode(batch)
    assert tokens.shape == (6, 16) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tok.vocab_size
    assert tok.encode(batch.select(slice(0, 0))).shape == (0, 16)


def test_decode_returns_requested_bands_zero_point_and_units():
    tok = tiny_tokenizer()
    tokens = tok.encode(blobs(3, LEGACY))
    hsc = tok.decode(tokens, modality="hsc_image")
    assert hsc.bands == HSC and hsc.zero_point == 27.0 and hsc.pixel_scale == pytest.approx(0.168)
    assert hsc.flux.shape == (3, 5, 16, 16) and hsc.valid.all()
    two = tok.decode(tokens, bands=("des-r", "des-g"))
    assert two.bands == ("des-r", "des-g") and two.zero_point == 22.5 and two.pixel_scale == pytest.approx(0.262)
    same = tok.decode(tokens, bands=("des-r", "des-g"), zero_point=27.0)
    np.testing.assert_allclose(same.flux * HSC_TO_NMGY, two.flux, rtol=1e-5, atol=1e-9)
    full = tok.decode_flux(tokens)
    np.testing.assert_allclose(two.flux[:, 0], full[:, 1].numpy(), rtol=1e-6)
    # a decoded batch survives re-validation (ivar is tiny but positive, so pixels stay valid)
    assert two.select([0]).valid.all() and np.allclose(two.select([0]).flux, two.flux[:1])


# ------------------------------------------------------------------------ training signal
def test_training_steps_halve_the_loss(tmp_path):
    torch.set_num_threads(1)
    tok = tiny_tokenizer(seed=1)
    data = known_layout(tok, blobs(128, LEGACY, seed=3))

    def get_batch(idx):
        return {k: v[torch.from_numpy(idx)] for k, v in data.items()}

    cfg = TrainConfig(steps=150, batch_size=16, lr=5e-3, warmup_steps=10, log_every=50, checkpoint_every=1000)
    with torch.no_grad():
        loss0, first = tok.model.loss(data)
    train(tok.model, get_batch, 128, cfg, tmp_path, progress=False)
    with torch.no_grad():
        loss1, last = tok.model.loss(data)
    # the reduced chi^2 (what the loss balances over objects) falls at least 2x, and so does the loss
    assert float(last["chi2"]) < 0.5 * float(first["chi2"]), (first, last)
    assert float(loss1) < float(loss0) - math.log(2)


@pytest.mark.parametrize("balance", [True, False])
def test_loss_ignores_invalid_pixels_and_weights_by_ivar(balance):
    tok = tiny_tokenizer(error_floor=0.0, balance_objects=balance)  # per-pixel + binned chi^2
    data = known_layout(tok, blobs(4, LEGACY, seed=5))
    with torch.no_grad():
        base, metrics = tok.model.loss(data)
        assert {"chi2", "chi2_bin2", "chi2_bin4", "chi2_bin8"} <= set(metrics)
        poked = {k: v.clone() for k, v in data.items()}
        invalid = ~poked["valid"]
        assert invalid.any()
        poked["flux"][invalid] = 1e6  # garbage under the mask
        poked["ivar"][invalid] = 123.0  # even a stray ivar there must not count
        assert torch.equal(tok.model.loss(poked)[0], base)
        doubled = {**data, "ivar": data["ivar"] * 2}
        expected = base + math.log(2) if balance else 2 * base  # balanced: mean over objects of log chi^2
        torch.testing.assert_close(tok.model.loss(doubled)[0], expected, rtol=1e-5, atol=1e-5)
    # pooled per-pixel term alone: one pixel given 100x the weight adds exactly 99x its chi^2 term
    tok = tiny_tokenizer(error_floor=0.0, binned_chi2_weight=0.0, balance_objects=False)
    with torch.no_grad():
        base, _ = tok.model.loss(data)
        _, plain, _ = tok.model.chi2_terms(data)
        b, c, y, x = map(int, torch.nonzero(data["valid"])[7])
        heavy = {**data, "ivar": data["ivar"].clone()}
        heavy["ivar"][b, c, y, x] *= 100
        n = data["valid"].sum()
        torch.testing.assert_close(tok.model.loss(heavy)[0], base + 99 * plain[b, c, y, x] / n)


def test_balance_power_interpolates_between_log_and_mean_chi2():
    data = known_layout(tiny_tokenizer(), blobs(5, LEGACY, seed=4))
    losses = {}
    for p in (0.0, 0.5, 1.0):
        tok = tiny_tokenizer(seed=3, balance_power=p, binned_chi2_weight=0.0)
        with torch.no_grad():
            resid, weight, _, valid = tok.model.residuals(data)
            per_obj = (weight * resid**2).flatten(1).sum(1) / valid.flatten(1).sum(1)
            losses[p] = (float(tok.model.loss(data)[0]), per_obj.double() + 1e-6)
    chi2 = losses[0.0][1]
    assert float(chi2.min()) > 1.5 and float(chi2.max()) > 2 * float(chi2.min())  # objects fitted unequally
    assert losses[0.0][0] == pytest.approx(float(chi2.log().mean()), rel=1e-5)
    assert losses[0.5][0] == pytest.approx(float(((chi2**0.5 - 1) / 0.5).mean()), rel=1e-5)
    assert losses[1.0][0] == pytest.approx(float(chi2.mean() - 1), rel=1e-5)
    # an object's pull on the gradient grows like chi2^p: d loss / d chi2_i = chi2_i^(p - 1) / n
    x = chi2.clone().requires_grad_(True)
    box_cox(x, 0.5).mean().backward()
    torch.testing.assert_close(x.grad, chi2 ** -0.5 / len(chi2))
    for bad, match in (({"balance_power": 1.5}, "balance_power"),
                       ({"balance_power": 0.5, "balance_objects": False}, "needs balance_objects")):
        with pytest.raises(ValueError, match=match):
            tiny_config(**bad)


def test_binned_chi2_sees_coherent_offsets():
    tok = tiny_tokenizer(error_floor=0.0)
    data = known_layout(tok, blobs(1, LEGACY, seed=11))
    resid = torch.full(data["flux"].shape, 0.2)  # 0.2 sigma everywhere: negligible per pixel
    valid = data["valid"]
    resid = torch.where(valid, resid, torch.zeros(()))
    weight = torch.where(valid, data["ivar"], torch.zeros(()))
    per_pixel = float((weight * resid**2).sum() / valid.sum())
    b8 = float(tok.model.binned_chi2(resid, weight, valid, 8)[0])
    assert per_pixel == pytest.approx(0.04, rel=1e-4)
    assert b8 > 30 * per_pixel  # ~ 64 x 0.04 for fully valid blocks


def test_quant_noise_skips_rounding_only_in_training_and_never_changes_tokens():
    plain = tiny_tokenizer(seed=2)
    noisy = tiny_tokenizer(seed=2, quant_noise=0.5)
    noisy.model.load_state_dict(plain.model.state_dict())
    data = known_layout(plain, blobs(6, LEGACY, seed=9))
    args = (data["flux"], data["valid"], torch.arange(9))
    with torch.no_grad():
        codes, tokens, _ = plain.model.encode(*args)
        # evaluation (and so tokenization) always rounds
        assert torch.equal(noisy.model.encode(*args)[0], codes)
        assert torch.equal(noisy.encode(blobs(6, LEGACY, seed=9)), plain.encode(blobs(6, LEGACY, seed=9)))
        noisy.model.train()
        torch.manual_seed(0)
        mixed, mixed_tokens, _ = noisy.model.encode(*args)
        noisy.model.eval()
    assert torch.equal(mixed_tokens, tokens)  # tokens are the rounded ones in training too
    grid = codes.shape[-1] ** 2
    differs = (mixed != codes).any(dim=1).flatten(1)  # latent vectors that skipped rounding
    share = float(differs.float().mean())
    assert 0.3 < share < 0.7, share  # ~ half of the 6 x 16 latent vectors
    assert differs.sum() < differs.numel() and differs.flatten().shape[0] == 6 * grid
    # an unrounded code stays within half a rounding step of its rounded value
    half_width = torch.tensor([4.0, 2.0, 2.0, 2.0])[None, :, None, None]
    assert float(((mixed - codes) * half_width).abs().max()) <= 0.5 + 1e-5
    with pytest.raises(ValueError, match="quant_noise"):
        tiny_config(quant_noise=1.0)


def test_error_floor_only_down_weights_bright_pixels():
    tok = tiny_tokenizer(error_floor=0.05)
    data = known_layout(tok, blobs(4, LEGACY, seed=6))
    with torch.no_grad():
        floored, plain, valid = tok.model.chi2_terms(data)
    ratio = (floored / plain.clamp_min(1e-30))[valid & (plain > 0)]
    snr = (data["flux"] * data["ivar"].sqrt())[valid & (plain > 0)]
    assert torch.all(ratio <= 1 + 1e-6)
    assert torch.all(ratio[snr.abs() < 1] > 0.99) and torch.all(ratio[snr.abs() > 40] < 0.5)


# ------------------------------------------------------------------------ band subsets
def test_absent_band_contributes_nothing_garbage_or_zeros():
    tok = tiny_tokenizer()
    batch = blobs(3, LEGACY, seed=2)
    zeros = ImageBatch(flux=batch.flux.copy(), ivar=batch.ivar.copy(), valid=batch.valid.copy(), bands=LEGACY,
                       pixel_scale=0.262, psf_fwhm=batch.psf_fwhm)
    zeros.flux[:, 0] = 0.0
    zeros.valid[:, 0] = False
    zeros.ivar[:, 0] = 0.0
    garbage = ImageBatch(flux=batch.flux.copy(), ivar=batch.ivar.copy(), valid=batch.valid.copy(), bands=LEGACY,
                         pixel_scale=0.262, psf_fwhm=batch.psf_fwhm)
    garbage.flux[:, 0] = np.random.default_rng(0).normal(0, 1e4, garbage.flux[:, 0].shape)
    garbage.ivar[:, 0] = 0.0  # absent band, as the mock writes it: ivar 0 (-> invalid) with junk flux
    garbage = ImageBatch(flux=garbage.flux, ivar=garbage.ivar, valid=garbage.valid, bands=LEGACY,
                         pixel_scale=0.262, psf_fwhm=batch.psf_fwhm)
    assert not garbage.band_present[:, 0].any()
    assert torch.equal(tok.encode(zeros), tok.encode(garbage))
    # also at the network level, where the flux plane still holds the garbage
    lay_z, lay_g = known_layout(tok, zeros), known_layout(tok, zeros)
    lay_g["flux"][:, 0] = torch.randn_like(lay_g["flux"][:, 0]) * 1e4
    idx = torch.arange(9)
    with torch.no_grad():
        assert torch.equal(tok.model.latents(lay_z["flux"], lay_z["valid"], idx),
                           tok.model.latents(lay_g["flux"], lay_g["valid"], idx))
    # and an absent band equals not having the band at all
    rest = ImageBatch(flux=batch.flux[:, 1:], ivar=batch.ivar[:, 1:], valid=batch.valid[:, 1:], bands=LEGACY[1:],
                      pixel_scale=0.262, psf_fwhm=batch.psf_fwhm[:, 1:])
    p_all, p_rest = tok.prepare(zeros), tok.prepare(rest)
    with torch.no_grad():
        z_all = tok.model.latents(torch.from_numpy(p_all["flux"]), torch.from_numpy(p_all["valid"]),
                                  torch.tensor(p_all["band_index"]))
        z_rest = tok.model.latents(torch.from_numpy(p_rest["flux"]), torch.from_numpy(p_rest["valid"]),
                                   torch.tensor(p_rest["band_index"]))
    torch.testing.assert_close(z_all, z_rest, rtol=1e-5, atol=1e-5)


def test_band_presence_is_per_object_not_per_batch():
    tok = tiny_tokenizer()
    batch = blobs(2, LEGACY, seed=4)
    valid = batch.valid.copy()
    valid[0, 0] = False  # object 0 lacks g
    valid[1, 3] = False  # object 1 lacks z
    mixed = ImageBatch(flux=batch.flux, ivar=batch.ivar, valid=valid, bands=LEGACY, pixel_scale=0.262,
                       psf_fwhm=batch.psf_fwhm)
    pm = tok.prepare(mixed)
    with torch.no_grad():
        z_mixed = tok.model.latents(torch.from_numpy(pm["flux"]), torch.from_numpy(pm["valid"]),
                                    torch.tensor(pm["band_index"]))
        for obj, keep in ((0, [1, 2, 3]), (1, [0, 1, 2])):
            alone = ImageBatch(flux=batch.flux[obj:obj + 1, keep], ivar=batch.ivar[obj:obj + 1, keep],
                               valid=batch.valid[obj:obj + 1, keep], bands=tuple(LEGACY[k] for k in keep),
                               pixel_scale=0.262, psf_fwhm=batch.psf_fwhm[obj:obj + 1, keep])
            pa = tok.prepare(alone)
            z_alone = tok.model.latents(torch.from_numpy(pa["flux"]), torch.from_numpy(pa["valid"]),
                                        torch.tensor(pa["band_index"]))
            torch.testing.assert_close(z_mixed[obj:obj + 1], z_alone, rtol=1e-5, atol=1e-5)
    # the two objects' own band sets differ, so their encodings would differ if presence were per batch
    full = tok.encode(batch)
    assert not torch.equal(tok.encode(mixed)[0], full[0]) or not torch.equal(tok.encode(mixed)[1], full[1])


def test_mixed_survey_batch_in_known_band_layout():
    tok = tiny_tokenizer()
    leg, hsc = blobs(2, LEGACY, seed=7), blobs(2, HSC, seed=8, zero_point=27.0, pixel_scale=0.168)
    sets = []
    for b in (leg, hsc):
        p = tok.prepare(b)
        sets.append(type("S", (), {"flux": p["flux"], "ivar": p["ivar"], "valid": p["valid"],
                                   "band_index": p["band_index"]})())
    lay = stack_known_bands(sets, [(0, 0), (1, 1)], 9)
    with torch.no_grad():
        _, ind, _ = tok.model.encode(lay["flux"], lay["valid"], torch.arange(9))
    assert torch.equal(ind[0], tok.encode(leg)[0])
    assert torch.equal(ind[1], tok.encode(hsc)[1])


def test_augmentation_keeps_the_object_centre():
    from aion.tokenizers.image import _dihedral

    for n in (16, 17):
        a = np.zeros((3, n, n))
        a[:, n // 2, n // 2] = 5.0
        a[:, n // 2, n // 2 + 2] = 1.0  # an asymmetric feature, so all 8 transforms differ
        a[:, n // 2 + 1, n // 2] = 2.0
        outs = [_dihedral((a,), k)[0] for k in range(8)]
        assert all(o[:, n // 2, n // 2].tolist() == [5.0] * 3 and o.sum() == a.sum() for o in outs)
        assert len({o.tobytes() for o in outs}) == 8


# ------------------------------------------------------------------------ units and persistence
def test_hsc_zero_point_27_matches_nanomaggies():
    tok = tiny_tokenizer()
    hsc = blobs(5, HSC, size=24, seed=9, zero_point=27.0, pixel_scale=0.168)
    nmgy = hsc.to_zero_point(22.5)
    assert not np.allclose(hsc.flux, nmgy.flux)
    t27, t225 = tok.encode(hsc), tok.encode(nmgy)
    assert t27.shape == (5, 16)
    assert torch.equal(t27, t225)


def test_save_load_round_trip_and_inputs_untouched(tmp_path):
    tok = tiny_tokenizer(seed=3)
    batch = blobs(4, LEGACY, size=18, seed=10)
    before = {k: getattr(batch, k).copy() for k in ("flux", "ivar", "valid", "psf_fwhm")}
    tokens = tok.encode(batch)
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(batch, k), v)
    path = tok.save_pretrained(tmp_path / "tok")
    config = json.loads((path / "config.json").read_text())
    assert config["tokenizer_type"] == "image" and config["crop_size"] == 16
    again = load_tokenizer(path)
    assert isinstance(again, ImageTokenizer)
    assert torch.equal(again.encode(batch), tokens)
    np.testing.assert_array_equal(again.decode(tokens, modality="legacysurvey_image").flux,
                                  tok.decode(tokens, modality="legacysurvey_image").flux)


# ------------------------------------------------------------------------ amplitude token
def test_amplitude_token_layout_and_value():
    tok = tiny_tokenizer(amplitude_token=True)
    assert tok.num_tokens == 17 and tok.vocab_size == 1000 + 1024
    batch = blobs(5, LEGACY, seed=4)
    tokens = tok.encode(batch)
    assert tokens.shape == (5, 17)
    assert bool((tokens[:, 0] >= 1000).all() and (tokens[:, 0] < 2024).all())
    assert bool((tokens[:, 1:] >= 0).all() and (tokens[:, 1:] < 1000).all())
    # the amplitude is the brightest band's mean valid flux in the central 4x4 pixels
    p = tok.prepare(batch)
    box = np.where(p["valid"], p["flux"], 0)[..., 6:10, 6:10].sum((2, 3)) / p["valid"][..., 6:10, 6:10].sum((2, 3))
    expected = np.round((np.log10(box.max(1)) - tok.config.amp_log_min) * tok.config.amp_bins_per_dex)
    np.testing.assert_array_equal(tokens[:, 0].numpy() - 1000, expected)
    # amplitudes above the grid use the top bin: encode and decode share it, so codes stay consistent
    short = tiny_tokenizer(amplitude_token=True, n_amp_bins=512)
    assert short.vocab_size == 1512 and bool((short.encode(batch)[:, 0] == 1511).all())
    # non-positive or absent centres fall into bin 0 instead of failing
    dark = ImageBatch(flux=-np.ones((1, 4, 16, 16)), ivar=np.ones((1, 4, 16, 16)), valid=np.ones((1, 4, 16, 16), bool),
                      bands=LEGACY, pixel_scale=0.262, psf_fwhm=np.ones((1, 4)))
    assert int(tok.encode(dark)[0, 0]) == 1000


def test_amplitude_token_makes_bright_objects_scale_free():
    """Above the softening switch, 10x the flux changes only the amplitude token (by one dex)
    and decodes to exactly 10x the reconstruction."""
    tok = tiny_tokenizer(seed=2, amplitude_token=True, amp_softening_ratio=2.0, arcsinh_scale=(0.01,) * 9)
    bright = blobs(4, LEGACY, seed=8)
    brighter = ImageBatch(flux=bright.flux * 10, ivar=bright.ivar / 100, valid=bright.valid, bands=LEGACY,
                          pixel_scale=0.262, psf_fwhm=bright.psf_fwhm)
    t1, t10 = tok.encode(bright), tok.encode(brighter)
    assert torch.equal(t10[:, 0], t1[:, 0] + tok.config.amp_bins_per_dex)
    assert torch.equal(t10[:, 1:], t1[:, 1:])
    np.testing.assert_allclose(tok.decode_flux(t10).numpy(), 10 * tok.decode_flux(t1).numpy(), rtol=1e-4, atol=1e-6)
    # without the token the same network's codes do change with brightness
    plain = tiny_tokenizer(seed=2, arcsinh_scale=(0.01,) * 9)
    assert not torch.equal(plain.encode(bright), plain.encode(brighter))


def test_amplitude_token_save_load_train_and_errors(tmp_path):
    torch.set_num_threads(1)
    tok = tiny_tokenizer(seed=5, amplitude_token=True)
    batch = blobs(64, LEGACY, seed=9)
    data = known_layout(tok, batch)
    with torch.no_grad():
        _, first = tok.model.loss(data)
    cfg = TrainConfig(steps=100, batch_size=16, lr=5e-3, warmup_steps=10, log_every=50, checkpoint_every=1000)
    train(tok.model, lambda idx: {k: v[torch.from_numpy(idx)] for k, v in data.items()}, 64, cfg, tmp_path / "t",
          progress=False)
    with torch.no_grad():
        _, last = tok.model.loss(data)
    assert float(last["chi2"]) < 0.5 * float(first["chi2"]), (first, last)
    tokens = tok.encode(batch)
    again = load_tokenizer(tok.save_pretrained(tmp_path / "tok"))
    assert again.config.amplitude_token and torch.equal(again.encode(batch), tokens)
    np.testing.assert_array_equal(again.decode_flux(tokens).numpy(), tok.decode_flux(tokens).numpy())
    bad = tokens.clone()
    bad[0, 0] = 5  # a code value where the amplitude belongs
    with pytest.raises(ValueError, match=r"tokens\[:, 0\] \(amplitude\).*\[1000, 2024\)"):
        tok.decode_flux(bad)
    bad = tokens.clone()
    bad[0, 3] = 1500  # an amplitude value among the codes
    with pytest.raises(ValueError, match=r"code tokens\[:, 1:\].*\[0, 1000\)"):
        tok.decode_flux(bad)
    with pytest.raises(ValueError, match="amp_softening_ratio"):
        tiny_config(amplitude_token=True, amp_softening_ratio=0.0)
    with pytest.raises(ValueError, match="amp_log_min"):
        tiny_config(amplitude_token=True, amp_log_min=float("nan"))


def test_per_band_amplitudes_layout_scale_freedom_and_round_trip(tmp_path):
    """One amplitude token per known band: each band is softened by its own core, so 10x the flux in one
    band (above the switch) changes only that band's amplitude token and decodes to 10x in that band."""
    tok = tiny_tokenizer(seed=3, amplitude_token=True, amp_per_band=True, amp_softening_ratio=2.0,
                         arcsinh_scale=(0.01,) * 9)
    k = len(tok.config.bands)
    assert tok.num_tokens == k + 16 and tok.vocab_size == 1000 + 1024
    batch = blobs(4, LEGACY, seed=11)
    tokens = tok.encode(batch)
    assert tokens.shape == (4, k + 16)
    p = tok.prepare(batch)
    box = np.where(p["valid"], p["flux"], 0)[..., 6:10, 6:10].sum((2, 3)) / p["valid"][..., 6:10, 6:10].sum((2, 3))
    expected = np.zeros((4, k))
    expected[:, p["band_index"]] = np.round((np.log10(box) - tok.config.amp_log_min) * tok.config.amp_bins_per_dex)
    np.testing.assert_array_equal(tokens[:, :k].numpy() - 1000, expected)  # HSC slots: bin 0
    r = LEGACY.index("des-r")
    scaled = batch.flux.copy()
    scaled[:, r] *= 10
    brighter = ImageBatch(flux=scaled, ivar=batch.ivar, valid=batch.valid, bands=LEGACY, pixel_scale=0.262,
                          psf_fwhm=batch.psf_fwhm)
    t10 = tok.encode(brighter)
    j = p["band_index"][r]
    shift = torch.zeros_like(tokens)
    shift[:, j] = tok.config.amp_bins_per_dex
    assert torch.equal(t10, tokens + shift)
    d1, d10 = tok.decode_flux(tokens).numpy(), tok.decode_flux(t10).numpy()
    np.testing.assert_allclose(d10[:, j], 10 * d1[:, j], rtol=1e-4, atol=1e-6)
    others = [i for i in range(k) if i != j]
    np.testing.assert_array_equal(d10[:, others], d1[:, others])
    # with one shared amplitude the same change moves the other bands' softening and codes
    shared = tiny_tokenizer(seed=3, amplitude_token=True, amp_softening_ratio=2.0, arcsinh_scale=(0.01,) * 9)
    assert not torch.equal(shared.encode(brighter)[:, 1:], shared.encode(batch)[:, 1:])
    again = load_tokenizer(tok.save_pretrained(tmp_path / "tok"))
    assert again.config.amp_per_band and torch.equal(again.encode(batch), tokens)
    bad = tokens.clone()
    bad[0, 2] = 7
    with pytest.raises(ValueError, match=rf"tokens\[:, :{k}\] \(amplitude\)"):
        tok.decode_flux(bad)
    with pytest.raises(ValueError, match="amp_per_band"):
        tiny_config(amp_per_band=True)


# ------------------------------------------------------------------------ errors
def test_clear_errors():
    tok = tiny_tokenizer()
    wise = ImageBatch(flux=np.zeros((1, 1, 16, 16)), ivar=np.ones((1, 1, 16, 16)), valid=np.ones((1, 1, 16, 16), bool),
                      bands=("wise-w1",), pixel_scale=2.75, psf_fwhm=np.ones((1, 1)))
    with pytest.raises(ValueError, match="unknown band.*wise-w1"):
        tok.encode(wise)
    with pytest.raises(ValueError, match="12x12 pixels.*16x16 centre crop"):
        tok.encode(blobs(1, LEGACY, size=12))
    with pytest.raises(ValueError, match="unknown band"):
        tok.decode(torch.zeros(1, 16, dtype=torch.long), bands=("des-q",))
    with pytest.raises(ValueError, match="needs bands"):
        tok.decode(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, 16\)"):
        tok.decode(torch.zeros(1, 15, dtype=torch.long), modality="hsc_image")
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        tok.decode(torch.full((1, 16), 1000), modality="hsc_image")
    with pytest.raises(TypeError, match="zeropoint"):
        tok.decode(torch.zeros(1, 16, dtype=torch.long), modality="hsc_image", zeropoint=27.0)
    with pytest.raises(TypeError, match="ImageBatch"):
        tok.encode(np.zeros((1, 4, 16, 16)))
    with pytest.raises(ValueError, match="multiple of downsample"):
        tiny_config(crop_size=18)
    with pytest.raises(ValueError, match="levels"):
        tiny_config(channels=(4, 8))


# ------------------------------------------------------------------------ end to end on a small mock
@pytest.fixture(scope="module")
def small_mock(tmp_path_factory):
    from aion.mock.universe import MockConfig, generate

    out = tmp_path_factory.mktemp("img_mock")
    generate(out, MockConfig(n=24, seed=2, image_size=24, hsc_image_size=32, hsc_pixels=2, footprint_radius_deg=0.5),
             progress=False)
    return out


def test_train_resume_and_evaluate_on_mock(tmp_path, small_mock):
    recipe = {"tokenizer": {"crop_size": 16, "channels": [4, 8, 8], "fsq_levels": [5, 5, 5]},
              "data": {"surveys": ["legacysurvey", "hsc"], "val_fraction": 0.1},
              "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 3}}
    m = train_image_tokenizer(recipe, small_mock, tmp_path / "run", progress=False)
    assert np.isfinite(m["loss"]) and "val_chi2_legacysurvey" in m
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    tok = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert tok.config.arcsinh_scale is not None and len(tok.config.arcsinh_scale) == 9
    # a rerun resumes from the last checkpoint instead of training again
    recipe["train"]["steps"] = 8
    m2 = train_image_tokenizer(recipe, small_mock, tmp_path / "run", progress=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8 and np.isfinite(m2["loss"])
    res = evaluate_image_tokenizer(tmp_path / "run" / "tokenizer", small_mock, tmp_path / "eval", n_panels=2)
    for survey in ("legacysurvey", "hsc"):
        r = res[survey]
        assert r["n_objects"] > 0 and np.isfinite(r["reduced_chi2"]) and np.isfinite(r["rms_vs_truth_over_noise"])
        by_snr = r["reduced_chi2_by_object_snr"].values()
        assert sum(b["n"] for b in by_snr) == r["n_objects"]
        assert sum(b["share_of_chi2"] for b in by_snr) == pytest.approx(1.0)
        by_pixel = r["reduced_chi2_by_pixel_snr"]
        assert sum(b["share_of_chi2"] for b in by_pixel.values()) == pytest.approx(1.0)
        n_pix = sum(b["n_pixels"] for b in by_pixel.values())
        pooled = sum(b["reduced_chi2"] * b["n_pixels"] for b in by_pixel.values()) / n_pix
        assert pooled == pytest.approx(r["reduced_chi2"], rel=1e-6)
        # the mock plants hidden physics; objects with none of it form their own class
        classes = r["reduced_chi2_by_hidden_class"]
        assert "none" in classes and classes["none"]["n"] <= r["n_objects"]
        assert all(0 <= c["share_of_chi2"] <= 1 for c in classes.values())
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert (tmp_path / "eval" / "panels_hsc.png").is_file()


def test_training_is_reproducible(tmp_path, small_mock):
    """The same recipe twice gives byte-identical weights (the initialisation is seeded too)."""
    recipe = {"tokenizer": {"crop_size": 16, "channels": [4, 8, 8], "fsq_levels": [5, 5, 5]},
              "data": {"surveys": ["legacysurvey"], "val_fraction": 0.1},
              "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2}}
    torch.manual_seed(123)  # whatever the global RNG state before, the result must not depend on it
    train_image_tokenizer(recipe, small_mock, tmp_path / "a", progress=False)
    torch.rand(7)
    train_image_tokenizer(recipe, small_mock, tmp_path / "b", progress=False)
    a, b = ((tmp_path / r / "tokenizer" / "model.safetensors").read_bytes() for r in ("a", "b"))
    assert a == b

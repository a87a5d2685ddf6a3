"""Inference library: embeddings, zero-shot scalar posteriors, MaskGIT generation, errors, loading.

One tiny FourM is trained once (module fixture, 300 steps, ~10 s) on a synthetic world where
``provabgs_z`` (a label, never an input) = 1.5 flux_g + noise and ``legacysurvey_shape_r`` =
2 flux_g + 1 exactly (so its fine token is predictable from flux_g's fine token);
``legacysurvey_flux_r`` is an unrelated input and ``legacysurvey_image`` comes from a tiny
untrained image tokenizer (16 tokens per object, vocab 9), present for 30% of training objects.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from aion.data.batches import ImageBatch, ScalarBatch
from aion.inference import AionModel, mask_schedule, select_inputs
from aion.inference.model import _estimates
from aion.model import FourM, ModalitySpec, preset
from aion.tokenizers.binning import QuantileBinning
from aion.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from aion.tokenizers.scalar import ScalarTokenizer
from aion.training.checkpoint import COMPLETE, MODEL_CONFIG, WEIGHTS, export_model, save_model_config, save_weights
from aion.training.masking import MaskingConfig, MaskingSampler, collate

torch.set_num_threads(1)

BANDS = ("des-g", "des-r", "des-i", "des-z")
A, B, T, Y = "legacysurvey_flux_g", "legacysurvey_flux_r", "provabgs_z", "legacysurvey_shape_r"
IMG = "legacysurvey_image"


def world(n: int, seed: int, image_fraction: float = 1.0) -> dict:
    """Typed batches of n synthetic objects (image present for ``image_fraction`` of them)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    yy, xx = np.mgrid[:8, :8] - 3.5
    profile = np.exp(-(xx**2 + yy**2) / 4.0)
    flux = (np.exp(a)[:, None, None, None] * profile * 0.05 + 0.02 * rng.normal(size=(n, 4, 8, 8))).astype(np.float32)
    valid = np.ones(flux.shape, dtype=bool)
    valid[rng.random(n) >= image_fraction] = False
    image = ImageBatch(flux=flux, ivar=np.full(flux.shape, 1e4, np.float32), valid=valid, bands=BANDS,
                       pixel_scale=0.262, psf_fwhm=np.ones((n, 4), np.float32))
    values = {A: a, B: b, T: 1.5 * a + 0.15 * rng.normal(size=n), Y: 2 * a + 1}
    return {**{k: ScalarBatch(name=k, values=v) for k, v in values.items()}, IMG: image}


def make_tokenizers(train: dict) -> dict:
    toks = {name: ScalarTokenizer(name, QuantileBinning(64), fine_bins=8 if name in (A, Y) else 0).fit(train[name])
            for name in (A, B, T, Y)}
    torch.manual_seed(0)
    image = ImageTokenizer(ImageTokenizerConfig(bands=BANDS, crop_size=8, downsample=2, channels=(4, 8),
                                                fsq_levels=(3, 3), norm="none"))
    with torch.no_grad():  # untrained codes sit near 0 and would all round to one token: spread them
        image.model.to_code[-1].weight.mul_(30)
    toks[IMG] = image
    return toks


@pytest.fixture(scope="module")
def trained() -> AionModel:
    train = world(3000, 0, image_fraction=0.3)
    toks = make_tokenizers(train)
    model = FourM(preset("tiny", {n: ModalitySpec(num_tokens=t.num_tokens, vocab_size=t.vocab_size)
                                  for n, t in toks.items()}, dim=32))
    am = AionModel(model, toks)
    tokens, present = am.tokenize(train)
    tokens = {k: v.numpy() for k, v in tokens.items()}
    present = {k: v.numpy() for k, v in present.items()}
    torch.manual_seed(0)
    model = FourM(model.cfg)
    sampler = MaskingSampler(MaskingConfig(input_budget=16, target_budget=8))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 100))
    rng = np.random.default_rng(0)
    for _ in range(300):  # seeds 0-5 all pass the accuracy tests below with this recipe
        idx = rng.integers(0, 3000, 64)
        samples = [sampler({k: v[i] for k, v in tokens.items()}, {k: bool(v[i]) for k, v in present.items()}, rng)
                   for i in idx]
        loss = model(collate(samples, modalities=model.names))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        warmup.step()
    return AionModel(model, toks)


@pytest.fixture(scope="module")
def test_set(trained: AionModel) -> tuple[dict, dict, dict]:
    objects = world(200, 1, image_fraction=0.5)
    tokens, present = trained.tokenize(objects)
    return tokens, present, objects


def subset(d: dict, idx) -> dict:
    return {k: v[idx] for k, v in d.items()}


# ---------------------------------------------------------------------------- helpers
def test_mask_schedule_reveals_everything_few_first():
    plan = mask_schedule(16, 4, "cosine")
    assert plan == sorted(plan) and sum(plan) == 16 and min(plan) >= 1 and len(plan) == 4
    assert mask_schedule(3, 8) == [1, 1, 1]  # never more steps than positions
    assert sum(mask_schedule(10, 3, "linear")) == 10
    with pytest.raises(ValueError, match="schedule"):
        mask_schedule(4, 2, "exp")


def test_select_inputs_shares_the_budget_equally_and_is_deterministic():
    avail = {IMG: 16, A: 2, B: 1, Y: 2}
    chosen = select_inputs(avail, 9, seed=0)
    counts = {k: len(v) for k, v in chosen.items()}
    assert sum(counts.values()) == 9 and counts[B] == 1 and counts[A] == 2 and counts[Y] == 2 and counts[IMG] == 4
    again = select_inputs(dict(reversed(list(avail.items()))), 9, seed=0)
    assert all(np.array_equal(chosen[k], again[k]) for k in chosen)
    bigger = select_inputs(avail, 13, seed=0)
    assert set(chosen[IMG]) <= set(bigger[IMG])  # a larger budget reads a superset
    assert {k: len(v) for k, v in select_inputs(avail, None).items()} == avail


def test_tokenize_takes_presence_from_the_batches(trained):
    objects = world(4, 3)
    objects[A] = ScalarBatch(name=A, values=np.array([1.0, np.nan, 0.5, -0.2]))
    flux = objects[IMG]
    valid = flux.valid.copy()
    valid[2] = False
    objects[IMG] = ImageBatch(flux=flux.flux, ivar=flux.ivar, valid=valid, bands=BANDS, pixel_scale=0.262,
                              psf_fwhm=flux.psf_fwhm)
    tokens, present = trained.tokenize(objects)
    assert present[A].tolist() == [True, False, True, True]
    assert present[IMG].tolist() == [True, True, False, True]
    assert tokens[A].shape == (4, 2) and tokens[IMG].shape == (4, 16)
    with pytest.raises(ValueError, match="no tokenizer"):
        trained.tokenize({"desi_z": ScalarBatch(name="desi_z", values=np.zeros(4))})


# ---------------------------------------------------------------------------- embeddings
def test_embeddings_ignore_modality_order_and_absent_modalities(trained, test_set):
    tokens, present, _ = test_set
    tokens, present = subset(tokens, slice(0, 16)), subset(present, slice(0, 16))
    ref = trained.embed(tokens, present)
    reordered = trained.embed(dict(reversed(list(tokens.items()))), dict(reversed(list(present.items()))))
    assert torch.equal(ref.pooled, reordered.pooled) and torch.equal(ref.token_embeddings, reordered.token_embeddings)
    # an absent modality the model knows, and one it does not, change nothing
    none = torch.zeros(16, dtype=torch.bool)
    extra = trained.embed({**tokens, "hsc_mag_g": torch.zeros(16, 1, dtype=torch.long)},
                          {**present, "hsc_mag_g": none})
    without_b = trained.embed({k: v for k, v in tokens.items() if k != B}, {k: v for k, v in present.items() if k != B})
    absent_b = trained.embed(tokens, {**present, B: none})
    assert torch.equal(ref.pooled, extra.pooled) and not extra.errors
    assert torch.equal(without_b.pooled, absent_b.pooled)
    assert not torch.equal(ref.pooled, absent_b.pooled)


def test_embedding_outputs_and_pooling(trained, test_set):
    tokens, present, _ = test_set
    res = trained.embed(tokens, present, pooling="per_modality_mean")
    m, dim = len(trained.names), trained.model.cfg.dim
    assert res.pooled.shape == (200, m * dim + m) and res.mean.shape == (200, dim)
    assert torch.isfinite(res.pooled).all() and not res.errors
    # the label is never read; the image only where present
    assert (res.tokens_used[T] == 0).all() and not res.modality_present[:, trained.names.index(T)].any()
    assert np.array_equal(res.tokens_used[IMG], 16 * present[IMG].numpy())
    assert np.array_equal(res.token_mask.sum(1).numpy(), sum(res.tokens_used.values()))
    img = trained.names.index(IMG)
    assert torch.equal(res.modality_present[:, img], present[IMG])
    assert (res.per_modality[~present[IMG], img] == 0).all()
    # an object's embedding does not depend on its batch
    alone = trained.embed(subset(tokens, [5]), subset(present, [5]))
    assert torch.allclose(alone.mean[0], res.mean[5], atol=1e-5)
    light = trained.embed(tokens, present, pooling="per_modality_mean", return_tokens=False)
    assert light.token_embeddings is None and torch.equal(light.pooled, res.pooled)
    with pytest.raises(NotImplementedError, match="attentive probe"):
        trained.embed(tokens, present, pooling="attention")


def test_over_budget_inputs_are_subsampled_and_reported_or_refused(trained, test_set, caplog):
    tokens, present, _ = test_set
    idx = np.nonzero(present[IMG].numpy())[0][:8]
    tokens, present = subset(tokens, idx), subset(present, idx)  # 21 readable tokens each
    with caplog.at_level(logging.WARNING, logger="aion.inference.model"):
        res = trained.embed(tokens, present, max_inputs=9)
    assert "input budget 9" in caplog.text
    assert res.subsampled.all()
    assert (sum(res.tokens_available.values()) == 21).all() and (sum(res.tokens_used.values()) == 9).all()
    assert (res.tokens_used[B] == 1).all() and (res.tokens_used[IMG] == 4).all()  # scalars are not dropped
    assert (res.token_mask.sum(1) == 9).all()
    assert torch.equal(trained.embed(tokens, present, max_inputs=9).pooled, res.pooled)  # deterministic
    assert not torch.allclose(trained.embed(tokens, present).pooled, res.pooled)
    with pytest.raises(ValueError, match="exceed the input budget of 9"):
        trained.embed(tokens, present, max_inputs=9, budget="error")


# ---------------------------------------------------------------------------- zero-shot scalars
def test_predict_scalar_posterior_is_normalised_calibrated_and_beats_the_prior(trained, test_set):
    tokens, present, objects = test_set
    truth = objects[T].values
    pred = trained.predict_scalar(tokens, present, T)
    assert not pred.errors and pred.refined is None
    assert pred.probs.shape == (200, len(pred.edges) - 1) and (pred.probs >= 0).all()
    assert np.allclose(pred.probs.sum(1), 1.0) and (np.diff(pred.edges) >= 0).all()
    e = pred.estimates
    assert (e.p2_5 <= e.p16).all() and (e.p16 <= e.median).all() and (e.median <= e.p84).all()
    assert (e.p84 <= e.p97_5).all() and ((e.mean >= e.p2_5) & (e.mean <= e.p97_5)).all()
    assert np.allclose(pred.quantile(0.5), e.median)
    assert (pred.tokens_used[T] == 0).all()  # the target is never read
    coverage = np.mean((truth >= e.p16) & (truth <= e.p84))
    assert 0.45 <= coverage <= 0.97, coverage
    assert np.mean((truth >= e.p2_5) & (truth <= e.p97_5)) >= 0.85
    prior_error = np.mean(np.abs(truth - np.median(truth)))
    assert np.mean(np.abs(truth - e.median)) < 0.7 * prior_error
    assert np.mean(pred.log_prob_of(truth)) > np.log(1 / 64) + 0.5  # the prior is uniform over quantile bins
    # the CDF inverts the quantiles and its value at the truth (PIT) agrees with the interval coverage
    for q in (0.025, 0.16, 0.5, 0.84, 0.975):
        assert np.allclose(pred.cdf(pred.quantile(q)), q, atol=1e-9)
    pit = pred.cdf(truth)
    assert ((pit >= 0) & (pit <= 1)).all()
    assert np.mean((pit >= 0.16) & (pit <= 0.84)) == pytest.approx(coverage, abs=0.02)
    assert (pred.cdf(np.full(200, -1e9)) == 0).all() and (pred.cdf(np.full(200, 1e9)) == 1).all()


def test_interval_arithmetic_on_the_prior(trained):
    """Uniform probabilities over quantile bins = the training distribution: its percentiles come back."""
    binning = trained.tokenizers[T].binning
    k = binning.n_effective_bins
    train = world(3000, 0)[T].values
    est = _estimates(np.full((1, k), 1 / k), binning.edges.numpy(), binning.centers.numpy(), ("none", 1.0),
                     np.array([0]))
    edges = binning.edges.numpy()
    for q, got in ((50, est.median), (16, est.p16), (84, est.p84), (2.5, est.p2_5), (97.5, est.p97_5)):
        want = np.percentile(train, q)
        k = np.searchsorted(edges, want) - 1
        assert edges[k] <= got[0] <= edges[k + 1], (q, got[0], want)  # the right bin...
        assert abs(got[0] - want) < 0.5 * (edges[k + 1] - edges[k]), (q, got[0], want)  # ...and near within it
    assert abs(est.mean[0] - train.mean()) < 0.02


def test_fine_token_refinement_reduces_the_error(trained, test_set):
    tokens, present, objects = test_set
    truth = objects[Y].values
    pred = trained.predict_scalar(tokens, present, Y)
    assert pred.refined is not None and np.allclose(pred.fine_probs.sum(1), 1.0)
    assert (pred.tokens_used[Y] == 0).all()
    right_bin = pred.coarse_token == tokens[Y][:, 0].numpy()
    assert right_bin.sum() >= 15, right_bin.sum()
    coarse_err = np.abs(pred.mode - truth)
    fine_err = np.abs(pred.refined.mode - truth)
    # in the right bin the fine token places the value (seeds 0-5: 0.11-0.30 of the coarse error); in a
    # wrong bin it cannot help, so the error over all objects is about unchanged
    assert fine_err[right_bin].mean() < 0.5 * coarse_err[right_bin].mean()
    r = pred.refined
    assert ((r.p16 <= r.median) & (r.median <= r.p84)).all()
    assert np.allclose(pred.cdf(r.median, refined=True), 0.5, atol=1e-6)
    assert np.allclose(pred.cdf(r.p84, refined=True), 0.84, atol=1e-6)
    # a target that may not be read (a label) gets its fine token in the same pass
    single = AionModel(trained.model, trained.tokenizers, never_input=[T, Y]).predict_scalar(tokens, present, Y)
    assert np.allclose(single.fine_probs.sum(1), 1.0) and np.isfinite(single.refined.mean).all()


# ---------------------------------------------------------------------------- generation
def test_generate_is_seeded_valid_and_respects_the_budget(trained, test_set):
    tokens, present, _ = test_set
    tokens, present = subset(tokens, slice(0, 12)), subset(present, slice(0, 12))
    run = trained.generate(tokens, present, IMG, steps=4, seed=3, num_samples=2)
    assert run.tokens.shape == (2, 12, 16) and run.schedule == mask_schedule(16, 4) and not run.errors
    assert ((run.tokens >= 0) & (run.tokens < 9)).all()
    assert torch.equal(run.tokens, trained.generate(tokens, present, IMG, steps=4, seed=3, num_samples=2).tokens)
    other = trained.generate(tokens, present, IMG, steps=4, seed=4, num_samples=2)
    assert not torch.equal(run.tokens, other.tokens)
    assert not torch.equal(run.tokens[0], run.tokens[1])  # samples are independent draws
    greedy = [trained.generate(tokens, present, IMG, steps=4, temperature=0.0, seed=s).tokens for s in (0, 1)]
    assert torch.equal(*greedy)
    assert (run.tokens_used[IMG] == 0).all()  # the target is never read as given
    # conditioning + the generated tokens read at the last step (16 - 6) must fit
    budgeted = trained.generate(tokens, present, IMG, steps=4, max_inputs=12)
    assert budgeted.subsampled.all() and (sum(budgeted.tokens_used.values()) == 2).all()
    with pytest.raises(ValueError, match="no room"):
        trained.generate(tokens, present, IMG, steps=4, max_inputs=10)
    with pytest.raises(ValueError, match="exceed the input budget"):
        trained.generate(tokens, present, IMG, steps=4, max_inputs=12, budget="error")


def test_generate_decodes_and_fills_every_position_with_allowed_ids(trained, test_set):
    tokens, present, objects = test_set
    tokens, present = subset(tokens, slice(0, 10)), subset(present, slice(0, 10))
    run = trained.generate(tokens, present, Y, steps=2, seed=0, decode=True)
    allowed = trained.allowed_tokens(Y)
    t = run.tokens[0]
    assert allowed[0, t[:, 0]].all() and allowed[1, t[:, 1]].all()
    assert isinstance(run.decoded[0], ScalarBatch) and np.isfinite(run.decoded[0].values).all()
    labels_only = AionModel(trained.model, trained.tokenizers, never_input=[T, Y])
    assert labels_only.generate(tokens, present, Y, steps=2).schedule == [2]  # a label is never fed back
    image = trained.generate(tokens, present, IMG, steps=3, seed=0, decode=True)
    assert isinstance(image.decoded[0], ImageBatch) and image.decoded[0].flux.shape == (10, 4, 8, 8)


def test_allowed_tokens_keep_amplitude_and_code_ranges_apart():
    from aion.inference.model import allowed_token_mask

    for per_band in (False, True):
        tok = ImageTokenizer(ImageTokenizerConfig(bands=BANDS, crop_size=8, downsample=2, channels=(4, 8),
                                                  fsq_levels=(3, 3), amplitude_token=True, amp_per_band=per_band,
                                                  n_amp_bins=16))
        k, p = tok.codebook_size, tok.config.n_prefix
        mask = allowed_token_mask(tok, tok.num_tokens, tok.vocab_size)
        assert p == (len(BANDS) if per_band else 1)
        assert mask[:p, k:].all() and not mask[:p, :k].any()
        assert mask[p:, :k].all() and not mask[p:, k:].any()
    plain = ImageTokenizer(ImageTokenizerConfig(bands=BANDS, crop_size=8, downsample=2, channels=(4, 8),
                                                fsq_levels=(3, 3)))
    assert allowed_token_mask(plain, plain.num_tokens, plain.vocab_size).all()


# ---------------------------------------------------------------------------- errors
def test_per_object_errors_do_not_stop_the_batch(trained, test_set):
    tokens, present, _ = test_set
    tokens = {k: v[:6].clone() for k, v in tokens.items()}
    present = {k: v[:6].clone() for k, v in present.items()}
    for name in present:  # object 1: nothing readable (only its label)
        present[name][1] = name == T
    tokens["hsc_mag_g"] = torch.zeros(6, 1, dtype=torch.long)  # object 2: a modality the model lacks
    present["hsc_mag_g"] = torch.tensor([False, False, True, False, False, False])
    tokens[B][3, 0] = 999  # object 3: token id out of range
    good = [0, 4, 5]

    emb = trained.embed(tokens, present)
    assert sorted(emb.errors) == [1, 2, 3]
    assert "no input tokens" in emb.errors[1] and "hsc_mag_g" in emb.errors[2] and "outside" in emb.errors[3]
    assert torch.isnan(emb.pooled[[1, 2, 3]]).all() and torch.isfinite(emb.pooled[good]).all()
    assert not emb.token_mask[[1, 2, 3]].any()
    alone = trained.embed(subset({k: v for k, v in tokens.items() if k != "hsc_mag_g"}, good),
                          subset({k: v for k, v in present.items() if k != "hsc_mag_g"}, good))
    assert torch.allclose(alone.mean, emb.mean[good], atol=1e-5)

    pred = trained.predict_scalar(tokens, present, T)
    assert sorted(pred.errors) == [1, 2, 3] and np.isnan(pred.median[[1, 2, 3]]).all()
    assert np.isfinite(pred.median[good]).all() and np.isnan(pred.probs[1]).all()
    gen = trained.generate(tokens, present, Y, steps=2, decode=True)
    assert (gen.tokens[0, [1, 2, 3]] == -1).all() and (gen.tokens[0, good] >= 0).all()
    assert np.isnan(gen.decoded[0].values[[1, 2, 3]]).all()

    missing = trained.predict_scalar(tokens, present, "desi_z")
    assert sorted(missing.errors) == list(range(6)) and "not in this model" in missing.errors[0]
    assert np.isnan(missing.mean).all()
    assert len(trained.generate(tokens, present, "desi_z").errors) == 6


# ---------------------------------------------------------------------------- loading
def test_from_pretrained_round_trip_and_tokenizer_mismatch(trained, test_set, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000300"
    ckpt.mkdir(parents=True)
    save_model_config(trained.model.cfg, ckpt / MODEL_CONFIG)
    save_weights(trained.model.state_dict(), ckpt / WEIGHTS)
    (ckpt / COMPLETE).write_text('{"step": 300}')
    model_dir = export_model(tmp_path / "run", tmp_path / "export")
    tok_dir = tmp_path / "tokenizers"
    for name, tok in trained.tokenizers.items():
        tok.save_pretrained(tok_dir / name)

    loaded = AionModel.from_pretrained(model_dir, tok_dir, max_inputs=64)
    tokens, present, objects = test_set
    tokens, present = subset(tokens, slice(0, 8)), subset(present, slice(0, 8))
    assert torch.equal(loaded.tokenize(objects)[0][IMG], test_set[0][IMG])
    assert torch.allclose(loaded.embed(tokens, present).pooled, trained.embed(tokens, present).pooled, atol=1e-6)
    probs = trained.predict_scalar(tokens, present, T).probs
    assert np.allclose(loaded.predict_scalar(tokens, present, T).probs, probs)

    bad = tmp_path / "bad_tokenizers"
    for name, tok in trained.tokenizers.items():
        if name == Y:  # the same quantity without its fine token: 1 token, vocab 64
            tok = ScalarTokenizer(Y, tok.binning, fine_bins=0)
        tok.save_pretrained(bad / name)
    with pytest.raises(ValueError, match=f"modality '{Y}'.*num_tokens=2, vocab_size=72.*num_tokens=1, vocab_size=64"):
        AionModel.from_pretrained(model_dir, bad)
    (bad / Y / "config.json").unlink()
    with pytest.raises(ValueError, match=f"modality '{Y}': the model has it but no tokenizer"):
        AionModel.from_pretrained(model_dir, bad)

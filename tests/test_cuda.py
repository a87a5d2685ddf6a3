"""The model, training steps and inference on CUDA agree with the CPU (skipped without a GPU).

The rest of the suite runs on the CPU (test_pretrain's single-process runs pick CUDA when there
is one), so nothing else checks that a FourM forward / backward, a few optimizer steps, the
tokenizers and ``AionModel`` embed / predict give the CPU's numbers on a GPU. TF32 is switched
off here so that fp32 results can be compared tightly; ``benchmarks/gpu_check.sh`` runs this file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import export_tiny_model, specs_of

from aion.data.batches import ImageBatch, ScalarBatch, SpectrumBatch
from aion.model import FourM, ModalitySpec, preset
from aion.tokenizers.binning import QuantileBinning
from aion.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from aion.tokenizers.scalar import ScalarTokenizer
from aion.tokenizers.spectrum import SpectrumTokenizer, load_recipe
from aion.training.synthetic import synthetic_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
torch.set_num_threads(1)  # as the other test files: the CPU references are small

REPO = Path(__file__).resolve().parents[1]
TABLE = {"legacysurvey_image": ModalitySpec(num_tokens=16, vocab_size=9),
         "legacysurvey_flux_g": ModalitySpec(num_tokens=2, vocab_size=64 + 8),
         "legacysurvey_flux_r": ModalitySpec(num_tokens=1, vocab_size=64),
         "desi_spectrum": ModalitySpec(num_tokens=24, vocab_size=128)}
BANDS = ("des-g", "des-r", "des-i", "des-z")
G, R, Z = "legacysurvey_flux_g", "legacysurvey_flux_r", "provabgs_z"


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 on CUDA without TF32 (the training loop turns it on), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _batch(device: str, objects: int = 6, seed: int = 0) -> dict:
    return synthetic_batch(TABLE, objects, 20, 10, generator=torch.Generator().manual_seed(seed), device=device)


def forward_backward(device: str) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss, logits and gradients of a seeded tiny FourM on a fixed synthetic batch, on ``device``."""
    torch.manual_seed(0)
    model = FourM(preset("tiny", TABLE, dim=32)).to(device)
    out = model(_batch(device))
    out["loss"].backward()
    grads = {k: p.grad.detach().cpu() for k, p in model.named_parameters() if p.grad is not None}
    return out["loss"].item(), {k: v.detach().float().cpu() for k, v in out["logits"].items()}, grads


def train_losses(device: str, steps: int = 30, bf16: bool = False) -> list[float]:
    """Losses of ``steps`` AdamW steps on one fixed batch (memorising it must lower the loss)."""
    torch.manual_seed(0)
    model = FourM(preset("tiny", TABLE, dim=32)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _batch(device, objects=16)
    losses = []
    for _ in range(steps):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_forward_and_backward_match_cpu():
    loss_cpu, logits_cpu, grads_cpu = forward_backward("cpu")
    loss_gpu, logits_gpu, grads_gpu = forward_backward("cuda")
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-5, abs=1e-6)
    for name, ref in logits_cpu.items():
        torch.testing.assert_close(logits_gpu[name], ref, rtol=1e-4, atol=1e-5, msg=f"logits of {name}")
    assert grads_cpu.keys() == grads_gpu.keys()
    for name, ref in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name], ref, rtol=1e-3, atol=1e-6, msg=f"gradient of {name}")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_training_steps_lower_the_loss(bf16):
    losses = train_losses("cuda", bf16=bf16)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * losses[0], losses
    if not bf16:  # the CPU's trajectory, up to rounding (which Adam amplifies where gradients are ~0)
        np.testing.assert_allclose(losses[:10], train_losses("cpu", steps=10), rtol=1e-2)


# ---------------------------------------------------------------------------- tokenizers and inference
def _objects(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:8, :8] - 3.5
    flux = (np.exp(rng.normal(size=n))[:, None, None, None] * np.exp(-(xx**2 + yy**2) / 4.0) * 0.05
            + 0.02 * rng.normal(size=(n, 4, 8, 8))).astype(np.float32)
    image = ImageBatch(flux=flux, ivar=np.full(flux.shape, 1e4, np.float32), valid=np.ones(flux.shape, bool),
                       bands=BANDS, pixel_scale=0.262, psf_fwhm=np.ones((n, 4), np.float32))
    values = {G: rng.lognormal(size=n), R: rng.lognormal(size=n), Z: rng.uniform(0, 1, n)}
    values[R][::5] = np.nan  # some objects lack r
    return {"legacysurvey_image": image, **{k: ScalarBatch(name=k, values=v) for k, v in values.items()}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny untrained model over scalar + image tokenizers, saved like a trained one: (model dir, tokenizer dir)."""
    tmp = tmp_path_factory.mktemp("cuda_infer")
    train = _objects(500, seed=1)
    toks = {k: ScalarTokenizer(k, QuantileBinning(32), fine_bins=8 if k == G else 0).fit(train[k]) for k in (G, R, Z)}
    torch.manual_seed(0)
    image = ImageTokenizer(ImageTokenizerConfig(bands=BANDS, crop_size=8, downsample=2, channels=(4, 8),
                                                fsq_levels=(3, 3), norm="none"))
    with torch.no_grad():  # untrained codes sit near 0 and would all round to one token: spread them
        image.model.to_code[-1].weight.mul_(30)
    toks["legacysurvey_image"] = image
    for name, tok in toks.items():
        tok.save_pretrained(tmp / "tokenizers" / name)
    return export_tiny_model(specs_of(toks), tmp, dim=32), tmp / "tokenizers"


def test_tokenizers_on_cuda_match_cpu():
    img = _objects(32)["legacysurvey_image"]
    torch.manual_seed(0)
    image = ImageTokenizer(ImageTokenizerConfig(bands=BANDS, crop_size=8, downsample=2, channels=(4, 8),
                                                fsq_levels=(3, 3), norm="none"))
    with torch.no_grad():
        image.model.to_code[-1].weight.mul_(30)
    ref = image.encode(img)
    got = image.to("cuda").encode(img).cpu()
    assert (got == ref).float().mean() >= 0.98  # only codes on a rounding boundary may differ

    rng = np.random.default_rng(0)
    wave = 3600 + 0.8 * np.arange(7781)
    flux = 2 + np.sin(wave[None, :] / 700 + rng.uniform(0, 6, (8, 1))) + rng.normal(0, 0.5, (8, wave.size))
    spec = SpectrumBatch(flux=flux, ivar=np.full(flux.shape, 4.0), wavelength=np.broadcast_to(wave, flux.shape).copy(),
                         valid=np.ones(flux.shape, bool))
    torch.manual_seed(0)
    tok = SpectrumTokenizer(load_recipe(REPO / "tokenizers" / "spectrum_cpu.yaml").tokenizer)
    ref = tok.encode(spec)
    got = tok.to("cuda").encode(spec).cpu()
    assert (got == ref).float().mean() >= 0.98


def load_aion_model(model_dir: Path, tok_dir: Path, device: str):
    """What AionModel.from_pretrained does, without its tokenizer-set loader (that module imports astropy,
    which a GPU image may lack)."""
    from aion.inference import AionModel
    from aion.tokenizers.base import load_tokenizer
    from aion.training.checkpoint import load_pretrained

    toks = {p.name: load_tokenizer(p) for p in sorted(tok_dir.iterdir())}
    for tok in toks.values():
        if hasattr(tok, "to"):
            tok.to(device)
    return AionModel(load_pretrained(model_dir, map_location=device), toks, chunk_size=16)


def test_aion_model_embed_and_predict_on_cuda_match_cpu(exported):
    model_dir, tok_dir = exported
    cpu, gpu = load_aion_model(model_dir, tok_dir, "cpu"), load_aion_model(model_dir, tok_dir, "cuda")
    assert gpu.device.type == "cuda"
    objects = _objects(40, seed=2)
    tokens, present = cpu.tokenize(objects)
    emb_cpu, emb_gpu = cpu.embed(tokens, present), gpu.embed(tokens, present)
    assert emb_cpu.errors == emb_gpu.errors
    torch.testing.assert_close(emb_gpu.mean, emb_cpu.mean, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(emb_gpu.per_modality, emb_cpu.per_modality, rtol=1e-4, atol=1e-5, equal_nan=True)
    for target in (Z, G):  # a label (one pass) and an input with fine bins (two passes)
        p_cpu, p_gpu = cpu.predict_scalar(tokens, present, target), gpu.predict_scalar(tokens, present, target)
        np.testing.assert_allclose(p_gpu.probs, p_cpu.probs, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(p_gpu.estimates.mean, p_cpu.estimates.mean, rtol=1e-5)
    tok_gpu, present_gpu = gpu.tokenize(objects)  # tokenizers on the GPU: the same tokens, up to rounding ties
    assert all(torch.equal(present_gpu[k].cpu(), present[k]) for k in present)
    for name, ref in tokens.items():
        assert (tok_gpu[name].cpu() == ref).float().mean() >= 0.98, name


def test_search_on_cuda_matches_cpu():
    """Exact k-NN on the GPU finds the CPU's neighbours (both metrics, chunked, with the query left out)."""
    from aion.discovery.search import NeighbourIndex

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    for metric in ("cosine", "euclidean"):
        cpu = NeighbourIndex(x, metric=metric, device="cpu", chunk_rows=700, query_rows=256)
        gpu = NeighbourIndex(x, metric=metric, device="cuda", chunk_rows=700, query_rows=256)
        rows_c, dist_c = cpu.search_self(10)
        rows_g, dist_g = gpu.search_self(10)
        np.testing.assert_allclose(dist_g, dist_c, rtol=1e-4, atol=1e-4)
        assert (rows_g == rows_c).mean() >= 0.999, metric  # near-ties may swap under different rounding
        assert not (rows_g == np.arange(len(x))[:, None]).any()


def test_flow_fit_and_transport_on_cuda_match_cpu():
    """The residual flow trained on the GPU draws the CPU's random numbers, so it ends close to the CPU's
    flow; transport to the base and back, and the exact log-density, agree between devices."""
    from aion.discovery.flow import ConditionalFlow, FlowConfig

    rng = np.random.default_rng(1)
    c = rng.standard_normal((600, 2)).astype(np.float32)
    x = np.concatenate([c + 0.3 * rng.standard_normal((600, 2)), rng.standard_normal((600, 3))], 1).astype(np.float32)
    cfg = FlowConfig(hidden=32, depth=2, steps=150, batch_size=128, lr=3e-3, ode_steps=8, seed=0)
    cpu = ConditionalFlow.fit(x, c, cfg, progress=False, device="cpu")
    gpu = ConditionalFlow.fit(x, c, cfg, progress=False, device="cuda")
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.history.loss, cpu.history.loss, rtol=2e-3)
    r_cpu, r_gpu = cpu.to_base(x, c), gpu.to_base(x, c)
    np.testing.assert_allclose(r_gpu, r_cpu, rtol=1e-2, atol=1e-2)
    back = gpu.from_base(r_gpu, c)
    np.testing.assert_allclose(back, x, atol=5e-2)  # RK4 at 8 steps is nearly invertible
    lp_cpu, lp_gpu = cpu.log_prob(x[:64], c[:64]), gpu.log_prob(x[:64], c[:64])
    np.testing.assert_allclose(lp_gpu, lp_cpu, rtol=1e-2, atol=1e-2)

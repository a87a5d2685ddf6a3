"""Spectrum tokenizer: any observed-frame spectrum -> 1 amplitude token + n_latent code tokens.

Pipeline (encode), every step chosen so that tokens depend only on valid data:

1. **Resample** onto one shared observed-frame grid (default the AION-1 grid, 3500-10462.4 A
   at 0.8 A, 8704 pixels) by flux-conserving rebinning: each input pixel's flux is spread
   uniformly over its extent (edges halfway between centres), and a grid pixel is the mean
   of the valid input flux overlapping it. Padding (non-positive wavelengths, SDSS style) is
   cut off before anything else, so it cannot influence tokens. A grid pixel is valid only
   when valid input pixels cover at least ``min_coverage`` of it. Inverse variance is
   propagated so that total information is conserved: exact for grid pixels made of whole
   input pixels; a split input pixel counts in proportion to its overlap (its sub-pixels are
   fully correlated, so they must not add information).
2. **Normalise** by a robust amplitude, the median of the valid grid flux, quantised on a
   fixed log10 grid (``amp_bins_per_dex`` bins per dex from ``amp_log_min``) that becomes the
   first token. Flux is divided by the *quantised* amplitude, so decoding inverts it exactly;
   one dex is a whole number of bins, so scaling a spectrum by 10 only shifts this token.
3. **Encode** the normalised flux (with the valid mask and a noise channel) with a 1-D
   ConvNeXt down to ``n_pix / (patch * 2**(len(widths)-1))`` positions, optionally mixed
   globally by a few self-attention blocks, and quantise each position: LFQ by default
   (AION-1's choice; ``code_dim`` binary channels -> 2**code_dim codes, entropy aux loss), or
   FSQ (no aux loss, graded levels per channel).

Token layout: ``tokens[:, 0]`` is the amplitude token, offset by the codebook size, so it
lives in ``[codebook_size, codebook_size + n_amp_bins)``; ``tokens[:, 1:]`` are the codes in
``[0, codebook_size)``; ``vocab_size = codebook_size + n_amp_bins``.

Absent spectra (no valid pixel after resampling, e.g. all masked or outside the grid) still
get tokens, as the ``Tokenizer`` contract asks: amplitude token at bin 0 and the codes of an
all-masked input. They are meaningless; the caller keeps ``SpectrumBatch.present`` next to
them. Nothing in that path divides by zero, so no NaN appears.

Training loss: ivar-weighted chi^2 in normalised flux space on valid pixels (+ quantizer aux
loss). With ``holdout_fraction > 0`` (blind-spot training, Noise2Self-style) a random subset
of valid pixels is hidden from the encoder and the chi^2 is taken on exactly those pixels:
pixel noise is independent, so the network cannot reproduce it and learns to reconstruct
the signal. At encode time every valid pixel is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aion.config import from_dict, load_config, to_dict
from aion.data.batches import SpectrumBatch, concat_batches
from aion.tokenizers.base import Tokenizer, check_recipe_kind, load_tokenizer, register_tokenizer
from aion.tokenizers.quantizers import FSQ, LFQ, draw_unrounded
from aion.tokenizers.trainer import TrainConfig, train

PathLike = str | os.PathLike

AION_GRID = {"wave_min": 3500.0, "wave_step": 0.8, "n_pix": 8704}
"""AION-1's shared observed-frame grid: 3500-10462.4 A at 0.8 A."""


# ============================================================================ configuration
@dataclass(kw_only=True)
class SpectrumTokenizerConfig:
    """Everything that defines a spectrum tokenizer (grid, amplitude token, network, quantizer)."""

    modalities: tuple[str, ...] = ("desi_spectrum", "sdss_spectrum")
    wave_min: float = AION_GRID["wave_min"]
    """Centre of the first grid pixel (Angstrom, observed frame)."""
    wave_step: float = AION_GRID["wave_step"]
    n_pix: int = AION_GRID["n_pix"]
    min_coverage: float = 0.5
    """A grid pixel is valid when valid input pixels cover at least this fraction of it."""
    amp_log_min: float = -3.0
    """log10 of the smallest amplitude (1e-17 erg/s/cm^2/A); smaller or non-positive medians clamp here."""
    amp_bins_per_dex: int = 128
    n_amp_bins: int = 1024
    """Amplitude token bins; the grid spans ``(n_amp_bins - 1) / amp_bins_per_dex`` dex."""
    patch: int = 4
    """Stem stride: grid pixels per position at the first stage."""
    widths: tuple[int, ...] = (64, 128, 256, 384)
    """Channels per stage; every stage after the first halves the length."""
    depths: tuple[int, ...] = (1, 1, 2, 2)
    kernel: int = 7
    mlp_ratio: int = 4
    attn_blocks: int = 2
    """Self-attention blocks at the latent resolution in encoder and decoder (global context)."""
    attn_heads: int = 4
    quantizer: Literal["lfq", "fsq"] = "lfq"
    code_dim: int = 10
    """LFQ binary channels (2**code_dim codes)."""
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    entropy_weight: float = 0.1
    """Weight of the LFQ aux loss (entropy + commitment)."""
    holdout_fraction: float = 0.0
    """Blind-spot training: fraction of valid pixels hidden from the encoder and scored (0 = plain chi^2)."""
    seen_chi2_weight: float = 0.0
    """With blind-spot training, also score the pixels the encoder saw, with this weight: their chi^2
    gives narrow emission lines a direct gradient (held-out pixels alone rarely hit a line), at the
    price of some noise fitting."""
    binned_chi2_scales: tuple[int, ...] = ()
    """Block sizes (grid pixels) of an extra chi^2 on residuals summed over blocks (variances add);
    each must divide ``n_pix``. A coherent residual (a missed emission line, a continuum offset)
    grows like the block size in a block sum while white noise does not, so this term weights
    what the tokenizer should keep over what it should drop."""
    binned_chi2_weight: float = 0.0
    """Weight of the mean over ``binned_chi2_scales`` of the binned chi^2 (0 = off)."""
    balance_spectra: bool = False
    """Average log(chi^2) over spectra (per-pixel + binned terms of each spectrum) instead of the
    mean chi^2, so a few spectra far from fitted (extreme emission lines) do not set the whole
    gradient; same minimum (every spectrum at its noise). As the image tokenizer's ``balance_objects``."""
    quant_noise: float = 0.0
    """Training only, FSQ only: share of latent vectors per step that reach the decoder unrounded
    (QuantNoise, Fan et al. 2020). Rounding noise on every latent drowns the small gradient of a narrow
    emission line (docs/tokenizers.md); on the unrounded share the gradient is exact. Encoding and
    evaluation always round."""
    max_abs_input: float = 1e3
    """Normalised input flux is clipped to +-this before the network (guards faint, near-zero medians)."""

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.widths = tuple(int(w) for w in self.widths)
        self.depths = tuple(int(d) for d in self.depths)
        self.fsq_levels = tuple(int(n) for n in self.fsq_levels)
        self.binned_chi2_scales = tuple(int(k) for k in self.binned_chi2_scales)
        if not (self.wave_step > 0 and self.wave_min > 0 and self.n_pix >= 1):
            raise ValueError("wave_min and wave_step must be positive and n_pix >= 1")
        if not 0 < self.min_coverage <= 1:
            raise ValueError(f"min_coverage: expected 0 < x <= 1, got {self.min_coverage}")
        if self.n_amp_bins < 2 or self.amp_bins_per_dex < 1:
            raise ValueError("n_amp_bins must be >= 2 and amp_bins_per_dex >= 1")
        if not self.widths or len(self.widths) != len(self.depths):
            raise ValueError(f"widths {self.widths} and depths {self.depths} must be non-empty and equally long")
        if self.n_pix % self.downsample:
            raise ValueError(f"n_pix={self.n_pix} must be divisible by patch * 2**(stages-1) = {self.downsample}")
        if self.quantizer not in ("lfq", "fsq"):
            raise ValueError(f"quantizer: expected 'lfq' or 'fsq', got {self.quantizer!r}")
        if self.widths[-1] % self.attn_heads:
            raise ValueError(f"last width {self.widths[-1]} must be divisible by attn_heads={self.attn_heads}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction: expected 0 <= x < 1, got {self.holdout_fraction}")
        if self.seen_chi2_weight < 0:
            raise ValueError(f"seen_chi2_weight: expected >= 0, got {self.seen_chi2_weight}")
        if self.binned_chi2_weight < 0:
            raise ValueError(f"binned_chi2_weight: expected >= 0, got {self.binned_chi2_weight}")
        if not 0 <= self.quant_noise < 1:
            raise ValueError(f"quant_noise: expected 0 <= x < 1, got {self.quant_noise}")
        if self.quant_noise > 0 and self.quantizer != "fsq":
            raise ValueError(f"quant_noise: needs quantizer 'fsq', got {self.quantizer!r}")
        bad = [k for k in self.binned_chi2_scales if k < 2 or self.n_pix % k]
        if bad:
            raise ValueError(f"binned_chi2_scales: every block size must be >= 2 and divide n_pix={self.n_pix}, "
                             f"got {bad}")

    @property
    def downsample(self) -> int:
        return self.patch * 2 ** (len(self.widths) - 1)

    @property
    def n_latent(self) -> int:
        return self.n_pix // self.downsample

    @property
    def wavelength(self) -> np.ndarray:
        """Grid pixel centres (Angstrom)."""
        return self.wave_min + self.wave_step * np.arange(self.n_pix, dtype=np.float64)

    @property
    def edges(self) -> np.ndarray:
        return self.wave_min + self.wave_step * (np.arange(self.n_pix + 1, dtype=np.float64) - 0.5)


# ============================================================================ resampling
def pixel_edges(centres: np.ndarray, default_width: float = 1.0) -> np.ndarray:
    """Pixel edges halfway between centres, end pixels as wide as their neighbour (any monotone grid)."""
    c = np.asarray(centres, dtype=np.float64)
    if c.size == 1:
        return np.array([c[0] - default_width / 2, c[0] + default_width / 2])
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]])


def _cumulative_at(edges_in: np.ndarray, increments: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Integral of a piecewise-constant density from edges_in[0] to each x, for rows of increments.

    ``increments`` (R, n) are per-pixel integrals; written as cum[j] + t * inc[j] so that a run of
    zero increments (masked pixels) integrates to exactly zero.
    """
    n = edges_in.size - 1
    cum = np.zeros((increments.shape[0], n + 1))
    np.cumsum(increments, axis=1, out=cum[:, 1:])
    j = np.clip(np.searchsorted(edges_in, x, side="right") - 1, 0, n - 1)
    t = np.clip((x - edges_in[j]) / (edges_in[j + 1] - edges_in[j]), 0.0, 1.0)
    return cum[:, j] + t[None, :] * increments[:, j]


def rebin(edges_in: np.ndarray, flux: np.ndarray, ivar: np.ndarray, valid: np.ndarray, edges_out: np.ndarray,
          min_coverage: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flux-conserving rebinning of rows that share one input grid.

    Returns (flux, ivar, valid) on the output pixels; invalid output pixels carry flux 0, ivar 0.
    """
    dl = np.diff(edges_in)
    v = valid.astype(bool)
    w = np.where(v, dl[None, :], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        var_inc = np.where(v & (ivar > 0), dl[None, :] ** 2 / np.where(ivar > 0, ivar, 1.0), 0.0)
    fw = np.where(v, flux.astype(np.float64), 0.0) * w
    i_w = np.diff(_cumulative_at(edges_in, w, edges_out), axis=1)
    i_f = np.diff(_cumulative_at(edges_in, fw, edges_out), axis=1)
    i_v = np.diff(_cumulative_at(edges_in, var_inc, edges_out), axis=1)
    coverage = i_w / np.diff(edges_out)[None, :]
    ok = (coverage >= min_coverage - 1e-9) & (i_w > 0) & (i_v > 0)
    safe_w = np.where(ok, i_w, 1.0)
    out_flux = np.where(ok, i_f / safe_w, 0.0)
    out_ivar = np.where(ok, safe_w**2 / np.where(ok, i_v, 1.0), 0.0)
    return out_flux, out_ivar, ok


def resample_spectra(batch: SpectrumBatch, edges_out: np.ndarray, min_coverage: float = 0.5,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A SpectrumBatch on another grid (given by its edges): (flux, ivar, valid), each (B, M).

    Rows are grouped by identical real (unpadded) wavelength grids, so a DESI batch is one
    vectorised rebin; padded rows use only their positive-wavelength prefix.
    """
    b = len(batch)
    m = edges_out.size - 1
    flux = np.zeros((b, m))
    ivar = np.zeros((b, m))
    valid = np.zeros((b, m), dtype=bool)
    wave = batch.wavelength
    n_real = (wave > 0).sum(axis=1)
    groups: dict[tuple[int, bytes], list[int]] = {}
    for i in range(b):
        n = int(n_real[i])
        if n == 0 or not batch.valid[i, :n].any():
            continue
        groups.setdefault((n, wave[i, :n].tobytes()), []).append(i)
    default_width = float(np.median(np.diff(edges_out))) if m else 1.0
    for (n, _), rows in groups.items():
        idx = np.asarray(rows)
        e_in = pixel_edges(wave[idx[0], :n], default_width)
        f, iv, ok = rebin(e_in, batch.flux[idx, :n], batch.ivar[idx, :n], batch.valid[idx, :n], edges_out,
                          min_coverage)
        flux[idx], ivar[idx], valid[idx] = f, iv, ok
    return flux, ivar, valid


# ============================================================================ network
class _ChannelNorm(nn.Module):
    """LayerNorm over channels of a (B, C, L) tensor."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class ConvNeXtBlock1d(nn.Module):
    """ConvNeXt block in 1-D: depthwise conv, LayerNorm, pointwise MLP, layer-scaled residual."""

    def __init__(self, dim: int, kernel: int = 7, mlp_ratio: int = 4, layer_scale: float = 0.1):
        super().__init__()
        self.dw = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).transpose(1, 2)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        return x + y.transpose(1, 2)


class AttentionBlock1d(nn.Module):
    """Pre-norm transformer block on (B, C, L): lets every latent position see the whole spectrum."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, layer_scale: float = 0.1):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # (B, L, C)
        b, n, c = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        h = h + self.proj(a) * self.gamma1
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h)))) * self.gamma2
        return h.transpose(1, 2)


class SpectrumAutoencoder(nn.Module):
    """Normalised grid spectrum (B, N) <-> latent codes (B, n_latent, d); ``loss`` feeds the trainer."""

    IN_CHANNELS = 3  # asinh(flux) * mask, mask, noise level * mask
    OUT_LIMIT = 12.0  # the decoder predicts asinh(flux); |flux| <= sinh(12) ~ 8e4 times the amplitude

    def __init__(self, cfg: SpectrumTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        w, d = cfg.widths, cfg.depths
        if cfg.quantizer == "lfq":
            self.quantizer: LFQ | FSQ = LFQ(cfg.code_dim)
            code_dim = cfg.code_dim
        else:
            self.quantizer = FSQ(cfg.fsq_levels)
            code_dim = len(cfg.fsq_levels)
        self.code_dim = code_dim

        enc: list[nn.Module] = [nn.Conv1d(self.IN_CHANNELS, w[0], cfg.patch, stride=cfg.patch)]
        for i in range(len(w)):
            if i:
                enc += [_ChannelNorm(w[i - 1]), nn.Conv1d(w[i - 1], w[i], 2, stride=2)]
            enc += [ConvNeXtBlock1d(w[i], cfg.kernel, cfg.mlp_ratio) for _ in range(d[i])]
        self.encoder = nn.Sequential(*enc)
        self.enc_pos = nn.Parameter(torch.zeros(1, w[-1], cfg.n_latent))
        self.enc_attn = nn.Sequential(*[AttentionBlock1d(w[-1], cfg.attn_heads, cfg.mlp_ratio)
                                        for _ in range(cfg.attn_blocks)])
        self.to_code = nn.Sequential(_ChannelNorm(w[-1]), nn.Conv1d(w[-1], code_dim, 1))

        self.from_code = nn.Conv1d(code_dim, w[-1], 1)
        self.dec_pos = nn.Parameter(torch.zeros(1, w[-1], cfg.n_latent))
        self.dec_attn = nn.Sequential(*[AttentionBlock1d(w[-1], cfg.attn_heads, cfg.mlp_ratio)
                                        for _ in range(cfg.attn_blocks)])
        dec: list[nn.Module] = []
        for i in reversed(range(len(w))):
            dec += [ConvNeXtBlock1d(w[i], cfg.kernel, cfg.mlp_ratio) for _ in range(d[i])]
            if i:
                dec += [_ChannelNorm(w[i]), nn.ConvTranspose1d(w[i], w[i - 1], 2, stride=2)]
        dec += [nn.GELU(), nn.ConvTranspose1d(w[0], 1, cfg.patch, stride=cfg.patch)]
        self.decoder = nn.Sequential(*dec)
        nn.init.trunc_normal_(self.enc_pos, std=0.02)
        nn.init.trunc_normal_(self.dec_pos, std=0.02)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def network_input(self, flux: torch.Tensor, ivar: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(flux.dtype)
        f = torch.asinh(flux.clamp(-self.cfg.max_abs_input, self.cfg.max_abs_input)) * m
        noise = torch.log1p(ivar.clamp_min(0).sqrt()) * m
        return torch.stack([f, m, noise], dim=1)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, N) -> continuous latents (B, n_latent, code_dim) before quantisation."""
        h = self.encoder(x) + self.enc_pos
        h = self.enc_attn(h)
        return self.to_code(h).transpose(1, 2)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantised codes (B, n_latent, code_dim) -> normalised flux (B, N)."""
        h = self.from_code(codes.transpose(1, 2).to(self.from_code.weight.dtype)) + self.dec_pos
        h = self.dec_attn(h)
        return torch.sinh(self.decoder(h)[:, 0].float().clamp(-self.OUT_LIMIT, self.OUT_LIMIT))

    def forward(self, flux: torch.Tensor, ivar: torch.Tensor, mask: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encode_latent(self.network_input(flux, ivar, mask))
        unrounded = draw_unrounded(z.shape[:-1], self.cfg.quant_noise, self.training, z.device)
        codes, indices = self.quantizer.quantize(z) if unrounded is None else self.quantizer.quantize(z, unrounded)
        return self.decode_codes(codes), indices, z

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """ivar-weighted chi^2 per valid pixel (normalised flux), averaged over spectra, + binned + aux loss."""
        flux, ivar, valid = batch["flux"], batch["ivar"], batch["valid"]
        if "target_flux" in batch:  # noise2noise: score an independent draw of the same spectrum
            pred, indices, z = self(flux, ivar, valid)
            loss, metrics = self._scored_chi2(pred, batch["target_flux"], batch["target_ivar"],
                                              batch["target_valid"])
            metrics["codes_used"] = float(torch.unique(indices).numel())
            return loss + self._aux(z, metrics), metrics
        if self.training and self.cfg.holdout_fraction > 0:
            hold = torch.rand(valid.shape, device=valid.device) < self.cfg.holdout_fraction
            seen, scored = valid & ~hold, valid & hold
        else:
            seen = scored = valid
        pred, indices, z = self(flux, ivar, seen)
        loss, metrics = self._scored_chi2(pred, flux, ivar, scored)
        if self.training and self.cfg.holdout_fraction > 0 and self.cfg.seen_chi2_weight > 0:
            seen_chi2 = self._mean_chi2(ivar * (pred - flux) ** 2, seen)
            loss = loss + self.cfg.seen_chi2_weight * seen_chi2
            metrics["seen_chi2"] = float(seen_chi2.detach())
        metrics["codes_used"] = float(torch.unique(indices).numel())
        return loss + self._aux(z, metrics), metrics

    @staticmethod
    def _chi2_per_spectrum(sq: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of ``sq`` over ``pixels`` per spectrum (B,), and which spectra have any pixel (B,)."""
        n = pixels.sum(dim=1)
        return (sq * pixels).sum(dim=1) / n.clamp_min(1), n > 0

    @classmethod
    def _mean_chi2(cls, sq: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Mean of ``sq`` over ``pixels`` per spectrum, averaged over spectra that have any."""
        per, has = cls._chi2_per_spectrum(sq, pixels)
        return (per * has).sum() / has.sum().clamp_min(1)

    def _binned_chi2_per_spectrum(self, resid: torch.Tensor, ivar: torch.Tensor, scored: torch.Tensor,
                                  ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per block size k of ``binned_chi2_scales``: (k, chi^2 of residuals summed over k-pixel blocks
        with their variances added, per spectrum (B,), which spectra have any block (B,))."""
        var = torch.where(scored, 1.0 / ivar.clamp_min(1e-30), torch.zeros((), device=resid.device))
        out = []
        for k in self.cfg.binned_chi2_scales:
            r = F.avg_pool1d(resid[:, None], k)[:, 0] * k
            v = F.avg_pool1d(var[:, None], k)[:, 0] * k
            ok = v > 0
            out.append((k, *self._chi2_per_spectrum(torch.where(ok, r**2 / v.clamp_min(1e-30), 0.0), ok)))
        return out

    def _scored_chi2(self, pred: torch.Tensor, target: torch.Tensor, ivar: torch.Tensor, scored: torch.Tensor,
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """chi^2 of ``pred`` against ``target`` on ``scored`` pixels, plus the binned term when configured."""
        resid = torch.where(scored, pred - target, torch.zeros((), device=pred.device))
        if self.cfg.balance_spectra:
            return self._balanced_chi2(resid, ivar, scored)
        chi2 = self._mean_chi2(ivar * resid**2, scored)
        metrics = {"chi2": float(chi2.detach())}
        loss = chi2
        if self.cfg.binned_chi2_weight > 0 and self.cfg.binned_chi2_scales:
            terms = []
            for k, per, has in self._binned_chi2_per_spectrum(resid, ivar, scored):
                terms.append((per * has).sum() / has.sum().clamp_min(1))
                metrics[f"chi2_bin{k}"] = float(terms[-1].detach())
            loss = loss + self.cfg.binned_chi2_weight * torch.stack(terms).mean()
        return loss, metrics

    def _balanced_chi2(self, resid: torch.Tensor, ivar: torch.Tensor, scored: torch.Tensor,
                       ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over spectra of log(per-pixel chi^2 + weight x mean binned chi^2) of each spectrum."""
        per, has = self._chi2_per_spectrum(ivar * resid**2, scored)
        metrics = {"chi2": float(per[has].mean().detach()) if has.any() else 0.0}
        if self.cfg.binned_chi2_weight > 0 and self.cfg.binned_chi2_scales:
            terms = []
            for k, term, _ in self._binned_chi2_per_spectrum(resid, ivar, scored):
                terms.append(term)
                metrics[f"chi2_bin{k}"] = float(term[has].mean().detach()) if has.any() else 0.0
            per = per + self.cfg.binned_chi2_weight * torch.stack(terms).mean(0)
        if not has.any():
            return per.sum() * 0.0, metrics
        return torch.log(per[has] + 1e-6).mean(), metrics

    def _aux(self, z: torch.Tensor, metrics: dict[str, float]) -> torch.Tensor | float:
        if isinstance(self.quantizer, LFQ) and self.cfg.entropy_weight > 0:
            aux = self.quantizer.aux_loss(z)
            metrics["aux"] = float(aux.detach())
            return self.cfg.entropy_weight * aux
        return 0.0


# ============================================================================ tokenizer
@register_tokenizer
class SpectrumTokenizer(Tokenizer):
    """Spectra on any wavelength grid <-> ``1 + n_latent`` tokens (amplitude first; see module doc)."""

    tokenizer_type = "spectrum"

    def __init__(self, config: SpectrumTokenizerConfig | None = None, **overrides: Any):
        if config is None:
            config = SpectrumTokenizerConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = config
        self.model = SpectrumAutoencoder(config).eval()
        self.chunk_size = 256
        """Spectra per network forward in encode/decode (bounds memory)."""

    # ------------------------------------------------------------------ interface
    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    @property
    def num_tokens(self) -> int:
        return self.config.n_latent + 1

    @property
    def codebook_size(self) -> int:
        return self.model.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.config.n_amp_bins

    @property
    def wavelength(self) -> np.ndarray:
        """The tokenizer grid's pixel centres (Angstrom, observed frame)."""
        return self.config.wavelength

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> SpectrumTokenizer:
        self.model.to(device)
        return self

    def get_config(self) -> dict[str, Any]:
        return to_dict(self.config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SpectrumTokenizer:
        return cls(from_dict(SpectrumTokenizerConfig, config))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(tensors)
        self.model.eval()

    # ------------------------------------------------------------------ amplitude
    def amplitude_index(self, amplitude: np.ndarray) -> np.ndarray:
        """Physical amplitude (B,) -> bin index; non-positive / tiny / non-finite clamp to bin 0."""
        cfg = self.config
        a = np.asarray(amplitude, dtype=np.float64)
        ok = np.isfinite(a) & (a > 0)
        log_a = np.log10(np.where(ok, a, 1.0))
        idx = np.rint((log_a - cfg.amp_log_min) * cfg.amp_bins_per_dex)
        return np.where(ok, np.clip(idx, 0, cfg.n_amp_bins - 1), 0).astype(np.int64)

    def amplitude_value(self, index: np.ndarray) -> np.ndarray:
        cfg = self.config
        return 10.0 ** (cfg.amp_log_min + np.asarray(index, dtype=np.float64) / cfg.amp_bins_per_dex)

    # ------------------------------------------------------------------ preprocessing
    def prepare(self, batch: SpectrumBatch) -> dict[str, torch.Tensor]:
        """Resample + normalise: float32 tensors flux/ivar (normalised units), bool valid, long amp_index.

        Never touches ``batch``'s arrays.
        """
        if not isinstance(batch, SpectrumBatch):
            raise TypeError(f"expected a SpectrumBatch, got {type(batch).__name__}")
        cfg = self.config
        flux, ivar, valid = resample_spectra(batch, cfg.edges, cfg.min_coverage)
        with np.errstate(all="ignore"):
            med = np.array([np.median(f[v]) if v.any() else np.nan for f, v in zip(flux, valid, strict=True)])
        amp_idx = self.amplitude_index(med)
        amp = self.amplitude_value(amp_idx)[:, None]
        return {
            "flux": torch.from_numpy((flux / amp).astype(np.float32)),
            "ivar": torch.from_numpy((ivar * amp**2).astype(np.float32)),
            "valid": torch.from_numpy(valid),
            "amp_index": torch.from_numpy(amp_idx),
        }

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode_prepared(self, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokens from the output of :meth:`prepare`."""
        b = prepared["flux"].shape[0]
        out = torch.empty((b, self.num_tokens), dtype=torch.long)
        out[:, 0] = prepared["amp_index"] + self.codebook_size
        dev = self.device
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, b, self.chunk_size):
                sl = slice(s, s + self.chunk_size)
                x = self.model.network_input(prepared["flux"][sl].to(dev), prepared["ivar"][sl].to(dev),
                                             prepared["valid"][sl].to(dev))
                _, idx = self.model.quantizer.quantize(self.model.encode_latent(x))
                out[sl, 1:] = idx.cpu()
        finally:
            self.model.train(was_training)
        return out

    def encode(self, batch: SpectrumBatch) -> torch.Tensor:
        """SpectrumBatch (any grid, padded or not) -> LongTensor[B, 1 + n_latent]."""
        return self.encode_prepared(self.prepare(batch))

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = torch.as_tensor(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
            raise ValueError(f"tokens: expected shape (B, {self.num_tokens}), got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens: expected an integer tensor, got {tokens.dtype}")
        tokens = tokens.long()
        k = self.codebook_size
        amp, codes = tokens[:, 0], tokens[:, 1:]
        if ((amp < k) | (amp >= self.vocab_size)).any():
            raise ValueError(f"tokens[:, 0] (amplitude): expected values in [{k}, {self.vocab_size})")
        if ((codes < 0) | (codes >= k)).any():
            raise ValueError(f"tokens[:, 1:] (codes): expected values in [0, {k})")
        return tokens

    @torch.no_grad()
    def decode_normalised(self, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Tokens -> (normalised flux on the grid (B, N), amplitude (B,)) in float64."""
        tokens = self._check_tokens(tokens)
        dev = self.device
        was_training = self.model.training
        self.model.eval()
        out = np.empty((tokens.shape[0], self.config.n_pix))
        try:
            for s in range(0, tokens.shape[0], self.chunk_size):
                codes = self.model.quantizer.indices_to_codes(tokens[s:s + self.chunk_size, 1:].to(dev))
                out[s:s + self.chunk_size] = self.model.decode_codes(codes).cpu().double().numpy()
        finally:
            self.model.train(was_training)
        amp = self.amplitude_value((tokens[:, 0] - self.codebook_size).numpy())
        return out, amp

    def decode(self, tokens: torch.Tensor, wavelength: np.ndarray | None = None,
               method: Literal["linear", "rebin"] = "linear", **context: Any) -> SpectrumBatch:
        """Tokens -> SpectrumBatch in 1e-17 erg/s/cm^2/A, on the tokenizer grid or on ``wavelength``.

        ``wavelength``: (L,) shared or (B, L) per row, non-positive values = padding (invalid).
        ``method``: ``linear`` samples the decoded model at the requested centres (best for
        grids as fine as or finer than the tokenizer's); ``rebin`` averages it over the
        requested pixels (flux-conserving, for coarser grids). Requested pixels outside the
        tokenizer grid are invalid with flux 0. A decoded spectrum is a noiseless model, so
        its ``ivar`` is a placeholder: 1 on valid pixels, 0 elsewhere.
        """
        if context:
            raise TypeError(f"decode: unexpected arguments {sorted(context)}")
        norm, amp = self.decode_normalised(tokens)
        flux = norm * amp[:, None]
        b = flux.shape[0]
        grid = self.wavelength
        if wavelength is None:
            valid = np.ones_like(flux, dtype=bool)
            return SpectrumBatch(flux=flux, ivar=valid.astype(np.float32), wavelength=grid, valid=valid)
        wave = np.asarray(wavelength, dtype=np.float64)
        if wave.ndim == 1:
            wave = np.broadcast_to(wave, (b, wave.size))
        if wave.ndim != 2 or wave.shape[0] != b or wave.shape[1] == 0:
            raise ValueError(f"wavelength: expected shape (L,) or ({b}, L), got {np.shape(wavelength)}")
        if method not in ("linear", "rebin"):
            raise ValueError(f"method: expected 'linear' or 'rebin', got {method!r}")
        lo, hi = self.config.edges[0], self.config.edges[-1]
        out = np.zeros(wave.shape)
        valid = np.zeros(wave.shape, dtype=bool)
        grid_valid = np.ones((1, grid.size), dtype=bool)
        for i in range(b):
            real = wave[i] > 0
            n = int(real.sum())
            if n == 0:
                continue
            w = wave[i, :n]
            if method == "linear":
                inside = (w >= lo) & (w <= hi)
                out[i, :n] = np.where(inside, np.interp(w, grid, flux[i]), 0.0)
                valid[i, :n] = inside
            else:
                f, _, ok = rebin(self.config.edges, flux[i:i + 1], grid_valid.astype(np.float64), grid_valid,
                                 pixel_edges(w, self.config.wave_step), self.config.min_coverage)
                out[i, :n], valid[i, :n] = f[0], ok[0]
        return SpectrumBatch(flux=out, ivar=valid.astype(np.float32), wavelength=np.where(wave > 0, wave, -1.0),
                             valid=valid)


# ============================================================================ data
@dataclass(kw_only=True)
class SpectrumDataConfig:
    """Where training spectra come from."""

    survey: str = "desi"
    modality: str = "desi_spectrum"
    config: str | None = None
    """MMU config directory under the survey (None = the only one)."""
    max_spectra: int | None = None
    val_fraction: float = 0.05
    """Held out from training (by a seeded permutation) for the final validation metrics."""
    extra_from_truth: int = 0
    """Extra training spectra simulated from mock-universe truth rows not targeted by DESI
    (noiseless_desi_spectra + spectra.observe); only for mock data that has a ``truth`` survey."""
    extra_min_r_flux: float = 10 ** (-0.4 * (20.5 - 22.5))
    """Truth rows for extra spectra: true r-band flux above this (nanomaggies; default r < 20.5)."""
    feature_oversample: int = 1
    """Spectra with significant narrow features (emission lines; see :func:`narrow_feature_excess`)
    appear this many times per epoch. Lines are a few pixels of a few spectra, a small part of the
    chi^2 next to pixel noise, so a conv net learns them last; oversampling brings them forward."""
    feature_threshold: float = 0.05
    """Excess reduced chi^2 about a running median above which a spectrum counts as featured."""
    noise_pairs: bool = False
    """Noise2noise training (mock only): every training spectrum (the survey's, re-simulated from its
    truth row, and the extra ones) comes as two independent noise draws of one noiseless spectrum;
    the encoder reads one and the loss scores the other, so lines get a full gradient while noise,
    unpredictable from the other draw, is not rewarded. Real surveys offer the same with split
    exposures of one object. Replaces blind-spot training (holdout_fraction is ignored)."""


@dataclass(kw_only=True)
class SpectrumRecipe:
    kind: str = "spectrum"
    """Which trainer the recipe is for (``aion tokenizer train`` dispatches on it)."""
    tokenizer: SpectrumTokenizerConfig = field(default_factory=SpectrumTokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: SpectrumDataConfig = field(default_factory=SpectrumDataConfig)

    def __post_init__(self) -> None:
        check_recipe_kind(self.kind, "spectrum")


def load_recipe(recipe: PathLike | dict[str, Any] | SpectrumRecipe) -> SpectrumRecipe:
    """A recipe from a YAML path, a mapping, or a recipe object (unknown keys are errors)."""
    return load_config(SpectrumRecipe, recipe, "spectrum recipe")


def _concat_spectra(parts: list[SpectrumBatch]) -> SpectrumBatch:
    """Rows of several spectrum batches in one (:func:`concat_batches`); the line-spread widths are not
    used by the tokenizer and are dropped to save memory."""
    return dataclasses.replace(concat_batches(parts), lsf_sigma=None)


def load_spectra(data_dir: PathLike, survey: str = "desi", modality: str = "desi_spectrum",
                 config: str | None = None, max_spectra: int | None = None,
                 ) -> tuple[SpectrumBatch, np.ndarray]:
    """All spectra of one survey in an MMU directory, in memory: (SpectrumBatch, object_id)."""
    from aion.data.mmu import iter_mmu_hdf5

    parts, ids = [], []
    n = 0
    for sb in iter_mmu_hdf5(data_dir, survey, config, batch_size=512):
        if modality not in sb.modalities:
            raise KeyError(f"{data_dir}/{survey}: no {modality!r} modality in the files")
        parts.append(sb.modalities[modality])
        ids.append(sb.object_id)
        n += len(sb)
        if max_spectra is not None and n >= max_spectra:
            break
    if not parts:
        raise FileNotFoundError(f"{data_dir}/{survey}: no spectra found")
    batch = _concat_spectra(parts)
    object_id = np.concatenate(ids)
    if max_spectra is not None:
        batch, object_id = batch.select(slice(0, max_spectra)), object_id[:max_spectra]
    return batch, object_id


def _read_truth(data_dir: PathLike) -> dict[str, np.ndarray]:
    from aion.data.mmu import SurveyShards, concat_rows

    shards = SurveyShards(data_dir, "truth")
    return concat_rows(list(shards.iter_raw(4096)))


def simulate_noise_pairs(data_dir: PathLike, n_extra: int, min_r_flux: float, seed: int,
                         ) -> tuple[SpectrumBatch, SpectrumBatch]:
    """Two independent noisy draws of the noiseless DESI-like spectrum of every DESI-targeted truth row
    and of ``n_extra`` untargeted ones (mock data only)."""
    from aion.mock import spectra as mock_spectra
    from aion.mock.universe import noiseless_desi_spectra

    truth = _read_truth(data_dir)
    desi_id = np.asarray(truth["desi_object_id"])
    r_flux = np.asarray(truth["LEGACY_FLUX_TRUE"])[:, 1]
    rng = np.random.default_rng([seed, 11])
    pool = np.nonzero((desi_id < 0) & (r_flux > min_r_flux))[0]
    extra = rng.choice(pool, size=min(n_extra, pool.size), replace=False)
    rows = np.sort(np.concatenate([np.nonzero(desi_id >= 0)[0], extra]))
    draws: list[list[tuple]] = [[], []]
    for s in range(0, rows.size, 128):
        sub = {k: np.asarray(v)[rows[s:s + 128]] for k, v in truth.items()}
        clean = noiseless_desi_spectra(sub)
        expo = np.exp(rng.normal(0, 0.25, clean.shape[0]))
        for d in draws:
            d.append(mock_spectra.observe(clean, rng, expo))
    wave = mock_spectra.desi_wavelength()
    out = []
    for d in draws:
        out.append(SpectrumBatch(flux=np.concatenate([f for f, _, _ in d]), ivar=np.concatenate([i for _, i, _ in d]),
                                 wavelength=wave, valid=~np.concatenate([m for _, _, m in d])))
    return out[0], out[1]


def simulate_extra_spectra(data_dir: PathLike, n: int, min_r_flux: float, seed: int) -> SpectrumBatch:
    """Noisy DESI-like spectra for truth rows that DESI did not target (mock data only)."""
    from aion.mock import spectra as mock_spectra
    from aion.mock.universe import noiseless_desi_spectra

    truth = _read_truth(data_dir)
    r_flux = np.asarray(truth["LEGACY_FLUX_TRUE"])[:, 1]
    pool = np.nonzero((np.asarray(truth["desi_object_id"]) < 0) & (r_flux > min_r_flux))[0]
    rng = np.random.default_rng([seed, 7])
    rows = np.sort(rng.choice(pool, size=min(n, pool.size), replace=False))
    fluxes, ivars, masks = [], [], []
    for s in range(0, rows.size, 128):
        sub = {k: np.asarray(v)[rows[s:s + 128]] for k, v in truth.items()}
        clean = noiseless_desi_spectra(sub)
        f, iv, m = mock_spectra.observe(clean, rng, np.exp(rng.normal(0, 0.25, clean.shape[0])))
        fluxes.append(f)
        ivars.append(iv)
        masks.append(m)
    wave = mock_spectra.desi_wavelength()
    flux = np.concatenate(fluxes)
    return SpectrumBatch(flux=flux, ivar=np.concatenate(ivars), wavelength=wave, valid=~np.concatenate(masks))


# ============================================================================ training
def narrow_feature_excess(flux: np.ndarray, ivar: np.ndarray, valid: np.ndarray, width: int = 15) -> np.ndarray:
    """Per spectrum: reduced chi^2 of the data about its own running median, minus 1.

    Pure noise gives ~0 (+-0.02 for a few thousand pixels); emission lines and other narrow
    features give more. Data only (no truth), so it works on real surveys.
    """
    from scipy.ndimage import median_filter

    smooth = median_filter(flux, size=(1, width), mode="nearest")
    n = np.maximum(valid.sum(axis=1), 1)
    return (ivar * (flux - smooth) ** 2 * valid).sum(axis=1) / n - 1.0


def _subset(prepared: dict[str, torch.Tensor], idx: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    idx = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[idx] for k, v in prepared.items()}


@torch.no_grad()
def _chi2_metrics(model: SpectrumAutoencoder, prepared: dict[str, torch.Tensor], device: torch.device,
                  chunk: int = 128) -> dict[str, float]:
    """Reduced chi^2 of the reconstruction vs the (noisy) input over held-in/held-out spectra."""
    was = model.training
    model.eval()
    chis, used = [], set()
    for s in range(0, prepared["flux"].shape[0], chunk):
        b = {k: v[s:s + chunk].to(device) for k, v in prepared.items()}
        pred, idx, _ = model(b["flux"], b["ivar"], b["valid"])
        n = b["valid"].sum(1)
        chi = (b["ivar"] * (pred - b["flux"]) ** 2 * b["valid"]).sum(1) / n.clamp_min(1)
        chis.append(chi[n > 0].cpu())
        used.update(torch.unique(idx).tolist())
    model.train(was)
    c = torch.cat(chis)
    return {"chi2_median": float(c.median()), "chi2_mean": float(c.mean()), "codes_used": float(len(used))}


def train_spectrum_tokenizer(recipe: PathLike | dict[str, Any] | SpectrumRecipe, data_dir: PathLike,
                             out_dir: PathLike, progress: bool = True) -> dict[str, Any]:
    """Train a spectrum tokenizer on an MMU directory; resumes from checkpoints in ``out_dir/train``.

    Writes ``out_dir/tokenizer`` (save_pretrained), ``out_dir/recipe.yaml`` (resolved) and
    ``out_dir/train_metrics.json``; returns the metrics.
    """
    import yaml

    rec = load_recipe(recipe)
    mock_only = [k for k, on in (("data.noise_pairs", rec.data.noise_pairs),
                                 ("data.extra_from_truth", rec.data.extra_from_truth > 0)) if on]
    if mock_only and not (Path(data_dir) / "truth").is_dir():
        raise ValueError(f"{data_dir}: {' and '.join(mock_only)} simulate spectra from a mock universe's truth "
                         "table, and this directory has none (no truth/ survey). For real survey data set "
                         "data.noise_pairs: false and data.extra_from_truth: 0 and use blind-spot training "
                         "(tokenizer.holdout_fraction > 0).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(rec), sort_keys=False))
    t0 = time.perf_counter()
    torch.manual_seed(rec.train.seed)
    tok = SpectrumTokenizer(rec.tokenizer)
    targets = None
    if rec.data.noise_pairs:
        spectra, second = simulate_noise_pairs(data_dir, rec.data.extra_from_truth, rec.data.extra_min_r_flux,
                                               rec.train.seed)
        n_survey = 0
    else:
        spectra, _ = load_spectra(data_dir, rec.data.survey, rec.data.modality, rec.data.config,
                                  rec.data.max_spectra)
        n_survey = len(spectra)
        if rec.data.extra_from_truth > 0:
            extra = simulate_extra_spectra(data_dir, rec.data.extra_from_truth, rec.data.extra_min_r_flux,
                                           rec.train.seed)
            spectra = _concat_spectra([spectra, extra])
    prepared = tok.prepare(spectra)
    if rec.data.noise_pairs:
        t_flux, t_ivar, t_valid = resample_spectra(second, tok.config.edges, tok.config.min_coverage)
        amp = tok.amplitude_value(prepared["amp_index"].numpy())[:, None]  # the input draw's amplitude
        targets = {"target_flux": torch.from_numpy((t_flux / amp).astype(np.float32)),
                   "target_ivar": torch.from_numpy((t_ivar * amp**2).astype(np.float32)),
                   "target_valid": torch.from_numpy(t_valid)}
    train_source = {**prepared, **(targets or {})}
    present = prepared["valid"].any(dim=1).numpy()
    order = np.random.default_rng([rec.train.seed, 1]).permutation(np.nonzero(present)[0])
    n_val = int(round(rec.data.val_fraction * order.size)) if order.size > 1 else 0
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    if train_idx.size == 0:
        raise ValueError(f"{data_dir}: no spectrum with valid pixels on the tokenizer grid to train on")
    if rec.data.feature_oversample > 1:
        excess = narrow_feature_excess(prepared["flux"][train_idx].numpy(), prepared["ivar"][train_idx].numpy(),
                                       prepared["valid"][train_idx].numpy())
        repeats = np.where(excess > rec.data.feature_threshold, rec.data.feature_oversample, 1)
        train_idx = np.repeat(train_idx, repeats)
    train_set = _subset(train_source, train_idx)
    val_set = _subset(prepared, val_idx)
    device = torch.device(rec.train.device)
    t_prep = time.perf_counter() - t0

    def get_batch(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in _subset(train_set, idx).items() if k != "amp_index"}

    def validate(model: nn.Module) -> dict[str, float]:
        sets = {"train": {k: v for k, v in _subset(train_set, np.arange(min(256, train_idx.size))).items()
                          if not k.startswith("target_")}}
        if val_idx.size:
            sets["heldout"] = val_set
        res = {}
        for name, s in sets.items():
            res.update({f"{name}_{k}": v for k, v in _chi2_metrics(model, s, device).items()})
        return res

    metrics = train(tok.model, get_batch, int(train_idx.size), rec.train, out / "train", progress=progress,
                    validate=validate)
    tok.model.to("cpu").eval()
    tok.save_pretrained(out / "tokenizer")
    metrics.update({"n_spectra_survey": n_survey, "n_spectra_extra": len(spectra) - n_survey,
                    "n_train": int(train_idx.size), "n_val": int(val_idx.size), "prepare_seconds": t_prep,
                    "total_seconds": time.perf_counter() - t0,
                    "n_parameters": sum(p.numel() for p in tok.model.parameters())})
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# ============================================================================ evaluation
LINES_FOR_EVAL = {"Halpha": (6564.61,), "OII": (3727.09, 3729.88)}
"""Rest wavelengths (vacuum, as in the mock) of the lines whose fluxes are checked."""
_LINE_HALF_WIDTH = 7.0  # rest-frame Angstrom around the line (group) centre
_CONT_BANDS = ((-60.0, -30.0), (30.0, 60.0))  # rest-frame side bands for the continuum


def line_fluxes(wave: np.ndarray, flux: np.ndarray, valid: np.ndarray, z: np.ndarray, rest: tuple[float, ...],
                ivar: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Simple line flux: sum of (flux - side-band median continuum) * dlambda in a fixed rest window.

    The same estimator runs on decoded, noiseless and observed spectra. Returns (flux, sigma)
    in 1e-17 erg/s/cm^2; sigma from ``ivar`` (NaN without it); NaN where the window is not
    fully valid and covered.
    """
    centre = float(np.mean(rest))
    dl = np.gradient(wave)
    out = np.full(flux.shape[0], np.nan)
    sig = np.full(flux.shape[0], np.nan)
    for i in range(flux.shape[0]):
        c = centre * (1 + z[i])
        win = np.abs(wave - c) <= _LINE_HALF_WIDTH * (1 + z[i])
        side = np.zeros_like(win)
        for a, b in _CONT_BANDS:
            side |= (wave >= c + a * (1 + z[i])) & (wave <= c + b * (1 + z[i]))
        if win.sum() < 3 or not valid[i, win].all() or (valid[i] & side).sum() < 10:
            continue
        cont = np.median(flux[i, side & valid[i]])
        out[i] = np.sum((flux[i, win] - cont) * dl[win])
        if ivar is not None:
            sig[i] = np.sqrt(np.sum(dl[win] ** 2 / ivar[i, win]))
    return out, sig


def r2_scores(decoded: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-spectrum R^2 = 1 - sum (dec-true)^2 / sum (true - mean(true))^2, and the pooled value
    (sums of both over all spectra and pixels, each spectrum centred on its own mean)."""
    res = ((decoded - truth) ** 2).sum(axis=1)
    tot = ((truth - truth.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    return 1 - res / tot, float(1 - res.sum() / tot.sum())


def _pct(x: np.ndarray, qs: tuple[float, ...] = (5, 16, 50, 84, 95)) -> dict[str, float]:
    x = x[np.isfinite(x)]
    return {f"p{q:g}": float(np.percentile(x, q)) for q in qs} if x.size else {}


def load_mock_desi_with_truth(data_dir: PathLike, max_spectra: int | None = None,
                              ) -> tuple[SpectrumBatch, dict[str, np.ndarray], np.ndarray]:
    """A mock universe's DESI spectra with their truth rows and noiseless spectra.

    Returns (observed SpectrumBatch, truth columns row-aligned with it, noiseless flux (B, 7781) in
    1e-17 erg/s/cm^2/A). Errors name the directory when a spectrum has no truth row or the grid
    is not the mock's DESI grid.
    """
    from aion.mock.spectra import desi_wavelength
    from aion.mock.universe import noiseless_desi_spectra

    obs, object_id = load_spectra(data_dir, "desi", "desi_spectrum", max_spectra=max_spectra)
    truth_cols = _read_truth(data_dir)
    row_of = {int(v): i for i, v in enumerate(np.asarray(truth_cols["desi_object_id"])) if v >= 0}
    missing = [int(o) for o in object_id if int(o) not in row_of]
    if missing:
        raise KeyError(f"{data_dir}: {len(missing)} DESI objects have no truth row (e.g. {missing[0]})")
    rows = np.array([row_of[int(o)] for o in object_id])
    sub = {k: np.asarray(v)[rows] for k, v in truth_cols.items()}
    truth = np.concatenate([noiseless_desi_spectra({k: v[s:s + 128] for k, v in sub.items()})
                            for s in range(0, rows.size, 128)])
    n_wave = desi_wavelength().size
    if obs.flux.shape[1] != n_wave:
        raise ValueError(f"{data_dir}: DESI spectra have {obs.flux.shape[1]} pixels, expected {n_wave}")
    return obs, sub, truth


def evaluate_spectrum_tokenizer(tokenizer_dir: PathLike, data_dir: PathLike, out_dir: PathLike, *,
                                max_objects: int | None = None, n_plots: int = 4) -> dict[str, Any]:
    """Reconstruction quality on held-out mock DESI spectra against their noiseless truth.

    ``data_dir`` must hold a mock universe (``desi`` and ``truth`` surveys) that the tokenizer
    was not trained on. Metrics (all over the DESI wavelength range, decoded with linear
    sampling onto the DESI 0.8 A grid):
    - ``r2``: per spectrum 1 - sum((dec-true)^2)/sum((true-mean(true))^2) over all DESI pixels,
      median / percentiles, and ``r2_pooled`` (sums over all spectra; see :func:`r2_scores`);
    - ``chi2``: reduced chi^2 of decoded vs observed on valid pixels (noiseless truth vs
      observed given as the floor, ~1);
    - ``lines``: H-alpha and [OII] fluxes (:func:`line_fluxes`) for objects whose truth line
      S/N (truth flux / observed noise) > 5: pull = (dec - true)/sigma_obs and ratio dec/true;
      "recovered within noise" = fraction with |pull| < 2 (the observed spectrum's own pull
      distribution is reported alongside for reference).
    Writes ``metrics.json`` and ``overlay_*.png`` in ``out_dir``.
    """
    from aion.mock.spectra import desi_wavelength

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer_dir)
    if not isinstance(tok, SpectrumTokenizer):
        raise TypeError(f"{tokenizer_dir} holds a {type(tok).__name__}, not a SpectrumTokenizer")
    obs, sub, truth = load_mock_desi_with_truth(data_dir, max_objects)
    wave = desi_wavelength()

    t0 = time.perf_counter()
    tokens = tok.encode(obs)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec = tok.decode(tokens, wavelength=wave)
    t_dec = time.perf_counter() - t0
    present = obs.present
    d, t = dec.flux.astype(np.float64)[present], truth[present]
    r2, r2_pool = r2_scores(d, t)
    ov, oi = obs.valid[present], obs.ivar[present].astype(np.float64)
    of = obs.flux[present].astype(np.float64)
    nv = ov.sum(1)
    chi2_dec = (oi * (d - of) ** 2 * ov).sum(1) / nv
    chi2_true = (oi * (t - of) ** 2 * ov).sum(1) / nv
    z = np.asarray(sub["Z"], dtype=np.float64)[present]
    target = np.asarray(sub["desi_target"])[present]

    lines: dict[str, Any] = {}
    for name, rest in LINES_FOR_EVAL.items():
        f_true, sig = line_fluxes(wave, t, ov, z, rest, ivar=np.where(ov, oi, np.inf))
        f_dec, _ = line_fluxes(wave, d, ov, z, rest)
        f_obs, _ = line_fluxes(wave, of, ov, z, rest)
        strong = np.isfinite(f_true) & np.isfinite(sig) & (sig > 0) & (f_true / sig > 5)
        pull = (f_dec - f_true)[strong] / sig[strong]
        pull_obs = (f_obs - f_true)[strong] / sig[strong]
        entry: dict[str, Any] = {"n_snr_gt_5": int(strong.sum())}
        if strong.any():
            mad = 1.4826 * np.median(np.abs(pull - np.median(pull)))
            entry.update({
                "pull_median": float(np.median(pull)), "pull_robust_std": float(mad),
                "frac_abs_pull_lt_1": float(np.mean(np.abs(pull) < 1)),
                "frac_abs_pull_lt_2": float(np.mean(np.abs(pull) < 2)),
                "ratio": _pct(f_dec[strong] / f_true[strong]),
                "observed_pull_robust_std": float(1.4826 * np.median(np.abs(pull_obs - np.median(pull_obs)))),
                "observed_frac_abs_pull_lt_2": float(np.mean(np.abs(pull_obs) < 2)),
            })
        lines[name] = entry

    metrics: dict[str, Any] = {
        "tokenizer_dir": str(tokenizer_dir), "data_dir": str(data_dir),
        "n_objects": int(len(obs)), "n_present": int(present.sum()),
        "r2_median": float(np.median(r2)), "r2_pooled": r2_pool, "r2": _pct(r2, (1, 5, 16, 50, 84)),
        "r2_frac_ge_0.99": float(np.mean(r2 >= 0.99)),
        "r2_median_by_target": {k: float(np.median(r2[target == v])) for k, v in (("BGS", 1), ("LRG", 2))
                                if (target == v).any()},
        "chi2_decoded_vs_observed": _pct(chi2_dec), "chi2_truth_vs_observed": _pct(chi2_true),
        "lines": lines,
        "codes_used": int(torch.unique(tokens[present, 1:]).numel()), "codebook_size": tok.codebook_size,
        "encode_seconds": t_enc, "decode_seconds": t_dec,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if n_plots > 0:
        _plot_overlays(out, wave, of, ov, d, t, z, r2, lines_snr=_halpha_snr(wave, t, ov, oi, z), n=n_plots)
    return metrics


def _halpha_snr(wave: np.ndarray, truth: np.ndarray, valid: np.ndarray, ivar: np.ndarray, z: np.ndarray,
                ) -> np.ndarray:
    f, s = line_fluxes(wave, truth, valid, z, LINES_FOR_EVAL["Halpha"], ivar=np.where(valid, ivar, np.inf))
    return np.where(np.isfinite(f / s), f / s, -np.inf)


def _plot_overlays(out: Path, wave: np.ndarray, obs: np.ndarray, valid: np.ndarray, dec: np.ndarray,
                   truth: np.ndarray, z: np.ndarray, r2: np.ndarray, lines_snr: np.ndarray, n: int) -> None:
    """Observed / decoded / noiseless truth for the strongest H-alpha emitter and R^2 quantiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = {"strong_emission": int(np.argmax(lines_snr))}
    order = np.argsort(r2)
    for q in (0.5, 0.1, 0.9, 0.02)[: max(0, n - 1)]:
        picks[f"r2_q{int(q * 100):02d}"] = int(order[int(q * (order.size - 1))])
    for name, i in picks.items():
        fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), gridspec_kw={"height_ratios": [2, 1]})
        o = np.where(valid[i], obs[i], np.nan)
        for ax, sl in ((axes[0], slice(None)), (axes[1], None)):
            if sl is None:  # zoom on H-alpha if inside, else on [OII]
                c = 6564.61 * (1 + z[i])
                if c > wave[-1] - 100:
                    c = 3728.5 * (1 + z[i])
                sl = slice(*np.searchsorted(wave, [c - 80, c + 80]))
            ax.plot(wave[sl], o[sl], color="0.7", lw=0.5, label="observed")
            ax.plot(wave[sl], truth[i, sl], color="k", lw=0.9, label="noiseless truth")
            ax.plot(wave[sl], dec[i, sl], color="C3", lw=0.9, label="decoded")
            ax.set_xlabel("observed wavelength [A]")
            ax.set_ylabel("flux [1e-17 erg/s/cm2/A]")
        lo, hi = np.percentile(truth[i], [0.5, 99.9])
        pad = 0.4 * (hi - lo)
        axes[0].set_ylim(lo - pad, hi + pad)
        axes[0].set_title(f"{name}: z={z[i]:.3f}, R^2={r2[i]:.4f}")
        axes[0].legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"overlay_{name}.png", dpi=90)
        plt.close(fig)


__all__ = [
    "AION_GRID", "SpectrumAutoencoder", "SpectrumDataConfig", "SpectrumRecipe", "SpectrumTokenizer",
    "SpectrumTokenizerConfig", "evaluate_spectrum_tokenizer", "line_fluxes", "load_recipe", "load_spectra",
    "narrow_feature_excess", "pixel_edges", "r2_scores", "rebin", "resample_spectra", "train_spectrum_tokenizer",
]

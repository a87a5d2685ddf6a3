"""Quantizers behind one interface: continuous codes <-> integer indices.

- ``FSQ``: finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505): each latent
  channel is bounded and rounded to a few levels; no codebook, no auxiliary loss.
- ``LFQ``: lookup-free quantization (Yu et al. 2023, MagViT-2, arXiv 2310.05737): each
  channel is its sign; an entropy penalty keeps the 2^d codes in use.
Fitted quantizers for scalars (quantile bins, linear grids) implement the same protocol
in ``aion.tokenizers.binning``.

Quantization always runs in float32, also under autocast, and never communicates across
processes (no hidden all-reduce: a rank that sees different data must not hang).

Shapes: ``x`` is (..., d) with the code dimension last; indices are (...).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Quantizer(Protocol):
    @property
    def codebook_size(self) -> int: ...

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (quantized x with a straight-through gradient, integer indices)."""

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Inverse of the index half of ``quantize``."""


def draw_unrounded(shape: torch.Size | tuple[int, ...], share: float, training: bool,
                   device: torch.device) -> torch.Tensor | None:
    """Training-time quantization noise (QuantNoise, Fan et al. 2020): a boolean mask of the latent
    vectors whose codes skip FSQ rounding in this step, each drawn with probability ``share``;
    None (round everything) outside training or when ``share`` is 0. On the unrounded share the
    decoder's gradient reaches the encoder exactly instead of through the rounding noise."""
    if not training or share <= 0:
        return None
    return torch.rand(tuple(shape), device=device) < share


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


class FSQ(nn.Module):
    """Finite scalar quantization with per-channel ``levels`` (e.g. (8, 5, 5, 5) -> 1000 codes)."""

    def __init__(self, levels: tuple[int, ...] | list[int]):
        super().__init__()
        if not levels or any(int(n) < 2 for n in levels):
            raise ValueError(f"levels: expected at least one channel with >= 2 levels, got {levels}")
        self.levels = tuple(int(n) for n in levels)
        lv = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1, *self.levels[:-1]], dtype=torch.int64), dim=0)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return int(torch.tensor(self.levels).prod())

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        eps = 1e-3
        half_l = (self._levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, x: torch.Tensor, unrounded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``unrounded`` (boolean, ``x.shape[:-1]``): vectors whose codes skip the rounding (training-time
        quantization noise); their indices are still those of the rounded vector."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"FSQ: expected last dimension {self.dim}, got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            bounded = self._bound(x.float())
            q = _round_ste(bounded)  # integers centred on 0
            half_width = torch.div(self._levels, 2, rounding_mode="floor")
            codes = q / half_width
            if unrounded is not None:
                codes = torch.where(unrounded[..., None], bounded / half_width, codes)
            digits = (q + half_width).round().long()
            indices = (digits * self._basis).sum(dim=-1)
        return codes, indices

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        half_width = torch.div(self._levels, 2, rounding_mode="floor")
        digits = torch.div(indices.long()[..., None], self._basis, rounding_mode="floor") % self._levels.long()
        return (digits.float() - half_width) / half_width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize(x)


class LFQ(nn.Module):
    """Lookup-free quantization: ``dim`` binary channels -> 2**dim codes.

    ``aux_loss(x)`` returns the entropy penalty (per-sample entropy minus batch-code
    entropy, MagViT-2) plus a commitment term; add ``entropy_weight * aux_loss`` to the
    training loss. It is computed on the local batch only.
    """

    def __init__(self, dim: int, entropy_temperature: float = 0.01, commitment_weight: float = 0.25):
        super().__init__()
        if not 1 <= dim <= 16:
            raise ValueError(f"dim: expected 1..16 binary channels (2..65536 codes), got {dim}")
        self.dim = dim
        self.entropy_temperature = entropy_temperature
        self.commitment_weight = commitment_weight
        self.register_buffer("_basis", 2 ** torch.arange(dim, dtype=torch.int64), persistent=False)

    @property
    def codebook_size(self) -> int:
        return 2**self.dim

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"LFQ: expected last dimension {self.dim}, got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            sign = torch.where(x > 0, 1.0, -1.0)
            codes = x + (sign - x).detach()
            indices = ((x > 0).long() * self._basis).sum(dim=-1)
        return codes, indices

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        bits = torch.div(indices.long()[..., None], self._basis, rounding_mode="floor") % 2
        return bits.float() * 2 - 1

    def aux_loss(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float().reshape(-1, self.dim)
            all_codes = self.indices_to_codes(torch.arange(self.codebook_size, device=x.device))  # (K, d)
            logits = 2 * x @ all_codes.T / self.entropy_temperature  # -||x-c||^2 up to a per-row constant
            prob = logits.softmax(dim=-1)
            per_sample = -(prob * prob.clamp_min(1e-9).log()).sum(-1).mean()
            avg = prob.mean(0)
            batch_entropy = -(avg * avg.clamp_min(1e-9).log()).sum()
            commit = ((x - torch.where(x > 0, 1.0, -1.0)) ** 2).mean()
        return per_sample - batch_entropy + self.commitment_weight * commit

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize(x)

"""Model FLOPs of a FourM training step, for tokens/s -> MFU (model FLOPs utilisation).

Counted per step, forward + backward = 3x forward, matmuls only (2 FLOPs per multiply-add):

    6 * (N_enc * T_in + N_dec * T_tgt)                      weight matmuls of the blocks
  + 6 * d * sum_m(V_m * T_tgt_m)                            output heads (one per target's modality)
  + 12 * d * (L_enc * T_in * c_in                           attention scores and values, QK^T and AV:
              + L_dec * T_tgt * (c_tgt + c_in))             2 * 2 * d * c forward per token, layer, context

``N_enc`` / ``N_dec`` = parameters of the encoder / decoder blocks (the decoder's include
cross-attention), ``T_in`` / ``T_tgt`` = real (unpadded) input / target tokens in the step,
``c_in`` / ``c_tgt`` = keys each query attends to (the object's input / target count), ``L`` =
depths, ``d`` = width. Embedding lookups, norms, softmax and padding are not counted (model
FLOPs, not hardware FLOPs), so MFU is a lower bound of the hardware's busy fraction.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from aion.model.config import ModelConfig
from aion.model.fourm import FourM


def block_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(encoder, decoder) block parameter counts, from a meta-device model (no memory)."""
    with torch.device("meta"):
        model = FourM(cfg)
    enc = sum(p.numel() for p in model.encoder.parameters()) + sum(p.numel() for p in model.enc_norm.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters()) + sum(p.numel() for p in model.dec_norm.parameters())
    return enc, dec


def step_flops(cfg: ModelConfig, n_in: Mapping[str, int] | int, n_tgt: Mapping[str, int], *,
               objects: int, blocks: tuple[int, int] | None = None) -> float:
    """Training FLOPs of one step with ``objects`` objects of equal size (see the module docstring).

    ``n_in``: real input tokens per object (int, or per modality); ``n_tgt``: real target tokens
    per object, per modality (heads differ in vocabulary size).
    """
    enc, dec = blocks or block_parameters(cfg)
    c_in = n_in if isinstance(n_in, int) else sum(n_in.values())
    c_tgt = sum(n_tgt.values())
    d = cfg.dim
    heads = sum(cfg.modalities[m].vocab_size * k for m, k in n_tgt.items())
    per_object = (6 * (enc * c_in + dec * c_tgt) + 6 * d * heads
                  + 12 * d * (cfg.encoder_depth * c_in * c_in + cfg.decoder_depth * c_tgt * (c_tgt + c_in)))
    return float(per_object) * objects


def flops_per_token(cfg: ModelConfig, n_in: int, n_tgt: Mapping[str, int]) -> float:
    """Training FLOPs per (input + target) token for objects with ``n_in`` inputs and ``n_tgt`` targets."""
    return step_flops(cfg, n_in, n_tgt, objects=1) / (n_in + sum(n_tgt.values()))

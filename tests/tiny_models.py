"""A tiny untrained FourM over given tokenizers, exported like a trained one (shared by inference tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from aion.model import FourM, ModalitySpec, preset
from aion.training.checkpoint import COMPLETE, MODEL_CONFIG, WEIGHTS, export_model, save_model_config, save_weights


def specs_of(tokenizers: dict) -> dict[str, ModalitySpec]:
    return {n: ModalitySpec(num_tokens=t.num_tokens, vocab_size=t.vocab_size) for n, t in tokenizers.items()}


def export_tiny_model(specs: dict[str, ModalitySpec], tmp: Path, dim: int = 16, seed: int | None = 0) -> Path:
    """Build ``preset('tiny', dim=dim)`` over ``specs`` (after ``torch.manual_seed(seed)`` unless None),
    write it as a one-step checkpoint under ``tmp/run`` and export it to ``tmp/model`` (returned)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = FourM(preset("tiny", specs, dim=dim))
    ckpt = tmp / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    save_model_config(model.cfg, ckpt / MODEL_CONFIG)
    save_weights(model.state_dict(), ckpt / WEIGHTS)
    (ckpt / COMPLETE).write_text('{"step": 1}')
    return export_model(tmp / "run", tmp / "model")

"""A small, resumable training loop shared by the trained tokenizers (image, spectrum).

The model is a plain ``nn.Module`` with ``loss(batch) -> (loss, metrics)``; data come
from ``get_batch(indices)`` over an in-memory training set, and the batch drawn at step
``s`` is a pure function of (seed, s), so a resumed run sees exactly the batches an
uninterrupted run would have seen. Checkpoints hold model, optimizer, scheduler, step and
RNG state (and the weight average when ``ema_decay`` is set); they are written to a
temporary file and renamed (a crash mid-write leaves the previous checkpoint loadable) and
loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 64
    lr: float = 2e-3
    """Peak learning rate (AdamW), reached after ``warmup_steps``, then cosine decay to 10%."""
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    bf16: bool = False
    """bf16 autocast (helps on recent CPUs and GPUs; quantizers stay in float32)."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (0 = off). The saved model and its validation
    use the average, which smooths away the step-to-step noise of the last updates (a 2% band
    bias that moves between runs is that noise). The decay ramps up as min(ema_decay,
    (1 + t) / (10 + t)) so the first weights are soon forgotten."""
    log_every: int = 25
    checkpoint_every: int = 500
    keep_last: int = 2
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: expected 0..steps, got {self.warmup_steps}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: expected 0 <= decay < 1, got {self.ema_decay}")


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the batch at ``step``: epochs are seeded permutations, batches consecutive slices."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch_size:(pos + 1) * batch_size] if n >= batch_size else perm


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def ema_decay_at(step: int, cfg: TrainConfig) -> float:
    """Decay used for the average after optimizer step ``step`` (0-based)."""
    return min(cfg.ema_decay, (1.0 + step) / (10.0 + step))


class WeightAverage:
    """Exponential moving average of a model's floating-point parameters (buffers are not averaged)."""

    def __init__(self, model: nn.Module):
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n])

    def load(self, shadow: dict[str, torch.Tensor]) -> None:
        if set(shadow) != set(self.shadow):
            raise ValueError(f"checkpoint's weight average names {sorted(set(shadow) ^ set(self.shadow))[:5]} "
                             "do not match the model")
        self.shadow = {n: t.clone() for n, t in shadow.items()}


def _save_checkpoint(out: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, keep_last: int,
                     ema: WeightAverage | None = None) -> None:
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "torch_rng": torch.get_rng_state()}
    if ema is not None:
        state["ema"] = ema.shadow
    path = out / f"checkpoint_{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in _checkpoints(out)[:-keep_last]:
        old.unlink()


def train(model: nn.Module, get_batch: Callable[[np.ndarray], Any], n_train: int, cfg: TrainConfig,
          out: str | os.PathLike, *, progress: bool = True, resume: bool = True,
          validate: Callable[[nn.Module], dict[str, float]] | None = None) -> dict[str, Any]:
    """Train ``model`` in place; returns the final metrics. Resumes from the newest checkpoint in ``out``."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start = 0
    ema = WeightAverage(model) if cfg.ema_decay > 0 else None
    ckpts = _checkpoints(out) if resume else []
    if ckpts:
        state = torch.load(ckpts[-1], map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        if ema is not None:
            if "ema" not in state:
                raise ValueError(f"{ckpts[-1]}: train.ema_decay is {cfg.ema_decay} but this checkpoint was "
                                 "written without a weight average; resume with ema_decay 0 or train afresh")
            ema.load(state["ema"])
    else:
        torch.manual_seed(cfg.seed)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log = (out / "metrics.jsonl").open("a")
    bar = tqdm(total=cfg.steps, initial=start, desc="train tokenizer", unit="step", disable=not progress)
    metrics: dict[str, Any] = {}
    t_last = time.perf_counter()
    model.train()
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = get_batch(batch_indices(n_train, cfg.batch_size, cfg.seed, step))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, metrics = model.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; metrics {metrics}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model, ema_decay_at(step, cfg))
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            now = time.perf_counter()
            record = {"step": step + 1, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],
                      "grad_norm": float(grad_norm), "seconds": now - t_last,
                      **{k: float(v) for k, v in metrics.items()}}
            t_last = now
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4g}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(out, step + 1, model, opt, cfg.keep_last, ema)
    bar.close()
    log.close()
    if ema is not None:
        ema.copy_to(model)  # the checkpoints keep the raw weights; the model leaves with the average
    model.eval()
    final = {"loss": float(loss.detach()) if cfg.steps > start else float("nan"),
             **{k: float(v) for k, v in metrics.items()}}
    if validate is not None:
        final.update({f"val_{k}": v for k, v in validate(model).items()})
    return final

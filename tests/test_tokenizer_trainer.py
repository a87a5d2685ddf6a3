"""The shared tokenizer training loop's weight average (``TrainConfig.ema_decay``).

The model below records the weights it is called with, so the average the trainer returns can
be checked against the same average computed by hand from the raw trajectory, and an
interrupted run against an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aion.tokenizers.trainer import TrainConfig, ema_decay_at, train


class Recorder(nn.Module):
    """Least squares on a fixed linear problem; keeps a copy of the weights at every loss call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.seen: list[torch.Tensor] = []

    def loss(self, batch):
        self.seen.append(torch.cat([self.lin.weight.detach().flatten(), self.lin.bias.detach()]).clone())
        err = self.lin(batch["x"])[:, 0] - batch["y"]
        return (err**2).mean(), {}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.5 * torch.randn(64, generator=g)  # noisy: SGD jitters

    def get_batch(idx: np.ndarray):
        i = torch.from_numpy(idx)
        return {"x": x[i], "y": y[i]}

    return get_batch


def _flat(model: Recorder) -> torch.Tensor:
    return torch.cat([model.lin.weight.detach().flatten(), model.lin.bias.detach()])


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=40, batch_size=8, lr=0.05, warmup_steps=2, log_every=10, checkpoint_every=10, keep_last=4, seed=3)
    return TrainConfig(**{**base, **kw})


def test_weight_average_is_the_ema_of_the_raw_trajectory(tmp_path):
    torch.manual_seed(0)
    model = Recorder()
    cfg = _cfg(ema_decay=0.9)
    train(model, _data(), 64, cfg, tmp_path, progress=False)
    raw_final = torch.load(tmp_path / "checkpoint_00000040.pt", weights_only=True)["model"]
    raw_final = torch.cat([raw_final["lin.weight"].flatten(), raw_final["lin.bias"]])
    # seen[s] = weights before step s, so the weights after step s are seen[s + 1] (raw_final for the last)
    after = [*model.seen[1:], raw_final]
    avg = model.seen[0].clone()
    for step, w in enumerate(after):
        d = ema_decay_at(step, cfg)
        avg = d * avg + (1 - d) * w
    torch.testing.assert_close(_flat(model), avg, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_flat(model), raw_final, atol=1e-4)  # the average is not the last step
    assert ema_decay_at(0, cfg) == pytest.approx(0.1) and ema_decay_at(1000, cfg) == 0.9


def test_weight_average_resumes_exactly_and_off_means_raw_weights(tmp_path):
    torch.manual_seed(0)
    whole = Recorder()
    train(whole, _data(), 64, _cfg(ema_decay=0.9), tmp_path / "whole", progress=False)
    torch.manual_seed(0)
    first = Recorder()
    train(first, _data(), 64, _cfg(ema_decay=0.9, steps=40), tmp_path / "cut", progress=False)
    # interrupt: drop the final checkpoints so a rerun resumes from step 20
    for p in sorted((tmp_path / "cut").glob("checkpoint_*.pt")):
        if int(p.stem.split("_")[1]) > 20:
            p.unlink()
    assert (tmp_path / "cut" / "checkpoint_00000020.pt").exists()
    torch.manual_seed(123)  # the resumed run must not depend on the caller's RNG
    resumed = Recorder()
    train(resumed, _data(), 64, _cfg(ema_decay=0.9), tmp_path / "cut", progress=False)
    assert len(resumed.seen) == 20
    torch.testing.assert_close(_flat(resumed), _flat(whole), rtol=0, atol=0)

    torch.manual_seed(0)
    plain = Recorder()
    train(plain, _data(), 64, _cfg(), tmp_path / "plain", progress=False)
    raw = torch.load(tmp_path / "plain" / "checkpoint_00000040.pt", weights_only=True)["model"]
    torch.testing.assert_close(plain.lin.weight.detach(), raw["lin.weight"], rtol=0, atol=0)


def test_weight_average_errors(tmp_path):
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    torch.manual_seed(0)
    train(Recorder(), _data(), 64, _cfg(steps=10), tmp_path, progress=False)
    with pytest.raises(ValueError, match="without a weight average"):
        train(Recorder(), _data(), 64, _cfg(steps=20, ema_decay=0.9), tmp_path, progress=False)

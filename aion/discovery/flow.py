"""Conditional flow matching on embeddings: residual representations and flow log-densities.

A velocity net ``v(x_t, t, c)`` is trained on the rectified-flow path ``x_t = (1-t) x0 + t x1``
(``x0 ~ N(0, I)``, ``x1`` = standardized data) with classifier-free conditioning dropout, so the
same net is both the conditional and (with the learned null condition) the unconditional flow.
Integrating the guided flow from data (t=1) back to the base (t=0) maps every conditional
distribution ``p(x | c)`` onto the same Gaussian: what is left, the *residual*, no longer carries
the conditions, while structure that the conditions do not explain survives (the idea of
"What We Don't C", arXiv 2511.09433). The unconditional branch also gives exact log-densities by
the instantaneous change of variables, used as an outlier score (flow NLL).

Everything is seeded; inference is chunked so memory does not grow with the number of objects.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aion.files import replace_directory

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_KIND = "aion.discovery.ConditionalFlow"
_METHODS = ("euler", "midpoint", "rk4")


# ----------------------------------------------------------------------------- ODE solver
def integrate(f: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, t0: float, t1: float, steps: int,
              method: str = "rk4") -> torch.Tensor:
    """Fixed-step solution of ``dx/dt = f(x, t)`` from ``t0`` to ``t1`` (either direction).

    Fixed steps keep the map deterministic and its cost known in advance, which matters more here
    than adaptivity: the same solver must give the same residual for the same object every time.
    """
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    steps = int(steps)
    h = (float(t1) - float(t0)) / steps
    for i in range(steps):
        t = float(t0) + i * h  # not accumulated, so the last step ends on t1 to rounding
        if method == "euler":
            x = x + h * f(x, t)
        elif method == "midpoint":
            k1 = f(x, t)
            x = x + h * f(x + 0.5 * h * k1, t + 0.5 * h)
        else:
            k1 = f(x, t)
            k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
            k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
            k4 = f(x + h * k3, t + h)
            x = x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return x


# ----------------------------------------------------------------------------- configuration
@dataclass
class FlowConfig:
    """Net size and training schedule; the defaults fit 5k x 64-dim embeddings in well under a minute on one core."""

    hidden: int = 192
    depth: int = 3
    """Residual MLP blocks."""
    time_freqs: int = 8
    """Fourier frequencies of the time features (sin and cos each)."""
    cond_dropout: float = 0.2
    """Probability that an example's condition is replaced by the learned null condition."""
    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    """Exponential moving average of the weights (what inference uses); 0 turns it off."""
    val_fraction: float = 0.1
    """Seeded share of the objects held out for the validation loss (never trained on)."""
    log_every: int = 50
    seed: int = 0
    ode_steps: int = 32
    ode_method: str = "rk4"
    whiten: bool = True
    """Decorrelate the dimensions (PCA whitening) before the flow, not only scale them: embedding dimensions are
    strongly correlated, and straight paths from an isotropic Gaussian to a nearly degenerate cloud are hard to
    learn. On the quickstart's held-out embeddings the residuals' best probe R^2 for z fell from 0.18-0.23
    (per-dimension scaling) to below 0.1 (docs/discovery.md)."""
    whiten_floor: float = 1e-3
    """Eigenvalues below this share of the largest are raised to it, so near-empty directions are not blown up
    into unit-variance noise. On the quickstart embeddings 1e-6 kept less of the hidden AGN signal and 1e-2 let z
    leak back (``benchmarks/residualize_check.py --set whiten_floor=...``)."""
    components: int | None = None
    """Keep only this many leading principal components (whitened) and model them; the residual then has
    ``components`` dimensions. None: all. Residuals are isotropic by construction, so in every direction
    the flow keeps, noise weighs as much as signal: on a 128-dim embedding whose hidden signal lives in
    a few leading directions, k-NN and ridge probes could no longer find it among 128 unit-variance
    dimensions (docs/discovery.md). Needs ``whiten``."""
    data_noise: float = 0.0
    """Std of Gaussian noise added to each (whitened) training target: the flow then models the data density
    smoothed on this scale and its map stays smooth below it, so small differences between similar objects
    (a hidden property) are carried into the residual instead of being scrambled. 0: off (docs/discovery.md)."""
    cond_noise: float = 0.0
    """Std of Gaussian noise added to each training example's (standardized) conditions. With continuous
    conditions nearly every object has its own value, so a flow can learn p(x | c) per object (memorize) and
    map the data through a map that changes wildly between nearby c; jitter makes it model p(x | c) smoothed
    over this width of c instead. 0: off (docs/discovery.md)."""
    forget_r2: float | None = None
    """Stop training at the first check where a 15-NN probe, cross-validated on residuals (guidance 1) of
    ``forget_check_rows`` objects, predicts no condition with R^2 above this (e.g. 0.1). Every extra step of a flow
    that already forgets the conditions scrambles more of what it should keep (docs/discovery.md), and
    forgetting is measurable without any hidden truth, so this picks the least-trained flow that forgets.
    None: train all ``steps``. Needs conditions."""
    forget_check_every: int = 50
    """Steps between those checks; a multiple of ``log_every``."""
    forget_check_rows: int = 16384
    """Objects whose residuals the check probes: the held-out ones, then training ones up to this many. A k-NN
    probe reads less from fewer objects: on 40,000 embeddings a check on the 4,000 held-out ones stopped flows
    whose residuals leaked z at R^2 0.11-0.19 when probed on all of them (docs/discovery.md)."""
    chunk_size: int = 4096
    """Rows per inference chunk (log_prob uses a smaller one: its Jacobians are D times larger)."""

    def __post_init__(self) -> None:
        positive = ("hidden", "depth", "time_freqs", "steps", "batch_size", "log_every", "ode_steps", "chunk_size",
                    "forget_check_every", "forget_check_rows")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FlowConfig.{name}: expected an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"FlowConfig.{name}: expected an integer >= 0, got {value!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"FlowConfig.cond_dropout: expected a probability in [0, 1), got {self.cond_dropout!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"FlowConfig.ema_decay: expected a number in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ValueError(f"FlowConfig.val_fraction: expected a share in [0, 0.5), got {self.val_fraction!r}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"FlowConfig.{name}: expected a number > 0, got {value!r}")
        if self.forget_r2 is not None and not (isinstance(self.forget_r2, int | float)
                                               and math.isfinite(self.forget_r2) and self.forget_r2 < 1):
            raise ValueError(f"FlowConfig.forget_r2: expected None or an R^2 below 1, got {self.forget_r2!r}")
        if self.forget_check_rows < _FORGET_MIN_ROWS:
            raise ValueError(f"FlowConfig.forget_check_rows: a 5-fold 15-NN probe needs at least {_FORGET_MIN_ROWS} "
                             f"objects, got {self.forget_check_rows}")
        if self.forget_check_every % self.log_every:
            raise ValueError(f"FlowConfig.forget_check_every: expected a multiple of log_every ({self.log_every}), "
                             f"got {self.forget_check_every}")
        if not (math.isfinite(self.cond_noise) and self.cond_noise >= 0):
            raise ValueError(f"FlowConfig.cond_noise: expected a number >= 0, got {self.cond_noise!r}")
        if not (math.isfinite(self.data_noise) and self.data_noise >= 0):
            raise ValueError(f"FlowConfig.data_noise: expected a number >= 0, got {self.data_noise!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"FlowConfig.weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        if not 0.0 < self.whiten_floor < 1.0:
            raise ValueError(f"FlowConfig.whiten_floor: expected a share in (0, 1), got {self.whiten_floor!r}")
        if self.components is not None:
            if isinstance(self.components, bool) or not isinstance(self.components, int) or self.components < 1:
                raise ValueError(f"FlowConfig.components: expected None or an integer >= 1, got {self.components!r}")
            if not self.whiten:
                raise ValueError("FlowConfig.components needs whiten: true (the components are the whitening's)")
        if self.ode_method not in _METHODS:
            raise ValueError(f"FlowConfig.ode_method: expected one of {_METHODS}, got {self.ode_method!r}")

    @classmethod
    def from_dict(cls, data: dict) -> FlowConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"FlowConfig: unknown field(s) {unknown}; known are {sorted(known)}")
        return cls(**data)


# ----------------------------------------------------------------------------- network
class _Block(nn.Module):
    """Pre-LayerNorm residual MLP block modulated (scale, shift) by the time + condition embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(width, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(emb).chunk(2, dim=-1)
        u = self.norm(h) * (1.0 + scale) + shift
        return h + self.fc2(nn.functional.silu(self.fc1(u)))


class VelocityNet(nn.Module):
    """``v(x, t, c)``; rows with ``drop`` True use the learned null condition instead of ``c``.

    The condition reaches the net twice: as an embedding that modulates every block, and next to ``x``
    at the input (zeroed, with a flag set, when dropped). The direct path made the residuals of the
    sample embeddings carry measurably less of the conditions for the same cost.
    """

    def __init__(self, dim: int, cond_dim: int, hidden: int, depth: int, time_freqs: int):
        super().__init__()
        self.dim, self.cond_dim = dim, cond_dim
        # log-spaced frequencies up to a few cycles over [0, 1]: smooth enough in t for a 32-step solver
        self.register_buffer("freqs", torch.logspace(-1.0, math.log10(8.0), time_freqs) * 2 * math.pi,
                             persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(2 * time_freqs + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cond_mlp = (nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                         if cond_dim else None)
        self.null = nn.Parameter(torch.zeros(hidden))
        self.inp = nn.Linear(dim + (cond_dim + 1 if cond_dim else 0), hidden)
        self.blocks = nn.ModuleList(_Block(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None, drop: torch.Tensor) -> torch.Tensor:
        ang = t[..., None] * self.freqs
        emb = self.time_mlp(torch.cat([t[..., None], ang.sin(), ang.cos()], dim=-1))
        if self.cond_mlp is None:
            cemb, inp = self.null.expand_as(emb), x
        else:
            if c is None:
                c, drop = x.new_zeros(x.shape[:-1] + (self.cond_dim,)), torch.ones_like(drop)
            cemb = torch.where(drop[..., None], self.null, self.cond_mlp(c))
            flag = drop[..., None].to(x.dtype)
            inp = torch.cat([x, c * (1.0 - flag), flag], dim=-1)
        emb = nn.functional.silu(emb + cemb)
        h = self.inp(inp)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h)))


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


# ----------------------------------------------------------------------------- the flow
@dataclass
class FlowHistory:
    """Training record: mean loss per ``log_every`` steps and the held-out (conditional) loss at the same steps.

    The held-out loss is measured on at most 8192 of the ``n_val`` held-out objects (a seeded random subset),
    so that logging stays cheap next to training when there are millions of objects.
    """

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    forget_step: list[int] = field(default_factory=list)
    """Steps of the ``forget_r2`` checks, and the worst 15-NN R^2 of any condition at each."""
    forget_r2: list[float] = field(default_factory=list)
    stopped_at: int | None = None
    """The step training stopped at because the conditions were forgotten; None: it ran all its steps."""

    @property
    def final_loss(self) -> float:
        return self.loss[-1] if self.loss else float("nan")

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else float("nan")


_VAL_EVAL_MAX = 8192  # held-out rows scored at each log step (see FlowHistory)
_CHECK_ROWS = 65536  # rows per block when scanning inputs, so checks never copy a whole 1e6 x D array
_FORGET_MIN_ROWS = 20  # objects a forget_r2 check needs: 5 folds that leave 15 neighbours


def _as_matrix(a: np.ndarray | None, name: str, rows: int | None = None) -> np.ndarray | None:
    """``a`` as a 2-D numeric array (a 1-D ``c`` is one condition), every row finite; not copied when float."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.ndim == 1 and name == "c":
        a = a[:, None]
    if a.ndim != 2 or a.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a 2-D numeric array, got dtype {a.dtype} and shape {a.shape}")
    if rows is not None and a.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows (one per object), got {a.shape[0]}")
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    bad = np.concatenate([~np.isfinite(a[i:i + _CHECK_ROWS]).all(axis=1) for i in range(0, len(a), _CHECK_ROWS)]
                         or [np.zeros(0, dtype=bool)])
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} row(s) have NaN/inf values, e.g. rows {np.flatnonzero(bad)[:5]}")
    return a


def _moments(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation in float64, accumulated over row blocks (two passes)."""
    n = len(a)
    mean = sum(a[i:i + _CHECK_ROWS].sum(axis=0, dtype=np.float64) for i in range(0, n, _CHECK_ROWS)) / n
    var = sum((((a[i:i + _CHECK_ROWS] - mean) ** 2).sum(axis=0)) for i in range(0, n, _CHECK_ROWS)) / n
    return np.asarray(mean, np.float64), np.sqrt(np.asarray(var, np.float64))


def _standardized(a: np.ndarray, mean: np.ndarray, std: np.ndarray, rotation: np.ndarray | None = None) -> np.ndarray:
    centred = a - mean
    return ((centred if rotation is None else centred @ rotation) / std).astype(np.float32)


def _whitening(a: np.ndarray, mean: np.ndarray, floor: float,
               components: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rotation (D, K), scale (K,)): the covariance's eigenvectors and the square roots of its eigenvalues,
    floored at ``floor`` times the largest (:attr:`FlowConfig.whiten_floor`), accumulated over row blocks;
    all D of them, or the ``components`` largest."""
    cov = sum((a[i:i + _CHECK_ROWS] - mean).T @ (a[i:i + _CHECK_ROWS] - mean)
              for i in range(0, len(a), _CHECK_ROWS)) / len(a)
    eigval, eigvec = np.linalg.eigh(np.asarray(cov, np.float64))  # ascending
    eigval = np.maximum(eigval, floor * eigval.max())
    if components is not None:
        eigval, eigvec = eigval[-components:], eigvec[:, -components:]
    return eigvec, np.sqrt(eigval)


class ConditionalFlow:
    """A trained conditional flow with its standardization; see the module docstring for the idea."""

    def __init__(self, net: VelocityNet, config: FlowConfig, x_mean: np.ndarray, x_std: np.ndarray,
                 c_mean: np.ndarray | None, c_std: np.ndarray | None, condition_names: Sequence[str] = (),
                 history: FlowHistory | None = None, x_rotation: np.ndarray | None = None):
        self.net = net.eval().requires_grad_(False)  # inference only; torch.func still differentiates it
        self.config = config
        self.x_mean, self.x_std = np.asarray(x_mean, np.float64), np.asarray(x_std, np.float64)
        self.x_rotation = None if x_rotation is None else np.asarray(x_rotation, np.float64)
        """Whitening: x' = ((x - x_mean) @ x_rotation) / x_std (no rotation: per-dimension scaling)."""
        self.c_mean = None if c_mean is None else np.asarray(c_mean, np.float64)
        self.c_std = None if c_std is None else np.asarray(c_std, np.float64)
        self.condition_names = list(condition_names)
        self.history = history or FlowHistory()

    @property
    def dim(self) -> int:
        """Dimensions of the vectors the flow takes (the embeddings')."""
        return int(self.x_mean.size)

    @property
    def latent_dim(self) -> int:
        """Dimensions of the residuals (:attr:`FlowConfig.components`, else :attr:`dim`)."""
        return self.net.dim

    @property
    def cond_dim(self) -> int:
        return self.net.cond_dim

    @property
    def device(self) -> torch.device:
        return self.net.out.weight.device

    def to(self, device: str | torch.device) -> ConditionalFlow:
        self.net.to(device)
        return self

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, x: np.ndarray, c: np.ndarray | None = None, cfg: FlowConfig | None = None, *, progress: bool = True,
            condition_names: Sequence[str] | None = None, device: str | torch.device = "cpu") -> ConditionalFlow:
        """Standardize, hold out a seeded ``val_fraction``, and train by conditional flow matching.

        ``c=None`` trains an unconditional flow (only the null branch exists).
        """
        cfg = cfg or FlowConfig()
        x = _as_matrix(x, "x")
        n, dim = x.shape
        c = _as_matrix(c, "c", rows=n)
        cond_dim = 0 if c is None else c.shape[1]
        names = [f"c{i}" for i in range(cond_dim)] if condition_names is None else list(condition_names)
        if len(names) != cond_dim:
            raise ValueError(f"condition_names: expected {cond_dim} names (one per column of c), got {names}")
        n_val = int(round(cfg.val_fraction * n))
        if cfg.forget_r2 is not None and (cond_dim == 0 or n < _FORGET_MIN_ROWS):
            raise ValueError(f"FlowConfig.forget_r2 probes residuals for the conditions: it needs conditions and at "
                             f"least {_FORGET_MIN_ROWS} objects (got {n} objects, {cond_dim} condition columns)")
        if cfg.val_fraction > 0 and n_val < 1:
            raise ValueError(f"x: {n} objects leave none for validation at val_fraction={cfg.val_fraction}")
        if n - n_val < 2:
            raise ValueError(f"x: {n} objects are too few to fit a flow (need at least 2 for training)")

        x_mean, x_std = _moments(x)
        dead = np.flatnonzero(x_std <= 1e-12 * max(1.0, float(np.abs(x_mean).max())))
        if dead.size:
            raise ValueError(f"x: dimension(s) {dead[:10].tolist()} are constant over all objects; drop them first")
        x_rotation = None
        if cfg.components is not None and cfg.components > dim:
            raise ValueError(f"FlowConfig.components: {cfg.components} is more than the {dim} dimensions of x")
        if cfg.whiten:
            x_rotation, x_std = _whitening(x, x_mean, cfg.whiten_floor, cfg.components)
        latent = dim if cfg.components is None else cfg.components
        c_mean = c_std = None
        if c is not None:
            c_mean, c_std = _moments(c)
            flat = [names[i] for i in np.flatnonzero(c_std <= 1e-12 * np.maximum(1.0, np.abs(c_mean)))]
            if flat:
                raise ValueError(f"condition(s) {flat} are constant over all objects: nothing to condition on")

        device = torch.device(device)
        gen = torch.Generator().manual_seed(cfg.seed)
        perm = torch.randperm(n, generator=gen)
        val_rows, train_rows = perm[:n_val], perm[n_val:]
        xs = torch.from_numpy(np.concatenate([_standardized(x[i:i + _CHECK_ROWS], x_mean, x_std, x_rotation)
                                              for i in range(0, n, _CHECK_ROWS)]))
        cs = None if c is None else torch.from_numpy(_standardized(c, c_mean, c_std))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = VelocityNet(latent, cond_dim, cfg.hidden, cfg.depth, cfg.time_freqs)
        net.to(device).train()
        ema = copy.deepcopy(net).eval() if cfg.ema_decay > 0 else net
        for p in ema.parameters():
            p.requires_grad_(ema is net)
        matrices = [p for p in net.parameters() if p.ndim >= 2]  # no decay on biases, norms and the null
        vectors = [p for p in net.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                                 {"params": vectors, "weight_decay": 0.0}], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))

        x_train = xs[train_rows].to(device)
        c_train = None if cs is None else cs[train_rows].to(device)
        val = None
        if n_val:  # fixed noise and times, so the curve measures the net, not the draw
            rows = val_rows[:_VAL_EVAL_MAX]
            vgen = torch.Generator().manual_seed(cfg.seed + 1)
            val = (xs[rows].to(device), None if cs is None else cs[rows].to(device),
                   torch.randn(len(rows), latent, generator=vgen).to(device),
                   torch.rand(len(rows), generator=vgen).to(device))
        check = None
        if cfg.forget_r2 is not None:  # held-out objects first, then training ones: a k-NN probe needs many
            rows = torch.cat([val_rows, train_rows])[:cfg.forget_check_rows]
            check = (xs[rows].to(device), cs[rows].to(device))
        del xs, cs  # the device copies above are what training reads

        history = FlowHistory(n_train=len(train_rows), n_val=n_val)
        n_train = len(train_rows)
        batch = min(cfg.batch_size, n_train)
        order, cursor, running, counted = torch.randperm(n_train, generator=gen), 0, 0.0, 0
        bar = _progress(cfg.steps, "fitting flow", progress)
        for step in range(cfg.steps):
            if cursor + batch > n_train:
                order, cursor = torch.randperm(n_train, generator=gen), 0
            idx = order[cursor:cursor + batch]
            cursor += batch
            noise = torch.randn(batch, latent, generator=gen).to(device)
            t = torch.rand(batch, generator=gen).to(device)
            drop = (torch.rand(batch, generator=gen) < cfg.cond_dropout).to(device)
            x1 = x_train[idx.to(device)]
            if cfg.data_noise > 0:  # drawn only when on, so the default run's random stream is unchanged
                x1 = x1 + cfg.data_noise * torch.randn(x1.shape, generator=gen).to(device)
            cb = None if c_train is None else c_train[idx.to(device)]
            if cb is not None and cfg.cond_noise > 0:
                cb = cb + cfg.cond_noise * torch.randn(cb.shape, generator=gen).to(device)
            loss = _fm_loss(net, x1, cb, noise, t, drop)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if ema is not net:
                # short memory early on, so the average does not drag in the random initial weights
                decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                        pe.lerp_(p, 1.0 - decay)
            running = running + loss.detach()  # a tensor: no device sync every step
            counted += 1
            if counted == cfg.log_every or step == cfg.steps - 1:
                history.step.append(step + 1)
                history.loss.append(float(running) / counted)
                if val is not None:  # of the weights inference will use
                    with torch.no_grad():
                        vdrop = torch.zeros(len(val[0]), dtype=torch.bool, device=device)
                        history.val_loss.append(float(_fm_loss(ema, val[0], val[1], val[2], val[3], vdrop)))
                bar.set_postfix(loss=f"{history.loss[-1]:.4f}")
                running, counted = 0.0, 0
            bar.update(1)
            if cfg.forget_r2 is not None and (step + 1) % cfg.forget_check_every == 0:
                history.forget_step.append(step + 1)
                history.forget_r2.append(_condition_leak(ema, check[0], check[1], cfg))
                if history.forget_r2[-1] <= cfg.forget_r2:
                    history.stopped_at = step + 1
                    break
        bar.close()
        return cls(ema, cfg, x_mean, x_std, c_mean, c_std, names, history, x_rotation)

    # ------------------------------------------------------------------ inference
    def _prep(self, x: np.ndarray, c: np.ndarray | None, guidance: float,
              latent: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Checked ``x`` (as given; residuals if ``latent``) and standardized float32 ``c``."""
        x = _as_matrix(x, "z" if latent else "x")
        width = self.latent_dim if latent else self.dim
        if x.shape[1] != width:
            raise ValueError(f"{'z' if latent else 'x'}: expected {width} dimensions (the flow's), got {x.shape[1]}")
        if not (isinstance(guidance, int | float) and math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"guidance: expected a number >= 0, got {guidance!r}")
        c = _as_matrix(c, "c", rows=x.shape[0])
        if c is not None:
            if self.cond_dim == 0:
                raise ValueError("c: this flow is unconditional; pass c=None")
            if c.shape[1] != self.cond_dim:
                raise ValueError(f"c: expected {self.cond_dim} columns {self.condition_names}, got {c.shape[1]}")
            c = _standardized(c, self.c_mean, self.c_std)
        return x, c

    def _velocity(self, c: torch.Tensor | None, guidance: float) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """The guided field for fixed conditions ``c`` of the rows (the null branch when ``c`` is None)."""
        return lambda x, t: _guided(self.net, x, t, c, guidance)

    def _chunks(self, n: int, size: int, desc: str, progress: bool):
        bar = _progress(n, desc, progress and n > size)
        for start in range(0, n, size):
            stop = min(n, start + size)
            yield start, stop
            bar.update(stop - start)
        bar.close()

    def _transport(self, x: np.ndarray, c: np.ndarray | None, to_base: bool, guidance: float,
                   ode_steps: int | None, progress: bool) -> np.ndarray:
        """Integrate chunk by chunk; standardization happens per chunk too, so memory is one chunk plus the output."""
        steps = self.config.ode_steps if ode_steps is None else ode_steps
        t0, t1 = (1.0, 0.0) if to_base else (0.0, 1.0)
        out = np.empty((len(x), self.latent_dim if to_base else self.dim), dtype=np.float32)
        dev = self.device
        with torch.no_grad():
            for a, b in self._chunks(len(x), self.config.chunk_size, "residuals" if to_base else "sampling", progress):
                xb = (_standardized(x[a:b], self.x_mean, self.x_std, self.x_rotation) if to_base
                      else x[a:b].astype(np.float32))
                cb = None if c is None else torch.from_numpy(c[a:b]).to(dev)
                end = integrate(self._velocity(cb, guidance), torch.from_numpy(xb).to(dev), t0, t1, steps,
                                self.config.ode_method).cpu().numpy()
                out[a:b] = end if to_base else self._unwhiten(end)
        return out

    def to_base(self, x: np.ndarray, c: np.ndarray | None = None, guidance: float = 1.0, ode_steps: int | None = None,
                progress: bool = False) -> np.ndarray:
        """The residual: standardized ``x`` carried from the data (t=1) to the Gaussian base (t=0), guided flow."""
        x, c = self._prep(x, c, guidance)
        return self._transport(x, c, True, guidance, ode_steps, progress)

    def from_base(self, z: np.ndarray, c: np.ndarray | None = None, guidance: float = 1.0,
                  ode_steps: int | None = None, progress: bool = False) -> np.ndarray:
        """The inverse of :meth:`to_base`, in the original units: samples of ``p(x | c)`` from Gaussian ``z``
        (with :attr:`FlowConfig.components`, in the span of the kept components)."""
        z, c = self._prep(z, c, guidance, latent=True)
        return self._transport(z, c, False, guidance, ode_steps, progress)

    def log_prob(self, x: np.ndarray, c: np.ndarray | None = None, guidance: float = 1.0, ode_steps: int | None = None,
                 chunk_size: int = 256, progress: bool = False, probes: int | None = None,
                 seed: int = 0) -> np.ndarray:
        """Log-density of ``x`` in its original units (float64, nats); ``c=None``: the unconditional flow.

        Integrates ``d log p / dt = -div v`` alongside the state with the exact divergence (the trace of
        the per-object Jacobian): exact so that scores are comparable across objects, affordable for D up
        to ~128 (cost: D Jacobian-vector products per solver stage; measured ~0.08 s of one CPU core per
        64-dim object at the default size and 32 RK4 steps, so use a GPU for large catalogues). Includes the
        standardization's log-Jacobian ``-sum(log std)``. With :attr:`FlowConfig.components`, the density of
        the projection onto the kept components.

        ``probes``: estimate the divergence instead with that many Rademacher vectors per object (Hutchinson;
        fixed along each trajectory, seeded by ``seed`` and the row): D/probes times cheaper, unbiased, noisy.
        """
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")
        if probes is not None and (int(probes) != probes or probes < 1):
            raise ValueError(f"probes: expected None (exact divergence) or an integer >= 1, got {probes!r}")
        x, c = self._prep(x, c, guidance)
        steps = self.config.ode_steps if ode_steps is None else ode_steps
        dim, dev = self.latent_dim, self.device
        out = np.empty(len(x), dtype=np.float64)
        for a, b in self._chunks(len(x), int(chunk_size), "log-density", progress):
            xb = torch.from_numpy(_standardized(x[a:b], self.x_mean, self.x_std, self.x_rotation)).to(dev)
            cb = None if c is None else torch.from_numpy(c[a:b]).to(dev)
            if probes is None:
                field_ = _with_divergence(self.net, cb, guidance, dim)
            else:
                gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + a)
                eps = torch.randint(0, 2, (int(probes), b - a, dim), generator=gen).to(dev, torch.float32) * 2 - 1
                field_ = _with_hutchinson(self.net, cb, guidance, dim, eps)
            state = torch.cat([xb, torch.zeros(len(xb), 1, device=dev)], dim=1)
            with torch.no_grad():  # torch.func transforms still differentiate inside
                end = integrate(field_, state, 1.0, 0.0, steps, self.config.ode_method).double().cpu().numpy()
            z, delta = end[:, :dim], end[:, dim]
            log_base = -0.5 * (z ** 2).sum(axis=1) - 0.5 * dim * math.log(2 * math.pi)
            out[a:b] = log_base + delta
        return out - float(np.log(self.x_std).sum())  # |det rotation| = 1

    def _unwhiten(self, z: np.ndarray) -> np.ndarray:
        scaled = z.astype(np.float64) * self.x_std
        return (scaled if self.x_rotation is None else scaled @ self.x_rotation.T) + self.x_mean

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """``config.json`` + ``model.safetensors``, written into a temporary folder then renamed into place."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            meta = {
                "format_version": FORMAT_VERSION, "kind": _KIND, "config": asdict(self.config), "dim": self.dim,
                "latent_dim": self.latent_dim,
                "cond_dim": self.cond_dim, "condition_names": self.condition_names,
                "x_mean": self.x_mean.tolist(), "x_std": self.x_std.tolist(),
                "c_mean": None if self.c_mean is None else self.c_mean.tolist(),
                "c_std": None if self.c_std is None else self.c_std.tolist(),
                "history": asdict(self.history),
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
            if self.x_rotation is not None:
                tensors[_ROTATION_KEY] = torch.from_numpy(self.x_rotation.copy())
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"kind": _KIND})
            replace_directory(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> ConditionalFlow:
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{directory}: not a saved flow (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
        meta = json.loads(cfg_path.read_text())
        if meta.get("kind") != _KIND:
            raise ValueError(f"{cfg_path}: kind {meta.get('kind')!r} is not a {_KIND}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{cfg_path}: format_version {meta.get('format_version')!r}, this code reads "
                             f"{FORMAT_VERSION}")
        cfg = FlowConfig.from_dict(meta["config"])
        net = VelocityNet(meta.get("latent_dim", meta["dim"]), meta["cond_dim"], cfg.hidden, cfg.depth,
                          cfg.time_freqs)
        tensors = load_file(str(weights))
        rotation = tensors.pop(_ROTATION_KEY, None)
        net.load_state_dict(tensors, strict=True)
        net.to(device)
        history = FlowHistory(**meta.get("history", {}))
        return cls(net, cfg, np.array(meta["x_mean"]), np.array(meta["x_std"]),
                   None if meta["c_mean"] is None else np.array(meta["c_mean"]),
                   None if meta["c_std"] is None else np.array(meta["c_std"]), meta["condition_names"], history,
                   None if rotation is None else rotation.numpy())


_ROTATION_KEY = "whitening.rotation"


def _fm_loss(net: VelocityNet, x1: torch.Tensor, c: torch.Tensor | None, noise: torch.Tensor, t: torch.Tensor,
             drop: torch.Tensor) -> torch.Tensor:
    xt = (1.0 - t[:, None]) * noise + t[:, None] * x1
    return ((net(xt, t, c, drop) - (x1 - noise)) ** 2).mean()


def _condition_leak(net: VelocityNet, x: torch.Tensor, c: torch.Tensor, cfg: FlowConfig) -> float:
    """Worst 5-fold CV R^2 of a 15-NN regressor predicting any condition from the residuals of ``x``."""
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neighbors import KNeighborsRegressor

    with torch.no_grad():
        r = integrate(lambda z, t: _guided(net, z, t, c, 1.0), x, 1.0, 0.0, cfg.ode_steps, cfg.ode_method)
    r, cn = r.cpu().numpy(), c.cpu().numpy()
    folds = KFold(5, shuffle=True, random_state=cfg.seed)
    return max(float(cross_val_score(KNeighborsRegressor(15), r, cn[:, j], cv=folds, scoring="r2").mean())
               for j in range(cn.shape[1]))


def _guided(net: VelocityNet, x: torch.Tensor, t: float, c: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """``v_null + w (v_c - v_null)``; one net call when ``w`` is 0 or 1 (or the flow has no condition)."""
    n = x.shape[0]
    tt = torch.full((n,), t, dtype=x.dtype, device=x.device)
    if c is None or guidance == 0:
        return net(x, tt, None, torch.ones(n, dtype=torch.bool, device=x.device))
    if guidance == 1:
        return net(x, tt, c, torch.zeros(n, dtype=torch.bool, device=x.device))
    both = net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([c, c]), torch.arange(2 * n, device=x.device) >= n)
    v_c, v_null = both[:n], both[n:]
    return v_null + guidance * (v_c - v_null)


def _with_divergence(net: VelocityNet, c: torch.Tensor | None, guidance: float,
                     dim: int) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The augmented field ``(v, div v)`` on states ``[x, log-density change]``.

    The divergence is the exact trace of each object's Jacobian (reverse mode, vmapped over objects), so
    scores carry no estimator noise. Reverse mode measured ~1.3x faster than forward mode here.
    """
    from torch.func import jacrev, vmap

    def f(state: torch.Tensor, t: float) -> torch.Tensor:
        x = state[:, :dim]
        with torch.no_grad():
            vel = _guided(net, x, t, c, guidance)
        if c is None:
            jac = vmap(jacrev(lambda xi: _guided(net, xi[None], t, None, guidance)[0]))(x)
        else:
            jac = vmap(jacrev(lambda xi, ci: _guided(net, xi[None], t, ci[None], guidance)[0]))(x, c)
        div = jac.diagonal(dim1=-2, dim2=-1).sum(-1)
        return torch.cat([vel, div[:, None]], dim=1)

    return f


def _with_hutchinson(net: VelocityNet, c: torch.Tensor | None, guidance: float, dim: int,
                     eps: torch.Tensor) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """Like :func:`_with_divergence`, with the divergence estimated as the mean of ``e^T J e`` over the
    probe vectors ``eps`` (probes, B, D): one vector-Jacobian product per probe instead of D."""

    def f(state: torch.Tensor, t: float) -> torch.Tensor:
        with torch.enable_grad():
            x = state[:, :dim].detach().requires_grad_(True)
            vel = _guided(net, x, t, c, guidance)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for k in range(eps.shape[0]):
                (g,) = torch.autograd.grad(vel, x, eps[k], retain_graph=k < eps.shape[0] - 1)
                div = div + (g * eps[k]).sum(dim=1)
        return torch.cat([vel.detach(), (div / eps.shape[0])[:, None]], dim=1)

    return f


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)

"""Regression heads on *frozen* foundation-model embeddings (linear, kNN and attentive probes).

Every method here and in :mod:`aion.evaluation.finetune` (and the supervised baselines) follows
:class:`Method`: ``fit(train, val, target, input_set, seed)`` then ``predict(data)``, so an
evaluation can swap them freely. Shared rules:

- Train on the rows whose label is finite and that the model could read; the target is
  standardised inside (train mean / std) so hyper-parameter grids and learning rates do not
  depend on its units.
- Hyper-parameters are chosen on ``val`` (never on the rows that are scored). If ``val`` has no
  labelled row, a seeded 20% of ``train`` is held out instead.
- ``predict`` returns (N,) float64, NaN for objects the model could not process (no readable
  input, a modality its tokenizer rejected, ...), so callers score only real predictions.
- The backbone is never updated: :class:`FrozenEncoder` runs it in eval mode under ``no_grad``
  and caches the outputs, so several heads and targets share one encoder pass.
- Fixed seed, same data, same thread count -> bitwise the same predictions.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from aion.evaluation.labelled import INPUT_SETS, LabelledSet
from aion.evaluation.labelled import Method as _Method
from aion.inference.model import AionModel

log = logging.getLogger(__name__)


Method = _Method  # re-exported: one protocol for every method (aion.evaluation.labelled.Method)


# ---------------------------------------------------------------------------- task checks
def resolve_input_set(am: AionModel, input_set: str | Sequence[str]) -> tuple[str, ...]:
    """Validated, sorted modality names; a string names an :data:`INPUT_SETS` entry.

    A modality the model cannot read is an error (rather than silently dropped), so an input
    set is never quietly evaluated on fewer inputs than its name says.
    """
    if isinstance(input_set, str):
        if input_set not in INPUT_SETS:
            raise ValueError(f"unknown input set {input_set!r}; known: {sorted(INPUT_SETS)}")
        input_set = INPUT_SETS[input_set]
    names = tuple(sorted(set(input_set)))
    if not names:
        raise ValueError("input_set is empty")
    unknown = [m for m in names if m not in am.model.index]
    if unknown:
        raise ValueError(f"input set has modalities {unknown} that the model does not read (it reads "
                         f"{list(am.names)})")
    labels = sorted(set(names) & am.never_input)
    if labels:
        raise ValueError(f"input set has label modalities {labels}; the model never reads them as inputs")
    return names


def check_target(target: str, *sets: LabelledSet) -> None:
    """Fail early with the known label names rather than with a KeyError deep inside training."""
    for data in sets:
        if target not in data.labels:
            raise ValueError(f"unknown target {target!r}; this labelled set has {sorted(data.labels)}")


def split_val(train: LabelledSet, val: LabelledSet, target: str, seed: int,
              fraction: float = 0.2) -> tuple[LabelledSet, LabelledSet]:
    """``(train, val)``, or a seeded hold-out of ``train`` when ``val`` has no labelled row."""
    if len(val) and np.isfinite(val.labels[target]).any():
        return train, val
    rows = np.nonzero(np.isfinite(train.labels[target]))[0]
    if len(rows) < 2:
        raise ValueError(f"target {target!r}: {len(rows)} labelled training row(s); need at least 2")
    perm = np.random.default_rng(seed).permutation(rows)
    n_val = max(1, int(round(fraction * len(rows))))
    log.warning("val has no %s label: holding out %d of %d training rows for model selection", target, n_val,
                len(rows))
    return train.select(np.sort(perm[n_val:])), train.select(np.sort(perm[:n_val]))


@dataclass
class Standardizer:
    """Target scaling fitted on the training labels (std 1 for a constant target)."""

    mean: float
    std: float

    @classmethod
    def fit(cls, y: np.ndarray) -> Standardizer:
        std = float(np.std(y))
        return cls(float(np.mean(y)), std if std > 0 else 1.0)

    def forward(self, y: np.ndarray) -> np.ndarray:
        return (y - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return z * self.std + self.mean


# ---------------------------------------------------------------------------- frozen encoder
@dataclass
class EncodedSet:
    """Frozen encoder outputs of one labelled set through one input set (float32, CPU)."""

    mean: np.ndarray
    """(N, dim) mean over the object's input tokens; NaN rows where ``ok`` is False."""
    ok: np.ndarray
    """(N,) True where the model read the object."""
    errors: dict[int, str]
    tokens: Tensor | None = None
    """(N, T, dim) per-token outputs, left-packed (valid tokens first), zeros at padding."""
    mask: Tensor | None = None
    """(N, T) True for real tokens."""
    modality: Tensor | None = None
    """(N, T) index into the model's modality names (0 at padding)."""


def _ids_digest(ids: np.ndarray) -> str:
    ids = np.asarray(ids)
    raw = "\x00".join(map(str, ids)).encode() if ids.dtype == object else np.ascontiguousarray(ids).tobytes()
    return hashlib.sha1(raw + str(ids.dtype).encode()).hexdigest()


class FrozenEncoder:
    """Caches frozen encoder outputs per (input set, object ids) so probes and targets share one pass.

    The key is the input set, the modalities the data has and the object ids: the cache assumes
    that the same ids always carry the same input values (true for slices of one
    :class:`LabelledSet`; call :meth:`clear` after editing inputs in place). ``chunk_size``
    objects are tokenized and encoded at a time (bounds tokenizer memory for images);
    ``max_cached`` entries are kept (LRU).
    """

    def __init__(self, am: AionModel, max_inputs: int | None = None, chunk_size: int = 512, max_cached: int = 8):
        self.am = am
        self.max_inputs = max_inputs
        self.chunk_size = int(chunk_size)
        self.max_cached = int(max_cached)
        self._cache: OrderedDict[tuple, EncodedSet] = OrderedDict()

    @property
    def dim(self) -> int:
        return int(self.am.model.cfg.dim)

    def clear(self) -> None:
        self._cache.clear()

    def encode(self, data: LabelledSet, input_set: str | Sequence[str], tokens: bool = True) -> EncodedSet:
        """Outputs of ``data`` restricted to ``input_set``; ``tokens=False`` skips the token-level arrays."""
        names = resolve_input_set(self.am, input_set)
        key = (names, tuple(sorted(data.restrict(names))), len(data), _ids_digest(data.object_id))
        hit = self._cache.get(key)
        if hit is not None and (hit.tokens is not None or not tokens):
            self._cache.move_to_end(key)
            return hit
        out = self._compute(data, names, tokens)
        self._cache[key] = out
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return out

    @torch.no_grad()
    def _compute(self, data: LabelledSet, names: tuple[str, ...], want_tokens: bool) -> EncodedSet:
        n, dim = len(data), self.dim
        mean = np.full((n, dim), np.nan, dtype=np.float32)
        errors: dict[int, str] = {}
        parts: list[tuple[int, Tensor, Tensor, Tensor]] = []
        model = self.am.model
        was_training = model.training
        model.eval()
        try:
            for start, sub, tokens, present, tok_errors in tokenized_chunks(self.am, data, names, self.chunk_size,
                                                                             errors):
                res = self.am.embed(tokens, present, pooling="mean", max_inputs=self.max_inputs,
                                    return_tokens=want_tokens)
                chunk_errors = {**res.errors, **tok_errors}  # a rejected modality fails the object
                rows_mean = res.mean.numpy().copy()
                for b, msg in chunk_errors.items():
                    errors[start + b] = msg
                    rows_mean[b] = np.nan
                mean[start:start + len(sub)] = rows_mean
                if want_tokens:
                    mask = res.token_mask.clone()
                    mask[list(chunk_errors)] = False
                    parts.append((start, res.token_embeddings * mask[..., None], mask, res.token_modality * mask))
        finally:
            model.train(was_training)
        ok = np.ones(n, dtype=bool)
        ok[list(errors)] = False
        out = EncodedSet(mean=mean, ok=ok, errors=dict(sorted(errors.items())))
        if want_tokens:
            width = max([p[1].shape[1] for p in parts], default=1)
            out.tokens = torch.zeros(n, width, dim)
            out.mask = torch.zeros(n, width, dtype=torch.bool)
            out.modality = torch.zeros(n, width, dtype=torch.long)
            for start, h, mask, mod in parts:
                rows, w = slice(start, start + h.shape[0]), h.shape[1]
                out.tokens[rows, :w], out.mask[rows, :w], out.modality[rows, :w] = h, mask, mod
        return out


def tokenized_chunks(am: AionModel, data: LabelledSet, names: Sequence[str], chunk_size: int,
                     errors: dict[int, str]) -> Iterator[tuple[int, LabelledSet, dict, dict, dict[int, str]]]:
    """``(start row, chunk, tokens, present, tokenization failures)`` per chunk of ``data`` restricted to
    ``names``; a chunk with none of them gets an error per object in ``errors`` and is skipped."""
    for start in range(0, len(data), chunk_size):
        sub = data.select(np.arange(start, min(start + chunk_size, len(data))))
        objects = sub.restrict(names)
        if not objects:
            for b in range(len(sub)):
                errors[start + b] = f"none of the input set's modalities {list(names)} is in this data"
            continue
        tok_errors: dict[int, str] = {}
        tokens, present = am.tokenize(objects, errors=tok_errors)
        yield start, sub, tokens, present, tok_errors


def as_frozen(encoder: FrozenEncoder | AionModel) -> FrozenEncoder:
    """Heads accept a bare model for convenience; sharing one FrozenEncoder shares its cache."""
    return encoder if isinstance(encoder, FrozenEncoder) else FrozenEncoder(encoder)


# ---------------------------------------------------------------------------- shared training machinery
class AttentivePool(nn.Module):
    """AION-1 style attentive probe: learned queries cross-attend over token embeddings, then a 2-layer MLP.

    Padding keys are masked, so a prediction does not depend on batch composition. Every row
    must have at least one valid token.
    """

    def __init__(self, dim: int, n_queries: int = 1, heads: int = 4, hidden: int | None = None, out: int = 1):
        super().__init__()
        heads = math.gcd(int(heads), int(dim))
        hidden = int(hidden) if hidden is not None else max(2 * dim, 64)
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(n_queries * dim), nn.Linear(n_queries * dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, out))
        self.out = int(out)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, N, dim) tokens, (B, N) bool mask -> (B,) (or (B, out))."""
        x = self.norm(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        pooled, _ = self.attn(q, x, x, key_padding_mask=~mask, need_weights=False)
        y = self.mlp(pooled.flatten(1))
        return y.squeeze(-1) if self.out == 1 else y


@dataclass
class TrainHistory:
    """Per-epoch losses (standardised MSE) of one training run; ``val_loss[0]`` is before training."""

    lr: float
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_val: float = float("inf")


def train_early_stopping(module: nn.Module, groups: list[dict], batch_loss: Callable[[np.ndarray], Tensor],
                         n_train: int, val_loss: Callable[[], float], *, max_epochs: int, patience: int,
                         batch_size: int, seed: int, lr: float, clip: float = 1.0) -> TrainHistory:
    """AdamW over ``groups`` with seeded shuffling; stops after ``patience`` epochs without a better
    val loss and restores the best trainable weights (best of "before training" included)."""
    opt = torch.optim.AdamW(groups)
    rng = np.random.default_rng(seed)
    params = [p for g in groups for p in g["params"]]
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    hist = TrainHistory(lr=lr)

    def snapshot() -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in trainable.items()}

    module.eval()
    best_state, hist.best_val = snapshot(), val_loss()
    hist.val_loss.append(hist.best_val)
    for epoch in range(1, max_epochs + 1):
        module.train()
        order = rng.permutation(n_train)
        total = 0.0
        for s in range(0, n_train, batch_size):
            idx = order[s:s + batch_size]
            loss = batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            total += float(loss.detach()) * len(idx)
        module.eval()
        hist.train_loss.append(total / n_train)
        v = val_loss()
        hist.val_loss.append(v)
        if v < hist.best_val:
            best_state, hist.best_val, hist.best_epoch = snapshot(), v, epoch
        elif epoch - hist.best_epoch >= patience:
            break
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(best_state[n])
    module.eval()
    return hist


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the global torch RNG seeded (module init, dropout), restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


# ---------------------------------------------------------------------------- probes
class _FrozenProbe:
    """Shared fit preamble of the frozen-embedding heads."""

    name = "probe"
    needs_tokens = False

    def __init__(self, encoder: FrozenEncoder | AionModel):
        self.encoder = as_frozen(encoder)
        self.input_set: tuple[str, ...] | None = None
        self.target: str | None = None
        self.scaler: Standardizer | None = None

    def _prepare(self, train: LabelledSet, val: LabelledSet, target: str, input_set: Sequence[str],
                 seed: int) -> tuple[EncodedSet, np.ndarray, np.ndarray, EncodedSet, np.ndarray, np.ndarray]:
        """(train features, train rows, standardised y, val features, val rows, standardised y)."""
        check_target(target, train, val)
        self.input_set = resolve_input_set(self.encoder.am, input_set)
        self.target = target
        train, val = split_val(train, val, target, seed)
        ftr = self.encoder.encode(train, self.input_set, tokens=self.needs_tokens)
        fva = self.encoder.encode(val, self.input_set, tokens=self.needs_tokens)
        rtr = np.nonzero(ftr.ok & np.isfinite(train.labels[target]))[0]
        rva = np.nonzero(fva.ok & np.isfinite(val.labels[target]))[0]
        if len(rtr) < 2 or len(rva) < 1:
            raise ValueError(f"target {target!r}, inputs {list(self.input_set)}: {len(rtr)} training and "
                             f"{len(rva)} validation rows have both a label and readable inputs")
        self.scaler = Standardizer.fit(train.labels[target][rtr])
        return (ftr, rtr, self.scaler.forward(train.labels[target][rtr]), fva, rva,
                self.scaler.forward(val.labels[target][rva]))

    def _features(self, data: LabelledSet) -> EncodedSet:
        if self.input_set is None:
            raise RuntimeError(f"{type(self).__name__}: call fit before predict")
        return self.encoder.encode(data, self.input_set, tokens=self.needs_tokens)


RIDGE_ALPHAS = tuple(float(a) for a in 10.0 ** np.arange(-2, 6.5, 0.5))
"""Ridge penalties tried (on standardised features, so comparable to the number of training rows)."""


class LinearProbe(_FrozenProbe):
    """Ridge regression on standardised mean embeddings; ``alpha`` picked on val from a log grid."""

    name = "linear_probe"

    def __init__(self, encoder: FrozenEncoder | AionModel, alphas: Sequence[float] = RIDGE_ALPHAS):
        super().__init__(encoder)
        self.alphas = tuple(float(a) for a in alphas)
        self.alpha: float | None = None
        self.val_mse: dict[float, float] = {}

    def fit(self, train: LabelledSet, val: LabelledSet, target: str, input_set: tuple[str, ...],
            seed: int = 0) -> LinearProbe:
        ftr, rtr, ytr, fva, rva, yva = self._prepare(train, val, target, input_set, seed)
        x = ftr.mean[rtr].astype(np.float64)
        self.x_mean, self.x_std = x.mean(axis=0), x.std(axis=0)
        self.x_std[self.x_std == 0] = 1.0
        x = (x - self.x_mean) / self.x_std
        xv = (fva.mean[rva].astype(np.float64) - self.x_mean) / self.x_std
        # One eigendecomposition serves every alpha: w = V diag(1 / (s + alpha)) V^T X^T y.
        s, v = np.linalg.eigh(x.T @ x)
        xty = v.T @ (x.T @ ytr)
        weights = {}
        for a in self.alphas:
            w = v @ (xty / (np.maximum(s, 0.0) + a))
            weights[a] = w
            self.val_mse[a] = float(np.mean((xv @ w - yva) ** 2))
        self.alpha = min(self.alphas, key=lambda a: self.val_mse[a])
        self.coef = weights[self.alpha]
        log.info("%s %s: alpha=%g (val MSE %.4g, standardised)", self.name, target, self.alpha,
                 self.val_mse[self.alpha])
        return self

    def predict(self, data: LabelledSet) -> np.ndarray:
        f = self._features(data)
        out = np.full(len(data), np.nan)
        x = (f.mean[f.ok].astype(np.float64) - self.x_mean) / self.x_std
        out[f.ok] = self.scaler.inverse(x @ self.coef)
        return out


class KNNProbe(_FrozenProbe):
    """k-nearest neighbours (Euclidean, standardised mean embeddings); ``k`` and uniform vs inverse-distance
    weighting picked on val."""

    name = "knn_probe"

    def __init__(self, encoder: FrozenEncoder | AionModel, ks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                 weightings: Sequence[str] = ("uniform", "distance"), chunk: int = 1024):
        super().__init__(encoder)
        bad = [w for w in weightings if w not in ("uniform", "distance")]
        if bad:
            raise ValueError(f"weightings: expected 'uniform' or 'distance', got {bad}")
        self.ks, self.weightings, self.chunk = tuple(int(k) for k in ks), tuple(weightings), int(chunk)
        self.k: int | None = None
        self.weighting: str | None = None
        self.val_mse: dict[tuple[int, str], float] = {}

    def _neighbours(self, x: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices) of the ``kmax`` nearest training rows, nearest first (ties: lower index)."""
        dist, idx = [], []
        ref_sq = (self.ref ** 2).sum(axis=1)
        for s in range(0, len(x), self.chunk):
            q = x[s:s + self.chunk]
            d2 = np.maximum((q ** 2).sum(axis=1)[:, None] - 2.0 * q @ self.ref.T + ref_sq[None, :], 0.0)
            order = np.argsort(d2, axis=1, kind="stable")[:, :kmax]
            idx.append(order)
            dist.append(np.sqrt(np.take_along_axis(d2, order, axis=1)))
        return np.concatenate(dist), np.concatenate(idx)

    def _combine(self, dist: np.ndarray, idx: np.ndarray, k: int, weighting: str) -> np.ndarray:
        y = self.ref_y[idx[:, :k]]
        if weighting == "uniform":
            return y.mean(axis=1)
        w = 1.0 / np.maximum(dist[:, :k], 1e-12)
        return (w * y).sum(axis=1) / w.sum(axis=1)

    def fit(self, train: LabelledSet, val: LabelledSet, target: str, input_set: tuple[str, ...],
            seed: int = 0) -> KNNProbe:
        ftr, rtr, ytr, fva, rva, yva = self._prepare(train, val, target, input_set, seed)
        x = ftr.mean[rtr].astype(np.float64)
        self.x_mean, self.x_std = x.mean(axis=0), x.std(axis=0)
        self.x_std[self.x_std == 0] = 1.0
        self.ref, self.ref_y = (x - self.x_mean) / self.x_std, ytr
        ks = sorted({min(k, len(rtr)) for k in self.ks})
        dist, idx = self._neighbours((fva.mean[rva].astype(np.float64) - self.x_mean) / self.x_std, ks[-1])
        for k in ks:
            for w in self.weightings:
                self.val_mse[(k, w)] = float(np.mean((self._combine(dist, idx, k, w) - yva) ** 2))
        self.k, self.weighting = min(self.val_mse, key=self.val_mse.__getitem__)
        log.info("%s %s: k=%d %s (val MSE %.4g, standardised)", self.name, target, self.k, self.weighting,
                 self.val_mse[(self.k, self.weighting)])
        return self

    def predict(self, data: LabelledSet) -> np.ndarray:
        f = self._features(data)
        out = np.full(len(data), np.nan)
        if f.ok.any():
            dist, idx = self._neighbours((f.mean[f.ok].astype(np.float64) - self.x_mean) / self.x_std, self.k)
            out[f.ok] = self.scaler.inverse(self._combine(dist, idx, self.k, self.weighting))
        return out


class AttentiveProbe(_FrozenProbe):
    """:class:`AttentivePool` on the frozen token embeddings, trained with AdamW and early stopping on
    val MSE (best weights restored); the learning rate is picked on val from ``lrs``."""

    name = "attentive_probe"
    needs_tokens = True

    def __init__(self, encoder: FrozenEncoder | AionModel, lrs: Sequence[float] = (1e-3, 3e-4), n_queries: int = 1,
                 heads: int = 4, hidden: int | None = None, weight_decay: float = 0.01, batch_size: int = 64,
                 max_epochs: int = 100, patience: int = 10, device: str | torch.device | None = None):
        super().__init__(encoder)
        self.lrs = tuple(float(lr) for lr in lrs)
        self.n_queries, self.heads, self.hidden = int(n_queries), int(heads), hidden
        self.weight_decay, self.batch_size = float(weight_decay), int(batch_size)
        self.max_epochs, self.patience = int(max_epochs), int(patience)
        self.device = torch.device(device) if device is not None else self.encoder.am.device
        self.head: AttentivePool | None = None
        self.history: list[TrainHistory] = []

    def _run(self, head: AttentivePool, x: Tensor, mask: Tensor) -> Tensor:
        """Predictions (standardised, on the device) for CPU-held tokens, 1024 rows at a time."""
        parts = [head(*(t.to(self.device) for t in _cropped(x[s:s + 1024], mask[s:s + 1024])))
                 for s in range(0, len(x), 1024)]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def fit(self, train: LabelledSet, val: LabelledSet, target: str, input_set: tuple[str, ...],
            seed: int = 0) -> AttentiveProbe:
        ftr, rtr, ytr, fva, rva, yva = self._prepare(train, val, target, input_set, seed)
        rt, rv = torch.from_numpy(rtr), torch.from_numpy(rva)
        xt, mt = _cropped(ftr.tokens[rt], ftr.mask[rt])
        xv, mv = _cropped(fva.tokens[rv], fva.mask[rv])
        yt = torch.from_numpy(ytr).float().to(self.device)
        yv = torch.from_numpy(yva).float().to(self.device)
        self.history, best = [], None
        for i, lr in enumerate(self.lrs):
            run_seed = seed * 1000 + i
            with seeded(run_seed):
                head = AttentivePool(self.encoder.dim, self.n_queries, self.heads, self.hidden).to(self.device)

            def batch_loss(idx: np.ndarray, head: AttentivePool = head) -> Tensor:
                return torch.mean((self._run(head, xt[idx], mt[idx]) - yt[torch.from_numpy(idx).to(self.device)]) ** 2)

            def val_loss(head: AttentivePool = head) -> float:
                with torch.no_grad():
                    return float(torch.mean((self._run(head, xv, mv) - yv) ** 2))

            with seeded(run_seed):
                hist = train_early_stopping(head, param_groups(head, lr, self.weight_decay), batch_loss, len(yt),
                                            val_loss, max_epochs=self.max_epochs, patience=self.patience,
                                            batch_size=self.batch_size, seed=run_seed, lr=lr)
            self.history.append(hist)
            if best is None or hist.best_val < best[0]:
                best = (hist.best_val, head, lr)
        _, self.head, self.lr = best
        log.info("%s %s: lr=%g (val MSE %.4g, standardised)", self.name, target, self.lr, best[0])
        return self

    @torch.no_grad()
    def predict(self, data: LabelledSet) -> np.ndarray:
        f = self._features(data)
        out = np.full(len(data), np.nan)
        rows = torch.from_numpy(np.nonzero(f.ok)[0])
        if len(rows):
            pred = self._run(self.head, f.tokens[rows], f.mask[rows])
            out[rows.numpy()] = self.scaler.inverse(pred.double().cpu().numpy())
        return out


def _cropped(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop padding columns no row uses (tokens are left-packed), to save attention work."""
    width = max(int(mask.sum(dim=1).max()), 1) if len(mask) else 1
    return x[:, :width], mask[:, :width]


def param_groups(module: nn.Module, lr: float, weight_decay: float, no_decay: Sequence[str] = ()) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases, norms, queries or embedding tables,
    whose unused rows must not drift)."""
    decay, rest = [], []
    for n, p in module.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or n.endswith("queries") or any(n.startswith(k) for k in no_decay)
        (rest if plain else decay).append(p)
    return [g for g in ({"params": decay, "lr": lr, "weight_decay": weight_decay},
                        {"params": rest, "lr": lr, "weight_decay": 0.0}) if g["params"]]

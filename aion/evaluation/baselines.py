"""Supervised baselines trained from scratch on the same labels as the foundation-model heads.

The claim under test is "foundation model + head with N labels beats models trained from scratch
on those N labels", so the baselines must be honest: each one gets the same train / validation
rows (see :mod:`aion.evaluation.splits`), chooses its hyper-parameters and stopping point on the
validation rows only, and is scored on the test rows by :func:`aion.evaluation.metrics.regression_metrics`.

Every method implements :class:`Method` (``fit`` on train + val of one target and input set,
``predict`` any rows). Implemented here:

- :class:`GBMBaseline` (``"gbm"``): scikit-learn ``HistGradientBoostingRegressor`` on photometry
  features (asinh magnitudes + adjacent colours, NaN left to the trees). Budget: a grid of
  :data:`GBM_GRID` (6 configurations), up to 1000 boosting rounds each, early stopped on the
  validation MSE; the best round count of the best configuration is refitted.
- :class:`SupervisedNet` (``"cnn"``): a torch network with one branch per modality kind in the
  input set (photometry MLP, small ResNet for images, 1-D ResNet for spectra), concatenated into an
  MLP head; standardised target, AdamW + cosine decay, early stopping on the validation loss,
  best weights restored. Budget: :data:`CNN_GRID` (2 configurations, at most 40 epochs but at least
  800 optimiser steps, patience 10 epochs) when an image or spectrum branch is present, else
  :data:`MLP_GRID` (4 configurations, at most 300 epochs but at least 2000 steps, patience 30); the
  configuration with the lowest validation loss wins. The step floor keeps small training sets
  (1-2 batches an epoch) from being under-trained; patience is stretched by the same factor.
- :class:`PhotometryMLP` (``"mlp"``): :class:`SupervisedNet` restricted to the scalar inputs.

Networks are deterministic for a given seed on CPU (``torch.manual_seed`` + explicit generators).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aion import modalities as registry
from aion.data.batches import ImageBatch, Modal, ScalarBatch, SpectrumBatch
from aion.evaluation.labelled import INPUT_SETS, LabelledSet
from aion.evaluation.labelled import Method as _Method

log = logging.getLogger(__name__)

MIN_TRAIN = 8
"""Fewest labelled training rows a method accepts (below this no fit means anything)."""
MIN_VAL = 2
"""Fewest labelled validation rows (early stopping and model choice need some)."""


Method = _Method  # re-exported: one protocol for every method (aion.evaluation.labelled.Method)


# ---------------------------------------------------------------------------- shared checks
def resolve_input_set(input_set: str | Sequence[str]) -> tuple[str, ...]:
    """A tuple of modality names; a string names an entry of :data:`INPUT_SETS`."""
    if isinstance(input_set, str):
        if input_set not in INPUT_SETS:
            raise ValueError(f"unknown input set {input_set!r}; known: {sorted(INPUT_SETS)}")
        return INPUT_SETS[input_set]
    names = tuple(input_set)
    if not names:
        raise ValueError("input_set: expected at least one modality")
    return names


def check_modalities(data: LabelledSet, input_set: Sequence[str], what: str) -> None:
    """Every modality of the input set must be in the data (silently dropping one would change the task)."""
    missing = [m for m in input_set if m not in data.inputs]
    if missing:
        raise ValueError(f"{what}: the input set needs {missing}, which the data lacks "
                         f"(it has {sorted(data.inputs)})")


def labelled_part(data: LabelledSet, target: str, what: str, minimum: int) -> tuple[LabelledSet, np.ndarray]:
    """The rows of ``data`` whose ``target`` is known, and those labels."""
    if target not in data.labels:
        raise ValueError(f"unknown target {target!r}: the {what} set has labels {sorted(data.labels)}")
    rows = np.nonzero(data.has_label(target))[0]
    if rows.size < minimum:
        raise ValueError(f"only {rows.size} {what} rows have a {target!r} label; at least {minimum} are needed")
    return data.select(rows), data.labels[target][rows].astype(np.float64)


def _prepare(train: LabelledSet, val: LabelledSet, target: str, input_set: str | Sequence[str], method: str
             ) -> tuple[tuple[str, ...], LabelledSet, np.ndarray, LabelledSet, np.ndarray]:
    names = resolve_input_set(input_set)
    check_modalities(train, names, f"{method} training data")
    check_modalities(val, names, f"{method} validation data")
    tr, y_tr = labelled_part(train, target, "training", MIN_TRAIN)
    va, y_va = labelled_part(val, target, "validation", MIN_VAL)
    return names, tr, y_tr, va, y_va


def _kind(name: str) -> str:
    return registry.modality(name).kind


def _check_kinds(names: Sequence[str], kinds: frozenset[str], method: str) -> None:
    """A method given modalities it cannot use fails loudly rather than being reported under a wrong input set."""
    unusable = [m for m in names if _kind(m) not in kinds]
    if unusable:
        raise ValueError(f"{method} uses only {sorted(kinds)} modalities; the input set also has {unusable} "
                         f"(use the 'photometry' input set for it)")


# ---------------------------------------------------------------------------- photometry features
def asinh_mag(flux: np.ndarray, soft: float = 0.1) -> np.ndarray:
    """Asinh magnitude of nanomaggies: ~22.5 - 2.5 log10(f) when bright, finite for f <= 0 (noisy faint bands)."""
    return 22.5 - 2.5 / math.log(10) * (np.arcsinh(flux / (2 * soft)) + math.log(soft))


def photometry_features(inputs: dict[str, Modal], names: Sequence[str]) -> np.ndarray:
    """(N, F) features of the scalar modalities ``names`` (in that order): asinh magnitudes for
    nanomaggy fluxes, raw values otherwise, then the colours of adjacent flux bands; NaN where an
    object lacks a value. Legacy-only, unlike :func:`aion.evaluation.zeroshot.photometry_features`,
    so no all-NaN HSC columns are carried."""
    cols, mags = [], []
    for name in names:
        s = inputs[name]
        if not isinstance(s, ScalarBatch):
            raise TypeError(f"{name}: expected a ScalarBatch, got {type(s).__name__}")
        if registry.modality(name).unit == "nanomaggy":
            col = np.where(s.valid, asinh_mag(s.values), np.nan)
            mags.append(col)
        else:
            col = np.where(s.valid, s.values, np.nan)
        cols.append(col)
    cols += [mags[i] - mags[i + 1] for i in range(len(mags) - 1)]
    return np.stack(cols, axis=1)


# ---------------------------------------------------------------------------- trivial
class ConstantBaseline:
    """The mean of the training labels for every object: the floor any method must clearly beat
    (its R^2 on the test set is ~0, slightly negative when the test mean differs)."""

    def __init__(self, name: str = "constant") -> None:
        self.name = name
        self.value_: float | None = None

    def fit(self, train: LabelledSet, val: LabelledSet, target: str, input_set: tuple[str, ...],
            seed: int) -> ConstantBaseline:
        _, y = labelled_part(train, target, "training", 1)
        self.value_ = float(np.mean(y))
        return self

    def predict(self, data: LabelledSet) -> np.ndarray:
        if self.value_ is None:
            raise RuntimeError(f"{self.name}: call fit before predict")
        return np.full(len(data), self.value_, dtype=np.float64)


# ---------------------------------------------------------------------------- gradient boosting
GBM_GRID: tuple[dict[str, Any], ...] = (
    {"learning_rate": 0.05, "max_leaf_nodes": 15, "min_samples_leaf": 20, "l2_regularization": 0.0},
    {"learning_rate": 0.05, "max_leaf_nodes": 31, "min_samples_leaf": 10, "l2_regularization": 0.0},
    {"learning_rate": 0.1, "max_leaf_nodes": 7, "min_samples_leaf": 5, "l2_regularization": 0.0},
    {"learning_rate": 0.03, "max_leaf_nodes": 31, "min_samples_leaf": 20, "l2_regularization": 1.0},
    {"learning_rate": 0.05, "max_leaf_nodes": 7, "min_samples_leaf": 3, "l2_regularization": 1.0},
    {"learning_rate": 0.03, "max_leaf_nodes": 63, "min_samples_leaf": 5, "l2_regularization": 0.1},
)
"""Hyper-parameter grid of :class:`GBMBaseline`: shallow / heavily regularised entries for tens of
labels, larger trees for thousands."""


class GBMBaseline:
    """Gradient-boosted trees on the photometry features (the strong tabular baseline)."""

    input_kinds = frozenset({"scalar"})
    """Modality kinds this method can use; an input set with others is an error."""

    def __init__(self, name: str = "gbm", grid: Sequence[dict[str, Any]] = GBM_GRID, max_iter: int = 1000,
                 n_iter_no_change: int = 30) -> None:
        if not grid:
            raise ValueError("grid: expected at least one hyper-parameter configuration")
        self.name = name
        self.grid = tuple(dict(g) for g in grid)
        self.max_iter = max_iter
        self.n_iter_no_change = n_iter_no_change
        self.model_: Any = None
        self.inputs_: list[str] = []
        self.selection_: list[dict[str, Any]] = []
        self.chosen_: dict[str, Any] = {}

    def fit(self, train: LabelledSet, val: LabelledSet, target: str, input_set: tuple[str, ...],
            seed: int) -> GBMBaseline:
        from sklearn.ensemble import HistGradientBoostingRegressor

        _check_kinds(resolve_input_set(input_set), self.input_kinds, self.name)
        names, tr, y_tr, va, y_va = _prepare(train, val, target, input_set, self.name)
        self.inputs_ = list(names)
        x_tr, x_va = photometry_features(tr.inputs, self.inputs_), photometry_features(va.inputs, self.inputs_)
        self.selection_ = []
        best: tuple[float, int, dict[str, Any]] | None = None
        for params in self.grid:
            model = HistGradientBoostingRegressor(max_iter=self.max_iter, early_stopping=True, scoring="loss",
                                                  n_iter_no_change=self.n_iter_no_change, random_state=seed,
                                                  **params)
            model.fit(x_tr, y_tr, X_val=x_va, y_val=y_va)
            curve = np.array([np.mean((p - y_va) ** 2) for p in model.staged_predict(x_va)])
            n_iter = int(np.argmin(curve)) + 1
            score = float(curve[n_iter - 1])
            self.selection_.append({"params": params, "n_iter": n_iter, "val_mse": score})
            if best is None or score < best[0]:
                best = (score, n_iter, params)
        assert best is not None
        # Same data and no subsampling: the refit's trees are the first n_iter trees of the search fit.
        self.model_ = HistGradientBoostingRegressor(max_iter=best[1], early_stopping=False, random_state=seed,
                                                    **best[2]).fit(x_tr, y_tr)
        self.chosen_ = {"params": best[2], "n_iter": best[1], "val_mse": best[0]}
        return self

    def predict(self, data: LabelledSet) -> np.ndarray:
        if self.model_ is None:
            raise RuntimeError(f"{self.name}: call fit before predict")
        check_modalities(data, self.inputs_, f"{self.name} prediction data")
        return self.model_.predict(photometry_features(data.inputs, self.inputs_)).astype(np.float64)

    def describe(self) -> dict[str, Any]:
        """Hyper-parameter budget and choice, for the report."""
        return {"name": self.name, "inputs": self.inputs_, "grid": list(self.grid), "max_iter": self.max_iter,
                "chosen": self.chosen_, "selection": self.selection_}


# ---------------------------------------------------------------------------- networks
@dataclass(frozen=True)
class NetConfig:
    """One hyper-parameter configuration of :class:`SupervisedNet`."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    width: int = 128
    """Width of the photometry MLP and of the head."""
    channels: int = 16
    """Base channels of the image / spectrum CNNs (doubled at each downsampling)."""
    dropout: float = 0.1


MLP_GRID = (NetConfig(lr=3e-3, weight_decay=1e-4, width=128, dropout=0.1),
            NetConfig(lr=1e-3, weight_decay=1e-2, width=256, dropout=0.1),
            NetConfig(lr=3e-3, weight_decay=1e-2, width=64, dropout=0.0),
            NetConfig(lr=1e-3, weight_decay=1e-3, width=128, dropout=0.3))
"""Photometry-only budget: 4 configurations (cheap)."""
CNN_GRID = (NetConfig(lr=2e-3, weight_decay=1e-4, width=64, channels=16, dropout=0.1),
            NetConfig(lr=7e-4, weight_decay=1e-2, width=64, channels=16, dropout=0.2))
"""Image / spectrum budget: 2 configurations (a fast, lightly regularised one and a slow, regularised one)."""


def _robust_scale(x: np.ndarray, floor: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Column median and 1.4826 MAD (std when the MAD is 0) of finite values; unit scale for empty columns."""
    centre = np.zeros(x.shape[1])
    scale = np.ones(x.shape[1])
    for j in range(x.shape[1]):
        v = x[:, j][np.isfinite(x[:, j])]
        if v.size == 0:
            continue
        centre[j] = np.median(v)
        s = 1.4826 * np.median(np.abs(v - centre[j]))
        if s <= floor:
            s = float(np.std(v))
        scale[j] = s if s > floor else 1.0
    return centre, scale


class _ScalarPrep:
    """Photometry features imputed with the training median (plus missing flags) and robustly standardised."""

    def __init__(self, names: list[str], data: LabelledSet) -> None:
        self.names = names
        x = photometry_features(data.inputs, names)
        self.centre, self.scale = _robust_scale(x)
        self.flag_cols = np.nonzero(~np.isfinite(x).all(axis=0))[0]

    @property
    def dim(self) -> int:
        return len(self.centre) + len(self.flag_cols)

    def __call__(self, data: LabelledSet) -> np.ndarray:
        x = photometry_features(data.inputs, self.names)
        missing = ~np.isfinite(x)
        z = np.clip((np.where(missing, self.centre, x) - self.centre) / self.scale, -10, 10)
        return np.concatenate([z, missing[:, self.flag_cols].astype(np.float64)], axis=1).astype(np.float32)


class _ImagePrep:
    """asinh(flux / noise) per band, noise = median pixel sigma of the training images; masked pixels 0.

    A fixed per-band scale (not per object) keeps absolute brightness, which carries mass and redshift.
    """

    def __init__(self, name: str, data: LabelledSet, max_images: int = 256) -> None:
        img = data.inputs[name]
        assert isinstance(img, ImageBatch)
        self.name, self.bands, self.zero_point = name, img.bands, img.zero_point
        sub = img.select(np.arange(min(len(img), max_images)))
        self.noise = np.ones(len(img.bands), dtype=np.float32)
        for b in range(len(img.bands)):
            ok = sub.valid[:, b]
            if ok.any():
                sigma = float(np.median(1.0 / np.sqrt(sub.ivar[:, b][ok])))
                if not (np.isfinite(sigma) and sigma > 0):
                    sigma = float(1.4826 * np.median(np.abs(sub.flux[:, b][ok])))
                if np.isfinite(sigma) and sigma > 0:
                    self.noise[b] = sigma

    def __call__(self, data: LabelledSet) -> tuple[np.ndarray, np.ndarray]:
        img = data.inputs[self.name]
        assert isinstance(img, ImageBatch)
        if img.bands != self.bands:
            raise ValueError(f"{self.name}: trained on bands {self.bands}, got {img.bands}")
        if img.zero_point != self.zero_point:
            img = img.to_zero_point(self.zero_point)
        x = np.arcsinh(img.flux / self.noise[None, :, None, None])
        x = np.where(img.valid, x, 0.0).astype(np.float32)
        return x, img.band_present.any(axis=1)


class _SpectrumPrep:
    """Rebinned onto a log-wavelength grid, divided by a robust amplitude (median |flux|, whose log is
    a separate feature), ivar-masked; channels: flux, valid mask, wavelength coordinate."""

    def __init__(self, name: str, data: LabelledSet, pixels: int, wave_range: tuple[float, float]) -> None:
        self.name = name
        self.edges = np.geomspace(wave_range[0], wave_range[1], pixels + 1)
        _, log_amp, present = self._normalised(data)
        v = log_amp[present]
        self.amp_centre = float(np.median(v)) if v.size else 0.0
        self.amp_scale = float(np.std(v)) if v.size > 1 and np.std(v) > 0 else 1.0

    def _normalised(self, data: LabelledSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from aion.tokenizers.spectrum import resample_spectra

        spec = data.inputs[self.name]
        assert isinstance(spec, SpectrumBatch)
        flux, _, valid = resample_spectra(spec, self.edges)
        present = valid.any(axis=1)
        amp = np.ones(len(flux))
        for i in np.nonzero(present)[0]:
            amp[i] = max(float(np.median(np.abs(flux[i][valid[i]]))), 1e-3)
        norm = np.where(valid, np.clip(flux / amp[:, None], -50, 50), 0.0)
        return np.stack([norm, valid.astype(np.float64)], axis=1), np.log10(amp), present

    def __call__(self, data: LabelledSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, log_amp, present = self._normalised(data)
        coord = np.broadcast_to(np.linspace(-1, 1, x.shape[2]), (x.shape[0], 1, x.shape[2]))
        x = np.concatenate([x, coord], axis=1).astype(np.float32)
        amp = np.where(present, (log_amp - self.amp_centre) / self.amp_scale, 0.0)
        return x, amp.astype(np.float32), present


class _Block(nn.Module):
    """Basic residual block (two convs + BatchNorm), 1-D or 2-D."""

    def __init__(self, c: int, dims: int, k: int) -> None:
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.body = nn.Sequential(conv(c, c, k, padding=k // 2, bias=False), bn(c), nn.ReLU(),
                                  conv(c, c, k, padding=k // 2, bias=False), bn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def _down(c_in: int, c_out: int, dims: int, k: int, stride: int = 2) -> nn.Module:
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
    return nn.Sequential(conv(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), bn(c_out), nn.ReLU())


class _ImageNet(nn.Module):
    """Small ResNet: stride-2 stem (c), residual stages of 2c at 1/4 and 4c at 1/8 resolution, global
    average pool; no full-resolution block, to keep ~1500 cutouts of 64x64 at a few seconds per epoch
    on one core."""

    def __init__(self, bands: int, c: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(_down(bands, c, 2, 3), _down(c, 2 * c, 2, 3), _Block(2 * c, 2, 3),
                                 _down(2 * c, 4 * c, 2, 3), _Block(4 * c, 2, 3), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4 * c, out), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _SpectrumNet(nn.Module):
    """1-D ResNet; ends in a 16-position pool + flatten (not a global pool) so line positions,
    i.e. redshift, survive."""

    def __init__(self, channels_in: int, c: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(_down(channels_in, c, 1, 7), _down(c, 2 * c, 1, 5), _Block(2 * c, 1, 3),
                                 _down(2 * c, 4 * c, 1, 5), _Block(4 * c, 1, 3),
                                 nn.AdaptiveAvgPool1d(16), nn.Flatten(), nn.Linear(64 * c, out), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Net(nn.Module):
    def __init__(self, cfg: NetConfig, scalar_dim: int, images: dict[str, int], spectra: list[str]) -> None:
        super().__init__()
        w = cfg.width
        self.scalar = (nn.Sequential(nn.Linear(scalar_dim, w), nn.ReLU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(w, w), nn.ReLU()) if scalar_dim else None)
        self.images = nn.ModuleDict({k: _ImageNet(b, cfg.channels, w) for k, b in images.items()})
        self.spectra = nn.ModuleDict({k: _SpectrumNet(3, cfg.channels, w) for k in spectra})
        n_in = w * ((1 if scalar_dim else 0) + len(images) + len(spectra)) + len(images) + 2 * len(spectra)
        self.head = nn.Sequential(nn.Linear(n_in, w), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(w, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.scalar is not None:
            parts.append(self.scalar(batch["scalar"]))
        for k, net in self.images.items():
            present = batch[f"{k}:present"]
            parts += [net(batch[k]) * present[:, None], present[:, None]]
        for k, net in self.spectra.items():
            present = batch[f"{k}:present"]
            parts += [net(batch[k]) * present[:, None], present[:, None], batch[f"{k}:amp"][:, None]]
        return self.head(torch.cat(parts, dim=1)).squeeze(1)


def _dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip + rot90 per image (galaxy labels do not depend on orientation)."""
    k = torch.randint(0, 4 if x.shape[-1] == x.shape[-2] else 1, (x.shape[0],), generator=gen)
    flip = torch.randint(0, 2, (x.shape[0],), generator=gen).bool()
    out = x.clone()
    for kk in range(4):
        for ff in (False, True):
            sel = torch.nonzero((k == kk) & (flip == ff)).squeeze(1)
            if sel.numel() == 0 or (kk == 0 and not ff):
                continue
            y = x[sel]
            if ff:
                y = torch.flip(y, dims=(-1,))
            out[sel] = torch.rot90(y, kk, dims=(-2, -1))
    return out


class SupervisedNet:
    """From-scratch network on whatever the input set holds (see the module doc for the budget)."""

    input_kinds = frozenset({"scalar", "image", "spectrum"})
    """Modality kinds this method can use; an input set with others is an error."""

    def __init__(self, name: str = "cnn", configs: Sequence[NetConfig] | None = None, max_epochs: int | None = None,
                 patience: int | None = None, min_steps: int | None = None, batch_size: int = 64,
                 spectrum_pixels: int = 1024, wave_range: tuple[float, float] = (3600.0, 9800.0)) -> None:
        if batch_size < 2:
            raise ValueError(f"batch_size: expected >= 2 (BatchNorm), got {batch_size}")
        self.name = name
        self.configs = tuple(configs) if configs is not None else None
        self.max_epochs = max_epochs
        self.patience = patience
        self.min_steps = min_steps
        self.batch_size = batch_size
        self.spectrum_pixels = spectrum_pixels
        self.wave_range = wave_range
        self.model_: _Net | None = None
        self.selection_: list[dict[str, Any]] = []
        self.chosen_: dict[str, Any] = {}
        self.inputs_: list[str] = []

    # -- preprocessing
    def _setup(self, names: tuple[str, ...], train: LabelledSet) -> None:
        kinds = {m: _kind(m) for m in names}
        self.inputs_ = list(names)
        scalars = [m for m in names if kinds[m] == "scalar"]
        self.scalar_prep_ = _ScalarPrep(scalars, train) if scalars else None
        self.image_prep_ = {m: _ImagePrep(m, train) for m in names if kinds[m] == "image"}
        self.spectrum_prep_ = {m: _SpectrumPrep(m, train, self.spectrum_pixels, self.wave_range)
                               for m in names if kinds[m] == "spectrum"}

    def _tensors(self, data: LabelledSet) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.scalar_prep_ is not None:
            out["scalar"] = torch.from_numpy(self.scalar_prep_(data))
        for m, prep in self.image_prep_.items():
            x, present = prep(data)
            out[m], out[f"{m}:present"] = torch.from_numpy(x), torch.from_numpy(present.astype(np.float32))
        for m, sprep in self.spectrum_prep_.items():
            x, amp, present = sprep(data)
            out[m], out[f"{m}:amp"] = torch.from_numpy(x), torch.from_numpy(amp)
            out[f"{m}:present"] = torch.from_numpy(present.astype(np.float32))
        return out

    @property
    def _has_cnn(self) -> bool:
        return bool(self.image_prep_ or self.spectrum_prep_)

    # -- training
    def _train(self, cfg: NetConfig, x_tr: dict[str, torch.Tensor], y_tr: torch.Tensor,
               x_va: dict[str, torch.Tensor], y_va: torch.Tensor, seed: int, max_epochs: int, patience: int
               ) -> tuple[_Net, dict[str, Any]]:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        scalar_dim = self.scalar_prep_.dim if self.scalar_prep_ is not None else 0
        model = _Net(cfg, scalar_dim, {m: len(p.bands) for m, p in self.image_prep_.items()},
                     list(self.spectrum_prep_))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        n = len(y_tr)
        steps = self._steps_per_epoch(n)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs * steps)
        best, best_state, best_epoch, epoch = math.inf, copy.deepcopy(model.state_dict()), -1, 0
        t0 = time.perf_counter()
        for epoch in range(max_epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            for s in range(steps):  # the last batch absorbs a remainder of 0-1 rows (BatchNorm needs >= 2)
                stop = (s + 1) * self.batch_size if s < steps - 1 else n
                idx = perm[s * self.batch_size:stop]
                batch = {k: v[idx] for k, v in x_tr.items()}
                for m in self.image_prep_:
                    batch[m] = _dihedral(batch[m], gen)
                loss = F.mse_loss(model(batch), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            val = float(F.mse_loss(self._forward(model, x_va), y_va))
            if val < best:
                best, best_state, best_epoch = val, copy.deepcopy(model.state_dict()), epoch
            elif epoch - best_epoch >= patience:
                break
        model.load_state_dict(best_state)
        info = {"config": asdict(cfg), "val_loss": best, "best_epoch": best_epoch + 1, "epochs": epoch + 1,
                "seconds": round(time.perf_counter() - t0, 2)}
        return model, info

    def _steps_per_epoch(self, n: int) -> int:
        """Batches an epoch; a remainder of one row joins the last batch (BatchNorm needs two)."""
        return max(1, n // self.batch_size if n % self.batch_size < 2 else n // self.batch_size + 1)

    def _forward(self, model: _Net, x: dict[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
        model.eval()
        n = len(next(iter(x.values())))
        with torch.no_grad():
            return torch.cat([model({k: v[i:i + batch_size] for k, v in x.items()})
                              for i in range(0, n, batch_size)]) if n else torch.zeros(0)

    def fit(self, train: LabelledSet, val: LabelledSet, target: str, input_set: tuple[str, ...],
            seed: int) -> SupervisedNet:
        _check_kinds(resolve_input_set(input_set), self.input_kinds, self.name)
        names, tr, y_tr, va, y_va = _prepare(train, val, target, input_set, self.name)
        self._setup(names, tr)
        self.y_mean_ = float(np.mean(y_tr))
        self.y_std_ = float(np.std(y_tr)) or 1.0
        configs = self.configs or (CNN_GRID if self._has_cnn else MLP_GRID)
        max_epochs = self.max_epochs or (40 if self._has_cnn else 300)
        patience = self.patience or (10 if self._has_cnn else 30)
        min_steps = self.min_steps if self.min_steps is not None else (800 if self._has_cnn else 2000)
        stretch = max(1.0, min_steps / (max_epochs * self._steps_per_epoch(len(y_tr))))
        max_epochs, patience = math.ceil(max_epochs * stretch), math.ceil(patience * stretch)
        x_tr, x_va = self._tensors(tr), self._tensors(va)
        t_tr = torch.from_numpy(((y_tr - self.y_mean_) / self.y_std_).astype(np.float32))
        t_va = torch.from_numpy(((y_va - self.y_mean_) / self.y_std_).astype(np.float32))
        self.selection_, best = [], None
        for cfg in configs:
            with torch.random.fork_rng(devices=[]):  # seed our own runs without moving the caller's RNG
                model, info = self._train(cfg, x_tr, t_tr, x_va, t_va, seed, max_epochs, patience)
            log.info("%s %s: %s", self.name, target, info)
            self.selection_.append(info)
            if best is None or info["val_loss"] < best[1]["val_loss"]:
                best = (model, info)
        assert best is not None
        self.model_, self.chosen_ = best
        self.budget_ = {"configs": [asdict(c) for c in configs], "max_epochs": max_epochs, "patience": patience,
                        "min_steps": min_steps, "batch_size": self.batch_size}
        return self

    def predict(self, data: LabelledSet) -> np.ndarray:
        if self.model_ is None:
            raise RuntimeError(f"{self.name}: call fit before predict")
        check_modalities(data, self.inputs_, f"{self.name} prediction data")
        z = self._forward(self.model_, self._tensors(data)).numpy().astype(np.float64)
        return z * self.y_std_ + self.y_mean_

    def describe(self) -> dict[str, Any]:
        """Hyper-parameter budget and choice, for the report."""
        return {"name": self.name, "inputs": self.inputs_, **getattr(self, "budget_", {}), "chosen": self.chosen_,
                "selection": self.selection_}


class PhotometryMLP(SupervisedNet):
    """:class:`SupervisedNet` restricted to scalar inputs (an MLP; named ``"mlp"`` in reports)."""

    input_kinds = frozenset({"scalar"})

    def __init__(self, name: str = "mlp", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)


def default_methods() -> list[Method]:
    """The supervised baselines of a report (fresh, unfitted instances)."""
    return [GBMBaseline(), PhotometryMLP(), SupervisedNet()]

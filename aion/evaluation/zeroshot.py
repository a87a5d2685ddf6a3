"""Zero-shot measurements of a pretrained model on held-out mock-universe objects.

What ``aion zeroshot`` measures (numbers in ``metrics.json``, a summary in ``report.md``):

- **Redshift** (target ``desi_z``, the spectroscopic redshift, on held-out objects that have
  one) from *photometry* (Legacy Survey g,r,i,z,W1-W4 fluxes + HSC g..y magnitudes, whichever
  the object has) and from *photometry + images* (plus the Legacy and HSC cutouts). Metrics on
  dz = (z_pred - z_true) / (1 + z_true) of the posterior median: NMAD = 1.4826 median|dz -
  median dz|, outlier fraction |dz| > 0.15, bias = median dz; calibration: the fraction of
  truths inside the central 68% and 95% intervals and the PIT histogram (CDF of the posterior
  at the truth; flat when calibrated).
- The same for the **trivial predictor** (the training set's redshift distribution for every
  object: its median, and its quantiles as intervals) and a **gradient-boosted baseline**
  (scikit-learn ``HistGradientBoostingRegressor``) trained with *all* labels of the training
  catalogue on the same photometry (asinh magnitudes and adjacent colours, missing values left
  to the trees), hyper-parameters picked on a validation split by NMAD, quantile models for its
  intervals.
- Optionally the same redshift rows **temperature-calibrated** (``calibration_data``): one
  temperature per input set fitted (coverage or likelihood) on the labelled objects of another data
  root that neither pretraining nor the held-out set contains (:mod:`aion.inference.calibration`),
  reported beside the uncalibrated zero-shot rows with the number of labels it used.
- **Spectrum generation** (target ``desi_spectrum``) from photometry + images: MaskGIT sampling,
  decoded onto the DESI grid; median reduced chi^2 against the observed spectrum and R^2 against
  the noiseless truth (mock only), against nearest-neighbour baselines in photometry space (the
  nearest training object's observed spectrum, and the mean of the 10 nearest, scaled by the
  r-band flux ratio).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aion.data.batches import SpectrumBatch
from aion.evaluation.baselines import asinh_mag
from aion.evaluation.metrics import OUTLIER_DZ, robust_stats
from aion.evaluation.report import save_npz_atomic, write_text_atomic

log = logging.getLogger(__name__)

LEGACY_BANDS = ("g", "r", "i", "z", "w1", "w2", "w3", "w4")
HSC_BANDS = ("g", "r", "i", "z", "y")
PHOTOMETRY = tuple(f"legacysurvey_flux_{b}" for b in LEGACY_BANDS) + tuple(f"hsc_mag_{b}" for b in HSC_BANDS)
IMAGES = ("legacysurvey_image", "hsc_image")
INPUT_SETS: dict[str, tuple[str, ...]] = {"photometry": PHOTOMETRY, "photometry+image": PHOTOMETRY + IMAGES}
TRIVIAL = "training redshift distribution (trivial: no inputs)"


@dataclass(kw_only=True)
class ZeroShotConfig:
    """Options of :func:`evaluate_zeroshot` (defaults = the measurements in docs/inference.md)."""

    redshift_target: str = "desi_z"
    spectrum_target: str = "desi_spectrum"
    spectrum_inputs: str = "photometry+image"
    surveys: tuple[str, ...] = ("legacysurvey", "hsc", "desi")
    max_objects: int | None = None
    """Held-out objects with a redshift to use (None = all)."""
    max_inputs: int | None = None
    """Encoder budget at inference (None = every token the object has)."""
    refined: bool = True
    """Use the fine redshift token (second pass) for the estimates and the PIT."""
    gen_steps: int = 8
    gen_samples: int = 4
    temperature: float = 1.0
    """Sampling temperature of spectrum generation (not the calibration temperature)."""
    calibration_data: str | None = None
    """An MMU root of labelled objects seen neither in pretraining nor in ``data``: fit one redshift
    temperature per input set there and report calibrated rows too (None: no calibration)."""
    calibration_max_objects: int | None = None
    calibration_objective: str = "coverage"
    """``"coverage"`` or ``"nll"``: see :mod:`aion.inference.calibration`."""
    seed: int = 0
    batch_size: int = 128
    knn: tuple[int, ...] = (1, 10)
    gbm_grid: tuple[dict[str, Any], ...] = field(default_factory=lambda: (
        {"learning_rate": 0.05, "max_leaf_nodes": 15, "min_samples_leaf": 20},
        {"learning_rate": 0.05, "max_leaf_nodes": 31, "min_samples_leaf": 20},
        {"learning_rate": 0.1, "max_leaf_nodes": 31, "min_samples_leaf": 10},
        {"learning_rate": 0.03, "max_leaf_nodes": 63, "min_samples_leaf": 10},
    ))
    plots: bool = True


# ---------------------------------------------------------------------------- metrics
def redshift_metrics(z_pred: np.ndarray, z_true: np.ndarray, lo68: np.ndarray | None = None,
                     hi68: np.ndarray | None = None, lo95: np.ndarray | None = None,
                     hi95: np.ndarray | None = None) -> dict[str, float]:
    """Photo-z metrics of point estimates (and interval coverage when intervals are given)."""
    z_pred, z_true = np.asarray(z_pred, float), np.asarray(z_true, float)
    dz = (z_pred - z_true) / (1 + z_true)
    med, nmad = robust_stats(dz)
    out = {"n": int(dz.size), "nmad": nmad, "outlier_fraction": float(np.mean(np.abs(dz) > OUTLIER_DZ)), "bias": med,
           "mean_dz": float(np.mean(dz)), "rms_dz": float(np.sqrt(np.mean(dz**2)))}
    if lo68 is not None and hi68 is not None:
        out["coverage_68"] = float(np.mean((z_true >= lo68) & (z_true <= hi68)))
    if lo95 is not None and hi95 is not None:
        out["coverage_95"] = float(np.mean((z_true >= lo95) & (z_true <= hi95)))
    return out


def pit_histogram(pit: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Counts of the PIT values in ``bins`` equal bins and the largest deviation from flat in units
    of the Poisson error of a flat histogram."""
    pit = np.asarray(pit, float)
    pit = pit[np.isfinite(pit)]
    counts, _ = np.histogram(pit, bins=bins, range=(0.0, 1.0))
    expected = pit.size / bins
    dev = float(np.max(np.abs(counts - expected)) / math.sqrt(expected)) if pit.size else float("nan")
    return {"counts": counts.tolist(), "max_deviation_sigma": dev}


def spectrum_scores(model: np.ndarray, observed: np.ndarray, ivar: np.ndarray, valid: np.ndarray,
                    truth: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-object reduced chi^2 against the observation (valid pixels) and R^2 against the truth."""
    from aion.tokenizers.spectrum import r2_scores

    v = valid & (ivar > 0)
    n = np.maximum(v.sum(axis=1), 1)
    chi2 = (np.where(v, ivar * (model - observed) ** 2, 0.0)).sum(axis=1) / n
    out = {"chi2": chi2}
    if truth is not None:
        out["r2"] = r2_scores(model, truth)[0]
    return out


# ---------------------------------------------------------------------------- photometry features
def photometry_features(objects: dict[str, Any]) -> np.ndarray:
    """(B, F) baseline features: asinh magnitudes of the Legacy fluxes and the HSC magnitudes, and the
    adjacent colours of each survey; NaN where the object lacks a band."""
    n = len(next(iter(objects.values())))
    mags = []
    for b in LEGACY_BANDS:
        s = objects.get(f"legacysurvey_flux_{b}")
        mags.append(np.where(s.valid, asinh_mag(s.values), np.nan) if s is not None else np.full(n, np.nan))
    hsc = []
    for b in HSC_BANDS:
        s = objects.get(f"hsc_mag_{b}")
        hsc.append(np.where(s.valid, s.values, np.nan) if s is not None else np.full(n, np.nan))
    cols = mags + hsc
    cols += [mags[i] - mags[i + 1] for i in range(len(mags) - 1)]
    cols += [hsc[i] - hsc[i + 1] for i in range(len(hsc) - 1)]
    return np.stack(cols, axis=1)


def _knn_features(feat: np.ndarray) -> np.ndarray:
    """The Legacy optical + W1 magnitudes and colours (always measured for Legacy objects), for distances."""
    keep = [1] + list(range(len(LEGACY_BANDS) + len(HSC_BANDS), len(LEGACY_BANDS) + len(HSC_BANDS) + 4))
    return feat[:, keep]  # r mag, g-r, r-i, i-z, z-W1


# ---------------------------------------------------------------------------- data
@dataclass
class _Rows:
    """Held-out or training objects with a redshift: what the measurements need, row-aligned."""

    object_id: list[np.ndarray] = field(default_factory=list)
    z: list[np.ndarray] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    r_flux: list[np.ndarray] = field(default_factory=list)
    spec_flux: list[np.ndarray] = field(default_factory=list)
    spec_ivar: list[np.ndarray] = field(default_factory=list)
    spec_valid: list[np.ndarray] = field(default_factory=list)

    def cat(self, name: str) -> np.ndarray:
        return np.concatenate(getattr(self, name)) if getattr(self, name) else np.zeros(0)


def _with_target(data: Path, cfg: ZeroShotConfig, modalities: Sequence[str], names: Sequence[str] | None = None,
                 ) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Batches of the objects of ``data`` that have the redshift target, restricted to ``modalities``."""
    from aion.inference.io import iter_objects

    stream = iter_objects(data, list(cfg.surveys), batch_size=cfg.batch_size, modalities=list(modalities))
    taken = 0
    for ids, objects in stream:
        zb = objects.get(cfg.redshift_target)
        if zb is None:
            continue
        rows = np.nonzero(zb.valid)[0]
        if cfg.max_objects is not None:
            rows = rows[: max(0, cfg.max_objects - taken)]
        if rows.size == 0:
            if cfg.max_objects is not None and taken >= cfg.max_objects:
                return
            continue
        taken += rows.size
        sub = {k: v.select(rows) for k, v in objects.items() if names is None or k in names}
        yield np.asarray(ids)[rows], sub


def _read_training_set(train: Path, cfg: ZeroShotConfig) -> _Rows:
    rows = _Rows()
    mods = (*PHOTOMETRY, cfg.redshift_target, cfg.spectrum_target)
    full = ZeroShotConfig(**{**cfg.__dict__, "max_objects": None})
    for ids, objects in _with_target(train, full, mods):
        rows.object_id.append(ids)
        rows.z.append(objects[cfg.redshift_target].values)
        rows.features.append(photometry_features(objects))
        rows.r_flux.append(objects["legacysurvey_flux_r"].values)
        spec: SpectrumBatch | None = objects.get(cfg.spectrum_target)
        if spec is not None:
            rows.spec_flux.append(spec.flux)
            rows.spec_ivar.append(spec.ivar)
            rows.spec_valid.append(spec.valid & spec.present[:, None])
    if not rows.z:
        raise ValueError(f"{train}: no object with {cfg.redshift_target!r}; the baselines need labelled objects")
    return rows


# ---------------------------------------------------------------------------- baselines
@dataclass
class GBMBaseline:
    """Tuned gradient-boosted trees on photometry: a median model trained on every label, and central
    intervals from quantile models made honest by conformalized quantile regression (Romano et al.
    2019): the quantile models learn on 80% of the labels and the held-back 20% widen (or narrow)
    each interval by the amount that makes it cover its nominal fraction there, so the intervals do
    not rest on the trees' own quantiles being calibrated."""

    params: dict[str, Any]
    median_model: Any
    interval_models: dict[float, tuple[Any, Any, float]]
    """{nominal coverage: (lower model, upper model, conformal margin)}."""
    validation: list[dict[str, Any]]

    @classmethod
    def fit(cls, x: np.ndarray, z: np.ndarray, grid: Sequence[dict[str, Any]], seed: int = 0) -> GBMBaseline:
        from sklearn.ensemble import HistGradientBoostingRegressor

        def model(**kw: Any):
            return HistGradientBoostingRegressor(random_state=seed, **kw)

        rng = np.random.default_rng(seed)
        order = rng.permutation(len(z))
        n_val = max(1, len(z) // 5)
        val, fit = order[:n_val], order[n_val:]
        scores = []
        for params in grid:
            m = model(loss="absolute_error", max_iter=1000, early_stopping=True, validation_fraction=0.15,
                      n_iter_no_change=30, **params).fit(x[fit], z[fit])
            met = redshift_metrics(m.predict(x[val]), z[val])
            scores.append({**params, "n_iter": int(m.n_iter_), "val_nmad": met["nmad"],
                           "val_outlier_fraction": met["outlier_fraction"]})
        best = min(range(len(grid)), key=lambda i: (scores[i]["val_nmad"], scores[i]["val_outlier_fraction"]))
        params = {**grid[best], "max_iter": max(scores[best]["n_iter"], 50)}
        median_model = model(loss="absolute_error", **params).fit(x, z)
        intervals = {}
        for coverage in (0.68, 0.95):
            a = (1 - coverage) / 2
            lo = model(loss="quantile", quantile=a, **params).fit(x[fit], z[fit])
            hi = model(loss="quantile", quantile=1 - a, **params).fit(x[fit], z[fit])
            score = np.maximum(lo.predict(x[val]) - z[val], z[val] - hi.predict(x[val]))
            level = min(1.0, coverage * (1 + 1 / len(val)))
            intervals[coverage] = (lo, hi, float(np.quantile(score, level)))
        return cls(params=params, median_model=median_model, interval_models=intervals, validation=scores)

    def predict(self, x: np.ndarray) -> dict[float, np.ndarray]:
        """{quantile: values} for 0.5 and the interval ends 0.16/0.84 and 0.025/0.975; the intervals
        are nested (separately fitted quantile models can cross: a wider one never ends inside a narrower one)."""
        med = self.median_model.predict(x)
        out = {0.5: med}
        lo_in, hi_in = med, med
        for coverage, (lo, hi, margin) in sorted(self.interval_models.items()):
            a = round((1 - coverage) / 2, 4)
            lo_in = out[a] = np.minimum(lo.predict(x) - margin, lo_in)
            hi_in = out[round(1 - a, 4)] = np.maximum(hi.predict(x) + margin, hi_in)
        return out

    def describe(self) -> dict[str, Any]:
        return {"params": self.params, "validation": self.validation,
                "conformal_margin": {str(c): m for c, (_, _, m) in self.interval_models.items()}}


class NeighbourSpectra:
    """Spectra of the nearest training objects in (standardised) photometry space, scaled by r-band flux."""

    def __init__(self, features: np.ndarray, r_flux: np.ndarray, flux: np.ndarray, valid: np.ndarray):
        f = _knn_features(features)
        self.fill = np.nanmedian(f, axis=0)
        f = np.where(np.isfinite(f), f, self.fill)
        self.mu, self.sd = f.mean(axis=0), f.std(axis=0) + 1e-9
        self.x = (f - self.mu) / self.sd
        self.r_flux, self.flux, self.valid = r_flux, flux, valid

    def predict(self, features: np.ndarray, r_flux: np.ndarray, k: int) -> np.ndarray:
        f = _knn_features(features)
        f = np.where(np.isfinite(f), f, self.fill)
        q = (f - self.mu) / self.sd
        d = ((q[:, None, :] - self.x[None, :, :]) ** 2).sum(axis=2)
        nn = np.argsort(d, axis=1, kind="stable")[:, :k]
        out = np.empty((len(q), self.flux.shape[1]))
        with np.errstate(divide="ignore", invalid="ignore"):
            for i, idx in enumerate(nn):
                scale = np.where(self.r_flux[idx] > 0, r_flux[i] / self.r_flux[idx], 1.0)
                w = self.valid[idx].astype(float)
                s = (self.flux[idx] * scale[:, None] * w).sum(axis=0)
                n = w.sum(axis=0)
                row = np.where(n > 0, s / np.maximum(n, 1), np.nan)
                good = np.isfinite(row)
                out[i] = np.interp(np.arange(row.size), np.nonzero(good)[0], row[good]) if good.any() else 0.0
        return out


# ---------------------------------------------------------------------------- the measurement
class _Truth:
    """Noiseless DESI-grid spectra of held-out parent objects (mock only: needs the ``truth`` survey),
    through the same one-to-one cross-match to DESI as the reader."""

    def __init__(self, data: Path, parent_survey: str):
        from aion.data.mmu import SurveyShards
        from aion.tokenizers.pretokenize import PretokenizeConfig, _Joined

        parent = SurveyShards(data, parent_survey)
        joined = _Joined(data, "desi", (parent.read_column("ra"), parent.read_column("dec")),
                         PretokenizeConfig(parent=parent_survey, join=("desi",)))
        desi_oid = joined.shards.read_column("object_id")
        self.desi_of_parent = {int(p): int(desi_oid[r]) for p, r in zip(parent.read_column("object_id"),
                                                                       joined.row_of_parent, strict=True) if r >= 0}
        self.shards = SurveyShards(data, "truth")
        key = self.shards.read_column("desi_object_id")
        self.row_of_desi = {int(v): i for i, v in enumerate(key) if v >= 0}

    def spectra(self, parent_ids: np.ndarray) -> np.ndarray:
        from aion.mock.universe import noiseless_desi_spectra

        rows = []
        for o in parent_ids:
            d = self.desi_of_parent.get(int(o))
            if d is None or d not in self.row_of_desi:
                raise KeyError(f"object {int(o)}: no DESI truth row")
            rows.append(self.row_of_desi[d])
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        cols = self.shards.read_rows(rows[order])
        spec = np.concatenate([noiseless_desi_spectra({k: np.asarray(v)[s:s + 128] for k, v in cols.items()})
                               for s in range(0, rows.size, 128)])
        out = np.empty_like(spec)
        out[order] = spec
        return out


def evaluate_zeroshot(model_dir: os.PathLike | str, tokenizers_dir: os.PathLike | str, data: os.PathLike | str,
                      train_data: os.PathLike | str, out_dir: os.PathLike | str,
                      cfg: ZeroShotConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every measurement of the module docstring; writes metrics.json, report.md, predictions.npz
    and PNGs into ``out_dir`` (files written whole via temp + rename) and returns the metrics."""
    from tqdm.auto import tqdm

    from aion.inference import AionModel
    from aion.mock.spectra import desi_wavelength

    cfg = cfg or ZeroShotConfig()
    data, train_data, out = Path(data), Path(train_data), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    am = AionModel.from_pretrained(model_dir, tokenizers_dir, max_inputs=cfg.max_inputs)
    for name in (cfg.redshift_target, cfg.spectrum_target):
        if name not in am.names:
            raise ValueError(f"target {name!r} is not in the model (it has {list(am.names)})")
    sets = {k: tuple(m for m in v if m in am.names) for k, v in INPUT_SETS.items()}
    if cfg.spectrum_inputs not in sets:
        raise ValueError(f"spectrum_inputs: expected one of {list(sets)}, got {cfg.spectrum_inputs!r}")

    # baselines first: they need the training catalogue only
    t0 = time.perf_counter()
    train = _read_training_set(train_data, cfg)
    x_train, z_train = train.cat("features"), train.cat("z")
    gbm = GBMBaseline.fit(x_train, z_train, cfg.gbm_grid, seed=cfg.seed)
    # the trivial predictor: the training redshift distribution for everyone (median, quantile intervals)
    prior = dict(zip((0.5, 0.16, 0.84, 0.025, 0.975), np.quantile(z_train, [0.5, 0.16, 0.84, 0.025, 0.975]),
                     strict=True))
    neighbours = None
    if train.spec_flux:
        neighbours = NeighbourSpectra(x_train, train.cat("r_flux"), train.cat("spec_flux"), train.cat("spec_valid"))
    t_baselines = time.perf_counter() - t0
    log.info("baselines fitted on %d labelled training objects in %.1f s", len(z_train), t_baselines)
    t0 = time.perf_counter()
    calibration = _fit_temperatures(am, cfg, sets, progress) if cfg.calibration_data else {}
    t_calibration = time.perf_counter() - t0

    wave = desi_wavelength()
    res: dict[str, list[np.ndarray]] = {}
    examples: dict[str, Any] = {"pdf": [], "spectra": []}

    def add(key: str, value: np.ndarray) -> None:
        res.setdefault(key, []).append(np.asarray(value))

    n_total = None
    if cfg.max_objects is not None:
        n_total = cfg.max_objects
    bar = tqdm(total=n_total, desc="zero-shot", unit="obj", disable=not progress)
    read_mods = tuple(sorted({*PHOTOMETRY, *IMAGES, cfg.redshift_target, cfg.spectrum_target}))
    t_model = 0.0
    all_inputs = {m for mods in sets.values() for m in mods}
    truth_lookup = _Truth(data, cfg.surveys[0]) if (data / "truth").is_dir() and "desi" in cfg.surveys else None
    for batch_no, (ids, objects) in enumerate(_with_target(data, cfg, read_mods)):
        z_true = objects[cfg.redshift_target].values
        add("object_id", ids)
        add("z_true", z_true)
        feats = photometry_features(objects)
        q = gbm.predict(feats)
        for key, qq in (("median", 0.5), ("p16", 0.16), ("p84", 0.84), ("p2_5", 0.025), ("p97_5", 0.975)):
            add(f"gbm_{key}", q[qq])
            add(f"prior_{key}", np.full(len(ids), prior[qq]))
        t0 = time.perf_counter()
        # every input modality is tokenized once; each input set (and the spectrum rows) reads its part
        tokenized = am.tokenize({k: v for k, v in objects.items() if k in all_inputs})
        for set_name, mods in sets.items():
            tokens, present = _pick(tokenized, mods)
            pred = am.predict_scalar(tokens, present, cfg.redshift_target)
            est = pred.refined if cfg.refined and pred.refined is not None else pred.estimates
            tag = _tag(set_name)
            for key in ("median", "mean", "mode", "p16", "p84", "p2_5", "p97_5"):
                add(f"{tag}_{key}", getattr(est, key))
            add(f"{tag}_pit", pred.cdf(z_true, refined=cfg.refined))
            if set_name in calibration:
                cal = pred.tempered(calibration[set_name].temperature)
                cest = cal.refined if cfg.refined and cal.refined is not None else cal.estimates
                for key in ("median", "p16", "p84", "p2_5", "p97_5"):
                    add(f"{tag}_cal_{key}", getattr(cest, key))
                add(f"{tag}_cal_pit", cal.cdf(z_true, refined=cfg.refined))
            add(f"{tag}_tokens_used", sum(pred.tokens_used.get(m, 0) for m in mods))
            add(f"{tag}_subsampled", pred.subsampled)
            if set_name == "photometry+image" and len(examples["pdf"]) < 6:
                for b in range(min(len(ids), 6 - len(examples["pdf"]))):
                    examples["pdf"].append({"edges": pred.edges, "probs": pred.probs[b], "z_true": z_true[b],
                                            "median": est.median[b], "p16": est.p16[b], "p84": est.p84[b]})
        # spectrum generation for objects that have an observed spectrum
        spec: SpectrumBatch | None = objects.get(cfg.spectrum_target)
        if spec is not None and spec.present.any():
            rows = np.nonzero(spec.present)[0]
            tokens, present = _pick(tokenized, sets[cfg.spectrum_inputs], rows)
            gen = am.generate(tokens, present, cfg.spectrum_target, steps=cfg.gen_steps,
                              temperature=cfg.temperature, seed=cfg.seed + batch_no,
                              num_samples=cfg.gen_samples, decode=True, decode_kwargs={"wavelength": wave})
            samples = np.stack([d.flux for d in gen.decoded]).astype(np.float64)  # (S, b, L)
            obs = spec.select(rows)
            if obs.flux.shape[1] != wave.size:
                raise ValueError(f"{cfg.spectrum_target}: {obs.flux.shape[1]} pixels, expected the DESI grid "
                                 f"({wave.size})")
            of, oi, ov = obs.flux.astype(np.float64), obs.ivar.astype(np.float64), obs.valid
            truth = None if truth_lookup is None else truth_lookup.spectra(np.asarray(ids)[rows])
            add("spec_object_id", np.asarray(ids)[rows])
            add("spec_z", z_true[rows])
            first = spectrum_scores(samples[0], of, oi, ov, truth)
            # the per-pixel median of the samples: robust to one sample with a wild amplitude token
            mean = spectrum_scores(np.median(samples, axis=0), of, oi, ov, truth)
            add("gen_chi2", first["chi2"])
            add("genmedian_chi2", mean["chi2"])
            if truth is not None:
                add("gen_r2", first["r2"])
                add("genmedian_r2", mean["r2"])
                add("truth_chi2", spectrum_scores(truth, of, oi, ov, None)["chi2"])
            nn_models = {}
            if neighbours is not None:
                r_flux = objects["legacysurvey_flux_r"].values[rows]
                for k in cfg.knn:
                    nn = neighbours.predict(feats[rows], r_flux, k)
                    nn_models[k] = nn
                    s = spectrum_scores(nn, of, oi, ov, truth)
                    add(f"nn{k}_chi2", s["chi2"])
                    if truth is not None:
                        add(f"nn{k}_r2", s["r2"])
            for j in range(min(len(rows), 4 - len(examples["spectra"]))):
                examples["spectra"].append({
                    "z": z_true[rows[j]], "observed": of[j], "valid": ov[j],
                    "truth": None if truth is None else truth[j], "samples": samples[:, j],
                    "nn": {k: v[j] for k, v in nn_models.items()}})
        t_model += time.perf_counter() - t0
        bar.update(len(ids))
    bar.close()
    if not res:
        raise ValueError(f"{data}: no held-out object has {cfg.redshift_target!r}")
    arrays = {k: np.concatenate(v) for k, v in res.items()}
    metrics = _summarise(arrays, cfg, sets, calibration)
    metrics.update({
        "model_dir": str(model_dir), "tokenizers_dir": str(tokenizers_dir), "data": str(data),
        "train_data": str(train_data), "n_train_labelled": int(len(z_train)),
        "n_train_spectra": int(0 if neighbours is None else len(neighbours.flux)),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "gbm": gbm.describe(),
        "seconds": {"baselines": t_baselines, "calibration": t_calibration, "model": t_model,
                    "total": time.perf_counter() - t_start},
    })
    write_text_atomic(out / "metrics.json", json.dumps(_jsonable(metrics), indent=2))
    save_npz_atomic(out / "predictions.npz", arrays)
    if cfg.plots:
        from aion.evaluation import zeroshot_plots

        zeroshot_plots.plot_all(out, arrays, examples, wave, sets, cfg)
    write_text_atomic(out / "report.md", render_report(metrics, cfg.plots))
    return metrics


def _fit_temperatures(am, cfg: ZeroShotConfig, sets: dict[str, tuple[str, ...]], progress: bool) -> dict:
    """One redshift temperature per input set, fitted on the labelled objects of ``cfg.calibration_data``."""
    from tqdm.auto import tqdm

    from aion.inference.calibration import OBJECTIVES, fit_temperature

    root = Path(cfg.calibration_data)
    if not root.is_dir():
        raise ValueError(f"calibration_data: {root} is not a directory")
    if cfg.calibration_objective not in OBJECTIVES:  # before the model pass, not after it
        raise ValueError(f"calibration_objective: expected one of {OBJECTIVES}, got {cfg.calibration_objective!r}")
    limited = ZeroShotConfig(**{**cfg.__dict__, "max_objects": cfg.calibration_max_objects})
    probs: dict[str, list[np.ndarray]] = {k: [] for k in sets}
    truths, edges = [], {}
    mods = tuple(sorted({m for v in sets.values() for m in v} | {cfg.redshift_target}))
    bar = tqdm(total=cfg.calibration_max_objects, desc="calibration", unit="obj", disable=not progress)
    for _ids, objects in _with_target(root, limited, mods):
        truths.append(objects[cfg.redshift_target].values)
        tokenized = am.tokenize({k: v for k, v in objects.items() if k != cfg.redshift_target})
        for set_name, set_mods in sets.items():
            pred = am.predict_scalar(*_pick(tokenized, set_mods), cfg.redshift_target)
            probs[set_name].append(pred.probs)
            edges[set_name] = pred.edges
        bar.update(len(_ids))
    bar.close()
    if not truths:
        raise ValueError(f"calibration_data: no object of {root} has {cfg.redshift_target!r}")
    z = np.concatenate(truths)
    fits = {k: fit_temperature(np.concatenate(v), edges[k], z, objective=cfg.calibration_objective)
            for k, v in probs.items()}
    for k, f in fits.items():
        log.info("calibration (%s): T = %.3f from %d labelled objects%s", k, f.temperature, f.n,
                 " (at the search bound: distrust it)" if f.at_bound else "")
    return fits


def _pick(tokenized, mods: Sequence[str], rows: np.ndarray | None = None) -> tuple[dict, dict]:
    """The tokens and presence of ``mods`` (those tokenized), optionally of some rows only."""
    tokens, present = tokenized
    names = [m for m in mods if m in tokens]
    if rows is None:
        return {m: tokens[m] for m in names}, {m: present[m] for m in names}
    r = torch.from_numpy(rows)
    return {m: tokens[m][r] for m in names}, {m: present[m][r] for m in names}


def _tag(set_name: str) -> str:
    return "fm_" + set_name.replace("+", "_")


def calibrated_label(set_name: str) -> str:
    return f"foundation model, {set_name}, temperature-calibrated"


def _summarise(a: dict[str, np.ndarray], cfg: ZeroShotConfig, sets: dict[str, tuple[str, ...]],
               calibration: dict | None = None) -> dict[str, Any]:
    z = a["z_true"]
    red: dict[str, Any] = {}
    for set_name in sets:
        t = _tag(set_name)
        m = redshift_metrics(a[f"{t}_median"], z, a[f"{t}_p16"], a[f"{t}_p84"], a[f"{t}_p2_5"], a[f"{t}_p97_5"])
        m["pit"] = pit_histogram(a[f"{t}_pit"])
        m["nmad_of_mean"] = redshift_metrics(a[f"{t}_mean"], z)["nmad"]
        m["mean_tokens_used"] = float(np.mean(a[f"{t}_tokens_used"]))
        m["fraction_subsampled"] = float(np.mean(a[f"{t}_subsampled"]))
        red[f"foundation model, {set_name}"] = m
        if calibration and set_name in calibration:
            c = redshift_metrics(a[f"{t}_cal_median"], z, a[f"{t}_cal_p16"], a[f"{t}_cal_p84"], a[f"{t}_cal_p2_5"],
                                 a[f"{t}_cal_p97_5"])
            c["pit"] = pit_histogram(a[f"{t}_cal_pit"])
            c["temperature"] = calibration[set_name].temperature
            red[calibrated_label(set_name)] = c
    g = redshift_metrics(a["gbm_median"], z, a["gbm_p16"], a["gbm_p84"], a["gbm_p2_5"], a["gbm_p97_5"])
    red["gradient-boosted trees, photometry (all labels)"] = g
    if "prior_median" in a:
        red[TRIVIAL] = redshift_metrics(a["prior_median"], z, a["prior_p16"], a["prior_p84"], a["prior_p2_5"],
                                        a["prior_p97_5"])
    out: dict[str, Any] = {"n_heldout_with_redshift": int(z.size), "redshift": red}
    if calibration:
        out["calibration"] = {"data": str(cfg.calibration_data),
                              "fits": {k: f.to_dict() for k, f in calibration.items()}}
    if "gen_chi2" in a:
        spec: dict[str, Any] = {"n": int(a["gen_chi2"].size)}
        rows = [("foundation model, 1 sample", "gen"), (f"foundation model, median of {cfg.gen_samples} samples",
                                                         "genmedian")]
        rows += [(f"{k}-nearest neighbour{'s (mean)' if k > 1 else ''} in photometry", f"nn{k}") for k in cfg.knn]
        rows += [("noiseless truth (floor)", "truth")]
        for label, key in rows:
            entry = {}
            if f"{key}_chi2" in a:
                entry["chi2_median"] = float(np.median(a[f"{key}_chi2"]))
            if f"{key}_r2" in a:
                entry["r2_median"] = float(np.median(a[f"{key}_r2"]))
                entry["r2_p16"] = float(np.percentile(a[f"{key}_r2"], 16))
            if entry:
                spec[label] = entry
        out["spectrum_generation"] = spec
    return out


def render_report(m: dict[str, Any], plots: bool = True) -> str:
    lines = ["# Zero-shot prediction on held-out objects", "",
             f"Model `{m['model_dir']}`, tokenizers `{m['tokenizers_dir']}`; held-out data `{m['data']}`; "
             f"baselines trained on `{m['train_data']}` ({m['n_train_labelled']} labelled objects).", "",
             f"## Redshift ({m['n_heldout_with_redshift']} held-out objects with a spectroscopic redshift)", "",
             "| method | NMAD | outliers (>0.15) | bias | 68% coverage | 95% coverage | PIT max dev (sigma) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in m["redshift"].items():
        pit = r.get("pit", {}).get("max_deviation_sigma")
        lines.append(f"| {name} | {r['nmad']:.4f} | {r['outlier_fraction']:.3f} | {r['bias']:+.4f} | "
                     f"{r.get('coverage_68', float('nan')):.3f} | {r.get('coverage_95', float('nan')):.3f} | "
                     f"{'-' if pit is None else f'{pit:.1f}'} |")
    if "calibration" in m:
        fits = m["calibration"]["fits"]
        n = max(f["n"] for f in fits.values())
        temps = ", ".join(f"{k} T = {f['temperature']:.2f}" for k, f in fits.items())
        lines += ["", f"Temperature-calibrated rows: the coarse redshift logits divided by one temperature per "
                      f"input set ({temps}), fitted ({next(iter(fits.values()))['objective']} objective, "
                      f"aion.inference.calibration) on {n} labelled objects of "
                      f"`{m['calibration']['data']}` (neither pretraining nor held-out data). The other "
                      f"foundation-model rows use no label at all."]
    if "spectrum_generation" in m:
        s = m["spectrum_generation"]
        lines += ["", f"## Spectrum generated from photometry + images ({s['n']} held-out spectra)", "",
                  "| method | median reduced chi^2 vs observed | median R^2 vs noiseless truth |", "|---|---|---|"]
        for name, r in s.items():
            if name == "n":
                continue
            chi2 = f"{r['chi2_median']:.3f}" if "chi2_median" in r else "-"
            r2 = f"{r['r2_median']:.3f}" if "r2_median" in r else "-"
            lines.append(f"| {name} | {chi2} | {r2} |")
    if plots:
        lines += ["", "## Plots", "", "![redshift](redshift_pred_vs_true.png)", "", "![PIT](pit.png)", "",
                  "![PDFs](pdf_examples.png)", "", "![spectra](spectra_examples.png)"]
    lines += ["", f"Wall time {m['seconds']['total']:.0f} s (model {m['seconds']['model']:.0f} s, "
              f"baselines {m['seconds']['baselines']:.0f} s).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- files
def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


__all__ = ["GBMBaseline", "INPUT_SETS", "NeighbourSpectra", "ZeroShotConfig", "evaluate_zeroshot",
           "photometry_features", "pit_histogram", "redshift_metrics", "render_report", "spectrum_scores"]

"""Scalar tokenizers: one catalogue quantity per object -> one token, fitted, never trained.

A :class:`ScalarTokenizer` wraps a fitted binning (``aion.tokenizers.binning``) for one
scalar modality of the registry. Recipes (``tokenizers/scalars.yaml``, read into
:class:`ScalarRecipe`) say which modalities to fit, from which surveys, and how each is
binned; :func:`fit_scalar_tokenizers` streams the surveys' MMU files once and fits every
tokenizer from a bounded reservoir sample, so a survey need not fit in memory.

Absent values are normal: NaN values or ``ivar == 0`` encode to token 0 without error,
and the caller keeps ``batch.valid`` (``SurveyBatch.present(name)``) as the presence mask
next to the tokens; token 0 of an absent object means nothing.

:func:`quantization_report` measures what the tokens lose against what the data know:
RMS(decoded - value) compared with the field's median measurement error.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from aion import modalities as registry
from aion.config import from_dict, load_config
from aion.data.batches import ScalarBatch
from aion.data.mmu import SurveyShards, iter_mmu_hdf5
from aion.tokenizers.base import CONFIG_NAME, Tokenizer, check_recipe_kind, load_tokenizer, register_tokenizer
from aion.tokenizers.binning import (
    TRANSFORMS,
    Binning,
    ClipCounts,
    FitStats,
    LinearGridBinning,
    QuantileBinning,
    _inverse_np,
    binning_from_config,
    optimal_rms_error,
)

TARGET_RATIO = 0.1
"""Quantisation RMS error should stay below this fraction of the median measurement error."""


# ------------------------------------------------------------------------------ recipes
@dataclass(kw_only=True)
class BinningSpec:
    """How one modality is binned (a recipe entry; ``None`` fields take the recipe's value)."""

    kind: Literal["quantile", "linear"] = "quantile"
    n_bins: int | None = None
    """Defaults to the recipe's ``n_bins`` (the model's scalar vocabulary, 1024)."""
    transform: str = "none"
    """Quantile bins only: ``none`` | ``log`` | ``asinh`` | ``sqrt`` (see ``aion.tokenizers.binning``)."""
    scale: float = 1.0
    """Quantile bins only: where ``asinh`` / ``sqrt`` bend, in the modality's unit."""
    density_power: float = 1.0
    """Quantile bins only: 1 = equally populated bins (AION-1); 1/3 = minimum RMS error."""
    low: float | None = None
    """Linear grid only: lower end of the grid."""
    high: float | None = None
    """Linear grid only: upper end of the grid."""
    tail_margin: float = 0.0
    """Quantile bins only: widen the outer edges by this fraction of the fitted range (fewer clips)."""
    fine_bins: int = 0
    """> 0: a second token places the value inside its bin on this many equal sub-bins (in the
    transformed space). One 1024-level token cannot resolve photometry at a tenth of its noise
    over a range of thousands of sigma; two can. 0 = one token (AION-1)."""

    def __post_init__(self) -> None:
        if self.kind not in ("quantile", "linear"):
            raise ValueError(f"kind must be 'quantile' or 'linear', got {self.kind!r}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if int(self.fine_bins) < 0:
            raise ValueError(f"fine_bins must be >= 0, got {self.fine_bins}")
        if self.kind == "linear" and (self.low is None or self.high is None):
            raise ValueError("a linear grid needs both low and high")

    def build(self, n_bins: int, reservoir_size: int, seed: int) -> Binning:
        """An unfitted binning for this spec."""
        n = int(self.n_bins or n_bins)
        if self.kind == "linear":
            assert self.low is not None and self.high is not None
            return LinearGridBinning(self.low, self.high, n)
        return QuantileBinning(n, transform=self.transform, scale=self.scale,  # type: ignore[arg-type]
                               density_power=self.density_power, reservoir_size=reservoir_size, seed=seed,
                               tail_margin=self.tail_margin)


_BINNING_KEYS = {f.name for f in dataclasses.fields(BinningSpec)}


def _default_overrides() -> dict[str, dict[str, Any]]:
    """Built-in per-modality settings; ``tokenizers/scalars.yaml`` states the same explicitly."""
    return {
        "legacysurvey_flux_*": {"transform": "sqrt", "scale": 5.0, "density_power": 1 / 3},
        "hsc_mag_*": {"density_power": 1 / 3},
        "desi_z": {"kind": "linear", "low": 0.0, "high": 1.6},
        "sdss_z": {"kind": "linear", "low": 0.0, "high": 1.6},
        "provabgs_z": {"kind": "linear", "low": 0.0, "high": 1.6},
    }


@dataclass(kw_only=True)
class ScalarRecipe:
    """Which scalar modalities to fit from which surveys, and how to bin each."""

    kind: str = "scalar"
    """Which trainer the recipe is for (``aion tokenizer train`` dispatches on it)."""
    n_bins: int = 1024
    reservoir_size: int = 1_000_000
    """Values kept per modality for fitting (16 bytes each); more values are sampled, seeded."""
    seed: int = 0
    batch_size: int = 8192
    """Rows read per step while streaming the surveys."""
    surveys: tuple[str, ...] = ("legacysurvey", "hsc", "desi", "provabgs")
    modalities: tuple[str, ...] | None = None
    """Explicit list; ``None`` = every scalar modality of ``surveys`` found in the files."""
    default: BinningSpec = field(default_factory=BinningSpec)
    overrides: dict[str, dict[str, Any]] = field(default_factory=_default_overrides)
    """``{modality name or glob pattern: BinningSpec fields}``, applied in order (later wins)."""

    def __post_init__(self) -> None:
        check_recipe_kind(self.kind, "scalar")
        if int(self.n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}")
        for name in self.surveys:
            registry.survey(name)
        for name in self.modalities or ():
            _scalar_modality(name)
        for pattern, spec in self.overrides.items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"overrides[{pattern!r}]: expected a mapping of binning settings")
            unknown = sorted(set(spec) - _BINNING_KEYS)
            if unknown:
                raise ValueError(f"overrides[{pattern!r}]: unknown key(s) {unknown}; known: {sorted(_BINNING_KEYS)}")
        for name in self.targets():
            self.binning_for(name)  # every resolved spec must be valid

    def binning_for(self, modality: str) -> BinningSpec:
        """The default spec with every matching override applied in order."""
        merged = dataclasses.asdict(self.default)
        for pattern, spec in self.overrides.items():
            if fnmatch.fnmatchcase(modality, pattern):
                merged.update(spec)
        return from_dict(BinningSpec, merged, where=f"binning for {modality}")

    def targets(self) -> list[str]:
        """Modalities this recipe fits, in registry order."""
        if self.modalities is not None:
            return list(dict.fromkeys(self.modalities))
        return [n for s in self.surveys for n in registry.modalities(kind="scalar", survey=s)]


def load_scalar_recipe(recipe: ScalarRecipe | Mapping[str, Any] | str | os.PathLike | None = None) -> ScalarRecipe:
    """A recipe from a YAML path, a mapping, or ``None`` (built-in defaults)."""
    if recipe is None:
        return ScalarRecipe()
    return load_config(ScalarRecipe, dict(recipe) if isinstance(recipe, Mapping) else recipe, "scalar recipe")


# ------------------------------------------------------------------------------ tokenizer
def _scalar_modality(name: str) -> registry.Modality:
    scalars = sorted(registry.modalities(kind="scalar"))
    try:
        mod = registry.modality(name)
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; scalar modalities are: {', '.join(scalars)}") from None
    if mod.kind != "scalar":
        raise ValueError(f"modality {name!r} is a {mod.kind} modality; ScalarTokenizer handles only scalar "
                         f"modalities: {', '.join(scalars)}")
    return mod


@register_tokenizer
class ScalarTokenizer(Tokenizer):
    """One scalar modality <-> one token in ``[0, n_bins)`` (+ optionally a fine token).

    With ``fine_bins > 0`` a second token in ``[n_bins, n_bins + fine_bins)`` says where in
    its bin the value lies (equal sub-bins in the transformed space); decoding a coarse token
    alone (``(B, 1)`` tokens) still works and gives the bin's representative value.

    ``encode`` gives token 0 to absent values (NaN or ``ivar == 0``) and never raises on
    them: keep ``batch.valid`` as the presence mask. ``decode`` returns the bins'
    representative values (``ivar=None``: a token carries no uncertainty), NaN where an
    optional ``present`` mask is False. Out-of-range values take the edge bins and are
    counted in ``last_clip_counts``.
    """

    tokenizer_type = "scalar"

    def __init__(self, modality: str, binning: Binning | None = None, fine_bins: int = 0) -> None:
        self.modality = _scalar_modality(modality).name
        if binning is None:
            recipe = ScalarRecipe()
            binning = recipe.binning_for(self.modality).build(recipe.n_bins, recipe.reservoir_size, recipe.seed)
        if not isinstance(binning, QuantileBinning | LinearGridBinning):
            raise TypeError(f"binning must be a QuantileBinning or LinearGridBinning, got {type(binning).__name__}")
        self.binning = binning
        if int(fine_bins) < 0:
            raise ValueError(f"{self.modality}: fine_bins must be >= 0, got {fine_bins}")
        self.fine_bins = int(fine_bins)
        self.last_clip_counts = ClipCounts()

    # -- interface
    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.modality,)

    @property
    def num_tokens(self) -> int:
        return 2 if self.fine_bins else 1

    @property
    def vocab_size(self) -> int:
        return self.binning.n_bins + self.fine_bins

    @property
    def ordinal_ranges(self) -> tuple[tuple[int, int], ...]:
        n = self.binning.n_bins
        return ((0, n), (n, n + self.fine_bins)) if self.fine_bins else ((0, n),)

    @property
    def fitted(self) -> bool:
        return self.binning.fitted

    @property
    def fit_stats(self) -> FitStats | None:
        return self.binning.fit_stats

    def _check_batch(self, batch: ScalarBatch) -> None:
        if not isinstance(batch, ScalarBatch):
            raise TypeError(f"{self.modality}: expected a ScalarBatch, got {type(batch).__name__}")
        if batch.name != self.modality:
            raise ValueError(f"tokenizer for {self.modality!r} got a batch of {batch.name!r}")

    def encode(self, batch: ScalarBatch) -> torch.Tensor:
        """ScalarBatch -> LongTensor[B, num_tokens]; absent values get token 0 (+ fine token n_bins)."""
        self._check_batch(batch)
        valid = torch.from_numpy(batch.valid)
        tokens = torch.zeros(len(batch), self.num_tokens, dtype=torch.long)
        if self.fine_bins:
            tokens[:, 1] = self.binning.n_bins
        if bool(valid.any()):
            x = torch.from_numpy(batch.values)[valid]
            _, idx = self.binning.quantize(x)
            tokens[valid, 0] = idx
            if self.fine_bins:
                tokens[valid, 1] = self.binning.n_bins + self._fine_index(x, idx)
            self.last_clip_counts = self.binning.last_clip_counts
        else:
            self.binning._require_fitted()
            self.last_clip_counts = ClipCounts()
        return tokens

    def _bin_bounds(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformed-space edges (low, high) of bins ``idx`` (merged tie bins map to the last)."""
        edges = self.binning.edges
        assert edges is not None
        k = idx.long().clamp(max=edges.numel() - 2)
        return edges[k], edges[k + 1]

    def _fine_index(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bin_bounds(idx)
        width = hi - lo
        frac = torch.where(width > 0, (self.binning.transform_values(x) - lo) / torch.where(width > 0, width, 1.0),
                           torch.full_like(lo, 0.5))
        return (frac.clamp(0.0, 1.0) * self.fine_bins).long().clamp(max=self.fine_bins - 1)

    def decode(self, tokens: torch.Tensor, present: np.ndarray | None = None, **context: Any) -> ScalarBatch:
        """LongTensor[B, 1 or 2] (or [B]) -> ScalarBatch of values, NaN where ``present`` is False.

        A coarse token alone decodes to its bin's representative value; with the fine token,
        to the centre of its sub-bin.
        """
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 1:
            tokens = tokens[:, None]
        if tokens.ndim != 2 or tokens.shape[1] not in (1, self.num_tokens):
            raise ValueError(f"{self.modality}: expected tokens of shape (B,), (B, 1) or (B, {self.num_tokens}), "
                             f"got {tuple(tokens.shape)}")
        coarse = tokens[:, 0]
        values = self.binning.indices_to_codes(coarse).cpu().numpy()
        if tokens.shape[1] == 2:
            fine = tokens[:, 1].long() - self.binning.n_bins
            if fine.numel() and (int(fine.min()) < 0 or int(fine.max()) >= self.fine_bins):
                raise ValueError(f"{self.modality}: fine tokens must lie in [{self.binning.n_bins}, "
                                 f"{self.vocab_size}), got range [{int(tokens[:, 1].min())}, "
                                 f"{int(tokens[:, 1].max())}]")
            lo, hi = self._bin_bounds(coarse.cpu())
            u = lo + (fine.cpu().double() + 0.5) / self.fine_bins * (hi - lo)
            values = _inverse_np(u.numpy(), self.binning.transform, self.binning.scale)
        if present is not None:
            present = np.asarray(present, dtype=bool)
            if present.shape != values.shape:
                raise ValueError(f"{self.modality}: present mask shape {present.shape} != tokens {values.shape}")
            values = np.where(present, values, np.nan)
        return ScalarBatch(name=self.modality, values=values, ivar=None)

    # -- fitting
    def update(self, batch: ScalarBatch) -> None:
        """Stream a batch's valid values into the fit."""
        self._check_batch(batch)
        self.binning.update(batch.values[batch.valid])

    def finalize(self) -> FitStats:
        return self.binning.finalize()

    def fit(self, batch: ScalarBatch) -> ScalarTokenizer:
        self._check_batch(batch)
        self.binning.fit(batch.values[batch.valid])
        return self

    # -- persistence
    def get_config(self) -> dict[str, Any]:
        return {"modality": self.modality, "binning": self.binning.config(), "fine_bins": self.fine_bins}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScalarTokenizer:
        try:
            return cls(config["modality"], binning_from_config(config["binning"]), config.get("fine_bins", 0))
        except KeyError as err:
            raise ValueError(f"scalar tokenizer config lacks {err.args[0]!r}") from None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.binning.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.binning.load_state_tensors(tensors)

    def __repr__(self) -> str:
        cfg = self.binning.config()
        return f"ScalarTokenizer({self.modality!r}, {cfg})"


# ------------------------------------------------------------------------------ fitting over surveys
def fit_scalar_tokenizers(data_root: str | os.PathLike,
                          recipe: ScalarRecipe | Mapping[str, Any] | str | os.PathLike | None = None,
                          ) -> dict[str, ScalarTokenizer]:
    """Fit one tokenizer per scalar modality of the recipe, streaming each survey once.

    A modality listed explicitly must be present with valid values; with
    ``modalities: null`` modalities whose column is missing from a survey's files are
    skipped with a warning. Linear grids need no data but still count the training values
    per bin and out of the grid (``fit_stats``).
    """
    rec = load_scalar_recipe(recipe)
    targets = rec.targets()
    explicit = rec.modalities is not None
    by_survey: dict[str, list[str]] = {}
    for name in targets:
        by_survey.setdefault(registry.modality(name).survey, []).append(name)
    missing_surveys = sorted(set(by_survey) - set(rec.surveys))
    if missing_surveys:
        raise ValueError(f"recipe lists modalities of surveys {missing_surveys} not in its surveys {list(rec.surveys)}")
    toks: dict[str, ScalarTokenizer] = {}
    for survey, names in by_survey.items():
        available = set(SurveyShards(data_root, survey).columns)
        use = [n for n in names if registry.modality(n).fields[0] in available]
        absent = [n for n in names if n not in use]
        if absent and explicit:
            raise ValueError(f"{absent[0]}: column {registry.modality(absent[0]).fields[0]!r} not found in "
                             f"{survey} files under {data_root}")
        if absent:
            warnings.warn(f"{survey} files under {data_root} lack the columns of {', '.join(absent)}; "
                          "no tokenizers fitted for them", stacklevel=2)
        if not use:
            continue
        columns = []
        for name in use:
            mod = registry.modality(name)
            columns.append(mod.fields[0])
            if mod.error_field is not None and mod.error_field in available:
                columns.append(mod.error_field)
        for name in use:
            spec = rec.binning_for(name)
            toks[name] = ScalarTokenizer(name, spec.build(rec.n_bins, rec.reservoir_size, rec.seed),
                                         fine_bins=spec.fine_bins)
        for batch in iter_mmu_hdf5(data_root, survey, batch_size=rec.batch_size, columns=list(dict.fromkeys(columns))):
            for name in use:
                sb = batch.modalities.get(name)
                if isinstance(sb, ScalarBatch):
                    toks[name].update(sb)
        for name in use:
            try:
                toks[name].finalize()
            except ValueError as err:
                raise ValueError(f"{name}: {err} in {survey} files under {data_root}") from None
    return {name: toks[name] for name in targets if name in toks}


def save_scalar_tokenizers(toks: Mapping[str, ScalarTokenizer], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``out_dir/<modality>/{config.json, model.safetensors}`` for each tokenizer."""
    out = Path(out_dir)
    paths = {}
    for name, tok in toks.items():
        if name != tok.modality:
            raise ValueError(f"key {name!r} holds the tokenizer of {tok.modality!r}")
        paths[name] = tok.save_pretrained(out / name)
    return paths


def load_scalar_tokenizers(directory: str | os.PathLike) -> dict[str, ScalarTokenizer]:
    """Every scalar tokenizer saved under ``directory`` by :func:`save_scalar_tokenizers`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory of scalar tokenizers")
    toks = {}
    for sub in sorted(p for p in directory.iterdir() if (p / CONFIG_NAME).is_file()):
        if json.loads((sub / CONFIG_NAME).read_text()).get("tokenizer_type") != ScalarTokenizer.tokenizer_type:
            continue
        tok = load_tokenizer(sub)
        assert isinstance(tok, ScalarTokenizer)
        toks[tok.modality] = tok
    return toks


# ------------------------------------------------------------------------------ metrics
def read_scalar_batches(root: str | os.PathLike, names: list[str], max_objects: int | None = None,
                        ) -> dict[str, ScalarBatch]:
    """Every row (or the first ``max_objects`` per survey) of the given scalar modalities, one batch each."""
    by_survey: dict[str, list[str]] = {}
    for name in names:
        by_survey.setdefault(registry.modality(name).survey, []).append(name)
    out: dict[str, ScalarBatch] = {}
    for survey, mods in by_survey.items():
        if not (Path(root) / survey).is_dir():
            continue
        parts: dict[str, list[ScalarBatch]] = {m: [] for m in mods}
        n = 0
        for batch in iter_mmu_hdf5(root, survey, batch_size=8192):
            for m in mods:
                sb = batch.modalities.get(m)
                if isinstance(sb, ScalarBatch):
                    parts[m].append(sb)
            n += len(batch)
            if max_objects is not None and n >= max_objects:
                break
        for m, pieces in parts.items():
            if pieces:
                ivar = None if pieces[0].ivar is None else np.concatenate([p.ivar for p in pieces])[:max_objects]
                out[m] = ScalarBatch(name=m, values=np.concatenate([p.values for p in pieces])[:max_objects],
                                     ivar=ivar)
    return out


def evaluate_scalar_tokenizers(directory: str | os.PathLike, data_dir: str | os.PathLike,
                               out_dir: str | os.PathLike, max_objects: int | None = None) -> dict[str, Any]:
    """:func:`quantization_report` of every saved scalar tokenizer on (held-out) data.

    Writes ``out_dir/metrics.json`` and ``out_dir/quantization.txt`` (the table).
    """
    toks = load_scalar_tokenizers(directory)
    if not toks:
        raise FileNotFoundError(f"{directory}: no saved scalar tokenizers")
    data = read_scalar_batches(data_dir, sorted(toks), max_objects)
    reports = [quantization_report(toks[name], data[name]) for name in sorted(toks) if name in data]
    if not reports:
        raise ValueError(f"{data_dir}: none of the tokenizers' modalities {sorted(toks)} are in the data")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"tokenizer_dir": str(directory), "data_dir": str(data_dir), "target_ratio": TARGET_RATIO,
               "missing_in_data": sorted(set(toks) - set(data)),
               "reports": {r["modality"]: r for r in reports}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "quantization.txt").write_text(format_report_table(reports) + "\n")
    return metrics


def quantization_report(tokenizer: ScalarTokenizer, batch: ScalarBatch) -> dict[str, Any]:
    """What encode -> decode loses on ``batch``, against the data's own measurement error.

    Over valid values: ``rms_error`` = RMS(decoded - value); ``median_sigma`` = median of
    ``1/sqrt(ivar)`` (the reader turns sigma columns into ivar); ``ratio`` = their quotient
    (target: below ``TARGET_RATIO``); ``rms_over_sigma`` = RMS of the error in units of each
    object's own sigma; ``optimal_ratio`` = the same ratio for the best any
    quantizer with as many levels (``n_bins`` x ``fine_bins``) could do on these values (:func:`optimal_rms_error`);
    ``rms_error_in_range`` leaves out values beyond the fitted range, which are counted in
    ``clipped_below`` / ``clipped_above``; ``token_bits`` is the entropy of the tokens used
    (10 bits = all 1024 equally often). Sigma-based entries are None for fields without an
    error column.
    """
    tokens = tokenizer.encode(batch)
    clips = tokenizer.last_clip_counts
    valid = batch.valid
    x = batch.values[valid]
    decoded = tokenizer.decode(tokens).values[valid]
    d = decoded - x
    edges = tokenizer.binning.edges_physical().numpy()
    in_range = (x >= edges[0]) & (x <= edges[-1])

    def rms(a: np.ndarray) -> float | None:
        return float(np.sqrt(np.mean(a * a))) if a.size else None

    report: dict[str, Any] = {
        "modality": tokenizer.modality,
        "binning": _describe(tokenizer.binning) + (f" +{tokenizer.fine_bins} fine" if tokenizer.fine_bins else ""),
        "n": len(batch),
        "n_valid": int(valid.sum()), "rms_error": rms(d), "rms_error_in_range": rms(d[in_range]),
        "value_std": float(np.std(x)) if x.size else None,
        "median_sigma": None, "ratio": None, "rms_over_sigma": None, "optimal_ratio": None, "passes": None,
        "clipped_below": clips.below, "clipped_above": clips.above,
        "token_bits": _entropy_bits(tokens[:, 0][torch.from_numpy(valid)]),
    }
    if batch.ivar is not None and x.size:
        sigma = 1.0 / np.sqrt(batch.ivar[valid])
        levels = tokenizer.binning.n_bins * max(1, tokenizer.fine_bins)
        med = float(np.median(sigma))
        ratio = report["rms_error"] / med
        report.update(median_sigma=med, ratio=ratio, rms_over_sigma=rms(d / sigma),
                      optimal_ratio=optimal_rms_error(x, levels) / med,
                      passes=bool(ratio < TARGET_RATIO))
    return report


def _entropy_bits(tokens: torch.Tensor) -> float | None:
    if tokens.numel() == 0:
        return None
    p = torch.bincount(tokens.reshape(-1)).double()
    p = p[p > 0] / p.sum()
    return float(-(p * torch.log2(p)).sum())


def _describe(binning: Binning) -> str:
    if isinstance(binning, LinearGridBinning):
        return f"linear[{binning.low:g},{binning.high:g}]"
    desc = "quantile"
    if binning.transform != "none":
        desc += f" {binning.transform}({binning.scale:g})"
    if binning.density_power != 1.0:
        desc += f" p^{binning.density_power:.2g}"
    return desc


def format_report_table(reports: list[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`quantization_report` results."""
    def f(v: Any, spec: str = ".3g") -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else format(v, spec)
        return str(v)

    head = ("modality", "binning", "n_valid", "rms_err", "med_sigma", "ratio", "optimal", "rms/sigma_i",
            "clip_lo", "clip_hi", "bits", "<0.1?")
    rows = [head] + [
        (r["modality"], r["binning"], f(r["n_valid"]), f(r["rms_error"]), f(r["median_sigma"]), f(r["ratio"]),
         f(r["optimal_ratio"]), f(r["rms_over_sigma"]), f(r["clipped_below"]), f(r["clipped_above"]),
         f(r["token_bits"], ".2f"), f(r["passes"]))
        for r in reports
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)

"""Inference on a pretrained :class:`~aion.model.FourM`: tokenize, embed, predict scalars, generate.

:class:`AionModel` bundles the network with the tokenizer of every modality it was trained on
and speaks in typed batches and tokens; nothing here trains. Token-level methods take
``tokens`` (``{modality: (B, num_tokens) ints}``) and ``present`` (``{modality: (B,) bool}``,
as from :meth:`AionModel.tokenize`) and build the packed batches of
:mod:`aion.training.masking` themselves, so the model sees inference inputs exactly as it saw
training inputs.

Rules shared by every method (they are what makes the outputs trustworthy):

- **Order and absence do not matter.** Inputs are packed in the model's (sorted) modality
  order whatever order the dict has, and an absent modality contributes no token at all, so
  adding one changes nothing, bit for bit. An object's outputs do not depend on the other
  objects of its batch (the model masks padding).
- **What is read.** Every present token of every model modality is an input, except the
  target of a prediction (never read while it is being predicted) and ``never_input``
  modalities (default: the registry's ``label`` modalities such as PROVABGS, which the
  masking sampler never makes inputs in training, so their input embeddings are untrained).
  ``tokens_used`` / ``tokens_available`` in every result say what was read per object.
- **Input budget.** The encoder was trained on at most ``input_budget`` inputs per object (256
  in AION-1); an exported model does not record it, so pass it as ``max_inputs`` (per call or
  to the constructor; None = no limit). An object with more tokens is never silently cut:
  ``budget="error"`` raises, ``budget="subsample"`` (default) reads a deterministic subset
  (:func:`select_inputs`: the budget is shared equally between the object's modalities, a
  modality smaller than its share keeping all its tokens, so single-token scalars are not
  dropped in favour of a 576-token image while the budget has a slot per modality; positions
  within a modality come from a fixed permutation seeded by ``(subset_seed, modality)``, the same
  for every object and call), reports the counts in ``tokens_used`` and logs a warning.
- **Per-object errors.** An object that cannot be processed (a present modality the model does
  not know, token ids out of range, no input token left, a target the model does not have) gets
  a message in ``result.errors[index]`` and NaN / empty outputs; the other objects are computed
  as usual. Mistakes of the call itself (inconsistent shapes, an unknown ``pooling``) raise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from aion import modalities as registry
from aion.data.batches import ImageBatch, ScalarBatch, SpectrumBatch
from aion.model.fourm import FourM
from aion.tokenizers.base import Tokenizer
from aion.tokenizers.binning import _forward_np, _inverse_np
from aion.tokenizers.image import ImageTokenizer
from aion.tokenizers.scalar import ScalarTokenizer
from aion.tokenizers.spectrum import SpectrumTokenizer
from aion.training.masking import MaskedSample, collate, split_budget, to_device

log = logging.getLogger(__name__)

TokenDict = Mapping[str, Tensor | np.ndarray]
"""``{modality: (B, num_tokens) integer token ids}``."""
PresenceDict = Mapping[str, Tensor | np.ndarray] | None
"""``{modality: (B,) bool}``; a modality missing here (or ``None`` for all) is present for every object."""
Budget = Literal["subsample", "error"]


class Tokenized(NamedTuple):
    """What :meth:`AionModel.tokenize` returns; unpacks as ``tokens, present``."""

    tokens: dict[str, Tensor]
    """``{modality: LongTensor (B, num_tokens)}``; rows of absent objects are zeros (meaningless)."""
    present: dict[str, Tensor]
    """``{modality: BoolTensor (B,)}``."""


# ---------------------------------------------------------------------------- results
@dataclass
class EmbeddingResult:
    """Encoder outputs of :meth:`AionModel.embed` (float32, CPU).

    Which vector to use: ``mean`` (``pooling="mean"``) is one ``dim``-vector per object for
    similarity search, clustering and linear / kNN probes over objects that share their
    modalities. ``per_modality`` flattened with ``modality_present`` (``pooling="per_modality_mean"``)
    keeps what each modality contributed apart and says which ones the object had: use it when
    objects differ in what was observed (a probe can then learn not to confuse "no spectrum"
    with "a spectrum like this"). Attention pooling needs a trained query (the attentive probe of
    the evaluation code); an untrained one is no better than the mean.
    """

    modalities: tuple[str, ...]
    """The model's modality order: indexes ``token_modality`` and the second axis of ``per_modality``."""
    token_embeddings: Tensor | None
    """(B, N, dim) encoder output per input token (final norm applied); zeros at padding and for
    objects in ``errors``. None for ``return_tokens=False`` (as are the next three)."""
    token_mask: Tensor | None
    """(B, N) True for real tokens."""
    token_modality: Tensor | None
    """(B, N) index into ``modalities`` (0 at padding)."""
    token_position: Tensor | None
    """(B, N) token position within its modality (0 at padding)."""
    mean: Tensor
    """(B, dim) mean over the object's input tokens; NaN for objects in ``errors``."""
    per_modality: Tensor
    """(B, M, dim) mean over each modality's input tokens; zeros where the modality was not read,
    NaN for objects in ``errors``."""
    modality_present: Tensor
    """(B, M) True where the modality contributed at least one token."""
    pooled: Tensor
    """The vector asked for by ``pooling``: ``mean`` (B, dim) or, for ``per_modality_mean``,
    ``per_modality`` flattened followed by ``modality_present`` as 0/1, (B, M * dim + M)."""
    pooling: str
    tokens_used: dict[str, np.ndarray]
    """{modality: (B,) tokens read}; less than ``tokens_available`` where the budget subsampled."""
    tokens_available: dict[str, np.ndarray]
    """{modality: (B,) tokens present and eligible as inputs}."""
    subsampled: np.ndarray
    """(B,) True where the input budget made the model read a subset."""
    errors: dict[int, str]


@dataclass
class ScalarEstimates:
    """Point estimates and central intervals in physical units, one value per object (NaN on error)."""

    mean: np.ndarray
    median: np.ndarray
    mode: np.ndarray
    p16: np.ndarray
    p84: np.ndarray
    p2_5: np.ndarray
    p97_5: np.ndarray


@dataclass
class ScalarPrediction:
    """Zero-shot posterior of a scalar (:meth:`AionModel.predict_scalar`).

    The PDF is a histogram: object ``b`` has probability ``probs[b, k]`` in ``[edges[k],
    edges[k+1])`` (physical units, the tokenizer's effective bins). Quantiles interpolate the
    CDF linearly inside a bin in the tokenizer's transformed space (where its bins were laid
    out); ``mean`` uses the bins' representative values (training medians), ``mode`` is the
    representative value of the most probable bin. ``refined`` (tokenizers with fine bins):
    the same estimates after the fine token's distribution inside the most probable bin (see
    :meth:`AionModel.predict_scalar` for how it is conditioned) replaces the flat one there.
    """

    modality: str
    edges: np.ndarray
    """(K + 1,) bin edges in physical units (shared by all objects)."""
    probs: np.ndarray
    """(B, K) probability per bin (rows sum to 1); NaN for objects in ``errors``."""
    estimates: ScalarEstimates
    refined: ScalarEstimates | None
    fine_probs: np.ndarray | None
    """(B, fine_bins) distribution of the fine token inside the most probable bin, or None."""
    coarse_token: np.ndarray
    """(B,) most probable coarse token (-1 on error)."""
    tokens_used: dict[str, np.ndarray]
    tokens_available: dict[str, np.ndarray]
    subsampled: np.ndarray
    errors: dict[int, str]
    edges_transformed: np.ndarray | None = None
    """(K + 1,) the same edges in the tokenizer's transformed space (None if the target is unknown)."""
    transform: tuple[str, float] = ("none", 1.0)
    """The tokenizer's (transform, scale)."""
    centers: np.ndarray | None = None
    """(K,) the bins' representative values in physical units (what ``mean`` and ``mode`` use)."""
    temperature: float = 1.0
    """The temperature the coarse probabilities were divided by (:meth:`tempered`); 1 as predicted."""

    # Convenience views of the coarse estimates.
    @property
    def mean(self) -> np.ndarray:
        return self.estimates.mean

    @property
    def median(self) -> np.ndarray:
        return self.estimates.median

    @property
    def mode(self) -> np.ndarray:
        return self.estimates.mode

    def quantile(self, q: float) -> np.ndarray:
        """Any quantile (0 < q < 1) of the coarse PDF, physical units."""
        if self.edges_transformed is None:
            return np.full(self.probs.shape[0], np.nan)
        return _inverse_np(_quantiles(self.probs, self.edges_transformed, [q])[0], *self.transform)

    def cdf(self, values: np.ndarray, refined: bool = True) -> np.ndarray:
        """P(X <= value) per object, (B,): the probability integral transform of e.g. the truth.

        Linear inside a bin in the tokenizer's transformed space, as the quantiles are, so
        ``cdf(quantile(q)) == q``. ``refined`` uses the fine-token histogram where there is one.
        NaN for objects in ``errors``.
        """
        values = np.asarray(values, dtype=np.float64)
        if self.edges_transformed is None:
            return np.full(self.probs.shape[0], np.nan)
        u = _forward_np(values, *self.transform)
        if refined and self.fine_probs is not None:
            probs, edges = _refined_histogram(self.probs, self.fine_probs, self.coarse_token, self.edges_transformed)
        else:
            probs, edges = self.probs, self.edges_transformed
        return _cdf(probs, edges, u)

    def tempered(self, temperature: float) -> ScalarPrediction:
        """The same posterior with the coarse logits divided by ``temperature`` (``probs ** (1 / T)``,
        renormalised): T > 1 widens, T < 1 sharpens. The most probable bin does not move, so the modes
        and the fine-token distribution inside that bin are kept. Fit T on labelled objects with
        :func:`aion.inference.calibration.fit_temperature`; tempering twice multiplies the temperatures."""
        t = float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        if self.centers is None or self.edges_transformed is None:
            raise ValueError(f"{self.modality}: this prediction has no bins to temper (see its errors)")
        probs = temper_probs(self.probs, t)
        est = _estimates(probs, self.edges_transformed, self.centers, self.transform, self.coarse_token)
        refined = None
        if self.refined is not None and self.fine_probs is not None:
            refined = _refined_estimates(None, probs, self.fine_probs, self.coarse_token, self.edges_transformed,
                                         self.centers, self.transform, mode=self.refined.mode)
        return dataclasses.replace(self, probs=probs, estimates=est, refined=refined,
                                   temperature=self.temperature * t)

    def log_prob_of(self, values: np.ndarray) -> np.ndarray:
        """log of the probability of the bin containing each value (e.g. the truth), (B,)."""
        k = np.clip(np.searchsorted(self.edges, np.asarray(values, dtype=float), side="right") - 1,
                    0, self.probs.shape[1] - 1)
        with np.errstate(divide="ignore"):
            return np.log(self.probs[np.arange(len(k)), k])


@dataclass
class GenerationResult:
    """Tokens of a target modality generated by :meth:`AionModel.generate`."""

    modality: str
    tokens: Tensor
    """(num_samples, B, num_tokens) generated ids; -1 for objects in ``errors``."""
    decoded: list[Any] | None
    """One typed batch per sample (``tokenizer.decode``) if asked; rows of objects in ``errors``
    were decoded from filler tokens and are meaningless (NaN for scalars)."""
    schedule: list[int]
    """Positions revealed at each step."""
    tokens_used: dict[str, np.ndarray]
    """Conditioning tokens read per modality (the generated ones come on top)."""
    tokens_available: dict[str, np.ndarray]
    subsampled: np.ndarray
    errors: dict[int, str]


# ---------------------------------------------------------------------------- helpers
def temper_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rows of ``probs`` raised to ``1 / temperature`` and renormalised (the softmax of logits / T),
    in log space; rows with NaN (objects in error) stay NaN, zero-probability bins stay zero."""
    probs = np.asarray(probs, dtype=np.float64)
    out = np.full(probs.shape, np.nan)
    ok = np.isfinite(probs).all(axis=1) if probs.ndim == 2 and probs.shape[1] else np.zeros(len(probs), bool)
    if ok.any():
        with np.errstate(divide="ignore"):
            logp = np.log(probs[ok]) / float(temperature)
        logp -= logp.max(axis=1, keepdims=True)
        e = np.exp(logp)
        out[ok] = e / e.sum(axis=1, keepdims=True)
    return out


def select_inputs(available: Mapping[str, int], limit: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Positions to read per modality when at most ``limit`` tokens fit (all of them if they fit).

    The limit is split equally between the modalities (:func:`~aion.training.masking.split_budget`
    with equal weights: a modality needing less than its share keeps everything and the rest is
    shared by the others), in sorted name order so the split does not depend on dict order.
    Within a modality the first ``count`` entries of a permutation seeded by ``(seed, name)``
    are read: the same subset for every object, and a larger limit reads a superset.
    """
    names = sorted(n for n, size in available.items() if size > 0)
    sizes = np.array([available[n] for n in names], dtype=np.int64)
    if limit is None or sizes.sum() <= limit:
        return {n: np.arange(available[n], dtype=np.int64) for n in names}
    counts = split_budget(max(int(limit), 0), np.ones(len(names)), sizes)
    out = {}
    for name, size, count in zip(names, sizes, counts, strict=True):
        if count:
            rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
            out[name] = np.sort(rng.permutation(int(size))[: int(count)]).astype(np.int64)
    return out


def allowed_token_mask(tok: Tokenizer, num_tokens: int, vocab_size: int) -> Tensor:
    """(num_tokens, vocab_size) bool: ids ``tok`` can emit at each position, so that generation
    never draws a token its tokenizer would refuse to decode.

    Scalars: coarse ids below the number of effective bins at position 0, fine ids at position 1;
    spectra and images with amplitude tokens: the amplitude id range on the amplitude positions
    (1 for spectra; ``config.n_prefix`` for images), codes elsewhere; anything else: every id.
    """
    allowed = torch.ones(num_tokens, vocab_size, dtype=torch.bool)
    if isinstance(tok, ScalarTokenizer):
        allowed[0, tok.binning.n_effective_bins:] = False
        if tok.fine_bins:
            allowed[1, : tok.binning.n_bins] = False
        return allowed
    prefix = 0
    if isinstance(tok, SpectrumTokenizer):
        prefix = 1
    elif isinstance(tok, ImageTokenizer):
        prefix = tok.config.n_prefix
    if prefix:
        k = int(tok.codebook_size)
        allowed[:prefix, :k] = False
        allowed[prefix:, k:] = False
    return allowed


def mask_schedule(n: int, steps: int, schedule: Literal["cosine", "linear"] = "cosine") -> list[int]:
    """How many of ``n`` unknown positions each generation step reveals (MaskGIT).

    After step ``s`` of ``S = min(steps, n)`` a fraction ``cos(pi/2 (s+1)/S)`` (cosine) or
    ``1 - (s+1)/S`` (linear) stays unknown: few tokens are committed while little is known,
    many at the end. Every step reveals at least one and the last reveals the rest.
    """
    if schedule not in ("cosine", "linear"):
        raise ValueError(f"schedule: expected 'cosine' or 'linear', got {schedule!r}")
    if n < 1 or steps < 1:
        raise ValueError(f"need n >= 1 positions and steps >= 1, got n={n}, steps={steps}")
    total = min(int(steps), int(n))
    remaining, out = int(n), []
    for s in range(total):
        r = (s + 1) / total
        frac = math.cos(math.pi / 2 * r) if schedule == "cosine" else 1.0 - r
        left = 0 if s == total - 1 else int(math.floor(n * frac + 1e-9))
        left = max(min(left, remaining - 1), total - 1 - s)
        out.append(remaining - left)
        remaining = left
    return out


def _quantiles(probs: np.ndarray, edges: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """(len(qs), B) quantiles of histograms ``probs`` (B, K) on ``edges`` ((K+1,) or (B, K+1)), the
    CDF linear inside each bin (in whatever space ``edges`` are given). NaN rows give NaN."""
    b, k = probs.shape
    edges = np.broadcast_to(edges, (b, k + 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = probs / probs.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p, axis=1)
    bad = ~np.isfinite(cdf[:, -1])
    rows = np.arange(b)
    out = np.empty((len(qs), b))
    for i, q in enumerate(qs):
        idx = np.minimum((cdf < q).sum(axis=1), k - 1)  # first bin whose CDF reaches q
        below = np.where(idx > 0, cdf[rows, np.maximum(idx - 1, 0)], 0.0)
        mass = p[rows, idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(mass > 0, (q - below) / mass, 0.5)
        lo, hi = edges[rows, idx], edges[rows, idx + 1]
        out[i] = lo + np.clip(frac, 0.0, 1.0) * (hi - lo)
        out[i][bad] = np.nan
    return out


def _cdf(probs: np.ndarray, edges: np.ndarray, u: np.ndarray) -> np.ndarray:
    """(B,) CDF of histograms ``probs`` (B, K) on ``edges`` ((K+1,) or (B, K+1)) at ``u`` (B,),
    linear inside each bin; 0 below the first edge, 1 above the last, NaN for NaN rows."""
    b, k = probs.shape
    edges = np.broadcast_to(edges, (b, k + 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = probs / probs.sum(axis=1, keepdims=True)
    rows = np.arange(b)
    idx = np.clip((edges[:, 1:] <= u[:, None]).sum(axis=1), 0, k - 1)  # bin holding u
    below = np.concatenate([np.zeros((b, 1)), np.cumsum(p, axis=1)], axis=1)[rows, idx]
    lo, hi = edges[rows, idx], edges[rows, idx + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.clip(np.where(hi > lo, (u - lo) / (hi - lo), 1.0), 0.0, 1.0)
    out = below + frac * p[rows, idx]
    out = np.where(u < edges[:, 0], 0.0, np.where(u >= edges[:, -1], 1.0, out))
    out[~np.isfinite(p.sum(axis=1)) | ~np.isfinite(u)] = np.nan
    return np.clip(out, 0.0, 1.0)


def _join(errors: dict[int, str], b: int, message: str) -> None:
    errors[b] = f"{errors[b]}; {message}" if b in errors else message


@dataclass
class _Inputs:
    """Validated tokens of the known modalities plus what each object will read."""

    n: int
    tokens: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    errors: dict[int, str]
    read: list[dict[str, np.ndarray]]
    """Per object: positions read per modality (empty for objects in ``errors``)."""
    used: dict[str, np.ndarray]
    available: dict[str, np.ndarray]
    subsampled: np.ndarray

    def ok(self) -> list[int]:
        return [b for b in range(self.n) if b not in self.errors]


# ---------------------------------------------------------------------------- the model
class AionModel:
    """A :class:`FourM` with its tokenizers; see the module docstring for the shared rules.

    ``max_inputs``: default encoder budget (None = no limit; AION-1 trained with 256).
    ``never_input``: modalities never read as inputs (None = the registry's ``label`` ones).
    ``chunk_size``: objects per forward pass. ``subset_seed``: seed of :func:`select_inputs`.
    """

    def __init__(self, model: FourM, tokenizers: Mapping[str, Tokenizer], *, max_inputs: int | None = None,
                 never_input: Sequence[str] | None = None, chunk_size: int = 256, subset_seed: int = 0):
        self.model = model.eval()
        self.names: tuple[str, ...] = model.names
        for name in self.names:
            spec = model.cfg.modalities[name]
            tok = tokenizers.get(name)
            if tok is None:
                raise ValueError(f"modality {name!r}: the model has it but no tokenizer was given for it "
                                 f"(tokenizers: {sorted(tokenizers)})")
            if (tok.num_tokens, tok.vocab_size) != (spec.num_tokens, spec.vocab_size):
                raise ValueError(f"modality {name!r}: the model expects num_tokens={spec.num_tokens}, "
                                 f"vocab_size={spec.vocab_size} but its tokenizer ({type(tok).__name__}) gives "
                                 f"num_tokens={tok.num_tokens}, vocab_size={tok.vocab_size}: not the tokenizer "
                                 "the model was trained with")
        self.tokenizers: dict[str, Tokenizer] = {n: tokenizers[n] for n in self.names}
        if max_inputs is not None and int(max_inputs) < 1:
            raise ValueError(f"max_inputs: expected >= 1 or None, got {max_inputs}")
        self.max_inputs = None if max_inputs is None else int(max_inputs)
        labels = registry.modalities(role="label") if never_input is None else never_input
        self.never_input = frozenset(n for n in labels if n in model.index)
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.subset_seed = int(subset_seed)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, tokenizers_dir: str | os.PathLike,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> AionModel:
        """Model from an :func:`~aion.training.checkpoint.export_model` folder, tokenizers from a folder
        of saved tokenizers (any depth, :func:`~aion.tokenizers.pretokenize.load_tokenizer_set`);
        a missing or mismatched tokenizer is an error naming the modality."""
        from aion.tokenizers.pretokenize import load_tokenizer_set
        from aion.training.checkpoint import load_pretrained

        model = load_pretrained(model_dir, map_location=device).to(dtype=dtype)
        tokenizers = load_tokenizer_set(tokenizers_dir)
        for tok in {id(t): t for t in tokenizers.values()}.values():
            if hasattr(tok, "to"):
                tok.to(device)
        return cls(model, tokenizers, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.enc_pos_emb.device

    # ------------------------------------------------------------------ tokenize
    @torch.no_grad()
    def tokenize(self, objects: Mapping[str, ImageBatch | SpectrumBatch | ScalarBatch],
                 errors: dict[int, str] | None = None) -> Tokenized:
        """Typed batches (one per modality, the same B objects each) -> tokens and presence.

        Presence comes from the batch (an image with no usable pixel, a spectrum with no valid
        pixel, a NaN or zero-ivar scalar); only present objects are encoded. A modality its
        tokenizer rejects (e.g. image bands it was not trained on) raises ``ValueError``, unless
        an ``errors`` dict is given: then that modality is marked absent and every object that had
        it gets a message there (callers should treat those objects as failed, not silently use
        the remaining modalities).
        """
        tokens, present, n = {}, {}, None
        for name in sorted(objects):
            batch = objects[name]
            if name not in self.tokenizers:
                raise ValueError(f"no tokenizer for modality {name!r}: this model reads {list(self.names)}")
            if n is None:
                n = len(batch)
            elif len(batch) != n:
                raise ValueError(f"modality {name!r}: {len(batch)} objects, the other modalities have {n}")
            tok = self.tokenizers[name]
            if isinstance(batch, ImageBatch):
                mask = batch.band_present.any(axis=1)
            elif isinstance(batch, SpectrumBatch):
                mask = batch.present
            elif isinstance(batch, ScalarBatch):
                mask = batch.valid
            else:
                raise TypeError(f"modality {name!r}: expected an ImageBatch, SpectrumBatch or ScalarBatch, "
                                f"got {type(batch).__name__}")
            out = torch.zeros(len(batch), tok.num_tokens, dtype=torch.long)
            if mask.any():
                idx = np.nonzero(mask)[0]
                try:
                    out[torch.from_numpy(idx)] = torch.as_tensor(tok.encode(batch.select(idx))).long().cpu()
                except ValueError as err:
                    if errors is None:
                        raise ValueError(f"modality {name!r}: {err}") from err
                    for b in idx:
                        _join(errors, int(b), f"modality {name!r} could not be tokenized: {err}")
                    mask = np.zeros(len(batch), dtype=bool)
            tokens[name], present[name] = out, torch.from_numpy(np.asarray(mask, dtype=bool))
        return Tokenized(tokens, present)

    # ------------------------------------------------------------------ shared input handling
    def _inputs(self, tokens: TokenDict, present: PresenceDict, exclude: frozenset[str],
                max_inputs: int | None, reserve: int, budget: Budget) -> _Inputs:
        """Validate, report per-object problems, and choose what each object reads (see module doc)."""
        if budget not in ("subsample", "error"):
            raise ValueError(f"budget: expected 'subsample' or 'error', got {budget!r}")
        present = dict(present or {})
        extra = [k for k in present if k not in tokens and bool(np.asarray(_np(present[k])).any())]
        if extra:
            raise ValueError(f"modalities {extra} are marked present but have no tokens")
        arrays: dict[str, np.ndarray] = {}
        n = None
        for name in sorted(tokens):
            t = _np(tokens[name])
            if t.ndim != 2:
                raise ValueError(f"tokens[{name!r}]: expected shape (B, num_tokens), got {t.shape}")
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                raise ValueError(f"tokens[{name!r}] has {t.shape[0]} objects, other modalities have {n}")
            arrays[name] = t
        if n is None:
            raise ValueError("no tokens given")
        masks: dict[str, np.ndarray] = {}
        for name in arrays:
            p = np.ones(n, dtype=bool) if name not in present else np.asarray(_np(present[name]), dtype=bool)
            if p.shape != (n,):
                raise ValueError(f"present[{name!r}]: expected shape ({n},), got {p.shape}")
            masks[name] = p
        errors: dict[int, str] = {}
        known_tokens, known_present = {}, {}
        for name, t in arrays.items():
            p = masks[name]
            if name not in self.model.index:
                for b in np.nonzero(p)[0]:
                    _join(errors, int(b), f"modality {name!r} is not in this model (it reads {list(self.names)})")
                continue
            spec = self.model.cfg.modalities[name]
            if t.shape[1] != spec.num_tokens:
                raise ValueError(f"tokens[{name!r}]: expected {spec.num_tokens} tokens per object, got {t.shape[1]}")
            if not np.issubdtype(t.dtype, np.integer):
                raise ValueError(f"tokens[{name!r}]: expected integer token ids, got {t.dtype}")
            bad = p & ((t < 0) | (t >= spec.vocab_size)).any(axis=1)
            for b in np.nonzero(bad)[0]:
                _join(errors, int(b), f"modality {name!r}: token ids outside [0, {spec.vocab_size})")
            known_tokens[name], known_present[name] = t.astype(np.int64, copy=False), p
        limit = max_inputs if max_inputs is not None else self.max_inputs
        if limit is not None:
            limit = int(limit) - int(reserve)
            if limit < 1:
                raise ValueError(f"input budget {limit + reserve} leaves no room for conditioning inputs "
                                 f"({reserve} slots are needed by the target's own tokens)")
        readable = [m for m in known_tokens if m not in exclude and m not in self.never_input]
        used = {m: np.zeros(n, dtype=np.int64) for m in known_tokens}
        available = {m: np.zeros(n, dtype=np.int64) for m in known_tokens}
        subsampled = np.zeros(n, dtype=bool)
        read: list[dict[str, np.ndarray]] = []
        over: list[str] = []
        for b in range(n):
            avail = {m: known_tokens[m].shape[1] for m in readable if known_present[m][b]}
            for m, size in avail.items():
                available[m][b] = size
            if b in errors:
                read.append({})
                continue
            if not avail:
                skipped = sorted(m for m in known_tokens if known_present[m][b])
                why = f" (present but not readable as inputs here: {skipped})" if skipped else ""
                errors[b] = f"no input tokens: every modality the model can read from is absent{why}"
                read.append({})
                continue
            total = sum(avail.values())
            if limit is not None and total > limit:
                if budget == "error":
                    over.append(f"object {b}: {total} tokens")
                subsampled[b] = True
            chosen = select_inputs(avail, limit, self.subset_seed)
            for m, pos in chosen.items():
                used[m][b] = len(pos)
            read.append(chosen)
        if over:
            raise ValueError(f"{len(over)} object(s) exceed the input budget of {limit} tokens "
                             f"({', '.join(over[:5])}{', ...' if len(over) > 5 else ''}); pass budget='subsample' "
                             "to read a deterministic subset, or a larger max_inputs")
        if subsampled.any():
            summary = {m: int(used[m][subsampled].sum()) for m in sorted(used) if available[m][subsampled].any()}
            log.warning("input budget %d: %d object(s) read a subset of their tokens (tokens read per modality, "
                        "summed over them: %s)", limit, int(subsampled.sum()), summary)
        return _Inputs(n=n, tokens=known_tokens, present=known_present, errors=errors, read=read, used=used,
                       available=available, subsampled=subsampled)

    def _sample(self, inp: _Inputs, b: int, extra_tokens: Mapping[str, np.ndarray] | None = None,
                extra_inputs: Mapping[str, np.ndarray] | None = None,
                targets: Mapping[str, np.ndarray] | None = None) -> MaskedSample:
        """One object's packed-batch entry: its chosen inputs plus given extra inputs and targets."""
        toks = {m: inp.tokens[m][b] for m in inp.read[b]}
        toks.update(extra_tokens or {})
        inputs = dict(inp.read[b])
        inputs.update({m: p for m, p in (extra_inputs or {}).items() if len(p)})
        return MaskedSample(tokens=toks, inputs=inputs, targets=dict(targets or {}))

    def _iter_logits(self, samples: list[MaskedSample], target: str, slots: int):
        """Per chunk: (start, float32 logits (chunk, slots, vocab) of ``target`` on the model's device);
        each sample asks for ``slots`` positions of ``target`` and nothing else."""
        for s in range(0, len(samples), self.chunk_size):
            part = samples[s:s + self.chunk_size]
            batch = to_device(collate(part, modalities=self.names), self.device)
            yield s, self.model.logits_for(batch)[target].float().view(len(part), slots, -1)

    def _target_logits(self, samples: list[MaskedSample], target: str, slots: int) -> Tensor:
        """All of :meth:`_iter_logits` on the CPU (for small vocabularies and few slots)."""
        return torch.cat([logits.cpu() for _, logits in self._iter_logits(samples, target, slots)])

    # ------------------------------------------------------------------ embeddings
    @torch.no_grad()
    def embed(self, tokens: TokenDict, present: PresenceDict = None,
              pooling: Literal["mean", "per_modality_mean", "attention"] = "mean", max_inputs: int | None = None,
              budget: Budget = "subsample", return_tokens: bool = True) -> EmbeddingResult:
        """Encoder embeddings of every object from all its readable tokens (no targets).

        Returns token-level outputs (unless ``return_tokens=False``, which saves their memory on
        large batches) and pooled vectors (see :class:`EmbeddingResult` for which pooling to use
        for what). ``pooling="attention"`` is refused: without a trained query it is only a
        re-weighted mean; trained attentive probes belong to the evaluation heads.
        """
        if pooling == "attention":
            raise NotImplementedError("pooling='attention' needs a trained attention query (an attentive probe "
                                      "head); use 'mean' or 'per_modality_mean' for untrained pooling")
        if pooling not in ("mean", "per_modality_mean"):
            raise ValueError(f"pooling: expected 'mean' or 'per_modality_mean', got {pooling!r}")
        inp = self._inputs(tokens, present, frozenset(), max_inputs, 0, budget)
        ok = inp.ok()
        m_count, dim = len(self.names), self.model.cfg.dim
        mean = torch.full((inp.n, dim), float("nan"))
        per_mod = torch.full((inp.n, m_count, dim), float("nan"))
        mod_present = torch.zeros(inp.n, m_count, dtype=torch.bool)
        parts: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = []
        for s in range(0, len(ok), self.chunk_size):
            rows = torch.tensor(ok[s:s + self.chunk_size], dtype=torch.long)
            batch = collate([self._sample(inp, int(b)) for b in rows], modalities=self.names)
            h, mask = self.model.encode(to_device(batch, self.device))
            h, mask = h.float().cpu() * mask.cpu()[..., None], mask.cpu()
            onehot = torch.nn.functional.one_hot(batch["input_modality"], m_count).float() * mask[..., None]
            counts = onehot.sum(dim=1)  # (b, M)
            per_mod[rows] = torch.einsum("bnm,bnd->bmd", onehot, h) / counts.clamp_min(1.0)[..., None]
            mean[rows] = h.sum(dim=1) / mask.sum(dim=1, keepdim=True).float()
            mod_present[rows] = counts > 0
            if return_tokens:
                parts.append((rows, h, mask, batch["input_modality"] * mask, batch["input_position"] * mask))
        width = max([part[1].shape[1] for part in parts], default=0)
        emb = torch.zeros(inp.n, width, dim) if return_tokens else None
        tmask = torch.zeros(inp.n, width, dtype=torch.bool) if return_tokens else None
        tmod = torch.zeros(inp.n, width, dtype=torch.long) if return_tokens else None
        tpos = torch.zeros(inp.n, width, dtype=torch.long) if return_tokens else None
        for rows, h, mask, mod, pos in parts:
            w = h.shape[1]
            emb[rows, :w], tmask[rows, :w], tmod[rows, :w], tpos[rows, :w] = h, mask, mod, pos
        if pooling == "mean":
            pooled = mean.clone()
        else:
            pooled = torch.cat([per_mod.flatten(1), mod_present.float()], dim=1)
            pooled[torch.isnan(mean[:, 0])] = float("nan")
        return EmbeddingResult(modalities=self.names, token_embeddings=emb, token_mask=tmask, token_modality=tmod,
                               token_position=tpos, mean=mean, per_modality=per_mod, modality_present=mod_present,
                               pooled=pooled, pooling=pooling, tokens_used=inp.used, tokens_available=inp.available,
                               subsampled=inp.subsampled, errors=dict(sorted(inp.errors.items())))

    # ------------------------------------------------------------------ zero-shot scalars
    @torch.no_grad()
    def predict_scalar(self, tokens: TokenDict, present: PresenceDict, target: str, max_inputs: int | None = None,
                       budget: Budget = "subsample") -> ScalarPrediction:
        """Posterior of scalar ``target`` from every other readable token (the target is never read).

        The decoder is asked for the target's coarse token; a softmax over the coarse tokens the
        tokenizer can emit gives the histogram PDF. Fine bins: the fine token means "where inside
        *this* bin", so it is only defined given the coarse one, and a second pass gives the most
        probable coarse token as an input and asks for the fine token (the budget keeps one slot
        free for it). A ``never_input`` target (a label) was never an input in training, so its
        coarse token cannot be fed back: coarse and fine are asked together in one pass and the
        fine distribution is not conditioned on the bin, a fair approximation only where the
        coarse posterior is sharp. See :class:`ScalarPrediction`.
        """
        if target not in self.model.index:
            n = _batch_size(tokens)
            msg = f"target {target!r} is not in this model (it predicts {list(self.names)})"
            nan = np.full(n, np.nan)
            est = ScalarEstimates(*(nan.copy() for _ in range(7)))
            zeros = {m: np.zeros(n, dtype=np.int64) for m in tokens if m in self.model.index}
            return ScalarPrediction(modality=target, edges=np.empty(0), probs=np.full((n, 0), np.nan), estimates=est,
                                    refined=None, fine_probs=None, coarse_token=np.full(n, -1), tokens_used=zeros,
                                    tokens_available={m: v.copy() for m, v in zeros.items()},
                                    subsampled=np.zeros(n, dtype=bool), errors=dict.fromkeys(range(n), msg))
        tok = self.tokenizers[target]
        if not isinstance(tok, ScalarTokenizer):
            raise ValueError(f"target {target!r} has a {type(tok).__name__}; predict_scalar needs a scalar "
                             "modality (use generate for multi-token ones)")
        binning, fine = tok.binning, tok.fine_bins
        k_eff, n_bins = binning.n_effective_bins, binning.n_bins
        second_pass = bool(fine) and target not in self.never_input
        inp = self._inputs(tokens, present, frozenset({target}), max_inputs, int(second_pass), budget)
        ok, n = inp.ok(), inp.n
        edges_u = binning.edges.double().numpy()
        centers = binning.centers.double().numpy()
        transform = (binning.transform, binning.scale)
        probs = np.full((n, k_eff), np.nan)
        fine_probs = np.full((n, fine), np.nan) if fine else None
        coarse = np.full(n, -1, dtype=np.int64)
        if ok:
            blank = {target: np.zeros(tok.num_tokens, dtype=np.int64)}  # labels are not read
            asked = np.arange(2) if fine and not second_pass else np.array([0])
            samples = [self._sample(inp, b, extra_tokens=blank, targets={target: asked}) for b in ok]
            logits = self._target_logits(samples, target, len(asked))
            p = torch.softmax(logits[:, 0, :k_eff].double(), dim=-1).numpy()
            probs[ok] = p
            coarse[ok] = p.argmax(axis=1)
            if fine_probs is not None and not second_pass:
                fine_probs[ok] = torch.softmax(logits[:, 1, n_bins:n_bins + fine].double(), dim=-1).numpy()
        est = _estimates(probs, edges_u, centers, transform, coarse)
        refined = None
        if fine_probs is not None:
            if second_pass and ok:
                samples = [self._sample(inp, b, extra_tokens={target: np.array([coarse[b], n_bins])},
                                        extra_inputs={target: np.array([0])}, targets={target: np.array([1])})
                           for b in ok]
                logits = self._target_logits(samples, target, 1)[:, 0, n_bins:n_bins + fine]
                fine_probs[ok] = torch.softmax(logits.double(), dim=-1).numpy()
            refined = _refined_estimates(tok, probs, fine_probs, coarse, edges_u, centers, transform)
        return ScalarPrediction(modality=target, edges=binning.edges_physical().double().numpy(), probs=probs,
                                estimates=est, refined=refined, fine_probs=fine_probs, coarse_token=coarse,
                                tokens_used=inp.used, tokens_available=inp.available, subsampled=inp.subsampled,
                                errors=dict(sorted(inp.errors.items())), edges_transformed=edges_u,
                                transform=transform, centers=centers)

    # ------------------------------------------------------------------ generation
    def allowed_tokens(self, modality: str) -> Tensor:
        """(num_tokens, vocab_size) bool: ids the tokenizer can emit at each position.

        See :func:`allowed_token_mask`.
        """
        spec = self.model.cfg.modalities[modality]
        return allowed_token_mask(self.tokenizers[modality], spec.num_tokens, spec.vocab_size)

    @torch.no_grad()
    def generate(self, tokens: TokenDict, present: PresenceDict, target: str, steps: int = 8,
                 temperature: float = 1.0, schedule: Literal["cosine", "linear"] = "cosine", seed: int = 0,
                 num_samples: int = 1, max_inputs: int | None = None, budget: Budget = "subsample",
                 decode: bool = False, decode_kwargs: Mapping[str, Any] | None = None) -> GenerationResult:
        """MaskGIT-style generation of every token of ``target`` from the other readable tokens.

        All target positions start unknown. Each step the decoder predicts every unknown
        position, a token is drawn per position from ``softmax(logits / temperature)`` over the
        ids allowed there (``temperature=0``: the argmax), and the :func:`mask_schedule` count of
        the most confident draws (the drawn token's probability; ties to the lower position) is
        kept and fed back as encoder *inputs* for the next step; the rest are drawn again.
        The uniform numbers come from one ``torch.Generator(seed)`` on the CPU in a fixed order
        (step, sample, object, slot), so a seed gives the same tokens for the same inputs and batch
        (probabilities are float32 on the model's device: another device may differ in rare
        near-ties). ``num_samples`` independent samples per object.

        Budget: at the last step an object reads its conditioning inputs plus every generated
        token except the last step's, so those are reserved and the conditioning inputs must fit
        in ``max_inputs`` minus them (``budget`` as elsewhere); a target larger than the budget
        alone is an error. A ``never_input`` target (a label) cannot be fed back, so all its
        positions are drawn in a single step (``schedule`` then has one entry).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature}")
        if target not in self.model.index:
            n = _batch_size(tokens)
            msg = f"target {target!r} is not in this model (it predicts {list(self.names)})"
            zeros = {m: np.zeros(n, dtype=np.int64) for m in tokens if m in self.model.index}
            return GenerationResult(modality=target, tokens=torch.full((num_samples, n, 0), -1, dtype=torch.long),
                                    decoded=None, schedule=[], tokens_used=zeros,
                                    tokens_available={m: v.copy() for m, v in zeros.items()},
                                    subsampled=np.zeros(n, dtype=bool), errors=dict.fromkeys(range(n), msg))
        size = self.model.cfg.modalities[target].num_tokens
        plan = mask_schedule(size, steps, schedule)
        if target in self.never_input and len(plan) > 1:
            log.info("%s may not be read as an input, so its tokens cannot be fed back: all %d are drawn in one "
                     "step", target, size)
            plan = [size]
        inp = self._inputs(tokens, present, frozenset({target}), max_inputs, size - plan[-1], budget)
        ok, n = inp.ok(), inp.n
        allowed = self.allowed_tokens(target)
        gen = torch.Generator().manual_seed(int(seed))  # on the CPU: the same draws on any device
        rows = [(s, b) for s in range(num_samples) for b in ok]  # sample-major
        current = torch.zeros(len(rows), size, dtype=torch.long)
        known = torch.zeros(len(rows), size, dtype=torch.bool)
        for reveal in plan:
            if not rows:
                break
            unknown = [torch.nonzero(~known[r]).flatten() for r in range(len(rows))]
            slots = len(unknown[0])
            samples = [self._sample(inp, b, extra_tokens={target: current[r].numpy()},
                                    extra_inputs={target: torch.nonzero(known[r]).flatten().numpy()},
                                    targets={target: unknown[r].numpy()}) for r, (_, b) in enumerate(rows)]
            pos = torch.stack(unknown)  # (R, slots)
            u = torch.rand(pos.shape, generator=gen, dtype=torch.float64) if temperature > 0 else None
            drawn = torch.empty(pos.shape, dtype=torch.long)
            conf = torch.empty(pos.shape, dtype=torch.float32)
            for start, logits in self._iter_logits(samples, target, slots):  # sample chunk by chunk, on device
                sl = slice(start, start + logits.shape[0])
                logits = logits.masked_fill(~allowed[pos[sl]].to(logits.device), float("-inf"))
                d, c = _draw(logits, temperature, None if u is None else u[sl].to(logits.device))
                drawn[sl], conf[sl] = d.cpu(), c.cpu()
            order = torch.sort(-conf, dim=1, stable=True).indices[:, :reveal]
            keep_pos = pos.gather(1, order)
            current.scatter_(1, keep_pos, drawn.gather(1, order))
            known.scatter_(1, keep_pos, True)
        out = torch.full((num_samples, n, size), -1, dtype=torch.long)
        for r, (s, b) in enumerate(rows):
            out[s, b] = current[r]
        decoded = None
        if decode:
            decoded = [self._decode(target, out[s], sorted(inp.errors), decode_kwargs) for s in range(num_samples)]
        return GenerationResult(modality=target, tokens=out, decoded=decoded, schedule=plan, tokens_used=inp.used,
                                tokens_available=inp.available, subsampled=inp.subsampled,
                                errors=dict(sorted(inp.errors.items())))

    def _decode(self, modality: str, tokens: Tensor, failed: list[int], kwargs: Mapping[str, Any] | None) -> Any:
        """Decode (B, n) tokens; rows of failed objects get the first allowed id per position."""
        tok = self.tokenizers[modality]
        filler = self.allowed_tokens(modality).long().argmax(dim=1)
        tokens = torch.where(tokens < 0, filler[None, :], tokens)
        kwargs = dict(kwargs or {})
        if isinstance(tok, ScalarTokenizer):
            ok = np.ones(tokens.shape[0], dtype=bool)
            ok[failed] = False
            kwargs.setdefault("present", ok)
        elif tok.tokenizer_type == "image" and not {"bands", "modality"} & set(kwargs):
            kwargs["modality"] = modality
        return tok.decode(tokens, **kwargs)


# ---------------------------------------------------------------------------- helpers
def _draw(logits: Tensor, temperature: float, u: Tensor | None) -> tuple[Tensor, Tensor]:
    """Token per slot from ``softmax(logits / temperature)`` by inverse CDF at ``u`` (argmax when
    ``temperature == 0``) and its probability (at temperature 1 for the argmax) as confidence."""
    if temperature == 0:
        probs = torch.softmax(logits, dim=-1)
        drawn = probs.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        cdf = probs.double().cumsum(dim=-1)
        drawn = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None], right=True).squeeze(-1)
        last = (probs > 0).long().cumsum(dim=-1).argmax(dim=-1)  # the last id with probability > 0
        drawn = torch.minimum(drawn, last)
    return drawn, probs.gather(-1, drawn[..., None]).squeeze(-1)


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _batch_size(tokens: TokenDict) -> int:
    sizes = {_np(t).shape[0] for t in tokens.values()}
    if len(sizes) != 1:
        raise ValueError(f"tokens: expected one batch size, got {sorted(sizes)}")
    return sizes.pop()


def _estimates(probs: np.ndarray, edges_u: np.ndarray, centers: np.ndarray, transform: tuple[str, float],
               mode_bin: np.ndarray) -> ScalarEstimates:
    """Coarse-histogram estimates (see :class:`ScalarPrediction`)."""
    q = _inverse_np(_quantiles(probs, edges_u, [0.5, 0.16, 0.84, 0.025, 0.975]), *transform)
    mean = probs @ centers
    mode = np.where(mode_bin >= 0, centers[np.maximum(mode_bin, 0)], np.nan)
    return ScalarEstimates(mean=mean, median=q[0], mode=mode, p16=q[1], p84=q[2], p2_5=q[3], p97_5=q[4])


def _refined_estimates(tok: ScalarTokenizer | None, probs: np.ndarray, fine_probs: np.ndarray, coarse: np.ndarray,
                       edges_u: np.ndarray, centers: np.ndarray, transform: tuple[str, float],
                       mode: np.ndarray | None = None) -> ScalarEstimates:
    """Estimates from the histogram with the most probable bin split into the fine sub-bins.

    Outside that bin nothing changes; inside it the fine distribution replaces the flat one
    (sub-bins equal in the transformed space, represented by their centres, as ``decode`` does).
    ``mode``: already known (B,) modes (then ``tok`` is not needed to decode them).
    """
    n = probs.shape[0]
    f = fine_probs.shape[1]
    ok = coarse >= 0
    out = {name: np.full(n, np.nan) for name in ("mean", "median", "mode", "p16", "p84", "p2_5", "p97_5")}
    if not ok.any():
        return ScalarEstimates(**out)
    idx = np.nonzero(ok)[0]
    new_probs, new_edges = _refined_histogram(probs[idx], fine_probs[idx], coarse[idx], edges_u)
    c = coarse[idx]
    sub = edges_u[c, None] + np.arange(f + 1)[None, :] / f * (edges_u[c + 1] - edges_u[c])[:, None]
    sub_values = _inverse_np(0.5 * (sub[:, :-1] + sub[:, 1:]), *transform)
    q = _inverse_np(_quantiles(new_probs, new_edges, [0.5, 0.16, 0.84, 0.025, 0.975]), *transform)
    p_c = probs[idx, c]
    mean = probs[idx] @ centers - p_c * centers[c] + p_c * (fine_probs[idx] * sub_values).sum(axis=1)
    if mode is None:
        best = fine_probs[idx].argmax(axis=1)
        mode_ok = tok.decode(torch.from_numpy(np.stack([c, tok.binning.n_bins + best], axis=1))).values
    else:
        mode_ok = np.asarray(mode)[idx]
    for name, value in (("mean", mean), ("median", q[0]), ("mode", mode_ok), ("p16", q[1]), ("p84", q[2]),
                        ("p2_5", q[3]), ("p97_5", q[4])):
        out[name][idx] = value
    return ScalarEstimates(**out)


def _refined_histogram(probs: np.ndarray, fine_probs: np.ndarray, coarse: np.ndarray, edges_u: np.ndarray,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-object histograms (B, K-1+F) on edges (B, K+F): the most probable bin ``coarse`` split into
    ``F`` equal sub-bins (transformed space) carrying ``probs[c] * fine_probs``. Rows with
    ``coarse < 0`` (errors) are NaN."""
    n, k = probs.shape
    f = fine_probs.shape[1]
    new_probs = np.full((n, k - 1 + f), np.nan)
    new_edges = np.tile(np.linspace(0.0, 1.0, k + f), (n, 1))
    for b in range(n):
        c = int(coarse[b])
        if c < 0:
            continue
        lo, hi = edges_u[c], edges_u[c + 1]
        sub = lo + np.arange(f + 1) / f * (hi - lo)
        new_edges[b] = np.concatenate([edges_u[:c], sub, edges_u[c + 2:]])
        new_probs[b] = np.concatenate([probs[b, :c], probs[b, c] * fine_probs[b], probs[b, c + 1:]])
    return new_probs, new_edges

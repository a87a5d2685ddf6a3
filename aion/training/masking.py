"""Masked multimodal sampling: which of an object's tokens the model reads and which it predicts.

This is a data transform, not part of the model: :class:`MaskingSampler` picks, for one object,
a set of *input* token positions (read by the encoder) and a disjoint set of *target*
positions (predicted by the decoder) under explicit budgets, and :func:`collate` packs many
such objects into the padded batch that :class:`aion.model.FourM` consumes.

Rules every strategy obeys: absent modalities are never sampled; ``label`` modalities (e.g.
PROVABGS, see :mod:`aion.modalities`) are never inputs but may be targets, so zero-shot
prediction of them is trained; at most ``input_budget`` inputs and ``target_budget`` targets;
inputs and targets are disjoint; an object with fewer tokens than the budgets gets what it has
(counts are in the output, never an error); an object without any possible input gets no
targets either (nothing to predict them from); the draw depends only on the random generator.

Strategies (``MaskingConfig.strategy``):

- ``"aion"`` (AION-1): an *anchor* modality is drawn uniformly among the present input
  modalities and a uniform number ``1..min(input_budget, its tokens)`` of its tokens become
  inputs; the rest of the input budget is filled with tokens drawn uniformly from the other
  present input modalities (pooled). When the object is too small for the budget to bind (the
  other modalities hold no more tokens than the room left), filling it would make every token
  an input and leave nothing to predict, so a uniform ``0..n_other-1`` of them are drawn
  instead (and a lone modality keeps at least one token back); with AION-1's shapes (256
  inputs, 576-token images) the budget nearly always binds. Targets: every present modality with tokens left asks for
  ``max(1, ceil(f_m * tokens_left_m))`` of them, ``f_m ~ Beta(*target_beta)`` drawn per
  modality (the default ``Beta(0.5, 2)``, mean 0.2, is skewed towards few), and when the asks
  exceed ``target_budget`` they are scaled down in proportion (:func:`split_budget`). So each
  scalar left over is usually a target (1 token asks for 1), an image or spectrum contributes a
  skewed share, and the budget is normally used in full: a padded decoder slot costs as much
  compute as a real one, so a skewed *total* would waste most of every batch.
- ``"dirichlet"`` (4M): weights ``w ~ Dirichlet(alpha)`` over the present input modalities
  split the input budget, and independent weights over all present modalities split the
  target budget among the tokens not used as inputs; within a modality positions are uniform.
  Shares that exceed a modality's tokens flow to the others (the budget is used whenever the
  object has the tokens). Small ``alpha`` (0.5) often concentrates a budget on one modality.

Packed-batch format (:func:`collate` output; a dict):

=====================  =====================  ====================================================
key                    type / shape           meaning
=====================  =====================  ====================================================
``modalities``         tuple[str, ...]        sorted modality names; ``*_modality`` index into it
``input_tokens``       int64 (B, N_in)        token ids of the inputs (0 at padding)
``input_modality``     int64 (B, N_in)        index into ``modalities`` (0 at padding)
``input_position``     int64 (B, N_in)        token position within its modality (0 at padding)
``input_mask``         bool (B, N_in)         True for real slots, False for padding
``target_tokens``      int64 (B, N_target)    token ids to predict (the labels; 0 at padding)
``target_modality``    int64 (B, N_target)    as for inputs
``target_position``    int64 (B, N_target)    as for inputs
``target_mask``        bool (B, N_target)     True for real target slots
``num_inputs``         int64 (B,)             real input slots per object (= input_mask.sum(1))
``num_targets``        int64 (B,)             real target slots per object
=====================  =====================  ====================================================

``N_in`` / ``N_target`` are the largest counts in the batch (at least 1). Within an object the
real slots come first, grouped by modality in ``modalities`` order, positions ascending; the
model is permutation-equivariant, so this order is a convenience, not a meaning. The model
maps names to its own tables, so a batch may hold any subset of the model's modalities.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from aion import modalities as registry
from aion.model.config import ModalitySpec, modality_specs_from_index

Rng = np.random.Generator | torch.Generator | int | Sequence[int]


@dataclass(kw_only=True)
class MaskingConfig:
    strategy: Literal["aion", "dirichlet"] = "aion"
    input_budget: int = 256
    """Most input tokens per object (AION-1 / 4M: 256 / 128)."""
    target_budget: int = 128
    """Most target tokens per object."""
    dirichlet_alpha: float = 0.5
    """Concentration of the per-object Dirichlet split (``dirichlet`` strategy)."""
    target_beta: tuple[float, float] = (0.5, 2.0)
    """Beta(a, b) of the fraction of the target budget used (``aion`` strategy); see the module docstring."""
    never_input: tuple[str, ...] | None = None
    """Modalities that may be targets but never inputs; None = those whose registry role is ``label``."""
    seed: int = 0
    """Base seed of :class:`MaskedDataset`: an object's draw depends only on (seed, epoch, index)."""

    def __post_init__(self) -> None:
        if self.strategy not in ("aion", "dirichlet"):
            raise ValueError(f"strategy: expected 'aion' or 'dirichlet', got {self.strategy!r}")
        if self.input_budget < 1 or self.target_budget < 1:
            raise ValueError(f"input_budget and target_budget must be >= 1, got "
                             f"{self.input_budget}, {self.target_budget}")
        if not self.dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if len(self.target_beta) != 2 or not min(self.target_beta) > 0:
            raise ValueError(f"target_beta: expected two positive numbers, got {self.target_beta}")
        self.target_beta = (float(self.target_beta[0]), float(self.target_beta[1]))
        if self.never_input is not None:
            self.never_input = tuple(self.never_input)


@dataclass
class MaskedSample:
    """One object's draw: positions are int64 arrays, sorted; only modalities with a chosen position appear."""

    tokens: dict[str, np.ndarray]
    """Token ids (num_tokens,) of each modality that has an input or a target position."""
    inputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    object_id: int | None = None

    @property
    def num_inputs(self) -> int:
        return sum(len(p) for p in self.inputs.values())

    @property
    def num_targets(self) -> int:
        return sum(len(p) for p in self.targets.values())


def as_rng(rng: Rng) -> np.random.Generator:
    """numpy Generator from a Generator, a torch.Generator (advanced by one draw) or a seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (), generator=rng)))
    return np.random.default_rng(rng)


def split_budget(budget: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Integer counts ~ proportional to ``weights``, each <= ``capacity``, summing to min(budget, capacity.sum()).

    Rounds by largest remainder; a modality's share beyond its capacity is redistributed to the
    others in proportion to their weights (all equal if those are all zero).
    """
    weights = np.where(np.isfinite(weights), np.maximum(weights, 0.0), 0.0)
    capacity = np.asarray(capacity, dtype=np.int64)
    counts = np.zeros(len(capacity), dtype=np.int64)
    remaining = min(int(budget), int(capacity.sum()))
    while remaining > 0:
        open_ = counts < capacity
        w = np.where(open_, weights, 0.0)
        w = w if w.sum() > 0 else open_.astype(float)
        share = w / w.sum() * remaining
        add = np.floor(share).astype(np.int64)
        extra = remaining - int(add.sum())
        if extra:
            order = np.argsort(-(share - add), kind="stable")
            add[order[:extra]] += 1
        add = np.minimum(add, capacity - counts)
        counts += add
        remaining -= int(add.sum())
    return counts


class MaskingSampler:
    """Draws one object's inputs and targets (see the module docstring); call it on (tokens, present, rng)."""

    def __init__(self, cfg: MaskingConfig | None = None):
        self.cfg = cfg or MaskingConfig()
        if self.cfg.never_input is None:
            self.never_input = frozenset(registry.modalities(role="label"))
        else:
            self.never_input = frozenset(self.cfg.never_input)

    def __call__(self, tokens: Mapping[str, Tensor | np.ndarray], present: Mapping[str, bool], rng: Rng,
                 object_id: int | None = None) -> MaskedSample:
        rng = as_rng(rng)
        arrays: dict[str, np.ndarray] = {}
        for name in sorted(present):
            if not bool(present[name]):
                continue
            if name not in tokens:
                raise KeyError(f"modality {name!r} is marked present but has no tokens")
            t = tokens[name]
            t = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
            if t.ndim != 1 or len(t) == 0:
                raise ValueError(f"modality {name!r}: expected tokens of shape (num_tokens,), got {t.shape}")
            arrays[name] = t.astype(np.int64, copy=False)
        sizes = {name: len(t) for name, t in arrays.items()}
        can_input = [name for name in sizes if name not in self.never_input]
        if self.cfg.strategy == "aion":
            inputs, targets = self._aion(sizes, can_input, rng)
        else:
            inputs, targets = self._dirichlet(sizes, can_input, rng)
        used = sorted(set(inputs) | set(targets))
        return MaskedSample(tokens={n: arrays[n] for n in used}, inputs=inputs, targets=targets, object_id=object_id)

    # ------------------------------------------------------------------ strategies
    def _aion(self, sizes: dict[str, int], can_input: list[str], rng: np.random.Generator):
        cfg = self.cfg
        if not can_input:
            return {}, {}
        anchor = can_input[rng.integers(len(can_input))]
        others = {n: np.arange(sizes[n]) for n in can_input if n != anchor}
        n_other = sum(sizes[n] for n in others)
        most = min(cfg.input_budget, sizes[anchor] - (1 if n_other == 0 and sizes[anchor] > 1 else 0))
        n_anchor = int(rng.integers(1, most + 1))
        inputs = {anchor: rng.choice(sizes[anchor], n_anchor, replace=False)}
        room = cfg.input_budget - n_anchor
        # a budget that does not bind would make every token an input and leave nothing to predict:
        # then the other modalities give a uniform 0..n_other-1 tokens (AION-1 shapes always bind)
        fill = room if n_other > room else int(rng.integers(0, max(n_other, 1)))
        inputs.update(_draw_pooled(others, fill, rng))
        left = _remaining(sizes, inputs)
        targets = {}
        if left and cfg.target_budget > 0:
            names = list(left)
            want = np.array([max(1, math.ceil(rng.beta(*cfg.target_beta) * len(left[n]))) for n in names])
            counts = split_budget(cfg.target_budget, want.astype(float), want)
            targets = {n: rng.choice(left[n], int(c), replace=False) for n, c in zip(names, counts, strict=True) if c}
        return _sorted(inputs), _sorted(targets)

    def _dirichlet(self, sizes: dict[str, int], can_input: list[str], rng: np.random.Generator):
        cfg = self.cfg
        if not can_input:
            return {}, {}
        inputs = _draw_split({n: np.arange(sizes[n]) for n in can_input}, cfg.input_budget, cfg.dirichlet_alpha, rng)
        targets = _draw_split(_remaining(sizes, inputs), cfg.target_budget, cfg.dirichlet_alpha, rng)
        return _sorted(inputs), _sorted(targets)


def _remaining(sizes: dict[str, int], taken: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Positions of each modality not in ``taken`` (modalities with none left are dropped)."""
    out = {}
    for name, n in sizes.items():
        free = np.ones(n, dtype=bool)
        if name in taken:
            free[taken[name]] = False
        if free.any():
            out[name] = np.nonzero(free)[0]
    return out


def _draw_pooled(candidates: dict[str, np.ndarray], k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``k`` positions drawn uniformly without replacement from all candidates pooled."""
    names = list(candidates)
    total = sum(len(candidates[n]) for n in names)
    k = min(k, total)
    if k <= 0:
        return {}
    flat = rng.choice(total, k, replace=False)
    bounds = np.cumsum([0] + [len(candidates[n]) for n in names])
    which = np.searchsorted(bounds, flat, side="right") - 1
    out = {}
    for i, name in enumerate(names):
        picked = flat[which == i] - bounds[i]
        if len(picked):
            out[name] = candidates[name][picked]
    return out


def _draw_split(candidates: dict[str, np.ndarray], budget: int, alpha: float,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Budget split by Dirichlet(alpha) weights over the candidate modalities, positions uniform within each."""
    if not candidates:
        return {}
    names = list(candidates)
    weights = rng.dirichlet(np.full(len(names), alpha))
    counts = split_budget(budget, weights, np.array([len(candidates[n]) for n in names]))
    return {n: candidates[n][rng.choice(len(candidates[n]), int(c), replace=False)]
            for n, c in zip(names, counts, strict=True) if c > 0}


def _sorted(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.sort(np.asarray(p, dtype=np.int64)) for n, p in sorted(d.items())}


# ---------------------------------------------------------------------- packing
def collate(samples: Sequence[MaskedSample], modalities: Iterable[str] | None = None) -> dict[str, Any]:
    """Pack sampled objects into the padded batch described in the module docstring.

    ``modalities`` fixes the name list (sorted here); None = the modalities the samples use.
    Usable directly as a DataLoader ``collate_fn``.
    """
    if not samples:
        raise ValueError("collate: no samples")
    used = sorted(set().union(*(s.tokens for s in samples)))
    names = tuple(sorted(set(modalities))) if modalities is not None else tuple(used)
    missing = [n for n in used if n not in names]
    if missing:
        raise ValueError(f"collate: samples use modalities {missing} not in the given list {list(names)}")
    index = {n: i for i, n in enumerate(names)}
    batch: dict[str, Any] = {"modalities": names}
    for side in ("input", "target"):
        chosen = [s.inputs if side == "input" else s.targets for s in samples]
        counts = np.array([sum(len(p) for p in c.values()) for c in chosen], dtype=np.int64)
        width = max(1, int(counts.max()))
        tokens = np.zeros((len(samples), width), dtype=np.int64)
        mod, pos = np.zeros_like(tokens), np.zeros_like(tokens)
        mask = np.zeros((len(samples), width), dtype=bool)
        for b, (sample, c) in enumerate(zip(samples, chosen, strict=True)):
            j = 0
            for name in sorted(c, key=index.__getitem__):
                p = c[name]
                tokens[b, j:j + len(p)] = sample.tokens[name][p]
                mod[b, j:j + len(p)] = index[name]
                pos[b, j:j + len(p)] = p
                j += len(p)
            mask[b, :j] = True
        batch.update({f"{side}_tokens": torch.from_numpy(tokens), f"{side}_modality": torch.from_numpy(mod),
                      f"{side}_position": torch.from_numpy(pos), f"{side}_mask": torch.from_numpy(mask),
                      f"num_{side}s": torch.from_numpy(counts)})
    return batch


def to_device(batch: dict[str, Any], device: torch.device | str, non_blocking: bool = False) -> dict[str, Any]:
    """Move a packed batch's tensors to ``device`` (the name list stays as it is)."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------- datasets
class TokenShardDataset(Dataset):
    """Every object of a pre-tokenized root (:mod:`aion.tokenizers.pretokenize`), shards memory-mapped.

    ``ds[i]`` = ``{"object_id": int, "tokens": {name: int64 tensor (num_tokens,)}, "present": {name: bool}}``
    for the selected modalities (tokens of an absent modality are the writer's filler: ignore them).
    Shards are opened lazily in each process and never pickled, so DataLoader workers are cheap.
    """

    def __init__(self, root: str | os.PathLike, modalities: Iterable[str] | None = None):
        from aion.data.token_shards import INDEX_NAME

        self.root = Path(root)
        path = self.root / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{self.root}: no {INDEX_NAME}; not a pre-tokenized root")
        self.index: dict[str, Any] = json.loads(path.read_text())
        table = self.index.get("modalities") or {}
        names = sorted(table) if modalities is None else sorted(set(modalities))
        unknown = [n for n in names if n not in table]
        if unknown:
            raise ValueError(f"{self.root}: no modality {unknown} in {path.name}; it has {sorted(table)}")
        self.modalities: tuple[str, ...] = tuple(names)
        self.shard_names = [s["name"] for s in self.index["shards"]]
        self.offsets = np.cumsum([0] + [int(s["n"]) for s in self.index["shards"]])
        self._open: dict[int, dict[str, np.ndarray]] = {}

    def specs(self) -> dict[str, ModalitySpec]:
        """The model's token table for the selected modalities (from ``index.json``)."""
        return modality_specs_from_index(self.index, list(self.modalities))

    def label_modalities(self) -> tuple[str, ...]:
        """Selected modalities whose role in ``index.json`` is ``label`` (never inputs)."""
        table = self.index["modalities"]
        return tuple(n for n in self.modalities if table[n].get("role") == "label")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._open:
            from aion.data.token_shards import load_token_shard

            arrays = load_token_shard(self.root / self.shard_names[k])
            n = int(self.offsets[k + 1] - self.offsets[k])
            for name in self.modalities:
                want = (n, int(self.index["modalities"][name]["num_tokens"]))
                if name not in arrays or f"{name}.present" not in arrays:
                    raise FileNotFoundError(f"{self.root / self.shard_names[k]}: missing {name}.npy or "
                                            f"{name}.present.npy")
                if arrays[name].shape != want or arrays[f"{name}.present"].shape != (n,):
                    raise ValueError(f"{self.root / self.shard_names[k]}: {name} has shape {arrays[name].shape}, "
                                     f"index.json says {want}")
            self._open[k] = arrays
        return self._open[k]

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"object {i} out of range for {len(self)} objects")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        arrays, r = self._shard(k), i - int(self.offsets[k])
        return {
            "object_id": int(arrays["object_id"][r]) if "object_id" in arrays else i,
            "tokens": {n: torch.from_numpy(np.array(arrays[n][r], dtype=np.int64)) for n in self.modalities},
            "present": {n: bool(arrays[f"{n}.present"][r]) for n in self.modalities},
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps are reopened by each worker, not copied into it
        return state


class MaskedDataset(Dataset):
    """Objects of ``base`` (items as from :class:`TokenShardDataset`) with a mask drawn per access.

    The draw for object ``i`` depends only on ``(seed, epoch, i)``, not on worker count or order,
    so runs are reproducible and resumable. Call :meth:`set_epoch` before each epoch (with
    persistent DataLoader workers the new epoch does not reach them: leave those off).
    """

    def __init__(self, base: Dataset, sampler: MaskingSampler, seed: int | None = None):
        self.base, self.sampler = base, sampler
        self.seed = sampler.cfg.seed if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> MaskedSample:
        item = self.base[i]
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        return self.sampler(item["tokens"], item["present"], rng, object_id=item.get("object_id"))

"""Which objects each process trains on at each step: mixing token roots by weight, reproducibly.

The whole data order is a pure function of ``(seed, step)``: global sample position
``n = step * global_batch + j`` maps to (dataset, object, pass) through keyed pseudorandom
bijections, never through a cursor that depends on history. So resuming at step ``s`` needs
nothing but ``s`` (exact, with any number of DataLoader workers prefetching ahead), and the
global batches do not depend on the number of processes: rank ``r`` of ``W`` at accumulation
micro-step ``a`` takes slice ``a * W + r`` of the step's global batch.

Mixing: dataset ``k`` (``n_k`` objects, weight ``p_k``, normalised) gets ``m_k = round(p_k L)``
slots of each *virtual epoch* of ``L = sum m_k`` positions, with ``L`` chosen so that every
dataset is seen at least once per virtual epoch (``m_k >= n_k``). The virtual epoch is
shuffled; dataset ``k``'s slots walk through its objects pass after pass, each pass a fresh
permutation, so within a pass every object is drawn exactly once. The mask drawn for an
object depends on (masking seed, dataset, pass, object) only, as in :class:`MaskedDataset`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from aion.model.config import ModalitySpec
from aion.training.masking import MaskedDataset, MaskingSampler, TokenShardDataset, collate

_ROUNDS = 6


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-mixed 64-bit hash (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@lru_cache(maxsize=256)
def _round_keys(key: tuple[int, ...]) -> np.ndarray:
    return np.random.SeedSequence(list(key)).generate_state(_ROUNDS, dtype=np.uint64)


def permute(x: np.ndarray, n: int, key: Sequence[int]) -> np.ndarray:
    """``x`` (ints in ``[0, n)``) through a keyed pseudorandom bijection of ``[0, n)``.

    A balanced Feistel network on the smallest even number of bits covering ``n``, with cycle
    walking back into range. O(1) memory: a shuffle of a 100M-object survey is never stored,
    and any position can be looked up directly.
    """
    x = np.asarray(x, dtype=np.int64)
    if n <= 1:
        return np.zeros_like(x)
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = _round_keys(tuple(int(k) for k in key))
    out = x.astype(np.uint64)
    todo = np.ones(out.shape, dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            v = out[todo]
            left, right = v >> half, v & mask
            for k in keys:
                left, right = right, left ^ (_mix64(right ^ k) & mask)
            out[todo] = (left << half) | right
            todo = out >= np.uint64(n)
    return out.astype(np.int64)


class MixtureSchedule:
    """Global sample position -> (dataset, object, pass); see the module docstring."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        sizes_arr = np.asarray(sizes, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        if len(sizes_arr) == 0 or len(sizes_arr) != len(w):
            raise ValueError(f"need one weight per dataset, got sizes {list(sizes)} and weights {list(weights)}")
        if (sizes_arr < 1).any():
            raise ValueError(f"every dataset needs at least one object, got sizes {sizes_arr.tolist()}")
        if not (w > 0).all():
            raise ValueError(f"weights must be > 0, got {w.tolist()}")
        p = w / w.sum()
        length = max(math.ceil(n / q) for n, q in zip(sizes_arr.tolist(), p.tolist(), strict=True))
        self.sizes = sizes_arr
        self.quotas = np.maximum(sizes_arr, np.round(p * length).astype(np.int64))
        self.offsets = np.concatenate([[0], np.cumsum(self.quotas)])
        self.epoch_length = int(self.offsets[-1])
        self.seed = int(seed)

    def epoch_of(self, position: int) -> int:
        return int(position) // self.epoch_length

    def lookup(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dataset, object, pass) int64 arrays for global positions ``start .. start + count - 1``."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epoch, v = np.divmod(pos, self.epoch_length)
        u = np.empty_like(v)
        for e in np.unique(epoch):
            sel = epoch == e
            u[sel] = permute(v[sel], self.epoch_length, (self.seed, 0, int(e)))
        dataset = np.searchsorted(self.offsets, u, side="right") - 1
        stream = epoch * self.quotas[dataset] + (u - self.offsets[dataset])
        passes, within = np.divmod(stream, self.sizes[dataset])
        obj = np.empty_like(within)
        for k, q in {(int(k), int(q)) for k, q in zip(dataset, passes, strict=True)}:
            sel = (dataset == k) & (passes == q)
            obj[sel] = permute(within[sel], int(self.sizes[k]), (self.seed, 1, k, q))
        return dataset, obj, passes


def merged_specs(roots: Sequence[TokenShardDataset]) -> dict[str, ModalitySpec]:
    """Union of the roots' token tables; a modality whose shape differs between roots is an error."""
    table: dict[str, ModalitySpec] = {}
    owner: dict[str, str] = {}
    for root in roots:
        for name, spec in root.specs().items():
            if name in table and table[name] != spec:
                raise ValueError(f"modality {name!r}: {owner[name]} has {table[name]}, {root.root} has {spec}; "
                                 "datasets mixed in one run must share each modality's tokenizer")
            table.setdefault(name, spec)
            owner.setdefault(name, str(root.root))
    return dict(sorted(table.items()))


def mask_seed(seed: int, dataset: int) -> int:
    """Masking seed of dataset ``k``: ``seed`` itself for the first (as a lone MaskedDataset would use)."""
    return int(seed) + 1_000_003 * int(dataset)


class MicroBatches(Dataset):
    """Item ``q`` = this process's ``q``-th packed micro-batch from ``start_step`` on (ready for the model).

    Use with ``DataLoader(batch_size=None, collate_fn=identity)``; every item is a pure
    function of its step, so workers and prefetching cannot change what is trained on.
    """

    def __init__(self, roots: Sequence[TokenShardDataset], sampler: MaskingSampler, schedule: MixtureSchedule,
                 modalities: Sequence[str], *, start_step: int, end_step: int, global_batch: int,
                 rank: int, world: int, accum: int):
        self.masked = [MaskedDataset(r, sampler, seed=mask_seed(sampler.cfg.seed, k)) for k, r in enumerate(roots)]
        self.schedule, self.names = schedule, tuple(sorted(modalities))
        self.start, self.end, self.global_batch = int(start_step), int(end_step), int(global_batch)
        self.rank, self.world, self.accum = int(rank), int(world), int(accum)
        parts = self.world * self.accum
        if self.global_batch % parts:
            raise ValueError(f"global batch {global_batch} does not split into {world} x {accum} micro-batches")
        self.micro = self.global_batch // parts

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.accum

    def positions(self, q: int) -> tuple[int, int]:
        """(step, first global sample position) of item ``q``."""
        step, a = divmod(int(q), self.accum)
        step += self.start
        return step, step * self.global_batch + (a * self.world + self.rank) * self.micro

    def __getitem__(self, q: int) -> dict[str, Any]:
        if not 0 <= q < len(self):
            raise IndexError(q)
        step, first = self.positions(q)
        datasets, objects, passes = self.schedule.lookup(first, self.micro)
        samples = []
        for k, i, p in zip(datasets.tolist(), objects.tolist(), passes.tolist(), strict=True):
            ds = self.masked[k]
            ds.set_epoch(p)
            samples.append(ds[i])
        batch = collate(samples, self.names)
        batch["step"] = step
        return batch


def identity(x: Any) -> Any:
    """DataLoader ``collate_fn`` for items that are already batches (a module function: workers pickle it)."""
    return x

"""Deterministic, method-independent train/validation/test splits for low-data curves.

Every method (foundation model + head, GBM, from-scratch networks) is scored on the same test
objects and trained on the same labelled subsets, so that differences come from the methods and
not from which objects they saw. Membership is decided by a keyed hash of each ``object_id``
(BLAKE2b of its text form), never by row order or a global RNG:

- **test**: labelled objects whose hash (key ``"test"``) falls below ``test_fraction``. An object's
  membership depends on its id alone, so adding objects (labelled or not) never moves an existing
  object in or out of the test set; the realised fraction is ``test_fraction`` only on average.
- **pool**: the other labelled objects. For each seed the pool is ordered by a seed-keyed hash and
  a training subset of size N is the first N objects of that order, so subsets are nested (the
  size-100 subset of a seed is inside its size-300 subset).
- **validation** (early stopping / hyper-parameter choice) is carved out of each subset, so a
  method "with N labels" sees N labels in total: ``max(min_val, round(val_fraction * N))`` of them,
  at most N // 2, chosen by a second seed-keyed hash.

A requested size >= the pool size collapses to ``"all"`` (the whole pool); the mapping is kept in
:attr:`Splits.effective` and in the JSON description so reports show what was actually run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

SizeKey = int | Literal["all"]
ALL: Literal["all"] = "all"


def _id_text(x: Any) -> str:
    """Text form of an id, identical for numpy and Python integers (and for bytes and str)."""
    if isinstance(x, bytes | np.bytes_):
        return bytes(x).decode("utf-8", "replace")
    if isinstance(x, np.integer | int):
        return str(int(x))
    return str(x)


def unit_hash(object_id: Sequence[Any] | np.ndarray, salt: str) -> np.ndarray:
    """(N,) floats in [0, 1): a keyed hash of each id (same id and salt -> same value, on any machine)."""
    key = salt.encode()
    out = np.empty(len(object_id), dtype=np.float64)
    for i, x in enumerate(object_id):
        digest = hashlib.blake2b(_id_text(x).encode(), digest_size=8, key=key).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


def _order(values: np.ndarray) -> np.ndarray:
    return np.argsort(values, kind="stable")


def _size_key(size: Any) -> SizeKey:
    if isinstance(size, str):
        if size != ALL:
            raise ValueError(f"sizes: expected positive integers or 'all', got {size!r}")
        return ALL
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or int(size) < 2:
        raise ValueError(f"sizes: expected integers >= 2 or 'all', got {size!r}")
    return int(size)


@dataclass(frozen=True)
class Subset:
    """The labelled rows one method run may use: ``train`` to fit, ``val`` to stop / choose
    hyper-parameters (row indices into the set the splits were made for)."""

    size: SizeKey
    """Effective size key: the requested integer, or ``"all"`` for the whole pool."""
    seed: int
    train: np.ndarray
    val: np.ndarray
    requested: tuple[SizeKey, ...]
    """The requested sizes that map onto this subset (several when they collapsed to ``"all"``)."""

    @property
    def n(self) -> int:
        """Labels this run sees in total (train + validation)."""
        return int(self.train.size + self.val.size)

    @property
    def indices(self) -> np.ndarray:
        return np.sort(np.concatenate([self.train, self.val]))


@dataclass
class Splits:
    """Fixed test rows plus one :class:`Subset` per (effective size, seed); see the module doc."""

    object_id: np.ndarray
    test: np.ndarray
    pool: np.ndarray
    subsets: dict[tuple[SizeKey, int], Subset]
    effective: dict[SizeKey, SizeKey]
    """Requested size -> effective size key."""
    params: dict[str, Any] = field(default_factory=dict)

    def subset(self, size: SizeKey, seed: int) -> Subset:
        """The subset of a requested (or effective) size and a seed."""
        key = self.effective.get(size, size)
        try:
            return self.subsets[(key, seed)]
        except KeyError:
            raise KeyError(f"no subset for size {size!r}, seed {seed}; have sizes "
                           f"{list(self.effective)} and seeds {list(self.params.get('seeds', []))}") from None

    def __iter__(self) -> Iterator[Subset]:
        """Subsets by increasing size (``"all"`` last), then seed."""
        return iter(self.subsets.values())

    def test_digest(self) -> str:
        """Short fingerprint of the test ids, for checking that two reports used the same test set."""
        text = "\n".join(sorted(_id_text(x) for x in self.object_id[self.test]))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def to_dict(self, include_ids: bool = False) -> dict[str, Any]:
        """JSON-serialisable description (counts, effective sizes, digest; object ids on request)."""
        def ids(rows: np.ndarray) -> list[Any]:
            return [x.item() if isinstance(x, np.generic) else x for x in self.object_id[np.sort(rows)]]

        out: dict[str, Any] = {
            "scheme": "blake2b(object_id) keyed 'test' < test_fraction; nested subsets ordered by a hash keyed on "
                      "the seed; validation carved out of each subset",
            **self.params,
            "n_test": int(self.test.size), "n_pool": int(self.pool.size), "test_digest": self.test_digest(),
            "effective_sizes": {str(k): v for k, v in self.effective.items()},
            "subsets": [],
        }
        if include_ids:
            out["test_object_ids"] = ids(self.test)
        for s in self:
            entry: dict[str, Any] = {"size": s.size, "seed": s.seed, "n": s.n, "n_train": int(s.train.size),
                                     "n_val": int(s.val.size), "requested": list(s.requested)}
            if include_ids:
                entry["train_object_ids"] = ids(s.train)
                entry["val_object_ids"] = ids(s.val)
            out["subsets"].append(entry)
        return out


def n_validation(n: int, val_fraction: float, min_val: int) -> int:
    """Validation rows carved out of a subset of n labels (at least min_val, at most half)."""
    return int(min(max(min_val, round(val_fraction * n)), n // 2))


def make_splits(object_id: Sequence[Any] | np.ndarray, has_label: np.ndarray, test_fraction: float = 0.2,
                sizes: Sequence[int | str] = (100, 300, 1000, 3000, ALL), seeds: Sequence[int] = (0, 1, 2),
                val_fraction: float = 0.2, min_val: int = 10) -> Splits:
    """Splits of the rows of one labelled set for one target (``has_label``: rows whose label is known)."""
    object_id = np.asarray(object_id)
    has_label = np.asarray(has_label, dtype=bool)
    if object_id.ndim != 1 or has_label.shape != object_id.shape:
        raise ValueError(f"object_id {object_id.shape} and has_label {has_label.shape}: expected equal (N,) shapes")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    if min_val < 0:
        raise ValueError(f"min_val: expected >= 0, got {min_val}")
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    keys = [_size_key(s) for s in sizes]
    if not keys:
        raise ValueError("sizes: expected at least one size")
    labelled = np.nonzero(has_label)[0]
    if labelled.size == 0:
        raise ValueError("no labelled rows to split")
    in_test = unit_hash(object_id[labelled], "test") < test_fraction
    test, pool = labelled[in_test], labelled[~in_test]
    if test.size == 0:
        raise ValueError(f"none of the {labelled.size} labelled objects falls in the test set "
                         f"(test_fraction={test_fraction}); more labelled objects are needed")
    if pool.size < 2:
        raise ValueError(f"only {pool.size} labelled objects remain for training after the test set")

    effective: dict[SizeKey, SizeKey] = {}
    for k in sorted(set(keys), key=lambda k: (k == ALL, 0 if k == ALL else k)):
        effective[k] = ALL if k == ALL or k >= pool.size else k
    subsets: dict[tuple[SizeKey, int], Subset] = {}
    for eff in dict.fromkeys(effective.values()):
        requested = tuple(k for k, v in effective.items() if v == eff)
        n = pool.size if eff == ALL else int(eff)
        for seed in seeds:
            seed = int(seed)
            chosen = pool[_order(unit_hash(object_id[pool], f"train:{seed}"))[:n]]
            n_val = n_validation(n, val_fraction, min_val)
            val_first = _order(unit_hash(object_id[chosen], f"val:{seed}"))
            subsets[(eff, seed)] = Subset(size=eff, seed=seed, train=np.sort(chosen[val_first[n_val:]]),
                                          val=np.sort(chosen[val_first[:n_val]]), requested=requested)
    params = {"test_fraction": test_fraction, "val_fraction": val_fraction, "min_val": min_val,
              "sizes": [k for k in keys], "seeds": [int(s) for s in seeds], "n_objects": int(object_id.size),
              "n_labelled": int(labelled.size)}
    return Splits(object_id=object_id, test=np.sort(test), pool=np.sort(pool), subsets=subsets,
                  effective=effective, params=params)

"""Labelled objects for downstream evaluation: inputs (typed batches) + physical labels, row-aligned.

The labels are the PROVABGS catalogue columns (``provabgs_*`` modalities, e.g. LOG_MSTAR),
cross-matched onto the parent survey (Legacy Survey) like every other survey, so the same
object has its images, photometry, spectrum and labels in one row. Objects without any of the
requested labels are dropped; a label an object lacks is NaN (tasks skip those rows).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from aion import modalities as registry
from aion.data.batches import Modal, concat_batches

LEGACY_PHOTOMETRY = tuple(f"legacysurvey_flux_{b}" for b in ("g", "r", "i", "z", "w1", "w2", "w3", "w4"))
INPUT_SETS: dict[str, tuple[str, ...]] = {
    "photometry": LEGACY_PHOTOMETRY,
    "photometry+image": (*LEGACY_PHOTOMETRY, "legacysurvey_image"),
    "photometry+image+spectrum": (*LEGACY_PHOTOMETRY, "legacysurvey_image", "desi_spectrum"),
}
TARGETS = ("provabgs_log_mstar", "provabgs_z", "provabgs_ssfr", "provabgs_tage_mw", "provabgs_z_mw")


@dataclass
class LabelledSet:
    """N objects: ``inputs[modality]`` typed batches of N rows (absent rows marked as such inside the
    batch), ``labels[target]`` (N,) float64 with NaN where unknown."""

    object_id: np.ndarray
    inputs: dict[str, Modal]
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.object_id.shape[0])

    def select(self, index) -> LabelledSet:
        index = np.asarray(index)
        return LabelledSet(object_id=self.object_id[index],
                           inputs={k: v.select(index) for k, v in self.inputs.items()},
                           labels={k: v[index] for k, v in self.labels.items()})

    def restrict(self, modalities: Sequence[str]) -> dict[str, Modal]:
        """The inputs of one input set (modalities this set lacks are simply absent)."""
        return {k: v for k, v in self.inputs.items() if k in modalities}

    def has_label(self, target: str) -> np.ndarray:
        return np.isfinite(self.labels[target])


def load_labelled_set(data_root: str | os.PathLike, targets: Sequence[str] = TARGETS,
                      modalities: Sequence[str] | None = None, *, parent: str = "legacysurvey",
                      surveys: Sequence[str] = ("desi", "provabgs"), batch_size: int = 256,
                      max_objects: int | None = None) -> LabelledSet:
    """Every object of ``data_root`` with at least one of ``targets``, with the ``modalities``
    (default: those of every input set) read through the usual one-to-one sky cross-match."""
    from aion.inference.io import _expand, iter_objects

    for t in targets:
        mod = registry.modality(t)  # KeyError names the known ones
        if mod.kind != "scalar":
            raise ValueError(f"target {t!r} is a {mod.kind} modality; targets must be scalars")
    mods = sorted({m for s in INPUT_SETS.values() for m in s} if modalities is None else set(modalities))
    wanted = sorted({*mods, *targets})
    join = [s for s in surveys if s != parent]
    ids, labels, inputs = [], {t: [] for t in targets}, {m: [] for m in mods}
    n = 0
    for batch_ids, objects in iter_objects(data_root, [parent, *join], batch_size=batch_size, modalities=wanted):
        have = np.zeros(len(batch_ids), dtype=bool)
        for t in targets:
            if t in objects:
                have |= objects[t].valid
        rows = np.nonzero(have)[0]
        if max_objects is not None:
            rows = rows[: max(0, max_objects - n)]
        if rows.size == 0:
            continue
        n += rows.size
        ids.append(np.asarray(batch_ids)[rows])
        for t in targets:
            vals = np.full(rows.size, np.nan)
            if t in objects:
                sub = objects[t].select(rows)
                vals = np.where(sub.valid, sub.values, np.nan)
            labels[t].append(vals)
        for m in mods:
            if m in objects:
                inputs[m].append(objects[m].select(rows))
            else:
                inputs[m].append(rows.size)  # no object of this batch has it: filled in below
        if max_objects is not None and n >= max_objects:
            break
    if not ids:
        raise ValueError(f"{data_root}: no object has any of the targets {list(targets)}")
    out_inputs: dict[str, Modal] = {}
    for m, parts in inputs.items():
        real = [p for p in parts if not isinstance(p, int)]
        if not real:
            continue
        out_inputs[m] = concat_batches([p if not isinstance(p, int) else _expand(real[0], np.zeros(0, np.int64), p)
                                 for p in parts])
    return LabelledSet(object_id=np.concatenate(ids), inputs=out_inputs,
                       labels={t: np.concatenate(v) for t, v in labels.items()})


@runtime_checkable
class Method(Protocol):
    """A trainable predictor of one scalar label from one input set: foundation-model heads,
    fine-tuning and from-scratch baselines all implement it, so a suite treats them alike."""

    name: str

    def fit(self, train: LabelledSet, val: LabelledSet, target: str, input_set: tuple[str, ...],
            seed: int) -> Method: ...

    def predict(self, data: LabelledSet) -> np.ndarray: ...

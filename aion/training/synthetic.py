"""Synthetic packed batches with AION-1 token shapes, for throughput benchmarks (no data on disk).

Every object has every modality and full budgets: ``input_budget`` inputs and ``target_budget``
targets drawn uniformly from all of its token positions, so batches have no padding and the
model-FLOPs count (:mod:`aion.training.flops`) is exact.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from aion import modalities as registry
from aion.model.config import ModalitySpec


def realistic_table(image_vocab: int = 1000) -> dict[str, ModalitySpec]:
    """Every registered modality with AION-1 token shapes: 2 images of 576 tokens (24x24, vocab 1000),
    2 spectra of 273 (vocab 2048), 25 scalars of 1-2 tokens (vocab 1024, + fine bins up to 1088)."""
    table = {}
    for name, m in registry.modalities().items():
        if m.kind == "image":
            table[name] = ModalitySpec(num_tokens=576, vocab_size=image_vocab)
        elif m.kind == "spectrum":
            table[name] = ModalitySpec(num_tokens=273, vocab_size=2048)
        elif name.startswith("legacysurvey_flux_"):
            table[name] = ModalitySpec(num_tokens=2, vocab_size=1024 + 32)
        elif name.startswith("hsc_mag_") or name in ("desi_z", "sdss_z"):
            table[name] = ModalitySpec(num_tokens=2, vocab_size=1024 + 64)
        else:
            table[name] = ModalitySpec(num_tokens=1, vocab_size=1024)
    return table


def synthetic_batch(table: dict[str, ModalitySpec], objects: int, input_budget: int = 256,
                    target_budget: int = 128, *, generator: torch.Generator | None = None,
                    device: str | torch.device = "cpu") -> dict:
    """A packed batch (format of :func:`aion.training.masking.collate`) of ``objects`` fully observed objects."""
    names = tuple(sorted(table))
    sizes = torch.tensor([table[n].num_tokens for n in names])
    vocab = torch.tensor([table[n].vocab_size for n in names])
    offsets = torch.cumsum(sizes, 0) - sizes
    total = int(sizes.sum())
    if input_budget + target_budget > total:
        raise ValueError(f"budgets {input_budget} + {target_budget} exceed the {total} tokens of an object")
    order = torch.rand(objects, total, generator=generator).argsort(dim=1)
    batch: dict = {"modalities": names}
    for side, cols in (("input", order[:, :input_budget]), ("target", order[:, input_budget:input_budget
                                                                            + target_budget])):
        cols = cols.contiguous()
        mod = torch.searchsorted(offsets, cols, right=True) - 1
        pos = cols - offsets[mod]
        tokens = (torch.rand(cols.shape, generator=generator) * vocab[mod]).long()
        mask = torch.ones(cols.shape, dtype=torch.bool)
        batch.update({f"{side}_tokens": tokens, f"{side}_modality": mod, f"{side}_position": pos,
                      f"{side}_mask": mask, f"num_{side}s": mask.sum(1)})
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def target_counts(batch: dict) -> dict[str, float]:
    """Mean target tokens per object, per modality (the heads' share of :func:`aion.training.flops.step_flops`)."""
    names = batch["modalities"]
    mod = batch["target_modality"][batch["target_mask"]].tolist()
    objects = batch["target_tokens"].shape[0]
    return {names[i]: c / objects for i, c in Counter(mod).items()}


def write_token_root(path: str | os.PathLike, table: dict[str, ModalitySpec], objects: int, *, seed: int = 0,
                     shard_size: int = 4096) -> Path:
    """A pre-tokenized root (layout of :mod:`aion.tokenizers.pretokenize`) of random, fully observed objects:
    lets the real data path (TokenShardDataset, masking, DataLoader workers) be timed without tokenizers."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for k, start in enumerate(range(0, objects, shard_size)):
        n = min(shard_size, objects - start)
        shard = root / f"shard_{k:05d}"
        shard.mkdir(exist_ok=True)
        np.save(shard / "object_id.npy", np.arange(start, start + n, dtype=np.int64))
        for name, spec in table.items():
            dtype = np.int16 if spec.vocab_size <= 2**15 else np.int32
            np.save(shard / f"{name}.npy", rng.integers(0, spec.vocab_size, (n, spec.num_tokens)).astype(dtype))
            np.save(shard / f"{name}.present.npy", np.ones(n, dtype=bool))
        shards.append({"name": shard.name, "n": n})
    known = registry.modalities()
    index = {"n_objects": objects, "parent": "synthetic", "shards": shards, "joins": {},
             "modalities": {name: {"num_tokens": spec.num_tokens, "vocab_size": spec.vocab_size,
                                   "survey": known[name].survey if name in known else "synthetic",
                                   "present": objects, "role": known[name].role if name in known else "input"}
                            for name, spec in sorted(table.items())}}
    (root / "index.json").write_text(json.dumps(index, indent=1))
    return root

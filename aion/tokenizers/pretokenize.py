"""Pre-tokenize surveys into memory-mappable token shards with per-object presence masks.

Objects are the rows of a parent survey (by default the Legacy Survey imaging catalogue);
other surveys are joined by a one-to-one sky cross-match (1 arcsec), so an object has a
spectrum only if DESI observed it. Each modality that has a tokenizer becomes, per shard,

    <out>/shard_00000/<modality>.npy          tokens, (n, num_tokens), int32
    <out>/shard_00000/<modality>.present.npy  presence, (n,), bool
    <out>/shard_00000/object_id.npy           parent object ids, (n,), int64

plus ``<out>/index.json`` (modalities with num_tokens / vocab_size, shard sizes, joins).
Shard boundaries depend only on the parent row count and ``shard_size``; a shard
directory appears complete or not at all (temp dir + rename), so an interrupted run
resumes by skipping the shards that exist. Memory is bounded by one batch of rows.
Arrays are plain ``.npy`` (loaded with ``allow_pickle=False``; ``mmap_mode="r"`` works).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aion import modalities as registry
from aion.config import to_dict
from aion.data.batches import SurveyBatch
from aion.data.crossmatch import crossmatch
from aion.data.mmu import SurveyShards, columns_to_survey_batch
from aion.data.token_shards import INDEX_NAME, load_token_shard  # noqa: F401  (re-exported)
from aion.tokenizers.base import CONFIG_NAME, Tokenizer, load_tokenizer

CONFIG_FILE = "pretokenize_config.json"


@dataclass(kw_only=True)
class PretokenizeConfig:
    parent: str = "legacysurvey"
    """Survey whose rows are the objects."""
    join: tuple[str, ...] | None = None
    """Surveys cross-matched onto the parent; None = every registered survey found under the data root."""
    config: str | None = None
    """MMU config directory to read (None = all configs of each survey)."""
    radius_arcsec: float = 1.0
    shard_size: int = 4096
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be >= 1")
        if self.radius_arcsec <= 0:
            raise ValueError(f"radius_arcsec: expected > 0, got {self.radius_arcsec}")


def load_tokenizer_set(directory: str | os.PathLike) -> dict[str, Tokenizer]:
    """Every tokenizer saved under ``directory`` (any depth), keyed by the modalities it serves."""
    directory = Path(directory)
    found = sorted(p.parent for p in directory.rglob(CONFIG_NAME))
    if not found:
        raise FileNotFoundError(f"{directory}: no saved tokenizers (no {CONFIG_NAME} below it)")
    out: dict[str, Tokenizer] = {}
    where: dict[str, Path] = {}
    for path in found:
        tok = load_tokenizer(path)
        for name in tok.modalities:
            registry.modality(name)  # unknown names fail loudly
            if name in out:
                raise ValueError(f"modality {name!r} has two tokenizers: {where[name]} and {path}")
            out[name] = tok
            where[name] = path
    return out


def _join_surveys(root: Path, cfg: PretokenizeConfig) -> list[str]:
    if cfg.join is not None:
        return list(cfg.join)
    names = [s for s in registry.surveys() if s != cfg.parent and (root / s).is_dir()]
    return names


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.int32) if vocab_size < 2**31 else np.dtype(np.int64)


class _Joined:
    """One joined survey: its shards and, for each parent row, the matched row (or -1)."""

    def __init__(self, root: Path, survey: str, parent_pos: tuple[np.ndarray, np.ndarray], cfg: PretokenizeConfig):
        self.survey = survey
        self.shards = SurveyShards(root, survey, cfg.config)
        match = crossmatch(parent_pos, (self.shards.read_column("ra"), self.shards.read_column("dec")),
                           cfg.radius_arcsec)
        self.row_of_parent = np.full(len(parent_pos[0]), -1, dtype=np.int64)
        self.row_of_parent[match.left_index] = match.right_index
        self.n_matched = len(match)
        self.n_duplicates_dropped = match.n_duplicates_dropped


def _encode_present(tok: Tokenizer, batch: SurveyBatch, name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    present = batch.present(name)
    tokens = np.zeros((n, tok.num_tokens), dtype=_token_dtype(tok.vocab_size))
    if present.any():
        sub = batch.modalities[name].select(np.nonzero(present)[0])
        with torch.no_grad():
            enc = tok.encode(sub)
        if enc.shape != (int(present.sum()), tok.num_tokens):
            raise RuntimeError(f"{name}: tokenizer returned shape {tuple(enc.shape)}, "
                               f"expected {(int(present.sum()), tok.num_tokens)}")
        enc = enc.cpu().numpy()
        if enc.min() < 0 or enc.max() >= tok.vocab_size:
            raise RuntimeError(f"{name}: token values outside [0, {tok.vocab_size})")
        tokens[present] = enc
    return tokens, present


def pretokenize(data_root: str | os.PathLike, tokenizers: dict[str, Tokenizer] | str | os.PathLike,
                out: str | os.PathLike, cfg: PretokenizeConfig | None = None, progress: bool = True) -> dict:
    """Write token shards for every object of ``cfg.parent``; returns the index (also written)."""
    from tqdm.auto import tqdm

    cfg = cfg or PretokenizeConfig()
    root, out = Path(data_root), Path(out)
    toks = load_tokenizer_set(tokenizers) if not isinstance(tokenizers, dict) else tokenizers
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"config": to_dict(cfg), "tokenizers": {k: {"type": t.tokenizer_type, **t.get_config()}
                                                       for k, t in sorted(toks.items())}}
    cfg_path = out / CONFIG_FILE
    if cfg_path.exists():
        previous = json.loads(cfg_path.read_text())
        if previous != json.loads(json.dumps(resolved)):
            raise ValueError(f"{out} holds shards made with another configuration or tokenizers "
                             f"(see {cfg_path}); use a new output directory")
    else:
        _atomic_write_text(cfg_path, json.dumps(resolved, indent=2, sort_keys=True))

    parent = SurveyShards(root, cfg.parent, cfg.config)
    parent_pos = (parent.read_column("ra"), parent.read_column("dec"))
    joined = [_Joined(root, s, parent_pos, cfg) for s in _join_surveys(root, cfg)]
    surveys = [cfg.parent, *(j.survey for j in joined)]
    served = {name: tok for name, tok in toks.items() if registry.modality(name).survey in surveys}
    if not served:
        raise ValueError(f"none of the tokenizers' modalities {sorted(toks)} belong to the surveys {surveys}")

    n_total = len(parent)
    n_shards = (n_total + cfg.shard_size - 1) // cfg.shard_size
    bar = tqdm(total=n_total, desc="pre-tokenize", unit="obj", disable=not progress)
    shards = []
    for k in range(n_shards):
        lo, hi = k * cfg.shard_size, min(n_total, (k + 1) * cfg.shard_size)
        shard_dir = out / f"shard_{k:05d}"
        if not shard_dir.exists():
            _write_shard(shard_dir, lo, hi, parent, joined, served, cfg, bar)
        else:
            bar.update(hi - lo)
        shards.append({"name": shard_dir.name, "n": hi - lo})
    bar.close()

    counts = {name: 0 for name in served}
    for s in shards:
        for name in served:
            counts[name] += int(np.load(out / s["name"] / f"{name}.present.npy", allow_pickle=False).sum())
    index = {
        "n_objects": n_total, "parent": cfg.parent, "shards": shards,
        "joins": {j.survey: {"matched": j.n_matched, "duplicates_dropped": j.n_duplicates_dropped} for j in joined},
        "modalities": {name: {"num_tokens": tok.num_tokens, "vocab_size": tok.vocab_size,
                              "survey": registry.modality(name).survey, "present": counts[name],
                              "role": registry.modality(name).role,
                              "ordinal": [list(r) for r in tok.ordinal_ranges]}
                       for name, tok in sorted(served.items())},
    }
    _atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2))
    return index


def _write_shard(shard_dir: Path, lo: int, hi: int, parent: SurveyShards, joined: list[_Joined],
                 served: dict[str, Tokenizer], cfg: PretokenizeConfig, bar) -> None:
    n = hi - lo
    arrays: dict[str, np.ndarray] = {"object_id": np.zeros(n, dtype=np.int64)}
    for name, tok in served.items():
        arrays[name] = np.zeros((n, tok.num_tokens), dtype=_token_dtype(tok.vocab_size))
        arrays[f"{name}.present"] = np.zeros(n, dtype=bool)
    for start in range(lo, hi, cfg.batch_size):
        stop = min(hi, start + cfg.batch_size)
        rows = np.arange(start, stop)
        sl = slice(start - lo, stop - lo)
        batches = {cfg.parent: (columns_to_survey_batch(parent.read_rows(rows), cfg.parent), np.arange(stop - start))}
        arrays["object_id"][sl] = batches[cfg.parent][0].object_id
        for j in joined:
            other = j.row_of_parent[rows]
            have = np.nonzero(other >= 0)[0]
            if have.size:
                batches[j.survey] = (columns_to_survey_batch(j.shards.read_rows(other[have]), j.survey), have)
        for name, tok in served.items():
            survey = registry.modality(name).survey
            if survey not in batches:
                continue
            batch, where = batches[survey]
            tokens, present = _encode_present(tok, batch, name, len(batch))
            arrays[name][sl][where] = tokens
            arrays[f"{name}.present"][sl][where] = present
        bar.update(stop - start)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shard_dir.name}.", dir=shard_dir.parent))
    try:
        for key, arr in arrays.items():
            np.save(tmp / f"{key}.npy", arr, allow_pickle=False)
        os.replace(tmp, shard_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

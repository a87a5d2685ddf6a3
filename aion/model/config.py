"""Model configuration: architecture presets plus the per-modality token table.

The token table (``num_tokens`` and ``vocab_size`` of each modality) has one source of
truth, the ``modalities`` table of a pre-tokenized root's ``index.json``; recipes name a
preset and overrides, never the table itself (see :func:`build_config`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aion.config import from_dict

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(kw_only=True)
class ModalitySpec:
    """What the model needs to know about one modality's tokens."""

    num_tokens: int
    """Token positions per object (576 for a 24x24 image grid, 1 or 2 for a scalar)."""
    vocab_size: int
    """Token ids are in ``[0, vocab_size)``."""
    ordinal: tuple[tuple[int, int], ...] = ()
    """Id ranges ``[lo, hi)`` of ordered bins (scalar tokens; from the tokenizer via the token index),
    where :attr:`ModelConfig.ordinal_sigma` spreads the training target over neighbouring bins."""

    def __post_init__(self) -> None:
        if int(self.num_tokens) < 1 or int(self.vocab_size) < 1:
            raise ValueError(f"num_tokens and vocab_size must be >= 1, got {self.num_tokens}, {self.vocab_size}")
        self.num_tokens, self.vocab_size = int(self.num_tokens), int(self.vocab_size)
        ranges = tuple((int(lo), int(hi)) for lo, hi in self.ordinal)
        for lo, hi in ranges:
            if not 0 <= lo < hi <= self.vocab_size:
                raise ValueError(f"ordinal range [{lo}, {hi}) is not inside [0, {self.vocab_size})")
        if any(a[1] > b[0] for a, b in zip(sorted(ranges), sorted(ranges)[1:], strict=False)):
            raise ValueError(f"ordinal ranges {ranges} overlap")
        self.ordinal = ranges


@dataclass(kw_only=True)
class ModelConfig:
    """A 4M-style encoder-decoder; ``modalities`` fixes every embedding table and output head."""

    dim: int
    encoder_depth: int
    decoder_depth: int
    heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    """Residual and attention dropout (AION-1 / 4M pretrain without it)."""
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass: less activation memory for ~30% more compute."""
    ordinal_features: int = 0
    """Frequencies of a smooth code of each ordinal id's place in its range, linearly projected and
    added to its (still learned) token embedding (0 = off). Quantile bins of a scalar are ordered,
    but independent random embeddings do not know it: each of 1024 rows must be learned from the
    few objects in its bin. With the code, an input flux is continuous from the first step."""
    ordinal_sigma: float = 0.0
    """Training targets of ordinal tokens (scalar bins, :attr:`ModalitySpec.ordinal`) become a Gaussian
    of this many bins around the true bin (0 = plain cross-entropy). Plain cross-entropy gives a
    neighbouring bin no more credit than a far one, so a 1024-bin scalar learns slowly; the price is
    a predicted PDF broadened by about this many bins."""
    modalities: dict[str, ModalitySpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dim < 1 or self.heads < 1 or self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a positive multiple of heads ({self.heads})")
        if self.encoder_depth < 1 or self.decoder_depth < 1:
            raise ValueError(f"encoder_depth and decoder_depth must be >= 1, got "
                             f"{self.encoder_depth}, {self.decoder_depth}")
        if self.mlp_ratio <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"mlp_ratio must be > 0 and dropout in [0, 1), got {self.mlp_ratio}, {self.dropout}")
        if self.ordinal_features < 0:
            raise ValueError(f"ordinal_features must be >= 0, got {self.ordinal_features}")
        if self.ordinal_sigma < 0:
            raise ValueError(f"ordinal_sigma must be >= 0, got {self.ordinal_sigma}")
        if not self.modalities:
            raise ValueError("modalities: empty; take the table from the token index (modality_specs_from_index)")
        self.modalities = _specs(self.modalities)


def _specs(table: Mapping[str, ModalitySpec | Mapping[str, Any]]) -> dict[str, ModalitySpec]:
    out = {}
    for name, spec in table.items():
        if not _NAME.match(name):
            raise ValueError(f"modality name {name!r}: expected letters, digits, '_' or '-'")
        out[name] = spec if isinstance(spec, ModalitySpec) else from_dict(ModalitySpec, dict(spec),
                                                                           f"modalities.{name}")
    return out


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: tests and laptop runs.
    "tiny": {"dim": 64, "encoder_depth": 2, "decoder_depth": 2, "heads": 4},
    "mini": {"dim": 128, "encoder_depth": 3, "decoder_depth": 3, "heads": 4},
    "small": {"dim": 256, "encoder_depth": 4, "decoder_depth": 4, "heads": 4},
    # AION-1 sizes (Base ~300M, Large ~800M, XLarge ~3B parameters).
    "base": {"dim": 768, "encoder_depth": 12, "decoder_depth": 12, "heads": 12},
    "large": {"dim": 1024, "encoder_depth": 24, "decoder_depth": 24, "heads": 16},
    "xlarge": {"dim": 2048, "encoder_depth": 24, "decoder_depth": 24, "heads": 32},
}


def preset(name: str, modalities: Mapping[str, ModalitySpec | Mapping[str, Any]], **overrides: Any) -> ModelConfig:
    """The named architecture for this token table, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return from_dict(ModelConfig, {**PRESETS[name], **overrides, "modalities": dict(modalities)},
                     f"ModelConfig[{name}]")


def build_config(data: Mapping[str, Any] | None,
                 modalities: Mapping[str, ModalitySpec | Mapping[str, Any]]) -> ModelConfig:
    """A recipe's ``model:`` mapping (``preset: name`` plus overrides, or every field) + the index's table.

    A ``modalities`` key in the recipe is an error: the table comes from the token index only,
    so a model can never disagree with the tokens it reads.
    """
    data = dict(data or {})
    if "modalities" in data:
        raise ValueError("model recipe: 'modalities' must not be set; it is read from the token index.json")
    name = data.pop("preset", None)
    if name is None:
        return from_dict(ModelConfig, {**data, "modalities": dict(modalities)})
    return preset(name, modalities, **data)


def modality_specs_from_index(index: Mapping[str, Any] | str | os.PathLike,
                              names: list[str] | None = None) -> dict[str, ModalitySpec]:
    """``index.json`` (a pre-tokenized root, the file, or its parsed dict) -> {name: ModalitySpec}, sorted."""
    if not isinstance(index, Mapping):
        path = Path(index)
        path = path / "index.json" if path.is_dir() else path
        index = json.loads(path.read_text())
    table = index.get("modalities")
    if not isinstance(table, Mapping) or not table:
        raise ValueError("token index: missing or empty 'modalities' table")
    names = sorted(table) if names is None else list(names)
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"token index has no modality {missing}; it has {sorted(table)}")
    return {n: ModalitySpec(num_tokens=table[n]["num_tokens"], vocab_size=table[n]["vocab_size"],
                            ordinal=tuple(tuple(r) for r in table[n].get("ordinal", ())))
            for n in sorted(names)}


def with_modalities(cfg: ModelConfig, modalities: Mapping[str, ModalitySpec | Mapping[str, Any]]) -> ModelConfig:
    """The same architecture over another token table (e.g. a fine-tuning set with a new modality)."""
    return replace(cfg, modalities=_specs(modalities))

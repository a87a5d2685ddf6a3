"""The one tokenizer interface, shared by trained (image, spectrum) and fitted (scalar) codecs.

A tokenizer turns a typed batch of one modality into ``LongTensor[B, num_tokens]`` with
values in ``[0, vocab_size)`` and back into physical units. It is saved as a directory
holding ``config.json`` (everything needed to rebuild it, including ``tokenizer_type``)
and ``model.safetensors`` (tensors: network weights, fitted bin edges); never pickle.

Presence is not the tokenizer's business: ``encode`` also returns tokens for objects
whose data are absent (their rows are meaningless) and the caller keeps the batch's
presence mask next to the tokens (see ``SurveyBatch.present``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from aion.files import replace_directory

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_TOKENIZER_TYPES: dict[str, type[Tokenizer]] = {}


BUILTIN_TOKENIZER_MODULES = ("aion.tokenizers.image", "aion.tokenizers.spectrum", "aion.tokenizers.scalar")
"""Imported on first load so that their types are known without the caller importing them."""


def check_recipe_kind(kind: str, expected: str) -> None:
    """A recipe's ``kind`` key must name the trainer it is handed to."""
    if kind != expected:
        raise ValueError(f"recipe kind: this is a {expected!r} recipe loader, the recipe says kind={kind!r}")


def register_tokenizer(cls: type[Tokenizer]) -> type[Tokenizer]:
    """Class decorator: makes a tokenizer type loadable by :func:`load_tokenizer`."""
    name = cls.tokenizer_type
    if name in _TOKENIZER_TYPES and _TOKENIZER_TYPES[name] is not cls:
        raise ValueError(f"tokenizer type {name!r} is already registered")
    _TOKENIZER_TYPES[name] = cls
    return cls


class Tokenizer(ABC):
    """Base class. Subclasses set ``tokenizer_type`` and implement the abstract methods."""

    tokenizer_type: ClassVar[str]

    @property
    @abstractmethod
    def modalities(self) -> tuple[str, ...]:
        """Registry names of the modalities this tokenizer encodes (an image tokenizer may serve several)."""

    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """Tokens per object."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Token values lie in [0, vocab_size)."""

    @property
    def ordinal_ranges(self) -> tuple[tuple[int, int], ...]:
        """Token-id ranges ``[lo, hi)`` whose ids are ordered bins of one quantity (scalar tokens),
        so a near miss is better than a far one; empty for codebook tokens (images, spectra)."""
        return ()

    @abstractmethod
    def encode(self, batch: Any) -> torch.Tensor:
        """Typed batch -> LongTensor[B, num_tokens]."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor, **context: Any) -> Any:
        """LongTensor[B, num_tokens] -> typed batch in physical units.

        ``context`` carries what tokens cannot (e.g. band names or the wavelength grid wanted).
        """

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild this tokenizer with ``from_config``."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> Tokenizer:
        """Rebuild an (untrained / unfitted) tokenizer from its config."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to reproduce the tokens (weights, bin edges)."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of ``state_tensors``."""

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors; the directory appears complete or not at all."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            config = {"tokenizer_type": self.tokenizer_type, **self.get_config()}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"tokenizer_type": self.tokenizer_type})
            replace_directory(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Tokenizer:
        tok = load_tokenizer(directory)
        if not isinstance(tok, cls):
            raise TypeError(f"{directory} holds a {type(tok).__name__}, not a {cls.__name__}")
        return tok


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load any registered tokenizer type from a ``save_pretrained`` directory."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; expected a directory written by save_pretrained")
    config = json.loads(cfg_path.read_text())
    kind = config.pop("tokenizer_type", None)
    if kind not in _TOKENIZER_TYPES:
        import importlib

        for module in BUILTIN_TOKENIZER_MODULES:
            importlib.import_module(module)
    if kind not in _TOKENIZER_TYPES:
        raise ValueError(f"{cfg_path}: unknown tokenizer_type {kind!r}; known: {sorted(_TOKENIZER_TYPES)}")
    tok = _TOKENIZER_TYPES[kind].from_config(config)
    tok.load_state_tensors(load_file(str(directory / WEIGHTS_NAME)))
    return tok

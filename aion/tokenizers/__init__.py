"""Modality tokenizers: typed batches <-> discrete tokens (see ``base.Tokenizer``)."""

from aion.tokenizers.base import Tokenizer, load_tokenizer, register_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "register_tokenizer"]

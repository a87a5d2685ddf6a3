"""Masked multimodal pretraining: masking sampler, packed batches and token-shard datasets."""

from aion.training.masking import (
    MaskedDataset,
    MaskedSample,
    MaskingConfig,
    MaskingSampler,
    TokenShardDataset,
    collate,
    split_budget,
    to_device,
)

__all__ = ["MaskedDataset", "MaskedSample", "MaskingConfig", "MaskingSampler", "TokenShardDataset", "collate",
           "split_budget", "to_device"]

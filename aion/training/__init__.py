"""Masked multimodal pretraining: masking sampler, packed batches, token-shard datasets, and the
accelerate training loop (recipes, crash-safe checkpoints, export for inference)."""

from aion.training.checkpoint import export_model, latest_checkpoint, load_pretrained
from aion.training.config import PretrainConfig, config_from_dict, load_recipe, with_overrides
from aion.training.loop import NonFiniteLossError, Pretrainer, pretrain, read_metrics
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

__all__ = ["MaskedDataset", "MaskedSample", "MaskingConfig", "MaskingSampler", "NonFiniteLossError",
           "PretrainConfig", "Pretrainer", "TokenShardDataset", "collate", "config_from_dict", "export_model",
           "latest_checkpoint", "load_pretrained", "load_recipe", "pretrain", "read_metrics", "split_budget",
           "to_device", "with_overrides"]

"""Inference with a pretrained model: embeddings, zero-shot scalar posteriors, iterative generation."""

from aion.inference.model import (
    AionModel,
    EmbeddingResult,
    GenerationResult,
    ScalarEstimates,
    ScalarPrediction,
    Tokenized,
    mask_schedule,
    select_inputs,
)

__all__ = ["AionModel", "EmbeddingResult", "GenerationResult", "ScalarEstimates", "ScalarPrediction", "Tokenized",
           "mask_schedule", "select_inputs"]

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
    temper_probs,
)

__all__ = ["AionModel", "EmbeddingResult", "GenerationResult", "ScalarEstimates", "ScalarPrediction", "Tokenized",
           "mask_schedule", "select_inputs", "temper_probs"]

"""The end-to-end pipeline (``aion quickstart``): one recipe from data to a trained model and its report."""

from aion.pipeline.config import MockData, PipelineConfig, load_pipeline
from aion.pipeline.run import Pipeline, PipelineError, run_pipeline

__all__ = ["MockData", "Pipeline", "PipelineConfig", "PipelineError", "load_pipeline", "run_pipeline"]

"""The 4M-style masked multimodal transformer and its configuration."""

from aion.model.config import (
    PRESETS,
    ModalitySpec,
    ModelConfig,
    build_config,
    modality_specs_from_index,
    preset,
    with_modalities,
)
from aion.model.fourm import FourM

__all__ = ["PRESETS", "FourM", "ModalitySpec", "ModelConfig", "build_config", "modality_specs_from_index",
           "preset", "with_modalities"]

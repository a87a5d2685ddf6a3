"""The pipeline recipe: which data, tokenizer, pretraining and evaluation recipes one run chains.

A recipe (YAML under ``training/pipelines/``, keys of :class:`PipelineConfig`) names other recipes
rather than repeating them, so the quickstart and a multi-GPU run differ only in the files they
point at (and the launcher of the pretraining stage).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aion.config import from_dict, load_yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO / "training" / "pipelines" / "quickstart.yaml"
STAGES = ("data", "tokenizers", "tokens", "pretrain", "zeroshot", "evaluate", "discovery", "report")


@dataclass(kw_only=True)
class MockData:
    """Two mock universes with different seeds: one to train on, one held out for every measurement."""

    n_train: int = 4000
    seed_train: int = 2
    n_heldout: int = 3000
    seed_heldout: int = 1
    image_size: int = 64
    hsc_image_size: int = 96

    def __post_init__(self) -> None:
        for name in ("n_train", "n_heldout", "image_size", "hsc_image_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"mock.{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.seed_train == self.seed_heldout:
            raise ValueError(f"mock: seed_train and seed_heldout are both {self.seed_train}; the held-out "
                             "universe must differ from the training one")


@dataclass(kw_only=True)
class DiscoveryStage:
    """The discovery stage: embed the held-out objects, measure the discovery tools against the mock's
    hidden truth (:mod:`aion.discovery.evaluate`), draw a map and rank outliers."""

    condition: tuple[str, ...] = ("Z", "LOG_MSTAR")
    hidden: tuple[str, ...] = ("AGN_FRAC", "BAR_FRAC")
    guidance: tuple[float, ...] = (1.0,)
    flow: dict[str, Any] = field(default_factory=dict)
    """:class:`aion.discovery.flow.FlowConfig` overrides."""
    map_method: str = "tsne"
    map_colors: tuple[str, ...] = ("Z", "LOG_MSTAR", "AGN_FRAC", "RARE")
    map_max_objects: int = 20000
    nll_negatives: int = 1000
    nll_ode_steps: int = 16

    def __post_init__(self) -> None:
        from aion.discovery.evaluate import DiscoveryEvalConfig
        from aion.discovery.maps import METHODS

        self.condition, self.hidden = tuple(self.condition), tuple(self.hidden)
        self.guidance, self.map_colors = tuple(float(g) for g in self.guidance), tuple(self.map_colors)
        DiscoveryEvalConfig(conditions=self.condition, hidden=self.hidden, guidance=self.guidance)  # validates
        if self.map_method not in METHODS:
            raise ValueError(f"discovery.map_method: expected one of {list(METHODS)}, got {self.map_method!r}")
        if self.map_max_objects < 1:
            raise ValueError(f"discovery.map_max_objects: expected >= 1, got {self.map_max_objects}")


@dataclass(kw_only=True)
class PipelineConfig:
    name: str = "quickstart"
    out_dir: str = "runs/quickstart"
    mock: MockData | None = field(default_factory=MockData)
    """Generate the data (None: use ``train_data`` / ``heldout_data``)."""
    train_data: str | None = None
    """An MMU data root to train on instead of a mock (then ``heldout_data`` is required too)."""
    heldout_data: str | None = None
    tokenizers: tuple[str, ...] = ("tokenizers/scalars.yaml", "tokenizers/image_quick.yaml",
                                   "tokenizers/spectrum_quick.yaml")
    pretrain: str = "training/quickstart_cpu.yaml"
    launcher: tuple[str, ...] = ()
    """Command prefix that runs the pretraining stage in several processes, e.g. ``[accelerate, launch,
    --config_file, training/launch/accelerate_config_8gpu.yaml]`` (empty: in this process)."""
    zeroshot: dict[str, Any] = field(default_factory=dict)
    """Options of :class:`aion.evaluation.zeroshot.ZeroShotConfig`."""
    evaluate: str = "evaluation/quickstart.yaml"
    discovery: DiscoveryStage | None = field(default_factory=DiscoveryStage)
    """Discovery tools on the held-out objects (None: skip; the measurement needs a mock's ``truth``)."""
    threads: int | None = None
    """torch threads of this process (None: torch's default, one per physical core)."""
    estimate_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each stage on ``reference_machine``, for the time estimate."""
    reference_machine: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.mock, dict):
            self.mock = from_dict(MockData, self.mock, "mock")
        if isinstance(self.discovery, dict):
            self.discovery = from_dict(DiscoveryStage, self.discovery, "discovery")
        if self.mock is None and (self.train_data is None or self.heldout_data is None):
            raise ValueError("mock is null: give both train_data and heldout_data (MMU data roots)")
        if self.mock is not None and (self.train_data is not None or self.heldout_data is not None):
            raise ValueError("give either mock or train_data + heldout_data, not both")
        if not self.tokenizers:
            raise ValueError("tokenizers: expected at least one tokenizer recipe")
        stems = [Path(t).stem for t in self.tokenizers]
        if len(set(stems)) != len(stems):
            raise ValueError(f"tokenizers: recipe file names must differ (each trains into tokenizers/<name>): {stems}")
        unknown = sorted(set(self.estimate_seconds) - set(STAGES))
        if unknown:
            raise ValueError(f"estimate_seconds: unknown stage(s) {unknown}; stages are {list(STAGES)}")
        if self.threads is not None and int(self.threads) < 1:
            raise ValueError(f"threads: expected a positive integer or null, got {self.threads!r}")
        from aion.evaluation.zeroshot import ZeroShotConfig

        try:  # unknown keys fail now, not after pretraining
            ZeroShotConfig(**self.zeroshot)
        except TypeError as err:
            raise ValueError(f"zeroshot: {err}") from None


def resolve_path(path: str | os.PathLike, recipe_dir: Path | None = None) -> Path:
    """A recipe-relative path: as given if it exists (absolute or from the working directory), else
    beside the pipeline recipe, else in the repository (where the shipped recipes live)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    for base in (recipe_dir, REPO):
        if base is not None and (base / p).exists():
            return (base / p).resolve()
    raise FileNotFoundError(f"{path}: not found in the working directory"
                            + (f", beside the recipe ({recipe_dir})" if recipe_dir else "")
                            + f" or in the repository ({REPO})")


def load_pipeline(path: str | os.PathLike | None = None) -> tuple[PipelineConfig, Path]:
    """The recipe at ``path`` (default: the quickstart) and the folder it came from."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    cfg = from_dict(PipelineConfig, load_yaml(path), f"pipeline recipe {path}")
    return cfg, path.resolve().parent

"""Pretraining recipes (``training/<name>.yaml``) -> :class:`PretrainConfig`.

A recipe has five sections; unknown keys anywhere are errors that name the key::

    model:    {preset: tiny, dim: 32, ...}       # aion.model.build_config (the token table comes from index.json)
    masking:  {input_budget: 256, ...}           # aion.training.masking.MaskingConfig
    data:     {datasets: [{path: runs/tokens, weight: 1.0}], num_workers: 2}
    optim:    {lr: 5e-4, steps: 10000, global_batch_size: 512, grad_accum_steps: 1, ...}
    runtime:  {backend: ddp, mixed_precision: bf16, out_dir: runs/pretrain/base, ...}

The batch size is **global**: ``optim.global_batch_size`` objects per optimizer step, summed over
all processes and accumulation micro-steps. Each process then reads micro-batches of
``global_batch_size / (num_processes * grad_accum_steps)`` objects (it must divide exactly), so
the optimisation, and the data it sees step by step, do not depend on how many GPUs run it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aion.config import from_dict, load_yaml, to_dict
from aion.model.config import ModalitySpec, build_config
from aion.training.masking import MaskingConfig

BACKENDS = ("none", "ddp", "deepspeed", "fsdp")
PRECISIONS = ("no", "bf16")


@dataclass(kw_only=True)
class DatasetEntry:
    path: str
    """A pre-tokenized root (``aion tokenize`` output, with index.json); relative paths are taken as given."""
    weight: float = 1.0
    """Relative share of the objects drawn from this root (normalised over all datasets)."""

    def __post_init__(self) -> None:
        if not str(self.path):
            raise ValueError("path: empty")
        if not float(self.weight) > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")
        self.weight = float(self.weight)


@dataclass(kw_only=True)
class DataConfig:
    datasets: list[DatasetEntry] = field(default_factory=list)
    num_workers: int = 0
    """DataLoader worker processes per training process (0 = load in the training process)."""
    prefetch_factor: int = 2
    """Micro-batches each worker prepares ahead (ignored with num_workers 0)."""

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch_factor >= 1, got "
                             f"{self.num_workers}, {self.prefetch_factor}")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 5e-4
    """Peak AdamW learning rate, reached after ``warmup_steps`` (linear), then cosine to ``min_lr_ratio * lr``."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    """Applied to matrices only: never to norms, biases, embeddings or position tables."""
    steps: int = 1000
    """Optimizer steps in the whole schedule."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    """Max global gradient L2 norm (0 = no clipping; the norm is still logged)."""
    global_batch_size: int = 64
    """Objects per optimizer step over all processes and accumulation micro-steps (see the module docstring)."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step on each process."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not self.eps > 0:
            raise ValueError("weight_decay and grad_clip must be >= 0 and eps > 0")
        if self.global_batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError(f"global_batch_size and grad_accum_steps must be >= 1, got "
                             f"{self.global_batch_size}, {self.grad_accum_steps}")
        if self.global_batch_size % self.grad_accum_steps:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"grad_accum_steps ({self.grad_accum_steps})")

    def micro_batch_size(self, num_processes: int) -> int:
        """Objects per process per micro-step; a clear error if the global batch does not split evenly."""
        parts = num_processes * self.grad_accum_steps
        if self.global_batch_size % parts:
            raise ValueError(f"optim.global_batch_size ({self.global_batch_size}) must be divisible by "
                             f"num_processes ({num_processes}) x grad_accum_steps ({self.grad_accum_steps}) = {parts}")
        return self.global_batch_size // parts


@dataclass(kw_only=True)
class DeepSpeedOptions:
    zero_stage: int = 2
    """2: optimizer states and gradients sharded; 3: parameters too (for models that do not fit one GPU)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (slower; for memory-bound runs)."""
    offload_params: bool = False
    """ZeRO-3 only: keep parameters in CPU memory."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (2, 3):
            raise ValueError(f"zero_stage must be 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")


@dataclass(kw_only=True)
class FSDPOptions:
    reshard_after_forward: bool = True
    """True: ZeRO-3-like (parameters re-gathered for backward); False: ZeRO-2-like (more memory, less traffic)."""
    cpu_offload: bool = False


@dataclass(kw_only=True)
class RuntimeConfig:
    backend: Literal["none", "ddp", "deepspeed", "fsdp"] = "none"
    """All run through accelerate: ``none`` = one process (or plain DDP when launched with several,
    same as ``ddp``); ``deepspeed`` = ZeRO (``deepspeed`` section); ``fsdp`` = FSDP2 (GPUs only)."""
    mixed_precision: Literal["no", "bf16"] = "no"
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    fsdp: FSDPOptions = field(default_factory=FSDPOptions)
    seed: int = 0
    """Model initialisation and data order (masks use ``masking.seed``)."""
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    out_dir: str = "runs/pretrain"
    consolidate_on_save: bool = True
    """DeepSpeed / FSDP: also write the full fp32 ``model.safetensors`` in each checkpoint (export reads it)."""
    compile_blocks: bool = False
    """``torch.compile`` each transformer block (fuses norms, casts and activations; the per-modality
    embedding and head code stays eager). First steps pay the compilation (a minute or so)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {self.backend!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision: expected one of {list(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.log_every < 1 or self.checkpoint_every < 1 or self.keep_last < 1:
            raise ValueError(f"log_every, checkpoint_every and keep_last must be >= 1, got "
                             f"{self.log_every}, {self.checkpoint_every}, {self.keep_last}")


@dataclass(kw_only=True)
class PretrainConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    """Passed to :func:`aion.model.build_config` with the modality table of the token index(es)."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.model, dict):
            raise ValueError(f"model: expected a mapping, got {type(self.model).__name__}")
        if "modalities" in self.model:
            raise ValueError("model: 'modalities' must not be set; it is read from the token index.json")
        try:  # check keys and values now, with a placeholder token table, not after the launch
            build_config(self.model, {"placeholder": ModalitySpec(num_tokens=1, vocab_size=1)})
        except (TypeError, ValueError) as err:
            raise ValueError(f"model: {err}") from err
        if not self.data.datasets:
            raise ValueError("data.datasets: empty; list at least one {path, weight}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


SECTIONS = ("model", "masking", "data", "optim", "runtime")


def config_from_dict(data: dict[str, Any], where: str = "recipe") -> PretrainConfig:
    """A parsed recipe -> :class:`PretrainConfig`; errors name the section and key (``recipe.optim: ...``)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    sections = {}
    for name in SECTIONS:
        value = data.get(name)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{where}.{name}: expected a mapping, got {type(value).__name__}")
        sections[name] = dict(value or {})
    if not sections["model"]:
        raise ValueError(f"{where}.model: missing or empty; name at least a preset, e.g. model: {{preset: tiny}}")
    raw_sets = sections["data"].pop("datasets", [])
    if not isinstance(raw_sets, list):
        raise ValueError(f"{where}.data.datasets: expected a list of {{path, weight}}, got {type(raw_sets).__name__}")
    datasets = []
    for i, entry in enumerate(raw_sets):
        entry = {"path": entry} if isinstance(entry, str | os.PathLike) else entry
        if not isinstance(entry, dict):
            raise ValueError(f"{where}.data.datasets[{i}]: expected {{path, weight}} or a path, got {entry!r}")
        datasets.append(from_dict(DatasetEntry, entry, f"{where}.data.datasets[{i}]"))
    runtime = sections["runtime"]
    for key, cls in (("deepspeed", DeepSpeedOptions), ("fsdp", FSDPOptions)):
        if key in runtime:
            if not isinstance(runtime[key], dict):
                raise ValueError(f"{where}.runtime.{key}: expected a mapping, got {type(runtime[key]).__name__}")
            runtime[key] = from_dict(cls, runtime[key], f"{where}.runtime.{key}")
    try:
        return PretrainConfig(
            model=sections["model"],
            masking=from_dict(MaskingConfig, sections["masking"], f"{where}.masking"),
            data=from_dict(DataConfig, {**sections["data"], "datasets": datasets}, f"{where}.data"),
            optim=from_dict(OptimConfig, sections["optim"], f"{where}.optim"),
            runtime=from_dict(RuntimeConfig, runtime, f"{where}.runtime"),
        )
    except ValueError as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: {err}") from err


def load_recipe(path: str | os.PathLike) -> PretrainConfig:
    """Read and validate a ``training/*.yaml`` recipe."""
    return config_from_dict(load_yaml(path), where=f"recipe {Path(path)}")


def with_overrides(cfg: PretrainConfig, *, tokens: str | os.PathLike | None = None,
                   out_dir: str | os.PathLike | None = None, steps: int | None = None) -> PretrainConfig:
    """The CLI's overrides: one token root replacing ``data.datasets``, the output folder, the schedule length.

    ``steps`` also scales ``warmup_steps`` down if it would exceed the new length.
    """
    data = cfg.to_dict()
    if tokens is not None:
        data["data"]["datasets"] = [{"path": str(tokens), "weight": 1.0}]
    if out_dir is not None:
        data["runtime"]["out_dir"] = str(out_dir)
    if steps is not None:
        data["optim"]["warmup_steps"] = min(data["optim"]["warmup_steps"], int(steps))
        data["optim"]["steps"] = int(steps)
    return config_from_dict(data, where="recipe (with overrides)")

"""Checkpoint layout, crash safety, RNG capture, and the plain inference export.

A run directory holds ``checkpoints/step_XXXXXXXX/`` folders. Each is written into
``checkpoints/.tmp-step_XXXXXXXX`` by every process, then ``COMPLETE.json`` is written last
and the folder renamed into place (``os.replace``): a process killed mid-write leaves only a
``.tmp-*`` folder, which resume ignores (and deletes), so the previous checkpoint stays the
newest complete one. Contents::

    COMPLETE.json         written last: {"step": s}
    trainer_state.json    step, data position, LR scheduler state, world size, backend
    model_config.json     the ModelConfig (with modality table) the weights belong to
    model.safetensors     full fp32 weights (consolidated from ZeRO / FSDP shards on save)
    optimizer.pt          single process / DDP: optimizer state (loaded with weights_only=True)
    rng_RRRRR.json        per process: python, numpy, torch (and CUDA) generator states
    accelerate/           DeepSpeed / FSDP: accelerator.save_state (sharded model + optimizer)

Nothing here is unpickled except ``optimizer.pt`` (``weights_only=True``) and, under
DeepSpeed / FSDP, what accelerate and DeepSpeed themselves load from ``accelerate/``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from aion.config import from_dict, to_dict
from aion.model.config import ModelConfig
from aion.model.fourm import FourM

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE.json"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
ACCELERATE_STATE = "accelerate"
EXPORT_CONFIG = "config.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def temp_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f".tmp-step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp-*`` and unmarked folders are skipped)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial(run_dir: str | os.PathLike) -> list[Path]:
    """Delete leftover ``.tmp-*`` folders of interrupted saves; returns what was removed."""
    root = Path(run_dir) / CHECKPOINTS
    gone = [p for p in root.glob(".tmp-step_*")] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def finalize(tmp: Path, final: Path, step: int, keep_last: int) -> None:
    """Mark ``tmp`` complete, move it into place, prune to the newest ``keep_last`` (main process only)."""
    _write_json(tmp / COMPLETE, {"step": int(step)})
    _fsync_dir(tmp)
    if final.exists():  # same step saved again (e.g. a rerun with --stop-at): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in complete_checkpoints(final.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- pieces
def write_json(path: Path, data: Any) -> None:
    _write_json(path, data)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """fp32 (or as given) CPU tensors -> safetensors; copies so no two entries share memory."""
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}, str(path))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_model_config(cfg: ModelConfig, path: Path) -> None:
    _write_json(path, to_dict(cfg))


def load_model_config(path: Path) -> ModelConfig:
    return from_dict(ModelConfig, read_json(path), str(path))


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's generator states as JSON-able data (no pickle)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    state = {
        "python": [version, list(internal), gauss_py],
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(gauss)},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_py = state["python"]
    random.setstate((version, tuple(internal), gauss_py))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def rng_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rng_{rank:05d}.json"


# ---------------------------------------------------------------------------- export
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint folder, or a run folder (-> its newest complete checkpoint)."""
    path = Path(path)
    if is_complete(path):
        return path
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: no complete checkpoint under {path / CHECKPOINTS}")
        return latest
    raise FileNotFoundError(f"{path}: neither a complete checkpoint (with {COMPLETE}) nor a run folder "
                            f"(with {CHECKPOINTS}/)")


def _weights_from_deepspeed(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights consolidated from a DeepSpeed ZeRO checkpoint saved without ``model.safetensors``.

    Uses DeepSpeed's ``zero_to_fp32``, which unpickles the shard files (written by this run).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt / ACCELERATE_STATE))


def export_model(checkpoint_or_run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 allow_deepspeed_pickle: bool = False) -> Path:
    """Write a plain inference folder: ``config.json`` (architecture + modality table) and ``model.safetensors``.

    Reads the checkpoint's consolidated ``model.safetensors``. A DeepSpeed checkpoint saved with
    ``runtime.consolidate_on_save: false`` has only ZeRO shards: pass ``allow_deepspeed_pickle``
    to consolidate them with DeepSpeed's ``zero_to_fp32`` (which unpickles its shard files).
    """
    ckpt = resolve_checkpoint(checkpoint_or_run_dir)
    cfg = load_model_config(ckpt / MODEL_CONFIG)
    if (ckpt / WEIGHTS).is_file():
        weights = load_weights(ckpt / WEIGHTS)
    elif (ckpt / ACCELERATE_STATE).is_dir() and allow_deepspeed_pickle:
        weights = _weights_from_deepspeed(ckpt)
    else:
        raise FileNotFoundError(f"{ckpt}: no {WEIGHTS} (saved with consolidate_on_save: false?); for a DeepSpeed "
                                "checkpoint pass allow_deepspeed_pickle=True to consolidate its ZeRO shards")
    model = FourM(cfg)  # validates names and shapes before anything is written
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_dict(cfg)
    modalities = data.pop("modalities")
    _write_json(out / EXPORT_CONFIG, {"architecture": "FourM", "format_version": 1,
                                      "source_checkpoint": str(ckpt.resolve()), "model": data,
                                      "modalities": modalities})
    save_weights(model.state_dict(), out / WEIGHTS)
    return out


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> FourM:
    """A :class:`FourM` in eval mode from an :func:`export_model` folder (safetensors only, no pickle)."""
    directory = Path(directory)
    meta = read_json(directory / EXPORT_CONFIG)
    if meta.get("architecture") != "FourM":
        raise ValueError(f"{directory / EXPORT_CONFIG}: architecture {meta.get('architecture')!r}, expected 'FourM'")
    cfg = from_dict(ModelConfig, {**meta["model"], "modalities": meta["modalities"]}, str(directory / EXPORT_CONFIG))
    model = FourM(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS), device=str(map_location)), strict=True)
    return model.to(map_location).eval()

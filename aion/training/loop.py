"""Masked multimodal pretraining of :class:`aion.model.FourM` under accelerate.

One loop for every scale: a single CPU process, DDP on N GPUs (``accelerate launch`` /
``torchrun``), DeepSpeed ZeRO-2/3 or FSDP2, chosen by ``runtime.backend`` in the recipe.

Why it is built this way:

- **Exact resume.** The data a process reads at step ``s`` is a pure function of ``s``
  (:mod:`aion.training.data`), the learning rate too; checkpoints hold model, optimizer,
  scheduler and every process's RNG states. On CPU an interrupted-and-resumed run reproduces
  the uninterrupted loss sequence bit for bit.
- **Global batch.** ``optim.global_batch_size`` is fixed; the per-process micro-batch is
  derived, so 1 process with 2 accumulation steps and 2 processes with 1 see the same objects
  and take the same optimizer steps (up to float summation order).
- **No silent skips.** A non-finite loss or gradient norm raises with the step and the
  per-modality losses instead of being skipped.
- **Crash-safe checkpoints** (:mod:`aion.training.checkpoint`): written to a temporary folder,
  marked complete last, renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from aion.config import to_dict
from aion.model.config import ModelConfig, build_config
from aion.model.fourm import FourM
from aion.training import checkpoint as ckpt
from aion.training.config import OptimConfig, PretrainConfig, with_overrides
from aion.training.data import MicroBatches, MixtureSchedule, identity, merged_specs
from aion.training.masking import MaskingSampler, TokenShardDataset, to_device

NO_DECAY_PREFIXES = ("token_emb.", "enc_modality_emb.", "dec_modality_emb.", "enc_pos_emb", "dec_pos_emb")
METRICS = "metrics.jsonl"
FSDP_NEEDS_GPU = ("runtime.backend 'fsdp' (FSDP2) needs CUDA GPUs; on CPUs use backend 'ddp' or 'deepspeed' "
                  "(DS_ACCELERATOR=cpu) with several processes under torchrun")


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; training stops instead of skipping the step."""


def lr_factor(step: int, optim: OptimConfig) -> float:
    """Multiplier of ``optim.lr`` at optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    t = min(1.0, (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices (blocks and output heads) only; never on norms, biases, embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.startswith(NO_DECAY_PREFIXES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _reset_single_process_state() -> None:
    """Let several trainings run one after another in one (non-distributed) process, e.g. tests and benchmarks."""
    from accelerate.state import AcceleratorState, GradientState

    if _launched_world() == 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def deepspeed_config(cfg: PretrainConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for this recipe (ZeRO stage, offload, micro-batch, clipping, bf16)."""
    ds, o = cfg.runtime.deepspeed, cfg.optim
    overlap = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": overlap, "contiguous_gradients": True,
                            "reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8)}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero.pop("allgather_bucket_size")
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": int(5e7),
                     "stage3_param_persistence_threshold": int(1e5)})
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": o.global_batch_size,
        "train_micro_batch_size_per_gpu": o.micro_batch_size(world),
        "gradient_accumulation_steps": o.grad_accum_steps,
        "gradient_clipping": float(o.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.runtime.mixed_precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _deepspeed_plugin_class():
    """accelerate's DeepSpeedPlugin, minus its hard dependency on Hugging Face ``transformers``.

    ``DeepSpeedPlugin.set_deepspeed_weakref`` (accelerate 1.x) imports ``transformers`` to register
    a config weakref that only ``transformers.from_pretrained`` reads (ZeRO-3 init of HF models);
    FourM does not need it, so it is skipped when ``transformers`` is not installed.
    """
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.imports import is_transformers_available

    class _Plugin(DeepSpeedPlugin):
        def set_deepspeed_weakref(self) -> None:
            if is_transformers_available():
                super().set_deepspeed_weakref()

    return _Plugin


def make_accelerator(cfg: PretrainConfig):
    """An ``accelerate.Accelerator`` for ``runtime.backend`` (and a clear error where it cannot run)."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    rt = cfg.runtime
    # the recipe decides, whatever an accelerate config or an earlier run in this process put in the environment
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true" if rt.backend == "deepspeed" else "false"
    os.environ["ACCELERATE_USE_FSDP"] = "true" if rt.backend == "fsdp" else "false"
    kwargs: dict[str, Any] = {"mixed_precision": rt.mixed_precision,
                              "gradient_accumulation_steps": cfg.optim.grad_accum_steps,
                              "step_scheduler_with_optimizer": False}
    if rt.backend == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise RuntimeError("runtime.backend 'deepspeed' needs DeepSpeed: pip install 'aion-astro[deepspeed]'") \
                from err
        kwargs["deepspeed_plugin"] = _deepspeed_plugin_class()(hf_ds_config=deepspeed_config(cfg, _launched_world()))
        if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu): accelerate needs the
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]  # backend named, or it runs 1 process
    elif rt.backend == "fsdp":
        if not torch.cuda.is_available():
            raise RuntimeError(FSDP_NEEDS_GPU)
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=rt.fsdp.reshard_after_forward, cpu_offload=rt.fsdp.cpu_offload,
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["EncoderBlock", "DecoderBlock"],
            state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)
    else:
        kwargs["cpu"] = not torch.cuda.is_available()
    if rt.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise RuntimeError("runtime.mixed_precision 'bf16' but this GPU does not support bfloat16")
    return Accelerator(**kwargs)


class Pretrainer:
    """Build everything for one run (accelerator, data, model, optimizer; resume state) and train with :meth:`run`.

    Attributes after construction: ``accelerator``, ``model`` (prepared), ``model_cfg``,
    ``run_dir``, ``start_step`` (from the newest complete checkpoint, else 0).
    """

    def __init__(self, cfg: PretrainConfig, tokens_root_override: str | os.PathLike | None = None,
                 progress: bool = True):
        if tokens_root_override is not None:
            cfg = with_overrides(cfg, tokens=tokens_root_override)
        self.cfg, self.progress = cfg, progress
        rt, optim = cfg.runtime, cfg.optim
        if rt.backend == "fsdp" and not torch.cuda.is_available():
            raise RuntimeError(FSDP_NEEDS_GPU)
        _reset_single_process_state()
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.accelerator = acc = make_accelerator(cfg)
        self.world, self.rank = acc.num_processes, acc.process_index
        self.micro = optim.micro_batch_size(self.world)
        self.sharded = rt.backend in ("deepspeed", "fsdp")
        self.run_dir = Path(rt.out_dir)

        # data: the modality table comes from the token indexes, never from the recipe
        self.roots = [TokenShardDataset(d.path) for d in cfg.data.datasets]
        self.specs = merged_specs(self.roots)
        self.schedule = MixtureSchedule([len(r) for r in self.roots], [d.weight for d in cfg.data.datasets], rt.seed)
        self.sampler = MaskingSampler(cfg.masking)

        # model: the same initial weights on every process
        _seed_everything(rt.seed)
        self.model_cfg: ModelConfig = build_config(cfg.model, self.specs)
        model = FourM(self.model_cfg)
        if rt.compile_blocks:
            model.compile_blocks()
        self.names = model.names
        self.num_parameters = model.num_parameters()
        self._opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                      eps=optim.eps)
        self._sched = torch.optim.lr_scheduler.LambdaLR(self._opt, lambda s: lr_factor(s, optim))
        self.model, self.optimizer = acc.prepare(model, self._opt)

        # resume from the newest complete checkpoint (partial ones from a crash are ignored)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for gone in ckpt.remove_partial(self.run_dir):
                print(f"[aion pretrain] removed incomplete checkpoint {gone}", flush=True)
        acc.wait_for_everyone()
        latest = ckpt.latest_checkpoint(self.run_dir)
        self.start_step = self._load(latest) if latest is not None else 0
        if latest is None:
            _seed_everything(int(np.random.SeedSequence([rt.seed, 1, self.rank]).generate_state(1)[0]))
        if acc.is_main_process:
            (self.run_dir / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            ckpt.save_model_config(self.model_cfg, self.run_dir / ckpt.MODEL_CONFIG)
            _truncate_metrics(self.run_dir / METRICS, self.start_step)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ data
    def _batches(self, start: int, end: int) -> Iterator[dict[str, Any]]:
        data = MicroBatches(self.roots, self.sampler, self.schedule, self.names, start_step=start, end_step=end,
                            global_batch=self.cfg.optim.global_batch_size, rank=self.rank, world=self.world,
                            accum=self.cfg.optim.grad_accum_steps)
        workers = self.cfg.data.num_workers
        loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=workers, collate_fn=identity,
                            pin_memory=torch.cuda.is_available(),
                            prefetch_factor=self.cfg.data.prefetch_factor if workers else None,
                            generator=torch.Generator().manual_seed(0))  # never touches the global RNG
        return iter(loader)

    # ------------------------------------------------------------------ training
    def run(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train from ``start_step`` to ``optim.steps`` (or to ``stop_at``, checkpointing there); returns a summary."""
        from tqdm.auto import tqdm

        acc, optim, rt = self.accelerator, self.cfg.optim, self.cfg.runtime
        end = optim.steps if stop_at is None else min(int(stop_at), optim.steps)
        start = self.start_step
        device, n_mod = acc.device, len(self.names)
        batches = self._batches(start, end)
        bar = tqdm(total=end, initial=start, desc="pretrain", unit="step",
                   disable=not (self.progress and acc.is_main_process))
        log = open(self.run_dir / METRICS, "a") if acc.is_main_process else None
        window = torch.zeros(4 + 2 * n_mod, dtype=torch.float64, device=device)
        record: dict[str, Any] = {}
        grad_norm: float | None = None
        t_window, t_start = time.perf_counter(), time.perf_counter()
        data_wait = 0.0  # seconds this process waited for the data loader in the current log window
        self.model.train()
        acc.step = 0
        try:
            for step in range(start, end):
                for group, base in zip(self._opt.param_groups, self._sched.base_lrs, strict=True):
                    group["lr"] = base * lr_factor(step, optim)
                for _ in range(optim.grad_accum_steps):
                    t_wait = time.perf_counter()
                    batch = next(batches)
                    data_wait += time.perf_counter() - t_wait
                    if batch["step"] != step:
                        raise RuntimeError(f"data loader out of step: got a batch of step {batch['step']} at {step}")
                    n_in, n_tgt = int(batch["num_inputs"].sum()), int(batch["num_targets"].sum())
                    batch = to_device(batch, device, non_blocking=True)
                    with acc.accumulate(self.model):
                        out = self.model(batch)
                        loss = out["loss"]
                        if not bool(torch.isfinite(loss.detach())):
                            per = {k: float(v.detach()) for k, v in out["loss_per_modality"].items()}
                            raise NonFiniteLossError(f"non-finite loss {float(loss.detach())} at step {step} (process "
                                                     f"{self.rank}); per-modality losses: {per}")
                        acc.backward(loss)
                        if acc.sync_gradients:
                            grad_norm = self._clip()
                            if grad_norm is not None and not math.isfinite(grad_norm):
                                raise NonFiniteLossError(f"non-finite gradient norm {grad_norm} at step {step} "
                                                         f"(process {self.rank}); loss {float(loss.detach())}")
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    self._accumulate(window, out, n_in, n_tgt)
                self._sched.step()
                bar.update(1)
                done = step + 1
                if done % rt.log_every == 0 or done == end:
                    now = time.perf_counter()
                    record = self._record(window, done, grad_norm, now - t_window)
                    record["data_wait_s"] = data_wait  # main process only: > ~10% of seconds = input-bound
                    data_wait = 0.0
                    window.zero_()
                    t_window = now
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        bar.set_postfix(loss=f"{record['loss']:.4g}", tok_s=f"{record['tokens_per_s']:.3g}")
                if done % rt.checkpoint_every == 0 or done == end:
                    self.save_checkpoint(done)
        finally:
            bar.close()
            if log is not None:
                log.close()
        acc.wait_for_everyone()
        latest = ckpt.latest_checkpoint(self.run_dir)
        return {"step": end, "start_step": start, "run_dir": str(self.run_dir),
                "checkpoint": str(latest) if latest else None, "seconds": time.perf_counter() - t_start,
                "num_parameters": self.num_parameters, "last": record, "is_main_process": acc.is_main_process}

    def _clip(self) -> float | None:
        """Clip to ``optim.grad_clip`` (0: only measure) and return the pre-clip global norm."""
        limit = self.cfg.optim.grad_clip or float("inf")
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), limit)
        if norm is None:
            return None
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    def _accumulate(self, window: torch.Tensor, out: dict[str, Any], n_in: int, n_tgt: int) -> None:
        """Add one micro-batch to the log window: [loss, micro-batches, input tokens, target tokens, sums, counts]."""
        n_mod = len(self.names)
        window[0] += out["loss"].detach().double()
        window[1] += 1
        window[2] += n_in
        window[3] += n_tgt
        per = out["loss_per_modality"]
        if per:
            idx = torch.tensor([self.names.index(k) for k in per], device=window.device)
            window[4 + idx] += torch.stack([v.detach() for v in per.values()]).double()
            window[4 + n_mod + idx] += 1

    def _record(self, window: torch.Tensor, step: int, grad_norm: float | None, seconds: float) -> dict[str, Any]:
        """One metrics.jsonl line: means over the window's micro-batches on all processes."""
        total = self.accelerator.reduce(window.clone(), reduction="sum").cpu()
        n_mod = len(self.names)
        sums, counts = total[4:4 + n_mod], total[4 + n_mod:]
        tokens = float(total[2] + total[3])
        return {
            "step": step,
            "loss": float(total[0] / total[1].clamp(min=1)),
            "loss_per_modality": {n: float(sums[i] / counts[i]) for i, n in enumerate(self.names) if counts[i] > 0},
            "lr": float(self._opt.param_groups[0]["lr"]),
            "grad_norm": grad_norm,
            "input_tokens": int(total[2]),
            "target_tokens": int(total[3]),
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "seconds": seconds,
        }

    # ------------------------------------------------------------------ checkpoints
    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on the main process (None elsewhere); a collective under DeepSpeed / FSDP."""
        acc = self.accelerator
        backend = self.cfg.runtime.backend
        if backend == "deepspeed":
            from deepspeed.utils import safe_get_full_fp32_param

            state = {}
            for name, p in acc.unwrap_model(self.model).named_parameters():
                full = safe_get_full_fp32_param(p)  # every process takes part (ZeRO gathers)
                full = p if full is None else full
                if acc.is_main_process:
                    state[name] = full.detach().float().cpu().clone()
            return state if acc.is_main_process else None
        if backend == "fsdp":
            state = acc.get_state_dict(self.model)
            return {k: v.float() for k, v in state.items()} if acc.is_main_process else None
        return acc.unwrap_model(self.model).state_dict() if acc.is_main_process else None

    def _trainer_state(self, step: int) -> dict[str, Any]:
        g = self.cfg.optim.global_batch_size
        return {
            "step": step,
            "global_batch_size": g,
            "samples_seen": step * g,
            "data": {"virtual_epoch": self.schedule.epoch_of(step * g), "epoch_length": self.schedule.epoch_length,
                     "seed": self.cfg.runtime.seed, "mask_seed": self.cfg.masking.seed,
                     "datasets": [{"path": d.path, "objects": len(r), "weight": d.weight}
                                  for d, r in zip(self.cfg.data.datasets, self.roots, strict=True)]},
            "scheduler": self._sched.state_dict(),
            "world_size": self.world,
            "backend": self.cfg.runtime.backend,
            "mixed_precision": self.cfg.runtime.mixed_precision,
        }

    def save_checkpoint(self, step: int) -> Path:
        """Write ``checkpoints/step_<step>`` atomically (every process must call it)."""
        acc = self.accelerator
        tmp, final = ckpt.temp_dir(self.run_dir, step), ckpt.step_dir(self.run_dir, step)
        if acc.is_main_process:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        ckpt.write_json(ckpt.rng_file(tmp, self.rank), ckpt.rng_state())
        if self.sharded:
            acc.save_state(str(tmp / ckpt.ACCELERATE_STATE))
        weights = self._full_state_dict() if (not self.sharded or self.cfg.runtime.consolidate_on_save) else None
        if acc.is_main_process:
            if weights is not None:
                ckpt.save_weights(weights, tmp / ckpt.WEIGHTS)
            if not self.sharded:
                torch.save(self._opt.state_dict(), tmp / ckpt.OPTIMIZER)
            ckpt.save_model_config(self.model_cfg, tmp / ckpt.MODEL_CONFIG)
            ckpt.write_json(tmp / ckpt.TRAINER_STATE, self._trainer_state(step))
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.finalize(tmp, final, step, self.cfg.runtime.keep_last)
        acc.wait_for_everyone()
        return final

    def _load(self, path: Path) -> int:
        """Restore model, optimizer, scheduler and RNG states from a complete checkpoint; returns its step."""
        acc = self.accelerator
        state = ckpt.read_json(path / ckpt.TRAINER_STATE)
        self._check_compatible(path, state)
        saved = ckpt.load_model_config(path / ckpt.MODEL_CONFIG)
        if to_dict(saved) != to_dict(self.model_cfg):
            raise ValueError(f"{path}: the checkpoint's model config differs from this recipe's; resume needs the "
                             f"same architecture and token table (or use a new runtime.out_dir)")
        if self.sharded:
            acc.load_state(str(path / ckpt.ACCELERATE_STATE))
        else:
            acc.unwrap_model(self.model).load_state_dict(ckpt.load_weights(path / ckpt.WEIGHTS))
            opt_state = torch.load(path / ckpt.OPTIMIZER, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(opt_state)  # AcceleratedOptimizer moves it to the device
        self._sched.load_state_dict(state["scheduler"])
        rng = ckpt.rng_file(path, self.rank)
        if rng.is_file():
            ckpt.set_rng_state(ckpt.read_json(rng))
        else:  # resumed on more processes than saved: the new ones start fresh generators
            _seed_everything(int(np.random.SeedSequence([self.cfg.runtime.seed, 2, self.rank, state["step"]])
                                 .generate_state(1)[0]))
        if acc.is_main_process:
            print(f"[aion pretrain] resumed from {path} (step {state['step']})", flush=True)
        return int(state["step"])

    def _check_compatible(self, path: Path, state: dict[str, Any]) -> None:
        """The data position is a step count: it means the same objects only with the same batch and mixture."""
        g = self.cfg.optim.global_batch_size
        now = [{"objects": len(r), "weight": d.weight} for d, r in zip(self.cfg.data.datasets, self.roots,
                                                                       strict=True)]
        then = [{"objects": d["objects"], "weight": d["weight"]} for d in state["data"]["datasets"]]
        problems = []
        if state["global_batch_size"] != g:
            problems.append(f"global_batch_size {state['global_batch_size']} -> {g}")
        if then != now:
            problems.append(f"datasets (objects, weight) {then} -> {now}")
        if state["data"]["seed"] != self.cfg.runtime.seed or state["data"]["mask_seed"] != self.cfg.masking.seed:
            problems.append("runtime.seed or masking.seed changed")
        if self.sharded and state["world_size"] != self.world:
            problems.append(f"{self.cfg.runtime.backend} shards were saved by {state['world_size']} processes, "
                            f"now {self.world}")
        if state["backend"] != self.cfg.runtime.backend and (self.sharded or state["backend"] in ("deepspeed",
                                                                                                  "fsdp")):
            problems.append(f"backend {state['backend']} -> {self.cfg.runtime.backend}")
        if problems:
            raise ValueError(f"cannot resume from {path}: " + "; ".join(problems) +
                             ". Use a new runtime.out_dir (export_model + fine-tuning starts from weights only).")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past ``step`` (logged after the checkpoint a crashed run resumed from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    path.write_text("".join(k + "\n" for k in keep))


def pretrain(cfg: PretrainConfig, tokens_root_override: str | os.PathLike | None = None, progress: bool = True,
             stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; see :class:`Pretrainer`. Every process calls it."""
    return Pretrainer(cfg, tokens_root_override, progress=progress).run(stop_at=stop_at)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` records, in order."""
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

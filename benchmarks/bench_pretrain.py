"""Pretraining throughput on this machine's CPUs: matmul peak, tokens/s and MFU, DDP scaling.

    python benchmarks/bench_pretrain.py                      # tiny + small, fp32 + bf16, DDP 1 vs 2
    python benchmarks/bench_pretrain.py --presets tiny --steps 3 --objects 4

1. Peak: the best of a few timed square matmuls (``--matmul`` x ``--matmul``) in fp32 and bf16.
2. Training steps (forward, backward, AdamW) of each preset on synthetic packed batches with
   AION-1 shapes (:mod:`aion.training.synthetic`: 29 modalities, every object with a full input
   budget of 256 and target budget of 128 tokens): tokens/s (input + target), model FLOPs per
   token (:mod:`aion.training.flops`: 6 x block parameters x tokens + output heads + the
   attention term 12 d L T c) and MFU = achieved model FLOP/s / measured matmul peak of the
   same precision.
3. DDP scaling: the tiny preset under ``torchrun`` (gloo, one thread per process) with 1 and 2
   processes, the same micro-batch per process; tokens/s summed over processes.

Each process uses ``--threads`` threads (default 1: shared machines). Numbers on a busy
machine are lower bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from aion.model import FourM, preset
from aion.training.flops import block_parameters, step_flops
from aion.training.loop import param_groups
from aion.training.synthetic import realistic_table, synthetic_batch, target_counts

INPUT_BUDGET, TARGET_BUDGET = 256, 128


def matmul_peak(n: int, dtype: torch.dtype, reps: int = 5, device: str = "cpu") -> float:
    """Best FLOP/s of an n x n x n matmul over ``reps`` timed runs (after one warm-up)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def train_steps(name: str, objects: int, steps: int, bf16: bool, seed: int = 0) -> dict:
    """Time ``steps`` optimizer steps (after one warm-up) of preset ``name`` on synthetic batches."""
    table = realistic_table()
    cfg = preset(name, table)
    torch.manual_seed(seed)
    model = FourM(cfg).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    gen = torch.Generator().manual_seed(seed)
    batches = [synthetic_batch(table, objects, INPUT_BUDGET, TARGET_BUDGET, generator=gen) for _ in range(2)]
    blocks = block_parameters(cfg)

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    flops, tokens = 0.0, 0
    t0 = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        step(batch)
        flops += step_flops(cfg, INPUT_BUDGET, target_counts(batch), objects=objects, blocks=blocks)
        tokens += objects * (INPUT_BUDGET + TARGET_BUDGET)
    seconds = time.perf_counter() - t0
    return {"preset": name, "precision": "bf16" if bf16 else "fp32", "objects": objects, "steps": steps,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "flops_per_token": flops / tokens,
            "flops_per_s": flops / seconds, "parameters": model.num_parameters(),
            "block_parameters": sum(blocks)}


# ---------------------------------------------------------------------------- DDP worker
def ddp_worker(objects: int, steps: int, threads: int) -> None:
    """One process of the DDP scaling run (under torchrun): tiny preset, synthetic batches, accelerate DDP."""
    from accelerate import Accelerator

    torch.set_num_threads(threads)
    acc = Accelerator(cpu=True)
    table = realistic_table()
    torch.manual_seed(0)
    model = FourM(preset("tiny", table))
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    gen = torch.Generator().manual_seed(1 + acc.process_index)
    batches = [synthetic_batch(table, objects, INPUT_BUDGET, TARGET_BUDGET, generator=gen) for _ in range(2)]

    def step(batch: dict) -> None:
        acc.backward(model(batch)["loss"])
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    acc.wait_for_everyone()
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % 2])
    acc.wait_for_everyone()
    seconds = time.perf_counter() - t0
    if acc.is_main_process:
        tokens = acc.num_processes * steps * objects * (INPUT_BUDGET + TARGET_BUDGET)
        print("RESULT " + json.dumps({"processes": acc.num_processes, "seconds": seconds,
                                      "tokens_per_s": tokens / seconds}), flush=True)


def ddp_scaling(processes: int, objects: int, steps: int, threads: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{Path(__file__).resolve().parents[1]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--max_restarts", "0",
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--ddp-worker",
           "--objects", str(objects), "--steps", str(steps), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"DDP run with {processes} processes failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--objects", type=int, default=8, help="objects per step (micro-batch)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--matmul", type=int, default=1024, help="matmul size for the peak measurement")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args.objects, args.steps, args.threads)
        return

    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"{args.threads} thread(s) per process, torch {torch.__version__}")
    precisions = [False] if args.no_bf16 else [False, True]
    peak = {}
    for bf16 in precisions:
        dtype = torch.bfloat16 if bf16 else torch.float32
        peak[bf16] = matmul_peak(args.matmul, dtype)
        print(f"matmul peak {args.matmul}^3 {'bf16' if bf16 else 'fp32'}: {peak[bf16] / 1e9:.1f} GFLOP/s")
    print(f"\nsynthetic batches: {args.objects} objects x ({INPUT_BUDGET} input + {TARGET_BUDGET} target) tokens, "
          f"29 modalities (AION-1 shapes); {args.steps} timed steps")
    print(f"{'preset':<7}{'prec':<6}{'params':>9}{'blocks':>9}{'tokens/s':>11}{'MFLOP/token':>13}"
          f"{'GFLOP/s':>10}{'MFU':>8}")
    for name in args.presets:
        for bf16 in precisions:
            r = train_steps(name, args.objects, args.steps, bf16)
            print(f"{name:<7}{r['precision']:<6}{r['parameters'] / 1e6:>8.2f}M{r['block_parameters'] / 1e6:>8.2f}M"
                  f"{r['tokens_per_s']:>11.0f}{r['flops_per_token'] / 1e6:>13.2f}{r['flops_per_s'] / 1e9:>10.2f}"
                  f"{100 * r['flops_per_s'] / peak[bf16]:>7.1f}%")
    if not args.no_ddp:
        print(f"\nDDP (tiny, fp32, gloo, {args.threads} thread(s) per process, {args.objects} objects per process "
              f"per step):")
        one = ddp_scaling(1, args.objects, args.steps * 3, args.threads)
        two = ddp_scaling(2, args.objects, args.steps * 3, args.threads)
        print(f"  1 process : {one['tokens_per_s']:>9.0f} tokens/s")
        speedup = two["tokens_per_s"] / one["tokens_per_s"]
        print(f"  2 processes: {two['tokens_per_s']:>9.0f} tokens/s  (x{speedup:.2f})")


if __name__ == "__main__":
    main()

"""Pretraining throughput of the Base preset on one GPU (H100 / H200): one command, < 5 minutes.

    python benchmarks/gpu_pretrain.py                 # matmul peak, model steps, the real loop
    python benchmarks/gpu_pretrain.py --compile       # also time compiled transformer blocks
    python benchmarks/gpu_pretrain.py --device cpu --preset tiny --batches 4 --steps 2 --loop-steps 4   # smoke test

1. Measured peak: the best of timed 8192^3 bf16 matmuls.
2. Model steps (forward, backward, fused AdamW, bf16 autocast) on synthetic packed batches with
   AION-1 shapes (:mod:`aion.training.synthetic`: 2 images of 576 tokens (vocab 1000), 2 spectra
   of 273 (vocab 2048), 25 scalars of 1-2 tokens (vocab <= 1088); every object with 256 input
   and 128 target tokens), for each ``--batches`` size: tokens/s (input + target), model FLOPs
   per token (:mod:`aion.training.flops`), MFU against the published dense bf16 peak (H100 SXM
   and H200: 989 TFLOPS) and against the measured matmul peak, and peak memory.
3. The real loop (:func:`aion.training.loop.pretrain`, backend none, bf16) on a synthetic token
   root written to a temporary folder: masking, DataLoader workers, logging, and one final
   checkpoint, whose save time is reported.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from aion.model import FourM, preset
from aion.training.flops import block_parameters, step_flops
from aion.training.loop import param_groups
from aion.training.synthetic import realistic_table, synthetic_batch, target_counts, write_token_root

PUBLISHED_BF16_DENSE = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12}
INPUT_BUDGET, TARGET_BUDGET = 256, 128


def published_peak(name: str) -> float | None:
    for key, value in PUBLISHED_BF16_DENSE.items():  # the more specific names come first
        if key in name:
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, n: int, reps: int = 20) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def model_steps(args: argparse.Namespace, device: torch.device, batch_size: int, compiled: bool) -> dict:
    table = realistic_table()
    cfg = preset(args.preset, table, activation_checkpointing=args.activation_checkpointing)
    torch.manual_seed(0)
    model = FourM(cfg).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    run = model.compile_blocks() if compiled else model
    gen = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(table, batch_size, INPUT_BUDGET, TARGET_BUDGET, generator=gen, device=device)
               for _ in range(2)]
    blocks = block_parameters(cfg)
    amp = device.type == "cuda"

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = run(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_warm = time.perf_counter()
    for i in range(args.warmup):
        step(batches[i % 2])
    sync(device)
    warm = time.perf_counter() - t_warm
    flops, tokens = 0.0, 0
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % 2])
        flops += step_flops(cfg, INPUT_BUDGET, target_counts(batches[i % 2]), objects=batch_size, blocks=blocks)
        tokens += batch_size * (INPUT_BUDGET + TARGET_BUDGET)
    sync(device)
    seconds = time.perf_counter() - t0
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"batch": batch_size, "compiled": compiled, "warmup_s": warm, "step_s": seconds / args.steps,
            "tokens_per_s": tokens / seconds, "flops_per_token": flops / tokens, "flops_per_s": flops / seconds,
            "peak_mem_gib": peak_mem / 2**30, "parameters": sum(blocks)}


def profile_steps(args: argparse.Namespace, device: torch.device, batch_size: int, steps: int = 4) -> None:
    """Where the time of an eager step goes: the torch profiler's top kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    table = realistic_table()
    model = FourM(preset(args.preset, table, activation_checkpointing=args.activation_checkpointing)).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    batch = synthetic_batch(table, batch_size, INPUT_BUDGET, TARGET_BUDGET,
                            generator=torch.Generator().manual_seed(0), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"\nprofile, batch {batch_size}, {steps} steps, top kernels by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60))


def real_loop(args: argparse.Namespace, device: torch.device, batch_size: int) -> dict:
    """``pretrain()`` itself for ``--loop-steps`` steps on a synthetic token root; tokens/s after the first window."""
    from aion.training.config import config_from_dict
    from aion.training.loop import pretrain, read_metrics

    with tempfile.TemporaryDirectory(prefix="aion_gpu_bench_") as tmp:
        root = write_token_root(Path(tmp) / "tokens", realistic_table(), args.loop_objects)
        log_every = max(1, args.loop_steps // 4)
        cfg = config_from_dict({
            "model": {"preset": args.preset, "activation_checkpointing": args.activation_checkpointing},
            "masking": {"input_budget": INPUT_BUDGET, "target_budget": TARGET_BUDGET},
            "data": {"datasets": [{"path": str(root)}], "num_workers": args.workers, "prefetch_factor": 4},
            "optim": {"steps": args.loop_steps, "warmup_steps": 1, "global_batch_size": batch_size},
            "runtime": {"backend": "none", "mixed_precision": "bf16" if device.type == "cuda" else "no",
                        "log_every": log_every, "checkpoint_every": 10**9, "keep_last": 1,
                        "compile_blocks": args.compile,
                        "out_dir": str(Path(tmp) / "run")},
        })
        t0 = time.perf_counter()
        summary = pretrain(cfg, progress=False)
        total = time.perf_counter() - t0
        records = read_metrics(Path(tmp) / "run")
    train_s = sum(r["seconds"] for r in records)
    steady = records[1:] or records
    return {"batch": batch_size, "steps": summary["step"], "total_s": total,
            "tokens_per_s": sum(r["input_tokens"] + r["target_tokens"] for r in steady)
            / sum(r["seconds"] for r in steady),
            "mean_inputs": sum(r["input_tokens"] for r in steady) / (len(steady) * log_every * batch_size),
            "mean_targets": sum(r["target_tokens"] for r in steady) / (len(steady) * log_every * batch_size),
            "checkpoint_s_approx": max(0.0, total - train_s), "loss": records[-1]["loss"],
            "data_wait_fraction": sum(r.get("data_wait_s", 0.0) for r in steady) / sum(r["seconds"] for r in steady)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128], help="objects per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also time the model with compiled blocks")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--matmul", type=int, default=8192)
    parser.add_argument("--loop-steps", type=int, default=40, help="steps of the real loop (0: skip it)")
    parser.add_argument("--loop-objects", type=int, default=8192, help="objects in the synthetic token root")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the real loop")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of a few eager steps")
    args = parser.parse_args()
    device = torch.device(args.device)
    t_start = time.perf_counter()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (use --device cpu for a smoke test)")
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        print(f"# {name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        name = "cpu"
        print(f"# CPU smoke test, torch {torch.__version__}")
    published = published_peak(name)
    measured = matmul_peak(device, args.matmul if device.type == "cuda" else 512)
    print(f"measured matmul peak ({'bf16' if device.type == 'cuda' else 'fp32'}): {measured / 1e12:.1f} TFLOP/s; "
          f"published dense bf16 peak: {published / 1e12:.0f} TFLOP/s" if published else
          f"measured matmul peak: {measured / 1e12:.3f} TFLOP/s; no published peak for {name!r}")
    print(f"\n{args.preset} preset, synthetic batches of {INPUT_BUDGET} input + {TARGET_BUDGET} target tokens per "
          f"object, 29 modalities (AION-1 shapes), bf16 autocast, fused AdamW; {args.steps} timed steps")
    print(f"{'batch':>6}{'compile':>8}{'step ms':>9}{'tokens/s':>11}{'GFLOP/tok':>10}{'TFLOP/s':>9}"
          f"{'MFU pub':>8}{'MFU meas':>9}{'peak GiB':>9}{'warmup s':>9}")
    results = []
    for compiled in ([False, True] if args.compile else [False]):
        for b in args.batches:
            try:
                r = model_steps(args, device, b, compiled)
            except torch.OutOfMemoryError:
                print(f"{b:>6}{str(compiled):>8}  out of memory")
                torch.cuda.empty_cache()
                continue
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the step's model and optimizer are gone with model_steps' frame
            results.append(r)
            pub = f"{100 * r['flops_per_s'] / published:.1f}%" if published else "-"
            print(f"{b:>6}{str(compiled):>8}{1e3 * r['step_s']:>9.1f}{r['tokens_per_s']:>11.0f}"
                  f"{r['flops_per_token'] / 1e9:>10.3f}{r['flops_per_s'] / 1e12:>9.1f}{pub:>8}"
                  f"{100 * r['flops_per_s'] / measured:>8.1f}%{r['peak_mem_gib']:>9.1f}{r['warmup_s']:>9.1f}",
                  flush=True)
    if args.profile and results:
        profile_steps(args, device, max(r["batch"] for r in results))
    if args.loop_steps > 0 and results:
        best = max((r for r in results if not r["compiled"]), key=lambda r: r["tokens_per_s"])
        print(f"\nreal loop (pretrain(), backend none, masking 'aion' with budgets {INPUT_BUDGET}/{TARGET_BUDGET}, "
              f"{args.workers} workers, batch {best['batch']}, {args.loop_steps} steps, compiled blocks: "
              f"{args.compile}):", flush=True)
        loop = real_loop(args, device, best["batch"])
        print(f"  {loop['tokens_per_s']:.0f} tokens/s (real tokens; {loop['mean_inputs']:.0f} inputs + "
              f"{loop['mean_targets']:.0f} targets per object on average), loss {loop['loss']:.3f}, "
              f"final checkpoint + setup ~{loop['checkpoint_s_approx']:.1f} s, total {loop['total_s']:.1f} s, "
              f"waiting for data {100 * loop['data_wait_fraction']:.0f}% of the time")
        results.append({"real_loop": loop})
    print(f"\nJSON {json.dumps(results)}")
    print(f"# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

"""GPU check of the training backends: exact-ish resume and export for none / ddp / fsdp on one GPU.

    torchrun --nproc_per_node 1 benchmarks/gpu_backends_check.py            # GPU (fsdp needs a process group)
    torchrun --nproc_per_node 1 benchmarks/gpu_backends_check.py --device cpu --backends none ddp   # smoke test

For each backend: a small model trains 12 steps uninterrupted, and again as 6 steps + resume
to 12; the script prints the largest difference between the two loss sequences (0 on CPU;
GPU kernels may differ in the last bits) and between the logits of the two runs' exported
models (export + load_pretrained on the device). Synthetic tokens (:mod:`aion.training.synthetic`), bf16 on GPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from aion.model.config import ModalitySpec
from aion.training.checkpoint import export_model, load_pretrained
from aion.training.config import config_from_dict
from aion.training.loop import pretrain, read_metrics
from aion.training.synthetic import synthetic_batch, write_token_root

TABLE = {"legacysurvey_image": ModalitySpec(num_tokens=64, vocab_size=1000),
         "desi_spectrum": ModalitySpec(num_tokens=123, vocab_size=2024),
         "legacysurvey_flux_g": ModalitySpec(num_tokens=2, vocab_size=1056),
         "desi_z": ModalitySpec(num_tokens=2, vocab_size=1088),
         "provabgs_log_mstar": ModalitySpec(num_tokens=1, vocab_size=1024)}


def recipe(tokens: Path, out: Path, backend: str, device: torch.device) -> dict:
    return {
        "model": {"preset": "small"},
        "masking": {"input_budget": 64, "target_budget": 32},
        "data": {"datasets": [{"path": str(tokens)}], "num_workers": 2},
        "optim": {"steps": 12, "warmup_steps": 2, "global_batch_size": 32, "lr": 1e-3},
        "runtime": {"backend": backend, "mixed_precision": "bf16" if device.type == "cuda" else "no",
                    "log_every": 1, "checkpoint_every": 6, "keep_last": 2, "out_dir": str(out)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["none", "ddp", "fsdp"])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    with tempfile.TemporaryDirectory(prefix="aion_backends_") as tmp:
        tmp = Path(tmp)
        tokens = write_token_root(tmp / "tokens", TABLE, 512)
        for backend in args.backends:
            try:
                full = config_from_dict(recipe(tokens, tmp / backend / "full", backend, device))
                pretrain(full, progress=False)
                split = config_from_dict(recipe(tokens, tmp / backend / "split", backend, device))
                pretrain(split, progress=False, stop_at=6)
                pretrain(split, progress=False)  # resumes from step 6
            except Exception as err:  # noqa: BLE001 - report and go on to the next backend
                if rank0:
                    print(f"{backend:>5}: FAILED {type(err).__name__}: {err}", flush=True)
                continue
            if not rank0:
                continue
            a = [r["loss"] for r in read_metrics(tmp / backend / "full")]
            b = [r["loss"] for r in read_metrics(tmp / backend / "split")]
            batch = synthetic_batch(TABLE, 4, 64, 32, generator=torch.Generator().manual_seed(1), device=device)
            logits = {}
            for run in ("full", "split"):
                export_model(tmp / backend / run, tmp / backend / f"export_{run}")
                with torch.no_grad():
                    logits[run] = load_pretrained(tmp / backend / f"export_{run}", map_location=device).eval(
                        ).logits_for(batch)
            diff = max(float((logits["full"][k] - logits["split"][k]).abs().max())
                       for k in logits["full"] if logits["full"][k].numel())
            print(f"{backend:>5}: {len(a)} steps, losses {a[0]:.4f} -> {a[-1]:.4f}; resumed run: "
                  f"{len(b)} steps, max |loss difference| {max(abs(x - y) for x, y in zip(a, b, strict=True)):.2e}; "
                  f"exported models (uninterrupted vs resumed) max |logit difference| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()

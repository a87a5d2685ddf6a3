"""Tokenizer encode throughput on survey data, and pre-tokenization peak memory versus N.

    python benchmarks/bench_pretokenize.py --tokenizers runs/tokenizers --data runs/mock runs/mock20k

For every modality of the tokenizer set: encode throughput (objects/s, best of 3 after a
warm-up) on up to ``--n`` objects read from the first data root. Then, for each data root,
``aion tokenize`` runs in a fresh process and the table shows its wall time and peak
resident memory (``ru_maxrss`` of the child), which should not grow with the number of
objects: pre-tokenization streams one batch of rows at a time.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aion import modalities as registry
from aion.data.batches import ImageBatch, ScalarBatch, SpectrumBatch
from aion.data.mmu import iter_mmu_hdf5
from aion.tokenizers.pretokenize import load_tokenizer_set


def _concat(parts: list) -> object:
    first = parts[0]
    if isinstance(first, ScalarBatch):
        ivar = None if first.ivar is None else np.concatenate([p.ivar for p in parts])
        return ScalarBatch(name=first.name, values=np.concatenate([p.values for p in parts]), ivar=ivar)
    return None  # images / spectra are timed batch by batch


def encode_throughput(toks: dict, root: Path, n: int, batch_size: int) -> list[tuple[str, str, int, float]]:
    rows = []
    for name, tok in sorted(toks.items()):
        survey = registry.modality(name).survey
        if not (root / survey).is_dir():
            continue
        batches = []
        have = 0
        for sb in iter_mmu_hdf5(root, survey, batch_size=batch_size):
            b = sb.modalities.get(name)
            if b is None:
                break
            batches.append(b)
            have += len(sb)
            if have >= n:
                break
        if not batches:
            continue
        joined = _concat(batches)
        work = [joined] if joined is not None else batches
        count = sum(len(b) if not isinstance(b, ImageBatch | SpectrumBatch) else b.flux.shape[0] for b in work)
        tok.encode(work[0])  # warm-up
        best = np.inf
        for _ in range(3 if joined is not None else 1):
            t = time.perf_counter()
            with torch.inference_mode():
                for b in work:
                    tok.encode(b)
            best = min(best, time.perf_counter() - t)
        rows.append((name, tok.tokenizer_type, count, count / best))
    return rows


def pretokenize_memory(tokenizers: Path, root: Path, threads: int, out: Path | None = None) -> tuple[int, float, float]:
    """(objects, seconds, peak RSS MB) of ``aion tokenize`` in a fresh process (it reports its own peak: VmHWM,
    since ru_maxrss would include the parent's high-water mark, inherited across fork + exec on Linux).

    The tokens go to a temporary folder, or to ``out`` (kept) when given, e.g. to build a model on them."""
    with tempfile.TemporaryDirectory() as tmp:
        dest = out if out is not None else Path(tmp) / "tokens"
        code = (f"import resource, torch; torch.set_num_threads({threads}); from aion.cli import main; "
                f"main(['tokenize', '--tokenizers', {str(tokenizers)!r}, '--data', {str(root)!r}, "
                f"'--out', {str(dest)!r}, '--quiet']); "
                "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]; "
                "print('PEAK_KB', hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(f"aion tokenize failed on {root}:\n{proc.stderr[-2000:]}")
        n_objects = int(proc.stdout.split()[0])
        peak_kb = int(proc.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
        return n_objects, wall, peak_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizers", type=Path, required=True, help="tokenizer set (aion tokenizer train --out)")
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="MMU roots, smallest first")
    ap.add_argument("--n", type=int, default=512, help="objects per modality for the throughput table")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    toks = load_tokenizer_set(args.tokenizers)
    print(f"# tokenizers {args.tokenizers} | {platform.machine()} | torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) | batch {args.batch_size}")
    print(f"{'modality':<24} {'type':<9} {'tokens':>6} {'objects':>8} {'encode obj/s':>13}")
    for name, kind, count, rate in encode_throughput(toks, args.data[0], args.n, args.batch_size):
        print(f"{name:<24} {kind:<9} {toks[name].num_tokens:>6} {count:>8} {rate:>13.1f}")
    if args.skip_memory:
        return
    print(f"\n{'data':<28} {'objects':>8} {'seconds':>8} {'obj/s':>7} {'peak RSS MB':>12}")
    for root in args.data:
        n, wall, peak = pretokenize_memory(args.tokenizers, root, args.threads)
        print(f"{str(root):<28} {n:>8} {wall:>8.1f} {n / wall:>7.1f} {peak:>12.0f}")


if __name__ == "__main__":
    main()

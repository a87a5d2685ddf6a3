"""Encode throughput of the spectrum tokenizer (objects/s) on this machine.

Times the two halves of ``encode`` separately: resampling + normalisation (numpy) and the
network + quantizer (torch), on DESI-like spectra (7781 pixels at 0.8 A) or on SDSS-like
padded rows with per-row grids (``--padded``), which cannot share one vectorised rebin.

    python benchmarks/bench_spectrum_tokenizer.py                              # CPU recipe, random weights
    python benchmarks/bench_spectrum_tokenizer.py --tokenizer runs/spec/tokenizer --n 1024
    python benchmarks/bench_spectrum_tokenizer.py --recipe tokenizers/spectrum_aion.yaml --threads 2

Weights do not change the cost, so an untrained tokenizer built from a recipe times the same
architecture as a trained one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from machine_info import describe_machine  # benchmarks/machine_info.py

from aion.data.batches import SpectrumBatch
from aion.tokenizers import load_tokenizer
from aion.tokenizers.spectrum import SpectrumTokenizer, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def desi_like(n: int, rng: np.random.Generator, padded: bool) -> SpectrumBatch:
    wave = 3600 + 0.8 * np.arange(7781)
    cont = 2 + np.sin(wave[None, :] / 700 + rng.uniform(0, 6, (n, 1)))
    flux = cont + rng.normal(0, 0.5, (n, wave.size))
    ivar = np.full((n, wave.size), 4.0)
    valid = rng.random((n, wave.size)) > 0.005
    w = np.broadcast_to(wave, (n, wave.size)).copy()
    if padded:  # every row its own length and start: the per-row (slow) path of the resampler
        for i in range(n):
            k = int(rng.integers(4000, wave.size))
            w[i] = np.where(np.arange(wave.size) < k, w[i] + rng.uniform(0, 0.8), -1.0)
    return SpectrumBatch(flux=flux, ivar=ivar, wavelength=w, valid=valid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", help="a save_pretrained directory (default: build from --recipe)")
    ap.add_argument("--recipe", default=str(ROOT / "tokenizers" / "spectrum_cpu.yaml"))
    ap.add_argument("--n", type=int, default=512, help="spectra to encode")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--padded", action="store_true", help="SDSS-like rows with per-row grids and padding")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
        source = args.tokenizer
    else:
        tok = SpectrumTokenizer(load_recipe(args.recipe).tokenizer)
        source = f"{args.recipe} (untrained weights)"
    assert isinstance(tok, SpectrumTokenizer)
    tok.chunk_size = args.batch_size
    rng = np.random.default_rng(0)
    batches = [desi_like(min(args.batch_size, args.n - s), rng, args.padded) for s in range(0, args.n, args.batch_size)]
    n_params = sum(p.numel() for p in tok.model.parameters())
    print(f"machine: {describe_machine()}")
    print(f"tokenizer: {source}; grid {tok.config.n_pix} px at {tok.config.wave_step} A; "
          f"{tok.num_tokens} tokens, vocab {tok.vocab_size}; {n_params / 1e6:.2f}M parameters")
    print(f"input: {args.n} {'SDSS-like padded' if args.padded else 'DESI-like'} spectra, batch {args.batch_size}")
    tok.encode(batches[0].select(slice(0, 2)))  # warm-up
    best = {"prepare": np.inf, "network": np.inf}
    for _ in range(args.repeats):
        t_prep = t_net = 0.0
        for b in batches:
            t0 = time.perf_counter()
            prepared = tok.prepare(b)
            t1 = time.perf_counter()
            tok.encode_prepared(prepared)
            t2 = time.perf_counter()
            t_prep += t1 - t0
            t_net += t2 - t1
        best["prepare"] = min(best["prepare"], t_prep)
        best["network"] = min(best["network"], t_net)
    total = best["prepare"] + best["network"]
    print(f"resample+normalise: {args.n / best['prepare']:8.1f} objects/s")
    print(f"network+quantize:   {args.n / best['network']:8.1f} objects/s")
    print(f"encode (total):     {args.n / total:8.1f} objects/s  (best of {args.repeats})")


if __name__ == "__main__":
    main()

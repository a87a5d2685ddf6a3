"""Encode / decode throughput of the image tokenizer presets on this machine.

Weights do not change the cost, so the networks are built from the recipes' ``tokenizer``
sections with random weights (a trained ``tokenizer`` directory can be given instead).
Inputs are synthetic cutouts of each survey's native size and bands.

    python benchmarks/bench_image_tokenizer.py                     # both presets, 1 thread
    python benchmarks/bench_image_tokenizer.py --threads 2 --n 512
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from machine_info import describe_machine  # benchmarks/machine_info.py

from aion import modalities as registry
from aion.config import from_dict, load_yaml
from aion.data.batches import ImageBatch
from aion.tokenizers import load_tokenizer
from aion.tokenizers.image import ImageTokenizer, ImageTokenizerConfig

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"cpu": ROOT / "tokenizers" / "image_cpu.yaml", "aion": ROOT / "tokenizers" / "image_aion.yaml"}


def synthetic(survey: str, n: int, size: int, seed: int = 0) -> ImageBatch:
    """Noisy round blobs on a survey's grid and bands (cost does not depend on content)."""
    srv = registry.survey(survey)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size // 2
    prof = np.exp(-(xx**2 + yy**2) / 18.0)
    flux = rng.uniform(0.1, 10, (n, len(srv.bands), 1, 1)) * prof + rng.normal(0, 0.05, (n, len(srv.bands), size, size))
    return ImageBatch(flux=flux, ivar=np.full(flux.shape, 400.0), valid=np.ones(flux.shape, bool), bands=srv.bands,
                      pixel_scale=srv.pixel_scale, psf_fwhm=np.ones((n, len(srv.bands))), zero_point=srv.zero_point)


def build(preset: str) -> ImageTokenizer:
    path = Path(preset)
    if preset not in PRESETS and path.is_dir():
        tok = load_tokenizer(path)
        assert isinstance(tok, ImageTokenizer)
        return tok
    cfg = from_dict(ImageTokenizerConfig, load_yaml(PRESETS.get(preset, path)).get("tokenizer"), f"{preset}.tokenizer")
    return ImageTokenizer(cfg)


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=[p for p, f in PRESETS.items() if f.is_file()],
                    help="preset names (cpu, aion), recipe YAML paths or trained tokenizer directories")
    ap.add_argument("--n", type=int, default=256, help="objects per timed call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine()}")
    header = f"{'preset':<8} {'survey':<13} {'input':<13} {'crop->grid':<12} {'tokens':>6} {'vocab':>6} " \
             f"{'params':>8} {'encode obj/s':>13} {'decode obj/s':>13}"
    print(header)
    print("-" * len(header))
    for preset in args.presets:
        tok = build(preset)
        crop, g = tok.config.crop_size, tok.config.grid
        n_par = sum(p.numel() for p in tok.model.parameters())
        for survey in ("legacysurvey", "hsc"):
            size = max(crop, 64 if survey == "legacysurvey" else 96)
            batch = synthetic(survey, args.n, size)
            enc = time_it(lambda b=batch, k=tok: k.encode(b), args.repeats)
            tokens = tok.encode(batch)
            dec = time_it(lambda t=tokens, s=survey, k=tok: k.decode(t, modality=f"{s}_image"), args.repeats)
            print(f"{Path(preset).stem:<8} {survey:<13} {f'{len(batch.bands)}x{size}x{size}':<13} "
                  f"{f'{crop}->{g}x{g}':<12} {tok.num_tokens:>6} {tok.vocab_size:>6} {n_par / 1e6:>7.2f}M "
                  f"{args.n / enc:>13.0f} {args.n / dec:>13.0f}")


if __name__ == "__main__":
    main()

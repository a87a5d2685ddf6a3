"""Scalar tokenizers: encode/decode throughput per modality, and the quantisation table.

    python benchmarks/bench_scalar_tokenizers.py                      # throughput, synthetic values
    python benchmarks/bench_scalar_tokenizers.py --fit TRAIN --data HELDOUT [--baseline]

``--fit`` and ``--data`` are MMU roots (e.g. two ``aion mock-universe`` outputs with
different seeds); tokenizers are fitted on ``--fit`` with ``--recipe`` and evaluated on
``--data`` (held out). Without ``--fit`` they are fitted on ``--data`` itself (in-sample,
flagged). ``--baseline`` adds the AION-1 default (equally populated bins, no transform) for
every quantile-binned modality, for comparison. Runs on one thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from aion.data.batches import ScalarBatch
from aion.tokenizers.binning import LinearGridBinning, QuantileBinning
from aion.tokenizers.scalar import (
    ScalarTokenizer,
    fit_scalar_tokenizers,
    format_report_table,
    load_scalar_recipe,
    quantization_report,
    read_scalar_batches,
)

REPO = Path(__file__).resolve().parents[1]


def synthetic_batches(names: list[str], n: int, seed: int) -> dict[str, ScalarBatch]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        values = rng.lognormal(0.0, 1.5, n) - 0.2  # skewed, some negatives
        values[rng.random(n) < 0.02] = np.nan  # absent values
        out[name] = ScalarBatch(name=name, values=values, ivar=np.full(n, 100.0))
    return out


def throughput(tok: ScalarTokenizer, batch: ScalarBatch, n: int, repeats: int = 3) -> tuple[float, float]:
    """(encode, decode) objects per second on a batch of ``n`` objects (best of ``repeats``)."""
    reps = int(np.ceil(n / len(batch)))
    big = ScalarBatch(name=batch.name, values=np.tile(batch.values, reps)[:n],
                      ivar=None if batch.ivar is None else np.tile(batch.ivar, reps)[:n])
    enc, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        tokens = tok.encode(big)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        tok.decode(tokens)
        dec.append(time.perf_counter() - t)
    return n / min(enc), n / min(dec)


def baseline_tokenizers(fit_root: Path, names: list[str], recipe) -> dict[str, ScalarTokenizer]:
    """AION-1 default: equally populated bins without transform, for quantile-binned modalities."""
    data = read_scalar_batches(fit_root, names)
    out = {}
    for name in names:
        if recipe.binning_for(name).kind != "quantile" or name not in data:
            continue
        b = data[name]
        binning = QuantileBinning(recipe.n_bins, reservoir_size=recipe.reservoir_size, seed=recipe.seed)
        out[name] = ScalarTokenizer(name, binning).fit(b)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="held-out MMU root for the quantisation table")
    ap.add_argument("--fit", type=Path, help="MMU root to fit on (default: --data, in-sample)")
    ap.add_argument("--recipe", type=Path, default=REPO / "tokenizers" / "scalars.yaml")
    ap.add_argument("--n", type=int, default=200_000, help="objects per throughput measurement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", action="store_true", help="also report AION-1 equal-count bins")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_scalar_recipe(args.recipe)
    print(f"# scalar tokenizers  recipe={args.recipe}  cpu={platform.processor() or platform.machine()}  "
          f"threads={torch.get_num_threads()}  torch={torch.__version__}")

    fit_root = args.fit or args.data
    t0 = time.perf_counter()
    if fit_root is not None:
        toks = fit_scalar_tokenizers(fit_root, recipe)
        print(f"fitted {len(toks)} tokenizers on {fit_root} in {time.perf_counter() - t0:.2f} s")
    else:
        names = recipe.targets()
        train = synthetic_batches(names, 50_000, seed=0)
        toks = {}
        for name in names:
            spec = recipe.binning_for(name)
            binning = spec.build(recipe.n_bins, recipe.reservoir_size, recipe.seed)
            toks[name] = ScalarTokenizer(name, binning).fit(train[name])
        print(f"fitted {len(toks)} tokenizers on synthetic values in {time.perf_counter() - t0:.2f} s")

    evaluation = read_scalar_batches(args.data, list(toks)) if args.data is not None else \
        synthetic_batches(list(toks), 10_000, seed=1)
    print(f"\n## throughput ({args.n} objects per call, best of 3)")
    print(f"{'modality':24s} {'binning':28s} {'encode obj/s':>14s} {'decode obj/s':>14s}")
    for name, tok in toks.items():
        if name not in evaluation:
            continue
        enc, dec = throughput(tok, evaluation[name], args.n)
        kind = "linear" if isinstance(tok.binning, LinearGridBinning) else tok.binning.transform
        print(f"{name:24s} {kind:28s} {enc:14.3e} {dec:14.3e}")

    if args.data is None:
        return
    where = "held out" if args.fit is not None else "IN-SAMPLE (no --fit given)"
    print(f"\n## quantisation on {args.data} ({where}); target: rms_err < 0.1 x median sigma")
    reports = [quantization_report(tok, evaluation[name]) for name, tok in toks.items() if name in evaluation]
    print(format_report_table(reports))
    if args.baseline:
        base = baseline_tokenizers(fit_root, list(toks), recipe)
        print("\n## AION-1 baseline: equally populated bins, no transform")
        print(format_report_table([quantization_report(t, evaluation[n]) for n, t in base.items()
                                   if n in evaluation]))


if __name__ == "__main__":
    main()

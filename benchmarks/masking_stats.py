"""What the masking sampler asks of the model on real token shards: inputs and targets per object.

    python benchmarks/masking_stats.py --tokens runs/tokens20k --input-budget 128 --target-budget 64

Prints the mean input and target counts, the fraction of objects with no target at all
(wasted: nothing to learn from them) and how often a given modality is a target.
"""

from __future__ import annotations

import argparse

import numpy as np

from aion.training.masking import MaskedDataset, MaskingConfig, MaskingSampler, TokenShardDataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--input-budget", type=int, default=128)
    ap.add_argument("--target-budget", type=int, default=64)
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--modality", default="desi_z", help="report how often this one is a target")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = TokenShardDataset(args.tokens)
    cfg = MaskingConfig(input_budget=args.input_budget, target_budget=args.target_budget, seed=args.seed)
    ds = MaskedDataset(base, MaskingSampler(cfg), seed=args.seed)
    rows = np.random.default_rng(args.seed).choice(len(ds), min(args.objects, len(ds)), replace=False)
    n_in, n_tg, hit = [], [], 0
    for i in rows:
        s = ds[int(i)]
        n_in.append(s.num_inputs)
        n_tg.append(s.num_targets)
        hit += args.modality in s.targets
    n_tg = np.array(n_tg)
    print(f"{len(rows)} objects of {args.tokens}, budgets {args.input_budget} / {args.target_budget}")
    print(f"mean inputs {np.mean(n_in):.1f}, mean targets {n_tg.mean():.1f}, objects with no target "
          f"{np.mean(n_tg == 0):.1%}, {args.modality} is a target for {hit / len(rows):.1%}")


if __name__ == "__main__":
    main()

"""Forgetting against keeping, over a grid of residual-flow settings (``aion residualize``).

Every flow setting trades the two residual claims against each other: a map that removes the conditions
(z, mass) from every probe also scrambles small differences between similar objects, which is where a
hidden property lives. For each point of the grid (``--sweep KEY=V1,V2`` per FlowConfig field, product of
all) this fits the flow, maps the embeddings to residuals and prints the worst cross-validated R^2 of any
probe (ridge, 15-NN) for any condition (the rule: <= 0.1) and the best R^2 for the part of ``--keep`` the
conditions do not explain (the rule: >= the raw embeddings'), plus the fit time. ``--plot`` draws the
points against both rules.

    OMP_NUM_THREADS=2 python benchmarks/residualize_tradeoff.py \\
        --embeddings runs/disc40k/embeddings.parquet --catalogue runs/mock40k/truth --keep AGN_FRAC \\
        --set components=16 --sweep data_noise=0,0.1,0.2,0.3 --plot tradeoff.png
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import numpy as np
from residualize_check import parse_overrides, probe_r2, unexplained
from sklearn.decomposition import PCA

from aion.discovery.flow import ConditionalFlow, FlowConfig
from aion.discovery.tables import join_columns, load_embeddings, parse_columns

FORGET_RULE = 0.1


def grid(sweeps: list[str]) -> list[dict]:
    """The product of every ``KEY=V1,V2,...`` list, as FlowConfig overrides."""
    axes = []
    for item in sweeps:
        key, values = item.split("=", 1)
        axes.append([parse_overrides([f"{key}={v}"]) for v in values.split(",")])
    return [{k: v for part in point for k, v in part.items()} for point in itertools.product(*axes)] or [{}]


def score(rep: np.ndarray, conds: dict[str, np.ndarray], kept: np.ndarray, seed: int) -> tuple[float, float]:
    """(worst R^2 of any probe for any condition, best R^2 of any probe for the kept part)."""
    worst = max(r for y in conds.values() for r in probe_r2(rep, y, seed))
    return worst, max(probe_r2(rep, kept, seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--catalogue", required=True)
    ap.add_argument("--condition", default="Z,LOG_MSTAR")
    ap.add_argument("--keep", required=True, help="one column not conditioned on, e.g. AGN_FRAC")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="FlowConfig override for every point")
    ap.add_argument("--sweep", action="append", default=[], help="KEY=V1,V2,...: one grid axis")
    ap.add_argument("--plot", default=None, help="PNG of keep against forget")
    args = ap.parse_args()

    cond = parse_columns(args.condition)
    emb = load_embeddings(args.embeddings)
    cols = join_columns(emb.ids, args.catalogue, [*cond, args.keep])
    ok = np.all([np.isfinite(cols[k]) for k in [*cond, args.keep]], axis=0)
    x = emb.vectors[ok]
    c = np.stack([cols[k][ok] for k in cond], axis=1)
    conds = {k: cols[k][ok] for k in cond}
    kept = unexplained(cols[args.keep][ok], c, args.seed)
    fixed = parse_overrides(args.set)
    base = dataclasses.replace(FlowConfig(seed=args.seed), **fixed)
    points = grid(args.sweep)
    print(f"{len(x)} objects x {x.shape[1]} dims; conditions {cond}; kept: {args.keep}|c; {len(points)} settings")

    rows = [("raw", *score(x, conds, kept, args.seed), 0.0)]
    dims = sorted({p.get("components", base.components) for p in points} - {None})
    rows += [(f"raw, {k} PCs", *score(PCA(k).fit_transform(x), conds, kept, args.seed), 0.0) for k in dims]
    for point in points:
        cfg = dataclasses.replace(base, **point)
        start = time.perf_counter()
        flow = ConditionalFlow.fit(x, c, cfg, progress=False, condition_names=cond)
        seconds = time.perf_counter() - start
        rep = flow.to_base(x, c, guidance=args.guidance)
        name = ", ".join(f"{k}={v}" for k, v in point.items()) or "base settings"
        if flow.history.stopped_at is not None:  # forget_r2: where training stopped is part of the setting
            name += f" (stopped at step {flow.history.stopped_at})"
        rows.append((name, *score(rep, conds, kept, args.seed), seconds))
        print(f"  {name}: forget {rows[-1][1]:.3f}, keep {rows[-1][2]:.3f} ({seconds:.0f} s fit)", flush=True)

    print(f"\nbase: {', '.join(f'{k}={v}' for k, v in fixed.items()) or 'FlowConfig defaults'}, "
          f"guidance {args.guidance:g}; 5-fold CV R^2, best of ridge and 15-NN")
    print(f"| setting | worst R^2 for {', '.join(cond)} (rule <= {FORGET_RULE}) | {args.keep}\\|c | fit (s) |")
    print("|---|---|---|---|")
    for name, worst, keep, seconds in rows:
        print(f"| {name} | {worst:.3f} | {keep:.3f} | {seconds:.0f} |")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        raw_keep = rows[0][2]
        ax.axhline(raw_keep, color="k", ls="--", lw=1, label=f"raw embeddings keep {raw_keep:.2f}")
        ax.axvline(FORGET_RULE, color="r", ls=":", lw=1, label=f"forget rule ({FORGET_RULE})")
        for name, worst, keep, _ in rows[1 + len(dims):]:
            ax.plot(worst, keep, "o", color="C0")
            ax.annotate(name, (worst, keep), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for name, worst, keep, _ in rows[1:1 + len(dims)]:
            ax.plot(worst, keep, "s", color="0.5")
            ax.annotate(name, (worst, keep), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set_xlabel(f"worst probe R^2 for {', '.join(cond)} (lower: forgets)")
        ax.set_ylabel(f"best probe R^2 for {args.keep}|c (higher: keeps)")
        ax.set_title("residual flows: the target is the top-left corner", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()

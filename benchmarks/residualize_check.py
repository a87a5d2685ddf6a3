"""How much of the conditioned quantities survives in residual embeddings (``aion residualize``).

Fits a conditional flow on an embedding table, conditioned on catalogue columns, and reports the
cross-validated R^2 of a ridge and a kNN-regressor probe predicting each condition (should fall to
~0 on the residuals) and each ``--keep`` column (not conditioned on: should survive) from the raw
and the residual embeddings, at each ``--guidance``. Also the fit time on this machine.

Diagnostics for where a kept signal is lost: ``--raw-components K`` adds the raw embeddings' K leading
principal components (the same dimension as a ``--set components=K`` residual), ``--unconditional`` a
residual of an unconditional flow (nothing to forget: what it loses, Gaussianization alone loses), and
``--with-conditions`` each residual with the standardized conditions appended (what a probe still
cannot read then was scrambled by the transport, not merely made to depend on the conditions), and
``--affine K[,K...]`` a conditional affine normalization for comparison: each object's 16 leading
PCs minus the mean of its K nearest objects in the (standardized) conditions, whitened by their
covariance. Last, the rank correlation of each kept column with the distance from the centre of
each representation (does the kept property live in the tails?).

    OMP_NUM_THREADS=1 python benchmarks/residualize_check.py \
        --embeddings runs/disc/emb_qs2.parquet --catalogue runs/qs2/data/heldout/truth \
        --condition Z,LOG_MSTAR --keep sSFR,BULGE_FRAC,TAGE_MW --guidance 1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict, cross_val_score
from sklearn.neighbors import KNeighborsRegressor, NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from aion.discovery.flow import ConditionalFlow, FlowConfig
from aion.discovery.tables import join_columns, load_embeddings, parse_columns


def probe_r2(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float]:
    """5-fold CV R^2 of a ridge (alphas chosen inside each fold) and a 15-NN regressor on standardized inputs."""
    folds = KFold(5, shuffle=True, random_state=seed)
    ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    knn = make_pipeline(StandardScaler(), KNeighborsRegressor(15))
    return (float(cross_val_score(ridge, x, y, cv=folds, scoring="r2").mean()),
            float(cross_val_score(knn, x, y, cv=folds, scoring="r2").mean()))


def unexplained(y: np.ndarray, c: np.ndarray, seed: int) -> np.ndarray:
    """``y`` minus a cross-fitted kNN estimate of ``E[y | conditions]``: the part a residual should still carry."""
    knn = make_pipeline(StandardScaler(), KNeighborsRegressor(30))
    return y - cross_val_predict(knn, c, y, cv=KFold(5, shuffle=True, random_state=seed))


def conditional_affine(x: np.ndarray, c: np.ndarray, k: int, components: int = 16) -> np.ndarray:
    """Leading PCs of ``x`` centred and whitened by the mean and covariance of the ``k`` objects nearest in ``c``."""
    xp = PCA(components, whiten=True).fit_transform(x)
    cs = StandardScaler().fit_transform(c)
    idx = NearestNeighbors(n_neighbors=k).fit(cs).kneighbors(cs, return_distance=False)
    out = np.empty_like(xp)
    for i, rows in enumerate(idx):
        nb = xp[rows]
        val, vec = np.linalg.eigh(np.cov(nb.T) + 1e-3 * np.eye(components))
        out[i] = (vec / np.sqrt(val)) @ vec.T @ (xp[i] - nb.mean(0))
    return out


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` strings to FlowConfig overrides, each value cast to the field's type."""
    overrides = {}
    for item in items:
        key, value = item.split("=", 1)
        default = getattr(FlowConfig(), key)
        if value.lower() == "none":
            overrides[key] = None
        elif isinstance(default, bool):
            overrides[key] = value.lower() in ("1", "true", "yes")
        elif default is None:  # an optional field: its annotation says int or float
            annotation = str(next(f.type for f in dataclasses.fields(FlowConfig) if f.name == key))
            overrides[key] = float(value) if "float" in annotation else int(value)
        else:
            overrides[key] = type(default)(value)
    return overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--catalogue", required=True)
    ap.add_argument("--condition", default="Z,LOG_MSTAR")
    ap.add_argument("--keep", default="", help="columns not conditioned on, to check they survive")
    ap.add_argument("--guidance", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw-components", type=int, default=0, help="also probe the raw K leading PCs")
    ap.add_argument("--unconditional", action="store_true", help="also fit an unconditional flow")
    ap.add_argument("--with-conditions", action="store_true", help="also probe [residual, conditions]")
    ap.add_argument("--affine", default="", help="also a conditional affine normalization with K neighbours")
    ap.add_argument("--set", action="append", default=[], help="FlowConfig override, e.g. --set steps=3000")
    args = ap.parse_args()

    cond = parse_columns(args.condition)
    keep = parse_columns(args.keep, "--keep") if args.keep else []
    emb = load_embeddings(args.embeddings)
    cols = join_columns(emb.ids, args.catalogue, cond + keep)
    ok = np.all([np.isfinite(cols[k]) for k in cond + keep], axis=0)
    x = emb.vectors[ok]
    c = np.stack([cols[k][ok] for k in cond], axis=1)
    overrides = parse_overrides(args.set)
    cfg = dataclasses.replace(FlowConfig(seed=args.seed), **overrides)
    print(f"{int(ok.sum())} objects x {x.shape[1]} dims, conditions {cond}, torch threads {torch.get_num_threads()}")
    print(f"config: {cfg}")

    start, cpu = time.perf_counter(), time.process_time()
    flow = ConditionalFlow.fit(x, c, cfg, progress=False, condition_names=cond)
    fit_s, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"fit: {fit_s:.1f} s wall, {fit_cpu:.1f} s CPU; final train loss {flow.history.final_loss:.4f}, "
          f"val loss {flow.history.final_val_loss:.4f}")

    reps = {"raw": x}
    if args.raw_components:
        reps[f"raw, {args.raw_components} PCs"] = PCA(args.raw_components).fit_transform(x)
    for g in (float(v) for v in args.guidance.split(",")):
        start, cpu = time.perf_counter(), time.process_time()
        reps[f"residual w={g:g}"] = flow.to_base(x, c, guidance=g)
        print(f"to_base w={g:g}: {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")
    if args.unconditional:
        reps["unconditional"] = ConditionalFlow.fit(x, None, cfg, progress=False).to_base(x)
    for k in (int(v) for v in args.affine.split(",") if v):
        reps[f"affine, k={k}"] = conditional_affine(x, c, k)
    if args.with_conditions:
        c_std = (c - c.mean(0)) / c.std(0)
        reps.update({f"{k} + c": np.hstack([v, c_std]) for k, v in list(reps.items()) if k != "raw"})

    # targets: the conditions (should vanish), the kept columns, and the kept columns' part the
    # conditions do not explain ("|c" suffix: should survive in the residual about as well as in raw)
    targets = {k: cols[k][ok] for k in cond + keep}
    targets.update({f"{k}|c": unexplained(cols[k][ok], c, args.seed) for k in keep})
    print("\n5-fold CV R^2 (ridge / 15-NN regressor, standardized inputs)")
    print(f"| {'representation':<16} |" + "".join(f" {k:>16} |" for k in targets))
    print("|" + "---|" * (1 + len(targets)))
    for name, rep in reps.items():
        row = f"| {name:<16} |"
        for y in targets.values():
            r_ridge, r_knn = probe_r2(rep, y, args.seed)
            row += f" {r_ridge:>7.3f} / {r_knn:>6.3f} |"
        print(row)
    if keep:
        print("\nSpearman rank correlation of each kept column with the distance from the centre")
        for name, rep in reps.items():
            if name.endswith(" + c"):
                continue
            radius = np.linalg.norm(StandardScaler().fit_transform(rep), axis=1)
            print(f"  {name:<16} " + "  ".join(f"{k}: {spearmanr(radius, cols[k][ok])[0]:+.3f}" for k in keep))


if __name__ == "__main__":
    main()

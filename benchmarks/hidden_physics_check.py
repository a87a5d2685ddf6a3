"""How findable the mock's hidden populations are from broadband photometry alone.

A supervised upper-bound check for the discovery measurements: if a gradient-boosted classifier on
the catalogue fluxes cannot separate a population, no unsupervised tool should be expected to.

    python benchmarks/hidden_physics_check.py --n 3000 --seed 5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--data", type=Path, default=None, help="an existing mock universe (default: generate one)")
    args = ap.parse_args()
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    from aion.discovery.tables import join_columns, read_table
    from aion.mock.universe import MockConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = Path(tmp) / "mock"
            generate(root, MockConfig(n=args.n, seed=args.seed, image_size=16, hsc_image_size=16), progress=False)
        bands = ["G", "R", "I", "Z", "W1", "W2"]
        leg = read_table(root / "legacysurvey", ["object_id"] + [f"FLUX_{b}" for b in bands])
        ids = np.asarray(leg["object_id"]).astype(np.int64)
        truth = join_columns(ids, root / "truth", ["RARE", "AGN"])
        features = np.arcsinh(np.stack([leg[f"FLUX_{b}"] for b in bands], axis=1) / 0.1)
        print(f"{len(ids)} galaxies; features: asinh fluxes {', '.join(bands)}; 5-fold gradient boosting")
        for label in ("RARE", "AGN"):
            y = truth[label].astype(int)
            p = cross_val_predict(HistGradientBoostingClassifier(max_iter=200, random_state=0), features, y, cv=5,
                                  method="predict_proba")[:, 1]
            print(f"  {label:<5} {int(y.sum()):>5} members ({y.mean():.1%})  AUROC {roc_auc_score(y, p):.3f}")


if __name__ == "__main__":
    main()

"""Run-to-run scatter of a trained tokenizer's held-out metrics: train a recipe under several seeds
(and variants of it), evaluate each on held-out data, print every run and each variant's mean.

One image-tokenizer run's held-out HSC chi^2 moved from 2.40 to 5.59 between two machines with the
same code and data (docs/tokenizers.md), so a single run cannot say whether a recipe change helps.
Each (variant, seed) is one ``aion tokenizer train`` and ``aion tokenizer eval`` subprocess with one
thread; ``--jobs`` run at once. A rerun skips finished runs (training resumes from checkpoints).

    python benchmarks/tokenizer_seeds.py --recipe tokenizers/image_cpu.yaml --data runs/mock20k \\
        --eval-data runs/mock_eval --out runs/seeds --seeds 0,1,2 \\
        --variant base: --variant floor005:tokenizer.error_floor=0.005 --jobs 2

A variant is ``NAME:KEY=VALUE[,KEY=VALUE...]`` with dotted recipe keys (``train.steps=8000``); values
are read as YAML (``true``, ``0.005``, ``[8, 8, 8]``). ``train.seed`` is set per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

IMAGE_METRICS = (  # (label, survey, key, scale)
    ("Legacy chi2", "legacysurvey", "reduced_chi2", 1.0),
    ("HSC chi2", "hsc", "reduced_chi2", 1.0),
    ("HSC chi2 median obj", "hsc", "reduced_chi2_median_object", 1.0),
    ("HSC RMS/noise", "hsc", "rms_vs_truth_over_noise", 1.0),
    ("HSC ap |err| %", "hsc", "aperture_median_abs_rel_error", 100.0),
    ("HSC worst band bias %", "hsc", "aperture_per_band_median_rel_bias", 100.0),
    ("Legacy worst band bias %", "legacysurvey", "aperture_per_band_median_rel_bias", 100.0),
)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] (NAME: for none)")
    overrides, items, depth, start = {}, [], 0, 0
    for i, ch in enumerate(rest + ","):  # split on commas outside brackets: lists are values too
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(rest[start:i])
            start = i + 1
    for item in filter(None, items):
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--variant {text!r}: {item!r} is not SECTION.KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def apply(recipe: dict, overrides: dict) -> dict:
    out = json.loads(json.dumps(recipe))
    for key, value in overrides.items():
        section, field = key.split(".", 1)
        if section not in out or not isinstance(out[section], dict):
            raise SystemExit(f"override {key}: the recipe has no section {section!r} (has {sorted(out)})")
        out[section][field] = value
    return out


def run_one(run_dir: Path, data: str, eval_data: str) -> dict:
    metrics = run_dir / "eval" / "metrics.json"
    if not metrics.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        aion = [sys.executable, "-m", "aion.cli"]
        with (run_dir / "log.txt").open("a") as log:
            for cmd in ([*aion, "tokenizer", "train", "--recipe", str(run_dir / "recipe.yaml"), "--data", data,
                         "--out", str(run_dir / "train"), "--quiet"],
                        [*aion, "tokenizer", "eval", str(run_dir / "train"), "--data", eval_data,
                         "--out", str(run_dir / "eval")]):
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                    step = " ".join(cmd[3:5])
                    raise SystemExit(f"{run_dir}: `aion {step}` failed; its output is in {run_dir / 'log.txt'}")
    return json.loads(metrics.read_text())


def summarise(m: dict) -> dict[str, float]:
    out = {}
    for label, survey, key, scale in IMAGE_METRICS:
        if survey not in m or key not in m[survey]:
            continue
        v = m[survey][key]
        out[label] = scale * (max(v.values(), key=abs) if isinstance(v, dict) else v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--data", required=True, help="training data root")
    ap.add_argument("--eval-data", required=True, help="held-out mock universe (with truth)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... (repeatable)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    if recipe.get("kind") != "image":
        raise SystemExit(f"{args.recipe}: this benchmark summarises image tokenizers, got kind {recipe.get('kind')!r}")
    variants = [parse_variant(v) for v in (args.variant or ["base:"])]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for name, overrides in variants:
        for seed in seeds:
            run_dir = Path(args.out) / name / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(apply(recipe, {**overrides, "train.seed": seed}), sort_keys=False)
            old = run_dir / "recipe.yaml"
            if old.is_file() and old.read_text() != text:
                raise SystemExit(f"{run_dir}: holds a run of another recipe; remove it or use another --out")
            old.write_text(text)
            runs.append((name, seed, run_dir))
    print(f"{len(runs)} runs ({len(variants)} variants x {len(seeds)} seeds), {args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda r: summarise(run_one(r[2], args.data, args.eval_data)), runs))

    labels = [lab for lab, *_ in IMAGE_METRICS if any(lab in r for r in results)]
    print("\n| variant | seed | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 2) + "|")
    for (name, seed, _), r in zip(runs, results, strict=True):
        print(f"| {name} | {seed} | " + " | ".join(f"{r.get(lab, float('nan')):.2f}" for lab in labels) + " |")
    summary = {}
    for name, _ in variants:
        rows = [r for (n, _, _), r in zip(runs, results, strict=True) if n == name]
        summary[name] = {lab: {"mean": float(np.mean([r[lab] for r in rows])),
                               "std": float(np.std([r[lab] for r in rows], ddof=1)) if len(rows) > 1 else 0.0,
                               "runs": [r[lab] for r in rows]} for lab in labels}
        print(f"| **{name}** | mean +- sd | "
              + " | ".join(f"{summary[name][lab]['mean']:.2f} +- {summary[name][lab]['std']:.2f}" for lab in labels)
              + " |")
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

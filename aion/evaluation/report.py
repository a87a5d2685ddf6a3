"""The evaluation report: AION-1-style table, low-data curves, predicted-vs-true plots, every number in JSON.

Input is the list of result records written by :mod:`aion.evaluation.suite`, one per
(target, input set, method, labelled-set size, seed)::

    {"target": ..., "input_set": ..., "method": ..., "family": "foundation model" | "baseline",
     "size": 100 | "all", "effective_size": int, "seed": 0, "metrics": {"r2": ..., ...}, "seconds": ...}
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SHORT = {"provabgs_log_mstar": "LOG_MSTAR", "provabgs_z": "Z", "provabgs_ssfr": "sSFR",
         "provabgs_tage_mw": "TAGE_MW", "provabgs_z_mw": "Z_MW"}


def short(target: str) -> str:
    return SHORT.get(target, target)


def _size_key(size: Any) -> float:
    return math.inf if size == "all" else float(size)


def aggregate(records: Sequence[dict[str, Any]], metric: str = "r2") -> dict[tuple, dict[str, float]]:
    """{(target, input_set, method, size): {"mean", "std", "n_seeds", "effective_size"}} over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["target"], r["input_set"], r["method"], r["size"])].append(r)
    out = {}
    for key, rs in groups.items():
        vals = np.array([r["metrics"].get(metric, np.nan) for r in rs], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[key] = {"mean": float(vals.mean()) if vals.size else math.nan,
                    "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0, "n_seeds": int(vals.size),
                    "effective_size": int(np.median([r["effective_size"] for r in rs])),
                    "family": rs[0].get("family", "")}
    return out


def ceilings(agg: dict[tuple, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per target: the best baseline with all labels (the 'ceiling' the data allow a from-scratch model)."""
    best: dict[str, dict[str, Any]] = {}
    for (target, input_set, method, size), v in agg.items():
        if size != "all" or v["family"] != "baseline" or method == "constant" or not math.isfinite(v["mean"]):
            continue
        if target not in best or v["mean"] > best[target]["r2"]:
            best[target] = {"r2": v["mean"], "std": v["std"], "method": method, "input_set": input_set,
                            "n_labels": v["effective_size"]}
    return best


def label_efficiency(agg: dict[tuple, dict[str, float]]) -> list[dict[str, Any]]:
    """For each FM method at size N: the smallest baseline size reaching its R^2 (same target and inputs),
    i.e. how many labels a from-scratch model needs to match it (None = none of the sizes run)."""
    rows = []
    sizes_of: dict[tuple, list[tuple[float, Any, float]]] = defaultdict(list)
    for (target, input_set, method, size), v in agg.items():
        if v["family"] == "baseline" and method != "constant":  # the trivial floor matches nothing useful
            sizes_of[(target, input_set)].append((_size_key(size), size, v["mean"]))
    for (target, input_set, method, size), v in agg.items():
        if v["family"] != "foundation model" or size == "all":
            continue
        base = sorted(sizes_of.get((target, input_set), []))
        match = next((s for _, s, r2 in base if r2 >= v["mean"]), None)
        if match is not None and base and match == base[0][1]:
            match = f"<= {match}"  # the smallest baseline run already matches: fewer labels may too
        rows.append({"target": target, "input_set": input_set, "method": method, "size": size, "r2": v["mean"],
                     "baseline_labels_to_match": match})
    return rows


def ten_times_goal(agg: dict[tuple, dict[str, float]]) -> list[dict[str, Any]]:
    """The suite's goal, per target and size N whose 10N was also run: the best foundation-model row
    (any method, any inputs) with N labels against the best baseline (any method, any inputs) with 10N.

    Rows compare means over seeds; ``met`` is True when the foundation model's mean is at least the
    baseline's. Sizes are compared as requested (an ``"all"`` size never stands in for 10N)."""
    best: dict[tuple, dict[str, Any]] = {}
    for (target, input_set, method, size), v in agg.items():
        if method == "constant" or not math.isfinite(v["mean"]) or size == "all":
            continue
        key = (target, v["family"], int(size))
        if key not in best or v["mean"] > best[key]["mean"]:
            best[key] = {**v, "method": method, "input_set": input_set}
    rows = []
    for (target, family, n), fm in sorted(best.items()):
        base = best.get((target, "baseline", 10 * n))
        if family != "foundation model" or base is None:
            continue
        rows.append({"target": target, "n": n, "fm": fm, "baseline_10n": base, "met": fm["mean"] >= base["mean"]})
    return rows


def _r2_cell(v: dict[str, Any] | None) -> str:
    if v is None or not math.isfinite(v["mean"]):
        return "-"
    return f"{v['mean']:.3f}" + (f" +- {v['std']:.3f}" if v["n_seeds"] > 1 else "")


def _r2_table(agg: dict[tuple, dict[str, float]], rows: Sequence[tuple[str, str, str]], headers: Sequence[str],
              keys_of: Callable[[str, str], list[tuple]], *, skip_empty: bool = False) -> list[str]:
    """Markdown rows (family, inputs, method) x ``headers``; ``keys_of(input_set, method)`` gives the agg key of
    each column. ``skip_empty`` drops rows with no number in any column."""
    lines = ["| family | inputs | method | " + " | ".join(headers) + " |", "|---|---|---|" + "---|" * len(headers)]
    for family, input_set, method in rows:
        cells = [_r2_cell(agg.get(key)) for key in keys_of(input_set, method)]
        if not skip_empty or any(c != "-" for c in cells):
            lines.append(f"| {family} | {input_set} | {method} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(records: Sequence[dict[str, Any]], meta: dict[str, Any], plots: Sequence[str]) -> str:
    agg = aggregate(records)
    targets = sorted({r["target"] for r in records}, key=lambda t: list(SHORT).index(t) if t in SHORT else 99)
    rows = sorted({(r["family"], r["input_set"], r["method"]) for r in records},
                  key=lambda x: (x[0] != "foundation model", x[1], x[2]))
    lines = [f"# Evaluation report: {meta.get('suite', '')}", ""]
    if meta.get("headline"):
        lines += [meta["headline"], ""]
    lines += [f"Model `{meta.get('model')}`; labelled data `{meta.get('data')}` ({meta.get('n_labelled')} labelled "
              f"objects, test set {meta.get('n_test')} fixed by object id); seeds {meta.get('seeds')}.", "",
              "## R^2 on the test set with all training labels (mean +- std over seeds when there are several)", ""]
    lines += _r2_table(agg, rows, [short(t) for t in targets], lambda i, m: [(t, i, m, "all") for t in targets])
    ceil = ceilings(agg)
    if ceil:
        lines += ["", "Ceiling (best from-scratch baseline with all labels): " + "; ".join(
            f"{short(t)} {c['r2']:.3f} ({c['method']}, {c['input_set']}, {c['n_labels']} labels)"
            for t, c in ceil.items()), ""]
    sizes = sorted({r["size"] for r in records}, key=_size_key)
    if len(sizes) > 1:
        lines += ["## R^2 by number of training labels (mean +- std over seeds)", ""]
        for t in targets:
            lines += [f"**{short(t)}**", ""]
            lines += _r2_table(agg, rows, [str(n) for n in sizes],
                               lambda i, m, t=t: [(t, i, m, n) for n in sizes], skip_empty=True)
            lines.append("")
    goal = ten_times_goal(agg)
    if goal:
        lines += ["## The goal: the foundation model with N labels against the best baseline with 10N", "",
                  "Best foundation-model row (any head, any inputs) with N labels against the best from-scratch "
                  "baseline (any method, any inputs) with 10N; mean +- std over seeds.", "",
                  "| target | N | foundation model, N labels | best baseline, 10N labels | met |",
                  "|---|---|---|---|---|"]
        for g in goal:
            fm, base = g["fm"], g["baseline_10n"]
            lines.append(f"| {short(g['target'])} | {g['n']} | {_r2_cell(fm)} ({fm['method']}, {fm['input_set']}) | "
                         f"{_r2_cell(base)} ({base['method']}, {base['input_set']}) | {'yes' if g['met'] else 'no'} |")
        lines.append("")
    eff = label_efficiency(agg)
    if eff:
        lines += ["## Label efficiency", "",
                  "Labels a baseline needs (same target and inputs) to match the foundation model's R^2 at N labels "
                  "(`>max` = no baseline size run reaches it).", "",
                  "| target | inputs | method | N | FM R^2 | baseline labels to match |", "|---|---|---|---|---|---|"]
        for e in sorted(eff, key=lambda e: (e["target"], e["input_set"], e["method"], _size_key(e["size"]))):
            match = e["baseline_labels_to_match"]
            lines.append(f"| {short(e['target'])} | {e['input_set']} | {e['method']} | {e['size']} | {e['r2']:.3f} | "
                         f"{'>max' if match is None else match} |")
    redshift = [r for r in records if r["target"] == "provabgs_z" and r["size"] == "all" and "nmad" in r["metrics"]]
    if redshift:
        lines += ["", "## Redshift (all labels): NMAD and outlier fraction, mean over seeds", "",
                  "| family | inputs | method | NMAD | outliers |", "|---|---|---|---|---|"]
        g: dict[tuple, list[dict]] = defaultdict(list)
        for r in redshift:
            g[(r["family"], r["input_set"], r["method"])].append(r["metrics"])
        for (family, input_set, method), ms in sorted(g.items()):
            lines.append(f"| {family} | {input_set} | {method} | {np.mean([m['nmad'] for m in ms]):.4f} | "
                         f"{np.mean([m['outlier_fraction'] for m in ms]):.3f} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", f"Every number: `results.json`. Wall time {meta.get('seconds', 0):.0f} s.", ""]
    return "\n".join(lines)


# Every file of a report is written whole to a temporary name and renamed: never half-written.
def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def plot_curves(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """One figure per input set: R^2 vs labelled-set size, one panel per target, one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(records)
    paths = []
    for input_set in sorted({r["input_set"] for r in records}):
        targets = sorted({r["target"] for r in records if r["input_set"] == input_set},
                         key=lambda t: list(SHORT).index(t) if t in SHORT else 99)
        fig, axes = plt.subplots(1, len(targets), figsize=(3.6 * len(targets), 3.3), squeeze=False)
        methods = sorted({(r["family"], r["method"]) for r in records if r["input_set"] == input_set})
        for ax, t in zip(axes[0], targets, strict=True):
            for i, (family, m) in enumerate(methods):
                pts = sorted((v["effective_size"], v["mean"], v["std"]) for (tt, s, mm, _), v in agg.items()
                             if tt == t and s == input_set and mm == m)
                if not pts:
                    continue
                x, y, e = (np.array(c) for c in zip(*pts, strict=True))
                ax.errorbar(x, y, yerr=e, marker="o" if family == "foundation model" else "s", ms=4, capsize=2,
                            ls="-" if family == "foundation model" else "--", color=f"C{i}", label=m)
            ax.set_xscale("log")
            ax.set_title(short(t), fontsize=9)
            ax.set_xlabel("labelled objects")
            ax.set_ylim(max(-0.2, ax.get_ylim()[0]), 1.0)
        axes[0][0].set_ylabel("test R^2")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"Low-data curves, inputs: {input_set} (solid: foundation model, dashed: from scratch)",
                     fontsize=10)
        path = out / f"curves_{input_set.replace('+', '_')}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def plot_pred_vs_true(predictions: dict[str, dict[str, np.ndarray]], out: Path, title: str) -> Path:
    """``predictions[target] = {"true": (n,), "<method>": (n,), ...}``: one panel per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(predictions)
    fig, axes = plt.subplots(1, len(targets), figsize=(3.6 * len(targets), 3.5), squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        d = predictions[t]
        y = d["true"]
        lo, hi = np.nanpercentile(y, [0.5, 99.5])
        for i, (m, p) in enumerate((k, v) for k, v in d.items() if k != "true"):
            ax.scatter(y, p, s=4, alpha=0.5, color=f"C{i}", label=m)
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(short(t), fontsize=9)
        ax.set_xlabel("true")
    axes[0][0].set_ylabel("predicted")
    axes[0][-1].legend(fontsize=7, markerscale=3)
    fig.suptitle(title, fontsize=10)
    path = out / "pred_vs_true.png"
    save_figure(fig, path)
    return path

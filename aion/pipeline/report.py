"""The pipeline's one report: key results first (held-out, against a trivial predictor), then what ran.

Reads what the stages wrote (``pipeline.json``, ``zeroshot/``, ``evaluate/``, the pretraining
metrics) and writes ``report.md`` with its PNGs under ``report/``. Every number is read from those
files, none is recomputed here except the comparisons that put two of them side by side.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aion.evaluation.metrics import paired_bootstrap
from aion.evaluation.report import save_figure, write_text_atomic

if TYPE_CHECKING:
    from aion.pipeline.run import Pipeline

MASS = "provabgs_log_mstar"
CLEAR_NMAD_RATIO = 1.5
"""'Clearly better' redshift: the whole 95% interval of NMAD(trivial) / NMAD(model) is above this."""
CLEAR_R2_GAIN = 0.10
"""'Clearly better' stellar mass: the whole 95% interval of the R^2 gain over the constant is above this."""
FM_SETS = ("photometry+image", "photometry")


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _zeroshot_rows(zs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from aion.evaluation.zeroshot import TRIVIAL

    red = zs.get("redshift", {})
    rows = {}
    for s in FM_SETS:
        if f"foundation model, {s}" in red:
            rows[f"FM zero-shot, {s}"] = red[f"foundation model, {s}"]
    if TRIVIAL in red:
        rows["trivial (training z distribution)"] = red[TRIVIAL]
    gbm = [k for k in red if k.startswith("gradient-boosted")]
    if gbm:
        rows["reference: GBM trained on all labels"] = red[gbm[0]]
    return rows


def _probe_rows(results: dict[str, Any], target: str) -> dict[str, dict[str, Any]]:
    """{label: metrics} of the runs with every label (first seed) for one target."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results.get("records", []):
        if r["target"] != target or r["size"] != "all":
            continue
        label = r["method"] if r["method"] == "constant" else f"{r['method']}, {r['input_set']}"
        rows.setdefault(label, {**r["metrics"], "family": r["family"], "n_train": r["effective_size"]})
    return rows


def _best(rows: dict[str, dict[str, Any]], family: str, key: str = "r2") -> tuple[str, dict[str, Any]] | None:
    cands = [(k, v) for k, v in rows.items() if v.get("family") == family and math.isfinite(v.get(key, math.nan))]
    return max(cands, key=lambda kv: kv[1][key]) if cands else None


def _tag(input_set: str) -> str:
    """Column prefix of an input set in zeroshot/predictions.npz (the zero-shot module's own naming)."""
    from aion.evaluation.zeroshot import _tag as zeroshot_tag

    return zeroshot_tag(input_set)


def _mass_comparison(out: Path, mass: dict[str, dict[str, Any]]
                     ) -> tuple[str, dict[str, Any], np.ndarray, np.ndarray, np.ndarray | None] | None:
    """The best foundation-model stellar-mass probe on the test objects it predicted: (label, metrics, truth,
    probe, constant or None), from evaluate/test_predictions.npz; None when the files lack it."""
    best, preds = _best(mass, "foundation model"), _test_predictions(out)
    if best is None or preds is None:
        return None
    method, input_set = best[0].split(", ", 1)
    y, p = preds.get(f"{MASS}|{input_set}|true"), preds.get(f"{MASS}|{input_set}|{method}")
    if y is None or p is None:
        return None
    c = next((v for k, v in preds.items() if k.startswith(f"{MASS}|") and k.endswith("|constant")), None)
    ok = np.isfinite(y) & np.isfinite(p)
    return best[0], best[1], y[ok], p[ok], None if c is None else c[ok]


def _nmad(dz: np.ndarray) -> float:
    from aion.evaluation.metrics import robust_stats

    return robust_stats(dz)[1]


def key_results(out: Path) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines of the key-results section and the numbers behind them."""
    zs = _load_json(out / "zeroshot" / "metrics.json")
    ev = _load_json(out / "evaluate" / "results.json")
    lines = ["## Key results (held-out objects never seen in pretraining)", ""]
    facts: dict[str, Any] = {}
    z_rows = _zeroshot_rows(zs)
    if z_rows:
        lines += [f"**Zero-shot redshift** of {zs['n_heldout_with_redshift']} held-out galaxies with a spectroscopic "
                  "redshift: the pretrained model predicts `desi_z` from the other modalities with no labelled "
                  "training at all (posterior median; dz = (z_pred - z) / (1 + z)).", "",
                  "| predictor | NMAD | outliers (\\|dz\\| > 0.15) | bias | 68% coverage |", "|---|---|---|---|---|"]
        for label, m in z_rows.items():
            lines.append(f"| {label} | {m['nmad']:.3f} | {m['outlier_fraction']:.3f} | {m['bias']:+.3f} | "
                         f"{m.get('coverage_68', math.nan):.2f} |")
        fm_key, fm = next(((k, m) for k, m in z_rows.items() if k.startswith("FM")), (None, None))
        triv = z_rows.get("trivial (training z distribution)")
        pred_file = out / "zeroshot" / "predictions.npz"
        if fm is not None and triv is not None and pred_file.is_file():
            a = dict(np.load(pred_file))
            tag = _tag(fm_key.split(", ", 1)[1])
            z = a["z_true"]
            dz_fm, dz_tr = (a[f"{tag}_median"] - z) / (1 + z), (a["prior_median"] - z) / (1 + z)
            ratio = triv["nmad"] / fm["nmad"] if fm["nmad"] > 0 else math.inf
            lo, hi = paired_bootstrap(lambda r: _nmad(dz_tr[r]) / max(_nmad(dz_fm[r]), 1e-12), z.size)
            beats = lo > CLEAR_NMAD_RATIO
            facts.update(redshift_input_set=fm_key, redshift_nmad_ratio=ratio, redshift_nmad_ratio_ci95=[lo, hi],
                         redshift_beats_trivial=beats)
            lines += ["", f"The best zero-shot input set ({fm_key.split(', ', 1)[1]}) has {ratio:.1f}x smaller NMAD "
                      f"than the trivial predictor (95% paired-bootstrap interval {lo:.1f}-{hi:.1f}x) and "
                      f"{fm['outlier_fraction']:.1%} outliers against {triv['outlier_fraction']:.1%}: "
                      + _verdict(beats, f"the interval's lower end above {CLEAR_NMAD_RATIO}x")]
        lines.append("")
    mass = _probe_rows(ev, MASS)
    if mass:
        meta = ev.get("meta", {})
        lines += [f"**Stellar mass** (`{MASS}`) from frozen embeddings: heads fitted on the labelled held-out "
                  f"galaxies' training split, scored on {meta.get('n_test', '?')} test galaxies "
                  f"({meta.get('n_labelled', '?')} labelled in all).", "",
                  "| method | R^2 | RMSE (dex) | bias (dex) | training labels |", "|---|---|---|---|---|"]
        for label, m in sorted(mass.items(), key=lambda kv: (kv[1]["family"] != "foundation model",
                                                             -kv[1].get("r2", -math.inf))):
            lines.append(f"| {label} | {m['r2']:.3f} | {m['rmse']:.3f} | {m['bias']:+.3f} | {m['n_train']} |")
        const, cmp = mass.get("constant"), _mass_comparison(out, mass)
        if const is not None and cmp is not None and cmp[4] is not None:
            label, m, y, p, c = cmp
            var = float(np.var(y))
            # R^2 gain over the constant on the same objects = (MSE_constant - MSE_probe) / Var(y)
            lo, hi = paired_bootstrap(lambda r: float(np.mean((c[r] - y[r]) ** 2) - np.mean((p[r] - y[r]) ** 2))
                                      / var, y.size)
            beats = lo > CLEAR_R2_GAIN
            gain = m["r2"] - const["r2"]
            facts.update(mass_best_probe=label, mass_r2=m["r2"], mass_r2_gain_ci95=[lo, hi], mass_beats_trivial=beats)
            lines += ["", f"Best probe ({label}): R^2 {m['r2']:.2f} against {const['r2']:.2f} for the "
                      f"constant, a gain of {gain:.2f} (95% paired-bootstrap interval {lo:.2f} to {hi:.2f}); "
                      f"RMSE {m['rmse']:.2f} against {const['rmse']:.2f} dex: "
                      + _verdict(beats, f"the interval's lower end above +{CLEAR_R2_GAIN:.2f}")]
        lines.append("")
    return lines, facts


def _verdict(beats: bool, rule: str) -> str:
    return ("**clearly better than trivial**" if beats else "**not clearly better than trivial**") + f" ({rule})."


def _test_predictions(out: Path) -> dict[str, np.ndarray] | None:
    path = out / "evaluate" / "test_predictions.npz"
    return dict(np.load(path)) if path.is_file() else None


def key_figure(pipe: Pipeline, path: Path) -> bool:
    """Zero-shot z vs truth, probed stellar mass vs truth, and the pretraining loss, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aion.training.loop import read_metrics

    out = pipe.out
    panels = []
    zp = out / "zeroshot" / "predictions.npz"
    if zp.is_file():
        panels.append("z")
    mass_cmp = _mass_comparison(out, _probe_rows(_load_json(out / "evaluate" / "results.json"), MASS))
    if mass_cmp is not None:
        panels.append("mass")
    records = read_metrics(pipe.run_dir)
    if records:
        panels.append("loss")
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "z":
            a = dict(np.load(zp))
            tag = next((_tag(s) for s in FM_SETS if f"{_tag(s)}_median" in a), None)
            z = a["z_true"]
            hi = float(np.percentile(z, 99.5)) * 1.15
            grid = np.linspace(0, hi, 50)
            if tag is not None:
                ax.scatter(z, a[f"{tag}_median"], s=5, alpha=0.6, label="FM zero-shot")
            if "prior_median" in a:
                ax.axhline(float(a["prior_median"][0]), color="C3", lw=1.2, ls="--", label="trivial (training median)")
            ax.plot(grid, grid, "k-", lw=0.8)
            for sign in (1, -1):
                ax.plot(grid, grid + sign * 0.15 * (1 + grid), "k:", lw=0.6)
            ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="spectroscopic z (held out)", ylabel="predicted z",
                   title="zero-shot z" + (" (photometry + images)" if tag == _tag("photometry+image") else ""))
            ax.legend(fontsize=8, loc="upper left")
        elif panel == "mass" and mass_cmp is not None:
            label, m, y, p, const = mass_cmp
            lo, hi = float(np.min(y)) - 0.2, float(np.max(y)) + 0.2
            ax.scatter(y, p, s=8, alpha=0.7, label=f"probe: {label}")
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
            if const is not None and const.size:
                ax.axhline(float(const[0]), color="C3", lw=1.2, ls="--", label="trivial (training mean)")
            ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="log stellar mass (test set)", ylabel="predicted",
                   title=f"stellar-mass probe, R$^2$ {m['r2']:.2f}")
            ax.legend(fontsize=8, loc="upper left")
        elif panel == "loss":
            steps = np.array([r["step"] for r in records])
            loss = np.array([r["loss"] for r in records])
            ax.plot(steps, loss, lw=1)
            ax.set(xlabel="optimizer step", ylabel="training loss (nats)", title="pretraining")
            ax.grid(alpha=0.3)
    save_figure(fig, path)
    return True


def write_report(pipe: Pipeline, manifest: dict[str, Any]) -> Path:
    out = pipe.out
    figs = out / "report"
    tmp_figs = out / "report.tmp"
    shutil.rmtree(tmp_figs, ignore_errors=True)
    tmp_figs.mkdir(parents=True)
    stages = manifest.get("stages", {})
    lines = [f"# aion pipeline report: {pipe.cfg.name}", ""]
    total = sum(s.get("seconds", 0.0) for s in stages.values() if s.get("status") == "done")
    lines += [f"Output folder `{out}`. Stages took {total / 60:.1f} min in all (table below); data: "
              + ("two mock universes made by this run" if pipe.cfg.mock is not None else
                 f"`{pipe.train_data}` (training), `{pipe.heldout_data}` (held out)") + ".", ""]
    body, facts = key_results(out)
    lines += body
    if key_figure(pipe, tmp_figs / "key_results.png"):
        lines += ["![key results](report/key_results.png)", ""]
    lines += discovery_section(out, tmp_figs)
    # copy the stages' own figures next to the report so the folder is self-contained
    for src in [*(out / "zeroshot").glob("*.png"), *(out / "evaluate").glob("*.png")]:
        shutil.copyfile(src, tmp_figs / f"{src.parent.name}_{src.name}")

    lines += ["## What ran", "", "| stage | wall time | summary |", "|---|---|---|"]
    from aion.pipeline.run import TITLES

    for name, title in TITLES.items():
        s = stages.get(name, {})
        if name == "report":
            continue
        secs = f"{s['seconds'] / 60:.1f} min" if "seconds" in s else "-"
        lines.append(f"| {title} | {secs} | {_stage_summary(name, s.get('summary', {}))} |")
    lines += ["", "Details: [zero-shot report](zeroshot/report.md) (calibration, PIT, generated spectra), "
              "[evaluation report](evaluate/report.md) (every method, both targets, both input sets).", ""]
    tok = stages.get("tokenizers", {}).get("summary", {}).get("tokenizers", {})
    if tok:
        lines += ["### Tokenizers (validation on held-back training objects)", ""]
        for stem, m in tok.items():
            shown = {k: v for k, v in m.items() if k.startswith("val_") and isinstance(v, float)}
            lines.append(f"- `{stem}`: " + (", ".join(f"{k} {v:.3g}" for k, v in shown.items()) or m.get("kind", "")))
        lines.append("")
    lines += ["Rerun the same command to reuse every finished stage; change a recipe and only the stages that "
              "depend on it run again. Figures: `report/`.", ""]
    if facts:
        write_text_atomic(tmp_figs / "key_results.json", json.dumps(facts, indent=1))
    shutil.rmtree(figs, ignore_errors=True)
    tmp_figs.rename(figs)
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def discovery_section(out: Path, figs: Path) -> list[str]:
    """The discovery stage's verdicts (read from its metrics.json) and its map, copied into ``figs``."""
    from aion.discovery.evaluate import verdict_table

    metrics = _load_json(out / "discovery" / "eval" / "metrics.json")
    if not metrics:
        return []
    lines = ["## Discovery on the held-out objects", "",
             f"Embeddings of {metrics['n_objects']} held-out galaxies; residual embeddings conditioned on "
             f"{', '.join(metrics['config']['conditions'])} by flow matching; hidden properties and the rare "
             "population come from the mock's truth table, which no model or tool reads.", "",
             *verdict_table(metrics["verdicts"])]
    lines.append("")
    for src, name in ((out / "discovery" / "eval" / "discovery.png", "discovery_summary.png"),
                      (out / "discovery" / "map" / "map_Z.png", "discovery_map_Z.png"),
                      (out / "discovery" / "map" / "gallery.png", "discovery_gallery.png")):
        if src.is_file():
            shutil.copyfile(src, figs / name)
            lines += [f"![{name}](report/{name})", ""]
    lines += ["Details: [discovery measurement](discovery/eval/report.md), [map and gallery](discovery/map/index.md), "
              "ranked outliers in `discovery/outliers.parquet`, embeddings in `discovery/embeddings.parquet` "
              "(`aion search`, `aion outliers`, `aion residualize` work on it directly).", ""]
    return lines


def _stage_summary(name: str, s: dict[str, Any]) -> str:
    if name == "data" and "counts" in s:
        return "; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in c.items() if n != "truth")
                         for k, c in s["counts"].items())
    if name == "tokenizers" and "tokenizers" in s:
        return ", ".join(s["tokenizers"])
    if name == "tokens" and "n_objects" in s:
        return f"{s['n_objects']} objects, {len(s.get('modalities', {}))} modalities"
    if name == "pretrain" and "steps" in s:
        last = s.get("last", {})
        params = f"{s['num_parameters'] / 1e6:.1f} M parameters, " if "num_parameters" in s else ""
        loss = f", final loss {last['loss']:.3f}" if "loss" in last else ""
        rate = f", {last['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in last else ""
        return f"{s.get('preset')} preset, {params}{s['steps']} steps of {s.get('global_batch_size')}{loss}{rate}"
    if name == "zeroshot" and "n_heldout_with_redshift" in s:
        return f"{s['n_heldout_with_redshift']} held-out redshifts"
    if name == "evaluate" and "n_labelled" in s:
        return f"{s['n_labelled']} labelled held-out objects, {s['n_test']} in the test split"
    if name == "discovery" and "verdicts" in s:
        met = sum(s["verdicts"].values())
        return f"{s['n_objects']} held-out objects embedded; {met} of {len(s['verdicts'])} claims met"
    if name == "discovery" and "skipped" in s:
        return f"skipped ({s['skipped']})"
    return ""

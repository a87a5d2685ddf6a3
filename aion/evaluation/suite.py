"""``aion evaluate``: one suite of downstream tasks, every method on the same splits, one report.

A suite (YAML under ``evaluation/``, keys of :class:`SuiteConfig`) names targets, input sets,
labelled-set sizes, seeds and methods. For each target the labelled objects are split once
(:func:`aion.evaluation.splits.make_splits`: a test set fixed by object id, nested training
subsets per seed with their validation rows carved out), and every method, foundation-model
head or from-scratch baseline, is fitted on exactly those rows and scored on the same test set.

Results are appended to ``results.jsonl`` as each run finishes, so an interrupted evaluation
resumes where it stopped (``--restart`` starts over); ``results.json``, ``report.md``, the
plots and ``test_predictions.npz`` are rewritten at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aion.evaluation.labelled import INPUT_SETS, TARGETS, LabelledSet, load_labelled_set
from aion.evaluation.report import write_text_atomic

log = logging.getLogger(__name__)

FM_METHODS = ("linear", "knn", "attentive")
FINETUNE_METHODS = ("lora", "full")
BASELINES = ("constant", "gbm", "net")


@dataclass(kw_only=True)
class SuiteConfig:
    name: str = "quick"
    headline: str = ""
    """A sentence opening the report (what this suite is for)."""
    targets: tuple[str, ...] = TARGETS
    input_sets: tuple[str, ...] = ("photometry", "photometry+image")
    sizes: tuple[int | str, ...] = (100, 300, 1000, "all")
    seeds: tuple[int, ...] = (0, 1)
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    min_val: int = 10
    fm_methods: tuple[str, ...] = FM_METHODS
    """Heads on frozen embeddings: linear, knn, attentive."""
    finetune: tuple[str, ...] = ()
    """Fine-tuning modes: lora, full (each run trains the encoder: the slow part)."""
    finetune_sizes: tuple[int | str, ...] | None = None
    """Sizes at which fine-tuning runs (None = every size)."""
    baselines: tuple[str, ...] = BASELINES
    """From scratch: constant (the training-label mean: the trivial floor), gbm (photometry only), net (MLP on
    photometry, CNN branches for images / spectra)."""
    max_inputs: int | None = None
    max_objects: int | None = None
    """Labelled objects read from the data (None = all)."""

    def __post_init__(self) -> None:
        for field_name, allowed in (("fm_methods", FM_METHODS), ("finetune", FINETUNE_METHODS),
                                    ("baselines", BASELINES), ("input_sets", tuple(INPUT_SETS))):
            bad = [m for m in getattr(self, field_name) if m not in allowed]
            if bad:
                raise ValueError(f"{field_name}: unknown {bad}; expected some of {list(allowed)}")
        if not self.targets or not self.input_sets or not self.sizes or not self.seeds:
            raise ValueError("targets, input_sets, sizes and seeds must each name at least one entry")


def load_suite(path: str | os.PathLike) -> SuiteConfig:
    from aion.config import load_config

    return load_config(SuiteConfig, path, "evaluation suite")


# ---------------------------------------------------------------------------- methods
def _method_factories(cfg: SuiteConfig, am) -> dict[str, tuple[str, Callable[[str], Any]]]:
    """{method name: (family, factory(input_set) -> Method)}."""
    from aion.evaluation import baselines as bl

    out: dict[str, tuple[str, Callable[[str], Any]]] = {}
    if am is not None:
        from aion.evaluation.finetune import FineTune
        from aion.evaluation.heads import AttentiveProbe, FrozenEncoder, KNNProbe, LinearProbe

        encoder = FrozenEncoder(am, max_inputs=cfg.max_inputs)
        heads = {"linear": LinearProbe, "knn": KNNProbe, "attentive": AttentiveProbe}
        for m in cfg.fm_methods:
            out[f"FM {m}"] = ("foundation model", lambda s, cls=heads[m]: cls(encoder))
        for mode in cfg.finetune:
            out[f"FM finetune-{mode}"] = ("foundation model", lambda s, mode=mode: FineTune(am, mode=mode))
    for b in cfg.baselines:
        if b == "constant":
            out["constant"] = ("baseline", lambda s: bl.ConstantBaseline())
        elif b == "gbm":
            out["GBM"] = ("baseline", lambda s: bl.GBMBaseline())
        else:
            out["net"] = ("baseline", lambda s: bl.PhotometryMLP() if _kinds(s) == {"scalar"} else bl.SupervisedNet())
    return out


def _kinds(input_set: str) -> set[str]:
    from aion import modalities as registry

    return {registry.modality(m).kind for m in INPUT_SETS[input_set]}


def _applies(method: str, input_set: str, size, cfg: SuiteConfig) -> bool:
    if method == "GBM" and _kinds(input_set) != {"scalar"}:  # trees read photometry only
        return False
    if method == "constant" and input_set != cfg.input_sets[0]:  # reads no input: one row per target is enough
        return False
    if method.startswith("FM finetune") and cfg.finetune_sizes is not None and size not in cfg.finetune_sizes:
        return False
    return True


def _display(method: str, input_set: str) -> str:
    if method == "net":
        return "MLP" if _kinds(input_set) == {"scalar"} else "CNN"
    return method


# ---------------------------------------------------------------------------- run
def run_suite(cfg: SuiteConfig, data: str | os.PathLike, out_dir: str | os.PathLike, *,
              model_dir: str | os.PathLike | None = None, tokenizers_dir: str | os.PathLike | None = None,
              restart: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every (target, input set, method, size, seed) of the suite; returns the report's metadata."""
    from tqdm.auto import tqdm

    from aion.evaluation import report
    from aion.evaluation.metrics import regression_metrics
    from aion.evaluation.splits import make_splits

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    am = None
    if model_dir is not None:
        from aion.inference import AionModel

        if tokenizers_dir is None:
            raise ValueError("a model needs its tokenizers (tokenizers_dir)")
        am = AionModel.from_pretrained(model_dir, tokenizers_dir, max_inputs=cfg.max_inputs)
        missing = [m for s in cfg.input_sets for m in INPUT_SETS[s] if m not in am.names]
        if missing:
            raise ValueError(f"the model does not read {sorted(set(missing))} (input sets {list(cfg.input_sets)})")
    elif cfg.fm_methods or cfg.finetune:
        raise ValueError("the suite lists foundation-model methods: give the model (and its tokenizers)")
    modalities = sorted({m for s in cfg.input_sets for m in INPUT_SETS[s]})
    labelled = load_labelled_set(data, cfg.targets, modalities, max_objects=cfg.max_objects)
    methods = _method_factories(cfg, am)

    jsonl = out / "results.jsonl"
    stamp_path = out / "results.fingerprint.json"
    stamp = {"data": str(Path(data).resolve()), "model": None if model_dir is None else str(Path(model_dir).resolve()),
             "tokenizers": None if tokenizers_dir is None else str(Path(tokenizers_dir).resolve()),
             **{k: getattr(cfg, k) for k in ("test_fraction", "val_fraction", "min_val", "max_inputs", "max_objects")}}
    if restart:
        jsonl.unlink(missing_ok=True)
    if jsonl.exists() and stamp_path.exists():
        old = json.loads(stamp_path.read_text())
        diff = {k: (old.get(k), v) for k, v in stamp.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{jsonl} holds results of a different setup ({diff}); rerun with --restart or "
                             "another --out")
    write_text_atomic(stamp_path, json.dumps(stamp, indent=1))
    done: dict[tuple, dict[str, Any]] = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["target"], r["input_set"], r["method_key"], str(r["size"]), r["seed"])] = r
    plan = []
    splits_of = {}
    for target in cfg.targets:
        splits = make_splits(labelled.object_id, labelled.has_label(target), cfg.test_fraction, cfg.sizes,
                             cfg.seeds, cfg.val_fraction, cfg.min_val)
        splits_of[target] = splits
        for input_set in cfg.input_sets:
            for sub in splits:
                for key in methods:
                    if _applies(key, input_set, sub.size, cfg):
                        plan.append((target, input_set, key, sub))
    records = [r for r in done.values()]
    preds: dict[str, dict[str, np.ndarray]] = {}
    todo = [p for p in plan if (p[0], p[1], p[2], str(p[3].size), p[3].seed) not in done]
    log.info("%d runs planned, %d already done", len(plan), len(plan) - len(todo))
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc=f"evaluate {cfg.name}", unit="run",
               disable=not progress)
    with jsonl.open("a") as fh:
        for target, input_set, key, sub in todo:
            family, factory = methods[key]
            test = labelled.select(splits_of[target].test)
            bar.set_postfix_str(f"{key} {input_set} {target} n={sub.n}")
            t0 = time.perf_counter()
            method = factory(input_set)
            method.fit(labelled.select(sub.train), labelled.select(sub.val), target, INPUT_SETS[input_set],
                       sub.seed)
            pred = np.asarray(method.predict(test), dtype=np.float64)
            seconds = time.perf_counter() - t0
            rec = _record(target, input_set, key, family, sub, pred, test, seconds, regression_metrics)
            if sub.size == "all" and sub.seed == cfg.seeds[0]:  # kept for the predicted-vs-true plot
                rec["test_predictions"] = [None if not np.isfinite(v) else float(v) for v in pred]
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            records.append(rec)
            bar.update(1)
    bar.close()
    for r in records:
        if "test_predictions" in r:
            test_y = labelled.labels[r["target"]][splits_of[r["target"]].test]
            p = preds.setdefault(f"{r['target']}|{r['input_set']}", {"true": test_y})
            p[_display(r["method_key"], r["input_set"])] = np.array(
                [np.nan if v is None else v for v in r["test_predictions"]], dtype=np.float64)
    for r in records:
        r["method"] = _display(r["method_key"], r["input_set"])
    meta = _finish(cfg, records, preds, splits_of, labelled, out, data, model_dir, time.perf_counter() - t_start,
                   report)
    return meta


def _record(target, input_set, key, family, sub, pred, test: LabelledSet, seconds, metrics_fn) -> dict[str, Any]:
    y = test.labels[target]
    ok = np.isfinite(pred) | ~np.isfinite(y)
    metrics = metrics_fn(pred[ok], y[ok], redshift=target == "provabgs_z")
    metrics["n_failed"] = int((~ok).sum())
    return {"target": target, "input_set": input_set, "method_key": key, "family": family,
            "size": sub.size, "effective_size": sub.n, "seed": sub.seed, "metrics": metrics, "seconds": seconds}


def _finish(cfg, records, preds, splits_of, labelled, out: Path, data, model_dir, seconds, report) -> dict[str, Any]:
    first = next(iter(splits_of.values()))
    meta = {"suite": cfg.name, "headline": cfg.headline, "model": str(model_dir), "data": str(data),
            "n_labelled": int(len(labelled)), "n_test": int(first.test.size), "seeds": list(cfg.seeds),
            "seconds": seconds, "splits": {t: s.to_dict() for t, s in splits_of.items()},
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}}
    plots = [str(p) for p in report.plot_curves(records, out)] if records else []
    if preds:
        sets = sorted({k.split("|")[1] for k in preds}, key=lambda s: -len(s))
        best_set = sets[0]
        per_target = {k.split("|")[0]: v for k, v in preds.items() if k.endswith(f"|{best_set}")}
        plots.append(str(report.plot_pred_vs_true(per_target, out, f"Test set, all labels, inputs: {best_set}")))
        report.save_npz_atomic(out / "test_predictions.npz",
                               {f"{k}|{m}": v for k, d in preds.items() for m, v in d.items()})
    slim = [{k: v for k, v in r.items() if k != "test_predictions"} for r in records]
    report.write_text_atomic(out / "results.json",
                             json.dumps({"meta": meta, "records": slim}, indent=1, default=_json_default))
    report.write_text_atomic(out / "report.md", report.render_markdown(records, meta, plots))
    return meta


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x).__name__)

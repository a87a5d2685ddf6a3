"""``aion zeroshot``: the command-line face of :mod:`aion.evaluation.zeroshot`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_zeroshot_parser(sub) -> None:
    p = sub.add_parser(
        "zeroshot", help="zero-shot redshift and spectrum prediction on held-out objects, with baselines and plots",
        description="Predicts the spectroscopic redshift of held-out objects from photometry and from photometry + "
                    "images (posterior median, 68/95%% intervals, PIT), compares with gradient-boosted trees "
                    "trained on every labelled object of --train-data, generates spectra from photometry + images "
                    "and compares them with nearest-neighbour spectra. Writes metrics.json, report.md, "
                    "predictions.npz and PNGs into --out.")
    p.add_argument("--model", type=Path, required=True, help="exported model folder")
    p.add_argument("--tokenizers", type=Path, required=True, help="directory of saved tokenizers (any depth)")
    p.add_argument("--data", type=Path, required=True, help="held-out MMU data root (not seen in training)")
    p.add_argument("--train-data", type=Path, required=True,
                   help="MMU data root whose labelled objects train the baselines (the pretraining data)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-objects", type=int, default=None, help="held-out objects with a redshift (default all)")
    p.add_argument("--max-inputs", type=int, default=None, help="encoder token budget (default: all tokens)")
    p.add_argument("--calibration-data", type=Path, default=None,
                   help="MMU root of labelled objects in neither the pretraining nor the held-out data: fit one "
                        "redshift temperature per input set there and report temperature-calibrated rows too")
    p.add_argument("--calibration-max-objects", type=int, default=None,
                   help="labelled objects of --calibration-data to use (default all)")
    p.add_argument("--calibration-objective", choices=("coverage", "nll"), default="coverage",
                   help="coverage: match the 68%% and 95%% intervals' coverage; nll: maximum likelihood")
    p.add_argument("--gen-steps", type=int, default=8)
    p.add_argument("--gen-samples", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0, help="spectrum sampling temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coarse", action="store_true", help="use the coarse redshift token only (no fine refinement)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_zeroshot)


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from aion.evaluation.zeroshot import ZeroShotConfig, evaluate_zeroshot

    for flag, value in (("--max-objects", args.max_objects), ("--max-inputs", args.max_inputs),
                        ("--gen-steps", args.gen_steps), ("--gen-samples", args.gen_samples),
                        ("--calibration-max-objects", args.calibration_max_objects)):
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} must be >= 1, got {value}")
    cfg = ZeroShotConfig(max_objects=args.max_objects, max_inputs=args.max_inputs, gen_steps=args.gen_steps,
                         gen_samples=args.gen_samples, temperature=args.temperature, seed=args.seed,
                         refined=not args.coarse, plots=not args.no_plots,
                         calibration_data=None if args.calibration_data is None else str(args.calibration_data),
                         calibration_max_objects=args.calibration_max_objects,
                         calibration_objective=args.calibration_objective)
    try:
        evaluate_zeroshot(args.model, args.tokenizers, args.data, args.train_data, args.out, cfg,
                                    progress=not args.quiet)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    return _print_report(args.out)


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="downstream evaluation suite: probes, fine-tuning and from-scratch baselines on the same "
                         "splits, low-data curves, Markdown report",
        description="Runs every (target, input set, method, labelled-set size, seed) of a suite "
                    "(evaluation/*.yaml) on the labelled objects of --data and writes report.md, results.json "
                    "(every number), results.jsonl (one line per run; rerun to resume) and PNGs into --out.")
    p.add_argument("--tasks", type=Path, required=True, help="suite YAML, e.g. evaluation/quick.yaml")
    p.add_argument("--data", type=Path, required=True, help="MMU data root with PROVABGS labels (not pretraining data)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None, help="exported model folder (omit for baselines only)")
    p.add_argument("--tokenizers", type=Path, default=None,
                   help="the model's tokenizers (default: MODEL/tokenizers when it exists)")
    p.add_argument("--max-objects", type=int, default=None, help="labelled objects to read (default: the suite's)")
    p.add_argument("--restart", action="store_true", help="discard results.jsonl of an earlier run")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    from aion.evaluation.suite import load_suite, run_suite

    try:
        cfg = load_suite(args.tasks)
        if args.max_objects is not None:
            if args.max_objects < 1:
                raise ValueError(f"--max-objects must be >= 1, got {args.max_objects}")
            cfg = dataclasses.replace(cfg, max_objects=args.max_objects)
        tokenizers = args.tokenizers
        if args.model is not None and tokenizers is None:
            if not (args.model / "tokenizers").is_dir():
                raise ValueError(f"--tokenizers is required: {args.model}/tokenizers does not exist")
            tokenizers = args.model / "tokenizers"
        if args.model is None:
            cfg = dataclasses.replace(cfg, fm_methods=(), finetune=())
        run_suite(cfg, args.data, args.out, model_dir=args.model, tokenizers_dir=tokenizers, restart=args.restart,
                  progress=not args.quiet)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    return _print_report(args.out)


def _print_report(out: Path) -> int:
    print((out / "report.md").read_text())
    print(f"written to {out.resolve()}")
    return 0

"""The ``aion`` command line: one entry point, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def _cmd_mock_universe(args: argparse.Namespace) -> int:
    from aion.mock.universe import MockConfig, generate

    cfg = MockConfig(n=args.n, seed=args.seed, image_size=args.image_size, hsc_image_size=args.hsc_image_size,
                     hidden_physics=not args.no_hidden_physics)
    summary = generate(args.out, cfg, progress=not args.quiet)
    rate = cfg.n / summary.seconds if summary.seconds > 0 else float("nan")
    print(f"mock universe written to {Path(args.out).resolve()} in {summary.seconds:.1f} s ({rate:.0f} galaxies/s)")
    for name, count in summary.counts.items():
        print(f"  {name:<13} {count:>8} objects")
    print(f"  HEALPix pixels (nside 16, nested): {summary.pixels}")
    if args.plot:
        from aion.mock.plots import gallery

        for path in gallery(args.out):
            print(f"  plot: {path}")
    return 0


def _cmd_mock_plot(args: argparse.Namespace) -> int:
    from aion.mock.plots import gallery

    for path in gallery(args.data, out=args.out):
        print(path)
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from aion.tokenizers.pretokenize import PretokenizeConfig, pretokenize

    cfg = PretokenizeConfig(parent=args.parent, join=tuple(args.join) if args.join else None,
                            config=args.config, radius_arcsec=args.radius, shard_size=args.shard_size,
                            batch_size=args.batch_size)
    index = pretokenize(args.data, args.tokenizers, args.out, cfg, progress=not args.quiet)
    print(f"{index['n_objects']} objects in {len(index['shards'])} shards under {Path(args.out).resolve()}")
    for name, info in index["modalities"].items():
        print(f"  {name:<26} {info['num_tokens']:>5} tokens  vocab {info['vocab_size']:>6}  "
              f"present for {info['present']} objects")
    for survey, info in index["joins"].items():
        print(f"  joined {survey}: {info['matched']} matches ({info['duplicates_dropped']} duplicate claims dropped)")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from aion.tokenizers.recipes import default_recipes, train_tokenizer

    recipes = args.recipe or default_recipes()
    if len(recipes) > 1 or not args.recipe:
        stems = [Path(r).stem for r in recipes]
        if len(set(stems)) != len(stems):
            raise SystemExit(f"--recipe: recipe file names must differ (each trains into OUT/<name>): {stems}")
        outs = [args.out / stem for stem in stems]
    else:
        outs = [args.out]
    for recipe, out in zip(recipes, outs, strict=True):
        print(f"== {recipe} -> {out}")
        metrics = train_tokenizer(recipe, args.data, out, progress=not args.quiet)
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        print(json.dumps(shown, indent=1))
    return 0


def _cmd_tokenizer_eval(args: argparse.Namespace) -> int:
    from aion.tokenizers.recipes import evaluate_tokenizer

    metrics = evaluate_tokenizer(args.tokenizer, args.data, args.out, max_objects=args.max_objects)
    text = (args.out / "quantization.txt")
    print(text.read_text() if "reports" in metrics and text.is_file() else json.dumps(metrics, indent=1))
    print(f"metrics and plots written to {args.out.resolve()}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from aion.training.config import load_recipe, with_overrides
    from aion.training.loop import pretrain

    cfg = with_overrides(load_recipe(args.recipe), tokens=args.tokens, out_dir=args.out, steps=args.steps)
    summary = pretrain(cfg, progress=not args.quiet, stop_at=args.stop_at)
    if not summary["is_main_process"]:
        return 0
    last = summary["last"]
    print(f"step {summary['step']} (from {summary['start_step']}) in {summary['seconds']:.1f} s; "
          f"{summary['num_parameters'] / 1e6:.2f}M parameters; run folder {Path(summary['run_dir']).resolve()}")
    if last:
        print(f"  last logged: loss {last['loss']:.4f}, lr {last['lr']:.3g}, {last['tokens_per_s']:.0f} tokens/s")
    print(f"  newest checkpoint: {summary['checkpoint']}")
    if args.export is not None and summary["checkpoint"]:
        from aion.training.checkpoint import export_model

        out = export_model(summary["checkpoint"], args.export)
        print(f"  exported (config.json + model.safetensors) to {out.resolve()}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from aion.pipeline import PipelineError, load_pipeline
    from aion.pipeline.run import Pipeline

    try:
        cfg, recipe_dir = load_pipeline(args.recipe)
        pipe = Pipeline(cfg, recipe_dir, args.out, progress=not args.quiet)
        pipe.run(restart=args.restart)
    except (PipelineError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:  # the pipeline said how to resume
        raise SystemExit(130) from None
    report = pipe.out / "report.md"
    text = report.read_text()
    head = text.split("## What ran")[0].rstrip()
    print("\n" + head + f"\n\nFull report: {report}")
    return 0


def _cmd_modalities(args: argparse.Namespace) -> int:
    from aion import modalities as registry

    rows = registry.modalities()
    if args.json:
        print(json.dumps({k: {"kind": m.kind, "survey": m.survey, "unit": m.unit, "fields": m.fields,
                              "role": m.role, "description": m.description} for k, m in rows.items()}, indent=2))
        return 0
    for name, m in rows.items():
        print(f"{name:<26} {m.kind:<9} {m.survey:<13} {m.role:<6} {m.unit:<30} {m.description}")
    return 0


def _inference_inputs(args: argparse.Namespace, model_names: tuple[str, ...]):
    """The object stream of ``aion embed`` / ``aion predict`` (an MMU root or a scalar table)."""
    from aion.inference.io import iter_fits_table, iter_objects

    if args.table is not None:
        mapping = None
        if args.column:
            mapping = {}
            for item in args.column:
                col, sep, mod = item.partition("=")
                if not sep or not col or not mod:
                    raise SystemExit(f"error: --column {item!r}: expected COLUMN=MODALITY")
                mapping[col] = mod
        try:
            return iter_fits_table(args.table, mapping, batch_size=args.batch_size, id_column=args.id_column,
                                   modalities=model_names)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    if args.hf is not None:
        from aion.inference.io import iter_hf_objects

        try:
            return iter_hf_objects(args.hf, args.hf_survey, batch_size=args.batch_size, split=args.split,
                                   modalities=model_names)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
            raise SystemExit(f"error: {err}") from None
    from aion import modalities as registry

    join = list(args.join) if args.join is not None else [
        s for s in registry.surveys() if s != args.parent and (args.data / s).is_dir()]
    return iter_objects(args.data, [args.parent, *join], batch_size=args.batch_size, config=args.config,
                        radius_arcsec=args.radius, modalities=model_names)


def _load_inference_model(args: argparse.Namespace):
    from aion.inference import AionModel

    return AionModel.from_pretrained(args.model, args.tokenizers, device=args.device,
                                     max_inputs=args.max_inputs)


def _tokenize(am, objects) -> tuple[dict, dict, dict[int, str]]:
    """Tokens, presence and per-object tokenization failures (a rejected modality fails its objects)."""
    failed: dict[int, str] = {}
    tokens, present = am.tokenize(objects, errors=failed)
    return tokens, present, failed


def _fail_rows(errors: dict[int, str], failed: dict[int, str], *arrays) -> dict[int, str]:
    """Merge tokenization failures into ``errors`` and blank those rows (NaN) in ``arrays``."""
    import numpy as np

    if not failed:
        return errors
    merged = dict(errors)
    for b, msg in failed.items():
        merged[b] = msg if b not in merged else f"{msg}; {merged[b]}"
    rows = sorted(failed)
    for a in arrays:
        a[rows] = np.nan
    return merged


def _error_column(errors: dict[int, str], n: int) -> list[str]:
    return [errors.get(i, "") for i in range(n)]


def _fingerprint(args: argparse.Namespace) -> dict:
    """What identifies a batch run for resuming: every option that changes its output (paths resolved);
    --device is left out so a run may be resumed on another device."""
    def norm(v):
        if isinstance(v, Path):
            return str(v.resolve())
        if isinstance(v, list | tuple):
            return [norm(x) for x in v]
        return v

    skip = {"func", "quiet", "restart", "device", "command"}
    return {"command": args.command, **{k: norm(v) for k, v in sorted(vars(args).items()) if k not in skip}}


def _run_rows(args: argparse.Namespace, stream, process, desc: str, metadata: dict[str, str] | None = None):
    """Run ``process`` over the stream in resumable parts (:mod:`aion.inference.runner`)."""
    from aion.inference.runner import RunnerError, run_in_parts

    for name, value in (("--batch-size", args.batch_size), ("--chunk-size", args.chunk_size)):
        if value < 1:
            raise SystemExit(f"error: {name} must be >= 1, got {value}")
    try:
        return run_in_parts(stream, process, args.out, _fingerprint(args), batch_size=args.batch_size,
                            chunk_size=args.chunk_size, restart=args.restart, metadata=metadata,
                            progress=not args.quiet, desc=desc)
    except RunnerError as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:  # the runner said how to resume
        raise SystemExit(130) from None


def _report(summary, what: str, args: argparse.Namespace) -> None:
    resumed = f" (resumed at object {summary.resumed_from})" if summary.resumed_from else ""
    failed = f"; {summary.n_errors} objects failed (see the error column)" if summary.n_errors else ""
    print(f"{summary.n_rows} {what} written to {Path(args.out).resolve()}{resumed}{failed}")


def _no_input(n: int) -> dict[int, str]:
    return dict.fromkeys(range(n), "no input modality the model reads")


def _cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    am = _load_inference_model(args)
    stream = _inference_inputs(args, am.names)

    def process(row: int, batch) -> dict:
        ids, objects = batch
        n = len(ids)
        if objects:
            tokens, present, failed = _tokenize(am, objects)
            res = am.embed(tokens, present, pooling=args.pooling, return_tokens=False)
            vectors = res.pooled.float().numpy().copy()
            used, errors = res.tokens_used, _fail_rows(res.errors, failed, vectors)
        else:  # nothing the model reads in this batch
            width = am.model.cfg.dim if args.pooling == "mean" else len(am.names) * (am.model.cfg.dim + 1)
            vectors = np.full((n, width), np.nan, dtype=np.float32)
            used, errors = {}, _no_input(n)
        cols = {"object_id": ids, "embedding": vectors.astype(np.float32)}
        for name in am.names:
            cols[f"tokens_used_{name}"] = np.asarray(used.get(name, np.zeros(n)), dtype=np.int32)
        cols["error"] = _error_column(errors, n)
        return cols

    # recorded so that tables of different models are never compared (aion search --queries checks it)
    weights = Path(args.model) / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else "unknown"
    summary = _run_rows(args, stream, process, "embed", metadata={"model_sha256": digest, "pooling": args.pooling})
    _report(summary, f"embeddings ({args.pooling})", args)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise SystemExit(f"error: --temperature must be a finite number > 0, got {args.temperature}")
    am = _load_inference_model(args)
    if args.target not in am.names:
        raise SystemExit(f"error: --target {args.target!r} is not in this model (it has {list(am.names)})")
    stream = _inference_inputs(args, am.names)
    fields = ("mean", "median", "mode", "p16", "p84", "p2_5", "p97_5")

    def process(row: int, batch) -> dict:
        ids, objects = batch
        n = len(ids)
        objects = {k: v for k, v in objects.items() if k != args.target}  # never read the truth
        cols = {"object_id": ids}
        if objects:
            tokens, present, failed = _tokenize(am, objects)
            pred = am.predict_scalar(tokens, present, args.target)
            if args.temperature != 1.0:
                pred = pred.tempered(args.temperature)
            est = pred.refined if args.refined and pred.refined is not None else pred.estimates
            cols.update({f: np.array(getattr(est, f), dtype=np.float64) for f in fields})
            errors = _fail_rows(pred.errors, failed, *(cols[f] for f in fields))
        else:
            cols.update({f: np.full(n, np.nan) for f in fields})
            errors = _no_input(n)
        cols["error"] = _error_column(errors, n)
        return cols

    summary = _run_rows(args, stream, process, f"predict {args.target}",
                        metadata={"aion_posterior_temperature": repr(float(args.temperature))})
    _report(summary, f"{args.target} posteriors", args)
    return 0


def _generation_layout(am, target: str) -> tuple[str, tuple[int, ...], dict[str, str]]:
    """(value column, per-sample value shape, table metadata) of generated ``target`` values, from
    decoding one filler row (so batches without inputs get the same shapes)."""
    import numpy as np
    import torch

    from aion import modalities as registry
    from aion.data.batches import ImageBatch, ScalarBatch, SpectrumBatch

    size = am.model.cfg.modalities[target].num_tokens
    probe = am._decode(target, torch.full((1, size), -1, dtype=torch.long), [0], None)
    meta = {"aion_target": target, "unit": registry.modality(target).unit}
    if isinstance(probe, ScalarBatch):
        return "value", (), meta
    if isinstance(probe, SpectrumBatch):
        wave = np.asarray(probe.wavelength, dtype=np.float64).reshape(-1)
        step = float((wave[-1] - wave[0]) / (wave.size - 1)) if wave.size > 1 else 0.0
        if np.allclose(wave, wave[0] + step * np.arange(wave.size), rtol=0, atol=1e-6 * max(abs(step), 1e-12)):
            meta.update(wavelength_start=repr(float(wave[0])), wavelength_step=repr(step),
                        wavelength_n=str(wave.size))
        else:
            meta["wavelength"] = json.dumps([float(w) for w in wave])
        meta["wavelength_unit"] = "Angstrom"
        return "flux", tuple(probe.flux.shape[1:]), meta
    if isinstance(probe, ImageBatch):
        meta.update(bands=",".join(probe.bands), zero_point=repr(float(probe.zero_point)),
                    pixel_scale=repr(float(probe.pixel_scale)))
        return "image", tuple(probe.flux.shape[1:]), meta
    raise SystemExit(f"error: --target {target!r}: cannot store decoded {type(probe).__name__} values")


def _generated_values(decoded: list, column: str) -> np.ndarray:
    """(B, num_samples, ...) physical values from the per-sample decoded batches."""
    import numpy as np

    if column == "value":
        return np.stack([np.asarray(d.values, dtype=np.float64) for d in decoded], axis=1)
    return np.stack([np.asarray(d.flux, dtype=np.float32) for d in decoded], axis=1)


def _cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    am = _load_inference_model(args)
    target = args.target
    if target not in am.names:
        raise SystemExit(f"error: --target {target!r} is not in this model (it has {list(am.names)})")
    for name, value, low in (("--steps", args.steps, 1), ("--num-samples", args.num_samples, 1)):
        if value < low:
            raise SystemExit(f"error: {name} must be >= {low}, got {value}")
    if args.temperature < 0:
        raise SystemExit(f"error: --temperature must be >= 0, got {args.temperature}")
    stream = _inference_inputs(args, am.names)
    column, shape, meta = _generation_layout(am, target)
    meta.update(aion_steps=str(args.steps), aion_temperature=repr(float(args.temperature)),
                aion_schedule=args.schedule, aion_num_samples=str(args.num_samples), aion_seed=str(args.seed),
                aion_batch_size=str(args.batch_size),
                aion_seed_rule="each batch is generated with seed + the catalogue row of its first object")
    size = am.model.cfg.modalities[target].num_tokens
    dtype = np.float64 if column == "value" else np.float32
    samples = args.num_samples

    def process(row: int, batch) -> dict:
        ids, objects = batch
        n = len(ids)
        objects = {k: v for k, v in objects.items() if k != target}  # never read the truth
        values = np.full((n, samples, *shape), np.nan, dtype=dtype)
        tokens_out = np.full((n, samples, size), -1, dtype=np.int32)
        if objects:
            tokens, present, failed = _tokenize(am, objects)
            res = am.generate(tokens, present, target, steps=args.steps, temperature=args.temperature,
                              schedule=args.schedule, seed=args.seed + row, num_samples=samples, decode=True)
            tokens_out = res.tokens.permute(1, 0, 2).numpy().astype(np.int32)
            values = _generated_values(res.decoded, column).astype(dtype)
            values[sorted(res.errors)] = np.nan  # decoded from filler tokens: meaningless
            used, errors = res.tokens_used, _fail_rows(res.errors, failed, values)
            tokens_out[sorted(failed)] = -1
        else:
            used, errors = {}, _no_input(n)
        cols = {"object_id": ids, "tokens": tokens_out, column: values}
        for name in am.names:
            cols[f"tokens_used_{name}"] = np.asarray(used.get(name, np.zeros(n)), dtype=np.int32)
        cols["error"] = _error_column(errors, n)
        return cols

    summary = _run_rows(args, stream, process, f"generate {target}", metadata=meta)
    _report(summary, f"generated {target} ({samples} sample{'s' if samples > 1 else ''} each)", args)
    return 0


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="exported model folder (config.json + model.safetensors)")
    p.add_argument("--tokenizers", type=Path, required=True, help="directory of saved tokenizers (any depth)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, default=None, help="MMU data root (objects = rows of --parent)")
    src.add_argument("--table", type=Path, default=None,
                     help="FITS / ECSV catalogue of scalar columns (e.g. FLUX_G, FLUX_IVAR_G)")
    src.add_argument("--hf", default=None, metavar="SOURCE",
                     help="one MMU survey as a Hugging Face dataset: save_to_disk folder, parquet file/folder or "
                          "hub name (see --hf-survey, --split)")
    p.add_argument("--out", type=Path, required=True,
                   help="output table, .parquet or .fits (written to a temp file, renamed when complete)")
    p.add_argument("--parent", default="legacysurvey", help="--data: survey whose rows are the objects")
    p.add_argument("--hf-survey", default="legacysurvey", help="--hf: which survey the dataset holds")
    p.add_argument("--split", default="train", help="--hf: dataset split")
    p.add_argument("--join", nargs="*", default=None,
                   help="--data: surveys cross-matched onto the parent (default: every registered survey present)")
    p.add_argument("--config", default=None, help="--data: MMU config directory (default: all)")
    p.add_argument("--radius", type=float, default=1.0, help="--data: cross-match radius in arcsec")
    p.add_argument("--column", action="append", default=None, metavar="COLUMN=MODALITY",
                   help="--table: map a column to a scalar modality (repeatable; default: columns named like "
                        "a registered modality's field, e.g. FLUX_G -> legacysurvey_flux_g)")
    p.add_argument("--id-column", default="object_id", help="--table: object id column (default object_id; "
                   "the row number if the table has none)")
    p.add_argument("--max-inputs", type=int, default=None,
                   help="encoder input budget per object (AION-1: 256; default: no limit); larger objects "
                        "read a deterministic subset")
    p.add_argument("--batch-size", type=int, default=256, help="objects per batch (memory follows this)")
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="objects per resumable part written to OUT.parts/ (rounded up to a multiple of "
                        "--batch-size; output memory follows this)")
    p.add_argument("--restart", action="store_true",
                   help="discard the parts of an earlier run of this output instead of resuming it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mock-universe", help="generate the physically grounded mock surveys (MMU layout)")
    p.add_argument("--n", type=int, default=2000, help="galaxies in the parent imaging sample (default 2000)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="Legacy Survey cutout size in pixels (default 64)")
    p.add_argument("--hsc-image-size", type=int, default=96, help="HSC cutout size in pixels (default 96)")
    p.add_argument("--plot", action="store_true", help="also write a PNG gallery under OUT/plots")
    p.add_argument("--no-hidden-physics", action="store_true",
                   help="no AGN, bars or rare population (by default they are planted and recorded only in truth)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_mock_universe)

    p = sub.add_parser("mock-plot", help="PNG gallery of a generated mock universe")
    p.add_argument("data", type=Path)
    p.add_argument("--out", type=Path, default=None, help="directory for PNGs (default DATA/plots)")
    p.set_defaults(func=_cmd_mock_plot)

    p = sub.add_parser("tokenize", help="pre-tokenize surveys into token shards with presence masks")
    p.add_argument("--tokenizers", type=Path, required=True, help="directory of saved tokenizers (any depth)")
    p.add_argument("--data", type=Path, required=True, help="MMU data root")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parent", default="legacysurvey", help="survey whose rows are the objects")
    p.add_argument("--join", nargs="*", default=None,
                   help="surveys cross-matched onto the parent (default: every registered survey present)")
    p.add_argument("--config", default=None, help="MMU config directory (default: all)")
    p.add_argument("--radius", type=float, default=1.0, help="cross-match radius in arcsec")
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_tokenize)

    tok = sub.add_parser("tokenizer", help="train / evaluate modality tokenizers")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = tsub.add_parser("train", help="train (image, spectrum) or fit (scalar) tokenizers from YAML recipes")
    p.add_argument("--recipe", type=Path, action="append", default=None,
                   help="recipe YAML (repeatable; default: the CPU presets scalars, image_cpu, spectrum_cpu, "
                        "each into OUT/<recipe name>)")
    p.add_argument("--data", type=Path, required=True, help="MMU data root (e.g. a mock universe)")
    p.add_argument("--out", type=Path, required=True, help="output directory (rerun to resume from checkpoints)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_tokenizer_train)
    p = tsub.add_parser("eval", help="held-out metrics JSON and PNGs for a trained tokenizer")
    p.add_argument("tokenizer", type=Path, help="saved tokenizer directory (or a train output folder)")
    p.add_argument("--data", type=Path, required=True, help="held-out MMU data root (a mock universe for truth)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-objects", type=int, default=None)
    p.set_defaults(func=_cmd_tokenizer_eval)

    p = sub.add_parser("pretrain", help="masked multimodal pretraining from a training/*.yaml recipe "
                       "(run under accelerate launch / torchrun for several processes)")
    p.add_argument("--recipe", type=Path, required=True, help="training recipe, e.g. training/tiny_cpu.yaml")
    p.add_argument("--tokens", type=Path, default=None,
                   help="pre-tokenized root (aion tokenize output); replaces the recipe's data.datasets")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: the recipe's runtime.out_dir); "
                   "rerun the same command to resume from its newest complete checkpoint")
    p.add_argument("--steps", type=int, default=None, help="schedule length in optimizer steps (optim.steps)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (and checkpoint) after this step; the LR schedule still spans --steps")
    p.add_argument("--export", type=Path, default=None,
                   help="after training, export the newest checkpoint (config.json + model.safetensors) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretrain)

    resumable = (" Resumable: rows are written in parts of --chunk-size objects to OUT.parts/ (with a "
                 "manifest of the options); rerunning the same command after an interruption skips the finished "
                 "parts without reading their input, and the final table, identical to an uninterrupted run's, "
                 "appears atomically once every part is done. Other options on an existing OUT.parts/ are an error "
                 "(delete it or pass --restart).")
    p = sub.add_parser("embed", help="encoder embeddings of every object of a catalogue, streamed to parquet / FITS",
                       description="Writes object_id, embedding, tokens_used_<modality> and error (empty when "
                                   "fine) per object, in input order." + resumable)
    _add_inference_args(p)
    p.add_argument("--pooling", choices=("mean", "per_modality_mean"), default="mean")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("predict", help="zero-shot posterior summaries of a scalar (e.g. a redshift) per object",
                       description="Writes object_id, mean, median, mode, p16, p84, p2_5, p97_5 and error "
                                   "(empty when fine) per object, in input order." + resumable)
    _add_inference_args(p)
    p.add_argument("--target", required=True, help="scalar modality to predict, e.g. provabgs_z")
    p.add_argument("--refined", action="store_true",
                   help="use the fine-token refined estimates where the target tokenizer has fine bins")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divide the posterior's coarse logits by this (> 1 widens the intervals); a calibration "
                        "temperature fitted on labelled objects by `aion zeroshot --calibration-data`")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("generate", help="sample a modality (spectrum, image or scalar) per object, MaskGIT-style",
                       description="Writes per object, in input order: object_id; tokens (num_samples, n_tokens) "
                                   "int32, -1 for failed objects; the decoded values in physical units: flux "
                                   "(num_samples, L) float32 on the tokenizer's wavelength grid for a spectrum "
                                   "(the grid is in the table metadata: wavelength_start / wavelength_step / "
                                   "wavelength_n in Angstrom), image (num_samples, bands, H, W) float32 for an "
                                   "image (band names in the metadata key bands), value (num_samples,) float64 "
                                   "for a scalar; NaN for failed objects; tokens_used_<modality> and error. The "
                                   "target is never read as an input. Reproducible: each batch is generated with "
                                   "seed = --seed + the catalogue row of its first object, so the same command "
                                   "(same --batch-size) gives identical output, resumed or not." + resumable)
    _add_inference_args(p)
    p.add_argument("--target", required=True, help="modality to generate, e.g. desi_spectrum")
    p.add_argument("--steps", type=int, default=8, help="generation steps (default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: most probable token)")
    p.add_argument("--schedule", choices=("cosine", "linear"), default="cosine",
                   help="how many tokens each step reveals (default cosine)")
    p.add_argument("--seed", type=int, default=0, help="base seed (see above)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples per object (default 1)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "quickstart", help="the whole pipeline in one command: data -> tokenizers -> tokens -> pretraining -> "
                           "zero-shot -> evaluation -> report (cached stages, resumable)",
        description="Runs the stages of a pipeline recipe (default training/pipelines/quickstart.yaml: the mock "
                    "universe on 2 CPU cores in about 15 minutes) and writes OUT/report.md. Finished stages are "
                    "recorded in OUT/pipeline.json and skipped on a rerun; an interrupted run (Ctrl-C) resumes "
                    "where it stopped; a changed recipe reruns the stages that depend on it.")
    p.add_argument("--recipe", type=Path, default=None,
                   help="pipeline recipe (default: training/pipelines/quickstart.yaml; a multi-GPU example: "
                        "training/pipelines/gpu_node.yaml)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the recipe's out_dir)")
    p.add_argument("--restart", action="store_true", help="discard every stage's output and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quickstart)

    from aion.evaluation.cli import add_evaluate_parser, add_zeroshot_parser

    add_zeroshot_parser(sub)
    add_evaluate_parser(sub)

    from aion.discovery.cli import add_discovery_parsers

    add_discovery_parsers(sub)

    p = sub.add_parser("modalities", help="list the registered modalities")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_modalities)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

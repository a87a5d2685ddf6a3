"""``aion residualize``: embeddings with known quantities (e.g. redshift, stellar mass) factored out.

Fits (or reuses) a :class:`~aion.discovery.flow.ConditionalFlow` on an embedding table conditioned
on catalogue columns and writes each object's residual as a table with the same ``object_id`` and
``embedding`` columns, so every other discovery tool (similarity search, outliers, maps) reads it
unchanged and finds structure the conditions do not explain.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aion.discovery.flow import ConditionalFlow, FlowConfig
from aion.discovery.tables import join_table, load_embeddings, parse_columns, table_columns

_TABLE_SUFFIXES = (".parquet", ".pq", ".fits.gz", ".fits", ".fit", ".fts")


@dataclass
class ResidualizeResult:
    out: Path
    flow_dir: Path
    n_objects: int
    dropped: int
    """Rows of the embedding table left out because their embedding failed."""
    trained: bool
    train_loss: float
    val_loss: float
    forget_checks: list[tuple[int, float]] = field(default_factory=list)
    """(step, worst 15-NN R^2 of the conditions from residuals) of each ``forget_r2`` check in training."""
    stopped_at: int | None = None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _TABLE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def default_out(embeddings: os.PathLike | str) -> Path:
    embeddings = Path(embeddings)
    return embeddings.with_name(f"{_stem(embeddings)}.residual.parquet")


def default_flow_dir(out: os.PathLike | str) -> Path:
    out = Path(out)
    return out.with_name(f"{_stem(out)}.flow")


def condition_matrix(ids: np.ndarray, catalogue: os.PathLike | str, conditions: Sequence[str],
                     id_column: str = "object_id") -> np.ndarray:
    """``(N, C)`` float64 conditions aligned to ``ids``; an object without a finite value is an error, not a skip,
    because a residual silently missing objects would break joins downstream."""
    available = table_columns(catalogue)
    for flag, names in (("--id-column", [id_column]), ("--condition", list(conditions))):
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"{flag} {','.join(unknown)}: not a column of {catalogue}; it has {sorted(available)}")
    cols, found = join_table(ids, catalogue, conditions, id_column=id_column)
    absent = ~found
    for name in conditions:
        bad = ~np.isfinite(cols[name])
        if bad.any():
            n_absent = int((bad & absent).sum())
            examples = ", ".join(str(i) for i in ids[bad][:5])
            raise ValueError(
                f"--condition {name}: {int(bad.sum())} of {len(ids)} objects have no finite value "
                f"({n_absent} absent from {catalogue}, {int(bad.sum()) - n_absent} NaN/inf), e.g. object_id "
                f"{examples}; select the objects with known values (filter the embedding table) first")
    return np.stack([cols[name] for name in conditions], axis=1)


def residualize(embeddings: os.PathLike | str, catalogue: os.PathLike | str, conditions: Sequence[str], *,
                out: os.PathLike | str | None = None, id_column: str = "object_id", guidance: float = 1.0,
                cfg: FlowConfig | None = None, flow_dir: os.PathLike | str | None = None,
                flow_out: os.PathLike | str | None = None, ode_steps: int | None = None, device: str = "cpu",
                progress: bool = True) -> ResidualizeResult:
    """Residual embeddings of every usable object of ``embeddings`` given catalogue ``conditions``.

    ``flow_dir``: reuse a saved flow (its conditions and dimension must match) instead of fitting one;
    a fitted flow is saved to ``flow_out`` (default ``<out stem>.flow`` beside the output).
    """
    from aion.inference.io import TableWriter

    conditions = parse_columns(conditions)
    if not (np.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"--guidance: expected a number >= 0 (1 = plain conditional flow), got {guidance}")
    if flow_dir is not None and (cfg is not None or flow_out is not None):
        raise ValueError("--flow reuses a trained flow; training options (--steps, --seed, --data-noise, "
                         "--cond-noise, --stop-when-forgotten, --flow-out) do not apply")
    out = default_out(embeddings) if out is None else Path(out)
    emb = load_embeddings(embeddings)
    c = condition_matrix(emb.ids, catalogue, conditions, id_column)

    if flow_dir is not None:
        flow = ConditionalFlow.load(flow_dir, device=device)
        if flow.condition_names != conditions:
            raise ValueError(f"--flow {flow_dir}: trained on conditions {flow.condition_names}, "
                             f"not --condition {conditions}")
        if flow.dim != emb.dim:
            raise ValueError(f"--flow {flow_dir}: trained on {flow.dim}-dim embeddings, {embeddings} has "
                             f"{emb.dim}-dim ones")
        saved, trained = Path(flow_dir), False
    else:
        flow = ConditionalFlow.fit(emb.vectors, c, cfg or FlowConfig(), progress=progress,
                                   condition_names=conditions, device=device)
        saved = flow.save(default_flow_dir(out) if flow_out is None else flow_out)
        trained = True

    residual = flow.to_base(emb.vectors, c, guidance=guidance, ode_steps=ode_steps, progress=progress)
    meta = {"aion_tool": "residualize", "conditions": ",".join(conditions), "guidance": repr(float(guidance)),
            "source_embeddings": str(embeddings), "catalogue": str(catalogue), "flow": str(saved),
            "ode_steps": str(flow.config.ode_steps if ode_steps is None else ode_steps),
            "ode_method": flow.config.ode_method}
    with TableWriter(out, metadata=meta) as writer:
        writer.append({"object_id": emb.ids, "embedding": residual})
    return ResidualizeResult(out=out, flow_dir=saved, n_objects=len(emb), dropped=emb.dropped, trained=trained,
                             train_loss=flow.history.final_loss, val_loss=flow.history.final_val_loss,
                             forget_checks=list(zip(flow.history.forget_step, flow.history.forget_r2, strict=True))
                             if trained else [], stopped_at=flow.history.stopped_at if trained else None)


# ----------------------------------------------------------------------------- command line
def add_parser(sub) -> None:
    p = sub.add_parser(
        "residualize", help="factor known quantities (e.g. redshift, mass) out of embeddings with a conditional flow",
        description="Fits a conditional flow-matching model to the embeddings, conditioned on catalogue columns "
                    "(with conditioning dropout, so it is also the unconditional flow), and integrates each "
                    "embedding from the data to the Gaussian base under its own conditions. The result, written "
                    "as object_id + embedding, no longer encodes the conditions; what it still encodes is what "
                    "they do not explain. Every object needs finite values of every condition.")
    p.add_argument("--embeddings", type=Path, required=True, help="table written by `aion embed`")
    p.add_argument("--catalogue", type=Path, required=True,
                   help="table (parquet/FITS/ECSV/CSV) or MMU survey folder with the condition columns")
    p.add_argument("--condition", required=True, help="comma-separated columns to factor out, e.g. Z,LOG_MSTAR")
    p.add_argument("--id-column", default="object_id", help="catalogue column matching the embeddings' object_id")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance weight w in v_null + w (v_c - v_null); 1 = conditional flow")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {FlowConfig.steps})")
    p.add_argument("--seed", type=int, default=None, help="training seed (default 0)")
    p.add_argument("--components", type=int, default=None,
                   help="model only this many leading principal components; the residuals then have this many "
                        "dimensions (default: all; try 16-32 for embeddings of 128 dimensions or more)")
    p.add_argument("--data-noise", type=float, default=None,
                   help="std of noise added to the (whitened) training embeddings, e.g. 0.3: a smoother map "
                        "that keeps more of what is not conditioned on and removes the conditions less "
                        "(default 0; docs/discovery.md)")
    p.add_argument("--cond-noise", type=float, default=None,
                   help="std of noise added to the standardized conditions in training (default 0)")
    p.add_argument("--stop-when-forgotten", type=float, default=None, metavar="R2",
                   help="stop training once a 15-NN probe on residuals of up to 16,384 objects (held-out ones "
                        "first) predicts no condition with R^2 above this, e.g. 0.1 (--steps is then the most it "
                        "trains); each further step scrambles more of what is not conditioned on "
                        "(docs/discovery.md)")
    p.add_argument("--ode-steps", type=int, default=None, help=f"fixed RK4 steps (default {FlowConfig.ode_steps})")
    p.add_argument("--flow", type=Path, default=None, help="reuse this trained flow folder instead of fitting one")
    p.add_argument("--flow-out", type=Path, default=None,
                   help="where to save the fitted flow (default: beside the output, <out stem>.flow/)")
    p.add_argument("--out", type=Path, default=None,
                   help="output table, .parquet or .fits (default: beside the embeddings, <stem>.residual.parquet)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_residualize)


def _cmd_residualize(args: argparse.Namespace) -> int:
    try:
        if args.ode_steps is not None and args.ode_steps < 1:
            raise ValueError(f"--ode-steps must be >= 1, got {args.ode_steps}")
        training = {name: value for name, value in (
            ("steps", args.steps), ("seed", args.seed), ("components", args.components),
            ("data_noise", args.data_noise), ("cond_noise", args.cond_noise),
            ("forget_r2", args.stop_when_forgotten)) if value is not None}
        if args.components is not None and args.flow is not None:
            raise ValueError("--components is a training option; a reused --flow keeps its own")
        for name, low in (("steps", 1), ("seed", 0)):  # FlowConfig checks them too, but not by flag name
            if name in training and training[name] < low:
                raise ValueError(f"--{name} must be >= {low}, got {training[name]}")
        cfg = dataclasses.replace(FlowConfig(), **training) if training else None
        if args.ode_steps is not None and args.flow is None:
            cfg = dataclasses.replace(cfg or FlowConfig(), ode_steps=args.ode_steps)
        result = residualize(args.embeddings, args.catalogue, parse_columns(args.condition), out=args.out,
                             id_column=args.id_column, guidance=args.guidance, cfg=cfg, flow_dir=args.flow,
                             flow_out=args.flow_out, ode_steps=args.ode_steps, device=args.device,
                             progress=not args.quiet)
    except KeyError as err:
        raise SystemExit(f"error: {err.args[0] if err.args else err}") from None
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"objects: {result.n_objects} residualized, {result.dropped} embedding row(s) dropped (failed)")
    if result.forget_checks:
        step, r2 = result.forget_checks[-1]
        if result.stopped_at is not None:
            print(f"flow: stopped at step {step}: 15-NN R^2 of the conditions from residuals {r2:.3f}")
        else:
            print(f"WARNING: the conditions were not forgotten within {step} steps: 15-NN R^2 {r2:.3f} "
                  "is above --stop-when-forgotten; train longer (--steps) or accept the leak")
    what = "fitted and saved to" if result.trained else "reused from"
    print(f"flow: {what} {result.flow_dir}; final train loss {result.train_loss:.4f}, "
          f"validation loss {result.val_loss:.4f}")
    print(f"written to {result.out.resolve()}")
    return 0

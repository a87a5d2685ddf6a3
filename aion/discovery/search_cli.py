"""``aion search`` and ``aion outliers``: the command-line faces of :mod:`aion.discovery.search` and
:mod:`aion.discovery.outliers` (torch and the flow are imported only when a command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MODEL_KEYS = ("model", "model_dir", "model_name", "model_sha256", "checkpoint", "tokenizers", "pooling")
"""Table metadata that identifies the model behind an embedding table; two tables that both record
one of these with different values were made by different models (or poolings) and do not compare."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "search", help="exact nearest neighbours in embedding space, by object_id or for new data",
        description="Finds the --k nearest neighbours of each query among the objects of an `aion embed` table "
                    "(exact, chunked: memory is --batch-size x --chunk-rows, not the catalogue size squared). "
                    "Queries are objects of the table (--ids / --ids-file; each leaves itself out) or the rows of "
                    "another `aion embed` table of new data made with the same model (--queries). Writes one row "
                    "per query: object_id (the query), neighbour_ids (k,), distances (k,), nearest first; equal "
                    "distances are ordered by table row.")
    p.add_argument("--embeddings", type=Path, required=True, help="`aion embed` table (parquet or FITS) to search")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--ids", help="comma-separated object ids of the table, e.g. 12,40,77")
    q.add_argument("--ids-file", type=Path, help="text file, one object id per line ('#' comments allowed)")
    q.add_argument("--queries", type=Path, help="`aion embed` table of new objects, same model as --embeddings")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine", help="default cosine (1 - cos)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=None,
                   help="queries compared at a time (default 256 on a CPU, 4096 on a GPU)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="table rows compared at a time (default 4096 on a CPU, 65536 on a GPU)")
    p.add_argument("--out", type=Path, required=True, help="output table (.parquet or .fits)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser(
        "outliers", help="rank the objects of an embedding table by outlier scores (k-NN density, flow likelihood)",
        description="Scores every object of an `aion embed` table: knn_score, the mean euclidean distance to its "
                    "--k nearest other objects after robust per-dimension standardization (median / MAD), and "
                    "flow_nll, the negative log-likelihood (nats) under an unconditional normalizing flow fitted "
                    "to the same table (seeded) or loaded with --flow. Writes rank, object_id, each score and its "
                    "percentile (100 = most outlying), most outlying first by --rank-by, and prints the --top rows.")
    p.add_argument("--embeddings", type=Path, required=True, help="`aion embed` table (parquet or FITS)")
    p.add_argument("--k", type=int, default=10, help="neighbours of the k-NN score (default 10)")
    p.add_argument("--standardize", choices=("robust", "std", "none"), default="robust",
                   help="per-dimension scaling before the k-NN distances (default robust: median / MAD)")
    f = p.add_mutually_exclusive_group()
    f.add_argument("--flow", type=Path, help="saved flow folder to score with (instead of fitting one)")
    f.add_argument("--no-flow", action="store_true", help="k-NN score only")
    p.add_argument("--flow-steps", type=int, default=None, help="training steps of the fitted flow (default: the "
                                                                 "flow's own)")
    p.add_argument("--flow-ode-steps", type=int, default=None,
                   help="solver steps of the flow log-density (default: the flow's own, 32; the score costs "
                        "about D backward passes per step and object, so fewer steps are faster, less exact)")
    p.add_argument("--save-flow", type=Path, default=None, help="save the fitted flow to this folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the flow fit (default 0)")
    p.add_argument("--rank-by", choices=("knn", "flow"), default="knn",
                   help="score that orders the table (default knn)")
    p.add_argument("--top", type=int, default=20, help="rows to print (default 20; the table holds all)")
    p.add_argument("--device", default="cpu", help="device of the k-NN search and the flow: cpu (default), cuda or "
                                                   "cuda:N")
    p.add_argument("--out", type=Path, required=True, help="output table (.parquet or .fits)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_outliers)


# ------------------------------------------------------------------------ search
def parse_ids(text: str, what: str = "--ids") -> np.ndarray:
    """``"12, 40,77"`` -> int64 ids; anything else is an error naming ``what``."""
    parts = [t.strip() for t in text.split(",")]
    try:
        return np.array([int(t) for t in parts], dtype=np.int64)
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integer object ids, got {text!r}") from None


def read_ids_file(path: Path) -> np.ndarray:
    """One integer id per line; blank lines and ``#`` comments are skipped; a bad line is named."""
    if not path.is_file():
        raise FileNotFoundError(f"--ids-file {path}: no such file")
    ids = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise ValueError(f"--ids-file {path}, line {n}: expected one integer object id, got {line!r}") from None
    if not ids:
        raise ValueError(f"--ids-file {path}: holds no object id")
    return np.array(ids, dtype=np.int64)


def check_same_model(index_path: Path, query_path: Path) -> None:
    """Refuse tables whose metadata names different models (or poolings); silent when either records none."""
    from aion.inference.io import read_metadata

    a, b = read_metadata(index_path, MODEL_KEYS), read_metadata(query_path, MODEL_KEYS)
    differ = {k: (a[k], b[k]) for k in a if k in b and a[k] != b[k]}
    if differ:
        detail = "; ".join(f"{k}: {x!r} vs {y!r}" for k, (x, y) in differ.items())
        raise ValueError(f"--queries {query_path} was not made like --embeddings {index_path} ({detail}): "
                         f"embeddings of different models are not comparable")


def _positive(**values: int | None) -> None:
    """Each given option (None = left at its default) must be >= 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _cmd_search(args: argparse.Namespace) -> int:
    from aion.discovery.search import NeighbourIndex
    from aion.discovery.tables import load_embeddings
    from aion.inference.io import TableWriter

    try:
        _positive(k=args.k, batch_size=args.batch_size, chunk_rows=args.chunk_rows)
        emb = load_embeddings(args.embeddings)
        if emb.dropped:
            print(f"{emb.dropped} row(s) of {args.embeddings} have no embedding (failed) and are not searchable")
        index = NeighbourIndex(emb.vectors, emb.ids, metric=args.metric, device=args.device,
                               chunk_rows=args.chunk_rows, query_rows=args.batch_size)
        if args.queries is not None:
            new = load_embeddings(args.queries)
            if new.dim != emb.dim:
                raise ValueError(f"--queries {args.queries} holds {new.dim}-dim embeddings, --embeddings "
                                 f"{args.embeddings} {emb.dim}-dim: they come from different models or poolings")
            check_same_model(args.embeddings, args.queries)
            if new.dropped:
                print(f"{new.dropped} row(s) of {args.queries} have no embedding (failed) and are skipped")
            query_ids = new.ids
            neighbours, dist = index.query(new.vectors, args.k, progress=not args.quiet)
            source = str(args.queries)
        else:
            query_ids = parse_ids(args.ids) if args.ids is not None else read_ids_file(args.ids_file)
            try:
                neighbours, dist = index.query_ids(query_ids, args.k, progress=not args.quiet)
            except KeyError as err:
                hint = f"; {emb.dropped} failed row(s) of the table are not searchable" if emb.dropped else ""
                raise KeyError(f"{args.embeddings}: {err.args[0]}{hint}") from None
            source = "--ids-file " + str(args.ids_file) if args.ids is None else "--ids"
        meta = {"embeddings": str(args.embeddings), "queries": source, "metric": args.metric, "k": str(args.k),
                "self_excluded": str(args.queries is None).lower()}
        with TableWriter(args.out, metadata=meta) as writer:
            writer.append({"object_id": query_ids, "neighbour_ids": neighbours, "distances": dist})
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err.args[0] if isinstance(err, KeyError) else err}") from None
    shown = min(5, len(query_ids))
    print(f"{args.metric} neighbours of the first {shown} of {len(query_ids)} queries (object_id: id (distance)):")
    for i in range(shown):
        pairs = ", ".join(f"{n} ({d:.4f})" for n, d in zip(neighbours[i, :5], dist[i, :5], strict=True))
        print(f"  {query_ids[i]}: {pairs}{', ...' if args.k > 5 else ''}")
    print(f"{len(query_ids)} queries x {args.k} neighbours among {len(emb)} objects written to {args.out.resolve()}")
    return 0


# ------------------------------------------------------------------------ outliers
def _cmd_outliers(args: argparse.Namespace) -> int:
    from aion.discovery.outliers import flow_nll_score, knn_density_score, rank_outliers
    from aion.discovery.tables import load_embeddings
    from aion.inference.io import TableWriter

    try:
        _positive(k=args.k, top=args.top)
        if args.flow_steps is not None and (args.no_flow or args.flow is not None):
            raise ValueError("--flow-steps applies to a flow fitted here; it cannot go with --no-flow or --flow")
        if args.save_flow is not None and (args.no_flow or args.flow is not None):
            raise ValueError("--save-flow saves a flow fitted here; it cannot go with --no-flow or --flow")
        if args.flow_ode_steps is not None and args.no_flow:
            raise ValueError("--flow-ode-steps applies to the flow score; it cannot go with --no-flow")
        if args.rank_by == "flow" and args.no_flow:
            raise ValueError("--rank-by flow needs the flow score: drop --no-flow")
        emb = load_embeddings(args.embeddings)
        if emb.dropped:
            print(f"{emb.dropped} row(s) of {args.embeddings} have no embedding (failed) and are not scored")
        flow, flow_source = (None, "none") if args.no_flow else _flow_for(args, emb.vectors)
        scores = {"knn": knn_density_score(emb.vectors, k=args.k, standardize=args.standardize, device=args.device,
                                           progress=not args.quiet)}
        if flow is not None:
            scores["flow"] = flow_nll_score(flow, emb.vectors, ode_steps=args.flow_ode_steps, progress=not args.quiet)
        table = rank_outliers(emb.ids, scores, args.rank_by)
        meta = {"embeddings": str(args.embeddings), "k": str(args.k), "standardize": args.standardize,
                "flow": flow_source, "rank_by": args.rank_by, "dropped_rows": str(emb.dropped)}
        if not args.no_flow:
            meta["flow_ode_steps"] = str(args.flow_ode_steps or "the flow's own")
        with TableWriter(args.out, metadata=meta) as writer:
            writer.append(table)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err.args[0] if isinstance(err, KeyError) else err}") from None
    _print_top(table, args.top, args.rank_by)
    print(f"{len(emb)} objects ranked by {args.rank_by} written to {args.out.resolve()}")
    return 0


def _flow_for(args: argparse.Namespace, vectors: np.ndarray):
    """(flow, description): the one given by --flow, or one fitted here (and saved by --save-flow)."""
    from aion.discovery.flow import ConditionalFlow
    from aion.discovery.outliers import fit_flow

    if args.flow is not None:
        if not args.flow.is_dir():
            raise FileNotFoundError(f"--flow {args.flow}: no such folder")
        flow = ConditionalFlow.load(args.flow, device=args.device)
        if flow.dim != vectors.shape[1]:
            raise ValueError(f"--flow {args.flow}: the flow models {flow.dim}-dim vectors, --embeddings "
                             f"{args.embeddings} holds {vectors.shape[1]}-dim ones")
        return flow, str(args.flow)
    flow = fit_flow(vectors, steps=args.flow_steps, seed=args.seed, device=args.device, progress=not args.quiet)
    if args.save_flow is not None:
        flow.save(args.save_flow)
    return flow, f"fitted here (seed {args.seed}" + (f", {args.flow_steps} steps)" if args.flow_steps else ")")


def _print_top(table: dict[str, np.ndarray], top: int, rank_by: str) -> None:
    cols = [c for c in ("rank", "object_id", "knn_score", "knn_percentile", "flow_nll", "flow_percentile")
            if c in table]
    n = min(top, len(table["rank"]))
    print(f"the {n} most outlying objects by {rank_by}:")
    print("  " + "  ".join(f"{c:>15}" for c in cols))
    for i in range(n):
        cells = [f"{table[c][i]:>15d}" if table[c].dtype.kind in "iu" else f"{table[c][i]:>15.4f}" for c in cols]
        print("  " + "  ".join(cells))

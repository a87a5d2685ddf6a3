"""Read what the discovery tools work on: embedding tables and catalogue columns, joined by object_id.

Embeddings come from ``aion embed`` (parquet or FITS: ``object_id``, ``embedding``, ``error``).
Catalogue columns come from any table file (parquet, FITS, ECSV, CSV) or from one survey of
an MMU root given as its folder (e.g. ``runs/mock_eval/truth``). Rows whose embedding failed
are dropped and counted, never silently: every tool reports how many it left out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike


@dataclass
class Embeddings:
    """The usable rows of an embedding table (float32 vectors, int64 ids, input order kept)."""

    ids: np.ndarray
    vectors: np.ndarray
    source: str
    dropped: int = 0
    """Rows left out: an ``error`` message or a non-finite vector."""

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def select(self, rows: np.ndarray) -> Embeddings:
        return Embeddings(self.ids[rows], self.vectors[rows], self.source, self.dropped)


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith((".parquet", ".pq"))


def table_columns(path: PathLike) -> list[str]:
    """Column names of a table file or an MMU survey folder, without reading rows."""
    path = Path(path)
    if path.is_dir():
        from aion.data.mmu import SurveyShards

        return list(SurveyShards(path.parent, path.name).columns)
    if _is_parquet(path):
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    from astropy.table import Table

    return list(Table.read(path).colnames)


def read_table(path: PathLike, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Whole columns of a table file (parquet, FITS, ECSV, CSV) or of an MMU survey folder.

    An unknown column is an error that names it and lists what the table has.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such table or survey folder")
    available = table_columns(path)
    names = list(available) if columns is None else list(dict.fromkeys(columns))
    unknown = [c for c in names if c not in available]
    if unknown:
        raise KeyError(f"{path}: unknown column(s) {unknown}; the table has {sorted(available)}")
    if path.is_dir():
        from aion.data.mmu import SurveyShards

        shards = SurveyShards(path.parent, path.name)
        return {c: shards.read_column(c) for c in names}
    if _is_parquet(path):
        import pyarrow.parquet as pq

        from aion.data.mmu import _arrow_to_numpy

        table = pq.read_table(path, columns=names)
        out = {}
        for name in names:
            arr = _arrow_to_numpy(table.column(name))
            if arr.dtype.kind == "O":
                raise ValueError(f"{path}: column {name!r} is a nested structure, expected numbers or text")
            out[name] = arr
        return out
    from astropy.table import Table

    table = Table.read(path)
    return {c: np.asarray(table[c]) for c in names}


def load_embeddings(path: PathLike, column: str = "embedding") -> Embeddings:
    """The rows of an ``aion embed`` table that have a finite vector (the rest are counted in ``dropped``)."""
    cols = read_table(path, ["object_id", column] + (["error"] if "error" in table_columns(path) else []))
    vectors = np.asarray(cols[column], dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"{path}: column {column!r} must hold one vector per row, got shape {vectors.shape}")
    ok = np.isfinite(vectors).all(axis=1)
    if "error" in cols:
        ok &= np.array([len(e) == 0 for e in cols["error"]], dtype=bool)
    if not ok.any():
        raise ValueError(f"{path}: no row has a usable {column!r} (all failed or non-finite)")
    ids = np.asarray(cols["object_id"]).astype(np.int64)
    if np.unique(ids[ok]).size != int(ok.sum()):
        raise ValueError(f"{path}: object_id is not unique")
    return Embeddings(ids=ids[ok], vectors=np.ascontiguousarray(vectors[ok]), source=str(path),
                      dropped=int((~ok).sum()))


def join_table(ids: np.ndarray, source: PathLike, columns: Sequence[str], *, id_column: str = "object_id",
               numeric: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Catalogue ``columns`` for each of ``ids`` (in that order), joined on ``id_column``, and a boolean
    mask of the ids the catalogue holds.

    An id absent from the catalogue gets NaN (numbers) or an empty string; callers decide whether
    that is allowed. ``numeric``: require one number per row (a vector column is an error).
    """
    table = read_table(source, [id_column, *columns])
    cat_ids = np.asarray(table[id_column]).astype(np.int64)
    order = np.argsort(cat_ids, kind="stable")
    sorted_ids = cat_ids[order]
    if np.any(np.diff(sorted_ids) == 0):
        raise ValueError(f"{source}: {id_column} is not unique")
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
    found = sorted_ids[pos] == ids if len(sorted_ids) else np.zeros(len(ids), dtype=bool)
    rows = order[pos]
    out = {}
    for name in columns:
        col = np.asarray(table[name])
        if numeric:
            if col.ndim != 1 or col.dtype.kind not in "biuf":
                raise ValueError(f"{source}: column {name!r} must hold one number per row, got dtype {col.dtype} "
                                 f"and shape {col.shape}")
            vals = np.where(found, col[rows].astype(np.float64), np.nan)
        else:
            vals = np.where(found, col[rows], np.zeros((), dtype=col.dtype)) if col.ndim == 1 else col[rows]
        out[name] = vals
    return out, found


def join_columns(ids: np.ndarray, source: PathLike, columns: Sequence[str], *, id_column: str = "object_id",
                 numeric: bool = True) -> dict[str, np.ndarray]:
    """:func:`join_table` without the mask of found ids."""
    return join_table(ids, source, columns, id_column=id_column, numeric=numeric)[0]


def parse_columns(text: str | Sequence[str], what: str = "--condition") -> list[str]:
    """``"Z,LOG_MSTAR"`` (or a list) -> ``["Z", "LOG_MSTAR"]``; empty names are an error."""
    names = [c.strip() for c in (text.split(",") if isinstance(text, str) else text)]
    if not names or any(not c for c in names):
        raise ValueError(f"{what}: expected comma-separated column names, got {text!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: a column is named twice in {text!r}")
    return names

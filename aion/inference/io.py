"""Streaming catalogue readers and row writers for batch inference (``aion embed`` / ``aion predict``).

Readers yield :class:`ObjectBatch` ``(object_id, {modality: typed batch})`` of at most
``batch_size`` rows, so memory follows the batch size, not the catalogue size:

- :func:`iter_objects`: MMU HDF5 shards; the parent survey's rows are the objects and the other
  surveys are joined onto them by the same one-to-one sky cross-match as ``aion tokenize``
  (an unmatched object simply lacks those modalities).
- :func:`iter_fits_table`: a FITS / ECSV (anything ``astropy.table`` reads) catalogue of scalar
  columns, e.g. ``FLUX_G`` -> ``legacysurvey_flux_g`` (with ``FLUX_IVAR_G`` as its inverse
  variance when the table has it). FITS is memory-mapped; other formats are read whole.

Both can start at a row (``start=`` or :meth:`ObjectStream.from_row`) without reading the rows
before it: that is how a resumed run (:mod:`aion.inference.runner`) skips finished work.

:class:`TableWriter` appends row batches and writes parquet (``.parquet``) or a FITS binary
table (``.fits``/``.fit``/``.fits.gz``) atomically: a temporary file next to the target is
renamed into place on :meth:`TableWriter.close`; on error (:meth:`TableWriter.abort`, or leaving
a ``with`` block by an exception) nothing is left behind. Table-wide ``metadata`` (text) goes to the
parquet schema metadata or the FITS header (:func:`read_metadata` reads it back).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from aion import modalities as registry
from aion.data.batches import ImageBatch, Modal, ScalarBatch, SpectrumBatch
from aion.data.mmu import PathLike, SurveyShards, columns_to_survey_batch

log = logging.getLogger(__name__)


class ObjectBatch(NamedTuple):
    object_id: np.ndarray
    modalities: dict[str, Modal]


class ObjectStream:
    """An iterable of :class:`ObjectBatch` that knows how many objects it will yield (``n_objects``).

    ``start`` is the catalogue row of the first object yielded and ``total`` the catalogue size.
    ``reopen(row)`` (given by the readers) makes :meth:`from_row` possible, which is how a resumed
    run skips finished rows without reading them.
    """

    def __init__(self, n_objects: int, batches: Iterator[ObjectBatch], modalities: Sequence[str] = (), *,
                 start: int = 0, reopen: Callable[[int], Iterator[ObjectBatch]] | None = None):
        self.n_objects = int(n_objects)
        self.modalities = tuple(modalities)
        self.start = int(start)
        self.total = self.start + self.n_objects
        self._batches = batches
        self._reopen = reopen

    def __len__(self) -> int:
        return self.n_objects

    def __iter__(self) -> Iterator[ObjectBatch]:
        return self._batches

    def from_row(self, start: int) -> ObjectStream:
        """A new stream of the catalogue rows ``start:`` (rows before it are never read); batches
        start at ``start``, so a batch-aligned ``start`` gives the same batches as the full stream."""
        if self._reopen is None:
            raise NotImplementedError("this stream cannot start at a row (no reopen function)")
        if not 0 <= int(start) <= self.total:
            raise ValueError(f"start row {start} is outside the catalogue of {self.total} rows")
        return ObjectStream(self.total - int(start), self._reopen(int(start)), self.modalities, start=int(start),
                            reopen=self._reopen)


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


# ---------------------------------------------------------------------------- MMU HDF5
def _expand(batch: Modal, where: np.ndarray, n: int) -> Modal:
    """A batch of ``n`` rows holding ``batch``'s rows at ``where``; every other row is absent."""
    idx = np.zeros(n, dtype=np.int64)
    idx[where] = np.arange(len(where))
    full = batch.select(idx)
    missing = np.ones(n, dtype=bool)
    missing[where] = False
    if isinstance(full, ScalarBatch):
        full.values[missing] = np.nan
    elif isinstance(full, ImageBatch | SpectrumBatch):
        full.valid[missing] = False
    else:  # pragma: no cover
        raise TypeError(type(batch).__name__)
    return full


def _columns_for(shards: SurveyShards, keep: set[str] | None) -> list[str] | None:
    """The columns of ``shards`` that the kept modalities need (None = all): an embedding of
    photometry alone then never reads image or spectrum arrays."""
    if keep is None:
        return None
    wanted = {"object_id", "ra", "dec"}
    for name, mod in registry.modalities(survey=shards.survey).items():
        if name in keep:
            wanted.update(mod.fields)
            if mod.error_field is not None:
                wanted.add(mod.error_field)
    return [c for c in shards.columns if c in wanted]


def iter_objects(data_root: PathLike, surveys: Sequence[str] = ("legacysurvey",), batch_size: int = 256, *,
                 config: str | None = None, radius_arcsec: float = 1.0,
                 modalities: Sequence[str] | None = None, start: int = 0) -> ObjectStream:
    """Objects of ``surveys[0]`` (the parent) with the modalities of every survey in ``surveys``.

    Joined surveys are cross-matched onto the parent exactly as ``aion tokenize`` does
    (:class:`aion.tokenizers.pretokenize._Joined`: one-to-one nearest neighbour within
    ``radius_arcsec``); only the sky positions of all surveys are held in memory.
    ``modalities``: keep only these (None = all registered modalities found). ``start``: first
    parent row to yield (earlier rows are not read; see :meth:`ObjectStream.from_row`).
    """
    from aion.tokenizers.pretokenize import PretokenizeConfig, _Joined

    if not surveys:
        raise ValueError("surveys: expected at least the parent survey")
    batch_size = _check_batch_size(batch_size)
    parent_name, *others = list(surveys)
    cfg = PretokenizeConfig(parent=parent_name, join=tuple(others), config=config, radius_arcsec=radius_arcsec,
                            batch_size=batch_size)
    root = Path(data_root)
    parent = SurveyShards(root, parent_name, config)
    joined = [_Joined(root, s, (parent.read_column("ra"), parent.read_column("dec")), cfg) for s in others]
    keep = None if modalities is None else set(modalities)
    parent_cols = _columns_for(parent, keep)
    joined_cols = [_columns_for(j.shards, keep) for j in joined]

    def batches(first: int) -> Iterator[ObjectBatch]:
        for start in range(first, len(parent), batch_size):
            rows = np.arange(start, min(len(parent), start + batch_size))
            main = columns_to_survey_batch(parent.read_rows(rows, parent_cols), parent_name)
            mods: dict[str, Modal] = dict(main.modalities)
            for j, cols in zip(joined, joined_cols, strict=True):
                other = j.row_of_parent[rows]
                have = np.nonzero(other >= 0)[0]
                if not have.size:
                    continue
                sub = columns_to_survey_batch(j.shards.read_rows(other[have], cols), j.survey)
                for name, batch in sub.modalities.items():
                    if name in mods:
                        raise ValueError(f"modality {name!r} comes from two surveys")
                    mods[name] = _expand(batch, have, len(rows))
            if keep is not None:
                mods = {k: v for k, v in mods.items() if k in keep}
            yield ObjectBatch(np.asarray(main.object_id), mods)

    stream = ObjectStream(len(parent), batches(0), reopen=batches)
    return stream.from_row(start) if start else stream


# ---------------------------------------------------------------------------- Hugging Face datasets
def _open_hf_dataset(source, split: str):
    """A map-style ``datasets.Dataset`` (row count known, rows addressable) for any HF source."""
    import datasets

    from aion.data.mmu import _looks_local, is_saved_dataset, parquet_files

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise KeyError(f"split {split!r} not in the dataset (splits: {list(source)})")
        return source[split]
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.IterableDataset | datasets.IterableDatasetDict):
        raise TypeError("a streaming (iterable) dataset has no row count or row access: load it map-style")
    path = Path(os.path.expanduser(str(source)))
    if is_saved_dataset(path):
        return _open_hf_dataset(datasets.load_from_disk(str(path)), split)
    if path.is_file() or path.is_dir():
        return datasets.Dataset.from_parquet([str(f) for f in parquet_files(path, split)])
    if _looks_local(str(source)):
        raise FileNotFoundError(f"{source}: no such file or directory (expected parquet or a save_to_disk directory)")
    return datasets.load_dataset(str(source), split=split)


def iter_hf_objects(source, survey: str = "legacysurvey", batch_size: int = 256, *, split: str = "train",
                    modalities: Sequence[str] | None = None, start: int = 0) -> ObjectStream:
    """Objects of one MMU survey stored as a Hugging Face dataset: a ``save_to_disk`` directory, a
    parquet file or folder of them, a hub name (downloaded map-style, so the row count is known
    and a resumed run can start at a row), or a ``datasets.Dataset``. Columns follow the MMU
    layout (:func:`aion.data.mmu.iter_hf_dataset`); no cross-match (one survey per dataset)."""
    from aion.data.mmu import arrow_to_columns

    batch_size = _check_batch_size(batch_size)
    if survey not in registry.surveys():
        raise ValueError(f"survey {survey!r} is not registered (known: {sorted(registry.surveys())})")
    ds = _open_hf_dataset(source, split)
    n = ds.num_rows
    keep = None if modalities is None else set(modalities)

    def batches(first: int) -> Iterator[ObjectBatch]:
        sub = ds.select(range(first, n)) if first else ds
        for table in sub.with_format("arrow").iter(batch_size=batch_size):
            batch = columns_to_survey_batch(arrow_to_columns(table), survey)
            mods = {k: v for k, v in batch.modalities.items() if keep is None or k in keep}
            yield ObjectBatch(np.asarray(batch.object_id), mods)

    stream = ObjectStream(n, batches(0), reopen=batches)
    return stream.from_row(start) if start else stream


# ---------------------------------------------------------------------------- FITS / ECSV tables
def default_column_mapping(columns: Sequence[str], modalities: Sequence[str] | None = None) -> dict[str, str]:
    """``{column: modality}`` for every registered scalar modality whose field is a column (exact name,
    else case-insensitive). A column claimed by several modalities (e.g. ``Z``) is skipped with a
    warning: map it explicitly. ``modalities`` restricts the candidates (e.g. to a model's)."""
    lower = {c.lower(): c for c in columns}
    claims: dict[str, list[str]] = {}
    for name, mod in registry.modalities(kind="scalar").items():
        if modalities is not None and name not in modalities:
            continue
        field = mod.fields[0]
        col = field if field in columns else lower.get(field.lower())
        if col is not None:
            claims.setdefault(col, []).append(name)
    out = {}
    for col, names in claims.items():
        if len(names) > 1:
            log.warning("column %r could be any of %s: skipped (map it explicitly)", col, names)
        else:
            out[col] = names[0]
    return out


def _column(table, name: str) -> np.ndarray:
    col = table[name]
    if getattr(col, "mask", None) is not None:
        data = np.ma.asarray(col)
        if data.dtype.kind in "fc":
            return data.astype(np.float64).filled(np.nan)
        return data.filled()
    return np.asarray(col)


def _lookup(columns: Sequence[str], name: str) -> str | None:
    if name in columns:
        return name
    lower = {c.lower(): c for c in columns}
    return lower.get(name.lower())


def iter_fits_table(path: PathLike, columns_to_modality: Mapping[str, str] | None = None, batch_size: int = 256, *,
                    id_column: str | None = "object_id", modalities: Sequence[str] | None = None,
                    hdu: int = 1, start: int = 0) -> ObjectStream:
    """Rows of a catalogue of scalar columns as typed :class:`ScalarBatch` es.

    ``columns_to_modality``: ``{column: scalar modality}`` (None = :func:`default_column_mapping`,
    restricted to ``modalities`` when given). A mapped column that the table lacks, a modality that
    is not registered or not a scalar, or two columns for one modality raise ``ValueError`` before
    anything is read. A modality's registered error column (``FLUX_IVAR_G`` for ``FLUX_G``; a
    sigma column is converted to ivar) is used when present. ``id_column``: object ids (the row
    number when None or absent). NaN / masked values and ivar <= 0 mean "missing". ``start``: first
    row to yield (earlier rows are not read; see :meth:`ObjectStream.from_row`).
    """
    from astropy.table import Table

    batch_size = _check_batch_size(batch_size)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such table")
    is_fits = path.name.lower().endswith((".fits", ".fit", ".fits.gz", ".fts"))
    table = Table.read(path, hdu=hdu, memmap=True) if is_fits else Table.read(path)
    names = list(table.colnames)
    if columns_to_modality is None:
        mapping = default_column_mapping(names, modalities)
        if not mapping:
            raise ValueError(f"{path}: no column matches a registered scalar modality"
                             f"{'' if modalities is None else ' of the model'} (columns: {names}); "
                             "map them explicitly (COLUMN=MODALITY)")
    else:
        mapping = {}
        for col, mod_name in columns_to_modality.items():
            found = _lookup(names, col)
            if found is None:
                raise ValueError(f"column mapping {col}={mod_name}: {path} has no column {col!r} "
                                 f"(columns: {names})")
            try:
                mod = registry.modality(mod_name)
            except KeyError:
                raise ValueError(f"column mapping {col}={mod_name}: {mod_name!r} is not a registered modality "
                                 "(see `aion modalities`)") from None
            if mod.kind != "scalar":
                raise ValueError(f"column mapping {col}={mod_name}: {mod_name!r} is a {mod.kind} modality; "
                                 "tables can only provide scalars")
            if modalities is not None and mod_name not in modalities:
                raise ValueError(f"column mapping {col}={mod_name}: the model has no modality {mod_name!r} "
                                 f"(it reads {sorted(modalities)})")
            mapping[found] = mod_name
    dup = [m for m in set(mapping.values()) if list(mapping.values()).count(m) > 1]
    if dup:
        raise ValueError(f"column mapping: several columns for modalities {sorted(dup)}")
    errors: dict[str, tuple[str, str]] = {}
    for mod_name in mapping.values():
        mod = registry.modality(mod_name)
        if mod.error_field is not None:
            err = _lookup(names, mod.error_field)
            if err is not None:
                errors[mod_name] = (err, mod.error_kind)
    id_col = _lookup(names, id_column) if id_column else None
    n = len(table)

    def batches(first: int) -> Iterator[ObjectBatch]:
        for start in range(first, n, batch_size):
            part = table[start:start + batch_size]
            k = len(part)
            ids = _column(part, id_col) if id_col is not None else np.arange(start, start + k, dtype=np.int64)
            mods: dict[str, Modal] = {}
            for col, mod_name in mapping.items():
                values = _column(part, col).astype(np.float64)
                ivar = None
                if mod_name in errors:
                    ecol, kind = errors[mod_name]
                    err = _column(part, ecol).astype(np.float64)
                    if kind == "ivar":
                        ivar = np.where(np.isfinite(err) & (err > 0), err, 0.0)
                    else:
                        ok = np.isfinite(err) & (err > 0)
                        with np.errstate(divide="ignore", over="ignore"):
                            ivar = np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
                mods[mod_name] = ScalarBatch(name=mod_name, values=values, ivar=ivar)
            yield ObjectBatch(np.asarray(ids), mods)

    stream = ObjectStream(n, batches(0), sorted(mapping.values()), reopen=batches)
    return stream.from_row(start) if start else stream


# ---------------------------------------------------------------------------- writer
_FITS_SUFFIXES = (".fits", ".fit", ".fts")


_STRUCTURAL = re.compile(r"^(XTENSION|EXTNAME|(TTYPE|TFORM|TDIM|TUNIT|TNULL|TSCAL|TZERO|TDISP)\d+)$")


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Plain ASCII text keys and values (what both parquet and FITS headers can hold)."""
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"TableWriter metadata: expected text keys and values, got {key!r}: {value!r}")
        if not (key.isascii() and value.isascii() and key.isprintable() and value.isprintable()) or not key \
                or " " in key:
            raise ValueError(f"TableWriter metadata: {key!r}: keys and values must be printable ASCII "
                             "(keys without spaces)")
        out[key] = value
    return out


def read_metadata(path: PathLike, keys: Sequence[str] | None = None) -> dict[str, str]:
    """The table-wide metadata written by :class:`TableWriter` (parquet schema metadata, or the text
    keywords of the FITS table HDU other than the structural ones). ``keys``: only these (looked up
    case-insensitively: FITS upper-cases plain keywords)."""
    path = Path(path)
    if path.name.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        raw = pq.read_schema(path).metadata or {}
        meta = {k.decode(): v.decode() for k, v in raw.items()}
    else:
        from astropy.io import fits

        with fits.open(path) as hdul:
            header = hdul[1].header
            meta = {str(k): str(header[k]) for k in header
                    if isinstance(header[k], str) and not _STRUCTURAL.match(str(k))}
    if keys is None:
        return meta
    lower = {k.lower(): v for k, v in meta.items()}
    return {k: lower[k.lower()] for k in keys if k.lower() in lower}


class TableWriter:
    """Append row batches (``{column: array with rows first}``, ``object_id`` required) and write a
    parquet or FITS table atomically on :meth:`close` (format from the suffix).

    Every batch must have the same columns with the same per-row shapes and kinds (numbers,
    booleans or strings). Parquet streams row groups to the temporary file (a per-row array of
    several dimensions becomes nested fixed-size lists, so its shape survives); FITS spools numeric
    columns to raw files in a temporary folder (memory-mapped when the table is assembled) and
    keeps string columns in memory.

    ``metadata``: ``{key: text}`` describing the whole table (e.g. a wavelength grid shared by all
    rows), written as parquet schema metadata or as FITS header keywords of the table HDU
    (``HIERARCH`` for keys that are not plain 8-character FITS keywords; long text continues on
    ``CONTINUE`` cards). Read it back with :func:`read_metadata`.
    """

    def __init__(self, path: PathLike, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.metadata = _check_metadata(metadata)
        name = self.path.name.lower()
        if name.endswith(".parquet") or name.endswith(".pq"):
            self.format = "parquet"
        elif name.endswith(_FITS_SUFFIXES) or name.endswith(tuple(s + ".gz" for s in _FITS_SUFFIXES)):
            self.format = "fits"
        else:
            raise ValueError(f"{self.path}: output must end in .parquet or .fits")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        suffix = ".tmp.gz" if name.endswith(".gz") else ".tmp"  # astropy compresses by the name
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=suffix, dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._spool: Path | None = None
        self._schema: dict[str, tuple[str, tuple[int, ...], np.dtype]] | None = None
        self._files: dict[str, object] = {}
        self._strings: dict[str, list[str]] = {}
        self._writer = None
        self.n_rows = 0
        self.closed = False

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.abort()

    # -------------------------------------------------------------- append
    def _normalise(self, columns: Mapping[str, object]) -> dict[str, np.ndarray]:
        if "object_id" not in columns:
            raise ValueError("TableWriter.append: an 'object_id' column is required")
        arrays = {k: np.asarray(v) for k, v in columns.items()}
        arrays = {"object_id": arrays.pop("object_id"), **arrays}
        sizes = {k: a.shape[0] if a.ndim else -1 for k, a in arrays.items()}
        if len(set(sizes.values())) != 1 or -1 in sizes.values():
            raise ValueError(f"TableWriter.append: columns must share their row count, got {sizes}")
        out = {}
        for k, a in arrays.items():
            if a.dtype.kind in "OUS":
                a = np.array([str(x.decode() if isinstance(x, bytes) else x) for x in a.reshape(-1)], dtype=object)
            elif not a.dtype.isnative:  # FITS columns are big-endian
                a = a.astype(a.dtype.newbyteorder("="))
            out[k] = a
        return out

    def append(self, columns: Mapping[str, object]) -> None:
        if self.closed:
            raise RuntimeError("TableWriter is closed")
        arrays = self._normalise(columns)
        schema = {k: ("str" if a.dtype == object else "num", a.shape[1:], a.dtype) for k, a in arrays.items()}
        if self._schema is None:
            self._schema = schema
            self._open()
        elif {k: v[:2] for k, v in schema.items()} != {k: v[:2] for k, v in self._schema.items()}:
            raise ValueError(f"TableWriter.append: columns {list(schema)} do not match the first batch's "
                             f"{list(self._schema)}")
        n = len(arrays["object_id"])
        if n == 0:
            return
        if self.format == "parquet":
            self._writer.write_table(self._arrow(arrays))
        else:
            for k, a in arrays.items():
                if self._schema[k][0] == "str":
                    self._strings[k].extend(a.tolist())
                else:
                    self._files[k].write(np.ascontiguousarray(a, dtype=self._schema[k][2]).tobytes())
        self.n_rows += n

    def _open(self) -> None:
        assert self._schema is not None
        if self.format == "parquet":
            import pyarrow.parquet as pq

            sample = {k: np.zeros((0, *shape), dtype=dt) if kind == "num" else np.array([], dtype=object)
                      for k, (kind, shape, dt) in self._schema.items()}
            schema = self._arrow(sample).schema
            if self.metadata:
                schema = schema.with_metadata({k.encode(): v.encode() for k, v in self.metadata.items()})
            self._writer = pq.ParquetWriter(str(self._tmp), schema)
        else:
            self._spool = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.spool.", dir=self.path.parent))
            for i, (k, (kind, _, _)) in enumerate(self._schema.items()):
                if kind == "str":
                    self._strings[k] = []
                else:
                    self._files[k] = open(self._spool / f"{i}.bin", "wb")  # noqa: SIM115

    def _arrow(self, arrays: Mapping[str, np.ndarray]):
        import pyarrow as pa

        cols = {}
        for k, a in arrays.items():
            if a.dtype == object:
                cols[k] = pa.array(a.tolist(), type=pa.string())
            elif a.ndim == 1:
                cols[k] = pa.array(a)
            else:
                arr = pa.array(np.ascontiguousarray(a).reshape(-1))
                for size in reversed(a.shape[1:]):  # innermost axis first
                    arr = pa.FixedSizeListArray.from_arrays(arr, int(size))
                cols[k] = arr
        return pa.table(cols)

    # -------------------------------------------------------------- finish
    def close(self) -> Path:
        """Finish the file and move it into place; returns the output path."""
        if self.closed:
            return self.path
        try:
            if self._schema is None:
                raise ValueError(f"{self.path}: nothing was written (no batch appended)")
            if self.format == "parquet":
                self._writer.close()
            else:
                self._write_fits()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self._cleanup()
        return self.path

    def _write_fits(self) -> None:
        from astropy.io import fits

        assert self._schema is not None and self._spool is not None
        for f in self._files.values():
            f.close()
        cols = []
        for i, (k, (kind, shape, dt)) in enumerate(self._schema.items()):
            if kind == "str":
                values = self._strings[k]
                width = max([len(s.encode()) for s in values] + [1])
                arr = np.array([s.encode() for s in values], dtype=f"S{width}") if values else np.zeros(0, f"S{width}")
                cols.append(fits.Column(name=k, format=f"{width}A", array=arr))
                continue
            raw = self._spool / f"{i}.bin"
            arr = (np.memmap(raw, dtype=dt, mode="r", shape=(self.n_rows, *shape)) if self.n_rows
                   else np.zeros((0, *shape), dtype=dt))
            code = {"f4": "E", "f8": "D", "i2": "I", "i4": "J", "i8": "K", "u1": "B", "b1": "L"}.get(
                np.dtype(dt).newbyteorder("=").str[1:])
            if code is None:
                if dt.kind == "u":
                    arr, code = np.asarray(arr, dtype=np.int64), "K"
                elif dt.kind == "i":
                    arr, code = np.asarray(arr, dtype=np.int32), "J"
                else:
                    arr, code = np.asarray(arr, dtype=np.float64), "D"
            width = int(np.prod(shape)) if shape else 1
            # TDIM also for one-element vectors, else FITS readers return them as scalars
            dim = f"({','.join(str(s) for s in reversed(shape))})" if len(shape) > 1 or shape == (1,) else None
            cols.append(fits.Column(name=k, format=f"{width}{code}", array=arr, dim=dim))
        hdu = fits.BinTableHDU.from_columns(cols)
        for key, value in self.metadata.items():
            plain = len(key) <= 8 and key.replace("_", "").replace("-", "").isalnum()
            hdu.header[key.upper() if plain else f"HIERARCH {key}"] = value
        hdu.writeto(self._tmp, overwrite=True)

    def abort(self) -> None:
        """Drop everything written so far (the target path is left untouched)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:  # noqa: BLE001
            pass
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass
        self._tmp.unlink(missing_ok=True)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

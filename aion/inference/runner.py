"""Resumable, memory-flat batch runs over a catalogue (``aion embed`` / ``predict`` / ``generate``).

Why: a large catalogue takes hours, so an interruption must not throw the finished work away,
and memory must follow the batch and chunk sizes, never the catalogue size.

How (:func:`run_in_parts`): a ``process(row, batch)`` function turns each :class:`ObjectBatch`
into output columns (rows first). Rows are collected into *parts* of ``chunk_size`` objects
(rounded up to a multiple of the batch size, so every part starts on a batch boundary and a
resumed run sees exactly the batches of an uninterrupted one) and each part is written
atomically (temporary file + ``os.replace``) as ``OUT.parts/part_000000.npz`` (no pickles:
strings are fixed-width unicode arrays). ``OUT.parts/manifest.json`` holds the run's
fingerprint (command options, batch and chunk sizes, catalogue size, output path).

Rerunning the same command resumes: finished parts are kept and the input stream is reopened at
the first missing part's row (:meth:`ObjectStream.from_row`), so finished rows are not even read.
A different fingerprint is an error (:class:`FingerprintMismatch`) unless ``restart=True``, which
discards the old parts. Once every part exists they are appended, in order, one at a time, to a
:class:`~aion.inference.io.TableWriter` (the output appears atomically) and the parts folder is
removed. On an exception or Ctrl-C the finished parts stay, no output is created, and a message
on stderr says how to resume.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aion.inference.io import ObjectBatch, ObjectStream, TableWriter

PathLike = str | os.PathLike
MANIFEST = "manifest.json"
FORMAT_VERSION = 1

Process = Callable[[int, ObjectBatch], Mapping[str, Any]]
"""``process(row, batch) -> {column: array with one row per object}``; ``row`` is the catalogue row
of the batch's first object (a stable per-batch seed, for instance)."""


class RunnerError(ValueError):
    """A run that cannot start as asked (the message says what to do)."""


class FingerprintMismatch(RunnerError):
    """The parts folder holds parts of a run with other options (or input, or model)."""


@dataclass
class RunSummary:
    path: Path
    """The finished output table."""
    n_rows: int
    n_errors: int
    """Rows with a non-empty ``error`` column (0 when there is no such column)."""
    resumed_from: int
    """Rows already finished on disk when the run started (0 for a fresh run)."""


def parts_dir(out: PathLike) -> Path:
    """The work folder of an output: ``OUT.parts`` next to it."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def aligned_chunk_size(chunk_size: int, batch_size: int) -> int:
    """``chunk_size`` rounded up to a multiple of ``batch_size`` (parts must start on batch boundaries)."""
    if int(chunk_size) < 1 or int(batch_size) < 1:
        raise RunnerError(f"chunk_size and batch_size must be >= 1, got {chunk_size} and {batch_size}")
    return -(-int(chunk_size) // int(batch_size)) * int(batch_size)


def _part_path(folder: Path, index: int) -> Path:
    return folder / f"part_{index:06d}.npz"


def _storable(a: Any) -> np.ndarray:
    """A numpy array that ``np.load(allow_pickle=False)`` reads back: text becomes fixed-width unicode."""
    a = np.asarray(a)
    if a.dtype.kind in "OSU":
        flat = [x.decode() if isinstance(x, bytes) else str(x) for x in a.reshape(-1)]
        return np.array(flat, dtype=str).reshape(a.shape) if flat else np.zeros(a.shape, dtype="<U1")
    return a


def save_part(path: Path, columns: Mapping[str, Any]) -> None:
    """Write one part atomically (``path`` exists complete or not at all)."""
    names = list(columns)
    arrays = {f"c{i}": _storable(columns[k]) for i, k in enumerate(names)}
    arrays["columns"] = np.array(names, dtype=str)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_part(path: Path) -> dict[str, np.ndarray]:
    """The columns of a part, in their written order."""
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["columns"].tolist()]
        return {n: z[f"c{i}"] for i, n in enumerate(names)}


def _normalise(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """JSON round trip, so tuples / lists and paths compare as they will after a reload."""
    return json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))


def _open_folder(folder: Path, fingerprint: dict[str, Any], n_parts: int, restart: bool) -> int:
    """Create or check the parts folder; returns how many leading parts are finished."""
    if restart and folder.exists():
        shutil.rmtree(folder)
    manifest = folder / MANIFEST
    if folder.exists() and manifest.is_file():
        old = json.loads(manifest.read_text()).get("fingerprint", {})
        if old != fingerprint:
            diffs = [f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in sorted(set(old) | set(fingerprint))
                     if old.get(k) != fingerprint.get(k)]
            raise FingerprintMismatch(f"{folder} holds the parts of a different run ({'; '.join(diffs)}); delete "
                                      "that folder or rerun with --restart to discard them")
    elif folder.exists() and any(folder.glob("part_*.npz")):
        raise FingerprintMismatch(f"{folder} holds parts but no {MANIFEST}, so they cannot be checked; delete "
                                  "that folder or rerun with --restart to discard them")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, "fingerprint": fingerprint, "n_parts": n_parts},
                                  indent=1))
        os.replace(tmp, manifest)
    for stale in folder.glob(".part_*.tmp"):  # a part interrupted while it was being written
        stale.unlink(missing_ok=True)
    done = 0
    while done < n_parts and _part_path(folder, done).is_file():
        done += 1
    return done


def _concat(buffer: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    names = list(buffer[0])
    for cols in buffer[1:]:
        if list(cols) != names:
            raise ValueError(f"process returned columns {list(cols)}, earlier batches gave {names}")
    return {k: np.concatenate([np.asarray(cols[k]) for cols in buffer]) for k in names}


def run_in_parts(stream: ObjectStream, process: Process, out: PathLike, fingerprint: Mapping[str, Any], *,
                 batch_size: int, chunk_size: int = 4096, restart: bool = False,
                 metadata: Mapping[str, str] | None = None, progress: bool = True,
                 desc: str | None = None) -> RunSummary:
    """Run ``process`` over every batch of ``stream`` and write the output table ``out``, resumably
    (see the module docstring). ``stream`` must start at row 0 and not have been iterated (it is
    reopened at the first unfinished row); its batches must hold ``batch_size`` objects (the last
    may hold fewer). ``fingerprint``: what identifies the run besides the sizes and the output
    path, which are added here. ``metadata``: table-wide metadata for the output."""
    from tqdm.auto import tqdm

    out = Path(out)
    if stream.start != 0:
        raise ValueError(f"run_in_parts: the stream must start at row 0, not {stream.start}")
    total = stream.total
    if total == 0:
        raise RunnerError("the input holds no objects: nothing to write")
    chunk = aligned_chunk_size(chunk_size, batch_size)
    n_parts = -(-total // chunk)
    fp = _normalise({**fingerprint, "batch_size": int(batch_size), "chunk_size": chunk, "n_objects": total,
                     "output": str(out.resolve())})
    folder = parts_dir(out)
    done = _open_folder(folder, fp, n_parts, restart)
    start = min(done * chunk, total)
    part, row = done, start
    buffer: list[Mapping[str, Any]] = []
    filled = 0
    bar = tqdm(total=total, initial=start, desc=desc, unit="obj", disable=not progress)
    try:
        if start < total:
            for batch in stream.from_row(start) if start else stream:
                n = len(batch.object_id)
                cols = process(row, batch)
                sizes = {k: len(np.asarray(v)) for k, v in cols.items()}
                if set(sizes.values()) != {n}:
                    raise ValueError(f"process: every column needs {n} rows (one per object), got {sizes}")
                buffer.append(cols)
                filled += n
                row += n
                if filled > chunk:
                    raise ValueError(f"a batch crossed a part boundary: batches must hold {batch_size} objects")
                if filled == chunk or row == total:
                    save_part(_part_path(folder, part), _concat(buffer))
                    part, buffer, filled = part + 1, [], 0
                bar.update(n)
        if row != total or part != n_parts:
            raise RuntimeError(f"the input yielded {row} of its {total} objects")
    except BaseException:
        bar.close()
        kept = min(part * chunk, total)
        print(f"stopped: {kept} of {total} objects are done ({part} of {n_parts} parts kept in {folder}); "
              f"rerun the same command to resume from object {kept}", file=sys.stderr)
        raise
    bar.close()
    n_errors = 0
    with TableWriter(out, metadata) as writer:
        for i in range(n_parts):
            cols = load_part(_part_path(folder, i))
            if "error" in cols:
                n_errors += int(np.count_nonzero(cols["error"] != ""))
            writer.append(cols)
        if writer.n_rows != total:
            raise RuntimeError(f"{folder}: the parts hold {writer.n_rows} rows, expected {total}")
    shutil.rmtree(folder, ignore_errors=True)
    return RunSummary(path=out, n_rows=total, n_errors=n_errors, resumed_from=start)

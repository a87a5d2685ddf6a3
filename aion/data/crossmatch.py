"""Sky cross-matching of two surveys and streaming of the matched pairs as one batch.

Matching reads only ``ra``/``dec`` (16 bytes a row) of both surveys; the heavy columns of
the matched rows are then read batch by batch from the HDF5 shards, so memory follows
``batch_size``, not survey size.

Conventions:
- nearest neighbour on the sphere (astropy ``match_to_catalog_sky``, ICRS degrees); a pair
  is kept when its separation is <= ``radius_arcsec``;
- one-to-one: when several left objects claim the same right object the closest one wins
  (ties: the lower left index) and the others are dropped, not re-matched to their second
  nearest neighbour; ``MatchResult.n_duplicates_dropped`` counts them;
- rows with non-finite positions never match;
- a cross-matched batch carries the left survey's ``object_id``/``ra``/``dec``, the union of
  both surveys' typed modalities, and in ``columns`` every raw column of both surveys not
  consumed by an image/spectrum modality, prefixed ``<survey>.`` (``object_id``, ``ra`` and
  ``dec`` included), plus ``separation_arcsec``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord

from aion import modalities as registry
from aion.data.batches import SurveyBatch
from aion.data.mmu import PathLike, SurveyShards, columns_to_survey_batch

Positions = tuple[np.ndarray, np.ndarray] | tuple[Sequence[float], Sequence[float]]


@dataclass(frozen=True)
class MatchResult:
    """Matched pairs sorted by ``left_index``; each left and each right index appears at most once."""

    left_index: np.ndarray
    right_index: np.ndarray
    separation_arcsec: np.ndarray
    n_duplicates_dropped: int = 0

    def __len__(self) -> int:
        return len(self.left_index)


def _positions(side: str, pos: Positions) -> tuple[np.ndarray, np.ndarray]:
    if len(pos) != 2:
        raise ValueError(f"{side}: expected a (ra, dec) pair of arrays in degrees")
    ra = np.atleast_1d(np.asarray(pos[0], dtype=np.float64))
    dec = np.atleast_1d(np.asarray(pos[1], dtype=np.float64))
    if ra.ndim != 1 or ra.shape != dec.shape:
        raise ValueError(f"{side}: ra and dec must be 1-D arrays of equal length, got {ra.shape} and {dec.shape}")
    return ra, dec


def _empty(n_dropped: int = 0) -> MatchResult:
    return MatchResult(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64), n_dropped)


def crossmatch(left: Positions, right: Positions, radius_arcsec: float = 1.0) -> MatchResult:
    """One-to-one nearest-neighbour match of two (ra, dec) catalogues in degrees."""
    if not (np.isfinite(radius_arcsec) and radius_arcsec > 0):
        raise ValueError(f"radius_arcsec must be positive, got {radius_arcsec}")
    lra, ldec = _positions("left", left)
    rra, rdec = _positions("right", right)
    lok = np.flatnonzero(np.isfinite(lra) & np.isfinite(ldec) & (np.abs(ldec) <= 90))
    rok = np.flatnonzero(np.isfinite(rra) & np.isfinite(rdec) & (np.abs(rdec) <= 90))
    if len(lok) == 0 or len(rok) == 0:
        return _empty()
    lcoord = SkyCoord(ra=lra[lok] * u.deg, dec=ldec[lok] * u.deg, frame="icrs")
    rcoord = SkyCoord(ra=rra[rok] * u.deg, dec=rdec[rok] * u.deg, frame="icrs")
    nearest, sep2d, _ = lcoord.match_to_catalog_sky(rcoord)
    sep = sep2d.to_value(u.arcsec)
    keep = sep <= radius_arcsec
    cand_left, cand_right, cand_sep = lok[keep], rok[nearest[keep]], sep[keep]
    # closest claim per right object wins: sort by (right, separation, left), keep each run's first
    order = np.lexsort((cand_left, cand_sep, cand_right))
    first = np.ones(len(order), dtype=bool)
    first[1:] = cand_right[order][1:] != cand_right[order][:-1]
    kept = order[first]
    kept = kept[np.argsort(cand_left[kept], kind="stable")]
    return MatchResult(
        left_index=cand_left[kept].astype(np.int64), right_index=cand_right[kept].astype(np.int64),
        separation_arcsec=cand_sep[kept].astype(np.float64), n_duplicates_dropped=int(len(order) - len(kept)),
    )


def _array_fields(batch: SurveyBatch) -> set[str]:
    """Raw columns consumed by the batch's image/spectrum modalities (kept out of ``columns``)."""
    fields: set[str] = set()
    for name in batch.modalities:
        mod = registry.modality(name)
        if mod.kind in ("image", "spectrum"):
            fields |= set(mod.fields)
    return fields


def merge_matched(left: SurveyBatch, right: SurveyBatch, left_raw: dict[str, np.ndarray],
                  right_raw: dict[str, np.ndarray], left_survey: str, right_survey: str,
                  separation_arcsec: np.ndarray) -> SurveyBatch:
    """One batch from row-aligned batches of two surveys (see the module docstring)."""
    clash = sorted(set(left.modalities) & set(right.modalities))
    if clash:
        raise ValueError(f"modalities {clash} come from both {left_survey!r} and {right_survey!r}")
    columns: dict[str, np.ndarray] = {}
    for survey, batch, raw in ((left_survey, left, left_raw), (right_survey, right, right_raw)):
        skip = _array_fields(batch)
        columns.update({f"{survey}.{k}": v for k, v in raw.items() if k not in skip})
    columns["separation_arcsec"] = np.asarray(separation_arcsec, dtype=np.float64)
    return SurveyBatch(object_id=left.object_id, ra=left.ra, dec=left.dec,
                       modalities={**left.modalities, **right.modalities}, columns=columns)


def iter_crossmatched(root: PathLike, left_survey: str, right_survey: str, radius_arcsec: float = 1.0,
                      batch_size: int = 256, left_config: str | None = None, right_config: str | None = None, *,
                      left_columns: Sequence[str] | None = None,
                      right_columns: Sequence[str] | None = None) -> Iterator[SurveyBatch]:
    """Stream the matched pairs of two surveys' HDF5 shards, in left-row order, as merged batches.

    ``left_columns``/``right_columns`` restrict what is read (``object_id``/``ra``/``dec`` always are).
    """
    if left_survey == right_survey:
        raise ValueError(f"cross-matching {left_survey!r} with itself would give clashing prefixes and modalities")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    left = SurveyShards(root, left_survey, left_config, left_columns)
    right = SurveyShards(root, right_survey, right_config, right_columns)
    match = crossmatch((left.read_column("ra"), left.read_column("dec")),
                       (right.read_column("ra"), right.read_column("dec")), radius_arcsec)
    return _iter_pairs(left, right, match, int(batch_size))


def _iter_pairs(left: SurveyShards, right: SurveyShards, match: MatchResult, batch_size: int) -> Iterator[SurveyBatch]:
    for start in range(0, len(match), batch_size):
        sl = slice(start, start + batch_size)
        left_raw = left.read_rows(match.left_index[sl])  # increasing: sequential reads
        right_raw = right.read_rows(match.right_index[sl])  # sorted for reading, then put back in pair order
        yield merge_matched(
            columns_to_survey_batch(left_raw, left.survey), columns_to_survey_batch(right_raw, right.survey),
            left_raw, right_raw, left.survey, right.survey, match.separation_arcsec[sl],
        )

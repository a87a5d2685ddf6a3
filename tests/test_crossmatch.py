"""Sky cross-matching: constructed positions, one-to-one rule, and streaming matched pairs from files."""

from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord

from aion.data.batches import ImageBatch, SpectrumBatch
from aion.data.crossmatch import MatchResult, crossmatch, iter_crossmatched
from aion.data.mmu import MMUShardWriter, shard_path


def offset(ra: float, dec: float, arcsec: float, pa_deg: float) -> tuple[float, float]:
    """A position ``arcsec`` away from (ra, dec) towards position angle ``pa_deg`` (east of north)."""
    c = SkyCoord(ra * u.deg, dec * u.deg).directional_offset_by(pa_deg * u.deg, arcsec * u.arcsec)
    return float(c.ra.deg), float(c.dec.deg)


def test_crossmatch_constructed_positions():
    left = [
        (359.99995, 0.0),  # 0: partner 0.3" east, across RA = 0/360
        (45.0, 89.99995),  # 1: next to the pole
        (10.0, -30.0),  # 2: partner 1.5" away: no match at 1"
        (200.0, 45.0),  # 3: 0.2" from a right object ...
        (np.nan, 45.0),  # 4: no position, never matched
        (120.0, 10.0),  # 5: exact
        (0.0, 0.0),  # 6: placeholder, set below as a 0.5" rival claim on the same right object as 3
    ]
    r3 = offset(200.0, 45.0, 0.2, 90)
    left[6] = offset(*r3, 0.5, 90)
    right = [
        (300.0, -60.0),  # unrelated
        r3,
        offset(45.0, 89.99995, 0.3, 200),
        offset(10.0, -30.0, 1.5, 10),
        offset(359.99995, 0.0, 0.3, 90),
        (120.0, 10.0),
    ]
    assert right[4][0] < 1.0  # the partner of 0 really sits on the other side of RA = 0
    lra, ldec = np.array(left).T
    rra, rdec = np.array(right).T
    m = crossmatch((lra, ldec), (rra, rdec), radius_arcsec=1.0)
    assert isinstance(m, MatchResult)
    np.testing.assert_array_equal(m.left_index, [0, 1, 3, 5])
    np.testing.assert_array_equal(m.right_index, [4, 2, 1, 5])
    np.testing.assert_allclose(m.separation_arcsec, [0.3, 0.3, 0.2, 0.0], atol=2e-3)
    assert m.n_duplicates_dropped == 1
    assert len(m) == 4
    wide = crossmatch((lra, ldec), (rra, rdec), radius_arcsec=2.0)
    assert 2 in wide.left_index and wide.right_index[list(wide.left_index).index(2)] == 3
    # swapping sides: the rival claim is gone, 3 is again the closest left object for r3
    back = crossmatch((rra, rdec), (lra, ldec), radius_arcsec=1.0)
    np.testing.assert_array_equal(back.left_index, [1, 2, 4, 5])
    np.testing.assert_array_equal(back.right_index, [3, 1, 0, 5])
    assert back.n_duplicates_dropped == 0


def test_crossmatch_edge_cases():
    empty = crossmatch((np.array([]), np.array([])), (np.array([1.0]), np.array([1.0])))
    assert len(empty) == 0 and empty.left_index.dtype == np.int64
    one = crossmatch(([1.0], [1.0]), ([1.0], [1.0 + 0.5 / 3600]))
    np.testing.assert_array_equal(one.right_index, [0])
    with pytest.raises(ValueError, match="radius"):
        crossmatch(([1.0], [1.0]), ([1.0], [1.0]), radius_arcsec=0)
    with pytest.raises(ValueError, match="equal length"):
        crossmatch(([1.0, 2.0], [1.0]), ([1.0], [1.0]))


# ---------------------------------------------------------------------------- files
BANDS = np.array([b"des-g", b"des-r", b"des-i", b"des-z"], dtype="S5")


def legacy(ids: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> dict[str, np.ndarray]:
    n = len(ids)
    image = np.broadcast_to(ids[:, None, None, None].astype(np.float32), (n, 4, 8, 8)).copy()
    return {
        "object_id": ids, "ra": ra, "dec": dec, "healpix": np.zeros(n, np.int64),
        "image_array": image, "image_ivar": np.ones((n, 4, 8, 8), np.float32),
        "image_mask": np.ones((n, 4, 8, 8), bool), "image_band": np.tile(BANDS, (n, 1)),
        "image_psf_fwhm": np.ones((n, 4), np.float32), "image_scale": np.full((n, 4), 0.262, np.float32),
        "FLUX_G": ids * 1.0, "FLUX_IVAR_G": np.ones(n), "EBV": ids * 1e-3,
    }


def desi(ids: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> dict[str, np.ndarray]:
    n = len(ids)
    return {
        "object_id": ids, "ra": ra, "dec": dec, "healpix": np.zeros(n, np.int64),
        "spectrum_flux": np.repeat(ids[:, None].astype(np.float32), 16, axis=1),
        "spectrum_ivar": np.ones((n, 16), np.float32),
        "spectrum_lambda": np.broadcast_to(3600 + np.arange(16, dtype=np.float32), (n, 16)).copy(),
        "spectrum_mask": np.zeros((n, 16), bool), "Z": ids * 1e-4, "ZERR": np.full(n, 1e-4),
        "EBV": -ids * 1e-3,
    }


@pytest.fixture
def two_surveys(tmp_path: Path):
    """20 Legacy Survey objects in 2 shards; DESI has 11 partners (0.3"), 3 decoys (1.5"), 2 loners."""
    rng = np.random.default_rng(0)
    n = 20
    ra = rng.uniform(150, 150.2, n)
    ra[0] = 359.99995  # a pair across RA = 0/360
    dec = rng.uniform(2, 2.2, n)
    dec[1] = 89.9999
    leg_ids = np.arange(100, 100 + n)
    root = tmp_path / "mmu"
    for hp, rows in ((3, slice(0, 12)), (9, slice(12, 20))):
        with MMUShardWriter(shard_path(root, "legacysurvey", "south", hp)) as w:
            w.append(legacy(leg_ids[rows], ra[rows], dec[rows]))
    partners = [0, 1, 2, 4, 5, 7, 9, 12, 13, 16, 19]
    decoys = [3, 8, 15]
    pos = [offset(ra[i], dec[i], 0.3, 37 * k) for k, i in enumerate(partners)]
    pos += [offset(ra[i], dec[i], 1.5, 11 * k) for k, i in enumerate(decoys)]
    pos += [(10.0, -10.0), (11.0, -10.0)]
    desi_ids = 9000 + np.arange(len(pos))
    order = rng.permutation(len(pos))  # DESI rows in an order unrelated to the Legacy Survey's
    dra, ddec = np.array(pos)[order].T
    with MMUShardWriter(shard_path(root, "desi", "edr", 4)) as w:
        w.append(desi(desi_ids[order][:9], dra[:9], ddec[:9]))
    with MMUShardWriter(shard_path(root, "desi", "edr", 5)) as w:
        w.append(desi(desi_ids[order][9:], dra[9:], ddec[9:]))
    expected = {int(leg_ids[i]): int(desi_ids[k]) for k, i in enumerate(partners)}
    return root, expected


def test_iter_crossmatched_yields_expected_pairs(two_surveys):
    root, expected = two_surveys
    batches = list(iter_crossmatched(root, "legacysurvey", "desi", radius_arcsec=1.0, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 3]
    leg = np.concatenate([b.object_id for b in batches])
    np.testing.assert_array_equal(leg, sorted(expected))  # left order
    got = dict(zip(leg.tolist(), np.concatenate([b.columns["desi.object_id"] for b in batches]).tolist(),
                   strict=True))
    assert got == expected
    for b in batches:
        np.testing.assert_array_equal(b.columns["legacysurvey.object_id"], b.object_id)
        # same-named columns of both surveys are kept apart by their prefixes
        np.testing.assert_allclose(b.columns["legacysurvey.EBV"], b.object_id * 1e-3)
        np.testing.assert_allclose(b.columns["desi.EBV"], -b.columns["desi.object_id"] * 1e-3)
        assert "EBV" not in b.columns
        assert {"legacysurvey_image", "legacysurvey_flux_g", "legacysurvey_ebv", "desi_spectrum", "desi_z"} \
            <= set(b.modalities)
        img, spec = b.modalities["legacysurvey_image"], b.modalities["desi_spectrum"]
        assert isinstance(img, ImageBatch) and isinstance(spec, SpectrumBatch)
        np.testing.assert_array_equal(img.flux[:, 0, 0, 0], b.object_id)  # rows aligned with ids
        np.testing.assert_array_equal(spec.flux[:, 0], b.columns["desi.object_id"])
        np.testing.assert_allclose(b.modalities["desi_z"].values, b.columns["desi.object_id"] * 1e-4)
        np.testing.assert_allclose(b.columns["separation_arcsec"], 0.3, atol=2e-3)
        np.testing.assert_array_equal(b.ra, b.columns["legacysurvey.ra"])
        assert "legacysurvey.image_array" not in b.columns and "desi.spectrum_flux" not in b.columns
        assert "desi.Z" in b.columns and "legacysurvey.FLUX_G" in b.columns


def test_iter_crossmatched_radius_and_arguments(two_surveys):
    root, expected = two_surveys
    wide = list(iter_crossmatched(root, "legacysurvey", "desi", radius_arcsec=2.0, batch_size=100))
    assert len(wide) == 1 and len(wide[0]) == len(expected) + 3  # the 1.5" decoys join
    narrow = list(iter_crossmatched(root, "legacysurvey", "desi", radius_arcsec=0.1))
    assert narrow == []
    few = next(iter_crossmatched(root, "legacysurvey", "desi", left_columns=["EBV"], right_columns=["Z"]))
    assert set(few.modalities) == {"legacysurvey_ebv", "desi_z"}
    with pytest.raises(ValueError, match="itself"):
        iter_crossmatched(root, "desi", "desi")
    with pytest.raises(FileNotFoundError, match="hsc"):
        iter_crossmatched(root, "legacysurvey", "hsc")

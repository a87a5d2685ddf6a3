"""MMU HDF5 writer/reader, typed conversion and Hugging Face round trips on small synthetic shards."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from aion.data import mmu
from aion.data.batches import BatchValidationError, ImageBatch, ScalarBatch, SpectrumBatch, SurveyBatch
from aion.data.mmu import (
    MMUShardWriter,
    columns_to_survey_batch,
    discover_shards,
    hdf5_to_hf_dataset,
    iter_hf_dataset,
    iter_mmu_hdf5,
    read_shard_meta,
    shard_path,
)

LEGACY_BANDS = [b"des-g", b"des-r", b"des-i", b"des-z"]
CONFIG = "dr10_test"


# ---------------------------------------------------------------------------- synthetic data
def legacy_columns(n: int, first_id: int, healpix: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (n, 4, 16, 16)
    ivar = rng.uniform(50, 100, shape).astype(np.float32)
    ivar[:, :, 0, :] = 0.0  # a dead row of pixels: clean by mask, unusable by ivar
    mask = rng.random(shape) > 0.1
    flux_g = rng.normal(10, 2, n)
    flux_g[1::4] = np.nan  # catalogue gaps
    return {
        "object_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "ra": rng.uniform(150, 151, n), "dec": rng.uniform(2, 3, n),
        "healpix": np.full(n, healpix, dtype=np.int64),
        "image_array": rng.normal(0, 1, shape).astype(np.float32),
        "image_ivar": ivar,
        "image_mask": mask,
        "image_band": np.tile(np.array(LEGACY_BANDS, dtype="S5"), (n, 1)),
        "image_psf_fwhm": rng.uniform(1.0, 1.6, (n, 4)).astype(np.float32),
        "image_scale": np.full((n, 4), 0.262, dtype=np.float32),
        "FLUX_G": flux_g, "FLUX_IVAR_G": rng.uniform(1, 2, n),
        "FLUX_R": rng.normal(20, 2, n).astype(np.float32), "FLUX_IVAR_R": rng.uniform(1, 2, n).astype(np.float32),
        "SHAPE_R": rng.uniform(0.3, 2, n).astype(np.float32),
        "EBV": rng.uniform(0, 0.1, n).astype(np.float32),
        "TYPE": np.array([b"REX", b"EXP", b"DEV", b"SER"] * n, dtype="S3")[:n],
    }


def sdss_columns(n: int, first_id: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """Variable-length spectra padded to ``width`` the SDSS way (lambda -1, ivar 0, mask True)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(width // 2, width + 1, n)
    lengths[0] = width
    wave = np.full((n, width), -1.0, dtype=np.float32)
    flux = np.zeros((n, width), np.float32)
    ivar = np.zeros((n, width), np.float32)
    mask = np.ones((n, width), bool)
    for i, k in enumerate(lengths):
        wave[i, :k] = 3800 + 2.0 * np.arange(k)
        flux[i, :k] = rng.normal(5, 1, k)
        ivar[i, :k] = rng.uniform(1, 4, k)
        mask[i, :k] = rng.random(k) < 0.15  # True = bad
    return {
        "object_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "ra": rng.uniform(150, 151, n), "dec": rng.uniform(2, 3, n), "healpix": np.zeros(n, np.int64),
        "spectrum_flux": flux, "spectrum_ivar": ivar, "spectrum_lambda": wave, "spectrum_mask": mask,
        "spectrum_lsf_sigma": np.where(wave > 0, 1.0, 0.0).astype(np.float32),
        "Z": rng.uniform(0, 1, n).astype(np.float32), "ZERR": rng.uniform(1e-4, 1e-3, n).astype(np.float32),
    }


def desi_columns(n: int, first_id: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    wave = np.broadcast_to(3600 + 0.8 * np.arange(64, dtype=np.float32), (n, 64)).copy()
    zerr = rng.uniform(1e-4, 1e-3, n)
    zerr[0], zerr[1], zerr[2] = 0.0, -1.0, np.nan  # unusable errors -> ivar 0
    return {
        "object_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "ra": rng.uniform(150, 151, n), "dec": rng.uniform(2, 3, n), "healpix": np.zeros(n, np.int64),
        "spectrum_flux": rng.normal(1, 0.1, (n, 64)).astype(np.float32),
        "spectrum_ivar": rng.uniform(1, 2, (n, 64)).astype(np.float32),
        "spectrum_lambda": wave, "spectrum_mask": rng.random((n, 64)) < 0.05,
        "spectrum_lsf_sigma": np.full((n, 64), 0.9, np.float32),
        "Z": rng.uniform(0, 1, n), "ZERR": zerr, "EBV": rng.uniform(0, 0.1, n),
    }


def write(path: Path, *blocks: dict[str, np.ndarray], **meta) -> Path:
    with MMUShardWriter(path, attrs=meta) as w:
        for block in blocks:
            w.append(block)
    return path


def concat(*blocks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


@pytest.fixture
def universe(tmp_path: Path) -> dict:
    """Two legacysurvey shards (healpix 3 and 10; 10 written in two appends), sdss and desi files."""
    root = tmp_path / "mmu"
    hp10a, hp10b = legacy_columns(7, 1000, 10, seed=1), legacy_columns(6, 1007, 10, seed=2)
    hp3 = legacy_columns(9, 500, 3, seed=3)
    write(shard_path(root, "legacysurvey", CONFIG, 10), hp10a, hp10b)
    write(shard_path(root, "legacysurvey", CONFIG, 3), hp3)
    sdss_a, sdss_b = sdss_columns(5, 1, 40, seed=4), sdss_columns(4, 6, 30, seed=5)
    write(shard_path(root, "sdss", "dr16", 7), sdss_a)
    write(shard_path(root, "sdss", "dr16", 8), sdss_b)
    desi = desi_columns(8, 900, seed=6)
    write(shard_path(root, "desi", "edr_sv3", 7), desi)
    # discovery order is numeric in healpix: 3 before 10
    return {"root": root, "legacysurvey": concat(hp3, hp10a, hp10b), "sdss": (sdss_a, sdss_b), "desi": desi}


def collect(batches) -> list[SurveyBatch]:
    return list(batches)


# ---------------------------------------------------------------------------- layout
def test_shard_path_and_discovery_order(universe):
    root = universe["root"]
    assert shard_path(root, "hsc", "pdr3", 12, 2, 3) == root / "hsc" / "pdr3" / "healpix=12" / "002-of-003.hdf5"
    shards = discover_shards(root, "legacysurvey")
    assert [p.parent.name for p in shards] == ["healpix=3", "healpix=10"]
    assert discover_shards(root, "legacysurvey", CONFIG) == shards
    with pytest.raises(ValueError):
        shard_path(root, "hsc", "pdr3", 1, index=2, total=1)


def test_missing_survey_and_config_are_clear(tmp_path, universe):
    with pytest.raises(FileNotFoundError, match=r"nosuch.*healpix=<N>"):
        iter_mmu_hdf5(universe["root"], "nosuch")
    with pytest.raises(FileNotFoundError, match=r"available configs: \['dr10_test'\]"):
        discover_shards(universe["root"], "legacysurvey", "dr9")
    (tmp_path / "empty" / "hsc" / "pdr3").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no HDF5 shards"):
        discover_shards(tmp_path / "empty", "hsc")


# ---------------------------------------------------------------------------- round trip
def test_raw_round_trip_every_column(universe, tmp_path):
    """An unregistered survey name keeps every column raw: exact values, shapes, dtypes, order."""
    expected = universe["legacysurvey"]
    raw_root = tmp_path / "raw"
    for path in discover_shards(universe["root"], "legacysurvey"):
        dest = raw_root / "rawcopy" / path.relative_to(universe["root"] / "legacysurvey")
        dest.parent.mkdir(parents=True)
        dest.write_bytes(path.read_bytes())
    batches = collect(iter_mmu_hdf5(raw_root, "rawcopy", batch_size=5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 2]  # 22 rows; shard boundary (9) inside a batch
    assert all(not b.modalities for b in batches)
    got = {k: np.concatenate([b.columns[k] for b in batches]) for k in batches[0].columns}
    got["object_id"] = np.concatenate([b.object_id for b in batches])
    got["ra"] = np.concatenate([b.ra for b in batches])
    got["dec"] = np.concatenate([b.dec for b in batches])
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_typed_legacysurvey_batches(universe):
    expected = universe["legacysurvey"]
    batches = collect(iter_mmu_hdf5(universe["root"], "legacysurvey", batch_size=8))
    assert [len(b) for b in batches] == [8, 8, 6]
    np.testing.assert_array_equal(np.concatenate([b.object_id for b in batches]), expected["object_id"])
    img = [b.modalities["legacysurvey_image"] for b in batches]
    assert all(isinstance(i, ImageBatch) for i in img)
    assert img[0].bands == ("des-g", "des-r", "des-i", "des-z")
    assert img[0].pixel_scale == pytest.approx(0.262)
    assert img[0].zero_point == 22.5
    valid = np.concatenate([i.valid for i in img])
    np.testing.assert_array_equal(valid, expected["image_mask"] & (expected["image_ivar"] > 0))
    assert not valid[:, :, 0, :].any()  # ivar 0 with mask True (clean) is still unusable
    flux = np.concatenate([i.flux for i in img])
    np.testing.assert_array_equal(flux[valid], expected["image_array"][valid])
    np.testing.assert_array_equal(np.concatenate([i.psf_fwhm for i in img]), expected["image_psf_fwhm"])
    # scalar modalities: NaN means absent, not an error; raw columns keep the catalogue values
    flux_g = np.concatenate([b.modalities["legacysurvey_flux_g"].values for b in batches])
    present_g = np.concatenate([b.present("legacysurvey_flux_g") for b in batches])
    np.testing.assert_array_equal(present_g, np.isfinite(expected["FLUX_G"]))
    np.testing.assert_array_equal(flux_g[present_g], expected["FLUX_G"][present_g])
    ivar_r = np.concatenate([b.modalities["legacysurvey_flux_r"].ivar for b in batches])
    np.testing.assert_allclose(ivar_r, expected["FLUX_IVAR_R"].astype(np.float64))
    assert "legacysurvey_flux_w1" not in batches[0].modalities  # missing columns: modality absent
    assert not batches[0].present("legacysurvey_flux_w1").any()
    cols = batches[0].columns
    assert {"healpix", "TYPE", "EBV", "FLUX_G"} <= set(cols)
    assert not any(k.startswith("image_") for k in cols)
    assert not {"object_id", "ra", "dec"} & set(cols)


def test_spectra_valid_conventions_and_padding_across_shards(universe):
    sdss_a, sdss_b = universe["sdss"]
    batches = collect(iter_mmu_hdf5(universe["root"], "sdss", batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 3]
    spec = [b.modalities["sdss_spectrum"] for b in batches]
    assert all(isinstance(s, SpectrumBatch) for s in spec)
    # batch 1 mixes shard a (40 px) and shard b (30 px): b is padded MMU-style to 40
    assert spec[1].flux.shape == (3, 40)
    expected_wave = np.concatenate([sdss_a["spectrum_lambda"], np.pad(sdss_b["spectrum_lambda"], ((0, 0), (0, 10)),
                                                                        constant_values=-1)])
    expected_bad = np.concatenate([sdss_a["spectrum_mask"], np.pad(sdss_b["spectrum_mask"], ((0, 0), (0, 10)),
                                                                    constant_values=True)])
    assert spec[2].flux.shape == (3, 30)  # a batch inside shard b keeps its own width

    def widen(x, fill):
        return np.pad(x, ((0, 0), (0, 40 - x.shape[1])), constant_values=fill)

    wave = np.concatenate([widen(s.wavelength, -1) for s in spec])
    valid = np.concatenate([widen(s.valid, False) for s in spec])
    np.testing.assert_array_equal(wave, expected_wave)
    np.testing.assert_array_equal(valid, ~expected_bad & (expected_wave > 0))  # True=bad inverted
    assert not valid[wave <= 0].any()  # padding is never valid
    assert valid.any(axis=1).all()
    np.testing.assert_array_equal(np.concatenate([b.columns["Z"] for b in batches]),
                                  np.concatenate([sdss_a["Z"], sdss_b["Z"]]))


def test_sigma_to_ivar(universe):
    desi = universe["desi"]
    (batch,) = collect(iter_mmu_hdf5(universe["root"], "desi", batch_size=100))
    z = batch.modalities["desi_z"]
    assert isinstance(z, ScalarBatch)
    expected = np.zeros(len(desi["ZERR"]))
    expected[3:] = 1.0 / desi["ZERR"][3:] ** 2
    np.testing.assert_allclose(z.ivar, expected)
    np.testing.assert_array_equal(z.valid, [False, False, False] + [True] * 5)
    spec = batch.modalities["desi_spectrum"]
    np.testing.assert_array_equal(spec.valid, ~desi["spectrum_mask"])
    np.testing.assert_array_equal(spec.lsf_sigma, desi["spectrum_lsf_sigma"])


def test_columns_subset_and_read_sizes(universe, monkeypatch):
    """Only requested columns are read, never more than one batch of rows per read."""
    sizes = []
    real_read = mmu._read

    def spy(f, names, rows):
        out = real_read(f, names, rows)
        sizes.append(len(next(iter(out.values()))))
        return out

    monkeypatch.setattr(mmu, "_read", spy)
    batches = collect(iter_mmu_hdf5(universe["root"], "legacysurvey", batch_size=4, columns=["FLUX_G", "ra"]))
    assert max(sizes) <= 4
    assert set(batches[0].modalities) == {"legacysurvey_flux_g"}
    assert batches[0].modalities["legacysurvey_flux_g"].ivar is None
    assert set(batches[0].columns) == {"FLUX_G"}
    with pytest.raises(ValueError, match="NOPE"):
        iter_mmu_hdf5(universe["root"], "legacysurvey", columns=["NOPE"])


def test_read_rows_any_order_dense_and_sparse(universe):
    expected = universe["legacysurvey"]
    shards = mmu.SurveyShards(universe["root"], "legacysurvey", columns=["EBV", "image_array", "image_mask", "TYPE"])
    assert len(shards) == 22 and shards.offsets.tolist() == [0, 9, 22]
    for rows in ([21, 0, 5, 9], [3], [9, 10, 21, 0, 8]):  # the last is sparse in both shards: read per run
        got = shards.read_rows(np.array(rows))
        for name in ("object_id", "EBV", "image_array", "image_mask", "TYPE"):
            np.testing.assert_array_equal(got[name], expected[name][rows], err_msg=name)
    assert shards.read_rows(np.array([], dtype=np.int64))["image_array"].shape == (0, 4, 16, 16)
    with pytest.raises(ValueError, match="unique"):
        shards.read_rows(np.array([1, 1]))
    with pytest.raises(IndexError):
        shards.read_rows(np.array([22]))


def test_band_order_is_normalised_and_mixed_sets_rejected():
    cols = legacy_columns(3, 0, 0, seed=9)
    perm = [2, 0, 3, 1]
    shuffled = dict(cols)
    for key in ("image_array", "image_ivar", "image_mask", "image_band", "image_psf_fwhm"):
        shuffled[key] = cols[key].copy()
        shuffled[key][1] = cols[key][1][perm]
    ref = columns_to_survey_batch(cols, "legacysurvey").modalities["legacysurvey_image"]
    got = columns_to_survey_batch(shuffled, "legacysurvey").modalities["legacysurvey_image"]
    assert got.bands == ref.bands
    np.testing.assert_array_equal(got.flux, ref.flux)
    np.testing.assert_array_equal(got.psf_fwhm, ref.psf_fwhm)
    mixed = dict(cols)
    mixed["image_band"] = cols["image_band"].copy()
    mixed["image_band"][2, 0] = b"hsc-g"
    with pytest.raises(BatchValidationError, match="row 2 has bands"):
        columns_to_survey_batch(mixed, "legacysurvey")


# ---------------------------------------------------------------------------- writer
def test_byte_identical_files_and_metadata(tmp_path):
    cols = legacy_columns(6, 0, 1, seed=11)
    a = write(tmp_path / "a.hdf5", cols, seed=3, note="x")
    with MMUShardWriter(tmp_path / "c.hdf5") as w:
        w.attrs.update(note="x", seed=3)
        w.append(cols)
    time.sleep(1.1)  # any stored timestamp would now differ
    b = write(tmp_path / "b.hdf5", dict(reversed(list(cols.items()))), note="x", seed=3)
    assert a.read_bytes() == b.read_bytes() == (tmp_path / "c.hdf5").read_bytes()
    assert read_shard_meta(a) == {"seed": 3, "note": "x"}
    with h5py.File(a) as f:
        assert f["image_array"].chunks[0] >= 1 and f["image_array"].maxshape[0] is None
        # "auto" compression: masks and small catalogue columns gzip, noise-like pixels stay raw
        assert f["image_mask"].compression == "gzip"
        assert f["object_id"].compression == "gzip"


def test_auto_compression_skips_incompressible_pixels(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((8, 4, 32, 32)).astype(np.float32)
    smooth = np.tile(np.linspace(1, 2, 32, dtype=np.float32), (8, 4, 32, 1))
    with MMUShardWriter(tmp_path / "s.hdf5") as w:
        w.append({"object_id": np.arange(8), "noise": noise, "smooth": smooth})
    with h5py.File(tmp_path / "s.hdf5") as f:
        assert f["noise"].compression is None
        assert f["smooth"].compression == "gzip"
        np.testing.assert_array_equal(f["noise"][:], noise)


def test_interrupted_writer_keeps_previous_file(tmp_path):
    path = write(tmp_path / "shard.hdf5", desi_columns(4, 0, seed=1))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with MMUShardWriter(path) as w:
            w.append(desi_columns(5, 100, seed=2))
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.hdf5"]
    fresh = tmp_path / "never.hdf5"
    with pytest.raises(RuntimeError, match="again"):
        with MMUShardWriter(fresh) as w:
            w.append(desi_columns(3, 0, seed=3))
            raise RuntimeError("again")
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.hdf5"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(spectrum_flux=c["spectrum_flux"][:, :10]), "'spectrum_flux'.*trailing shape"),
        (lambda c: c.update(Z=c["Z"].astype(np.float32)), "'Z'.*dtype"),
        (lambda c: c.pop("EBV"), r"missing \['EBV'\]"),
        (lambda c: c.update(EXTRA=np.zeros(3)), r"unexpected \['EXTRA'\]"),
        (lambda c: c.update(ra=c["ra"][:2]), "same number of rows"),
    ],
)
def test_mismatched_append_is_a_clear_error(tmp_path, change, match):
    with MMUShardWriter(tmp_path / "s.hdf5") as w:
        w.append(desi_columns(3, 0, seed=1))
        bad = desi_columns(3, 3, seed=2)
        change(bad)
        with pytest.raises(ValueError, match=match):
            w.append(bad)
        w.append(desi_columns(3, 6, seed=3))  # the writer is still usable
    assert len(h5py.File(tmp_path / "s.hdf5")["object_id"]) == 6


def test_text_columns_fixed_width(tmp_path):
    path = tmp_path / "t.hdf5"
    with MMUShardWriter(path) as w:
        w.append({"object_id": np.arange(2), "NAME": np.array(["ab", "cde"])})
        w.append({"object_id": np.arange(2, 3), "NAME": np.array(["f"])})  # shorter: fine
        with pytest.raises(ValueError, match="'NAME'.*fixed width 3"):
            w.append({"object_id": np.arange(3, 4), "NAME": np.array(["toolong"])})
    with h5py.File(path) as f:
        assert f["NAME"].dtype == np.dtype("S3")
        assert f["NAME"][:].tolist() == [b"ab", b"cde", b"f"]


# ---------------------------------------------------------------------------- Hugging Face
def assert_batches_equal(a: SurveyBatch, b: SurveyBatch) -> None:
    np.testing.assert_array_equal(a.object_id, b.object_id)
    np.testing.assert_array_equal(a.ra, b.ra)
    np.testing.assert_array_equal(a.dec, b.dec)
    assert set(a.modalities) == set(b.modalities)
    for name, x in a.modalities.items():
        y = b.modalities[name]
        assert type(x) is type(y), name
        for attr in ("flux", "ivar", "valid", "psf_fwhm", "wavelength", "lsf_sigma", "values"):
            if hasattr(x, attr) and getattr(x, attr) is not None:
                np.testing.assert_array_equal(getattr(x, attr), getattr(y, attr), err_msg=f"{name}.{attr}")
        for attr in ("bands", "pixel_scale", "zero_point"):
            if hasattr(x, attr):
                assert getattr(x, attr) == getattr(y, attr), f"{name}.{attr}"
    assert set(a.columns) == set(b.columns)
    for name, x in a.columns.items():
        y = b.columns[name]
        if x.dtype.kind == "S":
            assert x.tolist() == y.tolist(), name
        else:
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("survey", ["legacysurvey", "sdss"])
def test_hf_round_trip_save_to_disk_and_parquet(universe, tmp_path, survey):
    root = universe["root"]
    ds = hdf5_to_hf_dataset(root, survey, cache_dir=tmp_path / "hf_cache")
    assert ds.num_rows == sum(len(b) for b in iter_mmu_hdf5(root, survey, batch_size=100))
    assert "image" in ds.features if survey == "legacysurvey" else "spectrum" in ds.features
    reference = collect(iter_mmu_hdf5(root, survey, batch_size=4))
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    for source in (tmp_path / "saved", tmp_path / "pq", tmp_path / "pq" / "train-00000-of-00001.parquet", ds):
        got = collect(iter_hf_dataset(source, survey, batch_size=4))
        assert [len(b) for b in got] == [len(b) for b in reference], source
        for x, y in zip(reference, got, strict=True):
            assert_batches_equal(x, y)


def test_hf_nested_rows_with_string_ids_and_array_key():
    """MMU copies may call the flux plane ``array`` and store object_id as text."""
    import datasets

    rows = {
        "object_id": ["11", "12"], "ra": [1.0, 2.0], "dec": [0.0, 0.5],
        "image": [[{"band": b.decode(), "array": np.full((2, 2), i, np.float32),
                    "ivar": np.ones((2, 2), np.float32), "mask": np.ones((2, 2), bool),
                    "psf_fwhm": 1.2, "scale": 0.262} for b in LEGACY_BANDS] for i in range(2)],
        "FLUX_G": [1.0, None],
    }
    (batch,) = collect(iter_hf_dataset(datasets.Dataset.from_dict(rows), "legacysurvey", batch_size=8))
    np.testing.assert_array_equal(batch.object_id, [11, 12])
    img = batch.modalities["legacysurvey_image"]
    assert img.flux.shape == (2, 4, 2, 2) and img.flux[1].min() == 1
    np.testing.assert_array_equal(batch.present("legacysurvey_flux_g"), [True, False])


def test_hf_missing_local_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        iter_hf_dataset(tmp_path / "nothing_here", "legacysurvey")

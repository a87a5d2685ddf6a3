"""``aion embed`` / ``aion predict`` end to end on a tiny untrained FourM and a FITS catalogue."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from tiny_models import export_tiny_model, specs_of

from aion.cli import main
from aion.data.batches import ScalarBatch
from aion.inference.io import TableWriter, iter_fits_table
from aion.tokenizers.binning import QuantileBinning
from aion.tokenizers.scalar import ScalarTokenizer

torch.set_num_threads(1)

G, R, Z, T = "legacysurvey_flux_g", "legacysurvey_flux_r", "legacysurvey_flux_z", "provabgs_z"
N = 11
BAD = 4  # the object with every input missing


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    rng = np.random.default_rng(0)
    train = {name: ScalarBatch(name=name, values=rng.lognormal(size=500)) for name in (G, R, Z, T)}
    toks = {name: ScalarTokenizer(name, QuantileBinning(16), fine_bins=4 if name == T else 0).fit(b)
            for name, b in train.items()}
    model_dir = export_tiny_model(specs_of(toks), tmp)
    tok_dir = tmp / "tokenizers"
    for name, tok in toks.items():
        tok.save_pretrained(tok_dir / name)
    flux = {b: rng.lognormal(size=N) for b in "GRZ"}
    for b in "GRZ":
        flux[b][BAD] = np.nan
    ivar_g = np.ones(N)
    ivar_g[1] = 0.0  # object 1 lacks g through its ivar, not NaN
    table = Table({"object_id": np.arange(1000, 1000 + N, dtype=np.int64), "FLUX_G": flux["G"],
                   "FLUX_IVAR_G": ivar_g, "FLUX_R": flux["R"], "FLUX_Z": flux["Z"], "OTHER": np.zeros(N)})
    path = tmp / "cat.fits"
    table.write(path)
    common = ["--model", str(model_dir), "--tokenizers", str(tok_dir), "--table", str(path), "--batch-size", "4",
              "--quiet"]
    return tmp, common, table


def _read(path):
    if path.suffix == ".parquet":
        t = pq.read_table(path)
        return {c: (np.array(t[c].to_pylist()) if c != "error" else t[c].to_pylist()) for c in t.column_names}
    with fits.open(path) as hdul:
        data = hdul[1].data
        return {c: (np.array(data[c]) if c != "error" else [s.strip() for s in data[c]]) for c in data.names}


@pytest.mark.parametrize("suffix", [".parquet", ".fits"])
def test_embed_writes_one_row_per_object(setup, suffix):
    tmp, common, table = setup
    out = tmp / f"emb{suffix}"
    assert main(["embed", *common, "--out", str(out)]) == 0
    got = _read(out)
    assert got["object_id"].tolist() == table["object_id"].tolist()
    emb = got["embedding"]
    assert emb.shape == (N, 16)
    good = np.arange(N) != BAD
    assert np.isfinite(emb[good]).all() and np.isnan(emb[BAD]).all()
    assert got["error"][BAD] and all(e == "" for i, e in enumerate(got["error"]) if i != BAD)
    assert got[f"tokens_used_{G}"].tolist() == [0 if i in (1, BAD) else 1 for i in range(N)]
    assert got[f"tokens_used_{T}"].tolist() == [0] * N  # not in the table
    assert not list(tmp.glob(f".emb{suffix}*"))  # temporary files are gone


def test_embed_per_modality_pooling(setup):
    tmp, common, _ = setup
    out = tmp / "pm.parquet"
    assert main(["embed", *common, "--out", str(out), "--pooling", "per_modality_mean", "--max-inputs", "2"]) == 0
    emb = _read(out)["embedding"]
    assert emb.shape == (N, 4 * 16 + 4)


@pytest.mark.parametrize("suffix", [".parquet", ".fits"])
def test_predict_writes_summaries(setup, suffix):
    tmp, common, table = setup
    out = tmp / f"pred{suffix}"
    assert main(["predict", *common, "--target", T, "--out", str(out)]) == 0
    got = _read(out)
    assert got["object_id"].tolist() == table["object_id"].tolist()
    good = np.arange(N) != BAD
    for f in ("mean", "median", "mode", "p16", "p84", "p2_5", "p97_5"):
        assert np.isfinite(got[f][good]).all() and np.isnan(got[f][BAD]), f
    assert (got["p2_5"][good] <= got["p16"][good]).all() and (got["p16"][good] <= got["p84"][good]).all()
    assert got["error"][BAD] and got["error"][0] == ""


def test_predict_temperature_changes_the_posterior_not_the_mode(setup):
    tmp, common, _ = setup
    plain, warm = tmp / "t1.parquet", tmp / "t3.parquet"
    assert main(["predict", *common, "--target", T, "--out", str(plain)]) == 0
    assert main(["predict", *common, "--target", T, "--out", str(warm), "--temperature", "3"]) == 0
    a, b = _read(plain), _read(warm)
    good = np.arange(N) != BAD
    np.testing.assert_array_equal(a["mode"][good], b["mode"][good])
    assert (np.abs(a["p16"] - b["p16"])[good] > 1e-9).all()  # the widths are in test_calibration / test_zeroshot
    assert np.isnan(b["median"][BAD]) and b["error"][BAD]
    assert pq.read_schema(warm).metadata[b"aion_posterior_temperature"] == b"3.0"
    with pytest.raises(SystemExit, match="--temperature must be a finite number > 0"):
        main(["predict", *common, "--target", T, "--out", str(tmp / "t0.parquet"), "--temperature", "0"])


def test_unknown_column_mapping_is_a_clear_error(setup):
    tmp, common, _ = setup
    out = tmp / "x.parquet"
    with pytest.raises(SystemExit, match="no column 'FLUX_W'"):
        main(["embed", *common, "--out", str(out), "--column", "FLUX_W=legacysurvey_flux_g"])
    with pytest.raises(SystemExit, match="not a registered modality"):
        main(["embed", *common, "--out", str(out), "--column", "FLUX_G=nonsense"])
    with pytest.raises(SystemExit, match="model has no modality"):
        main(["embed", *common, "--out", str(out), "--column", "FLUX_G=legacysurvey_flux_i"])
    with pytest.raises(SystemExit, match="not in this model"):
        main(["predict", *common, "--out", str(out), "--target", "desi_z"])
    assert not out.exists()


def test_reader_and_writer_units(setup, tmp_path):
    _, _, table = setup
    path = tmp_path / "cat.ecsv"
    table.write(path)
    stream = iter_fits_table(path, {"flux_r": R}, batch_size=5)
    batches = list(stream)
    assert len(stream) == N and [len(b.object_id) for b in batches] == [5, 5, 1]
    assert list(batches[0].modalities) == [R]
    with pytest.raises(ValueError, match="must end in"):
        TableWriter(tmp_path / "out.csv")
    w = TableWriter(tmp_path / "a.parquet")
    w.append({"object_id": [1, 2], "x": np.zeros((2, 3), np.float32), "error": ["", "bad"]})
    with pytest.raises(ValueError, match="do not match"):
        w.append({"object_id": [3], "y": [1.0]})
    w.abort()
    assert not list(tmp_path.glob("*a.parquet*"))


def test_embed_and_predict_from_mmu_data(setup):
    from aion.mock.universe import MockConfig, generate

    tmp, common, _ = setup
    data = tmp / "mock"
    generate(data, MockConfig(n=20, seed=0, image_size=16, hsc_image_size=16), progress=False)
    base = [a for a in common if a not in ("--table", str(tmp / "cat.fits"))]
    assert main(["embed", *base, "--data", str(data), "--join", "provabgs", "--out", str(tmp / "m.parquet")]) == 0
    got = _read(tmp / "m.parquet")
    assert len(got["object_id"]) == 20 and np.isfinite(got["embedding"]).all()
    assert main(["predict", *base, "--data", str(data), "--target", T, "--out", str(tmp / "m.fits")]) == 0
    assert _read(tmp / "m.fits")["object_id"].tolist() == got["object_id"].tolist()


def test_iter_objects_reads_only_the_columns_of_the_kept_modalities(setup, monkeypatch):
    from aion.data.mmu import SurveyShards
    from aion.inference.io import iter_objects
    from aion.mock.universe import MockConfig, generate

    tmp, _, _ = setup
    data = tmp / "mock_cols"
    generate(data, MockConfig(n=12, seed=1, image_size=16, hsc_image_size=16), progress=False)
    full = next(iter(iter_objects(data, ["legacysurvey", "hsc"], batch_size=12)))
    asked: list[tuple[str, ...]] = []
    original = SurveyShards.read_rows

    def spy(self, rows, columns=None):
        asked.append(tuple(self.columns if columns is None else columns))
        return original(self, rows, columns)

    monkeypatch.setattr(SurveyShards, "read_rows", spy)
    some = next(iter(iter_objects(data, ["legacysurvey", "hsc"], batch_size=12, modalities=[G, "hsc_mag_r"])))
    assert set(some.modalities) == {G, "hsc_mag_r"}
    assert not any(c.startswith(("image_", "spectrum_")) for cols in asked for c in cols), asked
    assert {"FLUX_G", "FLUX_IVAR_G"} <= set(asked[0])
    np.testing.assert_array_equal(some.object_id, full.object_id)
    for name in (G, "hsc_mag_r"):
        np.testing.assert_array_equal(some.modalities[name].values, full.modalities[name].values)
        np.testing.assert_array_equal(some.modalities[name].ivar, full.modalities[name].ivar)


def test_embed_from_a_hugging_face_dataset_matches_the_hdf5_source(setup, tmp_path):
    from aion.data.mmu import hdf5_to_hf_dataset
    from aion.inference.io import iter_hf_objects
    from aion.mock.universe import MockConfig, generate

    tmp, common, _ = setup
    data = tmp / "mock_hf"
    generate(data, MockConfig(n=10, seed=2, image_size=16, hsc_image_size=16), progress=False)
    hf_dir = tmp_path / "saved"
    hdf5_to_hf_dataset(data, "legacysurvey", cache_dir=tmp_path / "cache").save_to_disk(str(hf_dir))
    base = [a for a in common if a not in ("--table", str(tmp / "cat.fits"))]
    assert main(["embed", *base, "--data", str(data), "--join", "--out", str(tmp_path / "h5.parquet")]) == 0
    assert main(["embed", *base, "--hf", str(hf_dir), "--out", str(tmp_path / "hf.parquet")]) == 0
    a, b = _read(tmp_path / "h5.parquet"), _read(tmp_path / "hf.parquet")
    assert a["object_id"].tolist() == b["object_id"].tolist() and len(a["object_id"]) == 10
    np.testing.assert_array_equal(a["embedding"], b["embedding"])
    # a resumed run starts at a row without reading the rows before it
    tail = list(iter_hf_objects(hf_dir, batch_size=4, start=6))
    assert np.concatenate([t.object_id for t in tail]).tolist() == a["object_id"].tolist()[6:]
    with pytest.raises(SystemExit, match="no such file"):
        main(["embed", *base, "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x.parquet")])

"""Resumable batch runs (``aion.inference.runner``), readers that start at a row, and ``aion generate``.

A tiny untrained FourM reads legacysurvey g/r/z fluxes from a FITS table and can generate a scalar
(flux g, provabgs_z), a DESI spectrum (tiny untrained spectrum tokenizer, 65 tokens) and a Legacy
Survey image (tiny untrained image tokenizer, 16 tokens); nothing here needs a trained model.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from tiny_models import export_tiny_model, specs_of

from aion.cli import main
from aion.data.batches import ScalarBatch
from aion.inference.io import iter_fits_table, iter_objects, read_metadata
from aion.inference.model import AionModel
from aion.inference.runner import aligned_chunk_size, load_part, parts_dir, save_part
from aion.tokenizers.binning import QuantileBinning
from aion.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from aion.tokenizers.scalar import ScalarTokenizer
from aion.tokenizers.spectrum import SpectrumTokenizer, SpectrumTokenizerConfig

torch.set_num_threads(1)

G, R, Z, T = "legacysurvey_flux_g", "legacysurvey_flux_r", "legacysurvey_flux_z", "provabgs_z"
SPEC, IMG = "desi_spectrum", "legacysurvey_image"
N = 11
BAD = 4  # the object with every input missing


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runner")
    rng = np.random.default_rng(0)
    train = {name: ScalarBatch(name=name, values=rng.lognormal(size=500)) for name in (G, R, Z, T)}
    toks = {name: ScalarTokenizer(name, QuantileBinning(16), fine_bins=4 if name == T else 0).fit(b)
            for name, b in train.items()}
    torch.manual_seed(0)
    toks[SPEC] = SpectrumTokenizer(SpectrumTokenizerConfig(
        wave_min=4000.0, wave_step=4.0, n_pix=512, patch=4, widths=(8, 16), depths=(1, 1), attn_blocks=1,
        attn_heads=2, mlp_ratio=2, code_dim=6, modalities=(SPEC,)))
    toks[IMG] = ImageTokenizer(ImageTokenizerConfig(bands=("des-g", "des-r", "des-i", "des-z"), crop_size=8,
                                                    downsample=2, channels=(4, 8), fsq_levels=(3, 3), norm="none"))
    model_dir = export_tiny_model(specs_of(toks), tmp, seed=None)
    tok_dir = tmp / "tokenizers"
    for name, tok in toks.items():
        tok.save_pretrained(tok_dir / name)
    flux = {b: rng.lognormal(size=N) for b in "GRZ"}
    for b in "GRZ":
        flux[b][BAD] = np.nan
    table = Table({"object_id": np.arange(1000, 1000 + N, dtype=np.int64), "FLUX_G": flux["G"],
                   "FLUX_R": flux["R"], "FLUX_Z": flux["Z"]})
    path = tmp / "cat.fits"
    table.write(path)
    common = ["--model", str(model_dir), "--tokenizers", str(tok_dir), "--table", str(path), "--batch-size", "2",
              "--chunk-size", "4", "--quiet"]
    return tmp, common, table


def _column(col) -> np.ndarray:
    """A parquet column as numpy with its stored dtype, nested fixed-size lists as extra axes."""
    arr = col.combine_chunks()
    shape = [len(arr)]
    while pa.types.is_fixed_size_list(arr.type):
        shape.append(arr.type.list_size)
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).reshape(shape)


def _read(path):
    if path.suffix == ".parquet":
        t = pq.read_table(path)
        return {c: (_column(t[c]) if c != "error" else t[c].to_pylist()) for c in t.column_names}
    with fits.open(path) as hdul:
        data = hdul[1].data
        return {c: (np.array(data[c]) if c != "error" else [s.strip() for s in data[c]]) for c in data.names}


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")
                                      if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


# ---------------------------------------------------------------------------- readers and parts
def test_fits_reader_starts_at_a_row(setup, tmp_path):
    tmp, _, table = setup
    full = iter_fits_table(tmp / "cat.fits", batch_size=4)
    tail = iter_fits_table(tmp / "cat.fits", batch_size=4, start=5)
    assert (len(full), len(tail), tail.start, tail.total) == (N, N - 5, 5, N)
    batches = list(tail)
    assert [len(b.object_id) for b in batches] == [4, 2]
    ids = np.concatenate([b.object_id for b in batches])
    assert ids.tolist() == table["object_id"][5:].tolist()
    g = np.concatenate([b.modalities[G].values for b in batches])
    np.testing.assert_array_equal(g, np.asarray(table["FLUX_G"])[5:])
    assert [b.object_id.tolist() for b in full.from_row(8)] == [table["object_id"][8:].tolist()]
    assert list(full.from_row(N)) == []
    with pytest.raises(ValueError, match="outside"):
        full.from_row(N + 1)
    no_ids = tmp_path / "noid.ecsv"
    Table({"FLUX_G": np.arange(6.0)}).write(no_ids)
    assert next(iter(iter_fits_table(no_ids, batch_size=4, start=3))).object_id.tolist() == [3, 4, 5]


def test_mmu_reader_starts_at_a_row_without_reading_earlier_rows(setup, monkeypatch):
    from aion.data.mmu import SurveyShards
    from aion.mock.universe import MockConfig, generate

    tmp, _, _ = setup
    data = tmp / "mock"
    generate(data, MockConfig(n=20, seed=0, image_size=16, hsc_image_size=16), progress=False)
    full = list(iter_objects(data, ["legacysurvey", "provabgs"], batch_size=6))
    read: list[int] = []
    original = SurveyShards.read_rows

    def spy(self, rows, *args, **kwargs):
        if self.survey == "legacysurvey":
            read.extend(np.asarray(rows).tolist())
        return original(self, rows, *args, **kwargs)

    monkeypatch.setattr(SurveyShards, "read_rows", spy)
    stream = iter_objects(data, ["legacysurvey", "provabgs"], batch_size=6, start=12)
    tail = list(stream)
    assert (len(stream), stream.start) == (8, 12) and [len(b.object_id) for b in tail] == [6, 2]
    assert min(read) == 12
    for got, want in zip(tail, full[2:], strict=True):
        assert got.object_id.tolist() == want.object_id.tolist() and list(got.modalities) == list(want.modalities)
        for name in want.modalities:
            if name.startswith(("legacysurvey_flux", "provabgs")):
                np.testing.assert_array_equal(got.modalities[name].values, want.modalities[name].values)


def test_parts_round_trip_without_pickles(tmp_path):
    assert aligned_chunk_size(5, 2) == 6 and aligned_chunk_size(4, 2) == 4
    cols = {"object_id": np.array(["a", "bb"], dtype=object), "x": np.arange(6, dtype=np.float32).reshape(2, 3),
            "error": ["", "bad"], "columns": np.zeros(2)}
    save_part(tmp_path / "p.npz", cols)
    got = load_part(tmp_path / "p.npz")
    assert list(got) == list(cols) and got["object_id"].tolist() == ["a", "bb"]
    assert got["x"].dtype == np.float32 and got["error"].tolist() == ["", "bad"]
    save_part(tmp_path / "e.npz", {"object_id": np.zeros(0, np.int64), "error": []})
    assert load_part(tmp_path / "e.npz")["error"].shape == (0,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz", "p.npz"]


# ---------------------------------------------------------------------------- generate
@pytest.mark.parametrize("suffix", [".parquet", ".fits"])
def test_generate_scalar_is_seeded(setup, suffix):
    tmp, common, table = setup
    args = ["generate", *common, "--target", G, "--num-samples", "3"]
    outs = [tmp / f"gen_{i}{suffix}" for i in range(3)]
    assert main([*args, "--out", str(outs[0])]) == 0
    assert main([*args, "--out", str(outs[1])]) == 0
    assert main([*args, "--out", str(outs[2]), "--seed", "1"]) == 0
    a, b, c = (_read(o) for o in outs)
    assert a["object_id"].tolist() == table["object_id"].tolist()
    assert a["tokens"].shape == (N, 3, 1) and a["tokens"].dtype.newbyteorder("=") == np.int32
    assert a["value"].shape == (N, 3) and a["value"].dtype.newbyteorder("=") == np.float64
    good = np.arange(N) != BAD
    assert (a["tokens"][good] >= 0).all() and (a["tokens"][BAD] == -1).all()
    assert np.isfinite(a["value"][good]).all() and np.isnan(a["value"][BAD]).all()
    assert a["error"][BAD] and a["error"][0] == ""
    assert a[f"tokens_used_{G}"].tolist() == [0] * N  # the target is never read
    assert a[f"tokens_used_{R}"].tolist() == [0 if i == BAD else 1 for i in range(N)]
    assert _same(a, b)
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert read_metadata(outs[0], ["aion_target", "aion_seed"]) == {"aion_target": G, "aion_seed": "0"}
    assert not parts_dir(outs[0]).exists()


def test_generate_spectrum_and_image(setup):
    tmp, common, _ = setup
    out = tmp / "spec.parquet"
    assert main(["generate", *common, "--target", SPEC, "--num-samples", "2", "--steps", "4", "--out", str(out)]) == 0
    got = _read(out)
    assert got["tokens"].shape == (N, 2, 65) and got["flux"].shape == (N, 2, 512) and got["flux"].dtype == np.float32
    good = np.arange(N) != BAD
    assert np.isfinite(got["flux"][good]).all() and np.isnan(got["flux"][BAD]).all()
    meta = read_metadata(out)
    wave = float(meta["wavelength_start"]) + float(meta["wavelength_step"]) * np.arange(int(meta["wavelength_n"]))
    np.testing.assert_allclose(wave, 4000.0 + 4.0 * np.arange(512))
    out = tmp / "img.fits"
    assert main(["generate", *common, "--target", IMG, "--temperature", "0", "--out", str(out)]) == 0
    got = _read(out)
    assert got["image"].shape == (N, 1, 4, 8, 8) and got["tokens"].shape == (N, 1, 16)
    assert np.isfinite(got["image"][good]).all() and np.isnan(got["image"][BAD]).all()
    assert read_metadata(out, ["bands"])["bands"] == "des-g,des-r,des-i,des-z"


# ---------------------------------------------------------------------------- resume
def _interrupt_after(monkeypatch, calls: int, exc: BaseException) -> list[int]:
    """Make AionModel.tokenize raise ``exc`` on call number ``calls + 1``; returns the batch sizes seen."""
    seen: list[int] = []
    original = AionModel.tokenize

    def flaky(self, objects, errors=None):
        if len(seen) == calls:
            raise exc
        seen.append(len(next(iter(objects.values()))))
        return original(self, objects, errors)

    monkeypatch.setattr(AionModel, "tokenize", flaky)
    return seen


@pytest.mark.parametrize(("command", "exc"), [(["generate", "--target", SPEC, "--num-samples", "2", "--steps", "3"],
                                               KeyboardInterrupt()),
                                              (["embed"], RuntimeError("boom"))])
def test_interrupted_run_resumes_to_the_uninterrupted_output(setup, monkeypatch, capsys, command, exc):
    tmp, common, _ = setup
    ref, out = tmp / f"ref_{command[0]}.parquet", tmp / f"res_{command[0]}.parquet"
    assert main([*command, *common, "--out", str(ref)]) == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, 5, exc)  # batches of 2, parts of 4: two parts done, the third begun
        with pytest.raises(SystemExit if isinstance(exc, KeyboardInterrupt) else RuntimeError):
            main([*command, *common, "--out", str(out)])
    assert "rerun the same command to resume from object 8" in capsys.readouterr().err
    parts = parts_dir(out)
    assert not out.exists() and sorted(p.name for p in parts.iterdir()) == [
        "manifest.json", "part_000000.npz", "part_000001.npz"]
    assert json.loads((parts / "manifest.json").read_text())["fingerprint"]["n_objects"] == N
    with monkeypatch.context() as m:
        seen = _interrupt_after(m, 99, RuntimeError("unused"))
        assert main([*command, *common, "--out", str(out)]) == 0
    assert seen == [2, 1]  # only rows 8-10 went through the model
    assert "resumed at object 8" in capsys.readouterr().out
    assert not parts.exists()
    assert _same(_read(out), _read(ref))
    assert out.read_bytes() == ref.read_bytes()


def test_fingerprint_mismatch_and_restart(setup, monkeypatch):
    tmp, common, _ = setup
    args = ["generate", *common, "--target", G]
    out = tmp / "fp.fits"
    with monkeypatch.context() as m:
        _interrupt_after(m, 3, RuntimeError("boom"))
        with pytest.raises(RuntimeError):
            main([*args, "--out", str(out)])
    assert (parts_dir(out) / "part_000000.npz").is_file()
    with pytest.raises(SystemExit, match=r"different run \(seed: 0 -> 1\).*--restart"):
        main([*args, "--seed", "1", "--out", str(out)])
    with pytest.raises(SystemExit, match="batch_size: 2 -> 4"):
        main([*args, "--batch-size", "4", "--out", str(out)])
    assert main([*args, "--seed", "1", "--restart", "--out", str(out)]) == 0
    assert not parts_dir(out).exists()
    fresh = tmp / "fp_fresh.fits"
    assert main([*args, "--seed", "1", "--out", str(fresh)]) == 0
    assert _same(_read(out), _read(fresh))


def _wrong_band_objects(n: int = 4):
    """Objects whose Legacy image carries HSC bands (which the image tokenizer was not trained on);
    object 2 has no image at all, so it is not affected."""
    from aion.data.batches import ImageBatch

    rng = np.random.default_rng(3)
    flux = rng.normal(size=(n, 4, 8, 8)).astype(np.float32)
    valid = np.ones(flux.shape, dtype=bool)
    valid[2] = False
    image = ImageBatch(flux=flux, ivar=np.ones_like(flux), valid=valid, bands=("hsc-g", "hsc-r", "hsc-i", "hsc-z"),
                       pixel_scale=0.168, psf_fwhm=np.ones((n, 4), np.float32), zero_point=27.0)
    return {G: ScalarBatch(name=G, values=rng.lognormal(size=n)), IMG: image}


def test_a_modality_the_tokenizer_rejects_fails_its_objects_not_the_batch(setup, monkeypatch):
    from aion.inference.io import ObjectBatch, ObjectStream

    tmp, common, _ = setup
    am = AionModel.from_pretrained(tmp / "model", tmp / "tokenizers")
    objects = _wrong_band_objects()
    with pytest.raises(ValueError, match="legacysurvey_image.*hsc-g"):
        am.tokenize(objects)
    failed: dict[int, str] = {}
    tokens, present = am.tokenize(objects, errors=failed)
    assert sorted(failed) == [0, 1, 3] and all("legacysurvey_image" in m and "band" in m for m in failed.values())
    assert not present[IMG].any() and present[G].all()

    ids = np.array([10, 11, 12, 13])
    monkeypatch.setattr("aion.cli._inference_inputs",
                        lambda args, names: ObjectStream(4, iter([ObjectBatch(ids, objects)])))
    out = tmp / "wrong_bands.parquet"
    assert main(["embed", *common, "--out", str(out), "--restart"]) == 0
    t = pq.read_table(out)
    errors = t["error"].to_pylist()
    emb = np.array(t["embedding"].to_pylist())
    assert [bool(e) for e in errors] == [True, True, False, True] and "hsc-g" in errors[0]
    assert np.isnan(emb[[0, 1, 3]]).all() and np.isfinite(emb[2]).all()

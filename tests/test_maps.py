"""``aion map``: projections, regions, coloured maps and the cutout gallery, on tiny synthetic data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from aion.cli import main
from aion.data.mmu import MMUShardWriter, shard_path
from aion.discovery.cutouts import Stretch, read_cutouts, shared_stretch, to_rgb
from aion.discovery.map_plots import is_categorical, plot_column
from aion.discovery.maps import MapConfig, find_regions, project, run_map
from aion.inference.io import TableWriter

BANDS = [b"des-g", b"des-r", b"des-i", b"des-z"]


def two_clusters(n_per: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centre = np.zeros(dim)
    centre[0] = 40.0
    x = np.concatenate([rng.normal(0, 1, (n_per, dim)), rng.normal(0, 1, (n_per, dim)) + centre])
    return x.astype(np.float32), np.repeat([0, 1], n_per)


# ------------------------------------------------------------------------------ projection
def test_pca_recovers_the_plane_of_planar_data():
    rng = np.random.default_rng(1)
    latent = rng.normal(0, 1, (300, 2)) * [5.0, 2.0]
    basis = np.linalg.qr(rng.normal(size=(10, 2)))[0].T  # two orthonormal 10-D directions
    x = latent @ basis + rng.normal(0, 1, 10) * 3  # an offset plane, no noise
    coords = project(x, "pca")
    assert coords.shape == (300, 2) and coords.dtype == np.float32
    # the map is the latent plane up to rotation/reflection: distances between objects survive
    d_latent = np.linalg.norm(latent[:50, None] - latent[None, :50], axis=-1)
    d_map = np.linalg.norm(coords[:50, None] - coords[None, :50], axis=-1)
    np.testing.assert_allclose(d_map, d_latent, atol=1e-3)
    # first axis carries the larger spread, and the result does not depend on the SVD's signs
    assert coords[:, 0].var() > coords[:, 1].var()
    np.testing.assert_array_equal(project(x, "pca"), coords)


def test_tsne_separates_two_far_clusters_and_regions_find_them():
    x, truth = two_clusters(60, 64)  # D > 50: the PCA-to-50 path is taken first
    coords = project(x, "tsne", seed=0)
    regions = find_regions(coords, n_regions=2, per_region=3, seed=0)
    agree = (regions.labels == truth).mean()
    assert max(agree, 1 - agree) == 1.0
    assert sorted(regions.sizes.tolist()) == [60, 60]


def test_tsne_is_deterministic_for_a_seed():
    x, _ = two_clusters(30, 8, seed=3)
    a = project(x, "tsne", seed=5)
    np.testing.assert_array_equal(a, project(x, "tsne", seed=5))
    # the PCA start leaves little to chance; from a random start the seed must reach t-SNE
    r5 = project(x, "tsne", seed=5, init="random")
    np.testing.assert_array_equal(r5, project(x, "tsne", seed=5, init="random"))
    assert not np.allclose(r5, project(x, "tsne", seed=6, init="random"))


def test_tsne_perplexity_is_capped_below_small_n_and_explicit_values_checked():
    x, _ = two_clusters(5, 4)
    assert project(x, "tsne", seed=0).shape == (10, 2)  # default perplexity 30 would exceed N
    with pytest.raises(ValueError, match="perplexity"):
        project(x, "tsne", seed=0, perplexity=10)


def test_umap_without_the_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError, installed or not
    with pytest.raises(ImportError, match=r"pip install 'aion-astro\[umap\]'"):
        project(np.zeros((10, 3)), "umap")


def test_project_rejects_bad_input():
    with pytest.raises(ValueError, match="--method"):
        project(np.zeros((10, 3)), "mds")
    with pytest.raises(ValueError, match="NaN"):
        project(np.full((10, 3), np.nan), "pca")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        project(np.zeros((10, 1)), "pca")


def test_regions_are_numbered_by_size_and_examples_are_nearest_the_centre():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0]])
    sizes = [10, 50, 25]
    coords = np.concatenate([c + rng.normal(0, 1, (s, 2)) for c, s in zip(centres, sizes, strict=True)])
    reg = find_regions(coords, n_regions=3, per_region=4, seed=0)
    assert reg.sizes.tolist() == [50, 25, 10]
    for k in range(3):
        members = np.flatnonzero(reg.labels == k)
        dist = np.linalg.norm(coords[members] - reg.centres[k], axis=1)
        np.testing.assert_array_equal(reg.examples[k], members[np.argsort(dist)[:4]])
    np.testing.assert_allclose(reg.centres[0], coords[10:60].mean(axis=0))
    with pytest.raises(ValueError, match="--regions"):
        find_regions(coords, n_regions=200)


# ------------------------------------------------------------------------------ colouring
def test_column_map_limits_and_nan_counts(tmp_path):
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(200, 2))
    values = np.linspace(0, 1, 200)
    values[:7] = np.nan
    shown = plot_column(coords, values, "Z", tmp_path / "z.png")
    assert (shown.coloured, shown.missing) == (193, 7)
    np.testing.assert_allclose(shown.limits, np.percentile(values[7:], [1, 99]))
    assert (tmp_path / "z.png").stat().st_size > 1000
    flag = (rng.random(200) < 0.3).astype(float)
    flag[0] = np.nan
    shown = plot_column(coords, flag, "QUENCHED", tmp_path / "q.png")
    assert shown.categories == (0.0, 1.0) and shown.missing == 1 and shown.limits is None
    assert not is_categorical(values) and is_categorical(np.array([1.0, 2.0, np.nan, 3.0]))


# ------------------------------------------------------------------------------ cutouts
def write_legacy(root: Path, ids: np.ndarray, images: np.ndarray, healpix: int, masks: np.ndarray | None = None,
                 bands: np.ndarray | None = None) -> None:
    n = len(ids)
    with MMUShardWriter(shard_path(root, "legacysurvey", "mock", healpix)) as w:
        w.append({
            "object_id": ids.astype(np.int64), "ra": np.zeros(n), "dec": np.zeros(n),
            "healpix": np.full(n, healpix, dtype=np.int64), "image_array": images.astype(np.float32),
            "image_ivar": np.ones_like(images, dtype=np.float32),
            "image_mask": np.ones(images.shape, bool) if masks is None else masks,
            "image_band": np.tile(np.array(BANDS, dtype="S8"), (n, 1)) if bands is None else bands,
            "image_psf_fwhm": np.ones((n, 4), np.float32), "image_scale": np.full((n, 4), 0.262, np.float32),
        })


def coded_images(ids: np.ndarray, size: int = 8) -> np.ndarray:
    """Band b of object i is filled with i * 10 + b: every plane says whose and which band it is."""
    planes = ids[:, None].astype(np.float64) * 10 + np.arange(4)[None, :]
    return np.broadcast_to(planes[:, :, None, None], (len(ids), 4, size, size)).copy()


def test_read_cutouts_finds_objects_by_id_across_shards(tmp_path):
    write_legacy(tmp_path, np.array([5, 3, 9]), coded_images(np.array([5, 3, 9])), healpix=1)
    masks = np.ones((2, 4, 8, 8), bool)
    masks[0, 0, :2] = False  # two rows of object 7's g plane are bad
    bands = np.tile(np.array(BANDS, dtype="S8"), (2, 1))
    bands[1] = bands[1][[3, 2, 1, 0]]  # object 8 stores z,i,r,g
    imgs = coded_images(np.array([7, 8]))
    imgs[1] = imgs[1][[3, 2, 1, 0]]
    write_legacy(tmp_path, np.array([7, 8]), imgs, healpix=2, masks=masks, bands=bands)
    cut = read_cutouts(tmp_path, "legacysurvey", np.array([8, 42, 3, 7]))
    assert cut.ids.tolist() == [8, 3, 7] and cut.missing.tolist() == [42]
    assert cut.bands == ("des-g", "des-r", "des-z")
    for row, oid in enumerate([8, 3, 7]):  # (blue, green, red) = g, r, z = planes 0, 1, 3 of the code
        expect = [oid * 10 + 0, oid * 10 + 1, oid * 10 + 3]
        assert cut.images[row, :, 4, 4].tolist() == expect
    assert (cut.images[2, 0, :2] == 0).all() and (cut.images[2, 0, 2:] == 70).all()


def test_rgb_colour_follows_the_band_with_flux():
    img = np.zeros((2, 3, 9, 9))
    img[0, 0, 3:6, 3:6] = 5.0  # only g: should look blue
    img[1, 2, 3:6, 3:6] = 5.0  # only z: should look red
    stretch = shared_stretch(img)
    blue, red = to_rgb(img[0], stretch)[4, 4], to_rgb(img[1], stretch)[4, 4]
    assert blue[2] > 0.3 and blue[0] == 0 and blue[1] == 0
    assert red[0] > 0.3 and red[1] == 0 and red[2] == 0
    assert (to_rgb(img[0], stretch)[0, 0] == 0).all()  # empty sky is black
    grey = to_rgb(np.full((3, 2, 2), 1.0), Stretch(0.1, 1.0))
    assert np.allclose(grey, grey[..., :1]) and (grey <= 1).all()
    with pytest.raises(ValueError, match="blue, green, red"):
        to_rgb(np.zeros((4, 2, 2)), stretch)


# ------------------------------------------------------------------------------ the whole command
@pytest.fixture()
def world(tmp_path):
    """An embedding table of 40 objects (one failed) in two clusters, a catalogue and Legacy cutouts."""
    x, truth = two_clusters(20, 6, seed=2)
    ids = np.arange(1000, 1040, dtype=np.int64)
    errors = np.array([""] * 40, dtype=object)
    errors[5] = "no inputs"
    x[5] = np.nan
    emb = tmp_path / "emb.parquet"
    with TableWriter(emb) as w:
        w.append({"object_id": ids, "embedding": x, "error": errors.astype(str)})
    z = np.linspace(0.1, 1.0, 40)
    z[3] = np.nan
    cat_rows = np.arange(38)  # the last two objects have no catalogue row
    cat = tmp_path / "cat.parquet"
    with TableWriter(cat) as w:
        w.append({"object_id": ids[cat_rows], "Z": z[cat_rows], "QUENCHED": truth[cat_rows].astype(np.int64)})
    have = np.setdiff1d(np.arange(40), [0, 20])  # two objects have no cutout
    rng = np.random.default_rng(0)
    write_legacy(tmp_path / "data", ids[have], rng.normal(0, 0.01, (len(have), 4, 8, 8)), healpix=4)
    return {"emb": emb, "cat": cat, "data": tmp_path / "data", "ids": ids, "truth": truth}


def test_cli_writes_coordinates_maps_regions_gallery_and_index(world, tmp_path, capsys):
    out = tmp_path / "map"
    assert main(["map", "--embeddings", str(world["emb"]), "--catalogue", str(world["cat"]),
                 "--color", "Z,QUENCHED", "--method", "pca", "--regions", "2", "--per-region", "20",
                 "--data", str(world["data"]), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    table = pq.read_table(out / "coords.parquet")
    assert table.column_names == ["object_id", "x", "y", "region"]
    ids = table.column("object_id").to_numpy()
    expect = np.delete(world["ids"], 5)  # the failed row is left out
    np.testing.assert_array_equal(ids, expect)
    region = table.column("region").to_numpy()
    truth = np.delete(world["truth"], 5)
    assert max((region == truth).mean(), (region != truth).mean()) == 1.0
    for name in ("map_Z.png", "map_QUENCHED.png", "regions.png", "gallery.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 2000
    index = (out / "index.md").read_text()
    for name in ("map_Z.png", "map_QUENCHED.png", "regions.png", "gallery.png", "coords.parquet"):
        assert f"]({name})" in index
    assert "Z: 36 objects coloured, 3 without a value" in index  # one NaN, two without a catalogue row
    assert "2 of 39 objects have no row" in printed
    assert "2 of 39 gallery objects are not in" in printed  # 1000 and 1020 have no cutout (1005 failed)
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_max_objects_takes_a_seeded_subset_and_says_so(world, tmp_path):
    logs = []
    a = run_map(world["emb"], tmp_path / "a", MapConfig(method="pca", regions=2, max_objects=25, seed=1),
                progress=False, log=logs.append)
    b = run_map(world["emb"], tmp_path / "b", MapConfig(method="pca", regions=2, max_objects=25, seed=1),
                progress=False, log=lambda _: None)
    assert len(a.ids) == 25 and a.n_usable == 39
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.coords, b.coords)
    assert any("random subset of 25 of 39" in line for line in logs)
    assert pq.read_table(tmp_path / "a" / "coords.parquet").num_rows == 25


def test_cli_errors_name_the_problem(world, tmp_path):
    base = ["map", "--embeddings", str(world["emb"]), "--out", str(tmp_path / "e"), "--quiet", "--method", "pca"]
    with pytest.raises(SystemExit, match=r"NOPE.*QUENCHED"):
        main([*base, "--catalogue", str(world["cat"]), "--color", "Z,NOPE"])
    with pytest.raises(SystemExit, match="--color needs --catalogue"):
        main([*base, "--color", "Z"])
    with pytest.raises(SystemExit, match="--survey"):
        main([*base, "--data", str(world["data"]), "--survey", "desi"])
    with pytest.raises(SystemExit, match="--regions"):
        main([*base, "--regions", "100"])
    assert not (tmp_path / "e" / "coords.parquet").exists()

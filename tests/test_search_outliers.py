"""Exact chunked k-NN search, retrieval precision, outlier scores, and ``aion search`` / ``aion outliers``."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from aion.cli import main
from aion.discovery.outliers import (
    auroc,
    fit_standardizer,
    knn_density_score,
    percentile,
    rank_outliers,
)
from aion.discovery.search import NeighbourIndex, precision_at_k, precision_by_label
from aion.inference.io import TableWriter, read_metadata

torch.set_num_threads(1)


def brute_force(x: np.ndarray, q: np.ndarray, metric: str, k: int, exclude=None):
    """float64 full distance matrix, then (distance, row) order."""
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        xn = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
        qn = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        d = 1.0 - qn @ xn.T
    else:
        d = np.sqrt(((q64[:, None, :] - x64[None]) ** 2).sum(-1))
    if exclude is not None:
        d[np.arange(len(q)), exclude] = np.inf
    rows = np.argsort(d, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(d, rows, 1)


# ------------------------------------------------------------------------- exact search
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_rows,query_rows", [(37, 11), (4, 1), (1000, 1000)])
def test_search_equals_brute_force(metric, chunk_rows, query_rows):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(301, 8)).astype(np.float32)
    q = rng.normal(size=(53, 8)).astype(np.float32)
    ids = 1000 + 7 * np.arange(301)
    index = NeighbourIndex(x, ids, metric=metric, chunk_rows=chunk_rows, query_rows=query_rows)
    rows, dist = index.search(q, 10)
    want_rows, want_dist = brute_force(x, q, metric, 10)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(dist, want_dist, atol=2e-6)
    assert dist.dtype == np.float32 and rows.dtype == np.int64
    assert np.all(np.diff(dist, axis=1) >= 0)
    got_ids, got_dist = index.query(q, 10)
    np.testing.assert_array_equal(got_ids, ids[want_rows])
    np.testing.assert_array_equal(got_dist, dist)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_query_ids_leaves_self_out(metric):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    ids = rng.permutation(10_000)[:120]
    index = NeighbourIndex(x, ids, metric=metric, chunk_rows=16, query_rows=7)
    want_rows = np.array([5, 0, 119, 64, 5])  # a repeated query is answered twice
    got_ids, got_dist = index.query_ids(ids[want_rows], 6)
    rows, d = brute_force(x, x[want_rows], metric, 6, exclude=want_rows)
    np.testing.assert_array_equal(got_ids, ids[rows])
    np.testing.assert_allclose(got_dist, d, atol=2e-6)
    assert not np.any(got_ids == ids[want_rows][:, None])
    # the whole table against itself: nobody is its own neighbour, k = N - 1 is allowed
    all_ids, _ = index.query_ids(ids, 119)
    assert not np.any(all_ids == ids[:, None])
    assert all(len(set(r)) == 119 for r in all_ids.tolist())


def test_euclidean_exact_despite_a_large_common_offset():
    # |x|^2 ~ 8e6 here: without centring, float32 rounding of |q|^2 + |x|^2 - 2 q.x would be ~0.5 in d^2
    rng = np.random.default_rng(13)
    x = (rng.normal(size=(200, 8)) + 1000.0).astype(np.float32)
    index = NeighbourIndex(x, metric="euclidean", chunk_rows=64, query_rows=50)
    rows, dist = index.search_self(5)
    want_rows, want_dist = brute_force(x, x, "euclidean", 5, exclude=np.arange(200))
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-3)
    ids, d2 = index.query_ids(np.array([7, 3]), 5)
    np.testing.assert_array_equal(ids, want_rows[[7, 3]])
    np.testing.assert_allclose(d2, dist[[7, 3]], rtol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 5, 100])
def test_ties_broken_by_row_whatever_the_chunking(chunk_rows):
    # exact arithmetic: small integers (euclidean) and power-of-two multiples of one direction (cosine)
    x = np.array([[3, 0, 0], [1, 0, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]],
                 dtype=np.float32)
    q = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    eu = NeighbourIndex(x, metric="euclidean", chunk_rows=chunk_rows, query_rows=1)
    rows, dist = eu.search(q, 5)
    assert rows[0].tolist() == [1, 3, 5, 7, 4]  # four at distance 0 in row order, then distance 1
    np.testing.assert_array_equal(dist[0], [0, 0, 0, 0, 1])
    assert rows[1].tolist() == [2, 1, 3, 5, 6]  # distance 1 first, then five at sqrt(2) (rows 1 3 5 6 7)
    cos = NeighbourIndex(x, metric="cosine", chunk_rows=chunk_rows, query_rows=2)
    rows, dist = cos.search(q, 6)
    assert rows[0].tolist() == [0, 1, 3, 4, 5, 7]  # all six along x, in row order
    np.testing.assert_array_equal(dist[0], 0)
    assert rows[1, 0] == 2 and rows[1, 1:].tolist() == [0, 1, 3, 4, 5]  # orthogonal ties (distance 1) by row
    # exclusion inside a crowded chunk still keeps row order
    rows, _ = eu.search(q[:1], 3, exclude=np.array([3]))
    assert rows[0].tolist() == [1, 5, 7]


def test_search_errors():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    index = NeighbourIndex(x, np.arange(100, 120))
    with pytest.raises(KeyError, match=r"2 object id\(s\) are not in the index, e.g. \[7, 99\]"):
        index.query_ids([7, 100, 99], 3)
    with pytest.raises(ValueError, match="dimension 5 does not match the index dimension 4"):
        index.query(rng.normal(size=(2, 5)), 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, 19\]"):
        index.query_ids([100], 20)
    with pytest.raises(ValueError, match=r"k must be in \[1, 20\]"):
        index.query(x[:1], 21)
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"vectors: 1 row\(s\) hold NaN or inf \(first rows: \[4\]\)"):
        NeighbourIndex(bad)
    with pytest.raises(ValueError, match=r"ids: not unique \(repeated: \[3\]\)"):
        NeighbourIndex(x, np.r_[np.arange(19), 3])
    zero = x.copy()
    zero[2] = 0
    with pytest.raises(ValueError, match="zero vector"):
        NeighbourIndex(zero, metric="cosine")
    NeighbourIndex(zero, metric="euclidean")  # fine there
    with pytest.raises(ValueError, match="metric"):
        NeighbourIndex(x, metric="manhattan")


# ------------------------------------------------------------------------- precision
def clusters(n_per: int, n_clusters: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 10
    labels = np.repeat(np.arange(n_clusters), n_per)
    x = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    return x.astype(np.float32), labels


def test_precision_at_k_separated_clusters_and_random_labels():
    x, labels = clusters(100, 4, 6, 0.5, seed=4)
    index = NeighbourIndex(x, metric="euclidean", chunk_rows=64, query_rows=50)
    rows, _ = index.search(x, 10, exclude=np.arange(len(x)))
    assert precision_at_k(labels, labels[rows]) == 1.0
    # labels unrelated to the positions: precision falls to the chance level
    rng = np.random.default_rng(5)
    noise = rng.choice([0, 1], size=len(x), p=[0.7, 0.3])
    p = precision_at_k(noise, noise[rows])
    chance = 0.7**2 + 0.3**2
    assert abs(p - chance) < 0.04, (p, chance)
    per = precision_by_label(noise, noise[rows])
    assert [r.label for r in per] == [0, 1]  # most common first
    n1 = int(noise.sum())
    assert per[1].base_rate == pytest.approx((n1 - 1) / (len(x) - 1))
    assert per[1].n_queries == n1
    for r in per:
        assert abs(r.precision - r.base_rate) < 0.06, r
    assert precision_by_label(noise, noise[rows], queries_in_population=False)[1].base_rate == n1 / len(x)


def test_precision_hand_computed_and_errors():
    q = np.array([0, 1, 1])
    nb = np.array([[0, 0, 1], [1, 0, 0], [1, 1, 1]])
    assert precision_at_k(q, nb) == pytest.approx((2 / 3 + 1 / 3 + 1) / 3)
    assert precision_at_k(np.array([1.0]), np.array([[1.0, np.nan]])) == 0.5
    with pytest.raises(ValueError, match="NaN"):
        precision_at_k(np.array([np.nan]), np.array([[1.0]]))
    with pytest.raises(ValueError, match="shapes"):
        precision_at_k(q, nb[:2])


# ------------------------------------------------------------------------- outlier scores
def blob_with_outliers(n=400, dim=8, n_out=8, seed=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + n_out, dim))
    direction = rng.normal(size=(n_out, dim))
    x[n:] = 7.0 * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    labels = np.r_[np.zeros(n, int), np.ones(n_out, int)]
    return x.astype(np.float32), labels


def test_knn_score_finds_planted_outliers():
    x, labels = blob_with_outliers()
    score = knn_density_score(x, k=10, chunk_rows=50, query_rows=33)
    assert score.shape == (len(x),) and score.dtype == np.float64
    assert auroc(score, labels) == 1.0
    assert set(np.argsort(-score)[:8]) == set(np.nonzero(labels)[0])
    # the value is the mean distance to the 10 nearest others, in standardized units
    z = fit_standardizer(x, "robust")(x)
    _, d = brute_force(z, z, "euclidean", 10, exclude=np.arange(len(z)))
    np.testing.assert_allclose(score, d.mean(axis=1), rtol=1e-4)


def test_standardization_makes_a_loud_dimension_not_drown_the_rest():
    x, labels = blob_with_outliers(n=400, dim=6, n_out=8, seed=7)
    rng = np.random.default_rng(8)
    x = np.c_[x, 100.0 * rng.normal(size=(len(x), 3))]  # noisy, large-scale dimensions the outliers do not stand out in
    robust = auroc(knn_density_score(x, k=10, standardize="robust"), labels)
    raw = auroc(knn_density_score(x, k=10, standardize="none"), labels)
    assert robust > 0.97 and raw < 0.8, (robust, raw)


def test_standardizer_robust_to_the_outliers_themselves():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(1000, 2))
    x[:20, 0] = 1e6
    s = fit_standardizer(x, "robust")
    assert s.scale[0] == pytest.approx(1.0, abs=0.15) and abs(s.centre[0]) < 0.15
    assert fit_standardizer(x, "std").scale[0] > 1e4
    const = np.c_[x, np.full(len(x), 3.0)]
    with pytest.warns(UserWarning, match="1 constant dimension"):
        s = fit_standardizer(const, "robust")
    assert s.scale[2] == 1.0
    with pytest.raises(ValueError, match="standardize"):
        fit_standardizer(x, "minmax")


def test_auroc_percentile_and_ranking():
    assert auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="both present"):
        auroc([1, 2], [0, 0])
    np.testing.assert_allclose(percentile([3.0, 1.0, 2.0, 2.0]), [100, 25, 75, 75])
    ids = np.array([10, 11, 12, 13])
    t = rank_outliers(ids, {"knn": np.array([1.0, 5.0, 3.0, 5.0]), "flow": np.array([0.0, -1.0, np.inf, 2.0])},
                      "flow")
    assert list(t) == ["object_id", "rank", "knn_score", "knn_percentile", "flow_nll", "flow_percentile"]
    assert t["object_id"].tolist() == [12, 13, 10, 11] and t["rank"].tolist() == [1, 2, 3, 4]
    assert t["knn_score"].tolist() == [3.0, 5.0, 1.0, 5.0]
    assert rank_outliers(ids, {"knn": np.array([1.0, 5.0, 3.0, 5.0])}, "knn")["object_id"].tolist() == [11, 13, 12, 10]
    with pytest.raises(ValueError, match="'flow' was not computed"):
        rank_outliers(ids, {"knn": np.ones(4)}, "flow")
    with pytest.raises(ValueError, match=r"scores\['knn'\]: 1 NaN"):
        rank_outliers(ids, {"knn": np.array([1.0, np.nan, 0, 0])}, "knn")


# ------------------------------------------------------------------------- CLI
def write_embeddings(path, ids, vectors, failed=(), metadata=None):
    errors = ["model failed" if i in failed else "" for i in range(len(ids))]
    vectors = vectors.copy()
    vectors[list(failed)] = np.nan
    with TableWriter(path, metadata=metadata) as w:
        w.append({"object_id": np.asarray(ids, dtype=np.int64), "embedding": vectors.astype(np.float32),
                  "error": errors})


@pytest.fixture()
def table(tmp_path):
    x, labels = blob_with_outliers(n=200, dim=6, n_out=5, seed=10)
    ids = 5000 + np.arange(len(x))
    path = tmp_path / "emb.parquet"
    write_embeddings(path, ids, x, failed=(3,), metadata={"model": "runs/m1"})
    return path, ids, x, labels


def test_cli_search_by_ids_and_ids_file(table, tmp_path, capsys):
    path, ids, x, _ = table
    out = tmp_path / "nb.parquet"
    assert main(["search", "--embeddings", str(path), "--ids", "5000,5010", "--k", "4", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "1 row(s)" in printed and "5000:" in printed
    t = pq.read_table(out).to_pydict()
    assert t["object_id"] == [5000, 5010]
    keep = np.ones(len(ids), bool)
    keep[3] = False  # the failed row is not searchable
    rows, d = brute_force(x[keep], x[keep][[0, 9]], "cosine", 4, exclude=np.array([0, 9]))
    np.testing.assert_array_equal(np.array(t["neighbour_ids"]), ids[keep][rows])
    np.testing.assert_allclose(np.array(t["distances"]), d, atol=2e-6)
    assert read_metadata(out)["self_excluded"] == "true"

    id_file = tmp_path / "ids.txt"
    id_file.write_text("# queries\n5010\n\n5000  # first\n")
    out2 = tmp_path / "nb2.fits"
    assert main(["search", "--embeddings", str(path), "--ids-file", str(id_file), "--k", "4", "--metric", "euclidean",
                 "--out", str(out2), "--quiet", "--batch-size", "1", "--chunk-rows", "7"]) == 0
    from astropy.table import Table

    t2 = Table.read(out2)
    assert t2["object_id"].tolist() == [5010, 5000] and t2["neighbour_ids"].shape == (2, 4)
    rows, _ = brute_force(x[keep], x[keep][[9, 0]], "euclidean", 4, exclude=np.array([9, 0]))
    np.testing.assert_array_equal(np.asarray(t2["neighbour_ids"]), ids[keep][rows])


def test_cli_search_errors(table, tmp_path):
    path, ids, x, _ = table
    out = tmp_path / "nb.parquet"
    with pytest.raises(SystemExit, match=r"not in the index, e.g. \[5003, 1\].*1 failed row"):
        main(["search", "--embeddings", str(path), "--ids", "5003,1,5000", "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit, match="--ids: expected comma-separated integer"):
        main(["search", "--embeddings", str(path), "--ids", "5000,abc", "--out", str(out), "--quiet"])
    bad = tmp_path / "bad.txt"
    bad.write_text("5000\nfive\n")
    with pytest.raises(SystemExit, match="line 2"):
        main(["search", "--embeddings", str(path), "--ids-file", str(bad), "--out", str(out), "--quiet"])
    other_dim = tmp_path / "q5.parquet"
    write_embeddings(other_dim, [1, 2], np.ones((2, 5), np.float32))
    with pytest.raises(SystemExit, match="5-dim embeddings.*6-dim"):
        main(["search", "--embeddings", str(path), "--queries", str(other_dim), "--out", str(out), "--quiet"])
    other_model = tmp_path / "qm.parquet"
    write_embeddings(other_model, [1, 2], np.ones((2, 6), np.float32), metadata={"model": "runs/m2"})
    with pytest.raises(SystemExit, match="model: 'runs/m1' vs 'runs/m2'"):
        main(["search", "--embeddings", str(path), "--queries", str(other_model), "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit, match="--k must be >= 1"):
        main(["search", "--embeddings", str(path), "--ids", "5000", "--k", "0", "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit, match="--chunk-rows must be >= 1, got 0"):
        main(["search", "--embeddings", str(path), "--ids", "5000", "--chunk-rows", "0", "--out", str(out), "--quiet"])
    assert not out.exists()


def test_cli_search_new_data(table, tmp_path):
    path, ids, x, _ = table
    rng = np.random.default_rng(11)
    new = rng.normal(size=(6, 6)).astype(np.float32)
    qpath = tmp_path / "new.parquet"
    write_embeddings(qpath, 90 + np.arange(6), new, failed=(2,), metadata={"model": "runs/m1"})
    out = tmp_path / "nb.parquet"
    assert main(["search", "--embeddings", str(path), "--queries", str(qpath), "--k", "3", "--out", str(out),
                 "--quiet"]) == 0
    t = pq.read_table(out).to_pydict()
    assert t["object_id"] == [90, 91, 93, 94, 95]
    keep = np.ones(len(ids), bool)
    keep[3] = False
    rows, _ = brute_force(x[keep], new[[0, 1, 3, 4, 5]], "cosine", 3)
    np.testing.assert_array_equal(np.array(t["neighbour_ids"]), ids[keep][rows])
    assert read_metadata(out)["self_excluded"] == "false"


def test_cli_outliers_without_flow(table, tmp_path, capsys):
    path, ids, x, labels = table
    out = tmp_path / "ranked.parquet"
    assert main(["outliers", "--embeddings", str(path), "--k", "8", "--no-flow", "--top", "5", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "the 5 most outlying objects by knn" in printed
    t = pq.read_table(out).to_pydict()
    assert list(t) == ["object_id", "rank", "knn_score", "knn_percentile"]
    assert t["rank"] == list(range(1, len(ids)))  # the failed row is left out
    assert np.all(np.diff(t["knn_score"]) <= 0)
    assert set(t["object_id"][:5]) == set(ids[labels == 1])
    assert t["knn_percentile"][0] == 100.0
    assert read_metadata(out)["flow"] == "none"
    with pytest.raises(SystemExit, match="--rank-by flow needs the flow score"):
        main(["outliers", "--embeddings", str(path), "--no-flow", "--rank-by", "flow", "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit, match="--flow-steps"):
        main(["outliers", "--embeddings", str(path), "--no-flow", "--flow-steps", "3", "--out", str(out), "--quiet"])


def test_cli_outliers_with_flow(table, tmp_path):
    from aion.discovery.flow import ConditionalFlow

    path, ids, x, labels = table
    out, flow_dir = tmp_path / "ranked.parquet", tmp_path / "flow"
    assert main(["outliers", "--embeddings", str(path), "--k", "8", "--flow-steps", "40", "--seed", "3",
                 "--save-flow", str(flow_dir), "--flow-ode-steps", "8", "--rank-by", "flow", "--out", str(out),
                 "--quiet"]) == 0
    t = pq.read_table(out).to_pydict()
    assert list(t) == ["object_id", "rank", "knn_score", "knn_percentile", "flow_nll", "flow_percentile"]
    assert np.all(np.diff(t["flow_nll"]) <= 0) and t["flow_percentile"][0] == 100.0
    # the column is the saved flow's negative log-likelihood of each object
    keep = np.ones(len(ids), bool)
    keep[3] = False
    nll = -ConditionalFlow.load(flow_dir).log_prob(x[keep], ode_steps=8)
    by_id = dict(zip(ids[keep].tolist(), nll.tolist(), strict=True))
    np.testing.assert_allclose(t["flow_nll"], [by_id[i] for i in t["object_id"]], rtol=1e-5)
    # planted outliers are improbable even under a briefly trained flow
    is_out = np.isin(t["object_id"], ids[labels == 1]).astype(int)
    assert auroc(t["flow_nll"], is_out) > 0.95
    assert read_metadata(out)["flow"] == "fitted here (seed 3, 40 steps)"
    # a saved flow scores the same; one of another dimension is refused
    out2 = tmp_path / "ranked2.parquet"
    assert main(["outliers", "--embeddings", str(path), "--flow", str(flow_dir), "--flow-ode-steps", "8", "--out",
                 str(out2), "--quiet"]) == 0
    t2 = pq.read_table(out2).to_pydict()
    assert np.all(np.diff(t2["knn_score"]) <= 0)  # --rank-by knn is the default
    np.testing.assert_allclose(sorted(t2["flow_nll"]), sorted(t["flow_nll"]), rtol=1e-6)
    narrow = tmp_path / "narrow.parquet"
    write_embeddings(narrow, [1, 2, 3], np.random.default_rng(12).normal(size=(3, 5)).astype(np.float32))
    with pytest.raises(SystemExit, match="the flow models 6-dim vectors"):
        main(["outliers", "--embeddings", str(narrow), "--k", "1", "--flow", str(flow_dir), "--out", str(out2),
              "--quiet"])

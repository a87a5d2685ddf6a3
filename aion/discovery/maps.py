"""``aion map``: a 2-D picture of an embedding table, coloured by catalogue columns.

A projection (t-SNE by default, UMAP when installed, PCA for a quick linear look) places
similar objects near each other; colouring it by a physical column shows what the embedding
has organised itself around. k-means on the 2-D map cuts it into regions, and the objects
nearest each region's centre become a cutout gallery: the fastest way to see what a region *is*.
Everything is seeded, so one seed gives one map.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike

METHODS = ("tsne", "umap", "pca")
METHOD_LABELS = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}
TSNE_MAX_INPUT_DIM = 50
"""Inputs wider than this are reduced by PCA first: t-SNE's neighbours barely change and it runs faster."""
UMAP_HINT = "pip install 'aion-astro[umap]'"


# ------------------------------------------------------------------------------ projection
def pca_reduce(vectors: np.ndarray, k: int) -> np.ndarray:
    """Scores on the first ``k`` principal axes (numpy SVD), each axis's sign fixed so the result is unique."""
    x = np.asarray(vectors, dtype=np.float64)
    centred = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(k, vt.shape[0])
    signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return u[:, :k] * (s[:k] * signs)[None, :]


def _tsne(x: np.ndarray, seed: int, perplexity: float | None = None, **opts: Any) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = x.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 objects, got {n}")
    if perplexity is None:
        perplexity = min(30.0, (n - 1) / 3.0)  # t-SNE looks at 3 x perplexity neighbours
    elif not 0 < perplexity < n:
        raise ValueError(f"perplexity must be in (0, {n}) for {n} objects, got {perplexity}")
    if x.shape[1] > TSNE_MAX_INPUT_DIM:
        x = pca_reduce(x, TSNE_MAX_INPUT_DIM)
    params = {"n_components": 2, "perplexity": float(perplexity), "init": "pca", "learning_rate": "auto",
              "random_state": seed, **opts}
    return TSNE(**params).fit_transform(np.ascontiguousarray(x, dtype=np.float32))


def _umap(x: np.ndarray, seed: int, **opts: Any) -> np.ndarray:
    try:
        import umap
    except ImportError as err:
        raise ImportError(f"method 'umap' needs the optional umap-learn package: {UMAP_HINT}") from err
    params = {"n_components": 2, "random_state": seed, **opts}  # a random_state makes UMAP single-threaded
    return umap.UMAP(**params).fit_transform(np.ascontiguousarray(x, dtype=np.float32))


def project(vectors: np.ndarray, method: str = "tsne", seed: int = 0, **opts: Any) -> np.ndarray:
    """(N, D) vectors -> (N, 2) float32 map coordinates; ``opts`` go to the method (e.g. ``perplexity``)."""
    x = np.asarray(vectors)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vectors: expected a non-empty (N, D) array, got shape {x.shape}")
    if x.shape[1] < 2:
        raise ValueError(f"vectors: a 2-D map needs at least 2 dimensions, got D={x.shape[1]}")
    if not np.isfinite(x).all():
        raise ValueError("vectors: contain NaN or infinite values")
    if method == "pca":
        if opts:
            raise ValueError(f"method 'pca' takes no options, got {sorted(opts)}")
        coords = pca_reduce(x, 2)
    elif method == "tsne":
        coords = _tsne(x, seed, **opts)
    elif method == "umap":
        coords = _umap(x, seed, **opts)
    else:
        raise ValueError(f"--method: expected one of {list(METHODS)}, got {method!r}")
    return np.asarray(coords, dtype=np.float32)


# ------------------------------------------------------------------------------ regions
@dataclass
class Regions:
    """k-means regions of a map, numbered by size (region 0 is the largest)."""

    labels: np.ndarray
    """(N,) int64 region of each object."""
    centres: np.ndarray
    """(K, 2) region centres in map coordinates."""
    sizes: np.ndarray
    """(K,) objects per region."""
    examples: list[np.ndarray]
    """Per region, the row indices of its objects nearest the centre (nearest first)."""


def find_regions(coords: np.ndarray, n_regions: int = 8, per_region: int = 6, seed: int = 0,
                 n_init: int = 10) -> Regions:
    """Cut a 2-D map into ``n_regions`` k-means groups and pick each group's most central objects."""
    from sklearn.cluster import KMeans

    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords: expected (N, 2) map coordinates, got shape {coords.shape}")
    if not 1 <= n_regions <= coords.shape[0]:
        raise ValueError(f"--regions must be between 1 and the number of objects ({coords.shape[0]}), got {n_regions}")
    if per_region < 1:
        raise ValueError(f"--per-region must be >= 1, got {per_region}")
    km = KMeans(n_clusters=n_regions, n_init=n_init, random_state=seed).fit(coords)
    raw = km.labels_.astype(np.int64)
    counts = np.bincount(raw, minlength=n_regions)
    order = np.lexsort((np.arange(n_regions), -counts))  # largest first, ties by k-means label
    relabel = np.empty(n_regions, dtype=np.int64)
    relabel[order] = np.arange(n_regions)
    labels = relabel[raw]
    centres = km.cluster_centers_[order]
    examples = []
    for k in range(n_regions):
        members = np.flatnonzero(labels == k)
        dist = np.linalg.norm(coords[members] - centres[k], axis=1)
        examples.append(members[np.argsort(dist, kind="stable")[:per_region]])
    return Regions(labels=labels, centres=centres, sizes=counts[order], examples=examples)


# ------------------------------------------------------------------------------ the whole tool
@dataclass
class MapConfig:
    method: str = "tsne"
    colors: tuple[str, ...] = ()
    """Catalogue columns to colour by (one PNG each); needs ``catalogue``."""
    catalogue: Path | None = None
    data: Path | None = None
    """MMU root holding ``survey``: when given, a cutout gallery of each region's central objects."""
    survey: str = "legacysurvey"
    regions: int = 8
    per_region: int = 6
    max_objects: int | None = 20000
    """A seeded random subset when the table has more usable rows (None: all)."""
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MapResult:
    out: Path
    ids: np.ndarray
    coords: np.ndarray
    regions: Regions
    n_usable: int
    """Usable rows of the table before any subset."""
    dropped: int
    files: list[Path]
    columns: dict[str, Any] = field(default_factory=dict)
    """Per colour column, what its map shows (:class:`aion.discovery.map_plots.ColumnMap`)."""
    missing_cutouts: int = 0


def _check_config(cfg: MapConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"--method: expected one of {list(METHODS)}, got {cfg.method!r}")
    if cfg.colors and cfg.catalogue is None:
        raise ValueError("--color needs --catalogue (the table holding those columns)")
    if cfg.max_objects is not None and cfg.max_objects < 1:
        raise ValueError(f"--max-objects must be >= 1, got {cfg.max_objects}")
    if cfg.regions < 1:
        raise ValueError(f"--regions must be >= 1, got {cfg.regions}")
    if cfg.per_region < 1:
        raise ValueError(f"--per-region must be >= 1, got {cfg.per_region}")
    if cfg.data is not None:
        from aion.discovery.cutouts import rgb_bands

        rgb_bands(cfg.survey)
        if not (Path(cfg.data) / cfg.survey).is_dir():
            raise FileNotFoundError(f"--data: no {cfg.survey!r} survey folder in {cfg.data}")


def _catalogue_values(ids: np.ndarray, cfg: MapConfig, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    from aion.discovery.tables import join_table

    if not cfg.colors:
        return {}
    values, known = join_table(ids, cfg.catalogue, cfg.colors)  # unknown column: KeyError listing the table's
    if not known.any():
        raise ValueError(f"--catalogue: none of the {len(ids)} object ids is in {cfg.catalogue}; "
                         "is it the catalogue of these embeddings?")
    if not known.all():
        log(f"{int((~known).sum())} of {len(ids)} objects have no row in {cfg.catalogue} (drawn grey)")
    return values


def run_map(embeddings: PathLike, out: PathLike, cfg: MapConfig | None = None, *, progress: bool = True,
            log: Callable[[str], None] = print) -> MapResult:
    """Project an ``aion embed`` table, find regions, and write coords.parquet, PNGs and index.md into ``out``."""
    from tqdm.auto import tqdm

    from aion.discovery import map_plots
    from aion.discovery.tables import load_embeddings
    from aion.evaluation.report import write_text_atomic
    from aion.inference.io import TableWriter

    cfg = cfg or MapConfig()
    _check_config(cfg)
    out = Path(out)
    emb = load_embeddings(embeddings)
    if emb.dropped:
        log(f"{emb.dropped} rows of {embeddings} have no usable embedding and are left out")
    n_usable = len(emb)
    if cfg.max_objects is not None and n_usable > cfg.max_objects:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(n_usable, cfg.max_objects, replace=False))
        emb = emb.select(rows)
        log(f"mapping a random subset of {cfg.max_objects} of {n_usable} objects "
            f"(--max-objects {cfg.max_objects}, --seed {cfg.seed})")
    values = _catalogue_values(emb.ids, cfg, log)  # before the projection: a bad column fails fast
    if cfg.regions > len(emb):
        raise ValueError(f"--regions {cfg.regions} is more than the {len(emb)} objects mapped")

    steps = 2 + len(values) + 1 + (cfg.data is not None) + 1
    bar = tqdm(total=steps, desc="map", unit="step", disable=not progress)
    try:
        bar.set_postfix_str(f"{METHOD_LABELS[cfg.method]} of {len(emb)} x {emb.dim}")
        coords = project(emb.vectors, cfg.method, cfg.seed, **cfg.method_options)
        bar.update()
        bar.set_postfix_str("regions")
        regions = find_regions(coords, cfg.regions, cfg.per_region, cfg.seed)
        bar.update()
        out.mkdir(parents=True, exist_ok=True)
        meta = {"aion_map_method": cfg.method, "aion_map_seed": str(cfg.seed), "aion_map_source": str(embeddings),
                "aion_map_regions": str(cfg.regions)}
        files = [out / "coords.parquet"]
        with TableWriter(files[0], metadata=meta) as writer:
            writer.append({"object_id": emb.ids, "x": coords[:, 0], "y": coords[:, 1], "region": regions.labels})
        axis = METHOD_LABELS[cfg.method]
        names = map_plots.file_names(list(values))
        shown = {}
        for column, vals in values.items():
            bar.set_postfix_str(f"colour {column}")
            files.append(out / names[column])
            shown[column] = map_plots.plot_column(coords, vals, column, files[-1], axis_label=axis, seed=cfg.seed)
            bar.update()
        bar.set_postfix_str("regions.png")
        files.append(out / "regions.png")
        map_plots.plot_regions(coords, regions, files[-1], axis_label=axis, seed=cfg.seed)
        bar.update()
        missing = 0
        if cfg.data is not None:
            from aion.discovery.cutouts import read_cutouts

            bar.set_postfix_str("gallery")
            wanted = np.concatenate(regions.examples)
            cut = read_cutouts(cfg.data, cfg.survey, emb.ids[wanted])
            missing = len(cut.missing)
            if missing:
                log(f"{missing} of {len(wanted)} gallery objects are not in {cfg.data}/{cfg.survey}: skipped")
            files.append(out / "gallery.png")
            map_plots.plot_gallery(cut, [emb.ids[r] for r in regions.examples], regions.sizes, files[-1],
                                   survey=cfg.survey)
            bar.update()
        result = MapResult(out=out, ids=emb.ids, coords=coords, regions=regions, n_usable=n_usable,
                           dropped=emb.dropped, files=files, columns=shown,
                           missing_cutouts=missing)
        files.append(out / "index.md")
        write_text_atomic(files[-1], _index(result, cfg, embeddings))
        bar.update()
    finally:
        bar.close()
    return result


def _index(res: MapResult, cfg: MapConfig, source: PathLike) -> str:
    label = METHOD_LABELS[cfg.method]
    lines = [f"# {label} map of {Path(source).name}", "",
             f"- embeddings: `{source}` ({res.n_usable} usable rows, {res.dropped} without an embedding left out)",
             f"- mapped: {len(res.ids)} objects"
             + (f" (a seeded random subset, --max-objects {cfg.max_objects})" if len(res.ids) < res.n_usable else ""),
             f"- method: {label}, seed {cfg.seed}"
             + (f", options {cfg.method_options}" if cfg.method_options else ""),
             f"- regions: {cfg.regions} (k-means on the map), {cfg.per_region} examples each, nearest the centre",
             "- coordinates: [coords.parquet](coords.parquet) (object_id, x, y, region)"]
    if cfg.catalogue is not None:
        lines.append(f"- catalogue: `{cfg.catalogue}`")
        for column, shown in res.columns.items():
            lines.append(f"  - {column}: {shown.coloured} objects coloured, {shown.missing} without a value (grey)")
    if cfg.data is not None:
        lines.append(f"- cutouts: `{cfg.data}` survey {cfg.survey}"
                     + (f" ({res.missing_cutouts} gallery objects not in it, skipped)" if res.missing_cutouts else ""))
    lines += ["", "## Maps", ""]
    for path in res.files:
        if path.suffix == ".png":
            lines += [f"### {path.stem}", "", f"![{path.stem}]({path.name})", ""]
    lines += ["## Regions", "", "| region | objects | examples (object_id, nearest the centre first) |",
              "|---:|---:|---|"]
    for k, (size, rows) in enumerate(zip(res.regions.sizes, res.regions.examples, strict=True)):
        lines.append(f"| {k} | {int(size)} | {', '.join(str(int(i)) for i in res.ids[rows])} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ CLI
def add_parser(sub) -> None:
    p = sub.add_parser(
        "map", help="2-D map (t-SNE, UMAP or PCA) of an embedding table coloured by catalogue columns, "
                    "with k-means regions and a cutout gallery",
        description="Projects the embeddings of `aion embed` to 2-D and writes into --out: coords.parquet "
                    "(object_id, x, y, region), map_<COLUMN>.png per --color column, regions.png, gallery.png "
                    "(with --data: cutouts of the objects nearest each region's centre) and index.md.")
    p.add_argument("--embeddings", type=Path, required=True, help="table written by `aion embed` (parquet / FITS)")
    p.add_argument("--catalogue", type=Path, default=None,
                   help="table (parquet, FITS, ECSV, CSV) or MMU survey folder with object_id and the --color columns")
    p.add_argument("--color", default=None, help="comma-separated catalogue columns, one map each, e.g. Z,LOG_MSTAR")
    p.add_argument("--method", choices=METHODS, default="tsne",
                   help=f"projection (default tsne; umap needs {UMAP_HINT})")
    p.add_argument("--data", type=Path, default=None, help="MMU data root with the cutouts (enables gallery.png)")
    p.add_argument("--survey", default="legacysurvey", help="imaging survey of --data for the gallery")
    p.add_argument("--regions", type=int, default=8, help="k-means regions on the map (default 8)")
    p.add_argument("--per-region", type=int, default=6, help="gallery cutouts per region (default 6)")
    p.add_argument("--max-objects", type=int, default=20000,
                   help="map a seeded random subset when the table has more rows (default 20000; 0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_map)


def _cmd_map(args: argparse.Namespace) -> int:
    from aion.discovery.tables import parse_columns

    try:
        if args.max_objects < 0:
            raise ValueError(f"--max-objects must be >= 0 (0: all), got {args.max_objects}")
        cfg = MapConfig(method=args.method, colors=tuple(parse_columns(args.color, "--color")) if args.color else (),
                        catalogue=args.catalogue, data=args.data, survey=args.survey, regions=args.regions,
                        per_region=args.per_region, max_objects=args.max_objects or None, seed=args.seed)
        res = run_map(args.embeddings, args.out, cfg, progress=not args.quiet)
    except KeyError as err:
        raise SystemExit(f"error: {err.args[0] if err.args else err}") from None
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{METHOD_LABELS[cfg.method]} map of {len(res.ids)} objects, {cfg.regions} regions "
          f"(sizes {', '.join(str(int(s)) for s in res.regions.sizes)})")
    for path in res.files:
        print(f"  {path}")
    return 0

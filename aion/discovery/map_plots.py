"""The PNGs of ``aion map``: the map coloured by a column, the regions, and the cutout gallery.

Points are drawn in a seeded random order so that no group hides another merely because it
came later in the table; objects without a value are drawn first, in light grey, and counted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aion.discovery.cutouts import Cutouts, shared_stretch, to_rgb
from aion.discovery.maps import Regions

GREY = "#d0d0d0"
MAX_CATEGORIES = 10
"""A column of at most this many distinct integers is drawn with one colour per value."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def point_size(n: int) -> float:
    """Marker area (pt^2) that keeps a map of ``n`` points readable: big when sparse, small when dense."""
    return float(np.clip(8000.0 / max(n, 1), 0.5, 40.0))


def file_names(columns: Sequence[str]) -> dict[str, str]:
    """``map_<COLUMN>.png`` per column, with characters unsafe in file names replaced by ``_``."""
    names = {c: f"map_{re.sub(r'[^A-Za-z0-9_.+-]', '_', c)}.png" for c in columns}
    if len(set(names.values())) != len(names):
        raise ValueError(f"--color: columns {list(columns)} give clashing file names {sorted(names.values())}")
    return names


def is_categorical(values: np.ndarray) -> bool:
    """Few distinct integer values (a flag, a class) deserve distinct colours, not a colour ramp."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or not np.all(finite == np.round(finite)):
        return False
    return np.unique(finite).size <= MAX_CATEGORIES


def _frame(ax, axis_label: str) -> None:
    ax.set_xlabel(f"{axis_label} 1")
    ax.set_ylabel(f"{axis_label} 2")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])


@dataclass
class ColumnMap:
    """What one coloured map shows (for the caller's report and for tests)."""

    coloured: int
    missing: int
    """Objects without a value (NaN or no catalogue row), drawn in grey."""
    limits: tuple[float, float] | None = None
    """Colour-bar range of a continuous column."""
    categories: tuple[float, ...] = ()
    """Distinct values of a categorical column."""


def plot_column(coords: np.ndarray, values: np.ndarray, name: str, path: Path, *, axis_label: str = "map",
                seed: int = 0) -> ColumnMap:
    """The map coloured by one column: colour limits at its 1st-99th percentiles, NaN in grey underneath."""
    from aion.evaluation.report import save_figure

    plt = _pyplot()
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    size = point_size(n)
    has = np.isfinite(values)
    order = np.random.default_rng(seed).permutation(n)
    order = order[has[order]]
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    n_missing = int((~has).sum())
    summary = ColumnMap(coloured=int(has.sum()), missing=n_missing)
    if n_missing:
        ax.scatter(coords[~has, 0], coords[~has, 1], s=size, c=GREY, linewidths=0, rasterized=True,
                   label=f"no value ({n_missing})")
    if is_categorical(values):
        levels = np.unique(values[has])
        summary.categories = tuple(float(v) for v in levels)
        cmap = plt.get_cmap("tab10")
        colour_of = {v: cmap(i % 10) for i, v in enumerate(levels)}
        ax.scatter(coords[order, 0], coords[order, 1], s=size, c=[colour_of[v] for v in values[order]],
                   linewidths=0, rasterized=True)
        for v in levels:  # legend handles only: the points are drawn above in mixed order
            ax.scatter([], [], s=30, color=colour_of[v], label=f"{name} = {v:g} ({int((values == v).sum())})")
    elif has.any():
        lo, hi = np.percentile(values[has], [1, 99])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5  # a constant column still gets a readable colour bar
        summary.limits = (float(lo), float(hi))
        sc = ax.scatter(coords[order, 0], coords[order, 1], s=size, c=values[order], cmap="viridis", vmin=lo,
                        vmax=hi, linewidths=0, rasterized=True)
        below, above = values[has].min() < lo, values[has].max() > hi
        extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")
        fig.colorbar(sc, ax=ax, shrink=0.8, extend=extend, label=f"{name} (1st-99th percentile)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, markerscale=1.0, framealpha=0.8)
    _frame(ax, axis_label)
    title = f"{name}: {int(has.sum())} of {n} objects"
    if n_missing:
        title += f", {n_missing} without a value (grey)"
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)
    return summary


def _region_colours(k: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def plot_regions(coords: np.ndarray, regions: Regions, path: Path, *, axis_label: str = "map", seed: int = 0) -> None:
    """Points coloured by region, each region's id at its centre, gallery examples circled."""
    from matplotlib import patheffects

    from aion.evaluation.report import save_figure

    plt = _pyplot()
    n, k = len(coords), len(regions.sizes)
    colours = np.array(_region_colours(k))
    order = np.random.default_rng(seed).permutation(n)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ax.scatter(coords[order, 0], coords[order, 1], s=point_size(n), c=colours[regions.labels[order]], linewidths=0,
               rasterized=True)
    examples = np.concatenate(regions.examples)
    ax.scatter(coords[examples, 0], coords[examples, 1], s=25, facecolors="none", edgecolors="black",
               linewidths=0.7, label="gallery examples")
    outline = [patheffects.withStroke(linewidth=3, foreground="white")]
    for r, (x, y) in enumerate(regions.centres):
        ax.text(x, y, str(r), fontsize=13, fontweight="bold", ha="center", va="center", path_effects=outline)
    ax.legend(loc="best", fontsize=8)
    _frame(ax, axis_label)
    ax.set_title(f"{k} regions (k-means on the map); sizes {', '.join(str(int(s)) for s in regions.sizes)}",
                 fontsize=10)
    save_figure(fig, path)


def plot_gallery(cutouts: Cutouts, examples: Sequence[np.ndarray], sizes: np.ndarray, path: Path, *,
                 survey: str) -> None:
    """One row per region (its id and size on the left), its central objects' colour cutouts along it."""
    from aion.evaluation.report import save_figure

    plt = _pyplot()
    index: Mapping[int, int] = {int(i): j for j, i in enumerate(cutouts.ids)}
    stretch = shared_stretch(cutouts.images)
    n_rows = len(examples)
    n_cols = max(len(e) for e in examples)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.45 * n_cols + 0.6, 1.55 * n_rows + 0.5), squeeze=False)
    for r, ids in enumerate(examples):
        shown = [int(i) for i in ids if int(i) in index]
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(shown):
                ax.imshow(to_rgb(cutouts.images[index[shown[c]]], stretch), origin="lower", interpolation="nearest")
                ax.set_title(str(shown[c]), fontsize=6)
            else:
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c == 0:
                    ax.text(0.5, 0.5, f"none in\n{survey}", ha="center", va="center", fontsize=7,
                            transform=ax.transAxes)
        axes[r, 0].set_ylabel(f"region {r}\n{int(sizes[r])} objects", fontsize=8)
    blue, green, red = cutouts.bands
    title = (f"{survey} cutouts nearest each region's centre: {red}, {green}, {blue} as red, green, blue\n"
             "one asinh stretch for all; bands balanced so that the average object looks neutral")
    if len(cutouts.missing):
        title += f"\n{len(cutouts.missing)} examples not in the survey, skipped"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)

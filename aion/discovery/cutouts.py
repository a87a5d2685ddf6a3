"""Image cutouts by object_id from an MMU survey, and their colour composites.

Discovery tools show *examples* of what they found; a colour picture of each example is the
quickest check. One asinh stretch is shared by all cutouts of a figure (derived from their own
pixels) so brightness stays comparable between panels, and colour is preserved (Lupton-style:
one stretch factor per pixel applied to all three channels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike

RGB_BANDS: dict[str, tuple[str, str, str]] = {
    "legacysurvey": ("des-g", "des-r", "des-z"),  # the widest lever arm of g,r,i,z
    "hsc": ("hsc-g", "hsc-r", "hsc-i"),  # HSC's usual colour set; z and y add mostly noise
}
"""(blue, green, red) bands per imaging survey; others use their first, middle and last band."""


def rgb_bands(survey: str) -> tuple[str, str, str]:
    """The (blue, green, red) bands a survey's composites use."""
    from aion.modalities import survey as survey_info

    try:
        info = survey_info(survey)
    except KeyError as err:
        raise ValueError(f"--survey: {err.args[0]}") from None
    if info.kind != "imaging" or not info.bands:
        raise ValueError(f"--survey: {survey!r} is not an imaging survey (kind {info.kind!r})")
    if survey in RGB_BANDS:
        return RGB_BANDS[survey]
    bands = info.bands
    if len(bands) < 3:
        raise ValueError(f"--survey: {survey!r} has {len(bands)} bands; a colour composite needs three")
    return bands[0], bands[len(bands) // 2], bands[-1]


@dataclass
class Cutouts:
    """Three-band images of the objects found, in the order asked for."""

    ids: np.ndarray
    """(M,) int64 object ids that were found."""
    images: np.ndarray
    """(M, 3, H, W) float32 flux in (blue, green, red) order; masked pixels are 0."""
    bands: tuple[str, str, str]
    missing: np.ndarray
    """Ids asked for that the survey does not hold."""


def _band_planes(band_names: np.ndarray | None, wanted: tuple[str, ...], n_planes: int,
                 survey_bands: tuple[str, ...]) -> np.ndarray:
    """(M, 3) plane index of each wanted band in each row (rows may store bands in any order)."""
    if band_names is None:
        if n_planes != len(survey_bands):
            raise ValueError(f"image_band: absent and {n_planes} planes do not match the survey bands {survey_bands}")
        return np.tile([survey_bands.index(b) for b in wanted], (1, 1))
    names = np.char.strip(np.char.decode(band_names, "ascii")) if band_names.dtype.kind == "S" else band_names
    names = np.asarray(names).astype(str)
    out = np.empty((names.shape[0], len(wanted)), dtype=np.int64)
    for j, band in enumerate(wanted):
        hit = names == band
        if not hit.any(axis=1).all():
            row = int(np.flatnonzero(~hit.any(axis=1))[0])
            raise ValueError(f"image_band: row {row} has bands {list(names[row])}, none is {band!r}")
        out[:, j] = hit.argmax(axis=1)
    return out


def read_cutouts(root: PathLike, survey: str, ids: np.ndarray) -> Cutouts:
    """Cutouts of ``ids`` from ``root/survey``; ids the survey lacks are returned in ``missing``."""
    from aion.data.mmu import SurveyShards
    from aion.modalities import survey as survey_info

    wanted = rgb_bands(survey)
    shards = SurveyShards(Path(root), survey)
    for need in ("image_array", "image_mask"):
        if need not in shards.columns:
            raise KeyError(f"{root}/{survey}: no {need!r} column; the survey has {sorted(shards.columns)}")
    ids = np.asarray(ids, dtype=np.int64)
    if np.unique(ids).size != ids.size:
        raise ValueError("read_cutouts: object ids must be unique")
    survey_ids = shards.read_column("object_id").astype(np.int64)
    order = np.argsort(survey_ids, kind="stable")
    sorted_ids = survey_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(ids.size, dtype=bool)
    dup = found & (np.searchsorted(sorted_ids, ids, side="right") - np.searchsorted(sorted_ids, ids) > 1)
    if dup.any():
        raise ValueError(f"{root}/{survey}: object_id {int(ids[dup][0])} appears in more than one row")
    rows = order[pos[found]]
    columns = ["object_id", "image_array", "image_mask"] + (["image_band"] if "image_band" in shards.columns else [])
    data = shards.read_rows(rows, columns)
    flux = np.asarray(data["image_array"], dtype=np.float32)
    if flux.ndim != 4:
        raise ValueError(f"{root}/{survey}: image_array must be (N, bands, H, W), got shape {flux.shape}")
    valid = np.asarray(data["image_mask"]).astype(bool)  # MMU convention: True = good pixel
    planes = _band_planes(data.get("image_band"), wanted, flux.shape[1], survey_info(survey).bands)
    planes = np.broadcast_to(planes, (flux.shape[0], 3))
    take = planes[:, :, None, None]
    images = np.where(np.take_along_axis(valid, take, axis=1), np.take_along_axis(flux, take, axis=1), 0.0)
    return Cutouts(ids=np.asarray(data["object_id"], dtype=np.int64), images=images.astype(np.float32),
                   bands=wanted, missing=ids[~found])


@dataclass(frozen=True)
class Stretch:
    """asinh stretch: linear below ``softening``, logarithmic above; ``maximum`` maps to full colour.

    ``weights`` multiply the (blue, green, red) planes first: they balance the bands so that the
    objects of one figure look neutral on average and colour shows how each differs from the rest
    (raw AB fluxes make nearly every galaxy orange and the noisier red band speckled).
    """

    softening: float
    maximum: float
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)


def shared_stretch(images: np.ndarray, noise_multiple: float = 3.0, percentile: float = 99.5,
                   bright_percentile: float = 99.0) -> Stretch:
    """One stretch for a set of (M, 3, H, W) images.

    Band weights equalise the bright pixels (``bright_percentile`` of each band over all images,
    i.e. the objects' cores); the weighted mean image is softened at ``noise_multiple`` times its
    robust scatter (mostly sky) and saturates at its ``percentile``.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"shared_stretch: expected (M, 3, H, W) images, got shape {images.shape}")
    if images.size == 0:
        return Stretch(1.0, 1.0)
    ref = np.percentile(images, bright_percentile, axis=(0, 2, 3))
    ref = np.where(ref > 0, ref, ref.max() if ref.max() > 0 else 1.0)  # a band without signal keeps weight 1
    weights = ref.mean() / ref
    intensity = (images * weights[None, :, None, None]).mean(axis=1)
    sigma = 1.4826 * np.median(np.abs(intensity - np.median(intensity)))
    maximum = float(np.percentile(intensity, percentile))
    if maximum <= 0:
        maximum = float(intensity.max()) if intensity.max() > 0 else 1.0
    softening = max(noise_multiple * sigma, 1e-3 * maximum)  # noiseless images: near-linear at the faint end
    return Stretch(float(softening), maximum, tuple(float(w) for w in weights))


def to_rgb(image: np.ndarray, stretch: Stretch) -> np.ndarray:
    """(3, H, W) flux in (blue, green, red) order -> (H, W, 3) RGB in [0, 1] for ``imshow``."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"to_rgb: expected (3, H, W) blue, green, red planes, got shape {image.shape}")
    img = np.clip(image, 0.0, None) * np.asarray(stretch.weights)[:, None, None]
    intensity = img.mean(axis=0)
    norm = np.arcsinh(stretch.maximum / stretch.softening)
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(intensity > 0, np.arcsinh(intensity / stretch.softening) / (intensity * norm), 0.0)
    rgb = img[::-1] * factor[None]  # (red, green, blue) for display
    rgb /= np.maximum(rgb.max(axis=0), 1.0)[None]  # saturate to white-ish without changing the hue
    return np.moveaxis(rgb, 0, -1)

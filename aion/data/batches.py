"""Typed, validated batches of survey data: what readers produce and tokenizers consume.

Arrays are numpy; a batch never modifies the arrays it was given (validation copies
before masking). ``valid`` is True where a pixel or value may be used: non-finite
values and zero inverse variance become invalid instead of propagating.

Shapes (B = objects, C = bands, H, W = pixels, L = spectral pixels):
    ImageBatch.flux/ivar/valid   (B, C, H, W)
    ImageBatch.psf_fwhm          (B, C)
    SpectrumBatch.flux/ivar/...  (B, L)
    ScalarBatch.values/ivar      (B,)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from aion import modalities as registry


class BatchValidationError(ValueError):
    """Bad input data; the message names the field and what was expected."""


def _as_float32(name: str, x, expected_ndim: int, shape_doc: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != expected_ndim:
        raise BatchValidationError(f"{name}: expected shape {shape_doc}, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise BatchValidationError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=True)


def _check_same_shape(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
    if arr.shape != shape:
        raise BatchValidationError(f"{name}: expected shape {shape} (same as flux), got {arr.shape}")


def _sanitize(flux: np.ndarray, ivar: np.ndarray, valid: np.ndarray, field_prefix: str) -> None:
    """In place on private copies: negative ivar is an error, non-finite data is masked."""
    bad_ivar = ivar < 0
    if bad_ivar.any():
        raise BatchValidationError(
            f"{field_prefix}.ivar: inverse variance must be >= 0, found {int(bad_ivar.sum())} negative values"
        )
    nonfinite = ~np.isfinite(flux) | ~np.isfinite(ivar)
    valid &= ~nonfinite
    valid &= ivar > 0
    flux[~valid] = 0.0
    ivar[~valid] = 0.0


@dataclass(kw_only=True)
class ImageBatch:
    """Multi-band cutouts in a survey's native flux units (see ``zero_point``)."""

    flux: np.ndarray
    ivar: np.ndarray
    valid: np.ndarray
    bands: tuple[str, ...]
    pixel_scale: float
    psf_fwhm: np.ndarray
    zero_point: float = 22.5

    def __post_init__(self) -> None:
        self.flux = _as_float32("image.flux", self.flux, 4, "(B, bands, H, W)")
        shape = self.flux.shape
        self.ivar = _as_float32("image.ivar", self.ivar, 4, "(B, bands, H, W)")
        _check_same_shape("image.ivar", self.ivar, shape)
        valid = np.asarray(self.valid)
        if valid.dtype != np.bool_:
            raise BatchValidationError(f"image.valid: expected a boolean array (True = usable), got {valid.dtype}")
        _check_same_shape("image.valid", valid, shape)
        self.valid = valid.copy()
        self.bands = tuple(str(b).lower() for b in self.bands)
        if len(self.bands) != shape[1]:
            raise BatchValidationError(
                f"image.bands: {len(self.bands)} band names for {shape[1]} band planes in flux"
            )
        for b in self.bands:
            try:
                registry.band(b)
            except KeyError as err:
                raise BatchValidationError(f"image.bands: {err.args[0]}") from None
        if len(set(self.bands)) != len(self.bands):
            raise BatchValidationError(f"image.bands: duplicated band names {self.bands}")
        if not (np.isfinite(self.pixel_scale) and self.pixel_scale > 0):
            raise BatchValidationError(f"image.pixel_scale: expected a positive arcsec/pixel, got {self.pixel_scale}")
        self.psf_fwhm = _as_float32("image.psf_fwhm", self.psf_fwhm, 2, "(B, bands)")
        _check_same_shape("image.psf_fwhm", self.psf_fwhm, shape[:2])
        _sanitize(self.flux, self.ivar, self.valid, "image")

    def __len__(self) -> int:
        return self.flux.shape[0]

    @property
    def band_present(self) -> np.ndarray:
        """(B, C) True where an object has at least one usable pixel in a band."""
        return self.valid.any(axis=(2, 3))

    def to_zero_point(self, zero_point: float = 22.5) -> ImageBatch:
        """A copy in other flux units, e.g. HSC (zp 27) to nanomaggies (zp 22.5)."""
        scale = np.float32(10.0 ** (-0.4 * (self.zero_point - zero_point)))
        return ImageBatch(flux=self.flux * scale, ivar=self.ivar / scale**2, valid=self.valid,
                          bands=self.bands, pixel_scale=self.pixel_scale, psf_fwhm=self.psf_fwhm,
                          zero_point=zero_point)

    def select(self, index) -> ImageBatch:
        return ImageBatch(flux=self.flux[index], ivar=self.ivar[index], valid=self.valid[index],
                          bands=self.bands, pixel_scale=self.pixel_scale, psf_fwhm=self.psf_fwhm[index],
                          zero_point=self.zero_point)


@dataclass(kw_only=True)
class SpectrumBatch:
    """Spectra on per-object observed-frame wavelength grids (Angstrom).

    Padding (as in SDSS files) is expressed by non-positive wavelengths at the end of a
    row; those pixels are always invalid. Over the positive wavelengths of each row the
    grid must be strictly increasing.
    """

    flux: np.ndarray
    ivar: np.ndarray
    wavelength: np.ndarray
    valid: np.ndarray
    lsf_sigma: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.flux = _as_float32("spectrum.flux", self.flux, 2, "(B, L)")
        shape = self.flux.shape
        if shape[1] == 0:
            raise BatchValidationError("spectrum.flux: spectra have zero pixels")
        self.ivar = _as_float32("spectrum.ivar", self.ivar, 2, "(B, L)")
        _check_same_shape("spectrum.ivar", self.ivar, shape)
        wave = np.asarray(self.wavelength, dtype=np.float64)
        if wave.ndim == 1:
            wave = np.broadcast_to(wave, shape)
        _check_same_shape("spectrum.wavelength", wave, shape)
        self.wavelength = np.array(wave, dtype=np.float64)
        valid = np.asarray(self.valid)
        if valid.dtype != np.bool_:
            raise BatchValidationError(f"spectrum.valid: expected a boolean array (True = usable), got {valid.dtype}")
        _check_same_shape("spectrum.valid", valid, shape)
        self.valid = valid.copy()
        if self.lsf_sigma is not None:
            self.lsf_sigma = _as_float32("spectrum.lsf_sigma", self.lsf_sigma, 2, "(B, L)")
            _check_same_shape("spectrum.lsf_sigma", self.lsf_sigma, shape)
        self._check_wavelength()
        _sanitize(self.flux, self.ivar, self.valid, "spectrum")

    def _check_wavelength(self) -> None:
        wave = self.wavelength
        if not np.isfinite(wave).all():
            raise BatchValidationError("spectrum.wavelength: contains NaN or inf")
        padded = wave <= 0
        # padding must be a suffix of each row
        first_pad = np.where(padded.any(axis=1), padded.argmax(axis=1), wave.shape[1])
        suffix = np.arange(wave.shape[1])[None, :] >= first_pad[:, None]
        if (padded != suffix).any():
            row = int(np.nonzero((padded != suffix).any(axis=1))[0][0])
            raise BatchValidationError(
                f"spectrum.wavelength: row {row} has non-positive (padding) wavelengths before real ones"
            )
        steps = np.diff(wave, axis=1)
        both_real = ~padded[:, 1:]
        if (steps[both_real] <= 0).any():
            row = int(np.nonzero(((steps <= 0) & both_real).any(axis=1))[0][0])
            raise BatchValidationError(f"spectrum.wavelength: row {row} is not strictly increasing")
        self.valid &= ~padded

    def __len__(self) -> int:
        return self.flux.shape[0]

    @property
    def present(self) -> np.ndarray:
        """(B,) True where a spectrum has at least one usable pixel."""
        return self.valid.any(axis=1)

    def select(self, index) -> SpectrumBatch:
        return SpectrumBatch(flux=self.flux[index], ivar=self.ivar[index], wavelength=self.wavelength[index],
                             valid=self.valid[index],
                             lsf_sigma=None if self.lsf_sigma is None else self.lsf_sigma[index])


@dataclass(kw_only=True)
class ScalarBatch:
    """One scalar quantity per object; NaN (or ivar == 0) means the object lacks it."""

    name: str
    values: np.ndarray
    ivar: np.ndarray | None = None

    def __post_init__(self) -> None:
        mod = registry.modality(self.name)
        if mod.kind != "scalar":
            raise BatchValidationError(f"{self.name}: modality kind is {mod.kind!r}, not scalar")
        self.values = np.array(self.values, dtype=np.float64)
        if self.values.ndim != 1:
            raise BatchValidationError(f"{self.name}.values: expected shape (B,), got {self.values.shape}")
        if self.ivar is not None:
            self.ivar = np.array(self.ivar, dtype=np.float64)
            if self.ivar.shape != self.values.shape:
                raise BatchValidationError(
                    f"{self.name}.ivar: expected shape {self.values.shape}, got {self.ivar.shape}")
            if (self.ivar < 0).any():
                raise BatchValidationError(f"{self.name}.ivar: inverse variance must be >= 0")
            self.ivar[~np.isfinite(self.ivar)] = 0.0

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def valid(self) -> np.ndarray:
        ok = np.isfinite(self.values)
        if self.ivar is not None:
            ok &= self.ivar > 0
        return ok

    def select(self, index) -> ScalarBatch:
        return ScalarBatch(name=self.name, values=self.values[index],
                           ivar=None if self.ivar is None else self.ivar[index])


Modal = ImageBatch | SpectrumBatch | ScalarBatch


@dataclass(kw_only=True)
class SurveyBatch:
    """Rows of one survey (or of a cross-matched set): ids, positions, typed modalities, raw columns."""

    object_id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    modalities: dict[str, Modal] = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.object_id)
        for name, arr in (("ra", self.ra), ("dec", self.dec)):
            if len(arr) != n:
                raise BatchValidationError(f"{name}: expected {n} rows (same as object_id), got {len(arr)}")
        for key, value in self.modalities.items():
            if len(value) != n:
                raise BatchValidationError(f"modality {key}: expected {n} rows, got {len(value)}")
        for key, value in self.columns.items():
            if len(value) != n:
                raise BatchValidationError(f"column {key}: expected {n} rows, got {len(value)}")

    def __len__(self) -> int:
        return len(self.object_id)

    def present(self, name: str) -> np.ndarray:
        """(B,) presence mask of a modality; a modality absent from the batch is absent everywhere."""
        value = self.modalities.get(name)
        if value is None:
            return np.zeros(len(self), dtype=bool)
        if isinstance(value, ImageBatch):
            return value.band_present.any(axis=1)
        if isinstance(value, SpectrumBatch):
            return value.present
        return value.valid


def concat_batches(parts: list[Modal]) -> Modal:
    """Rows of several typed batches of one modality in one batch (spectra of different lengths are
    padded as invalid pixels; ``lsf_sigma`` is kept only when every part has it)."""
    first = parts[0]
    if isinstance(first, ScalarBatch):
        ivar = None if any(p.ivar is None for p in parts) else np.concatenate([p.ivar for p in parts])
        return ScalarBatch(name=first.name, values=np.concatenate([p.values for p in parts]), ivar=ivar)
    if isinstance(first, ImageBatch):
        if any((p.bands, p.pixel_scale, p.zero_point) != (first.bands, first.pixel_scale, first.zero_point)
               for p in parts):
            raise ValueError("image batches to concatenate have different bands, pixel scales or zero points")
        return ImageBatch(flux=np.concatenate([p.flux for p in parts]), ivar=np.concatenate([p.ivar for p in parts]),
                          valid=np.concatenate([p.valid for p in parts]), bands=first.bands,
                          pixel_scale=first.pixel_scale, psf_fwhm=np.concatenate([p.psf_fwhm for p in parts]),
                          zero_point=first.zero_point)
    if isinstance(first, SpectrumBatch):
        width = max(p.flux.shape[1] for p in parts)

        def pad(a: np.ndarray, fill) -> np.ndarray:
            return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)

        lsf = None if any(p.lsf_sigma is None for p in parts) else np.concatenate(
            [pad(p.lsf_sigma, 0.0) for p in parts])
        return SpectrumBatch(flux=np.concatenate([pad(p.flux, 0.0) for p in parts]),
                             ivar=np.concatenate([pad(p.ivar, 0.0) for p in parts]),
                             wavelength=np.concatenate([pad(np.broadcast_to(p.wavelength, p.flux.shape), -1.0)
                                                        for p in parts]),
                             valid=np.concatenate([pad(p.valid, False) for p in parts]), lsf_sigma=lsf)
    raise TypeError(type(first).__name__)

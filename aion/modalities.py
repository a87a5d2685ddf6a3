"""The modality registry: every band, survey and modality is declared here once.

Everything downstream (readers, the mock universe, tokenizers, embedding tables, CLI
choices) derives from these declarations, so adding a survey or a modality is one
declaration here plus a tokenizer recipe, not edits scattered across files.

Conventions used throughout the package:
- image flux is stored in each survey's native units, given by its AB zero point
  (Legacy Survey: nanomaggies, zero point 22.5; HSC: zero point 27);
- spectra are in 1e-17 erg/s/cm^2/A on an observed-frame wavelength grid in Angstrom;
- a ``valid`` array is True where a pixel or value may be used (we convert the
  opposite Multimodal Universe spectrum convention, mask True = bad, at the reader).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ModalityKind = Literal["image", "spectrum", "scalar"]
ModalityRole = Literal["input", "label"]
SurveyKind = Literal["imaging", "spectroscopic", "labels"]


@dataclass(frozen=True, kw_only=True)
class Band:
    """A photometric band and the filter curve that defines it."""

    name: str
    """Lower-case band name as it appears in data, e.g. ``des-g`` or ``hsc-y``."""
    filter_curve: str
    """speclite filter name (``group-band``) used for synthetic photometry."""
    extinction_coefficient: float
    """A_band / E(B-V) for Milky Way dust (Schlafly & Finkbeiner 2011, R_V = 3.1)."""


@dataclass(frozen=True, kw_only=True)
class Survey:
    """A survey: where its files live in the MMU layout and what its data look like."""

    name: str
    """Directory name in the Multimodal Universe layout, e.g. ``legacysurvey``."""
    kind: SurveyKind
    bands: tuple[str, ...] = ()
    """Imaging bands in storage order (imaging surveys only)."""
    zero_point: float | None = None
    """AB zero point of image pixel values (flux = 10**(-0.4 (m - zero_point)))."""
    pixel_scale: float | None = None
    """Arcsec per pixel (imaging surveys only)."""
    wavelength_range: tuple[float, float] | None = None
    """Observed-frame coverage in Angstrom (spectroscopic surveys only)."""
    wavelength_step: float | None = None
    """Pixel size in Angstrom of the native linear grid (spectroscopic surveys only)."""

    @property
    def n_wavelength(self) -> int:
        if self.wavelength_range is None or self.wavelength_step is None:
            raise ValueError(f"survey {self.name!r} has no wavelength grid")
        lo, hi = self.wavelength_range
        return int(round((hi - lo) / self.wavelength_step)) + 1


@dataclass(frozen=True, kw_only=True)
class Modality:
    """One modality: a kind of data a model can read or predict."""

    name: str
    """Unique identifier, e.g. ``legacysurvey_image`` or ``legacysurvey_flux_g``."""
    kind: ModalityKind
    survey: str
    unit: str
    """Physical unit of the values (astropy-parsable where possible)."""
    fields: tuple[str, ...]
    """Columns of the survey files this modality reads (flat HDF5 names)."""
    description: str
    role: ModalityRole = "input"
    """``label`` modalities are evaluation targets (e.g. PROVABGS), never model inputs."""
    error_field: str | None = None
    """Column carrying the uncertainty (inverse variance for fluxes, sigma for mags)."""
    error_kind: Literal["ivar", "sigma"] | None = None
    bands: tuple[str, ...] = field(default=())
    tokenizer: str | None = None
    """Name of the tokenizer recipe under ``tokenizers/`` (set by the tokenizer stage)."""

    def __post_init__(self) -> None:
        if self.kind not in ("image", "spectrum", "scalar"):
            raise ValueError(f"modality {self.name!r}: kind must be image|spectrum|scalar, got {self.kind!r}")
        if (self.error_field is None) != (self.error_kind is None):
            raise ValueError(f"modality {self.name!r}: error_field and error_kind go together")


# --------------------------------------------------------------------------- bands
_BANDS: dict[str, Band] = {}
_SURVEYS: dict[str, Survey] = {}
_MODALITIES: dict[str, Modality] = {}


def register_band(band: Band) -> Band:
    if band.name in _BANDS:
        raise ValueError(f"band {band.name!r} is already registered")
    _BANDS[band.name] = band
    return band


def register_survey(survey: Survey) -> Survey:
    if survey.name in _SURVEYS:
        raise ValueError(f"survey {survey.name!r} is already registered")
    unknown = [b for b in survey.bands if b not in _BANDS]
    if unknown:
        raise ValueError(f"survey {survey.name!r} uses unregistered bands {unknown}")
    _SURVEYS[survey.name] = survey
    return survey


def register_modality(modality: Modality) -> Modality:
    if modality.name in _MODALITIES:
        raise ValueError(f"modality {modality.name!r} is already registered")
    if modality.survey not in _SURVEYS:
        raise ValueError(f"modality {modality.name!r} names unknown survey {modality.survey!r}")
    _MODALITIES[modality.name] = modality
    return modality


def _lookup(table: dict, key: str, what: str):
    try:
        return table[key]
    except KeyError:
        raise KeyError(f"unknown {what} {key!r}; known: {', '.join(sorted(table))}") from None


def band(name: str) -> Band:
    return _lookup(_BANDS, name.lower(), "band")


def survey(name: str) -> Survey:
    return _lookup(_SURVEYS, name, "survey")


def modality(name: str) -> Modality:
    return _lookup(_MODALITIES, name, "modality")


def bands() -> dict[str, Band]:
    return dict(_BANDS)


def surveys() -> dict[str, Survey]:
    return dict(_SURVEYS)


def modalities(*, kind: ModalityKind | None = None, survey: str | None = None,
               role: ModalityRole | None = None) -> dict[str, Modality]:
    """All registered modalities, optionally filtered; insertion order is stable."""
    return {
        k: m
        for k, m in _MODALITIES.items()
        if (kind is None or m.kind == kind)
        and (survey is None or m.survey == survey)
        and (role is None or m.role == role)
    }


# ------------------------------------------------------------------ declarations
# Extinction coefficients: DECam and WISE from the Legacy Surveys DR10 documentation
# (Schlafly & Finkbeiner 2011); HSC from the HSC-SSP PDR catalogues' a_<band>/E(B-V).
for _name, _curve, _r in [
    ("des-g", "decamDR1-g", 3.214), ("des-r", "decamDR1-r", 2.165),
    ("des-i", "decamDR1-i", 1.592), ("des-z", "decamDR1-z", 1.211),
    ("wise-w1", "wise2010-W1", 0.184), ("wise-w2", "wise2010-W2", 0.113),
    ("wise-w3", "wise2010-W3", 0.0241), ("wise-w4", "wise2010-W4", 0.00910),
    ("hsc-g", "hsc2017-g", 3.240), ("hsc-r", "hsc2017-r", 2.276),
    ("hsc-i", "hsc2017-i", 1.633), ("hsc-z", "hsc2017-z", 1.263),
    ("hsc-y", "hsc2017-y", 1.075),
]:
    register_band(Band(name=_name, filter_curve=_curve, extinction_coefficient=_r))

LEGACYSURVEY = register_survey(Survey(
    name="legacysurvey", kind="imaging", bands=("des-g", "des-r", "des-i", "des-z"),
    zero_point=22.5, pixel_scale=0.262,
))
HSC = register_survey(Survey(
    name="hsc", kind="imaging", bands=("hsc-g", "hsc-r", "hsc-i", "hsc-z", "hsc-y"),
    zero_point=27.0, pixel_scale=0.168,
))
DESI = register_survey(Survey(
    name="desi", kind="spectroscopic", wavelength_range=(3600.0, 9824.0), wavelength_step=0.8,
))
SDSS = register_survey(Survey(
    name="sdss", kind="spectroscopic", wavelength_range=(3800.0, 9200.0), wavelength_step=None,
))
PROVABGS = register_survey(Survey(name="provabgs", kind="labels"))

_IMAGE_FIELDS = ("image_array", "image_ivar", "image_mask", "image_band", "image_psf_fwhm", "image_scale")
_SPECTRUM_FIELDS = ("spectrum_flux", "spectrum_ivar", "spectrum_lambda", "spectrum_mask", "spectrum_lsf_sigma")

register_modality(Modality(
    name="legacysurvey_image", kind="image", survey="legacysurvey", unit="nanomaggy",
    fields=_IMAGE_FIELDS, bands=LEGACYSURVEY.bands,
    description="Legacy Survey DR10 g,r,i,z cutouts, 0.262 arcsec/px, nanomaggies (zp 22.5)",
))
register_modality(Modality(
    name="hsc_image", kind="image", survey="hsc", unit="HSC flux (AB zero point 27)",
    fields=_IMAGE_FIELDS, bands=HSC.bands,
    description="HSC PDR3 g,r,i,z,y cutouts, 0.168 arcsec/px, zero point 27",
))
register_modality(Modality(
    name="desi_spectrum", kind="spectrum", survey="desi", unit="1e-17 erg / (s cm2 Angstrom)",
    fields=_SPECTRUM_FIELDS,
    description="DESI fibre spectrum, 3600-9824 A at 0.8 A (7781 pixels), mask True = bad",
))
register_modality(Modality(
    name="sdss_spectrum", kind="spectrum", survey="sdss", unit="1e-17 erg / (s cm2 Angstrom)",
    fields=_SPECTRUM_FIELDS,
    description="SDSS/BOSS spectrum, variable length, padded with lambda=-1, ivar=0, mask True",
))

for _b in ("g", "r", "i", "z", "w1", "w2", "w3", "w4"):
    register_modality(Modality(
        name=f"legacysurvey_flux_{_b}", kind="scalar", survey="legacysurvey", unit="nanomaggy",
        fields=(f"FLUX_{_b.upper()}",), error_field=f"FLUX_IVAR_{_b.upper()}", error_kind="ivar",
        description=f"Legacy Survey total model flux in {_b} (not corrected for Milky Way dust)",
    ))
register_modality(Modality(
    name="legacysurvey_shape_r", kind="scalar", survey="legacysurvey", unit="arcsec",
    fields=("SHAPE_R",), description="Half-light radius of the Tractor model",
))
for _e in ("e1", "e2"):
    register_modality(Modality(
        name=f"legacysurvey_shape_{_e}", kind="scalar", survey="legacysurvey", unit="",
        fields=(f"SHAPE_{_e.upper()}",),
        description=f"Ellipticity component {_e}: e = (1-q)/(1+q), e1 = e cos 2phi, e2 = e sin 2phi",
    ))
register_modality(Modality(
    name="legacysurvey_ebv", kind="scalar", survey="legacysurvey", unit="mag",
    fields=("EBV",), description="Milky Way E(B-V) at the object position (SFD98 scale)",
))
for _b in ("g", "r", "i", "z", "y"):
    register_modality(Modality(
        name=f"hsc_mag_{_b}", kind="scalar", survey="hsc", unit="mag(AB)",
        fields=(f"{_b}_cmodel_mag",), error_field=f"{_b}_cmodel_magerr", error_kind="sigma",
        description=f"HSC cmodel magnitude in {_b} (not corrected for Milky Way dust)",
    ))
register_modality(Modality(
    name="sdss_z", kind="scalar", survey="sdss", unit="", fields=("Z",),
    error_field="Z_ERR", error_kind="sigma", description="SDSS spectroscopic redshift",
))
register_modality(Modality(
    name="desi_z", kind="scalar", survey="desi", unit="", fields=("Z",),
    error_field="ZERR", error_kind="sigma", description="DESI spectroscopic redshift",
))
for _name, _field, _unit, _desc in [
    ("log_mstar", "LOG_MSTAR", "dex(solMass)", "log10 stellar mass (surviving stars)"),
    ("z_mw", "Z_MW", "", "mass-weighted stellar metallicity (mass fraction, solar = 0.019)"),
    ("tage_mw", "TAGE_MW", "Gyr", "mass-weighted stellar age"),
    ("avg_sfr", "AVG_SFR", "solMass / yr", "star formation rate averaged over the last 300 Myr"),
    ("ssfr", "sSFR", "dex(1 / yr)", "log10(AVG_SFR) - LOG_MSTAR"),
    ("z", "Z_HP", "", "redshift of the object (PROVABGS Z_HP)"),
]:
    register_modality(Modality(
        name=f"provabgs_{_name}", kind="scalar", survey="provabgs", unit=_unit,
        fields=(_field,), role="label", description=_desc,
    ))

"""Typed batches: validation names the field, bad values are masked, inputs are never modified."""

import numpy as np
import pytest

from aion import modalities as registry
from aion.data.batches import (
    BatchValidationError,
    ImageBatch,
    ScalarBatch,
    SpectrumBatch,
    SurveyBatch,
    concat_batches,
)


def _image(**over):
    b, c, h = 3, 4, 8
    kw = dict(flux=np.ones((b, c, h, h), np.float32), ivar=np.full((b, c, h, h), 4.0, np.float32),
              valid=np.ones((b, c, h, h), bool), bands=("des-g", "des-r", "des-i", "des-z"), pixel_scale=0.262,
              psf_fwhm=np.full((b, c), 1.2, np.float32))
    kw.update(over)
    return ImageBatch(**kw)


def test_registry_declares_the_required_modalities():
    names = set(registry.modalities())
    required = {"legacysurvey_image", "hsc_image", "desi_spectrum", "sdss_spectrum", "legacysurvey_ebv",
                "legacysurvey_shape_r", "legacysurvey_shape_e1", "legacysurvey_shape_e2", "desi_z",
                "provabgs_log_mstar", "provabgs_z_mw", "provabgs_tage_mw", "provabgs_avg_sfr", "provabgs_ssfr"}
    required |= {f"legacysurvey_flux_{b}" for b in ("g", "r", "i", "z", "w1", "w2", "w3", "w4")}
    required |= {f"hsc_mag_{b}" for b in "grizy"}
    assert required <= names
    assert all(m.role == "label" for m in registry.modalities(survey="provabgs").values())
    assert registry.modality("hsc_image").bands == ("hsc-g", "hsc-r", "hsc-i", "hsc-z", "hsc-y")
    assert registry.survey("desi").n_wavelength == 7781
    with pytest.raises(KeyError, match="unknown modality 'nope'"):
        registry.modality("nope")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_band(registry.band("des-g"))


def test_image_nonfinite_pixels_become_invalid_and_input_is_untouched():
    flux = np.ones((3, 4, 8, 8), np.float32)
    flux[0, 1, 2, 3] = np.nan
    flux[2, 0, 0, 0] = np.inf
    original = flux.copy()
    img = _image(flux=flux)
    assert not img.valid[0, 1, 2, 3] and not img.valid[2, 0, 0, 0]
    assert img.flux[0, 1, 2, 3] == 0 and img.ivar[0, 1, 2, 3] == 0
    assert np.isfinite(img.flux).all()
    assert img.valid.sum() == img.valid.size - 2
    np.testing.assert_array_equal(flux, original)  # caller's array unchanged (NaN still there)


def test_image_errors_name_the_field():
    with pytest.raises(BatchValidationError, match=r"image.ivar: inverse variance must be >= 0"):
        _image(ivar=-np.ones((3, 4, 8, 8), np.float32))
    with pytest.raises(BatchValidationError, match=r"image.bands: unknown band 'des-q'"):
        _image(bands=("des-g", "des-r", "des-i", "des-q"))
    with pytest.raises(BatchValidationError, match=r"image.flux: expected shape \(B, bands, H, W\)"):
        _image(flux=np.ones((4, 8, 8)))
    with pytest.raises(BatchValidationError, match=r"image.ivar: expected shape \(3, 4, 8, 8\)"):
        _image(ivar=np.ones((3, 4, 8, 9)))
    with pytest.raises(BatchValidationError, match="image.bands: 3 band names for 4 band planes"):
        _image(bands=("des-g", "des-r", "des-i"))
    with pytest.raises(BatchValidationError, match="image.valid: expected a boolean"):
        _image(valid=np.ones((3, 4, 8, 8), np.uint8))


def test_zero_point_conversion_keeps_signal_to_noise():
    img = _image(zero_point=27.0, bands=("des-g", "des-r", "des-i", "des-z"))
    nm = img.to_zero_point(22.5)
    assert nm.zero_point == 22.5
    np.testing.assert_allclose(nm.flux, img.flux / 10 ** (0.4 * 4.5), rtol=1e-6)
    np.testing.assert_allclose(nm.flux * np.sqrt(nm.ivar), img.flux * np.sqrt(img.ivar), rtol=1e-5)


def test_spectrum_padding_is_invalid_and_unsorted_wavelength_is_an_error():
    wave = np.tile(np.arange(10, dtype=float) + 4000, (2, 1))
    wave[1, 7:] = -1  # padded tail, SDSS style
    spec = SpectrumBatch(flux=np.ones((2, 10)), ivar=np.ones((2, 10)), wavelength=wave, valid=np.ones((2, 10), bool))
    assert spec.valid[0].all() and not spec.valid[1, 7:].any() and spec.valid[1, :7].all()
    bad = wave.copy()
    bad[0, 4], bad[0, 5] = bad[0, 5], bad[0, 4]
    with pytest.raises(BatchValidationError, match="spectrum.wavelength: row 0 is not strictly increasing"):
        SpectrumBatch(flux=np.ones((2, 10)), ivar=np.ones((2, 10)), wavelength=bad, valid=np.ones((2, 10), bool))
    hole = wave.copy()
    hole[0, 3] = -1
    with pytest.raises(BatchValidationError, match="row 0 has non-positive"):
        SpectrumBatch(flux=np.ones((2, 10)), ivar=np.ones((2, 10)), wavelength=hole, valid=np.ones((2, 10), bool))
    with pytest.raises(BatchValidationError, match="spectrum.flux: spectra have zero pixels"):
        SpectrumBatch(flux=np.ones((2, 0)), ivar=np.ones((2, 0)), wavelength=np.ones((2, 0)),
                      valid=np.ones((2, 0), bool))
    with pytest.raises(BatchValidationError, match="spectrum.ivar: inverse variance must be >= 0"):
        SpectrumBatch(flux=np.ones((2, 10)), ivar=-np.ones((2, 10)), wavelength=wave, valid=np.ones((2, 10), bool))


def test_scalars_nan_is_absent_and_presence_masks():
    s = ScalarBatch(name="legacysurvey_flux_g", values=np.array([1.0, np.nan, 3.0]), ivar=np.array([1.0, 1.0, 0.0]))
    np.testing.assert_array_equal(s.valid, [True, False, False])
    with pytest.raises(BatchValidationError, match="not scalar"):
        ScalarBatch(name="desi_spectrum", values=np.zeros(3))
    img = _image(valid=np.zeros((3, 4, 8, 8), bool) | (np.arange(3)[:, None, None, None] == 1))
    sb = SurveyBatch(object_id=np.arange(3), ra=np.zeros(3), dec=np.zeros(3),
                     modalities={"legacysurvey_image": img, "legacysurvey_flux_g": s})
    np.testing.assert_array_equal(sb.present("legacysurvey_image"), [False, True, False])
    np.testing.assert_array_equal(sb.present("desi_spectrum"), [False, False, False])
    with pytest.raises(BatchValidationError, match="column x: expected 3 rows"):
        SurveyBatch(object_id=np.arange(3), ra=np.zeros(3), dec=np.zeros(3), columns={"x": np.zeros(2)})


def test_concat_batches_pads_spectra_and_refuses_mixed_images():
    a = SpectrumBatch(flux=np.ones((2, 3)), ivar=np.ones((2, 3)), wavelength=np.array([1.0, 2.0, 3.0]),
                      valid=np.ones((2, 3), bool))
    b = SpectrumBatch(flux=np.ones((1, 5)), ivar=np.ones((1, 5)), wavelength=np.arange(1.0, 6.0)[None],
                      valid=np.ones((1, 5), bool))
    c = concat_batches([a, b])
    assert c.flux.shape == (3, 5) and not c.valid[:2, 3:].any() and (c.wavelength[:2, 3:] < 0).all()
    img = dict(flux=np.zeros((1, 1, 4, 4)), ivar=np.ones((1, 1, 4, 4)), valid=np.ones((1, 1, 4, 4), bool),
               bands=("des-g",), pixel_scale=0.262, psf_fwhm=np.ones((1, 1)))
    assert len(concat_batches([ImageBatch(**img), ImageBatch(**img)])) == 2
    with pytest.raises(ValueError, match="zero points"):
        concat_batches([ImageBatch(**img), ImageBatch(**img, zero_point=27.0)])

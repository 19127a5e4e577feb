"""The DICOM readers' second CI run must really use the pydicom it asked for (Slicer 5.8/5.10: 2.4.4)."""

import os

import pydicom
import pytest


def test_pydicom_is_the_version_this_run_expects():
    expected = os.environ.get("SUBJECT_FINGERPRINT_EXPECT_PYDICOM")
    if not expected:
        pytest.skip("no pydicom version requested (set SUBJECT_FINGERPRINT_EXPECT_PYDICOM)")
    assert pydicom.__version__ == expected, pydicom.__file__


def test_lut_helpers_and_decoder_check_exist_in_this_pydicom():
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    from subject_fingerprint.io.dicom import _lut_functions, decoder_status

    assert all(callable(f) for f in _lut_functions())
    assert decoder_status(ExplicitVRLittleEndian) == "ok"
    assert decoder_status(RLELossless) == "ok"  # pydicom's own RLE decoder, in 2.4 and 3.x
    assert decoder_status("1.2.3.4.5.6.7") == "unsupported"

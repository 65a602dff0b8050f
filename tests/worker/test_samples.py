"""The sample factory writes what a CR/DX modality would: realistic tags, bit depths, encodings."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless

from models.dicom_io import dicom_to_grayscale
from worker.samples import make_cxr_dataset, write_sample_study


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_display_image_equals_thumbnail(test_split, photometric, bits):
    images, _ = test_split
    ds = make_cxr_dataset(images[0], photometric=photometric, bits_stored=bits, size=(280, 280))
    assert ds.BitsStored == bits and ds.PhotometricInterpretation == photometric
    stored = ds.pixel_array
    assert stored.max() <= (1 << bits) - 1
    if photometric == "MONOCHROME1":  # stored inverted: bright bone has low stored values
        assert stored[0, 0] == (1 << bits) - 1 - round(images[0][0, 0] / 255 * ((1 << bits) - 1))
    display = dicom_to_grayscale(ds)[::10, ::10]
    assert np.abs(display - images[0] / 255.0).max() < 1 / 255


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless,
                                    pytest.param(JPEGLosslessSV1, marks=pytest.mark.dcmtk)])
def test_compressed_files_round_trip_losslessly(tmp_path, test_split, syntax):
    images, _ = test_split
    plain = make_cxr_dataset(images[5], size=(300, 300))
    paths = write_sample_study(tmp_path, [images[5]], size=(300, 300), transfer_syntax=syntax)
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(ds.pixel_array, plain.pixel_array)
    assert paths[0].name == f"{ds.SOPInstanceUID}.dcm"


def test_study_shares_uids_and_has_only_synthetic_identity(tmp_path, test_split):
    images, _ = test_split
    paths = write_sample_study(tmp_path, images[:3], size=(128, 128), accession="ACC42")
    sets = [pydicom.dcmread(p) for p in paths]
    assert len({d.StudyInstanceUID for d in sets}) == 1 and len({d.SOPInstanceUID for d in sets}) == 3
    assert all(d.AccessionNumber == "ACC42" and str(d.PatientName) == "SYNTHETIC^PATIENT" for d in sets)
    assert [d.InstanceNumber for d in sets] == [1, 2, 3]

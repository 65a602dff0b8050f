"""The DICOM reading policy the gateway and the worker share (worker/contract.py)."""

import warnings
from io import BytesIO

import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from worker.contract import quiet_pydicom


def test_quiet_pydicom_stops_warnings_that_quote_element_values(monkeypatch):
    """A malformed value (a name typed into a UID field, say) must not reach the logs verbatim."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.settings.reading_validation_mode)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    ds = Dataset()
    ds.StudyInstanceUID = "Doe^Jane"
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("always")
        pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
        str(read_dataset(BytesIO(encoded.getvalue()), False, True).StudyInstanceUID)
    assert any("Doe^Jane" in str(w.message) for w in before), "the case this guards against"
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        quiet_pydicom()
        str(read_dataset(BytesIO(encoded.getvalue()), False, True).StudyInstanceUID)
    assert not [w for w in after if "Doe" in str(w.message)]


def test_quiet_pydicom_keeps_pydicom_s_own_log_lines_out_too(caplog):
    """pydicom's warn_and_log writes each warning to its "pydicom" logger as well: the warnings filter alone
    let `Unknown encoding 'DOE^JOHN MRN12345'` (a Specific Character Set holds any text) into the log.
    The gateway (`dicom-gateway run`) and the worker both call this function before reading DICOM."""
    import logging

    from pydicom.charset import convert_encodings

    logger = logging.getLogger("pydicom")
    level = logger.level
    try:
        with warnings.catch_warnings():
            quiet_pydicom()
            with caplog.at_level(logging.DEBUG):  # the root's level: pydicom's own must still hold them back
                convert_encodings(["DOE^JOHN MRN12345"])
                logger.error("structural problem")  # errors (no element values) still reach the log
    finally:
        logger.setLevel(level)
    assert "MRN12345" not in caplog.text
    assert "structural problem" in caplog.text

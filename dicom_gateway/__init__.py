"""dicom_gateway."""

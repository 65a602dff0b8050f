"""Tests of the DICOM gateway (issue #4)."""

"""Celery worker: spool DICOM -> selection -> ONNX inference -> one result row per instance (Study + SOP Instance UID)."""

"""Celery worker: spool DICOM -> selection -> ONNX inference -> one result row per SOP Instance UID."""

"""Names shared with the DICOM gateway, which sends tasks by name and never imports worker code.

This module must stay import-light (standard library only): the gateway imports it.
"""

from __future__ import annotations

QUEUE = "triage"
"""Celery queue both sides use."""

PROCESS_INSTANCE = "triage.process_instance"
"""args: (spool_relpath: str, sop_instance_uid: str); kwargs: received_at (ISO-8601 UTC)."""

FINALIZE_STUDY = "triage.finalize_study"
"""args: (study_instance_uid: str); kwargs: last_received_at (ISO-8601 UTC)."""

SPOOL_INCOMING = "incoming"
SPOOL_PENDING = "pending"
SPOOL_ARCHIVE = "archive"


def pending_relpath(study_instance_uid: str, sop_instance_uid: str) -> str:
    """Spool-relative path of an outstanding instance: pending/<StudyUID>/<SOPUID>.dcm."""
    return f"{SPOOL_PENDING}/{study_instance_uid}/{sop_instance_uid}.dcm"


def quiet_pydicom() -> None:
    """Stop pydicom from warning about invalid element values: such warnings quote the value, which
    may be a patient name, and bypass the JSON logs. Both processes read DICOM under this policy;
    validation still happens where it matters (UIDs, pixel decoding). pydicom is imported here,
    inside the call, so the module itself stays standard-library only."""
    import warnings

    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module="pydicom")


BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
"""Broker URL schemes both sides accept: Redis over TCP, TLS or a Unix socket, and Redis Sentinel."""


def check_broker_url(value: str) -> str:
    """Refuse a broker URL that is not Redis's: Celery reads `127.0.0.1:6379/0` (no scheme) as an AMQP
    host and retries for ever, while the gateway answered Success and only its readiness probe showed it."""
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme not in BROKER_SCHEMES:
        raise ValueError(f"broker_url must start with one of {', '.join(s + '://' for s in BROKER_SCHEMES)} "
                         "(e.g. redis://127.0.0.1:6379/0)")
    return value

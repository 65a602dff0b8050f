"""Structured (JSON lines) logging with association and UID references, never patient data.

Why a whitelist of fields: log records carry only what a handler explicitly passes in
`extra=` (association id, AE titles, peer address, UIDs, statuses, sizes). Datasets are
never formatted into messages, and pynetdicom's own logger is kept at WARNING because
its debug output can dump dataset contents.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = (
    "assoc", "calling_ae", "called_ae", "peer", "study_uid", "sop_uid", "sop_class", "transfer_syntax",
    "status", "reason", "bytes", "relpath", "queued", "task", "error", "port", "counts", "last_received_at",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the whitelisted extras."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            if name in record.__dict__:
                payload[name] = record.__dict__[name]
        if record.exc_info and record.exc_info[0] is not None:
            payload["exc"] = record.exc_info[0].__name__
        return json.dumps(payload, default=str)


def configure(level: str = "INFO") -> None:
    """Route gateway logs as JSON lines to stderr (journald/docker collect them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for noisy in ("celery", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

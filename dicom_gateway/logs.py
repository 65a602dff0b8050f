"""Structured (JSON lines) logging with association and UID references, never patient data.

Why a whitelist of fields: log records carry only what a handler explicitly passes in
`extra=` (association id, AE titles, peer address, UIDs, statuses, sizes). Datasets are
never formatted into messages, and pynetdicom's own logger is kept at WARNING because
its debug output can dump dataset contents. Its warnings and errors quote the offending value of a
command element ("Non-conformant 'Affected SOP Instance UID' value '...'"), and a sender may have
written a name or a record number there: those values are not shown (`redact_values`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

FIELDS = (
    "assoc", "calling_ae", "called_ae", "peer", "study_uid", "sop_uid", "sop_class", "transfer_syntax",
    "status", "reason", "bytes", "relpath", "queued", "task", "error", "port", "counts", "last_received_at",
)


QUOTED_VALUE = re.compile(r"""(\bvalues?\b[^'"\n]{0,40}?)(b?'.*'|b?".*")""", re.IGNORECASE)
"""A quoted value after the word "value" ("value '...'", "value for VR UI: '...'"; the element's name,
quoted before it in pynetdicom's wording, stays). Up to the line's last quote: the libraries quote without
escaping, so a value holding an apostrophe (O'Brien) would end at it."""


def redact_values(message: str) -> str:
    """The message with every value quoted after "value" replaced by "(not shown)"."""
    return QUOTED_VALUE.sub(lambda match: match.group(1) + "(not shown)", message)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the whitelisted extras."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.name.split(".")[0] in ("pynetdicom", "pydicom"):
            payload["msg"] = redact_values(str(payload["msg"]))
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

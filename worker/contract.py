"""Names shared with the DICOM gateway, which sends tasks by name and never imports worker code.

This module must stay import-light (standard library only): the gateway imports it.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlsplit

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
    # pydicom's warn_and_log sends each warning to its "pydicom" logger as well as to `warnings`: the
    # filter above let `Unknown encoding 'DOE^JOHN MRN12345'` (a Specific Character Set holds any text)
    # into the worker's log. Its errors (structural: a bad delimiter, an unsupported encoding) stay.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    # The decoder logs each plugin that fails with a traceback at ERROR, then tries the next: every 12-bit
    # JPEG Extended image (GDCM refuses it, pylibjpeg decodes it) put a false alarm in the log. When no
    # plugin succeeds the decoder raises and the instance is recorded with its reason.
    logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)


BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
"""Broker URL schemes both sides accept: Redis over TCP, TLS or a Unix socket, and Redis Sentinel."""

SSL_URL_PARAMETERS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
"""Query parameters kombu reads from a rediss:// URL; any other one failed at the first connection (a traceback)."""
CERT_REQS_NAMES = frozenset({"required", "optional", "none", "CERT_REQUIRED", "CERT_OPTIONAL", "CERT_NONE"})


def broker_scheme(url: str) -> str:
    """The URL's scheme in lower case ('' without one); for a sentinel list, its first address's."""
    return url.partition("://")[0].lower() if "://" in url else ""


def check_broker_url(value: str) -> str:
    """Refuse a broker URL that is not Redis's or that kombu cannot parse, and return it with each scheme
    in lower case. Why: Celery reads `127.0.0.1:6379/0` (no scheme) as an AMQP host and retries for ever,
    while the gateway answered Success and only its readiness probe showed it; `Redis+Socket://` (kombu
    takes the scheme's case as it is) and a port or database that is not a number passed this check and
    then failed every start with a traceback. No message quotes the URL: it may hold a password."""
    addresses = [_check_broker_address(address) for address in value.split(";")]
    if len(addresses) > 1 and any(broker_scheme(address) != "sentinel" for address in addresses):
        raise ValueError("broker_url may list several addresses (separated by ';') only for sentinel://")
    return ";".join(addresses)


def _check_broker_address(address: str) -> str:
    scheme = broker_scheme(address)
    if scheme not in BROKER_SCHEMES:
        raise ValueError(f"broker_url must start with one of {', '.join(s + '://' for s in BROKER_SCHEMES)} "
                         "(e.g. redis://127.0.0.1:6379/0)")
    address = scheme + address[len(scheme):]
    if scheme == "redis+socket":  # kombu hands the rest (a socket path) to redis-py as it is
        return address
    parts = urlsplit("http" + address[len(scheme):])  # as kombu's url_to_parts parses it
    try:
        parts.port
    except ValueError:
        raise ValueError("broker_url's port must be a number from 0 to 65535 (a '?', '#' or '/' in the password "
                         "must be %-encoded)") from None
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        raise ValueError("broker_url's database (after the host) must be a number, e.g. redis://127.0.0.1:6379/0")
    _check_query(scheme, dict(parse_qsl(parts.query, keep_blank_values=True)))
    return address


def _check_query(scheme: str, query: Mapping[str, str]) -> None:
    """kombu turns ssl_* parameters into TLS options and any other one into an argument it does not take."""
    for key, value in query.items():
        if key == "master_name":
            raise ValueError("broker_url cannot carry master_name: set TRIAGE_BROKER_SENTINEL_MASTER")
        if key not in SSL_URL_PARAMETERS:
            # not named: an unescaped '?' in the password makes the rest of it look like a parameter
            raise ValueError(f"broker_url has a query parameter kombu cannot use: only {', '.join(SSL_URL_PARAMETERS)} "
                             "(with rediss://; a '?', '#' or '/' in the password must be %-encoded)")
        if scheme != "rediss":
            raise ValueError(f"broker_url query parameter {key} needs a rediss:// URL")
        if key == "ssl_cert_reqs" and value not in CERT_REQS_NAMES:
            raise ValueError("broker_url's ssl_cert_reqs must be required, optional or none")


def check_broker_options(url: str, sentinel_master: str | None, sentinel_password: Any, tls_ca: Path | None) -> None:
    """Refuse broker settings that cannot work together, each in one line naming its variables (both settings
    classes call it). Why: without a master name a sentinel:// broker could never be reached (kombu needs it,
    and nothing set it), and a setting that does not apply to the URL's scheme would be ignored in silence."""
    scheme = broker_scheme(url)
    if scheme == "sentinel" and not sentinel_master:
        raise ValueError("a sentinel:// TRIAGE_BROKER_URL needs TRIAGE_BROKER_SENTINEL_MASTER (the master's name in the "
                         "sentinels' `sentinel monitor` line)")
    if scheme != "sentinel" and (sentinel_master or sentinel_password):
        raise ValueError("TRIAGE_BROKER_SENTINEL_MASTER and TRIAGE_BROKER_SENTINEL_PASSWORD apply to a sentinel:// "
                         "TRIAGE_BROKER_URL only")
    if tls_ca is None:
        return
    if scheme != "rediss":
        raise ValueError("TRIAGE_BROKER_TLS_CA applies to a rediss:// TRIAGE_BROKER_URL only")
    if any(key.startswith("ssl_") for key in dict(parse_qsl(urlsplit(url).query))):
        raise ValueError("TRIAGE_BROKER_TLS_CA cannot be combined with ssl_* parameters in TRIAGE_BROKER_URL "
                         "(kombu would use the URL's and ignore it): put ssl_ca_certs in the URL instead")
    if not Path(tls_ca).is_file():
        raise ValueError("TRIAGE_BROKER_TLS_CA is not a readable file")


def broker_celery_options(settings: Any, transport_options: Mapping[str, Any]) -> dict[str, Any]:
    """Celery settings for `settings`' broker: `transport_options` plus the sentinel master (and password),
    and for rediss:// a verified TLS connection (`broker_use_ssl`: certificate required, checked against
    TRIAGE_BROKER_TLS_CA when set, else the system's CAs; ssl_* parameters in the URL take precedence, as
    kombu gives them). Why one helper: the worker, the gateway's publisher and `pneumonia-admin requeue`
    each build a Celery client, and kombu's default for rediss:// is not to verify the server at all."""
    options = dict(transport_options)
    config: dict[str, Any] = {"broker_transport_options": options}
    scheme = broker_scheme(settings.broker_url)
    if scheme == "sentinel":
        options["master_name"] = settings.broker_sentinel_master
        password = _secret(settings.broker_sentinel_password)
        if password:  # redis-py then gives the sentinel connections only these, so the timeouts go too
            options["sentinel_kwargs"] = {**{k: v for k, v in options.items() if k.startswith("socket_")},
                                          "password": password}
    elif scheme == "rediss":
        ca = settings.broker_tls_ca
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca) if ca else None}
    return config


def _secret(value: Any) -> str | None:
    """The text of a pydantic SecretStr (this module imports no pydantic), or of a plain string."""
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value

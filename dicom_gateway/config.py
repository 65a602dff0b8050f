"""Gateway settings: one frozen object, built once from `TRIAGE_*` environment variables.

Why frozen and passed down: every component (SCP handlers, outbox, sweeper, health
check) must agree on the same spool and broker for the lifetime of the process; a
setting that changes under a running listener is how studies get written somewhere
nobody sweeps.
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.contract import check_broker_options, check_broker_url

UID_MAX_LEN = 64
AE_TITLE_MAX_LEN = 16
MIN_PDU = 4096
"""Smallest max PDU accepted (DCMTK's minimum): a smaller one leaves senders unable to send P-DATA."""


def _split_csv(value: Any) -> Any:
    """Accept `A,B` as well as a JSON list (`["A","B"]`) for list settings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


MAX_PDU_FIELD = 0xFFFFFFFF
"""The Maximum Length sub-item is 4 bytes (PS3.8 D.1): a larger value failed every association's answer."""
MAX_ASSOCIATIONS = 1000
"""Upper bound of TRIAGE_GATEWAY_MAX_ASSOCIATIONS: each association is a thread holding up to one instance in
memory (32, the default, of large DX plates peak near 1.5 GiB), and pynetdicom's connection cap and the listen
backlog are multiples of it; a value beyond a C int failed listen() with OverflowError, naming no setting."""
MAX_TIMEOUT_S = 86400.0
"""A day: a timeout beyond threading's limit failed every association (or the start) with OverflowError."""


class GatewaySettings(BaseSettings):
    """All knobs of the DICOM gateway, read once from TRIAGE_* variables (README: gateway configuration table)."""

    # `KEY=` in an env file (deploy/triage.env) means unset, not an empty value: an empty port
    # failed to parse and an empty TLS path became "." (TLS on). No setting may be inf or nan:
    # an infinite sweep interval silently turned off recovery.
    model_config = SettingsConfigDict(env_prefix="TRIAGE_", frozen=True, extra="ignore", env_ignore_empty=True,
                                      allow_inf_nan=False)

    # Shared with the worker (same names, same defaults).
    broker_url: str = "redis://127.0.0.1:6379/0"
    broker_sentinel_master: str | None = None  # sentinel:// only (worker.contract.check_broker_options)
    broker_sentinel_password: SecretStr | None = None
    broker_tls_ca: Path | None = None  # rediss:// only; unset: the system's CAs
    spool_dir: Path = Path("var/spool")

    # Listener.
    gateway_ae_title: str = "TRIAGE"
    gateway_bind: str = "0.0.0.0"
    gateway_port: int = Field(11112, ge=0, le=65535)
    gateway_max_associations: int = Field(32, ge=1, le=MAX_ASSOCIATIONS)
    gateway_max_connections_per_peer: int | None = Field(
        None, ge=1, description="open connections one source IP may hold; unset = half of pynetdicom's connection cap")
    gateway_max_pdu: int = Field(262144, ge=0, le=MAX_PDU_FIELD,
                                 description="max PDU we receive; 0 = unlimited, else at least 4096")
    gateway_acse_timeout: float = Field(30.0, gt=0, le=MAX_TIMEOUT_S)
    gateway_dimse_timeout: float = Field(60.0, gt=0, le=MAX_TIMEOUT_S)
    gateway_network_timeout: float = Field(60.0, gt=0, le=MAX_TIMEOUT_S)
    gateway_require_called_ae: bool = True
    gateway_allowed_calling_aes: CsvList = Field(default_factory=list)
    gateway_allowed_ips: CsvList = Field(default_factory=list)
    gateway_accept_secondary_capture: bool = False

    # Durability and study grouping.
    gateway_stable_study_seconds: float = Field(60.0, gt=0)
    gateway_sweep_interval_seconds: float = Field(30.0, gt=0)
    gateway_sweep_grace_seconds: float = Field(120.0, ge=0)
    gateway_requeue_after_seconds: float = Field(1800.0, gt=0)
    gateway_min_free_bytes: int = Field(2 * 1024**3, ge=0)
    gateway_broker_timeout_seconds: float = Field(2.0, gt=0, le=MAX_TIMEOUT_S)
    gateway_broker_backoff_seconds: float = Field(5.0, ge=0)

    # DICOM TLS (PS3.15 B.1): cert+key enable TLS; a CA additionally requires client certs.
    gateway_tls_cert: Path | None = None
    gateway_tls_key: Path | None = None
    gateway_tls_ca: Path | None = None

    # HTTP liveness/readiness/status/metrics (dicom_gateway/http_status.py); unset = off.
    gateway_http_bind: str = "127.0.0.1"
    gateway_http_port: int | None = Field(None, ge=0, le=65535)

    gateway_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("broker_url")
    @classmethod
    def _redis_broker(cls, value: str) -> str:
        return check_broker_url(value)

    @field_validator("gateway_allowed_calling_aes", "gateway_allowed_ips", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("gateway_max_pdu")
    @classmethod
    def _pdu(cls, value: int) -> int:
        if 0 < value < MIN_PDU:  # DCMTK and pynetdicom senders cannot send P-DATA into a smaller PDU
            raise ValueError(f"max PDU must be 0 (unlimited) or at least {MIN_PDU}, got {value}")
        return value

    @field_validator("gateway_log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("gateway_ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("gateway_allowed_calling_aes")
    @classmethod
    def _ae_titles(cls, value: list[str]) -> list[str]:
        return [check_ae_title(v) for v in value]

    @field_validator("gateway_allowed_ips")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # raises ValueError with the bad entry
        return value

    @model_validator(mode="after")
    def _broker_options(self) -> "GatewaySettings":
        check_broker_options(self.broker_url, self.broker_sentinel_master, self.broker_sentinel_password,
                             self.broker_tls_ca)
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> "GatewaySettings":
        if (self.gateway_tls_cert is None) != (self.gateway_tls_key is None):
            raise ValueError("TRIAGE_GATEWAY_TLS_CERT and TRIAGE_GATEWAY_TLS_KEY must be set together")
        if self.gateway_tls_ca is not None and self.gateway_tls_cert is None:
            raise ValueError("TRIAGE_GATEWAY_TLS_CA needs TRIAGE_GATEWAY_TLS_CERT/KEY")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.gateway_tls_cert is not None

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """Parsed source-IP allow-list (empty = any address)."""
        return [ipaddress.ip_network(item, strict=False) for item in self.gateway_allowed_ips]


def check_ae_title(value: str) -> str:
    """AE titles are 1-16 printable ASCII chars, no backslash (PS3.5 AE VR)."""
    title = value.strip()
    if not title or len(title) > AE_TITLE_MAX_LEN:
        raise ValueError(f"AE title must be 1..{AE_TITLE_MAX_LEN} characters, got {value!r}")
    if any(ord(c) < 0x20 or ord(c) > 0x7E or c == "\\" for c in title):
        raise ValueError(f"AE title has characters outside the AE VR repertoire: {value!r}")
    return title


def ae_title_argument(text: str) -> str:
    """`check_ae_title` as an argparse type: pynetdicom's own refusal was a traceback and exit 1, which a
    container healthcheck reads as an unhealthy gateway."""
    try:
        return check_ae_title(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class StartupError(RuntimeError):
    """A start-up failure pinned on the setting and value at fault.

    Why: the bare OSError said "[Errno 2] No such file or directory" or "Address already in use" with
    neither the file nor the port, and a gateway has several of each (TLS cert, key and CA; the DICOM and
    HTTP ports). `dicom-gateway run` logs the message as it is, on its one "cannot start" line."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"{what}: {type(cause).__name__}: {cause}")


def endpoint(host: str, port: int) -> str:
    """`host:port` as people write it, an IPv6 address in brackets (`[::]:11112`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_settings(**overrides: Any) -> GatewaySettings:
    """Build the settings once (environment, then explicit overrides for tests/CLI flags)."""
    return GatewaySettings(**overrides)

"""Typed worker configuration, read once from `TRIAGE_*` environment variables.

One frozen `WorkerSettings` object is built at start-up and passed down explicitly, so
every component sees the same values and tests can build their own without touching
process-wide state.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from models.dicom_io import LutShapeConflict
from worker.contract import check_broker_options, check_broker_url

DEFAULT_FLAG_MAP = {
    "high_suspicion": "URGENT",
    "indeterminate": "PRIORITY",
    "likely_normal": "ROUTINE",
}
STRATUM_SEVERITY = {"likely_normal": 0, "indeterminate": 1, "high_suspicion": 2}
"""Rank used for the study-level flag: the most severe frontal image decides."""
FLAG_MAX_LENGTH = 32
"""The `flag` columns' width (worker/db.py): a longer flag would fail to store on PostgreSQL."""
NOT_TRIAGED = "NOT_TRIAGED"
"""A study's `worklist_flag` while the model makes no claim that it may wait: not `triage_complete` and no image
scored above the lowest stratum. Why: the flag comes from the images that were scored, so a study whose second
image failed, waits or could not be told a frontal chest read ROUTINE from its first, and a RIS mapping the flag
to a priority filed it low (`list --studies --flag ROUTINE` returned it). An URGENT or PRIORITY image raises its
study at once, complete or not: a missing image can only add findings, never remove that one. Reserved: no
TRIAGE_FLAG_MAP flag may be spelt so."""
GATEWAY_PREFIX = "TRIAGE_GATEWAY_"
"""The gateway's own settings; every other `TRIAGE_*` name is the worker's (or both services')."""
COMPOSE_ONLY_VARIABLES = frozenset({"TRIAGE_DB_PASSWORD"})
"""Read by docker compose from deploy/.env to build the database URL, by no service."""


def _letters(text: str) -> str:
    """`text` without case, spaces or punctuation: "Not-Triaged" and "NOT TRIAGED" read as NOT_TRIAGED."""
    return "".join(c for c in text.casefold() if c.isalnum())


def names_not_triaged(text: str) -> bool:
    """Whether `text` spells NOT_TRIAGED in any case, spacing or punctuation (no flag map may hold it)."""
    return _letters(text) == _letters(NOT_TRIAGED)


class WorkerSettings(BaseSettings):
    """Everything the worker, its CLI and the admin CLI need to know."""

    model_config = SettingsConfigDict(env_prefix="TRIAGE_", frozen=True, extra="ignore", env_ignore_empty=True)
    """An empty variable is an unset one, as for the gateway: `TRIAGE_SITE_CALIBRATION=` in the shared
    triage.env reverted the calibration to the path '.' and the worker refused to start."""

    broker_url: str = "redis://127.0.0.1:6379/0"
    broker_sentinel_master: str | None = None
    """The master's name for a sentinel:// broker (required there, refused elsewhere); shared with the gateway."""
    broker_sentinel_password: SecretStr | None = None
    """The sentinels' own password (their `requirepass`), if any; the master's goes in the URL."""
    broker_tls_ca: Path | None = None
    """CA certificate(s), PEM, that a rediss:// broker's certificate must chain to; unset: the system's CAs."""
    database_url: str = "sqlite:///var/triage.db"
    spool_dir: Path = Path("var/spool")
    spool_retention: Literal["archive", "delete"] = "archive"
    model_path: Path | None = None
    """None means the packaged model (`models.card.default_model_path()`)."""
    site_calibration: Path | None = None
    """A site calibration for this model (`pneumonia-worker calibrate`); None keeps the card's own."""

    presentation_lut_conflict: LutShapeConflict = "refuse"
    """A Presentation LUT Shape that contradicts the Photometric Interpretation: refuse the image, or
    follow one of the two for a modality known to write the other wrongly (`models.dicom_io`)."""
    polarity_check: Literal["refuse", "off"] = "refuse"
    """An image whose pixels look inverted (bright lungs) or stored turned by 90 or 180 degrees (`models.polarity`):
    refuse it (row `failed` with the reason, the study not `triage_complete`), or score it as it is, for a site
    whose images the check misreads."""
    missing_tag_policy: Literal["skip", "process"] = "skip"
    """What to do when BodyPartExamined or ViewPosition is absent: skip with a reason, or process."""
    flag_map: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_FLAG_MAP))
    """Stratum -> worklist flag; JSON in the environment (TRIAGE_FLAG_MAP)."""

    soft_time_limit_s: int = Field(120, ge=1)
    time_limit_s: int = 180
    visibility_timeout_s: int = 3600
    """Must exceed the longest task, or Redis redelivers a task that is still running."""
    unacked_restore_interval_s: int = Field(10, ge=1)
    """How often a worker looks for unacknowledged messages of dead workers to restore."""
    stall_exit_s: int = Field(300, ge=0)
    """A worker that holds for this long a delivery no task of it owns (an ack lost), or receives nothing for this
    long while messages wait in the queue, stops with exit status 75 for its supervisor to restart it
    (`worker.watchdog`); 0 turns the watchdog off. Must exceed `time_limit_s`: a pool busy with slow images
    receives nothing until one ends."""
    max_retries: int = Field(30, ge=0)
    retry_backoff_max_s: int = Field(60, ge=1)
    max_attempts: int = Field(3, ge=1)
    """Worker-lost redeliveries allowed before an instance is failed as a poison message."""
    concurrency: int = Field(1, ge=1)
    intra_op_threads: int = Field(0, ge=0)
    execution_provider: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when onnxruntime can start it, else CPU; cpu: CPU only; cuda: CUDA or refuse to run."""
    migrate_on_start: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def refuses_misoriented(self) -> bool:
        """`polarity_check` as the detector takes it (`PneumoniaDetector(polarity_check=...)`)."""
        return self.polarity_check == "refuse"

    @field_validator("broker_url")
    @classmethod
    def _redis_broker(cls, value: str) -> str:
        return check_broker_url(value)

    @model_validator(mode="after")
    def _broker_options(self) -> "WorkerSettings":
        check_broker_options(self.broker_url, self.broker_sentinel_master, self.broker_sentinel_password,
                             self.broker_tls_ca)
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        """Any case, as Celery's --loglevel and the gateway take it: logging refuses `debug` (a traceback
        from every command, a restart loop under compose)."""
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("flag_map")
    @classmethod
    def _all_strata_mapped(cls, value: dict[str, str]) -> dict[str, str]:
        missing = set(STRATUM_SEVERITY) - set(value)
        if missing:
            raise ValueError(f"flag_map lacks strata: {sorted(missing)}")
        unfit = sorted(s for s, flag in value.items() if not flag.strip() or len(flag) > FLAG_MAX_LENGTH)
        if unfit:  # PostgreSQL refuses an over-long value at the INSERT, i.e. for every such image
            raise ValueError(f"flag_map: the flags of {unfit} must be 1 to {FLAG_MAX_LENGTH} characters")
        reserved = sorted(s for s, flag in value.items() if names_not_triaged(flag))
        if reserved:  # a study's worklist_flag says NOT_TRIAGED when not complete: the two would read alike
            raise ValueError(f"flag_map: the flags of {reserved} are spelt {NOT_TRIAGED}, which the study worklist "
                             "reserves for studies not triage_complete")
        padded = sorted(s for s, flag in value.items() if flag != flag.strip())
        if padded:  # " URGENT" was stored as written, and a worklist filtering on URGENT never showed it
            raise ValueError(f"flag_map: the flags of {padded} begin or end with spaces")
        return value

    @field_validator("time_limit_s")
    @classmethod
    def _hard_after_soft(cls, value: int, info) -> int:  # type: ignore[no-untyped-def]
        soft = info.data.get("soft_time_limit_s", 0)
        if value <= soft:
            raise ValueError("time_limit_s must exceed soft_time_limit_s")
        return value

    @field_validator("visibility_timeout_s")
    @classmethod
    def _visibility_beyond_tasks(cls, value: int, info) -> int:  # type: ignore[no-untyped-def]
        if value <= info.data.get("time_limit_s", 0):
            raise ValueError("visibility_timeout_s must exceed time_limit_s")
        return value

    @model_validator(mode="after")
    def _retries_within_visibility(self) -> "WorkerSettings":
        """A retry (countdown up to `retry_backoff_max_s`) waits in the worker unacknowledged, then runs for up to
        `time_limit_s`; Redis redelivers a message unacknowledged for `visibility_timeout_s`. A longer wait was
        accepted (`TRIAGE_RETRY_BACKOFF_MAX_S=3600`, "retry hourly", with the default 3600): every waiting retry
        was redelivered and then ran twice, each copy retrying again, so the messages of a study whose finalize
        waits (or of an instance during a database outage) doubled at every backoff, without end."""
        if self.visibility_timeout_s <= self.time_limit_s + self.retry_backoff_max_s:
            raise ValueError("TRIAGE_VISIBILITY_TIMEOUT_S must exceed TRIAGE_TIME_LIMIT_S plus "
                             "TRIAGE_RETRY_BACKOFF_MAX_S (a retry waiting longer is redelivered and runs twice)")
        if 0 < self.stall_exit_s <= self.time_limit_s:
            raise ValueError("TRIAGE_STALL_EXIT_S must exceed TRIAGE_TIME_LIMIT_S (a pool busy with slow images "
                             "receives nothing until one ends), or be 0 to turn the watchdog off")
        return self

    def resolved_model_path(self) -> Path:
        from models.card import default_model_path

        return Path(self.model_path) if self.model_path else default_model_path()


def setting_names(settings_class: type[BaseSettings]) -> frozenset[str]:
    """The environment names a `TRIAGE_`-prefixed settings class reads."""
    return frozenset(f"TRIAGE_{name.upper()}" for name in settings_class.model_fields)


def unread_variables(environ: Mapping[str, str], known: Iterable[str], *, gateway: bool) -> list[str]:
    """One warning for each `TRIAGE_*` variable of this service that no setting reads.

    Why: pydantic-settings ignores names it does not know, so a misspelt variable is dropped in
    silence; `TRIAGE_GATEWAY_ALLOWED_CALLING_AE` (no S) would leave the allow-list empty and let
    every caller in. The worker checks every name but the `TRIAGE_GATEWAY_*` ones; the gateway
    checks them all, against `known` = its own names and the worker's (it reads the shared
    `TRIAGE_SPOOL_DIR` and `TRIAGE_BROKER_URL` too, and a misspelt one on a gateway-only host sent its
    spool to ./var/spool in silence), so that neither warns about the other's settings.
    """
    known = set(known) | COMPOSE_ONLY_VARIABLES
    warnings = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings matches names in any case
        if not upper.startswith("TRIAGE_") or (upper.startswith(GATEWAY_PREFIX) and not gateway) or upper in known:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"environment variable {name} is not a setting and is ignored{hint}")
    return warnings


def settings_problems(exc: Exception) -> list[str]:
    """One line per invalid setting, naming its variable and never quoting its value.

    Why not `str(exc)`: pydantic quotes each input, and a database or broker URL carries its
    password into the log or the terminal scrollback.
    """
    errors = getattr(exc, "errors", None)
    if not callable(errors):  # pydantic-settings' SettingsError: a mapping's value is not valid JSON
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"TRIAGE_{field.group(1).upper()}" if field else "a setting"
        return [f"{name}: cannot be parsed ({type(exc.__cause__ or exc).__name__}; a mapping is written as JSON)"]
    lines = []
    for error in errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        lines.append(f"TRIAGE_{field.upper()}: {error['msg']}" if field else error["msg"])
    return lines


def invalid_settings_message(prog: str, exc: Exception) -> str:
    """What a command prints (exit 2) when its settings do not validate: one line per variable."""
    return f"{prog}: invalid settings:\n" + "\n".join(f"  {line}" for line in settings_problems(exc))


def load_worker_settings(prog: str) -> WorkerSettings | None:
    """The worker's settings, with a warning on stderr for each `TRIAGE_*` name no setting reads;
    None after printing what is invalid (the command then exits 2)."""
    try:
        settings = WorkerSettings()
    except (ValidationError, SettingsError) as exc:
        print(invalid_settings_message(prog, exc), file=sys.stderr)
        return None
    for warning in unread_variables(os.environ, setting_names(WorkerSettings), gateway=False):
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    return settings

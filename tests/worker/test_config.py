"""Settings come from TRIAGE_* variables, are frozen and refuse unsafe combinations."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.config import DEFAULT_FLAG_MAP, WorkerSettings


def test_defaults_match_the_gateway_contract(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("TRIAGE_"):
            monkeypatch.delenv(key)
    s = WorkerSettings()
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.database_url == "sqlite:///var/triage.db"
    assert str(s.spool_dir) == "var/spool"
    assert s.flag_map == DEFAULT_FLAG_MAP
    assert s.resolved_model_path().name == "pneumonia_resnet50.onnx"


def test_environment_overrides_and_frozen(monkeypatch):
    monkeypatch.setenv("TRIAGE_FLAG_MAP", '{"high_suspicion": "STAT", "indeterminate": "P2", "likely_normal": "P3"}')
    monkeypatch.setenv("TRIAGE_SPOOL_RETENTION", "delete")
    s = WorkerSettings()
    assert s.flag_map["high_suspicion"] == "STAT" and s.spool_retention == "delete"
    with pytest.raises(ValidationError):
        s.broker_url = "redis://elsewhere"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kw",
    [
        {"flag_map": {"high_suspicion": "URGENT"}},
        {"flag_map": {**DEFAULT_FLAG_MAP, "high_suspicion": "URGENT - possible pneumonia, read first"}},
        {"flag_map": {**DEFAULT_FLAG_MAP, "likely_normal": " "}},
        {"flag_map": {**DEFAULT_FLAG_MAP, "likely_normal": "not_triaged"}},  # the study worklist's own word
        {"flag_map": {**DEFAULT_FLAG_MAP, "indeterminate": "Not Triaged"}},
        {"soft_time_limit_s": 100, "time_limit_s": 50},
        {"time_limit_s": 200, "visibility_timeout_s": 100},
        {"spool_retention": "shred"},
        {"missing_tag_policy": "guess"},
        {"max_attempts": 0},  # the first delivery already exceeded it: every instance failed unscored
        {"max_retries": -1},
        {"retry_backoff_max_s": 0},  # retries spun without a pause
        {"concurrency": 0},
        {"soft_time_limit_s": 0, "time_limit_s": 10},
        {"unacked_restore_interval_s": 0},
        {"intra_op_threads": -1},
        {"broker_url": "127.0.0.1:6379/0"},  # no scheme: Celery took it for an AMQP host and retried for ever
        {"broker_url": "amqp://guest@127.0.0.1//"},  # the gateway publishes to Redis only
    ],
)
def test_unsafe_settings_are_refused(kw):
    with pytest.raises(ValidationError):
        WorkerSettings(**kw)


def test_contract_module_is_light():
    import subprocess
    import sys

    code = "import sys, worker.contract; bad = {'celery','sqlalchemy','onnxruntime','torch','numpy'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unread_variables_name_the_typo_and_the_setting_meant():
    from dicom_gateway.config import GatewaySettings
    from worker.config import setting_names, unread_variables

    environ = {
        "TRIAGE_GATEWAY_ALLOWED_CALLING_AE": "PACS",  # the gateway's, misspelt
        "TRIAGE_MISSING_TAGS_POLICY": "process",  # the worker's, misspelt
        "triage_log_level": "debug",  # read (any case)
        "TRIAGE_BROKER_URL": "redis://r:6379/0",  # read by both
        "TRIAGE_DB_PASSWORD": "x",  # compose's, read by no service
        "TRIAGE_CONCURRENCY": "2",  # the worker's only: no warning from the gateway
        "PATH": "/usr/bin",
    }
    gateway = unread_variables(environ, setting_names(GatewaySettings) | setting_names(WorkerSettings), gateway=True)
    worker = unread_variables(environ, setting_names(WorkerSettings), gateway=False)
    assert gateway == ["environment variable TRIAGE_GATEWAY_ALLOWED_CALLING_AE is not a setting and is ignored; "
                       "did you mean TRIAGE_GATEWAY_ALLOWED_CALLING_AES?",
                       "environment variable TRIAGE_MISSING_TAGS_POLICY is not a setting and is ignored; "
                       "did you mean TRIAGE_MISSING_TAG_POLICY?"]  # a typo of a shared name matters on its host too
    assert worker == ["environment variable TRIAGE_MISSING_TAGS_POLICY is not a setting and is ignored; "
                      "did you mean TRIAGE_MISSING_TAG_POLICY?"]


def test_every_command_warns_about_a_misspelt_variable(tmp_path):
    """The services and the admin tool, as started in production, say which variable they ignore."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(TRIAGE_GATEWAY_ALLOWED_CALLING_AE="PACS", TRIAGE_SPOOL_RETENTON="delete", TRIAGE_BROKER_ULR="redis://x",
               TRIAGE_SPOOL_DIR=str(tmp_path / "spool"), TRIAGE_DATABASE_URL=f"sqlite:///{tmp_path / 't.db'}")
    commands = {
        "dicom_gateway.cli": (["--spool-dir", str(tmp_path / "spool"), "sweep", "--min-age", "1e9"],
                              "TRIAGE_GATEWAY_ALLOWED_CALLING_AES?"),
        "dicom_gateway.cli ": (["--spool-dir", str(tmp_path / "spool"), "sweep", "--min-age", "1e9"],
                               "TRIAGE_BROKER_URL?"),  # a shared name's typo, on a gateway-only host
        "worker.cli": (["migrate"], "TRIAGE_SPOOL_RETENTION?"),
        "worker.admin": (["prune-archive", "--older-than-days", "30", "--dry-run"], "TRIAGE_SPOOL_RETENTION?"),
    }
    (tmp_path / "spool" / "pending").mkdir(parents=True)  # sweep refuses a spool that is not there
    for module, (args, meant) in commands.items():
        out = subprocess.run([sys.executable, "-m", module.strip(), *args], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (module, out.stderr)
        assert f"did you mean {meant}" in out.stderr + out.stdout, (module, out.stderr)


def test_an_empty_variable_is_an_unset_one(monkeypatch):
    """`TRIAGE_SITE_CALIBRATION=` in the shared triage.env (the gateway reads that as unset) became the path
    '.', and the worker refused to start: a restart loop under compose."""
    monkeypatch.setenv("TRIAGE_SITE_CALIBRATION", "")
    monkeypatch.setenv("TRIAGE_MODEL_PATH", "")
    settings = WorkerSettings()
    assert settings.site_calibration is None and settings.model_path is None


@pytest.mark.parametrize("value", ["0", "-3"])
def test_run_refuses_a_concurrency_below_one_before_anything_runs(value):
    """`-c 0` fell back to TRIAGE_CONCURRENCY unannounced; `-c -3` migrated, then failed in Celery."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "worker.cli", "run", "-c", value], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "TRIAGE_DATABASE_URL": "sqlite:////nonexistent/x.db"})
    assert done.returncode == 2 and f"must be 1 or more, got {value}" in done.stderr and "Traceback" not in done.stderr

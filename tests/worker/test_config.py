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
        {"soft_time_limit_s": 100, "time_limit_s": 50},
        {"time_limit_s": 200, "visibility_timeout_s": 100},
        {"spool_retention": "shred"},
        {"missing_tag_policy": "guess"},
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

"""The shipped site configuration (deploy/triage.env) is valid and lets the containers' own probes in."""

from __future__ import annotations

import os
from pathlib import Path

from dicom_gateway.config import GatewaySettings
from dicom_gateway.health import HEALTH_CALLING_AE
from worker.config import WorkerSettings, setting_names

SITE_ENV = Path(__file__).resolve().parents[2] / "deploy" / "triage.env"


def test_site_env_parses_and_admits_the_health_probe(monkeypatch):
    for name in [n for n in os.environ if n.startswith("TRIAGE_")]:
        monkeypatch.delenv(name)
    settings = GatewaySettings(_env_file=SITE_ENV)
    allowed = settings.gateway_allowed_calling_aes
    assert allowed, "the shipped site file must keep a calling-AE allow-list (empty lets every caller in)"
    assert HEALTH_CALLING_AE in allowed, (
        "docker-compose's healthcheck runs `dicom-gateway health`, which calls in as "
        f"{HEALTH_CALLING_AE}; an allow-list without it keeps the gateway container unhealthy")


def test_every_name_in_the_site_env_is_read_by_a_service():
    """A misspelt name is ignored by the settings (a typo in the allow-list's name admits every caller)."""
    names = [line.split("=", 1)[0].strip() for line in SITE_ENV.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert "TRIAGE_GATEWAY_ALLOWED_CALLING_AES" in names
    known = setting_names(GatewaySettings) | setting_names(WorkerSettings)
    assert [name for name in names if name not in known] == []

"""The shipped site configuration (deploy/triage.env) is valid and lets the containers' own probes in."""

from __future__ import annotations

import os
from pathlib import Path

from dicom_gateway.config import GatewaySettings
from dicom_gateway.health import HEALTH_CALLING_AE

SITE_ENV = Path(__file__).resolve().parents[2] / "deploy" / "triage.env"


def test_site_env_parses_and_admits_the_health_probe(monkeypatch):
    for name in [n for n in os.environ if n.startswith("TRIAGE_")]:
        monkeypatch.delenv(name)
    settings = GatewaySettings(_env_file=SITE_ENV)
    allowed = settings.gateway_allowed_calling_aes
    assert not allowed or HEALTH_CALLING_AE in allowed, (
        "docker-compose's healthcheck runs `dicom-gateway health`, which calls in as "
        f"{HEALTH_CALLING_AE}; an allow-list without it keeps the gateway container unhealthy")

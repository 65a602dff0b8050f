"""Static checks of deploy/: what `docker compose up` needs from the image and the committed files.

No Docker engine runs in CI, so these read the files the way compose and the Dockerfile would.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from worker.config import WorkerSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def built_services() -> dict[str, dict]:
    return {name: service for name, service in COMPOSE["services"].items() if "build" in service}


def directories_made_for_triage() -> set[str]:
    """Paths the Dockerfile creates in a RUN that also hands /srv/triage to the triage user."""
    runs = re.findall(r"^RUN (.*?)(?<!\\)$", DOCKERFILE, flags=re.M | re.S)
    made: set[str] = set()
    for run in runs:
        if "chown -R triage /srv/triage" in run:
            for mkdir in re.findall(r"mkdir -p ([^&]+)", run):
                made.update(mkdir.split())
    return made


@pytest.mark.parametrize("service", sorted(built_services()))
def test_named_volume_mount_points_exist_in_the_image_owned_by_triage(service):
    """Docker creates a missing mount point root-owned; the services run as triage and must write there."""
    named = set(COMPOSE.get("volumes", {}))
    for volume in built_services()[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source in named:
            assert target in directories_made_for_triage(), f"{service}: {target} is not made and chowned in the image"


def test_no_database_password_is_committed():
    postgres = COMPOSE["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"].startswith("${TRIAGE_DB_PASSWORD:?")
    for name, service in built_services().items():
        url = service.get("environment", {}).get("TRIAGE_DATABASE_URL")
        assert url is None or "${TRIAGE_DB_PASSWORD:?" in url, name
    assert "TRIAGE_DATABASE_URL=" not in (DEPLOY / "triage.env").read_text().replace("# TRIAGE_DATABASE_URL", "")
    example = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example == {"TRIAGE_DB_PASSWORD": ""}, "the example must not ship a usable password"


def test_workers_wait_for_a_healthy_database():
    """They migrate the schema at start; started before PostgreSQL accepts connections they crash-loop."""
    assert "healthcheck" in COMPOSE["services"]["postgres"]
    assert COMPOSE["services"]["worker"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_compose_environment_names_real_settings():
    fields = {f"TRIAGE_{name.upper()}" for name in WorkerSettings.model_fields}
    for name, service in built_services().items():
        for key in service.get("environment", {}):
            assert key in fields, f"{name}: {key} is read by nothing"


def test_the_gpu_override_builds_the_gpu_extra_gives_the_worker_a_gpu_and_refuses_the_cpu():
    """`-f docker-compose.gpu.yml` must change exactly what a GPU host needs, with names that exist."""
    worker = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())["services"]["worker"]
    assert worker["build"]["args"]["EXTRA"] == "gpu" and "ARG EXTRA" in DOCKERFILE
    assert 'pip install --no-cache-dir ".[${EXTRA}]"' in DOCKERFILE
    assert worker["environment"] == {"TRIAGE_EXECUTION_PROVIDER": "cuda"}
    assert "cuda" in WorkerSettings.model_fields["execution_provider"].annotation.__args__
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert worker["build"]["dockerfile"] == COMPOSE["services"]["worker"]["build"]["dockerfile"]

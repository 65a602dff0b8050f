"""Static checks of deploy/: what `docker compose up` needs from the image and the committed files.

No Docker engine runs in CI, so these read the files the way compose and the Dockerfile would.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dicom_gateway.config import GatewaySettings
from worker.config import WorkerSettings, setting_names

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


def test_every_service_that_reads_the_results_gets_the_database_url():
    """The SR sender shipped without the worker's TRIAGE_DATABASE_URL: it fell back to the embedded SQLite file,
    found none, exited 3 and restarted without end (final read). Every service running a command that reads the
    results (all but the gateway and the archive pruner) names the PostgreSQL service."""
    for name, service in built_services().items():
        command = service.get("command", [])
        if command[:1] == ["pneumonia-worker"] or (command[:1] == ["pneumonia-admin"] and "prune-archive" not in command):
            url = service.get("environment", {}).get("TRIAGE_DATABASE_URL", "")
            assert "@postgres:5432/" in url, name
            assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}, name


def test_workers_wait_for_a_healthy_database():
    """They migrate the schema at start; started before PostgreSQL accepts connections they crash-loop."""
    assert "healthcheck" in COMPOSE["services"]["postgres"]
    assert COMPOSE["services"]["worker"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_the_database_healthcheck_probes_the_tcp_port_the_workers_connect_to():
    """pg_isready without a host asks the Unix socket, which the postgres image's first-start server (initdb, the
    database and role being created) listens on alone: the service read healthy before it took TCP connections,
    and on a fresh volume the workers started, found `postgres:5432` refusing and exited 3 to be restarted."""
    test = COMPOSE["services"]["postgres"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "pg_isready", test
    args = test[2:]
    host = next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-h", "--host")),
                next((arg.split("=", 1)[1] for arg in args if arg.startswith("--host=")), None))
    assert host in ("127.0.0.1", "localhost"), f"the healthcheck asks the Unix socket, not TCP: {test}"
    port = next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-p", "--port")), "5432")
    url = COMPOSE["services"]["worker"]["environment"]["TRIAGE_DATABASE_URL"]
    assert f"@postgres:{port}/" in url


def test_compose_environment_names_real_settings():
    fields = setting_names(WorkerSettings) | setting_names(GatewaySettings)
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


def memory_bytes(text: str) -> int:
    """A compose memory value ("3g", "512m") in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kmg]?)b?", str(text).lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


def test_every_service_built_from_the_image_has_a_memory_cap():
    """One oversized image must not take the host, and Redis and PostgreSQL with it."""
    for name, service in built_services().items():
        assert memory_bytes(service["deploy"]["resources"]["limits"]["memory"]) > 0, name


def test_the_worker_cap_holds_an_8192_pixel_plate_with_its_celery_main_process():
    """Measured, not guessed: the pool process's peak on an 8192^2 CR (benchmarks/worker_memory.py) plus
    256 MiB for the Celery main process (about 130 MiB measured) must fit under the cap."""
    measured = json.loads((DEPLOY.parent / "benchmarks" / "results" / "worker_memory.json").read_text())
    peak = measured["sizes"]["8192"]["peak_bytes"]
    cap = memory_bytes(COMPOSE["services"]["worker"]["deploy"]["resources"]["limits"]["memory"])
    assert peak + 256 * 1024**2 <= cap, (peak, cap)
    assert COMPOSE["services"]["worker"]["deploy"]["replicas"] == 2


def test_the_archive_pruner_gets_sigterm_as_pid_1():
    """pneumonia-admin prune-archive installs no SIGTERM handler; as a container's PID 1 the kernel does not
    deliver the signal, and every stop waited the grace period for a SIGKILL. An init process forwards it."""
    assert COMPOSE["services"]["archive-pruner"].get("init") is True


@pytest.mark.parametrize("service", sorted(COMPOSE["services"]))
def test_every_service_rotates_its_log(service):
    """Docker's default json-file driver keeps every line: the gateway's healthcheck alone logged three
    lines every 30 s, and nothing bounded the file."""
    logging = COMPOSE["services"][service].get("logging", {})
    assert logging.get("driver") == "json-file"
    assert memory_bytes(logging["options"]["max-size"]) <= 100 * 1024**2
    assert 1 <= int(logging["options"]["max-file"]) <= 10


def test_the_serving_image_has_no_training_command():
    """The image holds only training/__init__.py; `pneumonia-train --help` there failed with a traceback."""
    [install] = [run for run in re.findall(r"^RUN (.*?)(?<!\\)$", DOCKERFILE, flags=re.M | re.S) if "pip install" in run]
    assert re.search(r"rm -f \"\$\(command -v pneumonia-train\)\"", install)


def test_a_sites_tls_keys_stay_out_of_git_and_the_build_context():
    """The README mounts ./tls into the gateway, so deploy/tls/ holds its private key."""
    import shutil
    import subprocess

    root = DEPLOY.parent
    assert "deploy/tls/" in (root / ".dockerignore").read_text().splitlines()
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/tls/gateway.key"], cwd=root)
    assert ignored.returncode == 0

"""The README's main job, `deploy/run_local.sh`, as a newcomer runs it: embedded defaults (SQLite and
spool under ./var), a study pushed with DCMTK storescu, its flag read with `pneumonia-admin`, then a
SIGTERM to the script stops both services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.dicom_gateway.helpers import free_port, run_storescu, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.dcmtk]

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "run_local.sh"


def _admin(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pneumonia-admin", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in found.read_text().split()] if found.exists() else []


def test_run_local_scores_a_pushed_study_and_stops_on_sigterm(tmp_path, redis_server, make_study, dcmtk):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(TRIAGE_BROKER_URL=redis_server.url, TRIAGE_GATEWAY_PORT=str(port), TRIAGE_GATEWAY_BIND="127.0.0.1",
               TRIAGE_GATEWAY_STABLE_STUDY_SECONDS="2", TRIAGE_GATEWAY_MIN_FREE_BYTES="0")
    redis_server.client().flushall()
    with open(tmp_path / "run_local.log", "wb") as log:
        script = subprocess.Popen(["bash", str(SCRIPT)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own process group: a failed test kills all of it
    try:
        wait_for(lambda: run_storescu(dcmtk("echoscu"), port, []).returncode == 0 or script.poll() is not None, 120,
                 interval=1.0, what="the gateway to answer C-ECHO")
        assert script.poll() is None, (tmp_path / "run_local.log").read_text()[-3000:]
        services = _children(script.pid)
        assert len(services) == 2

        paths = make_study(2, size=(512, 512))
        assert run_storescu(dcmtk("storescu"), port, paths).returncode == 0

        def final_study() -> list[dict]:
            out = _admin(tmp_path, env, "list", "--studies", "--format", "json")
            studies = json.loads(out.stdout) if out.returncode == 0 else []
            return [s for s in studies if s.get("final")]

        [study] = wait_for(final_study, 240, interval=2.0, what="the study's final flag in var/triage.db")
        assert study["flag"] in ("URGENT", "PRIORITY", "ROUTINE") and study["n_instances"] == 2
        assert (tmp_path / "var" / "triage.db").is_file()

        script.send_signal(signal.SIGTERM)
        assert script.wait(90) == 0, (tmp_path / "run_local.log").read_text()[-3000:]
        assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
                   for pid in services)
    finally:
        try:  # the script, both services and Celery's pool: whatever is left of the group
            os.killpg(script.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        script.wait(30)


def test_an_unreachable_broker_is_named_without_its_password(tmp_path):
    """The pre-check printed the whole broker URL, password included, to the terminal."""
    env = {**os.environ, "TRIAGE_BROKER_URL": f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"}
    out = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Redis is not reachable at redis://***@127.0.0.1:" in out.stderr
    assert "s3cret-pw" not in out.stderr + out.stdout


STUB_SERVICE = """#!{python}
import os, signal, sys, time
name = os.path.basename(sys.argv[0])
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(name + " started\\n")
while not stopping:
    time.sleep(0.05)
time.sleep(float(os.environ["STUB_STOP_SECONDS"]) if name == "pneumonia-worker" else 0)  # a warm shutdown
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(name + " exited\\n")
"""


def test_a_repeated_sigterm_still_waits_for_both_services(tmp_path):
    """A second SIGTERM (supervisors and `timeout` repeat theirs) interrupted the script's `wait` for the
    worker: it exited 0 while Celery was still in its warm shutdown, and a supervisor that then started
    it again ran two workers. Stand-in services on PATH: the worker takes 3 s to stop."""
    import sys
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("pneumonia-worker", "dicom-gateway"):
        stub = bin_dir / name
        stub.write_text(STUB_SERVICE.format(python=sys.executable))
        stub.chmod(0o755)
    log = tmp_path / "services.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log),
           "STUB_STOP_SECONDS": "3", "TRIAGE_BROKER_URL": "sentinel://127.0.0.1:26379"}  # no redis-cli ping
    script = subprocess.Popen(["bash", str(SCRIPT)], cwd=tmp_path, env=env, start_new_session=True)
    try:
        wait_for(lambda: log.exists() and log.read_text().count("started") == 2, 30, what="both stand-ins started")
        script.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        script.send_signal(signal.SIGTERM)
        assert script.wait(30) == 0
        assert sorted(log.read_text().split("\n")[2:]) == ["", "dicom-gateway exited", "pneumonia-worker exited"]
    finally:
        try:
            os.killpg(script.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        script.wait(30)

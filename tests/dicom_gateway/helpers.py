"""Helpers for gateway tests: DCMTK lookup, free ports, broker-queue inspection, SCU pushes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import redis
from pydicom.dataset import Dataset
from pynetdicom import AE

from worker.contract import QUEUE

DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")


def dcmtk_tool(name: str) -> str | None:
    """Path of the DCMTK binary `name`, or None.

    Why not plain `shutil.which`: pynetdicom installs Python apps called `storescu`,
    `echoscu`, `storescp` that can shadow DCMTK on PATH; we need the real DCMTK tools.
    """
    candidates = [shutil.which(name)] + [os.path.join(d, name) for d in DCMTK_DIRS]
    for path in candidates:
        if path and os.access(path, os.X_OK) and _is_dcmtk(path):
            return path
    return None


def _is_dcmtk(path: str) -> bool:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "dcmtk" in (out.stdout + out.stderr).lower()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def queued_tasks(client: redis.Redis, queue: str = QUEUE) -> list[dict[str, Any]]:
    """Decode the Celery (protocol 2) messages waiting in the Redis list `queue`.

    Why read the broker directly: it proves the gateway published a real Celery message
    with the contract's name, args and kwargs, independently of any consumer.
    """
    tasks = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # LPUSH: oldest is last
        message = json.loads(raw)
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        tasks.append({"task": message["headers"]["task"], "id": message["headers"]["id"], "args": args, "kwargs": kwargs})
    return tasks


def store_one(port: int, ds: Dataset, sent: Path | None = None, *, calling_ae: str = "TESTSCU") -> Dataset:
    """One C-STORE of `ds` (or of the file `sent`, its bytes as they are) over its own association;
    returns the response, whose status and error comment a test reads."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    try:
        return assoc.send_c_store(ds if sent is None else sent)
    finally:
        assoc.release()


def store_with_pynetdicom(
    port: int,
    datasets: list[Dataset],
    *,
    calling_ae: str = "TESTSCU",
    called_ae: str = "TRIAGE",
    on_status: Callable[[Dataset, int], None] | None = None,
    tls_args: tuple | None = None,
    abort: bool = False,
) -> list[int]:
    """C-STORE datasets over one association; returns status codes (-1 = no response)."""
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in dict.fromkeys((ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets):
        ae.add_requested_context(sop_class, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120  # a loaded 2-core CI box can stall a store well past 30 s
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        raise ConnectionError("association not established")
    codes = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            code = int(rsp.Status) if rsp is not None and "Status" in rsp else -1
            codes.append(code)
            if on_status is not None:
                on_status(ds, code)
            if code == -1 or not assoc.is_established:
                break  # association gone (peer died/aborted): no point sending the rest
    finally:
        if abort:
            assoc.abort()
        elif assoc.is_established:
            assoc.release()
    return codes


def pending_files(spool: Path) -> list[Path]:
    return sorted((spool / "pending").glob("*/*.dcm"))


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part-10 file, after preamble and file meta (as sent on the wire)."""
    raw = Path(path).read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a Part-10 file"
    group_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value
    return raw[144 + group_length :]


def run_storescu(storescu: str, port: int, paths: list[Path | str], *extra: str, calling: str = "STORESCU", called: str = "TRIAGE", timeout: float = 120) -> subprocess.CompletedProcess:
    """Run DCMTK storescu against the gateway (verbose, so failures show the status)."""
    cmd = [storescu, "-v", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def storescu_config(path: Path, sop_classes: list[str], syntaxes: list[str]) -> Path:
    """A storescu `-xf` association profile proposing one context per (class, syntax).

    Why: storescu only proposes a few compressed syntaxes by flag (none for JPEG Lossless
    .57); a modality's own configuration proposes exactly what it sends, as this does.
    """
    lines = ["[[TransferSyntaxes]]"]
    for i, syntax in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {syntax}"]
    lines += ["[[PresentationContexts]]", "[CXR]"]
    n = 0
    for sop_class in sop_classes:
        for i, _ in enumerate(syntaxes):
            n += 1
            lines.append(f"PresentationContext{n} = {sop_class}\\TS{i}")
    lines += ["[[Profiles]]", "[CXR]", "PresentationContexts = CXR"]
    path.write_text("\n".join(lines) + "\n")
    return path

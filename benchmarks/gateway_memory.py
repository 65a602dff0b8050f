"""Peak memory of `dicom-gateway run` while it receives: what its container memory cap must allow.

Why: pynetdicom holds each instance in memory while it arrives, so the gateway's peak grows with
the instances in flight at once (up to `TRIAGE_GATEWAY_MAX_ASSOCIATIONS`), and compose caps the
gateway at 2 GiB (deploy/docker-compose.yml). Each scenario runs a fresh gateway process (private
spool, port and redis-server) and pushes `parallel` instances of `side`² 16-bit pixels at once, one
association each, with pynetdicom SCUs from this process. The baseline, in the same run, is the
same gateway's peak before anything arrives. The figures are the peak resident set (VmHWM) and
what each instance in flight adds to it, as a multiple of its size.

    python benchmarks/gateway_memory.py --scenarios 8192x1 4096x8 4096x16 --out benchmarks/results/gateway_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/PID/status (Linux only)")


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def store(port: int, ds, statuses: list[int]) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    rsp = assoc.send_c_store(ds)
    assoc.release()
    statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else -1)


def scenario(side: int, parallel: int, redis_url: str, workdir: Path) -> dict:
    """One fresh gateway, `parallel` instances of side² pushed at once; its peaks before and after."""
    from pydicom.uid import generate_uid

    from worker.samples import make_cxr_dataset

    thumbnail = (np.add.outer(np.arange(28), np.arange(28)) * 4 % 256).astype(np.uint8)
    datasets = [make_cxr_dataset(thumbnail, size=(side, side), bits_stored=16, sop_uid=generate_uid())
                for _ in range(parallel)]
    instance_bytes = len(datasets[0].PixelData)
    port, spool = free_port(), workdir / f"spool-{side}x{parallel}"
    env = {**os.environ, "TRIAGE_SPOOL_DIR": str(spool), "TRIAGE_BROKER_URL": redis_url,
           "TRIAGE_GATEWAY_PORT": str(port), "TRIAGE_GATEWAY_BIND": "127.0.0.1", "TRIAGE_GATEWAY_MIN_FREE_BYTES": "0",
           "TRIAGE_GATEWAY_MAX_ASSOCIATIONS": str(max(32, parallel))}
    with open(workdir / f"gateway-{side}x{parallel}.log", "wb") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "dicom_gateway.cli", "run"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        time.sleep(1.0)
        idle = peak_rss_bytes(gateway.pid)
        statuses: list[int] = []
        threads = [threading.Thread(target=store, args=(port, ds, statuses)) for ds in datasets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak = peak_rss_bytes(gateway.pid)
    finally:
        gateway.terminate()
        gateway.wait(30)
        shutil.rmtree(spool, ignore_errors=True)
    return {
        "side": side, "parallel": parallel, "instance_mib": round(instance_bytes / MIB, 1),
        "statuses": sorted(set(statuses)), "idle_peak_mib": round(idle / MIB, 1), "peak_mib": round(peak / MIB, 1),
        "added_per_instance_x_size": round((peak - idle) / (parallel * instance_bytes), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["8192x1", "4096x8", "4096x16"],
                        help="SIDExPARALLEL: square 16-bit instances of SIDE² pixels, PARALLEL of them at once")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-memory-"))
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rows = []
        for item in args.scenarios:
            side, parallel = (int(part) for part in item.lower().split("x"))
            rows.append(scenario(side, parallel, f"redis://127.0.0.1:{redis_port}/0", workdir))
            print(json.dumps(rows[-1]))
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version()},
              "args": {"scenarios": args.scenarios}, "scenarios": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

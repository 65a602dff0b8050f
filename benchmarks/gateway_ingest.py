"""Ingest benchmark: the gateway vs a bare pynetdicom SCP vs DCMTK storescp, same run, same files.

Realistic 2-8 MB CR/DX instances (1024^2 .. 2048^2, 12-bit, Explicit VR LE) are pushed with
DCMTK storescu (1 association, then N parallel associations). Figures: instances/s and MB/s
of DICOM payload, wall clock from first connect to last response, and the gateway's rate as a
ratio of each baseline's. All three receivers run at once and every round pushes to each in
turn (the order rotates), so a noisy host slows them alike; a ratio is the median over rounds
of the per-round ratios.

    python benchmarks/gateway_ingest.py [--instances 24] [--parallel 4] [--repeats 5]

Writes benchmarks/out/gateway_ingest-<utc>.json (full) and, with --commit-summary,
benchmarks/results/gateway_ingest.json (small summary that is committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SIZES = [(1024, 1024), (1448, 1448), (2048, 2048)]  # ~2, ~4, ~8 MB at 16 bits allocated

BARE_SCP = r"""
import sys, pathlib
from pynetdicom import AE, evt, AllStoragePresentationContexts
out = pathlib.Path(sys.argv[2])
def on_store(event):
    (out / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
    return 0
ae = AE(ae_title="TRIAGE")
ae.maximum_pdu_size = 262144
ae.maximum_associations = 32
ae.supported_contexts = AllStoragePresentationContexts
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk(name: str) -> str:
    """The DCMTK binary (pynetdicom ships same-named Python apps that may shadow it on PATH)."""
    for path in (f"/usr/bin/{name}", f"/usr/local/bin/{name}", shutil.which(name)):
        if path and os.access(path, os.X_OK):
            out = subprocess.run([path, "--version"], capture_output=True, text=True)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return path
    sys.exit(f"DCMTK {name} not found")


def make_files(out: Path, count: int, data_root: Path) -> tuple[list[Path], list[Path]]:
    """`count` instances split into per-sender folders later; returns (files, []) with sizes cycling."""
    from pydicom.uid import generate_uid

    from worker.samples import load_pneumoniamnist, make_cxr_dataset, save

    images, _ = load_pneumoniamnist(data_root, "test")
    files = []
    study = generate_uid()
    for i in range(count):
        modality = "CR" if i % 2 == 0 else "DX"
        ds = make_cxr_dataset(images[i % len(images)], modality=modality, size=SIZES[i % len(SIZES)], study_uid=study, instance_number=i + 1)
        files.append(save(ds, out / f"{i:04d}.dcm"))
    return files, []


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def push(port: int, files: list[Path], parallel: int) -> float:
    """Send all files with `parallel` storescu processes; returns wall seconds. Fails loudly on any error."""
    storescu = dcmtk("storescu")
    chunks = [files[i::parallel] for i in range(parallel)]

    def one(chunk: list[Path]) -> subprocess.CompletedProcess:
        return subprocess.run([storescu, "-v", "-aec", "TRIAGE", "--max-pdu", "131072", "127.0.0.1", str(port), *map(str, chunk)],
                              capture_output=True, text=True, timeout=600)

    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(one, chunks))
    elapsed = time.perf_counter() - started
    for chunk, res in zip(chunks, results):
        ok = res.stderr.count("Received Store Response (Success)")
        if res.returncode != 0 or ok != len(chunk):
            raise RuntimeError(f"storescu failed ({ok}/{len(chunk)} ok): {res.stderr[-1500:]}")
    return elapsed


def start_target(kind: str, port: int, workdir: Path, redis_url: str) -> subprocess.Popen:
    out = workdir / kind
    out.mkdir(parents=True, exist_ok=True)
    log = open(workdir / f"{kind}.log", "wb")
    if kind == "gateway":
        env = {**os.environ, "TRIAGE_SPOOL_DIR": str(out), "TRIAGE_BROKER_URL": redis_url, "TRIAGE_GATEWAY_PORT": str(port),
               "TRIAGE_GATEWAY_BIND": "127.0.0.1", "TRIAGE_GATEWAY_LOG_LEVEL": "WARNING", "TRIAGE_GATEWAY_MIN_FREE_BYTES": "0"}
        cmd = [sys.executable, "-m", "dicom_gateway.cli", "run"]
    elif kind == "pynetdicom_bare":
        env, cmd = dict(os.environ), [sys.executable, "-c", BARE_SCP, str(port), str(out)]
    else:
        env, cmd = dict(os.environ), [dcmtk("storescp"), "-od", str(out), "--max-pdu", "131072", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    wait_port(port)
    return proc


TARGETS = ("gateway", "pynetdicom_bare", "dcmtk_storescp")


def interleaved_rounds(ports: dict[str, int], files: list[Path], concurrencies: list[int], repeats: int,
                       workdir: Path) -> dict[tuple[str, int], list[float]]:
    """Wall seconds of each push, per (target, associations), round by round, the target order rotating."""
    seconds: dict[tuple[str, int], list[float]] = {(kind, n): [] for kind in TARGETS for n in concurrencies}
    for round_index in range(repeats):
        order = TARGETS[round_index % len(TARGETS):] + TARGETS[:round_index % len(TARGETS)]
        for parallel in concurrencies:
            for kind in order:
                if kind != "gateway":  # the gateway keeps its spool; the baselines start empty each push
                    clear(workdir, kind)
                seconds[(kind, parallel)].append(push(ports[kind], files, parallel))
    return seconds


def summarise(seconds: dict[tuple[str, int], list[float]], count: int, total_mb: float) -> list[dict]:
    rows = []
    for (kind, parallel), values in seconds.items():
        median = statistics.median(values)
        rows.append({"target": kind, "associations": parallel, "instances": count, "seconds": round(median, 3),
                     "seconds_per_round": [round(v, 3) for v in values],
                     "instances_per_s": round(count / median, 2), "mb_per_s": round(total_mb / median, 1)})
    return rows


def gateway_ratios(seconds: dict[tuple[str, int], list[float]]) -> dict[str, float]:
    """Gateway rate / baseline rate, the median of the per-round ratios (same round, same files)."""
    ratios = {}
    for (kind, parallel), values in seconds.items():
        if kind != "gateway":
            gateway = seconds[("gateway", parallel)]
            ratios[f"{kind}@{parallel}"] = round(statistics.median(b / g for g, b in zip(gateway, values)), 3)
    return ratios


def clear(workdir: Path, kind: str) -> None:
    shutil.rmtree(workdir / kind, ignore_errors=True)
    (workdir / kind).mkdir(parents=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=24)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per concurrency")
    parser.add_argument("--data-root", default=os.environ.get("PNEUMONIA_DATA_ROOT", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--commit-summary", action="store_true", help="also write benchmarks/results/gateway_ingest.json")
    args = parser.parse_args()

    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: list[dict] = []
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        workdir = Path(tmp)
        files, _ = make_files(workdir / "data", args.instances, Path(args.data_root))
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} instances, {total_mb:.1f} MB ({total_mb / len(files):.1f} MB avg), nproc={os.cpu_count()}")
        procs: dict[str, subprocess.Popen] = {}
        try:
            ports = {kind: free_port() for kind in TARGETS}
            for kind in TARGETS:
                procs[kind] = start_target(kind, ports[kind], workdir, f"redis://127.0.0.1:{redis_port}/0")
            seconds = interleaved_rounds(ports, files, sorted({1, args.parallel}), args.repeats, workdir)
            results = summarise(seconds, len(files), total_mb)
            ratios = gateway_ratios(seconds)
            for row in results:
                print(f"{row['target']:16s} assoc={row['associations']:2d}  {row['instances_per_s']:7.2f} inst/s  "
                      f"{row['mb_per_s']:7.1f} MB/s  (median {row['seconds']:.2f}s of {args.repeats})")
            for key, ratio in ratios.items():
                print(f"gateway / {key}: {ratio:.2f}x")
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(30)
            redis.terminate()
            redis.wait(10)
    meta = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(), "python": platform.python_version(),
            "nproc": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "instances": len(files), "total_mb": round(total_mb, 1),
            "sizes": [list(s) for s in SIZES], "transfer_syntax": "Explicit VR Little Endian", "client": "DCMTK storescu",
            "note": "gateway fsyncs the file, its folder and pending/ and publishes a Celery task per instance; "
                    "bare SCP and storescp do neither", "command": " ".join(["python", "benchmarks/gateway_ingest.py", *sys.argv[1:]]),
            "repeats": args.repeats}
    out_dir = REPO / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    full = out_dir / f"gateway_ingest-{meta['utc'].replace(':', '')}.json"
    full.write_text(json.dumps({"meta": meta, "results": results, "gateway_ratio": ratios}, indent=2))
    print(f"wrote {full}")
    if args.commit_summary:
        summary = REPO / "benchmarks" / "results" / "gateway_ingest.json"
        summary.write_text(json.dumps({"meta": meta, "results": results, "gateway_ratio": ratios}, indent=1) + "\n")
        print(f"wrote {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

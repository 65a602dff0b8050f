"""Worker throughput benchmark: a real `pneumonia-worker run` process on a private Redis + SQLite.

Reports, on this machine:
  * worker start-up time (spawn -> Celery ready, and -> model loaded in the pool process)
  * throughput (instances/s) and p50/p95 latency (received -> finished) and processing time
  * resident memory of the worker (main + pool processes)
  * onnxruntime vs PyTorch eager on the same network (batch 1 latency, batch-16 throughput).
    The benchmark may import torch; worker/ never does. PyTorch weights come from
    --torch-checkpoint (a training checkpoint) when given, else the same architecture with
    random weights (identical compute, so the timing comparison holds; parity is then not checked).

    python benchmarks/worker_throughput.py --count 64 --size 2048

With any --against-* option it also runs a baseline worker that differs only in those settings,
alternating candidate and baseline for --rounds rounds (the order swapping each round), and
reports the candidate's throughput as the median of the per-round ratios to the baseline's: a
same-run comparison that a noisy host slows alike, e.g. two 1-thread processes against one:

    python benchmarks/worker_throughput.py --count 48 --skip-runtimes --concurrency 2 --intra-op-threads 1 \
        --against-concurrency 1 --against-intra-op-threads 0 --rounds 3

or, on a GPU host with the gpu extra, CUDA against the CPU (the result also gives the largest
probability difference between the two workers on the same images):

    python benchmarks/worker_throughput.py --count 128 --skip-runtimes --execution-provider cuda \
        --against-execution-provider cpu --rounds 3
Figures go to benchmarks/out/<name>-<utc>.json (ignored); with --commit also to
benchmarks/results/<name>.json, the committed figures, which a plain run never overwrites.
A run in which any instance ends other than `done` fails instead of reporting its speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images, _ = load_images(args.data_root)
    results: dict[str, Any] = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                               "model": served_model(args.model)}
    if interleaved(args):
        results.update(bench_interleaved(images, args))
        print_section("candidate worker (median round)", results["worker"])
        print_section("baseline worker (median round)", results["baseline_worker"])
        print_section("candidate / baseline", results["ratio"])
    else:
        results["worker"] = bench_worker(images, args)
        results["worker"].pop("_probability_by_accession")
        print_section("worker", results["worker"])
    if not args.skip_runtimes:
        results["runtimes"] = bench_runtimes(images, args)
        print_section("onnxruntime vs pytorch eager", results["runtimes"])
    write_results(results, args.results_name, args.commit)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("PNEUMONIA_DATA_ROOT", REPO.parent / "shared" / "data")))
    parser.add_argument("--count", type=int, default=64, help="instances sent to the worker")
    parser.add_argument("--size", type=int, default=2048, help="DICOM side in pixels")
    parser.add_argument("--encoding", default="jpeg-lossless", choices=("explicit", "jpeg-lossless", "j2k", "rle"))
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads per pool process")
    parser.add_argument("--execution-provider", default="auto", choices=("auto", "cpu", "cuda"),
                        help="the workers' TRIAGE_EXECUTION_PROVIDER")
    parser.add_argument("--results-name", default="worker_throughput", help="file stem of the result")
    parser.add_argument("--commit", action="store_true",
                        help="also write benchmarks/results/<results-name>.json (the committed figures)")
    parser.add_argument("--model", type=Path, default=None,
                        help="ONNX model (with its card) the worker serves; default the packaged one")
    parser.add_argument("--torch-checkpoint", type=Path, default=None)
    parser.add_argument("--runtime-reps", type=int, default=30, help="batch-1 timings per runtime")
    parser.add_argument("--skip-runtimes", action="store_true")
    parser.add_argument("--against-model", type=Path, default=None, help="baseline worker: this model instead")
    parser.add_argument("--against-concurrency", type=int, default=None, help="baseline worker: this concurrency")
    parser.add_argument("--against-intra-op-threads", type=int, default=None, help="baseline worker: these threads")
    parser.add_argument("--against-execution-provider", default=None, choices=("auto", "cpu", "cuda"),
                        help="baseline worker: this execution provider")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved candidate/baseline rounds (--against-*)")
    return parser.parse_args(argv)


def interleaved(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.against_model, args.against_concurrency, args.against_intra_op_threads,
                                       args.against_execution_provider))


def baseline_args(args: argparse.Namespace) -> argparse.Namespace:
    """The candidate's settings with the --against-* overrides: the baseline differs in nothing else."""
    overrides = {"model": args.against_model, "concurrency": args.against_concurrency,
                 "intra_op_threads": args.against_intra_op_threads,
                 "execution_provider": args.against_execution_provider}
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in overrides.items() if v is not None}})


def bench_interleaved(images: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Candidate and baseline workers in alternating rounds; the ratio is the median of per-round ratios."""
    baseline = baseline_args(args)
    rounds: list[dict[str, dict[str, Any]]] = []
    deltas: list[float] = []
    for index in range(args.rounds):
        order = [("candidate", args), ("baseline", baseline)]
        figures = {name: bench_worker(images, settings) for name, settings in (order if index % 2 == 0 else order[::-1])}
        deltas.append(max_probability_delta(*(figures[n].pop("_probability_by_accession")
                                              for n in ("candidate", "baseline"))))
        rounds.append(figures)
        print(f"round {index + 1}: candidate {figures['candidate']['throughput_per_s']} /s, "
              f"baseline {figures['baseline']['throughput_per_s']} /s")

    def median_round(name: str) -> dict[str, Any]:
        ordered = sorted(rounds, key=lambda r: r[name]["throughput_per_s"])
        return ordered[len(ordered) // 2][name]

    ratios = [r["candidate"]["throughput_per_s"] / r["baseline"]["throughput_per_s"] for r in rounds]
    return {"worker": median_round("candidate"), "baseline_worker": median_round("baseline"),
            "baseline_settings": {"model": served_model(baseline.model), "concurrency": baseline.concurrency,
                                  "intra_op_threads": baseline.intra_op_threads,
                                  "execution_provider": baseline.execution_provider},
            "ratio": {"throughput_median_of_rounds": round(float(np.median(ratios)), 3),
                      "per_round": [round(r, 3) for r in ratios],
                      # same images: 0 for a change that keeps the arithmetic, small for another provider
                      "max_abs_probability_delta": float(max(deltas))},
            "rounds": [{name: {"throughput_per_s": f["throughput_per_s"], "processing_ms": f["processing_ms"]}
                        for name, f in r.items()} for r in rounds]}


def load_images(data_root: Path) -> tuple[np.ndarray, np.ndarray]:
    from worker.samples import load_pneumoniamnist

    return load_pneumoniamnist(data_root, "test")


def machine_info() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(), "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def served_model(path: Path | None) -> dict[str, Any]:
    """Which model the worker served: name, version, sha256 and file size, from its card."""
    from models.card import ModelCard, card_path_for, default_model_path

    path = path or default_model_path()
    card = ModelCard.load(card_path_for(path))
    return {"file": path.name, "name": card.name, "version": card.version, "sha256": card.sha256,
            "megabytes": path.stat().st_size / 1e6}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_files(images: np.ndarray, spool: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, RLELossless, generate_uid

    from worker.contract import pending_relpath
    from worker.samples import make_cxr_dataset, save

    syntax = {"explicit": ExplicitVRLittleEndian, "jpeg-lossless": JPEGLosslessSV1, "j2k": JPEG2000Lossless,
              "rle": RLELossless}[args.encoding]
    study = generate_uid()
    staged = []
    for i in range(args.count):
        ds = make_cxr_dataset(images[i % len(images)], size=(args.size, args.size), study_uid=study,
                              transfer_syntax=syntax, accession=f"B{i:05d}")
        relpath = pending_relpath(study, str(ds.SOPInstanceUID))
        save(ds, spool / relpath)
        staged.append((relpath, str(ds.SOPInstanceUID)))
    return staged


def bench_worker(images: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Start Redis + worker, push `count` instances, read timings back from the database."""
    with tempfile.TemporaryDirectory(prefix="triage-bench-") as tmp:
        tmp_path = Path(tmp)
        staged = stage_files(images, tmp_path / "spool", args)
        port = free_port()
        redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
                                  "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update(TRIAGE_BROKER_URL=f"redis://127.0.0.1:{port}/0",
                   TRIAGE_DATABASE_URL=f"sqlite:///{tmp_path / 'triage.db'}",
                   TRIAGE_SPOOL_DIR=str(tmp_path / "spool"), TRIAGE_CONCURRENCY=str(args.concurrency),
                   TRIAGE_INTRA_OP_THREADS=str(args.intra_op_threads),
                   TRIAGE_EXECUTION_PROVIDER=args.execution_provider)
        if args.model:
            env["TRIAGE_MODEL_PATH"] = str(args.model.resolve())
        log_path = tmp_path / "worker.log"
        worker = None
        try:
            time.sleep(0.5)
            spawn = time.monotonic()
            worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "run"], env=env, cwd=tmp,
                                      stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
            ready_s = wait_log(log_path, " ready.", spawn)
            model_s = wait_log(log_path, "loaded (", spawn)
            providers = logged_providers(log_path)
            rss_idle = worker_rss(worker.pid)
            sent = time.monotonic()
            send_all(env["TRIAGE_BROKER_URL"], staged)
            rows = wait_rows(env["TRIAGE_DATABASE_URL"], [s for _, s in staged], timeout=1800)
            wall = time.monotonic() - sent
            rss_busy = worker_rss(worker.pid)
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(60)
            redis.terminate()
            redis.wait(10)
    figures = summarise(rows, wall, ready_s, model_s, rss_idle, rss_busy, args)
    figures["providers"] = providers
    figures["_probability_by_accession"] = {r["accession_number"]: r["probability"] for r in rows}
    return figures


def logged_providers(log_path: Path) -> list[str]:
    """The providers the pool process's session runs on, from its 'model ... loaded (A,B)' line."""
    line = next(x for x in log_path.read_text(errors="replace").splitlines() if "loaded (" in x)
    return line.rsplit("loaded (", 1)[1].split(")", 1)[0].split(",")


def max_probability_delta(a: dict[str, float], b: dict[str, float]) -> float:
    """Largest |p_a - p_b| over the images both workers scored (same accession = same image)."""
    return max(abs(a[k] - b[k]) for k in a.keys() & b.keys())


def wait_log(path: Path, marker: str, since: float, timeout: float = 180) -> float:
    while time.monotonic() - since < timeout:
        if path.exists() and marker in path.read_text(errors="replace"):
            return round(time.monotonic() - since, 2)
        time.sleep(0.05)
    raise RuntimeError(f"worker did not log {marker!r}; log:\n{path.read_text(errors='replace')[-2000:]}")


def worker_rss(pid: int) -> dict[str, float]:
    main = psutil.Process(pid)
    children = main.children(recursive=True)
    mib = 1024 * 1024
    return {"main_mib": round(main.memory_info().rss / mib, 1),
            "pool_mib": round(sum(c.memory_info().rss for c in children) / mib, 1),
            "total_mib": round((main.memory_info().rss + sum(c.memory_info().rss for c in children)) / mib, 1)}


def send_all(broker_url: str, staged: list[tuple[str, str]]) -> None:
    from celery import Celery

    from worker import contract

    client = Celery("bench", broker=broker_url, set_as_current=False)
    for relpath, sop in staged:
        client.send_task(contract.PROCESS_INSTANCE, args=(relpath, sop),
                         kwargs={"received_at": dt.datetime.now(dt.timezone.utc).isoformat()}, queue=contract.QUEUE)
    client.close()


def wait_rows(database_url: str, sops: list[str], timeout: float) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from worker import db

    engine = db.make_engine(database_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                rows = [dict(r) for r in conn.execute(select(db.instances)).mappings()]
            if len([r for r in rows if r["status"] in db.TERMINAL]) >= len(sops):
                return rows
            time.sleep(0.5)
    finally:
        engine.dispose()
    raise RuntimeError("worker did not finish in time")


def summarise(rows: list[dict[str, Any]], wall: float, ready_s: float, model_s: float,
              rss_idle: dict[str, float], rss_busy: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    failed = {r["status"] for r in rows} - {"done"}
    if failed:  # a worker that fails fast must not read as a fast worker
        raise RuntimeError(f"instances ended {sorted(failed)}, not done: no throughput to report")
    latency = np.array([(r["finished_at"] - r["received_at"]).total_seconds() for r in rows])
    processing = np.array([r["processing_ms"] for r in rows])
    first_start = min(r["started_at"] for r in rows)
    last_finish = max(r["finished_at"] for r in rows)
    busy_span = (last_finish - first_start).total_seconds()
    return {
        "instances": len(rows),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
        "dicom": f"{args.size}x{args.size} 12-bit {args.encoding}",
        "concurrency": args.concurrency,
        "intra_op_threads": args.intra_op_threads,
        "execution_provider": args.execution_provider,
        "throughput_per_s": round(len(rows) / busy_span, 2),
        "throughput_incl_queueing_per_s": round(len(rows) / wall, 2),
        "latency_s": {"p50": round(float(np.percentile(latency, 50)), 3),
                      "p95": round(float(np.percentile(latency, 95)), 3)},
        "processing_ms": {"p50": round(float(np.percentile(processing, 50)), 1),
                          "p95": round(float(np.percentile(processing, 95)), 1)},
        "startup_s": {"celery_ready": ready_s, "model_loaded": model_s},
        "rss_idle_mib": rss_idle,
        "rss_after_run_mib": rss_busy,
    }


def bench_runtimes(images: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Same preprocessed inputs through onnxruntime and PyTorch eager, same thread count."""
    from models.detector import PneumoniaDetector
    from models.preprocess import preprocess_batch

    threads = os.cpu_count() or 1
    detector = PneumoniaDetector(args.model, intra_op_threads=threads)  # the model the worker served
    one = preprocess_batch([images[0]])
    batch = preprocess_batch(list(images[:16]))
    out: dict[str, Any] = {"threads": threads}
    out["onnxruntime"] = time_runtime(lambda x: detector.logits(x), one, batch, args.runtime_reps)
    out["onnxruntime"]["providers"] = detector.providers
    model, weights = build_torch_model(detector, args.torch_checkpoint)
    import torch

    torch.set_num_threads(threads)

    def torch_logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    out["pytorch_eager"] = time_runtime(torch_logits, one, batch, args.runtime_reps)
    out["pytorch_eager"].update(weights=weights, torch=torch.__version__, mkldnn=True)
    if weights == "checkpoint":
        out["max_abs_logit_delta"] = float(np.abs(torch_logits(batch) - detector.logits(batch)).max())
    # oneDNN picks a very slow batch-1 path on some CPUs (seen here: ~2.5 s); report the
    # plain ATen kernels too so the comparison is against PyTorch's better configuration.
    torch.backends.mkldnn.enabled = False
    out["pytorch_eager_no_mkldnn"] = time_runtime(torch_logits, one, batch, args.runtime_reps)
    torch.backends.mkldnn.enabled = True
    best_b1 = min(out[k]["batch1_ms"]["p50"] for k in ("pytorch_eager", "pytorch_eager_no_mkldnn"))
    best_b16 = max(out[k]["batch16_img_per_s"] for k in ("pytorch_eager", "pytorch_eager_no_mkldnn"))
    out["ort_speedup_vs_best_torch_batch1_p50"] = round(best_b1 / out["onnxruntime"]["batch1_ms"]["p50"], 2)
    out["ort_speedup_vs_best_torch_batch16"] = round(out["onnxruntime"]["batch16_img_per_s"] / best_b16, 2)
    return out


def build_torch_model(detector: Any, checkpoint: Path | None) -> tuple[Any, str]:
    """The training code's network, configured from the model card's training section."""
    import torch

    from training.engine import FlipAveraged
    from training.model import build_model

    cfg = detector.card.extra.get("training", {})
    model = build_model("none", hidden=cfg.get("hidden", 512), dropout=cfg.get("dropout", 0.5),
                        resnet_v1_strides=cfg.get("resnet_v1_strides", False))
    weights = "random-init (same architecture)"
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        weights = "checkpoint"
    # the released graph averages the image and its mirror; compare like with like
    if detector.card.extra.get("onnx", {}).get("tta_hflip_in_graph"):
        model, weights = FlipAveraged(model), weights + " + flip TTA"
    return model.eval(), weights


def time_runtime(fn: Any, one: np.ndarray, batch: np.ndarray, reps: int) -> dict[str, Any]:
    for _ in range(3):
        fn(one)
    fn(batch)
    single = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(one)
        single.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    for _ in range(3):
        fn(batch)
    batched = 3 * len(batch) / (time.perf_counter() - start)
    return {"batch1_ms": {"p50": round(float(np.percentile(single, 50)), 1),
                          "p95": round(float(np.percentile(single, 95)), 1)},
            "batch16_img_per_s": round(batched, 2)}


def print_section(title: str, data: dict[str, Any]) -> None:
    print(f"== {title} ==")
    for key, value in data.items():
        print(f"  {key}: {value}")


def write_results(results: dict[str, Any], name: str, commit: bool) -> None:
    out_dir = REPO / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(results, indent=2, default=str) + "\n"
    (out_dir / f"{name}-{stamp}.json").write_text(text)
    print(f"wrote {out_dir / f'{name}-{stamp}.json'}")
    if commit:
        committed = REPO / "benchmarks" / "results" / f"{name}.json"
        committed.parent.mkdir(parents=True, exist_ok=True)
        committed.write_text(text)
        print(f"wrote {committed}")


if __name__ == "__main__":
    sys.exit(main())

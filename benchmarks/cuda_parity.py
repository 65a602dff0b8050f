"""CUDA against CPU for the served model: do the GPU's probabilities equal the CPU's, and how fast is each?

Scores the PneumoniaMNIST test split (624 images) through `PneumoniaDetector` three ways:
  * CPU (CPUExecutionProvider), the reference: the card's threshold and strata were chosen on it
  * CUDA as the worker runs it (models.detector.CUDA_OPTIONS: IEEE fp32, TF32 off)
  * CUDA with onnxruntime's own default (TF32 on for fp32 convolutions on Ampere and later)
and reports, for each CUDA variant, the largest |probability - CPU probability| and how many
images change stratum or binary prediction, plus batch-1 latency and batch-16 throughput.

    python benchmarks/cuda_parity.py --out benchmarks/results/cuda_parity_h200.json

Needs the gpu extra (onnxruntime-gpu) and a GPU; anywhere else it exits 2 and says why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    from models.detector import PneumoniaDetector
    from models.errors import ExecutionProviderError
    from worker.samples import load_pneumoniamnist

    try:
        worker_cuda = PneumoniaDetector(args.model, require_provider=CUDA)
    except ExecutionProviderError as exc:
        print(f"no CUDA here: {exc}", file=sys.stderr)
        return 2
    cpu = PneumoniaDetector(args.model, providers=[CPU])
    tf32 = ort.InferenceSession(str(cpu.model_path), providers=[(CUDA, {"use_tf32": "1"}), CPU])
    images, _ = load_pneumoniamnist(args.data_root, "test")
    batch = cpu.preprocess(list(images))
    runs: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "cpu": cpu.logits, "cuda_ieee_fp32": worker_cuda.logits,
        "cuda_tf32_default": lambda x: tf32.run(None, {cpu.input_name: x})[0]}
    reference = probabilities(cpu, runs["cpu"], batch)
    results: dict[str, Any] = {"machine": machine_info(ort), "model": {"version": cpu.card.version,
                                                                       "sha256": cpu.card.sha256},
                               "images": len(batch)}
    for name, logits in runs.items():
        figures = timings(logits, batch, args.reps)
        if name != "cpu":
            figures.update(agreement(cpu, probabilities(cpu, logits, batch), reference))
        results[name] = figures
        print(f"{name}: {figures}")
    write(results, args.out)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("PNEUMONIA_DATA_ROOT", REPO.parent / "shared" / "data")))
    parser.add_argument("--model", type=Path, default=None, help="ONNX model with its card; default the packaged one")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per batch size")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def probabilities(detector: Any, logits: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    from models.detector import calibrated_probability

    return calibrated_probability(logits(batch), detector.card.temperature)


def agreement(detector: Any, probs: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """How far these probabilities are from the CPU's, and what that changes for a radiologist."""
    card = detector.card
    return {"max_abs_probability_delta": float(np.abs(probs - reference).max()),
            "stratum_changes": sum(card.stratum_for(a) != card.stratum_for(b) for a, b in zip(probs, reference)),
            "prediction_changes": int(((probs >= card.threshold) != (reference >= card.threshold)).sum())}


def timings(logits: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, reps: int) -> dict[str, float]:
    logits(batch[:16])
    logits(batch[:1])  # warm-up: CUDA kernels and cuDNN algorithm search
    start = time.perf_counter()
    for _ in range(reps):
        logits(batch[:16])
    per_s = 16 * reps / (time.perf_counter() - start)
    single = []
    for _ in range(reps):
        start = time.perf_counter()
        logits(batch[:1])
        single.append(1000 * (time.perf_counter() - start))
    return {"batch16_img_per_s": round(per_s, 1), "batch1_ms_p50": round(float(np.median(single)), 2)}


def machine_info(ort: Any) -> dict[str, Any]:
    return {"cpu_cores": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write(results: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

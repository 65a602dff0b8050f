"""Per-image CPU cost of several ONNX models against the first one, as a worker runs them.

Why: a candidate artifact (an int8 seed ensemble, a flip-averaged model) can only replace the
released fp32 model if the worker keeps up. `worker_throughput.py` measures that end to end but
needs Redis, Celery and the artifact on the serving host; this measures the part that differs
between models (the contract's preprocessing, then one onnxruntime session call per image, batch
1, as the worker scores an instance) wherever the models are, for instance on a GPU machine whose
artifacts cannot come back. Rounds alternate between the models so that a noisy host slows them
alike; the figure is the median over rounds of each model's rate divided by the first model's in
the same round.

    python benchmarks/onnx_cpu_cost.py --data-root ../shared/data --out benchmarks/out/onnx_cpu_cost.json \\
        fp32=models/pneumonia_resnet50.onnx int8=runs/shipped-1.1.0/pneumonia_resnet50.int8.onnx
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.preprocess import preprocess


def session_for(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def images_per_second(session: ort.InferenceSession, images: np.ndarray) -> float:
    started = time.perf_counter()
    for image in images:
        session.run(None, {"image": preprocess(image)[None]})
    return len(images) / (time.perf_counter() - started)


def named_model(text: str) -> tuple[str, Path]:
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=named_model, help="NAME=PATH; the first is the baseline")
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding pneumoniamnist.npz")
    parser.add_argument("--images", type=int, default=48, help="test-split images scored per round")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (a 2-core worker)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/onnx_cpu_cost.json"))
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("give a baseline and at least one model to compare")
    images = np.load(args.data_root / "pneumoniamnist.npz")["test_images"][: args.images]
    sessions = {name: session_for(path, args.threads) for name, path in args.models}
    for session in sessions.values():
        images_per_second(session, images)  # warm-up round: allocation and kernel selection
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            rates[name].append(images_per_second(session, images))
    baseline = args.models[0][0]
    report = {
        "command": " ".join(["python", "benchmarks/onnx_cpu_cost.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"processor": platform.processor() or platform.machine(), "onnxruntime": ort.__version__,
                    "intra_op_threads": args.threads},
        "images_per_round": len(images), "models": {name: str(path) for name, path in args.models},
        "img_per_s": rates,
        "median_ratio_to_baseline": {name: statistics.median(r / b for r, b in zip(values, rates[baseline]))
                                     for name, values in rates.items()},
        "baseline": baseline,
    }
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()

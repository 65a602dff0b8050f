"""Peak memory of `PneumoniaDetector.predict_batch` scored in chunks against one session run for the list.

Why: `predict_batch` once stacked every input and ran them through onnxruntime at once, about 7 MB an
image, so a folder of thousands of paths needed tens of GB. It now scores `BATCH_CHUNK` images per run.
Each case runs in a fresh process (peak RSS only grows), loads the detector, scores one image to warm
it, then reports how far `predict_batch` of N test images raises the peak. The baseline is the same
code with the chunk as long as the list, which is the old single run.

    python benchmarks/predict_batch_memory.py --data-root ../shared/data --sizes 16 128 \\
        --out benchmarks/results/predict_batch_memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CASE = """
import resource, sys
import models.detector as detector_module
from worker.samples import load_pneumoniamnist
count, chunk, data_root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
images, _ = load_pneumoniamnist(data_root, "test")
detector_module.BATCH_CHUNK = chunk
detector = detector_module.PneumoniaDetector()
detector.predict(images[0])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
detector.predict_batch(list(images[:count]))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def peak_growth_mib(count: int, chunk: int, data_root: str) -> float:
    """Peak RSS growth (MiB) of one `predict_batch` call over `count` images, `chunk` per session run."""
    done = subprocess.run([sys.executable, "-c", CASE, str(count), str(chunk), data_root],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> int:
    from models.detector import BATCH_CHUNK

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/predict_batch_memory.json"))
    args = parser.parse_args()
    rows = []
    for count in args.sizes:
        chunked = peak_growth_mib(count, BATCH_CHUNK, args.data_root)
        single_run = peak_growth_mib(count, max(count, 1), args.data_root)
        rows.append({"images": count, "chunk": BATCH_CHUNK, "chunked_peak_growth_mib": round(chunked, 1),
                     "single_run_peak_growth_mib": round(single_run, 1),
                     "single_run_over_chunked": round(single_run / chunked, 2) if chunked > 0 else None})
        print(f"{count:>5} images: chunks of {BATCH_CHUNK} {chunked:7.1f} MiB, one run {single_run:7.1f} MiB "
              f"({rows[-1]['single_run_over_chunked']}x)")
    result = {"host": platform.processor() or platform.machine(), "python": platform.python_version(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

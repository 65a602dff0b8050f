"""Peak memory of one worker pool process per image size: what a container memory limit must allow.

Why: `deploy/docker-compose.yml` caps each worker replica's memory so that one oversized image
cannot take the host (and Redis and PostgreSQL with it) down. The cap has to hold the model and
the largest radiograph the site sends. Each size runs in a fresh process that builds the detector
exactly as a pool process does (`worker.pipeline.DetectorCache`), then analyses one 14-bit CR of
that size (decode, display chain, preprocessing, inference) through `analyse_file`. The baseline,
in the same run, is the same process's peak after loading the detector alone; the figures are the
peak resident set (VmHWM) and what one image adds to it, in bytes per pixel.

    python benchmarks/worker_memory.py --sizes 2048 4096 8192 --out benchmarks/results/worker_memory.json

`--pixel-spacing 0.1 0.2` writes non-square pixels (row and column spacing in mm), which the
display chain resamples to square ones before the crop.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MIB = 1024 * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), which includes freed temporaries."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure_one(path: Path) -> dict:
    """In this (fresh) process: the detector alone, then one image through the worker's analysis."""
    from worker.config import WorkerSettings
    from worker.pipeline import DetectorCache, analyse_file

    settings = WorkerSettings()
    detectors = DetectorCache(settings)
    detectors.get()
    baseline = peak_rss_bytes()
    outcome = analyse_file(path, settings, detectors)
    return {"detector_only_peak_bytes": baseline, "peak_bytes": peak_rss_bytes(), "status": outcome.status,
            "reason": outcome.reason}


def write_image(size: int, folder: Path, pixel_spacing: list[float] | None = None) -> Path:
    from worker.samples import make_cxr_dataset, save

    thumbnail = (np.add.outer(np.arange(28), np.arange(28)) * 4 % 256).astype(np.uint8)
    ds = make_cxr_dataset(thumbnail, size=(size, size), bits_stored=14)
    if pixel_spacing:
        ds.PixelSpacing = [str(v) for v in pixel_spacing]
    return save(ds, folder / f"cxr-{size}.dcm")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="square image sides")
    parser.add_argument("--pixel-spacing", type=float, nargs=2, metavar=("ROW_MM", "COLUMN_MM"),
                        help="write non-square pixels (default: none written, i.e. square)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/worker_memory.json"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_one(args.child)))
        return {}
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            path = write_image(size, Path(folder), args.pixel_spacing)
            done = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True, capture_output=True,
                                  text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            added = row["peak_bytes"] - row["detector_only_peak_bytes"]
            row |= {"file_bytes": path.stat().st_size, "added_bytes": added, "added_bytes_per_pixel": added / size**2,
                    "peak_ratio_to_detector_only": row["peak_bytes"] / row["detector_only_peak_bytes"]}
            rows[str(size)] = row
            print(f"{size}x{size}: peak {row['peak_bytes'] / MIB:.0f} MiB ({row['peak_ratio_to_detector_only']:.2f}x "
                  f"the detector alone, {row['detector_only_peak_bytes'] / MIB:.0f} MiB); the image adds "
                  f"{added / MIB:.0f} MiB, {row['added_bytes_per_pixel']:.1f} bytes/pixel; {row['status']}")
    results = {"benchmark": "worker_memory", "host": platform.processor() or platform.machine(),
               "python": platform.python_version(), "pixel_spacing_mm": args.pixel_spacing, "sizes": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.out}")
    return results


if __name__ == "__main__":
    main()

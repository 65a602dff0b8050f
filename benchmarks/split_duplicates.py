"""Byte-identical images within and across PneumoniaMNIST's splits.

Why: a test image that is a copy of a training image would make test figures optimistic, and copies
between training and validation make validation (which chooses the epoch, temperature and strata) a
little easier than unseen data. Site calibration refuses copies among its cases; this says how many
the benchmark data itself holds.

    python benchmarks/split_duplicates.py --data-root ../shared/data --out results/data_audit/split_duplicates.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def copies(data: np.lib.npyio.NpzFile) -> dict:
    """Groups of identical images, counted by the splits they span, with their indices and labels."""
    where: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for split in SPLITS:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].ravel()
        for index, image in enumerate(images):
            where[hashlib.sha256(image.tobytes()).hexdigest()].append((split, index, int(labels[index])))
    groups = [places for places in where.values() if len(places) > 1]
    by_splits: dict[str, int] = defaultdict(int)
    for places in groups:
        by_splits["+".join(sorted({s for s, _, _ in places}, key=SPLITS.index))] += 1
    return {"images": {split: int(len(data[f"{split}_images"])) for split in SPLITS},
            "groups_by_splits": dict(sorted(by_splits.items())),
            "groups_with_conflicting_labels": sum(len({label for _, _, label in places}) > 1 for places in groups),
            "groups": sorted([[list(p) for p in places] for places in groups])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding pneumoniamnist.npz")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with np.load(args.data_root / "pneumoniamnist.npz") as data:
        report = copies(data)
    print(json.dumps({k: v for k, v in report.items() if k != "groups"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

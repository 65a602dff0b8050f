"""Re-score the shipped ONNX model from the artifact alone, and read its test ROC at the claimed point.

Why: the card's figures were computed by training (PyTorch, fp32) before export. An auditor
wants them from what ships: the ONNX file, the one numpy preprocessing and onnxruntime, with
the card's own temperature and threshold, nothing refitted. The same pass reads the test ROC
at the original design's reported point (sensitivity 97.18% / specificity 85.47%), threshold-
free like AUC, for models scored before evaluation reported it.

    python benchmarks/shipped_model_audit.py --data-root ../shared/data --out results/shipped_model_audit.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.card import default_model_path
from models.detector import PneumoniaDetector, calibrated_probability
from training.evaluate import full_report, roc_points
from training.quantize import served_logits
from worker.samples import load_pneumoniamnist

SHOWN = ("accuracy", "f1", "auc", "sensitivity", "specificity")


def audit(detector: PneumoniaDetector, data_root: Path, rounds: int) -> dict:
    card = detector.card
    report = {"model": card.name, "version": card.version, "sha256": card.sha256,
              "temperature": card.temperature, "threshold": card.threshold}
    for split in ("val", "test"):
        images, labels = load_pneumoniamnist(data_root, split)
        probability = calibrated_probability(served_logits(detector.session, images, card.source_size), card.temperature)
        report[split] = {"n": int(len(labels)),
                         "at_card_threshold": full_report(labels, probability, card.threshold, rounds, 0)["point"],
                         "roc_points": roc_points(labels, probability, rounds, 0)}
    card_test = card.metrics.get("test_at_0.5", {})
    report["card_test_at_0.5"] = {k: card_test[k]["value"] for k in SHOWN if k in card_test}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/shipped_model_audit.json"))
    args = parser.parse_args()
    report = {"command": "python " + " ".join(sys.argv),
              **audit(PneumoniaDetector(args.model), args.data_root, args.rounds)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"{report['model']} {report['version']} (sha256 {report['sha256'][:12]}...), card temperature "
          f"{report['temperature']:.3f}, threshold {report['threshold']:.3f}")
    for split in ("val", "test"):
        figures = report[split]["at_card_threshold"]
        print(f"{split:5s} n={report[split]['n']}: " + ", ".join(f"{k} {100 * figures[k]:.2f}" for k in SHOWN))
        point, ci = report[split]["roc_points"]["point"], report[split]["roc_points"]["ci95"]
        for name in point:
            print(f"      {name.replace('_', ' ')}: {100 * point[name]:.2f} ({100 * ci[name][0]:.2f}-{100 * ci[name][1]:.2f})")
    if report["card_test_at_0.5"]:
        print("card's test figures at 0.5: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in report["card_test_at_0.5"].items()))


if __name__ == "__main__":
    main()

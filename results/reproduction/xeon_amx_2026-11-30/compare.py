"""Compare a rerun of the 1.1.0 release command with the shipped model's recorded run.

    python results/reproduction/xeon_amx_2026-11-30/compare.py RUN_DIR RELEASE_DIR > comparison.json
"""
import json
import sys
from pathlib import Path
run, release = Path(sys.argv[1]), Path(sys.argv[2])
repo = Path(__file__).resolve().parents[3]
shipped_card = json.loads((repo/'models/pneumonia_resnet50.card.json').read_text())
card = json.loads((release/'pneumonia_resnet50.card.json').read_text())
h_new = json.loads((run/'history.json').read_text()); h_old = json.loads((repo/'results/history.json').read_text())
def max_diff(keys):
    return max(abs(a[k] - b[k]) for a, b in zip(h_new, h_old) for k in keys)
same = len(h_new) == len(h_old) and max_diff(['train_loss', 'train_acc']) == 0.0
max_d = max_diff(['val_loss', 'val_auc'])
info = json.loads((run/'run_info.json').read_text())
m_new = json.loads((run/'results/metrics.json').read_text()); m_old = json.loads((repo/'results/metrics.json').read_text())
out = {
 'onnx_sha256': card['sha256'], 'shipped_sha256': shipped_card['sha256'], 'sha256_equal': card['sha256']==shipped_card['sha256'],
 'train_loss_and_acc_identical_every_epoch': same, 'per_epoch_validation_max_abs_diff': max_d, 'epochs': len(h_new),
 'best_epoch': info.get('best_epoch'), 'train_seconds': info.get('train_seconds'), 'train_img_per_s': info.get('train_img_per_s'),
 'evaluate_seconds': info.get('evaluate_seconds'),
 'test_auc': m_new['test']['at_0.5']['point']['auc'], 'shipped_test_auc': m_old['test']['at_0.5']['point']['auc'],
 'test_accuracy': m_new['test']['at_0.5']['point']['accuracy'], 'shipped_test_accuracy': m_old['test']['at_0.5']['point']['accuracy'],
 'temperature': card['temperature'], 'shipped_temperature': shipped_card['temperature'],
}
print(json.dumps(out, indent=1))

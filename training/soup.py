"""Stage 1 alternative: a uniform model soup (Wortsman et al. 2022) of finished runs.

Runs fine-tuned from the same starting point (same ImageNet weights *and* the same head
initialisation, `--init-seed`) tend to stay in one basin, so the mean of their weights is one
network that behaves like their ensemble, at one forward pass and one model's size. Averaged
BatchNorm statistics do not match the averaged weights, so by default the trainable part's BN
statistics are recomputed on the training split (as SWA does; `--keep-averaged-bn` keeps the
runs' mean instead); the frozen stem keeps its ImageNet ones.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from models.atomic import write_text
from models.card import sha256_of
from training.config import TrainConfig
from training.data import load_split, to_network_input, to_unit_tensor
from training.engine import batches
from training.errors import RefusedError
from training.evaluate import serving_runtime
from training.atomic import save_torch
from training.model import build_model, set_train_mode
from training.runtime import Runtime
from training.train import BEST, check_combined_out_dir, check_distinct_runs, start_out_dir

log = logging.getLogger(__name__)
MUST_MATCH = ("weights", "resnet_v1_strides", "frozen", "hidden", "dropout", "init_seed", "image_size")


def check_ingredients(configs: list[dict], run_dirs: list[Path]) -> None:
    """Refuse runs whose weights cannot be meaningfully averaged."""
    if len(configs) < 2:
        raise RefusedError("a soup needs at least two runs")
    check_distinct_runs(run_dirs, "soup")
    if configs[0].get("init_seed") is None:
        raise RefusedError(f"{run_dirs[0]} was not trained with --init-seed: runs must share the head's initialisation "
                         "for their weights to be averaged")
    for config, run_dir in zip(configs[1:], run_dirs[1:]):
        differing = [key for key in MUST_MATCH if config.get(key) != configs[0].get(key)]
        if differing:
            raise RefusedError(f"{run_dir} differs from {run_dirs[0]} in {', '.join(differing)}: not the same starting point")


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating tensors; integer buffers (BN batch counters) are taken from the first."""
    return {key: torch.stack([s[key] for s in states]).mean(0) if states[0][key].is_floating_point() else states[0][key]
            for key in states[0]}


def trainable_batchnorms(model: nn.Module, frozen: tuple[str, ...]) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and name.split(".")[0] not in frozen]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, images, config: TrainConfig, runtime: Runtime) -> int:
    """Exact (cumulative) BN statistics of the trainable part over `images`, in fp32; returns the count."""
    norms = trainable_batchnorms(model, config.frozen)
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all batches, not an exponential one
    set_train_mode(model, config.frozen)
    with runtime.autocast():
        for chunk in batches(images, config.eval_batch_size):
            model(to_network_input(to_unit_tensor(chunk).to(runtime.device)).contiguous(memory_format=runtime.memory_format))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()
    return len(images)


def make_soup(run_dirs: list[Path], config: TrainConfig, runtime: Runtime, recompute_bn: bool = True,
              overwrite: bool = False) -> dict:
    """Average the runs' best checkpoints into `config.out_dir/best.pt`; return the run_info to record.

    `recompute_bn=False` keeps the average of the runs' own BN statistics (an ablation). `overwrite` lets
    the soup replace a run already in `out_dir` (never one of its own runs: `check_combined_out_dir`).
    """
    started = time.perf_counter()
    configs = [json.loads((d / "config.json").read_text()) for d in run_dirs]
    check_ingredients(configs, run_dirs)
    check_combined_out_dir(config.out_dir, run_dirs, overwrite, "soup")
    first = configs[0]
    asked = config.to_dict()
    mismatched = [key for key in MUST_MATCH if key != "init_seed" and asked[key] != first[key]]
    if mismatched:
        raise RefusedError(f"the soup's own flags differ from its runs in {', '.join(mismatched)}: pass the runs' flags, "
                         "which evaluation and the model card rely on")
    states = [torch.load(d / BEST, map_location="cpu", weights_only=True)["model"] for d in run_dirs]
    ingredients = {str(d): sha256_of(d / BEST) for d in run_dirs}  # the checkpoints averaged, read before writing
    model = build_model("none", hidden=first["hidden"], dropout=first["dropout"], frozen=tuple(first["frozen"]),
                        resnet_v1_strides=first["resnet_v1_strides"])
    model.load_state_dict(average_states(states))
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    counted = 0
    if recompute_bn:
        train = load_split(config.data_root, "train", config.image_size, config.subset)
        counted = recompute_batchnorm(model, train.images, config, serving_runtime(runtime))
    out = config.out_dir
    start_out_dir(config, overwrite)
    save_torch({"model": model.state_dict(), "epoch": 0, "score": float("nan")}, out / BEST)
    write_text(out / "history.json", "[]\n")
    log.info("soup of %d runs -> %s (BN statistics: %s)", len(run_dirs), out,
             f"recomputed on {counted} training images" if recompute_bn else "averaged")
    return {"soup_of": ingredients, "batchnorm": "recomputed" if recompute_bn else "averaged",
            "batchnorm_images": counted,
            "best_epoch": None, "epochs_run": 0, "train_seconds": time.perf_counter() - started,
            "train_img_per_s": 0.0, "runtime": runtime.describe(), "select_metric": config.select_metric}

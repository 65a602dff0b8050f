"""Training-step throughput of the real recipe (ResNet-50, frozen stem, 224 input) per precision.

Why: `--precision auto` picks bf16 + channels_last only on CPUs with native bf16
(AMX / AVX512-BF16) and fp32 elsewhere. This measures every option in the same run so
the choice (and the 30-minute training target) can be checked on the machine at hand.
It also measures what `--fuse-bn` (the default) saves: the frozen stem BN-folded in the
training step, and the whole network BN-folded when scoring in fp32 (`results/fused_bn`).

    python benchmarks/train_throughput.py --steps 4 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training.model import FusedStemNetwork, build_model, fused_for_inference, set_train_mode
from training.runtime import Runtime, cpu_has_native_bf16, make_runtime

FROZEN = ("conv1", "bn1", "layer1", "layer2")


def images_per_second(runtime: Runtime, channels_last: bool, steps: int, batch_size: int, v1_strides: bool,
                      fused_stem: bool = False) -> float:
    torch.manual_seed(0)
    model = build_model("none", frozen=FROZEN, resnet_v1_strides=v1_strides)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(runtime.device, memory_format=memory_format)
    set_train_mode(model, FROZEN)
    forward = FusedStemNetwork(model, FROZEN) if fused_stem else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch_size, 3, 224, 224, device=runtime.device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 2, (batch_size,), device=runtime.device)
    scaler = runtime.grad_scaler()  # fp16 AMP pays for its loss scaling here as in training
    timings = []
    for step in range(steps + 1):  # the first step warms up kernels and is not counted
        start = time.perf_counter()
        with runtime.autocast():
            loss = F.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            timings.append(time.perf_counter() - start)
    return batch_size * len(timings) / sum(timings)


@torch.no_grad()
def scoring_images_per_second(runtime: Runtime, steps: int, batch_size: int, v1_strides: bool, fused: bool) -> float:
    """Eval-mode forward passes at the evaluation's precision (`runtime`), plain or BN-folded."""
    torch.manual_seed(0)
    model = build_model("none", resnet_v1_strides=v1_strides).to(runtime.device, memory_format=torch.channels_last).eval()
    model = fused_for_inference(model) if fused else model
    x = torch.randn(batch_size, 3, 224, 224, device=runtime.device).contiguous(memory_format=torch.channels_last)
    timings = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with runtime.autocast():
            model(x)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            timings.append(time.perf_counter() - start)
    return batch_size * len(timings) / sum(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resnet-v1-strides", action="store_true", help="the release recipe's stride placement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/train_throughput.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = make_runtime()
    variants = {"fp32": ("fp32", False, False), "fp32+channels_last": ("fp32", True, False),
                "bf16+channels_last": ("bf16", True, False),
                f"{auto.precision}+channels_last+fused_stem": (auto.precision, True, True)}
    if device == "cuda":
        variants["amp+channels_last"] = ("amp", True, False)
    figures = {}
    for name, (precision, channels_last, fused) in variants.items():
        figures[name] = images_per_second(Runtime(torch.device(device), precision), channels_last, args.steps,
                                          args.batch_size, args.resnet_v1_strides, fused)
        print(f"{name:36s} {figures[name]:7.2f} img/s  ({figures[name] / figures['fp32']:.2f}x fp32)", flush=True)
    unfused = figures[f"{auto.precision}+channels_last"]
    fused_ratio = figures[f"{auto.precision}+channels_last+fused_stem"] / unfused
    print(f"fused stem at {auto.describe()}: {fused_ratio:.2f}x the plain training step", flush=True)
    scoring = {}
    for fused in (False, True):
        name = "fp32_fused" if fused else "fp32"
        scoring[name] = scoring_images_per_second(Runtime(torch.device(device), "fp32"), args.steps, args.batch_size,
                                                  args.resnet_v1_strides, fused)
        print(f"scoring {name:28s} {scoring[name]:7.2f} img/s", flush=True)
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "native_bf16": cpu_has_native_bf16(), "device": device,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
        "auto_choice": auto.describe(), "batch_size": args.batch_size, "steps": args.steps,
        "resnet_v1_strides": args.resnet_v1_strides,
        "images_per_s": figures, "ratio_to_fp32": {k: v / figures["fp32"] for k, v in figures.items()},
        "fused_stem_ratio_at_auto": fused_ratio,
        "scoring_images_per_s": scoring, "scoring_fused_ratio": scoring["fp32_fused"] / scoring["fp32"],
        "epoch_minutes_at_auto": 4708 / unfused / 60,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

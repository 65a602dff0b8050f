"""Training-step throughput of the real recipe (ResNet-50, frozen stem, 224 input) per precision.

Why: `--precision auto` picks bf16 + channels_last only on CPUs with native bf16
(AMX / AVX512-BF16) and fp32 elsewhere. This measures every option in the same run so
the choice (and the 30-minute training target) can be checked on the machine at hand.

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

from training.model import build_model, set_train_mode
from training.runtime import Runtime, cpu_has_native_bf16, make_runtime

FROZEN = ("conv1", "bn1", "layer1", "layer2")


def images_per_second(runtime: Runtime, channels_last: bool, steps: int, batch_size: int) -> float:
    torch.manual_seed(0)
    model = build_model("none", frozen=FROZEN)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(runtime.device, memory_format=memory_format)
    set_train_mode(model, FROZEN)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch_size, 3, 224, 224, device=runtime.device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 2, (batch_size,), device=runtime.device)
    scaler = runtime.grad_scaler()  # fp16 AMP pays for its loss scaling here as in training
    timings = []
    for step in range(steps + 1):  # the first step warms up kernels and is not counted
        start = time.perf_counter()
        with runtime.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        with runtime.backward_precision():  # as training does: IEEE fp32 means the backward too
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            timings.append(time.perf_counter() - start)
    return batch_size * len(timings) / sum(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/train_throughput.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = {"fp32": ("fp32", False), "fp32+channels_last": ("fp32", True), "bf16+channels_last": ("bf16", True)}
    if device == "cuda":
        variants["amp+channels_last"] = ("amp", True)
    figures = {}
    for name, (precision, channels_last) in variants.items():
        figures[name] = images_per_second(Runtime(torch.device(device), precision), channels_last, args.steps, args.batch_size)
        print(f"{name:22s} {figures[name]:7.2f} img/s  ({figures[name] / figures['fp32']:.2f}x fp32)", flush=True)
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "native_bf16": cpu_has_native_bf16(), "device": device,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
        "auto_choice": make_runtime().describe(), "batch_size": args.batch_size, "steps": args.steps,
        "images_per_s": figures, "ratio_to_fp32": {k: v / figures["fp32"] for k, v in figures.items()},
        "epoch_minutes_at_auto": 4708 / figures["fp32+channels_last" if make_runtime().precision == "fp32" else "bf16+channels_last"] / 60,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

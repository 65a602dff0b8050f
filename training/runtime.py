"""Device and precision, decided once and passed down as a `Runtime`.

bf16 autocast (+ channels_last) pays only on CPUs with native bf16 (AMX / AVX512-BF16);
on others it is emulated and slower than fp32, so "auto" checks the CPU flags.
On CUDA "auto" is bf16 autocast where the GPU has it (Ampere and later: same range as fp32,
no loss scaling) and fp16 AMP with a gradient scaler ("amp") on older GPUs.
"fp32" on CUDA means IEEE fp32: cuDNN would otherwise run convolutions in TF32, and the
evaluation's figures must be those of the fp32 ONNX model served on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from training.errors import RefusedError

log = logging.getLogger("training")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | amp

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "amp":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return ieee_fp32() if self.device.type == "cuda" else contextlib.nullcontext()

    def backward_precision(self) -> contextlib.AbstractContextManager:
        """The matmul/convolution precision of the backward pass, which runs outside `autocast`:
        IEEE fp32 on CUDA when fp32 was asked for (cuDNN reads its TF32 flag when the backward runs,
        so without this the gradients of an "fp32" step were TF32); nothing to set otherwise."""
        return ieee_fp32() if self.device.type == "cuda" and self.precision == "fp32" else contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 AMP (its gradients underflow without it); a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "amp")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last

    def describe(self) -> str:
        return f"{self.device.type}/{self.precision}"


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Turn TF32 off for CUDA matmuls and convolutions inside the block, and restore it after."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def make_runtime(device: str = "auto", precision: str = "auto", threads: int = 0) -> Runtime:
    if threads:
        torch.set_num_threads(threads)
    chosen = chosen_device(device)
    if precision == "auto":
        if chosen.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "amp"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    elif precision == "bf16" and chosen.type == "cpu" and not cpu_has_native_bf16():
        log.warning("--precision bf16 on a CPU without native bf16 (AMX or AVX512-BF16): autocast is emulated here, "
                    "measured 0.08-0.38x the speed of fp32 (benchmarks/results/train_throughput_*.json); "
                    "--precision auto picks fp32 on this CPU")
    return Runtime(device=chosen, precision=precision)


def chosen_device(device: str) -> torch.device:
    """`device` as torch names it ("auto": CUDA when present); a name torch does not know, or a GPU this
    machine lacks, is refused here, before a run writes anything (each was a traceback mid-stage)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise RefusedError(f"device {device!r} is not a torch device (auto, cpu, cuda, cuda:N)") from exc
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise RefusedError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                           "(--device cpu or auto)")
    return chosen


def seed_everything(seed: int, deterministic: bool) -> torch.Generator:
    """Seed python, numpy and torch; deterministic=True also forces deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shape: let cuDNN pick its fastest kernels
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def rng_states(device: torch.device) -> dict[str, Any]:
    """torch's global generators, for last.pt: dropout draws from them (the augmentation has its own
    generator), and `seed_everything` on resume would otherwise restart them from the seed."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo `rng_states`; call it after building the network, whose new head draws from the same generator.

    CUDA states are restored for the devices this machine has (a CPU resume of a GPU run keeps none).
    """
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)

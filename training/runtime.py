"""Device and precision, decided once and passed down as a `Runtime`.

bf16 autocast (+ channels_last) pays only on CPUs with native bf16 (AMX / AVX512-BF16);
on others it is emulated and slower than fp32, so "auto" checks the CPU flags.
CUDA gets fp16 AMP with a gradient scaler.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | amp

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "amp":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last

    def describe(self) -> str:
        return f"{self.device.type}/{self.precision}"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def make_runtime(device: str = "auto", precision: str = "auto", threads: int = 0) -> Runtime:
    if threads:
        torch.set_num_threads(threads)
    chosen = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if precision == "auto":
        if chosen.type == "cuda":
            precision = "amp"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    return Runtime(device=chosen, precision=precision)


def seed_everything(seed: int, deterministic: bool) -> torch.Generator:
    """Seed python, numpy and torch; deterministic=True also forces deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator

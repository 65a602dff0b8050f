"""Device and precision policy: loss scaling only for fp16, and fp32 that really is fp32 on CUDA."""

import torch

from training.runtime import Runtime, ieee_fp32, make_runtime


def test_grad_scaler_is_on_only_for_fp16_amp():
    assert make_runtime("cpu", "amp").grad_scaler().is_enabled()
    for precision in ("fp32", "bf16"):
        assert not make_runtime("cpu", precision).grad_scaler().is_enabled()


def test_ieee_fp32_turns_tf32_off_inside_and_restores_it():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32"
    try:
        with ieee_fp32():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def test_fp32_context_is_ieee_on_cuda_and_plain_on_cpu():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        with Runtime(torch.device("cuda"), "fp32").autocast():
            assert matmul.fp32_precision == "ieee"
        with Runtime(torch.device("cpu"), "fp32").autocast():
            assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr("training.runtime.cpu_has_native_bf16", lambda: True)
    assert make_runtime("cpu", "auto").precision == "bf16"
    monkeypatch.setattr("training.runtime.cpu_has_native_bf16", lambda: False)
    assert make_runtime("cpu", "auto").precision == "fp32"

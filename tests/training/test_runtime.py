"""Device and precision policy: loss scaling only for fp16, and fp32 that really is fp32 on CUDA."""

import pytest
import torch

from training.runtime import Runtime, ieee_fp32, make_runtime


def test_grad_scaler_is_on_only_for_fp16_amp():
    assert make_runtime("cpu", "amp").grad_scaler().is_enabled()
    for precision in ("fp32", "bf16"):
        assert not make_runtime("cpu", precision).grad_scaler().is_enabled()


@pytest.fixture
def tf32():
    """cuDNN's and cuBLAS's fp32 precision flags set to TF32 for the test, restored after it."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32"
    yield conv, matmul
    conv.fp32_precision, matmul.fp32_precision = before


def test_ieee_fp32_turns_tf32_off_inside_and_restores_it(tf32):
    conv, matmul = tf32
    with ieee_fp32():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")


def test_fp32_context_is_ieee_on_cuda_and_plain_on_cpu(tf32):
    _, matmul = tf32
    with Runtime(torch.device("cuda"), "fp32").autocast():
        assert matmul.fp32_precision == "ieee"
    with Runtime(torch.device("cpu"), "fp32").autocast():
        assert matmul.fp32_precision == "tf32"


def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr("training.runtime.cpu_has_native_bf16", lambda: True)
    assert make_runtime("cpu", "auto").precision == "bf16"
    monkeypatch.setattr("training.runtime.cpu_has_native_bf16", lambda: False)
    assert make_runtime("cpu", "auto").precision == "fp32"


def test_bf16_asked_for_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch, caplog):
    """Emulated bf16 ran at 0.08x fp32 on an AVX2-only EPYC: the 1.1.0 recipe would take over a day there, with
    nothing said; `auto` picks fp32 on such a CPU, but `--precision bf16` was taken as it came."""
    monkeypatch.setattr("training.runtime.cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="training"):
        assert make_runtime("cpu", "bf16").precision == "bf16"
    assert "without native bf16" in caplog.text and "--precision auto picks fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr("training.runtime.cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="training"):
        make_runtime("cpu", "bf16")
        make_runtime("cpu", "auto")
    assert caplog.text == ""


def test_fp32_backward_is_ieee_on_cuda_too(tf32):
    """cuDNN reads its TF32 flag when the backward runs, after the forward's autocast has exited."""
    conv, _ = tf32
    with Runtime(torch.device("cuda"), "fp32").backward_precision():
        assert conv.fp32_precision == "ieee"
    for runtime in (Runtime(torch.device("cuda"), "bf16"), Runtime(torch.device("cpu"), "fp32")):
        with runtime.backward_precision():
            assert conv.fp32_precision == "tf32"


def test_training_runs_its_backward_inside_the_backward_precision(monkeypatch, tiny_network, data_root, tmp_path):
    """The wiring, on the CPU: every gradient of a training step is computed inside the scope."""
    import contextlib

    from tests.training.conftest import tiny_config
    from training import train

    inside, seen = [False], []

    @contextlib.contextmanager
    def recording_scope(self):
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(Runtime, "backward_precision", recording_scope)
    original_build = train.build_network

    def build_with_hooks(config):
        model = original_build(config)
        for parameter in model.parameters():
            parameter.register_hook(lambda grad: seen.append(inside[0]) or grad)
        return model

    monkeypatch.setattr(train, "build_network", build_with_hooks)
    train.fit(tiny_config(tmp_path / "run", data_root, epochs=1), Runtime(torch.device("cpu"), "fp32"))
    assert seen and all(seen)

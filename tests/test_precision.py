"""The TF32 warning: once per process, only for float32 models on a GPU with TF32 on."""

import warnings

import mlx.core as mx
import pytest
from helpers import spec_tokens, tiny_spec_model

import mlx_specstream.precision as precision


@pytest.fixture
def gpu(monkeypatch):
    """Pretends MLX computes on a GPU, with the warning not yet given."""
    monkeypatch.setattr(precision, "on_gpu", lambda: True)
    monkeypatch.setattr(precision, "_warned", False)
    return monkeypatch


def _warnings(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec_tokens(model, [1, 2, 3], 4)
    return [w for w in caught if "TF32" in str(w.message)]


def test_float32_on_a_gpu_with_tf32_on_warns_once(gpu):
    gpu.delenv("MLX_ENABLE_TF32", raising=False)  # MLX's default: on
    model = tiny_spec_model(mode="lossless", num_streams=2)
    first = _warnings(model)
    assert len(first) == 1 and "MLX_ENABLE_TF32=0" in str(first[0].message)
    assert _warnings(model) == []  # once per process


@pytest.mark.parametrize("value", ["1", "2", "yes"])
def test_any_value_but_zero_leaves_tf32_on(gpu, value):
    gpu.setenv("MLX_ENABLE_TF32", value)
    assert precision.tf32_enabled()


def test_no_warning_with_tf32_off_in_low_precision_or_on_the_cpu(gpu):
    gpu.setenv("MLX_ENABLE_TF32", "0")
    assert _warnings(tiny_spec_model(mode="lossless", num_streams=2)) == []
    gpu.setenv("MLX_ENABLE_TF32", "1")
    for quant in (None, 4):  # bfloat16, and a 4-bit base whose scales are bfloat16
        bf16 = tiny_spec_model(mode="lossless", num_streams=2, dtype=mx.bfloat16, quant_bits=quant)
        assert precision.compute_dtype(bf16) == mx.bfloat16
        assert _warnings(bf16) == []
    gpu.setattr(precision, "on_gpu", lambda: False)
    assert _warnings(tiny_spec_model(mode="lossless", num_streams=2)) == []


def test_the_real_device_decides_here(monkeypatch):
    """On this machine (CPU CI) nothing warns; on a GPU the tests turn TF32 off."""
    monkeypatch.setattr(precision, "_warned", False)
    monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
    assert precision.tf32_enabled() == precision.on_gpu()
    assert precision.on_gpu() == (mx.default_device().type == mx.DeviceType.gpu)


def test_device_key_names_the_gpu_or_the_cpus_platform(monkeypatch):
    """Tuned settings are keyed by the GPU's name, or by a CPU's system and
    architecture (not its model: the BLAS that decides a wide pass's cost comes
    with the platform's wheel)."""
    import platform

    if not precision.on_gpu():
        assert precision.device_key() == f"cpu:{platform.system()}-{platform.machine()}"
    monkeypatch.setattr(precision, "on_gpu", lambda: True)
    monkeypatch.setattr(precision.mx, "device_info", lambda: {"device_name": "Apple M9 Max"})
    assert precision.device_key() == "gpu:Apple M9 Max"
    monkeypatch.setattr(precision, "on_gpu", lambda: False)
    assert precision.device_key().startswith("cpu:")

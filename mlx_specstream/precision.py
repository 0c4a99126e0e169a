"""Reduced-precision float32 matmuls on GPUs (TF32), and the one warning about them.

MLX runs float32 matmuls in TF32 on GPUs that have it (NVIDIA's, through its
CUDA backend, and Apple's newest) unless ``MLX_ENABLE_TF32=0``. A row computed
alone then differs from the same row inside a batch by about 1e-2, so a tree
pass no longer reproduces plain decoding token for token. bfloat16 and float16
models are not affected by the setting.
"""

import os
import platform
import warnings

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

TF32_VARIABLE = "MLX_ENABLE_TF32"
_warned = False


def on_gpu() -> bool:
    """Whether MLX computes on a GPU (Metal or CUDA) by default."""
    return mx.default_device().type == mx.DeviceType.gpu


def device_key() -> str:
    """The device MLX computes on by default, as the tuner keys what it measured:
    ``"gpu:<name>"`` (``"gpu:Apple M2 Pro"``, ``"gpu:NVIDIA H200"``) or
    ``"cpu:<system>-<machine>"`` (``"cpu:Linux-x86_64"``, ``"cpu:Darwin-arm64"``).
    A CPU is keyed by platform, not model: its BLAS, which decides what a wide
    pass costs, comes with the platform's MLX wheel."""
    if on_gpu():
        return f"gpu:{mx.device_info().get('device_name', 'unnamed')}"
    return f"cpu:{platform.system()}-{platform.machine()}"


def on_cuda() -> bool:
    """Whether MLX computes on an NVIDIA GPU (its CUDA backend) by default."""
    return on_gpu() and hasattr(mx, "cuda") and mx.cuda.is_available()


def tf32_enabled() -> bool:
    """Whether float32 matmuls may run in TF32 here: on a GPU, unless
    ``MLX_ENABLE_TF32`` is ``0`` (MLX reads a nonzero integer as on, and
    defaults to on)."""
    if not on_gpu():
        return False
    value = os.environ.get(TF32_VARIABLE, "1").strip()
    try:
        return int(value) != 0
    except ValueError:  # not an integer: MLX does not read it as off either
        return True


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The model's floating dtype (a quantized layer's scales carry it)."""
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    raise ValueError("The model has no floating-point parameters.")


def warn_if_tf32(model: nn.Module) -> bool:
    """Warns once per process when a float32 model runs with TF32 on.

    Returns:
        bool: whether this call warned.
    """
    global _warned
    if _warned or not tf32_enabled() or compute_dtype(model) != mx.float32:
        return False
    _warned = True
    warnings.warn(
        "This float32 model runs on a GPU with TF32 matmuls on: a tree pass and plain "
        "decoding then round differently, and greedy output can differ from plain decoding. "
        f"Set {TF32_VARIABLE}=0 before starting Python for token-identical output.",
        stacklevel=3,
    )
    return True

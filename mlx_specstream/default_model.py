"""The model used when none is given: ``mlx_specstream/models/default``.

It is a 6.5M-parameter Llama trained on Python standard-library code with
Speculative Streaming, built by ``python -m convert.build_default_model``
(see ``benchmarks/RESULTS.md``). It is stored in bfloat16 to fit the
package; on the CPU backend, where float32 is the fast dtype, it runs in
float32 (bfloat16 values are exact in float32, so the weights are the same; a
quantized base runs as its weights dequantized, as ``mx.dequantize`` gives them).
``models/draft`` is a 1M-parameter draft model with the same tokenizer, for
mlx-lm's own speculative decoding in the benchmark.
"""

from pathlib import Path

import mlx.core as mx

MODELS = Path(__file__).resolve().parent / "models"
DEFAULT_DIR = MODELS / "default"
DRAFT_DIR = MODELS / "draft"


def load_default(drafter=None, return_config=False, dequantize=None, **kwargs):
    """Returns ``(model, tokenizer)`` (and its config with ``return_config``) for the
    embedded model, with the drafter from the ``drafter`` directory instead of its
    streams when given. ``kwargs`` are :func:`mlx_specstream.load`'s (``adapter_path``,
    ``tokenizer_config``, ...). On a CPU it computes in float32, a quantized base
    dequantized (``dequantize``: ``None`` decides so by the device)."""
    from .utils import load

    if not (DEFAULT_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"The embedded model is missing from {DEFAULT_DIR}; reinstall the package or rebuild "
            "it with `python -m convert.build_default_model`."
        )
    # On a CPU a quantized base runs as its dequantized weights: MLX's CPU quantized matmuls
    # decoded 10x slower than float32 (benchmarks/results/quantized_decode-default-s60.md).
    cpu = mx.default_device() == mx.cpu
    dequantize = cpu if dequantize is None else dequantize
    model, tokenizer, config = load(
        str(DEFAULT_DIR), drafter=drafter, return_config=True, dequantize=dequantize, **kwargs
    )
    if cpu:
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())  # cast now, not lazily in whichever thread decodes first
    return (model, tokenizer, config) if return_config else (model, tokenizer)

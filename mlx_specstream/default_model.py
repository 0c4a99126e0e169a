"""The model used when none is given: ``mlx_specstream/models/default``.

It is a 6.5M-parameter Llama trained on Python standard-library code with
Speculative Streaming, built by ``python -m convert.build_default_model``
(see ``benchmarks/RESULTS.md``). It is stored in bfloat16 to fit the
package; on the CPU backend, where float32 is the fast dtype, it runs in
float32 (bfloat16 values are exact in float32, so the weights are the same).
``models/draft`` is a 1M-parameter draft model with the same tokenizer, for
mlx-lm's own speculative decoding in the benchmark.
"""

from pathlib import Path

import mlx.core as mx

MODELS = Path(__file__).resolve().parent / "models"
DEFAULT_DIR = MODELS / "default"
DRAFT_DIR = MODELS / "draft"


def load_default(drafter=None, adapter_path=None, tokenizer_config=None):
    """Returns ``(model, tokenizer)`` for the embedded model (with the drafter
    from the ``drafter`` directory instead of its streams, and ``mlx_lm.lora``
    adapters on its base, when given)."""
    from .utils import load

    if not (DEFAULT_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"The embedded model is missing from {DEFAULT_DIR}; reinstall the package or rebuild "
            "it with `python -m convert.build_default_model`."
        )
    model, tokenizer = load(
        str(DEFAULT_DIR), tokenizer_config, drafter=drafter, adapter_path=adapter_path
    )
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())  # cast now, not lazily in whichever thread decodes first
    return model, tokenizer

"""Low precision: greedy output may leave plain decoding's only at a near-tie.

On this CPU the outputs are identical; on a GPU a verify pass over several rows
and a one-row pass run different kernels, and the bound of
:mod:`mlx_specstream.fidelity` says which divergences rounding can explain.
"""

import random

import mlx.core as mx
import pytest
from helpers import plain_greedy, spec_tokens, tiny_spec_model

import mlx_specstream.layout as layout_module
from mlx_specstream.fidelity import Divergence, first_divergence, near_tie_bound

DTYPES = {
    "bfloat16": dict(dtype=mx.bfloat16),
    "float16": dict(dtype=mx.float16),
    "bfloat16-q4": dict(dtype=mx.bfloat16, quant_bits=4),
}
MAX_TOKENS = 48


def _prompts(n=6, vocab=64):
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(1, 12))] for _ in range(n)]


def check_near_ties(model):
    """Asserts every prompt's output equals plain decoding's or first leaves it at a near-tie."""
    for prompt in _prompts():
        ours = spec_tokens(model, prompt, MAX_TOKENS)[0]
        d = first_divergence(model, prompt, ours, plain_greedy(model, prompt, MAX_TOKENS))
        assert d is None or d.near_tie, f"prompt {prompt}: {d} is not a near-tie"


def test_bound_worked_example():
    assert near_tie_bound(3.0, 1.0, mx.bfloat16, 4) == 10 * 2**-7 * 4.0 == 0.3125
    assert near_tie_bound(-3.0, 1.0, mx.float16, 1) == 4 * 2**-10 * 4.0
    assert near_tie_bound(3.0, 1.0, mx.float32, 4) < 1e-5
    with pytest.raises(ValueError, match="int8"):
        near_tie_bound(1.0, 1.0, mx.int8, 4)


def test_first_divergence_scores_the_plain_models_logits():
    model = tiny_spec_model("llama", vocab_size=64, num_streams=3, top_k=2, dtype=mx.bfloat16)
    prompt = [3, 1, 4]
    plain = plain_greedy(model, prompt, 8)
    assert first_divergence(model, prompt, plain, plain) is None
    logits = model(mx.array(prompt + plain[:5])[None])[0, -1].astype(mx.float32)
    runner_up = mx.argsort(-logits)[1].item()
    ours = plain[:5] + [runner_up] + plain[6:]
    d = first_divergence(model, prompt, ours, plain)
    gap = (logits[plain[5]] - logits[runner_up]).item()
    bound = near_tie_bound(logits[plain[5]].item(), logits[runner_up].item(), mx.bfloat16, 4)
    assert d == Divergence(5, plain[5], runner_up, gap, bound)
    with pytest.raises(ValueError, match="8 and 7"):
        first_divergence(model, prompt, plain, plain[:-1])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_low_precision_leaves_plain_decoding_only_at_near_ties(arch, dtype):
    model = tiny_spec_model(arch, vocab_size=64, num_streams=3, top_k=2, **DTYPES[dtype])
    check_near_ties(model)


@pytest.mark.parametrize("dtype", ["bfloat16", "bfloat16-q4"])
def test_negative_control_a_wrong_mask_fails_the_near_tie_test(monkeypatch, fresh_layouts, dtype):
    """Nodes that see their siblings change logits by far more than rounding."""
    real = layout_module.ancestor_mask
    monkeypatch.setattr(layout_module, "ancestor_mask", lambda p: real(p) | True)
    model = tiny_spec_model("llama", vocab_size=64, num_streams=3, top_k=2, **DTYPES[dtype])
    with pytest.raises(AssertionError, match="is not a near-tie"):
        check_near_ties(model)

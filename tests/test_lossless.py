"""Greedy Speculative Streaming equals plain decoding of the same model.

Lossless mode is compared with mlx-lm's own greedy decoding; shared mode
(whose main stream attends to its streams) with ``speculative=False``
decoding of the same model. Small vocabularies make random streams guess
right often, so deep, non-prefix paths and cache gathers are exercised.

On a GPU, a model in bfloat16 or float16, or with quantized weights, runs its
several-row passes on other kernels than its one-row passes: there output may
first leave plain decoding's only at a near-tie (:mod:`mlx_specstream.fidelity`,
``tests/test_near_tie.py``). Everywhere else it must be identical.
"""

import mlx.core as mx
import pytest
from helpers import (
    ARCHS,
    assert_lossless,
    near_ties_allowed,
    plain_greedy,
    spec_tokens,
    tiny_spec_model,
)

import mlx_specstream.decode as decode_module
import mlx_specstream.layout as layout_module
from mlx_specstream import precision

PROMPTS = [[5], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]]
MAX_TOKENS = 64

# (num_streams, top_k, prune_threshold, max_tree_nodes)
SHAPES = {
    "chain-g1-k1": dict(num_streams=1, top_k=1),
    "g2-k3": dict(num_streams=2, top_k=3, max_tree_nodes=13),
    "g3-k2-pruned": dict(num_streams=3, top_k=2, prune_threshold=0.1),
    "g4-k[3,2,1,1]-capped": dict(num_streams=4, top_k=[3, 2, 1, 1], max_tree_nodes=9),
    "g3-k2-prune-all": dict(num_streams=3, top_k=2, prune_threshold=1.0),
}


def check_equal(got, want):
    assert len(got) == len(want)
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert (
        first is None
    ), f"first difference at token {first}: {got[first:first+5]} vs {want[first:first+5]}"


def run_case(model, vocab, shape_name, reference):
    drafted = 0
    for prompt in PROMPTS:
        prompt = [t % vocab for t in prompt]
        toks, records = spec_tokens(model, prompt, MAX_TOKENS)
        assert_lossless(model, prompt, toks, reference(model, prompt))
        passes = records[-1][3]
        drafted += sum(r[2] for r in records)
        assert passes <= len(toks)
        if shape_name == "g3-k2-prune-all":
            assert passes == len(toks)  # every draft pruned: one token per pass
    if shape_name != "g3-k2-prune-all":
        assert drafted > 0, "no draft token was ever accepted: the test exercised nothing"


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_equals_mlx_lm(arch, shape):
    model = tiny_spec_model(arch, vocab_size=8, mode="lossless", **SHAPES[shape])
    run_case(model, 8, shape, lambda m, p: plain_greedy(m, p, MAX_TOKENS))


def nonspeculative(model, prompt):
    return spec_tokens(model, prompt, MAX_TOKENS, speculative=False)[0]


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_equals_nonspeculative(arch, shape):
    model = tiny_spec_model(arch, vocab_size=8, mode="shared", **SHAPES[shape])
    run_case(model, 8, shape, nonspeculative)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_larger_vocab_and_offset_positions(arch):
    for mode, reference in [
        ("lossless", lambda m, p: plain_greedy(m, p, MAX_TOKENS)),
        ("shared", nonspeculative),
    ]:
        model = tiny_spec_model(
            arch, vocab_size=64, mode=mode, num_streams=3, top_k=3, stream_positions="offset"
        )
        for prompt in PROMPTS:
            check_equal(spec_tokens(model, prompt, MAX_TOKENS)[0], reference(model, prompt))


def test_shared_mode_differs_from_base_model():
    # Shared mode is a different model: its main stream reads its streams.
    model = tiny_spec_model("llama", vocab_size=64, mode="shared", num_streams=3, top_k=2)
    assert spec_tokens(model, PROMPTS[1], MAX_TOKENS)[0] != plain_greedy(
        model, PROMPTS[1], MAX_TOKENS
    )


DTYPES = {
    "float16": dict(dtype=mx.float16),
    "bfloat16": dict(dtype=mx.bfloat16),
    "q4": dict(quant_bits=4),
    "q8": dict(quant_bits=8),
    "float16-q4": dict(dtype=mx.float16, quant_bits=4),
}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_dtypes_lossless(arch, dtype):
    model = tiny_spec_model(
        arch, vocab_size=8, num_streams=3, top_k=2, prune_threshold=0.05, **DTYPES[dtype]
    )
    run_case(model, 8, dtype, lambda m, p: plain_greedy(m, p, MAX_TOKENS))
    # Streams stay float32 whatever the base dtype.
    assert model.speculative_streams.streams.embeddings.dtype == mx.float32


@pytest.mark.parametrize("dtype", ["bfloat16", "q4"])
def test_dtypes_shared(dtype):
    model = tiny_spec_model(
        "qwen3", vocab_size=8, mode="shared", num_streams=3, top_k=2, **DTYPES[dtype]
    )
    run_case(model, 8, dtype, nonspeculative)


# ---- negative controls: the equality checks above can fail ------------------


@pytest.mark.parametrize("gpu", [False, True])
def test_assert_lossless_on_each_device(monkeypatch, gpu):
    """The GPU's rule in bfloat16, run here: identical output passes; a token changed
    where plain decoding's choice is clear fails it, as it fails exact equality."""
    monkeypatch.setattr(precision, "on_gpu", lambda: gpu)
    model = tiny_spec_model("llama", vocab_size=8, num_streams=3, top_k=2, dtype=mx.bfloat16)
    assert near_ties_allowed(model) == gpu
    f32 = tiny_spec_model("llama", vocab_size=8, num_streams=3, top_k=2)
    assert not near_ties_allowed(f32)
    prompt = [t % 8 for t in PROMPTS[1]]
    want = plain_greedy(model, prompt, MAX_TOKENS)
    assert_lossless(model, prompt, spec_tokens(model, prompt, MAX_TOKENS)[0], want)
    logits = model(mx.array(prompt)[None])[0, -1].astype(mx.float32)
    worst = int(mx.argmin(logits).item())  # far from a tie with the argmax
    with pytest.raises(AssertionError):
        assert_lossless(model, prompt, [worst] + want[1:], want)


def test_negative_control_wrong_tree_mask(monkeypatch, fresh_layouts):
    """Letting tree nodes see their siblings must break losslessness."""
    real = layout_module.ancestor_mask
    monkeypatch.setattr(layout_module, "ancestor_mask", lambda p: real(p) | True)
    model = tiny_spec_model("llama", vocab_size=8, num_streams=3, top_k=2)
    with pytest.raises(AssertionError):
        run_case(model, 8, "g3-k2", lambda m, p: plain_greedy(m, p, MAX_TOKENS))


@pytest.mark.parametrize("stream_pass", ["fused", "split"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "starcoder2"])
def test_lossless_both_stream_passes(arch, stream_pass):
    """Lossless decoding with the streams of every node in the verify pass (fused),
    and with a second pass for the accepted node's streams (split)."""
    model = tiny_spec_model(
        arch, vocab_size=8, num_streams=3, top_k=2, prune_threshold=0.05, stream_pass=stream_pass
    )
    assert model.speculative_streams.split_streams == (stream_pass == "split")
    run_case(model, 8, "g3-k2", lambda m, p: plain_greedy(m, p, MAX_TOKENS))


def _passes_and_tokens(model, head_on_streams, monkeypatch):
    monkeypatch.setattr(decode_module, "on_gpu", lambda: head_on_streams)
    out = []
    for prompt in PROMPTS:
        toks, records = spec_tokens(model, [t % 8 for t in prompt], MAX_TOKENS)
        out.append((toks, records[-1][3]))
    return out


@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_stream_logits_from_the_pass_head_draft_as_a_separate_head(monkeypatch, mode):
    """On a GPU the fused pass's own head call also yields every node's stream
    logits: the output is unchanged and the drafts (so the pass counts) equal
    those of the accepted node's streams sent through the head alone."""
    model = tiny_spec_model("llama", vocab_size=8, mode=mode, num_streams=3, top_k=2)
    together = _passes_and_tokens(model, True, monkeypatch)
    alone = _passes_and_tokens(model, False, monkeypatch)
    assert together == alone
    reference = plain_greedy if mode == "lossless" else (lambda m, p, n: nonspeculative(m, p))
    for (toks, _), prompt in zip(together, PROMPTS):
        check_equal(toks, reference(model, [t % 8 for t in prompt], MAX_TOKENS))


def test_negative_control_stream_logits_of_the_wrong_node(monkeypatch):
    """Drafting from the root's streams instead of the accepted node's changes the drafts."""
    model = tiny_spec_model("llama", vocab_size=8, num_streams=3, top_k=2)
    alone = _passes_and_tokens(model, False, monkeypatch)
    real = decode_module.Decoder._stream_logits
    monkeypatch.setattr(
        decode_module.Decoder, "_stream_logits", lambda self, out, node: real(self, out, node * 0)
    )
    assert _passes_and_tokens(model, True, monkeypatch) != alone


def test_negative_control_wrong_positions(monkeypatch, fresh_layouts):
    """Giving every tree node the root's position must break losslessness."""
    monkeypatch.setattr(layout_module, "tree_depths", lambda p: [0] * len(p))
    model = tiny_spec_model("qwen2", vocab_size=8, num_streams=3, top_k=2)
    with pytest.raises(AssertionError):
        run_case(model, 8, "g3-k2", lambda m, p: plain_greedy(m, p, MAX_TOKENS))


def test_negative_control_main_sees_streams_in_lossless_mode(monkeypatch, fresh_layouts):
    """A lossless model whose main stream reads its streams is no longer the base model."""
    real = layout_module.stream_attention_mask
    monkeypatch.setattr(
        layout_module, "stream_attention_mask", lambda anc, g, shared: real(anc, g, True)
    )
    model = tiny_spec_model("llama", vocab_size=8, num_streams=3, top_k=2, stream_pass="fused")
    with pytest.raises(AssertionError):
        run_case(model, 8, "g3-k2", lambda m, p: plain_greedy(m, p, MAX_TOKENS))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "phi3"])
@pytest.mark.parametrize("quant_bits", [None, 4])
def test_stream_lora_keeps_lossless(arch, quant_bits):
    model = tiny_spec_model(
        arch, vocab_size=8, num_streams=3, top_k=2, stream_lora_rank=4, quant_bits=quant_bits
    )
    run_case(model, 8, "lora", lambda m, p: plain_greedy(m, p, MAX_TOKENS))


def test_stream_lora_in_shared_mode():
    model = tiny_spec_model(
        "qwen2",
        vocab_size=8,
        mode="shared",
        num_streams=2,
        top_k=2,
        stream_lora_rank=2,
        stream_lora_targets=["self_attn.v_proj"],
    )
    run_case(model, 8, "lora", nonspeculative)

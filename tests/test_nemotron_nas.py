"""Nemotron-NAS (Llama-3.1/3.3-Nemotron Super and Ultra): layers whose attention is
removed (``no_op``) get no cache from the model, so its cache list is shorter than its
layers; ``model_parts.cache_slots`` maps each layer to its cache. Tiny config: 4 layers,
the second and fourth without attention (the fourth is a stream layer), the third
without an MLP. Its ``test_architectures`` entries check lookup and stream trees."""

import mlx.core as mx
import pytest
from helpers import (
    assert_lossless,
    plain_greedy,
    spec_tokens,
    tiny_model,
    tiny_spec_model,
    word_tokenizer,
)
from test_batch import LIMITS, alone, decode

import mlx_specstream.support as support
from mlx_specstream.model_parts import cache_slots, kv_sources
from mlx_specstream.streams import attach_verifier
from mlx_specstream.support import TreeUnsupported

ARCH = "nemotron-nas"
PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]
N = 48


def test_cache_slots_golden():
    """Layers 1 and 3 have no attention: the model makes 2 caches, for layers 0 and 2."""
    model = tiny_model(ARCH, vocab_size=8)
    assert [layer.self_attn is None for layer in model.layers] == [False, True, False, True]
    assert len(model.make_cache()) == 2
    assert cache_slots(model) == [0, None, 1, None]
    assert cache_slots(tiny_model("llama", vocab_size=8)) == [0, 1, 2, 3]
    assert cache_slots(tiny_model("gemma4_text", vocab_size=8)) == [0, 1, 2, 3, 3, 2]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tree_nodes=6, pipeline=True),
        dict(max_tree_nodes=6, stream_pass="split"),
        dict(max_tree_nodes=6, num_stream_layers=3),  # (the stream layers: 1, 2, 3)
        dict(max_tree_nodes=6, dtype=mx.bfloat16),
        dict(max_tree_nodes=6, quant_bits=4),
    ],
)
def test_stream_trees_equal_plain(kwargs):
    kwargs = dict(kwargs)
    made = {k: kwargs.pop(k) for k in ("dtype", "quant_bits", "num_stream_layers") if k in kwargs}
    model = tiny_spec_model(ARCH, vocab_size=8, num_streams=3, top_k=2, **made)
    if kwargs.pop("stream_pass", None):
        model.speculative_streams.split_streams = True
    want = plain_greedy(model, PROMPT, N)
    got, records = spec_tokens(model, PROMPT, N, **kwargs)
    assert_lossless(model, PROMPT, got, want)
    assert len({r[3] for r in records}) < N - 5, "no draft accepted: the test has no power"


@pytest.mark.parametrize("role", ["model", "draft model"])
def test_with_a_draft_model(role):
    """As the model a Llama drafts for, and as the draft model of a Llama."""
    nas, llama = tiny_model(ARCH, vocab_size=8), tiny_model("llama", vocab_size=8, seed=3)
    model, draft = (nas, llama) if role == "model" else (llama, nas)
    want = plain_greedy(model, PROMPT, N)
    assert spec_tokens(model, PROMPT, N, draft_model=draft, num_draft_tokens=3)[0] == want
    assert spec_tokens(model, PROMPT, N, draft_model=model, num_draft_tokens=3)[0] == want


@pytest.mark.parametrize("kwargs", [dict(draft="ngram"), dict(draft="streams", num_draft_tokens=2)])
def test_batch_rows_equal_each_prompt_alone(kwargs):
    model = tiny_spec_model(ARCH, vocab_size=8, num_streams=3, top_k=2)
    prompts = [PROMPT, [5, 2, 6], [1, 4, 1, 4, 1], [7]]
    tokens, passes = decode(model, prompts, **kwargs)
    assert tokens == alone(model, prompts)
    assert passes < max(LIMITS), "no draft accepted: the test has no power"


def test_the_server_serves_it_with_prompt_lookup():
    from test_server_batching import lookup_service, submit, submit_together, answer

    from mlx_specstream.server import make_server, service_of

    V = 64
    model, tok = tiny_model(ARCH, vocab_size=V), word_tokenizer(V)
    prompts = [[3, 4, 5, 3, 4, 5, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [20]]
    body = {"max_tokens": 24, "num_draft_tokens": 3}
    want = [tok.decode(plain_greedy(model, p, 24)) for p in prompts]
    server = make_server(model, tok, "tiny", port=0, draft="ngram")
    try:
        svc = lookup_service(lambda m, t, **d: service_of(server), model, tok)
        got = [answer(j)[0][0] for j in submit_together(svc, [(p, body) for p in prompts])]
        assert svc.served["batched"] == 1 and got == want
        assert answer(submit(svc, prompts[0], **body))[0][0] == want[0]  # (alone)
    finally:
        server.server_close()


def test_streams_train_in_mlx_and_the_base_stays_bit_identical():
    """``mlx_specstream.train``'s loss runs the same passes: the streams learn far
    above chance (1/64) and the base does not change."""
    from test_train import train_tiny

    before, after, result, unchanged = train_tiny(ARCH)
    assert max(before.top1()) < 0.2, before.text()
    assert min(after.top1()) > 0.5, after.text()
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert unchanged


def test_train_cli_writes_a_model_that_loads_and_decodes_losslessly(tmp_path):
    """A Mac user's three lines on a Nemotron-NAS directory (``test_train``'s check),
    self-distilled: this tiny base's greedy text is not the data's cycle."""
    from helpers import BASE, _NAS_BLOCKS
    from test_train import V, assert_train_cli_decodes_losslessly

    config = {"model_type": ARCH, **BASE, "block_configs": _NAS_BLOCKS, "vocab_size": V}
    assert_train_cli_decodes_losslessly(tmp_path, ARCH, config, extra=["--self-distill"])


def test_attention_replaced_by_a_linear_map_is_refused():
    """``replace_with_linear``: its layer never writes the cache mlx-lm hands it."""
    from helpers import _NAS_BLOCKS

    blocks = [dict(b) for b in _NAS_BLOCKS]
    blocks[1] = dict(attention=dict(replace_with_linear=True), ffn=dict(ffn_mult=1.0))
    model = tiny_model(ARCH, vocab_size=8, block_configs=blocks)
    with pytest.raises(ValueError, match=r"layers \[1\] replace their attention by a linear"):
        spec_tokens(model, PROMPT, 8, draft="ngram")


def test_negative_control_caches_paired_with_layers_by_index(monkeypatch):
    """Without the mapping (each layer taken to read the cache of its index) the model
    is refused, not decoded wrongly."""
    monkeypatch.setattr(support, "cache_slots", kv_sources)
    with pytest.raises(TreeUnsupported, match="makes 2 caches for its 4 layers"):
        attach_verifier(tiny_model(ARCH, vocab_size=8))

"""Llama 4 speculates exactly: its chunked-attention layers (a query sees only the
positions of its own chunk of ``attention_chunk_size``; 8 here, 48 tokens generated,
six chunks) keep their rows in a ``ChunkKVCache`` of ours, the tree's masks cut each
row's columns to its chunk by the columns' positions, and its NoPE layers' queries are
scaled at the rows' positions (``attn_temperature_tuning``; a step every 4 positions).

The tiny model (``helpers.LLAMA4_TEXT``): layers 0-2 chunked with RoPE, layer 3 global
without RoPE, experts in layers 1 and 3. Prompt lookup, stream trees (fused, split,
pipelined), draft models, ``kv_bits``, bfloat16 and 4-bit weights give mlx-lm's tokens
with its own ``ChunkedKVCache``.
"""

import doctest

import mlx.core as mx
import pytest
from helpers import (
    bucket_views,
    tree_logits_off_plain,
    assert_lookup_equals_mlx_lm,
    assert_lossless,
    LLAMA4_TEXT,
    plain_greedy,
    spec_tokens,
    tiny_model,
    tiny_spec_model,
    word_tokenizer,
)
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import ChunkedKVCache, KVCache, QuantizedKVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_prompt_cache

import mlx_specstream.streams as streams
from mlx_specstream import batch_generate, make_prompt_cache
from mlx_specstream.cache import ChunkKVCache, attention_chunks, model_caches
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.streams import attach_verifier

PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]  # (repeats: lookup drafts from the first step)
N = 48
# A tree after 13 cached tokens (root at 13): its depth-3 nodes sit at 16, the first
# position of a chunk, and see only themselves there; nodes 5 and 6 sit at columns
# past 16 whose rows (their parents, at 15) lie in the chunk before.
STRADDLE = ([1, 2, 3, 4, 5, 6, 7, 1], [-1, 0, 0, 1, 2, 3, 4, 4])
PREFIX = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4, 1, 5, 2]


def test_doc_examples():
    """The worked examples of the mask functions (column_positions, chunk_cut,
    llama4_query_scale, ...: attention_masks)."""
    import mlx_specstream.attention_masks as masks

    result = doctest.testmod(masks)
    assert result.failed == 0 and result.attempted >= 10, result


def test_chunked_layers_keep_their_rows_in_caches_of_ours():
    model = tiny_model("llama4", vocab_size=8)
    assert [type(c) for c in model.make_cache()] == [ChunkedKVCache] * 3 + [KVCache]
    assert attention_chunks(model) == [8, 8, 8, None]
    assert attention_chunks(tiny_model("llama", vocab_size=8)) == [None] * 4
    ours = model_caches(model, bounded=True)
    assert [type(c) for c in ours] == [ChunkKVCache] * 3 + [KVCache]
    assert all(c.bounded for c in ours[:3])
    assert all(c.bounded for c in make_prompt_cache(model)[:3])
    assert not any(c.bounded for c in make_prompt_cache(model, bounded=False)[:3])
    # mlx-lm's own loop on them equals its loop on its ChunkedKVCache.
    want = plain_greedy(model, PROMPT, N)
    assert plain_greedy(model, PROMPT, N, prompt_cache=model_caches(model, bounded=True)) == want


def test_chunk_kv_cache_golden():
    """Chunks of 4, 10 rows: a query at 10 sees 8, 9, 10; ``forget(14)`` drops 0..5
    (below ``14 - 2 * 4``), mlx-lm's mask then starts at ``start_position``; no
    ``to_quantized`` (mlx-lm's kv_bits leaves chunked layers at full precision)."""
    c = ChunkKVCache(4, bounded=True)
    keys = mx.arange(10, dtype=mx.float32).reshape(1, 1, 10, 1)
    c.update_and_fetch(keys, keys)
    assert c.make_mask(1).astype(mx.int32).tolist() == [[0] * 8 + [1, 1, 1]]  # (at 10)
    c.update_and_fetch(keys[..., :4, :], keys[..., :4, :])
    c.forget(14)
    assert (c.start_position, c.offset) == (6, 14)
    assert c.state[0][0, 0, :, 0].tolist() == [6, 7, 8, 9, 0, 1, 2, 3]
    assert c.make_mask(2).astype(mx.int32).tolist() == [
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0],  # (position 14: 12, 13, itself)
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
    ]
    assert not hasattr(c, "to_quantized") and hasattr(KVCache(), "to_quantized")
    kept = ChunkKVCache(4)
    kept.update_and_fetch(keys, keys)
    kept.forget(10)
    assert kept.start_position == 0  # (a prompt cache keeps every row)


@pytest.mark.parametrize("pipeline", [False, True])
def test_lookup_drafts_equal_plain_across_chunks(pipeline):
    model = tiny_model("llama4", vocab_size=8)
    assert_lookup_equals_mlx_lm(model, PROMPT, N, pipeline=pipeline)


@pytest.mark.parametrize(
    "stream_pass, pipeline", [("fused", False), ("fused", True), ("split", False)]
)
def test_stream_trees_equal_plain_across_chunks(stream_pass, pipeline):
    model = tiny_spec_model("llama4", vocab_size=8, num_streams=3, top_k=2, stream_pass=stream_pass)
    want = plain_greedy(model, PROMPT, N)
    got, records = spec_tokens(model, PROMPT, N, max_tree_nodes=6, pipeline=pipeline)
    assert got == want
    assert len({r[3] for r in records}) < N - 5  # (steps: drafts were accepted)


@pytest.mark.parametrize("bucket", [4, 16])
@pytest.mark.parametrize(
    "stream_pass, pipeline", [("fused", False), ("fused", True), ("split", False)]
)
def test_stream_trees_in_column_buckets_across_chunks(stream_pass, pipeline, bucket, monkeypatch):
    """Passes in column buckets (as on CUDA in half precision, here forced): a chunked
    layer's view and mask end at the bucket too, less the rows its cache dropped, and
    the padded columns stay hidden from the chunk cut; output is mlx-lm's. Control:
    blind to chunks, it is not."""
    model = tiny_spec_model("llama4", vocab_size=8, num_streams=3, top_k=2, stream_pass=stream_pass)
    model.speculative_streams.kv_bucket = bucket
    views = bucket_views(monkeypatch)
    want = plain_greedy(model, PROMPT, N)
    assert spec_tokens(model, PROMPT, N, max_tree_nodes=6, pipeline=pipeline)[0] == want
    assert views and all((w + first) % bucket == 0 for w, first in views)
    assert any(first > 0 for _, first in views)  # (chunked layers dropped rows)
    monkeypatch.setattr(streams, "chunk_cut", lambda mask, positions, columns, chunk: mask)
    assert spec_tokens(model, PROMPT, N, max_tree_nodes=6, pipeline=pipeline)[0] != want


def verifier_model():
    model = tiny_model("llama4")
    attach_verifier(model)
    return model


@pytest.mark.parametrize("make", [verifier_model, lambda: tiny_spec_model("llama4")])
def test_tree_rows_logits_are_plain_decodings(make):
    """Every node of a tree across a chunk boundary, in the lower layers alone
    (verifier) and in stream layers beside stream rows (a chunked and the global one)."""
    assert tree_logits_off_plain(make(), PREFIX, STRADDLE).max() < 1e-5


@pytest.mark.parametrize(
    "control, differs",
    [
        ("blind to chunks", range(8)),  # (every row also sees the chunk before its own)
        ("columns at their index", [5, 6, 7]),  # (see their parents at 15)
        ("queries scaled at the offset's positions", [2, 6, 7]),
    ],
)
def test_negative_controls_tree_rows(control, differs, monkeypatch):
    """Each piece is needed: the chunk cut, by the columns' positions, and the NoPE
    layer's query scale at the rows' positions (the model's own takes the offset's:
    rows ``13 + k`` in place of ``13 + depth``, another scale for nodes 2, 6 and 7)."""
    if control == "blind to chunks":
        monkeypatch.setattr(streams, "chunk_cut", lambda mask, positions, columns, chunk: mask)
    elif control == "columns at their index":
        monkeypatch.setattr(streams, "column_positions", lambda width, at, rows: mx.arange(width))
    else:
        monkeypatch.setattr(streams, "llama4_query_temperature", lambda layer: None)
    off = tree_logits_off_plain(verifier_model(), PREFIX, STRADDLE)
    same = [k for k in range(8) if k not in differs]
    assert off[list(differs)].min() > 1e-3, off
    assert not same or off[same].max() < 1e-5, off


def test_negative_control_decoding_blind_to_chunks_differs(monkeypatch):
    model = tiny_spec_model("llama4", vocab_size=8, num_streams=3, top_k=2)
    want = plain_greedy(model, PROMPT, N)
    monkeypatch.setattr(streams, "chunk_cut", lambda mask, positions, columns, chunk: mask)
    assert spec_tokens(model, PROMPT, N, max_tree_nodes=6)[0] != want


def test_target_and_draft_model():
    model = tiny_model("llama4", vocab_size=8)
    want = plain_greedy(model, PROMPT, N)
    draft = tiny_model("llama4", vocab_size=8, seed=3)
    assert spec_tokens(model, PROMPT, N, draft_model=draft, num_draft_tokens=3)[0] == want
    got, records = spec_tokens(model, PROMPT, N, draft_model=model, num_draft_tokens=3)
    assert got == want and len({r[3] for r in records}) == N // 4  # (a copy: all accepted)


@pytest.mark.parametrize("start", [0, 13])
def test_kv_bits_equals_mlx_lm_with_the_same_kv_bits(start):
    """mlx-lm quantizes the global layer only (its ChunkedKVCache has no
    ``to_quantized``): ours too, with the same tokens."""
    model = tiny_model("llama4", vocab_size=8)
    kv = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=start, prefill_step_size=4)
    theirs, ours = mlx_lm_prompt_cache(model), make_prompt_cache(model)
    want = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=40,
                                        prompt_cache=theirs, **kv)]  # fmt: skip
    out = list(spec_generate_step(mx.array(PROMPT), model, max_tokens=40, prompt_cache=ours,
                                  draft="ngram", num_draft_tokens=4, **kv))  # fmt: skip
    assert [o[0] for o in out] == want and out[-1][3] < len(out)
    assert [type(c) for c in theirs] == [ChunkedKVCache] * 3 + [QuantizedKVCache]
    assert [type(c) for c in ours] == [ChunkKVCache] * 3 + [QuantizedKVCache]


@pytest.mark.parametrize("kwargs", [dict(dtype=mx.bfloat16), dict(quant_bits=4)])
def test_low_precision_and_4_bit_weights_decode_as_plain_on_cpu(kwargs):
    """As users hold them: bfloat16 (without experts: MLX's CPU backend gathers
    expert matrices in float32 only) and 4-bit weights."""
    moe_step = 5 if "dtype" in kwargs else 2  # (5: no layer has experts)
    args = dict(text_config={**LLAMA4_TEXT, "interleave_moe_layer_step": moe_step})
    model = tiny_model("llama4", vocab_size=8, **kwargs, **args)
    got, records = spec_tokens(model, PROMPT, N, draft="ngram", num_draft_tokens=4, pipeline=True)
    assert_lossless(model, PROMPT, got, plain_greedy(model, PROMPT, N))
    assert sum(r[2] for r in records) > 10
    model = tiny_spec_model("llama4", vocab_size=8, num_streams=3, top_k=2, model_args=args,
                            **kwargs)  # fmt: skip
    got, records = spec_tokens(model, PROMPT, N, max_tree_nodes=6)
    assert_lossless(model, PROMPT, got, plain_greedy(model, PROMPT, N))
    assert len({r[3] for r in records}) < N - 5, "no draft accepted: the test has no power"


@pytest.fixture
def held_rows(monkeypatch):
    """The rows each chunked layer held after every ``forget``, and its first position."""
    seen, forget = [], ChunkKVCache.forget

    def spy(self, committed):
        forget(self, committed)
        seen.append((self.offset - self.start, self.start))

    monkeypatch.setattr(ChunkKVCache, "forget", spy)
    return seen


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(draft="ngram", num_draft_tokens=4, pipeline=True),
        dict(max_tree_nodes=6, pipeline=False),
        dict(max_tree_nodes=6, pipeline=True),
    ],
)
def test_chunked_layers_drop_past_chunks_and_stay_exact(kwargs, held_rows):
    model = tiny_spec_model("llama4", vocab_size=8, num_streams=3, top_k=2)
    want = plain_greedy(model, PROMPT, 120)
    assert spec_tokens(model, PROMPT, 120, **kwargs)[0] == want
    assert max(start for _, start in held_rows) >= 100  # rows dropped all along
    assert max(rows for rows, _ in held_rows) <= 3 * 8  # 2 to 3 chunks held


def test_negative_control_forgetting_rows_of_the_current_chunk(monkeypatch):
    """Rows of the chunk a query sits in dropped (2 rows kept): not exact."""
    model = tiny_model("llama4", vocab_size=8)
    want = plain_greedy(model, PROMPT, 120)

    def greedy_forget(self, committed):
        drop = committed - 2 - self.start
        if self.keys is not None and drop > 0:
            self.keys, self.values = self.keys[..., drop:, :], self.values[..., drop:, :]
            self.start += drop

    monkeypatch.setattr(ChunkKVCache, "forget", greedy_forget)
    assert spec_tokens(model, PROMPT, 120, draft="ngram", pipeline=True)[0] != want


@pytest.mark.parametrize("bounded", [True, False])
def test_a_prompt_cache_reused_across_calls_answers_as_mlx_lm(bounded):
    """mlx-lm's multi-turn pattern (each call feeds its new tokens to the same cache):
    ours, from ``make_prompt_cache`` (a server's, a chat's), answers each turn as
    mlx-lm's ``generate_step`` does with its own ChunkedKVCache; its chunked layers
    drop the rows no chunk to come sees (``bounded=False``: it keeps every row)."""
    model = tiny_model("llama4", vocab_size=8)
    ours, theirs = make_prompt_cache(model, bounded=bounded), mlx_lm_prompt_cache(model)
    for prompt in (PROMPT, [5, 2], [1]):
        got, _ = spec_tokens(model, prompt, 20, draft="ngram", prompt_cache=ours)
        assert got == plain_greedy(model, prompt, 20, prompt_cache=theirs)
    assert ours[0].offset == theirs[0].offset == 73
    assert ours[0].start_position >= (73 - 3 * 8 if bounded else 0)


def test_mlx_lm_chunked_prompt_cache_gets_a_clear_error():
    model = tiny_model("llama4", vocab_size=8)
    with pytest.raises(ValueError, match="ChunkedKVCache.*mlx_specstream.make_prompt_cache"):
        spec_tokens(model, PROMPT, 8, draft="ngram", prompt_cache=mlx_lm_prompt_cache(model))


def test_batches_are_refused_with_the_reason():
    """mlx-lm's batch caches have no chunks (its batch decoding fails on Llama 4)."""
    model = tiny_model("llama4", vocab_size=8)
    with pytest.raises(ValueError, match="chunks of 8 tokens"):
        batch_generate(model, word_tokenizer(8), [PROMPT, PROMPT[:4]], max_tokens=8)


def test_streams_train_in_mlx_and_the_base_stays_bit_identical():
    """``mlx_specstream.train``'s loss runs the same passes: on Llama 4 the streams
    learn far above chance (1/64) and the base does not change."""
    from test_train import train_tiny

    before, after, result, unchanged = train_tiny("llama4")
    assert max(before.top1()) < 0.2, before.text()
    assert min(after.top1()) > 0.5, after.text()
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert unchanged


def test_train_cli_writes_a_model_that_loads_and_decodes_losslessly(tmp_path):
    """A Mac user's three lines on a Llama 4 directory (``test_train``'s check)."""
    from test_train import V, assert_train_cli_decodes_losslessly

    config = {"model_type": "llama4", "text_config": {**LLAMA4_TEXT, "vocab_size": V}}
    assert_train_cli_decodes_losslessly(tmp_path, "llama4", config)


def test_a_long_prompt_fills_no_chunked_layer_past_its_bound(held_rows):
    """Prefilled in pieces of 16, a 100-token prompt's chunked layers drop rows between
    pieces: no more than 3 chunks and a piece are ever held."""
    model = tiny_model("llama4", vocab_size=8)
    prompt = (PROMPT * 10)[:100]
    want = plain_greedy(model, prompt, 24)
    got, _ = spec_tokens(model, prompt, 24, draft="ngram", prefill_step_size=16)
    assert got == want
    assert max(rows for rows, _ in held_rows) <= 3 * 8 + 16
    assert any(start for _, start in held_rows[:14])  # (dropped during the prefill)


def test_the_server_serves_it_with_prompt_lookup():
    """``--draft ngram``: requests waiting together and a follow-up, each answer equal
    to mlx-lm's plain decoding (``test_server_batching.assert_served_alone_like_mlx_lm``)."""
    from test_server_batching import V, assert_served_alone_like_mlx_lm

    assert_served_alone_like_mlx_lm(tiny_model("llama4", vocab_size=V), word_tokenizer(V, eos=0))

"""Models whose layers attend in a sliding window (Gemma 3, GPT-OSS, OLMo 3): their
window layers keep every token in a plain ``KVCache`` (``cache.model_caches``) and the
masks apply the window, so lookup, stream trees, draft models and batches decode
exactly as mlx-lm does with its rotating caches, long past the window (8 tokens here,
then 48 generated)."""

import doctest

import mlx.core as mx
import pytest
from helpers import (
    assert_lookup_equals_mlx_lm,
    bucket_views,
    WINDOWED,
    plain_greedy,
    spec_tokens,
    tiny_model,
    tiny_spec_model,
)
from test_batch import LIMITS, alone, decode
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_prompt_cache

import mlx_specstream.streams as streams
from mlx_specstream import make_prompt_cache
from mlx_specstream.cache import WindowKVCache, model_caches, sliding_windows
from mlx_specstream.ragged_cache import RaggedKVCache

PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]  # (repeats: lookup drafts from the first step)
N = 48


def blind_to_windows(monkeypatch):
    """The negative control of every equality below: masks that ignore the window."""
    kv, ragged = KVCache.make_mask, RaggedKVCache.make_mask

    def kv_mask(self, N, return_array=False, window_size=None):
        return kv(self, N, return_array=return_array, window_size=None)

    def ragged_mask(self, N, return_array=False, window_size=None):
        return ragged(self, N, return_array)

    def bounded_mask(self, N, return_array=False, window_size=None):
        return create_causal_mask(N, self.offset)[..., self.start :]

    monkeypatch.setattr(KVCache, "make_mask", kv_mask)
    monkeypatch.setattr(RaggedKVCache, "make_mask", ragged_mask)
    monkeypatch.setattr(WindowKVCache, "make_mask", bounded_mask)
    monkeypatch.setattr(streams, "window_cut", lambda mask, positions, window: mask)


def test_window_layers_keep_every_token():
    model = tiny_model("gemma3_text", vocab_size=8)
    assert [type(c) for c in model.make_cache()] == [RotatingKVCache, KVCache] * 2
    assert sliding_windows(model) == [8, None, 8, None]
    assert [type(c) for c in model_caches(model)] == [KVCache] * 4
    assert [type(c) for c in make_prompt_cache(model, bounded=False)] == [KVCache] * 4
    assert [type(c) for c in make_prompt_cache(model)] == [WindowKVCache, KVCache] * 2
    assert sliding_windows(tiny_model("llama", vocab_size=8)) == [None] * 4
    qwen2 = tiny_model("qwen2", vocab_size=8)  # (no make_cache: nothing to replace)
    assert sliding_windows(qwen2) == []
    kept = model_caches(qwen2, max_kv_size=32)  # mlx-lm's max_kv_size stays rotating
    assert [(type(c), c.keep) for c in kept] == [(RotatingKVCache, 4)] * 4


@pytest.mark.parametrize("arch", WINDOWED)
def test_whole_caches_decode_as_mlx_lm_rotating_ones(arch, monkeypatch):
    """mlx-lm's own loop on caches that keep every token, the model's masks applying
    the window, equals its loop on its rotating caches; blind to the window, not."""
    model = tiny_model(arch, vocab_size=8)
    want = plain_greedy(model, PROMPT, N)
    assert plain_greedy(model, PROMPT, N, prompt_cache=model_caches(model)) == want
    blind_to_windows(monkeypatch)
    assert plain_greedy(model, PROMPT, N) == want  # (the rotating caches hold the window)
    assert plain_greedy(model, PROMPT, N, prompt_cache=model_caches(model)) != want


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("arch", WINDOWED)
def test_lookup_drafts_equal_plain_past_the_window(arch, pipeline):
    model = tiny_model(arch, vocab_size=8)
    assert_lookup_equals_mlx_lm(model, PROMPT, N, pipeline=pipeline)


@pytest.mark.parametrize(
    "stream_pass, pipeline", [("fused", False), ("fused", True), ("split", False)]
)
@pytest.mark.parametrize("arch", WINDOWED)
def test_stream_trees_equal_plain_past_the_window(arch, stream_pass, pipeline):
    model = tiny_spec_model(arch, vocab_size=8, num_streams=3, top_k=2, stream_pass=stream_pass)
    want = plain_greedy(model, PROMPT, N)
    got, records = spec_tokens(model, PROMPT, N, max_tree_nodes=6, pipeline=pipeline)
    assert got == want
    assert len({r[3] for r in records}) < N - 5  # (steps: drafts were accepted)


@pytest.mark.parametrize("kwargs", [dict(max_tree_nodes=6), dict(draft="ngram", pipeline=True)])
def test_negative_control_tree_masks_blind_to_the_window(kwargs, monkeypatch):
    """Our masks (trees; every pipelined pass) must cut the window themselves."""
    model = tiny_spec_model("gpt_oss", vocab_size=8, num_streams=3, top_k=2)
    want = plain_greedy(model, PROMPT, N)
    assert spec_tokens(model, PROMPT, N, **kwargs)[0] == want
    monkeypatch.setattr(streams, "window_cut", lambda mask, positions, window: mask)
    assert spec_tokens(model, PROMPT, N, **kwargs)[0] != want


def test_a_chain_longer_than_the_window_is_exact_and_a_deep_tree_is_refused():
    """A chain's rows sit at their positions: any length is exact. A tree's nodes
    sit past theirs, so one deeper than the window (with its streams) is refused."""
    model = tiny_spec_model("gemma3_text", vocab_size=8, num_streams=3, top_k=2)
    want = plain_greedy(model, PROMPT, N)
    got, _ = spec_tokens(model, PROMPT, N, draft="ngram", num_draft_tokens=10, pipeline=True)
    assert got == want
    with pytest.raises(ValueError, match="wider than the model's sliding window of 8"):
        spec_tokens(model, PROMPT, N, draft="streams+ngram", num_draft_tokens=6,
                    max_tree_nodes=12)  # fmt: skip


@pytest.mark.parametrize("other", [False, True])
def test_a_draft_model_with_a_window_drafts_for_one(other, monkeypatch):
    model = tiny_model("gemma3_text", vocab_size=8)
    draft = tiny_model("gemma3_text", vocab_size=8, seed=3) if other else model
    want = plain_greedy(model, PROMPT, N)
    got, records = spec_tokens(model, PROMPT, N, draft_model=draft, num_draft_tokens=3)
    assert got == want
    if not other:  # a copy's drafts are all accepted: 4 tokens a step
        assert len({r[3] for r in records}) == N // 4
    blind_to_windows(monkeypatch)
    assert spec_tokens(model, PROMPT, N, draft_model=draft, num_draft_tokens=3)[0] != want


BUCKET_WAYS = {  # (stream pass, pipelined, tree settings or lookup)
    "fused tree, pipelined": ("fused", True, dict(max_tree_nodes=6)),
    "fused chain": ("fused", False, dict(tree_top_k=1, max_tree_nodes=4)),
    "split tree": ("split", False, dict(max_tree_nodes=6)),
    "lookup, pipelined": ("fused", True, dict(draft="ngram", num_draft_tokens=3)),
}


@pytest.mark.parametrize("bucket", [4, 16])
@pytest.mark.parametrize("way", sorted(BUCKET_WAYS))
@pytest.mark.parametrize("arch", WINDOWED)
def test_column_buckets_past_the_window(arch, way, bucket, monkeypatch):
    """Passes in column buckets (as on CUDA in half precision, here forced): a window
    layer's view and mask end at the bucket too, less the rows its cache dropped, and
    the output is mlx-lm's long past the window; its caches dropped rows meanwhile."""
    stream_pass, pipeline, settings = BUCKET_WAYS[way]
    model = tiny_spec_model(arch, vocab_size=8, num_streams=3, top_k=2, stream_pass=stream_pass)
    model.speculative_streams.kv_bucket = bucket
    views = bucket_views(monkeypatch)
    got, records = spec_tokens(model, PROMPT, N, pipeline=pipeline, **settings)
    assert got == plain_greedy(model, PROMPT, N)
    assert len({r[3] for r in records}) < N - 5  # (steps: drafts were accepted)
    assert views and all((w + first) % bucket == 0 for w, first in views)
    assert any(first > 0 for _, first in views)  # (window layers dropped rows)


@pytest.mark.parametrize("pipeline", [False, True])
def test_column_buckets_over_a_prompt_cache_that_keeps_every_token(pipeline):
    """A user's prompt cache whose window layers keep every token (plain KVCaches, the
    masks applying the window) takes the buckets as well."""
    model = tiny_spec_model("gpt_oss", vocab_size=8, num_streams=3, top_k=2)
    model.speculative_streams.kv_bucket = 16
    cache = make_prompt_cache(model, bounded=False)
    assert {type(c) for c in cache} == {KVCache}
    got = spec_tokens(model, PROMPT, N, max_tree_nodes=6, pipeline=pipeline, prompt_cache=cache)
    assert got[0] == plain_greedy(model, PROMPT, N)


@pytest.mark.parametrize("pipeline", [False, True])
def test_column_buckets_control_blind_to_the_window(pipeline, monkeypatch):
    """Control: in buckets too, tree masks that ignore the window change the output."""
    model = tiny_spec_model("gpt_oss", vocab_size=8, num_streams=3, top_k=2)
    model.speculative_streams.kv_bucket = 16
    want = plain_greedy(model, PROMPT, N)
    assert spec_tokens(model, PROMPT, N, max_tree_nodes=6, pipeline=pipeline)[0] == want
    monkeypatch.setattr(streams, "window_cut", lambda mask, positions, window: mask)
    assert spec_tokens(model, PROMPT, N, max_tree_nodes=6, pipeline=pipeline)[0] != want


def test_column_bucket_default_with_windows(monkeypatch):
    """On CUDA in half precision a windowed model's passes take 256-column buckets by
    default, its batch rows too (a chunked model's rows do not: its batches are
    refused anyway)."""
    model = tiny_spec_model("gemma3_text", vocab_size=8, num_streams=3, top_k=2)
    rt = model.speculative_streams
    cache = make_prompt_cache(model)
    assert {type(c) for c in cache} == {WindowKVCache, KVCache}
    for c in cache:
        c.update_and_fetch(
            mx.zeros((1, 2, 3, 16), mx.bfloat16), mx.zeros((1, 2, 3, 16), mx.bfloat16)
        )
    assert rt._pass_bucket(cache) == 0  # (this CPU)
    monkeypatch.setattr(streams, "on_cuda", lambda: True)
    monkeypatch.setattr("mlx_specstream.cache.on_cuda", lambda: True)  # (default_bucket's)
    assert rt._pass_bucket(cache) == 256
    assert (
        rt._rows_bucketable and not tiny_spec_model("llama4").speculative_streams._rows_bucketable
    )


BATCH_WAYS = [  # how a batch's rows draft, in the batch tests of windowed models
    dict(draft="ngram", num_draft_tokens=3, pipeline=False),
    dict(draft="ngram", num_draft_tokens=3, pipeline=True),
    dict(draft="streams", stream_pass="fused", pipeline=True),
    dict(draft="streams", stream_pass="split", pipeline=False),
]


@pytest.mark.parametrize("kwargs", BATCH_WAYS)
@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_oss"])
def test_batch_rows_equal_each_prompt_alone(arch, kwargs, monkeypatch):
    model = tiny_spec_model(arch, vocab_size=16, num_streams=3)
    want = alone(model)  # (test_batch's prompts, each decoded alone)
    got, passes = decode(model, **kwargs)
    assert got == want
    assert passes < max(LIMITS)
    blind_to_windows(monkeypatch)
    assert decode(model, **kwargs)[0] != want


@pytest.mark.parametrize("kwargs", BATCH_WAYS)
@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_oss"])
def test_batch_rows_in_column_buckets_past_the_window(arch, kwargs, monkeypatch):
    """A batch's rows in column buckets (as on CUDA in half precision, here forced to 16):
    a window layer's view ends at the bucket less the positions it dropped, as its mask
    does, and every row equals its prompt decoded alone (the batch's probe would refuse
    a mask seeing the padded columns). Control: blind to the window, not."""
    model = tiny_spec_model(arch, vocab_size=16, num_streams=3)
    want = alone(model)
    views = []
    real = RaggedKVCache.update_and_fetch

    def spy(self, keys, values):
        out = real(self, keys, values)
        views.append((out[0].shape[2], self.start, self.window))
        return out

    monkeypatch.setattr(RaggedKVCache, "update_and_fetch", spy)
    monkeypatch.setattr(RaggedKVCache, "bucket", 16)
    assert decode(model, **kwargs)[0] == want
    assert views and all((w + start) % 16 == 0 for w, start, _ in views)
    assert any(window is not None for *_, window in views)
    blind_to_windows(monkeypatch)
    assert decode(model, **kwargs)[0] != want


def test_mlx_lm_rotating_prompt_cache_past_its_window_gets_a_clear_error(monkeypatch):
    model = tiny_model("olmo3", vocab_size=8)
    want = plain_greedy(model, PROMPT, N)
    with pytest.raises(ValueError, match=r"mlx_specstream.make_prompt_cache\(model\)"):
        spec_tokens(model, PROMPT, N, draft="ngram", prompt_cache=mlx_lm_prompt_cache(model))
    # ours, reused across two calls, goes on as the whole conversation decoded at once
    cache = make_prompt_cache(model)
    first, _ = spec_tokens(model, PROMPT, 20, draft="ngram", prompt_cache=cache)
    assert first == want[:20]
    rest, _ = spec_tokens(model, [5], N, draft="ngram", prompt_cache=cache)
    whole = plain_greedy(model, PROMPT + first + [5], N)
    assert rest == whole
    blind_to_windows(monkeypatch)
    cache = make_prompt_cache(model)
    spec_tokens(model, PROMPT, 20, draft="ngram", prompt_cache=cache)
    assert spec_tokens(model, [5], N, draft="ngram", prompt_cache=cache)[0] != whole


def test_kv_bits_on_a_windowed_model_is_refused():
    model = tiny_model("gemma3_text", vocab_size=8)
    with pytest.raises(ValueError, match=r"kv_bits=4: the model's layers \[0, 2\] attend in a"):
        spec_tokens(model, PROMPT, 8, draft="ngram", kv_bits=4)
    with pytest.raises(ValueError, match="the draft model's layers"):
        spec_tokens(tiny_model("llama", vocab_size=8), PROMPT, 8, draft_model=model, kv_bits=4)


# ---- a generation's own window layers hold 2 to 3 windows, not the whole context ----


def test_window_cut_doc_example():
    import mlx_specstream.attention_masks as masks

    examples = doctest.DocTestFinder().find(masks.window_cut, globs=vars(masks))
    runner = doctest.DocTestRunner()
    for example in examples:
        runner.run(example)
    assert runner.failures == 0 and runner.tries == 2


def test_window_kv_cache_golden():
    """Window 4, 13 tokens: ``forget(13)`` drops positions 0..4; the rows, the model's
    mask and a trim then act on positions 5..12, and a trim stops where a query would
    lack a row of its window."""
    c = WindowKVCache(4)
    keys = mx.arange(13, dtype=mx.float32).reshape(1, 1, 13, 1)
    c.update_and_fetch(keys, keys)
    c.forget(11)  # (only 3 rows below 11 - 8: less than a window, kept)
    assert (c.start, c.offset) == (0, 13)
    c.forget(13)
    assert (c.start, c.offset) == (5, 13)
    assert c.state[0][0, 0, :, 0].tolist() == list(range(5, 13))
    mask = c.make_mask(1)  # query at 13 sees 10, 11, 12 and itself
    assert mask.astype(mx.int32).tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]
    k, _ = c.update_and_fetch(keys[..., :1, :] + 100, keys[..., :1, :])
    assert k[0, 0, :, 0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 100] and c.offset == 14
    # (down to 8 at most: a query at 8 sees 5..8, the first rows held)
    assert c.trimmable() == 6 and c.trim(20) == 6 and c.offset == 8
    assert c.trimmable() == 0 and c.trim(1) == 0
    fresh = WindowKVCache(4)
    fresh.update_and_fetch(keys, keys)
    assert fresh.trimmable() == 13 and fresh.trim(20) == 13  # (nothing dropped: all)


@pytest.fixture
def held_rows(monkeypatch):
    """The rows each window layer held after every ``forget``, and its first position."""
    seen, forget = [], WindowKVCache.forget

    def spy(self, committed):
        forget(self, committed)
        seen.append((self.offset - self.start, self.start))

    monkeypatch.setattr(WindowKVCache, "forget", spy)
    return seen


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(draft="ngram", num_draft_tokens=4, pipeline=False),
        dict(draft="ngram", num_draft_tokens=4, pipeline=True),
        dict(max_tree_nodes=6, pipeline=False),
        dict(max_tree_nodes=6, pipeline=True),
        dict(max_tree_nodes=6, stream_pass="split"),
    ],
)
def test_window_layers_drop_what_no_window_can_see_and_stay_exact(kwargs, held_rows):
    model = tiny_spec_model("gemma3_text", vocab_size=8, num_streams=3, top_k=2)
    if kwargs.pop("stream_pass", None):
        model.speculative_streams.split_streams = True
    want = plain_greedy(model, PROMPT, 120)
    assert spec_tokens(model, PROMPT, 120, **kwargs)[0] == want
    assert max(start for _, start in held_rows) >= 100  # rows dropped all along
    assert max(rows for rows, _ in held_rows) <= 3 * 8  # 2 to 3 windows held


def test_negative_control_forgetting_rows_still_in_the_window(monkeypatch):
    """Rows still inside the window dropped (half a window kept): not exact."""
    model = tiny_model("gemma3_text", vocab_size=8)  # (its output varies: 7 tokens)
    want = plain_greedy(model, PROMPT, 120)
    assert spec_tokens(model, PROMPT, 120, draft="ngram", pipeline=True)[0] == want

    def greedy_forget(self, committed):
        drop = committed - self.window // 2 - self.start  # (half a window kept)
        if self.keys is not None and drop > 0:
            self.keys, self.values = self.keys[..., drop:, :], self.values[..., drop:, :]
            self.start += drop

    monkeypatch.setattr(WindowKVCache, "forget", greedy_forget)
    assert spec_tokens(model, PROMPT, 120, draft="ngram", pipeline=True)[0] != want


def test_a_long_prompt_fills_no_window_layer_past_its_bound(held_rows):
    """Prefilled in chunks of 16, a 100-token prompt's window layers drop rows between
    chunks: no more than 3 windows and a chunk are ever held."""
    model = tiny_model("gemma3_text", vocab_size=8)
    prompt = (PROMPT * 10)[:100]
    want = plain_greedy(model, prompt, 24)
    got, _ = spec_tokens(model, prompt, 24, draft="ngram", prefill_step_size=16)
    assert got == want
    assert max(rows for rows, _ in held_rows) <= 3 * 8 + 16
    assert any(start for _, start in held_rows[:14])  # dropped during the prefill (7 chunks)


def test_a_bounded_prompt_cache_goes_on_across_calls_as_a_chat_keeps_it(held_rows):
    """``make_prompt_cache(model, bounded=True)`` (``chat``'s): three calls equal the
    whole conversation decoded at once, and the window layers stay bounded."""
    model = tiny_model("gemma3_text", vocab_size=8)
    cache = make_prompt_cache(model, bounded=True)
    assert [type(c) for c in cache] == [WindowKVCache, KVCache] * 2
    history = []
    for turn, prompt in enumerate([PROMPT, [5, 2], [6, 1, 4]]):
        got, _ = spec_tokens(model, prompt, 40, draft="ngram", prompt_cache=cache,
                             pipeline=turn == 1)  # fmt: skip
        assert got == plain_greedy(model, history + prompt, 40)
        history += prompt + got
    assert max(rows for rows, _ in held_rows) <= 3 * 8 and cache[0].start > 60


def test_the_server_serves_a_sliding_window_model_with_prompt_lookup(monkeypatch):
    """``--draft ngram`` on a Gemma 3 shape: requests waiting together are batched with
    rows that draft, a request alone decodes with its prompt cache, and each answer
    equals mlx-lm's plain decoding with its rotating caches, long past the window.
    Control: the server's masks blind to the window."""
    from helpers import word_tokenizer
    from mlx_lm import stream_generate as mlx_lm_stream_generate
    from test_server_batching import V, answer, lookup_service, submit, submit_together

    from mlx_specstream.server import make_server, service_of

    model, tok = tiny_model("gemma3_text", vocab_size=V), word_tokenizer(V, eos=0)
    prompts = [[3, 4, 5, 3, 4, 5, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [20], [30, 31] * 5]
    body = {"max_tokens": 40, "num_draft_tokens": 3}
    want = ["".join(r.text for r in mlx_lm_stream_generate(model, tok, p, max_tokens=40))
            for p in prompts]  # fmt: skip
    servers = []

    def service(m, t, **defaults):
        servers.append(make_server(m, t, "tiny", port=0, **defaults))
        return service_of(servers[-1])

    try:
        svc = lookup_service(service, model, tok)
        got = [answer(j)[0][0] for j in submit_together(svc, [(p, body) for p in prompts])]
        assert svc.served["batched"] == 1 and got == want
        assert answer(submit(svc, prompts[0], **body))[0][0] == want[0]  # (alone)
        blind_to_windows(monkeypatch)
        svc = lookup_service(service, model, tok)
        got = [answer(j)[0][0] for j in submit_together(svc, [(p, body) for p in prompts])]
        assert got != want
    finally:
        for s in servers:
            s.server_close()

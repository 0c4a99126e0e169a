"""DeepSeek V3.2 and GLM-5 (``deepseek_v32``, ``glm_moe_dsa``) speculate exactly: their
sparse attention (DSA) keeps each layer's latent keys and its indexer's keys in one
``CacheList``, which the verifier keeps as a :class:`~mlx_specstream.cache.KVCacheList`
(both members compacted together), and the indexer's RoPE takes the tree's positions.

The tiny models' indexer picks each query's top 6 keys, so past 6 tokens every layer
attends sparsely (the output differs from a dense indexer's). A pipelined pass folds
both members (``FoldingCacheList``); a batch pairs a ragged cache for each member
(``RaggedKVCacheList``).
"""

import dataclasses

import mlx.core as mx
import pytest
from helpers import (
    assert_prompt_caches_carried,
    tree_logits_off_plain,
    assert_lookup_equals_mlx_lm,
    plain_greedy,
    spec_tokens,
    tiny_model,
    tiny_spec_model,
    word_tokenizer,
)
from mlx_lm.generate import generate_step
from test_batch import LIMITS, alone, decode
from mlx_lm.models.cache import CacheList, KVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_prompt_cache

import mlx_specstream.cache as cache_module
import mlx_specstream.streams as streams
from mlx_specstream.cache import KVCacheList, make_prompt_cache, model_caches
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.ragged_cache import RaggedKVCacheList
from mlx_specstream.streams import attach_verifier

ARCHS = ["deepseek_v32", "glm_moe_dsa"]
PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]  # (repeats: lookup drafts from the first step)
N = 48
TREE = ([1, 2, 3, 4, 5, 6, 7, 1], [-1, 0, 0, 1, 2, 3, 4, 4])
PREFIX = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4, 1, 5, 2]  # (13 tokens: past the indexer's top 6)
BATCH = [PROMPT, [5, 2, 6], [1, 4, 1, 4, 1], [7]]


def test_their_cache_lists_are_kept_as_one_layer_cache():
    model = tiny_model("deepseek_v32", vocab_size=8)
    assert all(type(c) is CacheList for c in model.make_cache())
    ours = model_caches(model)
    assert all(type(c) is KVCacheList for c in ours)
    assert all(type(m) is KVCache for c in ours for m in c.caches)
    model(mx.array([PROMPT]), cache=ours)
    assert [c.offset for c in ours] == [len(PROMPT)] * 4
    assert not hasattr(ours[0], "to_quantized")  # (as mlx-lm's CacheList: kv_bits skips it)


def test_the_indexer_is_sparse_in_these_tests():
    """The power of the tests below: a dense indexer (top 4096) decodes otherwise."""
    sparse = tiny_model("deepseek_v32", vocab_size=8)
    dense = tiny_model("deepseek_v32", vocab_size=8, index_topk=4096)
    assert plain_greedy(sparse, PROMPT, N) != plain_greedy(dense, PROMPT, N)


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_lookup_drafts_equal_plain(arch, pipeline):
    model = tiny_model(arch, vocab_size=8)
    assert_lookup_equals_mlx_lm(model, PROMPT, N, pipeline=pipeline)


@pytest.mark.parametrize(
    "stream_pass, pipeline", [("fused", False), ("fused", True), ("split", False)]
)
@pytest.mark.parametrize("arch", ARCHS)
def test_stream_trees_equal_plain(arch, stream_pass, pipeline):
    model = tiny_spec_model(arch, vocab_size=8, num_streams=3, top_k=2, stream_pass=stream_pass)
    want = plain_greedy(model, PROMPT, N)
    got, records = spec_tokens(model, PROMPT, N, max_tree_nodes=6, pipeline=pipeline)
    assert got == want
    assert len({r[3] for r in records}) < N - 5  # (steps: drafts were accepted)


def verifier_model(arch="deepseek_v32"):
    model = tiny_model(arch)
    attach_verifier(model)
    return model


@pytest.mark.parametrize(
    "make", [verifier_model, lambda: verifier_model("glm_moe_dsa"),
             lambda: tiny_spec_model("deepseek_v32")],  # fmt: skip
)
def test_tree_rows_logits_are_plain_decodings(make):
    assert tree_logits_off_plain(make(), PREFIX, TREE).max() < 1e-5


def test_negative_control_the_indexers_rope_at_the_offset(monkeypatch):
    """The indexer's RoPE left at the model's offset (the rows' indices): the nodes
    past the root's first child, whose positions are not their indices, differ."""
    ropes = streams.ropes_of
    monkeypatch.setattr(streams, "ropes_of", lambda layer: ropes(layer)[:1])
    off = tree_logits_off_plain(verifier_model(), PREFIX, TREE)
    assert off[:2].max() < 1e-5 and off[2:].min() > 1e-3, off


def test_negative_control_compacting_the_latent_keys_alone(monkeypatch):
    """A step that moves the latent keys' rows but not the indexer's: not exact
    (unpipelined: commit_path; pipelined: the fold of the indexer's member)."""
    model = tiny_spec_model("deepseek_v32", vocab_size=8, num_streams=3, top_k=2)
    want = plain_greedy(model, PROMPT, N)
    arrays = cache_module._arrays
    first_only = lambda c: arrays(c.caches[0] if isinstance(c, KVCacheList) else c)  # noqa
    monkeypatch.setattr(cache_module, "_arrays", first_only)
    assert spec_tokens(model, PROMPT, N, max_tree_nodes=6)[0] != want
    monkeypatch.undo()
    assert spec_tokens(model, PROMPT, N, max_tree_nodes=6, pipeline=True)[0] == want
    original = cache_module.FoldingCacheList.__init__

    def indexer_unfolded(self, cache, fold, layer):  # (its accepted rows never moved)
        original(self, cache, fold, layer)
        unmoved = None if fold is None else dataclasses.replace(fold, chain=True)
        self.caches[1] = cache_module.FoldingCache(cache.caches[1], unmoved, layer, 1)

    monkeypatch.setattr(cache_module.FoldingCacheList, "__init__", indexer_unfolded)
    assert spec_tokens(model, PROMPT, N, max_tree_nodes=6, pipeline=True)[0] != want


def test_target_and_draft_model():
    model = tiny_model("deepseek_v32", vocab_size=8)
    want = plain_greedy(model, PROMPT, N)
    draft = tiny_model("llama", vocab_size=8, seed=3)
    assert spec_tokens(model, PROMPT, N, draft_model=draft, num_draft_tokens=3)[0] == want
    got, records = spec_tokens(model, PROMPT, N, draft_model=model, num_draft_tokens=3)
    assert got == want and len({r[3] for r in records}) == N // 4  # (a copy: all accepted)


def test_mlx_lm_prompt_caches_are_taken_and_kv_bits_leaves_them_as_mlx_lm_does():
    """mlx-lm's own prompt cache (its CacheList) goes on over three calls as mlx-lm's
    ``generate_step`` does with another one, with ``kv_bits`` (which neither quantizes)."""
    model = tiny_model("deepseek_v32", vocab_size=8)
    kv = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=0)
    ours, theirs = mlx_lm_prompt_cache(model), mlx_lm_prompt_cache(model)
    for prompt in (PROMPT, [5, 2], [1]):
        out = spec_generate_step(mx.array(prompt), model, max_tokens=16, prompt_cache=ours,
                                 draft="ngram", **kv)  # fmt: skip
        want = generate_step(mx.array(prompt), model, max_tokens=16, prompt_cache=theirs, **kv)
        assert [o[0] for o in out] == [int(t) for t, _ in want]
    assert all(type(c) is KVCacheList for c in ours) and ours[0].offset == 61
    assert all(type(c) is CacheList for c in theirs) and theirs[0][0].offset == 61


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(draft="ngram"),
        dict(draft="ngram", pipeline=True),
        dict(draft="streams", num_draft_tokens=2),
        dict(draft="streams", num_draft_tokens=2, stream_pass="split"),
        dict(draft="streams", num_draft_tokens=2, pipeline=True),
    ],
)
def test_batch_rows_equal_each_prompt_alone(arch, kwargs):
    """A batch's layer caches pair a ragged cache for the latent keys with one for the
    indexer's (``RaggedKVCacheList``): every row drafts and gives its prompt's tokens
    alone, the attention sparse past 6 keys."""
    model = tiny_spec_model(arch, vocab_size=8, num_streams=3, top_k=2)
    tokens, passes = decode(model, BATCH, **kwargs)
    assert tokens == alone(model, BATCH)
    assert passes < max(LIMITS), "no draft accepted: the test has no power"


def test_batch_rows_with_a_draft_model_equal_each_prompt_alone():
    model = tiny_model("deepseek_v32", vocab_size=8)
    draft = tiny_model("glm_moe_dsa", vocab_size=8, seed=3)  # (sparse too)
    tokens, _ = decode(model, BATCH, draft_model=draft, num_draft_tokens=2)
    assert tokens == alone(model, BATCH)
    tokens, passes = decode(model, BATCH, draft_model=model, num_draft_tokens=2)
    assert tokens == alone(model, BATCH) and passes < max(LIMITS)


def test_negative_control_the_indexers_rows_one_position_off(monkeypatch):
    """The two members moved apart (the indexer's keys written, and rotated, one
    position past the latent keys' after each pass): not exact."""
    model = tiny_model("deepseek_v32", vocab_size=8)
    want = alone(model, BATCH)
    assert decode(model, BATCH, draft="ngram")[0] == want
    advance = RaggedKVCacheList.advance

    def apart(self, kept):
        advance(self, kept)
        self.caches[1].offset = self.caches[1].offset + 1

    monkeypatch.setattr(RaggedKVCacheList, "advance", apart)
    assert decode(model, BATCH, draft="ngram")[0] != want


def test_batch_generate_takes_and_gives_back_their_prompt_caches():
    """``prompt_caches``: ours (``KVCacheList``) after a generation, and mlx-lm's own
    (``CacheList``); the caches it returns are ``KVCacheList``s, and a second call
    goes on from them as plain decoding of each whole conversation."""
    model, tok = tiny_model("deepseek_v32", vocab_size=8), word_tokenizer(8)  # (EOS 7)
    ours, theirs = make_prompt_cache(model), mlx_lm_prompt_cache(model)
    got, _ = spec_tokens(model, PROMPT, 20, draft="ngram", prompt_cache=ours)
    held = PROMPT + got  # (both caches hold it)
    model(mx.array([held]), cache=theirs)

    def pairs(c):
        assert all(type(layer) is KVCacheList for layer in c)

    assert_prompt_caches_carried(model, tok, [ours, theirs], held, pairs)


def test_the_server_batches_their_requests_with_prompt_lookup():
    """``--draft ngram``: requests waiting together are decoded in a batch whose rows
    draft, a follow-up reuses its cache, each answer equal to mlx-lm's plain decoding."""
    from mlx_lm import stream_generate as mlx_lm_stream_generate
    from test_server_batching import V, answer, submit, submit_together

    from mlx_specstream.server import make_server, service_of

    model, tok = tiny_model("glm_moe_dsa", vocab_size=V), word_tokenizer(V, eos=0)
    prompts = [[3, 4, 5, 3, 4, 5, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [20], [30, 31] * 5]

    def plain(p):
        return "".join(r.text for r in mlx_lm_stream_generate(model, tok, p, max_tokens=30))

    server = make_server(model, tok, "tiny", port=0, draft="ngram")
    try:
        svc = service_of(server)
        assert svc.wait_idle(60) and svc.spec_batching
        body = {"max_tokens": 30, "num_draft_tokens": 3}
        jobs = submit_together(svc, [(p, body) for p in prompts])
        assert [answer(j)[0][0] for j in jobs] == [plain(p) for p in prompts]
        assert svc.served["batched"] == 1
        follow = prompts[0] + [1, 2]
        assert answer(submit(svc, follow, **body))[0][0] == plain(follow)
    finally:
        server.server_close()

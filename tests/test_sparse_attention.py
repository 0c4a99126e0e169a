"""DeepSeek V3.2 and GLM-5 (``deepseek_v32``, ``glm_moe_dsa``) speculate exactly: their
sparse attention (DSA) keeps each layer's latent keys and its indexer's keys in one
``CacheList``, which the verifier keeps as a :class:`~mlx_specstream.cache.KVCacheList`
(both members compacted together), and the indexer's RoPE takes the tree's positions.

The tiny models' indexer picks each query's top 6 keys, so past 6 tokens every layer
attends sparsely (the output differs from a dense indexer's). A pipelined pass folds
both members (``FoldingCacheList``); batches are refused with the reason.
"""

import dataclasses

import mlx.core as mx
import pytest
from helpers import (
    tree_logits_off_plain,
    assert_lookup_equals_mlx_lm,
    plain_greedy,
    spec_tokens,
    tiny_model,
    tiny_spec_model,
    word_tokenizer,
)
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import CacheList, KVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_prompt_cache

import mlx_specstream.cache as cache_module
import mlx_specstream.streams as streams
from mlx_specstream import batch_generate
from mlx_specstream.cache import KVCacheList, model_caches
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.streams import attach_verifier

ARCHS = ["deepseek_v32", "glm_moe_dsa"]
PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]  # (repeats: lookup drafts from the first step)
N = 48
TREE = ([1, 2, 3, 4, 5, 6, 7, 1], [-1, 0, 0, 1, 2, 3, 4, 4])
PREFIX = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4, 1, 5, 2]  # (13 tokens: past the indexer's top 6)


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
    ropes = streams._ropes
    monkeypatch.setattr(streams, "_ropes", lambda layer: ropes(layer)[:1])
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


def test_batches_are_refused_with_the_reason():
    model = tiny_model("deepseek_v32", vocab_size=8)
    with pytest.raises(ValueError, match="two key caches"):
        batch_generate(model, word_tokenizer(8), [PROMPT, PROMPT[:4]], max_tokens=8)


def test_the_server_serves_it_with_prompt_lookup():
    """``--draft ngram``: requests waiting together and a follow-up, each answer equal
    to mlx-lm's plain decoding (``test_server_batching.assert_served_alone_like_mlx_lm``)."""
    from test_server_batching import V, assert_served_alone_like_mlx_lm

    assert_served_alone_like_mlx_lm(
        tiny_model("deepseek_v32", vocab_size=V), word_tokenizer(V, eos=0)
    )

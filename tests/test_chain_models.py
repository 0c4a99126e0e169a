"""Models the tree verifier cannot take whose own passes verify chains of drafts
(mlx_specstream.recurrent.tree_refusal): prompt lookup and draft models give mlx-lm's
greedy tokens on nanochat, talkie, IQuest-Loop-Coder, MiniMax M3, LongCat-Flash, AFM 7
and DeepSeek V4.1 (whose caches are kept aside whole), and what needs a tree is
refused with the reason; RWKV-7's two mixers keep their own slots of one recurrent
cache. test_recurrent runs these models with the hybrids: lookup, draft models on
either side, the CLI and tuner, and sampling on nanochat (chi-square)."""

import mlx.core as mx
import pytest
from helpers import (
    plain_greedy,
    tiny_chain_model,
    tiny_hybrid,
    tiny_model,
)
from test_recurrent import PROMPTS, lookup

import mlx_specstream.recurrent as recurrent
from mlx_specstream import SpecStreamConfig, attach_streams
from mlx_specstream.batch import unbatchable
from mlx_specstream.recurrent import ChainCache, tree_refusal
from mlx_specstream.streams import attach_verifier
from mlx_specstream.support import TreeUnsupported


@pytest.mark.parametrize("arch", ["nanochat", "minimax_m3_vl"])
def test_negative_control_rejected_drafts_left_in_the_caches(arch, monkeypatch):
    """A roll-back that leaves the rejected drafts' keys in the caches (MiniMax M3's
    CacheList members too) decodes otherwise."""
    monkeypatch.setattr(ChainCache, "kv", property(lambda self: []))
    model = tiny_chain_model(arch)
    assert any(lookup(model, p, 40, num_draft_tokens=6)[0] != plain_greedy(model, p, 40)
               for p in PROMPTS)  # fmt: skip


def test_negative_control_deepseek_v41_caches_not_put_back(monkeypatch):
    """DeepSeek V4.1's LayerCache left as the rejected drafts made it (its window,
    compressed groups and open group) decodes otherwise."""
    put = recurrent.set_state
    monkeypatch.setattr(recurrent, "set_state",
                        lambda c, s: None if recurrent.kept_whole(c) else put(c, s))  # fmt: skip
    model = tiny_chain_model("deepseek_v41")
    assert any(lookup(model, p, 40, num_draft_tokens=6)[0] != plain_greedy(model, p, 40)
               for p in PROMPTS)  # fmt: skip


def test_keep_slots_golden():
    """The docstring's example: two mixers of one cache keep their own slots; a slot
    written by both is refused."""
    from mlx_lm.models.cache import ArraysCache

    from mlx_specstream.recurrent import SplitPoint, keep_slots

    a, b, c, a1, b1, c1, a2 = (mx.array([i]) for i in range(7))
    cache, split = ArraysCache(3), SplitPoint()
    cache.cache = [a, b, c]
    before = list(cache.cache)
    cache[0], cache[1] = a1, b1  # the time mix's first call
    keep_slots(split, cache, before, None)
    cache[0], cache[1] = a2, a2  # its call on the rest
    before = list(cache.cache)
    cache[2] = c1  # the channel mix's first call
    keep_slots(split, cache, before, None)
    assert split.kept == [(cache, [a1, b1, c1])] and split.wrote[id(cache)] == {0, 1, 2}
    before = list(cache.cache)
    cache[1] = a  # a third mixer writing slot 1 again
    with pytest.raises(ValueError, match="written twice in one pass"):
        keep_slots(split, cache, before, None)


def test_negative_control_rwkv7_channel_mix_state_not_kept(monkeypatch):
    """RWKV-7 with only the first mixer's slots kept (the channel mix's token shift goes
    back to before the pass) decodes otherwise."""
    keep = recurrent.keep_slots

    def first_only(split, cache, before, mixer):
        if not any(c is cache for c, _ in split.kept):
            keep(split, cache, before, mixer)

    monkeypatch.setattr(recurrent, "keep_slots", first_only)
    model = tiny_hybrid("rwkv7")
    assert any(lookup(model, p, 40, num_draft_tokens=6)[0] != plain_greedy(model, p, 40)
               for p in PROMPTS)  # fmt: skip


def test_tree_refusal_golden():
    """The reason for each model that takes chains only; None for a model the tree
    verifier takes and for one refused outright (Phi-3-small: its passes over several
    tokens are not its decoding)."""
    expected = {
        "nanochat": "layer 0 has no attention with a RoPE module",
        "talkie": r"layer 0 \(TransformerBlock\) takes \(e_x, x, mask, cache\)",
        "iquestloopcoder": "makes 8 caches for its 4 layers",
        "minimax_m3_vl": "layer 0 keeps several key caches",
        "longcat_flash": "layer 0 keeps several key caches",
        "afm7": "makes 2 caches for its 4 layers",
        "deepseek_v41": r"uses \['LayerCache'\] caches",
    }
    import re

    for arch, pattern in expected.items():
        why = tree_refusal(tiny_chain_model(arch))
        assert re.search(pattern, why), (arch, why)
        assert "Prompt lookup (draft='ngram') and draft models" not in why  # (said by decode)
    assert "ArraysCache" in tree_refusal(tiny_hybrid("qwen3_next"))
    assert tree_refusal(tiny_model("llama")) is None
    assert tree_refusal(tiny_model("gemma3_text", vocab_size=8)) is None


def test_a_model_whose_caches_a_chain_cannot_roll_back_is_refused_outright(monkeypatch):
    """A cache of a kind that is neither trimmed nor kept aside (here an object of no
    known kind): no chain, and the tree verifier's own reason is raised."""
    model = tiny_chain_model("iquestloopcoder")
    made = type(model).make_cache

    class Opaque:
        pass

    monkeypatch.setattr(type(model), "make_cache", lambda self: made(self)[:-1] + [Opaque()])
    assert tree_refusal(model) is None
    with pytest.raises(ValueError, match=r"uses \['Opaque'\] caches"):
        attach_verifier(model)


def test_what_needs_a_tree_is_refused_with_the_reason():
    model = tiny_chain_model("nanochat")
    with pytest.raises(ValueError, match="max_tree_nodes: not supported on chains.*RoPE"):
        lookup(model, PROMPTS[0], 8, max_tree_nodes=6)
    with pytest.raises(ValueError, match="takes no tree: it speculates with prompt lookup"):
        lookup(model, PROMPTS[0], 8, draft=None)
    with pytest.raises(
        ValueError, match="ngram_candidates=2: this model.s drafts are verified as one chain"
    ):
        lookup(model, PROMPTS[0], 8, ngram_candidates=2)
    with pytest.raises(TreeUnsupported, match="Prompt lookup .* run on it"):
        attach_streams(model, SpecStreamConfig(num_stream_layers=1))
    assert "per-row positions" in unbatchable(model)
    assert unbatchable(tiny_model("llama")) is None


def test_the_cache_holds_every_yielded_token_as_mlx_lm_leaves_it():
    """A reused prompt cache after a call stopped early: the same keys as mlx-lm's loop
    leaves, so the next call continues as plain decoding does."""
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_chain_model("talkie")
    ours, theirs = make_prompt_cache(model), make_prompt_cache(model)
    got, _ = lookup(model, PROMPTS[1], 13, prompt_cache=ours, num_draft_tokens=6)
    want = plain_greedy(model, PROMPTS[1], 13, prompt_cache=theirs)
    assert got == want
    assert [c.offset for c in ours] == [c.offset for c in theirs]
    for a, b in zip(ours, theirs):
        assert mx.array_equal(a.state[0], b.state[0]) and mx.array_equal(a.state[1], b.state[1])
    nxt = [want[-1]] + [5, 6]
    assert lookup(model, nxt, 20, prompt_cache=ours)[0] == plain_greedy(
        model, nxt, 20, prompt_cache=theirs
    )


def test_served_with_prompt_lookup_alone_and_together(caplog):
    """The server with ``draft="ngram"`` on nanochat: a request alone speculates through
    the model's passes and a follow-up turn reuses the kept cache; requests that wait
    together go to mlx-lm's batches (ours need the tree verifier), the log says why;
    every answer equals mlx-lm's plain decoding."""
    from test_server import assert_served_alone_and_together

    assert_served_alone_and_together(tiny_chain_model("nanochat", vocab_size=32), 32, draft="ngram")
    assert "do not draft" in caplog.text and "per-row positions" in caplog.text


@pytest.mark.parametrize("arch", ["nanochat", "talkie"])
def test_kv_bits_equals_mlx_lm_s_own_loop(arch):
    """mlx-lm's ``kv_bits`` through the chains, before, during and after the prompt:
    tokens and every yielded log-probability equal mlx-lm's own loop with the same
    options. (mlx-lm quantizes neither LongCat-Flash's CacheList nor DeepSeek V4.1's
    LayerCache, and its AFM 7 fails on quantized caches.)"""
    from mlx_lm.generate import generate_step

    heads = dict(nanochat=dict(num_attention_heads=2), talkie=dict(head_dim=32))  # (32 a head)
    model, accepted = tiny_chain_model(arch, **heads[arch]), 0
    for qs in (0, 9, 20):
        opts = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=qs, prefill_step_size=4)
        for prompt in PROMPTS:
            ref = list(generate_step(mx.array(prompt), model, max_tokens=24, **opts))
            got, records = lookup(model, prompt, 24, num_draft_tokens=4, **opts)
            assert got == [int(t) for t, _ in ref], (qs, prompt)
            assert max(mx.abs(r[1] - lp).max().item() for r, (_, lp) in zip(records, ref)) == 0
            accepted += sum(r[2] for r in records)
    assert accepted > 10, "drafts were rarely accepted: the test has no power"

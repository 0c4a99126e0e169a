"""The prompt-cache LRU shared across requests (mlx_specstream.prompt_cache).

A follow-up turn starts from the cached entry sharing the longest prefix with
its prompt and feeds only the rest; its output must equal a from-scratch run,
with streams, plain decoding, n-gram drafts and both attached drafters, and a
ParallelSpec drafter's own context must be exactly the one a from-scratch run
builds. Each equality has a negative control that must fail it.
"""

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_model, tiny_spec_model

import mlx_specstream.prompt_cache as pc
from mlx_specstream.cache import make_prompt_cache, trim_prompt_cache
from mlx_specstream.config import DrafterConfig
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.drafters import attach_drafter
from mlx_specstream.prompt_cache import PromptCacheLRU, cache_nbytes

V = 64
MODES = ("streams", "no-speculation", "ngram", "medusa", "parallelspec")


def make_model(mode):
    if mode in ("medusa", "parallelspec"):
        model = tiny_model("llama", vocab_size=V)
        cfg = DrafterConfig(kind=mode, num_draft_tokens=3, top_k=2, max_tree_nodes=10)
        attach_drafter(model, cfg, seed=0)
        return model
    return tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2)


def run(model, mode, prompt, cache, n):
    """Greedy tokens of one request, as the server runs it (the cache updated in place)."""
    kwargs = {"speculative": False} if mode == "no-speculation" else {}
    if mode == "ngram":
        kwargs["draft"] = "ngram"
    gen = spec_generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=cache, **kwargs)
    return [t for t, *_ in gen]


def filled(model, tokens):
    """A cache holding ``tokens`` (one plain prefill)."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(tokens)[None], cache=cache))
    return cache


def keys_of(cache):
    return [np.array(c.keys[..., : c.offset, :]) for c in cache]


def same_keys(a, b, atol=1e-4):
    ka, kb = keys_of(a), keys_of(b)
    return all(x.shape == y.shape and np.allclose(x, y, atol=atol) for x, y in zip(ka, kb))


P1 = [3, 9, 4, 17, 5, 8, 22, 6]
FOLLOW_UP = [21, 30, 2, 14]


@pytest.mark.parametrize("mode", MODES)
def test_follow_up_from_the_lru_equals_a_cold_request(mode):
    """Turn 1 fills a cache that goes into the LRU; turn 2 (turn 1's text plus
    new tokens) reuses it, feeds only the rest, and decodes exactly what a
    cold request decodes. Negative control: the same cache trimmed one token
    too far, fed the same rest, decodes something else."""
    model = make_model(mode)

    def turn_one(lru):
        cache = make_prompt_cache(model)
        gen1 = run(model, mode, P1, cache, 10)
        lru.insert_finished(P1 + gen1, cache)
        return gen1

    lru = PromptCacheLRU(4)
    gen1 = turn_one(lru)
    p2 = P1 + gen1 + FOLLOW_UP
    cold = run(model, mode, p2, make_prompt_cache(model), 16)

    cache, reused = lru.fetch(p2)
    # Every generated token is kept, as mlx-lm's loop keeps them: only the new ones are fed.
    assert reused == cache[0].offset == len(P1) + len(gen1)
    assert len(lru) == 0  # taken out while in use
    fed = p2[reused:]
    assert fed == FOLLOW_UP
    assert run(model, mode, fed, cache, 16) == cold

    lru = PromptCacheLRU(4)
    turn_one(lru)
    cache, reused = lru.fetch(p2)
    trim_prompt_cache(cache, 1)  # the negative control: one cached token lost
    assert run(model, mode, p2[reused:], cache, 16) != cold


def test_parallelspec_context_is_rebuilt_exactly():
    """ParallelSpec's cached row i pairs token i's state with token i+1. A finished
    generation keeps its last token's state, to be paired with the next prompt's
    first token: a follow-up that continues the whole conversation reuses it all,
    and the drafter's KV cache after it equals a cold run's, row for row. When the
    token after the reused prefix differs from the one the last row was built with
    (an edited last token), the LRU reuses one token less, with the same result.
    Negative control: without that step back, the stale row stays and the drafter
    caches differ (the output is exact either way: drafts never change it)."""
    model = make_model("parallelspec")
    cache = make_prompt_cache(model)
    gen1 = run(model, "parallelspec", P1, cache, 8)
    key = P1 + gen1
    assert cache[0].offset == len(key) and cache.drafter_state.cache.offset == len(key) - 1
    assert cache.drafter_state.pending_hidden is not None
    other = (gen1[-1] + 1) % V
    continued = key + FOLLOW_UP
    edited = key[:-1] + [other] + FOLLOW_UP  # the last token differs from gen1[-1]

    def cold(p2):
        cold_cache = make_prompt_cache(model)
        return run(model, "parallelspec", p2, cold_cache, 12), cold_cache.drafter_state.cache

    def follow_up(p2):
        lru = PromptCacheLRU(4)
        c = make_prompt_cache(model)
        assert run(model, "parallelspec", P1, c, 8) == gen1
        lru.insert_finished(P1 + gen1, c)
        c, reused = lru.fetch(p2)
        assert c.drafter_state is not None
        out = run(model, "parallelspec", p2[reused:], c, 12)
        return out, reused, c.drafter_state.cache

    for p2, reuses in ((continued, len(key)), (edited, len(key) - 2)):
        want, want_state = cold(p2)
        out, reused, state = follow_up(p2)
        assert reused == reuses
        assert out == want
        assert state.offset == want_state.offset
        assert same_keys([state], [want_state])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pc, "pairs_next_token", lambda cache: False)
        out, reused, state = follow_up(edited)
    assert reused == len(key) - 1
    assert out == want
    assert state.offset == want_state.offset
    assert not same_keys([state], [want_state])


def test_parallelspec_context_follows_a_plain_list_of_caches():
    """A plain list from mlx-lm's ``make_prompt_cache``, reused for a follow-up: the
    drafter's context is kept beside it, so after the follow-up its KV cache equals a
    cold run's row for row, and mlx-lm's-style trimming through ours trims it too.
    Control: with the kept state dropped, the drafter starts without the older
    context and its cache holds fewer rows (the output is exact either way)."""
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_prompt_cache

    import mlx_specstream.cache as cache_mod

    model = make_model("parallelspec")
    conversation = P1 + run(model, "parallelspec", P1, make_prompt_cache(model), 8) + FOLLOW_UP
    cold = make_prompt_cache(model)
    want = run(model, "parallelspec", conversation, cold, 12)

    def follow_up(drop=False):
        cache = mlx_lm_prompt_cache(model)  # a plain list
        run(model, "parallelspec", P1, cache, 8)
        if drop:
            cache_mod._DRAFTER_STATES.clear()
        out = run(model, "parallelspec", FOLLOW_UP, cache, 12)
        return out, cache, cache_mod.drafter_state_of(cache)

    out, cache, state = follow_up()
    assert out == want
    assert state.cache.offset == cold.drafter_state.cache.offset
    assert same_keys([state.cache], [cold.drafter_state.cache])
    before = state.cache.offset
    assert trim_prompt_cache(cache, 3) == 3  # ours trims the kept state too
    assert state.cache.offset == cache[0].offset == before - 2
    out, _, state = follow_up(drop=True)
    assert out == want and state.cache.offset < cold.drafter_state.cache.offset


def test_lru_longest_prefix_trims_copies_and_takes_out():
    model = tiny_model("llama", vocab_size=V)
    lru = PromptCacheLRU(10)
    a, b = [1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9]
    lru.insert(a, filled(model, a))
    lru.insert(b, filled(model, b))

    # A key that is a prefix of the prompt: taken out whole.
    cache, n = lru.fetch(a + [6, 7])
    assert n == 5 and cache[0].offset == 5 and lru.keys() == [b]
    assert same_keys(cache, filled(model, a))
    assert not same_keys(cache, filled(model, [1, 2, 3, 4, 6]))  # negative control

    # A key running past the prompt: a trimmed copy; the entry stays whole.
    cache, n = lru.fetch([1, 2, 3, 9, 8])
    assert n == 4 and cache[0].offset == 4
    assert same_keys(cache, filled(model, [1, 2, 3, 9]))
    assert lru.keys() == [b] and lru._entries[tuple(b)].cache[0].offset == 6

    # An exact match leaves one token to feed; nothing shared gives nothing.
    cache, n = lru.fetch(b)
    assert n == 5 and cache[0].offset == 5 and len(lru) == 0
    assert lru.fetch([40, 41]) == (None, 0)

    # min_new: a repetition penalty's context is fed again.
    lru.insert(a, filled(model, a))
    cache, n = lru.fetch(a + [6, 7], min_new=4)
    assert n == 3 and cache[0].offset == 3

    # The longest common prefix wins, even in an entry that runs past the prompt.
    lru = PromptCacheLRU(10)
    lru.insert([1, 2, 3, 4, 5, 6], filled(model, [1, 2, 3, 4, 5, 6]))
    lru.insert([1, 2, 7], filled(model, [1, 2, 7]))
    lru.insert([1, 2, 3, 8], filled(model, [1, 2, 3, 8]))
    cache, n = lru.fetch([1, 2, 3, 4, 0])
    assert n == 4 and len(lru) == 3


def test_lru_insert_drops_prefixes_and_keeps_its_bounds():
    model = tiny_model("llama", vocab_size=V)
    lru = PromptCacheLRU(2)
    lru.insert([1, 2], filled(model, [1, 2]))
    lru.insert([1, 2, 3], filled(model, [1, 2, 3]))
    assert lru.keys() == [[1, 2, 3]]  # the prefix entry is served by the longer one
    lru.insert([5, 6], filled(model, [5, 6]))
    lru.insert([7, 8], filled(model, [7, 8]))
    assert lru.keys() == [[5, 6], [7, 8]]  # least recently used evicted

    one = cache_nbytes(filled(model, [9]))
    lru = PromptCacheLRU(10, max_bytes=2 * one)
    for i in range(4):
        lru.insert([10 + i], filled(model, [10 + i]))
        assert lru.nbytes <= 2 * one
    assert lru.keys() == [[12], [13]]

    with pytest.raises(ValueError, match="holds 2 tokens but its key has 3"):
        lru.insert([1, 2, 3], filled(model, [1, 2]))
    assert len(PromptCacheLRU(0)) == 0
    off = PromptCacheLRU(0)
    off.insert([1], filled(model, [1]))
    assert len(off) == 0


@pytest.mark.parametrize("mode", ["streams", "ngram", "parallelspec", "pipelined"])
def test_a_reused_cache_holds_what_mlx_lm_s_holds(mode):
    """mlx-lm's own multi-turn pattern: every call feeds only its new tokens to the
    same cache. Each turn answers as mlx-lm's ``generate_step`` answers it with its
    own cache, and after each call, run out or closed early, both caches hold the
    same tokens (mlx-lm feeds each token before yielding it). Control: our cache
    one token short after the first turn answers the second differently."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    model = make_model("streams" if mode == "pipelined" else mode)
    kwargs = {"pipeline": True} if mode == "pipelined" else {}
    if mode == "ngram":
        kwargs["draft"] = "ngram"
    turns = [(P1, 10, None), (FOLLOW_UP, 12, 3), ([7, 11], 9, None), ([5], 6, 1)]

    def ours_then_theirs(turn, ours, theirs):
        prompt, n, stop_after = turn
        gen = spec_generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=ours,
                                 **kwargs)  # fmt: skip
        ref = generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=theirs)
        a, b = [], []
        for (t, *_), (u, _) in zip(gen, ref):
            a.append(t), b.append(u)
            if len(a) == stop_after:
                break
        gen.close(), ref.close()
        return a, b

    ours, theirs = make_prompt_cache(model), mlx_lm_cache(model)
    lengths = []
    for i, turn in enumerate(turns):
        a, b = ours_then_theirs(turn, ours, theirs)
        assert a == b, i
        assert ours[0].offset == theirs[0].offset, (i, ours[0].offset, theirs[0].offset)
        lengths.append(len(a))
    assert lengths == [10, 3, 9, 1]

    ours, theirs = make_prompt_cache(model), mlx_lm_cache(model)
    ours_then_theirs(turns[0], ours, theirs)
    trim_prompt_cache(ours, 1)  # the control: the answer's last token lost
    a, b = ours_then_theirs(turns[1], ours, theirs)
    assert a != b


@pytest.mark.parametrize("mode", ["streams", "ngram", "parallelspec"])
def test_a_generation_without_a_prompt_cache_feeds_no_pass_after_its_last_token(mode, monkeypatch):
    """A cache of the call's own is dropped when the generation ends: the last yielded
    token is not fed (one pass fewer than mlx-lm's loop runs), and the tokens are the
    same. Control: given a prompt cache, the call feeds it (the test above)."""
    from mlx_specstream.streams import StreamRuntime

    model, prompt = make_model(mode), P1
    fed = []
    real = StreamRuntime.prefill

    def counting(self, tokens, cache, keep_hidden=False):
        fed.append(tokens.size)
        return real(self, tokens, cache, keep_hidden)

    monkeypatch.setattr(StreamRuntime, "prefill", counting)
    own = run(model, mode, prompt, None, 12)
    assert fed == [len(prompt) - 1]  # the prompt's body only
    fed.clear()
    assert run(model, mode, prompt, make_prompt_cache(model), 12) == own
    assert fed == [len(prompt) - 1, 1]  # the last token, fed to the cache kept

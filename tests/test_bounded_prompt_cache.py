"""Reused prompt caches of sliding-window and chunked models stay bounded, as mlx-lm's
rotating caches do: ``make_prompt_cache`` gives their window layers a ``WindowKVCache``
that drops the rows no window to come sees, ``trim_prompt_cache`` takes off no more
tokens than leave each window whole, the server's LRU reuses an entry only as far
back as it can be trimmed, and a batch's rows get their dropped rows back as zeros
(``whole_windows``) and leave bounded again (``bounded_windows``). Tiny Gemma 3 shape,
window 8."""

import mlx.core as mx
import pytest
from helpers import (
    WINDOWED,
    assert_prompt_caches_carried,
    plain_greedy,
    spec_tokens,
    tiny_model,
    tiny_spec_model,
    word_tokenizer,
)
from mlx_lm.models.cache import KVCache

import mlx_specstream.batch as batch
import mlx_specstream.replies as replies
from mlx_specstream import make_prompt_cache
from mlx_specstream.cache import (
    ChunkKVCache,
    WindowKVCache,
    bounded_windows,
    cache_tokens,
    trim_prompt_cache,
    trimmable_tokens,
    whole_windows,
)
from mlx_specstream.prompt_cache import Entry, PromptCacheLRU
from test_sliding_window import BATCH_WAYS

PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]
W = 8  # the tiny gemma3_text's window


def _rows(n: int) -> mx.array:
    return mx.arange(n, dtype=mx.float32).reshape(1, 1, n, 1)


def test_trimmable_golden():
    """Chunks of 4, rows of positions 6..13: a trim stops at 8, the first chunk whose
    rows are all held; nothing dropped: every token."""
    c = ChunkKVCache(4, bounded=True)
    c.update_and_fetch(_rows(14), _rows(14))
    c.forget(14)
    assert (c.start, c.offset, c.trimmable()) == (6, 14, 6)
    assert c.trim(9) == 6 and c.offset == 8
    kept = ChunkKVCache(4)
    kept.update_and_fetch(_rows(14), _rows(14))
    kept.forget(14)
    assert (kept.start, kept.trimmable()) == (0, 14)


def test_whole_and_bounded_windows_golden():
    """Window 4, rows of positions 5..12: ``whole_windows`` gives a ``KVCache`` of 13
    rows, the first 5 zeros; ``bounded_windows`` gives the window layer of a model
    back its bound (rows of positions 5..12 from a whole cache of 13)."""
    c = WindowKVCache(4)
    c.update_and_fetch(_rows(13) + 1, _rows(13) + 1)
    c.forget(13)
    cache = [c, KVCache()]
    assert whole_windows(cache) is cache and [type(x) for x in cache] == [KVCache] * 2
    k, v = cache[0].keys, cache[0].values
    assert k[0, 0, :, 0].tolist() == [0] * 5 + list(range(6, 14)) and cache[0].offset == 13
    assert v.tolist() == k.tolist()

    model = tiny_model("gemma3_text", vocab_size=8)  # (window 8 in layers 0 and 2)
    whole = [KVCache() for _ in range(4)]
    for x in whole:
        x.update_and_fetch(_rows(30), _rows(30))
    bounded_windows(whole, model)
    assert [type(x) for x in whole] == [WindowKVCache, KVCache] * 2
    assert (whole[0].start, whole[0].offset, whole[1].offset) == (14, 30, 30)
    assert whole[0].state[0][0, 0, :, 0].tolist() == list(range(14, 30))


def test_a_reused_cache_trims_only_as_far_as_its_windows_allow_and_answers_as_plain(
    monkeypatch,
):
    """A cache that dropped rows, trimmed by far more than it can give back: every layer
    gives back as many tokens (``trimmable_tokens``), and a follow-up from there equals
    plain decoding of the conversation so far. Control: a window layer trimmed back to
    its first row (a query's window then lacks rows): not plain."""
    model = tiny_model("gemma3_text", vocab_size=8)

    def follow_up():
        cache = make_prompt_cache(model)
        got, _ = spec_tokens(model, PROMPT, 60, draft="ngram", prompt_cache=cache)
        assert cache[0].start > 0 and cache[2].start > 0  # (rows dropped)
        back = trimmable_tokens(cache)
        assert W < back < 60 and trim_prompt_cache(cache, 1000) == back
        held = cache_tokens(cache)
        assert [c.offset for c in cache] == [held] * 4
        conversation = (PROMPT + got)[:held]
        mine, _ = spec_tokens(model, [5, 2], 30, draft="ngram", prompt_cache=cache)
        return mine, plain_greedy(model, conversation + [5, 2], 30)

    mine, want = follow_up()
    assert mine == want
    monkeypatch.setattr(WindowKVCache, "trimmable", lambda self: self.offset - self.start)
    mine, want = follow_up()
    assert mine != want


def test_the_lru_reuses_a_bounded_cache_only_as_far_back_as_it_can_be_trimmed():
    """An entry whose window layers dropped rows serves a prompt sharing nearly all of
    its key (trimmed a few tokens), not one sharing only its start; inserted, it drops
    the entries it can serve and keeps those it cannot."""
    model = tiny_model("gemma3_text", vocab_size=8)
    cache = make_prompt_cache(model)
    got, _ = spec_tokens(model, PROMPT, 60, draft="ngram", prompt_cache=cache)
    key = (PROMPT + got)[: cache_tokens(cache)]
    back = trimmable_tokens(cache)
    entry = Entry(key, cache, 0)
    near = key[: len(key) - back] + [7, 7]
    far = key[: len(key) - back - 1] + [7, 7]
    assert PromptCacheLRU.reusable(entry, near) == len(key) - back
    assert PromptCacheLRU.reusable(entry, far) == 0
    assert PromptCacheLRU.reusable(entry, key + [1]) == len(key)

    lru = PromptCacheLRU()
    for n in (len(key) - back, len(key) - back - 1):
        short = make_prompt_cache(model)
        model(mx.array([key[:n]]), cache=short)
        lru.insert(key[:n], short)
    lru.insert(key, cache)
    assert sorted(map(len, lru.keys())) == [len(key) - back - 1, len(key)]
    fetched, n = lru.fetch(near)
    assert n == len(key) - back and cache_tokens(fetched) == n


@pytest.mark.parametrize("draft", ["ngram", "draft_model", None])
def test_the_server_keeps_bounded_caches_and_answers_as_mlx_lm(draft, monkeypatch):
    """A long answer's cache goes into the LRU bounded; its follow-up joins a batch (our
    rows that draft by lookup or with a windowed draft model, or mlx-lm's plain batch)
    with the others waiting, its dropped rows back as zeros; every answer equals
    mlx-lm's, and the batch's caches (a draft model's too) go back into the LRU
    bounded. Control: rows joining a batch as they are (no ``whole_windows``): refused
    (ours) or other tokens (mlx-lm's batch reads the rows from the first)."""
    from mlx_lm import stream_generate as mlx_lm_stream_generate
    from test_server_batching import answer, submit, submit_together

    from mlx_specstream.server import make_server, service_of

    V = 64
    if draft:
        model = tiny_model("gemma3_text", vocab_size=V)
    else:  # (streams tuned off, no --draft: mlx-lm's plain batches)
        model = tiny_spec_model("gemma3_text", V, num_streams=3, mode="lossless", tree_depth=0)
    tok = word_tokenizer(V)  # (the first answer runs its 40 tokens)

    def plain(p, n):
        rs = list(mlx_lm_stream_generate(model, tok, p, max_tokens=n))
        return "".join(r.text for r in rs), [r.token for r in rs]

    first = [3, 4, 5, 3, 4, 5, 3, 4, 5, 6]
    text, tokens = plain(first, 40)
    follow = first + tokens + [9, 9]
    others = [[7, 8, 9, 10, 11, 12, 13], [20], [30, 31] * 5]
    want = [plain(p, 20)[0] for p in [follow] + others]
    body = {"max_tokens": 20, "num_draft_tokens": 3}
    if draft is None:
        body = {"max_tokens": 20}

    flags = {"draft": draft} if draft == "ngram" else {}
    if draft == "draft_model":
        flags = {"draft_model": tiny_model("gemma3_text", vocab_size=V, seed=3)}

    def serve():
        server = make_server(model, tok, "tiny", port=0, **flags)
        svc = service_of(server)
        assert svc.wait_idle(60) and svc.batching and svc.spec_batching == (draft is not None)
        try:
            assert answer(submit(svc, first, **{**body, "max_tokens": 40}))[0][0] == text
            (entry,) = svc.prompt_cache._entries.values()
            assert entry.cache[0].start > 0  # (bounded: rows dropped)
            jobs = submit_together(svc, [(p, body) for p in [follow] + others])
            got = [answer(j)[0][0] for j in jobs]
            assert svc.served["batched"] >= 1
            layers = [0, 4] if draft == "draft_model" else [0]
            windows = [e.cache[i] for e in svc.prompt_cache._entries.values() for i in layers]
            assert all(type(c) is WindowKVCache for c in windows)
            assert max(c.offset - c.start for c in windows) <= 3 * W
            return got
        finally:
            server.server_close()

    assert serve() == want
    for module in (replies, batch):
        monkeypatch.setattr(module, "whole_windows", lambda cache: cache)
    try:
        got = serve()
    except Exception as e:  # noqa: BLE001 - the control's refusal
        assert draft is not None and "WindowKVCache" in str(e)
    else:
        assert got != want


def test_plain_decoding_on_a_bounded_cache_keeps_it_bounded(monkeypatch):
    """``speculative=False`` runs mlx-lm's loop on the cache: its window layers drop rows
    after each prompt chunk and each token as ours do, and the tokens are mlx-lm's."""
    held, forget = [], WindowKVCache.forget

    def spy(self, committed):
        held.append(self.offset - self.start)  # (before: what was held since the last)
        forget(self, committed)

    monkeypatch.setattr(WindowKVCache, "forget", spy)
    model = tiny_spec_model("gemma3_text", 8, num_streams=3, mode="lossless")
    prompt = (PROMPT * 10)[:100]
    cache = make_prompt_cache(model)
    got, _ = spec_tokens(model, prompt, 40, speculative=False, prompt_cache=cache,
                         prefill_step_size=16)  # fmt: skip
    assert got == plain_greedy(model, prompt, 40)
    assert cache[0].start > 100 and max(held) <= 3 * W + 16  # (a prompt chunk at most)


def test_batch_rows_take_bounded_caches_and_give_them_back_bounded():
    """``batch_generate``'s ``prompt_caches``: a bounded cache that dropped rows (a
    generation's), then the caches it returns (bounded too, holding all but the last
    token), each continued by the next call as plain decoding continues the whole
    conversation."""
    model, tok = tiny_model("gemma3_text", vocab_size=8), word_tokenizer(8)  # (EOS 7)
    cache = make_prompt_cache(model)
    got, _ = spec_tokens(model, PROMPT, 40, draft="ngram", prompt_cache=cache)
    assert cache[0].start > 0

    def bounded(c):
        assert type(c[0]) is WindowKVCache and c[0].offset - c[0].start <= 3 * W

    held = (PROMPT + got)[: cache_tokens(cache)]
    assert_prompt_caches_carried(model, tok, [cache, cache], held, bounded, n=30)


@pytest.fixture
def window_rows(monkeypatch):
    """Every window layer's rows before each ``forget``, by the layer's cache; and each
    trim a window bound cut short (none must be, inside a generation)."""
    held, cut = {}, []
    forget, trim = WindowKVCache.forget, WindowKVCache.trim

    def spy_forget(self, committed):
        held.setdefault(id(self), []).append(self.offset - self.start)
        forget(self, committed)

    def spy_trim(self, n):
        if n > self.trimmable():
            cut.append((n, self.trimmable()))
        return trim(self, n)

    monkeypatch.setattr(WindowKVCache, "forget", spy_forget)
    monkeypatch.setattr(WindowKVCache, "trim", spy_trim)
    return held, cut


@pytest.mark.parametrize("speculative", [True, False])
def test_a_windowed_draft_models_cache_stays_bounded_across_calls(speculative, window_rows):
    """A Gemma 3 shape drafting for another, both caches in one reused prompt cache over
    three calls (mlx-lm's convention): each call equals plain decoding of the whole
    conversation, and the draft model's window layers drop rows as the model's do
    (``speculative=False``: its cache takes in each call's tokens at the end)."""
    held, cut = window_rows
    model = tiny_spec_model("gemma3_text", 8, num_streams=3, mode="lossless")
    draft = tiny_model("gemma3_text", vocab_size=8, seed=3)
    cache = make_prompt_cache(model, draft_model=draft)
    assert [type(c) for c in cache] == [WindowKVCache, KVCache] * 4
    history = []
    for prompt in (PROMPT, [5, 2], [6, 1, 4]):
        got, _ = spec_tokens(model, prompt, 40, draft_model=draft, num_draft_tokens=3,
                             prompt_cache=cache, speculative=speculative)  # fmt: skip
        assert got == plain_greedy(model, history + prompt, 40)
        history += prompt + got
        assert cache_tokens(cache[4:]) == cache_tokens(cache) == len(history)
    assert cache[4].start > 60 and cache[6].start > 60  # (the draft model's windows)
    bound = 3 * W + (40 + 3 if not speculative else 8)  # (a step's; plain: a call's at once)
    assert max(max(rows) for rows in held.values()) <= bound and not cut


def test_a_generation_never_cuts_a_trim_short_at_a_window_bound(window_rows):
    """Chains longer than the window, pipelined or not, trees, a draft model: every
    trim inside a generation takes off all it asks (a bound that cut one would leave
    rejected rows in the cache); each output is plain decoding's."""
    held, cut = window_rows
    model = tiny_spec_model("gemma3_text", 8, num_streams=3, top_k=2)
    want = plain_greedy(model, PROMPT, 120)
    for kwargs in [
        dict(draft="ngram", num_draft_tokens=30, pipeline=True),
        dict(draft="ngram", num_draft_tokens=12, pipeline=False),
        dict(max_tree_nodes=6, pipeline=True),
        dict(max_tree_nodes=6, pipeline=False),
        dict(draft_model=tiny_model("gemma3_text", vocab_size=8, seed=3), num_draft_tokens=6),
    ]:
        held.clear()
        assert spec_tokens(model, PROMPT, 120, **kwargs)[0] == want
        # (forget ran on every window layer of the run: the model's two, and the draft
        # model's two; caches are told apart by id while the run holds them all)
        layers = 4 if "draft_model" in kwargs else 2
        assert len(held) >= layers and not cut


def test_batch_rows_with_a_windowed_draft_model_take_and_give_back_bounded_caches():
    """``batch_generate`` with a Gemma 3 shape drafting: each row's cache (the model's
    layers, then the draft model's, both having dropped rows) joins the batch, and both
    come back bounded; the rows equal plain decoding of the conversation."""
    from mlx_specstream import batch_generate

    model, tok = tiny_model("gemma3_text", vocab_size=8), word_tokenizer(8)  # (EOS 7)
    draft = tiny_model("gemma3_text", vocab_size=8, seed=3)
    cache = make_prompt_cache(model, draft_model=draft)
    got, _ = spec_tokens(model, PROMPT, 40, draft_model=draft, num_draft_tokens=3,
                         prompt_cache=cache)  # fmt: skip
    assert cache[0].start > 0 and cache[4].start > 0
    conversation = PROMPT + got
    turns = [[5, 2], [6]]
    out = batch_generate(model, tok, turns, max_tokens=30, prompt_caches=[cache, cache],
                         return_prompt_caches=True, return_token_ids=True,
                         draft_model=draft, num_draft_tokens=3)  # fmt: skip
    for t, ids, c in zip(turns, out.token_ids, out.caches):
        assert ids == plain_greedy(model, conversation + t, 30)[: len(ids)]
        assert [type(x) for x in c] == [WindowKVCache, KVCache] * 4
        assert all(x.offset - x.start <= 3 * W for x in c[::2])


@pytest.mark.parametrize("arch", WINDOWED + ["gemma4_text", "gemma3n", "llama4"])
def test_reused_caches_trimmed_back_and_continued_equal_plain(arch):
    """On every windowed shape (Gemma 4's and 3n's KV-sharing layers read a window
    layer's rows; Llama 4's chunked layers): a cache reused over two calls, trimmed by
    more than it can give back, continues as plain decoding of what it holds."""
    model = tiny_model(arch, vocab_size=8)
    cache, history = make_prompt_cache(model), []
    for prompt in (PROMPT, [5, 2]):
        got, _ = spec_tokens(model, prompt, 40, draft="ngram", prompt_cache=cache)
        history += prompt + got
    assert any(getattr(c, "start", 0) > 0 for c in cache)  # (rows dropped)
    n = trim_prompt_cache(cache, 1000)
    held = cache_tokens(cache)
    assert 0 < n < len(history) and held == len(history) - n
    got, _ = spec_tokens(model, [6, 1, 4], 30, draft="ngram", prompt_cache=cache)
    assert got == plain_greedy(model, history[:held] + [6, 1, 4], 30)


# ---- a batch's window layers ------------------------------------------------------------


def test_ragged_window_cache_golden():
    """Window 4, two rows ending at 13 and 20: ``forget`` drops positions 0..4 (below
    ``13 - 8``); the model's mask then starts at column 5; row 1 comes out as a
    ``WindowKVCache`` from position 5; a row joining from position 0 gets zeros."""
    from mlx_specstream.ragged_cache import RaggedKVCache

    rows = mx.concatenate([_rows(20), _rows(20) + 100])  # (2, 1, 20, 1)
    c = RaggedKVCache([0, 0], window=4)
    c.update_and_fetch(rows, rows)
    c.advance([13, 20])
    c.forget()
    assert c.start == 5 and c.keys.shape[2] >= 15
    assert c.make_mask(1).shape[-1] == 21 - 5  # (columns 5 .. 20)
    assert c.make_mask(1, window_size=4)[1, 0, 0].tolist() == [False] * 12 + [True] * 4
    out = c.extract(1)
    assert type(out) is WindowKVCache and (out.start, out.offset) == (5, 20)
    assert out.keys[0, 0, :, 0].tolist() == [105 + i for i in range(15)]
    new = RaggedKVCache([0], window=4)
    new.update_and_fetch(_rows(3), _rows(3))
    new.advance([3])
    both = c.extend(new)
    assert both.start == 0 and both.ends == [13, 20, 3]
    assert both.keys[1, 0, :20, 0].tolist() == [0] * 5 + [105 + i for i in range(15)]
    assert both.keys[2, 0, :3, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("kwargs", BATCH_WAYS)
@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_oss"])
def test_a_batchs_window_layers_drop_rows_and_stay_exact(arch, kwargs, monkeypatch):
    """Rows of 80 tokens: the batch's window layers drop the columns no row's window
    to come sees (at most 3 windows and a pass behind the shortest row), and every row
    equals its prompt alone. Control: columns still in a window dropped."""
    from test_batch import decode

    from mlx_specstream.ragged_cache import RaggedKVCache

    held, forget = [], RaggedKVCache.forget

    def spy(self):
        forget(self)
        if self.window is not None and self.keys is not None:
            held.append((self.start, int(self._ends.min()) - self.start))

    monkeypatch.setattr(RaggedKVCache, "forget", spy)
    model = tiny_spec_model(arch, vocab_size=16, num_streams=3)
    prompts, limits = [PROMPT, [5, 2, 6], [1, 4, 1, 4, 1]], [80, 80, 80]
    want = [plain_greedy(model, p, n) for p, n in zip(prompts, limits)]
    got, _ = decode(model, prompts, limits, **kwargs)
    assert got == want
    assert max(s for s, _ in held) > 40 and max(r for _, r in held) <= 3 * W

    def greedy(self):  # (half a window kept behind the shortest row)
        if self.window is None or self.keys is None:
            return
        drop = int(self._ends.min()) - self.window // 2 - self.start
        if drop > 0:
            self.keys, self.values = self.keys[..., drop:, :], self.values[..., drop:, :]
            self.start += drop

    monkeypatch.setattr(RaggedKVCache, "forget", greedy)
    assert decode(model, prompts, limits, **kwargs)[0] != want


def test_a_batchs_windowed_draft_model_drops_rows_too(monkeypatch):
    """Batch rows drafting with a Gemma 3 shape: its window layers' columns drop as
    the model's, and every row equals its prompt alone."""
    from test_batch import decode

    from mlx_specstream.ragged_cache import RaggedKVCache

    starts, forget = {}, RaggedKVCache.forget

    def spy(self):
        forget(self)
        starts[id(self)] = max(starts.get(id(self), 0), self.start)

    monkeypatch.setattr(RaggedKVCache, "forget", spy)
    model = tiny_model("gemma3_text", vocab_size=16)
    draft = tiny_model("gemma3_text", vocab_size=16, seed=3)
    prompts, limits = [PROMPT, [5, 2, 6], [1, 4, 1, 4, 1]], [80, 80, 80]
    got, _ = decode(model, prompts, limits, draft_model=draft, num_draft_tokens=2)
    assert got == [plain_greedy(model, p, n) for p, n in zip(prompts, limits)]
    assert sum(s > 40 for s in starts.values()) >= 4  # (2 window layers in each model)


def test_negative_control_plain_decoding_through_mlx_lms_loop_alone(monkeypatch):
    """``speculative=False`` straight through mlx-lm's ``generate_step`` (no
    ``bounded_generate_step``): the tokens are the same, but no row is dropped."""
    import mlx_specstream.decode as decode
    from mlx_lm.generate import generate_step

    monkeypatch.setattr(decode, "bounded_generate_step", generate_step)
    model = tiny_spec_model("gemma3_text", 8, num_streams=3, mode="lossless")
    prompt = (PROMPT * 10)[:100]
    cache = make_prompt_cache(model)
    got, _ = spec_tokens(model, prompt, 40, speculative=False, prompt_cache=cache)
    assert got == plain_greedy(model, prompt, 40) and cache[0].start == 0

"""Batched decoding whose rows speculate with prompt lookup (mlx_specstream.batch):
each row equals its prompt decoded alone (greedy: mlx-lm's plain decoding, token for
token on CPU; sampled: the model's distribution), in fewer passes."""

import doctest

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    assert_lossless,
    plain_greedy,
    tiny_hybrid,
    tiny_model,
    tiny_spec_model,
    word_tokenizer,
)
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.sample_utils import make_logits_processors

from mlx_specstream import batch
from mlx_specstream.batch import batch_generate, batch_generate_step
from mlx_specstream.ragged_cache import RaggedKVCache
from mlx_specstream.sample_utils import make_sampler

V = 16
PROMPTS = [[3, 4, 5, 3, 4], [7, 8, 9, 10, 11, 12, 13, 7, 8], [2], [1, 2, 1, 2, 1, 2, 1]]
LIMITS = [24, 30, 17, 40]


def decode(model, prompts=PROMPTS, limits=LIMITS, **kwargs):
    """Each row's tokens, and the number of passes."""
    tokens, passes = [[] for _ in prompts], 0
    for out in batch_generate_step(model, prompts, max_tokens=limits, **kwargs):
        passes += 1
        for r in out:
            tokens[r.uid] += r.tokens
    return tokens, passes


def alone(model, prompts=PROMPTS, limits=LIMITS, **kwargs):
    return [plain_greedy(model, p, n, **kwargs) for p, n in zip(prompts, limits)]


def test_doc_examples():
    result = doctest.testmod(batch)
    assert result.failed == 0 and result.attempted > 0, result


def test_ragged_mask_golden():
    """The module's worked example: rows holding 3 and 1 tokens, a pass over two."""
    cache = RaggedKVCache([3, 1])
    o, _ = True, False
    want = [
        [[o, o, o, o, _], [o, o, o, o, o]],
        [[o, o, _, _, _], [o, o, o, _, _]],
    ]
    assert cache.make_mask(2)[:, 0].tolist() == want
    assert cache.offset.tolist() == [3, 1]  # each row's RoPE position
    cache.advance([2, 1])
    assert cache.ends == [5, 2] and cache.offset.tolist() == [5, 2]


def test_ragged_writes_land_after_each_row_end():
    """A pass writes each row's keys after its own end; merge keeps each row's tokens."""
    rows = []
    for n in (3, 1):
        c = KVCache()
        c.update_and_fetch(mx.full((1, 1, n, 2), n, mx.float32), mx.zeros((1, 1, n, 2)))
        rows.append(c)
    cache = RaggedKVCache.merge(rows)
    keys, _ = cache.update_and_fetch(mx.full((2, 1, 2, 2), 9.0), mx.zeros((2, 1, 2, 2)))
    assert keys[:, 0, :, 0].tolist() == [[3, 3, 3, 9, 9], [1, 9, 9, 0, 0]]
    cache.advance([1, 2])
    keys, _ = cache.update_and_fetch(mx.full((2, 1, 1, 2), 7.0), mx.zeros((2, 1, 1, 2)))
    assert keys[:, 0, :, 0].tolist() == [[3, 3, 3, 9, 7], [1, 9, 9, 7, 0]]
    cache.filter([1])
    assert cache.ends == [3] and cache.keys.shape[0] == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "starcoder2", "gpt_neox"])
def test_greedy_rows_equal_each_prompt_alone_in_fewer_passes(arch):
    """Rows of different prompt lengths and limits: every row equals mlx-lm's greedy
    decoding of its prompt alone, and drafts are accepted (fewer passes than the
    longest row's tokens)."""
    model = tiny_model(arch, vocab_size=V)
    tokens, passes = decode(model, num_draft_tokens=4)
    assert tokens == alone(model)
    assert passes < max(LIMITS), f"{passes} passes for {max(LIMITS)} tokens: nothing accepted"


def test_a_4bit_model_rows_equal_each_prompt_alone():
    """A quantized mlx-lm model (what most users hold), float32 activations."""
    model = tiny_model("llama", vocab_size=V, quant_bits=4)
    for prompt, got, want in zip(PROMPTS, decode(model, num_draft_tokens=4)[0], alone(model)):
        assert_lossless(model, prompt, got, want)


def test_a_model_with_streams_decodes_as_its_base():
    """The streams' hooks stay off: a stream model batches as the model it wraps."""
    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, tree_depth=3)
    assert decode(model)[0] == alone(model)


def test_without_drafts_one_token_per_row_per_pass():
    model = tiny_model("llama", vocab_size=V)
    tokens, passes = decode(model, draft=None)
    assert tokens == alone(model) and passes == max(LIMITS)


def test_negative_control_a_mask_blind_to_row_ends(monkeypatch):
    """Every row's queries seeing up to the longest row's end (stale and foreign
    positions) changes the output."""
    model = tiny_model("llama", vocab_size=V)

    def blind(self, N, return_array=False, window_size=None, **kwargs):
        q = (self.size() + mx.arange(N))[None, None, :, None]
        return mx.broadcast_to(
            mx.arange(self.size() + N) <= q, (len(self.ends), 1, N, self.size() + N)
        )

    monkeypatch.setattr(RaggedKVCache, "make_mask", blind)
    monkeypatch.setattr(batch, "ragged_fault", lambda m: None)  # (the probe would catch it)
    assert decode(model, num_draft_tokens=4)[0] != alone(model)


@pytest.mark.parametrize("pipeline", [False, True])
def test_negative_control_one_draft_token_too_many(pipeline, monkeypatch):
    """Each row keeps one draft token more than it matched (host and device verifier)."""
    model = tiny_model("llama", vocab_size=V)
    monkeypatch.setattr(batch, "accepted", lambda d, c: c[: min(len(d), len(_accepted(d, c))) + 1])
    monkeypatch.setattr(batch, "accepted_on_device",
                        lambda i, c, d: mx.minimum(_on_device(i, c, d) + 1, d))  # fmt: skip
    assert decode(model, num_draft_tokens=4, pipeline=pipeline)[0] != alone(model)


_accepted, _on_device = batch.accepted, batch.accepted_on_device


def test_logits_processors_see_each_row_history_with_its_draft(monkeypatch):
    """A repetition and a frequency penalty (history-dependent) give each row what they
    give it alone. Control: processors that see the history without the draft's
    tokens before each position differ."""
    model = tiny_model("llama", vocab_size=V)
    procs = make_logits_processors(repetition_penalty=1.5, repetition_context_size=6)
    want = alone(model, logits_processors=procs)
    assert decode(model, logits_processors=procs)[0] == want

    real = batch._process

    def without_drafts(logits, rows, fed):
        return real(logits, rows, [f[:1] * len(f) for f in fed])

    monkeypatch.setattr(batch, "_process", without_drafts)
    assert decode(model, logits_processors=procs)[0] != want


def test_batch_generate_texts_stop_tokens_and_logprobs():
    """As mlx-lm's batch_generate: an EOS ends a row and is not part of its text; each
    token's log-probability is plain decoding's."""
    model = tiny_model("llama", vocab_size=V)
    tok = word_tokenizer(V, eos=5)
    plain = alone(model)
    res = batch_generate(model, tok, PROMPTS, max_tokens=LIMITS, return_token_ids=True,
                         return_logprobs=True, num_draft_tokens=3)  # fmt: skip
    for p, n, got, lps, reason, text in zip(
        PROMPTS, LIMITS, res.token_ids, res.logprobs, res.finish_reasons, res.texts
    ):
        want = plain[PROMPTS.index(p)]
        cut = want.index(5) if 5 in want else len(want)
        assert got == want[:cut] and text == tok.decode(want[:cut])
        assert reason == ("stop" if 5 in want else "length")
        steps = generate_step(mx.array(p), model, max_tokens=cut)
        plain_lps = [lp[t].item() for t, lp in steps]
        assert np.allclose(lps, plain_lps, atol=1e-5)
    assert any(r == "stop" for r in res.finish_reasons), "no row met the EOS: untested"
    assert res.stats.tokens_per_pass > 1 and res.stats.forward_passes > 0


PROMPT_A, PROMPT_B, N_TOKENS, ROWS = [1, 4, 2, 5, 1, 4], [3, 2, 3, 2, 3], 3, 1200


def exact_distribution(model, prompt, sampler):
    import itertools

    seqs = list(itertools.product(range(6), repeat=N_TOKENS))
    logits = model(mx.array([prompt + list(s[:-1]) for s in seqs]))[:, len(prompt) - 1 :]
    logits = logits.astype(mx.float32)
    probs = np.array(sampler.probs(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    return {
        s: float(np.prod([probs[i, t, k] for t, k in enumerate(s)])) for i, s in enumerate(seqs)
    }


def sampled_pvalues(model, sampler, own=False, draft_model=None, streams=False, pipeline=True):
    """Rows of two prompts, interleaved in one batch, sampled: each prompt's rows
    against its own exact distribution. ``own``: each row with a sampler of its own
    (drawn row by row), else one shared (one draw over the batch). ``draft_model``
    drafts instead of prompt lookup; with ``streams`` the model's streams do. Rows
    drafting by lookup or with the streams are verified in pipelined passes unless
    ``pipeline`` is off."""
    from chi_square import chi_square_pvalue

    mx.random.seed(0)
    prompts = [PROMPT_A, PROMPT_B] * (ROWS // 2)
    batcher = batch.SpecBatcher(model, draft_model=draft_model, streams=streams,
                                pipeline=pipeline)  # fmt: skip
    for p in prompts:
        row_sampler = make_sampler(temp=sampler.temp) if own else sampler
        batcher.insert(p, max_tokens=N_TOKENS, sampler=row_sampler, num_draft_tokens=2)
    tokens, drafted, flights = {}, 0, 0
    while len(batcher):
        for r in batcher.step():
            tokens[r.uid] = tokens.get(r.uid, []) + r.tokens
            drafted += len(r.tokens) - 1
        flights += batcher._flight is not None
    tokens = [tokens[u] for u in sorted(tokens)]
    assert drafted > ROWS // 10, "drafts were rarely accepted: the test has no power"
    assert bool(flights) == pipeline, f"{flights} passes in flight"
    out = []
    for k, prompt in enumerate((PROMPT_A, PROMPT_B)):
        counts = {}
        for t in tokens[k::2]:
            counts[tuple(t)] = counts.get(tuple(t), 0) + 1
        out.append(chi_square_pvalue(counts, exact_distribution(model, prompt, sampler), ROWS // 2))
    return out


@pytest.fixture(scope="module")
def small():
    return tiny_model("llama", vocab_size=6, weight_scale=1.0, hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module")
def small_draft():
    return tiny_model("llama", vocab_size=6, weight_scale=1.0, hidden_size=32,
                      intermediate_size=64, seed=2)  # fmt: skip


@pytest.mark.parametrize(
    "own, drafter, pipeline",
    [(False, "lookup", True), (True, "lookup", True), (False, "lookup", False),
     (True, "lookup", False), (False, "draft model", False), (False, "draft model", True)],
    ids=["shared-sampler", "own-samplers", "shared-sampler-unpipelined",
         "own-samplers-unpipelined", "draft-model", "draft-model-pipelined"],
)  # fmt: skip
def test_sampled_rows_keep_the_model_distribution(small, small_draft, own, drafter, pipeline):
    draft_model = small_draft if drafter == "draft model" else None
    p = sampled_pvalues(small, make_sampler(temp=1.0), own, draft_model, pipeline=pipeline)
    assert min(p) > 1e-3, f"chi-square p = {p}"


@pytest.mark.parametrize("drafter", ["lookup", "draft model"])
def test_negative_control_unchecked_first_draft_token(small, small_draft, drafter, monkeypatch):
    """A host verifier that keeps the draft's first token unchecked."""
    monkeypatch.setattr(
        batch, "accepted", lambda d, c: d[:1] + _accepted(d[1:], c[1:]) if d else c[:1]
    )
    draft_model = small_draft if drafter == "draft model" else None
    p = sampled_pvalues(small, make_sampler(temp=1.0), draft_model=draft_model, pipeline=False)
    assert max(p) < 1e-6, f"the lenient verifier passed (p = {p}): the test has no power"


@pytest.mark.parametrize("control", [False, True], ids=["pipelined", "control-unchecked"])
def test_pipelined_lookup_rows_keep_the_model_distribution(control, monkeypatch):
    """Lookup rows verified on the device in pipelined passes, sampled at T = 1 (a
    sharper model than ``small``, so that the control has power). Control: a device
    verifier that keeps the first draft token unchecked."""
    if control:
        monkeypatch.setattr(batch, "accepted_on_device",
                            lambda i, c, d: mx.maximum(_on_device(i, c, d), mx.minimum(d, 1)))  # fmt: skip
    model = tiny_model("llama", vocab_size=6, weight_scale=4.0, hidden_size=32,
                       intermediate_size=64)  # fmt: skip
    p = sampled_pvalues(model, make_sampler(temp=1.0))
    if control:
        assert min(p) < 1e-6, f"the lenient verifier passed (p = {p}): the test has no power"
    else:
        assert min(p) > 1e-3, f"chi-square p = {p}"


def test_models_that_cannot_batch_get_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="layer 0 of this model has a ArraysCache"):
        decode(tiny_hybrid("qwen3_next", vocab_size=V))
    model = tiny_model("llama", vocab_size=V)
    monkeypatch.setattr(model, "make_cache", lambda: [RotatingKVCache(8, keep=4) for _ in model.layers],
                        raising=False)  # fmt: skip
    with pytest.raises(ValueError, match="has a RotatingKVCache"):
        decode(model)
    # mlx-lm 0.32's gemma2 broadcasts a batch mask over its key-value heads
    with pytest.raises(ValueError, match="cannot batch this mlx_lm.models.gemma2 model"):
        decode(tiny_model("gemma2", vocab_size=V))


def test_the_probe_catches_rows_that_are_wrong_without_raising(monkeypatch):
    """Control for the probe: noise added to batched passes only."""
    model = tiny_model("llama", vocab_size=V)
    assert batch.ragged_fault(model) is None
    real = RaggedKVCache.update_and_fetch

    def noisy(self, keys, values):
        k, v = real(self, keys, values)
        return k + mx.random.normal(k.shape), v

    monkeypatch.setattr(RaggedKVCache, "update_and_fetch", noisy)
    assert "differs from the same tokens alone" in batch._probe(model)


def test_the_probes_feed_tokens_inside_a_small_vocabulary():
    """Both batching probes (mlx-lm's batch and ours) on a 6-token vocabulary: no token
    id reaches past the embedding (an out-of-range id reads memory past it, and its
    rows differ at random)."""
    from mlx_specstream import replies

    model = tiny_model("llama", vocab_size=6, weight_scale=1.0, hidden_size=32,
                       intermediate_size=64, seed=2)  # fmt: skip
    seen = []

    class Checked(type(model)):
        def __call__(self, inputs, *args, **kwargs):
            seen.append(int(inputs.max().item()))
            return super().__call__(inputs, *args, **kwargs)

    model.__class__ = Checked
    assert batch._probe(model) is None and replies.batching_fault(model) is None
    assert seen and max(seen) < 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(draft="streams"), "draft='streams'"),
        (dict(num_draft_tokens=0), "num_draft_tokens=0"),
        (dict(limits=[4]), "1 max_tokens for 4 prompts"),
        (dict(draft="draft_model"), "draft='draft_model' with draft_model=None"),
        (
            dict(draft="streams", draft_model=tiny_model("llama", vocab_size=V, seed=3)),
            "draft='streams' with draft_model=a model",
        ),
        (
            dict(draft_model=tiny_hybrid("qwen3_next", vocab_size=V)),
            "layer 0 of this draft model has a ArraysCache",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode(tiny_model("llama", vocab_size=V), **{"limits": LIMITS, **kwargs})


def test_empty_prompt_and_zero_tokens():
    model = tiny_model("llama", vocab_size=V)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        decode(model, [[1, 2], []], [4, 4])
    tokens, _ = decode(model, PROMPTS[:2], [0, 6])
    assert tokens == [[], alone(model, PROMPTS[1:2], [6])[0]]


def test_rows_join_and_leave_between_passes():
    """Continuous batching: with room for two rows, a third waits its turn; a fourth
    joins mid-flight with a cache holding part of its prompt; a row taken out
    mid-flight gives a cache from which mlx-lm's own loop goes on. Every row equals
    its prompt decoded alone."""
    model = tiny_model("llama", vocab_size=V)
    batcher = batch.SpecBatcher(model, max_rows=2, keep_caches=True)
    want = alone(model, PROMPTS, [30] * 4)
    got = {}
    uids = [batcher.insert(p, max_tokens=30, num_draft_tokens=4) for p in PROMPTS[:3]]
    got.update({u: [] for u in uids})
    for _ in range(3):
        for r in batcher.step():
            got[r.uid] += r.tokens
    assert got[uids[2]] == [] and len(batcher.rows) == 2  # (waiting for room)
    left = batcher.remove([uids[0]])[uids[0]]  # taken out mid-flight
    n = len(got[uids[0]])
    assert left[0].offset == len(PROMPTS[0]) + n - 1
    rest = generate_step(mx.array(got[uids[0]][-1:]), model, prompt_cache=left, max_tokens=30 - n)
    assert got[uids[0]] + [t for t, _ in rest] == want[0]
    part = make_prompt_cache_with(model, PROMPTS[3][:4])
    uids.append(batcher.insert(PROMPTS[3], part, max_tokens=30, num_draft_tokens=4))
    got[uids[3]] = []
    finished = {}
    while len(batcher):
        for r in batcher.step():
            got[r.uid] += r.tokens
            if r.finish_reason:
                finished[r.uid] = r.cache
    assert [got[u] for u in uids[1:]] == want[1:]
    for u, p in zip(uids[1:], PROMPTS[1:]):  # a finished row's cache holds its tokens but the last
        assert finished[u][0].offset == len(p) + 30 - 1


def make_prompt_cache_with(model, tokens):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([tokens]), cache=cache)
    return cache


def test_rows_with_their_own_samplers_and_draft_lengths():
    """Per-row settings: a greedy row, a row at temperature 0 through a sampler, and a
    row that does not draft (one token per pass) each equal plain decoding."""
    model = tiny_model("llama", vocab_size=V)
    batcher = batch.SpecBatcher(model)
    settings = [dict(), dict(sampler=make_sampler(temp=0.0)), dict(num_draft_tokens=0)]
    uids = [batcher.insert(p, max_tokens=20, **s) for p, s in zip(PROMPTS, settings)]
    got, passes = {u: [] for u in uids}, {u: 0 for u in uids}
    while len(batcher):
        for r in batcher.step():
            got[r.uid] += r.tokens
            passes[r.uid] += 1
    assert [got[u] for u in uids] == alone(model, PROMPTS[:3], [20] * 3)
    assert passes[uids[2]] == 20 and passes[uids[0]] < 20


@pytest.mark.parametrize("k", [1, 3])
def test_a_copy_of_the_model_drafting_has_every_draft_accepted(k):
    """The model itself as the draft model: every row's every draft is accepted, so
    the longest row takes ceil(40 / (k + 1)) passes, and each row equals plain
    decoding."""
    model = tiny_model("llama", vocab_size=V)
    tokens, passes = decode(model, draft_model=model, num_draft_tokens=k)
    assert tokens == alone(model) and passes == -(-max(LIMITS) // (k + 1))


def test_draft_models_of_other_weights_and_architectures():
    """Random draft models (another seed; another architecture with a larger
    vocabulary, whose drafts are cut to the model's): each row equals plain decoding."""
    model = tiny_model("llama", vocab_size=V)
    for draft_model in (tiny_model("llama", vocab_size=V, seed=3),
                        tiny_model("qwen2", vocab_size=V + 4, seed=5)):  # fmt: skip
        assert decode(model, draft_model=draft_model, num_draft_tokens=3)[0] == alone(model)


def draft_cache_errors(model, draft_model, steps=12, prompts=PROMPTS, draft=None,
                       pipeline=None):  # fmt: skip
    """After each pass, how far each row's draft cache is from the draft model's own
    cache over the row's tokens but the last: (rows whose cache holds another count
    than that, largest key difference over the tokens it holds). Pipelined, a draft
    cache also holds the next pass's chain after them: its first tokens are compared."""
    from mlx_lm.models.cache import make_prompt_cache

    batcher = batch.SpecBatcher(model, draft_model=draft_model, pipeline=pipeline)
    for p in prompts:
        batcher.insert(p, max_tokens=40, num_draft_tokens=3, draft=draft)
    short, gap = 0, 0.0
    for _ in range(steps):
        batcher.step()
        for b, row in enumerate(batcher.rows):
            ends = batcher.draft_cache[0].ends[b]
            end = min(ends, row.fed) if pipeline else ends
            held = [c.extract(b, end) for c in batcher.draft_cache]
            tokens = row.history.tokens[:-1]
            short += held[0].offset != len(tokens)
            n = min(held[0].offset, len(tokens))
            if n == 0:
                continue
            own = make_prompt_cache(draft_model)
            draft_model(mx.array([tokens[:n]]), cache=own)
            gap = max(gap, mx.abs(held[0].keys[..., :n, :] - own[0].keys[..., :n, :]).max().item())
    return short, gap


def test_draft_caches_hold_the_accepted_tokens_after_every_pass(monkeypatch):
    """A random draft model (drafts rejected): after every pass each row's draft cache
    holds exactly the row's tokens but the last, as the draft model's own would.
    Control: a roll-back that goes one token too far (the output stays right: the
    token is fed again) leaves caches a token short."""
    model = tiny_model("llama", vocab_size=V)
    draft_model = tiny_model("llama", vocab_size=V, seed=3)
    short, gap = draft_cache_errors(model, draft_model)
    assert short == 0 and gap < 1e-5
    for draft in ("draft_model", "draft_model+ngram"):  # pipelined: settled on the device
        short, gap = draft_cache_errors(model, draft_model, draft=draft, pipeline=True)
        assert short == 0 and gap < 1e-5, draft
    settle = batch.SpecBatcher._settle_drafts

    def too_far(self, rows):
        settle(self, rows)
        for c in self.draft_cache:
            c.set_ends([max(e - 1, 0) for e in c.ends])

    monkeypatch.setattr(batch.SpecBatcher, "_settle_drafts", too_far)
    assert decode(model, draft_model=draft_model, num_draft_tokens=3)[0] == alone(model)
    assert draft_cache_errors(model, draft_model)[0] > 0


@pytest.mark.parametrize("drafter", ["lookup", "draft model"])
def test_prompt_caches_carry_a_conversation_to_the_next_call(drafter):
    """mlx-lm's ``prompt_caches`` / ``return_prompt_caches``: the caches a first call
    returns (context, prompt and answer but its last token; both models' layers with
    a draft model) carry each row into a second call, whose answers equal plain
    decoding over the whole conversation. The caches passed in are not changed.
    Control: the second call without its caches answers otherwise."""
    model = tiny_model("llama", vocab_size=V)
    kwargs = (
        {"draft_model": tiny_model("llama", vocab_size=V, seed=3)} if drafter != "lookup" else {}
    )
    tok = word_tokenizer(V, eos=0)
    first = batch_generate(model, tok, PROMPTS, max_tokens=10, return_token_ids=True,
                           return_prompt_caches=True, num_draft_tokens=3, **kwargs)  # fmt: skip
    # each row's tokens (its EOS too, which the text leaves out)
    gens = [ids + [0] * (r == "stop") for ids, r in zip(first.token_ids, first.finish_reasons)]
    assert "stop" in first.finish_reasons and "length" in first.finish_reasons
    for p, gen, cache in zip(PROMPTS, gens, first.caches):
        assert gen == alone(model, [p], [10])[0][: len(gen)]
        assert {c.offset for c in cache} == {len(p) + len(gen) - 1}
    turns = [[gen[-1], 9, 10] for gen in gens]
    held = [[c.offset for c in cache] for cache in first.caches]
    second = batch_generate(model, tok, turns, max_tokens=12, prompt_caches=first.caches,
                            return_token_ids=True, num_draft_tokens=3, **kwargs)  # fmt: skip
    assert [[c.offset for c in cache] for cache in first.caches] == held
    whole = [p + gen[:-1] + t for p, gen, t in zip(PROMPTS, gens, turns)]
    for w, ids in zip(whole, second.token_ids):
        assert ids == alone(model, [w], [12])[0][: len(ids)]
    cold = batch_generate(model, tok, turns, max_tokens=12, return_token_ids=True, **kwargs)
    assert cold.token_ids != second.token_ids


def test_a_draft_model_with_lookup_merged_in():
    """``draft="ngram"`` with a draft model: each row drafts its lookup chain where its
    tokens have a match, else the draft model's chain. On prompts that repeat, fewer
    passes than the draft model alone, every row equal to plain decoding; the draft
    caches hold only the rows' own tokens (a lookup draft's pass drops the chain the
    draft model was fed). Control: keeping that chain leaves other tokens' keys there."""
    model = tiny_model("llama", vocab_size=V)
    draft_model = tiny_model("llama", vocab_size=V, seed=3)  # (its chains mostly rejected)
    repeat = [p * 3 for p in PROMPTS]
    merged, merged_passes = decode(model, repeat, draft_model=draft_model, draft="ngram",
                                   num_draft_tokens=3)  # fmt: skip
    chained, chained_passes = decode(model, repeat, draft_model=draft_model, num_draft_tokens=3)
    assert merged == chained == alone(model, repeat) and merged_passes < chained_passes
    _, gap = draft_cache_errors(model, draft_model, prompts=repeat, draft="draft_model+ngram")
    assert gap < 1e-5
    settle = batch.SpecBatcher._settle_drafts

    def keeping_the_chain(self, rows):
        for r in rows:
            r.draft_cache_end = None
        settle(self, rows)

    with pytest.MonkeyPatch().context() as mp:
        mp.setattr(batch.SpecBatcher, "_settle_drafts", keeping_the_chain)
        _, gap = draft_cache_errors(model, draft_model, prompts=repeat, draft="draft_model+ngram")
    assert gap > 1e-3


def test_rows_joining_together_are_prefilled_together(monkeypatch):
    """Rows that join at one pass are prefilled together, ``prefill_step_size`` tokens
    a pass shared among them (each padded to the longest), not one row at a time, with
    a row that brings a cache holding part of its prompt; every row equals its prompt
    alone."""
    model = tiny_model("llama", vocab_size=V)
    batch.unbatchable(model)  # (the probe's passes, before counting)
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    batcher = batch.SpecBatcher(model, prefill_step_size=12)  # (3 tokens a row a pass)
    part = make_prompt_cache_with(model, prompts[3][:2])
    uids = [batcher.insert(p, max_tokens=12, num_draft_tokens=2) for p in prompts[:3]]
    uids.append(batcher.insert(prompts[3], part, max_tokens=12, num_draft_tokens=2))
    calls = []
    real_call = type(model).__call__
    monkeypatch.setattr(type(model), "__call__",
                        lambda self, x, *a, **k: calls.append(x.shape) or real_call(self, x, *a, **k))  # fmt: skip
    got = {u: [] for u in uids}
    for r in batcher.step():
        got[r.uid] += r.tokens
    # 8 tokens to prefill for the longest row, 3 a pass: 3 passes of 4 rows, then the pass
    assert calls[:3] == [(4, 3), (4, 3), (4, 2)] and len(calls) == 4
    while len(batcher):
        for r in batcher.step():
            got[r.uid] += r.tokens
    assert [got[u] for u in uids] == alone(model, prompts, [12] * 4)
    # At most two rows a pass (mlx-lm's prefill_batch_size; the server's --prompt-concurrency)
    batcher = batch.SpecBatcher(model, prefill_step_size=6, prefill_batch_size=2)
    for p in prompts[:3]:
        batcher.insert(p, max_tokens=12, num_draft_tokens=2)
    calls.clear()
    batcher.step()
    assert calls == [(2, 3), (2, 3), (2, 2), (3, 3)]  # (the third row has nothing to prefill)


def test_negative_control_a_prefill_that_keeps_its_padding(monkeypatch):
    """Rows advanced over the padding of the prefill pass see tokens that are not theirs."""
    model = tiny_model("llama", vocab_size=V)
    advance, real = RaggedKVCache.advance, batch.SpecBatcher._joined

    def padded(self, model, cache, rows, caches):
        monkeypatch.setattr(RaggedKVCache, "advance",
                            lambda self, kept: advance(self, [max(kept)] * len(kept)))  # fmt: skip
        try:
            return real(self, model, cache, rows, caches)
        finally:
            monkeypatch.setattr(RaggedKVCache, "advance", advance)

    monkeypatch.setattr(batch.SpecBatcher, "_joined", padded)
    monkeypatch.setattr(batch, "ragged_fault", lambda m: None)  # (the probe would catch it)
    assert decode(model, num_draft_tokens=4)[0] != alone(model)


def run_rows(model, draft_model, draft, pipeline, replaced_ignored=False):
    """Per row of a SpecBatcher drafting with ``draft_model`` (two rows joining after
    the third pass): tokens, log-probabilities, finish reason, passes, and its caches'
    keys (the model's layers, then the draft model's) when it finished."""
    batcher = batch.SpecBatcher(model, stop_tokens=[15], draft_model=draft_model,
                                pipeline=pipeline, keep_caches=True)  # fmt: skip
    rows = [([3, 4, 5, 3, 4, 5, 3], 40), ([7, 8, 9, 7, 8, 9, 7, 8], 30), ([2, 6, 2, 6], 36),
            ([1, 2, 1, 2, 1], 25)]  # fmt: skip
    got, flights = {}, 0

    def insert(p, n):
        uid = batcher.insert(p, max_tokens=n, num_draft_tokens=3, draft=draft)
        got[uid] = dict(tokens=[], logprobs=[], passes=0, joined=len(got) >= len(rows))

    for p, n in rows:
        insert(p, n)
    step = 0
    while len(batcher):
        for r in batcher.step():
            g = got[r.uid]
            g["tokens"] += r.tokens
            g["logprobs"] += [round(x, 4) for x in r.logprobs]
            g["passes"] += 1
            g["finish"] = r.finish_reason
            if r.cache is not None:
                g["cache"] = [np.array(c.keys[..., : c.offset, :]) for c in r.cache]
        flights += batcher._flight is not None
        step += 1
        if step == 3:
            insert([5, 6, 7, 5, 6], 28)
            insert([9], 11)
    return got, flights


@pytest.mark.parametrize("draft", ["draft_model", "draft_model+ngram"])
@pytest.mark.parametrize("which", ["copy", "other"])
def test_pipelined_draft_model_rows_equal_unpipelined(draft, which):
    """A draft model's rows in pipelined passes: each row's draft cache settled and fed
    on the device, its chain drafted there (and its lookup, where it matches):
    tokens, log-probabilities, finish reasons and returned caches (both models'
    layers) equal the unpipelined loop's, and so do the passes of every row but those
    that joined mid-flight (they feed their pending token alone in their first pass,
    so their passes fall otherwise); with a copy of the model drafting, most drafts
    are accepted."""
    model = tiny_model("llama", vocab_size=V)
    draft_model = (
        model
        if which == "copy"
        else tiny_model("llama", vocab_size=V, seed=2, hidden_size=32, intermediate_size=64)
    )
    want, none = run_rows(model, draft_model, draft, pipeline=False)
    got, flights = run_rows(model, draft_model, draft, pipeline=True)
    assert none == 0 and flights >= 5
    for uid, w in want.items():
        g = got[uid]
        for key in ("tokens", "logprobs", "finish"):
            assert g[key] == w[key], (uid, key)
        if not w["joined"]:
            assert g["passes"] == w["passes"], uid
        assert len(g["cache"]) == len(w["cache"])
        for a, b in zip(g["cache"], w["cache"]):
            np.testing.assert_array_equal(a, b)
    if which == "copy":
        assert sum(len(g["tokens"]) - g["passes"] for g in got.values()) > 40


def test_negative_control_pipelined_drafts_that_keep_a_replaced_chain(monkeypatch):
    """Draft caches that keep the draft model's chain where a row's lookup replaced it
    (on the host and on the device alike) hold keys of tokens that are not the row's:
    the output stays plain decoding's, but the caches returned differ from the
    unpipelined loop's (the equality test above) and from the draft model's own."""
    model = tiny_model("llama", vocab_size=V)
    draft_model = tiny_model("llama", vocab_size=V, seed=3)
    right = run_rows(model, draft_model, "draft_model+ngram", pipeline=True)[0]
    launch = batch.SpecBatcher._launch

    def forgetful(self, fed):
        inputs, drafts, replaced = fed
        return launch(self, (inputs, drafts, mx.zeros_like(replaced)))

    monkeypatch.setattr(batch.SpecBatcher, "_launch", forgetful)
    real_read = batch.SpecBatcher._settle_model_drafts

    def read(self, p, accepted, before, joined):
        p.fed_replaced = mx.zeros_like(p.fed_replaced)
        return real_read(self, p, accepted, before, joined)

    monkeypatch.setattr(batch.SpecBatcher, "_settle_model_drafts", read)
    wrong = run_rows(model, draft_model, "draft_model+ngram", pipeline=True)[0]
    assert [g["tokens"] for g in wrong.values()] == [g["tokens"] for g in right.values()]
    assert any(
        not np.array_equal(a, b)
        for g, r in zip(wrong.values(), right.values())
        for a, b in zip(g["cache"], r["cache"])
    )
    _, gap = draft_cache_errors(model, draft_model, draft="draft_model+ngram", pipeline=True)
    assert gap > 1e-3


def joining_a_batch_that_did_not_draft():
    """Two rows that do not draft, then (at the fifth pass) one that does, with a copy
    of the model drafting 3 tokens: every row's tokens, the drafting row's passes, and
    which passes were in flight."""
    model = tiny_model("llama", vocab_size=V)
    batcher = batch.SpecBatcher(model, draft_model=model, pipeline=True)
    uids = [batcher.insert(p, max_tokens=20, num_draft_tokens=0) for p in PROMPTS[:2]]
    got, passes, flights = {u: [] for u in uids}, 0, []
    while len(batcher) or len(flights) < 5:
        if len(flights) == 4:
            uids.append(batcher.insert(PROMPTS[3], max_tokens=20, num_draft_tokens=3))
            got[uids[-1]] = []
        for r in batcher.step():
            got[r.uid] += r.tokens
            passes += r.uid == uids[-1] and len(uids) == 3
        flights.append(batcher._flight is not None)
    return model, [got[u] for u in uids], passes, flights


def test_pipelined_draft_model_rows_joining_a_batch_that_did_not_draft():
    """Rows that do not draft (``num_draft_tokens=0``: the draft model is not fed for
    them) pass unpipelined; a drafting row that joins starts the pipelined passes with
    every draft cache brought up to date, so that every draft of the copy is accepted:
    20 tokens in 5 passes of 4; every row equals its prompt alone."""
    model, tokens, passes, flights = joining_a_batch_that_did_not_draft()
    assert not any(flights[:4]) and any(flights[5:])
    assert tokens == alone(model, PROMPTS[:2] + PROMPTS[3:], [20] * 3)
    assert passes == 5


def test_negative_control_pipelined_while_no_row_drafts(monkeypatch):
    """Passes pipelined while no row drafts leave the draft caches behind the rows: the
    joining row's first drafts come from a stale cache (the output stays right)."""
    monkeypatch.setattr(batch.SpecBatcher, "_pipelines", lambda self: self.pipeline)
    model, tokens, passes, flights = joining_a_batch_that_did_not_draft()
    assert all(flights[:4]) and tokens == alone(model, PROMPTS[:2] + PROMPTS[3:], [20] * 3)
    assert passes > 5

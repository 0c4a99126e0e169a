"""Prompt-lookup drafting: the pure pieces, and lossless decoding with n-gram
drafts alone (any model) or merged with the streams' tree, greedy and sampled."""

import doctest
import itertools
import random

import mlx.core as mx
import numpy as np
import pytest
from helpers import plain_greedy, spec_tokens, tiny_model, tiny_spec_model

import mlx_specstream.decode as decode
import mlx_specstream.ngram as ngram
from mlx_specstream.ngram import NgramIndex, ngram_draft
from mlx_specstream.sample_utils import make_sampler
from mlx_specstream.tree import merge_chains, static_tree

# Repeats inside the prompt give the first step a draft already.
PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]


@pytest.mark.parametrize(
    "history, kwargs, want",
    [
        ([1, 2, 3, 1, 2], {}, [3, 1, 2]),  # bigram "1 2" seen at 0
        ([1, 2, 3, 9, 2], {}, [3, 9, 2]),  # only the unigram "2" matches
        ([1, 2, 3, 9, 2], dict(min_ngram=2), []),  # ... which min_ngram excludes
        ([4, 1, 2, 5, 1, 2, 6, 1, 2], dict(max_tokens=2), [6, 1]),  # the latest match
        ([7, 7, 7], dict(max_tokens=4), [7]),  # overlapping: "7 7" at 0, then one token
        ([5], {}, []),
        ([], {}, []),
    ],
)
def test_ngram_draft(history, kwargs, want):
    assert ngram_draft(history, **kwargs) == want


def test_ngram_doc_examples():
    result = doctest.testmod(ngram)
    assert result.failed == 0 and result.attempted > 0, result


def index_mismatches(index_type, trials=400):
    """Histories (grown in random chunks) on which ``index_type``'s drafts differ
    from :func:`ngram_draft`'s, over random vocabularies and n-gram ranges."""
    rng, bad = random.Random(0), 0
    for _ in range(trials):
        vocab, (lo, hi) = rng.randint(2, 6), sorted(rng.sample(range(1, 5), 2))
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        cut = rng.randint(0, len(tokens))
        index = index_type(tokens[:cut], max_ngram=hi, min_ngram=lo)
        for i in range(cut, len(tokens) + 1):
            k = rng.randint(1, 6)
            bad += index.draft(k) != ngram_draft(tokens[:i], k, max_ngram=hi, min_ngram=lo)
            if i < len(tokens):
                index.extend(tokens[i : i + 1])
    return bad


def test_ngram_index_equals_rescanning_lookup():
    assert index_mismatches(NgramIndex) == 0


class EarliestMatchIndex(NgramIndex):
    """Negative control: keeps the first occurrence of each n-gram, not the latest."""

    def extend(self, tokens):
        for t in tokens:
            i = len(self.tokens)
            for n in range(self.min_ngram, min(self.max_ngram, i) + 1):
                self._next[n].setdefault(tuple(self.tokens[i - n : i]), [i])
            self.tokens.append(int(t))


def test_negative_control_earliest_match_index_differs():
    assert index_mismatches(EarliestMatchIndex) > 0


def ngram_drafts(history, max_tokens, candidates, max_ngram, min_ngram):
    """The definition of :meth:`NgramIndex.drafts`, by rescanning: for each suffix
    length, longest first, the tokens after its latest ``4 * candidates``
    occurrences (``1`` for one candidate), latest first, distinct, at most
    ``candidates``."""
    keep = 4 * candidates if candidates > 1 else 1
    out = []
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        suffix = history[len(history) - n :]
        starts = [i + n for i in range(len(history) - n) if history[i : i + n] == suffix]
        for start in reversed(starts[-keep:]):
            chain = history[start : start + max_tokens]
            if chain not in out:
                out.append(chain)
            if len(out) == candidates:
                return out
    return out


def drafts_mismatches(index_type, trials=300):
    """As :func:`index_mismatches`, for several drafts per lookup."""
    rng, bad = random.Random(2), 0
    for _ in range(trials):
        vocab, (lo, hi) = rng.randint(2, 6), sorted(rng.sample(range(1, 5), 2))
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 60))]
        cut, m = rng.randint(0, len(tokens)), rng.randint(1, 4)
        index = index_type(tokens[:cut], max_ngram=hi, min_ngram=lo, candidates=m)
        for i in range(cut, len(tokens) + 1):
            k = rng.randint(1, 6)
            bad += index.drafts(k) != ngram_drafts(tokens[:i], k, m, hi, lo)
            if i < len(tokens):
                index.extend(tokens[i : i + 1])
    return bad


def test_ngram_index_drafts_equal_rescanning_lookup():
    """Several drafts per lookup; the first is always :meth:`NgramIndex.draft`'s."""
    assert drafts_mismatches(NgramIndex) == 0
    index = NgramIndex([1, 2, 3, 1, 2, 4, 2, 5, 1, 2], candidates=3)
    assert index.drafts(2) == [[4, 2], [3, 1], [5, 1]]  # "1 2" twice, then "2"
    assert index.drafts(2)[0] == index.draft(2)


class LongestSuffixOnlyIndex(NgramIndex):
    """Negative control: drafts after the longest matching suffix only."""

    def drafts(self, max_tokens=10):
        out = super().drafts(max_tokens)
        h = self.tokens
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            if self._next[n].get(tuple(h[len(h) - n :])):
                starts = self._next[n][tuple(h[len(h) - n :])]
                return [c for c in out if any(h[s : s + max_tokens] == c for s in starts)]
        return out


def test_negative_control_longest_suffix_only_differs():
    assert drafts_mismatches(LongestSuffixOnlyIndex) > 0


def device_mismatches(lookup, trials=400):
    """Histories, in buffers with random room after them, on which ``lookup``'s
    first ``count`` tokens differ from :func:`ngram_draft`'s."""
    rng, bad = random.Random(1), 0
    for _ in range(trials):
        vocab, (lo, hi) = rng.randint(2, 6), sorted(rng.sample(range(1, 5), 2))
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        room = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        k = rng.randint(1, 8)
        draft, count = lookup(mx.array(tokens + room), mx.array(len(tokens)), k, hi, lo)
        assert draft.shape == (k,)
        bad += draft.tolist()[: count.item()] != ngram_draft(tokens, k, max_ngram=hi, min_ngram=lo)
    return bad


def test_device_lookup_equals_rescanning_lookup():
    assert device_mismatches(ngram.device_lookup) == 0


def test_negative_control_device_lookup_one_token_too_long_differs():
    """A lookup that reads one token past the history's end must be caught."""

    def one_too_many(history, length, k, hi, lo):
        return ngram.device_lookup(history, length + 1, k, hi, lo)

    assert device_mismatches(one_too_many) > 0


def test_static_tree_golden():
    # Rank r scores log .6 + r log .3 per level: the 7 best of the 39 non-root
    # nodes are 0, 00, 000, 1, then 01 and 10 (-2.23), then 001 (-2.74, the
    # earliest of three ties); rank 2 (-2.92) misses the cap.
    t = static_tree([3, 3, 3], 3, 8)
    assert t.parents == (-1, 0, 1, 2, 2, 1, 0, 6)
    assert t.levels == (-1, 0, 1, 2, 2, 1, 0, 1)
    assert t.ranks == (-1, 0, 0, 0, 1, 1, 1, 0)
    chain = static_tree([1, 1, 1], 3, 16)
    assert chain.parents == (-1, 0, 1, 2) and chain.ranks == (-1, 0, 0, 0)


def test_merge_chains_golden():
    # tree: 7 -> {1 -> {3, 4}, 2}; chain 1 4 9 shares 1 and 4
    t = merge_chains([7, 1, 3, 4, 2], [-1, 0, 1, 1, 0], [[1, 4, 9]], 16)
    assert (t.tokens, t.parents) == ([7, 1, 4, 9, 3, 2], [-1, 0, 1, 2, 1, 0])
    t = merge_chains([7, 1, 3], [-1, 0, 1], [[5, 6]], 3)  # the chain fills the cap
    assert (t.tokens, t.parents) == ([7, 5, 6], [-1, 0, 1])
    # two chains, then the tree: 2-3 branches off 1-2? no: from the root; 1-4 shares 1
    t = merge_chains([7, 1, 3, 4, 2], [-1, 0, 1, 1, 0], [[2, 3], [1, 4, 9]], 16)
    assert (t.tokens, t.parents) == ([7, 2, 3, 1, 4, 9, 3], [-1, 0, 1, 0, 3, 4, 3])
    t = merge_chains([7], [-1], [[2, 3], [1, 4, 9]], 5)  # the second chain is cut
    assert (t.tokens, t.parents) == ([7, 2, 3, 1, 4], [-1, 0, 1, 0, 3])


def path_of(t, chain):
    """How many of ``chain``'s tokens are a path from the root of tree ``t``."""
    node, n = 0, 0
    for token in chain:
        kids = [i for i, p in enumerate(t.parents) if p == node and t.tokens[i] == token]
        if not kids:
            break
        node, n = kids[0], n + 1
    return n


def test_merge_chains_properties():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        parents = [-1] + [rng.randrange(i) for i in range(1, n)]
        # distinct sibling tokens, as drafts have
        tokens, used = [rng.randrange(4)], {}
        for i in range(1, n):
            free = [t for t in range(20) if t not in used.setdefault(parents[i], set())]
            tokens.append(rng.choice(free))
            used[parents[i]].add(tokens[-1])
        chains = [[rng.randrange(20) for _ in range(rng.randint(0, 6))] for _ in range(3)]
        chain = chains[0]
        cap = rng.randint(1, 16)
        t = merge_chains(tokens, parents, chains, cap)
        assert len(t.tokens) <= max(cap, 1) and t.parents[0] == -1
        assert all(0 <= p < i for i, p in enumerate(t.parents) if i)
        kids = {}
        for i, p in enumerate(t.parents[1:], 1):
            assert t.tokens[i] not in kids.setdefault(p, set()), "siblings must differ"
            kids[p].add(t.tokens[i])
        # the chain's first min(len, cap - 1) tokens are the path 0, 1, 2, ...
        m = min(len(chain), cap - 1)
        assert t.tokens[1 : m + 1] == chain[:m]
        assert t.parents[1 : m + 1] == list(range(m))
        # every chain is a path from the root as far as it fit: the whole of it
        # unless the cap was reached
        for c in chains:
            assert path_of(t, c) == len(c) or len(t.tokens) == cap


# ---- lossless decoding ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma2"])
def test_ngram_on_a_model_without_streams_equals_plain(arch):
    """draft='ngram' needs nothing of the model: a plain mlx-lm model decodes
    exactly as mlx-lm's greedy, and drafts are accepted."""
    model = tiny_model(arch, vocab_size=8)
    want = plain_greedy(model, PROMPT, 48)
    got, records = spec_tokens(model, PROMPT, 48, draft="ngram", num_draft_tokens=6)
    assert got == want
    assert sum(r[2] for r in records) > 5, "no n-gram draft accepted: the test has no power"
    assert records[-1][3] < len(got)


@pytest.mark.parametrize("stream_pass", ["fused", "split"])
@pytest.mark.parametrize("arch", ["llama", "starcoder2"])
def test_streams_plus_ngram_equals_plain(arch, stream_pass):
    model = tiny_spec_model(arch, vocab_size=8, num_streams=3, top_k=2, stream_pass=stream_pass)
    want = plain_greedy(model, PROMPT, 48)
    got, records = spec_tokens(model, PROMPT, 48, draft="streams+ngram", max_tree_nodes=10)
    assert got == want
    assert sum(r[2] for r in records) > 5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma2"])
def test_several_lookup_drafts_equal_plain_in_fewer_passes(arch):
    """``ngram_candidates=3``: the latest three distinct continuations, merged into
    one tree, decode exactly as mlx-lm's greedy in fewer passes than the latest one
    alone (a random model's text repeats with variations)."""
    model = tiny_model(arch, vocab_size=8)
    want = plain_greedy(model, PROMPT, 64)
    one = spec_tokens(model, PROMPT, 64, draft="ngram", num_draft_tokens=6)
    three = spec_tokens(model, PROMPT, 64, draft="ngram", num_draft_tokens=6, ngram_candidates=3)
    assert one[0] == three[0] == want
    assert three[1][-1][3] < one[1][-1][3]


def test_several_lookup_drafts_merge_with_streams_and_a_draft_model():
    """Several lookup drafts merged into a stream tree, and into a draft model's:
    output equal to plain decoding."""
    model = tiny_spec_model("llama", vocab_size=8, num_streams=3, top_k=2)
    want = plain_greedy(model, PROMPT, 48)
    got, records = spec_tokens(
        model, PROMPT, 48, draft="streams+ngram", max_tree_nodes=12, ngram_candidates=3
    )
    assert got == want and sum(r[2] for r in records) > 5
    plain, drafter = tiny_model("llama", vocab_size=8), tiny_model("llama", vocab_size=8, seed=5)
    got, _ = spec_tokens(
        plain, PROMPT, 48, draft="ngram", draft_model=drafter, num_draft_tokens=2,
        ngram_candidates=3,
    )  # fmt: skip
    assert got == plain_greedy(plain, PROMPT, 48)


def test_ngram_candidates_errors():
    """Named errors: not an integer >= 1, without prompt lookup, pipelined, on a model
    with recurrent layers whose layers take no tree (Baichuan-M1), and with a draft
    model on recurrent layers (chains only)."""
    from helpers import tiny_hybrid

    model = tiny_spec_model("llama", vocab_size=8, num_streams=2, top_k=2)
    with pytest.raises(ValueError, match="ngram_candidates=0 must be an integer >= 1"):
        spec_tokens(model, PROMPT, 4, draft="ngram", ngram_candidates=0)
    with pytest.raises(ValueError, match="ngram_candidates=2 is for prompt lookup"):
        spec_tokens(model, PROMPT, 4, ngram_candidates=2)
    with pytest.raises(ValueError, match="pipeline=True: several prompt-lookup drafts"):
        spec_tokens(model, PROMPT, 4, draft="ngram", ngram_candidates=2, pipeline=True)
    with pytest.raises(ValueError, match="no tree of drafts here: layer 0 keeps a recurrent"):
        hybrid = tiny_hybrid("baichuan_m1", vocab_size=8)
        spec_tokens(hybrid, PROMPT, 4, draft="ngram", ngram_candidates=2)
    with pytest.raises(ValueError, match="drafts are verified as one chain .recurrent layers"):
        hybrid, small = tiny_hybrid(vocab_size=8), tiny_hybrid(vocab_size=8, seed=1)
        spec_tokens(hybrid, PROMPT, 4, draft="ngram", draft_model=small, ngram_candidates=2)


def test_ngram_with_a_drafter_model_and_shared_mode():
    """Prompt lookup alone and merged into the heads' tree on a Medusa model, and
    streams + n-gram in shared mode."""
    from mlx_specstream import DrafterConfig, attach_drafter

    model = tiny_model("qwen2", vocab_size=8)
    attach_drafter(model, DrafterConfig(kind="medusa", num_draft_tokens=2))
    want = plain_greedy(model, PROMPT, 40)
    assert spec_tokens(model, PROMPT, 40, draft="ngram")[0] == want
    assert spec_tokens(model, PROMPT, 40, draft="streams+ngram")[0] == want
    shared = tiny_spec_model("llama", vocab_size=8, mode="shared", num_streams=2, top_k=2)
    want = spec_tokens(shared, PROMPT, 40, speculative=False)[0]
    assert spec_tokens(shared, PROMPT, 40, draft="streams+ngram")[0] == want


def test_rejection_asked_with_lookup_drafts_says_it_verifies_by_target_sampling():
    """A lookup chain is no draw from a distribution: an explicit ``"rejection"`` gets
    a warning that names ``"target-sample"``; the default chooses it silently."""
    import warnings

    from mlx_specstream.sample_utils import make_sampler

    model, sampler = tiny_model("llama", vocab_size=8), make_sampler(temp=0.7)
    with pytest.warns(UserWarning, match="verified by acceptance='target-sample'"):
        spec_tokens(model, PROMPT, 4, draft="ngram", sampler=sampler, acceptance="rejection")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec_tokens(model, PROMPT, 4, draft="ngram", sampler=sampler)


def lenient_accept(tokens, parents, ancestors, targets, depth):
    """A verifier that accepts the root's first child unchecked."""
    first = tokens[1] if tokens.shape[0] > 1 else targets[0]
    targets = mx.where(mx.arange(targets.shape[0]) == 0, first, targets)
    return real_accept(tokens, parents, ancestors, targets, depth)


real_accept = decode._accept


def test_negative_control_unchecked_ngram_draft(monkeypatch):
    monkeypatch.setattr(decode, "_accept", lenient_accept)
    model = tiny_model("llama", vocab_size=8)
    got, _ = spec_tokens(model, PROMPT, 48, draft="ngram")
    assert got != plain_greedy(model, PROMPT, 48)


def test_bad_draft_values():
    model = tiny_model("llama", vocab_size=8)
    with pytest.raises(ValueError, match="draft='bigram'"):
        spec_tokens(model, PROMPT, 4, draft="bigram")
    with pytest.raises(ValueError, match="num_draft_tokens=0"):
        spec_tokens(model, PROMPT, 4, draft="ngram", num_draft_tokens=0)


# ---- sampling keeps the distribution ---------------------------------------------

V, N_TOKENS, SAMPLE_PROMPT, N_SAMPLES = 6, 3, [1, 4, 2, 5, 1, 4], 2500
CONTROL_SAMPLES = 600  # (the lenient verifier's bias is gross: p = 0 in float64 at 2500)


@pytest.fixture(scope="module")
def small():
    return tiny_spec_model(
        "llama", vocab_size=V, num_streams=2, num_stream_layers=1, top_k=2, weight_scale=1.0,
        model_args=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2),
    )  # fmt: skip


def exact_distribution(model, sampler):
    seqs = list(itertools.product(range(V), repeat=N_TOKENS))
    ids = mx.array([SAMPLE_PROMPT + list(s[:-1]) for s in seqs])
    logits = model(ids)[:, len(SAMPLE_PROMPT) - 1 :].astype(mx.float32)
    probs = np.array(sampler.probs(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    return {
        s: float(np.prod([probs[i, t, tok] for t, tok in enumerate(s)])) for i, s in enumerate(seqs)
    }


def ngram_pvalue(model, sampler, n=N_SAMPLES, **kwargs):
    from chi_square import chi_square_pvalue

    counts, drafted = {}, 0
    for i in range(n):
        mx.random.seed(i)
        out = list(
            decode.spec_generate_step(
                mx.array(SAMPLE_PROMPT), model, max_tokens=N_TOKENS, sampler=sampler, **kwargs
            )
        )
        counts[tuple(o[0] for o in out)] = counts.get(tuple(o[0] for o in out), 0) + 1
        drafted += sum(o[2] for o in out)
    assert drafted > n // 10, "drafts were rarely accepted: the test has no power"
    return chi_square_pvalue(counts, exact_distribution(model, sampler), n)


@pytest.mark.parametrize(
    "draft, temp, pipeline, candidates",
    [("ngram", 1.0, False, 1), ("streams+ngram", 0.7, False, 1), ("ngram", 0.7, True, 1),
     ("ngram", 1.0, False, 3)],
    ids=["ngram-T1", "both-T0.7", "ngram-T0.7-pipelined", "ngram-3-candidates-T1"],
)  # fmt: skip
def test_ngram_sampling_matches_plain_distribution(small, draft, temp, pipeline, candidates):
    p = ngram_pvalue(
        small, make_sampler(temp=temp), draft=draft, pipeline=pipeline, ngram_candidates=candidates
    )
    assert p > 1e-3, f"chi-square p = {p:.2e}"


@pytest.fixture(scope="module")
def small_with_heads():
    """``small``'s shape with Medusa heads at zero (each drafts the model's own next
    token, often right on this low-weight model) instead of streams."""
    from mlx.utils import tree_map

    from mlx_specstream import DrafterConfig, attach_drafter

    model = tiny_model("llama", vocab_size=V, weight_scale=1.0, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2)  # fmt: skip
    drafter = attach_drafter(model, DrafterConfig(kind="medusa", num_draft_tokens=2, top_k=2))
    drafter.update(tree_map(mx.zeros_like, drafter.parameters()))
    return model


def test_lookup_merged_into_a_drafter_s_tree_keeps_the_distribution(small_with_heads,
                                                                   monkeypatch):  # fmt: skip
    """Sampling (T = 0.7) with prompt lookup merged into Medusa heads' tree keeps the
    model's distribution (verified by target sampling); control: a verifier that accepts
    the first child unchecked does not."""
    p = ngram_pvalue(small_with_heads, make_sampler(temp=0.7), draft="streams+ngram")
    assert p > 1e-3, f"chi-square p = {p:.2e}"
    monkeypatch.setattr(decode, "_accept", lenient_accept)
    p = ngram_pvalue(small_with_heads, make_sampler(temp=0.7), CONTROL_SAMPLES,
                     draft="streams+ngram")  # fmt: skip
    assert p < 1e-6, f"the lenient verifier passed (p = {p:.2e}): the test has no power"


def test_negative_control_unchecked_ngram_draft_is_rejected(small, monkeypatch):
    monkeypatch.setattr(decode, "_accept", lenient_accept)
    p = ngram_pvalue(small, make_sampler(temp=1.0), CONTROL_SAMPLES, draft="ngram")
    assert p < 1e-6, f"the lenient verifier passed (p = {p:.2e}): the test has no power"

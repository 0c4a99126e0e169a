"""Dynamic trees grown by a draft model (``draft_model=`` with ``dynamic_tree=True``,
EAGLE-2's trees from an mlx-lm draft model): each node's children are the draft
model's own top-k after that node's path, its cache holds the context alone between
steps, and greedy output equals plain decoding; drawn trees keep the distribution
when sampling."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import plain_greedy, spec_tokens, tiny_model
from mlx_lm.models.cache import make_prompt_cache
from test_draft_model import PROMPT, noisy_copy
from test_dynamic_tree import assert_grown_children, log_softmax

import mlx_specstream.decode as decode
import mlx_specstream.dynamic_tree as dynamic_tree
from mlx_specstream.draft_model import DraftModel
from mlx_specstream.streams import StreamRuntime

TREE = dict(num_draft_tokens=3, tree_top_k=3, max_tree_nodes=8, dynamic_tree=True)


def recorded_trees(base, draft, monkeypatch, prompt, max_tokens=24, **tree):
    """The greedy text and, for each grown tree, its candidates (tokens, parents,
    scores) and the tokens the draft model's cache held when it grew it."""
    seen, real = [], DraftModel._grow

    def recording(self, new, vocab_size, k, depth, drawn):
        cands = real(self, new, vocab_size, k, depth, drawn)
        assert self.cache[0].offset == self.fed  # (the tree's rows trimmed)
        seen.append(([np.array(c) for c in cands], self.fed))
        return cands

    monkeypatch.setattr(DraftModel, "_grow", recording)
    toks, out = spec_tokens(base, prompt, max_tokens, draft_model=draft, **tree)
    monkeypatch.undo()
    return prompt + toks, seen, out


def assert_children_are_the_draft_model_s(draft, text, seen, k):
    """Every expanded candidate's children are the draft model's top-``k`` after the
    context and that candidate's path (a plain mlx-lm pass, no cache), scored by the
    path's log-probabilities. Returns how many nodes were checked."""
    checked = 0
    for (tokens, parents, scores), fed in seen:

        def after(path):
            logits = draft(mx.array([text[:fed] + path]))[0, -1].astype(mx.float32)
            return log_softmax(np.array(logits))

        checked += assert_grown_children(tokens, parents, scores, k, after)
    return checked


def test_each_node_s_children_are_the_draft_model_s_top_k_after_its_path(monkeypatch):
    """At every step (the first tree, after the prompt, too) each expanded node's
    children and scores equal the draft model's own top-k recomputed by a plain pass
    over the context and the node's path; the draft cache holds the context alone
    after each tree. Controls: every level's rows one position later; every tree row
    seeing every other."""
    base, draft = tiny_model("llama"), tiny_model("llama", seed=5)
    text, seen, _ = recorded_trees(base, draft, monkeypatch, PROMPT, **TREE)
    assert text == PROMPT + plain_greedy(base, PROMPT, 24)
    assert seen[0][1] == len(PROMPT)  # (the first tree: grown after the prompt)
    full = [s for s in seen if len(s[0][0]) == 1 + 3 + 2 * 9]  # (not near max_tokens)
    assert len(full) >= 4
    assert assert_children_are_the_draft_model_s(draft, text, full[:4], 3) >= 4 * 7

    real = StreamRuntime.masked_pass
    monkeypatch.setattr(StreamRuntime, "masked_pass",
                        lambda self, t, pos, mask, cache, span:
                        real(self, t, pos + 1, mask, cache, span))  # fmt: skip
    text2, later, _ = recorded_trees(base, draft, monkeypatch, PROMPT, **TREE)
    with pytest.raises(AssertionError):
        assert_children_are_the_draft_model_s(draft, text2, later[:2], 3)

    real_expand = dynamic_tree.expand_mask
    monkeypatch.setattr(dynamic_tree, "expand_mask",
                        lambda r, p, k: mx.ones(real_expand(r, p, k).shape, dtype=mx.bool_))  # fmt: skip
    text3, wrong, _ = recorded_trees(base, draft, monkeypatch, PROMPT, **TREE)
    with pytest.raises(AssertionError):
        assert_children_are_the_draft_model_s(draft, text3, wrong[:2], 3)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "tree",
    [TREE, dict(num_draft_tokens=4, tree_top_k=2, max_tree_nodes=16, dynamic_tree=True)],
)
def test_greedy_equals_plain_decoding(arch, tree):
    """Token for token, with a poor draft model, a noisy copy of the base, and the
    base's own weights (then every tree's argmax path is right: each pass yields two
    tokens at least)."""
    base = tiny_model(arch)
    ref = plain_greedy(base, PROMPT, 40)
    for draft in (tiny_model(arch, seed=5), noisy_copy(arch)):
        toks, _ = spec_tokens(base, PROMPT, 40, draft_model=draft, **tree)
        assert toks == ref
    toks, out = spec_tokens(base, PROMPT, 40, draft_model=tiny_model(arch), **tree)
    assert toks == ref
    assert out[-1][3] <= 40 // 2  # (the argmax child, in every tree, always accepted)


def test_dynamic_trees_draft_more_per_pass_than_static_ones():
    """At the same node cap, a poor draft model's grown trees take fewer passes than
    its static ones (the static tree puts every level's candidates under the greedy
    chain only); the output is the same."""
    base = tiny_model("llama")
    passes = {}
    for dynamic in (False, True):
        toks, out = spec_tokens(base, PROMPT, 64, draft_model=noisy_copy(scale=0.05),
                                **{**TREE, "dynamic_tree": dynamic})  # fmt: skip
        assert toks == plain_greedy(base, PROMPT, 64)
        passes[dynamic] = out[-1][3]
    assert passes[True] < passes[False], passes


def test_prompt_lookup_merged_in_and_a_reused_prompt_cache():
    """``draft="ngram"`` merges the lookup chain into the grown tree; turn after turn
    on one prompt cache (the model's layers, then the draft model's), the answers
    equal mlx-lm's with its own cache, and both halves hold the same tokens."""
    from mlx_lm.generate import generate_step

    base, draft = tiny_model("llama", vocab_size=8), noisy_copy(scale=0.05, vocab_size=8)
    ours = make_prompt_cache(base) + make_prompt_cache(draft)
    theirs = make_prompt_cache(base)
    for prompt, n, kw in [([3, 1, 4, 1, 5], 20, {}), ([2, 6], 16, dict(draft="ngram")),
                          ([3, 1, 4], 12, dict(speculative=False)), ([1], 16, {})]:  # fmt: skip
        ref = [int(t) for t, _ in generate_step(mx.array(prompt), base, max_tokens=n,
                                                prompt_cache=theirs)]  # fmt: skip
        got, _ = spec_tokens(base, prompt, n, draft_model=draft, prompt_cache=ours, **TREE, **kw)
        assert got == ref, kw
        assert ours[0].offset == ours[-1].offset == theirs[0].offset


def test_kv_bits_equal_mlx_lm_s_greedy_with_the_same_options():
    from mlx_lm.generate import generate_step

    heads = dict(num_attention_heads=2, num_key_value_heads=1)  # head_dim 32: groups of 32
    base, draft = tiny_model("llama", **heads), noisy_copy(scale=0.05, **heads)
    kv = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=12)
    ref = [int(t) for t, _ in generate_step(mx.array(PROMPT), base, max_tokens=32, **kv)]
    toks, _ = spec_tokens(base, PROMPT, 32, draft_model=draft, **TREE, **kv)
    assert toks == ref


def test_negative_control_unchecked_drafts_break_equality(monkeypatch):
    real = decode._accept

    def accept_first_child(tokens, parents, ancestors, targets, depth):
        _, last = real(tokens, parents, ancestors, targets, depth)
        return None, mx.maximum(last, mx.array(1 if tokens.size > 1 else 0))

    base = tiny_model("llama")
    monkeypatch.setattr(decode, "_accept", accept_first_child)
    toks, _ = spec_tokens(base, PROMPT, 32, draft_model=tiny_model("llama", seed=5), **TREE)
    assert toks != plain_greedy(base, PROMPT, 32)


def test_trees_grow_only_where_asked_and_wider_than_a_chain(monkeypatch):
    """A draft model's trees are static unless ``dynamic_tree=True``; a chain
    (``tree_top_k`` 1) is drafted as levels either way."""
    base, draft = tiny_model("llama"), tiny_model("llama", seed=5)
    for tree, grows in [(TREE, True), ({**TREE, "dynamic_tree": None}, False),
                        ({**TREE, "dynamic_tree": False}, False),
                        ({**TREE, "tree_top_k": 1}, False)]:  # fmt: skip
        _, seen, _ = recorded_trees(base, draft, monkeypatch, PROMPT, 12, **tree)
        assert bool(seen) == grows, tree


def test_a_draft_model_with_sliding_windows_grows_trees_past_its_window():
    """Gemma 3's draft model (window 8, every other layer): exact past several windows,
    its window layers' caches dropping rows no window sees; a tree deeper than the
    window is refused, naming it."""
    base = tiny_model("gemma3_text")
    windowed = tiny_model("gemma3_text", seed=5)
    toks, _ = spec_tokens(base, PROMPT, 48, draft_model=windowed, **TREE)
    assert toks == plain_greedy(base, PROMPT, 48)
    toks, _ = spec_tokens(base, PROMPT, 48, draft_model=noisy_copy("gemma3_text"), **TREE)
    assert toks == plain_greedy(base, PROMPT, 48)
    deep = {**TREE, "num_draft_tokens": 10, "max_tree_nodes": 16}  # (9 levels past its root)
    toks, _ = spec_tokens(tiny_model("llama"), PROMPT, 24, draft_model=tiny_model("llama", seed=5),
                          **deep)  # fmt: skip
    assert toks == plain_greedy(tiny_model("llama"), PROMPT, 24)  # (no window: any depth)
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):  # (the draft model's)
        spec_tokens(tiny_model("llama"), PROMPT, 24, draft_model=windowed, **deep)


def test_draft_models_that_cannot_grow_trees_are_refused():
    """A draft model with attention chunks (Llama 4's) or sparse attention (DeepSeek
    V3.2's cache lists), or one carrying streams, is refused with the reason; mlx-lm's
    draft-model decoding without trees still takes the first."""
    from helpers import tiny_spec_model

    base = tiny_model("llama4")
    chunked = tiny_model("llama4", seed=5)
    with pytest.raises(ValueError, match="no attention chunks.*ChunkKVCache"):
        spec_tokens(base, PROMPT, 8, draft_model=chunked, **TREE)
    toks, _ = spec_tokens(base, PROMPT, 8, draft_model=chunked, num_draft_tokens=3)
    assert toks == plain_greedy(base, PROMPT, 8)
    sparse = tiny_model("deepseek_v32", seed=5)
    with pytest.raises(ValueError, match="sparse attention.*KVCacheList"):
        spec_tokens(tiny_model("deepseek_v32"), PROMPT, 8, draft_model=sparse, **TREE)
    streams = tiny_spec_model("llama", num_streams=2, num_stream_layers=1)
    with pytest.raises(ValueError, match="carries streams or a drafter"):
        spec_tokens(tiny_model("llama"), PROMPT, 8, draft_model=streams, **TREE)


def drawn_pair():
    """The sampling test's model and draft model (vocabulary of 6, 2 layers). The root-q
    control is only as strong as the draft model's distributions differ along a path:
    its layers at the default weight scale (4), and of seeds 1-9 seed 1's, give it p
    2.5e-13 at 800 draws (4e-7 to 0.01 for the others; 2e-3 to 0.9 at weight scale 1)."""
    kw = dict(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    return tiny_model("llama", weight_scale=1.0, **kw), tiny_model("llama", seed=1, **kw)


def drawn_pvalue(n):
    """Chi-square p-value of ``n`` generations (3 tokens) over drawn trees grown by the
    draft model, verified by recursive rejection sampling."""
    from chi_square import chi_square_pvalue
    from test_sampling import exact_distribution, sample_counts

    from mlx_specstream.sample_utils import make_sampler

    base, draft = drawn_pair()
    sampler = make_sampler(temp=1.0)
    tree = dict(num_draft_tokens=2, tree_top_k=2, max_tree_nodes=5, dynamic_tree=True)
    counts = sample_counts(base, sampler, n, acceptance="rejection", draft_model=draft, **tree)
    return chi_square_pvalue(counts, exact_distribution(base, sampler), n)


def test_sampling_over_drawn_trees_keeps_the_distribution(monkeypatch):
    """Each node's children drawn from the draft model's distribution after that
    node's path, each verified against it. Control: every node verified against the
    root's distribution instead of its own."""
    real_walk, walked = decode.accept_by_rejection, []

    def recording(tokens, parents, target, q, uniforms, rows=None):
        walked.append(rows)
        return real_walk(tokens, parents, target, q, uniforms, rows)

    monkeypatch.setattr(decode, "accept_by_rejection", recording)
    p = drawn_pvalue(1500)
    assert p > 1e-3, f"chi-square p = {p:.2e}"
    assert any(rows is not None and max(rows) > 1 for rows in walked)  # (several nodes' q)
    monkeypatch.setattr(decode, "accept_by_rejection",
                        lambda tokens, parents, target, q, uniforms, rows=None:
                        real_walk(tokens, parents, target, q, uniforms, [0] * len(tokens)))  # fmt: skip
    p = drawn_pvalue(800)
    assert p < 1e-6, f"another node's distribution passed (p = {p:.2e}): no power"


def test_the_generate_command_takes_the_flag(tmp_path, capsys, monkeypatch):
    """``--draft-model DIR --tree-top-k 3 --dynamic-tree``: trees grown, the text
    identical to plain decoding (the command's own ``--compare-plain`` check)."""
    from test_draft_model import write_model

    from mlx_specstream.generate import main

    grown, real = [], DraftModel._grow
    monkeypatch.setattr(DraftModel, "_grow", lambda self, *a: grown.append(1) or real(self, *a))
    base, draft = write_model(tmp_path / "base"), write_model(tmp_path / "draft", seed=5)
    main(["--model", str(base), "--draft-model", str(draft), "--prompt", "t4 t8 t15",
          "--max-tokens", "16", "--tree-top-k", "3", "--max-tree-nodes", "8", "--dynamic-tree",
          "--compare-plain", "--ignore-chat-template"])  # fmt: skip
    assert "Output identical to plain decoding: yes" in capsys.readouterr().out
    assert len(grown) >= 4

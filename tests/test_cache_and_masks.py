"""After every step each layer's KV cache holds exactly the committed tokens;
the multi-stream masks isolate what paper Eqs. 1-2 say they isolate."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_spec_model
from mlx_lm.models.cache import make_prompt_cache

from mlx_specstream.decode import spec_generate_step

PROMPT = [3, 1, 4, 1, 5, 2, 6]


def cache_rows(cache, n=None):
    """The first ``n`` rows (default: all) of each layer's keys and values."""
    return [
        (np.array(c.keys[..., : n or c.offset, :]), np.array(c.values[..., : n or c.offset, :]))
        for c in cache
    ]


def step_end_snapshots(model, n_tokens, **kwargs):
    """Runs decoding with a visible cache; after each step (the yield of its
    non-draft token) records the committed tokens and their cache rows. The
    next step is already running then (pipelined, as in mlx-lm): its tree rows
    lie beyond the committed ones."""
    cache = make_prompt_cache(model)
    tokens, snaps = list(PROMPT), []
    for token, _, from_draft, _ in spec_generate_step(
        mx.array(PROMPT), model, max_tokens=n_tokens, prompt_cache=cache, **kwargs
    ):
        tokens.append(token)
        if not from_draft:
            # The newest token is the next root: not yet committed.
            n = len(tokens) - 1
            assert all(c.offset >= n for c in cache)
            snaps.append((list(tokens[:-1]), cache_rows(cache, n)))
    return snaps


def assert_cache_equal(got, want):
    for layer, ((k1, v1), (k2, v2)) in enumerate(zip(got, want)):
        assert k1.shape == k2.shape, f"layer {layer}: {k1.shape} vs {k2.shape}"
        np.testing.assert_allclose(k1, k2, atol=1e-4, err_msg=f"keys, layer {layer}")
        np.testing.assert_allclose(v1, v2, atol=1e-4, err_msg=f"values, layer {layer}")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("prune", [0.0, 0.1])
def test_lossless_cache_equals_prefill(arch, prune):
    model = tiny_spec_model(arch, vocab_size=8, num_streams=3, top_k=2, prune_threshold=prune)
    snaps = step_end_snapshots(model, 40)
    assert any(len(b) - len(a) > 1 for (a, _), (b, _) in zip(snaps, snaps[1:])), "no draft accepted"
    for committed, rows in snaps:
        fresh = make_prompt_cache(model)
        model(mx.array(committed)[None], cache=fresh)  # plain prefill, hooks inactive
        assert_cache_equal(rows, cache_rows(fresh))


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_shared_cache_equals_one_token_decoding(arch):
    """Shared-mode K/V depend on the streams; compare with one-token-per-pass decoding."""
    model = tiny_spec_model(arch, vocab_size=8, mode="shared", num_streams=3, top_k=2)
    reference = {len(t): rows for t, rows in step_end_snapshots(model, 40, speculative=False)}
    snaps = step_end_snapshots(model, 40)
    assert len(snaps) < len(reference), "no draft accepted"
    for committed, rows in snaps:
        assert_cache_equal(rows, reference[len(committed)])


def test_negative_control_cache_check_catches_a_trim_only_rollback(monkeypatch):
    """Rolling back by trimming alone (no gather) leaves wrong rows: the check fails."""
    import mlx_specstream.decode as decode

    def trim_only(cache, prefix, keep_per_layer):
        for c, keep in zip(cache, keep_per_layer):
            c.trim(c.offset - (prefix + len(keep)))

    monkeypatch.setattr(decode, "commit_path", trim_only)
    model = tiny_spec_model("llama", vocab_size=8, num_streams=3, top_k=2)
    snaps = step_end_snapshots(model, 40)
    with pytest.raises(AssertionError):
        for committed, rows in snaps:
            fresh = make_prompt_cache(model)
            model(mx.array(committed)[None], cache=fresh)
            assert_cache_equal(rows, cache_rows(fresh))


@pytest.mark.parametrize("stop", ["exhausted", "closed"])
@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_cache_ends_like_mlx_lm(stop, mode):
    """When the generator ends or is closed, the cache holds the prompt and every
    yielded token, as mlx-lm's does (it feeds each token before yielding it), even if
    the last step accepted more drafts than were yielded or the next step was
    already running."""
    model = tiny_spec_model("llama", vocab_size=8, mode=mode, num_streams=3, top_k=2)
    cache = make_prompt_cache(model)
    gen = spec_generate_step(mx.array(PROMPT), model, max_tokens=23, prompt_cache=cache)
    tokens = [t for t, *_ in (gen if stop == "exhausted" else (next(gen) for _ in range(11)))]
    gen.close()
    committed = PROMPT + tokens
    assert all(c.offset == len(committed) for c in cache)
    if mode == "lossless":  # (shared-mode K/V depend on the streams)
        fresh = make_prompt_cache(model)
        model(mx.array(committed)[None], cache=fresh)
        assert_cache_equal(cache_rows(cache), cache_rows(fresh))


def test_negative_control_cache_end_check_catches_a_missing_trim(monkeypatch):
    import mlx_specstream.decode as decode

    monkeypatch.setattr(decode, "rewind", lambda cache, end: None)
    with pytest.raises(AssertionError):
        test_cache_ends_like_mlx_lm("closed", "lossless")


# ---- masks -------------------------------------------------------------------

TREE = ([7, 1, 2, 3], [-1, 0, 1, 0])  # root -> {1 -> 2, 3}


def forward(model, perturb=None):
    """One multi-stream pass over TREE after a prefill; ``perturb(streams)``
    edits the stream rows (B, R * gamma, D) before the stream layers."""
    rt = model.speculative_streams
    cache = make_prompt_cache(model)
    model(mx.array(PROMPT)[None], cache=cache)
    real = rt.streams.make_streams
    if perturb is not None:
        rt.streams.make_streams = lambda h: perturb(real(h))
    try:
        out = rt.forward(*TREE, cache)
    finally:
        rt.streams.make_streams = real
    return np.array(out.logits), np.array(out.stream_hidden)


def bump(node, stream, gamma):
    """A perturbation of stream ``stream`` (1-based) of tree node ``node``."""

    def perturb(s):
        row = node * gamma + stream - 1
        delta = mx.zeros(s.shape).at[:, row].add(3.0)
        return s + delta.astype(s.dtype)

    return perturb


@pytest.mark.parametrize("mode, stream_layers", [("lossless", 2), ("lossless", 4), ("shared", 1)])
def test_later_streams_never_reach_earlier_ones(mode, stream_layers):
    """Stream j never sees stream j' > j. In shared mode the main stream reads
    every stream (Eq. 1) and stream j reads the main stream (Eq. 2), so with
    two or more MSA layers j' reaches j through the main stream, as the
    paper's equations say; one MSA layer isolates the mask itself."""
    g = 3
    model = tiny_spec_model("llama", num_streams=g, mode=mode, num_stream_layers=stream_layers)
    logits, streams = forward(model)
    for j_prime in range(2, g + 1):
        _, s2 = forward(model, bump(1, j_prime, g))
        np.testing.assert_allclose(s2[:, : j_prime - 1], streams[:, : j_prime - 1], atol=1e-5)
        assert np.abs(s2[1, j_prime - 1] - streams[1, j_prime - 1]).max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_lossless_main_logits_ignore_streams(arch):
    g = 3
    model = tiny_spec_model(arch, num_streams=g, mode="lossless")
    logits, _ = forward(model)
    for node in range(4):
        for j in range(1, g + 1):
            l2, _ = forward(model, bump(node, j, g))
            np.testing.assert_allclose(l2, logits, atol=1e-5)


def test_shared_main_logits_see_own_streams_only():
    g = 3
    model = tiny_spec_model("llama", num_streams=g, mode="shared")
    logits, streams = forward(model)
    # Node 1's streams change node 1 and its descendant 2, never 0 or 3.
    l2, s2 = forward(model, bump(1, 2, g))
    assert np.abs(l2[1] - logits[1]).max() > 1e-3
    assert np.abs(l2[2] - logits[2]).max() > 1e-3
    np.testing.assert_allclose(l2[[0, 3]], logits[[0, 3]], atol=1e-5)
    np.testing.assert_allclose(s2[[0, 3]], streams[[0, 3]], atol=1e-5)


def test_no_stream_or_rejected_rows_stay_in_cache():
    model = tiny_spec_model("llama", vocab_size=8, num_streams=3, top_k=3, max_tree_nodes=20)
    rt = model.speculative_streams
    cache = make_prompt_cache(model)
    n = len(PROMPT)
    for i, (_, _, from_draft, passes) in enumerate(
        spec_generate_step(mx.array(PROMPT), model, max_tokens=30, prompt_cache=cache)
    ):
        if not from_draft:
            # Beyond the n + i committed tokens only the running next step's
            # rows: T tree rows below the stream layers, T * (1 + gamma) in them.
            extra = [c.offset - (n + i) for c in cache]
            T = extra[0]  # (0 after the last step)
            assert extra == [T if l < rt.first_top else T * 4 for l in range(len(cache))]
    assert {c.offset for c in cache} == {n + 30}  # every yielded token, as mlx-lm's


def test_stream_lora_changes_streams_not_main():
    plain = tiny_spec_model("llama", num_streams=3, mode="lossless")
    lora = tiny_spec_model("llama", num_streams=3, mode="lossless", stream_lora_rank=4)
    l1, s1 = forward(plain)
    l2, s2 = forward(lora)
    np.testing.assert_allclose(l1, l2, atol=1e-5)
    assert np.abs(s1 - s2).max() > 1e-3


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("llama", {}),
        ("gpt_neox", dict(stream_positions="offset")),
        ("phi3", dict(stream_lora_rank=4)),
        ("qwen3", dict(prune_threshold=0.05, stream_init_rank=4)),
    ],
)
def test_split_stream_pass_equals_full_pass(arch, extra):
    """Lossless decoding verifies with main rows only and then runs the streams
    of the last accepted node alone; that must equal the full pass's streams."""
    model = tiny_spec_model(arch, num_streams=3, mode="lossless", **extra)
    rt = model.speculative_streams
    threshold = extra.get("prune_threshold", 0.0)

    def fresh():
        cache = make_prompt_cache(model)
        model(mx.array(PROMPT)[None], cache=cache)
        return cache

    full = rt.forward(*TREE, fresh(), threshold)
    want = np.array(rt.head(full.stream_hidden.reshape(1, -1, full.stream_hidden.shape[-1]))[0])
    want = want.reshape(len(full.kept), 3, -1)
    for node in range(len(full.kept)):
        cache = fresh()
        split = rt.forward(*TREE, cache, threshold, all_streams=False)
        assert split.kept == full.kept
        np.testing.assert_allclose(np.array(split.logits), np.array(full.logits), atol=1e-5)
        got = np.array(rt.draft_streams(mx.array(node), cache))
        np.testing.assert_allclose(got, want[node], atol=1e-4)


def test_split_pass_is_refused_in_shared_mode():
    model = tiny_spec_model("llama", num_streams=2, mode="shared")
    with pytest.raises(ValueError, match="only in lossless mode"):
        model.speculative_streams.forward(*TREE, make_prompt_cache(model), all_streams=False)


# ---- a chain is verified by the plain multi-token pass ------------------------------


def test_is_chain_golden():
    from mlx_specstream.layout import layout_of

    assert layout_of([-1]).is_chain and layout_of([-1, 0, 1, 2]).is_chain
    assert not layout_of([-1, 0, 0]).is_chain and not layout_of([-1, 0, 1, 1]).is_chain


def _pass_logits_and_masks(model, parents, monkeypatch, all_streams):
    """Logits of one verify pass over ``parents`` after PROMPT, and how many tree
    masks it built."""
    import mlx_specstream.streams as streams_module

    built = []
    real = streams_module.with_prefix
    monkeypatch.setattr(streams_module, "with_prefix", lambda m, p: built.append(p) or real(m, p))
    rt = model.speculative_streams
    cache = make_prompt_cache(model)
    model(mx.array(PROMPT)[None], cache=cache)
    out = rt.forward([2, 7, 1, 6][: len(parents)], parents, cache, all_streams=all_streams)
    return out.logits, len(built)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2"])
def test_chain_pass_is_the_plain_pass(arch, monkeypatch):
    """A chain's rows (an n-gram draft, a chain of streams without stream rows)
    are verified by exactly the plain model's pass over those tokens: the model's
    own causal mask and RoPE offset, no tree mask built, bit-identical logits."""
    model = tiny_spec_model(arch, vocab_size=8, num_streams=3, mode="lossless")
    logits, masks = _pass_logits_and_masks(model, [-1, 0, 1, 2], monkeypatch, False)
    cache = make_prompt_cache(model)
    model(mx.array(PROMPT)[None], cache=cache)
    plain = model(mx.array([[2, 7, 1, 6]]), cache=cache)[0]
    assert masks == 0
    assert np.array_equal(np.array(logits), np.array(plain))
    # Control: a tree (the last node a sibling) builds its masks, and its last
    # row is not the plain pass's.
    logits, masks = _pass_logits_and_masks(model, [-1, 0, 1, 1], monkeypatch, False)
    assert masks > 0
    assert not np.array_equal(np.array(logits[3]), np.array(plain[3]))

"""Property-based tests (hypothesis) of trees, masks, pruning, acceptance and compaction."""

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from mlx_specstream.cache import commit_path
from mlx_specstream.layout import layout_of
from mlx_specstream.tree import (
    accept,
    accept_by_rejection,
    ancestor_mask,
    build_draft_tree,
    children_of,
    prune_subtrees,
    stream_attention_mask,
    tree_depths,
)

V = 8


@st.composite
def trees(draw, max_nodes=12):
    """Random trees with distinct sibling tokens (as every draft tree has)."""
    n = draw(st.integers(1, max_nodes))
    parents, tokens, used = [-1], [draw(st.integers(0, V - 1))], {0: set()}
    for i in range(1, n):
        p = draw(st.integers(0, i - 1))
        free = [t for t in range(V) if t not in used[p]]
        if not free:
            break
        t = draw(st.sampled_from(free))
        used[p].add(t)
        used[i] = set()
        parents.append(p)
        tokens.append(t)
    return tokens, parents


def ancestors(parents, i):
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


@settings(max_examples=200, deadline=None)
@given(trees())
def test_ancestor_mask_shows_only_the_own_path(tree):
    _, parents = tree
    mask = ancestor_mask(parents)
    for i in range(len(parents)):
        assert set(np.flatnonzero(mask[i])) == ancestors(parents, i)


@settings(max_examples=200, deadline=None)
@given(trees(), st.data())
def test_device_acceptance_equals_a_greedy_walk(tree, data):
    tokens, parents = tree
    targets = data.draw(st.lists(st.integers(0, V - 1), min_size=len(tokens), max_size=len(tokens)))
    kids = children_of(parents)
    cur, path = 0, [0]
    while True:
        nxt = [c for c in kids[cur] if tokens[c] == targets[cur]]
        if not nxt:
            break
        cur = nxt[0]
        path.append(cur)
    args = (mx.array(tokens), mx.array([0] + parents[1:]), mx.array(ancestor_mask(parents)),
            mx.array(targets))  # fmt: skip
    for depth in (None, layout_of(parents).depth_mx):  # (the decoder passes its layout's)
        ok, last = accept(*args, depth)
        assert last.item() == path[-1]
        assert [i for i, a in enumerate(ok.tolist()) if a] == path


@settings(max_examples=200, deadline=None)
@given(trees(), st.data())
def test_pruning_removes_whole_subtrees_and_never_the_root(tree, data):
    _, parents = tree
    edge_ok = data.draw(st.lists(st.booleans(), min_size=len(parents), max_size=len(parents)))
    kept = set(prune_subtrees(parents, edge_ok))
    assert 0 in kept
    for i in range(1, len(parents)):
        path_ok = all(edge_ok[a] for a in ancestors(parents, i) if a > 0)
        assert (i in kept) == path_ok


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, V - 1), min_size=1, max_size=3, unique=True), min_size=1, max_size=3
    ),
    st.integers(1, 20),
    st.data(),
)
def test_draft_trees_are_well_formed(levels, max_nodes, data):
    lps = [
        sorted(
            data.draw(st.lists(st.floats(-5, 0), min_size=len(l), max_size=len(l))), reverse=True
        )
        for l in levels
    ]
    tree = build_draft_tree(0, levels, lps, max_nodes)
    full = 1
    for g in range(len(levels)):
        full += int(np.prod([len(l) for l in levels[: g + 1]]))
    assert len(tree) == min(full, max_nodes)
    assert all(p < i for i, p in enumerate(tree.parents) if i > 0)
    depth = tree_depths(tree.parents)
    for i, kids in enumerate(children_of(tree.parents)):
        toks = [tree.tokens[c] for c in kids]
        assert len(toks) == len(set(toks))  # siblings distinct
        assert all(t in levels[depth[i]] for t in toks)
    # Uncapped, the all-top-1 chain is a prefix of the node list (no gather when
    # it is accepted); capped, every kept node's ancestors are kept.
    if len(tree) == full:
        assert tree.parents[: len(levels) + 1] == [-1] + list(range(len(levels)))


@settings(max_examples=100, deadline=None)
@given(trees(max_nodes=6), st.integers(1, 3))
def test_stream_rows_never_see_later_streams_or_other_nodes(tree, gamma):
    _, parents = tree
    anc = ancestor_mask(parents)
    R = len(parents)
    for shared in (False, True):
        m = stream_attention_mask(anc, gamma, shared)
        for a in range(R):
            for j in range(gamma):
                row = m[R + a * gamma + j]
                assert (row[:R] == anc[a]).all()
                for b in range(R):
                    for k in range(gamma):
                        assert row[R + b * gamma + k] == (b == a and k <= j)
            main = m[a]
            assert (main[:R] == anc[a]).all()
            assert main[R:].reshape(R, gamma).any(axis=1).tolist() == [
                shared and b == a for b in range(R)
            ]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 6), st.integers(1, 8), st.data())
def test_compaction_equals_a_gather(prefix, n, data):
    keep = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    c = KVCache()
    rows = mx.arange(prefix + n, dtype=mx.float32)[None, None, :, None] * mx.ones((1, 2, 1, 3))
    c.update_and_fetch(rows, -rows)
    commit_path([c], prefix, [keep])
    want = list(range(prefix)) + [prefix + k for k in keep]
    assert c.offset == len(want)
    assert c.keys[0, 0, : c.offset, 0].tolist() == want
    assert c.values[0, 1, : c.offset, 2].tolist() == [-w for w in want]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 6), st.integers(1, 8), st.sampled_from([(4, 32), (8, 64)]), st.data())
def test_quantized_compaction_equals_a_gather(prefix, n, quant, data):
    """On a QuantizedKVCache the packed data, scales and biases of the kept rows
    move together: the result equals a cache fed the gathered rows."""
    bits, group = quant
    keep = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    seed = data.draw(st.integers(0, 2**16))
    k = mx.random.normal((1, 2, prefix + n, 64), key=mx.random.key(seed))
    c, want = QuantizedKVCache(group, bits), QuantizedKVCache(group, bits)
    c.update_and_fetch(k, -k)
    commit_path([c], prefix, [keep])
    idx = mx.array(list(range(prefix)) + [prefix + i for i in keep])
    want.update_and_fetch(k[:, :, idx], -k[:, :, idx])
    assert c.offset == want.offset == idx.size
    for got, ref in zip([*c.keys, *c.values], [*want.keys, *want.values]):
        assert np.array_equal(np.array(got[..., : c.offset, :]), np.array(ref[..., : c.offset, :]))


@settings(max_examples=200, deadline=None)
@given(trees(), st.data())
def test_rejection_walk_returns_a_root_path(tree, data):
    tokens, parents = tree
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    p = rng.dirichlet(np.ones(V), size=len(tokens))
    q = rng.dirichlet(np.ones(V), size=max(tree_depths(parents)) + 1)
    path, token = accept_by_rejection(tokens, parents, p, q, rng.random(len(tokens) + 1))
    assert path[0] == 0 and all(parents[b] == a for a, b in zip(path, path[1:]))
    assert 0 <= token < V


_MODELS = {}


def _tiny(mode):
    """One tiny model per mode for all examples (building one per example is slow)."""
    from helpers import tiny_spec_model

    if mode not in _MODELS:
        _MODELS[mode] = tiny_spec_model("llama", vocab_size=V, num_streams=2, mode=mode)
    return _MODELS[mode]


@settings(max_examples=40, deadline=None)
@given(
    trees(max_nodes=8),
    st.lists(st.integers(0, V - 1), min_size=1, max_size=6),
    st.sampled_from(["lossless", "shared"]),
    st.data(),
)
def test_compacted_cache_equals_a_prefill_of_the_accepted_path(tree, prefix, mode, data):
    """A multi-stream pass over a random tree, then compaction to a random
    root path: every layer's cache equals the one left by feeding the prefix
    and that path token by token (the main stream's own cache)."""
    from mlx_lm.models.cache import make_prompt_cache

    model = _tiny(mode)
    rt = model.speculative_streams
    tokens, parents = tree
    tokens = [prefix[-1]] + tokens[1:]  # the root is the last committed token
    node = data.draw(st.integers(0, len(tokens) - 1))
    path = sorted(ancestors(parents, node))
    cache = make_prompt_cache(model)
    if len(prefix) > 1:
        model(mx.array([prefix[:-1]]), cache=cache)
    start = cache[0].offset
    out = rt.forward(tokens, parents, cache, all_streams=not rt.split_streams)
    commit_path(
        cache,
        start,
        [path if i >= rt.first_top else [out.kept[a] for a in path] for i in range(len(cache))],
    )
    want = make_prompt_cache(model)
    committed = prefix[:-1] + [tokens[a] for a in path]
    if mode == "lossless":
        model(mx.array([committed]), cache=want)  # the base model itself
    else:
        # Shared mode: the prompt is prefilled plainly, as the decode loop does,
        # then each token gets one pass with its streams, whose rows are dropped.
        if len(prefix) > 1:
            model(mx.array([prefix[:-1]]), cache=want)
        for a in path:
            before = want[0].offset
            rt.forward([tokens[a]], [-1], want)
            commit_path(want, before, [[0]] * len(want))
    for layer, (c, w) in enumerate(zip(cache, want)):
        assert c.offset == w.offset == len(committed), (layer, c.offset, w.offset)
        np.testing.assert_allclose(
            np.array(c.keys[..., : c.offset, :]), np.array(w.keys[..., : w.offset, :]), atol=1e-4
        )
        np.testing.assert_allclose(
            np.array(c.values[..., : c.offset, :]),
            np.array(w.values[..., : w.offset, :]),
            atol=1e-4,
        )

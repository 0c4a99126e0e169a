"""Exact golden tests of the pure tree functions and of cache compaction."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from mlx_specstream.cache import commit_path
from mlx_specstream.tree import (
    accept,
    ancestor_mask,
    build_draft_tree,
    prune_subtrees,
    stream_attention_mask,
    subtree_parents,
    top_k_desc,
    tree_depths,
)

TOKS = [[1, 2], [3, 4]]
LPS = [[-0.1, -2.0], [-0.2, -3.0]]


@pytest.mark.parametrize(
    "tokens, logprobs, max_nodes, want_tokens, want_parents",
    [
        # Full Cartesian product, depth-first, best child first: 1 + 2 + 4 nodes.
        (TOKS, LPS, 7, [7, 1, 3, 4, 2, 3, 4], [-1, 0, 1, 1, 0, 4, 4]),
        (TOKS, LPS, 100, [7, 1, 3, 4, 2, 3, 4], [-1, 0, 1, 1, 0, 4, 4]),
        # Capped: best paths 1 (-0.1), 1-3 (-0.3), 2 (-2.0), 2-3 (-2.2), 1-4 (-3.1).
        (TOKS, LPS, 4, [7, 1, 3, 2], [-1, 0, 1, 0]),
        (TOKS, LPS, 5, [7, 1, 3, 2, 3], [-1, 0, 1, 0, 3]),
        (TOKS, LPS, 1, [7], [-1]),
        # A chain (k = 1 everywhere).
        ([[5], [6], [7]], [[-1.0], [-1.0], [-1.0]], 16, [7, 5, 6, 7], [-1, 0, 1, 2]),
        # Per-stream widths 3 and 1.
        ([[1, 2, 3], [4]], [[-1, -2, -3], [-1]], 16, [7, 1, 4, 2, 4, 3, 4], [-1, 0, 1, 0, 3, 0, 5]),
        # Ties: equal scores keep the shallower node, then the earlier one.
        ([[1, 2], [3, 4]], [[0.0, 0.0], [0.0, 0.0]], 4, [7, 1, 3, 2], [-1, 0, 1, 0]),
    ],
)
def test_build_draft_tree(tokens, logprobs, max_nodes, want_tokens, want_parents):
    tree = build_draft_tree(7, tokens, logprobs, max_nodes)
    assert tree.tokens == want_tokens
    assert tree.parents == want_parents


def test_tree_size_is_cartesian_product():
    # 1 + sum k^g nodes before capping (gamma = 3, k = 3: 40 nodes).
    tree = build_draft_tree(0, [[1, 2, 3]] * 3, [[-1, -2, -3]] * 3, 1000)
    assert len(tree) == 40
    assert tree_depths(tree.parents).count(3) == 27


def test_tree_depths():
    assert tree_depths([-1]) == [0]
    assert tree_depths([-1, 0, 1, 1, 0, 4, 4]) == [0, 1, 2, 2, 1, 2, 2]


def test_ancestor_mask():
    want = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [1, 0, 0, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(ancestor_mask([-1, 0, 1, 1, 0]), want)


@pytest.mark.parametrize(
    "parents, edge_ok, kept",
    [
        ([-1, 0, 1, 1, 0], [True] * 5, [0, 1, 2, 3, 4]),
        ([-1, 0, 1, 1, 0], [True, False, True, True, True], [0, 4]),  # subtree of 1 goes
        ([-1, 0, 1, 1, 0], [False] * 5, [0]),  # the root is never pruned
        ([-1, 0, 1, 2], [True, True, False, True], [0, 1]),
    ],
)
def test_prune_subtrees(parents, edge_ok, kept):
    assert prune_subtrees(parents, edge_ok) == kept


def test_subtree_parents():
    assert subtree_parents([-1, 0, 1, 1, 0, 4], [0, 4, 5]) == [-1, 0, 1]


def test_stream_attention_mask_lossless_and_shared():
    # Root and one child, gamma = 2. Rows: main 0, main 1, s1(0), s2(0), s1(1), s2(1).
    anc = ancestor_mask([-1, 0])
    lossless = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 0, 0, 1, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(stream_attention_mask(anc, 2, False), lossless)
    shared = lossless.copy()
    shared[0, 2:4] = True
    shared[1, 4:6] = True
    np.testing.assert_array_equal(stream_attention_mask(anc, 2, True), shared)


@pytest.mark.parametrize(
    "targets, accepted, last",
    [
        # Tree: 0 -> {1 (tok 1) -> 2 (tok 2), 3 (tok 3)}.
        ([1, 2, 9, 9], [True, True, True, False], 2),  # whole chain, bonus from node 2
        ([3, 9, 9, 9], [True, False, False, True], 3),  # second branch
        ([1, 9, 9, 9], [True, True, False, False], 1),  # stops inside the chain
        ([8, 2, 9, 9], [True, False, False, False], 0),  # nothing accepted
    ],
)
def test_accept(targets, accepted, last):
    parents = [-1, 0, 1, 0]
    ok, idx = accept(
        mx.array([5, 1, 2, 3]),
        mx.array([0, 0, 1, 0]),
        mx.array(ancestor_mask(parents)),
        mx.array(targets),
    )
    assert ok.tolist() == accepted
    assert idx.item() == last


def test_top_k_desc():
    scores = mx.array([[0.1, 0.7, 0.3, 0.9], [4.0, 1.0, 3.0, 2.0]])
    assert top_k_desc(scores, 2).tolist() == [[3, 1], [0, 2]]
    assert top_k_desc(scores, 1).tolist() == [[3], [0]]
    assert top_k_desc(scores, 4).tolist() == [[3, 1, 2, 0], [0, 2, 3, 1]]
    assert top_k_desc(scores, 9).tolist() == [[3, 1, 2, 0], [0, 2, 3, 1]]  # k > V: all
    # Vocabulary-wide rows agree with a full sort (distinct values).
    wide = mx.random.normal((3, 8000), key=mx.random.key(0))
    assert top_k_desc(wide, 5).tolist() == mx.argsort(-wide, axis=-1)[:, :5].tolist()


def _cache_with_rows(n, dims=2):
    c = KVCache()
    rows = mx.arange(n, dtype=mx.float32)[None, None, :, None] * mx.ones((1, 1, 1, dims))
    c.update_and_fetch(rows, rows + 100)
    return c


@pytest.mark.parametrize(
    "keep, rows",
    [
        ([0, 2], [0, 1, 2, 4]),  # gather: prefix 0 1, then rows 2 and 4
        ([0, 1], [0, 1, 2, 3]),  # a prefix: plain trim
        ([0, 3, 5], [0, 1, 2, 5, 7]),
        ([0], [0, 1, 2]),
    ],
)
def test_commit_path(keep, rows):
    c = _cache_with_rows(8)
    commit_path([c], 2, [keep])
    assert c.offset == len(rows)
    keys, values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
    assert keys[0, 0, :, 0].tolist() == rows
    assert values[0, 0, :, 0].tolist() == [r + 100 for r in rows]
    # Appending after compaction continues right after the kept rows.
    extra = mx.full((1, 1, 1, 2), 42.0)
    k, _ = c.update_and_fetch(extra, extra)
    assert k[0, 0, :, 0].tolist() == rows + [42]

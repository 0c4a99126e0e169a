"""Drawn dynamic trees (mlx_specstream.dynamic_tree's ``grow_drawn``): dynamic trees
verified by recursive rejection sampling. Golden level budgets, kept slots and
layouts; the walk with each node's own draft distribution keeps the target's
distribution exactly where the shortcuts do not (a level's distribution for every node;
children kept by their own values); the device's draws and each node's distribution
recomputed from a stand-in drafter."""

import mlx.core as mx
import numpy as np
import pytest
from chi_square import chi_square_pvalue

from mlx_specstream.dynamic_tree import (
    drawn_tree,
    grow_drawn,
    kept_slots,
    level_budgets,
    place_drawn,
)
from mlx_specstream.tree import accept_by_rejection


def test_level_budgets_follow_the_static_tree_s_levels():
    assert level_budgets(4, 5, 16) == [3, 3, 4, 4, 1]
    assert level_budgets(2, 3, 16) == [2, 4, 4]  # (capped: k on level 1, k * k deeper)
    assert level_budgets(3, 2, 3) == [1, 1]  # (the chain first: rank 0 of level 2 beats rank 1)
    assert sum(level_budgets(4, 6, 32)) == 31


def test_kept_slots_are_a_prefix_of_each_node_s_draws():
    """The level's ``budget`` best keys, as a prefix of each row; ties resolved by the
    counts; ``-inf`` never kept, even within the budget."""
    keys = mx.array([[-1.0, -3.0, -4.0], [-2.0, -2.0, -9.0], [-0.5, -np.inf, -np.inf]])
    assert kept_slots(keys, 4).tolist() == [
        [True, False, False], [True, True, False], [True, False, False]]  # fmt: skip
    assert kept_slots(keys, 9).tolist() == [
        [True, True, True], [True, True, True], [True, False, False]]  # fmt: skip
    assert kept_slots(keys, 0).tolist() == [[False] * 3] * 3
    ties = mx.zeros((2, 3))  # (any 3 of 6 equal keys: still prefixes)
    kept = np.array(kept_slots(ties, 3))
    assert kept.sum() == 3 and all((np.diff(row.astype(int)) <= 0).all() for row in kept)


def test_place_drawn_lays_out_the_kept_candidates_in_draw_order():
    """Candidates 1-2 under the root, 3-4 under 1, 5-6 under 2 (rows 1 and 2 of ``q``):
    children in draw order (not by score), unkept candidates and their subtrees out,
    each node's row of ``q`` (-1 for a leaf)."""
    tokens = [-1, 10, 20, 30, 40, 50, 60]
    parents = [-1, 0, 0, 1, 1, 2, 2]
    kept = [True, True, True, False, True, True, False]
    tree, rows = place_drawn(9, tokens, parents, kept, {0: 0, 1: 1, 2: 2})
    assert tree.tokens == [9, 10, 40, 20, 50] and tree.parents == [-1, 0, 1, 0, 3]
    assert rows == [0, 1, -1, 2, -1]
    tree, rows = place_drawn(9, tokens, parents, [True, False, True, False, False, True, True],
                             {0: 0, 1: 1, 2: 2})  # fmt: skip
    assert tree.tokens == [9, 20, 50, 60] and rows == [0, 2, -1, -1]
    with pytest.raises(AssertionError, match="parent"):  # (control: a bad input)
        place_drawn(9, tokens, parents, [True, False, False, True, False, False, False], {0: 0})


def test_drawn_tree_keeps_the_distributions_of_nodes_with_children_only():
    """The walk reads the rows of nodes with children only, renumbered (candidate 1 has
    no child kept, so the table's row 1 is left out and row 2 becomes row 1; control: row
    1 of the full table is another node's distribution)."""
    tokens = mx.array([-1, 10, 20, 30, 40, 50, 60])
    parents = mx.array([-1, 0, 0, 1, 1, 2, 2])
    kept = mx.array([True, True, True, False, False, True, False])
    q = mx.arange(5 * 3, dtype=mx.float32).reshape(5, 3)  # (row r: 3r, 3r + 1, 3r + 2)
    expanded = mx.array([[1, 2]])  # (rows 1 and 2: candidates 1 and 2)
    tree, got, rows = drawn_tree((tokens, parents, kept, q, expanded), 9, 2)
    assert tree.tokens == [9, 10, 20, 50] and tree.parents == [-1, 0, 0, 2]
    assert rows == [0, -1, 1, -1]
    assert np.array(got).tolist() == [[0, 1, 2], [6, 7, 8]]
    assert np.array(q)[rows[2]].tolist() != np.array(got)[rows[2]].tolist()


# ---- the walk over drawn trees, on the host: exact targets, simulated draws ----------

V = 4
RNG = np.random.default_rng(0)
P1 = np.array([0.5, 0.25, 0.15, 0.10])  # the target's first token
P2 = RNG.dirichlet(np.ones(V) * 0.5, size=V)  # its second, after each first
Q1 = np.array([0.1, 0.2, 0.3, 0.4])  # the drafter's, far from the target's
Q2 = RNG.dirichlet(np.ones(V) * 0.5, size=V)


def gumbel_draws(q, k, rng):
    return list(np.argsort(-(np.log(q) + rng.gumbel(size=q.shape)))[:k])


def first_two_tokens(rng, variant):
    """One step over a two-level drawn tree (two draws at the root, two under each),
    completed by plain sampling when it emits one token."""
    kids = gumbel_draws(Q1, 2, rng)
    if variant == "kept by value":  # (a dynamic tree's rerank: unlikely drafts dropped)
        kids = kids[:1] + [c for c in kids[1:] if Q1[c] >= 0.25]
    tokens, parents, q, rows = [9], [-1], [Q1], [0]
    for c in kids:
        tokens.append(c)
        parents.append(0)
        node = len(tokens) - 1
        q.append(Q2[c])
        rows.append(len(q) - 1)
        for d in gumbel_draws(Q2[c], 2, rng):
            tokens += [d]
            parents += [node]
            rows += [-1]
    if variant == "a level's q":  # (the static tree's: every level-1 node the first's)
        rows = [0] + [rows[1] if r > 0 else r for r in rows[1:]]
    target = [P1] + [P2[t] if parents[i] == 0 else np.ones(V) / V
                     for i, t in enumerate(tokens) if i]  # fmt: skip
    path, token = accept_by_rejection(tokens, parents, np.array(target), np.array(q),
                                      rng.random(len(tokens) + 1), rows)  # fmt: skip
    seq = [tokens[a] for a in path[1:]] + [token]
    if len(seq) == 1:
        seq.append(int(rng.choice(V, p=P2[seq[0]])))
    return tuple(seq[:2])


def two_token_pvalue(variant, n):
    rng, counts = np.random.default_rng(1), {}
    for _ in range(n):
        s = first_two_tokens(rng, variant)
        counts[s] = counts.get(s, 0) + 1
    exact = {(a, b): P1[a] * P2[a, b] for a in range(V) for b in range(V)}
    return chi_square_pvalue(counts, exact, n)


def test_each_node_s_own_distribution_keeps_the_target_s():
    """Children drawn from their own node's distribution and walked with it: the first
    two tokens are the target's (chi-square). Controls, the same test fails: every
    level-1 node's children verified against the first one's distribution (a static
    tree's level), and a child kept or dropped by its own value (a dynamic tree's
    rerank of its best candidates)."""
    assert two_token_pvalue("drawn", 20000) > 1e-3
    assert two_token_pvalue("a level's q", 20000) < 1e-6
    assert two_token_pvalue("kept by value", 20000) < 1e-6


# ---- the device's growth, with a stand-in drafter ------------------------------------

W = 16


def stand_in(seed):
    """A drafter whose distribution after a token is a fixed row of a table."""
    table = mx.softmax(3 * mx.random.normal((W, W), key=mx.random.key(seed)), axis=-1)

    def expand(level, h, tokens, mask):
        assert mask.shape == (4, 4 * (level - 1))
        return h, table[tokens]

    return table, expand


def test_grow_drawn_draws_each_node_s_children_from_its_own_distribution():
    """Every expanded node's row of ``q`` is its token's distribution; the level's
    budget holds; each node keeps a prefix of its draws, distinct tokens; deeper levels
    expand the best kept candidates by path score (draw ``i`` scoring its parent's
    ``i``-th largest log-probability); the root's first draw follows its distribution
    (chi-square over seeds)."""
    table, expand = stand_in(0)
    first_q, rows = table[3][None], np.array(table)
    budgets, firsts = [3, 5, 4, 2], {}
    for seed in range(600):
        mx.random.seed(seed)
        tokens, parents, kept, q, expanded = (
            np.array(a) for a in grow_drawn(mx.zeros((1, 8)), first_q, expand, 4, budgets)
        )
        firsts[int(tokens[1])] = firsts.get(int(tokens[1]), 0) + 1
        level = np.array([0] + [1] * 4 + sum([[d] * 16 for d in range(2, 5)], []))
        assert all(kept[level == d].sum() <= b for d, b in zip(range(1, 5), budgets))
        score = np.zeros(len(tokens))  # (draw i scores the i-th largest log q: by rank)
        for c in range(1, len(tokens)):
            parent_q = rows[3] if parents[c] == 0 else rows[tokens[parents[c]]]
            rank = c - np.flatnonzero(parents == parents[c])[0]
            score[c] = score[parents[c]] + np.log(np.sort(parent_q)[::-1][rank])
        for d, nodes in enumerate(expanded):
            np.testing.assert_allclose(q[1 + 4 * d: 5 + 4 * d], rows[tokens[nodes]],
                                       rtol=1e-6)  # fmt: skip
            candidates = np.flatnonzero((level == d + 1) & kept)
            best = candidates[np.argsort(-score[candidates], kind="stable")][:4]
            assert set(best) <= set(nodes.tolist()), (seed, d)
        for node in range(len(tokens)):
            kids = np.flatnonzero(parents == node)
            if len(kids):
                flags = kept[kids]
                assert not flags[1:][~flags[:-1]].any()  # (a prefix)
                assert len(set(tokens[kids].tolist())) == len(kids)
    exact = {t: float(p) for t, p in enumerate(rows[3])}
    assert chi_square_pvalue(firsts, exact, 600) > 1e-3

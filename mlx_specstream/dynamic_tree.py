"""Dynamic draft trees (EAGLE-2, Li et al., arXiv 2406.16858) for drafters that run
again on their own output: each node's children are drafted from that node's own
context, and the tree grows where its path is most likely.

A static tree takes level ``j``'s candidates from one distribution, drafted along the
top-1 chain, and puts them under every node of level ``j - 1``: a second-ranked
node's children are then the top-1 node's. Here (:func:`grow`, on the device):

* level 1 is the top-``k`` of the drafter's first logits;
* each deeper level expands the ``k`` candidates of the level above whose path score
  (the sum of the draft log-probabilities along the path) is highest: one row each,
  in one pass of the drafter's layer, each row seeing the context and its own
  ancestors' rows (:func:`expand_mask`), each giving its top-``k`` children.

Then :func:`select_nodes` (host) keeps the ``max_nodes - 1`` candidates of the highest
path score: a child never scores above its parent, so the kept set holds every kept
node's ancestors. The tree is laid out depth-first, the best child first, as the
verifier's static trees are.

Sampling with ``acceptance="rejection"`` grows a *drawn* tree (:func:`grow_drawn`):
each node's children are draws without replacement from that node's own draft
distribution, so recursive rejection sampling verifies every node against its own
distribution (:func:`~mlx_specstream.tree.accept_by_rejection`'s ``draft_rows``). How
many children a node keeps is decided before they are drawn, never by their values: a
node's ``i``-th draw scores its distribution's ``i``-th largest log-probability.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx

from .layout import with_prefix
from .tree import DraftTree, gumbel_top_k, static_tree, top_k_desc


def select_nodes(
    root: int,
    tokens: Sequence[int],
    parents: Sequence[int],
    scores: Sequence[float],
    max_nodes: int,
) -> DraftTree:
    """The draft tree of the ``max_nodes - 1`` best candidates, depth-first, best first.

    Candidate ``0`` is the root (its token and score unused); candidate ``i > 0`` has
    token ``tokens[i]``, parent ``parents[i] < i`` and path score ``scores[i]``, never
    above its parent's. Candidates scoring ``-inf`` (drafts of no probability) are never
    kept. Ties go to the shallower candidate, then to the earlier one.

    Example:
        >>> t = select_nodes(7, [-1, 4, 5, 6, 8], [-1, 0, 0, 1, 1],
        ...                  [0., -.2, -1., -.5, -.3], 4)
        >>> t.tokens, t.parents
        ([7, 4, 8, 6], [-1, 0, 1, 1])

    Candidates 1 (-0.2), 4 (-0.3) and 3 (-0.5) are kept and 2 (-1.0) is not; both kept
    children hang under candidate 1, the better one (token 8) first.

    Args:
        root (int): the root's token.
        tokens, parents, scores: the candidates, as :func:`grow` gives them.
        max_nodes (int): the cap on the tree's nodes, root included.

    Returns:
        DraftTree: the tree.
    """
    depth = [0] * len(parents)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    finite = [i for i in range(1, len(parents)) if scores[i] > float("-inf")]
    kept = set(sorted(finite, key=lambda i: (-scores[i], depth[i], i))[: max_nodes - 1])
    kids = {0: []}
    for i in sorted(kept):
        assert parents[i] == 0 or parents[i] in kept, "a child scored above its parent"
        kids.setdefault(parents[i], []).append(i)
    out_tokens, out_parents = [root], [-1]

    def place(node, at):
        for c in sorted(kids.get(node, []), key=lambda i: (-scores[i], i)):
            out_tokens.append(int(tokens[c]))
            out_parents.append(at)
            place(c, len(out_tokens) - 1)

    place(0, 0)
    return DraftTree(out_tokens, out_parents)


def expand_mask(rows_mask: Optional[mx.array], parent_rows: Optional[mx.array], k: int) -> mx.array:
    """Which tree rows each of the next level's ``k`` rows sees: its parent row's
    ancestors, the parent row itself, and itself (``rows_mask`` ``(k, R)``: what each
    of the last level's rows sees; ``None`` before any tree row, ``parent_rows`` then
    unused).

    Example:
        >>> m = expand_mask(None, mx.array([0, 0]), 2)
        >>> m.tolist()
        [[True, False], [False, True]]
        >>> expand_mask(m, mx.array([1, 1]), 2).tolist()
        [[False, True, True, False], [False, True, False, True]]

    The first level's rows see themselves only; the next two both expand children of
    row 1, so each sees row 1 and itself.
    """
    eye = mx.eye(k, dtype=mx.bool_)
    if rows_mask is None:
        return eye
    return mx.concatenate([mx.take(rows_mask, parent_rows, axis=0), eye], axis=1)


def top_children(logprobs: mx.array, k: int, ids: Optional[mx.array] = None):
    """The top-``k`` tokens of each row of ``logprobs`` ``(R, V')`` and their
    log-probabilities, clipped at 0 (a child never scores above its parent); ``ids``
    maps a column to its token where ``V'`` is a draft vocabulary."""
    cols = top_k_desc(logprobs, k).astype(mx.int32)
    lp = mx.minimum(mx.take_along_axis(logprobs, cols, axis=-1), 0.0)
    return (cols if ids is None else mx.take(ids, cols).astype(mx.int32)), lp


Expand = Callable[[int, mx.array, mx.array, mx.array], Tuple[mx.array, mx.array]]


def grow(
    first_out: mx.array,
    first_logprobs: mx.array,
    expand: Expand,
    k: int,
    depth: int,
    ids: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array, mx.array]:
    """Grows the candidates of a dynamic tree on the device.

    Args:
        first_out (mx.array): ``(1, D)`` the drafter's output that drafted level 1.
        first_logprobs (mx.array): ``(1, V')`` its log-probabilities (float32).
        expand: ``expand(level, h, tokens, mask) -> (out, logprobs)``: the drafter over
          ``k`` rows pairing its outputs ``h`` ``(k, D)`` with the frontier's ``tokens``
          ``(k,)``, the rows of tree level ``level - 1`` at position ``level - 2`` past
          the context, seeing the context and the earlier tree rows where ``mask``
          ``(k, R)`` says (``R``: the tree rows, these included); it appends them to
          its cache (the caller trims them) and returns their outputs ``(k, D)`` and
          log-probabilities ``(k, V')``.
        k (int): children per expanded node, and nodes expanded per level.
        depth (int): the tree's levels.
        ids (mx.array, optional): the token of each of the ``V'`` columns.

    Returns:
        tuple: device arrays ``tokens``, ``parents`` and ``scores`` of the
        ``1 + k + (depth - 1) k^2`` candidates (candidate 0: the root), as
        :func:`select_nodes` takes them.
    """
    toks, lps = top_children(first_logprobs, k, ids)  # (1, k)
    tokens, scores = [mx.array([-1], dtype=mx.int32), toks[0]], [mx.zeros(1), lps[0]]
    parents = [mx.array([-1, *([0] * k)], dtype=mx.int32)]
    frontier = mx.arange(1, k + 1, dtype=mx.int32)  # (the candidates expanded next)
    front_tok, front_score = toks[0], lps[0]
    h, first = mx.repeat(first_out, k, axis=0), 1 + k
    mask = rows = None  # (what the last level's rows see; whose children the frontier are)
    for level in range(2, depth + 1):
        mask = expand_mask(mask, rows, k)
        out, logprobs = expand(level, h, front_tok, mask)
        child_tok, child_lp = top_children(logprobs, k, ids)  # (k, k)
        child_score = (front_score[:, None] + child_lp).reshape(-1)
        tokens.append(child_tok.reshape(-1))
        scores.append(child_score)
        parents.append(mx.repeat(frontier, k))
        best = top_k_desc(child_score[None], k)[0].astype(mx.int32)  # (k,) of k * k
        rows = best // k  # (the rows whose children they are)
        frontier = first + best
        front_tok, front_score = mx.take(tokens[-1], best), mx.take(child_score, best)
        h, first = mx.take(out, rows, axis=0), first + k * k
    return mx.concatenate(tokens), mx.concatenate(parents), mx.concatenate(scores)


def log_softmax(logits: mx.array) -> mx.array:
    """Float32 log-probabilities of ``logits`` over their last axis."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def drafter_grows(drafter) -> bool:
    """Whether an attached ``drafter`` grows dynamic trees here: it has ``draft_tree``
    (EAGLE's drafters, an MTP layer) and its ``growth_refusal()`` gives no reason."""
    return hasattr(drafter, "draft_tree") and drafter.growth_refusal() is None


def grown_candidates(drafter, rt, state, hidden, path, path_tokens, token, k: int, depth: int,
                     drawn=None):  # fmt: skip
    """:func:`grow`'s candidates for a drafter with a KV cache of its own that runs again
    on its own output (EAGLE's, an MTP layer): the accepted path's new rows as its
    ``draft`` appends them (``drafter.context_out``: its output that drafts level 1),
    then one pass per deeper level over the ``k`` best nodes of the level above
    (``drafter.rows_at(rt, h, tokens, cache, (position, mask))``), each row at its
    level's position and seeing the context and its own ancestors' rows (trimmed after);
    ``drafter.tree_logits(rt, out)``, normalized here, ranks the
    children, over the tokens ``drafter.tree_ids()`` (``None``: every token).

    ``drawn`` ``(budgets, probs)``: :func:`grow_drawn`'s candidates instead, each node's
    distribution ``probs(logprobs)`` of the log-probabilities of its level logits over
    the base's tokens (``drafter.level_logits(rt, out)``, as the static tree's levels)."""
    out = drafter.context_out(rt, state, hidden, path, path_tokens, token)
    start, ids = state.cache.offset, drafter.tree_ids()

    def dist(o):  # (the ranked log-probabilities; a drawn tree's distributions)
        if drawn is None:
            return log_softmax(drafter.tree_logits(rt, o))
        return drawn[1](log_softmax(drafter.level_logits(rt, o)))

    def expand(level, h, tokens, mask):
        at = (start + level - 2, with_prefix(mask, start))
        o = drafter.rows_at(rt, h, tokens, state.cache, at)
        return o, dist(o)

    if drawn is None:
        candidates = grow(out, dist(out), expand, k, depth, ids)
    else:
        candidates = grow_drawn(out, dist(out), expand, k, drawn[0])
    state.cache.trim(state.cache.offset - start)  # (the tree's rows never stay)
    return candidates


def draft_tree(candidates, root: int, max_nodes: int) -> DraftTree:
    """:func:`select_nodes` over :func:`grow`'s device arrays (the one host read)."""
    tokens, parents, scores = candidates
    mx.eval(tokens, parents, scores)
    return select_nodes(root, tokens.tolist(), parents.tolist(), scores.tolist(), max_nodes)


# ---- drawn trees: dynamic trees under recursive rejection sampling -------------------
#
# Rejection sampling (tree.accept_by_rejection) needs each node's children to be draws
# without replacement, in draw order, from the distribution the verifier is given for
# that node; which children exist may depend on anything drawn before them (their
# ancestors, other nodes' draws) but never on their own values. A dynamic tree that
# keeps its best candidates breaks that: it drops a draw for being unlikely. So a drawn
# tree scores ranks, not tokens: its i-th draw at a node scores as the node's i-th largest
# log-probability (what EAGLE-2's score is for the i-th best draft), added along the path.
# Its shape is then a function of the distributions alone, decided level by level before
# the level's draws. (Scoring a draw by its own probability measured 4-8% fewer tokens per
# pass at 16 nodes: whether a draw is accepted follows its rank, not its probability.)


def level_budgets(k: int, depth: int, max_nodes: int) -> List[int]:
    """Nodes per level of a drawn tree: the static tree's of ``k`` ranks per level
    (:func:`~mlx_specstream.tree.static_tree`'s rank prior), at most ``k`` on level 1
    and ``k * k`` deeper (``k`` nodes expanded per level).

    Example:
        >>> level_budgets(4, 5, 16)
        [3, 3, 4, 4, 1]
        >>> level_budgets(2, 3, 16)
        [2, 4, 4]
    """
    counts = [0] * depth
    for level in static_tree([k] * depth, depth, max_nodes).levels[1:]:
        counts[level] += 1
    return [min(c, k if level == 0 else k * k) for level, c in enumerate(counts)]


def draws_of(q: mx.array, k: int):
    """``k`` draws without replacement from each row of ``q`` ``(R, V)`` (Gumbel top-k),
    in draw order, and each row's ``k`` largest log-probabilities, the scores of its
    ``k`` child slots, draw ``i`` in slot ``i`` (both ``(R, k)``)."""
    logq = mx.log(q)
    return gumbel_top_k(q, k).astype(mx.int32), mx.take_along_axis(logq, top_k_desc(logq, k), -1)


def kept_slots(keys: mx.array, budget: int) -> mx.array:
    """Which of each row's child slots a level keeps: the ``budget`` best ``keys``
    ``(R, k)`` over the level, as a prefix of each row's slots (a row's keys decrease
    along it; ties kept as the counts say), never a key of ``-inf``.

    Example:
        >>> keys = mx.array([[-1., -3.], [-2., -2.]])
        >>> kept_slots(keys, 3).tolist()
        [[True, False], [True, True]]
    """
    R, k = keys.shape
    best = top_k_desc(keys.reshape(1, -1), budget)[0] if budget else mx.zeros((0,), mx.int32)
    counts = (best[:, None] // k == mx.arange(R)[None]).sum(axis=0)
    return (mx.arange(k)[None] < counts[:, None]) & (keys > -mx.inf)


def grow_drawn(first_out: mx.array, first_q: mx.array, expand: Expand, k: int,
               budgets: Sequence[int]):  # fmt: skip
    """Grows a drawn tree's candidates on the device (see above).

    Level 1 keeps the first ``budgets[0]`` of ``k`` draws from ``first_q``. Each deeper
    level expands the ``k`` kept candidates of the level above whose path score is
    highest, draws ``k`` children at each, and keeps ``budgets[level - 1]`` of them by
    :func:`kept_slots`. A candidate's path score is its parent's plus its slot's score:
    draw ``i`` scores the ``i``-th largest log-probability of its parent's distribution.

    Args:
        first_out (mx.array): ``(1, D)`` the drafter's output that drafted level 1.
        first_q (mx.array): ``(1, V)`` its draft distribution.
        expand: as :func:`grow`'s, but returning each row's distribution ``(k, V)``.
        k (int): draws per expanded node, and nodes expanded per level.
        budgets (list): nodes kept per level (:func:`level_budgets`): the tree's depth.

    Returns:
        tuple: device arrays ``tokens``, ``parents`` and ``kept`` of the
        ``1 + k + (depth - 1) k^2`` candidates (candidate 0: the root), the draft
        distributions ``q`` ``(1 + (depth - 1) k, V)`` (row 0: the root's; then each
        level's expanded nodes') and ``expanded`` ``(depth - 1, k)``, the candidate each
        of those rows is, as :func:`drawn_tree` takes them.
    """
    toks, slots = draws_of(first_q, k)  # (1, k)
    kept = kept_slots(slots, budgets[0])[0]
    tokens, parents = [mx.array([-1], dtype=mx.int32), toks[0]], [mx.array([-1] + [0] * k)]
    keeps, qs, expanded = [mx.array([True]), kept], [first_q], []
    level_tok, level_score = toks[0], mx.where(kept, slots[0], -mx.inf)
    frontier, first = mx.arange(1, k + 1, dtype=mx.int32), 1 + k
    h, rows, mask = mx.repeat(first_out, k, axis=0), None, None
    for level in range(2, len(budgets) + 1):
        mask = expand_mask(mask, rows, k)
        out, q = expand(level, h, level_tok, mask)
        expanded.append(frontier)
        qs.append(q)
        toks, slots = draws_of(q, k)  # (k, k)
        score = level_score[:, None] + slots
        kept = kept_slots(score, budgets[level - 1])
        score = mx.where(kept, score, -mx.inf).reshape(-1)
        tokens.append(toks.reshape(-1))
        parents.append(mx.repeat(frontier, k))
        keeps.append(kept.reshape(-1))
        best = top_k_desc(score[None], k)[0].astype(mx.int32)  # (the next level's frontier)
        rows, frontier = best // k, first + best
        level_tok, level_score = mx.take(tokens[-1], best), mx.take(score, best)
        h, first = mx.take(out, rows, axis=0), first + k * k
    expanded = mx.stack(expanded) if expanded else mx.zeros((0, k), dtype=mx.int32)
    return (mx.concatenate(tokens), mx.concatenate(parents).astype(mx.int32),
            mx.concatenate(keeps), mx.concatenate(qs, axis=0), expanded)  # fmt: skip


def place_drawn(root: int, tokens: Sequence[int], parents: Sequence[int],
                kept: Sequence[bool], row_of: dict) -> Tuple[DraftTree, List[int]]:  # fmt: skip
    """The drawn tree of the ``kept`` candidates, depth-first, each node's children in
    draw order (candidate order), and each node's row of the draft distributions
    (``row_of[candidate]``; ``-1`` for a leaf).

    Example:
        >>> t, rows = place_drawn(7, [-1, 4, 5, 6, 8], [-1, 0, 0, 1, 1],
        ...                       [True, True, True, False, True], {0: 0, 1: 1, 2: 2})
        >>> t.tokens, t.parents, rows
        ([7, 4, 8, 5], [-1, 0, 1, 0], [0, 1, -1, -1])

    Candidate 3 (token 6) is not kept, so candidate 4 (token 8), the second draw
    under candidate 1, is its only child; candidate 2 was expanded but kept no child.
    """
    kids = {}
    for i in range(1, len(parents)):
        if kept[i]:
            assert parents[i] == 0 or kept[parents[i]], f"candidate {i}: its parent is not kept"
            kids.setdefault(parents[i], []).append(i)
    out_tokens, out_parents, rows = [root], [-1], [row_of[0] if kids.get(0) else -1]

    def place(node, at):
        for c in kids.get(node, []):
            out_tokens.append(int(tokens[c]))
            out_parents.append(at)
            rows.append(row_of[c] if kids.get(c) else -1)
            place(c, len(out_tokens) - 1)

    place(0, 0)
    return DraftTree(out_tokens, out_parents), rows


def drawn_tree(candidates, root: int, k: int):
    """:func:`place_drawn` over :func:`grow_drawn`'s device arrays (one host read), with
    the distributions of the tree's nodes that have children only (what the walk reads).

    Returns:
        tuple: the :class:`DraftTree`, those draft distributions ``q`` (device) and each
        node's row of them, as :func:`~mlx_specstream.tree.accept_by_rejection` takes them.
    """
    tokens, parents, kept, q, expanded = candidates
    mx.eval(tokens, parents, kept, expanded)
    row_of = {0: 0}
    for d, level in enumerate(expanded.tolist()):
        for r, c in enumerate(level):
            row_of[c] = 1 + d * k + r
    tree, rows = place_drawn(root, tokens.tolist(), parents.tolist(), kept.tolist(), row_of)
    used = sorted({r for r in rows if r >= 0})
    index = {r: i for i, r in enumerate(used)}
    q = mx.take(q, mx.array(used, dtype=mx.int32), axis=0)
    return tree, q, [index.get(r, -1) for r in rows]


__all__: List[str] = [
    "draft_tree", "draws_of", "drawn_tree", "expand_mask", "grow", "grow_drawn",
    "drafter_grows", "grown_candidates", "kept_slots", "level_budgets", "place_drawn", "select_nodes",
    "top_children",
]  # fmt: skip

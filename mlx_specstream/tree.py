"""Draft trees: construction, masks, pruning and acceptance, as pure functions.

A tree of ``T`` nodes is a list ``parents`` of length ``T`` with
``parents[0] == -1`` (the root) and ``parents[i] < i`` for every other node,
so every node comes after its ancestors. Everything but :func:`accept` and
:func:`top_k_desc` is numpy only, so the PyTorch side (``convert/``) uses the
same definitions. Trees are laid out depth-first with the most likely child
first, so the all-top-1 chain is a prefix of the node list: when the model
follows it, the accepted path needs no cache gather.
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np


@dataclass
class DraftTree:
    """A draft: ``tokens[0]`` is the root (already decided), the rest are drafts."""

    tokens: List[int]
    parents: List[int]

    def __len__(self):
        return len(self.tokens)


def build_draft_tree(
    root: int,
    stream_tokens: Sequence[Sequence[int]],
    stream_logprobs: Sequence[Sequence[float]],
    max_nodes: int,
) -> DraftTree:
    """Cartesian product of per-stream top-k tokens, capped at ``max_nodes``.

    Level ``g`` of the tree holds stream ``g``'s candidates, repeated under every
    level ``g - 1`` node. When the full product exceeds ``max_nodes`` the nodes
    with the highest path log-probability (sum of stream log-probabilities
    along the path) are kept; a child never scores above its parent, so the
    kept set contains the ancestors of every kept node.

    Example:
        >>> t = build_draft_tree(7, [[1, 2], [3, 4]], [[-.1, -2.], [-.2, -3.]], 7)
        >>> t.tokens, t.parents
        ([7, 1, 3, 4, 2, 3, 4], [-1, 0, 1, 1, 0, 4, 4])
        >>> t = build_draft_tree(7, [[1, 2], [3, 4]], [[-.1, -2.], [-.2, -3.]], 4)
        >>> t.tokens, t.parents
        ([7, 1, 3, 2], [-1, 0, 1, 0])

    The full tree is ``7 -> {1 -> {3, 4}, 2 -> {3, 4}}``. Capped at 4 nodes it
    keeps the three best non-root nodes: 1 (-0.1), 1-3 (-0.3) and 2 (-2.0).
    Ties go to the shallower node, then to the earlier one.

    Args:
        root (int): the root token.
        stream_tokens: ``gamma`` lists of candidate tokens, best first.
        stream_logprobs: their log-probabilities under each stream.
        max_nodes (int): the cap on the number of nodes, root included.

    Returns:
        DraftTree: the tree in depth-first, best-child-first order.
    """
    # Enumerate the full product depth-first: (tokens, parents, scores, depth).
    tokens, parents, scores, depths = [root], [-1], [0.0], [0]

    def expand(node, level):
        if level == len(stream_tokens):
            return
        for tok, lp in zip(stream_tokens[level], stream_logprobs[level]):
            tokens.append(int(tok))
            parents.append(node)
            scores.append(scores[node] + float(lp))
            depths.append(level + 1)
            expand(len(tokens) - 1, level + 1)

    expand(0, 0)
    if len(tokens) <= max_nodes:
        return DraftTree(tokens, parents)
    # Keep the best-scoring nodes.
    order = sorted(range(1, len(tokens)), key=lambda i: (-scores[i], depths[i], i))
    keep = sorted([0] + order[: max_nodes - 1])
    remap = {old: new for new, old in enumerate(keep)}
    return DraftTree(
        [tokens[i] for i in keep],
        [-1] + [remap[parents[i]] for i in keep[1:]],
    )


def tree_depths(parents: Sequence[int]) -> List[int]:
    """Depth of each node (the root has depth 0).

    Example:
        >>> tree_depths([-1, 0, 1, 1, 0])
        [0, 1, 2, 2, 1]
    """
    depths = []
    for p in parents:
        depths.append(0 if p < 0 else depths[p] + 1)
    return depths


def ancestor_mask(parents: Sequence[int]) -> np.ndarray:
    """``mask[i, j]`` is True when node ``j`` is node ``i`` or one of its ancestors.

    This is the tree attention mask (paper Fig. 10): a node sees its own
    root-to-node path and nothing else of the tree.

    Example:
        >>> ancestor_mask([-1, 0, 1, 0]).astype(int)
        array([[1, 0, 0, 0],
               [1, 1, 0, 0],
               [1, 1, 1, 0],
               [1, 0, 0, 1]])
    """
    n = len(parents)
    mask = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def prune_subtrees(parents: Sequence[int], edge_ok: Sequence[bool]) -> List[int]:
    """Nodes that survive pruning: the root, and nodes whose own edge and all
    ancestor edges pass (a failed node takes its whole subtree with it).

    Example:
        >>> prune_subtrees([-1, 0, 1, 0, 3], [False, True, True, False, True])
        [0, 1, 2]
    """
    kept = [True] * len(parents)
    for i, p in enumerate(parents):
        if p >= 0:
            kept[i] = kept[p] and bool(edge_ok[i])
    return [i for i, k in enumerate(kept) if k]


def subtree_parents(parents: Sequence[int], keep: Sequence[int]) -> List[int]:
    """Parent list of the sub-tree made of the ancestor-closed node set ``keep``.

    Example:
        >>> subtree_parents([-1, 0, 1, 0, 3], [0, 3, 4])
        [-1, 0, 1]
    """
    remap = {old: new for new, old in enumerate(keep)}
    return [-1 if parents[i] < 0 else remap[parents[i]] for i in keep]


def stream_attention_mask(
    ancestors: np.ndarray, num_streams: int, main_sees_streams: bool
) -> np.ndarray:
    """Multi-stream attention mask among the rows of one step (paper Eqs. 1-2).

    Rows are ``R`` main rows (one per tree node) followed by ``R * gamma``
    stream rows, node-major: stream ``j`` (1-based) of node ``a`` is row
    ``R + a * gamma + j - 1``. Keys are the same rows (the committed prefix,
    visible to every row, is prepended by the caller).

    * main row ``a`` sees the main rows of ``a``'s path; with
      ``main_sees_streams`` (shared mode) also all streams of node ``a``;
    * stream ``j`` of node ``a`` sees the main rows of ``a``'s path and
      streams ``1..j`` of node ``a``.

    Example (a single node, gamma = 2, shared mode):
        >>> stream_attention_mask(np.ones((1, 1), bool), 2, True).astype(int)
        array([[1, 1, 1],
               [1, 1, 0],
               [1, 1, 1]])

    Args:
        ancestors (np.ndarray): ``(R, R)`` output of :func:`ancestor_mask`.
        num_streams (int): gamma.
        main_sees_streams (bool): True in shared mode.

    Returns:
        np.ndarray: bool ``(R * (1 + gamma), R * (1 + gamma))``.
    """
    r, g = ancestors.shape[0], num_streams
    n = r * (1 + g)
    mask = np.zeros((n, n), dtype=bool)
    mask[:r, :r] = ancestors
    own = np.tril(np.ones((g, g), dtype=bool))
    for a in range(r):
        rows = slice(r + a * g, r + (a + 1) * g)
        mask[rows, :r] = ancestors[a]
        mask[rows, rows] = own
        if main_sees_streams:
            mask[a, rows] = True
    return mask


def accept(tokens, parents, ancestors, targets, depth=None):
    """Walks the tree with the target model's tokens, on device.

    ``targets[i]`` is the token the target model picks after node ``i``'s path
    (its argmax, or a sample from its distribution). Node ``i`` is accepted
    when every node on its path carries the token its parent's target picked.
    Sibling tokens are distinct, so the accepted nodes form one chain from
    the root; ``last`` is its deepest node and ``targets[last]`` the
    correction (or bonus) token.

    Example:
        >>> import mlx.core as mx
        >>> t, p = mx.array([5, 1, 2, 3]), mx.array([0, 0, 1, 0])
        >>> anc = mx.array(ancestor_mask([-1, 0, 1, 0]))
        >>> ok, last = accept(t, p, anc, mx.array([1, 9, 0, 0]))
        >>> ok.tolist(), last.item()
        ([True, True, False, False], 1)

    Args:
        tokens (mx.array): ``(T,)`` node tokens.
        parents (mx.array): ``(T,)`` parent index per node (any value for the root).
        ancestors (mx.array): ``(T, T)`` bool ancestor-or-self mask.
        targets (mx.array): ``(T,)`` target token after each node.
        depth (mx.array, optional): ``(T,)`` each node's depth (by default from
          ``ancestors``; a decoder passes its layout's, computed once).

    Returns:
        tuple: ``(accepted, last)``, a ``(T,)`` bool array and a scalar index.
    """
    import mlx.core as mx  # the rest of this module is numpy only (shared with convert/)

    # Nodes (the root aside: it is accepted whatever its token) whose token is not
    # their parent's target; a node is accepted when none of its ancestors is one.
    miss = tokens[1:] != targets[parents[1:]]
    accepted = ~mx.any(ancestors[:, 1:] & miss, axis=-1)
    if depth is None:
        depth = ancestors.sum(axis=-1) - 1
    last = mx.argmax(mx.where(accepted, depth, -1))
    return accepted, last


def certified_argmax(logits):
    """``(argmax, certified)`` of each row of ``logits``: the first index of the
    row's maximum, and whether it is surely also the first index of the maximum
    of ``logits - logsumexp(logits)`` computed in the logits' dtype (the
    log-probabilities mlx-lm's greedy sampler takes the argmax of).

    Subtracting one number per row, then rounding, keeps the order of a row's
    values but may merge two of them into one float: a larger value found after
    a smaller one would then lose to it. Values less than ``log(V) + 1`` from
    the row's log-sum-exp end up within ``M = log(V) + 1`` of 0 (the maximum's
    log-probability is at least ``-log(V)``), where the float spacing is at
    most ``u = eps * 2**ceil(log2(M))``; two values merge only if they are
    less than ``2u`` apart (``2u``: rounding from float32 first). So a row is
    certified when its maximum exceeds every earlier entry by more than ``2u``
    (later entries cannot win: the argmax takes the first index). The
    log-softmax over the whole vocabulary of every tree node is then needed
    only for rows that are not certified.

    Example (float32, ``eps = 2**-23``; with 4 entries ``2u = 2**-20``). The
    second row's maximum leads by one float spacing, and its log-probabilities
    do merge, so mlx-lm's greedy pick there is index 0::

        >>> import mlx.core as mx
        >>> x = mx.array([[0.0, 3.0, 1.0, 3.0],                # a clear maximum
        ...               [0.5, 0.5 + 2**-24, 0.5, 0.5]])      # 2**-24 apart
        >>> top, ok = certified_argmax(x)
        >>> top.tolist(), ok.tolist()
        ([1, 1], [True, False])
        >>> mx.argmax(x - mx.logsumexp(x, axis=-1, keepdims=True), axis=-1).tolist()
        [1, 0]

    Args:
        logits (mx.array): ``(R, V)`` logits (float32, float16 or bfloat16).

    Returns:
        tuple: ``(R,)`` uint32 indices and ``(R,)`` bools.
    """
    import math

    import mlx.core as mx  # the rest of this module is numpy only (shared with convert/)

    V = logits.shape[-1]
    u = mx.finfo(logits.dtype).eps * 2.0 ** math.ceil(math.log2(math.log(V) + 1))
    top = mx.argmax(logits, axis=-1)
    x = logits.astype(mx.float32)
    earlier = mx.arange(V)[None, :] < top[:, None]
    runner_up = mx.max(mx.where(earlier, x, -mx.inf), axis=-1)
    best = mx.take_along_axis(x, top[:, None].astype(mx.int32), axis=-1)[:, 0]
    return top, (best - runner_up) > 2 * u


def top_k_desc(scores, k: int):
    """Indices of the ``k`` largest scores of each row, largest first, on device.

    A partial selection (``argpartition``) then a sort of the ``k`` chosen:
    on a CPU a full ``argsort`` of a vocabulary-wide row costs about 17 times
    as much (1.9 ms against 0.11 ms for 3 x 8,000). For ``k = 1`` (a chain's
    drafts) an ``argmax``: one kernel instead of six. Ties may come in any order.

    Example:
        >>> import mlx.core as mx
        >>> top_k_desc(mx.array([[0.1, 0.7, 0.3, 0.9], [4.0, 1.0, 3.0, 2.0]]), 2).tolist()
        [[3, 1], [0, 2]]
        >>> top_k_desc(mx.array([[0.1, 0.7, 0.3, 0.9], [4.0, 1.0, 3.0, 2.0]]), 1).tolist()
        [[3], [0]]

    Args:
        scores (mx.array): ``(..., V)`` scores (logits or log-probabilities).
        k (int): how many per row, ``1 <= k``.

    Returns:
        mx.array: ``(..., min(k, V))`` int indices.
    """
    import mlx.core as mx

    if k >= scores.shape[-1]:
        return mx.argsort(-scores, axis=-1)
    if k == 1:
        return mx.argmax(scores, axis=-1, keepdims=True)
    idx = mx.argpartition(-scores, k - 1, axis=-1)[..., :k]
    order = mx.argsort(-mx.take_along_axis(scores, idx, axis=-1), axis=-1)
    return mx.take_along_axis(idx, order, axis=-1)


def gumbel_top_k(q, k: int):
    """``k`` draws without replacement from each row of the distributions ``q``
    ``(..., V)``, in draw order (Gumbel top-k): the siblings rejection sampling takes."""
    import mlx.core as mx

    return top_k_desc(mx.log(q) + mx.random.gumbel(q.shape), k)


def children_of(parents: Sequence[int]) -> List[List[int]]:
    """Child lists, in node order.

    Example:
        >>> children_of([-1, 0, 1, 0])
        [[1, 3], [2], [], []]
    """
    kids = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            kids[p].append(i)
    return kids


def draw(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from ``probs`` with the uniform ``u`` in [0, 1)."""
    cdf = np.cumsum(probs, dtype=np.float64)
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(probs) - 1))


def accept_by_rejection(tokens, parents, target_probs, draft_probs, uniforms, draft_rows=None):
    """Recursive rejection sampling down a draft tree (lossless, multi-draft).

    Siblings must be draws *without replacement*, in draw order, from the
    draft distribution of their parent, ``draft_probs[draft_rows[parent]]``
    (default: of their level, ``draft_probs[depth of parent]``). At a
    node with target distribution ``p``, each child ``x`` in turn is accepted
    with probability ``min(1, p(x) / q(x))``; on rejection ``p`` becomes the
    normalised residual ``max(p - q, 0)`` and ``x`` is removed from ``q``
    (recursive rejection sampling, Jeon et al. 2024; SpecInfer's multi-draft
    verification). Accepting a child moves the walk to it; when no child is
    accepted, or at a leaf, the next token is drawn from the current ``p``.
    Every emitted token is then distributed exactly as the target.

    A child drawn once ``q`` has no mass left (more siblings than tokens the
    draft distribution allows: a sampler's top-k or top-p, a draft vocabulary)
    is no draw from it but fixed by the draws before it: it is verified as a
    fixed proposal, accepted with probability ``p(x)``, ``x`` then removed from
    ``p`` on rejection.

    Example (one child, token 1, with p = q: always accepted; then a leaf):
        >>> p = np.array([[0.5, 0.5], [0.9, 0.1]]); q = np.array([[0.5, 0.5]])
        >>> accept_by_rejection([0, 1], [-1, 0], p, q, [0.99, 0.95])
        ([0, 1], 1)

    Example (q's one token 0 rejected, then token 2 past its mass: the residual
    gives it 0.625, so u = 0.7 rejects it and token 1 is drawn from what is left):
        >>> p = np.array([[0.2, 0.3, 0.5]] + [[1.0, 0.0, 0.0]] * 2)
        >>> q = np.array([[1.0, 0.0, 0.0]])
        >>> accept_by_rejection([9, 0, 2], [-1, 0, 0], p, q, [0.9, 0.7, 0.5])
        ([0], 1)

    Args:
        tokens, parents: the tree (node 0 is the root).
        target_probs: ``(T, V)`` target distribution after each node's path.
        draft_probs: ``(depth, V)`` draft distribution of each tree level, or of
          each node with children where ``draft_rows`` is given.
        uniforms: at least ``T + 1`` numbers in [0, 1), consumed in order.
        draft_rows (list, optional): ``(T,)`` each node's row of ``draft_probs``
          (a drawn dynamic tree's: :func:`~mlx_specstream.dynamic_tree.grow_drawn`).

    Returns:
        tuple: ``(path, token)``, the accepted nodes from the root and the next token.
    """
    kids, u = children_of(parents), iter(uniforms)
    rows = tree_depths(parents) if draft_rows is None else draft_rows
    cur, path = 0, [0]
    while True:
        p = np.asarray(target_probs[cur], dtype=np.float64)
        if kids[cur]:
            q = np.array(draft_probs[rows[cur]], dtype=np.float64)
        for c in kids[cur]:
            x = tokens[c]
            fixed = q[x] <= 0.0  # (drawn past q's mass: a fixed proposal)
            if next(u) * (1.0 if fixed else q[x]) < p[x]:
                cur = c
                path.append(c)
                break
            if fixed:
                residual = p.copy()
                residual[x] = 0.0
            else:
                residual = np.maximum(p - q, 0.0)
            if residual.sum() > 0:  # zero only if p == q, where x is always accepted
                p = residual / residual.sum()
            q[x] = 0.0
            if q.sum() > 0:
                q = q / q.sum()
        else:
            return path, draw(p, next(u))


# A draft's rank prior for static trees: rank r of a stream is taken to be right
# with probability 0.6 * 0.3**r (top-1 accuracy and decay typical of trained streams).
_RANK_LOGPROB = (np.log(0.6), np.log(0.3))


@dataclass(frozen=True)
class StaticTree:
    """A draft tree's topology, fixed for a whole generation.

    Node ``i > 0`` carries the token of rank ``ranks[i]`` at tree level
    ``levels[i]`` (0-based: the stream, drafter head or level that drafts it);
    node 0 is the root. Only the tokens change from step to step, so masks,
    positions and gather indices are computed once.
    """

    parents: tuple
    levels: tuple
    ranks: tuple

    def __len__(self):
        return len(self.parents)


def static_tree(ks: Sequence[int], depth: int, max_nodes: int) -> StaticTree:
    """The Cartesian-product tree of ``ks[g]`` ranks per level, capped at
    ``max_nodes`` by a fixed rank prior instead of the step's own scores.

    Rank ``r`` scores ``log 0.6 + r log 0.3`` at every level; a path's score is
    the sum over its nodes, and the cap keeps the best paths exactly as
    :func:`build_draft_tree` does (ties to the shallower, then earlier node).
    The layout is depth-first, best child first, so the all-rank-0 chain is a
    prefix of the node list.

    Example:
        >>> t = static_tree([2, 2], 2, 5)
        >>> t.parents, t.levels, t.ranks
        ((-1, 0, 1, 1, 0), (-1, 0, 1, 1, 0), (-1, 0, 0, 1, 1))

    Of the 7 nodes of the full tree, the cap keeps rank 0 (score -0.51), its
    children 0-0 (-1.02) and 0-1 (-2.23), and rank 1 (-1.71); 1-0 (-2.23) ties
    with 0-1 and loses as the later node.
    """
    a, b = _RANK_LOGPROB
    levels = [list(range(k)) for k in ks[:depth]]
    scores = [[a + r * b for r in range(k)] for k in ks[:depth]]
    t = build_draft_tree(-1, levels, scores, max_nodes)
    return StaticTree(
        tuple(t.parents), tuple(d - 1 for d in tree_depths(t.parents)), tuple(t.tokens)
    )


def depth_limited(parents: Sequence[int], max_depth: int) -> List[int]:
    """Nodes of depth at most ``max_depth`` (an ancestor-closed sub-tree).

    Example:
        >>> depth_limited([-1, 0, 1, 2, 0], 1)
        [0, 1, 4]
    """
    return [i for i, d in enumerate(tree_depths(parents)) if d <= max_depth]


def path_to(node: int, parents: Sequence[int]) -> List[int]:
    """Nodes on the path from the root to ``node``, both included.

    Example:
        >>> path_to(3, [-1, 0, 1, 1])
        [0, 1, 3]
    """
    path = [node]
    while path[-1] > 0:
        path.append(parents[path[-1]])
    return path[::-1]


def path_rows(parents: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tree below its root as rows of a batch, one per root-to-leaf path: what a
    layer that reads its tokens in order (a recurrent mixer) runs a tree as.

    Node ``i > 0`` is item ``i - 1`` of the rows' input (the root is not in it). Row
    ``r`` lists leaf ``r``'s path below the root, padded by repeating its last node up
    to the deepest path; node ``i`` is read back from row ``row[i - 1]`` at column
    ``col[i - 1]`` (the first leaf's path through it). The padding's outputs are
    never read, and a padded row's final state is not a path's.

    Example:
        >>> paths, row, col = path_rows([-1, 0, 1, 0])
        >>> paths.tolist(), row.tolist(), col.tolist()
        ([[0, 1], [2, 2]], [0, 0, 1], [0, 1, 0])

    Nodes 1 and 2 form the first path (items 0, 1), node 3 alone the second, padded.
    """
    kids = children_of(parents)
    leaves = [n for n in range(1, len(parents)) if not kids[n]]
    rows = [path_to(leaf, parents)[1:] for leaf in leaves]
    span = max(len(r) for r in rows)
    paths = np.array([[n - 1 for n in r + [r[-1]] * (span - len(r))] for r in rows], np.int32)
    row, col = np.zeros(len(parents) - 1, np.int32), np.zeros(len(parents) - 1, np.int32)
    for r in reversed(range(len(rows))):  # (the first path through a node wins)
        for c, n in enumerate(rows[r]):
            row[n - 1], col[n - 1] = r, c
    return paths, row, col


def path_table(parents: Sequence[int]) -> np.ndarray:
    """``(T, depth + 1)`` table: row ``n`` lists the nodes on the path to node ``n``
    (:func:`path_to`), padded with ``n`` itself up to the tree's deepest path.

    A pipelined step gathers an accepted path's cache rows on the device with
    one row of this table, before the host knows which node was accepted;
    the padding rows are overwritten by the next tree's rows.

    Example:
        >>> path_table([-1, 0, 1, 0])
        array([[0, 0, 0],
               [0, 1, 1],
               [0, 1, 2],
               [0, 3, 3]], dtype=int32)
    """
    paths = [path_to(n, parents) for n in range(len(parents))]
    span = max(len(p) for p in paths)
    return np.array([p + [p[-1]] * (span - len(p)) for p in paths], dtype=np.int32)


def fold_destinations(parents: Sequence[int], rows: int) -> np.ndarray:
    """``(T, rows)`` table: row ``n`` says where a pipelined fold writes each of the
    ``rows`` cache rows a pass appended when node ``n``'s path was accepted, as
    offsets from the committed prefix: the ``i``-th node on the path goes to
    ``i``, every other row to ``len(path)``, the first slot the next pass's own
    rows overwrite. Rows past the tree's nodes (stream rows) are never on a path.

    One row of it, gathered on the device, lets a single scatter per cache
    array fold the path (no gather of the path's rows first).

    Example:
        >>> fold_destinations([-1, 0, 1, 0], 5)
        array([[0, 1, 1, 1, 1],
               [0, 1, 2, 2, 2],
               [0, 1, 2, 3, 3],
               [0, 2, 2, 1, 2]], dtype=int32)
    """
    if rows < len(parents):
        raise ValueError(f"rows={rows} is fewer than the tree's {len(parents)} nodes.")
    table = np.empty((len(parents), rows), dtype=np.int32)
    for n in range(len(parents)):
        path = path_to(n, parents)
        table[n] = len(path)
        table[n, path] = np.arange(len(path))
    return table


def merge_chains(
    tokens: Sequence[int],
    parents: Sequence[int],
    chains: Sequence[Sequence[int]],
    max_nodes: int,
) -> DraftTree:
    """A tree holding ``chains`` below the root first, in their order, then the
    nodes of the tree ``(tokens, parents)`` that still fit in ``max_nodes``.

    Each chain (an n-gram draft) walks down the tree built so far where a child
    already carries its next token and branches off where none does, so
    siblings stay distinct; a chain stops where the cap is reached. The tree's
    own nodes then follow in their order; one whose parent did not fit is
    dropped with its subtree.

    Example:
        >>> t = merge_chains([7, 1, 3, 2], [-1, 0, 1, 0], [[1, 5, 6]], 5)
        >>> t.tokens, t.parents
        ([7, 1, 5, 6, 3], [-1, 0, 1, 2, 1])
        >>> t = merge_chains([7], [-1], [[1, 5, 6], [1, 8], [2]], 6)
        >>> t.tokens, t.parents
        ([7, 1, 5, 6, 8, 2], [-1, 0, 1, 2, 1, 0])

    In the first, the chain 1-5-6 shares node 1 with the tree; 3 (under 1) still
    fits and 2 (under the root) does not. In the second, three chains from the
    root alone: 1-8 shares node 1 with the first.
    """
    out_tokens, out_parents = [tokens[0]], [-1]
    children = {}  # (parent in the output, token) -> node in the output

    def add(parent, token):
        key = (parent, token)
        if key not in children:
            if len(out_tokens) >= max_nodes:
                return None
            children[key] = len(out_tokens)
            out_tokens.append(token)
            out_parents.append(parent)
        return children[key]

    for chain in chains:
        node = 0
        for token in chain:
            node = add(node, int(token))
            if node is None:
                break
    where = {0: 0}
    for i in range(1, len(tokens)):
        if parents[i] in where:
            new = add(where[parents[i]], int(tokens[i]))
            if new is not None:
                where[i] = new
    return DraftTree(out_tokens, out_parents)

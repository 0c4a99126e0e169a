"""A draft tree's masks and positions on the device, built once per topology.

A step's masks are ``[committed prefix | tree]`` columns: the prefix part is
all ones and only the tree part depends on the topology, so it is kept here
and joined to the prefix on the device each step: at a host offset
(:func:`with_prefix`), or at an offset only the device knows yet
(:func:`place_mask`; :func:`place_window` for pipelined steps).
"""

from functools import lru_cache
from typing import Sequence

import mlx.core as mx
import numpy as np

from .tree import ancestor_mask, fold_destinations, path_table, stream_attention_mask, tree_depths


class TreeLayout:
    """One tree topology (a parent list) as host and device arrays.

    Attributes:
        parents (tuple): the parent of each node, ``-1`` for the root.
        depth (np.ndarray): ``(T,)`` depth of each node.
        ancestors (np.ndarray): ``(T, T)`` bool ancestor-or-self mask.
        depth_mx, ancestors_mx, parents_mx (mx.array): the same on the device
          (``parents_mx`` has ``0`` for the root, for gathers).
        paths_mx (mx.array): ``(T, depth + 1)`` padded path to each node
          (:func:`~mlx_specstream.tree.path_table`).
    """

    def __init__(self, parents: Sequence[int]):
        self.parents = tuple(int(p) for p in parents)
        self.depth = np.array(tree_depths(self.parents))
        self.ancestors = ancestor_mask(self.parents)
        self.depth_mx = mx.array(self.depth, dtype=mx.int32)
        self.ancestors_mx = mx.array(self.ancestors)
        self.parents_mx = mx.array((0,) + self.parents[1:], dtype=mx.int32)
        self.is_chain = self.parents == tuple(range(-1, len(self.parents) - 1))
        self._stream_masks = {}
        self._paths = None
        self._fold_tables = {}

    @property
    def paths_mx(self) -> mx.array:
        if self._paths is None:
            self._paths = mx.array(path_table(self.parents))
        return self._paths

    def fold_table(self, rows: int) -> mx.array:
        """``(T, rows)`` :func:`~mlx_specstream.tree.fold_destinations` on the device."""
        if rows not in self._fold_tables:
            self._fold_tables[rows] = mx.array(fold_destinations(self.parents, rows))
        return self._fold_tables[rows]

    def __len__(self):
        return len(self.parents)

    def stream_mask(self, num_streams: int, shared: bool) -> mx.array:
        """The multi-stream mask of this tree's rows (:func:`stream_attention_mask`)."""
        key = (num_streams, shared)
        if key not in self._stream_masks:
            m = stream_attention_mask(self.ancestors, num_streams, shared)
            self._stream_masks[key] = mx.array(m)
        return self._stream_masks[key]


@lru_cache(maxsize=256)
def _layout(parents: tuple) -> TreeLayout:
    return TreeLayout(parents)


def layout_of(parents: Sequence[int]) -> TreeLayout:
    """The (cached) layout of a parent list."""
    return _layout(tuple(int(p) for p in parents))


_COLUMNS = {}  # (rows, value) -> an evaluated (rows, n) bool array, grown as needed


def kept_columns(rows: int, count: int, value: bool) -> mx.array:
    """``(rows, count)`` bool columns all ``value``: a view of an array kept per
    ``(rows, value)`` and grown as contexts grow, so a step's graph holds no fill."""
    kept = _COLUMNS.get((rows, value))
    if kept is None or kept.shape[1] < count:
        kept = _COLUMNS[(rows, value)] = mx.full((rows, max(2 * count, 256)), value, mx.bool_)
        mx.eval(kept)
    return kept[:, :count]


def with_prefix(mask: mx.array, prefix: int) -> mx.array:
    """Prepends ``prefix`` always-visible columns (the committed cache) to ``(R, C)`` ``mask``.

    The visible columns are a view of an all-True array kept per ``R``, so a
    step's graph holds one concatenation per mask, not also a fill."""
    if prefix == 0:
        return mask
    return mx.concatenate([kept_columns(mask.shape[0], prefix, True), mask], axis=1)


def place_mask(mask: mx.array, start: mx.array, length: int) -> mx.array:
    """``(R, length)``: ``mask``'s ``(R, C)`` tree columns placed at column ``start``
    (a device scalar) of a cache view ``length`` columns long.

    Columns before ``start`` (the committed prefix) are visible to every row,
    columns ``start .. start + C - 1`` follow ``mask``, and later ones (rows
    a pipelined step's cache holds beyond the tree) are hidden.

    Example: ``mask = [[1, 0], [1, 1]]``, ``start = 2``, ``length = 5``::

        [[1, 1, 1, 0, 0],
         [1, 1, 1, 1, 0]]

    With ``start = p`` and ``length = p + C`` this is ``with_prefix(mask, p)``.
    """
    C = mask.shape[1]
    rel = mx.arange(length, dtype=mx.int32) - start  # each column relative to the tree
    tree = mx.take(mask, mx.clip(rel, 0, C - 1), axis=1) & ((rel >= 0) & (rel < C))[None]
    return (rel < 0)[None] | tree


_WINDOWS = {}  # (id(mask), width) -> (mask, table); the mask is held so its id stays its own


def window_table(mask: mx.array, width: int) -> mx.array:
    """``(width - C + 1, R, width)``: :func:`place_mask` of ``(R, C)`` ``mask`` at
    each column ``0 .. width - C`` of a ``width``-column view, stacked. Built and
    evaluated once per mask and width (masks are kept per tree layout), so
    placing a mask at a column only the device knows is one gather per step.

    Example: ``mask = [[1, 0], [1, 1]]``, ``width = 3``::

        [[[1, 0, 0],      start 0
          [1, 1, 0]],
         [[1, 1, 0],      start 1
          [1, 1, 1]]]
    """
    key = (id(mask), width)
    hit = _WINDOWS.get(key)
    if hit is None or hit[0] is not mask:
        if len(_WINDOWS) >= 256:
            _WINDOWS.clear()
        starts = range(width - mask.shape[1] + 1)
        table = mx.stack([place_mask(mask, mx.array(a), width) for a in starts])
        mx.eval(table)
        hit = _WINDOWS[key] = (mask, table)
    return hit[1]


def place_window(mask: mx.array, base: int, accepted: mx.array, width: int) -> mx.array:
    """:func:`place_mask` of ``mask`` at column ``base + accepted`` of a view
    ``base + width`` columns long, built as ``base`` visible columns before a
    ``width``-column window: the row ``accepted`` of :func:`window_table`
    (``0 <= accepted <= width - C``). Its kernels (a gather and a
    concatenation) and its work do not grow with the context.

    Example: ``mask = [[1, 0], [1, 1]]``, ``base = 1``, ``accepted = 1``,
    ``width = 4`` is ``place_mask(mask, 2, 5)``::

        [[1, 1, 1, 0, 0],
         [1, 1, 1, 1, 0]]
    """
    window = mx.take(window_table(mask, width), accepted.reshape(()), axis=0)
    return with_prefix(window, base)


def bucketed(columns: int, bucket: int) -> int:
    """``columns`` rounded up to a multiple of ``bucket`` (``0``: as is).

    Example: ``bucketed(300, 256)`` is 512, ``bucketed(512, 256)`` 512,
    ``bucketed(300, 0)`` 300.
    """
    return -(-columns // bucket) * bucket if bucket else columns


def pad_hidden(mask: mx.array, bucket: int) -> mx.array:
    """``(R, bucketed(C, bucket))``: bool ``mask`` ``(R, C)`` followed by hidden
    columns up to the next multiple of ``bucket`` (``0``: as is).

    A pass whose cache view is that many columns long (its rows past the
    pass's own hold zeros or stale rows) attends exactly as over ``C``
    columns, and its attention's shapes change once per ``bucket`` tokens, not
    every step: MLX's CUDA backend builds a cuDNN attention graph for each new
    shape (its one-row decoding kernel avoids that the same way).

    Example: ``mask = [[1, 0, 0], [1, 1, 0]]``, ``bucket = 4``::

        [[1, 0, 0, 0],
         [1, 1, 0, 0]]
    """
    rows, cols = mask.shape
    extra = bucketed(cols, bucket) - cols
    if extra == 0:
        return mask
    return mx.concatenate([mask, kept_columns(rows, extra, False)], axis=1)

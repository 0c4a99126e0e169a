"""Pure functions over attention masks and positions that the tree verifier applies to
a wrapped mlx-lm model's layers (:class:`~mlx_specstream.streams.StreamRuntime`): sliding
windows and attention chunks cut into a pass's mask, the positions of its columns, a
batch's rows' mask over a ragged cache, and Llama 4's position-dependent scales. Each
gives the same floats or booleans as mlx-lm's own code for one token at a time.
"""

import mlx.core as mx
import numpy as np


def llama4_attention_scale(positions: mx.array, beta: float, max_positions: int) -> mx.array:
    """Llama 4's attention scale (Ministral 3 takes it), ``1 + beta * log(1 +
    floor(p / max_positions))`` per position ``p``, in the operations' order of
    mlx-lm's ``_get_llama_4_attn_scale`` (so the same floats).

    Example (beta 0.5, 4 positions per step of the scale):

    >>> s = llama4_attention_scale(mx.array([0, 3, 4, 9]), 0.5, 4)
    >>> [round(v, 4) for v in s.tolist()]
    [1.0, 1.0, 1.3466, 1.5493]
    """
    return 1 + beta * mx.log(1 + mx.floor(positions / max_positions))


def llama4_query_scale(positions: mx.array, floor_scale: int, attn_scale: float) -> mx.array:
    """The query scale of Llama 4's NoPE layers (``attn_temperature_tuning``),
    ``log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1`` per position ``p``,
    in the operations' order of mlx-lm's ``llama4.Attention`` (so the same floats).

    Example (4 positions per step of the scale, ``attn_scale`` 0.5):

    >>> s = llama4_query_scale(mx.array([0, 2, 3, 8]), 4, 0.5)
    >>> [round(v, 4) for v in s.tolist()]
    [1.0, 1.0, 1.3466, 1.5493]
    """
    return mx.log(mx.floor((positions + 1) / floor_scale) + 1.0) * attn_scale + 1.0


def window_cut(mask: mx.array, positions: mx.array, window: int) -> mx.array:
    """``mask`` with every column at or before ``position - window`` hidden from the
    row at that position, as mlx-lm's ``create_causal_mask`` does with
    ``window_size``: columns are positions (the cache's rows from 0, then the pass's
    own rows, which sit at or past their positions). ``positions`` holds one per
    row of ``mask`` (its axes but the last, flattened), or one set every batch row
    shares.

    Example: window 3, a cache of 4 tokens and a chain of 2 rows at positions 4
    and 5 (``mask`` ``(2, 6)``, causal):

    >>> causal = mx.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=mx.bool_)
    >>> window_cut(causal, mx.array([4, 5]), 3).astype(mx.int32).tolist()
    [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    """
    rows = int(np.prod(mask.shape[:-1]))
    pos = positions.reshape(*mask.shape[:-1], 1) if positions.size == rows else (
        positions.reshape(-1, 1))  # fmt: skip
    return mask & (mx.arange(mask.shape[-1], dtype=mx.int32) > pos - window)


def column_positions(width: int, rows_at, rows: mx.array) -> mx.array:
    """``(width,)``: the position of each column of a pass's mask: the cache's rows
    at their positions (column ``c`` at ``c``), then, from column ``rows_at`` (an int
    or a device scalar), the pass's own rows at theirs (``rows``); columns past
    them (stale rows of a pipelined pass, hidden by the mask) at their index.

    Example: 3 cached tokens, a tree whose root has two children (positions 3, 4,
    4), a view 7 columns long:

    >>> column_positions(7, 3, mx.array([3, 4, 4])).tolist()
    [0, 1, 2, 3, 4, 4, 6]
    """
    idx = mx.arange(width, dtype=mx.int32)
    k = idx - rows_at
    n = rows.shape[0]
    own = mx.take(rows, mx.clip(k, 0, n - 1).reshape(-1))
    return mx.where((k >= 0) & (k < n), own, idx)


def chunk_cut(mask: mx.array, positions: mx.array, columns: mx.array, chunk: int) -> mx.array:
    """``mask`` with every column before its row's chunk hidden: a row at position
    ``p`` sees the columns at positions ``(p // chunk) * chunk`` and after (Llama 4's
    chunked attention, as mlx-lm's chunk mask). ``positions`` holds one per row of
    ``mask``; ``columns`` one per column (:func:`column_positions`).

    Example: chunks of 4, 3 cached tokens, a root (position 3) with two children
    (position 4: the next chunk, which sees no earlier column but its own):

    >>> tree = mx.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 1]])
    >>> cols = column_positions(6, 3, mx.array([3, 4, 4]))
    >>> chunk_cut(tree.astype(mx.bool_), mx.array([3, 4, 4]), cols, 4).astype(mx.int32).tolist()
    [[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
    """
    rows = int(np.prod(mask.shape[:-1]))
    pos = positions.reshape(*mask.shape[:-1], 1) if positions.size == rows else (
        positions.reshape(-1, 1))  # fmt: skip
    return mask & (columns >= (pos // chunk) * chunk)


def rows_mask(block: mx.array, ends: mx.array, held: int) -> mx.array:
    """``(B, 1, R, held + C)``: the mask of ``R`` rows per batch row over the columns
    of ``C`` rows written after each row's ``ends[b]`` cached tokens (of ``held``
    columns at most): they see every cached token of their row and, among those
    ``C``, ``block`` ``(R, C)`` (square where the rows are the ones written; a
    KV-sharing layer's rows read the ``C`` rows of a lower layer).

    Example: ``block = [[1, 0], [1, 1]]``, ``ends = [1, 0]``, ``held = 1``::

        row 0:  [[1, 1, 0],     row 1:  [[1, 0, 0],
                 [1, 1, 1]]              [1, 1, 0]]
    """
    C = block.shape[1]
    rel = mx.arange(held + C, dtype=mx.int32)[None] - ends.astype(mx.int32)[:, None]
    inside = mx.take(block, mx.clip(rel, 0, C - 1), axis=1)  # (R, B, held + C)
    mask = (rel < 0)[None] | (inside & (rel < C)[None])
    return mask.transpose(1, 0, 2)[:, None]

"""RoPE from precomputed tables, bit for bit as MLX's CPU backend computes it.

On MLX's CPU backend ``mx.fast.rope`` is not one kernel: it builds the
positions, the inverse frequencies, their cosines and sines, and then the
rotation, about 16 kernels per call (``benchmarks/RESULTS.md``, "The step's cost").
A decode step calls it twice per layer with the same positions, so most of
that work repeats: a 6-layer pass spends close to half its kernels on it.
Here the cosines and sines are read from the model's own RoPE module once
(the runtime keeps a table of positions and gathers each pass's rows), and
each call only rotates, in four kernels. GPUs run ``mx.fast.rope`` as one
kernel, so the tables are for the CPU only.

Exactness: MLX's fallback computes ``concat(x1 * c - x2 * s, x1 * s + x2 * c)``
(``x1, x2`` the two halves of the rotated dims; the even and odd entries when
``traditional``). :func:`rotate` computes ``x * C + swap(x) * S`` with
``C = [c, c]`` and ``S = [-s, s]``: in IEEE arithmetic ``x2 * (-s)`` is
``-(x2 * s)`` and ``a + (-b)`` is ``a - b``, and addition commutes, so every
element is the same float. The tables themselves come from the module's own
call on a probe whose rotated halves are 1 and 0 (``1 * c - 0 * s`` is ``c``),
so base, frequencies and scale are the module's, whatever its class.

Example (positions 5 and 9, a 4-dim head, base 10000):
    >>> import mlx.core as mx, mlx.nn as nn
    >>> rope = nn.RoPE(4)
    >>> pos = mx.array([5, 9])
    >>> t = tables(nn.RoPE.__call__, rope, pos, 4, mx.float32)
    >>> t.cos.shape, t.sin.shape   # one row per position, [c, c] and [-s, s]
    ((2, 4), (2, 4))
    >>> x = mx.random.normal((1, 2, 2, 4))  # (batch, heads, rows, dims)
    >>> ref = rope(x.transpose(2, 1, 0, 3), offset=pos).transpose(2, 1, 0, 3)
    >>> bool(mx.array_equal(rotate(x, t), ref))
    True
"""

from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn


class RopeTables(NamedTuple):
    """Per-row rotation tables, ``(rows, dims)`` each, in the activations' dtype."""

    cos: mx.array  # [c, c] (interleaved when traditional)
    sin: mx.array  # [-s, s]
    dims: int  # rotated dims (a prefix of the head; the rest passes through)
    traditional: bool


def table_classes():
    """RoPE classes whose call is ``mx.fast.rope`` on its input, nothing more (the
    probe then reads exactly the rotation it applies)."""
    from mlx_lm.models import rope_utils

    names = ("Llama3RoPE", "ProportionalRoPE")
    return (nn.RoPE,) + tuple(getattr(rope_utils, n) for n in names if hasattr(rope_utils, n))


def rope_settings(rope) -> Optional[tuple]:
    """``(dims, traditional)`` of a RoPE module whose rotation tables can be read
    (:func:`table_classes`, judged by its class before any hook), else None."""
    original = next((c for c in type(rope).__mro__ if not getattr(c, "_spec_hook", False)), None)
    if original not in table_classes():
        return None
    return int(rope.dims), bool(rope.traditional)


def tables(call, rope, positions: mx.array, head_dim: int, dtype, settings=None) -> RopeTables:
    """The tables of ``rope`` (through its class's own ``call``) at ``positions`` ``(rows,)``.

    Args:
        call: the RoPE class's ``__call__`` (``rope.__call__`` before any hook).
        rope: the module; :func:`rope_settings` must not be None for it.
        positions (mx.array): int positions, one per row.
        head_dim (int): the last axis of the arrays to rotate.
        dtype: their dtype (MLX casts the cosines and sines to it).
    """
    dims, traditional = settings or rope_settings(rope)
    half = dims // 2
    ones = mx.ones((half,), dtype)
    if traditional:  # even entries 1, odd ones 0
        probe = mx.stack([ones, mx.zeros_like(ones)], axis=-1).reshape(dims)
    else:
        probe = mx.concatenate([ones, mx.zeros_like(ones)])
    if head_dim > dims:
        probe = mx.concatenate([probe, mx.zeros((head_dim - dims,), dtype)])
    rows = positions.shape[0]
    # One row per position on the batch axis, as the step's per-row RoPE runs.
    out = call(rope, mx.broadcast_to(probe, (rows, 1, 1, head_dim)), offset=positions)
    out = out.reshape(rows, head_dim)[:, :dims]
    if traditional:
        c, s = out[:, 0::2], out[:, 1::2]
        cos = mx.stack([c, c], axis=-1).reshape(rows, dims)
        sin = mx.stack([-s, s], axis=-1).reshape(rows, dims)
    else:
        c, s = out[:, :half], out[:, half:]
        cos, sin = mx.concatenate([c, c], axis=1), mx.concatenate([-s, s], axis=1)
    return RopeTables(cos, sin, dims, traditional)


def rotate(x: mx.array, t: RopeTables) -> mx.array:
    """``x`` ``(B, heads, rows, head_dim)`` rotated by the tables of its rows."""
    dims, head_dim = t.dims, x.shape[-1]
    xr = x if dims == head_dim else x[..., :dims]
    half = dims // 2
    if t.traditional:  # pairs swapped: (x0, x1, x2, x3) -> (x1, x0, x3, x2)
        pairs = xr.reshape(*xr.shape[:-1], half, 2)
        swapped = mx.concatenate([pairs[..., 1:], pairs[..., :1]], axis=-1).reshape(xr.shape)
    else:  # halves swapped
        swapped = mx.concatenate([xr[..., half:], xr[..., :half]], axis=-1)
    out = xr * t.cos + swapped * t.sin
    return out if dims == head_dim else mx.concatenate([out, x[..., dims:]], axis=-1)

"""Keeping exactly the accepted path in every layer's KV cache."""

from typing import List, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache


def check_cache(cache) -> None:
    """Raises ``ValueError`` unless every layer has a plain, rollback-able ``KVCache``."""
    bad = sorted({type(c).__name__ for c in cache if type(c) is not KVCache})
    if bad:
        raise ValueError(
            f"Speculative Streaming needs a plain KVCache per layer, got {bad}: "
            "quantized (kv_bits), rotating (max_kv_size) and recurrent caches are not supported."
        )


def commit_path(cache: List[KVCache], prefix: int, keep_per_layer: Sequence[Sequence[int]]) -> None:
    """Compacts each layer's cache to ``prefix`` rows plus the rows in its keep list.

    The rows written in one step follow the ``prefix`` committed rows. Layer
    ``l`` keeps its rows ``keep_per_layer[l]`` (ascending, relative to
    ``prefix``), moved to ``prefix, prefix + 1, ...``; everything after them
    (rejected nodes, stream rows) is dropped.

    Example: rows ``[p0 p1 | a b c d]`` with prefix 2 and keep ``[0, 2]`` become
    ``[p0 p1 a c]``; keep ``[0, 1]`` is a plain trim to ``[p0 p1 a b]``.
    """
    moves = []
    for c, keep in zip(cache, keep_per_layer):
        keep = list(keep)
        if keep != list(range(len(keep))):
            idx = mx.array(keep, dtype=mx.int32) + prefix
            moves.append(
                (c, len(keep), mx.take(c.keys, idx, axis=2), mx.take(c.values, idx, axis=2))
            )
    if moves:
        # Evaluate the gathered rows first so the slice writes below update the
        # cache buffers in place instead of copying them.
        mx.eval([(k, v) for _, _, k, v in moves])
        for c, n, k, v in moves:
            c.keys[..., prefix : prefix + n, :] = k
            c.values[..., prefix : prefix + n, :] = v
    for c, keep in zip(cache, keep_per_layer):
        c.trim(c.offset - (prefix + len(keep)))


class SpecPromptCache(list):
    """mlx-lm's per-layer KV caches plus the attached drafter's own state.

    A plain ``list`` for everything that takes a prompt cache; ``drafter_state``
    lets a ParallelSpec drafter keep its context across calls, as the KV caches do.
    """

    drafter_state = None


def make_prompt_cache(model) -> SpecPromptCache:
    """A prompt cache for ``model`` (mlx-lm's caches, and room for a drafter's state)."""
    from mlx_lm.models.cache import make_prompt_cache as make_mlx_lm_cache

    return SpecPromptCache(make_mlx_lm_cache(model))


def trim_prompt_cache(cache, n: int) -> int:
    """Removes the last ``n`` tokens from every layer and from the drafter state.

    Returns:
        int: the number of tokens trimmed (as ``mlx_lm``'s ``trim_prompt_cache``).
    """
    n = min(n, cache[0].offset)
    for c in cache:
        c.trim(n)
    state = getattr(cache, "drafter_state", None)
    if state is not None:
        state.trim_to(cache[0].offset)
    return n

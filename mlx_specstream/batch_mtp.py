"""A checkpoint's MTP layer drafting the rows of a batch (:class:`~mlx_specstream.batch.SpecBatcher`).

The layer keeps a KV cache of its own, one row per token each batch row fed: row ``i``
pairs token ``i``'s last hidden state (after the base's final norm where the family reads
it so) with token ``i + 1``'s embedding, as :class:`~mlx_specstream.mtp.MTPDrafter` keeps
it for one sequence. Its rows drift apart as the base's do
(:class:`~mlx_specstream.ragged_cache.RaggedKVCache`): after each verifying pass every row
appends the states of the tokens it fed, keeps those of the tokens it kept, and drafts its
chain from the last one: level 1 from the row pairing its last kept token with the pass's
own next token, each deeper level by the layer again on its own output and the previous
level's argmax (those rows are dropped after). A row that joins with a cache holding
earlier context starts the layer's rows at the tokens it prefills, as one sequence does
with a reused prompt cache (RoPE sees relative positions only). With several MTP layers
held, the first drafts every level.

Example: a row fed ``[t5, d1, d2]`` (its pending token, a draft of 2) and kept ``t5, d1``
(the pass chose ``d1, x, y``: ``d2`` rejected, ``x`` the next token). The layer appends
rows ``(h5, d1), (h_d1, x), (h_d2, y)`` and keeps the first two; level 1 is drafted from
``(h_d1, x)``'s output, the token after ``x``.
"""

from typing import List, Sequence

import mlx.core as mx

from .drafters import new_layer_cache
from .mtp import MTPDrafter, _final_norm
from .ragged_cache import empty_ragged, padded_rows


class MTPRows:
    """The MTP layer's rows of a batch: its ragged cache and each row's chain.

    Args:
        rt: the model's :class:`~mlx_specstream.streams.StreamRuntime`, whose drafter
          is an :class:`~mlx_specstream.mtp.MTPDrafter`.
    """

    def __init__(self, rt):
        if not isinstance(rt.drafter, MTPDrafter):
            raise ValueError(f"{type(rt.drafter).__name__} is not a checkpoint's MTP layers")
        self.rt, self.layer = rt, rt.drafter  # (the first layer: an MTPDepth)
        self.cache = None  # the layer's ragged cache, one row per batch row
        self._out = None  # (B, W, D): the layer's outputs over the last rows fed

    def empty(self, rows: int):
        """An empty cache of the layer for ``rows`` rows joining the batch."""
        return empty_ragged(new_layer_cache(self.layer.layer), rows)

    def feed(self, cache, hidden: mx.array, nxt: mx.array, kept: Sequence[int]) -> mx.array:
        """Appends rows pairing the base's last-layer states ``hidden`` ``(B, W, D)``
        with the embeddings of their next tokens ``nxt`` ``(B, W)`` to ``cache``, keeping
        the first ``kept[b]`` of row ``b``; returns the layer's outputs ``(B, W, D)``."""
        layout, model = self.layer._layout, self.rt.model
        h = _final_norm(model)(hidden) if layout.normed_hidden else hidden
        emb = self.rt.embed(nxt)
        if layout.zero_first:  # (a row at position 0 reads no embedding: DeepSeek's rule)
            at = cache.offset[:, None] + mx.arange(nxt.shape[1], dtype=mx.int32)
            emb = mx.where((at == 0)[..., None], mx.zeros_like(emb), emb)
        out = self.layer.step(h, emb.astype(h.dtype), cache)
        cache.advance(kept)
        return out

    def step(self, hidden: mx.array, chosen: mx.array, kept: List[int]) -> None:
        """After a verifying pass: each row's states over its inputs ``hidden`` ``(B, W,
        D)`` paired with the pass's choices ``chosen`` ``(B, W)`` (its tokens after
        them), ``kept[b]`` of them kept."""
        self._out = self.feed(self.cache, hidden, chosen, kept)
        self._kept = kept

    def chains(self, n: int) -> mx.array:
        """``(B, n)``: each row's chain of ``n`` levels from its last kept row of the last
        :meth:`step` (the recursion's rows are dropped after)."""
        rt, layer, cache = self.rt, self.layer, self.cache
        at = mx.array([k - 1 for k in self._kept], dtype=mx.int32)[:, None, None]
        out = mx.take_along_axis(self._out, at, axis=1)  # (B, 1, D)
        token = mx.argmax(layer.logits(rt.model, out, rt.draft_vocab), axis=-1)
        chain, ends, one = [token], cache.ends, [1] * len(self._kept)
        for _ in range(n - 1):
            out = layer.step(layer.passed_on(out), rt.embed(token), cache)
            cache.advance(one)
            token = mx.argmax(layer.logits(rt.model, out, rt.draft_vocab), axis=-1)
            chain.append(token)
        cache.set_ends(ends)  # (the recursion's rows never stay)
        return mx.concatenate(chain, axis=1)

    def join(self, cache, hidden: mx.array, nxt: List[List[int]], kept: List[int]) -> None:
        """Rows joining: a prefill pass's states ``hidden`` ``(B, w, D)`` of their tokens
        and each one's next tokens ``nxt`` (padded to ``w``), ``kept[b]`` of them real."""
        self.feed(cache, hidden, padded_rows(nxt, hidden.shape[1]), kept)
        mx.eval(cache.state)

    def filter(self, index: List[int]) -> None:
        self.cache.filter(index)

"""Attached drafters with a decoder layer and a KV cache of their own drafting the rows of
a batch (:class:`~mlx_specstream.batch.SpecBatcher`): a checkpoint's MTP layer
(:class:`MTPRows`) and the ParallelSpec drafter (:class:`ParallelSpecRows`).

The layer keeps a KV cache of its own, one row per token each batch row fed: row ``i``
pairs token ``i``'s last hidden state with token ``i + 1``'s embedding, as the drafter
keeps it for one sequence (:class:`~mlx_specstream.mtp.MTPDrafter`,
:class:`~mlx_specstream.drafters.ParallelSpecDrafter`). Its rows drift apart as the base's
do (:class:`~mlx_specstream.ragged_cache.RaggedKVCache`): after each verifying pass every
row appends the states of the tokens it fed, keeps those of the tokens it kept, and drafts
its chain from the last one:

* MTP: level 1 from the row pairing its last kept token with the pass's own next token,
  each deeper level by the layer again on its own output and the previous level's argmax
  (those rows are dropped after). With several MTP layers held, the first drafts every
  level.
* ParallelSpec: level 1 from the same row, levels ``2..n`` from ``n - 1`` [MASK] rows run
  after each row's last kept row in one pass (dropped after, as one sequence drops them).

A row that joins with a cache holding earlier context starts the layer's rows at the
tokens it prefills, as one sequence does with a reused prompt cache (RoPE sees relative
positions only).

Example: a row fed ``[t5, d1, d2]`` (its pending token, a draft of 2) and kept ``t5, d1``
(the pass chose ``d1, x, y``: ``d2`` rejected, ``x`` the next token). The layer appends
rows ``(h5, d1), (h_d1, x), (h_d2, y)`` and keeps the first two; level 1 is drafted from
``(h_d1, x)``'s output, the token after ``x``.
"""

from typing import List, Sequence

import mlx.core as mx

from .drafters import ParallelSpecDrafter, new_layer_cache, run_layer
from .mtp import MTPDrafter, _final_norm
from .ragged_cache import empty_ragged, padded_rows


class LayerRows:
    """A drafter layer's rows of a batch: its ragged cache and each row's chain.

    Args:
        rt: the model's :class:`~mlx_specstream.streams.StreamRuntime`, whose drafter
          is of the subclass's ``kind``.
    """

    kind = None  # the drafter class whose layer these rows are

    def __init__(self, rt):
        if not isinstance(rt.drafter, self.kind):
            raise ValueError(f"{type(rt.drafter).__name__} is not a {self.kind.__name__}")
        self.rt, self.drafter = rt, rt.drafter
        self.layer = rt.drafter.layer  # (the drafter's decoder layer; MTP: its first's)
        self.cache = None  # the layer's ragged cache, one row per batch row
        self._out = None  # (B, W, D): the layer's outputs over the last rows fed
        self._kept = []  # what each row kept of them: the host's list, or a device array
        # Per pipelined pass not yet read: the levels its chain ran the layer again (MTP's
        # recursion), whose advances on the device the host replays (settle).
        self._unread: List[int] = []

    def empty(self, rows: int):
        """An empty cache of the layer for ``rows`` rows joining the batch."""
        return empty_ragged(new_layer_cache(self.layer), rows)

    def feed(self, cache, hidden: mx.array, nxt: mx.array, kept: Sequence[int]) -> mx.array:
        """Appends rows pairing the base's last-layer states ``hidden`` ``(B, W, D)``
        with the embeddings of their next tokens ``nxt`` ``(B, W)`` to ``cache``, keeping
        the first ``kept[b]`` of row ``b``; returns the layer's outputs ``(B, W, D)``."""
        out = self._rows(cache, hidden, nxt)
        cache.advance(kept)
        return out

    def _rows(self, cache, hidden: mx.array, nxt: mx.array) -> mx.array:
        raise NotImplementedError

    def step(self, hidden: mx.array, chosen: mx.array, kept) -> None:
        """After a verifying pass: each row's states over its inputs ``hidden`` ``(B, W,
        D)`` paired with the pass's choices ``chosen`` ``(B, W)`` (its tokens after
        them), ``kept[b]`` of them kept: a list, or in a pipelined pass a device array
        (the cache advances on the device; the host settles it: :meth:`settle`)."""
        if isinstance(kept, mx.array):
            self._out = self._rows(self.cache, hidden, chosen)
            self.cache.advance_on_device(kept, hidden.shape[1])
            self._unread.append(0)
        else:
            self._out = self.feed(self.cache, hidden, chosen, kept)
        self._kept = kept

    def settle(self, kept: List[int], joined: int) -> None:
        """The host reads the oldest pipelined pass: its rows kept ``kept`` (rows that
        joined since: none); the advances of its chain's levels, undone on the device,
        are replayed."""
        levels, pad = self._unread.pop(0), [0] * joined
        self.cache.settle(kept + pad)
        for step in [[1] * len(kept)] * levels + ([[-levels] * len(kept)] if levels else []):
            self.cache.settle(step + pad)

    def _last_kept(self) -> mx.array:
        """``(B, 1, D)``: the layer's output at each row's last kept row."""
        kept = self._kept if isinstance(self._kept, mx.array) else mx.array(self._kept)
        at = (kept.astype(mx.int32) - 1)[:, None, None]
        return mx.take_along_axis(self._out, at, axis=1)

    def join(self, cache, hidden: mx.array, nxt: List[List[int]], kept: List[int]) -> None:
        """Rows joining: a prefill pass's states ``hidden`` ``(B, w, D)`` of their tokens
        and each one's next tokens ``nxt`` (padded to ``w``), ``kept[b]`` of them real."""
        self.feed(cache, hidden, padded_rows(nxt, hidden.shape[1]), kept)
        mx.eval(cache.state)

    def filter(self, index: List[int]) -> None:
        self.cache.filter(index)


class MTPRows(LayerRows):
    """A checkpoint's MTP layer's rows (the first layer held: an ``MTPDepth``)."""

    kind = MTPDrafter

    def _rows(self, cache, hidden: mx.array, nxt: mx.array) -> mx.array:
        layout, model = self.drafter._layout, self.rt.model
        h = _final_norm(model)(hidden) if layout.normed_hidden else hidden
        emb = self.rt.embed(nxt)
        if layout.zero_first:  # (a row at position 0 reads no embedding: DeepSeek's rule)
            at = cache.offset[:, None] + mx.arange(nxt.shape[1], dtype=mx.int32)
            emb = mx.where((at == 0)[..., None], mx.zeros_like(emb), emb)
        return self.drafter.step(h, emb.astype(h.dtype), cache)

    def chains(self, n: int) -> mx.array:
        """``(B, n)``: each row's chain of ``n`` levels from its last kept row of the last
        :meth:`step` (the recursion's rows are dropped after)."""
        rt, layer, cache = self.rt, self.drafter, self.cache
        on_device = isinstance(self._kept, mx.array)
        out = self._last_kept()
        token = mx.argmax(layer.logits(rt.model, out, rt.draft_vocab), axis=-1)
        chain, B = [token], out.shape[0]
        ends = None if on_device else cache.ends
        for _ in range(n - 1):
            out = layer.step(layer.passed_on(out), rt.embed(token), cache)
            if on_device:
                cache.advance_on_device(mx.ones(B, dtype=mx.int32), 1)
            else:
                cache.advance([1] * B)
            token = mx.argmax(layer.logits(rt.model, out, rt.draft_vocab), axis=-1)
            chain.append(token)
        # (the recursion's rows never stay)
        if on_device and n > 1:
            cache.advance_on_device(mx.full(B, 1 - n, dtype=mx.int32), 0)
            self._unread[-1] = n - 1
        elif not on_device:
            cache.set_ends(ends)
        return mx.concatenate(chain, axis=1)


class ParallelSpecRows(LayerRows):
    """The ParallelSpec drafter's rows: ``fc([h_i; embed(x_{i+1})])`` in its layer's
    cache, and ``n - 1`` [MASK] rows after each row's last kept one for a chain."""

    kind = ParallelSpecDrafter

    def _rows(self, cache, hidden: mx.array, nxt: mx.array) -> mx.array:
        d = self.drafter
        emb = self.rt.embed(nxt).astype(hidden.dtype)
        real = d.fc(mx.concatenate([hidden, emb], axis=-1).astype(d.fc.weight.dtype))
        return run_layer(d.layer, real, cache, scale=d._scale)

    def chains(self, n: int) -> mx.array:
        """``(B, n)``: each row's chain of ``n`` levels (at most the drafter's
        ``num_draft_tokens``) from its last kept row of the last :meth:`step`."""
        d, cache = self.drafter, self.cache
        if n > d.masks.shape[0] + 1:
            raise ValueError(f"a chain of {n}: the ParallelSpec drafter drafts "
                             f"{d.masks.shape[0] + 1} levels")  # fmt: skip
        out = self._last_kept()
        if n > 1:  # (the masks are written after each row's end, which stays: dropped)
            masks = d.masks[: n - 1].astype(out.dtype)
            masks = mx.broadcast_to(masks, (out.shape[0],) + masks.shape)
            out = mx.concatenate([out, run_layer(d.layer, masks, cache, scale=d._scale)], 1)
        return mx.argmax(self.rt.head(out, draft=True), axis=-1)


def layer_rows(rt):
    """The rows of ``rt``'s drafter if it keeps a layer of its own, else ``None``."""
    for rows in (MTPRows, ParallelSpecRows):
        if isinstance(rt.drafter, rows.kind):
            return rows(rt)
    return None

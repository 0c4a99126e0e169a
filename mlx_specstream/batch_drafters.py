"""Attached drafters with a decoder layer and a KV cache of their own drafting the rows of
a batch (:class:`~mlx_specstream.batch.SpecBatcher`): a checkpoint's MTP layer
(:class:`MTPRows`), the ParallelSpec drafter (:class:`ParallelSpecRows`), an EAGLE-3
or EAGLE-1 drafter (:class:`EagleRows`) and a DFlash drafter (:class:`DFlashRows`).

The layer keeps a KV cache of its own, one row per token each batch row fed: row ``i``
pairs token ``i``'s last hidden state with token ``i + 1``'s embedding, as the drafter
keeps it for one sequence (:class:`~mlx_specstream.mtp.MTPDrafter`,
:class:`~mlx_specstream.drafters.ParallelSpecDrafter`). Its rows drift apart as the base's
do (:class:`~mlx_specstream.ragged_cache.RaggedKVCache`): after each verifying pass every
row appends the states of the tokens it fed, keeps those of the tokens it kept, and drafts
its chain from the last one:

* MTP: level 1 from the row pairing its last kept token with the pass's own next token,
  each deeper level by the layer again on its own output and the previous level's argmax
  (those rows are dropped after).
* Several MTP layers (:class:`MTPDepthRows`): layer ``k`` drafts level ``k`` as one
  sequence's do (:class:`~mlx_specstream.mtp.DepthsState`): its row ``i`` reads token
  ``i + k``, so each row holds its last ``K - 1`` positions until their tokens are known.
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

from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .dflash import DFlashDrafter, block_attend, context_keys, ragged_block_mask
from .drafters import ParallelSpecDrafter, new_layer_cache, run_layer
from .eagle import EagleDrafting
from .mtp import MTPDrafter, _final_norm
from .ragged_cache import RaggedKVCacheList, empty_ragged, padded_rows


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
        # (the drafter's decoder layer; MTP: its first's; DFlash's: its layers')
        self.layer = getattr(rt.drafter, "layer", None)
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

    def admit(self, part, alone: bool = False) -> None:
        """Rows that joined (``part``, from :meth:`empty` and :meth:`join`) after the
        batch's, or in their place where ``alone`` (the batch had none left)."""
        self.cache = part if self.cache is None or alone else self.cache.extend(part)


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
        token = mx.argmax(layer.level_logits(rt, out), axis=-1)
        B, ends = out.shape[0], None if on_device else cache.ends
        chain = [token] + _levels_again(rt, layer, cache, out, token, n - 1, on_device)
        # (the recursion's rows never stay)
        if on_device and n > 1:
            cache.advance_on_device(mx.full(B, 1 - n, dtype=mx.int32), 0)
            self._unread[-1] = n - 1
        elif not on_device:
            cache.set_ends(ends)
        return mx.concatenate(chain, axis=1)


def _levels_again(rt, depth, cache, out: mx.array, token: mx.array, n: int, on_device: bool):
    """``n`` more levels ``(B, 1)`` each: MTP layer ``depth`` (or an EAGLE drafter) again
    on its own output ``out`` ``(B, 1, D)`` and the previous level ``token``, each row
    written at ``cache``'s ends and kept (on the device, or the host's ends; the caller
    drops them after)."""
    B, levels = out.shape[0], []
    for _ in range(n):
        out = depth.again(rt, out, token, cache)
        if on_device:
            cache.advance_on_device(mx.ones(B, dtype=mx.int32), 1)
        else:
            cache.advance([1] * B)
        token = mx.argmax(depth.level_logits(rt, out), axis=-1)
        levels.append(token)
    return levels


class EagleRows(MTPRows):
    """An EAGLE drafter's rows: EAGLE-3's ``fc`` of the base's feature layers' states (the
    pass keeps them side by side), EAGLE-1's ``fc`` of the last state after the final
    norm, with each next token, in its layer's cache; deeper levels its layer again on its
    own output, as MTP's."""

    kind = EagleDrafting

    def empty(self, rows: int):
        """An empty cache of the drafter's layers (EAGLE-3's several: one member each)."""
        new_cache = getattr(self.drafter, "new_cache", None)
        return super().empty(rows) if new_cache is None else empty_ragged(new_cache(), rows)

    def _rows(self, cache, hidden: mx.array, nxt: mx.array) -> mx.array:
        return self.drafter.step(self.rt, hidden, nxt, cache)


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


class DFlashRows(LayerRows):
    """A DFlash drafter's rows: each of its layers keeps in a ragged cache the keys and
    values of every batch row's context rows (``hidden_norm(fc(features))`` of each token
    kept, at its position); a chain is one pass of its layers over each row's block (the
    token after its last kept row, then masks) at the row's own positions, seeing its own
    context (:func:`~mlx_specstream.dflash.ragged_block_mask`); the blocks never stay."""

    kind = DFlashDrafter

    def empty(self, rows: int):
        return RaggedKVCacheList.empty_rows(len(self.drafter.layers), rows)

    def _rows(self, cache, hidden: mx.array, nxt: mx.array) -> mx.array:
        d = self.drafter
        context = d.context(hidden)
        for i, layer in enumerate(d.layers):
            c = cache[i]
            c.update_and_fetch(*context_keys(layer, context, d._head_dim, c.offset))
        return nxt[..., None]  # (what a chain reads at a row's last kept row: the token after)

    def chains(self, n: int) -> mx.array:
        """``(B, n)``: each row's chain of ``n`` levels (at most the block's masks: the
        batch refuses more), one pass of the drafter's layers over each row's block from
        the last :meth:`step`."""
        d, rt = self.drafter, self.rt
        masks = d._settings["block_size"] - 1 if d.full_block else n
        x = d.block(rt, self._last_kept()[:, 0, 0], masks)  # (the token after each kept row)
        ends = self.cache[0].offset  # (each row's context rows: on the device if pipelined)
        for i, layer in enumerate(d.layers):
            c = self.cache[i]
            held = min(c.pass_width(0), c.keys.shape[2])
            keys, values = c.keys[..., :held, :], c.values[..., :held, :]
            mask = ragged_block_mask(ends, held, masks + 1, d._causal[i], d._windows[i])
            x = block_attend(layer, x, keys, values, ends, mask, d._head_dim)
        return mx.argmax(d.level_logits(rt, d.norm(x)[:, 1 : n + 1]), axis=-1)


class HeldRows:
    """Several MTP layers' rows of a batch: a ragged cache per layer, all ending at the
    same positions, and each row's positions held after them (at most ``lag``: those
    whose tokens a deeper layer still lacks), their base states and next tokens.

    Args:
        caches: the layers' ragged caches, the first layer's first.
        lag (int): the most positions a row holds (the layers less one).
    """

    def __init__(self, caches: list, lag: int):
        B = len(caches[0].ends)
        self.caches, self.lag = caches, lag
        self.states: Optional[mx.array] = None  # (B, lag, D): the base's, left-aligned
        self.tokens = mx.zeros((B, lag), dtype=mx.int32)  # (each position's next token)
        self.count = mx.zeros(B, dtype=mx.int32)  # the positions each row holds
        self.held = np.zeros(B, dtype=np.int64)  # the same, as the host knows it

    def filter(self, rows: Sequence[int]) -> None:
        """Keeps only ``rows`` (indices into the batch), in that order."""
        rows = list(rows)
        index = mx.array(rows, dtype=mx.int32)
        for c in self.caches:
            c.filter(rows)
        if self.states is not None:
            self.states = self.states[index]
        self.tokens, self.count, self.held = self.tokens[index], self.count[index], self.held[rows]

    def extend(self, other: "HeldRows") -> "HeldRows":
        """One of this batch's rows, then ``other``'s (both are left as they were)."""
        out = HeldRows([a.extend(b) for a, b in zip(self.caches, other.caches)], self.lag)
        if self.states is not None or other.states is not None:
            like = self.states if self.states is not None else other.states
            parts = [c.states if c.states is not None
                     else mx.zeros((len(c.held),) + like.shape[1:], like.dtype)
                     for c in (self, other)]  # fmt: skip
            out.states = mx.concatenate(parts)
        out.tokens = mx.concatenate([self.tokens, other.tokens])
        out.count = mx.concatenate([self.count, other.count])
        out.held = np.concatenate([self.held, other.held])
        return out

    @property
    def state(self):
        return [c.state for c in self.caches] + [self.states, self.tokens, self.count]


class MTPDepthRows(LayerRows):
    """A checkpoint's ``K > 1`` MTP layers' rows: layer ``k`` (1..K) drafts level ``k``
    of each row's chain, the last one also the levels past ``K``, as one sequence's
    layers do (:meth:`~mlx_specstream.mtp.MTPDrafter._draft_depths`).

    Layer ``k``'s row ``i`` reads layer ``k - 1``'s output at ``i`` (or the base's
    state: MiMo-V2-Flash's) and token ``i + k``'s embedding. A row's last ``K - 1``
    positions lack a token for the deeper layers, so every layer's cache holds the rows
    of the same positions before them, and those positions are held (:class:`HeldRows`)
    and run again with the next pass's rows. A chain runs each layer once over the held
    and new rows, the tokens past the last known being the levels drafted so far;
    those rows are dropped after.

    Example: ``K = 3``; the caches hold positions 0..7 and a row holds 8, 9 (tokens up
    to 10 known). It feeds 2 tokens and keeps both (tokens 11, 12 known): each layer
    runs rows 8..11 and keeps 8, 9; positions 10, 11 are held. At row 11, layer 1 reads
    token 12 and drafts level 1 (token 13), layer 2 reads level 1 and drafts level 2,
    layer 3 reads level 2 and drafts level 3; layer 3's row 10 reads level 1.

    A generation drafts with every layer the drafter uses (``num_mtp_layers``), however
    short a row's chain.
    """

    kind = MTPDrafter

    def __init__(self, rt):
        super().__init__(rt)
        self.depths = rt.drafter.all_depths
        self.lag = len(self.depths) - 1
        # The last step's rows not run yet (run when a chain is drafted, or with none
        # before anything else reads the cache): (cache, hidden, next tokens, kept)
        self._pending = None

    def empty(self, rows: int) -> HeldRows:
        caches = [empty_ragged(new_layer_cache(d.layer), rows) for d in self.depths]
        return HeldRows(caches, self.lag)

    def feed(self, cache, hidden: mx.array, nxt: mx.array, kept: Sequence[int]) -> None:
        self._run(cache, hidden, nxt, kept)

    def step(self, hidden: mx.array, chosen: mx.array, kept) -> None:
        self._flush()
        self._pending = (self.cache, hidden, chosen, kept)

    def chains(self, n: int) -> mx.array:
        """``(B, n)``: each row's chain of ``n`` levels from its last kept row of the last
        :meth:`step`."""
        cache, hidden, chosen, kept = self._pending
        self._pending = None
        return mx.concatenate(self._run(cache, hidden, chosen, kept, n), axis=1)

    def _flush(self) -> None:
        if self._pending is not None:
            self._run(*self._pending)
            self._pending = None

    def settle(self, kept: List[int], joined: int) -> None:
        self._flush()
        cache, pad = self.cache, [0] * joined
        levels = self._unread.pop(0)
        M, keep = self._ran_and_kept(cache.held[: len(kept)], kept)
        for c in cache.caches[:-1]:
            c.settle(list(keep) + pad)
        last = cache.caches[-1]
        if levels:  # (every row, the recursion's rows, then back to what stays)
            last.settle(list(M) + pad)
            for _ in range(levels):
                last.settle([1] * len(kept) + pad)
            last.settle(list(keep - M - levels) + pad)
        else:
            last.settle(list(keep) + pad)
        cache.held[: len(kept)] = M - keep

    def filter(self, index: List[int]) -> None:
        self._flush()
        super().filter(index)

    def admit(self, part, alone: bool = False) -> None:
        self._flush()
        super().admit(part, alone)

    def _run(self, cache: HeldRows, hidden, nxt, kept, levels: int = 0) -> List[mx.array]:
        """Each layer over each row's held positions then its first ``kept[b]`` new ones
        (states ``hidden`` ``(B, W, D)``, next tokens ``nxt`` ``(B, W)``); the rows whose
        tokens every layer has stay, the last ``K - 1`` are held. Returns the first
        ``levels`` levels' tokens ``(B, 1)`` each, drafted at each row's last row."""
        rt, layout, H = self.rt, self.drafter._layout, self.lag
        on_device = isinstance(kept, mx.array)
        B, W = nxt.shape
        kb = (kept if on_device else mx.array(list(kept))).astype(mx.int32)
        n = cache.count
        if cache.states is None:
            cache.states = mx.zeros((B, H, hidden.shape[-1]), hidden.dtype)
        # (each row's held positions, then its new ones: left-aligned, then padding)
        c = mx.arange(H + W, dtype=mx.int32)[None]
        at = mx.minimum(mx.where(c < n[:, None], c, c + H - n[:, None]), H + W - 1)
        states = mx.take_along_axis(
            mx.concatenate([cache.states, hidden.astype(cache.states.dtype)], 1), at[..., None], 1
        )
        tokens = mx.take_along_axis(mx.concatenate([cache.tokens, nxt.astype(mx.int32)], 1), at, 1)
        M = n + kb  # (the real rows; those past M are written past each row's end)
        keep = mx.maximum(M - H, 0)
        feats = _final_norm(rt.model)(states) if layout.normed_hidden else states
        last = (M - 1)[:, None]
        drafted, h = [], feats
        more = max(0, levels - len(self.depths))  # (levels by the last layer again)
        if on_device:
            self._unread.append(more)
        else:  # (the host's counts: each layer keeps the rows that stay)
            M_host, keep_host = self._ran_and_kept(cache.held, kept)
        for k, (depth, lc) in enumerate(zip(self.depths, cache.caches)):
            j = c + k  # (row c reads token c + k: a level drafted so far past M)
            tok = mx.take_along_axis(tokens, mx.minimum(j, H + W - 1), 1)
            if drafted:
                ahead = mx.concatenate(drafted, axis=1)
                ahead = mx.take_along_axis(ahead, mx.clip(j - M[:, None], 0, len(drafted) - 1), 1)
                tok = mx.where(j < M[:, None], tok, ahead)
            emb = rt.embed(tok)
            if layout.zero_first:  # (a row at position 0 reads no embedding)
                pos = lc.offset[:, None] + c
                emb = mx.where((pos == 0)[..., None], mx.zeros_like(emb), emb)
            out = depth.step(h, emb.astype(h.dtype), lc)
            o = None
            if k < levels:
                o = mx.take_along_axis(out, last[..., None], axis=1)  # (B, 1, D)
                drafted.append(mx.argmax(depth.logits(rt.model, o, rt.draft_vocab), axis=-1))
            if k == H and more:  # (the last layer again past K, after every row of this run)
                self._advance(lc, M, H + W, None if on_device else M_host)
                drafted += _levels_again(rt, depth, lc, o, drafted[-1], more, on_device)
                back = None if on_device else keep_host - M_host - more  # (to the rows that stay)
                self._advance(lc, keep - M - more, 0, back)
            else:
                self._advance(lc, keep, H + W, None if on_device else keep_host)
            h = depth.passed_on(out) if layout.chain_layers else feats
        # (the positions held now: the last M - keep of the run's rows)
        at = mx.minimum(keep[:, None] + mx.arange(H, dtype=mx.int32), H + W - 1)
        cache.states = mx.take_along_axis(states, at[..., None], 1)
        cache.tokens = mx.take_along_axis(tokens, at, 1)
        cache.count = M - keep
        if not on_device:
            cache.held = M_host - keep_host
        return drafted

    def _ran_and_kept(self, held: np.ndarray, kept: Sequence[int]):
        """The host's count of each row's rows in a run (its ``held`` positions and the
        ``kept`` new ones) and of those that stay in the caches."""
        ran = held + np.asarray(list(kept), dtype=np.int64)
        return ran, np.maximum(ran - self.lag, 0)

    @staticmethod
    def _advance(cache, kept: mx.array, most: int, host=None) -> None:
        """``cache`` keeps ``kept`` more (or fewer) rows: the host's ``host`` where it
        knows them, else on the device (:meth:`settle` replays it)."""
        if host is None:
            cache.advance_on_device(kept, most)
        else:
            cache.set_ends(np.asarray(cache.ends) + np.asarray(host))


def layer_rows(rt):
    """The rows of ``rt``'s drafter if it keeps a layer of its own, else ``None``."""
    if isinstance(rt.drafter, MTPDrafter) and rt.drafter.num_layers > 1:
        return MTPDepthRows(rt)
    for rows in (MTPRows, ParallelSpecRows, EagleRows, DFlashRows):
        if isinstance(rt.drafter, rows.kind):
            return rows(rt)
    return None

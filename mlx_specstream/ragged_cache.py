"""A batch's key-value cache whose rows end at different positions.

mlx-lm's ``BatchKVCache`` keeps every row's tokens ending at one shared index and
pads rows on the left. A speculative batch accepts a different number of tokens
in each row at every step, so its rows cannot stay aligned without moving every
row's whole cache. :class:`RaggedKVCache` lets them drift apart instead: row
``b`` holds its tokens at ``[0, ends[b])``; a pass writes each row's new tokens
after its own end; and the mask lets a query see only its own row's tokens up
to itself. Rejected drafts are dropped by not advancing over them, at no cost.

Example (two rows, one pass over two tokens each; ``o``: a key a query sees)::

    ends = [3, 1]   # row 0 holds 3 tokens, row 1 holds 1
    # the pass writes row 0's tokens at 3, 4 and row 1's at 1, 2
    # make_mask(2)[b, 0, j]:   keys 0 1 2 3 4
    #   row 0, query 0            o o o o .
    #   row 0, query 1            o o o o o
    #   row 1, query 0            o o . . .
    #   row 1, query 1            o o o . .
    advance([2, 1])  # row 0 accepted both, row 1 only its first: ends = [5, 2]
"""

from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import CacheList, KVCache, _BaseCache

from .cache import KVCacheList, WindowKVCache, default_bucket, forget_rows, zeros_before
from .layout import bucketed


class RaggedKVCache(_BaseCache):
    """One attention layer's keys and values for a batch of rows of any lengths.

    A pass over ``N`` tokens per row writes row ``b``'s at ``ends[b] ..
    ends[b] + N - 1`` and leaves ``ends`` as they were: the caller says how many
    of them each row keeps (:meth:`advance`), the same for every layer. The
    model reads :attr:`offset` (each row's RoPE position, an array as
    ``BatchKVCache``'s) and :meth:`make_mask`, as it does for mlx-lm's batch
    caches.

    Args:
        ends (sequence of int): the tokens each row already holds (all zero for
          an empty cache).
    """

    step = 256  # capacity grows in blocks, as mlx-lm's caches do
    # A pass's columns rounded up to a multiple of this, the mask hiding the rest, so
    # attention's shapes change once per bucket: None decides (:meth:`column_bucket`).
    bucket: Optional[int] = None

    def __init__(self, ends: Sequence[int], window: Optional[int] = None):
        self.keys = self.values = None
        self._width = 0  # the positions the last write returned (from position 0)
        # A sliding-window layer's (window: its size): the rows' first ``start``
        # positions are dropped once no window to come sees them (forget); the
        # arrays' column j holds position start + j of every row.
        self.window, self.start = window, 0
        self.set_ends(ends)

    def set_ends(self, ends: Sequence[int]) -> None:
        self._ends = np.asarray(ends, dtype=np.int64)
        self.offset = mx.array(self._ends, dtype=mx.int32)
        self._unread = []  # the most tokens each pass advanced by on the device alone

    def advance_on_device(self, kept: mx.array, most: int) -> None:
        """Keeps the first ``kept[b]`` (a device array, at most ``most``) tokens of row
        ``b``'s last pass, before the host knows ``kept``: the next pass writes after
        them. :attr:`ends` stays the host's until :meth:`settle`."""
        self.offset = self.offset + kept.astype(mx.int32)
        self._unread.append(most)

    def settle(self, kept: Sequence[int]) -> None:
        """The host reads the oldest pass advanced on the device: it kept ``kept``."""
        self._ends = self._ends + np.asarray(kept, dtype=np.int64)
        self._unread.pop(0)

    @property
    def ends(self) -> List[int]:
        return self._ends.tolist()

    def size(self) -> int:
        """The longest row's end (or a bound of it while passes are unread)."""
        return int(self._ends.max(initial=0)) + sum(self._unread)

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return False  # rows shrink only by advancing less (a shared trim has no meaning)

    def column_bucket(self) -> int:
        """What a pass's columns are rounded up to a multiple of: :attr:`bucket` where
        set; by default :func:`~mlx_specstream.cache.default_bucket` of the keys held
        (a sliding-window layer's view then ends at the bucket less the positions it
        dropped, as its mask does). It depends on what the cache held before the pass
        only, so a pass's mask and its write agree."""
        if self.bucket is not None:
            return self.bucket
        return default_bucket(self.keys)

    def pass_width(self, N: int) -> int:
        """The positions (from 0) a pass over ``N`` tokens per row reads: up to the
        longest row's last new token, rounded up to :meth:`column_bucket`."""
        return bucketed(self.size() + N, self.column_bucket())

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Writes each row's ``N`` new keys and values after its end; returns every
        position up to :meth:`pass_width` (the mask hides those past each row's own)."""
        B, _, N, _ = keys.shape
        if B != len(self._ends):
            raise ValueError(f"a pass over {B} rows for a cache of {len(self._ends)} rows")
        width = self.pass_width(N)
        if self.keys is None or width - self.start > self.keys.shape[2]:
            self._grow(keys, values, width - self.start)
        if not self._unread and (self._ends == self._ends[0]).all():  # one slice, as mlx-lm
            at = int(self._ends[0]) - self.start
            self.keys[..., at : at + N, :] = keys
            self.values[..., at : at + N, :] = values
        else:
            at = self.offset[:, None] - self.start + mx.arange(N, dtype=mx.int32)
            at = at[:, None, :, None]
            self.keys = mx.put_along_axis(self.keys, at, keys, axis=2)
            self.values = mx.put_along_axis(self.values, at, values, axis=2)
        self._width = width
        return self.keys_and_values()

    def keys_and_values(self):
        """What the last write returned (Gemma 3n's KV-sharing layers read it)."""
        held = self._width - self.start
        return self.keys[..., :held, :], self.values[..., :held, :]

    def forget(self) -> None:
        """A window layer's: drops the columns below ``min(ends) - 2 * window`` once a
        window's worth of them is there, as a
        :class:`~mlx_specstream.cache.WindowKVCache` does for one row (no query from
        then on sits before its row's end, nor a window before it).

        Example: window 4, ends ``[13, 20]``: positions 0..4 go (below ``13 - 8``);
        ``start`` is 5.
        """
        if self.window is not None and len(self._ends):
            forget_rows(self, int(self._ends.min()))

    def _rebased(self, start: int) -> tuple:
        """The arrays from position ``start`` (at most :attr:`start`): zeros before it."""
        gap = self.start - start
        if self.keys is None or gap == 0:
            return self.keys, self.values
        return zeros_before(self.keys, gap), zeros_before(self.values, gap)

    def _grow(self, keys: mx.array, values: mx.array, width: int) -> None:
        capacity = (width + self.step - 1) // self.step * self.step
        B, H, _, Dk = keys.shape
        new_k = mx.zeros((B, H, capacity, Dk), keys.dtype)
        new_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
        if self.keys is not None:
            held = self.keys.shape[2]
            new_k[..., :held, :] = self.keys
            new_v[..., :held, :] = self.values
        self.keys, self.values = new_k, new_v

    def make_mask(self, N: int, return_array: bool = False, window_size=None, **kwargs):
        """``(B, 1, N, pass_width(N))`` (at least ``ends.max() + N``): query ``j`` of
        row ``b`` sees keys ``0 .. ends[b] + j``, or with ``window_size`` ``W`` (a
        sliding-window layer that keeps every token) only the last ``W`` of them, as
        mlx-lm's ``create_causal_mask`` does."""
        queries = (self.offset[:, None] + mx.arange(N, dtype=mx.int32))[:, None, :, None]
        keys = mx.arange(self.start, self.pass_width(N), dtype=mx.int32)  # (the columns read)
        mask = keys <= queries
        if window_size is not None:
            mask = mask & (keys > queries - window_size)
        return mask

    def advance(self, kept: Sequence[int]) -> None:
        """Keeps the first ``kept[b]`` tokens of row ``b``'s last pass."""
        kept = np.asarray(kept, dtype=np.int64)
        if kept.shape != self._ends.shape or (kept < 0).any():
            raise ValueError(f"advance({kept.tolist()}) for {len(self._ends)} rows")
        if self._unread:
            raise ValueError("advance() while passes advanced on the device are unread")
        self.set_ends(self._ends + kept)

    def filter(self, rows: Sequence[int]) -> None:
        """Keeps only ``rows`` (indices into the batch), in that order."""
        rows = list(rows)
        index = mx.array(rows, dtype=mx.int32)
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]
        self._ends, self.offset = self._ends[rows], self.offset[index]

    def extract(self, row: int, end: Optional[int] = None) -> KVCache:
        """Row ``row`` as an mlx-lm ``KVCache`` holding exactly its tokens (its first
        ``end``: what the host knows it kept, while passes are unread); a
        :class:`~mlx_specstream.cache.WindowKVCache` from :attr:`start` where a window
        layer dropped its first positions."""
        end = int(self._ends[row] if end is None else end)
        cache = WindowKVCache(self.window) if self.start else KVCache()
        if end and self.keys is not None:
            cache.keys = mx.contiguous(self.keys[row : row + 1, :, : end - self.start])
            cache.values = mx.contiguous(self.values[row : row + 1, :, : end - self.start])
            cache.offset = end
        if self.start:  # (its rows from position start: a bounded window layer's cache)
            cache.start = self.start
        return cache

    def extend(self, other: "RaggedKVCache") -> "RaggedKVCache":
        """One cache of this batch's rows, then ``other``'s (both are left as they were)."""
        out = RaggedKVCache(np.concatenate([self._ends, other._ends]), self.window)
        out.start = min(self.start, other.start)  # (the other's rows from there: zeros)
        if other._unread:
            raise ValueError("rows that join a batch have no unread passes")
        if self._unread:  # (its rows keep their device offsets; the new rows join at theirs)
            out.offset = mx.concatenate([self.offset, other.offset])
            out._unread = list(self._unread)
        held = [c for c in (self, other) if c.keys is not None]
        if held:
            arrays = {id(c): dict(zip(("keys", "values"), c._rebased(out.start))) for c in held}
            width = max(arrays[id(c)]["keys"].shape[2] for c in held)
            for name in ("keys", "values"):
                ref = arrays[id(held[0])][name]
                parts = []
                for c in (self, other):
                    a = arrays[id(c)][name] if c.keys is not None else None
                    if a is None:
                        a = mx.zeros((len(c._ends), ref.shape[1], 0, ref.shape[3]), ref.dtype)
                    pad = mx.zeros(a.shape[:2] + (width - a.shape[2], a.shape[3]), a.dtype)
                    parts.append(mx.concatenate([a, pad], axis=2))
                setattr(out, name, mx.concatenate(parts))
        return out

    @classmethod
    def merge(cls, caches: Sequence[KVCache]) -> "RaggedKVCache":
        """One row per mlx-lm ``KVCache`` (the same layer of each row's cache)."""
        ends = [c.offset for c in caches]
        merged = cls(ends)
        held = [c for c in caches if c.keys is not None]
        if not held:
            return merged
        width = (max(ends) + cls.step - 1) // cls.step * cls.step
        ref_k, ref_v = held[0].keys, held[0].values
        shape_k, shape_v = list(ref_k.shape), list(ref_v.shape)
        shape_k[0] = shape_v[0] = len(caches)
        shape_k[2] = shape_v[2] = width
        merged.keys = mx.zeros(shape_k, ref_k.dtype)
        merged.values = mx.zeros(shape_v, ref_v.dtype)
        for b, c in enumerate(caches):
            if c.keys is not None and c.offset:
                merged.keys[b : b + 1, :, : c.offset] = c.keys[..., : c.offset, :]
                merged.values[b : b + 1, :, : c.offset] = c.values[..., : c.offset, :]
        return merged

    @property
    def state(self):
        return self.keys, self.values, self.offset

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class RaggedKVCacheList(CacheList):
    """A batch's pair of key caches for DeepSeek V3.2's (and GLM-5's) sparse attention:
    a :class:`RaggedKVCache` for its latent keys and one for its indexer's keys, whose
    rows grow together. It answers as one :class:`RaggedKVCache` (the first member's
    ends, size and mask), and moves every member's rows at once.

    Example: ``RaggedKVCacheList.merge([KVCacheList(a0, i0), KVCacheList(a1, i1)])``
    holds rows ``a0, a1`` in its first member and ``i0, i1`` in its second;
    ``extract(1)`` gives ``KVCacheList(a1, i1)`` back.
    """

    def __init__(self, *caches):
        super().__init__(*caches)
        for c in self.caches:  # (a sparse attention's indexer picks among the columns)
            c.bucket = 0

    @property
    def offset(self) -> mx.array:
        return self.caches[0].offset

    @offset.setter
    def offset(self, v) -> None:
        for c in self.caches:
            c.offset = v

    @property
    def ends(self) -> List[int]:
        return self.caches[0].ends

    def size(self) -> int:
        return self.caches[0].size()

    def pass_width(self, N: int) -> int:
        return self.caches[0].pass_width(N)

    def empty(self) -> bool:
        return self.caches[0].empty()

    def make_mask(self, *args, **kwargs):
        return self.caches[0].make_mask(*args, **kwargs)

    def is_trimmable(self) -> bool:
        return False

    def set_ends(self, ends: Sequence[int]) -> None:
        for c in self.caches:
            c.set_ends(ends)

    def advance(self, kept: Sequence[int]) -> None:
        for c in self.caches:
            c.advance(kept)

    def advance_on_device(self, kept: mx.array, most: int) -> None:
        for c in self.caches:
            c.advance_on_device(kept, most)

    def settle(self, kept: Sequence[int]) -> None:
        for c in self.caches:
            c.settle(kept)

    def filter(self, rows: Sequence[int]) -> None:
        for c in self.caches:
            c.filter(rows)

    def extract(self, row: int, end: Optional[int] = None) -> KVCacheList:
        return KVCacheList(*[c.extract(row, end) for c in self.caches])

    def extend(self, other: "RaggedKVCacheList") -> "RaggedKVCacheList":
        return RaggedKVCacheList(*[a.extend(b) for a, b in zip(self.caches, other.caches)])

    @classmethod
    def merge(cls, caches: Sequence[CacheList]) -> "RaggedKVCacheList":
        """One row per ``KVCacheList`` (the same layer of each row's cache)."""
        return cls(*[RaggedKVCache.merge(m) for m in zip(*[c.caches for c in caches])])

    @classmethod
    def empty_rows(cls, members: int, rows: int) -> "RaggedKVCacheList":
        return cls(*[RaggedKVCache([0] * rows) for _ in range(members)])


def padded_rows(rows: Sequence[Sequence[int]], width: Optional[int] = None) -> mx.array:
    """Token rows of different lengths as one ``(B, width)`` array (``width``: the
    longest row's by default), each padded with its last token (an empty row with 0);
    a batch's pass never keeps what its padding writes."""
    width = max(map(len, rows)) if width is None else width
    return mx.array([list(r) + [r[-1] if len(r) else 0] * (width - len(r)) for r in rows])


def ragged(layer: Sequence) -> _BaseCache:
    """The rows ``layer`` (one layer cache per row: ``KVCache``, or a ``CacheList`` of
    them) merged into a batch's layer cache."""
    lists = isinstance(layer[0], CacheList)
    return (RaggedKVCacheList if lists else RaggedKVCache).merge(layer)


def empty_ragged(c, rows: int) -> _BaseCache:
    """An empty batch layer cache of ``rows`` rows, shaped as the layer cache ``c``."""
    if isinstance(c, CacheList):
        return RaggedKVCacheList.empty_rows(len(c.caches), rows)
    return RaggedKVCache([0] * rows)

"""Keeping exactly the accepted path in every layer's KV cache.

Plain (``KVCache``) and quantized (``QuantizedKVCache``, mlx-lm's ``kv_bits``)
caches are compacted the same way: along the token axis (axis 2) of every
array the layer stores. :class:`KVQuantizer` converts caches at the moments
mlx-lm's ``generate_step`` does, and tells the decode loop how deep a tree may
be so that no step straddles that moment. A ``RotatingKVCache``
(``max_kv_size``) is accepted only when its window provably never fills
(:func:`window_rows`).

A model's own sliding-window layers (Gemma 3, GPT-OSS, OLMo 3, Cohere 2, ...:
``model.make_cache()`` gives them a ``RotatingKVCache`` of the window's size) keep,
instead, the tokens a window to come can still see in caches that a tree's rejected
rows can be cut from (:func:`model_caches`): a :class:`WindowKVCache` for one
generation (2 to 3 windows), a ``KVCache`` (the whole context) for a prompt cache
that may be trimmed back. The window is then the masks' job: the model's own
(``create_attention_mask(..., window_size=W)``) and the tree's
(``StreamRuntime._windowed``, from :func:`sliding_windows`).

Llama 4's chunked-attention layers (mlx-lm's ``ChunkedKVCache``: a query sees only
its own chunk of ``attention_chunk_size`` positions) keep their rows the same way,
in a :class:`ChunkKVCache`; the tree's masks apply the chunks by position
(``StreamRuntime._windowed``, :func:`attention_chunks`).
"""

import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import (
    CacheList,
    ChunkedKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)

from .layout import bucketed
from .precision import on_cuda

KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize accepts for affine quantization
KV_GROUP_SIZES = (32, 64, 128)


def check_cache(cache, allow_quantized: bool = False, max_rows: Optional[int] = None) -> None:
    """Raises ``ValueError`` unless every layer's cache can be rolled back to a tree path.

    Args:
        cache (list): a cache per layer.
        allow_quantized (bool): also accept ``QuantizedKVCache`` layers
          (``kv_bits``; :func:`commit_path` compacts their packed data, scales
          and biases). Default: ``False``.
        max_rows (int, optional): the most rows any layer will hold during the
          generation (:func:`window_rows`). When given, a ``RotatingKVCache``
          whose ``max_size`` is at least this is accepted: its window never
          fills, so it never rotates and behaves as a plain cache. Default:
          ``None`` (rotating caches refused).

    Example: ``check_cache([KVCache(), QuantizedKVCache()], allow_quantized=True)``
    passes; without ``allow_quantized`` it raises, naming ``QuantizedKVCache``.
    """
    ok = (KVCache, QuantizedKVCache) if allow_quantized else (KVCache,)
    if max_rows is not None:
        ok += (RotatingKVCache,)
    named = ok
    ok += (WindowKVCache, ChunkKVCache, KVCacheList)  # (ours: unnamed below)
    bad = sorted({type(c).__name__ for c in cache if type(c) not in ok})
    if "ChunkedKVCache" in bad:
        raise ValueError(
            "Got mlx-lm's ChunkedKVCache (Llama 4's chunked-attention layers): it drops the "
            "rows before the last chunk, so a rejected draft could not be rolled back. Make "
            "the prompt cache with mlx_specstream.make_prompt_cache(model), not mlx-lm's."
        )
    if bad:
        refused = [
            *([] if allow_quantized else ["quantized (kv_bits)"]),
            *([] if max_rows is not None else ["rotating (max_kv_size)"]),
            "recurrent",
        ]
        kinds = refused[0] if len(refused) == 1 else f"{', '.join(refused[:-1])} and {refused[-1]}"
        raise ValueError(
            f"Speculative Streaming needs a {' or '.join(t.__name__ for t in named)} per layer, got "
            f"{bad}: {kinds} caches are not supported."
        )
    rotating = [c for c in cache if type(c) is RotatingKVCache]
    small = min(rotating, key=lambda c: c.max_size, default=None)
    if small is not None and small.max_size < max_rows:
        fix = (
            f"Use max_kv_size >= {max_rows}, fewer max_tokens, or leave max_kv_size unset."
            if small.keep
            else "A model's sliding-window layers need a cache that keeps every token: make "
            "it with mlx_specstream.make_prompt_cache(model), not mlx-lm's."
        )
        raise ValueError(
            f"RotatingKVCache max_size={small.max_size} is smaller than the {max_rows} rows "
            "this generation can hold (cached + prompt + max_tokens + one tree pass): its "
            f"window would rotate inside a step and rejected drafts could not be rolled back. "
            + fix
        )


def window_rows(cached: int, prompt: int, max_tokens: int, step_rows: int) -> int:
    """The most rows any layer's cache holds while generating (a bound for
    :func:`check_cache`'s ``max_rows``).

    The committed rows never exceed the cached tokens, the prompt and every
    generated token; one pass appends at most ``step_rows`` more on top (tree
    nodes, plus their stream rows in the stream layers), removed at commit.

    Args:
        cached (int): tokens already in the cache before the call.
        prompt (int): prompt tokens of the call.
        max_tokens (int): tokens to generate (``-1``, no limit, has no bound).
        step_rows (int): the most rows one forward pass appends to a layer,
          e.g. ``max_tree_nodes * (1 + num_streams)`` with fused streams.

    Example: ``window_rows(0, 10, 20, 16 * 4)`` is ``94``: a cache of
    ``max_kv_size=94`` or more never rotates during that generation.
    """
    if max_tokens < 0:
        raise ValueError(
            f"max_tokens={max_tokens}: a generation without a token limit can always fill a "
            "RotatingKVCache (max_kv_size); set max_tokens or leave max_kv_size unset."
        )
    return cached + prompt + max_tokens + step_rows


def _arrays(c) -> list:
    """The arrays of one layer's cache that carry the token axis (axis 2):
    keys and values, or the packed data, scales and biases of both (of each
    member of a :class:`KVCacheList`)."""
    if isinstance(c, KVCacheList):
        return [a for member in c.caches for a in _arrays(member)]
    if isinstance(c.keys, (tuple, list)):  # QuantizedKVCache
        return [*c.keys, *c.values]
    return [c.keys, c.values]


def cache_arrays(cache: list) -> list:
    """Every array of a list of layer caches that holds rows (to evaluate them)."""
    return [a for c in cache for a in _arrays(c) if a is not None]


def commit_path(cache: List[KVCache], prefix: int, keep_per_layer: Sequence[Sequence[int]]) -> None:
    """Compacts each layer's cache to ``prefix`` rows plus the rows in its keep list.

    The rows written in one step follow the ``prefix`` committed rows. Layer
    ``l`` keeps its rows ``keep_per_layer[l]`` (ascending, relative to
    ``prefix``), moved to ``prefix, prefix + 1, ...``; everything after them
    (rejected nodes, stream rows) is dropped.

    A ``QuantizedKVCache`` layer is gathered along the token axis of its packed
    data, scales and biases (quantization groups run along the head
    dimension, so every row is quantized on its own and moves whole). Layers
    of different kinds may be mixed.

    Example: rows ``[p0 p1 | a b c d]`` with prefix 2 and keep ``[0, 2]`` become
    ``[p0 p1 a c]``; keep ``[0, 1]`` is a plain trim to ``[p0 p1 a b]``.
    """
    moves = []
    for c, keep in zip(cache, keep_per_layer):
        keep = list(keep)
        if keep != list(range(len(keep))):
            row = prefix - first_row(c)  # (a WindowKVCache's rows start past position 0)
            idx = mx.array(keep, dtype=mx.int32) + row
            arrays = _arrays(c)
            moves.append((arrays, row, len(keep), [mx.take(a, idx, axis=2) for a in arrays]))
    if moves:
        # Evaluate the gathered rows first so the slice writes below update the
        # cache buffers in place instead of copying them.
        mx.eval([rows for *_, rows in moves])
        for arrays, row, n, rows in moves:
            for a, r in zip(arrays, rows):
                a[..., row : row + n, :] = r
    for c, keep in zip(cache, keep_per_layer):
        c.trim(c.offset - (prefix + len(keep)))


@dataclass
class Fold:
    """A launched step's accepted path, as the next (pipelined) pass folds it into
    the caches before the host has read it.

    Attributes:
        prefix (int): committed rows before that step (where its rows start).
        accepted (mx.array): device scalar, the length of its accepted path.
        path (mx.array): ``(span,)`` its rows on that path, padded
          (a row of :attr:`~mlx_specstream.layout.TreeLayout.paths_mx`).
        rows (list): per layer, the ``(keys, values)`` rows that step appended.
        chain (bool): that step's tree was a chain, so its accepted path is a
          prefix of its rows, already in place: nothing is moved.
        moves (mx.array, optional): ``(rows,)`` where each row of the layer with
          the most rows goes, from ``prefix`` (a row of
          :func:`~mlx_specstream.tree.fold_destinations`); needed unless ``chain``.
    """

    prefix: int
    accepted: mx.array
    path: mx.array
    rows: list
    chain: bool = False
    moves: Optional[mx.array] = None

    @property
    def span(self) -> int:
        return self.path.shape[0]

    @cached_property
    def start(self) -> mx.array:
        """``(1,)`` where the next pass's rows go: ``prefix + accepted`` (one array for all layers)."""
        return mx.array([self.prefix], dtype=mx.int32) + self.accepted

    @cached_property
    def _destinations(self) -> mx.array:
        if self.moves is None:
            raise ValueError("A fold of a tree that is not a chain needs its moves.")
        return (self.moves + self.prefix).reshape(1, 1, -1, 1)

    def destinations(self, rows: int) -> mx.array:
        """``(1, 1, rows, 1)`` the cache slots a layer's first ``rows`` appended rows are
        written to (one array for all layers; lower layers take a prefix of it)."""
        return self._destinations[:, :, :rows]


class FoldingCache:
    """One layer's ``KVCache`` as a pipelined pass sees it.

    A pipelined pass is launched before the host knows how much of the
    previous tree was accepted. Its ``update_and_fetch`` first writes that
    tree's accepted rows (gathered on the device from the rows it appended,
    :class:`Fold`) after the committed prefix, then writes this pass's rows
    right after them, at an offset only the device knows. It returns a view
    of host-known length ``prefix + span + rows``: the columns past this
    pass's rows hold stale rows, which the pass's mask hides
    (:func:`~mlx_specstream.layout.place_mask`). The wrapped cache's
    ``offset`` is left alone; the decoder sets it once it has read the step.

    The fold is one scatter per cache array: each of the previous pass's rows
    goes to its slot on the accepted path, and every other row onto the first
    slot of this pass's rows, which the write after it overwrites.

    Worked example: prefix 5, the previous tree (root, two children, a
    grandchild under the first: parents ``[-1, 0, 0, 1]``) appended 4 rows
    ``a b c d`` and accepted the path ``[0, 2]`` (its moves
    ``[0, 2, 1, 2]``), this pass appends ``x y``. The scatter writes ``a`` to
    5, ``c`` to 6, ``b`` and ``d`` to 7; then ``x y`` are written at 5 + 2:
    rows ``[p0..p4 a c x y]``, a view 5 + 3 + 2 = 10 rows long (span 3: the
    tree's deepest path) whose last row is stale and hidden. After a chain
    ``a b c d`` whose path ``[0, 1]`` is accepted, ``a b`` are already in
    place: the rows become ``[p0..p4 a b x y]`` with no scatter (two kernels
    fewer per layer).

    Args:
        cache (KVCache): the layer's cache (its buffers are updated).
        fold (Fold, optional): the previous step (``None``: nothing to fold,
          this pass's rows follow ``cache.offset``).
        layer (int): this layer's index in ``fold.rows``.
        member (int, optional): the member's index, for a member of a
          :class:`KVCacheList` (:class:`FoldingCacheList`).
    """

    def __init__(
        self, cache: KVCache, fold: Optional[Fold], layer: int, member=None, bucket: int = 0
    ):
        self.cache, self.fold, self.layer, self.member = cache, fold, layer, member
        self.bucket = bucket  # the view's columns: a multiple of this (layout.pad_hidden)
        self.offset = cache.offset if fold is None else fold.prefix  # (RoPE is the hooks')
        self.start = first_row(cache)  # the position of its first row
        self.rows = None  # (keys, values) this pass appends, for the next fold
        # The rows its write's view ends at. (The view itself is not kept: held past the
        # pass, it would share the buffers the next pass writes into while steps overlap,
        # and MLX would allocate new ones: the peak would hold every layer's cache twice.)
        self.end = None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        c, fold, first = self.cache, self.fold, self.start
        span = 0 if fold is None else fold.span
        # (rows; the rest are positions: the bucket's end is a position, as the mask's)
        end = bucketed(self.offset + span + keys.shape[2], self.bucket) - first
        _reserve(c, keys, values, end)
        if fold is None:
            start = mx.array([self.offset - first], dtype=mx.int32)
        else:
            start = fold.start - first if first else fold.start
            if not fold.chain:  # move the accepted rows (a chain's are in place)
                rows = fold.rows[self.layer]  # (a KVCacheList's: one per member)
                k, v = rows if self.member is None else rows[self.member]
                to = fold.destinations(k.shape[2])
                to = to - first if first else to
                c.keys = mx.put_along_axis(c.keys, to, k, axis=2)
                c.values = mx.put_along_axis(c.values, to, v, axis=2)
        c.keys = mx.slice_update(c.keys, keys, start, axes=(2,))
        c.values = mx.slice_update(c.values, values, start, axes=(2,))
        self.rows, self.end = (keys, values), end
        return self.keys_and_values()

    def keys_and_values(self):
        """What this pass's write returned: Gemma 3n's KV-sharing layers read it."""
        c = self.cache
        return c.keys[..., : self.end, :], c.values[..., : self.end, :]

    # (DeepSeek V3.2's attention reads and sets the rows of its KVCacheList's members)
    @property
    def keys(self):
        return self.cache.keys

    @keys.setter
    def keys(self, a):
        self.cache.keys = a

    @property
    def values(self):
        return self.cache.values

    @values.setter
    def values(self, a):
        self.cache.values = a

    # (Llama 4 reads these of its chunked layers' caches; the pass's masks are ours)
    @property
    def start_position(self) -> int:
        return self.start

    def maybe_trim_front(self) -> None:
        """Nothing: a pass never drops rows (:class:`ChunkKVCache`)."""


class FoldingCacheList:
    """A :class:`KVCacheList` as a pipelined pass sees it: a :class:`FoldingCache`
    per member, each folding that member's rows of the previous step."""

    def __init__(self, cache: "KVCacheList", fold: Optional[Fold], layer: int):
        self.caches = [FoldingCache(c, fold, layer, j) for j, c in enumerate(cache.caches)]

    def __getitem__(self, j: int) -> FoldingCache:
        return self.caches[j]

    @property
    def offset(self) -> int:
        return self.caches[0].offset

    @property
    def rows(self) -> list:
        """Per member, the ``(keys, values)`` rows this pass appended."""
        return [c.rows for c in self.caches]


def default_bucket(keys: Optional[mx.array]) -> int:
    """The column bucket a pass over a cache holding ``keys`` takes by default: 256
    (mlx-lm's cache step) on MLX's CUDA backend in float16 and bfloat16, where
    attention over several rows is cuDNN's, whose graph is built per shape (a pass at
    a cache length met for the first time cost tens of milliseconds on an H200:
    benchmarks/RESULTS.md, "The first GPU run"); else 0, also before any keys."""
    return 256 if keys is not None and keys.dtype != mx.float32 and on_cuda() else 0


class BucketedCache:
    """One layer's ``KVCache`` as an unpipelined pass in column buckets sees it.

    Its ``update_and_fetch`` writes the pass's rows after ``offset`` as the
    cache's own does (the offset grows by them), into buffers first grown to
    hold a view whose columns run to the next multiple of ``bucket``, and
    returns that view: the columns past the pass's rows hold zeros or stale
    rows, which the pass's mask hides (:func:`~mlx_specstream.layout.pad_hidden`).
    Everything else (``offset`` too) is the cache's.

    Example: offset 5, a pass of 4 rows, ``bucket = 8``: rows 5-8 are
    written, ``offset`` becomes 9, and the view is 16 columns long. A
    :class:`WindowKVCache` whose rows start at position 3 gives a view of its
    rows up to position 15: 13 rows.
    """

    def __init__(self, cache: KVCache, bucket: int):
        self.cache, self.bucket = cache, bucket

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        c = self.cache
        # (in positions: a WindowKVCache's rows start at its first row's, as its mask's do)
        width = bucketed(c.offset + keys.shape[2], self.bucket) - first_row(c)
        _reserve(c, keys, values, width)  # (then the cache writes in place)
        c.update_and_fetch(keys, values)
        return c.keys[..., :width, :], c.values[..., :width, :]

    def __getattr__(self, name):
        return getattr(self.cache, name)


def folding_cache(cache, fold: Optional[Fold], layer: int, bucket: int = 0):
    """Layer ``layer``'s cache as a pipelined pass sees it (:class:`FoldingCache`;
    ``bucket``: its view's columns rounded up to a multiple of this)."""
    if isinstance(cache, KVCacheList):
        return FoldingCacheList(cache, fold, layer)
    return FoldingCache(cache, fold, layer, bucket=bucket)


def appended_rows(rows) -> int:
    """How many rows one layer's entry of :attr:`Fold.rows` holds: ``(keys, values)``,
    or a list of them (one per member of a :class:`KVCacheList`)."""
    keys = rows[0][0] if isinstance(rows, list) else rows[0]
    return keys.shape[2]


def _reserve(c: KVCache, keys: mx.array, values: mx.array, rows: int) -> None:
    """Grows ``c``'s buffers (by ``KVCache.step`` rows at a time) to hold ``rows``."""
    have = 0 if c.keys is None else c.keys.shape[2]
    if have >= rows:
        return
    B, H, _, dk = keys.shape
    n = -(-(rows - have) // c.step) * c.step
    new_k = mx.zeros((B, H, n, dk), keys.dtype)
    new_v = mx.zeros((B, H, n, values.shape[3]), values.dtype)
    if c.keys is None:
        c.keys, c.values = new_k, new_v
    else:
        c.keys = mx.concatenate([c.keys, new_k], axis=2)
        c.values = mx.concatenate([c.values, new_v], axis=2)


def prefill_chunks(prompt: int, step: int) -> List[int]:
    """The sizes of the model calls mlx-lm's ``generate_step`` feeds a prompt in.

    All but the last prompt token are fed in chunks of ``step`` (the last one
    shorter); the last token is fed by the first decode call. mlx-lm converts
    the cache (``kv_bits``) after each of these calls, so feeding the prompt
    in the same chunks and calling :meth:`KVQuantizer.maybe_quantize` after
    each gives the same conversion points.

    Args:
        prompt (int): the number of prompt tokens (at least 1).
        step (int): ``prefill_step_size``.

    Returns:
        list: the chunk sizes, summing to ``prompt - 1``.

    Example: ``prefill_chunks(10, 4)`` is ``[4, 4, 1]`` (then the 10th token is
    the first decode call); ``prefill_chunks(1, 4)`` is ``[]``.
    """
    if step < 1:
        raise ValueError(f"prefill_step_size={step} must be at least 1.")
    body = max(prompt - 1, 0)
    return [min(step, body - i) for i in range(0, body, step)]


@dataclass(frozen=True)
class KVQuantizer:
    """mlx-lm's KV-cache quantization (``kv_bits``) at mlx-lm's moments.

    mlx-lm's ``generate_step`` calls ``maybe_quantize_kv_cache`` after every
    model call: after each prefill chunk (:func:`prefill_chunks`) and after
    each one-token decode call. A layer converts (``KVCache.to_quantized``)
    once its offset is at least ``quantized_kv_start``. Quantization is per row
    along the head dimension, so *when* a row is quantized does not change its
    packed values; what depends on the moment is which tokens attend to a
    quantized cache, and with it the K/V rows of the layers above.

    The rule a decode loop must follow, for a token at position ``p`` in the
    decode phase: mlx-lm feeds it in a call that starts at offset ``p``; the
    cache is quantized then exactly when an earlier call ended at an offset
    ``>= quantized_kv_start``. Once decoding one token per call, every offset
    is such an end, so a cache still at full precision at offset ``o`` stays so
    for ``max(1, quantized_kv_start - o)`` positions (``o`` itself is always
    fed as it is; ``o + j`` for ``j >= 1`` only while ``o + j <
    quantized_kv_start``): :meth:`full_precision_room`. A tree pass at offset
    ``o`` whose depth is below that room, followed by :func:`commit_path` and
    :meth:`maybe_quantize`, then lets every accepted token see the cache
    mlx-lm's would have shown it; once converted, a tree may be any depth
    (a quantized pass quantizes its own rows as it appends them, as mlx-lm's
    one-token calls do).

    Worked example: ``quantized_kv_start=10``, prompt of 7 tokens, prefill
    step 4. mlx-lm feeds chunks of 4 and 2 (offsets 4, 6: no conversion),
    then one token per call at offsets 6, 7, 8, ... A tree step at offset 6
    has room ``10 - 6 = 4``: depth at most 3 (positions 6..9, all at full
    precision in mlx-lm too). If all 4 are accepted the committed offset is
    10, so :meth:`maybe_quantize` converts, and the next root (position 10)
    sees a quantized cache, as in mlx-lm, whose call ending at offset 10
    converted it. With 2 accepted (offset 8) nothing converts and the next
    step has room 2: depth at most 1.

    Args:
        kv_bits (int): bits per quantized element.
        kv_group_size (int): elements per quantization group (must divide the
          head dimension). Default: ``64``.
        quantized_kv_start (int): the offset from which mlx-lm converts.
          Default: ``5000`` (mlx-lm's).
    """

    kv_bits: int
    kv_group_size: int = 64
    quantized_kv_start: int = 5000

    def __post_init__(self):
        if self.kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits={self.kv_bits!r}: choose one of {KV_BITS} (or None).")
        if self.kv_group_size not in KV_GROUP_SIZES:
            raise ValueError(
                f"kv_group_size={self.kv_group_size!r}: choose one of {KV_GROUP_SIZES}."
            )
        if not (isinstance(self.quantized_kv_start, int) and self.quantized_kv_start >= 0):
            raise ValueError(
                f"quantized_kv_start={self.quantized_kv_start!r} must be an integer >= 0."
            )

    @classmethod
    def from_args(
        cls, kv_bits: Optional[int], kv_group_size: int = 64, quantized_kv_start: int = 5000
    ) -> Optional["KVQuantizer"]:
        """A quantizer for mlx-lm's arguments, ``None`` when ``kv_bits`` is ``None``."""
        if kv_bits is None:
            return None
        return cls(kv_bits, kv_group_size, quantized_kv_start)

    def maybe_quantize(self, cache: list) -> None:
        """Converts, in place, every layer mlx-lm's ``maybe_quantize_kv_cache``
        would convert now: those with ``to_quantized`` and at least
        ``quantized_kv_start`` tokens (``cache``: one per layer; converted
        entries are replaced)."""
        for i, c in enumerate(cache):
            if hasattr(c, "to_quantized") and c.offset >= self.quantized_kv_start:
                cache[i] = c.to_quantized(group_size=self.kv_group_size, bits=self.kv_bits)

    def full_precision_room(self, cache: list) -> Optional[int]:
        """How many positions, from the cache's offset on, mlx-lm's one-token
        decoding feeds before its cache is quantized (``None``: already
        quantized, no limit). Always at least 1: the next token is fed to the
        cache as it is now.

        Example: with ``quantized_kv_start=10``, a full-precision cache at
        offset 6 has room 4 (positions 6, 7, 8, 9); at offset 9 or 12, room 1.
        """
        if not any(hasattr(c, "to_quantized") for c in cache):
            return None
        return max(1, self.quantized_kv_start - cache_tokens(cache))

    def max_tree_depth(self, cache: list) -> Optional[int]:
        """The deepest tree (levels below the root) the next step may verify
        so that it does not straddle the conversion (``None``: no limit)."""
        room = self.full_precision_room(cache)
        return None if room is None else room - 1


class SpecPromptCache(list):
    """mlx-lm's per-layer KV caches plus the attached drafter's own state.

    A plain ``list`` for everything that takes a prompt cache; ``drafter_state``
    lets a ParallelSpec drafter keep its context across calls, as the KV caches do.
    """

    drafter_state = None


# A drafter's state kept with a plain list of caches (mlx-lm's make_prompt_cache),
# which cannot carry it: keyed by the list's first layer, dropped with it.
_DRAFTER_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def drafter_state_of(cache):
    """The drafter state kept with ``cache`` by :func:`keep_drafter_state` (or ``None``)."""
    if isinstance(cache, SpecPromptCache):
        return cache.drafter_state
    return _DRAFTER_STATES.get(cache[0]) if len(cache) else None


def keep_drafter_state(cache, state) -> None:
    """Keeps a ParallelSpec drafter's state with ``cache`` for the next call: in a
    :class:`SpecPromptCache`, or beside a plain list, keyed by its first layer. A
    layer replaced (``kv_bits`` converts it) loses it: the next call then drafts
    without the older context, exactly all the same."""
    if isinstance(cache, SpecPromptCache):
        cache.drafter_state = state
    elif len(cache):
        _DRAFTER_STATES[cache[0]] = state


def sliding_windows(model) -> List[Optional[int]]:
    """Each layer cache's sliding window as the model makes it: the ``max_size`` of
    a ``RotatingKVCache`` with nothing kept at its start (``keep=0``), else ``None``.

    Example: a Gemma 3 whose every second layer is global, window 512, gives
    ``[512, None, 512, None, ...]``; a model without ``make_cache`` (qwen2) gives ``[]``.
    """
    return [window_of(c) for c in model.make_cache()] if hasattr(model, "make_cache") else []


def window_of(c) -> Optional[int]:
    """The sliding window of a layer cache a model made: a ``RotatingKVCache``'s
    ``max_size`` when it keeps nothing at its start (mlx-lm's ``max_kv_size`` caches
    keep 4 tokens: those are not the model's windows), else ``None``."""
    return c.max_size if type(c) is RotatingKVCache and c.keep == 0 else None


class WindowKVCache(KVCache):
    """A sliding-window layer's cache for one generation: a ``KVCache`` (``offset``
    counts positions, so RoPE and the masks see every token's) whose rows start at
    position ``start``, once the rows before it are out of every window to come.

    After each step, :meth:`forget` drops the rows no query from then on can see,
    keeping a whole window of slack behind the committed tokens (a generation's end
    may step back a few tokens) and dropping a window's worth at a time (one copy
    per ``window`` tokens). So the layer holds 2 to 3 windows of rows, not the whole
    context; a rejected draft is still cut as from a ``KVCache``. The masks drop the
    same columns: :meth:`make_mask` for the model's own, ``StreamRuntime._windowed``
    for the tree's.

    Example: window 4, 13 tokens committed, nothing dropped yet: ``forget(13)``
    drops positions 0..4 (those below ``13 - 2 * 4``), so ``start`` is 5 and the
    rows hold positions 5..12; a query at position 13 or later sees 10 and after.
    """

    def __init__(self, window: int):
        super().__init__()
        self.window, self.start = window, 0

    def update_and_fetch(self, keys, values):
        self.offset -= self.start  # (KVCache's own, on rows counted from start)
        try:
            super().update_and_fetch(keys, values)
        finally:
            self.offset += self.start
        return self.keys_and_values()

    @property
    def state(self):
        return self.keys_and_values()

    def keys_and_values(self):
        """The rows held (Gemma 3n's KV-sharing layers read their source's)."""
        held = self.offset - self.start
        return self.keys[..., :held, :], self.values[..., :held, :]

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """mlx-lm's causal mask with the window (its own when the model passes none,
        as a ``RotatingKVCache`` does), without the columns of dropped rows."""
        from mlx_lm.models.base import create_causal_mask

        mask = create_causal_mask(N, self.offset, window_size=window_size or self.window)
        return mask[..., self.start :]

    def trimmable(self) -> int:
        """The most tokens :meth:`trim` takes off: every one until rows were dropped,
        then as many as leave a query at the new end its whole window (the
        ``window - 1`` positions before it).

        Example: window 4, rows of positions 5..12 (``offset`` 13): 5 (down to
        position 8, whose window 5..8 is held); before any drop, 13.
        """
        if self.start == 0:
            return self.offset
        return max(self.offset - self.start - self.window + 1, 0)

    def trim(self, n: int) -> int:
        return super().trim(min(self.trimmable(), n))  # (never into a window it lacks)

    def forget(self, committed: int) -> None:
        """Drops the rows below ``committed - 2 * window`` once a window's worth of
        them is there (``committed``: the generation's tokens in the cache; no query
        from then on sits before ``committed - window``)."""
        forget_rows(self, committed)


def forget_rows(c, committed: int) -> None:
    """Drops the first rows of a window layer's cache ``c`` (its ``keys`` and ``values``
    hold positions ``c.start`` on, on their second-to-last axis) below ``committed -
    2 * c.window``, once a window's worth of them is there: a
    :class:`WindowKVCache`'s, or a batch's ``RaggedKVCache`` (``committed``: its
    shortest row's end).

    Example: window 4, rows from position 0, ``committed`` 13: positions 0..4 go
    (``start`` 5); ``committed`` 14 then drops nothing (1 row below 14 - 8).
    """
    drop = committed - 2 * c.window - c.start
    if c.keys is None or drop < c.window:
        return
    c.keys = mx.contiguous(c.keys[..., drop:, :])
    c.values = mx.contiguous(c.values[..., drop:, :])
    c.start += drop


def zeros_before(a: mx.array, n: int) -> mx.array:
    """``a`` with ``n`` rows of zeros before its rows (its second-to-last axis)."""
    return mx.concatenate([mx.zeros((*a.shape[:-2], n, a.shape[-1]), a.dtype), a], axis=-2)


def attention_chunks(model) -> List[Optional[int]]:
    """Each layer cache's attention chunk as the model makes it: the ``chunk_size`` of
    a ``ChunkedKVCache`` (Llama 4's chunked layers), else ``None``.

    Example: Llama 4 (chunks of 8192, every fourth layer global) gives
    ``[8192, 8192, 8192, None, 8192, ...]``; a model without ``make_cache`` gives ``[]``.
    """
    made = model.make_cache() if hasattr(model, "make_cache") else []
    return [c.chunk_size if type(c) is ChunkedKVCache else None for c in made]


class ChunkKVCache(WindowKVCache):
    """A chunked-attention layer's cache (Llama 4's): a query at position ``p``
    sees the positions ``(p // chunk) * chunk .. p``. In place of mlx-lm's
    ``ChunkedKVCache``, which keeps the last ``chunk`` rows before each call, so a
    rejected draft could not be cut from it once past a chunk.

    Rows are kept as in a :class:`WindowKVCache` of ``chunk`` tokens: with
    ``bounded`` (one generation's own caches) :meth:`forget` drops those before
    ``committed - 2 * chunk`` (no query to come sees them), else every row is
    kept (a prompt cache that may be trimmed back). The model reads
    ``start_position`` (its first row) and calls :meth:`maybe_trim_front`
    before each pass, as on mlx-lm's; mlx-lm's own mask from them is then right.

    Like mlx-lm's ``ChunkedKVCache`` it has no ``to_quantized``: mlx-lm's
    ``kv_bits`` leaves these layers at full precision, and so does ours.

    Example: chunk 4, rows of positions 0..9 held: a query at position 9 sees
    8 and 9 (``make_mask(1)``); with ``bounded``, ``forget(14)`` drops 0..5.
    """

    def __init__(self, chunk: int, bounded: bool = False):
        super().__init__(chunk)  # (the window of rows kept: a chunk's)
        self.bounded = bounded

    @property
    def chunk(self) -> int:
        return self.window

    @property
    def start_position(self) -> int:
        return self.start

    def maybe_trim_front(self) -> None:
        """Nothing: rows are dropped between steps (:meth:`forget`), never inside one."""

    @property
    def to_quantized(self):
        raise AttributeError("a chunked layer's cache stays at full precision, as mlx-lm's")

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """The chunked causal mask of ``N`` queries over the rows held."""
        pos = mx.arange(self.offset, self.offset + N)[:, None]
        cols = mx.arange(self.start, self.offset + N)
        return (cols <= pos) & (cols >= (pos // self.chunk) * self.chunk)

    def trimmable(self) -> int:
        """As a window's, to the start of the first chunk whose rows are all held.

        Example: chunk 4, rows of positions 6..13 (``offset`` 14): 6 (down to 8)."""
        if self.start == 0:
            return self.offset
        return max(self.offset - -(-self.start // self.chunk) * self.chunk, 0)

    def forget(self, committed: int) -> None:
        if self.bounded:
            super().forget(committed)


class KVCacheList(CacheList):
    """mlx-lm's ``CacheList`` of ``KVCache`` members that grow together, one row per
    token: DeepSeek V3.2's (and GLM-5's) attention keeps its latent keys in the first
    and its indexer's keys in the second. Counts its tokens (``offset``, the first
    member's) so that the step and :func:`commit_path` treat it as one layer cache,
    whose rows are moved in every member at once.

    Like mlx-lm's ``CacheList`` it has no ``to_quantized``: mlx-lm's ``kv_bits``
    leaves such layers at full precision, and so does ours.
    """

    @property
    def offset(self) -> int:
        return self.caches[0].offset

    @offset.setter
    def offset(self, n: int) -> None:  # (after a pipelined step, as a KVCache's)
        for c in self.caches:
            c.offset = n


def kv_lists(c) -> bool:
    """Whether a layer cache a model made is a ``CacheList`` of plain ``KVCache``s."""
    members = getattr(c, "caches", None) if type(c) is CacheList else None
    return bool(members) and all(type(m) is KVCache for m in members)


def adopt_kv_lists(cache: list) -> None:
    """Replaces, in place, each mlx-lm ``CacheList`` of plain ``KVCache``s in ``cache``
    by a :class:`KVCacheList` over the same members (so their rows stay where they
    are): mlx-lm's own prompt caches, and those its batches hand back, as ours."""
    for i, c in enumerate(cache):
        if kv_lists(c):
            cache[i] = KVCacheList(*c.caches)


def whole_windows(cache: list) -> list:
    """Replaces, in place, each :class:`WindowKVCache` of ``cache`` (not a chunked
    layer's) by a ``KVCache`` with a row for every position, for batches, whose rows
    hold every token (mlx-lm's and ours): the rows it dropped come back as zeros,
    which no query to come sees (every mask drops the columns past its window).

    Example: window 4, rows of positions 5..12: a ``KVCache`` of 13 rows, the first
    5 zeros. Returns ``cache``.
    """
    for i, c in enumerate(cache):
        if type(c) is WindowKVCache:
            cache[i] = whole_rows(c)
    return cache


def whole_rows(c: WindowKVCache) -> KVCache:
    """A ``KVCache`` with a row for every position of ``c`` (window or chunked): zeros
    before its first row (``c.start``), then its rows."""
    whole = KVCache()
    if c.keys is not None:
        k, v = c.keys_and_values()
        whole.keys, whole.values = zeros_before(k, c.start), zeros_before(v, c.start)
        whole.offset = c.offset
    return whole


def bounded_windows(cache: list, model, draft_model=None) -> list:
    """Replaces, in place, the ``KVCache`` of each sliding-window layer of ``model``
    (the first layers of ``cache``) and of ``draft_model`` (the layers after them) by
    a :class:`WindowKVCache` over the same rows, then has every window layer drop the
    rows no window to come sees: a cache kept to be reused (a batch row's, one plain
    decoding filled). Returns ``cache``."""
    from mlx_lm.models.cache import make_prompt_cache as make_mlx_lm_cache

    start = 0
    for m in (model, draft_model):
        if m is None:
            continue
        made = make_mlx_lm_cache(m)  # (its layer caches: their windows and their count)
        for i, w in enumerate(map(window_of, made), start):
            if w is not None and type(cache[i]) is KVCache:
                c = WindowKVCache(w)
                c.keys, c.values, c.offset = cache[i].keys, cache[i].values, cache[i].offset
                cache[i] = c
        start += len(made)
    forget_past_windows(cache)
    return cache


def first_row(c) -> int:
    """The position of a layer cache's first row (0 unless a :class:`WindowKVCache`
    dropped rows)."""
    return getattr(c, "start", 0)


def forget_past_windows(cache: list) -> None:
    """Each :class:`WindowKVCache` of ``cache`` drops what no query to come can see."""
    for c in cache:
        if isinstance(c, WindowKVCache):
            c.forget(c.offset)


def refuse_quantized_windows(model, draft_model, kv_bits: int) -> None:
    """Raises ``ValueError`` when ``kv_bits`` is asked of a model (or draft model)
    with sliding-window layers: mlx-lm cannot quantize their ``RotatingKVCache``
    (``to_quantized`` raises ``NotImplementedError``), so there is no plain decoding
    with the same ``kv_bits`` for ours to equal."""
    for name, m in (("model", model), ("draft model", draft_model)):
        windows = [] if m is None else sliding_windows(m)
        if any(w is not None for w in windows):
            layers = [i for i, w in enumerate(windows) if w is not None]
            raise ValueError(
                f"kv_bits={kv_bits}: the {name}'s layers {layers} attend in a sliding "
                f"window of {max(w for w in windows if w)} tokens, and mlx-lm does not "
                "quantize their RotatingKVCache, so no plain decoding with this kv_bits "
                "exists to equal; leave kv_bits unset for this model."
            )


def model_caches(model, max_kv_size: Optional[int] = None, bounded: bool = False) -> list:
    """mlx-lm's caches for ``model`` (``make_prompt_cache``), with every sliding-window
    layer's ``RotatingKVCache`` replaced by a ``KVCache`` that keeps every token
    (and every chunked layer's ``ChunkedKVCache`` by a :class:`ChunkKVCache`).

    A rotating cache overwrites its oldest rows, so a tree's rejected rows could not
    be cut from it once its window is full. The window stays exact: mlx-lm's models
    ask the layer's cache for a mask with ``window_size`` (a ``KVCache`` gives one),
    and the tree's masks apply it too. Memory then grows with the context in those
    layers, as in a full-attention layer; with ``bounded`` (one generation's own
    caches, never trimmed further back than a step) they are
    :class:`WindowKVCache` instead, which hold 2 to 3 windows. ``max_kv_size`` is
    mlx-lm's: rotating caches for models without ``make_cache``, not replaced.
    """
    from mlx_lm.models.cache import make_prompt_cache as make_mlx_lm_cache

    window = (lambda w: WindowKVCache(w)) if bounded else (lambda w: KVCache())
    cache = make_mlx_lm_cache(model, max_kv_size=max_kv_size)
    cache = [ChunkKVCache(c.chunk_size, bounded) if type(c) is ChunkedKVCache else c for c in cache]
    cache = [KVCacheList(*c.caches) if kv_lists(c) else c for c in cache]
    return [c if window_of(c) is None else window(window_of(c)) for c in cache]


def make_prompt_cache(
    model, max_kv_size: Optional[int] = None, draft_model=None, bounded: bool = True
) -> SpecPromptCache:
    """A prompt cache for ``model`` (:func:`model_caches`, and room for a drafter's state).

    ``max_kv_size`` gives rotating caches, as in mlx-lm (see :func:`check_cache`).
    With ``draft_model`` the draft model's caches follow the model's, as mlx-lm's
    draft-model decoding keeps them. ``bounded`` (the default): sliding-window and
    chunked layers hold 2 to 3 windows (:class:`WindowKVCache`), as mlx-lm's rotating
    caches hold one, and :func:`trim_prompt_cache` takes off no more tokens than
    leave each window whole (a window and more once rows were dropped; mlx-lm's
    cannot be trimmed at all once full). ``bounded=False``: every token is kept, and
    the cache can be trimmed back to any of them.
    """
    cache = model_caches(model, max_kv_size, bounded)
    if draft_model is not None:
        cache += model_caches(draft_model, bounded=bounded)
    return SpecPromptCache(cache)


def cache_tokens(cache) -> Optional[int]:
    """The tokens a list of layer caches holds: its first KV layer's offset
    (``None`` when no layer counts them, as in a state-space model's). mlx-lm's
    ``CacheList`` of ``KVCache``s (a batch hands them back) is taken over in place."""
    adopt_kv_lists(cache)
    return next((c.offset for c in cache if hasattr(c, "offset")), None)


def trimmable_tokens(cache) -> int:
    """The most tokens :func:`trim_prompt_cache` can take off every layer of ``cache``:
    all it holds, but no more than a :class:`WindowKVCache` (a bounded prompt
    cache's window layer) gives back with each window to come whole."""
    adopt_kv_lists(cache)
    n = cache[0].offset
    return min([n] + [c.trimmable() for c in cache if isinstance(c, WindowKVCache)])


def trim_prompt_cache(cache, n: int) -> int:
    """Removes the last ``n`` tokens from every layer and from the drafter state (as
    many as :func:`trimmable_tokens` allows: fewer where window layers dropped rows).

    Returns:
        int: the number of tokens trimmed (as ``mlx_lm``'s ``trim_prompt_cache``).
    """
    if n == 0:  # (also where a layer cannot be trimmed)
        return 0
    n = min(n, trimmable_tokens(cache))
    for c in cache:
        c.trim(n)
    state = drafter_state_of(cache)
    if state is not None:
        state.trim_to(cache[0].offset)
    return n

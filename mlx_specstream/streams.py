"""Multi-stream attention on top of an unmodified mlx-lm model.

Nothing of the model is copied. ``attach_streams`` swaps the class of each
decoder layer and of each attention's RoPE for a subclass whose ``__call__``
can (a) use our masks and per-row positions, (b) insert the stream rows before
layer ``N - N_s`` and (c) hold the stream rows back after the last layer so
the model's own final norm and head only see the main rows. Parameter paths
do not change, and while no step is running every hook defers to the
original class, so ``mlx_lm.generate`` on the same object is plain decoding.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import ArraysCache, KVCache

from .attention_masks import (
    chunk_cut,
    column_positions,
    llama4_attention_scale,
    llama4_query_scale,
    rows_mask,
    window_cut,
)
from .cache import (
    BucketedCache,
    ChunkKVCache,
    Fold,
    WindowKVCache,
    attention_chunks,
    default_bucket,
    folding_cache,
    first_row,
    sliding_windows,
)
from .config import SpecStreamConfig, VerifierConfig
from .layout import TreeLayout, layout_of, pad_hidden, place_window, with_prefix
from .model_parts import (
    attention_mask_apart,
    rope_rows_at,
    attention_of,
    cache_slots,
    embedding_of,
    hidden_size,
    kv_offset,
    kv_sources,
    layer_params,
    linear_modules,
    linear_shape,
    llama4_query_temperature,
    llama4_scale_settings,
    own_class,
    position_embedding,
    ropes_of,
    submodule,
)
from .precision import on_cuda, on_gpu
from .ragged_cache import RaggedKVCache
from .rope import rope_settings, rotate, tables
from .support import check_supported, tree_on_chains_refusal
from .tree import prune_subtrees, subtree_parents

STREAMS_FILE = "speculative_streams.safetensors"
# Positions covered by a kept RoPE table (beyond: tables for each pass's own positions).
MAX_ROPE_TABLE = 32768
# The layer caches a pass may read in column buckets (StreamRuntime._pass_bucket).
BUCKETABLE = (KVCache, WindowKVCache, ChunkKVCache)


class LowRankAdapter(nn.Module):
    """``x + up(down(x))``: the identity plus a rank-``r`` correction."""

    def __init__(self, dims: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dims, rank, bias=False)
        self.up = nn.Linear(rank, dims, bias=False)
        self.up.weight = mx.zeros_like(self.up.weight)

    def __call__(self, x):
        return x + self.up(self.down(x))


class SpeculativeStreams(nn.Module):
    """The parameters Speculative Streaming adds to a base model.

    * ``embeddings``: ``(gamma, hidden)``, the stream identifiers P_j (Eq. 3);
    * ``prune_adapter``: o_theta, the rank-8 early-exit adapter for pruning;
    * ``stream_init``: f_eta, only when ``stream_init_rank > 0``;
    * ``lora``: only when ``stream_lora_rank > 0``, one dict per stream layer
      (bottom first) mapping a linear module's path to ``{"lora_a": (r, in),
      "lora_b": (out, r)}``, e.g. ``lora.0.self_attn.q_proj.lora_a``.
    """

    def __init__(self, config: SpecStreamConfig, hidden_size: int, lora_shapes=None):
        super().__init__()
        self.embeddings = mx.zeros((config.num_streams, hidden_size))
        if config.prune_adapter_rank > 0:
            self.prune_adapter = LowRankAdapter(hidden_size, config.prune_adapter_rank)
        if config.stream_init_rank > 0:
            self.stream_init = LowRankAdapter(hidden_size, config.stream_init_rank)
        if config.stream_lora_rank > 0:
            r = config.stream_lora_rank
            self.lora = []
            for shapes in lora_shapes:
                layer = {}
                for name, (d_in, d_out) in shapes.items():
                    node = layer
                    for part in name.split("."):
                        node = node.setdefault(part, {})
                    node["lora_a"] = mx.zeros((r, d_in))
                    node["lora_b"] = mx.zeros((d_out, r))
                self.lora.append(layer)

    def lora_params(self, layer: int, name: str) -> dict:
        node = self.lora[layer]
        for part in name.split("."):
            node = node[part]
        return node

    def make_streams(self, h: mx.array) -> mx.array:
        """``(B, R, D)`` main states -> ``(B, R * gamma, D)`` stream rows, node-major."""
        if "stream_init" in self:
            h = self.stream_init(h)
        B, R, D = h.shape
        s = h[:, :, None, :] + self.embeddings.astype(h.dtype)
        return s.reshape(B, R * self.embeddings.shape[0], D)


@dataclass
class StepOutput:
    """What one multi-stream forward pass returns (batch 1)."""

    logits: mx.array  # (R, V) main logits of the kept nodes
    stream_hidden: Optional[
        mx.array
    ]  # (R, gamma, D) last-layer stream states, before the final norm
    kept: List[int]  # tree nodes that survived pruning, ascending
    layout: TreeLayout  # the kept sub-tree (all nodes when nothing is pruned)
    hidden: Optional[mx.array] = None  # (R, D) last-layer main states (with a drafter)
    stream_logits: Optional[mx.array] = None  # (R, gamma, V), with forward(stream_logits=True)
    rows: Optional[list] = None  # per layer, the (keys, values) rows appended (pipelined)

    @property
    def kept_parents(self) -> tuple:
        return self.layout.parents

    @property
    def kept_ancestors(self) -> np.ndarray:
        return self.layout.ancestors


def lora_targets(model, config: SpecStreamConfig) -> List[List[str]]:
    """Per stream layer, the linear module paths that get stream LoRA."""
    first = len(model.layers) - config.num_stream_layers
    out = []
    for i in range(first, len(model.layers)):
        layer = model.layers[i]
        linears = linear_modules(layer)
        targets = config.stream_lora_targets or linears
        missing = [t for t in targets if t not in linears]
        if missing:
            raise ValueError(
                f"speculative_streaming.stream_lora_targets: {missing} are not linear modules of "
                f"layer {i}; its linear modules are {linears}."
            )
        out.append(list(targets))
    return out


def lora_shapes(model, config: SpecStreamConfig):
    """Per stream layer, ``{module path: (in, out)}`` of the stream-LoRA targets (None without LoRA)."""
    if not config.stream_lora_rank:
        return None
    first = len(model.layers) - config.num_stream_layers
    return [
        {name: linear_shape(submodule(model.layers[first + j], name)) for name in targets}
        for j, targets in enumerate(lora_targets(model, config))
    ]


def _swap_call(obj, make_call):
    """Give ``obj`` a subclass of its class whose ``__call__`` is ``make_call(base_call)``."""
    base = type(obj)
    obj.__class__ = type(
        base.__name__, (base,), {"__call__": make_call(base.__call__), "_spec_hook": True}
    )


class StreamRuntime:
    """Runs multi-stream forward passes over one hooked model.

    Held by the model as ``model.speculative_streams`` (a plain attribute, so
    it is not a parameter of the model and never saved with it). With a
    ``drafter`` (:mod:`mlx_specstream.drafters`) instead of streams, ``config``
    is its :class:`~mlx_specstream.config.DrafterConfig`: the passes then only
    verify trees and keep the last layer's states for the drafter.
    """

    def __init__(
        self,
        model: nn.Module,
        config,
        streams: Optional[SpeculativeStreams] = None,
        drafter: Optional[nn.Module] = None,
    ):
        self.model = model
        self.config = config
        self.streams = streams
        self.drafter = drafter
        self.draft_vocab = None  # the tokens drafts rank (mlx_specstream.draft_vocab): all
        self._prefill_hidden: List[mx.array] = []
        self.num_layers = len(model.layers)
        # The layers whose inputs an EAGLE-3 drafter reads, and during a pass those inputs.
        self._feature_layers = getattr(drafter, "feature_layers", None)
        self._feature_at = set(self._feature_layers or [])
        self._features: dict = {}
        self.first_top = self.num_layers - config.num_stream_layers
        self.state: Optional[str] = None  # None (plain model), "step" or "tail"
        self.prune_threshold = 0.0
        self._all_streams = True
        self._head_on_streams = False
        self._lower_plain = self._upper_plain = False  # rows of a chain: a plain pass
        self._main_rows = 0
        self._rows_fused = False  # a rows_pass with the streams' rows
        self._lora_calls = None  # the stream LoRA's calls in the first pass
        # MLX's CUDA backend turns a bool attention mask into an additive one in
        # every layer's call: there the step's masks go in additive, made once.
        # (not where a layer reads the mask as bool: a sparse attention's indexer)
        sparse = any(
            getattr(attention_of(layer), "indexer", None) is not None for layer in model.layers
        )
        self.additive_masks = on_cuda() and not sparse
        # A pass's cache views and masks in columns rounded up to a multiple of this
        # (layout.pad_hidden): None decides per pass (_pass_bucket), 0 never.
        self.kv_bucket: Optional[int] = None
        self.masks_4d = sparse
        self._additive = None  # (bool mask, its additive form) of the last layer
        # Each layer's sliding window (None: attends to every token): the caches keep
        # every token there (cache.model_caches), and our masks apply the window.
        # Each layer's cache, or the earlier layer's whose keys and values it reads
        # (Gemma 4's KV-sharing layers); which layers pass theirs on (tuple outputs).
        self.kv_source = kv_sources(model)
        self.passes_kv = ["shared_kv" in layer_params(layer) for layer in model.layers]
        # Upper layers reading a lower layer's keys: their rows (with stream rows)
        # differ from the rows whose keys they read (_over_lower, _upper_nodes).
        self._reads_lower = [s < self.first_top <= i for i, s in enumerate(self.kv_source)]
        self._cols = [None] * self.num_layers  # during a pass: each layer's cache
        self._over_lower = self._upper_nodes = None
        self._upper_extra = {}  # a split pass's per-row inputs of the upper layers
        # Each layer's cache in the model's list (None: a layer without attention).
        self.cache_slot = cache_slots(model)
        attending = [c for c in self.cache_slot[self.first_top :] if c is not None]
        if not attending:  # (a verifier alone: the first KV cache, not a recurrent layer's)
            made = model.make_cache() if hasattr(model, "make_cache") else []
            attending = [
                c
                for c in self.cache_slot
                if c is not None and not (c < len(made) and isinstance(made[c], ArraysCache))
            ]
        # (a cache the stream layers' rows end at: every cache holds the same tokens)
        self.upper_slot = (attending or [c for c in self.cache_slot if c is not None])[0]
        windows = sliding_windows(model)
        self.windows = [windows[c] if windows and c is not None else None for c in self.cache_slot]
        # Each layer's attention chunk (Llama 4's chunked layers; None: not chunked).
        chunks = attention_chunks(model)
        self.chunks = [chunks[c] if chunks and c is not None else None for c in self.cache_slot]
        # Whether a pass's columns may run past its rows in buckets (_pass_bucket): every
        # layer attends to its own cache's columns, densely (a window or chunk layer's
        # view and mask both end at the bucket, less the rows its cache dropped); a
        # batch's rows (RaggedKVCache.column_bucket) also without chunks.
        self._bucketable = (
            not any(self._reads_lower)
            and self.kv_source == list(range(self.num_layers))
            and not sparse
        )
        self._rows_bucketable = self._bucketable and all(c is None for c in self.chunks)
        self._stream_cols = None  # a split stream pass's columns' positions (_windowed)
        self._extra_outputs = {}  # per layer: outputs after h (_outputs_after_h)
        self._windowed_mask = None  # (mask, window, its windowed form) of the last layer
        # Lossless decoding may verify with main rows only, then draft from the
        # streams of the last accepted node (see draft_streams): config.stream_pass.
        self.split_streams = (
            config.mode == "lossless" and getattr(config, "stream_pass", "fused") == "split"
        )
        # Whether a fused pass's head also computes the stream logits (None: on a GPU).
        self.stream_logits_in_pass = getattr(config, "stream_logits_in_pass", None)
        self.lora_targets = (
            lora_targets(model, config) if streams and config.stream_lora_rank else []
        )
        if self.lora_targets:
            self.lora_scale = config.stream_lora_alpha / config.stream_lora_rank
            self._row_scales = {}
            # Targets that read one input share one product with their A factors;
            # which do is read from the first pass's calls (_learn_lora_groups).
            self._lora_calls, self._lora_groups = [], {}
            self._last_product = None  # (input, (layer, group), product) of the last call
            self._plans = {}  # per group of targets: their factors (_lora_plan)
            # Zero the main rows' LoRA input with the A product itself, one kernel
            # fewer per group where launches bound a step (_gathered_product).
            self.gather_lora = on_gpu()
            self._row_factors = {}  # per (main rows, rows): the gathered product's picks
        # On the CPU, RoPE from tables read once per pass (mlx_specstream.rope):
        # per layer, the key of its module's tables (None: a class without them).
        # (per module: a DeepSeek V3.2 indexer's RoPE may differ from its attention's)
        ropes = [r for layer in model.layers for r in ropes_of(layer)]
        self._rope_keys = {id(r): _rope_key(r) for r in ropes}
        self._rope_tables = None  # during a CPU pass: {key: (positions, RopeTables)}
        self._full_rope_tables = {}  # positions 0 .. n - 1, per module settings and dtype
        self._install()

    # ---- hooks --------------------------------------------------------------
    def _install(self):
        rt = self
        # (Llama 4's attention scale of the layers that take it: Ministral 3, Mistral 4)
        self._scale_settings = [llama4_scale_settings(self.model, l) for l in self.model.layers]
        for i, layer in enumerate(self.model.layers):

            def rope_call(base_call, i=i):
                def __call__(self, x, offset=0, **kwargs):
                    if rt._rope_tables is not None and x.shape[0] == 1 and not kwargs:
                        table = rt._rope_table(i, self, base_call, offset, x)
                        if table is not None:
                            return rotate(x, table)
                    pos = rt._positions(i)
                    if pos is None:
                        return base_call(self, x, offset=offset, **kwargs)
                    return rope_rows_at(base_call, self, x, pos, **kwargs)  # (one row a token)

                return __call__

            def layer_call(base_call, i=i, names=layer_params(layer)[:2]):
                def __call__(self, x=None, mask=None, cache=None, *args, **kwargs):
                    if x is None:  # (GPT-J's model passes its input by name: inputs=)
                        x = kwargs.pop(names[0])
                    if mask is None and names[1] in kwargs:  # (attention_mask=, ...)
                        mask = kwargs.pop(names[1])
                    if rt.state is None:
                        return base_call(self, x, mask, cache, *args, **kwargs)
                    if i in rt._feature_at and rt.state in ("prefill", "step", "rows"):
                        rt._features[i] = x  # (an EAGLE-3 drafter reads this layer's input)
                    if rt.state == "prefill":  # plain pass that keeps the last layer's states
                        out = base_call(self, x, mask, cache, *args, **kwargs)
                        rt._note_outputs(i, out)
                        if i == rt.num_layers - 1:
                            rt._prefill_hidden.append(rt._drafter_states(_split(out)[0]))
                        return out
                    if rt.state == "tail":
                        h = rt._tail_input if i == 0 else x
                        return rt._passed_on(i, h, kwargs, layer=self, args=args)
                    if rt.state == "step" and isinstance(cache, ArraysCache):
                        return rt._own_layer(i, base_call, self, x, mask, cache, args, kwargs)
                    cols = rt._columns_of(i, cache)  # (a KV-sharing layer's: its source's)
                    if rt.state == "rows":  # rows of a batch (rows_pass)
                        return rt._rows_layer(i, base_call, self, x, mask, cache, *args, **kwargs)
                    if rt.state == "streams":
                        # Stream rows of one node through the stream layers only.
                        if i < rt.first_top:
                            return rt._passed_on(i, x, kwargs, cache, self, args)
                        x = rt._stream_input if i == rt.first_top else x
                        mask = rt._layer_mask(i, rt._stream_mask, cols, x.dtype)
                        kwargs = rt._upper_inputs(i, kwargs)
                        return base_call(self, x, mask, cache, *args, **kwargs)
                    if i == rt.first_top:
                        x = rt._insert_streams(x)
                    upper = i >= rt.first_top
                    if upper:
                        kwargs = rt._upper_inputs(i, kwargs)
                    if not (rt._upper_plain if upper else rt._lower_plain):
                        mask = rt._layer_mask(i, rt._upper_mask if upper else rt._lower_mask,
                                              cols, x.dtype)  # fmt: skip
                    out = base_call(self, x, mask, cache, *args, **kwargs)
                    rt._note_outputs(i, out)
                    return rt._held_back(i, out)

                return __call__

            def scaled_layer_call(base_call, i=i):
                # Ministral 3's layers take a per-position attention scale before the
                # mask (Llama 4's): recomputed for the pass's rows at their positions.
                def __call__(self, x, attn_scale=None, mask=None, cache=None):
                    if rt.state is None:
                        return base_call(self, x, attn_scale, mask, cache)

                    def base(layer, x, mask=None, cache=None):
                        scale = rt._attention_scale(i, layer, x, attn_scale)
                        return base_call(layer, x, scale, mask, cache)

                    return layer_call(base, i)(self, x, mask, cache)

                return __call__

            def attn_mask_layer_call(base_call, i=i):
                # Falcon-H1's layers: (h, cache, attn_mask, mamba_mask), a mixer beside the
                # attention; the tree's mask goes to the attention's, the mixer's stays.
                def __call__(self, h, cache=None, attn_mask=None, **kwargs):
                    if rt.state is None:
                        return base_call(self, h, cache=cache, attn_mask=attn_mask, **kwargs)

                    def base(layer, x, mask=None, cache=None, **rest):
                        return base_call(layer, x, cache=cache, attn_mask=mask, **rest)

                    return layer_call(base, i)(self, h, attn_mask, cache, **kwargs)

                return __call__

            for rope in ropes_of(layer):  # (none: a NoPE layer, see no_positions)
                _swap_call(rope, rope_call)
            scaled = self._scale_settings[i] is not None
            apart = attention_mask_apart(layer)
            _swap_call(
                layer,
                scaled_layer_call if scaled else attn_mask_layer_call if apart else layer_call,
            )
        for j, targets in enumerate(self.lora_targets):
            for name in targets:
                _swap_call(
                    submodule(self.model.layers[self.first_top + j], name),
                    lambda base, j=j, name=name: self._lora_call(base, j, name),
                )
        # GPT-2's and StarCoder's absolute position embeddings: at the tree's positions.
        wpe = position_embedding(self.model)
        if wpe is not None:
            _swap_call(wpe, self._positions_call)
        # Llama 4's NoPE layers scale their queries by position: at the rows' own
        # (outside the stream LoRA, which adds to the queries the model scales).
        self._temperature = [llama4_query_temperature(layer) for layer in self.model.layers]
        self._query_scale = None  # during such a layer's call: its rows' scales
        for i, layer in enumerate(self.model.layers):
            if self._temperature[i] is not None:
                attn = attention_of(layer)
                _swap_call(attn, lambda base, i=i: self._tempered_call(base, i))
                _swap_call(attn.q_proj, self._scaled_queries_call)

    def _own_layer(self, i, base_call, layer, x, mask, cache, args, kwargs):
        """A recurrent layer of a pass (its cache an ``ArraysCache``), as the model
        calls it: its own mask and positions, none of the tree's. Its mixers read a
        tree's tokens along the tree's paths (:mod:`mlx_specstream.recurrent`)."""
        self.state = "own"  # (the RoPE hooks then read the model's offset)
        try:
            out = base_call(layer, x, mask, cache, *args, **kwargs)
        finally:
            self.state = "step"
        self._note_outputs(i, out)
        return self._held_back(i, out)  # (a drafter's states: Nemotron-H's last layer is Mamba)

    def _tempered_call(self, base_call, i: int):
        """Layer ``i``'s attention, its queries scaled at the rows' positions where
        they are not the model's own (:func:`llama4_query_scale`), by
        :meth:`_scaled_queries_call` in place of the model's own scaling."""
        rt = self

        def __call__(self, x, mask=None, cache=None):
            pos = None if rt.state is None else rt._positions(i)
            if pos is None:
                return base_call(self, x, mask, cache)
            tuning, self.attn_temperature_tuning = self.attn_temperature_tuning, 0
            rt._query_scale = llama4_query_scale(pos, *rt._temperature[i])
            try:
                return base_call(self, x, mask, cache)
            finally:
                self.attn_temperature_tuning, rt._query_scale = tuning, None

        return __call__

    def _positions_call(self, base_call):
        """The model's position embedding (``wpe``) of the lower rows' positions in a
        step (the model's own ``offset + i`` everywhere else)."""
        rt = self

        def __call__(self, ids):
            pos = rt._positions(0) if rt.state == "step" else None
            return base_call(self, ids if pos is None else pos)

        return __call__

    def _scaled_queries_call(self, base_call):
        rt = self

        def __call__(self, x):
            y = base_call(self, x)
            scale = rt._query_scale
            if scale is None:
                return y
            B, L = y.shape[:2]  # (the model's own products: (B, H, L, D) by (L, 1))
            scale = scale.reshape(B, L, 1) if scale.size == B * L and B > 1 else scale[:, None]
            return (y * scale).astype(y.dtype)

        return __call__

    def _attention_scale(self, i: int, layer, x: mx.array, given):
        """The attention scale of layer ``i``'s rows ``x`` for a layer called as
        ``layer(x, attn_scale, mask, cache)``: the model's own (``given``) where
        the rows sit at its positions, else :func:`llama4_attention_scale` at
        theirs, shaped as the model shapes it (``(L, 1)``, or ``(B, 1, L, 1)``
        for rows with positions of their own)."""
        pos = self._positions(i)
        if pos is None:
            return given
        scale = llama4_attention_scale(pos, *self._scale_settings[i]).astype(x.dtype)
        B, L = x.shape[:2]
        return scale.reshape(B, 1, L, 1) if scale.size == B * L and B > 1 else scale[:, None]

    # ---- layers that share keys and values (Gemma 4) ----------------------------
    def _columns_of(self, i: int, cache):
        """The cache whose columns layer ``i`` attends to: its own (kept for the
        layers that read it), or its source's (a KV-sharing layer gets ``None``)."""
        s = self.kv_source[i]
        if s == i:
            self._cols[i] = cache
            return cache
        return self._cols[s]

    def _passed_on(self, i: int, h: mx.array, kwargs: dict, cache=None, layer=None, args=()):
        """What layer ``i`` returns where it does not run (the tail's identity
        layers, the lower layers of a stream pass): ``h``, or for a layer that passes
        its keys and values on (Gemma 4's return ``(h, keys and values, offset)``)
        ``h`` with what its cache holds, or with what it was given; for another layer
        that returns a tuple (Hunyuan's ``(h, key and value projections)``), ``h``
        and ``None`` for the rest (:meth:`_outputs_after_h`)."""
        if not self.passes_kv[i]:
            extra = self._outputs_after_h(i, layer, h, args, kwargs)
            return (h, *[None] * extra) if extra else h
        if cache is None:
            return h, kwargs.get("shared_kv"), kwargs.get("offset")
        ragged = isinstance(cache, RaggedKVCache)  # (a batch's: rows to the longest's end)
        held = (cache.size() if ragged else cache.offset) - first_row(cache)
        return h, (cache.keys[..., :held, :], cache.values[..., :held, :]), kwargs.get("offset")

    def _note_outputs(self, i: int, out) -> None:
        """Keeps how many outputs layer ``i`` returned after its hidden states."""
        if i not in self._extra_outputs:
            self._extra_outputs[i] = len(out) - 1 if isinstance(out, tuple) else 0

    def _outputs_after_h(self, i: int, layer, h: mx.array, args, kwargs) -> int:
        """How many outputs layer ``i`` returns after its hidden states (0: it returns
        them alone): as a step or prefill saw it (:meth:`_note_outputs`), else found
        once by calling it on one row without mask or cache (a layer
        that cannot run so, as Ministral 3's without its attention scale, returns
        them alone; one that returns more would then fail loudly where it is read)."""
        if i not in self._extra_outputs:
            try:
                out = own_class(layer).__call__(layer, h[:, :1], None, None, *args, **kwargs)
            except Exception:  # noqa: BLE001 - see the docstring
                out = None
            self._extra_outputs[i] = len(out) - 1 if isinstance(out, tuple) else 0
        return self._extra_outputs[i]

    def _layer_mask(self, i: int, mask: mx.array, cols, dtype) -> mx.array:
        """Layer ``i``'s mask from its rows' ``mask``: over the columns of a lower
        layer whose keys it reads (:attr:`_over_lower`, where the upper rows differ
        from the rows that wrote them), cut to its window, in the layers' form."""
        if self._reads_lower[i] and self._over_lower is not None:
            mask = self._over_lower
        return self._attention_mask(self._windowed(i, mask, cols), dtype)

    def _upper_inputs(self, i: int, kwargs: dict) -> dict:
        """An upper layer's keyword inputs with a per-token input (Gemma 4's
        ``per_layer_input``) taken for its rows: a kept row's own, a stream row
        its node's (:attr:`_upper_nodes`); a split stream pass reads the step's."""
        extra = kwargs.get("per_layer_input")
        if extra is None:
            return kwargs
        if self.state == "streams":
            extra = self._upper_extra[i]
        elif not (self._all_streams if self.state == "step" else self._rows_fused):
            self._upper_extra[i] = extra  # (draft_streams, rows_streams read them)
        nodes = self._upper_nodes
        if nodes is None:
            return kwargs
        if nodes.ndim == 2:  # (a node per batch row: rows_streams)
            return {**kwargs, "per_layer_input": mx.take_along_axis(extra, nodes[..., None], 1)}
        return {**kwargs, "per_layer_input": mx.take(extra, nodes, axis=1)}

    def _set_upper_rows(self, nodes: Optional[mx.array], columns: Optional[mx.array]) -> None:
        """The upper layers' rows as lower rows: ``nodes`` (each upper row's lower
        row, ``None`` for the same rows), and ``columns`` (their ancestors among
        the lower rows, for the layers that read a lower layer's keys)."""
        self._upper_nodes = nodes
        self._over_lower = None
        if nodes is not None and any(self._reads_lower):
            self._over_lower = self._join(mx.take(columns, nodes, axis=0))

    def _windowed(self, i: int, mask: mx.array, cache) -> mx.array:
        """``mask`` (bool, its last axis the cache's columns from position 0) cut to
        layer ``i``'s sliding window (:func:`window_cut`) or attention chunk
        (:func:`chunk_cut`), if it has one, without the columns of rows its ``cache``
        dropped (a :class:`~mlx_specstream.cache.WindowKVCache`'s ``start``)."""
        w, chunk = self.windows[i], self.chunks[i]
        pos = None if w is None and chunk is None else self._positions(i)
        if pos is None or mask.dtype != mx.bool_:
            return mask
        first, last = first_row(cache), self._windowed_mask
        key = (w, chunk, first)
        if last is not None and last[0] is mask and last[1] == key:
            return last[2]
        if chunk is None:
            out = window_cut(mask, pos, w)
        else:  # (by the columns' positions: a tree's rows sit past theirs)
            if self.state == "rows":
                raise ValueError("Rows of a batch are not cut to attention chunks.")
            own = self._stream_cols if self.state == "streams" else pos
            out = chunk_cut(mask, pos, column_positions(mask.shape[-1], self._prefix, own), chunk)
        out = out[..., first:] if first else out
        self._windowed_mask = (mask, key, out)
        return out

    def _check_windows(self, span: int) -> None:
        """Raises ``ValueError`` if a tree pass whose rows lie up to ``span - 1``
        positions past their prefix (the tree's depth, then its streams) reaches
        across a sliding window. A tree's node ``k`` sits at column ``prefix + k``,
        at or past its position, so :meth:`_windowed` is exact only while every
        row's window holds the whole prefix's end; a chain's rows sit at their
        positions, so it is exact for any chain."""
        windows = [w for w in self.windows if w is not None]
        if windows and span > min(windows):
            raise ValueError(
                f"A pass {span} positions deep (tree depth plus streams) is wider than the "
                f"model's sliding window of {min(windows)} tokens: use a smaller tree "
                "(max_tree_nodes, num_draft_tokens)."
            )

    def _attention_mask(self, mask: mx.array, dtype) -> mx.array:
        """``mask`` as the layers take it: as is, or (``additive_masks``) 0 where
        it is True and -inf elsewhere, in ``dtype``, made once for all layers.
        Visible scores are unchanged (``s + 0 == s``), hidden ones weigh 0.
        A sparse attention's indexer gathers a one-row mask along its key picks:
        its layers take masks with the batch and head axes (``(1, 1, R, C)``)."""
        if self.masks_4d and mask.ndim == 2:
            mask = mask[None, None]
        if not self.additive_masks or mask.dtype != mx.bool_:
            return mask
        last = self._additive
        if last is None or last[0] is not mask or last[1].dtype != dtype:
            zero, hidden = mx.array(0, dtype), mx.array(-mx.inf, dtype)
            last = self._additive = (mask, mx.where(mask, zero, hidden))
        return last[1]

    def _lora_call(self, base_call, j, name):
        rt = self

        def __call__(self, x):
            y = base_call(self, x)
            if rt.state not in ("step", "streams", "rows"):
                return y
            # Stream rows follow the R main rows; only they get the LoRA delta.
            R = rt._main_rows
            if R == x.shape[1]:
                return y
            # One product per input array for every target that reads it (q, k
            # and v; gate and up), over every row: 0 on the main rows (y + 0 is
            # y exactly), fewer kernels than slicing.
            t, block, b_t, alpha = rt._lora_input(j, name, x, R)
            return mx.addmm(y, t[..., block], b_t, alpha=alpha)

        return __call__

    def _lora_input(self, j: int, name: str, x: mx.array, main: int):
        """``(t, block, b_t, alpha)``: ``x``'s stream rows (every row when ``main``
        is 0) times the A factors of the targets of layer ``j`` that read the same
        input as ``name`` did in the first pass, side by side, and 0 on its
        ``main`` rows; ``t[..., block]`` is ``name``'s, ``b_t`` its B factor and
        ``alpha`` the scale its product with ``b_t`` takes. One product per input
        array. Whatever the grouping, each target's block is its own input's
        product: a group only decides which products are shared."""
        if self._lora_calls is not None:  # the first pass: which targets share an input
            self._lora_calls.append((j, name, x))
        group, block, a_t, b_t = self._lora_plan(j, name, x.dtype)
        last = self._last_product
        if last is None or last[0] is not x or last[1] != (j, group):
            if main == 0:
                product, alpha = x @ a_t, self.lora_scale
            elif self.gather_lora and x.shape[0] == 1:
                product = self._gathered_product(x, (j, group, x.dtype), main)
                alpha = self.lora_scale
            else:  # the LoRA scale on the stream rows, 0 on the main rows
                xs = x * self._stream_row_scale(main, x.shape[1], x.dtype)
                product, alpha = xs @ a_t, 1.0
            last = self._last_product = (x, (j, group), product, alpha)
        return last[2], block, b_t, last[3]

    def _gathered_product(self, x: mx.array, key: tuple, main: int) -> mx.array:
        """``x`` ``(1, rows, in)`` times the A factors of plan ``key`` on its stream
        rows and 0 on its ``main`` rows, in one kernel: a matrix-vector product per
        row (``mx.gather_mm``) that picks the zero or the A factors by row. Where
        launches bound a step (GPUs) it saves the scaling product's kernel.

        Example: with ``main`` 2 of 4 rows, the rows pick factors ``[0, 0, 1, 1]``
        of ``[zeros, a_t]``: rows 0-1 of the result are 0, rows 2-3 ``x @ a_t``.
        """
        rows, plan = x.shape[1], self._plans[key]
        if plan[3] is None:  # (made once per plan: a new plan comes with new factors)
            # (2, r, in) row-major, read transposed: MLX's GPU matrix-vector path.
            a = plan[1].T
            plan[3] = mx.stack([mx.zeros_like(a), a])
        picks = (main, rows)
        if picks not in self._row_factors:
            self._row_factors[picks] = (
                mx.array(np.arange(rows, dtype=np.uint32)),
                mx.array(np.repeat(np.array([0, 1], dtype=np.uint32), [main, rows - main])),
            )
        lhs, rhs = self._row_factors[picks]
        out = mx.gather_mm(x.reshape(rows, 1, x.shape[-1]), plan[3].swapaxes(1, 2), lhs, rhs)
        return out.reshape(1, rows, -1)

    def _lora_plan(self, j: int, name: str, dtype) -> tuple:
        """``(group, block, A, B)`` of one target: ``A`` is its group's A factors
        side by side, ``(in, r * len(group))``, and ``B`` its own B factor, both
        transposed and in ``dtype``. Kept per group while its parameter arrays
        stay the same (training replaces the arrays in their dicts): two
        identity checks per member."""
        group = self._lora_groups.get((j, name), (name,))
        hit = self._plans.get((j, group, dtype))
        if hit is None or not all(p["lora_a"] is a and p["lora_b"] is b for p, a, b in hit[0]):
            params = [self.streams.lora_params(j, n) for n in group]
            held = [(p, p["lora_a"], p["lora_b"]) for p in params]
            a_ts = [_in_dtype(a.T, dtype) for _, a, _ in held]
            b_ts = {n: _in_dtype(b.T, dtype) for n, (_, _, b) in zip(group, held)}
            a_t = a_ts[0] if len(a_ts) == 1 else mx.concatenate(a_ts, axis=1)
            # (and, for _gathered_product, the zero and A factors stacked; made there)
            hit = self._plans[(j, group, dtype)] = [held, a_t, b_ts, None]
        r, i = self.config.stream_lora_rank, group.index(name)
        return group, slice(r * i, r * (i + 1)), hit[1], hit[2][name]

    def _learn_lora_groups(self) -> None:
        """Groups the stream LoRA targets of each layer that read one input array in
        the pass just run (the model calls them so in every pass)."""
        groups = {}
        for j, name, x in self._lora_calls:
            names = groups.setdefault((j, id(x)), [])  # (the list holds x: ids stay unique)
            if name not in names:
                names.append(name)
        self._lora_groups = {(j, n): tuple(ns) for (j, _), ns in groups.items() for n in ns}
        self._lora_calls = None

    def _stream_row_scale(self, main: int, rows: int, dtype) -> mx.array:
        """``(rows, 1)``: 0 for the ``main`` rows, the LoRA scale for the stream rows after them."""
        key = (main, rows, dtype)
        if key not in self._row_scales:
            scale = np.repeat([0.0, self.lora_scale], [main, rows - main])[:, None]
            self._row_scales[key] = mx.array(scale, dtype=dtype)
        return self._row_scales[key]

    def _rope_table(self, i, rope, base_call, offset, x):
        """The RoPE tables of layer ``i``'s rows in this pass, made by its first
        call and shared by every later one with the same positions and module
        settings (None: this layer's RoPE class has none). Rows are gathered
        from the module's table of positions ``0 .. n - 1`` (the host knows a
        bound of the pass's positions), or past :data:`MAX_ROPE_TABLE` read from
        the module for them."""
        key = self._rope_keys[id(rope)]
        pos = self._positions(i)
        if key is None or (pos is None and not isinstance(offset, int)):
            return None
        rows, head_dim = x.shape[2], x.shape[-1]
        # The model's own positions (offset, offset + 1, ...) or the step's per-row ones.
        where = ("from", offset, rows) if pos is None else id(pos)
        k = (where, key[0], x.dtype, head_dim)
        hit = self._rope_tables.get(k)
        if hit is None:  # (the value holds pos: ids stay unique during the pass)
            end = offset + rows if pos is None else self._positions_end
            if end > MAX_ROPE_TABLE:
                pos = mx.arange(offset, end, dtype=mx.int32) if pos is None else pos
                made = tables(base_call, rope, pos, head_dim, x.dtype, key[1])
            else:
                full = self._full_rope_table(key, rope, base_call, head_dim, x.dtype, end)
                if pos is None:  # a slice: a view, no kernel
                    made = full._replace(cos=full.cos[offset:end], sin=full.sin[offset:end])
                else:
                    made = full._replace(cos=full.cos[pos], sin=full.sin[pos])
            hit = self._rope_tables[k] = (pos, made)
        return hit[1]

    def _full_rope_table(self, key, rope, base_call, head_dim, dtype, end):
        """The module's tables for positions ``0 .. n - 1``, ``n >= end``, kept
        between passes and generations (they depend on the module alone) and
        grown by doubling."""
        k = (key[0], dtype, head_dim)
        have = self._full_rope_tables.get(k)
        if have is None or have.cos.shape[0] < end:
            n = min(max(end, 512, 0 if have is None else 2 * have.cos.shape[0]), MAX_ROPE_TABLE)
            have = tables(base_call, rope, mx.arange(n, dtype=mx.int32), head_dim, dtype, key[1])
            mx.eval(have.cos, have.sin)
            self._full_rope_tables[k] = have
        return have

    def _positions(self, i):
        if self.state == "streams":
            return self._stream_pos
        if self.state == "rows":
            return self._upper_pos if self._rows_fused and i >= self.first_top else None
        if self.state != "step":
            return None
        if i >= self.first_top:
            return None if self._upper_plain else self._upper_pos
        return None if self._lower_plain else self._lower_pos

    # ---- the model's own tail (final norm, head, soft-capping, ...) ---------
    def head(self, h: mx.array, draft: bool = False) -> mx.array:
        """Applies the model's final norm and LM head to hidden states ``(B, L, D)``.

        Runs the model with every layer replaced by the identity and the
        hidden states injected at layer 0, so each architecture's own
        norm, head, tied embeddings and logit soft-capping are used. With
        ``draft`` (drafting rows), the head ranks only the draft vocabulary's
        tokens, if one is set (:mod:`mlx_specstream.draft_vocab`).
        """
        saved = self.state, getattr(self, "_tail_input", None)
        self.state, self._tail_input = "tail", h
        try:
            return self._drafting(lambda: self.model(mx.zeros(h.shape[:2], dtype=mx.int32)), draft)
        finally:
            self.state, self._tail_input = saved

    def _drafting(self, run, draft: bool = True) -> mx.array:
        """``run()``'s logits, its head restricted to the draft vocabulary where
        ``draft`` and one is set (``(..., V)``, ``-inf`` outside it)."""
        vocab = self.draft_vocab if draft else None
        if vocab is None:
            return run()
        with vocab.in_model(self.model):
            logits = run()
        return vocab.checked(logits, self.model)

    # ---- one step --------------------------------------------------------------
    def forward(
        self,
        tokens,
        parents,
        cache,
        prune_threshold: float = 0.0,
        all_streams: bool = True,
        stream_logits: bool = False,
        pipelined: bool = False,
        fold: Optional[Fold] = None,
    ) -> StepOutput:
        """One multi-stream pass over a tree whose root follows the cached prefix.

        The caches grow by all tree rows (lower layers) or by the kept main
        rows and their stream rows (upper layers); the caller compacts them.

        Args:
            tokens: ``(T,)`` node tokens, a list or a device array (the pass
              never reads them on the host unless it prunes).
            parents: the parent list, or its :class:`TreeLayout`.
            cache: a KV cache per layer.
            prune_threshold (float): early-exit pruning threshold (0: off).
            all_streams (bool): ``False`` (lossless mode only) inserts no
              stream rows: the main rows never read them there, so the pass
              verifies the tree exactly, and :meth:`draft_streams` then
              computes the streams of the one node that drafts next.
            stream_logits (bool): with ``all_streams``, the model's own final
              norm and head also run over the stream rows, in the same call
              as the main rows (one read of the head's weights per step), and
              the output carries every kept node's stream logits.
            pipelined (bool): write the rows through
              :class:`~mlx_specstream.cache.FoldingCache` at an offset the
              device computes, folding ``fold`` (the previous step, not yet
              read on the host) into the caches first. Every layer's offset is
              left for the caller to set, and the output carries the rows
              appended (``rows``). Not with pruning.
        """
        if not all_streams and self.config.mode != "lossless":
            raise ValueError("Streams can be left out of the pass only in lossless mode.")
        layout = parents if isinstance(parents, TreeLayout) else layout_of(parents)
        tokens = tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.int32)
        self._all_streams = all_streams
        self._head_on_streams = stream_logits and all_streams and self.streams is not None
        b = self._pass_bucket(cache)  # (0: views and masks end at the pass's rows)
        if pipelined:  # the tree starts where the device says the last step's path ends
            if prune_threshold > 0:
                raise ValueError("A pipelined pass cannot prune (pruning reads the host).")
            cache = [folding_cache(c, fold, i, b) for i, c in enumerate(cache)]
            base, span = cache[0].offset, 0 if fold is None else fold.span
            if fold is None:
                prefix, accepted = mx.array([base], dtype=mx.int32), mx.array(0, dtype=mx.int32)
            else:
                prefix, accepted = fold.start, fold.accepted
            self._join = lambda mask: pad_hidden(
                place_window(mask, base, accepted, span + mask.shape[1]), b
            )
        else:
            prefix = kv_offset(cache[self.upper_slot])  # (a KV layer: recurrent ones keep none)
            cache = [BucketedCache(c, b) for c in cache] if b else cache
            self._join = lambda mask: pad_hidden(with_prefix(mask, prefix), b)
        self._tree = (tokens, layout.parents, layout.depth, layout.ancestors, prefix)
        self._layout, self._prefix = layout, prefix
        # Every position of this pass lies below this (tree depth, streams' offsets).
        start = base + span if pipelined else prefix
        self._positions_end = start + len(layout) + getattr(self.config, "num_streams", 0)
        if not layout.is_chain:  # (a chain's rows sit at their positions)
            self._check_windows(
                int(layout.depth.max()) + 1 + getattr(self.config, "num_streams", 0)
            )
        # Rows that form a chain are a plain multi-token pass: the model's own
        # (causal) mask and RoPE offset, as mlx-lm computes them, no tree ops.
        # (In column buckets a chain takes our masks too: padded as its cache views are.)
        self._lower_plain = self._upper_plain = layout.is_chain and not pipelined and not b
        if not self._lower_plain:
            self._lower_mask = self._join(layout.ancestors_mx)
            self._lower_pos = prefix + layout.depth_mx
        self.prune_threshold = prune_threshold
        # Without stream layers nothing is inserted or pruned: every node is kept.
        self._kept, self._kept_layout = list(range(len(layout))), layout
        self._main_rows = len(layout)
        self._set_upper_rows(None, None)
        logits = self._run("step", tokens[None], cache)
        R, g = len(self._kept), self.config.num_streams
        logits, hidden, slogits = logits[0], None, None
        if all_streams and self.streams is not None:
            hidden = self._stream_hidden[0].reshape(R, g, -1)
        if self._head_on_streams:  # rows [main R | streams R * g], node-major
            logits, slogits = logits[:R], logits[R:].reshape(R, g, -1)
            if self.draft_vocab is not None:  # (one head product with the main rows)
                slogits = self.draft_vocab.mask(slogits)
        return StepOutput(
            logits=logits,
            stream_hidden=hidden,
            stream_logits=slogits,
            kept=self._kept,
            layout=self._kept_layout,
            hidden=self._main_hidden[0] if self.drafter is not None else None,
            rows=[c.rows for c in cache] if pipelined else None,
        )

    def _pass_bucket(self, cache) -> int:
        """The column bucket of a pass over ``cache`` (:attr:`kv_bucket`): by default
        :func:`~mlx_specstream.cache.default_bucket` (256 on CUDA in half precision),
        for plain ``KVCache``s and the ``WindowKVCache``s and ``ChunkKVCache``s of
        sliding-window and chunked layers, of models without shared keys or sparse
        attention; 0 for other caches, where a bucket set on :attr:`kv_bucket` raises
        ``ValueError``. (A batch's rows round theirs in
        ``RaggedKVCache.column_bucket``; :meth:`rows_pass` keeps that at 0 for models
        whose layers cannot take buckets or have attention chunks.)
        """
        if self.kv_bucket is None and not on_cuda():  # (skips the checks on other devices)
            return 0
        fits = self._bucketable and all(type(c) in BUCKETABLE for c in cache)
        if self.kv_bucket is not None:
            if self.kv_bucket and not fits:
                raise ValueError(
                    f"kv_bucket={self.kv_bucket}: column buckets need plain KVCache layers "
                    "(or a sliding window's WindowKVCache, a chunk's ChunkKVCache) without "
                    "shared keys or sparse attention."
                )
            return self.kv_bucket
        return default_bucket(cache[0].keys) if fits else 0

    def prefill(self, tokens: mx.array, cache, keep_hidden: bool = False) -> Optional[mx.array]:
        """A plain pass over prompt tokens ``(L,)`` into ``cache``; with ``keep_hidden``
        it returns the last layer's states ``(L, D)`` (a drafter's rows), else ``None``."""
        if not keep_hidden:
            self._run(None, tokens[None], cache)
            return None
        return self.prefill_rows(tokens[None], cache)[0]

    def prefill_rows(self, tokens: mx.array, cache) -> mx.array:
        """A plain pass over ``(B, L)`` tokens into ``cache`` (a batch's, with mlx-lm's
        own masks and positions); returns the last layer's states ``(B, L, D)``."""
        self._prefill_hidden = []
        self._run("prefill", tokens, cache)
        kept, self._prefill_hidden = self._prefill_hidden, []
        return mx.concatenate(kept, axis=1)

    def _run(self, state: Optional[str], tokens: mx.array, cache) -> mx.array:
        """The model over ``(1, L)`` tokens with the hooks in ``state``. The first
        pass through the stream LoRA also tells which targets share an input."""
        self.state = state
        if state in ("step", "streams", "rows") and not on_gpu():  # GPUs: RoPE is one kernel
            self._rope_tables = {}
        try:
            out = self.model(tokens, cache=cache)
        finally:
            self.state, self._rope_tables = None, None
        if self._lora_calls:
            self._learn_lora_groups()
        return out

    def embed(self, tokens: mx.array) -> mx.array:
        """The base model's input embeddings of ``tokens``."""
        return embedding_of(self.model)(tokens)

    def _insert_streams(self, h: mx.array) -> mx.array:
        layout, prefix = self._layout, self._prefix
        if self.prune_threshold > 0 and len(layout) > 1:
            kept = self._prune(h, layout)
            if len(kept) < len(layout):
                h = h[:, mx.array(kept)]
                self._kept = kept
                self._kept_layout = layout_of(subtree_parents(layout.parents, kept))
        sub = self._kept_layout
        self._main_rows = len(sub)
        g = self.config.num_streams if self._all_streams else 0
        if g or len(sub) < len(layout):  # (upper rows other than the lower rows)
            kept = mx.array(self._kept, dtype=mx.int32)
            nodes = mx.concatenate([kept, mx.repeat(kept, g)]) if g else kept
            self._set_upper_rows(nodes, layout.ancestors_mx)
        if not self._all_streams:
            self._upper_input = h
            # (unpruned only: the model built its own mask for all the tree's rows)
            self._upper_plain = self._lower_plain and len(sub) == len(layout)
            if not self._upper_plain:
                if sub is layout:  # the lower rows' arrays (one RoPE table per pass)
                    self._upper_mask, self._upper_pos = self._lower_mask, self._lower_pos
                else:  # pruned: the kept rows' own
                    self._upper_mask = self._join(sub.ancestors_mx)
                    self._upper_pos = prefix + sub.depth_mx
            return h
        self._upper_plain = False
        self._upper_mask = self._join(sub.stream_mask(g, self.config.mode == "shared"))
        self._upper_pos = prefix + self._stream_positions(sub.depth_mx)
        return mx.concatenate([h, self.streams.make_streams(h)], axis=1)

    def _stream_positions(self, depth: mx.array) -> mx.array:
        """Positions (relative to the prefix) of main rows ``depth`` then their
        stream rows, node-major."""
        g = self.config.num_streams
        if self.config.stream_positions == "offset":
            streams = depth[:, None] + mx.arange(1, g + 1, dtype=mx.int32)[None]
        else:
            streams = mx.repeat(depth[:, None], g, axis=1)
        return mx.concatenate([depth, streams.reshape(-1)])

    def _prune(self, h, layout: TreeLayout) -> List[int]:
        """Early-exit pruning before stream insertion (paper Sec. 3.1.3).

        Needs one host read: the surviving rows decide the shapes that follow.
        """
        early = self.head(self.streams.prune_adapter(h))[0].astype(mx.float32)
        logprobs = early - mx.logsumexp(early, axis=-1, keepdims=True)
        tokens = self._tree[0]
        edge = mx.exp(logprobs[layout.parents_mx[1:], tokens[1:]]) >= self.prune_threshold
        edge_ok = [True] + edge.tolist()
        return prune_subtrees(layout.parents, edge_ok)

    def draft_streams(self, last: mx.array, cache) -> mx.array:
        """Logits ``(gamma, V)`` of the streams of kept node ``last`` (a device index).

        Runs after :meth:`forward` with ``all_streams=False`` and before the
        cache is compacted: the stream rows attend to the committed prefix and
        to ``last``'s path among the tree rows still in the upper caches,
        exactly as they would inside the full multi-stream pass.
        """
        sub, prefix, g = self._kept_layout, self._prefix, self.config.num_streams
        h = mx.take(self._upper_input, last[None], axis=1)
        self._stream_input = self.streams.make_streams(h)
        path = mx.take(sub.ancestors_mx, last, axis=0)
        self._stream_mask = with_prefix(
            mx.concatenate(
                [mx.broadcast_to(path[None], (g, len(sub))), _lower_triangle(g)], axis=1
            ),
            prefix,
        )
        depth = mx.take(sub.depth_mx, last[None])
        self._stream_pos = prefix + self._stream_positions(depth)[1:]
        if any(self.chunks):  # (the columns: the tree's kept rows, then these)
            self._stream_cols = mx.concatenate([prefix + sub.depth_mx, self._stream_pos])
        self._main_rows = 0
        node = mx.take(mx.array(self._kept, dtype=mx.int32), last[None])  # (in the tree)
        self._set_upper_rows(mx.repeat(node, g), self._layout.ancestors_mx)
        return self._drafting(
            lambda: self._run("streams", mx.zeros((1, g), dtype=mx.int32), cache)
        )[0]

    # ---- rows of a batch (mlx_specstream.batch) --------------------------------
    def rows_pass(self, tokens: mx.array, cache, streams: bool = False) -> mx.array:
        """The model over ``(B, W)`` tokens, each row a chain after its cached tokens
        (mlx-lm's own masks and positions, e.g. from
        :class:`~mlx_specstream.ragged_cache.RaggedKVCache`): ``(B, W, V)`` logits.

        Keeps each row's input to the first stream layer (for :meth:`rows_streams`).
        With ``streams``, every token's stream rows also go through the stream
        layers, after the main rows (which never read them in lossless mode, and
        read their own token's in shared mode, as in the model's own decoding):
        :meth:`fused_streams` then reads them. Their keys and values are written
        after the main rows' and never kept. A shared-mode model's passes need them.

        Example: ``W = 2``, two streams; row ``b`` holds ``e`` tokens. The upper
        layers' rows are ``[m0, m1, s0.1, s0.2, s1.1, s1.2]`` at columns ``e ..
        e + 5``; ``m1`` sees columns ``< e`` and ``m0, m1``; ``s1.2`` sees those
        and ``s1.1, s1.2`` (:func:`~mlx_specstream.tree.stream_attention_mask`).
        """
        shared = self.config.mode == "shared"
        if not streams and shared:
            raise ValueError("A shared-mode model's main rows read their streams: rows_pass "
                             "needs streams=True.")  # fmt: skip
        self._rows_fused = streams
        self._main_rows = tokens.shape[1]
        self._hold_row_buckets(cache)
        self._upper_nodes = self._over_lower = None
        if streams:
            if self.streams is None:
                raise ValueError("This model has no streams to put in the rows' pass.")
            W, g = tokens.shape[1], self.config.num_streams
            chain = layout_of([-1] + list(range(W - 1)))
            upper = cache[self.upper_slot]
            block = chain.stream_mask(g, shared)
            held = upper.pass_width(block.shape[1]) - block.shape[1]  # (its columns' bucket)
            self._upper_mask = rows_mask(block, upper.offset, held)
            # (each stream row's token, for per-token inputs and lower layers' rows)
            row = mx.arange(W, dtype=mx.int32)
            self._upper_nodes = mx.concatenate([row, mx.repeat(row, g)])
            if any(self._reads_lower):
                over = mx.take(chain.ancestors_mx, self._upper_nodes, axis=0)
                self._over_lower = rows_mask(over, upper.offset, held)
            self._upper_pos = (upper.offset[:, None] + self._stream_positions(chain.depth_mx)[None]
                               ).reshape(-1)  # fmt: skip
            self._positions_end = upper.size() + W + g
        return self._run("rows", tokens, cache)

    def masked_pass(self, tokens: mx.array, positions: mx.array, mask: mx.array, cache,
                    span: int) -> mx.array:  # fmt: skip
        """The model over rows ``tokens`` ``(R,)`` appended to ``cache``, row ``r`` at
        position ``positions[r]`` and seeing the columns where ``mask`` ``(R, C)`` is
        True (``C``: the cached tokens, then these rows). Returns ``(R, V)`` logits.
        The rows lie up to ``span - 1`` positions past the first position after the
        tokens they all see: a sliding window must hold ``span`` positions (as for a
        tree's pass, whose masks cut columns by index: exact within that).

        A draft model growing a dynamic tree level by level
        (:meth:`~mlx_specstream.draft_model.DraftModel.draft_tree`): a level's rows sit
        at one position and see the context and their own ancestors' rows, which
        earlier calls appended. For a verifier alone (:func:`attach_verifier`) on a
        model whose layers attend to their own ``KVCache`` or window: no streams, no
        drafter, no attention chunks (the caller checks the caches).

        Example: 5 cached tokens, then 2 rows at position 5 (``a``, ``b``); then 2
        rows at position 6 under ``b``: their mask is ``[1 1 1 1 1 0 1 1 0]`` and
        ``[1 1 1 1 1 0 1 0 1]`` (the context, ``b``, themselves).
        """
        if self.streams is not None or self.drafter is not None:
            raise ValueError("masked_pass runs a verifier alone: this model has streams or a "
                             "drafter attached.")  # fmt: skip
        self._check_windows(span)
        R = tokens.shape[0]
        self._all_streams, self._head_on_streams = True, False
        self._lower_plain = self._upper_plain = False
        self._lower_mask, self._lower_pos = mask, positions
        self._positions_end = kv_offset(cache[self.upper_slot]) + R  # (rows sit at or below)
        self.prune_threshold = 0.0
        self._kept, self._main_rows = list(range(R)), R
        self._set_upper_rows(None, None)
        return self._run("step", tokens[None], cache)[0]

    def _hold_row_buckets(self, cache) -> None:
        """Keeps a batch's caches from rounding their columns (``RaggedKVCache.bucket``
        0) where this model's layers cannot take buckets (:meth:`_pass_bucket`) or
        have attention chunks."""
        if not self._rows_bucketable:
            for c in cache:
                if isinstance(c, RaggedKVCache):
                    c.bucket = 0

    def _rows_layer(self, i, base_call, layer, x, mask, cache, *args, **kwargs):
        """One layer of :meth:`rows_pass`."""
        if i == self.first_top:
            self._upper_input = x
            if self._rows_fused:
                x = mx.concatenate([x, self.streams.make_streams(x)], axis=1)
        if i >= self.first_top and self.streams is not None:
            kwargs = self._upper_inputs(i, kwargs)
        if self._rows_fused and i >= self.first_top:
            cols = self._cols[self.kv_source[i]]
            mask = self._layer_mask(i, self._upper_mask, cols, x.dtype)
        out, rest = _split(base_call(layer, x, mask, cache, *args, **kwargs))
        if self._rows_fused and i == self.num_layers - 1:
            self._stream_hidden = out[:, self._main_rows :]
            out = out[:, : self._main_rows]
        if self.drafter is not None and i == self.num_layers - 1:  # (an attached drafter's)
            self._main_hidden = self._drafter_states(out)
        return _joined(out, rest)

    def fused_streams(self, nodes: mx.array) -> mx.array:
        """Logits ``(B, gamma, V)`` of the streams of each row's token ``nodes[b]``
        of the last :meth:`rows_pass` with ``streams``."""
        h = self._stream_hidden
        B, g = h.shape[0], self.config.num_streams
        h = h.reshape(B, -1, g, h.shape[-1])
        return self.head(
            mx.take_along_axis(h, nodes[:, None, None, None], axis=1)[:, 0], draft=True
        )

    def rows_heads(self, nodes: mx.array) -> mx.array:
        """Logits ``(B, k, V)`` of the Medusa heads at each row's token ``nodes[b]`` of
        the last :meth:`rows_pass` (from its last layer's states)."""
        h = mx.take_along_axis(self._main_hidden, nodes[:, None, None], axis=1)[:, 0]
        return self.drafter.draft_rows(self, h)

    def rows_streams(self, nodes: mx.array, cache) -> mx.array:
        """Logits ``(B, gamma, V)`` of the streams of each row's token ``nodes[b]``
        of the last :meth:`rows_pass` (lossless mode).

        Runs once the caches keep each row's tokens up to that node and no further
        (``RaggedKVCache.advance``): the stream rows of row ``b`` go through the
        stream layers at its end, attending to its cached tokens and to the streams
        before them, as :meth:`draft_streams` for one sequence. Their keys and
        values are written past the row's end and never kept.
        """
        if self.config.mode != "lossless" or self.streams is None:
            raise ValueError("Rows of a batch draft with streams in lossless mode only.")
        B, g = nodes.shape[0], self.config.num_streams
        h = mx.take_along_axis(self._upper_input, nodes[:, None, None], axis=1)
        self._stream_input = self.streams.make_streams(h)
        upper = cache[self.upper_slot]
        self._hold_row_buckets(cache)
        self._stream_mask = upper.make_mask(g)  # row b, stream j: its tokens and streams <= j
        if first_row(upper):  # (from position 0, as the other masks: cut per layer)
            gap = mx.zeros((*self._stream_mask.shape[:-1], first_row(upper)), mx.bool_)
            self._stream_mask = mx.concatenate([gap, self._stream_mask], axis=-1)
        self._upper_nodes = mx.repeat(nodes[:, None], g, axis=1)  # (per row: its node's inputs)
        self._over_lower = None
        if any(self._reads_lower):  # (a lower layer's rows: each row's tokens, to its node)
            seen = mx.arange(upper.size(), dtype=mx.int32)[None] < upper.offset[:, None]
            self._over_lower = mx.broadcast_to(seen[:, None, None], (B, 1, g, upper.size()))
        depth = mx.zeros((1,), dtype=mx.int32)  # the node is each row's last cached token
        ends = upper.offset.astype(mx.int32) - 1
        self._stream_pos = (ends[:, None] + self._stream_positions(depth)[None, 1:]).reshape(-1)
        self._positions_end = upper.size() + g
        self._main_rows = 0
        return self._drafting(lambda: self._run("streams", mx.zeros((B, g), dtype=mx.int32), cache))

    # Arrays of the last pass: dropped by :meth:`release` when a generation ends.
    _STEP_ARRAYS = (
        "_join",
        "_tree",
        "_layout",
        "_lower_mask",
        "_lower_pos",
        "_upper_input",
        "_upper_mask",
        "_upper_pos",
        "_stream_input",
        "_stream_mask",
        "_stream_pos",
        "_stream_cols",
        "_main_hidden",
        "_stream_hidden",
        "_tail_input",
        "_last_product",
        "_additive",
        "_windowed_mask",
        "_over_lower",
        "_upper_nodes",
    )

    def release(self) -> None:
        """Drops the last pass's masks and hidden states, so that nothing of a
        generation outlives it (the model holds this runtime)."""
        for name in self._STEP_ARRAYS:
            setattr(self, name, None)
        self._prefill_hidden, self._features = [], {}
        self._kept, self._kept_layout = [], None
        self._cols, self._upper_extra = [None] * self.num_layers, {}

    def _held_back(self, i: int, out):
        """Layer ``i``'s output; after the last layer, with the stream rows held back
        (:meth:`_hold_back_streams`) and the main rows' states kept."""
        if i != self.num_layers - 1:
            return out
        h, rest = _split(out)
        return _joined(self._hold_back_streams(h), rest)

    def _drafter_states(self, out: mx.array) -> mx.array:
        """What a drafter reads of a pass's rows: the last layer's output ``out``, or for
        an EAGLE-3 drafter its feature layers' inputs side by side (``(..., 3 D)``; the
        index ``num_layers``: ``out``)."""
        if self._feature_layers is None:
            return out
        parts = [out if i == self.num_layers else self._features[i] for i in self._feature_layers]
        return mx.concatenate(parts, axis=-1)

    def _hold_back_streams(self, out: mx.array) -> mx.array:
        R = len(self._kept)
        self._main_hidden = self._drafter_states(out)[:, :R]
        if self._all_streams:
            self._stream_hidden = out[:, R:]
        return out if self._head_on_streams else out[:, :R]


def _split(out) -> tuple:
    """A decoder layer's output as ``(hidden states, the rest)``: Gemma 4's layers
    also return the keys and values (and offset) they pass on; ``None`` for a
    layer that returns its hidden states alone."""
    return (out[0], out[1:]) if isinstance(out, tuple) else (out, None)


def _joined(h: mx.array, rest):
    """The layer's output with hidden states ``h`` (:func:`_split`'s inverse)."""
    return h if rest is None else (h, *rest)


def _rope_key(rope) -> Optional[tuple]:
    """``(key, (dims, traditional))`` of a RoPE module whose tables can be read: the
    key holds every setting its rotation depends on, so that layers whose modules
    are alike share tables. None for other classes."""
    settings = rope_settings(rope)
    if settings is None:
        return None
    freqs = getattr(rope, "_freqs", None)
    freqs = None if freqs is None else np.array(freqs).tobytes()
    key = (type(rope).__name__, settings, getattr(rope, "base", None), getattr(rope, "scale", None))
    return key + (freqs,), settings


def _in_dtype(a: mx.array, dtype) -> mx.array:
    return a if a.dtype == dtype else a.astype(dtype)


def _lower_triangle(n: int) -> mx.array:
    return mx.array(np.tril(np.ones((n, n), bool)))


def attach_streams(
    model: nn.Module,
    config: SpecStreamConfig,
    seed: int = 0,
    weights: Optional[str] = None,
) -> SpeculativeStreams:
    """Puts speculative streams on a model loaded with ``mlx_lm.load``.

    Args:
        model (nn.Module): an mlx-lm model.
        config (SpecStreamConfig): the stream settings.
        seed (int): seed of the fresh random initialisation. Default: ``0``.
        weights (str, optional): a ``speculative_streams.safetensors`` file to
          load instead of the random initialisation.

    Returns:
        SpeculativeStreams: the new stream parameters (also reachable as
        ``model.speculative_streams.streams``).
    """
    if isinstance(getattr(model, "speculative_streams", None), StreamRuntime):
        raise ValueError("This model already has speculative streams attached.")
    check_supported(model, config)
    streams = SpeculativeStreams(config, hidden_size(model), lora_shapes(model, config))
    init_or_load(streams, seed, weights, lambda name, p: 0.02 if name == "embeddings" else None)
    model.speculative_streams = StreamRuntime(model, config, streams)
    return streams


def attach_verifier(model: nn.Module) -> "StreamRuntime":
    """Puts the tree verifier alone on a model loaded with ``mlx_lm.load`` (no
    streams, no drafter), for drafts from outside the model such as prompt
    lookup. The hooks do nothing outside a step, as for streams."""
    check_supported(model, VerifierConfig())
    model.speculative_streams = StreamRuntime(model, VerifierConfig())
    return model.speculative_streams


def attach_chain_verifier(model: nn.Module) -> "StreamRuntime":
    """The tree verifier alone on a model with recurrent layers, for trees of drafts
    from outside the model (several prompt-lookup drafts merged): its attention
    layers take the tree's masks and positions, its recurrent mixers read the tree
    along its paths (:mod:`mlx_specstream.recurrent`). Refused with the reason where
    the model's layers do not allow it (:func:`tree_on_chains_refusal`)."""
    why = tree_on_chains_refusal(model)
    if why is not None:
        model_type = getattr(getattr(model, "args", None), "model_type", type(model).__module__)
        raise ValueError(f"Model type '{model_type}': no tree of drafts here: {why.rstrip('.')}.")
    model.speculative_streams = StreamRuntime(model, VerifierConfig())
    return model.speculative_streams


def init_or_load(module: nn.Module, seed: int, weights: Optional[str], std=lambda name, p: None):
    """Loads ``weights`` into ``module`` strictly (errors name the file), or
    without them draws a random initialisation, deterministic in ``seed``: normal
    with ``std(name, p)`` per tensor, ``in_features ** -0.5`` where that is None."""
    if weights is None:
        params = tree_flatten(module.parameters())
        keys = mx.random.split(mx.random.key(seed), len(params))
        new = []
        for key, (name, p) in zip(keys, params):
            if p.ndim == 0 or not mx.issubdtype(p.dtype, mx.floating):
                # (a scalar setting, as Apertus's activation's; ids, EAGLE-3's d2t: as built)
                new.append((name, p))
                continue
            scale = std(name, p)
            scale = p.shape[-1] ** -0.5 if scale is None else scale
            new.append((name, scale * mx.random.normal(p.shape, key=key)))
        module.update(tree_unflatten(new))
    else:
        try:
            loaded = mx.load(str(weights))
            quantize_like(module, loaded)
            module.load_weights(list(loaded.items()), strict=True)
        except ValueError as e:
            raise ValueError(f"{weights}: {e}") from e
    mx.eval(module.parameters())


def quantize_like(module: nn.Module, weights: Dict[str, mx.array]) -> None:
    """Quantizes the layers of ``module`` that ``weights`` store quantized (a
    ``.scales`` beside the weight), each with the bits and group size its shapes
    tell (a 4-bit base's MTP layer, its routers in 8 bits); others stay as they are."""

    def settings(path, layer):
        if f"{path}.scales" not in weights or not hasattr(layer, "to_quantized"):
            return False
        dims = layer.weight.shape[-1]
        bits = weights[f"{path}.weight"].shape[-1] * 32 // dims
        return {"bits": bits, "group_size": dims // weights[f"{path}.scales"].shape[-1]}

    if any(k.endswith(".scales") for k in weights):
        nn.quantize(module, class_predicate=settings)


def runtime_config(model):
    """The model's speculative settings: its runtime's config, or a bare verifier's
    (:class:`~mlx_specstream.config.VerifierConfig`) for a model that runs prompt
    lookup without a runtime (one with recurrent layers, :mod:`mlx_specstream.recurrent`)."""
    rt = getattr(model, "speculative_streams", None)
    return VerifierConfig() if rt is None else rt.config


def get_runtime(model) -> StreamRuntime:
    rt = getattr(model, "speculative_streams", None)
    if not isinstance(rt, StreamRuntime):
        raise ValueError(
            "This model has no speculative streams: load it with mlx_specstream.load, "
            "or call mlx_specstream.attach_streams(model, config) first."
        )
    return rt

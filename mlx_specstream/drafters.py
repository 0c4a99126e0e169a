"""Medusa-1 heads and the ParallelSpec drafter: attached drafters verified by the
same tree verifier as speculative streams.

Both read the last decoder layer's output (before the final norm) of the node
accepted last, and share the base's final norm and LM head (``StreamRuntime.head``).
Each decode step: the base verifies the tree (main rows only, so output is the
base model's exactly), then the drafter drafts the next tree's levels:

* Medusa: head ``j`` maps the hidden state ``h`` of the last accepted node
  to ``h + SiLU(W_j h + b_j)``; its logits are level ``j + 1`` of the tree
  rooted at the bonus token.
* ParallelSpec: one decoder layer of the base's class runs over the new real
  rows ``fc([h_i; embed(x_{i+1})])`` of the accepted path (the last one pairs
  the last accepted node with the bonus token) followed by ``k - 1`` [MASK]
  rows, in one causal pass on its own KV cache. The last real row gives level
  1, mask ``m`` level ``m + 1``. Mask K/V are trimmed from the cache after the
  pass; real rows stay.
"""

import glob
import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache

from .attention_masks import llama4_attention_scale
from .cache import KVCacheList, kv_lists
from .config import DrafterConfig
from .draft_confidence import top_probabilities
from .model_parts import (
    attention_of,
    rope_rows_at,
    hidden_size,
    layer_params,
    llama4_scale_settings,
    no_positions,
    own_class,
    ropes_of,
    text_args,
)
from .recurrent import has_recurrent_layers


class ResBlock(nn.Module):
    def __init__(self, dims: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(dims, dims, bias=bias)

    def __call__(self, x):
        return x + nn.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """``heads.{j}.linear.{weight,bias}``: one residual block per draft level."""

    drafts_from_last_node = True  # (the decoder drafts on the device, in the step's graph)

    def __init__(self, config: DrafterConfig, model: nn.Module):
        super().__init__()
        D = hidden_size(model)
        self.heads = [ResBlock(D) for _ in range(config.num_draft_tokens)]

    def start(self, prompt_cache_offset: int, previous=None, levels=None) -> "DrafterState":
        """The state of a generation (``previous``: the one kept with a reused prompt
        cache; ``levels``: the tree's, where the drafter's cost depends on them)."""
        return DrafterState(needs_prompt=False)

    def draft(
        self, rt, state, hidden: mx.array, path: List[int], path_tokens, token, levels=None
    ) -> mx.array:
        """``(levels, V)`` logits of the draft levels from the last accepted node (every
        head's where ``levels`` is ``None``)."""
        return self.draft_at(rt, hidden, mx.array(path[-1]), levels)

    def draft_at(self, rt, hidden: mx.array, node: mx.array, levels=None) -> mx.array:
        """The same from node ``node`` (a device index): no host read."""
        return self.draft_rows(rt, mx.take(hidden, node.reshape(1), axis=0), levels)[0]

    def draft_rows(self, rt, hidden: mx.array, levels=None) -> mx.array:
        """``(R, levels, V)`` logits of the first ``levels`` heads (all by default) from
        each of ``R`` hidden states ``(R, D)`` (a tree's nodes, or a batch's rows)."""
        heads = self.heads[:levels]
        return rt.head(mx.stack([head(hidden) for head in heads], axis=1), draft=True)


class ParallelSpecDrafter(nn.Module):
    """``fc.weight`` ``(D, 2D)``, ``masks`` ``(k - 1, D)`` and ``layer.*``, one
    decoder layer of the base's own class."""

    def __init__(self, config: DrafterConfig, model: nn.Module):
        super().__init__()
        if config.num_draft_tokens < 2:
            raise ValueError(
                f"drafter.num_draft_tokens={config.num_draft_tokens}: ParallelSpec needs >= 2 "
                "(one real row plus [MASK] rows)."
            )
        D = hidden_size(model)
        self.fc = nn.Linear(2 * D, D, bias=False)
        self.masks = mx.zeros((config.num_draft_tokens - 1, D))
        self.layer = new_decoder_layer(model)
        self._scale = attention_scale_settings(model)  # (Ministral 3's attention scale)

    def start(self, prompt_cache_offset: int, previous=None, levels=None) -> "DrafterState":
        return continue_or_start(prompt_cache_offset, previous, self.layer)

    def draft(self, rt, state, hidden, path, path_tokens, token, levels=None) -> mx.array:
        """``(k, V)`` logits of the draft levels (all ``k``: one pass, whatever ``levels``)."""
        feats, nxt = new_rows(state, hidden, path, path_tokens, token)
        emb = rt.embed(mx.array(nxt)).astype(feats.dtype)
        real = self.fc(mx.concatenate([feats, emb], axis=-1).astype(self.fc.weight.dtype))
        x = mx.concatenate([real, self.masks.astype(real.dtype)], axis=0)[None]
        out = run_layer(self.layer, x, state.cache, scale=self._scale)
        state.cache.trim(self.masks.shape[0])  # [MASK] K/V never stay
        k = self.masks.shape[0] + 1
        return rt.head(out[:, -k:], draft=True)[0]


def levels_again(rt, depth, logits: list, out: mx.array, cache, n: int,
                 confidence: Optional[float] = None) -> int:  # fmt: skip
    """Up to ``n`` deeper levels appended to ``logits``: ``depth`` (an MTP layer, an EAGLE-3
    drafter) again on its own output ``out`` (its last row) and the previous level's
    argmax, each row appended to ``cache`` (trimmed by the caller). With a
    ``confidence`` (``draft_confidence``) the chain stops after a level whose first
    choice is less likely than it: each level's probability is read on the host while
    the next level runs, so a cut chain ran one level more than it keeps (its row in
    ``cache`` too). Returns the rows appended to ``cache``."""
    sure = None if confidence is None else top_probabilities(logits[-1])
    for i in range(n):
        out = depth.again(rt, out, mx.argmax(logits[-1], axis=-1), cache)
        logits.append(depth.level_logits(rt, out))
        if sure is None:
            continue
        after = top_probabilities(logits[-1])
        mx.async_eval(after)  # (runs while the host reads the level before)
        if sure.item() < confidence:
            logits.pop()
            return i + 1
        sure = after
    return n


def new_rows(state: "DrafterState", hidden: mx.array, path: List[int], path_tokens, token):
    """The rows a drafter with its own KV cache (ParallelSpec, MTP) appends after a
    step: the accepted path's last hidden states ``(L, D)`` and, for each, the token
    after it (the last one: the bonus ``token``); on the first step the prompt's rows
    come first (and are consumed from ``state``)."""
    feats = mx.take(hidden, mx.array(path), axis=0)
    nxt = list(path_tokens[1:]) + [token]
    if state.prompt_hidden is not None:
        feats = mx.concatenate([state.prompt_hidden, feats], axis=0)
        nxt = state.prompt_next + nxt
        state.prompt_hidden, state.prompt_next = None, None
    return feats, nxt


def new_layer_cache(layer: nn.Module):
    """An empty cache for a drafter's decoder ``layer``, of the kind its model keeps:
    for DeepSeek V3.2's and GLM-5's sparse attention a :class:`KVCacheList` of two
    (latent keys, the indexer's keys), else a ``KVCache``."""
    attention = getattr(layer, "self_attn", None)  # (None: Nemotron-NAS's layers without)
    if attention is not None and "indexer" in attention:
        return KVCacheList(KVCache(), KVCache())
    return KVCache()


def layer_mask(x: mx.array, cache, window: Optional[int] = None) -> Optional[mx.array]:
    """The causal mask of rows ``x`` over ``cache`` as an array (DeepSeek V3's latent
    attention and V3.2's indexer take no ``"causal"``); over a :class:`KVCacheList` the
    first member's. With ``window``, each row sees its last ``window`` keys only."""
    return create_attention_mask(x, _keys_cache(cache), window_size=window, return_array=True)


def _keys_cache(cache):
    """The cache whose offset is the rows' position: a :class:`KVCacheList`'s first."""
    return cache[0] if isinstance(cache, KVCacheList) else cache


def run_layer(
    layer: nn.Module, x: mx.array, cache, window: Optional[int] = None, scale=None, at=None
) -> mx.array:
    """A drafter's decoder ``layer`` over rows ``x`` ``(B, L, D)``, causal over ``cache``
    (within ``window`` keys, where given). ``scale``: ``(beta, max_positions)`` of Llama
    4's attention scale, for a layer called as ``layer(x, attn_scale, mask, cache)``
    (Ministral 3, Mistral 4: :func:`attention_scale_settings`), at the rows' positions.

    ``at`` ``(position, mask)``: every row at one ``position`` (a dynamic tree's level:
    siblings share it; :func:`one_position`) and seeing the columns of ``cache`` and of
    the rows (appended to it) where ``mask`` ``(L, S)`` says, instead of causal."""
    if at is not None:
        with one_position(layer, at[0]):
            return _run_layer(layer, x, cache, at[1], scale, mx.full((x.shape[1],), at[0]))
    return _run_layer(layer, x, cache, layer_mask(x, cache, window), scale)


def _run_layer(layer, x, cache, mask, scale, positions=None) -> mx.array:
    if scale is None:
        out = layer(x, mask, cache)
    else:
        start = 0 if cache is None else _keys_cache(cache).offset
        if positions is None and isinstance(start, mx.array):
            # (a batch's ragged cache: (B, 1, L, 1), as mlx-lm's)
            positions = start[:, None] + mx.arange(x.shape[1])
            attn_scale = llama4_attention_scale(positions, *scale)[:, None, :, None]
        else:
            if positions is None:
                positions = mx.arange(start, start + x.shape[1])
            attn_scale = llama4_attention_scale(positions, *scale)[:, None]
        out = layer(x, attn_scale.astype(x.dtype), mask, cache)
    return out[0] if isinstance(out, tuple) else out  # (Hunyuan's hands on its keys too)


@contextmanager
def one_position(layer: nn.Module, position: int):
    """Within it, ``layer``'s RoPE modules (:func:`~mlx_specstream.model_parts.ropes_of`)
    place every row of a call at ``position``, not at consecutive positions from the
    cache's offset: the rows go on the batch axis, each rotated at that offset.

    Example: 3 rows at position 7 rotate as 3 one-row calls at offset 7 would.
    """
    ropes = ropes_of(layer)
    classes = [type(r) for r in ropes]
    for rope, cls in zip(ropes, classes):

        def call(self, x, offset=0, _base=cls.__call__, **kwargs):
            return rope_rows_at(_base, self, x, position, **kwargs)

        rope.__class__ = type(cls.__name__, (cls,), {"__call__": call})
    try:
        yield
    finally:
        for rope, cls in zip(ropes, classes):
            rope.__class__ = cls


def position_refusal(layer: nn.Module) -> Optional[str]:
    """Why a drafter's decoder ``layer`` cannot run rows at one position
    (:func:`one_position`), or ``None``: positions applied other than by a RoPE module
    found (:func:`~mlx_specstream.model_parts.ropes_of`), or sparse attention (DeepSeek
    V3.2's, GLM-5's indexer picks each row's keys by its own causal mask). A layer of
    blocks run in turn (Nemotron-H's: ``layers``) is read block by block."""
    blocks = layer.layers if isinstance(getattr(layer, "layers", None), list) else [layer]
    for block in blocks:
        attention = attention_of(block)
        if attention is not None and "indexer" in attention:
            return "its layer's sparse attention picks each row's keys by position"
        if not ropes_of(block) and not no_positions(block):
            return "its layer applies positions other than through a RoPE module"
    return None


def attention_scale_settings(model) -> Optional[tuple]:
    """``(beta, max_positions)`` of the Llama 4 attention scale a drafter's decoder layer
    takes (the model's layers are called as ``layer(x, attn_scale, mask, cache)``), else
    None."""
    return llama4_scale_settings(model, model.layers[-1])


def continue_or_start(
    prompt_cache_offset: int, previous, layer: Optional[nn.Module] = None, make_cache=None
) -> "DrafterState":
    """The state of a drafter with its own decoder ``layer`` and KV cache (ParallelSpec,
    MTP; or the cache ``make_cache()`` builds: DFlash's layers) for a new generation. Continues ``previous`` (the state kept with a reused
    prompt cache) when it covers the cached tokens: all of them, or all but the last
    with that token's state kept to pair with the next prompt's first token (as a
    generation leaves it); otherwise starts without the older context (RoPE only
    sees relative positions, so it drafts from less history)."""
    if previous is not None and previous.cache is not None:
        offset = previous.offset
        if offset == prompt_cache_offset and previous.pending_hidden is None:
            return previous
        if offset == prompt_cache_offset - 1 and previous.pending_hidden is not None:
            return previous
    cache = make_cache() if make_cache is not None else new_layer_cache(layer)
    return DrafterState(needs_prompt=True, cache=cache)


DRAFTERS = {"medusa": MedusaHeads, "parallelspec": ParallelSpecDrafter}


class DrafterState:
    """What a drafter keeps during one generation."""

    def __init__(self, needs_prompt: bool, cache: Optional[KVCache] = None):
        self.needs_prompt = needs_prompt
        self.cache = cache
        self.prompt_hidden: Optional[mx.array] = None  # (P - 1, D) prompt rows, first step
        self.prompt_next: Optional[List[int]] = None
        # (1, D): the state of the last token a generation fed, whose next token
        # is the following call's first prompt token
        self.pending_hidden: Optional[mx.array] = None

    @property
    def offset(self) -> int:
        """The tokens whose rows the drafter has (row ``i``: token ``i`` and ``i + 1``)."""
        return 0 if self.cache is None else self.cache.offset

    def trim_to(self, offset: int):
        """Keeps the rows of the first ``offset`` tokens: row ``i`` pairs token
        ``i``'s state with token ``i + 1``, so it follows the base's KV cache."""
        if self.cache is not None and self.cache.offset > offset:
            self.cache.trim(self.cache.offset - offset)
        if self.cache is not None and self.cache.offset != offset - 1:
            self.pending_hidden = None  # (its token is gone, or already paired)


# A decoder layer's constructor arguments, by parameter name, for a drafter's layer (one
# that attends to every key: no window, RoPE on); the index's names; others keep defaults.
_LAYER_ARGUMENTS = {
    "layer_type": "attention",  # (Jamba's and Granite 4's hybrids)
    "block_type": "*",  # (Nemotron-H's attention block)
    "kv_proj": True,  # (Hunyuan: keys and values of its own, not shared from below)
    "use_sliding": False,  # (AFMoE)
    "is_local": False,  # (EXAONE 4)
    "is_sliding_window": False,  # (MiMo-V2-Flash)
    "is_moe": False,  # (MiMo-V2-Flash)
    "use_rope": True,  # (Llama 4)
}
_INDEX_NAMES = ("layer_idx", "layer_id", "layer_index", "idx")


def _attention_index(model) -> Optional[int]:
    """Where a hybrid's drafter layer sits: an attention layer's index (Qwen3-Next's,
    Qwen3.5's ``full_attention_interval``; else the last layer whose cache keeps keys);
    None for a model without recurrent layers."""
    args = text_args(model)
    if getattr(args, "full_attention_interval", None):  # (layer i attends at (i + 1) % n == 0)
        return args.full_attention_interval - 1
    if getattr(args, "num_kv_shared_layers", 0):  # (Gemma 4: the last layer with keys of its own)
        return len(model.layers) - args.num_kv_shared_layers - 1
    if not has_recurrent_layers(model):
        return None
    made = model.make_cache()
    keeps_keys = [i for i, c in enumerate(made) if not isinstance(c, ArraysCache)]
    if len(made) != len(model.layers) or not keeps_keys:
        raise ValueError(
            f"Cannot build a drafter's decoder layer for {type(model).__module__}: no layer "
            "of its own keeps keys and values (one cache per layer)."
        )
    return keeps_keys[-1]


def new_decoder_layer(model, args=None, **arguments) -> nn.Module:
    """A fresh decoder layer of the model's own (unhooked) layer class, that attends.

    Built as the layer after the last one (index ``len(model.layers)``: DeepSeek-V3's
    would be a mixture-of-experts layer), or, where the config's per-layer settings
    (``layer_types``, ...) end at the last layer, as a twin of the last one; on a
    hybrid, at an attention layer's index (:func:`_attention_index`). ``args`` (the
    model's ``ModelArgs`` by default) and ``arguments`` (over ``_LAYER_ARGUMENTS``) are
    for a layer of other settings (a checkpoint's MTP layer: ``mtp.py``).
    """
    cls, args = own_class(model.layers[-1]), args or text_args(model)
    takes = layer_params(model.layers[-1])
    scaled = attention_scale_settings(model) is not None  # (x, attn_scale, mask, cache)
    # (by position: PLaMo's names its mask attention_mask)
    if (
        not (takes[1:2] in (["mask"], ["attention_mask"]) and takes[2:3] == ["cache"])
        and not scaled
    ):
        raise ValueError(
            f"Cannot build a drafter's decoder layer: {cls.__module__}.{cls.__name__} "
            f"takes ({', '.join(takes)}); the drafter calls its layer as layer(x, mask, cache) "
            "or layer(x, attn_scale, mask, cache)."
        )
    signature = list(inspect.signature(cls.__init__).parameters.values())[1:]
    params = [p.name for p in signature]
    unknown = [p.name for p in signature[1:] if p.default is inspect.Parameter.empty
               and p.name not in (*_LAYER_ARGUMENTS, *arguments, *_INDEX_NAMES)]  # fmt: skip
    if unknown:
        raise ValueError(
            f"Cannot build a drafter's decoder layer: {cls.__module__}.{cls.__name__} takes "
            f"({', '.join(params)}); its {unknown[0]!r} is not known here."
        )

    def build(index):
        given = {**_LAYER_ARGUMENTS, **arguments, **dict.fromkeys(_INDEX_NAMES, index)}
        return cls(args, **{p: given[p] for p in params[1:] if p in given})

    made = model.make_cache() if hasattr(model, "make_cache") else []
    n = len(model.layers)  # (Nemotron-H's block: its type says it attends, at any index)
    index = _attention_index(model) if set(params) & set(_INDEX_NAMES) else None
    own = made[n - 1 if index is None else index] if len(made) == n else None
    if isinstance(own, CacheList) and not kv_lists(own):
        raise ValueError(
            f"Cannot build a drafter's decoder layer: {cls.__module__}.{cls.__name__} keeps its "
            "keys beside other state in one cache (a CacheList); a drafter's cache rolls back "
            "keys only."
        )
    try:
        if index is not None:
            return build(index)
        try:
            return build(n)
        except IndexError:  # (per-layer settings that end at the last layer: its twin)
            return build(n - 1)
    except (TypeError, IndexError, KeyError) as e:
        raise ValueError(
            f"Cannot build a drafter's decoder layer: {cls.__module__}.{cls.__name__}"
            f"({', '.join(params)}) failed ({type(e).__name__}: {e})."
        ) from e


def make_drafter(config: DrafterConfig, model: nn.Module) -> nn.Module:
    if config.kind == "mtp":  # (a checkpoint's MTP layer: mtp.py builds on this module)
        from .mtp import MTPDrafter

        return MTPDrafter(config, model)
    if config.kind == "eagle3":  # (an EAGLE-3 checkpoint's layer: eagle.py)
        from .eagle import Eagle3Drafter

        return Eagle3Drafter(config, model)
    if config.kind == "eagle":  # (an EAGLE-1 checkpoint's layer: eagle1.py)
        from .eagle1 import Eagle1Drafter

        return Eagle1Drafter(config, model)
    if config.kind == "dflash":  # (a DFlash checkpoint's layers: dflash.py)
        from .dflash import DFlashDrafter

        return DFlashDrafter(config, model)
    if config.medusa is not None:  # (a released checkpoint's heads: medusa.py)
        from .medusa import MedusaCheckpointHeads

        return MedusaCheckpointHeads(config, model)
    return DRAFTERS[config.kind](config, model)


def attach_drafter(
    model: nn.Module,
    config: DrafterConfig,
    seed: int = 0,
    weights: Optional[str] = None,
) -> nn.Module:
    """Puts a Medusa or ParallelSpec drafter on a model loaded with ``mlx_lm.load``.

    Args:
        model (nn.Module): an mlx-lm model without streams or drafter.
        config (DrafterConfig): the drafter settings.
        seed (int): seed of the fresh random initialisation. Default: ``0``.
        weights (str, optional): a ``drafter.safetensors`` file to load instead.

    Returns:
        nn.Module: the drafter (also ``model.speculative_streams.drafter``).
    """
    from .streams import StreamRuntime, init_or_load
    from .support import check_supported

    refuse_attached(model)
    check_supported(model, config)
    drafter = make_drafter(config, model)
    init_or_load(drafter, seed, weights)
    model.speculative_streams = StreamRuntime(model, config, drafter=drafter)
    return drafter


def refuse_attached(model: nn.Module) -> None:
    """Refuses a model that already has streams or a drafter attached."""
    if getattr(model, "speculative_streams", None) is not None:
        raise ValueError("This model already has speculative streams or a drafter attached.")


def check_drafter_base(model: nn.Module) -> None:
    """Refuses a base a fresh drafter cannot go on: one with streams or a drafter attached,
    or whose passes the tree verifier cannot run (what every drafter needs; checked
    before a drafter's settings are read from the base, e.g. before training one)."""
    from .config import VerifierConfig
    from .support import check_supported

    refuse_attached(model)
    check_supported(model, VerifierConfig())


def checkpoint_files(path, hint: str) -> List[Path]:
    """A drafter checkpoint's ``*.safetensors`` files, sorted.

    Raises:
        ValueError: where ``path`` has none, naming the files it has and ``hint``.
    """
    files = sorted(Path(p) for p in glob.glob(str(Path(path) / "*.safetensors")))
    if not files:
        found = sorted(p.name for p in Path(path).iterdir() if p.is_file())
        raise ValueError(f"{path}: no *.safetensors file (found {found}). {hint}")
    return files


def quantize_as_base(drafter: nn.Module, model: nn.Module, quantization: Optional[dict]) -> None:
    """Quantizes ``drafter``'s matrices as ``mlx_lm.convert`` quantized its base
    (``quantization``: the base config's ``{"group_size", "bits"}``; ``None``: a float base,
    nothing done), by the model's own rule where it has one (e.g. Qwen3.5-MoE's routers in
    8 bits); a matrix whose width the group size does not divide stays float."""
    if not quantization:
        return
    rule = getattr(model, "quant_predicate", None)

    def quantizes(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if module.weight.shape[-1] % quantization["group_size"]:
            return False
        return True if rule is None else rule(path, module)

    nn.quantize(drafter, group_size=quantization["group_size"], bits=quantization["bits"],
                class_predicate=quantizes)  # fmt: skip


def attach_checkpoint_drafter(
    model: nn.Module,
    config: DrafterConfig,
    weights: dict,
    source,
    what: str,
    check=None,
    quantization: Optional[dict] = None,
) -> nn.Module:
    """Puts the drafter ``config`` describes on ``model`` with a checkpoint's tensors
    ``weights`` (every one, strictly), ``check(drafter)`` run first where given, then
    quantized as the base is where ``quantization`` says (:func:`quantize_as_base`).

    Raises:
        ValueError: naming ``source`` and ``what`` drafter it is, where the tensors do not fit.
    """
    from .streams import StreamRuntime
    from .support import check_supported

    check_supported(model, config)
    drafter = make_drafter(config, model)
    try:
        drafter.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(f"{source}: its {what} drafter does not fit this model: {e}") from e
    if check is not None:
        check(drafter)
    quantize_as_base(drafter, model, quantization)
    mx.eval(drafter.parameters())
    model.speculative_streams = StreamRuntime(model, config, drafter=drafter)
    return drafter

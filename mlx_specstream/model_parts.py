"""What the tree verifier reads of a wrapped mlx-lm model, without changing it: each
decoder layer's attention and RoPE modules and whether it places tokens at all, its
linear modules (for stream-only LoRA), which cache each layer reads, the input
embedding, the ``ModelArgs``, and the hidden and vocabulary sizes.

Functions only: :mod:`mlx_specstream.streams` hooks what they find, and
:mod:`mlx_specstream.support` says from them which models it can take.
"""

import ast
import inspect
import textwrap
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn


def attention_of(layer):
    """A decoder layer's attention module (DBRX's sits one module deeper, in
    ``norm_attn_norm.attn``; Phixtral's is its ``mixer``), or None."""
    for module in (layer, layer.get("norm_attn_norm")):
        for name in ("self_attn", "attention", "attn", "mixer"):
            if module is not None and name in module:
                return module[name]
    return None


def rope_of(layer):
    """The RoPE module of a decoder layer's attention (EXAONE's sits one module
    deeper, in ``attn.attention``; Qwen's and PLaMo's is ``rotary_emb``), or None."""
    attn = attention_of(layer)
    for module in (attn, None if attn is None else getattr(attn, "attention", None)):
        for name in ("rope", "rotary_emb"):
            rope = None if module is None else getattr(module, name, None)
            if isinstance(rope, nn.Module):
                return rope
    return None


def ropes_of(layer) -> list:
    """Every RoPE module of a decoder layer's attention: :func:`rope_of`'s, and a
    sparse attention's indexer's (DeepSeek V3.2's, GLM-5's ``indexer.rope``)."""
    rope = rope_of(layer)
    indexer = getattr(attention_of(layer), "indexer", None)
    extra = getattr(indexer, "rope", None)
    return [r for r in (rope, extra) if r is not None]


def rope_rows_at(base_call, rope, x, positions, **kwargs):
    """``rope``'s own call (``base_call``) on ``x`` ``(B, H, L, D)`` with every row at a
    position of its own: ``positions`` (an int, or an array of ``L`` positions shared by
    the ``B`` rows, or of ``B * L``). ``mx.fast.rope`` takes one offset per batch row
    only, so the rows go on the batch axis (one transpose each way where ``B`` is 1).

    Example: ``x`` ``(1, H, 3, D)`` and ``positions`` 7 rotate as three one-row calls at
    offset 7 would (a dynamic tree's level, every row at one position).
    """
    B, H, L, D = x.shape
    if B == 1:  # (1, H, L, D) <-> (L, H, 1, D)
        y = base_call(rope, x.transpose(2, 1, 0, 3), offset=positions, **kwargs)
        return y.transpose(2, 1, 0, 3)
    y = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
    if isinstance(positions, mx.array) and positions.size != B * L:  # (shared by the rows)
        positions = mx.tile(positions, (B,))
    y = base_call(rope, y, offset=positions, **kwargs)
    return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)


def position_embedding(model) -> Optional[nn.Module]:
    """The learned absolute position embedding the model adds to its inputs
    (``wpe``: GPT-2, StarCoder's gpt_bigcode), or ``None``."""
    for owner in (model, getattr(model, "model", None), getattr(model, "transformer", None)):
        wpe = getattr(owner, "wpe", None)
        if isinstance(wpe, nn.Embedding):
            return wpe
    return None


def no_positions(layer) -> bool:
    """Whether a decoder layer's attention applies no positions: it says so
    (``use_rope`` False: the NoPE layers of EXAONE 4, Llama 4, ...), or it holds no
    RoPE module and its call reads no position (:func:`reads_positions`: Jamba's,
    Kimi Linear's). Such a layer sees positions only through its mask and the other
    layers' states, so a tree needs nothing of it beyond the mask."""
    attn = attention_of(layer)
    if getattr(attn, "is_local_attention", None) is False and getattr(attn, "rope", 0) is None:
        return True  # (AFMoE's full layers: no RoPE module, rope set to None)
    use_rope = getattr(attn, "use_rope", None)
    if use_rope is not None:
        return not use_rope
    return attn is not None and rope_of(layer) is None and not reads_positions(attn)


POSITION_CALLS = ("rope", "rotary", "alibi", "position")  # (names of calls that place tokens)


def reads_positions(module: nn.Module) -> bool:
    """Whether ``module``'s call may apply positions itself: it reads an ``offset``
    (a cache's, or its own argument), or calls something named after RoPE, rotary
    embeddings, ALiBi or positions; ``True`` when its source cannot be read.

    Example: Jamba's attention (projections, the cache, the attention) gives
    ``False``; nanochat's, which calls ``apply_rotary_emb(queries,
    offset=cache.offset)``, gives ``True``.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(own_class(module).__call__)))
    except (OSError, TypeError, SyntaxError):
        return True
    for n in ast.walk(tree):
        if (isinstance(n, ast.Attribute) and n.attr == "offset") or (
            isinstance(n, ast.Name) and n.id == "offset"
        ):
            return True
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if any(word in name.lower() for word in POSITION_CALLS):
                return True
    return False


def submodule(module, path: str):
    for part in path.split("."):
        module = module[part]
    return module


def _is_linear(module) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear)) or is_adapter(module)


def is_adapter(module) -> bool:
    """Whether ``module`` is an mlx-lm LoRA or DoRA adapter around a linear module
    (``mlx_lm.load(..., adapter_path=...)``): it stands for that module, and the
    stream LoRA goes around it, so stream rows see the adapted layer too."""
    return hasattr(module, "lora_a") and isinstance(
        getattr(module, "linear", None), (nn.Linear, nn.QuantizedLinear)
    )


def linear_modules(layer) -> List[str]:
    """The paths of ``layer``'s linear modules, an adapter counting as the module it wraps.

    Example: a layer whose ``mlp.up_proj`` is an adapter around ``mlp.up_proj.linear``
    lists ``mlp.up_proj`` only.
    """
    modules = dict(layer.named_modules())
    return sorted(
        n
        for n, m in modules.items()
        if _is_linear(m) and not is_adapter(modules.get(n.rpartition(".")[0]))
    )


def linear_shape(module):
    """``(in, out)`` of a float or quantized linear module, or of an adapter's."""
    if is_adapter(module):
        module = module.linear
    out_dims, cols = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        return cols * 32 // module.bits, out_dims
    return cols, out_dims


def kv_sources(model) -> List[int]:
    """Per decoder layer, the layer whose cache it reads: its own, or for a layer
    that shares an earlier layer's keys and values (Gemma 4's last
    ``num_kv_shared_layers``) that layer's, from the model's ``previous_kvs``.

    Example: a Gemma 4 of 6 layers, sliding, sliding, full, sliding, sliding,
    full, whose last 2 share: ``[0, 1, 2, 3, 3, 2]``.
    """
    models = [model, getattr(model, "language_model", None), getattr(model, "model", None)]
    models += [getattr(m, name, None) for m in models[1:] for name in ("model", "language_model")]
    for inner in models:
        # (Gemma 3n's layers get their source's cache: ``layer_idx_to_cache_idx``)
        for name in ("previous_kvs", "layer_idx_to_cache_idx"):
            sources = getattr(inner, name, None)
            if sources is not None and getattr(inner, "layers", None) is model.layers:
                return [int(s) for s in sources]
    return list(range(len(model.layers)))


def cache_slots(model) -> List[Optional[int]]:
    """Per decoder layer, the index in the model's cache list of the cache it attends
    over (``None``: it has no attention): :func:`kv_sources` (each layer its own, or
    the earlier layer's it shares), but where the model makes caches only for its
    layers that attend (Nemotron-NAS: ``self_attn`` is ``None`` elsewhere), those
    layers' in order.

    Example: a Nemotron-NAS of 4 layers, the second and fourth without attention
    (2 caches): ``[0, None, 1, None]``; a Nemotron-H of pattern ``M-*-`` (2 caches,
    its MLP layers keep none) the same; a Gemma 4 of 6 layers whose last 2 share:
    ``[0, 1, 2, 3, 3, 2]``.
    """
    made = model.make_cache() if hasattr(model, "make_cache") else None
    attends = [getattr(layer, "self_attn", True) is not None for layer in model.layers]
    if made is not None and len(made) == sum(attends) < len(attends):
        slots = iter(range(len(made)))
        return [next(slots) if a else None for a in attends]
    # (Nemotron-H: caches for its mixer and attention layers only, in order; its MLP and
    # MoE layers are handed none and hold no module that takes one)
    takes = [any(_takes_cache(m) for m in layer.children().values()) for layer in model.layers]
    handed = all("cache" in layer_params(layer) for layer in model.layers)
    if made is not None and handed and len(made) == sum(takes) < len(takes):
        slots = iter(range(len(made)))
        return [next(slots) if t else None for t in takes]
    return kv_sources(model)


def _takes_cache(module) -> bool:
    """Whether ``module`` is a module whose call takes a ``cache`` argument (its own
    class's call: a hooked one's, ``call(self, *args, **kwargs)``, says nothing)."""
    if not isinstance(module, nn.Module):
        return False
    cls = type(module)
    while cls.__dict__.get("_spec_hook"):  # (streams._swap_call's subclass)
        cls = cls.__bases__[0]
    try:
        return "cache" in inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return False


def llama4_query_temperature(layer) -> Optional[tuple]:
    """``(floor_scale, attn_scale)`` of a decoder layer whose attention scales its
    queries by position without RoPE (Llama 4's NoPE layers with
    ``attn_temperature_tuning``), else ``None``."""
    attn = attention_of(layer)
    if not (no_positions(layer) and getattr(attn, "attn_temperature_tuning", 0)):
        return None
    if not all(hasattr(attn, a) for a in ("floor_scale", "attn_scale", "q_proj")):
        return None
    return attn.floor_scale, attn.attn_scale


def text_args(model):
    """The language model's ``ModelArgs``: a vision-language wrapper's (Qwen3.5's
    ``TextModelArgs``), the model's own, or its inner model's (Baichuan-M1's)."""
    for owner in (getattr(model, "language_model", None), model, getattr(model, "model", None)):
        for name in ("args", "config"):  # (Youtu-LLM's: config)
            if owner is not None and hasattr(owner, name):
                return getattr(owner, name)
    raise ValueError(f"Cannot find the ModelArgs of {type(model).__module__}.")


def embedding_of(model) -> nn.Module:
    paths = ("model.embed_tokens", "embed_tokens", "model.wte", "gpt_neox.embed_in",
             "language_model.model.embed_tokens", "model.language_model.embed_tokens")  # fmt: skip
    for path in paths:
        try:
            return submodule(model, path)
        except (KeyError, AttributeError, TypeError):
            continue
    # (else the model's one token embedding, whatever its name: wte, word_embeddings, ...)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)) and ".layers." not in name]  # fmt: skip
    if len(found) > 1:  # (GPT-BigCode's also embeds positions: the one of the vocabulary)
        rows = getattr(text_args(model), "vocab_size", None)
        found = [(name, m) for name, m in found if m.weight.shape[0] == rows]
    if len(found) == 1:
        return found[0][1]
    raise ValueError(
        f"Cannot find the input embedding of {type(model).__module__}"
        + (f": several ({', '.join(n for n, _ in found)})." if found else ".")
    )


def attention_mask_apart(layer) -> bool:
    """Whether decoder ``layer`` is called as ``layer(h, cache, attn_mask, ...)``, its
    attention's mask apart from its mixer's (Falcon-H1's, beside a Mamba mixer)."""
    takes = layer_params(layer)
    return len(takes) >= 3 and takes[1] == "cache" and takes[2] == "attn_mask"


def kv_offset(c) -> int:
    """The tokens a layer's cache holds: its offset, or for a ``CacheList`` (Falcon-H1's
    mixer state beside its keys) its first member that has one."""
    if hasattr(c, "offset"):
        return c.offset
    return next(k.offset for k in c.caches if hasattr(k, "offset"))


def model_args(model):
    """The model's ``args`` (its language model's, for a vision-language wrapper)."""
    args = getattr(model, "args", None)
    return getattr(args, "text_config", None) or args


def own_class(module: nn.Module) -> type:
    """The model's own class of ``module``, under any hook class of ours (``_swap_call``)."""
    cls = type(module)
    while cls.__dict__.get("_spec_hook"):
        cls = cls.__mro__[1]
    return cls


def layer_params(layer) -> list:
    """The names a decoder layer's call takes, ``self`` left out (its own class's call)."""
    return list(inspect.signature(own_class(layer).__call__).parameters)[1:]


def llama4_scale_settings(model, layer) -> Optional[tuple]:
    """``(beta, max_positions)`` of the Llama 4 attention scale a decoder layer takes,
    from its attention (Ministral 3's) or the model's ``rope_parameters`` (Mistral 4's);
    ``None`` for a layer not called as ``layer(x, attn_scale, mask, cache)``."""
    if layer_params(layer)[1:4] != ["attn_scale", "mask", "cache"]:
        return None
    attn = attention_of(layer)
    if all(hasattr(attn, a) for a in ("scaling_beta", "original_max_position_embeddings")):
        return attn.scaling_beta, attn.original_max_position_embeddings
    for owner in (model, getattr(model, "language_model", None)):
        rope = getattr(getattr(owner, "args", None), "rope_parameters", None)
        if isinstance(rope, dict) and "llama_4_scaling_beta" in rope:
            return rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"]
    return None


def hidden_size(model) -> int:
    """The width of the model's hidden states: from its ``args``, its language
    model's (mlx-lm's vision-language wrappers: Gemma 3, Mistral 3, ...), or the
    width of its decoder layers' input norm."""
    for owner in (model, getattr(model, "language_model", None)):
        args = getattr(owner, "args", None)
        for name in ("hidden_size", "d_model", "n_embd", "dim", "model_dim"):
            if isinstance(getattr(args, name, None), int):
                return int(getattr(args, name))
    norm = getattr(model.layers[0], "input_layernorm", None) if model.layers else None
    if getattr(norm, "weight", None) is not None and norm.weight.ndim == 1:
        return int(norm.weight.shape[0])
    raise ValueError(
        f"Cannot tell the hidden size of {type(model).__module__}: its args have no "
        "hidden_size and its layers no input_layernorm."
    )


def vocab_size(model) -> int:
    """The model's vocabulary: from its ``args``, its ``text_config`` or its language
    model's (vision-language wrappers: Gemma 3n's args hold only the text config), or
    the rows of its input embedding."""
    for owner in (model, getattr(model, "language_model", None)):
        args = getattr(owner, "args", None)
        if isinstance(getattr(args, "vocab_size", None), int):
            return int(args.vocab_size)
        text = getattr(args, "text_config", None)
        if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
            return int(text["vocab_size"])
    return int(embedding_of(model).weight.shape[0])

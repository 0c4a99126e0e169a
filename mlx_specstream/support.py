"""Which mlx-lm models the tree verifier takes, and why not: each refusal names what the
model does that a tree of drafts cannot go through (:func:`check_supported`), and says
where chains of drafts still run on it through the model's own passes
(:class:`TreeUnsupported`, :func:`tree_on_chains_refusal`).
"""

from typing import Optional

import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache

from .cache import kv_lists, window_of
from .config import SpecStreamConfig, VerifierConfig
from .model_parts import (
    attention_mask_apart,
    attention_of,
    cache_slots,
    kv_sources,
    layer_params,
    llama4_scale_settings,
    model_args,
    no_positions,
    position_embedding,
    rope_of,
)


class TreeUnsupported(ValueError):
    """The tree verifier cannot take the model, but its own passes over a chain of
    tokens decode as it does, one token at a time: prompt lookup and draft models
    run on it, verified as chains (:func:`mlx_specstream.recurrent.chain_generate_step`),
    as mlx-lm's draft-model decoding runs."""


CHAIN_NOTE = (
    " Prompt lookup (draft='ngram') and draft models run on it, their drafts verified "
    "as chains through the model's own passes."
)


def check_chains(model: nn.Module) -> None:
    """Raises ``ValueError`` when the model's own pass over several tokens does not
    decode as it does one token at a time, or cannot be run here, so that no drafts
    can be verified on it at all."""
    model_type = getattr(getattr(model, "args", None), "model_type", type(model).__module__)
    if type(model).__module__.endswith(".muse_spark"):
        raise ValueError(
            f"Model type '{model_type}': its attention rotates queries and keys in a fused "
            "Metal kernel from the cache's offset (qk_norm_rope), not through its RoPE "
            "module, so a tree's positions cannot reach it, and chains of it cannot be "
            "tested off Apple silicon; it is not supported."
        )
    if type(model).__module__.endswith(".phi3small"):
        raise ValueError(
            f"Model type '{model_type}': mlx-lm's block-sparse attention adds its boolean "
            "causal mask to the scores (mlx-lm 0.32.2), so a pass over several tokens does "
            "not give one-token decoding's logits; no speculation can equal its decoding."
        )
    layers = getattr(model, "layers", None) or []
    if type(model).__module__.endswith(".plamo3") and not all(layer.full_attn for layer in layers):
        raise ValueError(
            f"Model type '{model_type}': over several tokens its sliding-window layers mask a "
            "window of window_size + 1 keys, one token at a time its rotating cache holds "
            "window_size (mlx-lm 0.32.2), so a pass over several tokens does not give "
            "one-token decoding's logits; no speculation can equal its decoding."
        )
    linear = [
        i
        for i, layer in enumerate(layers)
        if type(getattr(layer, "self_attn", None)).__name__ == "LinearSubblockReplacement"
    ]
    if linear:
        raise ValueError(
            f"Model type '{model_type}': layers {linear} replace their attention by a linear "
            "map (Nemotron-NAS's replace_with_linear), which never writes the KVCache the "
            "model hands it, so that cache does not count the tokens as the others do; "
            "it is not supported (layers without attention, no_op, are)."
        )
    for layer in layers:
        if type(rope_of(layer)).__name__ == "DynamicNTKScalingRoPE":
            raise ValueError(
                f"Model type '{model_type}' uses dynamic NTK RoPE scaling, which cannot take "
                "per-token positions."
            )


def on_chains(model: nn.Module, config, made: list) -> bool:
    """Whether lossless-mode streams on a model with recurrent layers can draft for
    chains (:mod:`mlx_specstream.recurrent`): every stream layer keeps a ``KVCache``
    of its own (:func:`attending_top_layers`), so the stream rows run through
    attention layers only, over the main rows' keys; the lower layers' passes are the
    model's own.

    Example: Qwen3-Next with full attention every 4th layer and 48 layers takes one
    stream layer (layer 47 attends; layer 46 is a Gated DeltaNet), not two.
    """
    if isinstance(config, VerifierConfig) or getattr(config, "mode", None) != "lossless":
        return False
    return config.num_stream_layers <= attending_top_layers(model, made)


def attending_top_layers(model: nn.Module, made: Optional[list] = None) -> int:
    """How many of the model's top layers in a row keep a ``KVCache`` of their own
    (``made``: its caches, made here when not given): the most stream layers a model
    with recurrent layers takes (:func:`on_chains`).

    Example: Qwen3-Next with full attention every 4th layer gives 1 (its top layer
    attends, the one below keeps a recurrent state); a Llama gives all its layers.
    """
    from mlx_lm.models.cache import KVCache

    if made is None:
        made = model.make_cache() if hasattr(model, "make_cache") else None
    if made is None:
        return len(model.layers)
    slots, n = cache_slots(model), 0
    for i in reversed(range(len(model.layers))):
        if slots[i] is None or slots[i] >= len(made) or type(made[slots[i]]) is not KVCache:
            break
        n += 1
    return n


def check_supported(model: nn.Module, config: SpecStreamConfig):
    """Raises ``ValueError`` saying why ``model`` cannot run Speculative Streaming
    (:class:`TreeUnsupported` where chains of drafts still run on it)."""
    from mlx_lm.models.cache import ChunkedKVCache, KVCache

    check_chains(model)
    model_type = getattr(getattr(model, "args", None), "model_type", type(model).__module__)
    layers = getattr(model, "layers", None)
    if not layers:
        raise ValueError(f"Model type '{model_type}' exposes no decoder layers (model.layers).")
    if config.num_stream_layers > len(layers):
        raise ValueError(
            f"speculative_streaming.num_stream_layers={config.num_stream_layers} exceeds "
            f"the model's {len(layers)} layers."
        )
    made = model.make_cache() if hasattr(model, "make_cache") else None
    chained = made is not None and on_chains(model, config, made)
    if made is not None:
        # (sliding-window layers keep their tokens in caches of ours: cache.model_caches)
        kinds = {
            type(c).__name__
            for c in made
            if type(c) not in (KVCache, ChunkedKVCache) and window_of(c) is None and not kv_lists(c)
        }
        if kinds and not chained:
            raise TreeUnsupported(
                f"Model type '{model_type}' uses {sorted(kinds)} caches; Speculative Streaming "
                "needs a plain KVCache in every layer to roll back rejected drafts of a tree "
                "(recurrent and hybrid caches cannot be rolled back)."
                + CHAIN_NOTE
                + " Lossless-mode streams run on it, verified as chains, where every stream "
                "layer keeps a KVCache (num_stream_layers within its top attention layers)."
            )
    slots = cache_slots(model)
    for i, c in enumerate(made or []):
        at = slots.index(i) if i in slots else i  # (the first layer that reads cache i)
        attn = attention_of(layers[at]) if at < len(layers) else None
        if kv_lists(c) and getattr(attn, "indexer", None) is None:
            raise TreeUnsupported(
                f"Model type '{model_type}': layer {i} keeps several key caches (a "
                "CacheList) for attention other than DeepSeek V3.2's sparse one (MiniMax "
                "M3's block-sparse attention places its queries by cache slot, which a "
                "tree's rows do not follow; LongCat-Flash runs two attentions per layer); "
                "the tree verifier does not take it." + CHAIN_NOTE
            )
    sources = kv_sources(model)
    owners = [i for i, s in enumerate(sources) if s == i]
    no_attention = [i for i, c in enumerate(slots) if c is None]
    if made is not None and owners != list(range(len(made))) and not no_attention:
        raise TreeUnsupported(
            f"Model type '{model_type}' makes {len(made)} caches for its {len(layers)} "
            + (
                f"layers, of which {len(owners)} keep keys and values of their own: "
                if owners != list(range(len(layers)))
                else "layers: "
            )
            + "the verifier "
            "needs a cache for each of the first layers and the others reading an earlier "
            "layer's (as Gemma 4's KV-sharing layers, previous_kvs)." + CHAIN_NOTE
        )
    if not isinstance(config, VerifierConfig) and getattr(model_args(model), "use_cla", False):
        raise ValueError(
            f"Model type '{model_type}': its odd layers read the key and value projections "
            "of the layer below (cross-layer attention, use_cla), which stream rows do not "
            "have there; streams and drafters need each layer's own. Prompt lookup "
            "(draft='ngram') and draft models run on it."
        )
    if not isinstance(config, VerifierConfig) and getattr(
        model_args(model), "attn_res_block_size", None
    ):
        raise ValueError(
            f"Model type '{model_type}': its layers mix in earlier blocks' states, one per "
            "token (Kimi K3's attention residuals), which stream rows do not have; streams "
            "are not supported. Prompt lookup (draft='ngram') and draft models run on it."
        )
    if not isinstance(config, VerifierConfig) and any("altup" in layer for layer in layers):
        raise ValueError(
            f"Model type '{model_type}': its layers pass several hidden states per token, "
            "stacked (Gemma 3n's AltUp); streams and drafters need one. Prompt lookup "
            "(draft='ngram') and draft models run on it."
        )
    first_top = len(layers) - config.num_stream_layers
    if getattr(config, "mode", None) == "shared" and any(
        s < first_top <= i for i, s in enumerate(sources)
    ):
        raise ValueError(
            f"Model type '{model_type}': shared-mode streams need the stream layers' keys "
            "and values of their own, and its stream layers read a lower layer's (KV-sharing "
            "layers): use lossless mode."
        )
    for i, layer in enumerate(layers):
        if chained and i < first_top:
            continue  # (lower layers of a chain pass run as the model's own: no tree ops)
        why = _layer_refusal(model, i, layer, slots)
        if why is not None:
            raise TreeUnsupported(f"Model type '{model_type}': {why}" + CHAIN_NOTE)


def _layer_refusal(model: nn.Module, i: int, layer, slots: list) -> Optional[str]:
    """Why the tree verifier cannot take decoder layer ``i`` (``None``: it can): the
    tree's masks go in through the layer's call, its positions through a RoPE module."""
    takes = layer_params(layer)
    plain = len(takes) >= 3 and "mask" in takes[1] and takes[2] == "cache"
    plain = plain or attention_mask_apart(layer)
    if not plain and not _scaled_attention(model, layer):
        return (
            f"layer {i} ({type(layer).__name__}) takes ({', '.join(takes)}); the tree's "
            "masks go to decoder layers called as layer(x, mask, cache), or "
            "layer(x, attn_scale, mask, cache) as Ministral 3's."
        )
    rope = rope_of(layer)
    if rope is None and (no_positions(layer) or position_embedding(model) is not None):
        return None  # (positions from the model's inputs: position_embedding)
    if slots[i] is None or rope is not None:
        return None  # (RoPE, or no attention: Nemotron-NAS's no_op layers)
    return (
        f"layer {i} has no attention with a RoPE module; tree positions need rotary "
        "embeddings applied inside attention."
    )


def tree_on_chains_refusal(model: nn.Module) -> Optional[str]:
    """Why lossless streams on a model with recurrent layers (:func:`on_chains`)
    cannot draft trees (``None``: they can). A tree pass runs each recurrent layer
    as the model's own call, its mixers reading the tree along its paths
    (:mod:`mlx_specstream.recurrent`), and every other layer through the tree
    verifier's masks and positions, which each must take (:func:`_layer_refusal`).

    Example: Qwen3-Next (Gated DeltaNet layers, and attention with RoPE) gives
    ``None``, and so does Falcon-H1, whose layers run a Mamba mixer beside the
    attention and take the attention's mask apart; Baichuan-M1, whose attention keeps
    convolution states beside its keys (a ``CacheList`` its call mixes), gives the
    reason.
    """
    made, slots = model.make_cache(), cache_slots(model)
    if max((c for c in slots if c is not None), default=-1) >= len(made):
        return (
            f"its {len(made)} caches are not one per layer, nor one per layer that attends "
            "(cache_slots), so which layers are recurrent is not known"
        )
    for i, layer in enumerate(model.layers):
        c = None if slots[i] is None else made[slots[i]]
        if isinstance(c, ArraysCache):
            continue  # (a recurrent layer: its own call)
        members = getattr(c, "caches", None) or ()
        if any(isinstance(k, ArraysCache) for k in members) and not attention_mask_apart(layer):
            return (
                f"layer {i} keeps a recurrent state beside an attention's keys (a "
                "CacheList): its call mixes both, so its attention cannot take the tree's "
                "masks apart from its mixer"
            )
        why = _layer_refusal(model, i, layer, slots)
        if why is not None:
            return why
    return None


def _scaled_attention(model, layer) -> bool:
    """Whether a decoder layer is called as ``layer(x, attn_scale, mask, cache)`` with
    Llama 4's attention scale (:func:`llama4_scale_settings`)."""
    return llama4_scale_settings(model, layer) is not None

"""DFlash drafters (block diffusion; Chen et al., arXiv 2602.06036) through the tree
verifier.

A DFlash drafter is a few decoder layers of Qwen3's shape, whatever the base, that
draft a whole block in one pass. Its context is the base's states at several of its
layers (``target_layer_ids``: layer ``t``'s output, the input of layer ``t + 1``),
fused once per token; the block is the last token the base chose followed by
``[MASK]`` tokens, embedded by the base::

    c = hidden_norm(fc([f_1; ...; f_m]))         # one context row per token fed
    x = embed([bonus, MASK, ..., MASK]) * s      # the block, at the next positions
    for each layer:                              # queries from the block only
        a = x + attn(q = input_norm(x), k, v = [c; input_norm(x)])
        x = a + mlp(post_attention_norm(a))
    logits = lm_head(norm(x[1:])) * m            # the base's head, no final norm

The block's rows see every context row and each other (unless a layer is causal or
slides), so mask row ``j`` drafts level ``j`` and **one drafter pass drafts every
level**. The context rows' keys and values stay in the drafter's cache (one per
layer); the block's never do. A step drafts ``levels`` masks (the tree's depth, at
most ``block_size - 1``), as vLLM runs a block shorter than the one trained.

Checkpoints read (``load(base, drafter=DIR)``; safetensors only): z-lab's
``DFlashDraftModel`` (``fc``, ``hidden_norm``, ``layers.*``, ``norm``; the settings
under ``dflash_config`` or at the top: ``block_size``, ``mask_token_id``,
``target_layer_ids``). DFlash-2's drafters (``DFlash2DraftModel``: convolutions and a
candidate selector) are refused by name.

Example:
    >>> model, tok = load("mlx-community/Qwen3-8B-4bit", drafter="z-lab/Qwen3-8B-DFlash-b16")
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3
from mlx_lm.models.cache import KVCache

from .cache import KVCacheList
from .config import DFLASH_KEYS, DrafterConfig
from .draft_vocab import head_rows
from .drafters import (
    DrafterState,
    attach_checkpoint_drafter,
    checkpoint_files,
    continue_or_start,
    new_rows,
    refuse_attached,
)
from .model_parts import hidden_size, vocab_size
from .mtp import _lm_head

# A chain of 3 by default (as for EAGLE-3); deeper where a tuning or a call asks.
DFLASH_DEFAULTS = dict(tree_depth=3, top_k=1, max_tree_nodes=4)


def is_dflash_checkpoint(path: Path) -> bool:
    """Whether ``path/config.json`` describes a DFlash drafter (either version)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    config = json.loads(file.read_text())
    return any("DFlash" in name for name in config.get("architectures") or [])


def block_mask(block: int, context: int, causal: bool, window: Optional[int]):
    """Which keys a block's rows see: ``context`` rows, then the block's ``block``
    rows, at positions ``0 .. context + block - 1`` (row ``i``: ``context + i``).
    ``None`` where every row sees every key (DFlash's full-attention layers).

    A causal layer hides the block's later rows; a sliding one keys further than
    ``window`` positions away (both ways unless causal), as DFlash's own mask does.

    Example: ``block_mask(3, 2, causal=True, window=3)``::

        keys:  c0 c1 b0 b1 b2
        b0      1  1  1  0  0
        b1      0  1  1  1  0
        b2      0  0  1  1  1

    Returns:
        mx.array, optional: ``(block, context + block)`` booleans.
    """
    if not causal and window is None:
        return None
    return ragged_block_mask(mx.array([context]), context, block, causal, window)[0, 0]


def ragged_block_mask(ends: mx.array, width: int, block: int, causal: bool, window):
    """Which keys each row's block sees in a batch (:class:`~mlx_specstream.batch_drafters.
    DFlashRows`): ``width`` context columns (row ``b``'s first ``ends[b]`` its own context,
    positions ``0 .. ends[b] - 1``; the rest not its own), then its block's ``block`` rows
    at positions ``ends[b] ..``: :func:`block_mask` for each row, its context padded.

    Example: ``ragged_block_mask([2, 1], 3, 2, causal=True, window=None)[:, 0]``::

        keys:    c0 c1 c2 b0 b1
        row 0 b0  1  1  0  1  0
              b1  1  1  0  1  1
        row 1 b0  1  0  0  1  0
              b1  1  0  0  1  1

    Returns:
        mx.array: ``(B, 1, block, width + block)`` booleans.
    """
    ends = mx.array(ends).astype(mx.int32)[:, None]
    query = ends + mx.arange(block)[None]  # (B, block): each block row's position
    key = mx.concatenate([mx.broadcast_to(mx.arange(width)[None], (ends.shape[0], width)),
                          query], axis=1)  # fmt: skip
    own = mx.concatenate([key[:, :width] < ends, mx.ones(query.shape, mx.bool_)], axis=1)
    seen = mx.broadcast_to(own[:, None], (ends.shape[0], block, width + block))
    query, key = query[:, :, None], key[:, None]
    if causal:
        seen = seen & (key <= query)
    if window is not None:
        seen = seen & (query - key < window)
        if not causal:
            seen = seen & (key - query < window)
    return seen[:, None]


def _layer_types(config: dict, n: int) -> List[str]:
    """Each layer's attention, as transformers' Qwen3 config gives it: ``layer_types``,
    else sliding from ``max_window_layers`` on where ``use_sliding_window``."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    sliding = config.get("use_sliding_window") and config.get("sliding_window") is not None
    first = config.get("max_window_layers", 28)
    return ["sliding_attention" if sliding and i >= first else "full_attention" for i in range(n)]


def dflash_settings(path: Path, model: nn.Module) -> dict:
    """The drafter section's ``dflash`` dict (:data:`~mlx_specstream.config.DFLASH_KEYS`)
    read from ``path/config.json``, checked against ``model``, the base.

    Raises:
        ValueError: naming the file and key, for a drafter this module cannot run or
          one made for another base.
    """
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    own = config.get("dflash_config") or {}

    def value(name, default=None):  # (dflash_config's first, as DFlash's own code reads)
        return own.get(name, config.get(name, default))

    def fail(why):
        raise ValueError(f"{file}: {why}")

    names = config.get("architectures") or []
    if any("DFlash2" in name for name in names) or value("selector_rank") is not None:
        fail(f"architectures={names}: DFlash-2 drafters (convolutions, a candidate selector) "
             "are not supported; DFlashDraftModel checkpoints are")  # fmt: skip
    if config.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act={config['hidden_act']!r}: the drafter's layers are Qwen3's (silu)")
    if config.get("attention_bias"):
        fail("attention_bias=true: the drafter's layers are Qwen3's (no biases)")
    N, D, vocab = len(model.layers), hidden_size(model), head_rows(model)
    if config["hidden_size"] != D:
        fail(f"hidden_size={config['hidden_size']}: the base's layers are {D} wide (the "
             "drafter reads the base's embeddings and LM head)")  # fmt: skip
    if config.get("vocab_size", vocab) != vocab:
        fail(f"vocab_size={config['vocab_size']}: the base's logits have {vocab} tokens")
    ids = value("target_layer_ids")
    if not ids or not all(isinstance(i, int) and 0 <= i < N - 1 for i in ids):
        fail(f"target_layer_ids={ids}: layer indices in [0, {N - 2}] (the base has {N} "
             "layers; DFlash reads the last one's output after the final norm, which is "
             "not supported)")  # fmt: skip
    n = config["num_hidden_layers"]
    types = _layer_types(config, n)
    if len(types) != n or not set(types) <= {"full_attention", "sliding_attention"}:
        fail(f"layer_types={types}: {n} of 'full_attention' or 'sliding_attention'")
    window = config.get("sliding_window")
    if "sliding_attention" in types and not isinstance(window, int):
        fail(f"sliding_window={window!r}: its sliding layers need a window")
    mask, block = value("mask_token_id"), value("block_size", 16)
    if not isinstance(mask, int) or not 0 <= mask < vocab_size(model):
        fail(f"mask_token_id={mask!r}: a token of the base's {vocab_size(model)} embeddings")
    if not isinstance(block, int) or block < 2:
        fail(f"block_size={block!r}: an integer >= 2 (the bonus token and its masks)")
    causal = value("is_causal")
    rope = config.get("rope_parameters") or {}
    softcap = value("final_logit_softcapping")
    return {
        "hidden_size": D,
        "num_hidden_layers": n,
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "head_dim": config.get("head_dim") or D // config["num_attention_heads"],
        "intermediate_size": config["intermediate_size"],
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": config.get("rope_theta") or rope.get("rope_theta", 10000.0),
        "rope_scaling": config.get("rope_scaling")
        or ({**rope} if rope.get("rope_type", "default") != "default" else None),
        "max_position_embeddings": config.get("max_position_embeddings", 32768),
        "layer_types": types,
        "sliding_window": window if "sliding_attention" in types else None,
        "is_causal": None if causal is None else bool(causal),
        "block_size": block,
        "mask_token_id": mask,
        "feature_layers": [i + 1 for i in ids],
        "input_embedding_scale": float(value("input_embedding_scale", 1.0)),
        "output_multiplier": float(value("output_multiplier", 1.0)),
        "final_logit_softcapping": None if not softcap else float(softcap),
    }


def read_dflash_weights(path: Path) -> Dict[str, mx.array]:
    """The drafter's tensors, names as stored (``model.`` dropped where a writer added it)."""
    weights = {}
    for file in checkpoint_files(path, "DFlash drafters are read from safetensors."):
        for key, value in mx.load(str(file)).items():
            weights[key[len("model.") :] if key.startswith("model.") else key] = value
    return weights


def layer_args(settings: dict) -> qwen3.ModelArgs:
    """The Qwen3 settings of the drafter's layers."""
    return qwen3.ModelArgs(
        model_type="qwen3",
        vocab_size=1,  # (no embeddings or head of its own)
        tie_word_embeddings=False,
        **{k: settings[k] for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
            "max_position_embeddings",
        )},  # fmt: skip
    )


def context_keys(layer: qwen3.TransformerBlock, context: mx.array, head_dim: int, offset=0):
    """A layer's keys and values ``(B, H_kv, S, head_dim)`` of context rows ``(B, S, D)``
    at positions from ``offset`` (they read no input norm: ``hidden_norm`` came first)."""
    attn = layer.self_attn
    B, S, _ = context.shape
    k = attn.k_proj(context).reshape(B, S, attn.n_kv_heads, head_dim).transpose(0, 2, 1, 3)
    v = attn.v_proj(context).reshape(B, S, attn.n_kv_heads, head_dim).transpose(0, 2, 1, 3)
    return attn.rope(attn.k_norm(k), offset=offset), v


def block_attend(layer, x: mx.array, keys, values, offset, mask, head_dim: int) -> mx.array:
    """One of the drafter's layers (mlx-lm's Qwen3 block, its weights) over blocks ``x``
    ``(B, L, D)`` at positions from ``offset`` (an int, or one per block): queries from
    the block; keys and values of the context (``keys``, ``values``, as
    :func:`context_keys` gives them) then of the block, seen where ``mask`` says."""
    attn = layer.self_attn
    B, L, _ = x.shape

    def heads(y, n):
        return y.reshape(B, L, n, head_dim).transpose(0, 2, 1, 3)

    h = layer.input_layernorm(x)
    q = attn.rope(attn.q_norm(heads(attn.q_proj(h), attn.n_heads)), offset=offset)
    bk = attn.rope(attn.k_norm(heads(attn.k_proj(h), attn.n_kv_heads)), offset=offset)
    keys = mx.concatenate([keys, bk], axis=2)
    values = mx.concatenate([values, heads(attn.v_proj(h), attn.n_kv_heads)], axis=2)
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask=mask)
    a = x + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
    return a + layer.mlp(layer.post_attention_layernorm(a))


def block_layer(layer: qwen3.TransformerBlock, x, context, cache, causal, window, head_dim):
    """:func:`block_attend` over the block ``x`` ``(1, L, D)`` after the new context rows
    ``context`` ``(1, S, D)``, whose keys and values are appended to ``cache``."""
    start = cache.offset
    keys, values = cache.update_and_fetch(*context_keys(layer, context, head_dim, start))
    mask = block_mask(x.shape[1], keys.shape[2], causal, window)  # (every context row so far)
    return block_attend(layer, x, keys, values, start + context.shape[1], mask, head_dim)


class DFlashDrafter(nn.Module):
    """``fc`` ``(D, m D)``, ``hidden_norm``, ``layers.{i}.*`` (Qwen3's blocks) and
    ``norm``; the base's embeddings and LM head."""

    name = "DFlash"
    full_block = False  # (True: every mask of its block, as trained; the levels asked kept)

    def __init__(self, config: DrafterConfig, model: nn.Module):
        super().__init__()
        s = config.dflash
        args = layer_args(s)
        D = args.hidden_size
        if hidden_size(model) != D:
            raise ValueError(f"drafter.dflash.hidden_size={D}: the base's layers are "
                             f"{hidden_size(model)} wide")  # fmt: skip
        self.fc = nn.Linear(len(s["feature_layers"]) * D, D, bias=False)
        self.hidden_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.layers = [qwen3.TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.feature_layers = list(s["feature_layers"])
        sliding = [t == "sliding_attention" for t in s["layer_types"]]
        # (DFlash's rule: a layer is causal where it slides, unless is_causal says)
        self._causal = [bool(w if s["is_causal"] is None else s["is_causal"]) for w in sliding]
        self._windows = [s["sliding_window"] if w else None for w in sliding]
        self._head_dim, self._settings = args.head_dim, s
        self._levels = min(config.num_draft_tokens, s["block_size"] - 1)

    def start(self, prompt_cache_offset: int, previous=None, levels=None) -> DrafterState:
        def caches():
            return KVCacheList(*(KVCache() for _ in self.layers))

        return continue_or_start(prompt_cache_offset, previous, make_cache=caches)

    def context(self, feats: mx.array) -> mx.array:
        """Context rows ``(..., D)`` from the base's feature-layer states ``(..., m D)``."""
        return self.hidden_norm(self.fc(feats.astype(self.fc.weight.dtype)))

    def block(self, rt, token, levels: int) -> mx.array:
        """``(B, levels + 1, D)``: the embeddings of each block, its first token (``token``:
        one, or ``(B,)`` of them) then ``levels`` masks."""
        first = mx.array(token).reshape(-1, 1).astype(mx.int32)
        masks = mx.full((first.shape[0], levels), self._settings["mask_token_id"], mx.int32)
        x = rt.embed(mx.concatenate([first, masks], axis=1))
        return (x * self._settings["input_embedding_scale"]).astype(self.fc.weight.dtype)

    def run(self, x: mx.array, context: mx.array, cache: KVCacheList) -> mx.array:
        """The layers over the block ``x``, the new ``context`` rows appended to each
        layer's cache; the final norm's output ``(1, L, D)``."""
        for i, layer in enumerate(self.layers):
            x = block_layer(layer, x, context, cache[i], self._causal[i], self._windows[i],
                            self._head_dim)  # fmt: skip
        return self.norm(x)

    def level_logits(self, rt, out: mx.array) -> mx.array:
        """``(..., V)`` logits from the final norm's output: the base's LM head without
        its final norm, times ``output_multiplier``, soft-capped where set; under
        ``rt``'s draft vocabulary (``-inf`` outside it)."""
        vocab, s = rt.draft_vocab, self._settings
        logits = _lm_head(rt.model, vocab)(out) * s["output_multiplier"]
        cap = s["final_logit_softcapping"]
        if cap:
            logits = mx.tanh(logits / cap) * cap
        return logits if vocab is None else vocab.widen(logits)

    def draft(self, rt, state, hidden, path, path_tokens, token, levels=None) -> mx.array:
        """``(levels, V)`` logits of the next tree's levels: the accepted path's context
        rows (the prompt's too, on the first step) go into the cache, then one pass over
        the bonus ``token`` and ``levels`` masks."""
        levels = self._levels if levels is None else max(1, min(levels, self._levels))
        masks = self._settings["block_size"] - 1 if self.full_block else levels
        feats, _ = new_rows(state, hidden, path, path_tokens, token)
        out = self.run(self.block(rt, token, masks), self.context(feats)[None], state.cache)
        return self.level_logits(rt, out[0, 1 : levels + 1])


def dflash_config(checkpoint: Path, model: nn.Module, **tree) -> DrafterConfig:
    """The drafter section of ``checkpoint``'s DFlash drafter on ``model``: ``block_size
    - 1`` levels, drafting a chain of 3 unless ``tree`` says otherwise."""
    settings = dflash_settings(checkpoint, model)
    assert sorted(settings) == sorted(DFLASH_KEYS)
    levels = settings["block_size"] - 1
    tree = {**DFLASH_DEFAULTS, "num_draft_tokens": levels, **tree}
    tree["tree_depth"] = min(tree["tree_depth"], levels)
    return DrafterConfig(kind="dflash", dflash=settings, **tree)


def attach_dflash(model: nn.Module, checkpoint: Path, config: Optional[DrafterConfig] = None):
    """Puts ``checkpoint``'s DFlash drafter on ``model`` (an mlx-lm model of its base,
    any quantization; the drafter's weights stay as stored).

    Returns:
        DFlashDrafter: the drafter (also ``model.speculative_streams.drafter``).

    Raises:
        ValueError: naming the checkpoint, where its tensors do not fit.
    """
    refuse_attached(model)
    config = dflash_config(checkpoint, model) if config is None else config
    weights = read_dflash_weights(checkpoint)
    return attach_checkpoint_drafter(model, config, weights, checkpoint, "DFlash")

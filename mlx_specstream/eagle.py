"""EAGLE-3 drafters (Li et al., arXiv 2503.01840) through the tree verifier.

An EAGLE-3 drafter is a decoder layer of its own (Llama's or Qwen3's, whatever the
base; or several) that reads three of the base's layers at once. Row ``i`` pairs the
base's states of token ``i`` at its feature layers (the inputs of layers ``2``,
``N // 2`` and ``N - 3`` by default, as vLLM and SGLang pick them; ``N``: the last
layer's output) with the embedding of token ``i + 1``, on its own KV cache::

    h = fc([f_low; f_mid; f_high])               # (3 D_base) -> D
    a = h + attn([input_norm(e); hidden_norm(h)])  # q, k, v read 2 D
    o = a + mlp(post_attention_norm(a))
    o = block(o) for each further layer          # (a drafter of several layers)
    logits = lm_head(norm(o))                    # over its draft vocabulary
    token = draft_id + d2t[draft_id]             # the base's token of a draft id

``norm_before_residual`` (a speculators-format setting) adds ``hidden_norm(h)``
instead of ``h``. The accepted path's rows go into the cache; the last one (the last
accepted node and the bonus token) gives draft level 1. Each deeper level runs the
layers again on their own output ``o`` (not through ``fc``) and the previous level's
argmax, as EAGLE-3 was trained ("training-time test"), rows trimmed after.

The speculators' later settings (its ``Eagle3SpeculatorConfig``) are read too:
``num_hidden_layers`` layers, the first as above and each further one a plain decoder
layer of the same kind over the one before, each with its own KV cache (vLLM's
``llama_eagle3.py`` runs them so); Qwen3's layer (``model_type: "qwen3"``, its default:
RMS norms of the heads' queries and keys); any number of feature layers; a norm of the
features before ``fc`` (``norm_before_fc``: one over them all, ``input_norm``; or
``fc_norm``: one per feature layer); and ``norm_output`` ("EAGLE 3.1"): the final
norm's output is what deeper levels read and what ``lm_head`` ranks.

Checkpoints read (``load(base, drafter=DIR)``; safetensors only):

* EAGLE's own (``LlamaForCausalLMEagle3``: yuhuili/EAGLE3-*, lmsys, AngelSlim;
  SpecForge's ``Qwen3ForCausalLMEagle3``): ``midlayer.*``, ``fc``, ``norm``,
  ``lm_head``, ``d2t`` (``t2d`` is unused);
* the speculators format (``Eagle3Speculator``, RedHatAI's ``*.eagle3``): the same
  with ``layers.{i}.*``, the layers' settings under ``transformer_layer_config``,
  ``eagle_aux_hidden_state_layer_ids``, ``norm_before_residual`` and the norms above.

Both may carry ``embed_tokens``; without it the base's embeddings are used. Refused by
name: window layers (``layer_types``), drafters without ``fc`` (vLLM's
``use_aux_hidden_state: false``), a layer activation other than SiLU.

Example:
    >>> model, tok = load("mlx-community/Llama-3.1-8B-Instruct-4bit",
    ...                   drafter="yuhuili/EAGLE3-LLaMA3.1-Instruct-8B")
"""

import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen3
from mlx_lm.models.cache import KVCache

from .cache import KVCacheList
from .config import EAGLE_KEYS, EAGLE_LAYER_TYPES, DrafterConfig
from .draft_vocab import head_rows, widened
from .drafters import (
    DrafterState,
    attach_checkpoint_drafter,
    checkpoint_files,
    continue_or_start,
    layer_mask,
    levels_again,
    new_rows,
    refuse_attached,
    run_layer,
)
from .dynamic_tree import grown_candidates
from .model_parts import hidden_size

# What a drafter checkpoint saved by PyTorch needs before it is read here.
PICKLE_HINT = (
    "A PyTorch checkpoint (pytorch_model.bin, as EAGLE's own are) converts with: "
    "python -m convert.eagle3 --src DIR_OR_HUB_REPO --out DIR"
)
# A chain of 3 by default (as for a checkpoint's MTP layer); up to 5 levels where a tree asks.
EAGLE_DEFAULTS = dict(num_draft_tokens=5, tree_depth=3, top_k=1, max_tree_nodes=4)


def is_eagle_checkpoint(path: Path) -> bool:
    """Whether ``path/config.json`` describes an EAGLE-3 drafter."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    config = json.loads(file.read_text())
    names = " ".join(config.get("architectures") or [])
    return "Eagle3" in names or config.get("speculators_model_type") == "eagle3"


def default_layers(num_layers: int) -> List[int]:
    """EAGLE-3's feature layers for a base of ``num_layers``: the inputs of layers ``2``,
    ``N // 2`` and ``N - 3`` (as vLLM and SGLang pick them), kept inside ``[0, N]`` on a
    base of under 3 layers."""
    return [min(2, num_layers), num_layers // 2, max(num_layers - 3, 0)]


def eagle_settings(path: Path, model: nn.Module, own_embeddings: bool) -> dict:
    """The drafter section's ``eagle`` dict (:data:`~mlx_specstream.config.EAGLE_KEYS`)
    read from ``path/config.json``, checked against ``model``, the base
    (``own_embeddings``: whether its tensors hold ``embed_tokens``).

    Raises:
        ValueError: naming the file and key, for a layer this module cannot build or
          a drafter made for another base.
    """
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    nested = config.get("transformer_layer_config")
    layer = {**config, **(nested or {})}

    def fail(why):
        raise ValueError(f"{file}: {why}")

    layer_type = eagle_layer_type(config)
    if layer_type not in EAGLE_LAYER_TYPES:
        key = "transformer_layer_config.model_type" if nested is not None else "architectures"
        fail(f"{key}: a {layer_type!r} layer; EAGLE-3 layers are {EAGLE_LAYER_TYPES}'s")
    num_layers = layer.get("num_hidden_layers", 1)
    if not isinstance(num_layers, int) or num_layers < 1:
        fail(f"num_hidden_layers={num_layers!r}: an EAGLE-3 drafter has one layer or more")
    if layer.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act={layer['hidden_act']!r}: the drafter's layers are SiLU's")
    windows = [t for t in layer.get("layer_types") or [] if t != "full_attention"]
    if windows:
        fail(f"layer_types={layer['layer_types']}: drafter layers of {windows[0]!r} (only "
             f"layers attending to every key are built)")  # fmt: skip
    eagle = config.get("eagle_config") or {}
    if eagle.get("use_aux_hidden_state", True) is False:
        fail("eagle_config.use_aux_hidden_state=false: a drafter without fc over the base's "
             "feature layers")  # fmt: skip
    if layer.get("partial_rotary_factor", 1.0) != 1.0:
        fail(f"partial_rotary_factor={layer['partial_rotary_factor']}: RoPE over part of each "
             f"head (only whole heads are rotated here)")  # fmt: skip
    if layer_type == "qwen3" and layer.get("mlp_bias"):
        fail("mlp_bias=true: Qwen3's MLP has no biases")
    if config.get("norm_before_fc") and config.get("fc_norm"):
        fail("norm_before_fc and fc_norm: one norm of the features or the other")
    N, D = len(model.layers), hidden_size(model)
    vocab = head_rows(model)
    if layer.get("vocab_size", vocab) != vocab:
        fail(f"vocab_size={layer['vocab_size']}: the base's logits have {vocab} tokens")
    target = config.get("target_hidden_size") or layer.get("target_hidden_size") or D
    if target != D:
        fail(f"target_hidden_size={target}: the base's layers are {D} wide")
    ids = config.get("eagle_aux_hidden_state_layer_ids") or eagle.get(
        "eagle_aux_hidden_state_layer_ids"
    )
    ids = list(ids) if ids else default_layers(N)
    if not ids or not all(isinstance(i, int) and 0 <= i <= N for i in ids):
        fail(
            f"eagle_aux_hidden_state_layer_ids={ids}: layer indices in [0, {N}] "
            f"(the base has {N} layers)"
        )
    settings = {
        "hidden_size": layer["hidden_size"],
        "num_attention_heads": layer["num_attention_heads"],
        "num_key_value_heads": layer.get("num_key_value_heads") or layer["num_attention_heads"],
        "head_dim": layer.get("head_dim"),
        "intermediate_size": layer["intermediate_size"],
        "rms_norm_eps": layer.get("rms_norm_eps", 1e-6),
        "rope_theta": layer.get("rope_theta", 10000.0),
        "rope_scaling": layer.get("rope_scaling"),
        "max_position_embeddings": layer.get("max_position_embeddings"),
        "attention_bias": bool(layer.get("attention_bias", False)),
        "mlp_bias": bool(layer.get("mlp_bias", False)),
        "draft_vocab_size": config.get("draft_vocab_size")
        or layer.get("draft_vocab_size")
        or vocab,
        "target_hidden_size": target,
        "norm_before_residual": bool(config.get("norm_before_residual", False)),
        "feature_layers": ids,
        "own_embeddings": own_embeddings,
        "num_layers": num_layers,
        "layer_type": layer_type,
        "norm_before_fc": bool(config.get("norm_before_fc", False)),
        "fc_norm": bool(config.get("fc_norm", False)),
        "norm_output": bool(config.get("norm_output", False)),
    }
    return settings


def eagle_layer_type(config: dict) -> str:
    """The kind of decoder layer an EAGLE-3 checkpoint's ``config`` describes: the
    speculators' ``transformer_layer_config.model_type`` (Qwen3's where it names none, as
    its config class defaults), else its architecture's (``Qwen3ForCausalLMEagle3``:
    Qwen3's; EAGLE's own ``LlamaForCausalLMEagle3``: Llama's, whatever the base)."""
    nested = config.get("transformer_layer_config")
    if nested is not None:
        return nested.get("model_type", "qwen3")
    names = " ".join(config.get("architectures") or [])
    return "qwen3" if "Qwen3" in names else "llama"


def read_eagle_weights(path: Path) -> Dict[str, mx.array]:
    """The drafter's tensors under this module's names: ``midlayer.`` and ``layers.0.``
    become ``layer.``, ``layers.{i}.`` (``i > 0``) ``upper.{i - 1}.``, vLLM's ``model.``
    prefix is dropped; ``t2d`` (the inverse map) is dropped. EAGLE-1's checkpoints
    (:mod:`mlx_specstream.eagle1`) are read so too."""
    weights = {}
    for file in checkpoint_files(path, PICKLE_HINT):
        for key, value in mx.load(str(file)).items():
            if key == "t2d":
                continue
            key = key[len("model.") :] if key.startswith("model.") else key
            key = "layer." + key[len("midlayer.") :] if key.startswith("midlayer.") else key
            key = _LAYER.sub(lambda m: "layer." if m[1] == "0" else f"upper.{int(m[1]) - 1}.", key)
            weights[key] = value.astype(mx.int32) if key == "d2t" else value
    return weights


_LAYER = re.compile(r"^layers\.(\d+)\.")  # (a checkpoint's layer i)


class Eagle3Layer(nn.Module):
    """EAGLE-3's first decoder layer: Llama's or Qwen3's (``args.model_type``), its
    attention reading ``[e; h]`` (``2 D``)."""

    def __init__(self, args, norm_before_residual: bool = False, bias: bool = False):
        super().__init__()
        D = args.hidden_size
        self.self_attn = attention(args, 2 * D, bias)
        self.mlp = (
            llama.MLP(args) if args.model_type == "llama" else qwen3.MLP(D, args.intermediate_size)
        )
        self.input_layernorm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.hidden_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self._norm_first = norm_before_residual

    def __call__(self, emb: mx.array, hidden: mx.array, cache, at=None) -> mx.array:
        """The layer's output (before the final norm) over rows ``(B, L, D)``, causal
        over ``cache``; ``at``: ``(position, mask)``, the rows of one level of a dynamic
        tree instead (:func:`attend_at`)."""
        h = self.hidden_norm(hidden)
        x = mx.concatenate([self.input_layernorm(emb), h], axis=-1)
        if at is None:
            attended = self.self_attn(x, layer_mask(x, cache), cache)
        else:
            attended = attend_at(self.self_attn, x, cache, *at)
        a = (h if self._norm_first else hidden) + attended
        return a + self.mlp(self.post_attention_layernorm(a))


def attention(args, width: int, bias: bool) -> nn.Module:
    """mlx-lm's attention of the drafter's layer type (``args.model_type``), its
    queries, keys and values read from ``width`` columns, every projection with a bias
    where ``bias`` (Qwen3's module has none of its own)."""
    module = llama if args.model_type == "llama" else qwen3
    attn = module.Attention(args)
    hd = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    for name, heads in (("q_proj", attn.n_heads), ("k_proj", attn.n_kv_heads),
                        ("v_proj", attn.n_kv_heads)):  # fmt: skip
        setattr(attn, name, nn.Linear(width, heads * hd, bias=bias))
    if bias and module is qwen3:
        attn.o_proj = nn.Linear(attn.n_heads * hd, args.hidden_size, bias=True)
    return attn


def decoder_block(args, bias: bool) -> nn.Module:
    """A layer of a drafter of several after its first: mlx-lm's decoder block of the
    layer type, over the layer before's output."""
    if args.model_type == "llama":
        return llama.TransformerBlock(args)
    block = qwen3.TransformerBlock(args)
    if bias:  # (mlx-lm's Qwen3 attention has no biases)
        block.self_attn = attention(args, args.hidden_size, bias)
    return block


def attend_at(attn: nn.Module, x: mx.array, cache, position: int, mask: mx.array):
    """mlx-lm's Llama (or Qwen3) attention (its weights, its RoPE, Qwen3's norms of the
    queries' and keys' heads) over rows ``x`` ``(1, L, C)`` all at one ``position`` (a
    dynamic tree's level: siblings share it), seeing the keys of ``cache`` and of the
    rows (appended to it) where ``mask`` ``(L, S)`` says."""
    L = x.shape[1]

    def heads(proj, n, norm=None):  # (L, n, 1, hd): a row per batch entry, each at `position`
        y = proj(x).reshape(L, 1, n, -1)
        return (y if norm is None else norm(y)).transpose(0, 2, 1, 3)

    q = heads(attn.q_proj, attn.n_heads, getattr(attn, "q_norm", None))
    k = heads(attn.k_proj, attn.n_kv_heads, getattr(attn, "k_norm", None))
    q = attn.rope(q, offset=position).transpose(2, 1, 0, 3)
    k = attn.rope(k, offset=position).transpose(2, 1, 0, 3)
    keys, values = cache.update_and_fetch(
        k, heads(attn.v_proj, attn.n_kv_heads).transpose(2, 1, 0, 3)
    )
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(1, L, -1))


def block_at(layer: nn.Module, x: mx.array, cache, at) -> mx.array:
    """mlx-lm's decoder block (Llama's, Qwen3's) over rows ``x`` ``(1, L, D)`` at ``at`` =
    ``(position, mask)`` (:func:`attend_at`), its weights and its order."""
    h = x + attend_at(layer.self_attn, layer.input_layernorm(x), cache, *at)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def layer_args(eagle: dict):
    """The mlx-lm ``ModelArgs`` of the drafter's layers: Llama's, or Qwen3's."""
    common = {k: eagle[k] for k in (
        "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
    )}  # fmt: skip
    common.update(num_hidden_layers=1, vocab_size=eagle["draft_vocab_size"])
    if eagle["layer_type"] == "qwen3":
        hd = eagle["head_dim"] or eagle["hidden_size"] // eagle["num_attention_heads"]
        return qwen3.ModelArgs(model_type="qwen3", head_dim=hd, tie_word_embeddings=False,
                               **common)  # fmt: skip
    return llama.ModelArgs(model_type="llama", head_dim=eagle["head_dim"],
                           attention_bias=eagle["attention_bias"], mlp_bias=eagle["mlp_bias"],
                           **common)  # fmt: skip


class EagleDrafting(nn.Module):
    """What EAGLE's drafters (EAGLE-3's, EAGLE-1's) share: a layer of their own on a KV
    cache that the accepted path's rows stay in, run again on its own output for each
    deeper level (``step``, ``again``, ``level_logits``), or over a dynamic tree's nodes
    (``rows_at``, ``tree_logits``, ``tree_ids``)."""

    grows_by_default = True  # (dynamic trees wherever the tree is wider than a chain)

    def growth_refusal(self) -> Optional[str]:
        """Why this drafter cannot grow dynamic trees (``None``: it always can)."""
        return None

    def start(self, prompt_cache_offset: int, previous=None, levels=None) -> DrafterState:
        return continue_or_start(prompt_cache_offset, previous, self.layer)

    def embed(self, rt, tokens: mx.array) -> mx.array:
        """Token embeddings: the drafter's own, else the base's."""
        return self.embed_tokens(tokens) if "embed_tokens" in self else rt.embed(tokens)

    drafts_level_by_level = True  # (a chain may stop early: draft_confidence)

    def draft(self, rt, state, hidden, path, path_tokens, token, levels=None,
              confidence=None) -> mx.array:  # fmt: skip
        """``(levels, V)`` logits of the next tree's levels from the accepted path: the
        new rows, then the layer again on its own output for each deeper level (those
        rows trimmed after); fewer where a ``confidence`` stops the chain
        (:func:`~mlx_specstream.drafters.levels_again`)."""
        levels = self._levels if levels is None else min(levels, self._levels)
        feats, nxt = new_rows(state, hidden, path, path_tokens, token)
        out = self.step(rt, feats, mx.array(nxt), state.cache)[-1:]
        logits = [self.level_logits(rt, out)]
        ran = levels_again(rt, self, logits, out, state.cache, levels - 1, confidence)
        state.cache.trim(ran)  # (the recursion's rows never stay)
        return mx.concatenate(logits, axis=0)

    def context_out(self, rt, state, hidden, path, path_tokens, token) -> mx.array:
        """``(1, D)``: the layer's output that drafts level 1, after the accepted path's
        new rows are appended to the cache (a dynamic tree's first level)."""
        feats, nxt = new_rows(state, hidden, path, path_tokens, token)
        return self.step(rt, feats, mx.array(nxt), state.cache)[-1:]

    def draft_tree(self, rt, state, hidden, path, path_tokens, token, k: int, depth: int,
                   drawn=None):  # fmt: skip
        """The candidates of the next dynamic tree, ``k`` wide and ``depth`` levels deep,
        or of a drawn one (:func:`~mlx_specstream.dynamic_tree.grown_candidates`)."""
        return grown_candidates(self, rt, state, hidden, path, path_tokens, token, k, depth,
                                drawn)  # fmt: skip


class Eagle3Drafter(EagleDrafting):
    """``fc`` ``(D, m D_base)``, ``layer.*`` (and ``upper.{i}.*``, its further layers),
    ``norm``, ``lm_head`` ``(V_draft, D)``, ``d2t`` ``(V_draft,)`` (and ``embed_tokens``
    where the checkpoint has its own; ``input_norm`` or ``fc_norm.{j}`` where its features
    are normed before ``fc``)."""

    own_draft_vocab = True  # (its head ranks its d2t's tokens: no other draft vocabulary)

    def __init__(self, config: DrafterConfig, model: nn.Module):
        super().__init__()
        eagle = config.eagle
        args = layer_args(eagle)
        D, V, T = args.hidden_size, eagle["draft_vocab_size"], eagle["target_hidden_size"]
        m, eps = len(eagle["feature_layers"]), args.rms_norm_eps
        base_vocab = head_rows(model)  # (the width of the base's logits)
        if eagle["own_embeddings"]:
            self.embed_tokens = nn.Embedding(base_vocab, D)
        elif hidden_size(model) != D:
            raise ValueError(
                f"drafter.eagle.hidden_size={D}: the base's embeddings are "
                f"{hidden_size(model)} wide and the drafter has none of its own"
            )
        if eagle["norm_before_fc"]:
            self.input_norm = nn.RMSNorm(m * T, eps=eps)
        if eagle["fc_norm"]:
            self.fc_norm = [nn.RMSNorm(T, eps=eps) for _ in range(m)]
        self.fc = nn.Linear(m * T, D, bias=False)
        bias = eagle["attention_bias"]
        self.layer = Eagle3Layer(args, eagle["norm_before_residual"], bias)
        self.upper = [decoder_block(args, bias) for _ in range(eagle["num_layers"] - 1)]
        self.norm = nn.RMSNorm(D, eps=eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.d2t = mx.zeros((V,), dtype=mx.int32)
        self.feature_layers = list(eagle["feature_layers"])
        self._vocab, self._levels = base_vocab, config.num_draft_tokens
        self._norm_output = eagle["norm_output"]
        self._targets = None  # (d2t it was made from, the base's ids of the draft ids)

    def new_cache(self):
        """An empty KV cache of the drafter's layers: one ``KVCache``, or a
        :class:`~mlx_specstream.cache.KVCacheList` of one per layer."""
        if not self.upper:
            return KVCache()
        return KVCacheList(*(KVCache() for _ in range(1 + len(self.upper))))

    def start(self, prompt_cache_offset: int, previous=None, levels=None) -> DrafterState:
        return continue_or_start(prompt_cache_offset, previous, make_cache=self.new_cache)

    def fuse(self, feats: mx.array) -> mx.array:
        """``fc`` of the base's fused features ``(..., m D_base)``, normed first where the
        checkpoint says (one norm over them all, or one per feature layer)."""
        x = feats.astype(self.fc.weight.dtype)
        if "input_norm" in self:
            x = self.input_norm(x)
        elif "fc_norm" in self:
            parts = mx.split(x, len(self.fc_norm), axis=-1)
            x = mx.concatenate([norm(p) for norm, p in zip(self.fc_norm, parts)], axis=-1)
        return self.fc(x)

    def step(self, rt, feats: mx.array, tokens: mx.array, cache) -> mx.array:
        """The layers' output over rows pairing the base's fused ``feats`` ``(L, m D)``
        (a batch: ``(B, L, m D)``) with ``tokens``' embeddings, appended to ``cache``."""
        return self.again(rt, self.fuse(feats), tokens, cache)

    def again(self, rt, h: mx.array, tokens: mx.array, cache) -> mx.array:
        """The layers over ``h``, ``fc``'s output or their own earlier output (a deeper
        level's row), and ``tokens``' embeddings, appended to ``cache``."""
        e = self.embed(rt, tokens).astype(h.dtype)
        batched = h.ndim == 3
        out = self.run_layers(e if batched else e[None], h if batched else h[None], cache)
        return out if batched else out[0]

    def run_layers(self, e: mx.array, h: mx.array, cache, at=None) -> mx.array:
        """The first layer over rows ``(B, L, D)`` pairing embeddings ``e`` with ``h``,
        each further layer over the one before's output (each layer on its member of
        ``cache``), at ``at`` where given (:func:`block_at`); the output deeper levels
        read: the final norm's where ``norm_output``."""
        caches = [cache] if not self.upper else [cache[i] for i in range(1 + len(self.upper))]
        out = self.layer(e, h, caches[0], at=at)
        for block, c in zip(self.upper, caches[1:]):
            out = run_layer(block, out, c) if at is None else block_at(block, out, c, at)
        return self.norm(out) if self._norm_output else out

    def level_logits(self, rt, out: mx.array) -> mx.array:
        """A level's logits (its own draft vocabulary: ``rt``'s is refused)."""
        return self.logits(out)

    def logits(self, out: mx.array) -> mx.array:
        """``(..., V)`` logits of the base's tokens from the layers' output, ``-inf``
        outside the draft vocabulary."""
        return widened(self.tree_logits(None, out), self.draft_ids(), self._vocab)

    def draft_ids(self) -> mx.array:
        """``(V_draft,)`` the base's token of each draft id (``d2t``'s, kept per ``d2t``)."""
        if self._targets is None or self._targets[0] is not self.d2t:
            ids = mx.arange(self.d2t.shape[0], dtype=mx.int32) + self.d2t.astype(mx.int32)
            self._targets = (self.d2t, ids)
        return self._targets[1]

    def rows_at(self, rt, h: mx.array, tokens: mx.array, cache, at) -> mx.array:
        """The layers over rows pairing their own outputs ``h`` ``(k, D)`` with ``tokens``'
        embeddings, at ``at`` = ``(position, mask)`` (:func:`attend_at`)."""
        e = self.embed(rt, tokens).astype(h.dtype)
        return self.run_layers(e[None], h[None], cache, at=at)[0]

    def tree_logits(self, rt, out: mx.array) -> mx.array:
        """``(..., V_draft)`` logits over the draft ids (:meth:`tree_ids`): ``lm_head`` of
        the final norm's output (already normed where ``norm_output``)."""
        return self.lm_head(out if self._norm_output else self.norm(out))

    def tree_ids(self) -> mx.array:
        return self.draft_ids()


def eagle_config(checkpoint: Path, model: nn.Module, weights: dict, **tree) -> DrafterConfig:
    """The drafter section of ``checkpoint``'s EAGLE-3 drafter (its tensors ``weights``,
    :func:`read_eagle_weights`) on ``model`` (a chain of 3 unless ``tree`` says otherwise)."""
    eagle = eagle_settings(checkpoint, model, "embed_tokens.weight" in weights)
    assert sorted(eagle) == sorted(EAGLE_KEYS)
    held = 1 + len({k.split(".")[1] for k in weights if k.startswith("upper.")})
    if held != eagle["num_layers"]:
        raise ValueError(f"{Path(checkpoint) / 'config.json'}: num_hidden_layers="
                         f"{eagle['num_layers']}, but its tensors hold {held} layer(s)")  # fmt: skip
    return DrafterConfig(kind="eagle3", eagle=eagle, **{**EAGLE_DEFAULTS, **tree})


def attach_eagle(model: nn.Module, checkpoint: Path, config: Optional[DrafterConfig] = None):
    """Puts ``checkpoint``'s EAGLE-3 drafter on ``model`` (an mlx-lm model of its base,
    any quantization; the drafter's weights stay as stored).

    Returns:
        Eagle3Drafter: the drafter (also ``model.speculative_streams.drafter``).

    Raises:
        ValueError: naming the checkpoint, where its tensors do not fit.
    """
    refuse_attached(model)
    weights = read_eagle_weights(checkpoint)
    config = eagle_config(checkpoint, model, weights) if config is None else config
    return attach_checkpoint_drafter(model, config, weights, checkpoint, "EAGLE-3",
                                     check=lambda d: check_d2t(d, str(checkpoint)))  # fmt: skip


def check_d2t(drafter: Eagle3Drafter, source: str) -> None:
    """Refuses a ``d2t`` whose base ids repeat or leave the base's vocabulary."""
    ids = (mx.arange(drafter.d2t.shape[0]) + drafter.d2t).tolist()
    bad = [i for i in ids if not 0 <= i < drafter._vocab]
    if bad or len(set(ids)) != len(ids):
        why = f"maps to token {bad[0]}, outside 0..{drafter._vocab - 1}" if bad else "repeats ids"
        raise ValueError(f"{source}: the drafter's d2t {why}")

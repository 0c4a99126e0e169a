"""EAGLE-3 drafters (Li et al., arXiv 2503.01840) through the tree verifier.

An EAGLE-3 drafter is one decoder layer of its own (Llama's, whatever the base) that
reads three of the base's layers at once. Row ``i`` pairs the base's states of token
``i`` at its feature layers (the inputs of layers ``2``, ``N // 2`` and ``N - 3`` by
default, as vLLM and SGLang pick them; ``N``: the last layer's output) with the
embedding of token ``i + 1``, on its own KV cache::

    h = fc([f_low; f_mid; f_high])               # (3 D_base) -> D
    a = h + attn([input_norm(e); hidden_norm(h)])  # q, k, v read 2 D
    o = a + mlp(post_attention_norm(a))
    logits = lm_head(norm(o))                    # over its draft vocabulary
    token = draft_id + d2t[draft_id]             # the base's token of a draft id

``norm_before_residual`` (a speculators-format setting) adds ``hidden_norm(h)``
instead of ``h``. The accepted path's rows go into the cache; the last one (the last
accepted node and the bonus token) gives draft level 1. Each deeper level runs the
layer again on its own output ``o`` (not through ``fc``) and the previous level's
argmax, as EAGLE-3 was trained ("training-time test"), rows trimmed after.

Checkpoints read (``load(base, drafter=DIR)``; safetensors only):

* EAGLE's own (``LlamaForCausalLMEagle3``: yuhuili/EAGLE3-*, lmsys, AngelSlim):
  ``midlayer.*``, ``fc``, ``norm``, ``lm_head``, ``d2t`` (``t2d`` is unused);
* the speculators format (``Eagle3Speculator``, RedHatAI's ``*.eagle3``): the same
  with ``layers.0.*``, the layer's settings under ``transformer_layer_config``,
  ``eagle_aux_hidden_state_layer_ids`` and ``norm_before_residual``.

Both may carry ``embed_tokens``; without it the base's embeddings are used.

Example:
    >>> model, tok = load("mlx-community/Llama-3.1-8B-Instruct-4bit",
    ...                   drafter="yuhuili/EAGLE3-LLaMA3.1-Instruct-8B")
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

from .config import EAGLE_KEYS, DrafterConfig
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
    layer = {**config, **(config.get("transformer_layer_config") or {})}

    def fail(why):
        raise ValueError(f"{file}: {why}")

    if layer.get("num_hidden_layers", 1) != 1:
        fail(f"num_hidden_layers={layer['num_hidden_layers']}: EAGLE-3 drafters of one layer only")
    if layer.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act={layer['hidden_act']!r}: the drafter's layer is Llama's (silu)")
    N, D = len(model.layers), hidden_size(model)
    vocab = head_rows(model)
    if layer.get("vocab_size", vocab) != vocab:
        fail(f"vocab_size={layer['vocab_size']}: the base's logits have {vocab} tokens")
    target = config.get("target_hidden_size") or layer.get("target_hidden_size") or D
    if target != D:
        fail(f"target_hidden_size={target}: the base's layers are {D} wide")
    eagle = config.get("eagle_config") or {}
    ids = config.get("eagle_aux_hidden_state_layer_ids") or eagle.get(
        "eagle_aux_hidden_state_layer_ids"
    )
    ids = list(ids) if ids else default_layers(N)
    if len(ids) != 3 or not all(isinstance(i, int) and 0 <= i <= N for i in ids):
        fail(
            f"eagle_aux_hidden_state_layer_ids={ids}: three layer indices in [0, {N}] "
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
    }
    return settings


def read_eagle_weights(path: Path) -> Dict[str, mx.array]:
    """The drafter's tensors under this module's names: ``midlayer.`` and ``layers.0.``
    become ``layer.``, vLLM's ``model.`` prefix is dropped; ``t2d`` (the inverse map) is
    dropped. EAGLE-1's checkpoints (:mod:`mlx_specstream.eagle1`) are read so too."""
    weights = {}
    for file in checkpoint_files(path, PICKLE_HINT):
        for key, value in mx.load(str(file)).items():
            if key == "t2d":
                continue
            for prefix in ("midlayer.", "layers.0.", "model.layers.0."):
                if key.startswith(prefix):
                    key = "layer." + key[len(prefix) :]
            key = key[len("model.") :] if key.startswith("model.") else key
            weights[key] = value.astype(mx.int32) if key == "d2t" else value
    return weights


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: Llama's, its attention reading ``[e; h]`` (``2 D``)."""

    def __init__(self, args: llama.ModelArgs, norm_before_residual: bool = False):
        super().__init__()
        D = args.hidden_size
        self.self_attn = llama.Attention(args)
        attn = self.self_attn
        for name, heads in (("q_proj", attn.n_heads), ("k_proj", attn.n_kv_heads),
                            ("v_proj", attn.n_kv_heads)):  # fmt: skip
            setattr(attn, name, nn.Linear(2 * D, heads * attn.head_dim, bias=args.attention_bias))
        self.mlp = llama.MLP(args)
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


def attend_at(attn: llama.Attention, x: mx.array, cache, position: int, mask: mx.array):
    """mlx-lm's Llama attention (its weights, its RoPE) over rows ``x`` ``(1, L, C)`` all
    at one ``position`` (a dynamic tree's level: siblings share it), seeing the keys of
    ``cache`` and of the rows (appended to it) where ``mask`` ``(L, S)`` says."""
    L = x.shape[1]

    def heads(proj, n):  # (L, n, 1, hd): a row per batch entry, each at `position`
        return proj(x).reshape(L, 1, n, -1).transpose(0, 2, 1, 3)

    q = attn.rope(heads(attn.q_proj, attn.n_heads), offset=position).transpose(2, 1, 0, 3)
    k = attn.rope(heads(attn.k_proj, attn.n_kv_heads), offset=position).transpose(2, 1, 0, 3)
    keys, values = cache.update_and_fetch(
        k, heads(attn.v_proj, attn.n_kv_heads).transpose(2, 1, 0, 3)
    )
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(1, L, -1))


def layer_args(eagle: dict) -> llama.ModelArgs:
    """The Llama settings of the drafter's layer."""
    return llama.ModelArgs(
        model_type="llama",
        num_hidden_layers=1,
        vocab_size=eagle["draft_vocab_size"],
        **{k: eagle[k] for k in (
            "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
            "max_position_embeddings", "attention_bias", "mlp_bias",
        )},  # fmt: skip
    )


class EagleDrafting(nn.Module):
    """What EAGLE's drafters (EAGLE-3's, EAGLE-1's) share: a layer of their own on a KV
    cache that the accepted path's rows stay in, run again on its own output for each
    deeper level (``step``, ``again``, ``level_logits``), or over a dynamic tree's nodes
    (``rows_at``, ``tree_logits``, ``tree_ids``)."""

    def start(self, prompt_cache_offset: int, previous=None, levels=None) -> DrafterState:
        return continue_or_start(prompt_cache_offset, previous, self.layer)

    def embed(self, rt, tokens: mx.array) -> mx.array:
        """Token embeddings: the drafter's own, else the base's."""
        return self.embed_tokens(tokens) if "embed_tokens" in self else rt.embed(tokens)

    def draft(self, rt, state, hidden, path, path_tokens, token, levels=None) -> mx.array:
        """``(levels, V)`` logits of the next tree's levels from the accepted path: the
        new rows, then the layer again on its own output for each deeper level (those
        rows trimmed after)."""
        levels = self._levels if levels is None else min(levels, self._levels)
        feats, nxt = new_rows(state, hidden, path, path_tokens, token)
        out = self.step(rt, feats, mx.array(nxt), state.cache)[-1:]
        logits = [self.level_logits(rt, out)]
        levels_again(rt, self, logits, out, state.cache, levels - 1)
        state.cache.trim(levels - 1)  # (the recursion's rows never stay)
        return mx.concatenate(logits, axis=0)

    def draft_tree(self, rt, state, hidden, path, path_tokens, token, k: int, depth: int,
                   drawn=None):  # fmt: skip
        """The candidates of the next dynamic tree, ``k`` wide and ``depth`` levels deep,
        or of a drawn one (:func:`~mlx_specstream.dynamic_tree.grown_candidates`)."""
        return grown_candidates(self, rt, state, hidden, path, path_tokens, token, k, depth,
                                drawn)  # fmt: skip


class Eagle3Drafter(EagleDrafting):
    """``fc`` ``(D, 3 D_base)``, ``layer.*``, ``norm``, ``lm_head`` ``(V_draft, D)``,
    ``d2t`` ``(V_draft,)`` (and ``embed_tokens`` where the checkpoint has its own)."""

    own_draft_vocab = True  # (its head ranks its d2t's tokens: no other draft vocabulary)

    def __init__(self, config: DrafterConfig, model: nn.Module):
        super().__init__()
        eagle = config.eagle
        args = layer_args(eagle)
        D, V = args.hidden_size, eagle["draft_vocab_size"]
        base_vocab = head_rows(model)  # (the width of the base's logits)
        if eagle["own_embeddings"]:
            self.embed_tokens = nn.Embedding(base_vocab, D)
        elif hidden_size(model) != D:
            raise ValueError(
                f"drafter.eagle.hidden_size={D}: the base's embeddings are "
                f"{hidden_size(model)} wide and the drafter has none of its own"
            )
        self.fc = nn.Linear(3 * eagle["target_hidden_size"], D, bias=False)
        self.layer = Eagle3Layer(args, eagle["norm_before_residual"])
        self.norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.d2t = mx.zeros((V,), dtype=mx.int32)
        self.feature_layers = list(eagle["feature_layers"])
        self._vocab, self._levels = base_vocab, config.num_draft_tokens
        self._targets = None  # (d2t it was made from, the base's ids of the draft ids)

    def step(self, rt, feats: mx.array, tokens: mx.array, cache) -> mx.array:
        """The layer's output over rows pairing the base's fused ``feats`` ``(L, 3 D)``
        (a batch: ``(B, L, 3 D)``) with ``tokens``' embeddings, appended to ``cache``."""
        h = self.fc(feats.astype(self.fc.weight.dtype))
        return self.again(rt, h, tokens, cache)

    def again(self, rt, h: mx.array, tokens: mx.array, cache) -> mx.array:
        """The layer over ``h``, ``fc``'s output or its own earlier output (a deeper
        level's row), and ``tokens``' embeddings, appended to ``cache``."""
        e = self.embed(rt, tokens).astype(h.dtype)
        batched = h.ndim == 3
        out = self.layer(e if batched else e[None], h if batched else h[None], cache)
        return out if batched else out[0]

    def level_logits(self, rt, out: mx.array) -> mx.array:
        """A level's logits (its own draft vocabulary: ``rt``'s is refused)."""
        return self.logits(out)

    def logits(self, out: mx.array) -> mx.array:
        """``(..., V)`` logits of the base's tokens from the layer's output, ``-inf``
        outside the draft vocabulary."""
        return widened(self.lm_head(self.norm(out)), self.draft_ids(), self._vocab)

    def draft_ids(self) -> mx.array:
        """``(V_draft,)`` the base's token of each draft id (``d2t``'s, kept per ``d2t``)."""
        if self._targets is None or self._targets[0] is not self.d2t:
            ids = mx.arange(self.d2t.shape[0], dtype=mx.int32) + self.d2t.astype(mx.int32)
            self._targets = (self.d2t, ids)
        return self._targets[1]

    def rows_at(self, rt, h: mx.array, tokens: mx.array, cache, at) -> mx.array:
        """The layer over rows pairing its own outputs ``h`` ``(k, D)`` with ``tokens``'
        embeddings, at ``at`` = ``(position, mask)`` (:func:`attend_at`)."""
        e = self.embed(rt, tokens).astype(h.dtype)
        return self.layer(e[None], h[None], cache, at=at)[0]

    def tree_logits(self, rt, out: mx.array) -> mx.array:
        """``(..., V_draft)`` logits over the draft ids (:meth:`tree_ids`)."""
        return self.lm_head(self.norm(out))

    def tree_ids(self) -> mx.array:
        return self.draft_ids()


def eagle_config(checkpoint: Path, model: nn.Module, weights: dict, **tree) -> DrafterConfig:
    """The drafter section of ``checkpoint``'s EAGLE-3 drafter (its tensors ``weights``,
    :func:`read_eagle_weights`) on ``model`` (a chain of 3 unless ``tree`` says otherwise)."""
    eagle = eagle_settings(checkpoint, model, "embed_tokens.weight" in weights)
    assert sorted(eagle) == sorted(EAGLE_KEYS)
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

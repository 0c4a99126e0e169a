"""EAGLE-1 drafters, run as EAGLE-2 runs them (Li et al., arXiv 2401.15077, 2406.16858).

An EAGLE-1 drafter (yuhuili/EAGLE-LLaMA3-Instruct-8B, EAGLE-Vicuna, EAGLE-llama2-chat, ...;
EAGLE-2 uses the same checkpoints with dynamic trees) is one Llama decoder layer of its
own over the base's last hidden state (after its final norm: the input of its LM head)
and the next token's embedding, on its own KV cache::

    x = fc([e; f])                       # (2 D) -> D, with a bias where the checkpoint has one
    a = x + attn(x)                      # no input norm (EAGLE drops the first layer's)
    o = a + mlp(post_attention_norm(a))  # the predicted next feature
    logits = lm_head(o)                  # the base's head, no norm

Row ``i`` pairs the feature of token ``i`` with the embedding of token ``i + 1``; the
accepted path's rows stay in the cache. Each deeper level runs the layer on
``fc([e; o])``: its own output in place of the feature and the embedding of the token
drafted from it, rows trimmed after. Trees wider than a chain grow from each node's own
path (:mod:`mlx_specstream.dynamic_tree`), as EAGLE-2 drafts them. A batch's rows draft their
chains with it (:class:`~mlx_specstream.batch_drafters.EagleRows`), as EAGLE-3's do.

Checkpoints read (``load(base, drafter=DIR)``, safetensors; EAGLE's own are PyTorch
pickles: ``python -m convert.eagle3`` rewrites them, as for EAGLE-3): ``fc.weight``
(``fc.bias``), ``layers.0.*`` without ``input_layernorm``, ``embed_tokens.weight``
(optional: the base's otherwise), names with vLLM's ``model.`` prefix too; the layer's
settings from the checkpoint's Llama ``config.json``.

Example:
    >>> model, tok = load("mlx-community/Meta-Llama-3-8B-Instruct-4bit",
    ...                   drafter="EAGLE-LLaMA3-Instruct-8B")
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

from .config import EAGLE1_KEYS, DrafterConfig
from .draft_vocab import head_rows
from .drafters import attach_checkpoint_drafter, refuse_attached, run_layer
from .eagle import EagleDrafting, block_at, read_eagle_weights
from .model_parts import hidden_size
from .mtp import _checkpoint_keys, _final_norm, head_logits

# A chain of 3 by default, as for EAGLE-3; up to 5 levels where a tree asks (EAGLE-2: 5-6).
EAGLE1_DEFAULTS = dict(num_draft_tokens=5, tree_depth=3, top_k=1, max_tree_nodes=4)


def is_eagle1_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds an EAGLE-1 drafter: a one-layer Llama ``config.json`` (EAGLE's
    or vLLM's ``EAGLEModel``) whose tensors have ``fc`` and ``layers.0`` and no LM head, or
    such a config beside PyTorch pickles only (refused with the conversion's command)."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        return False
    config = json.loads(file.read_text())
    names = " ".join(config.get("architectures") or [])
    if "Eagle3" in names or "drafter" in config or "speculative_streaming" in config:
        return False
    if "EAGLEModel" in names:
        return True
    if config.get("num_hidden_layers") != 1:
        return False
    keys = {k[len("model.") :] if k.startswith("model.") else k for k in _checkpoint_keys(path)}
    if keys:
        eagle3 = any(k.startswith("midlayer.") for k in keys)
        return "fc.weight" in keys and "lm_head.weight" not in keys and not eagle3
    return (path / "pytorch_model.bin").is_file() or (
        path / "pytorch_model.bin.index.json"
    ).exists()


def eagle1_settings(path: Path, model: nn.Module, weights: dict) -> dict:
    """The drafter section's ``eagle`` dict (:data:`~mlx_specstream.config.EAGLE1_KEYS`)
    read from ``path/config.json`` (vLLM's nests it under ``model``), checked against
    ``model``, the base, and the checkpoint's tensors ``weights``.

    Raises:
        ValueError: naming the file and key, for a layer this module cannot build or a
          drafter made for another base.
    """
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    layer = {**config, **(config.get("model") or {})}

    def fail(why):
        raise ValueError(f"{file}: {why}")

    if layer.get("num_hidden_layers", 1) != 1:
        fail(f"num_hidden_layers={layer['num_hidden_layers']}: EAGLE drafters of one layer only")
    if layer.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act={layer['hidden_act']!r}: the drafter's layer is Llama's (silu)")
    D, vocab = hidden_size(model), head_rows(model)
    if layer["hidden_size"] != D:
        fail(f"hidden_size={layer['hidden_size']}: the base's layers are {D} wide")
    if layer.get("vocab_size", vocab) != vocab:
        fail(f"vocab_size={layer['vocab_size']}: the base's logits have {vocab} tokens")
    biased = sorted(k for k in weights if k.startswith("layer.self_attn.") and k.endswith(".bias"))
    if biased:
        fail(f"attention biases ({biased[0]}, ...): the drafter's layer is Llama's, without")
    return {
        "hidden_size": D,
        "num_attention_heads": layer["num_attention_heads"],
        "num_key_value_heads": layer.get("num_key_value_heads") or layer["num_attention_heads"],
        "head_dim": layer.get("head_dim"),
        "intermediate_size": layer["intermediate_size"],
        "rms_norm_eps": layer.get("rms_norm_eps", 1e-6),
        "rope_theta": layer.get("rope_theta", 10000.0),
        "rope_scaling": layer.get("rope_scaling"),
        "max_position_embeddings": layer.get("max_position_embeddings"),
        "fc_bias": "fc.bias" in weights,
        "own_embeddings": "embed_tokens.weight" in weights,
    }


def layer_args(eagle: dict, vocab: int) -> llama.ModelArgs:
    """The Llama settings of the drafter's layer."""
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
            "max_position_embeddings")  # fmt: skip
    return llama.ModelArgs(model_type="llama", num_hidden_layers=1, vocab_size=vocab,
                           **{k: eagle[k] for k in keys})  # fmt: skip


class Eagle1Drafter(EagleDrafting):
    """``fc`` ``(D, 2 D)``, ``layer.*`` (Llama's block, no input norm) and
    ``embed_tokens`` where the checkpoint has its own; the base's final norm (on its
    features) and LM head."""

    name = "EAGLE-1"

    def __init__(self, config: DrafterConfig, model: nn.Module):
        super().__init__()
        eagle = config.eagle
        D = eagle["hidden_size"]
        if hidden_size(model) != D:
            raise ValueError(f"drafter.eagle.hidden_size={D}: the base's layers are "
                             f"{hidden_size(model)} wide")  # fmt: skip
        if eagle["own_embeddings"]:
            self.embed_tokens = nn.Embedding(head_rows(model), D)
        self.fc = nn.Linear(2 * D, D, bias=eagle["fc_bias"])
        self.layer = llama.TransformerBlock(layer_args(eagle, head_rows(model)))
        self.layer.input_layernorm = nn.Identity()  # (EAGLE drops the first layer's)
        self._levels = config.num_draft_tokens

    def inputs(self, rt, h: mx.array, tokens: mx.array) -> mx.array:
        """``fc([e; h])`` of rows pairing ``h`` ``(L, D)`` (a batch's: ``(B, L, D)``) with
        ``tokens``' embeddings."""
        e = self.embed(rt, tokens).astype(h.dtype)
        return self.fc(mx.concatenate([e, h], axis=-1).astype(self.fc.weight.dtype))

    def step(self, rt, feats: mx.array, tokens: mx.array, cache) -> mx.array:
        """The layer's output over rows pairing the base's last states ``feats`` ``(L, D)``
        (a batch's: ``(B, L, D)``; through its final norm: what its LM head reads) with
        ``tokens``' embeddings, appended to ``cache``."""
        return self.again(rt, _final_norm(rt.model)(feats), tokens, cache)

    def again(self, rt, h: mx.array, tokens: mx.array, cache) -> mx.array:
        """The layer over rows pairing ``h`` (normed features, or its own earlier output:
        a deeper level's row) with ``tokens``' embeddings, appended to ``cache``."""
        x = self.inputs(rt, h, tokens)
        batched = x.ndim == 3
        out = run_layer(self.layer, x if batched else x[None], cache)
        return out if batched else out[0]

    def level_logits(self, rt, out: mx.array) -> mx.array:
        """A level's logits: the base's LM head on the output (under ``rt``'s draft
        vocabulary, ``-inf`` elsewhere)."""
        return head_logits(rt.model, out, rt.draft_vocab)

    def rows_at(self, rt, h: mx.array, tokens: mx.array, cache, at) -> mx.array:
        return block_at(self.layer, self.inputs(rt, h, tokens)[None], cache, at)[0]

    def tree_logits(self, rt, out: mx.array) -> mx.array:
        return self.level_logits(rt, out)

    def tree_ids(self) -> None:
        return None


def eagle1_config(checkpoint: Path, model: nn.Module, weights: dict, **tree) -> DrafterConfig:
    """The drafter section of ``checkpoint``'s EAGLE-1 drafter (its tensors ``weights``,
    :func:`~mlx_specstream.eagle.read_eagle_weights`) on ``model`` (a chain of 3 unless ``tree`` says).
    """
    eagle = eagle1_settings(checkpoint, model, weights)
    assert sorted(eagle) == sorted(EAGLE1_KEYS)
    return DrafterConfig(kind="eagle", eagle=eagle, **{**EAGLE1_DEFAULTS, **tree})


def attach_eagle1(model: nn.Module, checkpoint: Path, config: Optional[DrafterConfig] = None):
    """Puts ``checkpoint``'s EAGLE-1 drafter on ``model`` (an mlx-lm model of its base,
    any quantization; the drafter's weights stay as stored).

    Returns:
        Eagle1Drafter: the drafter (also ``model.speculative_streams.drafter``).

    Raises:
        ValueError: naming the checkpoint, where its tensors do not fit.
    """
    refuse_attached(model)
    weights = read_eagle_weights(checkpoint)
    config = eagle1_config(checkpoint, model, weights) if config is None else config
    return attach_checkpoint_drafter(model, config, weights, checkpoint, "EAGLE-1")

"""Tiny DFlash checkpoints, as z-lab's code writes them, and the drafter's levels
computed from their raw tensors from scratch (tests of dflash.py)."""

import json

import mlx.core as mx
import numpy as np
from eagle_helpers import base_features
from helpers import BASE

DFLASH_LAYER = dict(
    hidden_size=BASE["hidden_size"], num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=96, rms_norm_eps=1e-6,
)  # fmt: skip


def write_dflash(path, vocab_size=64, seed=2, layers=2, target_layer_ids=(0, 2, 3),
                 block_size=5, top_level=False, scale=3.0, window=None, mask=None, **overrides):  # fmt: skip
    """A random DFlash checkpoint (``DFlashDraftModel``) for a base of ``vocab_size``
    tokens; its settings under ``dflash_config`` (``top_level``: ``block_size`` at the
    top, as older configs have it). ``window``: its first layer slides over that many
    positions (and so is causal, by DFlash's rule). Returns the raw tensors and
    settings the reference reads."""
    mx.random.seed(seed)
    layer = {**DFLASH_LAYER, **overrides}
    D, H, KV = layer["hidden_size"], layer["num_attention_heads"], layer["num_key_value_heads"]
    hd, F = layer["head_dim"], layer["intermediate_size"]

    def matrix(rows, cols):
        return mx.random.normal((rows, cols)) * cols**-0.5 * scale

    def norm(n=D):
        return 1 + 0.3 * mx.random.normal((n,))

    w = {"fc.weight": matrix(D, len(target_layer_ids) * D), "hidden_norm.weight": norm(),
         "norm.weight": norm()}  # fmt: skip
    for i in range(layers):
        p = f"layers.{i}."
        w.update({
            p + "self_attn.q_proj.weight": matrix(H * hd, D),
            p + "self_attn.k_proj.weight": matrix(KV * hd, D),
            p + "self_attn.v_proj.weight": matrix(KV * hd, D),
            p + "self_attn.o_proj.weight": matrix(D, H * hd),
            p + "self_attn.q_norm.weight": norm(hd),
            p + "self_attn.k_norm.weight": norm(hd),
            p + "mlp.gate_proj.weight": matrix(F, D),
            p + "mlp.up_proj.weight": matrix(F, D),
            p + "mlp.down_proj.weight": matrix(D, F),
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
        })  # fmt: skip
    mask = vocab_size - 3 if mask is None else mask  # (a token of the base's embeddings)
    own = {"mask_token_id": mask, "target_layer_ids": list(target_layer_ids)}
    config = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_act": "silu",
        "num_hidden_layers": layers, "vocab_size": vocab_size, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "layer_types": ["full_attention"] * layers,
        "num_target_layers": 6, "dflash_config": own, **layer,
    }  # fmt: skip
    (config if top_level else own)["block_size"] = block_size
    masks = [(False, None)] * layers
    if window is not None:
        config.update(sliding_window=window, use_sliding_window=True)
        config["layer_types"] = ["sliding_attention"] + ["full_attention"] * (layers - 1)
        masks = [(True, window)] + masks[1:]
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), w)
    (path / "config.json").write_text(json.dumps(config))
    return dict(w=w, layer=layer, layers=layers, ids=[i + 1 for i in target_layer_ids],
                masks=masks, mask=mask)  # fmt: skip


def _rope(x, offset, base=10000.0):
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=base, scale=1.0, offset=offset)


def reference_levels(plain, ref, text, a, levels, layer_ids=None, masks=None,
                     normed_context=False, last_context=0):  # fmt: skip
    """The drafter's levels after rows ``0..a`` of ``text`` (the base's states of those
    tokens as context) with the block ``[text[a + 1], MASK x levels]`` at positions
    ``a + 1 ..``: every row recomputed from the raw tensors. ``masks``: each layer's
    ``(causal, window)`` (default: the checkpoint's). Controls: other ``masks``,
    ``normed_context`` (the context through each layer's input norm), ``last_context``
    (that many of the last context rows dropped)."""
    masks = masks or ref["masks"]
    w, layer = ref["w"], ref["layer"]
    eps, H, KV = layer["rms_norm_eps"], layer["num_attention_heads"], layer["num_key_value_heads"]
    hd = layer["head_dim"]
    feats = base_features(plain, text[: a + 1], layer_ids or ref["ids"])
    if last_context:
        feats = feats[:-last_context]
    S = feats.shape[0]
    ctx = mx.fast.rms_norm(feats @ w["fc.weight"].T, w["hidden_norm.weight"], eps)
    embed = plain.model.embed_tokens.weight
    x = embed[mx.array([text[a + 1]] + [ref["mask"]] * levels)]
    L, start = x.shape[0], a + 1

    def heads(y, n):
        return y.reshape(y.shape[0], n, hd).transpose(1, 0, 2)[None]

    for i in range(ref["layers"]):
        p = f"layers.{i}.self_attn."
        h = mx.fast.rms_norm(x, w[f"layers.{i}.input_layernorm.weight"], eps)
        c = (
            mx.fast.rms_norm(ctx, w[f"layers.{i}.input_layernorm.weight"], eps)
            if normed_context
            else ctx
        )

        def qk(rows, name, n, offset):
            y = heads(rows @ w[p + name + "_proj.weight"].T, n)
            return _rope(mx.fast.rms_norm(y, w[p + name + "_norm.weight"], eps), offset)

        q = qk(h, "q", H, start)
        k = mx.concatenate([qk(c, "k", KV, start - S), qk(h, "k", KV, start)], axis=2)
        v = mx.concatenate([heads(c @ w[p + "v_proj.weight"].T, KV),
                            heads(h @ w[p + "v_proj.weight"].T, KV)], axis=2)  # fmt: skip
        k, v = mx.repeat(k, H // KV, axis=1), mx.repeat(v, H // KV, axis=1)
        scores = (q @ k.transpose(0, 1, 3, 2)) * hd**-0.5
        causal, window = masks[i]
        query, key = start + mx.arange(L)[:, None], start - S + mx.arange(S + L)[None]
        seen = (key <= query) if causal else mx.ones((L, S + L), dtype=mx.bool_)
        if window:
            seen = seen & (query - key < window) & ((key - query < window) | causal)
        scores = mx.where(seen, scores, -mx.inf)
        out = (mx.softmax(scores, axis=-1) @ v)[0].transpose(1, 0, 2).reshape(L, -1)
        r = x + out @ w[p + "o_proj.weight"].T
        m = mx.fast.rms_norm(r, w[f"layers.{i}.post_attention_layernorm.weight"], eps)
        g = m @ w[f"layers.{i}.mlp.gate_proj.weight"].T
        u = m @ w[f"layers.{i}.mlp.up_proj.weight"].T
        x = r + (g * mx.sigmoid(g) * u) @ w[f"layers.{i}.mlp.down_proj.weight"].T
    out = mx.fast.rms_norm(x, w["norm.weight"], eps)[1:]
    return np.array(out @ plain.lm_head.weight.T)

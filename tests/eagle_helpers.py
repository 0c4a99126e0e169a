"""Tiny EAGLE-3 checkpoints, as EAGLE's and the speculators' code write them, and the
drafter's levels computed from their raw tensors from scratch (tests of eagle.py)."""

import json

import mlx.core as mx
import numpy as np
from helpers import ARCH_ARGS, BASE, tiny_model, word_tokenizer

EAGLE_LAYER = dict(
    hidden_size=BASE["hidden_size"], num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0,
)  # fmt: skip


def write_base(path, vocab_size=64, seed=0, layers=6, weight_scale=4.0):
    """A tiny Llama directory, as ``mlx_lm.load`` reads it."""
    from mlx_lm.utils import save_config, save_model

    model = tiny_model("llama", vocab_size, seed=seed, num_hidden_layers=layers,
                       weight_scale=weight_scale)  # fmt: skip
    path.mkdir(parents=True)
    save_model(path, model)
    config = {**BASE, **ARCH_ARGS["llama"], "vocab_size": vocab_size, "model_type": "llama",
              "num_hidden_layers": layers}  # fmt: skip
    save_config(config, path / "config.json")
    word_tokenizer(vocab_size).save_pretrained(str(path))
    return path


def write_eagle(
    path, vocab_size=64, draft_vocab=None, seed=1, style="eagle", own_embeddings=False,
    norm_before_residual=None, layer_ids=None, scale=3.0, head_scale=1.0, num_layers=1,
    layer_type="llama", norm_before_fc=False, fc_norm=False, norm_output=False,
    attention_bias=False, **overrides,
):  # fmt: skip
    """A random EAGLE-3 checkpoint for a base of ``vocab_size`` tokens: EAGLE's layout
    (``midlayer.*``) or the speculators' (``layers.{i}.*``, ``transformer_layer_config``).
    ``draft_vocab``: the base ids its head ranks (sorted; default every token). The
    speculators' later settings: ``num_layers`` (the speculators' layout only),
    ``layer_type`` (``"qwen3"``: norms of the heads' queries and keys), ``norm_before_fc``
    / ``fc_norm``, ``norm_output``, ``attention_bias``; ``layer_ids`` of any count.
    Returns the raw tensors (names as EAGLE's; further layers ``layers.{i}.*``) and
    settings the reference reads."""
    assert num_layers == 1 or style != "eagle"  # (EAGLE's own layout holds one layer)
    mx.random.seed(seed)
    D, layer = EAGLE_LAYER["hidden_size"], {**EAGLE_LAYER, **overrides}
    H, KV = layer["num_attention_heads"], layer["num_key_value_heads"]
    hd, F = layer.get("head_dim") or D // H, layer["intermediate_size"]
    ids = np.arange(vocab_size) if draft_vocab is None else np.asarray(draft_vocab)
    Vd, m = len(ids), len(layer_ids or [0, 0, 0])

    def matrix(rows, cols):
        return mx.random.normal((rows, cols)) * cols**-0.5 * scale

    def norm(width=D):
        return 1 + 0.3 * mx.random.normal((width,))

    def decoder_layer(p, width, first=False):  # (drawn in the order earlier tests drew them)
        out = {
            p + "self_attn.q_proj.weight": matrix(H * hd, width),
            p + "self_attn.k_proj.weight": matrix(KV * hd, width),
            p + "self_attn.v_proj.weight": matrix(KV * hd, width),
            p + "self_attn.o_proj.weight": matrix(D, H * hd),
            p + "mlp.gate_proj.weight": matrix(F, D),
            p + "mlp.up_proj.weight": matrix(F, D),
            p + "mlp.down_proj.weight": matrix(D, F),
            p + "input_layernorm.weight": norm(),
        }
        if first:
            out[p + "hidden_norm.weight"] = norm()
        out[p + "post_attention_layernorm.weight"] = norm()
        return out

    def extras(p):  # (a layer's biases, Qwen3's norms of the heads' queries and keys)
        out = {}
        if attention_bias:
            for name, rows in (("q", H * hd), ("k", KV * hd), ("v", KV * hd), ("o", D)):
                out[f"{p}self_attn.{name}_proj.bias"] = 0.5 * mx.random.normal((rows,))
        if layer_type == "qwen3":
            out[p + "self_attn.q_norm.weight"] = norm(hd)
            out[p + "self_attn.k_norm.weight"] = norm(hd)
        return out

    w = {
        "fc.weight": matrix(D, m * D),
        **decoder_layer("midlayer.", 2 * D, first=True),
        "norm.weight": norm(),
        "lm_head.weight": matrix(Vd, D) / scale * head_scale,
        "d2t": mx.array(ids - np.arange(Vd), dtype=mx.int64),
        "t2d": mx.array(np.isin(np.arange(vocab_size), ids)),
    }
    w.update(extras("midlayer."))
    for i in range(1, num_layers):
        w.update({**decoder_layer(f"layers.{i}.", D), **extras(f"layers.{i}.")})
    if norm_before_fc:
        w["input_norm.weight"] = norm(m * D)
    if fc_norm:
        w.update({f"fc_norm.{j}.weight": norm() for j in range(m)})
    if own_embeddings:
        w["embed_tokens.weight"] = mx.random.normal((vocab_size, D))
    stored = dict(w)
    config = {"vocab_size": vocab_size, "draft_vocab_size": Vd, "num_hidden_layers": num_layers,
              "hidden_act": "silu", "max_position_embeddings": 2048}  # fmt: skip
    if attention_bias:
        layer = {**layer, "attention_bias": True}
    if style == "eagle":
        arch = "Qwen3ForCausalLMEagle3" if layer_type == "qwen3" else "LlamaForCausalLMEagle3"
        config.update(architectures=[arch], **layer)
    else:
        stored = {k.replace("midlayer.", "layers.0."): v for k, v in w.items()}
        config.update(
            architectures=["Eagle3Speculator"], speculators_model_type="eagle3",
            transformer_layer_config={**layer, "vocab_size": vocab_size, "model_type": layer_type,
                                      "num_hidden_layers": num_layers},
        )  # fmt: skip
        config.update({k: v for k, v in (("norm_before_fc", norm_before_fc), ("fc_norm", fc_norm),
                                         ("norm_output", norm_output)) if v})  # fmt: skip
    if norm_before_residual is not None:
        config["norm_before_residual"] = norm_before_residual
    if layer_ids is not None:
        config["eagle_aux_hidden_state_layer_ids"] = layer_ids
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), stored)
    (path / "config.json").write_text(json.dumps(config))
    return dict(w=w, layer=layer, ids=ids, norm_first=bool(norm_before_residual),
                num_layers=num_layers, norm_output=norm_output, features=m)  # fmt: skip


class _Recorded:
    """A decoder layer that records its input and output (anything else: the layer's)."""

    def __init__(self, layer, inputs: list, outputs: list):
        self.layer, self.inputs, self.outputs = layer, inputs, outputs

    def __getattr__(self, name):
        return getattr(self.layer, name)

    def __call__(self, x, *args, **kwargs):
        self.inputs.append(x)
        out = self.layer(x, *args, **kwargs)
        self.outputs.append(out[0] if isinstance(out, tuple) else out)
        return out


def base_features(plain, text, layer_ids):
    """``(L, 3 D)``: the inputs of the base's layers ``layer_ids`` over ``text`` (the
    index ``N``: the last layer's output), one pass of mlx-lm's own model."""
    inner, inputs, outputs = plain.model, [], []
    layers = inner.layers
    inner.layers = [_Recorded(layer, inputs, outputs) for layer in layers]
    try:
        plain(mx.array(text)[None])
    finally:
        inner.layers = layers
    inputs.append(outputs[-1])
    return mx.concatenate([inputs[i][0] for i in layer_ids], axis=-1)


def _attention(w, ref, x, context=None, shift=0, p="midlayer.self_attn.", qk_norm=True):
    """Causal attention of an EAGLE-3 layer (prefix ``p``) over all rows ``x`` ``(L, C)``,
    by hand: biases where the checkpoint has them, Qwen3's norms of each head's queries
    and keys (``qk_norm=False``: left out, a control); the rows past the first
    ``context`` ones ``shift`` positions later (a control)."""
    layer = ref["layer"]
    H, KV = layer["num_attention_heads"], layer["num_key_value_heads"]
    L, hd = x.shape[0], layer.get("head_dim") or layer["hidden_size"] // H
    context = L if context is None else context

    def rope(y, offset):
        return mx.fast.rope(y, hd, traditional=False, base=layer["rope_theta"], scale=1.0,
                            offset=offset)  # fmt: skip

    def heads(name, n):
        y = x @ w[f"{p}{name}_proj.weight"].T + w.get(f"{p}{name}_proj.bias", 0)
        y = y.reshape(L, n, hd)
        if qk_norm and f"{p}{name}_norm.weight" in w:
            y = mx.fast.rms_norm(y, w[f"{p}{name}_norm.weight"], layer["rms_norm_eps"])
        y = y.transpose(1, 0, 2)[None]
        if name == "v":
            return y
        return mx.concatenate(
            [rope(y[:, :, :context], 0), rope(y[:, :, context:], context + shift)], axis=2
        )

    q, k, v = heads("q", H), heads("k", KV), heads("v", KV)
    k, v = mx.repeat(k, H // KV, axis=1), mx.repeat(v, H // KV, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * hd**-0.5
    scores = mx.where(mx.tril(mx.ones((L, L), dtype=mx.bool_)), scores, -mx.inf)
    out = (mx.softmax(scores, axis=-1) @ v)[0].transpose(1, 0, 2).reshape(L, -1)
    return out @ w[p + "o_proj.weight"].T + w.get(p + "o_proj.bias", 0)


def _mlp(w, p, m):
    gate = m @ w[p + "mlp.gate_proj.weight"].T
    return (mx.sigmoid(gate) * gate * (m @ w[p + "mlp.up_proj.weight"].T)) @ w[
        p + "mlp.down_proj.weight"
    ].T


def fused_features(w, ref, feats, feature_norm=True):
    """``fc`` of the base's features ``(L, m D)``, through the checkpoint's norm of them
    where it has one (``feature_norm=False``: left out, a control)."""
    eps = ref["layer"]["rms_norm_eps"]
    if feature_norm and "input_norm.weight" in w:
        feats = mx.fast.rms_norm(feats, w["input_norm.weight"], eps)
    elif feature_norm and "fc_norm.0.weight" in w:
        parts = mx.split(feats, ref["features"], axis=-1)
        feats = mx.concatenate([mx.fast.rms_norm(f, w[f"fc_norm.{j}.weight"], eps)
                                for j, f in enumerate(parts)], axis=-1)  # fmt: skip
    return feats @ w["fc.weight"].T


def reference_levels(plain, ref, text, a, levels, layer_ids, through_fc=False,
                     normed_recursion=None, norm_first=None, path=None, shift=0, upper=True,
                     qk_norm=True, feature_norm=True):  # fmt: skip
    """The drafter's levels from rows ``0..a`` of ``text`` (row i: the base's features
    of token i and the embedding of token i + 1), then its own output and argmax for
    each deeper level (``path``: those tokens instead, a dynamic tree's node): every
    row recomputed from the raw tensors, through every layer. Controls: ``through_fc``
    (deeper levels' hidden through ``fc`` again, tiled), ``normed_recursion`` (the final
    norm's output passed on, or not: the checkpoint's ``norm_output`` by default),
    ``norm_first`` (the other residual), ``shift`` (the deeper levels' rows that many
    positions later), ``upper=False`` (the first layer only), ``qk_norm=False`` (Qwen3's
    norms left out), ``feature_norm=False`` (the features' norm left out)."""
    w, eps = ref["w"], ref["layer"]["rms_norm_eps"]
    norm_first = ref["norm_first"] if norm_first is None else norm_first
    normed_recursion = ref["norm_output"] if normed_recursion is None else normed_recursion
    embed = w.get("embed_tokens.weight", plain.model.embed_tokens.weight)
    feats = base_features(plain, text[: a + 1], layer_ids)
    hidden = fused_features(w, ref, feats, feature_norm)
    tokens = list(text[1 : a + 2])
    p = "midlayer."
    wide = np.full((levels, plain.model.embed_tokens.weight.shape[0]), -np.inf, np.float32)
    for level in range(levels):
        e = mx.fast.rms_norm(embed[mx.array(tokens)], w[p + "input_layernorm.weight"], eps)
        h = mx.fast.rms_norm(hidden, w[p + "hidden_norm.weight"], eps)
        x = mx.concatenate([e, h], axis=-1)
        attended = _attention(w, ref, x, a + 1, shift, p + "self_attn.", qk_norm)
        r = (h if norm_first else hidden) + attended
        o = r + _mlp(w, p, mx.fast.rms_norm(r, w[p + "post_attention_layernorm.weight"], eps))
        for i in range(1, ref["num_layers"] if upper else 1):
            q = f"layers.{i}."
            x = mx.fast.rms_norm(o, w[q + "input_layernorm.weight"], eps)
            r = o + _attention(w, ref, x, a + 1, shift, q + "self_attn.", qk_norm)
            o = r + _mlp(w, q, mx.fast.rms_norm(r, w[q + "post_attention_layernorm.weight"], eps))
        out = o[-1:]
        normed = mx.fast.rms_norm(out, w["norm.weight"], eps)
        small = np.array((normed @ w["lm_head.weight"].T)[0])
        wide[level, ref["ids"]] = small
        nxt = (
            ref["ids"][int(np.argmax(small))] if path is None or level >= len(path) else path[level]
        )
        passed = normed if normed_recursion else out
        if through_fc:
            passed = mx.concatenate([passed] * ref["features"], axis=-1) @ w["fc.weight"].T
        hidden = mx.concatenate([hidden, passed])
        tokens.append(int(nxt))
    return wide


def assert_checkpoints_refused(base_dir, tmp_path, cases, fine: str, what: str) -> None:
    """Each ``(drafter directory, message)`` of ``cases`` is refused by ``load`` with that
    message and the directory's name; ``fine`` (a good checkpoint of ``what`` drafter)
    with ``num_mtp_layers``, and for a shared-mode stream model's base, too."""
    import shutil

    import pytest

    from mlx_specstream import load

    for drafter, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            load(str(base_dir), drafter=drafter)
        assert drafter in str(info.value)
    with pytest.raises(ValueError, match=f"holds {what} drafter, not MTP layers"):
        load(str(base_dir), drafter=fine, num_mtp_layers=1)
    shared = tmp_path / "shared"  # (a shared-mode stream model: its base was fine-tuned)
    shutil.copytree(base_dir, shared)
    config = json.loads((shared / "config.json").read_text())
    (shared / "config.json").write_text(json.dumps({**config, "speculative_streaming": {
        "mode": "shared"}}))  # fmt: skip
    with pytest.raises(ValueError, match="shared-mode stream model"):
        load(str(shared), drafter=fine)


def recorded_drafts(model, monkeypatch, drafter_class, prompt, max_tokens=24, **tree):
    """The greedy text of ``prompt`` and, for each step's draft by ``model``'s drafter (of
    ``drafter_class``): its levels' logits, the last row ``a`` of the accepted text, the
    bonus token and the drafter's rows."""
    from helpers import spec_tokens

    seen, real_draft = [], drafter_class.draft

    def recording(self, rt, state, hidden, path, path_tokens, token, levels=None):
        logits = real_draft(self, rt, state, hidden, path, path_tokens, token, levels)
        a = rt._tree[4] + len(path) - 1  # (committed prefix + accepted nodes - 1)
        seen.append((np.array(logits.astype(mx.float32)), a, token, state.offset))
        return logits

    monkeypatch.setattr(drafter_class, "draft", recording)
    toks, _ = spec_tokens(model, prompt, max_tokens, **tree)
    monkeypatch.undo()
    return prompt + toks, seen


def saved_and_loaded_back(base_dir, drafter_dir, path, drafts_of) -> dict:
    """Loads ``base_dir`` with the drafter in ``drafter_dir`` and saves it into ``path``
    with a streams section in its config (one the base's directory had), which the saved
    config must drop; loaded back alone, the directory drafts what the model drafted
    (``drafts_of(model)``: its recorded drafts). Returns the saved drafter section."""
    from mlx_specstream import load
    from mlx_specstream.utils import save

    model, tok, config = load(str(base_dir), drafter=str(drafter_dir), return_config=True)
    save(path, model, tok, config={**config, "speculative_streaming": {}})
    saved = json.loads((path / "config.json").read_text())
    assert "speculative_streaming" not in saved
    again, _ = load(str(path))
    for a, b in zip(drafts_of(model)[1], drafts_of(again)[1]):
        np.testing.assert_array_equal(a[0], b[0])
    return saved["drafter"]


def assert_rejection_keeps_the_distribution(model, monkeypatch, n=1500, drawn=True,
                                            static=True) -> None:  # fmt: skip
    """Recursive rejection over ``model``'s drafter's trees (top-2, 2 levels, 6 nodes;
    temperature 1) samples the base's distribution (chi-square): with ``drawn``, the drawn
    dynamic tree (the default; control: its drafts verified as if drawn uniformly); with
    ``static``, the static tree drawn from the drafter's levels (control: each level
    verified against the next level's draft distribution)."""
    import mlx_specstream.decode as decode
    from chi_square import chi_square_pvalue
    from test_sampling import exact_distribution, sample_counts, verify_against_the_next_level_s_q

    from mlx_specstream.sample_utils import make_sampler

    sampler = make_sampler(temp=1.0)
    exact = exact_distribution(model, sampler)
    kwargs = dict(acceptance="rejection", tree_top_k=2, tree_depth=2, max_tree_nodes=6)
    if drawn:
        p = chi_square_pvalue(sample_counts(model, sampler, n, **kwargs), exact, n)
        assert p > 1e-3, f"drawn dynamic trees: chi-square p = {p:.2e}"
        real = decode.accept_by_rejection

        def as_if_uniform(tokens, parents, target, q, uniforms, rows=None):
            assert q is None or rows is not None  # (a drawn tree)
            q = q if q is None else np.full_like(q, 1.0 / q.shape[-1])
            return real(tokens, parents, target, q, uniforms, rows)

        monkeypatch.setattr(decode, "accept_by_rejection", as_if_uniform)
        p = chi_square_pvalue(sample_counts(model, sampler, 600, **kwargs), exact, 600)
        assert p < 1e-6, f"drafts verified as uniform draws passed (p = {p:.2e}): no power"
        monkeypatch.undo()
        kwargs["dynamic_tree"] = False
    if not static:
        return
    p = chi_square_pvalue(sample_counts(model, sampler, n, **kwargs), exact, n)
    assert p > 1e-3, f"static trees: chi-square p = {p:.2e}"
    verify_against_the_next_level_s_q(monkeypatch)
    p = chi_square_pvalue(sample_counts(model, sampler, 800, **kwargs), exact, 800)
    assert p < 1e-6, f"mismatched draft distributions passed (p = {p:.2e}): no power"

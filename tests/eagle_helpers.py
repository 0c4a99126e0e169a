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
    norm_before_residual=None, layer_ids=None, scale=3.0, head_scale=1.0, **overrides,
):  # fmt: skip
    """A random EAGLE-3 checkpoint for a base of ``vocab_size`` tokens: EAGLE's layout
    (``midlayer.*``) or the speculators' (``layers.0.*``, ``transformer_layer_config``).
    ``draft_vocab``: the base ids its head ranks (sorted; default every token).
    Returns the raw tensors (names as EAGLE's) and settings the reference reads."""
    mx.random.seed(seed)
    D, layer = EAGLE_LAYER["hidden_size"], {**EAGLE_LAYER, **overrides}
    H, KV = layer["num_attention_heads"], layer["num_key_value_heads"]
    hd, F = D // H, layer["intermediate_size"]
    ids = np.arange(vocab_size) if draft_vocab is None else np.asarray(draft_vocab)
    Vd = len(ids)

    def matrix(rows, cols):
        return mx.random.normal((rows, cols)) * cols**-0.5 * scale

    def norm():
        return 1 + 0.3 * mx.random.normal((D,))

    w = {
        "fc.weight": matrix(D, 3 * D),
        "midlayer.self_attn.q_proj.weight": matrix(H * hd, 2 * D),
        "midlayer.self_attn.k_proj.weight": matrix(KV * hd, 2 * D),
        "midlayer.self_attn.v_proj.weight": matrix(KV * hd, 2 * D),
        "midlayer.self_attn.o_proj.weight": matrix(D, H * hd),
        "midlayer.mlp.gate_proj.weight": matrix(F, D),
        "midlayer.mlp.up_proj.weight": matrix(F, D),
        "midlayer.mlp.down_proj.weight": matrix(D, F),
        "midlayer.input_layernorm.weight": norm(),
        "midlayer.hidden_norm.weight": norm(),
        "midlayer.post_attention_layernorm.weight": norm(),
        "norm.weight": norm(),
        "lm_head.weight": matrix(Vd, D) / scale * head_scale,
        "d2t": mx.array(ids - np.arange(Vd), dtype=mx.int64),
        "t2d": mx.array(np.isin(np.arange(vocab_size), ids)),
    }
    if own_embeddings:
        w["embed_tokens.weight"] = mx.random.normal((vocab_size, D))
    stored = dict(w)
    config = {"vocab_size": vocab_size, "draft_vocab_size": Vd, "num_hidden_layers": 1,
              "hidden_act": "silu", "max_position_embeddings": 2048}  # fmt: skip
    if style == "eagle":
        config.update(architectures=["LlamaForCausalLMEagle3"], **layer)
    else:
        stored = {k.replace("midlayer.", "layers.0."): v for k, v in w.items()}
        config.update(
            architectures=["Eagle3Speculator"], speculators_model_type="eagle3",
            transformer_layer_config={**layer, "vocab_size": vocab_size, "model_type": "llama"},
        )  # fmt: skip
    if norm_before_residual is not None:
        config["norm_before_residual"] = norm_before_residual
    if layer_ids is not None:
        config["eagle_aux_hidden_state_layer_ids"] = layer_ids
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), stored)
    (path / "config.json").write_text(json.dumps(config))
    return dict(w=w, layer=layer, ids=ids, norm_first=bool(norm_before_residual))


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


def _attention(w, ref, x, context=None, shift=0):
    """Causal attention of EAGLE-3's layer over all rows ``x`` ``(L, 2 D)``, by hand;
    the rows past the first ``context`` ones ``shift`` positions later (a control)."""
    layer = ref["layer"]
    H, KV = layer["num_attention_heads"], layer["num_key_value_heads"]
    L, hd = x.shape[0], layer["hidden_size"] // H
    p = "midlayer.self_attn."
    context = L if context is None else context

    def rope(y, offset):
        return mx.fast.rope(y, hd, traditional=False, base=layer["rope_theta"], scale=1.0,
                            offset=offset)  # fmt: skip

    def heads(name, n):
        y = (x @ w[p + name].T).reshape(L, n, hd).transpose(1, 0, 2)[None]
        if name == "v_proj.weight":
            return y
        return mx.concatenate(
            [rope(y[:, :, :context], 0), rope(y[:, :, context:], context + shift)], axis=2
        )

    q, k, v = heads("q_proj.weight", H), heads("k_proj.weight", KV), heads("v_proj.weight", KV)
    k, v = mx.repeat(k, H // KV, axis=1), mx.repeat(v, H // KV, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * hd**-0.5
    scores = mx.where(mx.tril(mx.ones((L, L), dtype=mx.bool_)), scores, -mx.inf)
    out = (mx.softmax(scores, axis=-1) @ v)[0].transpose(1, 0, 2).reshape(L, -1)
    return out @ w[p + "o_proj.weight"].T


def reference_levels(plain, ref, text, a, levels, layer_ids, through_fc=False,
                     normed_recursion=False, norm_first=None, path=None, shift=0):  # fmt: skip
    """The drafter's levels from rows ``0..a`` of ``text`` (row i: the base's features
    of token i and the embedding of token i + 1), then its own output and argmax for
    each deeper level (``path``: those tokens instead, a dynamic tree's node): every
    row recomputed from the raw tensors. Controls: ``through_fc`` (deeper levels'
    hidden through ``fc`` again, tiled), ``normed_recursion`` (the final norm's output
    passed on), ``norm_first`` (the other residual), ``shift`` (the deeper levels' rows
    that many positions later)."""
    w, eps = ref["w"], ref["layer"]["rms_norm_eps"]
    norm_first = ref["norm_first"] if norm_first is None else norm_first
    embed = w.get("embed_tokens.weight", plain.model.embed_tokens.weight)
    hidden = base_features(plain, text[: a + 1], layer_ids) @ w["fc.weight"].T
    tokens = list(text[1 : a + 2])
    p = "midlayer."
    wide = np.full((levels, plain.model.embed_tokens.weight.shape[0]), -np.inf, np.float32)
    for level in range(levels):
        e = mx.fast.rms_norm(embed[mx.array(tokens)], w[p + "input_layernorm.weight"], eps)
        h = mx.fast.rms_norm(hidden, w[p + "hidden_norm.weight"], eps)
        x = mx.concatenate([e, h], axis=-1)
        r = (h if norm_first else hidden) + _attention(w, ref, x, a + 1, shift)
        m = mx.fast.rms_norm(r, w[p + "post_attention_layernorm.weight"], eps)
        mlp = (mx.sigmoid(m @ w[p + "mlp.gate_proj.weight"].T) * (m @ w[p + "mlp.gate_proj.weight"].T)
               * (m @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T  # fmt: skip
        out = (r + mlp)[-1:]
        normed = mx.fast.rms_norm(out, w["norm.weight"], eps)
        small = np.array((normed @ w["lm_head.weight"].T)[0])
        wide[level, ref["ids"]] = small
        nxt = (
            ref["ids"][int(np.argmax(small))] if path is None or level >= len(path) else path[level]
        )
        passed = normed if normed_recursion else out
        if through_fc:
            passed = mx.concatenate([passed] * 3, axis=-1) @ w["fc.weight"].T
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

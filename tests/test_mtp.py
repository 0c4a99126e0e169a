"""A checkpoint's own MTP layer as a drafter (mlx_specstream.mtp): read from the
Hugging Face layout of MiMo, DeepSeek-V3, GLM-4.5, Qwen3-Next and Qwen3.5 checkpoints
(norms stored less one, experts one by one or fused), its draft levels
equal a from-scratch computation from the raw tensors at every step (with
controls: the other concatenation order, the other hidden state), greedy output
equals plain decoding, and a quantized base takes the layer from the original
checkpoint."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import (
    ARCH_ARGS,
    BASE,
    HYBRID_ARGS,
    MORE_ARGS,
    random_model,
    spec_tokens,
    word_tokenizer,
)
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models.base import create_causal_mask
from mlx_lm.utils import load as mlx_lm_load

import mlx_specstream.mtp as mtp
from mlx_specstream.config import DrafterConfig
from mlx_specstream.drafters import new_layer_cache
from mlx_specstream import load
from mlx_specstream.utils import save

V = 64
ARGS = {
    "mimo": {**BASE, **ARCH_ARGS["qwen2"]},
    # (mlx-lm's sanitize drops DeepSeek-V3's MTP layer by its real index, 61)
    "deepseek_v3": {**BASE, **MORE_ARGS["deepseek_v3"], "num_hidden_layers": 61},
    "glm4_moe": {**BASE, **MORE_ARGS["glm4_moe"]},
    # GLM-4.7-Flash: DeepSeek-V3's latent attention and experts under GLM's names
    "glm4_moe_lite": {**BASE, **MORE_ARGS["deepseek_v3"], "routed_scaling_factor": 1.0},
    # DeepSeek V3.2 and GLM-5: sparse attention (each query's top 6 keys)
    "deepseek_v32": {**BASE, **MORE_ARGS["deepseek_v32"]},
    "glm_moe_dsa": {**BASE, **MORE_ARGS["glm_moe_dsa"]},
    # (hybrids: Gated DeltaNet layers, full attention every second layer; Qwen3-Next's
    # real checkpoints have experts, which is how mlx-lm tells their layout)
    "qwen3_next": {**HYBRID_ARGS["qwen3_next"], "num_experts": 4, "num_experts_per_tok": 2},
    "qwen3_5": HYBRID_ARGS["qwen3_5"],
    "qwen3_5_moe": HYBRID_ARGS["qwen3_5_moe"],
    # window layers beside full ones (window 8, so that the MTP layer's window slides)
    "step3p5": {**BASE, **MORE_ARGS["step3p5"]},
    "mimo_v2_flash": {**BASE, **MORE_ARGS["mimo_v2_flash"]},
    "exaone_moe": {**BASE, **MORE_ARGS["exaone_moe"]},
    # ERNIE 4.5 MoE (21B-A3B's shape): experts past layer 0, tied embeddings, interleaved RoPE
    "ernie4_5_moe": {
        **BASE,
        "intermediate_size": 128,
        "max_position_embeddings": 512,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "use_bias": False,
        "tie_word_embeddings": True,
        "moe_num_experts": 4,
        "moe_k": 2,
        "moe_intermediate_size": 32,
        "moe_layer_start_index": 1,
        "moe_num_shared_experts": 1,
        "head_dim": 16,
    },
    # Nemotron 3: Mamba layers and experts; its MTP layer an attention block and experts
    "nemotron_h": {
        **HYBRID_ARGS["nemotron_h"],
        "hybrid_override_pattern": "-M*E",
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "moe_shared_expert_intermediate_size": 32,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
    },
    "bailing_hybrid": HYBRID_ARGS["bailing_hybrid"],
    "bailing_moe_v3": {
        **BASE,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "num_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "layer_group_size": 2,
        "head_dim": 16,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
    },
}
HYBRIDS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
# Ling 2.5 and Ling 3: linear attention in layers 0 and 2 (Ling 3's KDA), latent
# attention in 1 and 3, experts after layer 0; the MTP layer latent attention and experts
BAILING = ("bailing_hybrid", "bailing_moe_v3")
CHAINS = (*HYBRIDS, "nemotron_h", *BAILING)  # (recurrent layers: drafts verified as chains)
# Families whose MTP layer attends within the base's window
WINDOWED = ("step3p5", "mimo_v2_flash")
_QWEN_OWN = ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm")
# The layer's own tensors (besides the decoder layer) under each family's names.
OWN = {
    "mimo": ("token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm"),
    "deepseek_v3": ("enorm", "hnorm", "eh_proj", "shared_head.norm"),
    "glm4_moe": ("enorm", "hnorm", "eh_proj", "shared_head.norm"),
    **{
        arch: ("enorm", "hnorm", "eh_proj", "shared_head.norm")
        for arch in ("glm4_moe_lite", "deepseek_v32", "glm_moe_dsa")
    },
    **{arch: _QWEN_OWN for arch in HYBRIDS},
    "step3p5": ("enorm", "hnorm", "eh_proj", "shared_head.norm"),
    "mimo_v2_flash": ("enorm", "hnorm", "eh_proj", "final_layernorm"),
    "exaone_moe": _QWEN_OWN,
    "ernie4_5_moe": ("emb_norm.0", "hidden_norm.0", "linear_proj.0", None),  # (base's norm)
    **{arch: ("enorm", "hnorm", "eh_proj", "final_layernorm") for arch in BAILING},
    "nemotron_h": (
        "layers.0.enorm",
        "layers.0.hnorm",
        "layers.0.eh_proj",
        "layers.1.final_layernorm",
    ),
}
# The RMSNorm weights Qwen3-Next/3.5 checkpoints store less one (mlx-lm adds it back).
_LESS_ONE = (".input_layernorm.weight", ".post_attention_layernorm.weight",
             "model.norm.weight", ".q_norm.weight", ".k_norm.weight")  # fmt: skip


def _scaled(layer, scale):
    layer.update(
        tree_map_with_path(lambda p, w: w * scale if w.ndim >= 2 else w, layer.parameters())
    )


def _hf_block(arch, layer, nested=False) -> dict:
    """The decoder layer's tensors as a Hugging Face checkpoint names them: experts
    one by one (mlx-lm's ``sanitize`` stacks them on load), see :func:`_hf_tensors`;
    Step 3.5's norms less one (``nested``: one level deeper, as some of its checkpoints
    keep them), MiMo-V2-Flash's post-attention norm named ``pre_mlp_layernorm``."""
    out = _hf_tensors(arch, dict(tree_flatten(layer.parameters())))
    if arch == "step3p5":
        out = {k: w - 1.0 if k.endswith(mtp._LAYER_NORMS) else w for k, w in out.items()}
        out = {("transformer." if nested else "") + k: w for k, w in out.items()}
    if arch == "mimo_v2_flash":
        out = {k.replace("post_attention_layernorm.", "pre_mlp_layernorm."): w
               for k, w in out.items()}  # fmt: skip
    return out


def _hf_tensors(arch, weights) -> dict:
    """MLX-named tensors as a Hugging Face checkpoint stores them: experts one by one
    (Qwen3.5's fused: ``experts.gate_up_proj``, ``experts.down_proj``); for the Qwen
    hybrids RMSNorm weights less one and convolutions ``(C, 1, K)``, and Qwen3.5's
    language model under ``model.language_model``."""
    out = {}
    for name, w in weights.items():
        k = name
        if arch in HYBRIDS:
            if ("." + k).endswith(_LESS_ONE) and w.ndim == 1:
                w = w - 1.0
            if "conv1d.weight" in k:
                w = w.moveaxis(2, 1)
            k = k.replace("language_model.model.", "model.language_model.")
            k = k.replace("language_model.lm_head.", "lm_head.")
        if arch in BAILING:
            if k.endswith(".attention.unembed_out.weight"):  # (latent attention's, fused)
                continue
            if k.endswith(".attention.embed_q.weight"):
                out_w = weights[name.replace(".embed_q.", ".unembed_out.")]
                H, r = w.shape[0], w.shape[1]
                fused = mx.concatenate([w.swapaxes(-1, -2), out_w], axis=1).reshape(-1, r)
                out[k.replace(".embed_q.", ".kv_b_proj.")] = fused
                assert fused.shape[0] % H == 0
                continue
            if arch == "bailing_hybrid":  # (its router as the checkpoint names it)
                k = k.replace(".mlp.gate.gate_proj.", ".mlp.gate.")
            if "_conv1d.weight" in k:  # (Ling 3's short convolutions, (C, 1, K))
                w = w.moveaxis(1, 2)
        if ".switch_mlp." in k and arch == "qwen3_5_moe":
            if ".gate_proj." in k:  # (gate and up fused, gate first)
                up = weights[name.replace(".gate_proj.", ".up_proj.")]
                out[k.split(".switch_mlp.")[0] + ".experts.gate_up_proj"] = mx.concatenate(
                    [w, up], axis=-2
                )
            elif ".down_proj." in k:
                out[k.split(".switch_mlp.")[0] + ".experts.down_proj"] = w
        elif ".switch_mlp." in k and arch != "step3p5":  # (Step 3.5's: stacked, as MLX's)
            if arch == "nemotron_h":  # (its experts' up_proj and down_proj)
                k = k.replace(".fc1.", ".up_proj.").replace(".fc2.", ".down_proj.")
            for e in range(w.shape[0]):
                out[k.replace(".switch_mlp.", f".experts.{e}.")] = w[e]
        else:
            out[k] = w
    return out


def write_checkpoint(
    path, arch, seed=0, drop=(), vocab_size=V, weight_scale=4.0, own_head=False, nested=False,
    depths=1, **overrides,
):  # fmt: skip
    """A tiny random ``arch`` checkpoint with ``depths`` MTP layers in its family's layout
    (the DeepSeek layout's ``shared_head.head`` a copy of the base's LM head, or with
    ``own_head`` a head of its own), its config ``ARGS[arch]`` with ``overrides``.
    Returns the raw MTP pieces the reference uses (the first layer's; the others' in
    ``"deeper"``)."""
    args, V = {**ARGS[arch], **overrides}, vocab_size
    base = random_model(arch, args, V, seed=seed, weight_scale=weight_scale)
    mx.random.seed(seed + 1)
    D = mtp.text_args(base).hidden_size
    # (a final norm of ones would make its input and output alike to the MTP's own norm)
    mtp._final_norm(base).weight = 1 + 0.5 * mx.random.normal((D,))
    layout = mtp.FAMILIES[arch]
    weights = _hf_tensors(arch, dict(tree_flatten(base.parameters())))
    if arch in (*HYBRIDS, *BAILING):  # (its checkpoint's layout: read back as mlx-lm reads it)
        back = base.sanitize(dict(weights))
        want = dict(tree_flatten(base.parameters()))
        assert back.keys() == want.keys(), sorted(set(back) ^ set(want))
        assert all(np.allclose(back[k], want[k], atol=1e-6) for k in want)
    refs = []
    for d in range(depths):
        block = mtp.mtp_decoder_layer(base)
        _scaled(block, 4.0)
        names = OWN[arch]
        own = {
            names[0]: 1 + 0.1 * mx.random.normal((D,)),
            names[1]: 1 + 0.1 * mx.random.normal((D,)),
            names[2]: mx.random.normal((D, 2 * D)) * (2 * D) ** -0.5 * 4,
            names[3]: 1 + 0.1 * mx.random.normal((D,)),
        }
        if names[3] is None:  # (no final norm of its own: the base's)
            own[None] = mtp._final_norm(base).weight
        prefix = mtp.depth_prefix(layout, mtp.text_args(base).num_hidden_layers, d)
        less_one = 1.0 if arch in (*HYBRIDS, "step3p5") else 0.0  # (stored less one)
        weights.update({f"{prefix}{n}.weight": w - less_one * (w.ndim == 1)
                        for n, w in own.items() if n is not None})  # fmt: skip
        block_prefix = prefix + layout.layer
        weights.update({block_prefix + k: w for k, w in _hf_block(arch, block, nested).items()})
        head = None
        if layout.head and arch not in BAILING:  # the layer's copy of the embeddings (not
            # read), and its head (Ling's checkpoints store neither: vLLM shares the base's)
            weights[prefix + "embed_tokens.weight"] = base.model.embed_tokens.weight
            head = mx.random.normal((V, D)) * D**-0.5 if own_head else base.lm_head.weight
            weights[prefix + layout.head + ".weight"] = head
        for k in drop if d == 0 else ():
            weights.pop(prefix + k)
        refs.append(
            dict(
                norms=(own[names[0]], own[names[1]], own[names[3]]),
                proj=own[names[2]],
                block=block,
                hidden_first=layout.hidden_first,
                normed_hidden=layout.normed_hidden,
                recurse_normed=layout.recurse_normed,
                chain_layers=layout.chain_layers,
                zero_first=layout.zero_first,
                window=mtp.layer_window(block, mtp.text_args(base)),
                head=head if own_head else None,
            )
        )
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = {**args, "model_type": arch, "vocab_size": V, "num_nextn_predict_layers": depths}
    if arch == "mimo_v2_flash":  # (its config declares none: its safetensors tell)
        config.pop("num_nextn_predict_layers")
    if arch == "exaone_moe":
        config.setdefault("mtp_layer_types", ["full_attention"])
    if arch == "bailing_moe_v3":  # (Ling 3's config: mlx-lm loads it as bailing_moe_v3)
        config.update(model_type="bailing_hybrid", architectures=["BailingMoeV3ForCausalLM"])
    if "text_config" in args:  # (Qwen3.5: its count in the language model's config)
        config.pop("num_nextn_predict_layers")
        text = {**args["text_config"], "vocab_size": V, "mtp_num_hidden_layers": 1}
        config["text_config"] = text
    (path / "config.json").write_text(json.dumps(config))
    word_tokenizer(V)._tokenizer.save_pretrained(str(path))
    return {**refs[0], "deeper": refs[1:]}


def reference_levels(
    plain, ref, text, a, levels, swap=False, other_hidden=False, no_window=False,
    other_recursion=False, path=None,
):  # fmt: skip
    """From the raw tensors and mlx-lm's own modules, from scratch: the MTP rows
    0..a over ``text`` (row i: token i's last hidden state, token i + 1's
    embedding, zeroed at position 0 where the family does), level 1 at row a, then the
    layer again on its own output and each level's argmax; a window layer's rows see
    their last ``window`` keys. ``swap`` / ``other_hidden`` / ``no_window`` are the
    controls: the other concatenation order, the other side of the final norm, every key;
    ``other_recursion``: deeper levels on the other side of the layer's final norm.
    ``path``: the tokens the deeper levels read instead of each level's argmax (a tree
    node's path below the root; ``levels`` then unused: one more than its length)."""
    eps = mtp._norm_eps(mtp.text_args(plain))
    e_w, h_w, f_w = ref["norms"]
    inner = plain.model if hasattr(plain, "model") else plain.backbone  # (Nemotron-H's names)
    norm_name = "norm" if "norm" in inner else "norm_f"
    embed = next(inner[n] for n in ("embed_tokens", "embeddings", "word_embeddings") if n in inner)
    norm = inner[norm_name]
    setattr(inner, norm_name, lambda x: x)  # (the base's pass, before its final norm)
    try:
        hid = inner(mx.array(text[: a + 1])[None])[0]
    finally:
        setattr(inner, norm_name, norm)
    if ref["normed_hidden"] != other_hidden:
        hid = norm(hid)
    head = mtp._lm_head(plain)
    if ref["head"] is not None:  # the layer's own head
        head = lambda x, w=ref["head"]: x @ w.T  # noqa: E731

    def rows(hidden, emb, cache):
        pair = [mx.fast.rms_norm(hidden, h_w, eps), mx.fast.rms_norm(emb, e_w, eps)]
        if ref["hidden_first"] == swap:
            pair = pair[::-1]
        x = (mx.concatenate(pair, axis=-1) @ ref["proj"].T)[None]
        n, window = x.shape[1], None if no_window else ref["window"]
        mask = create_causal_mask(n, offset=cache.offset, window_size=window)
        out = ref["block"](x, mask if n > 1 or window else None, cache)
        return (out[0] if isinstance(out, tuple) else out)[0, -1:]

    emb = embed(mx.array(text[1 : a + 2]))
    if ref["zero_first"]:
        emb = mx.concatenate([mx.zeros_like(emb[:1]), emb[1:]])
    cache = new_layer_cache(ref["block"])  # (DeepSeek V3.2's: latent and indexer keys)
    out = rows(hid, emb, cache)
    logits = [head(mx.fast.rms_norm(out, f_w, eps))]
    for t in [None] * (levels - 1) if path is None else path:
        t = mx.argmax(logits[-1], axis=-1) if t is None else mx.array([t])
        prev = mx.fast.rms_norm(out, f_w, eps) if ref["recurse_normed"] != other_recursion else out
        out = rows(prev, embed(t), cache)
        logits.append(head(mx.fast.rms_norm(out, f_w, eps)))
    return np.array(mx.concatenate(logits).astype(mx.float32))


def _drafts_of_each_step(model, monkeypatch, chains=False, check_state=None, prompt=None,
                         **tree):  # fmt: skip
    """The greedy text of a fixed prompt and 24 tokens, and for each step's draft: the
    levels' logits, the last row ``a`` of the accepted text, the bonus token and the rows
    the drafter has (``check_state(state)`` runs on its state after each draft)."""
    seen, real_draft = [], mtp.MTPDrafter.draft

    def recording(self, rt, state, hidden, path, path_tokens, token, levels=None):
        logits = real_draft(self, rt, state, hidden, path, path_tokens, token, levels)
        # (the tree verifier: committed prefix + accepted nodes - 1; chains: the last row)
        a = state.offset - 1 if chains else rt._tree[4] + len(path) - 1
        seen.append((np.array(logits.astype(mx.float32)), a, token, state.offset))
        if check_state is not None:
            check_state(state)
        return logits

    monkeypatch.setattr(mtp.MTPDrafter, "draft", recording)
    prompt = [4, 8, 15, 16, 23] if prompt is None else prompt
    toks, _ = spec_tokens(model, prompt, 24, **tree)
    monkeypatch.undo()
    return prompt + toks, seen


def _check_each_step(text, seen, reference, levels=None):
    """Each step's levels (but the last step's, unused) equal ``reference(a, levels)``."""
    checked = 0
    for logits, a, token, offset in seen:
        if a + 1 >= len(text):
            continue  # the drafts of the very last step go unused
        assert text[a + 1] == token and offset == a + 1  # real rows 0..a only
        assert levels is None or logits.shape[0] == levels
        want = reference(a, logits.shape[0])
        np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize(
    "arch,own_head",
    [("mimo", False), ("deepseek_v3", False), ("glm4_moe", False), ("glm4_moe", True)]
    + [(arch, False) for arch in ("glm4_moe_lite", "deepseek_v32", "glm_moe_dsa")]
    + [("glm_moe_dsa", "no head")]
    + [(arch, False) for arch in HYBRIDS]
    + [("step3p5", True), ("step3p5", "nested"), ("mimo_v2_flash", False), ("exaone_moe", False)]
    + [("nemotron_h", False), ("ernie4_5_moe", False)]
    + [(arch, False) for arch in BAILING],
)
def test_every_draft_equals_the_raw_tensors_from_scratch(arch, own_head, tmp_path, monkeypatch):
    """Each step's draft levels (the cached MTP rows of the accepted text, the
    recursion's rows trimmed after) equal a from-scratch computation from the
    checkpoint's raw tensors; the other concatenation order and the other hidden
    state (before/after the base's final norm) do not. A head of the layer's own is
    used; a copy of the base's is not kept. On the hybrids (chains through the
    model's own passes: recurrent.DrafterChains) the rows come from each pass and
    prompt chunk by position."""
    # (Step 3.5's layer one level deeper; GLM-5's checkpoints without the layer's head)
    nested, absent = own_head == "nested", own_head == "no head"
    own_head = own_head is True or nested
    drop = ("shared_head.head.weight",) if absent else ()
    ref = write_checkpoint(tmp_path / "ckpt", arch, own_head=own_head, nested=nested, drop=drop)
    model, _ = load(str(tmp_path / "ckpt"))
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    drafter = model.speculative_streams.drafter
    assert isinstance(drafter, mtp.MTPDrafter)
    assert ("head" in drafter) == own_head
    text, seen = _drafts_of_each_step(model, monkeypatch, chains=arch in CHAINS)
    _check_each_step(text, seen, lambda a, levels: reference_levels(plain, ref, text, a, levels))
    logits, a, _, _ = seen[1]
    controls = [dict(swap=True), dict(other_hidden=True), dict(other_recursion=True)]
    if arch in WINDOWED:  # (a step past the window's first slide)
        logits, a, _, _ = next(x for x in seen if x[1] + 1 > ref["window"] + 2)
        controls.append(dict(no_window=True))
    for control in controls:
        wrong = reference_levels(plain, ref, text, a, logits.shape[0], **control)
        assert not np.allclose(logits, wrong, atol=1e-2), control


def reference_depths(
    plain, ref, text, a, levels, unshifted=False, one_layer=False, other_chain=False, layers=None
):
    """From scratch, with the rows the layers were trained on: MTP layer ``k`` (1..K)
    over rows 0..a, row ``i`` reading layer ``k - 1``'s output at ``i`` (on the side of
    its final norm the family passes on; layer 1: the base's state) and token ``i + k``'s
    embedding, the tokens past ``a + 1`` the levels drafted so far; level ``k`` at row
    ``a``; the levels past K the last layer again on its own output. Controls:
    ``unshifted`` (every layer reads token ``i + 1``), ``one_layer`` (the first layer
    alone, run again for each level), ``other_chain`` (every layer reading the base's
    state where the family chains them, and the other way round). ``layers``: the first
    ones only (default: all)."""
    eps = mtp._norm_eps(mtp.text_args(plain))
    inner = plain.model
    norm = inner.norm
    inner.norm = lambda x: x
    try:
        hid = inner(mx.array(text[: a + 1])[None])[0]
    finally:
        inner.norm = norm
    hid = norm(hid) if ref["normed_hidden"] else hid
    depths = ([ref] + ref["deeper"])[: 1 if one_layer else layers]

    def run(r, hidden, emb, cache):
        pair = [mx.fast.rms_norm(hidden, r["norms"][1], eps),
                mx.fast.rms_norm(emb, r["norms"][0], eps)]  # fmt: skip
        x = mx.concatenate(pair[::-1] if not r["hidden_first"] else pair, -1) @ r["proj"].T
        n = x.shape[0]
        mask = create_causal_mask(n, offset=cache.offset, window_size=r["window"])
        out = r["block"](x[None], mask if n > 1 or r["window"] else None, cache)
        return (out[0] if isinstance(out, tuple) else out)[0]

    def logits_of(r, out):
        head = mtp._lm_head(plain) if r["head"] is None else (lambda x: x @ r["head"].T)
        return head(mx.fast.rms_norm(out, r["norms"][2], eps))

    def passed(r, out):
        return mx.fast.rms_norm(out, r["norms"][2], eps) if r["recurse_normed"] else out

    known = inner.embed_tokens(mx.array(text[1 : a + 2]))  # (tokens 1 .. a + 1)
    drafted, logits, h = [], [], hid
    for k, r in enumerate(depths[:levels]):
        shift = 0 if unshifted else k
        e = mx.concatenate([known] + drafted)[shift : shift + a + 1]
        if r["zero_first"]:
            e = mx.concatenate([mx.zeros_like(e[:1]), e[1:]])
        cache = new_layer_cache(r["block"])
        out = run(r, h, e, cache)
        logits.append(logits_of(r, out[-1:]))
        drafted.append(inner.embed_tokens(mx.argmax(logits[-1], axis=-1)))
        h = passed(r, out) if r["chain_layers"] != other_chain else hid
    last = depths[-1]
    while len(logits) < levels:  # (the last layer, at the next positions)
        out = run(last, passed(last, out[-1:]), drafted[-1], cache)
        logits.append(logits_of(last, out))
        drafted.append(inner.embed_tokens(mx.argmax(logits[-1], axis=-1)))
    return np.array(mx.concatenate(logits).astype(mx.float32))


def _attach_depths(path, levels, layers=3):
    """An mlx-lm model of ``path`` with ``layers`` of its MTP layers drafting a chain of
    ``levels``."""
    model, _ = mlx_lm_load(str(path))
    config = DrafterConfig(kind="mtp", num_draft_tokens=max(levels, layers),
                           num_mtp_layers=layers, top_k=1, max_tree_nodes=levels + 1)  # fmt: skip
    mtp.attach_mtp(model, path, config)
    return model


@pytest.mark.parametrize(
    "arch,own_head,levels",
    [("step3p5", True, 3), ("mimo_v2_flash", False, 3), ("mimo", False, 3)]
    + [("step3p5", True, 2), ("step3p5", True, 4), ("mimo", False, 5)],
)
def test_several_mtp_layers_draft_as_they_were_trained(arch, own_head, levels, tmp_path,
                                                       monkeypatch):  # fmt: skip
    """With three MTP layers (Step 3.5's, MiMo-V2-Flash's), every step's levels equal the
    layers run from scratch over the accepted text, layer ``k``'s row ``i`` reading layer
    ``k - 1``'s output (MiMo-V2-Flash's: the base's state) and token ``i + k`` (drafted
    where not yet known), as DeepSeek-V3's MTP modules are trained; levels past the third
    run the last layer again. Controls: the first layer alone run again (one layer's
    drafts), every layer reading token ``i + 1``, and the other chaining. ``load`` takes
    all three by default, and the output is mlx-lm's."""
    ref = write_checkpoint(tmp_path / "ckpt", arch, own_head=own_head, depths=3)
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    model = _attach_depths(tmp_path / "ckpt", levels)
    drafter = model.speculative_streams.drafter
    assert len(drafter.all_depths) == 3
    assert all(("head" in d) == own_head for d in drafter.all_depths)

    def check_state(state):  # (the layers a tree of these levels reads: min(3, levels))
        assert len(state.cache.caches) == min(3, levels)
        assert all(c.offset == state.cache.offset for c in state.cache.caches)
        assert state.cache.offset == max(0, state.offset - min(2, levels - 1))  # (rows held)

    tree = dict(tree_top_k=1, tree_depth=levels, max_tree_nodes=levels + 1)
    text, seen = _drafts_of_each_step(model, monkeypatch, check_state=check_state, **tree)
    _check_each_step(text, seen, lambda a, n: reference_depths(plain, ref, text, a, n), levels)
    toks, prompt = text[5:], text[:5]
    logits, a, _, _ = next(x for x in seen if x[1] >= 8)
    for control in (dict(one_layer=True), dict(unshifted=True), dict(other_chain=True)):
        wrong = reference_depths(plain, ref, text, a, levels, **control)
        assert not np.allclose(logits[1:], wrong[1:], atol=1e-2), control
    from mlx_lm.generate import generate_step

    want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(24))]
    assert toks == want
    if levels == 3:  # (load: every layer the checkpoint has)
        loaded, _ = load(str(tmp_path / "ckpt"))
        assert len(loaded.speculative_streams.drafter.all_depths) == 3
        assert loaded.speculative_streams.config.num_mtp_layers == 3


@pytest.mark.parametrize("arch", sorted(ARGS))
def test_greedy_equals_plain_decoding(arch, tmp_path):
    write_checkpoint(tmp_path / "ckpt", arch, seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    for prompt in ([3], [1, 5, 9, 3, 7, 2, 11]):
        from mlx_lm.generate import generate_step

        want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(40))]
        got, _ = spec_tokens(model, prompt, 40)
        assert got == want


def test_negative_control_a_wrong_verifier_is_caught(tmp_path, monkeypatch):
    """Accepting every draft unchecked changes the output: the equality above can fail."""
    import mlx_specstream.decode as decode

    write_checkpoint(tmp_path / "ckpt", "mimo", seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    plain_toks, _ = spec_tokens(model, [1, 5, 9], 30)

    def accept_all(tokens, parents, ancestors, targets, depth):
        return None, mx.array(tokens.shape[0] - 1)

    monkeypatch.setattr(decode, "_accept", accept_all)
    wrong, _ = spec_tokens(model, [1, 5, 9], 30)
    assert wrong != plain_toks


def test_quantized_base_takes_the_layer_from_the_checkpoint(tmp_path):
    """A 4-bit copy of the base (mlx_lm.convert's output: no MTP tensors) refuses
    to load alone, naming the way out; with ``drafter=`` the checkpoint, its MTP
    layer is quantized like the base and decoding equals the 4-bit base's own; saved into
    one directory with its quantized layer, it loads back equal without the checkpoint."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import save_config, save_model

    write_checkpoint(tmp_path / "ckpt", "mimo", seed=3)
    base, tok, config = mlx_lm_load(str(tmp_path / "ckpt"), return_config=True)
    nn.quantize(base, group_size=32, bits=4)
    q = tmp_path / "q4"
    q.mkdir()
    save_model(q, base)
    save_config({**config, "quantization": {"group_size": 32, "bits": 4}}, q / "config.json")
    tok.save_pretrained(str(q))
    with pytest.raises(ValueError, match="declares 1 MTP layer.*drafter="):
        load(str(q))
    model, _ = load(str(q), drafter=str(tmp_path / "ckpt"))
    drafter = model.speculative_streams.drafter
    assert isinstance(drafter.proj, nn.QuantizedLinear)
    plain, _ = mlx_lm_load(str(q))
    prompt = [1, 5, 9, 3, 7, 2, 11]
    want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(40))]
    got, _ = spec_tokens(model, prompt, 40)
    assert got == want
    # Saved with its quantized layer (one directory, no checkpoint needed): loads back equal
    save(
        tmp_path / "out",
        model,
        tok,
        config={**config, "quantization": {"group_size": 32, "bits": 4}},
    )
    again, _ = load(str(tmp_path / "out"))
    a = dict(tree_flatten(drafter.parameters()))
    b = dict(tree_flatten(again.speculative_streams.drafter.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    assert isinstance(again.speculative_streams.drafter.proj, nn.QuantizedLinear)
    assert spec_tokens(again, prompt, 40)[0] == want


def _quantized_copy(ckpt, out):
    """``out``: the base of ``ckpt`` in 4 bits, as mlx_lm.convert writes it (no MTP layer)."""
    from mlx_lm.utils import save_config, save_model

    base, tok, config = mlx_lm_load(str(ckpt), return_config=True)
    nn.quantize(base, group_size=32, bits=4)
    out.mkdir()
    save_model(out, base)
    save_config({**config, "quantization": {"group_size": 32, "bits": 4}}, out / "config.json")
    tok.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("own_head", [False, True])
def test_the_layers_head_quantized_base(own_head, tmp_path):
    """With a 4-bit base, a copy of the base's head is recognised once quantized the
    same way (not kept); a head of the layer's own is kept, quantized like the base;
    decoding equals the 4-bit base's own either way."""
    from mlx_lm.generate import generate_step

    write_checkpoint(tmp_path / "ckpt", "glm4_moe", seed=3, own_head=own_head)
    q = _quantized_copy(tmp_path / "ckpt", tmp_path / "q4")
    model, _ = load(str(q), drafter=str(tmp_path / "ckpt"))
    drafter = model.speculative_streams.drafter
    assert ("head" in drafter) == own_head
    if own_head:
        assert isinstance(drafter.head, nn.QuantizedLinear)
    plain, tok, config = mlx_lm_load(str(q), return_config=True)
    prompt = [1, 5, 9, 3, 7, 2, 11]
    want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(30))]
    assert spec_tokens(model, prompt, 30)[0] == want
    save(tmp_path / "out", model, tok, config=config)  # (the quantized head saved and read back)
    again = load(str(tmp_path / "out"))[0].speculative_streams.drafter
    assert ("head" in again) == own_head
    assert not own_head or isinstance(again.head, nn.QuantizedLinear)
    a, b = dict(tree_flatten(drafter.parameters())), dict(tree_flatten(again.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch,own_head", [("deepseek_v3", False), ("glm4_moe", True)])
def test_save_writes_a_directory_that_loads_back(arch, own_head, tmp_path):
    write_checkpoint(tmp_path / "ckpt", arch, seed=3, own_head=own_head)
    model, tok, config = load(str(tmp_path / "ckpt"), return_config=True)
    save(tmp_path / "out", model, tok, config=config)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["drafter"]["kind"] == "mtp"
    again, _ = load(str(tmp_path / "out"))
    assert ("head" in again.speculative_streams.drafter) == own_head
    a = dict(tree_flatten(model.speculative_streams.drafter.parameters()))
    b = dict(tree_flatten(again.speculative_streams.drafter.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    prompt = [1, 5, 9]
    assert spec_tokens(again, prompt, 30)[0] == spec_tokens(model, prompt, 30)[0]


def test_bad_checkpoints_get_clear_errors(tmp_path):
    write_checkpoint(tmp_path / "no_proj", "mimo", drop=("input_proj.weight",))
    with pytest.raises(ValueError, match=r"no 'model\.mtp_layers\.0\.input_proj\.weight'"):
        load(str(tmp_path / "no_proj"))
    write_checkpoint(tmp_path / "no_mlp", "mimo", drop=("mlp.down_proj.weight",))
    with pytest.raises(
        ValueError, match="(?s)no_mlp: its MTP layer does not fit.*layer.mlp.down_proj"
    ):
        load(str(tmp_path / "no_mlp"))
    with pytest.raises(ValueError, match="model_type 'llama' has no MTP layout"):
        mtp.mtp_layout("llama")
    # (Step 3.5's layers have heads of their own: one missing is not the base's)
    write_checkpoint(tmp_path / "no_head", "step3p5", own_head=True,
                     drop=("shared_head.output.weight",))  # fmt: skip
    with pytest.raises(ValueError, match=r"no 'model\.layers\.4\.shared_head\.output\.weight'"):
        load(str(tmp_path / "no_head"))


def test_sampling_keeps_the_distribution(tmp_path, monkeypatch):
    """Recursive rejection over MTP drafts (levels past the first drawn from logits
    that followed the first level's argmax) samples the model's distribution;
    control: each level verified against the next level's draft distribution."""
    from chi_square import chi_square_pvalue
    from test_sampling import exact_distribution, sample_counts, verify_against_the_next_level_s_q

    from mlx_specstream.sample_utils import make_sampler

    # (2 layers, 4 before, keep the draws cheap: the control's p 7.5e-79, 0.0 before)
    write_checkpoint(tmp_path / "ckpt", "mimo", seed=5, vocab_size=6, weight_scale=1.0,
                     num_hidden_layers=2)  # fmt: skip
    model, _ = load(str(tmp_path / "ckpt"))
    sampler, n = make_sampler(temp=1.0), 1500
    exact = exact_distribution(model, sampler)
    kwargs = dict(acceptance="rejection", tree_top_k=2, max_tree_nodes=6)
    counts = sample_counts(model, sampler, n, **kwargs)
    p = chi_square_pvalue(counts, exact, n)
    assert p > 1e-3, f"chi-square p = {p:.2e}"
    verify_against_the_next_level_s_q(monkeypatch)
    p = chi_square_pvalue(sample_counts(model, sampler, n, **kwargs), exact, n)
    assert p < 1e-6, f"mismatched draft distributions passed (p = {p:.2e}): no power"


def test_the_command_line_takes_the_layer_from_the_checkpoint(tmp_path, capsys):
    """``mlx_specstream.generate --model Q4 --drafter CHECKPOINT`` drafts with the
    checkpoint's MTP layer (drafted tokens reported) and prints the 4-bit base's text."""
    from mlx_lm.generate import generate as mlx_lm_generate

    import importlib

    gen_mod = importlib.import_module("mlx_specstream.generate")  # (not the function so named)
    write_checkpoint(tmp_path / "ckpt", "mimo", seed=3)
    q = _quantized_copy(tmp_path / "ckpt", tmp_path / "q4")
    prompt = "t1 t5 t9 t3"
    argv = ["--model", str(q), "--drafter", str(tmp_path / "ckpt"), "--prompt", prompt,
            "--max-tokens", "24", "--ignore-chat-template", "--verbose", "True"]  # fmt: skip
    gen_mod.main(argv)
    out = capsys.readouterr().out
    plain, tok = mlx_lm_load(str(q))
    assert mlx_lm_generate(plain, tok, prompt=tok.encode(prompt), max_tokens=24) in out
    other = tmp_path / "other"
    write_checkpoint(other, "glm4_moe")
    with pytest.raises(ValueError, match="different base"):
        load(str(q), drafter=str(other))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_only_the_trees_levels_are_drafted(depth, tmp_path, monkeypatch):
    """Each level is one more run of the layer: a tree of ``depth`` levels runs it
    ``depth`` times per step (the first step also over the prompt's rows)."""
    write_checkpoint(tmp_path / "ckpt", "mimo", seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    runs, real = [], mtp.MTPDrafter.step
    monkeypatch.setattr(
        mtp.MTPDrafter, "step", lambda self, *a: runs.append(a[0].shape[0]) or real(self, *a)
    )
    drafts = []
    real_draft = mtp.MTPDrafter.draft
    monkeypatch.setattr(
        mtp.MTPDrafter, "draft", lambda self, *a, **k: drafts.append(1) or real_draft(self, *a, **k)
    )
    spec_tokens(model, [1, 5, 9, 3], 20, tree_top_k=1, tree_depth=depth, max_tree_nodes=depth + 1)
    assert len(runs) == depth * len(drafts) and len(drafts) > 3


def test_the_tuner_tries_the_layers_trees_and_never_writes_into_the_checkpoint(tmp_path, capsys):
    """``mlx_specstream.tune`` on a checkpoint tunes its MTP layer's trees (not only
    prompt lookup, as for a plain model) and never writes into the checkpoint: its files
    are the user's (``--save`` keeps the flags in the user's store)."""
    import importlib

    tune = importlib.import_module("mlx_specstream.tune")
    write_checkpoint(tmp_path / "ckpt", "mimo", seed=3)
    (tmp_path / "ckpt" / "prompts.jsonl").write_text(json.dumps({"prompt": "t1 t5 t9 t3"}) + "\n")
    before = (tmp_path / "ckpt" / "config.json").read_text()
    argv = ["--model", str(tmp_path / "ckpt"), "--num-prompts", "1", "--max-tokens", "8",
            "--confirm-rounds", "0", "--batch-size", "0"]  # fmt: skip
    tune.main(argv)
    out = capsys.readouterr().out
    assert "tree_depth" in out and "its files are not written" in out
    assert re.search(r"to decode so, pass: (--no-speculation|--draft ngram|.*--tree-depth \d)", out)
    tune.main(argv + ["--save"])
    assert "where a call names no drafting flag" in capsys.readouterr().out
    assert (tmp_path / "ckpt" / "config.json").read_text() == before


def _on_a_fake_hub(repo, shard_of, tmp_path, monkeypatch) -> list:
    """Puts checkpoint ``repo`` on a fake Hub as ``org/ckpt``, each tensor in shard
    ``shard_of(key)`` (1, 2, ...) of an index; returns the list of the files downloaded."""
    import fnmatch
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    weights = mx.load(str(repo / "model.safetensors"))
    (repo / "model.safetensors").unlink()
    n = max(shard_of(k) for k in weights)
    weight_map = {k: f"model-{shard_of(k):05d}-of-{n:05d}.safetensors" for k in weights}
    for f in set(weight_map.values()):
        mine = {k: v for k, v in weights.items() if weight_map[k] == f}
        mx.save_safetensors(str(repo / f), mine, metadata={"format": "pt"})
    (repo / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fetched = []

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        assert repo_id == "org/ckpt"
        return str(repo / filename)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        out = tmp_path / "snapshot"
        out.mkdir(exist_ok=True)
        for f in sorted(repo.iterdir()):
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, out / f.name)
                fetched.append(f.name)
        return str(out)

    def get_safetensors_metadata(repo_id, revision=None, **kwargs):
        tensors = {f: mx.load(str(repo / f)) for f in set(weight_map.values())}
        shapes = {f: SimpleNamespace(tensors={k: SimpleNamespace(shape=list(v.shape))
                                              for k, v in t.items()}) for f, t in tensors.items()}  # fmt: skip
        return SimpleNamespace(weight_map=weight_map, files_metadata=shapes)

    for name, fake in [("hf_hub_download", hf_hub_download), ("snapshot_download", snapshot_download),
                       ("get_safetensors_metadata", get_safetensors_metadata)]:  # fmt: skip
        monkeypatch.setattr(huggingface_hub, name, fake)
    return fetched


def test_a_hub_checkpoint_gives_only_the_shards_of_its_mtp_layer(tmp_path, monkeypatch):
    """``drafter=`` a Hub repo (a 4-bit copy's user has the base already): only its JSON
    files and the shard holding the MTP layer are downloaded, not the base's shards; the
    norms follow the layout told from every shard's header (read on the Hub, here a
    local folder), so the layer equals the one read from the whole checkpoint."""
    import huggingface_hub
    from mlx_lm.generate import generate_step

    repo = tmp_path / "hub"  # the repo on the Hub: the base in one shard, the MTP layer in another
    write_checkpoint(repo, "qwen3_5", seed=3)
    fetched = _on_a_fake_hub(repo, lambda k: 1 + k.startswith("mtp."), tmp_path, monkeypatch)
    q = _quantized_copy(repo, tmp_path / "q4")
    model, _ = load(str(q), drafter="org/ckpt")
    assert "model-00001-of-00002.safetensors" not in fetched
    assert "model-00002-of-00002.safetensors" in fetched
    whole, _ = load(str(q), drafter=str(repo))
    a = dict(tree_flatten(model.speculative_streams.drafter.parameters()))
    b = dict(tree_flatten(whole.speculative_streams.drafter.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    plain, _ = mlx_lm_load(str(q))
    prompt = [1, 5, 9, 3, 7, 2, 11]
    want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(24))]
    assert spec_tokens(model, prompt, 24)[0] == want
    # Offline (the headers cannot be read on the Hub): the whole checkpoint, as any model.
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))  # fmt: skip
    fetched.clear()
    with pytest.warns(UserWarning, match="fetching the whole checkpoint"):
        again, _ = load(str(q), drafter="org/ckpt")
    assert "model-00001-of-00002.safetensors" in fetched
    c = dict(tree_flatten(again.speculative_streams.drafter.parameters()))
    assert all(mx.array_equal(a[k], c[k]) for k in a)


def test_the_layers_are_built_as_the_engines_build_them():
    """Step 3.5's MTP layer (index 45+, past its config's per-layer lists) attends within
    the window with a dense MLP; MiMo-V2-Flash's within the window with its sinks, dense;
    K-EXAONE's to every key without RoPE, dense; the drafter's mask follows the window."""
    from mlx_lm.models import ernie4_5_moe, exaone_moe, mimo_v2_flash, step3p5

    from mlx_specstream.config import DrafterConfig

    def made(arch):
        base = random_model(arch, ARGS[arch], V)
        layer = mtp.mtp_decoder_layer(base)
        drafter = mtp.MTPDrafter(DrafterConfig(kind="mtp", **mtp.MTP_DEFAULTS), base)
        return layer, drafter._window

    layer, window = made("step3p5")  # (its layer_types end at layer 3: read as NeMo fills them)
    assert layer.is_sliding and not layer.is_moe_layer and window == 8
    assert isinstance(layer.mlp, step3p5.Step3p5MLP)
    layer, window = made("mimo_v2_flash")
    assert layer.is_sliding_window and window == 8 and isinstance(layer.mlp, mimo_v2_flash.MLP)
    assert layer.self_attn.attention_sink_bias is not None
    layer, window = made("exaone_moe")
    assert not layer.is_sliding_window and window is None
    assert not layer.self_attn.use_rope and isinstance(layer.mlp, exaone_moe.MLP)
    layer, window = made("nemotron_h")  # (an attention block, then an experts block)
    assert [b.block_type for b in layer.layers] == ["*", "E"] and window is None
    layer, window = made("ernie4_5_moe")  # (past the experts' last layer: dense)
    assert isinstance(layer.mlp, ernie4_5_moe.Ernie4_5_MLP) and window is None
    layer, window = made("glm4_moe")  # (DeepSeek's layout: the base's next layer, as before)
    assert window is None and "switch_mlp" in layer.mlp
    # Ling 2.5 and Ling 3 (their last base layers linear attention in a group of 2 with
    # layer 3 latent): latent attention and experts, as vLLM builds them
    from mlx_lm.models import bailing_hybrid, bailing_moe_v3

    layer, window = made("bailing_hybrid")
    assert layer.is_global and isinstance(layer.attention, bailing_hybrid.MultiLatentAttention)
    assert isinstance(layer.mlp, bailing_hybrid.SparseMoeBlock) and window is None
    layer, window = made("bailing_moe_v3")
    assert not layer.is_linear and isinstance(layer.attention, bailing_moe_v3.BailingMLA)
    assert isinstance(layer.mlp, bailing_moe_v3.BailingSparseMoE) and window is None


def test_ling_2_5_zeroes_the_first_embedding_and_ling_3_does_not(tmp_path):
    """vLLM's Ling 2.5 MTP layer reads no embedding at position 0, its Ling 3 layer does:
    a Ling 3 config (``bailing_hybrid``, BailingMoeV3ForCausalLM) loads into mlx-lm's
    ``bailing_moe_v3`` and takes that family's layout; both normalize the layer's output
    for the next level (vLLM's MTP layers return final_layernorm's)."""
    write_checkpoint(tmp_path / "v3", "bailing_moe_v3")
    model, _ = load(str(tmp_path / "v3"))
    assert type(model).__module__ == "mlx_lm.models.bailing_moe_v3"
    assert model.args.model_type == "bailing_hybrid" and mtp.model_family(model) == "bailing_moe_v3"
    layouts = {arch: mtp.FAMILIES[arch] for arch in BAILING}
    assert layouts["bailing_hybrid"].zero_first and not layouts["bailing_moe_v3"].zero_first
    assert all(layout.recurse_normed and layout.normed_hidden for layout in layouts.values())
    assert model.speculative_streams.drafter._layout == layouts["bailing_moe_v3"]


def test_a_layer_of_other_settings_is_refused_by_name(tmp_path):
    write_checkpoint(tmp_path / "ckpt", "exaone_moe", mtp_layer_types=["sliding_attention"])
    with pytest.raises(
        ValueError, match=r"config.json: mtp_layer_types is \['sliding_attention'\]"
    ):
        load(str(tmp_path / "ckpt"))
    write_checkpoint(tmp_path / "nemo", "nemotron_h", mtp_hybrid_override_pattern="*-")
    with pytest.raises(ValueError, match="mtp_hybrid_override_pattern is '\\*-'"):
        load(str(tmp_path / "nemo"))


def test_an_fp8_projection_is_dequantized_by_the_base_s_sanitize(tmp_path):
    """MiMo-V2-Flash's checkpoints are FP8 with 128 x 128 block scales: the MTP layer's
    projection and decoder layer are read dequantized (scales of 0.5 and 2: not ones)."""
    ref = write_checkpoint(tmp_path / "ckpt", "mimo_v2_flash", seed=3)
    file = tmp_path / "ckpt" / "model.safetensors"
    weights = dict(mx.load(str(file)))
    want = {}
    for key, scale in (("model.mtp.layers.0.eh_proj.weight", 0.5),
                       ("model.mtp.layers.0.self_attn.q_proj.weight", 2.0)):  # fmt: skip
        w = weights[key]
        stored = mx.to_fp8(w / scale)
        weights[key] = stored
        weights[key + "_scale_inv"] = mx.full(((w.shape[0] + 127) // 128, 1), scale)
        want[key] = mx.from_fp8(stored, dtype=mx.bfloat16) * scale
    mx.save_safetensors(str(file), weights, metadata={"format": "mlx"})
    model, _ = load(str(tmp_path / "ckpt"))
    drafter = model.speculative_streams.drafter
    proj = want["model.mtp.layers.0.eh_proj.weight"]
    assert mx.array_equal(drafter.proj.weight, proj.astype(mx.bfloat16))
    unscaled = mx.from_fp8(mx.to_fp8(ref["proj"] / 0.5), dtype=mx.bfloat16)  # (scale not applied)
    assert not mx.allclose(drafter.proj.weight, unscaled, atol=1e-3).item()
    q = want["model.mtp.layers.0.self_attn.q_proj.weight"].astype(mx.bfloat16)
    assert mx.array_equal(drafter.layer.self_attn.q_proj.weight, q)


def test_a_family_whose_config_declares_no_layer(tmp_path):
    """MiMo-V2-Flash's config declares no MTP layer: its safetensors tell. A 4-bit copy
    (none there) is refused naming drafter=; with it, decoding equals the 4-bit base's."""
    from mlx_lm.generate import generate_step

    write_checkpoint(tmp_path / "ckpt", "mimo_v2_flash", seed=3)
    q = _quantized_copy(tmp_path / "ckpt", tmp_path / "q4")
    with pytest.raises(ValueError, match="Checkpoints of mimo_v2_flash have 1 MTP layer.*drafter="):
        load(str(q))
    model, _ = load(str(q), drafter=str(tmp_path / "ckpt"))
    assert isinstance(model.speculative_streams.drafter.proj, nn.QuantizedLinear)
    plain, _ = mlx_lm_load(str(q))
    prompt = [1, 5, 9, 3, 7, 2, 11]
    want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(30))]
    assert spec_tokens(model, prompt, 30)[0] == want


def test_a_quantized_layer_of_mixed_bits_is_saved_and_read_back(tmp_path):
    """Qwen3.5-MoE's rule quantizes its routers in 8 bits and the rest in 4: the drafter's
    layer saved into one directory reads back with each module's own bits and group size
    (told by its shapes), every tensor equal."""
    write_checkpoint(tmp_path / "ckpt", "qwen3_5_moe", seed=3)
    q = _quantized_copy(tmp_path / "ckpt", tmp_path / "q4")
    model, tok, config = load(str(q), drafter=str(tmp_path / "ckpt"), return_config=True)
    drafter = model.speculative_streams.drafter
    assert (drafter.layer.mlp.gate.bits, drafter.proj.bits) == (8, 4)
    save(tmp_path / "out", model, tok, config=config)
    again = load(str(tmp_path / "out"))[0].speculative_streams.drafter
    assert (again.layer.mlp.gate.bits, again.layer.mlp.gate.group_size) == (8, 64)
    assert (again.proj.bits, again.proj.group_size) == (4, 32)
    a, b = dict(tree_flatten(drafter.parameters())), dict(tree_flatten(again.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_several_layers_from_the_hub_on_a_quantized_base_saved_and_read_back(tmp_path,
                                                                            monkeypatch):  # fmt: skip
    """MiMo-V2-Flash (its config declares no MTP layer) with its three layers in three
    shards on the Hub: ``drafter=`` the repo downloads those shards and not the base's,
    and counts the layers from the headers; on a 4-bit copy each layer is quantized as the
    base, decoding equals the 4-bit base's, and ``save`` writes one directory that reads
    back every layer equal (``num_mtp_layers`` in its config) and decodes the same.
    Control: the layers' tensors differ from one another (no layer read twice)."""
    from mlx_lm.generate import generate_step

    repo = tmp_path / "hub"
    write_checkpoint(repo, "mimo_v2_flash", seed=3, depths=3)
    layer = re.compile(r"model\.mtp\.layers\.(\d)\.")
    fetched = _on_a_fake_hub(
        repo, lambda k: 2 + int(layer.match(k)[1]) if layer.match(k) else 1, tmp_path, monkeypatch
    )
    q = _quantized_copy(repo, tmp_path / "q4")
    model, tok, config = load(str(q), drafter="org/ckpt", return_config=True)
    shards = sorted(f for f in fetched if f.endswith(".safetensors"))
    assert shards == [f"model-0000{i}-of-00004.safetensors" for i in (2, 3, 4)]
    drafter = model.speculative_streams.drafter
    assert model.speculative_streams.config.num_mtp_layers == 3
    assert all(isinstance(d.proj, nn.QuantizedLinear) for d in drafter.all_depths)
    projs = [np.array(d.proj.weight) for d in drafter.all_depths]
    assert not np.array_equal(projs[0], projs[1]) and not np.array_equal(projs[1], projs[2])
    plain, _ = mlx_lm_load(str(q))
    prompt = [1, 5, 9, 3, 7, 2, 11]
    want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(30))]
    assert spec_tokens(model, prompt, 30)[0] == want
    save(tmp_path / "out", model, tok, config=config)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["drafter"][
        "num_mtp_layers"] == 3  # fmt: skip
    again, _ = load(str(tmp_path / "out"))
    a, b = dict(tree_flatten(drafter.parameters())), dict(
        tree_flatten(again.speculative_streams.drafter.parameters())
    )
    assert any(k.startswith("depths.1.") for k in a)
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    assert spec_tokens(again, prompt, 30)[0] == want


def test_several_layers_refused_where_they_cannot_be_read(tmp_path):
    """``num_mtp_layers`` above one: refused for a drafter other than MTP layers, for a
    family whose checkpoints keep one layer's tensors only (Qwen3.5), and past the layers a
    checkpoint has (naming where the missing one would be)."""
    with pytest.raises(ValueError, match="num_mtp_layers=2.*kind 'mtp' only"):
        DrafterConfig(kind="parallelspec", num_mtp_layers=2)
    with pytest.raises(ValueError, match=r"num_mtp_layers=4.*\[1, num_draft_tokens=3\]"):
        DrafterConfig(kind="mtp", num_mtp_layers=4)
    write_checkpoint(tmp_path / "qwen", "qwen3_5", seed=3)
    with pytest.raises(ValueError, match="qwen3_5: its checkpoints' MTP layers are read one only"):
        _attach_depths(tmp_path / "qwen", 3, layers=2)
    write_checkpoint(tmp_path / "two", "step3p5", seed=3, depths=2)
    with pytest.raises(ValueError, match=r"no tensors under 'model\.layers\.6\.'"):
        _attach_depths(tmp_path / "two", 3, layers=3)
    model, _ = load(str(tmp_path / "two"))  # (by default: the two it has)
    assert model.speculative_streams.config.num_mtp_layers == 2


def test_several_layers_state_trims_its_caches_and_held_rows():
    """:class:`mtp.DepthsState` of three layers (golden values): every layer's cache holds
    the same positions, the last two wait as held rows, and the states of a few positions
    before stay; trimmed to ``n`` tokens its rows read tokens up to ``n`` only (the
    caches keep ``n - 2`` positions, two are held again from the states kept), and past
    the states kept it starts again."""
    from mlx_lm.models.cache import KVCache

    caches = [KVCache() for _ in range(3)]
    state = mtp.DepthsState(caches, back=3)
    for c in caches:  # (a step put positions 0..5 into the caches, 6 and 7 are held)
        c.update_and_fetch(mx.zeros((1, 1, 6, 4)), mx.zeros((1, 1, 6, 4)))
    state.advance(mx.arange(8)[:, None] * mx.ones((1, 4)), list(range(1, 9)), kept=6)
    assert (state.offset, state.cache.offset, state.back, state.held_next) == (8, 6, 3, [7, 8])
    assert state.states[:, 0].tolist() == [3, 4, 5, 6, 7]
    state.trim_to(7)
    assert (state.offset, state.cache.offset, state.back, state.held_next) == (7, 5, 2, [6, 7])
    assert state.held_hidden[:, 0].tolist() == [5, 6]
    state.pending_hidden = mx.zeros((1, 4))
    state.trim_to(8)  # (the token after the last row: its state kept to pair)
    assert state.pending_hidden is not None and state.offset == 7
    state.trim_to(5)
    assert (state.offset, state.cache.offset, state.back, state.held_next) == (5, 3, 0, [4, 5])
    assert state.pending_hidden is None
    state.trim_to(4)  # (position 2's state is gone: the caches start again)
    assert (state.offset, [c.offset for c in caches], state.held_next) == (0, [0, 0, 0], [])


def test_several_layers_context_is_rebuilt_exactly_for_a_follow_up(tmp_path):
    """Step 3.5's three layers over a conversation: a finished generation keeps its
    caches, held rows and last token's state; a follow-up from the prompt-cache LRU
    answers as a cold run of the whole conversation, and every layer's KV cache and the
    held rows then equal the cold run's, row for row, also where the follow-up edits the
    last token (one token less reused). Control: without that step back, a stale row
    stays in the layers' caches."""
    import mlx_specstream.prompt_cache as pc
    from mlx_specstream.cache import make_prompt_cache
    from mlx_specstream.decode import spec_generate_step
    from mlx_specstream.prompt_cache import PromptCacheLRU

    write_checkpoint(tmp_path / "ckpt", "step3p5", seed=3, own_head=True, depths=3)
    model, _ = load(str(tmp_path / "ckpt"))

    def run(prompt, cache, n):
        gen = spec_generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=cache)
        return [t for t, *_ in gen]

    def rows(state):  # every layer's keys, and the held rows
        keys = [np.array(c.keys[..., : c.offset, :]) for c in state.cache.caches]
        return keys, state.held_next, np.array(state.held_hidden)

    def same(a, b):
        (ka, na, ha), (kb, nb, hb) = a, b
        return (na == nb and ha.shape == hb.shape and np.allclose(ha, hb, atol=1e-4)
                and all(x.shape == y.shape and np.allclose(x, y, atol=1e-4)
                        for x, y in zip(ka, kb)))  # fmt: skip

    P1, follow = [3, 9, 4, 17, 5, 8, 22, 6], [21, 30, 2, 14]
    cache = make_prompt_cache(model)
    gen1 = run(P1, cache, 8)
    key = P1 + gen1
    state = cache.drafter_state
    assert isinstance(state, mtp.DepthsState) and state.pending_hidden is not None
    assert cache[0].offset == len(key) and state.offset == len(key) - 1
    other = (gen1[-1] + 1) % V

    def cold(p2):
        c = make_prompt_cache(model)
        return run(p2, c, 12), rows(c.drafter_state)

    def follow_up(p2):
        lru, c = PromptCacheLRU(4), make_prompt_cache(model)
        assert run(P1, c, 8) == gen1
        lru.insert_finished(P1 + gen1, c)
        c, reused = lru.fetch(p2)
        return run(p2[reused:], c, 12), reused, rows(c.drafter_state)

    for p2, reuses in ((key + follow, len(key)), (key[:-1] + [other] + follow, len(key) - 2)):
        want, want_rows = cold(p2)
        out, reused, got_rows = follow_up(p2)
        assert reused == reuses and out == want
        assert same(got_rows, want_rows)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pc, "pairs_next_token", lambda cache: False)
        out, reused, got_rows = follow_up(key[:-1] + [other] + follow)
    assert reused == len(key) - 1 and out == want
    assert not same(got_rows, want_rows)


def test_the_mtp_layers_a_checkpoint_has_are_counted_from_its_tensor_names():
    """Golden counts: the layers under consecutive prefixes, as many as the config
    declares (all, where it declares none), at most ``most``; one for a family whose
    checkpoints keep one layer's tensors (Qwen3.5)."""
    step = {"model_type": "step3p5", "num_hidden_layers": 45, "num_nextn_predict_layers": 3}
    keys = [f"model.layers.{i}.enorm.weight" for i in (44, 45, 46, 47)]
    assert mtp.mtp_layers_present(step, keys, 3) == 3
    assert mtp.mtp_layers_present(step, keys, 2) == 2
    assert mtp.mtp_layers_present({**step, "num_nextn_predict_layers": 1}, keys, 3) == 1
    assert mtp.mtp_layers_present(step, keys[:2] + keys[3:], 3) == 1  # (46 missing: 47 not read)
    mimo_v2 = {"model_type": "mimo_v2_flash", "num_hidden_layers": 48}  # (declares none)
    keys = [f"model.mtp.layers.{d}.eh_proj.weight" for d in (0, 1, 2)]
    assert mtp.mtp_layers_present(mimo_v2, keys, 3) == 3
    assert mtp.mtp_layers_present(mimo_v2, [], 3) == 0
    qwen = {"model_type": "qwen3_5", "text_config": {"num_hidden_layers": 4,
                                                     "mtp_num_hidden_layers": 2}}  # fmt: skip
    assert mtp.mtp_layers_present(qwen, ["mtp.fc.weight", "mtp.layers.1.x"], 3) == 1
    assert mtp.depth_prefix(mtp.FAMILIES["step3p5"], 45, 2) == "model.layers.47."
    assert mtp.depth_prefix(mtp.FAMILIES["mimo"], 36, 1) == "model.mtp_layers.1."


def _layers_drafting(monkeypatch) -> list:
    """How many MTP layers drafted each generation (recorded at its start)."""
    counts, real = [], mtp.MTPDrafter.start
    monkeypatch.setattr(
        mtp.MTPDrafter,
        "start",
        lambda self, *a, **k: counts.append(self.num_layers) or real(self, *a, **k),
    )
    return counts


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_of_a_checkpoint_s_layers_draft_as_the_first_ones_alone(n, tmp_path, monkeypatch):
    """``load(..., num_mtp_layers=n)`` on Step 3.5's three layers reads and runs the first
    ``n``: every step's levels equal those ``n`` layers from scratch (the last one run
    again for the deeper levels), and the output is mlx-lm's. Control: the three layers'
    drafts differ."""
    ref = write_checkpoint(tmp_path / "ckpt", "step3p5", own_head=True, depths=3)
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    model, _ = load(str(tmp_path / "ckpt"), num_mtp_layers=n)
    drafter = model.speculative_streams.drafter
    assert len(drafter.held_depths) == n and drafter.num_layers == n  # (only n read)
    assert model.speculative_streams.config.num_mtp_layers == n
    text, seen = _drafts_of_each_step(model, monkeypatch)
    _check_each_step(text, seen, lambda a, k: reference_depths(plain, ref, text, a, k, layers=n))
    logits, a, _, _ = next(x for x in seen if x[1] >= 8)
    assert not np.allclose(logits[1:], reference_depths(plain, ref, text, a, 3)[1:], atol=1e-2)
    from mlx_lm.generate import generate_step

    want = [t for (t, _), _ in zip(generate_step(mx.array(text[:5]), plain), range(24))]
    assert text[5:] == want


def tune_with_fake_timings(ckpt, out, speed, monkeypatch) -> list:
    """``mlx_specstream.tune --save`` on ``ckpt`` saved as the model directory ``out``
    (:func:`_saved_directory`), each trial's tokens/s ``speed(settings)`` for trees and
    100 for the rest (no decoding); returns the settings of every trial."""
    import importlib

    tune = importlib.import_module("mlx_specstream.tune")
    _saved_directory(ckpt, out)
    (out / "prompts.jsonl").write_text(json.dumps({"prompt": "t1 t5 t9 t3"}) + "\n")
    tried = []

    def fake(model, tokenizer, prompts, max_tokens, **s):
        tried.append(s)
        if s.get("speculative") is False or "tree_depth" not in s:
            return 100.0, 1.0
        return speed(s), 2.0

    with monkeypatch.context() as mp:
        mp.setattr(tune, "tokens_per_second", fake)
        tune.main(["--model", str(out), "--num-prompts", "1", "--confirm-rounds", "0", "--save"])
    return tried


def _saved_directory(ckpt, out) -> nn.Module:
    """``load(ckpt)`` (every MTP layer it has) written by ``save`` as a model directory
    ``out``; returns the loaded model."""
    model, tok, config = load(str(ckpt), return_config=True)
    save(out, model, tok, config=config)
    return model


def test_a_directory_holding_three_layers_drafts_with_fewer_and_saves_all(tmp_path, monkeypatch):
    """A model directory saved with three MTP layers, loaded with ``num_mtp_layers=2``:
    it holds the three and drafts with the first two (levels equal theirs from scratch);
    ``use_mtp_layers`` switches back to three from the next generation on (their drafts);
    ``save`` writes all three again, with the count the directory holds."""
    ref = write_checkpoint(tmp_path / "ckpt", "mimo_v2_flash", seed=3, depths=3)
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    full = _saved_directory(tmp_path / "ckpt", tmp_path / "dir")
    model, tok, config = load(str(tmp_path / "dir"), num_mtp_layers=2, return_config=True)
    drafter = model.speculative_streams.drafter
    assert len(drafter.held_depths) == 3 and drafter.num_layers == 2
    text, seen = _drafts_of_each_step(model, monkeypatch)
    _check_each_step(text, seen, lambda a, k: reference_depths(plain, ref, text, a, k, layers=2))
    logits, a, _, _ = next(x for x in seen if x[1] >= 8)
    assert not np.allclose(logits[1:], reference_depths(plain, ref, text, a, 3)[1:], atol=1e-2)
    mtp.use_mtp_layers(model, 3)
    text3, seen = _drafts_of_each_step(model, monkeypatch)
    assert text3 == text
    _check_each_step(text, seen, lambda a, k: reference_depths(plain, ref, text, a, k))
    mtp.use_mtp_layers(model, 2)
    save(tmp_path / "again", model, tok, config=config)
    section = json.loads((tmp_path / "again" / "config.json").read_text())["drafter"]
    assert section["num_mtp_layers"] == 3
    again, _ = load(str(tmp_path / "again"))
    assert again.speculative_streams.drafter.num_layers == 3
    a, b = (dict(tree_flatten(m.speculative_streams.drafter.parameters())) for m in (full, again))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_a_tuned_count_of_layers_applies_on_its_device_only(tmp_path, monkeypatch):
    """``num_mtp_layers`` in a device's tuned entry (``tune.save_choice``): that device
    drafts with as many layers (the directory still holds all), mlx-lm's output; another
    device, and an explicit ``num_mtp_layers``, with theirs. A tuned count above the
    layers held is refused naming the entry."""
    from mlx_lm.generate import generate_step

    from mlx_specstream.precision import device_key
    from mlx_specstream.tune import save_choice

    write_checkpoint(tmp_path / "ckpt", "step3p5", seed=3, own_head=True, depths=3)
    _saved_directory(tmp_path / "ckpt", tmp_path / "dir")
    tree = dict(tree_depth=3, tree_top_k=1, max_tree_nodes=4, num_mtp_layers=1)
    entry = save_choice(tmp_path / "dir", tree)
    assert entry == dict(tree_depth=3, top_k=1, max_tree_nodes=4, num_mtp_layers=1)
    save_choice(tmp_path / "dir", dict(tree, num_mtp_layers=2), device="other:device")
    counts = _layers_drafting(monkeypatch)
    model, _ = load(str(tmp_path / "dir"))
    rt = model.speculative_streams
    assert rt.config.tuned_on == device_key() and rt.config.num_mtp_layers == 1
    assert len(rt.drafter.held_depths) == 3
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    prompt = [1, 5, 9, 3, 7, 2, 11]
    want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(24))]
    assert spec_tokens(model, prompt, 24)[0] == want and counts == [1]
    monkeypatch.setattr("mlx_specstream.utils.device_key", lambda: "other:device")
    assert load(str(tmp_path / "dir"))[0].speculative_streams.drafter.num_layers == 2
    assert (
        load(str(tmp_path / "dir"), num_mtp_layers=3)[0].speculative_streams.drafter.num_layers == 3
    )
    cfg = json.loads((tmp_path / "dir" / "config.json").read_text())
    cfg["drafter"]["num_mtp_layers"] = 2
    cfg["drafter"]["tuned"]["other:device"]["num_mtp_layers"] = 3
    (tmp_path / "dir" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tuned\['other:device'\]\.num_mtp_layers=3: more MTP "
                                         r"layers than the section's num_mtp_layers=2"):  # fmt: skip
        load(str(tmp_path / "dir"))


def test_a_count_of_layers_that_cannot_draft_gets_a_clear_error(tmp_path):
    """``num_mtp_layers`` past the layers a checkpoint has, past those a directory holds,
    on a model whose drafts are streams, and on a plain model: each refused by name."""
    write_checkpoint(tmp_path / "two", "step3p5", seed=3, depths=2)
    with pytest.raises(ValueError, match=r"num_mtp_layers=3: .*two has 2 MTP layer\(s\)"):
        load(str(tmp_path / "two"), num_mtp_layers=3)
    with pytest.raises(ValueError, match=r"num_mtp_layers=0: .*give 1 to 2"):
        load(str(tmp_path / "two"), num_mtp_layers=0)
    _saved_directory(tmp_path / "two", tmp_path / "dir")
    with pytest.raises(ValueError, match=r"num_mtp_layers=3: this drafter holds 2 MTP layer"):
        load(str(tmp_path / "dir"), num_mtp_layers=3)
    with pytest.raises(ValueError, match="num_mtp_layers=2: the model drafts with its "
                                         "speculative streams, not a checkpoint's MTP layers"):  # fmt: skip
        load(None, num_mtp_layers=2)
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    for f in (tmp_path / "two").iterdir():
        if f.name.endswith(".json") or f.name.startswith("tokenizer"):
            (plain_dir / f.name).write_bytes(f.read_bytes())
    base, _ = mlx_lm_load(str(tmp_path / "two"))
    mx.save_safetensors(str(plain_dir / "model.safetensors"), dict(tree_flatten(base.parameters())))
    with pytest.raises(ValueError, match="num_mtp_layers=1: .*plain has no MTP layer"):
        load(str(plain_dir), num_mtp_layers=1, allow_plain=True)


def test_the_tuner_tries_fewer_layers_on_its_fastest_trees_and_stores_the_count(tmp_path,
                                                                              monkeypatch):  # fmt: skip
    """On a directory holding three MTP layers, the tuner's grid drafts with all three,
    then its three fastest trees of more than one level with fewer (a tree of two levels
    reads two layers: with one only); the fastest count is stored for this
    device and applies at the next load (timings from a fake measure: one layer fastest on
    the deepest chain). A real measurement drafts with the count asked for and restores
    the model's after."""
    import importlib

    def speed(s):  # (one layer fastest on the deepest chain)
        one = s.get("num_mtp_layers") == 1 and s["tree_depth"] == 3 and s["tree_top_k"] == 1
        d, k = s["tree_depth"], s["tree_top_k"]
        return 100.0 + 20 * d - 5 * k + (s["max_tree_nodes"] == 8) + 40 * one

    tune = importlib.import_module("mlx_specstream.tune")
    write_checkpoint(tmp_path / "ckpt", "step3p5", seed=3, own_head=True, depths=3)
    tried = tune_with_fake_timings(tmp_path / "ckpt", tmp_path / "dir", speed, monkeypatch)
    trees = [s for s in tried if "tree_depth" in s and s.get("draft") == "streams"]
    grid = [s for s in trees if s["num_mtp_layers"] == 3]
    fewer = [s for s in trees if s["num_mtp_layers"] != 3 and "draft_confidence" not in s]
    cut = [s for s in trees if "draft_confidence" in s]  # (the fastest deepest chain, cut)
    assert len(grid) > 6
    assert [(s["tree_depth"], s["tree_top_k"], s["num_mtp_layers"]) for s in cut] == [(3, 1, 1)] * 3
    # (the fastest grid trees here: depth 3 with k = 1, 2, 2 (8 nodes))
    assert [(s["tree_depth"], s["tree_top_k"], s["num_mtp_layers"]) for s in fewer] == [
        (3, 1, 1), (3, 1, 2), (3, 2, 1), (3, 2, 2), (3, 2, 1), (3, 2, 2)]  # fmt: skip
    from mlx_specstream.precision import device_key

    section = json.loads((tmp_path / "dir" / "config.json").read_text())["drafter"]
    assert section["tuned"][device_key()]["num_mtp_layers"] == 1
    assert section["tuned"][device_key()]["top_k"] == 1
    model, tok = load(str(tmp_path / "dir"))
    assert model.speculative_streams.drafter.num_layers == 1
    mtp.use_mtp_layers(model, 3)
    counts = _layers_drafting(monkeypatch)
    prompts = [tok.encode("t1 t5 t9 t3")]
    tune.tokens_per_second(model, tok, prompts, 8, num_mtp_layers=2, tree_depth=3, tree_top_k=1,
                           max_tree_nodes=4)  # fmt: skip
    assert counts == [2] and model.speculative_streams.drafter.num_layers == 3


def test_the_command_lines_take_the_count_of_layers(tmp_path, capsys, monkeypatch):
    """``--num-mtp-layers`` in generate (the first layers draft, mlx-lm's text), and in the
    server's, chat's and the benchmark's flags; ``--draft streams+ngram`` with the layers
    (mlx-lm's text)."""
    import importlib

    from mlx_lm.generate import generate as mlx_lm_generate

    gen_mod = importlib.import_module("mlx_specstream.generate")
    write_checkpoint(tmp_path / "ckpt", "step3p5", seed=3, own_head=True, depths=3)
    counts = _layers_drafting(monkeypatch)
    prompt = "t1 t5 t9 t3"
    gen_mod.main(["--model", str(tmp_path / "ckpt"), "--prompt", prompt, "--max-tokens", "16",
                  "--ignore-chat-template", "--num-mtp-layers", "2"])  # fmt: skip
    plain, tok = mlx_lm_load(str(tmp_path / "ckpt"))
    assert mlx_lm_generate(plain, tok, prompt=tok.encode(prompt), max_tokens=16) in (
        capsys.readouterr().out
    )
    assert counts == [2]
    gen_mod.main(
        [
            "--model",
            str(tmp_path / "ckpt"),
            "--prompt",
            prompt,
            "--max-tokens",
            "16",
            "--ignore-chat-template",
            "--draft",
            "streams+ngram",
            "--num-draft-tokens",
            "4",
        ]
    )  # fmt: skip  (the tiny window of 8 holds 8 nodes)
    assert mlx_lm_generate(plain, tok, prompt=tok.encode(prompt), max_tokens=16) in (
        capsys.readouterr().out
    )
    for name in ("server", "chat", "benchmark"):
        parser = importlib.import_module(f"mlx_specstream.{name}").setup_arg_parser()
        assert parser.parse_args(["--num-mtp-layers", "2"]).num_mtp_layers == 2


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_no_layer_past_the_trees_levels_runs(depth, tmp_path, monkeypatch):
    """With three MTP layers and a tree of ``depth`` levels, only the first ``depth``
    layers run (a deeper one's drafts would go unread), each over every step; the drafts
    equal those layers' from scratch and the output is mlx-lm's. Control: the spy sees
    the three layers run for a tree of three levels."""
    from mlx_lm.generate import generate_step

    ref = write_checkpoint(tmp_path / "ckpt", "step3p5", own_head=True, depths=3)
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    model = _attach_depths(tmp_path / "ckpt", 3)
    drafter = model.speculative_streams.drafter
    ran, real = [], mtp.MTPDepth.step
    monkeypatch.setattr(
        mtp.MTPDepth, "step", lambda self, *a: ran.append(id(self)) or real(self, *a)
    )
    tree = dict(tree_top_k=1, tree_depth=depth, max_tree_nodes=depth + 1)
    text, seen = _drafts_of_each_step(model, monkeypatch, **tree)
    _check_each_step(text, seen, lambda a, n: reference_depths(plain, ref, text, a, n), depth)
    ids = [id(d) for d in drafter.all_depths]
    steps = len(seen)
    assert [ran.count(i) for i in ids] == [steps] * depth + [0] * (3 - depth)
    want = [t for (t, _), _ in zip(generate_step(mx.array(text[:5]), plain), range(24))]
    assert text[5:] == want


@pytest.mark.parametrize("arch,depths", [("mimo", 1), ("step3p5", 3)])
def test_prompt_lookup_merged_into_the_layers_tree(arch, depths, tmp_path, monkeypatch):
    """``draft="streams+ngram"`` on a checkpoint's MTP layers: prompt lookup's chains are
    merged into the layers' tree, beside the layers' chain of 3. With lookup proposing the
    text's true continuation (so that its nodes are accepted), steps accept more tokens
    than the layers' levels and the bonus (with the layers alone, never), every step's
    drafts still equal the layers from scratch over the accepted text (also after a step
    that took a lookup chain), and the output is mlx-lm's, as with real lookup. Control:
    the drafts differ from the first layer alone's (Step 3.5) or from the other
    concatenation order's (MiMo)."""
    from mlx_lm.generate import generate_step

    import mlx_specstream.decode as decode

    ref = write_checkpoint(tmp_path / "ckpt", arch, seed=1, depths=depths)
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    model, _ = load(str(tmp_path / "ckpt"))
    prompt = [4, 8, 15, 16, 23]
    want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(40))]
    full = prompt + want

    def steps(draft, oracle=False):  # (the drafts of each step, and the tokens each accepted)
        if oracle:  # (the true continuation, every third step)
            monkeypatch.setattr(
                decode.Decoder, "_lookup", lambda self, room: [
                    full[len(self.history): len(self.history) + min(self.ngram_tokens, room)]
                ] if len(self.history) % 3 == 0 else [],
            )  # fmt: skip
        # (lookup chains of 4: the merged tree's 8 nodes fit Step 3.5's tiny window of 8)
        text, seen = _drafts_of_each_step(model, monkeypatch, prompt=prompt, draft=draft,
                                          num_draft_tokens=4)  # fmt: skip
        assert text == full[: len(text)]
        offsets = [o for *_, o in seen]
        return text, seen, [b - a for a, b in zip(offsets, offsets[1:])]

    assert steps("streams+ngram")[0][len(prompt) :] == want[:24]  # (real lookup)
    _, _, alone = steps("streams")
    assert max(alone) <= 4  # (a chain of 3 and the bonus)
    text, seen, merged = steps("streams+ngram", oracle=True)
    assert max(merged) > 4 and len(merged) < len(alone)

    def reference(a, n, **control):
        if depths == 1:
            return reference_levels(plain, ref, text, a, n, **control)
        return reference_depths(plain, ref, text, a, n, **control)

    _check_each_step(text, seen, reference)
    control = dict(swap=True) if depths == 1 else dict(one_layer=True)
    logits, a, _, _ = next(x for x in seen if x[1] >= 8)
    assert not np.allclose(logits[1:], reference(a, 3, **control)[1:], atol=1e-2)

"""EAGLE-1 drafters (mlx_specstream.eagle1), as EAGLE-2 runs them: every level and every
dynamic tree node's children equal the raw checkpoint's computed from scratch, decoding
equals mlx-lm's, both layouts load, and bad checkpoints get clear errors."""

import json

import mlx.core as mx
import numpy as np
import pytest
from eagle_helpers import (
    assert_rejection_keeps_the_distribution,
    write_base,
)
from helpers import plain_greedy, spec_tokens
from mlx_lm import load as mlx_lm_load

import mlx_specstream.decode as decode
from mlx_specstream import eagle1, load
from mlx_specstream.tree import path_to

V = 64
PROMPT = [4, 8, 15, 16, 23]
LAYER = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             rms_norm_eps=1e-5, rope_theta=10000.0)  # fmt: skip


def write_eagle1(path, vocab_size=V, seed=1, fc_bias=True, own_embeddings=False, vllm=False,
                 scale=3.0, extra=None, **overrides):  # fmt: skip
    """A random EAGLE-1 checkpoint as EAGLE's code saves it (``fc``, ``layers.0.*`` without
    ``input_layernorm``; vLLM's ``model.`` prefix with ``vllm``). Returns its raw tensors."""
    mx.random.seed(seed)
    layer = {**LAYER, **overrides}
    D, H, KV = layer["hidden_size"], layer["num_attention_heads"], layer["num_key_value_heads"]
    hd, F = D // H, layer["intermediate_size"]

    def matrix(rows, cols):
        return mx.random.normal((rows, cols)) * cols**-0.5 * scale

    w = {
        "fc.weight": matrix(D, 2 * D),
        "layers.0.self_attn.q_proj.weight": matrix(H * hd, D),
        "layers.0.self_attn.k_proj.weight": matrix(KV * hd, D),
        "layers.0.self_attn.v_proj.weight": matrix(KV * hd, D),
        "layers.0.self_attn.o_proj.weight": matrix(D, H * hd),
        "layers.0.mlp.gate_proj.weight": matrix(F, D),
        "layers.0.mlp.up_proj.weight": matrix(F, D),
        "layers.0.mlp.down_proj.weight": matrix(D, F),
        "layers.0.post_attention_layernorm.weight": 1 + 0.3 * mx.random.normal((D,)),
    }
    if fc_bias:
        w["fc.bias"] = 0.5 * mx.random.normal((D,))
    if own_embeddings:
        w["embed_tokens.weight"] = mx.random.normal((vocab_size, D))
    w.update(extra or {})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
              "vocab_size": vocab_size, "hidden_act": "silu", **layer}  # fmt: skip
    if vllm:
        config = {"architectures": ["EAGLEModel"], "model": config}
    path.mkdir(parents=True)
    stored = {("model." + k if vllm else k): v for k, v in w.items()}
    mx.save_safetensors(str(path / "model.safetensors"), stored)
    (path / "config.json").write_text(json.dumps(config))
    return dict(w=w, layer=layer)


def _block(w, layer, x, context):
    """EAGLE-1's layer over all rows ``x`` ``(L, D)`` by hand: causal attention (no input
    norm; rows past ``context`` at positions from ``context``, as the first ones), MLP."""
    H, KV = layer["num_attention_heads"], layer["num_key_value_heads"]
    L, hd = x.shape[0], layer["hidden_size"] // H
    p = "layers.0."

    def heads(name, n):
        y = (x @ w[p + f"self_attn.{name}.weight"].T).reshape(L, n, hd).transpose(1, 0, 2)[None]
        if name == "v_proj":
            return y
        return mx.fast.rope(y, hd, traditional=False, base=layer["rope_theta"], scale=1.0, offset=0)

    q, k, v = heads("q_proj", H), heads("k_proj", KV), heads("v_proj", KV)
    k, v = mx.repeat(k, H // KV, axis=1), mx.repeat(v, H // KV, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * hd**-0.5
    scores = mx.where(mx.tril(mx.ones((L, L), dtype=mx.bool_)), scores, -mx.inf)
    att = (mx.softmax(scores, axis=-1) @ v)[0].transpose(1, 0, 2).reshape(L, -1)
    r = x + att @ w[p + "self_attn.o_proj.weight"].T
    m = mx.fast.rms_norm(r, w[p + "post_attention_layernorm.weight"], layer["rms_norm_eps"])
    g = m @ w[p + "mlp.gate_proj.weight"].T
    return (
        r
        + ((g * mx.sigmoid(g)) * (m @ w[p + "mlp.up_proj.weight"].T))
        @ w[p + "mlp.down_proj.weight"].T
    )


def reference_levels(plain, ref, text, a, levels, path=None, input_norm=False, swap=False,
                     normed_recursion=False):  # fmt: skip
    """The drafter's levels from rows ``0..a`` of ``text`` (row i: the base's normed last
    state of token i and the embedding of token i + 1), then its own output and argmax
    (``path``: those tokens) for each deeper level, from the raw tensors. Controls:
    ``input_norm`` (an input norm of ones), ``swap`` (``[f; e]``), ``normed_recursion``."""
    w, layer = ref["w"], ref["layer"]
    embed = w.get("embed_tokens.weight", plain.model.embed_tokens.weight)
    feats = plain.model(mx.array(text[: a + 1])[None])[0]  # (mlx-lm's: after the final norm)
    head = plain.lm_head.weight
    tokens = list(text[1 : a + 2])
    logits, hidden = [], feats
    for level in range(levels):
        e = embed[mx.array(tokens)]
        x = mx.concatenate([hidden, e] if swap else [e, hidden], axis=-1) @ w["fc.weight"].T
        x = x + w["fc.bias"] if "fc.bias" in w else x
        if input_norm:
            x = mx.fast.rms_norm(x, mx.ones((x.shape[-1],)), layer["rms_norm_eps"])
        out = _block(w, layer, x, a + 1)[-1:]
        row = np.array((out @ head.T)[0], np.float64)
        logits.append(row)
        nxt = int(np.argmax(row)) if path is None or level >= len(path) else path[level]
        passed = mx.fast.rms_norm(out, plain.model.norm.weight, 1e-5) if normed_recursion else out
        hidden = mx.concatenate([hidden, passed])
        tokens.append(nxt)
    return np.stack(logits)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("eagle1") / "base", V)


def recorded(model, monkeypatch, method, **tree):
    """The greedy text of ``PROMPT`` and what each step's ``method`` of the drafter gave,
    with the last row ``a`` of the accepted text."""
    seen, real = [], getattr(eagle1.Eagle1Drafter, method)

    def recording(self, rt, state, hidden, path, path_tokens, token, *args, **kwargs):
        out = real(self, rt, state, hidden, path, path_tokens, token, *args, **kwargs)
        arrays = out if isinstance(out, tuple) else (out,)
        seen.append(([np.array(x.astype(mx.float32)) for x in arrays], rt._tree[4] + len(path) - 1))
        return out

    monkeypatch.setattr(eagle1.Eagle1Drafter, method, recording)
    toks, _ = spec_tokens(model, PROMPT, 24, **tree)
    monkeypatch.undo()
    return PROMPT + toks, seen


@pytest.mark.parametrize("options", [{}, dict(fc_bias=False, own_embeddings=True, vllm=True)])
def test_every_level_equals_the_raw_tensors_from_scratch(options, base_dir, tmp_path,
                                                         monkeypatch):  # fmt: skip
    """Each step's levels equal every row recomputed from the checkpoint's raw tensors over
    mlx-lm's base. Controls: an input norm, ``[f; e]``, the recursion through the norm."""
    ref = write_eagle1(tmp_path / "eagle", **options)
    model, _ = load(str(base_dir), drafter=str(tmp_path / "eagle"))
    plain, _ = mlx_lm_load(str(base_dir))
    assert model.speculative_streams.config.kind == "eagle"
    text, seen = recorded(model, monkeypatch, "draft")
    assert text == PROMPT + plain_greedy(plain, PROMPT, 24)
    checked = 0
    for (logits,), a in seen:
        if a + 1 >= len(text):
            continue
        want = reference_levels(plain, ref, text, a, logits.shape[0])
        np.testing.assert_allclose(logits, want, atol=3e-4, rtol=3e-4)
        checked += 1
    assert checked >= 5 and seen[0][0][0].shape[0] == 3
    (logits,), a = seen[2]
    for control in (dict(input_norm=True), dict(swap=True), dict(normed_recursion=True)):
        wrong = reference_levels(plain, ref, text, a, logits.shape[0], **control)
        assert not np.allclose(logits, wrong, atol=1e-2), control


def test_dynamic_trees_draft_each_node_s_children_from_its_own_path(base_dir, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """EAGLE-2's trees: every expanded node's children and path scores equal the top-k of
    the levels recomputed from scratch along that node's path (control: along the top-1
    chain's tokens instead, as a static tree drafts them)."""
    ref = write_eagle1(tmp_path / "eagle", own_embeddings=True)  # (tokens that weigh)
    model, _ = load(str(base_dir), drafter=str(tmp_path / "eagle"))
    plain, _ = mlx_lm_load(str(base_dir))
    text, seen = recorded(model, monkeypatch, "draft_tree", tree_top_k=3, tree_depth=3,
                          max_tree_nodes=10)  # fmt: skip
    assert text == PROMPT + plain_greedy(plain, PROMPT, 24)
    checked = differs = 0
    for (tokens, parents, scores), a in seen[:4]:
        tokens, parents = tokens.astype(int).tolist(), parents.astype(int).tolist()
        assert len(tokens) == 1 + 3 + 2 * 9
        kids = {}
        for c in range(1, len(parents)):
            kids.setdefault(parents[c], []).append(c)
        for node, children in kids.items():
            path = [tokens[n] for n in path_to(node, parents)[1:]]
            lp = reference_levels(plain, ref, text, a, len(path) + 1, path=path)[-1]
            lp = lp - lp.max() - np.log(np.exp(lp - lp.max()).sum())
            want = np.argsort(-lp, kind="stable")[:3]
            assert sorted(tokens[c] for c in children) == sorted(want.tolist()), node
            for c in children:
                np.testing.assert_allclose(scores[c], scores[node] + lp[tokens[c]], atol=3e-4)
            chain = reference_levels(plain, ref, text, a, len(path) + 1)[-1]  # (a static tree's)
            static = np.argsort(-chain, kind="stable")[:3].tolist()
            differs += sorted(tokens[c] for c in children) != sorted(static)
            checked += 1
    assert checked >= 4 * 7 and differs > 0  # (some children are not the chain's)


@pytest.mark.parametrize("tree", [{}, dict(tree_top_k=2, tree_depth=4, max_tree_nodes=8),
                                  dict(tree_top_k=3, max_tree_nodes=12, dynamic_tree=False)])  # fmt: skip
def test_greedy_equals_plain_decoding(tree, base_dir, tmp_path):
    write_eagle1(tmp_path / "eagle")
    model, _ = load(str(base_dir), drafter=str(tmp_path / "eagle"))
    plain, _ = mlx_lm_load(str(base_dir))
    for prompt in ([3], PROMPT):
        got, _ = spec_tokens(model, prompt, 40, **tree)
        assert got == plain_greedy(plain, prompt, 40), (tree, prompt)


def test_sampling_keeps_the_distribution(tmp_path, monkeypatch):
    """Recursive rejection over the drafter's drawn dynamic trees samples the base's
    distribution; control: the drafts verified as if drawn uniformly."""
    # (3 layers keep the draws cheap; of seeds 0-3, seed 1's shows the control's bias most:
    # p 1e-80, against 3e-11 to 8e-18)
    base = write_base(tmp_path / "base", 6, layers=3, seed=1, weight_scale=1.0)
    write_eagle1(tmp_path / "eagle", 6, scale=1.0, own_embeddings=True)
    model, _ = load(str(base), drafter=str(tmp_path / "eagle"))
    assert_rejection_keeps_the_distribution(model, monkeypatch, static=False)


def test_negative_control_a_wrong_verifier_is_caught(base_dir, tmp_path, monkeypatch):
    write_eagle1(tmp_path / "eagle")
    model, _ = load(str(base_dir), drafter=str(tmp_path / "eagle"))
    right, _ = spec_tokens(model, PROMPT, 30, tree_top_k=2, max_tree_nodes=8)

    def accept_all(tokens, parents, ancestors, targets, depth):
        return None, mx.array(tokens.shape[0] - 1)

    monkeypatch.setattr(decode, "_accept", accept_all)
    wrong, _ = spec_tokens(model, PROMPT, 30, tree_top_k=2, max_tree_nodes=8)
    assert wrong != right


def test_save_writes_a_directory_that_loads_back(base_dir, tmp_path, monkeypatch):
    from mlx_specstream.utils import save

    write_eagle1(tmp_path / "eagle", own_embeddings=True)
    model, tok, config = load(str(base_dir), drafter=str(tmp_path / "eagle"), return_config=True)
    _, before = recorded(model, monkeypatch, "draft")
    path = save(tmp_path / "saved", model, tok, config=config)
    section = json.loads((path / "config.json").read_text())["drafter"]
    assert section["kind"] == "eagle" and section["eagle"]["own_embeddings"] is True
    again, _ = load(str(path))
    _, after = recorded(again, monkeypatch, "draft")
    assert len(before) == len(after)
    for (x,), (y,) in zip((b[0] for b in before), (s[0] for s in after)):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_bad_checkpoints_get_clear_errors(base_dir, tmp_path):
    bias = {"layers.0.self_attn.q_proj.bias": mx.zeros((64,))}
    cases = [
        (write_eagle1, dict(extra=bias), "attention biases"),
        (write_eagle1, dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1),
         "hidden_size=32"),  # fmt: skip
        (write_eagle1, dict(vocab_size=80), "vocab_size=80"),
        (write_eagle1, dict(extra={"layers.0.mlp.gate_proj.weight": mx.zeros((96, 32))}),
         "does not fit"),  # fmt: skip
    ]
    for i, (write, kwargs, match) in enumerate(cases):
        path = tmp_path / f"bad{i}"
        write(path, **kwargs)
        with pytest.raises(ValueError, match=match) as info:
            load(str(base_dir), drafter=str(path))
        assert str(path) in str(info.value)
    pickled = tmp_path / "pickled"  # (EAGLE's own: PyTorch pickles)
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                     "num_hidden_layers": 1, **LAYER}))  # fmt: skip
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="convert.eagle3"):
        load(str(base_dir), drafter=str(pickled))
    write_eagle1(tmp_path / "good")
    with pytest.raises(ValueError, match="holds an EAGLE-1 drafter, not MTP layers"):
        load(str(base_dir), drafter=str(tmp_path / "good"), num_mtp_layers=1)


def test_the_command_line_takes_the_drafter_on_a_4_bit_base(base_dir, tmp_path, capsys):
    """``mlx_specstream.generate --model Q4 --drafter EAGLE1`` prints the 4-bit base's
    greedy text (mlx-lm's), with a dynamic tree."""
    import importlib

    from mlx_lm.generate import generate as mlx_lm_generate
    from test_mtp import _quantized_copy

    q4 = _quantized_copy(base_dir, tmp_path / "q4")
    write_eagle1(tmp_path / "eagle")
    prompt = "t1 t5 t9 t3"
    gen = importlib.import_module("mlx_specstream.generate")  # (not the function so named)
    gen.main(["--model", str(q4), "--drafter", str(tmp_path / "eagle"), "--prompt", prompt,
              "--max-tokens", "24", "--ignore-chat-template", "--tree-top-k", "2"])  # fmt: skip
    plain, tok = mlx_lm_load(str(q4))
    want = mlx_lm_generate(plain, tok, prompt=tok.encode(prompt), max_tokens=24)
    assert want and want in capsys.readouterr().out


SMALL_V = 24  # (a vocabulary where this random drafter's drafts are often right)


def small_eagle1(tmp_path):
    """A base of ``SMALL_V`` tokens with a random EAGLE-1 drafter, mlx-lm's base and the
    drafter's raw tensors."""
    base = write_base(tmp_path / "base", SMALL_V, weight_scale=1.0)
    ref = write_eagle1(tmp_path / "eagle", SMALL_V, scale=1.0)
    model, _ = load(str(base), drafter=str(tmp_path / "eagle"))
    return model, mlx_lm_load(str(base))[0], ref


def test_each_batch_row_s_levels_equal_the_raw_tensors_from_scratch(tmp_path, monkeypatch):
    """In a batch (odd rows merging lookup in, a row joining mid-way), every pass's levels
    of every row equal the drafter from scratch over the row's text; control: the
    features and embeddings swapped in ``fc``."""
    from test_batch_mtp import assert_levels_from_scratch, levels_recorded

    model, plain, ref = small_eagle1(tmp_path)
    passes, kept_more = levels_recorded(model, monkeypatch, eagle1.Eagle1Drafter)

    def levels(**control):
        return lambda text, a, n: reference_levels(plain, ref, text, a, n, **control)

    assert_levels_from_scratch(passes, kept_more, levels(), [levels(swap=True)])


def test_batch_rows_equal_each_prompt_alone_in_the_passes_of_a_chain(tmp_path):
    """``batch_generate`` rows drafting with the drafter: mlx-lm's greedy tokens, in as
    many passes as decoding each prompt alone with its chain of 3, pipelined or not; a
    row joining with a cache of earlier context too."""
    from test_batch_mtp import LIMITS, assert_a_row_with_earlier_context_decodes_as_mlx_lm
    from test_batch_mtp import assert_rows_decode_as_alone

    model, plain, _ = small_eagle1(tmp_path)
    alone = assert_rows_decode_as_alone(model, plain, pipelines=(False, True))
    assert sum(LIMITS) > sum(alone) + 10, alone  # (drafts were taken)
    assert_a_row_with_earlier_context_decodes_as_mlx_lm(model, plain)

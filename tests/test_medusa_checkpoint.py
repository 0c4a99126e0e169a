"""Released Medusa-1 heads (mlx_specstream.medusa): every level equals the raw checkpoint's
computed from scratch in FasterDecoding's and vLLM's layouts (several blocks a head, a shared
LM head, a token map, a draft vocabulary), decoding equals mlx-lm's greedy and keeps the
sampling distribution, the directory saves and loads back, FasterDecoding's PyTorch pickle
converts, and bad checkpoints get clear errors."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from eagle_helpers import assert_checkpoints_refused, assert_rejection_keeps_the_distribution
from eagle_helpers import write_base
from helpers import plain_greedy, spec_tokens
from mlx_lm import load as mlx_lm_load

import mlx_specstream.decode as decode
from mlx_specstream import load
from mlx_specstream.medusa import MedusaCheckpointHeads

V, D = 64, 64  # (the test base's vocabulary and width: eagle_helpers.write_base)
PROMPT = [4, 8, 15, 16, 23]


def base_head(base_dir) -> mx.array:
    plain, _ = mlx_lm_load(str(base_dir))
    return plain.lm_head.weight if "lm_head" in plain else plain.model.embed_tokens.weight


def write_medusa(path, heads=3, layers=1, style="faster", bias=True, shared=False,
                 token_map=None, full_rows=False, seed=1, scale=2.0, like_base=None,
                 config=None, extra=None, vocab=V, width=D, lm=True):  # fmt: skip
    """Random Medusa heads as FasterDecoding's code saves them (``{j}.{l}.linear.*``,
    ``{j}.{L}.weight``) or vLLM's (``blocks.*``, ``lm_heads.*``, ``token_map``);
    ``like_base``: zero blocks and LM heads copied from it (how Medusa's training starts);
    ``lm=False``: no LM heads (TGI's second layout: the base's ranks).
    Returns the raw blocks, LM heads (cut to the token map; ``None``: the base's) and
    token map."""
    mx.random.seed(seed)
    lm_heads = lm
    rows = len(token_map) if token_map is not None and not full_rows else vocab
    blocks = [
        [(mx.random.normal((width, width)) * width**-0.5 * scale,
          0.3 * mx.random.normal((width,)) if bias else None) for _ in range(layers)]
        for _ in range(heads)
    ]  # fmt: skip
    lm = [mx.random.normal((rows, width)) * width**-0.5 for _ in range(1 if shared else heads)]
    if like_base is not None:
        blocks = [[(mx.zeros_like(W), None if b is None else mx.zeros_like(b)) for W, b in h]
                  for h in blocks]  # fmt: skip
        lm = [like_base for _ in lm]
    w = {}
    for j, head in enumerate(blocks):
        for l, (W, b) in enumerate(head):
            stem = f"{j}.{l}.linear." if style == "faster" else f"blocks.{j}.layers.{l}."
            w[stem + "weight"] = W
            if b is not None:
                w[stem + "bias"] = b
    for j, W in enumerate(lm if lm_heads else []):
        w[f"{j}.{layers}.weight" if style == "faster" else f"lm_heads.{j}.weight"] = W
    if token_map is not None:
        w["token_map"] = mx.array(token_map, dtype=mx.int64)
    if style == "faster":
        settings = {"medusa_num_heads": heads, "medusa_num_layers": layers,
                    "base_model_name_or_path": "base"}  # fmt: skip
    else:
        settings = {"model_type": "medusa", "num_heads": heads, "num_hidden_layers": layers,
                    "hidden_size": width, "vocab_size": vocab, "medusa_fc_bias": bias,
                    "original_lm_head": shared, "truncated_vocab_size":
                    len(token_map) if token_map is not None else None}  # fmt: skip
    w.update(extra or {})
    path.mkdir(parents=True)
    name = "medusa_lm_head.safetensors" if style == "faster" else "model.safetensors"
    mx.save_safetensors(str(path / name), w)
    (path / "config.json").write_text(json.dumps({**settings, **(config or {})}))
    cut = [W if token_map is None or not full_rows else W[mx.array(token_map)] for W in lm]
    return dict(blocks=blocks, lm=cut if lm_heads else None, token_map=token_map)


def reference_levels(plain, raw, text, a, before_norm=False) -> np.ndarray:
    """``(k, V)`` the heads' logits at row ``a`` of ``text`` from the raw tensors: the
    base's last state after its final norm (control ``before_norm``: before it)."""
    if before_norm:
        norm, plain.model.norm = plain.model.norm, nn.Identity()
    x = plain.model(mx.array(text[: a + 1])[None])[0, a]
    if before_norm:
        plain.model.norm = norm
    rows = []
    for j, head in enumerate(raw["blocks"]):
        y = x
        for W, b in head:
            z = y @ W.T + (0 if b is None else b)
            y = y + z * mx.sigmoid(z)
        logits = np.array(y @ raw["lm"][j % len(raw["lm"])].T, np.float64)
        if raw["token_map"] is not None:
            wide = np.full(V, -np.inf)
            wide[raw["token_map"]] = logits
            logits = wide
        rows.append(logits)
    return np.stack(rows)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("medusa") / "base", V)


def recorded(model, monkeypatch, prompt=PROMPT, max_tokens=24, **tree):
    """The greedy text of ``prompt`` and each step's drafted levels (the heads the tree
    reads) with the last row ``a`` of the accepted text they were drafted from."""
    seen, real = [], MedusaCheckpointHeads.draft_at

    def recording(self, rt, hidden, node, levels=None):
        logits = real(self, rt, hidden, node, levels)
        a = rt._tree[4] + int(rt._kept_layout.depth[node.item()])
        seen.append((np.array(logits.astype(mx.float32)), a))
        return logits

    monkeypatch.setattr(MedusaCheckpointHeads, "draft_at", recording)
    toks, _ = spec_tokens(model, prompt, max_tokens, **tree)
    monkeypatch.undo()
    return prompt + toks, seen


LAYOUTS = {
    "faster, 2 blocks a head": dict(layers=2),
    "faster, no biases": dict(bias=False),
    "faster, no LM heads (TGI's second layout)": dict(lm=False),
    "vllm": dict(style="vllm", bias=False),
    "vllm, shared head, 2 blocks": dict(style="vllm", shared=True, layers=2),
    "vllm, token map": dict(style="vllm", token_map=list(range(60, 2, -3))),
    "vllm, token map over full heads": dict(style="vllm", token_map=[5, 1, 40, 9, 33, 2],
                                            full_rows=True),  # fmt: skip
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_level_equals_the_raw_tensors_from_scratch(layout, base_dir, tmp_path, monkeypatch):
    raw = write_medusa(tmp_path / "heads", **LAYOUTS[layout])
    model, _ = load(str(base_dir), drafter=str(tmp_path / "heads"))
    plain, _ = mlx_lm_load(str(base_dir))
    raw["lm"] = raw["lm"] or [base_head(base_dir)]  # (no LM heads of their own: the base's)
    text, seen = recorded(model, monkeypatch, tree_top_k=2, max_tree_nodes=8)
    checked = 0
    for logits, a in seen:
        if a + 1 < len(text):
            want = reference_levels(plain, raw, text, a)[: logits.shape[0]]
            assert np.array_equal(np.isinf(logits), np.isinf(want))
            finite = np.isfinite(want)
            np.testing.assert_allclose(logits[finite], want[finite], atol=2e-4, rtol=2e-4)
            checked += 1
    assert checked >= 5
    logits, a = seen[1]  # control: the heads over the state before the final norm
    wrong = reference_levels(plain, raw, text, a, before_norm=True)[: logits.shape[0]]
    assert not np.allclose(logits[np.isfinite(wrong)], wrong[np.isfinite(wrong)], atol=1e-2)


def test_heads_past_the_tree_s_levels_never_run(base_dir, tmp_path, monkeypatch):
    """A chain of 2 over 4 heads runs the first 2 (each head reads an LM head of its own);
    the 16-node tree of top-3 runs every head."""
    write_medusa(tmp_path / "heads", heads=4)
    model, _ = load(str(base_dir), drafter=str(tmp_path / "heads"))
    _, chain = recorded(model, monkeypatch, tree_top_k=1, tree_depth=2)
    _, tree = recorded(model, monkeypatch)
    assert {x.shape for x, _ in chain} == {(2, V)} and {x.shape for x, _ in tree} == {(4, V)}


def test_a_draft_vocabulary_cuts_the_heads_own_lm_heads(base_dir, tmp_path, monkeypatch):
    """With ``draft_vocab`` the heads rank its ids only (their own LM heads' rows); control:
    heads whose token map is their own draft vocabulary refuse another one."""
    raw = write_medusa(tmp_path / "heads", layers=2)
    ids = list(range(0, V, 3))
    model, _ = load(str(base_dir), drafter=str(tmp_path / "heads"), draft_vocab=ids)
    plain, _ = mlx_lm_load(str(base_dir))
    text, seen = recorded(model, monkeypatch)
    outside = np.setdiff1d(np.arange(V), ids)
    for logits, a in seen[:6]:
        assert np.isinf(logits[:, outside]).all()
        want = reference_levels(plain, raw, text, a)[: logits.shape[0], ids]
        np.testing.assert_allclose(logits[:, ids], want, atol=2e-4, rtol=2e-4)
    write_medusa(tmp_path / "mapped", style="vllm", token_map=[1, 2, 3])
    with pytest.raises(ValueError, match="draft vocabulary of its own"):
        load(str(base_dir), drafter=str(tmp_path / "mapped"), draft_vocab=ids)


@pytest.mark.parametrize("tree", [{}, dict(tree_top_k=1, tree_depth=3, max_tree_nodes=4)])
def test_greedy_equals_plain_decoding_with_drafts_taken(tree, tmp_path):
    """Heads as Medusa's training starts them (zero blocks, the base's LM head) draft the
    base's own next token again, which a low-weight model that repeats itself accepts:
    a quarter fewer passes than tokens at least, and mlx-lm's greedy tokens."""
    base = write_base(tmp_path / "base", V, weight_scale=1.0)
    write_medusa(tmp_path / "heads", layers=2, like_base=base_head(base))
    model, _ = load(str(base), drafter=str(tmp_path / "heads"))
    plain, _ = mlx_lm_load(str(base))
    for prompt in ([3], PROMPT):
        toks, out = spec_tokens(model, prompt, 48, **tree)
        assert toks == plain_greedy(plain, prompt, 48), (tree, prompt)
        assert out[-1][3] < 0.75 * len(toks)  # (passes)


def test_negative_control_a_wrong_verifier_is_caught(tmp_path, monkeypatch):
    base = write_base(tmp_path / "base", V, weight_scale=1.0)
    write_medusa(tmp_path / "heads", like_base=base_head(base), shared=True)
    model, _ = load(str(base), drafter=str(tmp_path / "heads"))
    right, _ = spec_tokens(model, PROMPT, 30)
    real = decode._accept

    def accept_first_child(tokens, parents, ancestors, targets, depth):
        _, last = real(tokens, parents, ancestors, targets, depth)
        return None, mx.maximum(last, mx.array(1 if tokens.size > 1 else 0))

    monkeypatch.setattr(decode, "_accept", accept_first_child)
    wrong, _ = spec_tokens(model, PROMPT, 30)
    assert wrong != right


def test_sampling_keeps_the_distribution(tmp_path, monkeypatch):
    """Recursive rejection over the heads' static tree samples the base's distribution
    (control: each level verified against the next level's draft distribution)."""
    # (3 layers keep the draws cheap; of seeds 0-3, seed 2's shows the control's bias most:
    # p 6e-130, against 6e-18 to 2e-79)
    base = write_base(tmp_path / "base", 6, layers=3, seed=2, weight_scale=1.0)
    write_medusa(tmp_path / "heads", heads=2, layers=2, scale=1.0, vocab=6)
    model, _ = load(str(base), drafter=str(tmp_path / "heads"))
    assert_rejection_keeps_the_distribution(model, monkeypatch, drawn=False)


def test_save_writes_a_directory_that_loads_back(base_dir, tmp_path, monkeypatch):
    from mlx_specstream.utils import save

    write_medusa(tmp_path / "heads", style="vllm", layers=2, token_map=list(range(1, V, 2)))
    model, tok, config = load(str(base_dir), drafter=str(tmp_path / "heads"), return_config=True)
    _, before = recorded(model, monkeypatch)
    path = save(tmp_path / "saved", model, tok, config=config)
    section = json.loads((path / "config.json").read_text())["drafter"]
    assert section["kind"] == "medusa" and section["num_draft_tokens"] == 3
    assert section["medusa"] == {"layers_per_head": 2, "lm_heads": 3, "fc_bias": True,
                                 "token_map_size": V // 2}  # fmt: skip
    again, _ = load(str(path))
    _, after = recorded(again, monkeypatch)
    assert len(before) == len(after) > 5
    for (x, _), (y, _) in zip(before, after):
        np.testing.assert_array_equal(x, y)


def test_a_model_with_heads_beside_its_weights_drafts_with_them(base_dir, tmp_path, monkeypatch):
    """A model directory whose config names ``medusa_num_heads`` and which holds
    ``medusa_lm_head.safetensors`` beside its weights (TGI's Medusa models): ``load(DIR)``
    drafts with those heads, as ``load(base, drafter=DIR)`` does; output mlx-lm's."""
    import shutil

    own = tmp_path / "own"
    shutil.copytree(base_dir, own)
    raw = write_medusa(tmp_path / "heads", layers=2)
    shutil.copy(tmp_path / "heads" / "medusa_lm_head.safetensors", own)
    config = json.loads((own / "config.json").read_text())
    config.update(medusa_num_heads=3)  # (no medusa_num_layers: not the base's 6 layers)
    (own / "config.json").write_text(json.dumps(config))
    plain, _ = mlx_lm_load(str(base_dir))
    for model, _ in (load(str(own)), load(str(base_dir), drafter=str(own))):
        assert isinstance(model.speculative_streams.drafter, MedusaCheckpointHeads)
        text, seen = recorded(model, monkeypatch)
        assert text[len(PROMPT) :] == plain_greedy(plain, PROMPT, 24)
        logits, a = seen[2]
        want = reference_levels(plain, raw, text, a)[: logits.shape[0]]
        np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)
    (own / "medusa_lm_head.safetensors").unlink()  # (control: a model's config alone)
    with pytest.raises(ValueError, match="is a plain model"):
        load(str(own))


def test_more_heads_in_the_file_than_its_config_names_are_read(base_dir, tmp_path):
    """FasterDecoding's uploaded configs name 2 heads where the file holds 5 (its own
    loader asks for 5): every head in the tensors drafts a level."""
    write_medusa(tmp_path / "heads", heads=5, config={"medusa_num_heads": 2})
    model, _ = load(str(base_dir), drafter=str(tmp_path / "heads"))
    assert model.speculative_streams.config.num_draft_tokens == 5


def test_bad_checkpoints_get_clear_errors(base_dir, tmp_path):
    def bad(name, **kwargs):
        write_medusa(tmp_path / name, **kwargs)
        return str(tmp_path / name)

    pickled = tmp_path / "pickled"  # (FasterDecoding's own: a PyTorch pickle)
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"medusa_num_heads": 3}))
    (pickled / "medusa_lm_head.pt").write_bytes(b"")
    cases = [
        (str(pickled), "convert.medusa"),
        (bad("wide", width=32), "does not fit"),
        (bad("vocab", style="vllm", vocab=80), "vocab_size=80"),
        (bad("said", config={"medusa_num_heads": 4}), "medusa_num_heads=4"),
        (bad("layers", config={"medusa_num_layers": 2}), "medusa_num_layers=2"),
        (bad("vllm_said", style="vllm", config={"num_heads": 5}), "num_heads=5"),
        (bad("name", extra={"3.0.mlp.weight": mx.zeros((2,))}), "'3.0.mlp.weight'"),
        (bad("gap", extra={"4.0.linear.weight": mx.zeros((D, D))}), "heads \\[0, 1, 2, 4\\]"),
        (bad("map", style="vllm", token_map=[1, 1, 2]), "token_map"),
        (bad("range", style="vllm", token_map=[1, 99]), "token_map"),
        (bad("trunc", style="vllm", config={"truncated_vocab_size": 10}), "truncated_vocab_size"),
        (bad("one_head", style="vllm", config={"original_lm_head": True}), "original_lm_head"),
        (bad("fc_bias", style="vllm", config={"medusa_fc_bias": False}), "medusa_fc_bias"),
    ]
    assert_checkpoints_refused(base_dir, tmp_path, cases, bad("fine"), "a Medusa")


def test_a_pytorch_pickle_converts_and_drafts_as_its_safetensors(base_dir, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    """``python -m convert.medusa`` rewrites FasterDecoding's ``medusa_lm_head.pt`` (its
    state dict: a residual block repeated within a head, ``[ResBlock] * L``, is one
    tensor under two names) as safetensors: every tensor kept bit for bit, ``--out``
    never overwritten, and the heads draft as the raw tensors say (the pickle refused
    before, with the command)."""
    torch = pytest.importorskip("torch")
    from convert.medusa import main as convert_main

    write_medusa(tmp_path / "st", layers=2)
    raw = {k: torch.from_numpy(np.array(v))
           for k, v in mx.load(str(tmp_path / "st" / "medusa_lm_head.safetensors")).items()}  # fmt: skip
    for j in range(3):  # (FasterDecoding's repeated block: one module, both names)
        for what in ("weight", "bias"):
            raw[f"{j}.1.linear.{what}"] = raw[f"{j}.0.linear.{what}"]
    src = tmp_path / "pt"
    src.mkdir()
    (src / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(raw, src / "medusa_lm_head.pt")
    with pytest.raises(ValueError, match="convert.medusa"):
        load(str(base_dir), drafter=str(src))
    convert_main(["--src", str(src), "--out", str(tmp_path / "converted")])
    back = mx.load(str(tmp_path / "converted" / "medusa_lm_head.safetensors"))
    assert back.keys() == raw.keys()
    assert all(np.array_equal(np.array(back[k]), raw[k].numpy()) for k in raw)
    with pytest.raises(FileExistsError, match="converted"):
        convert_main(["--src", str(src), "--out", str(tmp_path / "converted")])
    model, _ = load(str(base_dir), drafter=str(tmp_path / "converted"))
    plain, _ = mlx_lm_load(str(base_dir))
    block = [(back[f"{j}.0.linear.weight"], back[f"{j}.0.linear.bias"]) for j in range(3)]
    shared = dict(blocks=[[b, b] for b in block], lm=[back[f"{j}.2.weight"] for j in range(3)],
                  token_map=None)  # fmt: skip
    text, seen = recorded(model, monkeypatch)
    for logits, a in seen[:6]:
        want = reference_levels(plain, shared, text, a)[: logits.shape[0]]
        np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)


def test_the_command_line_takes_the_heads_on_a_4_bit_base(base_dir, tmp_path, capsys,
                                                          monkeypatch):  # fmt: skip
    """``mlx_specstream.generate --model Q4 --drafter HEADS`` prints the 4-bit base's
    greedy text (mlx-lm's); the heads' matrices are quantized as the base's (4 bits, groups
    of 32; on a float base they stay float), and a saved directory drafts the same."""
    import importlib

    from mlx_lm.generate import generate as mlx_lm_generate
    from test_mtp import _quantized_copy

    q4 = _quantized_copy(base_dir, tmp_path / "q4")
    write_medusa(tmp_path / "heads", style="vllm", layers=2)
    prompt = "t1 t5 t9 t3"
    gen = importlib.import_module("mlx_specstream.generate")  # (not the function so named)
    gen.main(["--model", str(q4), "--drafter", str(tmp_path / "heads"), "--prompt", prompt,
              "--max-tokens", "24", "--ignore-chat-template"])  # fmt: skip
    plain, tok = mlx_lm_load(str(q4))
    want = mlx_lm_generate(plain, tok, prompt=tok.encode(prompt), max_tokens=24)
    assert want and want in capsys.readouterr().out
    from mlx_specstream.utils import save

    model, tok, config = load(str(q4), drafter=str(tmp_path / "heads"), return_config=True)
    drafter = model.speculative_streams.drafter
    q = config["quantization"]
    for layer in (drafter.lm_heads[0], drafter.heads[1][1].linear):
        assert isinstance(layer, nn.QuantizedLinear)
        assert (layer.bits, layer.group_size) == (q["bits"], q["group_size"]) == (4, 32)
    floats, _ = load(str(base_dir), drafter=str(tmp_path / "heads"))
    assert type(floats.speculative_streams.drafter.lm_heads[0]) is nn.Linear
    _, before = recorded(model, monkeypatch)
    again, _ = load(str(save(tmp_path / "saved", model, tok, config=config)))
    _, after = recorded(again, monkeypatch)
    assert len(before) == len(after) > 5
    for (x, _), (y, _) in zip(before, after):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_batch_s_rows_draft_with_the_heads_as_each_prompt_alone(pipeline, tmp_path):
    """A batch's rows drafting with released heads (their chain): each row mlx-lm's greedy
    tokens, in the passes its prompt takes alone with the heads' chain."""
    from test_batch_medusa import LIMITS, PROMPTS, run

    base = write_base(tmp_path / "base", V, weight_scale=1.0)
    write_medusa(tmp_path / "heads", layers=2, like_base=base_head(base))
    model, _ = load(str(base), drafter=str(tmp_path / "heads"))
    plain, _ = mlx_lm_load(str(base))
    tokens, passes = run(model, draft="streams", pipeline=pipeline)
    assert sum(passes) < sum(LIMITS) * 0.9, "drafts were rarely accepted: no power"
    for p, n, got, k in zip(PROMPTS, LIMITS, tokens, passes):
        assert got == plain_greedy(plain, p, n)
        _, records = spec_tokens(model, p, n, tree_top_k=1, tree_depth=3)
        assert k == records[-1][3]

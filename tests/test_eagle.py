"""EAGLE-3 drafters (mlx_specstream.eagle): their levels equal the raw checkpoint's
computed from scratch, decoding equals mlx-lm's, both checkpoint formats load, and bad
checkpoints get clear errors."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from eagle_helpers import (
    assert_checkpoints_refused,
    assert_rejection_keeps_the_distribution,
    recorded_drafts,
    saved_and_loaded_back,
    reference_levels,
)
from eagle_helpers import write_base, write_eagle
from helpers import plain_greedy, spec_tokens
from mlx_lm import load as mlx_lm_load

from mlx_specstream import eagle, load

V = 64
PROMPT = [4, 8, 15, 16, 23]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("eagle") / "base", V)


def drafts_of_each_step(model, monkeypatch, **tree):
    """:func:`eagle_helpers.recorded_drafts` of ``PROMPT`` by the model's drafter."""
    return recorded_drafts(model, monkeypatch, eagle.Eagle3Drafter, PROMPT, **tree)


@pytest.mark.parametrize(
    "style,layer_ids,options",
    [
        ("eagle", None, {}),  # (the default layers: 2, N // 2, N - 3)
        ("eagle", [0, 3, 6], dict(draft_vocab=list(range(1, V, 3)))),  # (embeddings, output)
        ("speculators", [1, 3, 4], dict(norm_before_residual=True, own_embeddings=True)),
        # (the speculators' later settings: several layers, four features normed, EAGLE 3.1)
        ("speculators", [1, 3, 4, 6], dict(num_layers=2, norm_before_fc=True, norm_output=True)),
        (
            "speculators",
            [0, 2, 5],
            dict(
                num_layers=3,
                layer_type="qwen3",
                fc_norm=True,
                head_dim=8,
                attention_bias=True,
                norm_before_residual=True,
            ),
        ),
        ("eagle", None, dict(layer_type="qwen3")),  # (SpecForge's Qwen3ForCausalLMEagle3)
    ],
)
def test_every_draft_equals_the_raw_tensors_from_scratch(style, layer_ids, options, base_dir,
                                                         tmp_path, monkeypatch):  # fmt: skip
    """Each step's levels (the drafter's cached rows of the accepted text, its
    recursion's rows trimmed after) equal every row recomputed from the checkpoint's
    raw tensors and mlx-lm's base layers. Controls: other feature layers, deeper levels
    through ``fc`` or from the other side of the final norm, the other residual; where
    the checkpoint has them, its first layer alone, no norms of Qwen3's queries and keys,
    no norm of the features."""
    ref = write_eagle(tmp_path / "eagle", V, style=style, layer_ids=layer_ids, **options)
    model, _ = load(str(base_dir), drafter=str(tmp_path / "eagle"))
    plain, _ = mlx_lm_load(str(base_dir))
    ids = layer_ids or [2, 3, 3]
    assert model.speculative_streams.drafter.feature_layers == ids
    text, seen = drafts_of_each_step(model, monkeypatch)
    assert text == PROMPT + plain_greedy(plain, PROMPT, 24)
    checked = 0
    for logits, a, token, offset in seen:
        if a + 1 >= len(text):
            continue  # (the last step's drafts go unused)
        assert text[a + 1] == token and offset == a + 1  # real rows 0..a only
        want = reference_levels(plain, ref, text, a, logits.shape[0], ids)
        np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)
        outside = np.setdiff1d(np.arange(V), ref["ids"])
        assert np.all(np.isneginf(logits[:, outside]))
        checked += 1
    assert checked >= 5 and seen[0][0].shape[0] == 3
    logits, a, _, _ = seen[2]
    other = [i for i in range(7) if i not in ids][:1] + ids[1:]
    controls = [dict(layer_ids=other), dict(through_fc=True),
                dict(normed_recursion=not ref["norm_output"]),
                dict(norm_first=not ref["norm_first"])]  # fmt: skip
    controls += [dict(upper=False)] if ref["num_layers"] > 1 else []
    controls += [dict(qk_norm=False)] if options.get("layer_type") == "qwen3" else []
    controls += [dict(feature_norm=False)] if "input_norm.weight" in ref["w"] else []
    controls += [dict(feature_norm=False)] if "fc_norm.0.weight" in ref["w"] else []
    for control in controls:
        kw = {"layer_ids": ids, **control}
        wrong = reference_levels(plain, ref, text, a, logits.shape[0], **{"layer_ids": ids, **kw})
        assert not np.allclose(logits, wrong, atol=1e-2), control


def test_greedy_equals_plain_decoding_and_drafts_are_taken(base_dir, tmp_path):
    """Chains and trees of the drafter's levels give mlx-lm's greedy tokens; control: a
    verifier accepting every draft unchecked changes them."""
    write_eagle(tmp_path / "eagle", V, draft_vocab=list(range(0, V, 2)), layer_ids=[0, 3, 6])
    model, _ = load(str(base_dir), drafter=str(tmp_path / "eagle"))
    plain, _ = mlx_lm_load(str(base_dir))
    for prompt in ([3], PROMPT):
        want = plain_greedy(plain, prompt, 40)
        for tree in ({}, dict(tree_top_k=2, max_tree_nodes=8)):
            got, _ = spec_tokens(model, prompt, 40, **tree)
            assert got == want, tree


def test_negative_control_a_wrong_verifier_is_caught(base_dir, tmp_path, monkeypatch):
    import mlx_specstream.decode as decode

    write_eagle(tmp_path / "eagle", V, layer_ids=[0, 3, 6])
    model, _ = load(str(base_dir), drafter=str(tmp_path / "eagle"))
    right, _ = spec_tokens(model, PROMPT, 30)

    def accept_all(tokens, parents, ancestors, targets, depth):
        return None, mx.array(tokens.shape[0] - 1)

    monkeypatch.setattr(decode, "_accept", accept_all)
    wrong, _ = spec_tokens(model, PROMPT, 30)
    assert wrong != right


def test_save_writes_a_directory_that_loads_back(base_dir, tmp_path, monkeypatch):
    """``save`` writes the base, ``drafter.safetensors`` and a drafter section that
    holds the layer's settings, and drops a streams section the base's config had (a
    stream model's base with another drafter); loaded back, it drafts the same levels."""
    write_eagle(tmp_path / "eagle", V, style="speculators", layer_ids=[1, 3, 5],
                draft_vocab=list(range(2, V, 2)), own_embeddings=True)  # fmt: skip
    section = saved_and_loaded_back(base_dir, tmp_path / "eagle", tmp_path / "saved",
                                    lambda m: drafts_of_each_step(m, monkeypatch))  # fmt: skip
    assert section["kind"] == "eagle3" and section["eagle"]["feature_layers"] == [1, 3, 5]
    assert section["eagle"]["own_embeddings"] is True
    assert section["eagle"]["num_layers"] == 1 and section["eagle"]["layer_type"] == "llama"


def test_a_drafter_of_several_qwen3_layers_saves_and_loads_back(base_dir, tmp_path, monkeypatch):
    """The speculators' later settings survive ``save``: the section holds them, the
    tensors keep every layer, and the directory loaded back drafts the same levels."""
    write_eagle(tmp_path / "eagle", V, style="speculators", layer_ids=[1, 2, 3, 5], num_layers=3,
                layer_type="qwen3", fc_norm=True, norm_output=True)  # fmt: skip
    section = saved_and_loaded_back(base_dir, tmp_path / "eagle", tmp_path / "saved",
                                    lambda m: drafts_of_each_step(m, monkeypatch))  # fmt: skip
    e = section["eagle"]
    assert (e["num_layers"], e["layer_type"], e["fc_norm"], e["norm_output"]) == (
        3,
        "qwen3",
        True,
        True,
    )
    keys = mx.load(str(tmp_path / "saved" / "drafter.safetensors")).keys()
    assert {"upper.1.self_attn.q_norm.weight", "fc_norm.3.weight"} <= set(keys)


def test_a_section_written_before_the_later_settings_means_one_llama_layer():
    """A drafter section saved before the speculators' later settings were read (its
    ``eagle`` dict without them) loads as one Llama layer without their norms; a wrong
    value of one of them is refused by name."""
    from mlx_specstream.config import EAGLE_KEYS, EAGLE_LATER_KEYS, DrafterConfig

    old = {k: None for k in EAGLE_KEYS if k not in EAGLE_LATER_KEYS}
    old["feature_layers"] = [2, 3, 3]
    config = DrafterConfig.from_dict({"kind": "eagle3", "eagle": old})
    assert {k: config.eagle[k] for k in EAGLE_LATER_KEYS} == EAGLE_LATER_KEYS
    for bad, match in ((dict(num_layers=0), "num_layers=0"),
                       (dict(layer_type="gemma"), "layer_type='gemma'"),
                       (dict(norm_before_fc=True, fc_norm=True), "norm_before_fc and fc_norm")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            DrafterConfig.from_dict({"kind": "eagle3", "eagle": {**old, **bad}})


def test_bad_checkpoints_get_clear_errors(base_dir, tmp_path):
    def broken(name, edit=None, config=None, **options):
        path = tmp_path / name
        write_eagle(path, V, **options)
        if edit is not None:
            weights = dict(mx.load(str(path / "model.safetensors")))
            edit(weights)
            mx.save_safetensors(str(path / "model.safetensors"), weights)
        if config is not None:
            data = json.loads((path / "config.json").read_text())
            data.update(config) if isinstance(config, dict) else config(data)
            (path / "config.json").write_text(json.dumps(data))
        return str(path)

    def nested(**edits):  # (the speculators' transformer_layer_config)
        return lambda data: data["transformer_layer_config"].update(edits)

    def torch_only(path):
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "config.json").write_text((Path(path) / "config.json").read_text())
        (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
        return str(tmp_path / "bin")

    cases = [
        (broken("ids", layer_ids=[0, 3, 9]), r"eagle_aux_hidden_state_layer_ids=\[0, 3, 9\]"),
        (
            broken("two", config=dict(num_hidden_layers=2)),
            "num_hidden_layers=2, but its tensors " r"hold 1 layer\(s\)",
        ),
        (
            broken("one", style="speculators", num_layers=2, config=nested(num_hidden_layers=1)),
            r"num_hidden_layers=1, but its tensors hold 2 layer\(s\)",
        ),
        (
            broken("window", style="speculators", config=nested(layer_types=["sliding_attention"])),
            r"layer_types=\['sliding_attention'\]",
        ),
        (
            broken("kind", style="speculators", config=nested(model_type="mistral")),
            "transformer_layer_config.model_type: a 'mistral' layer",
        ),
        (broken("act", config=dict(hidden_act="gelu")), "hidden_act='gelu'"),
        (broken("rope", config=dict(partial_rotary_factor=0.5)), "partial_rotary_factor=0.5"),
        (
            broken("noaux", config=dict(eagle_config={"use_aux_hidden_state": False})),
            "use_aux_hidden_state=false",
        ),
        (
            broken("norms", style="speculators", config=dict(norm_before_fc=True, fc_norm=True)),
            "norm_before_fc and fc_norm",
        ),
        (broken("bias", layer_type="qwen3", config=dict(mlp_bias=True)), "mlp_bias=true"),
        (
            broken("unnormed", style="speculators", config=dict(norm_before_fc=True)),
            "(?s)does not fit this model.*input_norm",
        ),
        (broken("wide", config=dict(target_hidden_size=128)), "target_hidden_size=128"),
        (broken("vocab", config=dict(vocab_size=65)), "vocab_size=65"),
        (broken("d2t", edit=lambda w: w.update(d2t=w["d2t"] + 200)), "d2t maps to token"),
        (broken("gone", edit=lambda w: w.pop("fc.weight")), "does not fit this model"),
        (torch_only(broken("fine")), "pytorch_model.bin"),
    ]
    assert_checkpoints_refused(base_dir, tmp_path, cases, str(tmp_path / "fine"), "an EAGLE-3")


SMALL_V = 24  # (a vocabulary where this random drafter's drafts are often right)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("eagle-small") / "base", SMALL_V)


def eagle_model(base_dir, tmp_path, **options):
    """The base with a random EAGLE-3 drafter (features: the embeddings, layer 3's input,
    the last output), mlx-lm's base and the drafter's raw tensors."""
    ref = write_eagle(tmp_path / "eagle", SMALL_V, layer_ids=[0, 3, 6], scale=1.0, **options)
    model, _ = load(str(base_dir), drafter=str(tmp_path / "eagle"))
    plain, _ = mlx_lm_load(str(base_dir))
    return model, plain, ref


@pytest.mark.parametrize("options", [{}, dict(style="speculators", num_layers=2, norm_output=True)])
def test_each_batch_row_s_levels_equal_the_raw_tensors_from_scratch(small_base, tmp_path,
                                                                    monkeypatch, options):  # fmt: skip
    """In a batch (odd rows merging lookup in, a row joining mid-way), every pass's levels
    of every row equal the drafter from scratch over the row's text (a drafter of two
    layers: each on its own ragged cache); control: other feature layers."""
    from test_batch_mtp import assert_levels_from_scratch, levels_recorded

    model, plain, ref = eagle_model(small_base, tmp_path, draft_vocab=list(range(1, SMALL_V, 2)),
                                    **options)  # fmt: skip
    passes, kept_more = levels_recorded(model, monkeypatch, eagle.Eagle3Drafter, "logits")

    def levels(layers):
        return lambda text, a, n: reference_levels(plain, ref, text, a, n, layers)

    assert_levels_from_scratch(passes, kept_more, levels([0, 3, 6]), [levels([1, 3, 6])])


@pytest.mark.parametrize("options", [{}, dict(style="speculators", num_layers=2)])
def test_batch_rows_equal_each_prompt_alone_in_the_passes_of_a_chain(small_base, tmp_path, options):
    """``batch_generate`` rows drafting with the drafter (of one layer or two):
    mlx-lm's greedy tokens, in as many passes as decoding each prompt alone with its
    chain of 3, pipelined or not; a row joining with a cache of earlier context too."""
    from test_batch_mtp import LIMITS, assert_a_row_with_earlier_context_decodes_as_mlx_lm
    from test_batch_mtp import assert_rows_decode_as_alone

    model, plain, _ = eagle_model(small_base, tmp_path, **options)
    alone = assert_rows_decode_as_alone(model, plain, pipelines=(False, True))
    assert sum(LIMITS) > sum(alone) + 10, alone  # (drafts were taken)
    assert_a_row_with_earlier_context_decodes_as_mlx_lm(model, plain)


def test_a_draft_vocabulary_of_another_source_is_refused(small_base, tmp_path):
    """The drafter ranks its own d2t's tokens: another draft vocabulary is refused."""
    from mlx_specstream.draft_vocab import use_draft_vocab

    model, _, _ = eagle_model(small_base, tmp_path)
    with pytest.raises(ValueError, match="d2t"):
        use_draft_vocab(model, list(range(10)))


def test_sampling_keeps_the_distribution(tmp_path, monkeypatch):
    """Recursive rejection over the drafter's drawn dynamic trees and its static trees
    (drafts outside its draft vocabulary impossible: ``q = 0`` there) samples the base's
    distribution; controls: drawn drafts verified as if drawn uniformly, each static
    level verified against the next level's draft distribution."""
    # (3 layers keep the draws cheap; of seeds 0-3, seed 1's shows both controls' biases
    # strongly: p 2e-172 and 1e-11; seed 3's leaves the second at 0.04)
    base = write_base(tmp_path / "base", 6, layers=3, seed=1, weight_scale=1.0)
    write_eagle(tmp_path / "eagle", 6, draft_vocab=[0, 2, 3, 5], layer_ids=[0, 2, 3], scale=1.0,
                head_scale=4.0)  # fmt: skip
    model, _ = load(str(base), drafter=str(tmp_path / "eagle"))
    assert_rejection_keeps_the_distribution(model, monkeypatch)


def test_the_command_lines_take_the_drafter_on_a_4_bit_base(small_base, tmp_path, capsys):
    """``mlx_specstream.generate --model Q4 --drafter EAGLE`` prints the 4-bit base's
    greedy text (mlx-lm's); ``mlx_specstream.tune --model Q4 --drafter EAGLE`` times the
    drafter's trees and writes neither directory (``--save`` keeps the flags in the user's
    store)."""
    import importlib

    from mlx_lm.generate import generate as mlx_lm_generate
    from test_mtp import _quantized_copy

    q4 = _quantized_copy(small_base, tmp_path / "q4")
    write_eagle(tmp_path / "eagle", SMALL_V, layer_ids=[0, 3, 6], scale=1.0)
    prompt = "t1 t5 t9 t3"
    gen = importlib.import_module("mlx_specstream.generate")  # (not the function so named)
    gen.main(["--model", str(q4), "--drafter", str(tmp_path / "eagle"), "--prompt", prompt,
              "--max-tokens", "24", "--ignore-chat-template"])  # fmt: skip
    plain, tok = mlx_lm_load(str(q4))
    assert (
        mlx_lm_generate(plain, tok, prompt=tok.encode(prompt), max_tokens=24)
        in capsys.readouterr().out
    )
    tune = importlib.import_module("mlx_specstream.tune")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    before = [(d / "config.json").read_text() for d in (q4, tmp_path / "eagle")]
    argv = ["--model", str(q4), "--drafter", str(tmp_path / "eagle"), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--num-prompts", "1", "--max-tokens", "8",
            "--confirm-rounds", "0"]  # fmt: skip
    tune.main(argv)
    out = capsys.readouterr().out
    assert "tree_depth" in out and "its files are not written" in out
    tune.main(argv + ["--save"])
    assert "where a call names no drafting flag" in capsys.readouterr().out
    assert [(d / "config.json").read_text() for d in (q4, tmp_path / "eagle")] == before


def test_a_hybrid_s_chains_draft_from_the_raw_tensors_from_scratch(tmp_path, monkeypatch):
    """Qwen3-Next (Gated DeltaNet and attention layers; chains through its own passes):
    each step's levels equal the drafter from scratch over the accepted text, and the
    output equals mlx-lm's; control: other feature layers."""
    from helpers import tiny_hybrid

    model, plain = tiny_hybrid("qwen3_next", SMALL_V), tiny_hybrid("qwen3_next", SMALL_V)
    ref = write_eagle(tmp_path / "eagle", SMALL_V, layer_ids=[0, 2, 4], scale=1.0)
    eagle.attach_eagle(model, tmp_path / "eagle")
    seen, real_draft = [], eagle.Eagle3Drafter.draft

    def recording(self, rt, state, hidden, path, path_tokens, token, levels=None):
        logits = real_draft(self, rt, state, hidden, path, path_tokens, token, levels)
        seen.append((np.array(logits.astype(mx.float32)), state.offset - 1, token))
        return logits

    monkeypatch.setattr(eagle.Eagle3Drafter, "draft", recording)
    toks, records = spec_tokens(model, PROMPT, 24)
    monkeypatch.undo()
    text = PROMPT + toks
    assert toks == plain_greedy(plain, PROMPT, 24) and records[-1][3] < 24
    checked = 0
    for logits, a, token in seen:
        if a + 1 < len(text):
            assert text[a + 1] == token
            want = reference_levels(plain, ref, text, a, logits.shape[0], [0, 2, 4])
            np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)
            checked += 1
    assert checked >= 5
    logits, a, _ = seen[2]
    wrong = reference_levels(plain, ref, text, a, logits.shape[0], [1, 2, 4])
    assert not np.allclose(logits, wrong, atol=1e-2)


def test_a_pytorch_checkpoint_converts_and_drafts_as_its_safetensors(base_dir, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """``python -m convert.eagle3`` rewrites a ``pytorch_model.bin`` (as EAGLE's code saves
    one: int64 ``d2t``, bool ``t2d``) as safetensors: every tensor kept bit for bit, and
    the drafter drafts as the same tensors written as safetensors do; ``--out`` is never
    overwritten."""
    torch = pytest.importorskip("torch")
    from convert.eagle3 import main as convert_main

    write_eagle(tmp_path / "st", V, layer_ids=[0, 3, 6], draft_vocab=list(range(3, V, 2)))
    src = tmp_path / "pt"
    src.mkdir()
    (src / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    raw = {
        k: torch.from_numpy(np.array(v))
        for k, v in mx.load(str(tmp_path / "st" / "model.safetensors")).items()
    }
    torch.save(raw, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load(str(base_dir), drafter=str(src))
    convert_main(["--src", str(src), "--out", str(tmp_path / "converted")])
    back = mx.load(str(tmp_path / "converted" / "model.safetensors"))
    assert back.keys() == raw.keys()
    assert all(np.array_equal(np.array(back[k]), raw[k].numpy()) for k in raw)
    with pytest.raises(FileExistsError, match="converted"):
        convert_main(["--src", str(src), "--out", str(tmp_path / "converted")])
    drafts = []
    for d in ("st", "converted"):
        model, _ = load(str(base_dir), drafter=str(tmp_path / d))
        drafts.append(drafts_of_each_step(model, monkeypatch)[1])
    for a, b in zip(*drafts):
        np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("options", [{}, dict(style="speculators", num_layers=2)])
def test_a_follow_up_on_the_same_prompt_cache_continues_the_drafter_s_rows(small_base, tmp_path,
                                                                          options):  # fmt: skip
    """A finished generation keeps the drafter's rows (each of its layers') and its last
    token's features (all three layers'); a follow-up on the same cache answers as a cold
    run of the whole conversation, with the drafter's KV caches equal to the cold run's
    row for row. Control: the last token's features dropped, the rows start anew."""
    from mlx_specstream.cache import make_prompt_cache
    from mlx_specstream.decode import spec_generate_step

    model, plain, _ = eagle_model(small_base, tmp_path, **options)

    def run(prompt, cache, n):
        gen = spec_generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=cache)
        return [t for t, *_ in gen]

    first, follow = [3, 9, 4, 17, 5, 8, 22, 6], [21, 2, 14]
    cache = make_prompt_cache(model)
    out1 = run(first, cache, 8)
    state = cache.drafter_state
    assert state.pending_hidden.shape == (1, 3 * 64) and state.offset == len(first) + 7
    out2 = run(follow, cache, 12)
    cold_cache = make_prompt_cache(model)
    assert out2 == run(first + out1 + follow, cold_cache, 12)
    assert out2 == plain_greedy(plain, first + out1 + follow, 12)
    a, b = cache.drafter_state.cache, cold_cache.drafter_state.cache
    assert a.offset == b.offset
    layers = getattr(a, "caches", [a])
    assert len(layers) == options.get("num_layers", 1)
    for a, b in zip(layers, getattr(b, "caches", [b])):
        np.testing.assert_allclose(np.array(a.keys[..., : a.offset, :]),
                                   np.array(b.keys[..., : b.offset, :]), atol=1e-4)  # fmt: skip
    # Control: without the last token's features kept, the drafter starts its rows anew.
    cache = make_prompt_cache(model)
    run(first, cache, 8)
    cache.drafter_state.pending_hidden = None
    assert run(follow, cache, 12) == out2 and cache.drafter_state.cache.offset != b.offset

"""DFlash drafters (mlx_specstream.dflash): their levels equal the raw checkpoint's
computed from scratch, one sequence's and a batch's rows', decoding equals mlx-lm's, and bad
checkpoints get clear errors."""

import json

import mlx.core as mx
import numpy as np
import pytest
from dflash_helpers import reference_levels, write_dflash
from eagle_helpers import (
    assert_checkpoints_refused,
    assert_rejection_keeps_the_distribution,
    recorded_drafts,
    saved_and_loaded_back,
    write_base,
)
from helpers import plain_greedy, spec_tokens
from mlx_lm import load as mlx_lm_load

from mlx_specstream import dflash, load

V = 64
PROMPT = [4, 8, 15, 16, 23, 42, 7, 30, 11, 2]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("dflash") / "base", V)


def test_block_mask_is_exact():
    """Golden masks: the docstring's example, a window both ways, and none at all."""
    T, F = True, False
    got = dflash.block_mask(3, 2, causal=True, window=3)
    assert got.tolist() == [[T, T, T, F, F], [F, T, T, T, F], [F, F, T, T, T]]
    got = dflash.block_mask(2, 3, causal=False, window=2)
    assert got.tolist() == [[F, F, T, T, T], [F, F, F, T, T]]
    assert dflash.block_mask(4, 9, causal=False, window=None) is None


def drafts_of_each_step(model, monkeypatch, **tree):
    """:func:`eagle_helpers.recorded_drafts` of ``PROMPT`` by the model's drafter."""
    return recorded_drafts(model, monkeypatch, dflash.DFlashDrafter, PROMPT, **tree)


@pytest.mark.parametrize(
    "options,tree",
    [
        ({}, {}),  # (a chain of 3, full-attention layers)
        (dict(top_level=True, target_layer_ids=(1, 4), block_size=4), dict(tree_depth=3)),
        (dict(window=4, layers=3), dict(tree_top_k=2, tree_depth=2, max_tree_nodes=5)),
    ],
)
def test_every_draft_equals_the_raw_tensors_from_scratch(options, tree, base_dir, tmp_path,
                                                         monkeypatch):  # fmt: skip
    """Each step's levels (the drafter's context rows of the accepted text in its cache,
    the block of the bonus token and masks) equal every row recomputed from the
    checkpoint's raw tensors over mlx-lm's base layers; a sliding layer (causal, its
    window) too. Controls: the features' other offset (HF's hidden_states index as
    ours), another mask, the context through the input norm, a context row missing."""
    ref = write_dflash(tmp_path / "df", V, **options)
    model, _ = load(str(base_dir), drafter=str(tmp_path / "df"))
    plain, _ = mlx_lm_load(str(base_dir))
    assert model.speculative_streams.drafter.feature_layers == ref["ids"]
    text, seen = drafts_of_each_step(model, monkeypatch, **tree)
    assert text == PROMPT + plain_greedy(plain, PROMPT, 24)
    checked = 0
    for logits, a, token, offset in seen:
        if a + 1 >= len(text):
            continue  # (the last step's drafts go unused)
        assert text[a + 1] == token and offset == a + 1  # context rows 0..a only
        want = reference_levels(plain, ref, text, a, logits.shape[0])
        np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)
        checked += 1
    assert checked >= 5 and seen[0][0].shape[0] == tree.get("tree_depth", 3)
    logits, a, _, _ = seen[2]
    other_masks = [(not c, 2 if w is None else None) for c, w in ref["masks"]]
    controls = [dict(layer_ids=[i - 1 for i in ref["ids"]]), dict(masks=other_masks),
                dict(normed_context=True), dict(last_context=1)]  # fmt: skip
    for control in controls:
        wrong = reference_levels(plain, ref, text, a, logits.shape[0], **control)
        assert not np.allclose(logits, wrong, atol=1e-2), control


def test_a_full_block_drafts_every_mask_and_keeps_the_levels_asked(base_dir, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """``full_block``: each step runs every mask of the trained block (4 here) and keeps
    the tree's 2 levels: those of the reference with 4 masks; control: with 2 masks."""
    ref = write_dflash(tmp_path / "df", V)
    model, _ = load(str(base_dir), drafter=str(tmp_path / "df"))
    plain, _ = mlx_lm_load(str(base_dir))
    monkeypatch.setattr(dflash.DFlashDrafter, "full_block", True)
    text, seen = drafts_of_each_step(model, monkeypatch, tree_depth=2)
    assert text == PROMPT + plain_greedy(plain, PROMPT, 24)
    for logits, a, _, _ in seen[:4]:
        assert logits.shape[0] == 2
        want = reference_levels(plain, ref, text, a, 4)[:2]
        np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)
        assert not np.allclose(logits, reference_levels(plain, ref, text, a, 2), atol=1e-3)


def test_greedy_equals_plain_decoding_and_a_wrong_verifier_is_caught(base_dir, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """Chains and trees of the drafter's levels give mlx-lm's greedy tokens, a one-token
    prompt too; control: a verifier accepting every draft unchecked changes them."""
    import mlx_specstream.decode as decode

    write_dflash(tmp_path / "df", V, block_size=6)
    model, _ = load(str(base_dir), drafter=str(tmp_path / "df"))
    plain, _ = mlx_lm_load(str(base_dir))
    for prompt in ([3], PROMPT):
        want = plain_greedy(plain, prompt, 40)
        for tree in ({}, dict(tree_top_k=2, max_tree_nodes=8), dict(tree_depth=5)):
            got, _ = spec_tokens(model, prompt, 40, **tree)
            assert got == want, tree
    right, _ = spec_tokens(model, PROMPT, 30)

    def accept_all(tokens, parents, ancestors, targets, depth):
        return None, mx.array(tokens.shape[0] - 1)

    monkeypatch.setattr(decode, "_accept", accept_all)
    wrong, _ = spec_tokens(model, PROMPT, 30)
    assert wrong != right


def test_save_writes_a_directory_that_loads_back(base_dir, tmp_path, monkeypatch):
    """``save`` writes the base, ``drafter.safetensors`` and a drafter section holding
    the checkpoint's settings (a base's streams section dropped); loaded back, it
    drafts the same levels."""
    ref = write_dflash(tmp_path / "df", V, window=4, layers=2, target_layer_ids=(2, 3))
    section = saved_and_loaded_back(base_dir, tmp_path / "df", tmp_path / "saved",
                                    lambda m: drafts_of_each_step(m, monkeypatch))  # fmt: skip
    assert section["kind"] == "dflash" and section["dflash"]["feature_layers"] == [3, 4]
    assert section["num_draft_tokens"] == 4 and section["dflash"]["mask_token_id"] == ref["mask"]
    assert section["dflash"]["layer_types"][0] == "sliding_attention"


def test_bad_checkpoints_get_clear_errors(base_dir, tmp_path):
    def broken(name, edit=None, config=None, **options):
        path = tmp_path / name
        write_dflash(path, V, **options)
        if edit is not None:
            weights = dict(mx.load(str(path / "model.safetensors")))
            edit(weights)
            mx.save_safetensors(str(path / "model.safetensors"), weights)
        if config is not None:
            data = json.loads((path / "config.json").read_text())
            for key, value in config.items():
                (data["dflash_config"] if key in ("mask_token_id", "block_size") else data)[
                    key
                ] = value
            (path / "config.json").write_text(json.dumps(data))
        return str(path)

    def torch_only(path):
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "config.json").write_text((tmp_path / path / "config.json").read_text())
        (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
        return str(tmp_path / "bin")

    cases = [
        (broken("v2", config=dict(architectures=["DFlash2DraftModel"])), "DFlash-2"),
        (broken("last", target_layer_ids=(1, 5)), r"target_layer_ids=\[1, 5\]"),
        (broken("wide", config=dict(hidden_size=128)), "hidden_size=128"),
        (broken("vocab", config=dict(vocab_size=65)), "vocab_size=65"),
        (broken("mask", config=dict(mask_token_id=64)), "mask_token_id=64"),
        (broken("block", config=dict(block_size=1)), "block_size=1"),
        (broken("bias", config=dict(attention_bias=True)), "attention_bias"),
        (broken("slide", config=dict(layer_types=["sliding_attention"] * 2)), "sliding_window"),
        (broken("gone", edit=lambda w: w.pop("hidden_norm.weight")), "does not fit this model"),
        (torch_only(broken("fine").split("/")[-1]), "no \\*.safetensors"),
    ]
    assert_checkpoints_refused(base_dir, tmp_path, cases, str(tmp_path / "fine"), "a DFlash")


SMALL_V = 24  # (a vocabulary where a random drafter's drafts are sometimes right)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("dflash-small") / "base", SMALL_V)


def test_ragged_block_mask_is_exact():
    """Golden: the docstring's example; and each row's mask is :func:`block_mask`'s over
    its own context (the columns past it hidden), causal or not, sliding or not."""
    T, F = True, False
    got = dflash.ragged_block_mask(mx.array([2, 1]), 3, 2, causal=True, window=None)[:, 0]
    assert got.tolist() == [[[T, T, F, T, F], [T, T, F, T, T]],
                            [[T, F, F, T, F], [T, F, F, T, T]]]  # fmt: skip
    ends, width, block = [5, 0, 3], 6, 3
    for causal, window in ((True, None), (False, 2), (True, 3), (False, None)):
        got = np.array(dflash.ragged_block_mask(mx.array(ends), width, block, causal, window))
        for b, end in enumerate(ends):
            want = dflash.block_mask(block, end, causal, window)
            want = np.ones((block, end + block), bool) if want is None else np.array(want)
            row = got[b, 0]
            assert not row[:, end:width].any(), (causal, window, b)
            assert (row[:, :end] == want[:, :end]).all() and (row[:, width:] == want[:, end:]).all()


@pytest.mark.parametrize("options", [{}, dict(window=3, layers=3)], ids=["full", "sliding"])
def test_each_batch_row_s_levels_equal_the_raw_tensors_from_scratch(options, small_base,
                                                                    tmp_path, monkeypatch):  # fmt: skip
    """In a batch (odd rows merging lookup in, a row joining mid-way), every pass's levels
    of every row equal the drafter from scratch over the row's text (its context rows, its
    block at its own positions), a sliding causal layer too; controls: the other masks, a
    context row missing."""
    from test_batch_mtp import assert_levels_from_scratch, levels_recorded

    ref = write_dflash(tmp_path / "df", SMALL_V, scale=1.0, **options)
    model, _ = load(str(small_base), drafter=str(tmp_path / "df"))
    plain, _ = mlx_lm_load(str(small_base))
    passes, kept_more = levels_recorded(model, monkeypatch, dflash.DFlashDrafter)

    def levels(**control):
        return lambda text, a, n: reference_levels(plain, ref, text, a, n, **control)

    other_masks = [(not c, 2 if w is None else None) for c, w in ref["masks"]]
    controls = [levels(masks=other_masks), levels(last_context=1)]
    assert_levels_from_scratch(passes, kept_more, levels(), controls)


def test_batch_rows_equal_each_prompt_alone_in_the_passes_of_a_chain(small_base, tmp_path):
    """``batch_generate`` rows drafting with the drafter: mlx-lm's greedy tokens, in as
    many passes as decoding each prompt alone with its chain of 3, pipelined or not; a
    row joining with a cache of earlier context too; a chain longer than the block's
    masks refused."""
    from test_batch_mtp import LIMITS, PROMPTS, assert_a_row_with_earlier_context_decodes_as_mlx_lm
    from test_batch_mtp import assert_rows_decode_as_alone

    from mlx_specstream.batch import batch_generate_step

    write_dflash(tmp_path / "df", SMALL_V, scale=0.3)  # (a random drafter often right here)
    model, _ = load(str(small_base), drafter=str(tmp_path / "df"))
    plain, _ = mlx_lm_load(str(small_base))
    alone = assert_rows_decode_as_alone(model, plain, pipelines=(False, True))
    assert sum(LIMITS) > sum(alone) + 10, alone  # (drafts were taken)
    assert_a_row_with_earlier_context_decodes_as_mlx_lm(model, plain)
    with pytest.raises(ValueError, match="num_draft_tokens=5: the model's streams draft 4 tokens"):
        list(batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams",
                                 num_draft_tokens=5))  # fmt: skip


def test_sampling_keeps_the_distribution(tmp_path, monkeypatch):
    """Recursive rejection over the drafter's trees samples the base's distribution;
    control: each level verified against the next level's draft distribution."""
    # (4 layers keep the draws cheap; of seeds 0-3, seed 2's shows the control's bias most:
    # p 3e-75, against 0.5 to 2e-14; window: a causal layer, so the levels differ)
    base = write_base(tmp_path / "base", 6, layers=4, seed=2, weight_scale=1.0)
    write_dflash(tmp_path / "df", 6, scale=2.0, window=64, target_layer_ids=(0, 1, 2))
    data = json.loads((tmp_path / "df" / "config.json").read_text())
    data["dflash_config"].update(output_multiplier=4.0)
    (tmp_path / "df" / "config.json").write_text(json.dumps(data))
    model, _ = load(str(base), drafter=str(tmp_path / "df"))
    assert_rejection_keeps_the_distribution(model, monkeypatch, drawn=False)


def test_the_command_lines_take_the_drafter_on_a_4_bit_base(small_base, tmp_path, capsys):
    """``mlx_specstream.generate --model Q4 --drafter DFLASH`` prints the 4-bit base's
    greedy text (mlx-lm's); ``mlx_specstream.tune --model Q4 --drafter DFLASH`` times the
    drafter's trees and writes neither directory."""
    import importlib

    from mlx_lm.generate import generate as mlx_lm_generate
    from test_mtp import _quantized_copy

    q4 = _quantized_copy(small_base, tmp_path / "q4")
    write_dflash(tmp_path / "df", SMALL_V, scale=1.0)
    prompt = "t1 t5 t9 t3"
    gen = importlib.import_module("mlx_specstream.generate")  # (not the function so named)
    gen.main(["--model", str(q4), "--drafter", str(tmp_path / "df"), "--prompt", prompt,
              "--max-tokens", "24", "--ignore-chat-template"])  # fmt: skip
    plain, tok = mlx_lm_load(str(q4))
    want = mlx_lm_generate(plain, tok, prompt=tok.encode(prompt), max_tokens=24)
    assert want in capsys.readouterr().out
    tune = importlib.import_module("mlx_specstream.tune")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    before = [(d / "config.json").read_text() for d in (q4, tmp_path / "df")]
    tune.main(["--model", str(q4), "--drafter", str(tmp_path / "df"), "--prompts",
               str(tmp_path / "prompts.jsonl"), "--num-prompts", "1", "--max-tokens", "8",
               "--confirm-rounds", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert "tree_depth" in out and "its files are not written" in out
    assert [(d / "config.json").read_text() for d in (q4, tmp_path / "df")] == before


def test_a_hybrid_s_chains_draft_from_the_raw_tensors_from_scratch(tmp_path, monkeypatch):
    """Qwen3-Next (Gated DeltaNet and attention layers; chains through its own passes),
    as z-lab's Qwen3.5 drafters run: each step's levels equal the drafter from scratch
    over the accepted text, and the output equals mlx-lm's; control: other layers."""
    from helpers import tiny_hybrid

    model, plain = tiny_hybrid("qwen3_next", SMALL_V), tiny_hybrid("qwen3_next", SMALL_V)
    ref = write_dflash(tmp_path / "df", SMALL_V, target_layer_ids=(0, 2), scale=1.0)
    dflash.attach_dflash(model, tmp_path / "df")
    seen, real_draft = [], dflash.DFlashDrafter.draft

    def recording(self, rt, state, hidden, path, path_tokens, token, levels=None):
        logits = real_draft(self, rt, state, hidden, path, path_tokens, token, levels)
        seen.append((np.array(logits.astype(mx.float32)), state.offset - 1, token))
        return logits

    monkeypatch.setattr(dflash.DFlashDrafter, "draft", recording)
    prompt = [p % SMALL_V for p in PROMPT]
    toks, _ = spec_tokens(model, prompt, 24)
    monkeypatch.undo()
    text = prompt + toks
    assert toks == plain_greedy(plain, prompt, 24)
    checked = 0
    for logits, a, token in seen:
        if a + 1 < len(text):
            assert text[a + 1] == token
            want = reference_levels(plain, ref, text, a, logits.shape[0])
            np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)
            checked += 1
    assert checked >= 5
    logits, a, _ = seen[2]
    wrong = reference_levels(plain, ref, text, a, logits.shape[0], layer_ids=[2, 3])
    assert not np.allclose(logits, wrong, atol=1e-2)


def test_a_follow_up_on_the_same_prompt_cache_continues_the_drafter_s_context(small_base,
                                                                             tmp_path):  # fmt: skip
    """A finished generation keeps the drafter's context rows and its last token's
    features; a follow-up on the same cache answers as a cold run of the whole
    conversation, with every layer's context keys equal to the cold run's. Control:
    the last token's features dropped, the context starts anew."""
    from mlx_specstream.cache import make_prompt_cache
    from mlx_specstream.decode import spec_generate_step

    write_dflash(tmp_path / "df", SMALL_V, scale=1.0)
    model, _ = load(str(small_base), drafter=str(tmp_path / "df"))
    plain, _ = mlx_lm_load(str(small_base))

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
    for a, b in zip(cache.drafter_state.cache.caches, cold_cache.drafter_state.cache.caches):
        assert a.offset == b.offset
        np.testing.assert_allclose(np.array(a.keys[..., : a.offset, :]),
                                   np.array(b.keys[..., : b.offset, :]), atol=1e-4)  # fmt: skip
    cache = make_prompt_cache(model)
    run(first, cache, 8)
    cache.drafter_state.pending_hidden = None
    assert run(follow, cache, 12) == out2
    assert cache.drafter_state.cache.offset != cold_cache.drafter_state.cache.offset

"""Rows of a batch that draft with a checkpoint's own MTP layers
(mlx_specstream.batch_drafters): after every pass, each row's draft levels equal a
from-scratch computation from the checkpoint's raw tensors over that row's text
(test_mtp.reference_levels, and reference_depths for several layers), rows joining
mid-way and rows whose lookup drafts were kept included; each row's output equals its
prompt decoded alone, in the passes decoding alone with the layers' chain takes."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import plain_greedy, spec_tokens
from mlx_lm.utils import load as mlx_lm_load
from test_mtp import _attach_depths, reference_depths, reference_levels, write_checkpoint

import mlx_specstream.mtp as mtp
from mlx_specstream import batch, load
from mlx_specstream.batch import SpecBatcher, batch_generate_step
from mlx_specstream.batch_drafters import MTPDepthRows

PROMPTS = [[3, 4, 5, 3, 4], [7, 8, 9, 10, 11, 12, 13, 7, 8], [2], [1, 2, 1, 2, 1, 2, 1]]
LIMITS = [24, 30, 17, 40]
JOINING = ([5, 6, 7, 5, 6, 7, 5], 20)


def checkpoint(tmp_path, arch):
    ref = write_checkpoint(tmp_path / "ckpt", arch, seed=3, weight_scale=1.0)
    model, _ = load(str(tmp_path / "ckpt"))
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    return model, plain, ref


def several_layers(tmp_path, arch, levels):
    """A model drafting chains of ``levels`` with a checkpoint's three MTP layers, mlx-lm's
    model of the same checkpoint, and its raw tensors."""
    ref = write_checkpoint(tmp_path / "ckpt", arch, seed=3, weight_scale=1.0, depths=3,
                           own_head=arch == "step3p5")  # fmt: skip
    model = _attach_depths(tmp_path / "ckpt", levels)
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    return model, plain, ref


def levels_of_each_pass(model, monkeypatch, lookup=True, draft_tokens=3):
    """Decodes the prompts together (odd rows merging lookup in, a row joining after the
    third pass); per pass, each row's text then and its levels' logits ``(n, V)``."""
    seen, real = [], mtp.MTPDepth.logits

    def recording(self, model_, out, vocab=None):
        logits = real(self, model_, out, vocab)
        seen.append(np.array(logits.astype(mx.float32)))  # (B, 1, V): one level
        return logits

    monkeypatch.setattr(mtp.MTPDepth, "logits", recording)
    try:
        return each_pass_levels(model, seen, lookup, draft_tokens)
    finally:
        monkeypatch.undo()


def each_pass_levels(model, seen, lookup=True, draft_tokens=3):
    """:func:`levels_of_each_pass`'s loop, for a drafter whose levels' logits ``(B, k, V)``
    a recording appends to ``seen`` as a pass drafts them."""
    batcher = SpecBatcher(model, streams=True)
    for k, (p, n) in enumerate(zip(PROMPTS, LIMITS)):
        draft = "streams+ngram" if lookup and k % 2 else "streams"
        batcher.insert(p, max_tokens=n, num_draft_tokens=draft_tokens, draft=draft)
    passes, kept_more, step = [], 0, 0
    while len(batcher):
        seen.clear()
        out = batcher.step()
        kept_more += sum(len(r.tokens) > 1 for r in out)
        rows = {r.uid: r for r in batcher.rows}  # (those still decoding: they drafted)
        if seen:
            levels = np.concatenate(seen, axis=1)  # (B, n, V), the pass's rows in order
            for b, r in enumerate(out):
                if r.uid in rows:
                    passes.append((list(rows[r.uid].history.tokens), levels[b]))
        step += 1
        if step == 3:
            batcher.insert(JOINING[0], max_tokens=JOINING[1], num_draft_tokens=draft_tokens)
    return passes, kept_more


def levels_recorded(model, monkeypatch, drafter_class, method: str = "level_logits"):
    """:func:`each_pass_levels` of ``model``, its drafter's levels' logits recorded from
    ``drafter_class.method`` (patched for the loop only)."""
    seen, real = [], getattr(drafter_class, method)

    def recording(self, *args):
        logits = real(self, *args)
        seen.append(np.array(logits.astype(mx.float32)))  # (B, levels, V)
        return logits

    monkeypatch.setattr(drafter_class, method, recording)
    try:
        return each_pass_levels(model, seen)
    finally:
        monkeypatch.undo()


def assert_levels_from_scratch(passes, kept_more, reference, controls=()) -> None:
    """``passes`` (:func:`each_pass_levels`, rows often keeping drafts): every row's levels
    equal ``reference(text, a, levels)`` (``a``: the row's last fed token; the next one
    is pending), and at a pass midway each of ``controls`` (the same signature) differs."""
    assert kept_more >= 3, "rows rarely kept a draft: the ragged rows are not exercised"
    assert len(passes) >= 20
    for text, levels in passes:
        want = reference(text, len(text) - 2, levels.shape[0])
        np.testing.assert_allclose(levels, want, atol=2e-4, rtol=2e-4)
    text, levels = passes[len(passes) // 2]
    for control in controls:
        assert not np.allclose(levels, control(text, len(text) - 2, levels.shape[0]), atol=1e-2)


def assert_rows_decode_as_alone(model, plain, pipelines=(False,), depth: int = 3) -> list:
    """``batch_generate`` rows of ``PROMPTS`` drafting with ``model``'s drafter give
    ``plain``'s greedy tokens, in as many passes as decoding each prompt alone with a chain
    of ``depth`` (each way of ``pipelines``); returns those passes."""
    alone = [spec_tokens(model, p, n, tree_top_k=1, tree_depth=depth, max_tree_nodes=depth + 1)
             [1][-1][3] for p, n in zip(PROMPTS, LIMITS)]  # fmt: skip
    for pipeline in pipelines:
        tokens, passes = [[] for _ in PROMPTS], [0] * len(PROMPTS)
        steps = batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams",
                                    num_draft_tokens=depth, pipeline=pipeline)  # fmt: skip
        for out in steps:
            for r in out:
                tokens[r.uid] += r.tokens
                passes[r.uid] += 1
        assert tokens == [plain_greedy(plain, p, n) for p, n in zip(PROMPTS, LIMITS)]
        assert passes == alone, pipeline
    return alone


@pytest.mark.parametrize(
    "arch", ["mimo", "deepseek_v3", "glm4_moe", "step3p5", "deepseek_v32", "ernie4_5_moe"]
)
def test_each_row_s_levels_equal_the_raw_tensors_from_scratch(arch, tmp_path, monkeypatch):
    """Every pass's levels of every row equal the layer run from scratch over the row's
    text (rows 0..a: each token's hidden state and the next token's embedding, level 1
    at the last fed token a, deeper levels by the layer again). Controls: the other
    concatenation order and the other side of the base's final norm differ."""
    model, plain, ref = checkpoint(tmp_path, arch)
    passes, kept_more = levels_of_each_pass(model, monkeypatch)

    def levels(**control):
        return lambda text, a, n: reference_levels(plain, ref, text, a, n, **control)

    controls = (levels(swap=True), levels(other_hidden=True))
    assert_levels_from_scratch(passes, kept_more, levels(), controls)


@pytest.mark.parametrize("arch", ["mimo", "deepseek_v3"])
def test_greedy_rows_equal_each_prompt_alone_in_the_passes_of_a_chain(arch, tmp_path):
    """mlx-lm's greedy tokens, in as many passes as decoding each prompt alone with the
    layer's chain of 3."""
    model, plain, _ = checkpoint(tmp_path, arch)
    assert_rows_decode_as_alone(model, plain)


def test_a_row_joining_with_a_cache_of_earlier_context(tmp_path):
    """A prompt cache holding context before the prompt: the layer's rows start at the
    prompt (as one sequence's do with a reused cache), and the output is mlx-lm's."""
    model, plain, _ = checkpoint(tmp_path, "mimo")
    assert_a_row_with_earlier_context_decodes_as_mlx_lm(model, plain)


def assert_a_row_with_earlier_context_decodes_as_mlx_lm(model, plain):
    """``model``'s row joining with a cache of ``plain``'s over earlier context gives
    ``plain``'s greedy tokens after context and prompt."""
    from mlx_lm.models.cache import make_prompt_cache

    context, prompt = [9, 8, 7, 9, 8, 7], [9, 8]
    cache = make_prompt_cache(plain)
    plain(mx.array([context]), cache=cache)
    steps = batch_generate_step(model, [prompt], max_tokens=20, draft="streams",
                                prompt_caches=[cache])  # fmt: skip
    got = [t for out in steps for r in out for t in r.tokens]
    assert got == plain_greedy(plain, context + prompt, 20)


def test_negative_control_an_unchecked_layer_draft(tmp_path, monkeypatch):
    """A verifier that keeps one draft token unchecked changes the output."""
    accepted = batch.accepted
    monkeypatch.setattr(batch, "accepted", lambda d, c: c[: min(len(d), len(accepted(d, c))) + 1])
    model, plain, _ = checkpoint(tmp_path, "mimo")
    tokens = [[] for _ in PROMPTS]
    for out in batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams"):
        for r in out:
            tokens[r.uid] += r.tokens
    assert tokens != [plain_greedy(plain, p, n) for p, n in zip(PROMPTS, LIMITS)]


@pytest.mark.parametrize(
    "arch,levels", [("step3p5", 3), ("mimo_v2_flash", 4), ("mimo", 2)], ids=str
)
def test_several_layers_levels_equal_the_raw_tensors_from_scratch(arch, levels, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """Three MTP layers (Step 3.5's with its own heads and a window layer; MiMo-V2-Flash's
    reading the base's state; MiMo's): every pass's levels of every row equal the layers
    run from scratch over the row's text (test_mtp.reference_depths: layer ``k``'s row
    ``i`` reads token ``i + k``, drafted where not yet known), chains longer than the
    layers (the last one again) and shorter (the third layer only keeping its rows)
    included. Controls: the first layer alone, every layer reading token ``i + 1``, the
    other chaining."""
    model, plain, ref = several_layers(tmp_path, arch, levels)
    assert type(SpecBatcher(model, streams=True).layer_rows) is MTPDepthRows
    passes, kept_more = levels_of_each_pass(model, monkeypatch, draft_tokens=levels)
    assert kept_more >= 3, "rows rarely kept a draft: the ragged rows are not exercised"
    assert len(passes) >= 20 and passes[0][1].shape[0] == levels
    for text, got in passes:
        want = reference_depths(plain, ref, text, len(text) - 2, levels)
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
    text, got = passes[len(passes) // 2]
    for control in (dict(one_layer=True), dict(unshifted=True), dict(other_chain=True)):
        wrong = reference_depths(plain, ref, text, len(text) - 2, levels, **control)
        assert not np.allclose(got[1:], wrong[1:], atol=1e-2), control


def test_several_layers_greedy_rows_equal_each_prompt_alone(tmp_path):
    """With three MTP layers drafting chains of 4: mlx-lm's greedy tokens, in as many
    passes as decoding each prompt alone takes; a row joining with a cache of earlier
    context gives mlx-lm's tokens too."""
    model, plain, _ = several_layers(tmp_path, "mimo_v2_flash", 4)
    tokens, passes = [[] for _ in PROMPTS], [0] * len(PROMPTS)
    steps = batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams",
                                num_draft_tokens=4)  # fmt: skip
    for out in steps:
        for r in out:
            tokens[r.uid] += r.tokens
            passes[r.uid] += 1
    for p, n, got, k in zip(PROMPTS, LIMITS, tokens, passes):
        assert got == plain_greedy(plain, p, n)
        _, records = spec_tokens(model, p, n, tree_top_k=1, tree_depth=4, max_tree_nodes=5)
        assert k == records[-1][3]
    # (MiMo-V2-Flash's window layers take no mlx-lm prompt cache in a batch: MiMo's)
    model, plain, _ = several_layers(tmp_path / "mimo", "mimo", 4)
    assert_a_row_with_earlier_context_decodes_as_mlx_lm(model, plain)

"""Rows of a batch that draft with a ParallelSpec drafter (mlx_specstream.batch_drafters):
after every pass, each row's draft levels equal one from-scratch pass of the drafter's
layer over that row's text (rows merging lookup in and a row joining mid-way included);
each row's output equals its prompt decoded alone, in the passes decoding alone with the
drafter's chain takes (sampled rows keeping the model's distribution and the unchecked
verifier's control: tests/test_batch_streams.py)."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import plain_greedy, spec_tokens
from test_batch_mtp import (
    LIMITS,
    PROMPTS,
    assert_a_row_with_earlier_context_decodes_as_mlx_lm,
    each_pass_levels,
)
from test_drafters import drafter_model

from mlx_specstream.batch import SpecBatcher, batch_generate_step
from mlx_specstream.batch_drafters import ParallelSpecRows
from mlx_specstream.draft_vocab import use_draft_vocab
from mlx_specstream.drafters import run_layer
from mlx_specstream.streams import StreamRuntime


def levels_from_scratch(model, text, a, n, shift=0, normed=False):
    """``(n, V)``: the base's last-layer states over ``text[:a + 1]``, real rows ``0..a``
    (row ``i`` paired with ``text[i + 1]``), ``n - 1`` masks, one causal pass of the
    layer, the head. Controls: ``shift`` pairs row ``i`` with ``text[i + 1 - shift]``;
    ``normed`` reads the states after the base's final norm."""
    rt = model.speculative_streams
    d = rt.drafter
    h = rt.prefill(mx.array(text[: a + 1]), None, keep_hidden=True)
    if normed:
        h = model.model.norm(h)
    nxt = text[1 - shift : a + 2 - shift] if shift else text[1 : a + 2]
    emb = rt.embed(mx.array(nxt)).astype(h.dtype)
    real = d.fc(mx.concatenate([h, emb], axis=-1))
    x = mx.concatenate([real, d.masks[: n - 1].astype(real.dtype)], axis=0)[None]
    out = run_layer(d.layer, x, None, scale=d._scale)  # (no cache: the scale's positions 0..)
    return np.array(rt.head(out[:, -n:])[0].astype(mx.float32))


def levels_of_each_pass(model, monkeypatch):
    """As test_batch_mtp's: per pass, each row's text then and its levels' logits
    ``(n, V)`` (the drafter's head over its last real row and its masks)."""
    seen, real = [], StreamRuntime.head

    def recording(self, h, draft=False):
        logits = real(self, h, draft)
        if draft:  # (the chains' levels: the verifying pass reads the head otherwise)
            seen.append(np.array(logits.astype(mx.float32)))
        return logits

    monkeypatch.setattr(StreamRuntime, "head", recording)
    try:
        return each_pass_levels(model, seen)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("arch", ["llama", "deepseek_v32", "ministral3"])
def test_each_row_s_levels_equal_a_pass_from_scratch(arch, monkeypatch):
    """Every pass's levels of every row equal the drafter's layer run from scratch over
    the row's text (real rows up to its last fed token ``a``, then the masks). DeepSeek
    V3.2: the layer's latent and indexer keys in one ragged cache list; Ministral 3:
    Llama 4's attention scale at each row's own positions (past 8, where it steps).
    Controls: rows paired with the token before, and the states after the final norm."""
    model = drafter_model("parallelspec", arch, weight_scale=1.0, top_k=1)
    passes, kept_more = levels_of_each_pass(model, monkeypatch)
    assert kept_more >= 3, "rows rarely kept a draft: the ragged rows are not exercised"
    assert len(passes) >= 20 and max(len(t) for t, _ in passes) > 20
    for text, levels in passes:
        want = levels_from_scratch(model, text, len(text) - 2, levels.shape[0])
        np.testing.assert_allclose(levels, want, atol=2e-4, rtol=2e-4)
    text, levels = passes[len(passes) // 2]
    for control in (dict(shift=1), dict(normed=True)):
        wrong = levels_from_scratch(model, text, len(text) - 2, levels.shape[0], **control)
        assert not np.allclose(levels, wrong, atol=1e-2), control


@pytest.mark.parametrize(
    "arch,bits", [("llama", None), ("starcoder2", None), ("deepseek_v32", None), ("llama", 4)]
)
def test_greedy_rows_equal_each_prompt_alone_in_the_passes_of_a_chain(arch, bits):
    """mlx-lm's greedy tokens, in as many passes as decoding each prompt alone with the
    drafter's chain of 3 (rows keeping drafts on llama; the levels test above covers
    rows keeping several tokens on every layout)."""
    model = drafter_model("parallelspec", arch, quant_bits=bits, weight_scale=1.0, top_k=1)
    tokens, passes = [[] for _ in PROMPTS], [0] * len(PROMPTS)
    for out in batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams"):
        for r in out:
            tokens[r.uid] += r.tokens
            passes[r.uid] += 1
    if (arch, bits) == ("llama", None):  # (the other random drafters are never right here)
        assert sum(passes) < sum(LIMITS), "no draft was ever kept"
    for p, n, got, k in zip(PROMPTS, LIMITS, tokens, passes):
        assert got == plain_greedy(model, p, n)
        _, records = spec_tokens(model, p, n, tree_top_k=1, tree_depth=3)
        assert k == records[-1][3]


def test_a_row_joining_with_a_cache_of_earlier_context():
    """A prompt cache holding context before the prompt: the layer's rows start at the
    prompt (as one sequence's do with a reused cache), and the output is mlx-lm's."""
    model = drafter_model("parallelspec", weight_scale=1.0, top_k=1)
    assert_a_row_with_earlier_context_decodes_as_mlx_lm(model, model)


def test_rows_rank_the_draft_vocabulary_only(monkeypatch):
    """With a draft vocabulary, every level's logits are ``-inf`` outside it and the
    rows still equal their prompts alone. Control: without one, all are finite."""
    model = drafter_model("parallelspec", weight_scale=1.0, top_k=1)
    real = StreamRuntime.head
    for ids in (None, [0, 2, 3, 5, 7, 11]):
        use_draft_vocab(model, ids)
        seen = []

        def recording(self, h, draft=False):
            logits = real(self, h, draft)
            if draft:
                seen.append(np.array(logits.astype(mx.float32)))
            return logits

        monkeypatch.setattr(StreamRuntime, "head", recording)
        tokens = [[] for _ in PROMPTS]
        for out in batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams"):
            for r in out:
                tokens[r.uid] += r.tokens
        monkeypatch.undo()
        assert tokens == [plain_greedy(model, p, n) for p, n in zip(PROMPTS, LIMITS)]
        logits = np.concatenate([s.reshape(-1, s.shape[-1]) for s in seen])
        if ids is None:
            assert np.isfinite(logits).all()
            continue
        outside = np.ones(logits.shape[-1], dtype=bool)
        outside[ids] = False
        assert np.isneginf(logits[:, outside]).all() and np.isfinite(logits[:, ~outside]).all()
    use_draft_vocab(model, None)


def test_a_chain_longer_than_the_drafter_s_levels_is_refused():
    """The drafter drafts ``num_draft_tokens`` levels (its masks and one real row); the
    batch asks for at most that many, and a longer chain is refused by name."""
    model = drafter_model("parallelspec", num_draft_tokens=2, top_k=1)
    batcher = SpecBatcher(model, streams=True)
    batcher.insert(PROMPTS[0], max_tokens=8, num_draft_tokens=5)
    batcher.step()
    assert len(batcher.rows[0].streams_draft) == 2
    with pytest.raises(ValueError, match="a chain of 3: the ParallelSpec drafter drafts 2"):
        batcher.layer_rows.chains(3)
    assert isinstance(batcher.layer_rows, ParallelSpecRows)


def layer_model(kind, tmp_path):
    if kind == "parallelspec":
        return drafter_model("parallelspec", weight_scale=1.0, top_k=1)
    from test_batch_mtp import checkpoint, several_layers

    if kind == "mtp-3-layers":  # (drafting chains of 4: the last layer once more)
        return several_layers(tmp_path, "mimo", 4)[0]
    return checkpoint(tmp_path, "mimo")[0]


def chains_by_row(model, rows, joining, pipeline, monkeypatch, draft_tokens=3):
    """Each row's chains of the drafter layer by the tokens the layer's rows then held
    (the batch's rows at each call, both loops drafting once a pass), and the run's rows'
    results."""
    from test_batch_streams import run_batcher

    from mlx_specstream.batch_drafters import HeldRows

    seen, real = {}, SpecBatcher._stream_chains

    def recording(self, nodes, fused, n=None):
        chain = real(self, nodes, fused, n)
        c = self.layer_rows.cache
        held = c.caches[0].offset + c.count if isinstance(c, HeldRows) else c.offset
        for r, c, at in zip(self.rows, np.array(chain).tolist(), np.array(held).tolist()):
            seen.setdefault(r.uid, {})[at] = c
        return chain

    monkeypatch.setattr(SpecBatcher, "_stream_chains", recording)
    got, flights = run_batcher(model, rows, pipeline, joining=joining, draft_tokens=draft_tokens)
    monkeypatch.setattr(SpecBatcher, "_stream_chains", real)
    return seen, got, flights


@pytest.mark.parametrize("control", [False, True], ids=["pipelined", "control-rows-unkept"])
@pytest.mark.parametrize("kind", ["parallelspec", "mtp", "mtp-3-layers"])
def test_pipelined_layer_rows_equal_unpipelined(kind, control, tmp_path, monkeypatch):
    """A drafter layer's rows (ParallelSpec's, an MTP layer's, three MTP layers' with
    their held positions) fed and kept on the device in pipelined passes, its chain
    drafted there (MTP's recursion undone there): rows drafting with it, merging lookup
    in or not drafting, joining mid-flight and leaving, draft the unpipelined loop's
    chains pass for pass, and give its tokens, log-probabilities, passes and caches.
    Control: pipelined rows that keep every row they fed, rejected ones too, draft other
    chains."""
    from test_batch_streams import assert_pipelined_equals_unpipelined

    from mlx_specstream import batch_drafters

    model = layer_model(kind, tmp_path)
    levels = 4 if kind == "mtp-3-layers" else 3
    drafts = ["streams", "streams+ngram", "streams", None]
    rows = [(p, n, d) for p, n, d in zip(PROMPTS, LIMITS, drafts)]
    joining = [([5, 6, 7, 5, 6], 20, "streams"), ([9], 11, None)]
    if not control:
        assert_pipelined_equals_unpipelined(model, rows, joining, True, draft_tokens=levels)
    want, _, _ = chains_by_row(model, rows, joining, False, monkeypatch, levels)
    if control:
        cls = batch_drafters.MTPDepthRows if kind == "mtp-3-layers" else batch_drafters.LayerRows
        real = cls.step

        def keeping_all(self, hidden, chosen, kept):
            if isinstance(kept, mx.array):
                kept = mx.full(kept.shape, hidden.shape[1], dtype=kept.dtype)
            return real(self, hidden, chosen, kept)

        monkeypatch.setattr(cls, "step", keeping_all)
    got, _, flights = chains_by_row(model, rows, joining, True, monkeypatch, levels)
    assert flights > 10 and sum(map(len, want.values())) > 60
    # (near its max_tokens a row drafts fewer tokens, but a pipelined pass launched
    # before the host cut its draft feeds them all: its last chains may be at other tokens)
    common = [(u, at) for u, w in want.items() for at in w if at in got[u]]
    same = all(got[u][at] == want[u][at] for u, at in common)
    same &= len(common) >= sum(map(len, want.values())) - 2 * len(want)
    assert same != control

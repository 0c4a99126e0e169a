"""``draft_confidence``: a draft model's chain stops after a draft the draft model gives
less than that probability (transformers' ``assistant_confidence_threshold``), on attention
models (:class:`~mlx_specstream.draft_model.DraftModel`) and on hybrids
(:class:`~mlx_specstream.recurrent.DraftModelChain`). Greedy output equals plain decoding;
each chain is exactly as long as the draft model's own probabilities say; drawn chains keep
the distribution; the CLI forwards the flag; bad values and settings no chain takes are
refused (the model's own drafters' chains: ``test_confident_chains.py``)."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import plain_greedy, spec_tokens, tiny_hybrid, tiny_model
from test_draft_model import PROMPT, drawn_chains, generate_cli_gives, noisy_copy

import mlx_specstream.draft_model as draft_model_mod
import mlx_specstream.recurrent as recurrent


def chain_lengths(monkeypatch, owner, name):
    """Records each chain a draft model drafts: its length and, per level, the draft
    model's largest probability (recomputed from the logits the chain came from)."""
    seen = []
    if owner is draft_model_mod.DraftModel:
        real = owner._draft

        def recording(self, new, vocab_size):
            out = real(self, new, vocab_size)
            probs = mx.softmax(out[: self.drafted].astype(mx.float32), axis=-1).max(axis=-1)
            seen.append((self.drafted, np.array(probs).tolist(), self.k))
            return out

        monkeypatch.setattr(owner, name, recording)
        return seen
    real_unsure = owner._unsure

    def unsure(self, logits):
        stop = real_unsure(self, logits)
        p = mx.softmax(logits[: self.vocab_size].astype(mx.float32), axis=-1).max().item()
        seen.append((p, stop))
        return stop

    monkeypatch.setattr(owner, "_unsure", unsure)
    return seen


# (the tiny models' vocabulary of 64: the draft model's top probability is 0.04-0.08)
@pytest.mark.parametrize("confidence", [0.045, 0.055, 0.07])
def test_chains_stop_where_the_draft_model_is_unsure_and_output_is_plain(confidence,
                                                                          monkeypatch):  # fmt: skip
    """Chains of at most 6 from a noisy copy: every chain is as long as the first level
    whose probability is below the threshold (included) says, or 6; output equals plain
    decoding; the higher the threshold, the shorter the chains."""
    base, draft = tiny_model("llama"), noisy_copy(scale=0.05)
    ref = plain_greedy(base, PROMPT, 48)
    seen = chain_lengths(monkeypatch, draft_model_mod.DraftModel, "_draft")
    toks, out = spec_tokens(base, PROMPT, 48, draft_model=draft, num_draft_tokens=6,
                            draft_confidence=confidence)  # fmt: skip
    assert toks == ref
    assert seen
    for drafted, probs, k in seen:
        sure = [p >= confidence for p in probs]
        assert all(sure[:-1]) and (drafted == k or not sure[-1]), (drafted, probs)
    assert any(d < k for d, _, k in seen) and any(d > 1 for d, _, _ in seen)


def test_the_chains_get_shorter_and_take_fewer_draft_passes(monkeypatch):
    """Against fixed chains of 6: fewer draft-model passes with a threshold; a threshold
    of none drafts the fixed chains (the same passes)."""
    base, draft = tiny_model("llama"), noisy_copy(scale=0.05)
    calls, real = [], draft_model_mod.DraftModel._step
    monkeypatch.setattr(draft_model_mod.DraftModel, "_step",
                        lambda self, t: calls.append(1) or real(self, t))  # fmt: skip
    counts = {}
    for conf in (None, 0.055):
        calls.clear()
        spec_tokens(base, PROMPT, 48, draft_model=draft, num_draft_tokens=6, draft_confidence=conf)
        counts[conf] = len(calls)
    assert counts[0.055] < counts[None]


def test_negative_control_chains_cut_where_the_draft_model_is_sure_fail_the_check(monkeypatch):
    """Control for the length check above: chains stopped where the draft model is sure
    (``_unsure`` inverted) fail it."""
    base, draft = tiny_model("llama"), noisy_copy(scale=0.05)
    seen = chain_lengths(monkeypatch, draft_model_mod.DraftModel, "_draft")
    real = draft_model_mod.DraftModel._unsure
    monkeypatch.setattr(draft_model_mod.DraftModel, "_unsure",
                        lambda self, logits: not real(self, logits))  # fmt: skip
    spec_tokens(base, PROMPT, 48, draft_model=draft, num_draft_tokens=6, draft_confidence=0.055)
    with pytest.raises(AssertionError):
        for drafted, probs, k in seen:
            sure = [p >= 0.055 for p in probs]
            assert all(sure[:-1]) and (drafted == k or not sure[-1])


# (vocabulary 32: the draft model's top probability is 0.11-0.23)
@pytest.mark.parametrize("confidence", [0.12, 0.18])
def test_hybrid_chains_stop_where_the_draft_model_is_unsure(confidence, monkeypatch):
    """On a hybrid (chains through its own passes): a chain continues after a draft only
    while the draft model's probability is at least the threshold; output equals mlx-lm's;
    some chains stop early."""
    model = tiny_hybrid("qwen3_next", vocab_size=32)
    small = tiny_hybrid("lfm2", vocab_size=32, seed=1)
    ref = plain_greedy(model, PROMPT, 32)
    seen = chain_lengths(monkeypatch, recurrent.DraftModelChain, "_unsure")
    toks, out = spec_tokens(model, PROMPT, 32, draft_model=small, num_draft_tokens=5,
                            draft_confidence=confidence)  # fmt: skip
    assert toks == ref
    assert seen and all(stop == (p < confidence) for p, stop in seen)
    assert any(stop for _, stop in seen)


def test_drawn_chains_keep_the_distribution(monkeypatch):
    """Rejection sampling over a draft model's drawn chains cut by its confidence keeps
    the model's distribution (chi-square); the cut reads the draft model only, and cuts
    some chains (after one level) but not all (two)."""
    # (vocabulary 6: at 0.3 about one chain in seven stops after its first level)
    p, lengths = drawn_chains(monkeypatch, 1000, num_draft_tokens=3, draft_confidence=0.3)
    assert p > 1e-3, f"chi-square p = {p:.2e}"
    assert {1, 2} <= lengths


def test_bad_values_and_settings_no_chain_takes_are_refused():
    base, draft = tiny_model("llama"), tiny_model("llama", seed=5)
    for bad in (1, 1.5, -0.1, True, "0.4"):
        with pytest.raises(ValueError, match=r"draft_confidence=.* must be a number in \[0, 1\)"):
            spec_tokens(base, PROMPT, 4, draft_model=draft, draft_confidence=bad)
    with pytest.raises(
        ValueError, match="prompt lookup's drafts .draft='ngram'. are the text's own"
    ):
        spec_tokens(base, PROMPT, 4, draft="ngram", draft_confidence=0.4)
    for tree, match in (
        (dict(tree_top_k=2), "drafts a tree 2 wide"),
        (dict(tree_top_k=2, dynamic_tree=True), "dynamic_tree grows a tree"),
    ):
        with pytest.raises(ValueError, match=f"draft_confidence stops a chain; .*{match}"):
            spec_tokens(base, PROMPT, 4, draft_model=draft, draft_confidence=0.4, **tree)


def test_the_generate_cli_forwards_the_flag(tmp_path, capsys, monkeypatch):
    """``--draft-confidence`` reaches the draft model's chains (output identical to plain
    decoding, the generator given the value)."""
    flags = ["--num-draft-tokens", "5", "--draft-confidence", "0.5"]
    given = generate_cli_gives(tmp_path, capsys, monkeypatch, flags, "draft_confidence")
    assert 0.5 in given

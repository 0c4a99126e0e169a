"""``draft_schedule="heuristic"``: a draft model's chains follow transformers' heuristic
schedule (2 longer after a step that accepted every draft, 1 shorter after one that did
not, between 1 and ``num_draft_tokens``), on attention models
(:class:`~mlx_specstream.draft_model.DraftModel`: chains, static trees and grown trees) and
on hybrids (:class:`~mlx_specstream.recurrent.DraftModelChain`). Each chain is exactly as
long as the rule says from the steps before it (a constant schedule fails that check);
greedy output equals plain decoding (with a control that fails); drawn chains keep the
distribution; the CLI forwards the flag; bad values are refused."""

import pytest
from helpers import plain_greedy, spec_tokens, tiny_hybrid, tiny_model
from test_draft_model import PROMPT, accept_first_child, drawn_chains, generate_cli_gives
from test_draft_model import noisy_copy

import mlx_specstream.decode as decode
import mlx_specstream.draft_model as draft_model_mod
import mlx_specstream.recurrent as recurrent
from mlx_specstream.draft_schedule import DraftLength, check_draft_schedule, next_length


def test_next_length_golden():
    """transformers' rule (``update_candidate_strategy``), capped at the longest chain."""
    assert [next_length(n, n, n, 8) for n in (1, 3, 6, 7, 8)] == [3, 5, 8, 8, 8]
    assert [next_length(n, 0, n, 8) for n in (1, 2, 5, 8)] == [1, 1, 4, 7]
    assert next_length(5, 4, 5, 8) == 4  # (all but one accepted: a miss)
    assert next_length(6, 2, 2, 8) == 8  # (two verified, both accepted: the step's all)
    assert next_length(4, 0, 0, 8) == 4  # (nothing of the draft model's verified)
    n = DraftLength(6, "heuristic")
    for accepted, drafted, want in [(6, 6, 6), (0, 6, 5), (2, 5, 4), (4, 4, 6), (1, 6, 5)]:
        n.update(accepted, drafted)
        assert n.now == want
    fixed = DraftLength(6)
    fixed.update(0, 6)
    assert fixed.now == 6 and fixed.schedule == "constant"
    import doctest

    from mlx_specstream import draft_schedule

    results = doctest.testmod(draft_schedule)
    assert results.failed == 0 and results.attempted >= 8


def steps_of(out):
    """Per pass of a generation's records: (accepted drafts, tokens it yielded)."""
    steps = {}
    for _, _, from_draft, passes in out:
        a, n = steps.get(passes, (0, 0))
        steps[passes] = (a + bool(from_draft), n + 1)
    return [steps[k] for k in sorted(steps)]


def follows_the_rule(lengths, out, most, max_tokens):
    """Whether each pass verified as many draft-model levels as the heuristic schedule
    says after the passes before it (fewer only where ``max_tokens`` leaves less room)."""
    now, emitted = most, 0
    for verified, (accepted, yielded) in zip(lengths, steps_of(out)):
        room = max_tokens - emitted - 1
        if verified != min(now, room):
            return False
        now = next_length(now, accepted, verified, most)
        emitted += yielded
    return len(lengths) == len(steps_of(out))


def verified_levels(monkeypatch):
    """Records each pass's draft levels (the chain, or the tree's depth) on an attention
    model: what :class:`~mlx_specstream.decode.Decoder` launches."""
    seen, real = [], decode.Decoder.launch

    def launch(self, draft, after=None):
        seen.append(max(draft.layout.depth) if len(draft.layout) > 1 else 0)
        return real(self, draft, after)

    monkeypatch.setattr(decode.Decoder, "launch", launch)
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "tree", [dict(), dict(tree_top_k=2), dict(tree_top_k=2, dynamic_tree=True)],
    ids=["chain", "static tree", "grown tree"],
)  # fmt: skip
def test_each_pass_verifies_what_the_rule_says_and_output_is_plain(arch, tree, monkeypatch):
    """A noisy copy drafting up to 6: the levels of every pass follow the rule from the
    passes before it, lengths both shrink and grow, and output equals plain decoding."""
    base, draft = tiny_model(arch), noisy_copy(arch, scale=0.05)
    ref = plain_greedy(base, PROMPT, 64)
    seen = verified_levels(monkeypatch)
    toks, out = spec_tokens(base, PROMPT, 64, draft_model=draft, num_draft_tokens=6,
                            draft_schedule="heuristic", **tree)  # fmt: skip
    assert toks == ref
    assert follows_the_rule(seen, out, 6, 64), (seen, steps_of(out))
    assert min(seen[:-3]) < 6 and any(b > a for a, b in zip(seen, seen[1:]))


def test_negative_control_constant_chains_fail_the_rule_check(monkeypatch):
    """Control for the check above: the same pair's fixed chains of 6 do not follow it."""
    base, draft = tiny_model("llama"), noisy_copy(scale=0.05)
    seen = verified_levels(monkeypatch)
    _, out = spec_tokens(base, PROMPT, 64, draft_model=draft, num_draft_tokens=6)
    assert not follows_the_rule(seen, out, 6, 64)


def test_negative_control_an_unchecked_draft_breaks_equality(monkeypatch):
    """Accepting the first child without checking it, under the schedule: the
    equality test fails."""
    base = tiny_model("llama")
    ref = plain_greedy(base, PROMPT, 32)
    monkeypatch.setattr(decode, "_accept", accept_first_child(decode._accept))
    toks, _ = spec_tokens(base, PROMPT, 32, draft_model=noisy_copy(scale=0.05),
                          num_draft_tokens=6, draft_schedule="heuristic")  # fmt: skip
    assert toks != ref


def test_a_poor_draft_model_drafts_fewer_tokens(monkeypatch):
    """A draft model of other weights, up to 6: the schedule keeps its chains short, so
    it runs far fewer draft passes than fixed chains of 6 (same output)."""
    base, draft = tiny_model("llama"), tiny_model("llama", seed=5)
    calls, real = [], draft_model_mod.DraftModel._step
    monkeypatch.setattr(draft_model_mod.DraftModel, "_step",
                        lambda self, t: calls.append(1) or real(self, t))  # fmt: skip
    runs = {}
    for schedule in ("constant", "heuristic"):
        calls.clear()
        toks, _ = spec_tokens(base, PROMPT, 48, draft_model=draft, num_draft_tokens=6,
                              draft_schedule=schedule)  # fmt: skip
        runs[schedule] = (toks, len(calls))
    assert runs["heuristic"][0] == runs["constant"][0] == plain_greedy(base, PROMPT, 48)
    assert runs["heuristic"][1] < runs["constant"][1] / 2, runs


def test_hybrid_chains_follow_the_rule():
    """On a hybrid (chains through its own passes, :class:`DraftModelChain`): each chain
    is as long as the rule says, and output equals mlx-lm's greedy decoding."""
    model = tiny_hybrid("qwen3_next", vocab_size=32)
    small = tiny_hybrid("lfm2", vocab_size=32, seed=1)
    ref = plain_greedy(model, PROMPT, 40)
    lengths, real = [], recurrent.DraftModelChain.draft

    def recording(self, n):
        drafts = real(self, n)
        lengths.append(len(drafts))
        return drafts

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recurrent.DraftModelChain, "draft", recording)
        toks, out = spec_tokens(model, PROMPT, 40, draft_model=small, num_draft_tokens=5,
                                draft_schedule="heuristic")  # fmt: skip
    assert toks == ref
    assert follows_the_rule(lengths, out, 5, 40), (lengths, steps_of(out))
    assert min(lengths) < 5


def test_drawn_chains_keep_the_distribution(monkeypatch):
    """Rejection sampling over a draft model's drawn chains whose lengths follow the
    schedule keeps the model's distribution (chi-square, 3 tokens, chains up to 2);
    lengths vary."""
    p, lengths = drawn_chains(monkeypatch, 1000, num_draft_tokens=2, draft_schedule="heuristic")
    assert p > 1e-3, f"chi-square p = {p:.2e}"
    assert {1, 2} <= lengths


def test_bad_values_are_refused():
    base, draft = tiny_model("llama"), tiny_model("llama", seed=5)
    for bad in ("fast", "Heuristic", 1):
        with pytest.raises(ValueError, match=r"draft_schedule=.*: choose one of"):
            spec_tokens(base, PROMPT, 4, draft_model=draft, draft_schedule=bad)
    with pytest.raises(ValueError, match="draft_schedule='heuristic' sets how long a draft"):
        spec_tokens(base, PROMPT, 4, draft="ngram", draft_schedule="heuristic")
    check_draft_schedule(None)
    check_draft_schedule("constant")


def test_the_generate_cli_forwards_the_flag(tmp_path, capsys, monkeypatch):
    """``--draft-schedule heuristic`` reaches the generator (output identical to plain
    decoding); without ``--draft-model`` it is refused, naming both flags."""
    import importlib

    flags = ["--num-draft-tokens", "5", "--draft-schedule", "heuristic"]
    assert "heuristic" in generate_cli_gives(tmp_path, capsys, monkeypatch, flags, "draft_schedule")
    gen_mod = importlib.import_module("mlx_specstream.generate")  # (the module, not the function)
    with pytest.raises(ValueError, match="--draft-schedule heuristic sets how long the --draft"):
        gen_mod.main(["--model", str(tmp_path / "base"), "--prompt", "t4", "--draft", "ngram",
                      "--draft-schedule", "heuristic"])  # fmt: skip

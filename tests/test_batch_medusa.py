"""Rows of a batch that draft with the model's Medusa heads: each row's heads read the
verifying pass's last-layer state at its last kept token, and give the logits its
sequence gets alone; each row's output equals its prompt decoded alone, in the passes
that decoding alone with a chain of the heads takes (sampled rows keeping the model's
distribution: tests/test_batch_streams.py). A model without a drafter, and a split pass,
are refused by name.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import plain_greedy, spec_tokens, tiny_model, word_tokenizer
from test_drafters import drafter_model, zero_drafter

from mlx_specstream import tune
from mlx_specstream.batch import SpecBatcher, batch_generate_step
from mlx_specstream.cache import make_prompt_cache
from mlx_specstream.config import DrafterConfig
from mlx_specstream.draft_vocab import use_draft_vocab
from mlx_specstream.drafters import attach_drafter
from mlx_specstream.precision import device_key

PROMPTS = [[3, 4, 5, 3, 4], [7, 8, 9, 10, 11, 12, 13, 7, 8], [2], [1, 2, 1, 2, 1, 2, 1]]
LIMITS = [24, 30, 17, 40]


def medusa_model(arch="llama", **kwargs):
    """Three heads at their zero initialisation over a low-weight model that repeats
    itself: their drafts are often right."""
    model = drafter_model("medusa", arch, weight_scale=1.0, **kwargs)
    zero_drafter(model)
    return model


def run(model, **kwargs):
    """Each prompt's tokens and passes, decoded together."""
    tokens, passes = [[] for _ in PROMPTS], [0] * len(PROMPTS)
    for out in batch_generate_step(model, PROMPTS, max_tokens=LIMITS, **kwargs):
        for r in out:
            tokens[r.uid] += r.tokens
            passes[r.uid] += 1
    return tokens, passes


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize(
    "arch, extra",
    [("llama", {}), ("qwen2", {}), ("gpt_neox", {}), ("llama", {"quant_bits": 4})],
    ids=["llama", "qwen2", "gpt_neox", "llama-4bit"],
)
def test_greedy_rows_equal_each_prompt_alone_in_the_passes_of_a_chain(arch, extra, pipeline):
    """Token for token mlx-lm's plain decoding, and each row in as many passes as
    decoding it alone with a chain of the heads' first choices."""
    model = medusa_model(arch, **extra)
    tokens, passes = run(model, draft="streams", pipeline=pipeline)
    assert sum(passes) < sum(LIMITS) * 0.9, "drafts were rarely accepted: no power"
    for p, n, got, k in zip(PROMPTS, LIMITS, tokens, passes):
        assert got == plain_greedy(model, p, n)
        _, records = spec_tokens(model, p, n, tree_top_k=1, tree_depth=3)
        assert k == records[-1][3]


def alone_heads(model, fed):
    """``(k, V)``: the heads' logits at ``fed``'s last token, the sequence alone."""
    rt = model.speculative_streams
    hidden = rt.prefill(mx.array(fed), make_prompt_cache(model), keep_hidden=True)
    return rt.drafter.draft_rows(rt, hidden[-1:])[0]


@pytest.mark.parametrize("first_node", [False, True], ids=["last-kept", "control-first-fed"])
def test_row_heads_equal_the_sequence_alone(first_node):
    """After each pass, each row's heads' logits (from the batch's pass) equal those of
    its sequence alone at its last kept token. Control: the heads at the first token
    each row fed differ wherever a row kept more than one."""
    model = drafter_model("medusa")  # (random heads: every logit tells)
    rt = model.speculative_streams
    batcher = SpecBatcher(model, streams=True, pipeline=False)
    for p, n in zip(PROMPTS, LIMITS):
        batcher.insert(p, max_tokens=n, num_draft_tokens=3)
    gaps = []
    for _ in range(6):
        kept = [len(r.tokens) for r in batcher.step()]
        got = rt.rows_heads(mx.array([0 if first_node else k - 1 for k in kept]))
        for b, row in enumerate(batcher.rows):
            if kept[b] > 1 or not first_node:
                want = alone_heads(model, row.history.tokens[:-1])  # (its fed tokens)
                gaps.append(mx.abs(got[b] - want).max().item())
    assert gaps, "no row kept a draft: the control has no power"
    if first_node:
        assert min(gaps) > 1e-2
    else:
        assert max(gaps) < 1e-4


def test_row_heads_rank_the_draft_vocabulary_only():
    """With a draft vocabulary, every row's heads' logits are ``-inf`` outside it and
    rows still equal their prompts alone. Control: without one, all are finite."""
    model = drafter_model("medusa")
    rt = model.speculative_streams
    for ids in (None, [0, 2, 3, 5, 7, 11]):
        use_draft_vocab(model, ids)
        batcher = SpecBatcher(model, streams=True, pipeline=False)
        for p, n in zip(PROMPTS, LIMITS):
            batcher.insert(p, max_tokens=n, num_draft_tokens=3)
        kept = [len(r.tokens) for r in batcher.step()]
        logits = rt.rows_heads(mx.array([k - 1 for k in kept]))
        logits = np.array(logits.astype(mx.float32))
        if ids is None:
            assert np.isfinite(logits).all()
            continue
        outside = np.ones(logits.shape[-1], dtype=bool)
        outside[ids] = False
        assert np.isneginf(logits[..., outside]).all()
        assert np.isfinite(logits[..., ~outside]).all()
        tokens, _ = run(model, draft="streams")
        assert tokens == [plain_greedy(model, p, n) for p, n in zip(PROMPTS, LIMITS)]
    use_draft_vocab(model, None)


def test_auto_drafts_with_the_heads_and_follows_their_batch_tuning():
    """``draft="auto"`` drafts with the heads (their count as tuned here, else all);
    a drafter config's tuned ``batch`` is followed (lookup here)."""
    model = medusa_model()
    kept = lambda out: [[len(r.tokens) for r in o] for o in out]  # noqa: E731
    auto = list(batch_generate_step(model, PROMPTS, max_tokens=LIMITS))
    heads = list(batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams"))
    lookup = list(batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="ngram",
                                      num_draft_tokens=2))  # fmt: skip
    assert kept(auto) == kept(heads) != kept(lookup)
    cfg = model.speculative_streams.config
    cfg.batch = dict(draft="ngram", num_draft_tokens=2, stream_pass="fused", rows=4)
    assert kept(batch_generate_step(model, PROMPTS, max_tokens=LIMITS)) == kept(lookup)
    cfg.batch = None


def test_a_model_without_a_drafter_and_a_split_pass_are_refused():
    plain = tiny_model("llama")
    with pytest.raises(ValueError, match="no speculative streams or attached drafter"):
        list(batch_generate_step(plain, PROMPTS, draft="streams"))
    with pytest.raises(ValueError, match="no speculative streams or attached drafter"):
        SpecBatcher(plain, streams=True)
    for model in (medusa_model(), drafter_model("parallelspec")):
        with pytest.raises(ValueError, match="attached drafters .* draft from the verifying"):
            SpecBatcher(model, streams=True, stream_pass="split")
    with pytest.raises(ValueError, match="draft 3 tokens"):
        list(batch_generate_step(medusa_model(), PROMPTS, draft="streams", num_draft_tokens=4))


def test_a_drafter_config_s_batch_setting_is_checked():
    good = dict(draft="streams", num_draft_tokens=2, stream_pass="fused", rows=4)
    assert DrafterConfig(kind="medusa", batch=good).batch == good
    lookup = dict(good, draft="ngram")
    assert DrafterConfig(kind="mtp", batch=lookup).batch == lookup
    assert DrafterConfig(kind="mtp", batch=good).batch == good
    assert DrafterConfig(kind="parallelspec", batch=good).batch == good
    with pytest.raises(ValueError, match="drafter.batch=.*num_streams=3"):
        DrafterConfig(kind="medusa", batch=dict(good, num_draft_tokens=4))
    with pytest.raises(ValueError, match=r"drafter.tuned\['cpu:x'\]: drafter.batch"):
        DrafterConfig(kind="medusa", tuned={"cpu:x": {"batch": dict(good, rows="4")}})


@pytest.mark.parametrize("kind", ["medusa", "parallelspec"])
def test_tune_batch_times_the_drafter_s_chains_and_stores_them(kind, tmp_path, monkeypatch):
    """The heads' (or ParallelSpec's) chain of each depth (one pass: no split), lookup
    and no drafts, each pipelined and not; the fastest goes into the drafter section's
    tuned entry, which loads and which ``draft="auto"`` then follows."""
    from test_tune import BATCH_PROMPTS, fake_batch_speeds

    model = tiny_model("llama", vocab_size=16, weight_scale=1.0)
    attach_drafter(model, DrafterConfig(kind=kind, num_draft_tokens=2, top_k=2), seed=3)
    if kind == "medusa":
        zero_drafter(model)
    tokenizer = word_tokenizer(16, eos=15)

    def speed(tps, s):
        if s["draft"] == "streams" and s["num_draft_tokens"] == 2:
            return 300.0 + (10.0 if s.get("pipeline") else 0.0)
        return 100.0 if s["draft"] is None else 50.0

    measured = fake_batch_speeds(monkeypatch, speed)
    choice, _, _ = tune.tune_batch(model, tokenizer, BATCH_PROMPTS, max_tokens=6, rows=3,
                                   log=lambda *a: None, confirm_rounds=1)  # fmt: skip
    ways = {(m["draft"], m.get("num_draft_tokens"), m.get("stream_pass")) for m in measured}
    assert {("streams", n, "fused") for n in (1, 2)} <= ways
    assert not any(m.get("stream_pass") == "split" for m in measured)
    assert choice == dict(draft="streams", num_draft_tokens=2, stream_pass="fused", rows=3,
                          pipeline=True)  # fmt: skip

    config = {"model_type": "llama", "drafter": DrafterConfig(kind=kind).to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tune.save_choice(tmp_path, {"batch": choice})
    section = json.loads((tmp_path / "config.json").read_text())["drafter"]
    loaded = DrafterConfig.from_dict(section)
    assert loaded.for_device(device_key()).batch == choice
    assert loaded.for_device("gpu:elsewhere").batch is None

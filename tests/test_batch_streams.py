"""Rows of a batch that draft with the model's own streams (lossless mode): each row's
stream logits equal those its sequence gets alone (StreamRuntime.draft_streams), each
row's output equals its prompt decoded alone, in the passes that decoding alone with
a chain of the streams takes."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import plain_greedy, spec_tokens, tiny_model, tiny_spec_model
from mlx_specstream.cache import make_prompt_cache

from mlx_specstream import batch
from mlx_specstream.batch import SpecBatcher, batch_generate_step
from mlx_specstream.streams import StreamRuntime

PROMPTS = [[3, 4, 5, 3, 4], [7, 8, 9, 10, 11, 12, 13, 7, 8], [2], [1, 2, 1, 2, 1, 2, 1]]
LIMITS = [24, 30, 17, 40]
STREAMS = dict(num_streams=3, mode="lossless", stream_lora_rank=4, num_stream_layers=2)
# Streams at their node's position (the shipped model's) and at the positions they predict.
POSITIONS = ["same", "offset"]
PASSES = ["fused", "split"]


def stream_model(arch="llama", positions="same", **kwargs):
    return tiny_spec_model(arch, vocab_size=16, stream_positions=positions, **STREAMS, **kwargs)


def alone_streams(model, context):
    """``(gamma, V)``: the streams of ``context``'s last token, decoding it alone."""
    rt = model.speculative_streams
    cache = make_prompt_cache(model)  # (ours: window layers keep every token)
    if len(context) > 1:
        model(mx.array([context[:-1]]), cache=cache)
    rt.forward([context[-1]], [-1], cache, all_streams=False)
    return rt.draft_streams(mx.array(0), cache)


def stream_gaps(model, stream_pass, passes=6, first_node=False):
    """After each of ``passes`` passes over four rows: per row, the largest gap between
    its stream logits in the batch and its sequence's alone (``first_node``: the
    batch's of the first token each row fed instead of its last kept one)."""
    rt = model.speculative_streams
    # (unpipelined: the runtime then holds the pass just read)
    batcher = SpecBatcher(model, streams=True, stream_pass=stream_pass, pipeline=False)
    for p, n in zip(PROMPTS, LIMITS):
        batcher.insert(p, max_tokens=n, num_draft_tokens=3)
    gaps, longest = [], 0
    for _ in range(passes):
        kept = [len(r.tokens) for r in batcher.step()]
        longest = max(longest, *kept)
        nodes = mx.array([0 if first_node else k - 1 for k in kept])
        if stream_pass == "fused":  # (from the verifying pass just run)
            got = rt.fused_streams(nodes)
        else:
            got = rt.rows_streams(nodes, batcher.cache)
        for b, row in enumerate(batcher.rows):
            want = alone_streams(model, row.history.tokens[:-1])  # its fed tokens
            gaps.append(mx.abs(got[b] - want).max().item())
    assert longest > 1, "no row kept a draft token: the test has no power"
    return gaps


@pytest.mark.parametrize("stream_pass", PASSES)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt_neox"])
def test_row_streams_equal_the_sequence_alone(arch, positions, stream_pass):
    assert max(stream_gaps(stream_model(arch, positions), stream_pass)) < 1e-4


@pytest.mark.parametrize("stream_pass", PASSES)
@pytest.mark.parametrize("control", ["node", "positions", "mask"])
def test_negative_controls_row_streams(control, stream_pass, monkeypatch):
    """The streams of the wrong node, at positions one further, or seeing keys past
    their row's end or other tokens' streams differ from the sequence's own."""
    if control == "node":
        assert max(stream_gaps(stream_model(), stream_pass, first_node=True)) > 1e-2
        return
    if control == "positions":  # (in the batch only: the sequence alone keeps its own)
        positions, batch_pass = StreamRuntime._stream_positions, {"on": False}

        def in_batch(method):
            def call(self, *args, **kwargs):
                batch_pass["on"] = True
                try:
                    return method(self, *args, **kwargs)
                finally:
                    batch_pass["on"] = False

            return call

        monkeypatch.setattr(StreamRuntime, "_stream_positions",
                            lambda self, d: positions(self, d) + int(batch_pass["on"]))  # fmt: skip
        for name in ("rows_pass", "rows_streams"):
            monkeypatch.setattr(StreamRuntime, name, in_batch(getattr(StreamRuntime, name)))
    elif stream_pass == "fused":
        from mlx_specstream import streams

        rows_mask = streams.rows_mask
        monkeypatch.setattr(streams, "rows_mask",
                            lambda block, *a: rows_mask(mx.ones_like(block), *a))  # fmt: skip
    else:
        from mlx_specstream.ragged_cache import RaggedKVCache

        make_mask = RaggedKVCache.make_mask

        def blind(self, N, *args, **kwargs):  # (the verifying pass's stays right)
            mask = make_mask(self, N, *args, **kwargs)
            return mask if N != 3 else mx.ones_like(mask)

        monkeypatch.setattr(RaggedKVCache, "make_mask", blind)
    assert max(stream_gaps(stream_model(), stream_pass)) > 1e-2


@pytest.mark.parametrize("stream_pass", PASSES)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize(
    "arch, extra",
    [("llama", {}), ("qwen2", {}), ("phi3", {}), ("starcoder2", {}), ("gpt_neox", {}),
     ("llama", {"quant_bits": 4})],
    ids=["llama", "qwen2", "phi3", "starcoder2", "gpt_neox", "llama-4bit"],
)  # fmt: skip
def test_greedy_rows_equal_each_prompt_alone_in_the_passes_of_a_chain(
    arch, extra, positions, stream_pass
):
    """Token for token mlx-lm's plain decoding, and each row in as many passes as
    decoding it alone with a chain of the streams' first choices."""
    model = stream_model(arch, positions, **extra)
    tokens, passes = [[] for _ in PROMPTS], [0] * len(PROMPTS)
    for out in batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams",
                                   stream_pass=stream_pass):  # fmt: skip
        for r in out:
            tokens[r.uid] += r.tokens
            passes[r.uid] += 1
    assert sum(passes) < sum(LIMITS), "no draft token was ever accepted: the test has no power"
    for p, n, got, k in zip(PROMPTS, LIMITS, tokens, passes):
        assert got == plain_greedy(model, p, n)
        _, records = spec_tokens(model, p, n, tree_top_k=1, tree_depth=3)
        assert k == records[-1][3]


@pytest.mark.parametrize("drafter", ["streams", "medusa", "parallelspec"])
@pytest.mark.parametrize("pipeline", [False, True])
def test_negative_control_an_unchecked_stream_draft(pipeline, drafter, monkeypatch):
    """A verifier that keeps one draft token unchecked changes the output (rows drafting
    with streams, Medusa heads or a ParallelSpec drafter)."""
    accepted, on_device = batch.accepted, batch.accepted_on_device
    monkeypatch.setattr(batch, "accepted", lambda d, c: c[: min(len(d), len(accepted(d, c))) + 1])
    monkeypatch.setattr(batch, "accepted_on_device",
                        lambda i, c, d: mx.minimum(on_device(i, c, d) + 1, d))  # fmt: skip
    if drafter == "streams":
        model = stream_model()
    else:
        from test_drafters import drafter_model

        model = drafter_model(drafter)
    tokens = [[] for _ in PROMPTS]
    for out in batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams",
                                   pipeline=pipeline):  # fmt: skip
        for r in out:
            tokens[r.uid] += r.tokens
    assert tokens != [plain_greedy(model, p, n) for p, n in zip(PROMPTS, LIMITS)]


def test_accepted_on_device_golden():
    """The docstring's example, a row without drafts, and padding never kept."""
    inputs = mx.array([[5, 6, 7, 9], [4, 4, 4, 4], [1, 2, 3, 3]])
    chosen = mx.array([[6, 7, 8, 1], [4, 4, 4, 4], [2, 3, 3, 3]])
    assert batch.accepted_on_device(inputs, chosen, mx.array([3, 0, 2])).tolist() == [2, 0, 2]


def test_auto_drafts_with_lossless_streams():
    model = stream_model()
    auto = list(batch_generate_step(model, PROMPTS, max_tokens=LIMITS))
    streams = list(batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams"))
    lookup = list(batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="ngram"))
    kept = lambda passes: [[len(r.tokens) for r in out] for out in passes]  # noqa: E731
    assert kept(auto) == kept(streams) != kept(lookup)


def test_streams_that_cannot_draft_rows_get_a_clear_error():
    from helpers import tiny_model

    with pytest.raises(ValueError, match="draft 3 tokens"):
        list(batch_generate_step(stream_model(), PROMPTS, draft="streams", num_draft_tokens=4))
    with pytest.raises(ValueError, match="no speculative streams"):
        list(batch_generate_step(tiny_model("llama", vocab_size=16), PROMPTS, draft="streams"))
    with pytest.raises(ValueError, match="not both"):
        SpecBatcher(stream_model(), streams=True, draft_model=tiny_model("llama", vocab_size=16))
    shared = tiny_spec_model("llama", vocab_size=16, num_streams=2, mode="shared")
    with pytest.raises(ValueError, match="shared-mode model's main rows read"):
        SpecBatcher(shared, stream_pass="split")
    with pytest.raises(ValueError, match="shared-mode model's rows carry them"):
        SpecBatcher(shared, draft_model=tiny_model("llama", vocab_size=16))


@pytest.mark.parametrize("draft", [None, "streams", "ngram"])
def test_shared_mode_rows_equal_the_model_own_decoding(draft):
    """A shared-mode model's main rows read their streams: every pass of a batch carries
    them, with or without drafts, and each row equals the model's own plain decoding
    (``speculative=False``). Control: mlx-lm's batch (no streams) decodes another model."""
    from mlx_lm import batch_generate as mlx_lm_batch_generate

    model = tiny_spec_model("llama", vocab_size=16, mode="shared", num_streams=3,
                            num_stream_layers=2)  # fmt: skip
    want = [spec_tokens(model, p, n, speculative=False)[0] for p, n in zip(PROMPTS, LIMITS)]
    tokens, passes = [[] for _ in PROMPTS], 0
    for out in batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft=draft):
        passes += 1
        for r in out:
            tokens[r.uid] += r.tokens
    assert tokens == want
    if draft == "streams":
        assert passes < max(LIMITS), "no draft token was ever accepted: the test has no power"
    from helpers import word_tokenizer

    plain = mlx_lm_batch_generate(model, word_tokenizer(16, eos=15), PROMPTS, max_tokens=LIMITS,
                                  return_token_ids=True)  # fmt: skip
    assert [list(t) for t in plain.token_ids] != want


def test_the_runtime_holds_nothing_of_a_finished_batch():
    model = stream_model()
    list(batch_generate_step(model, PROMPTS, max_tokens=LIMITS, draft="streams"))
    rt = model.speculative_streams
    assert rt._upper_input is None and rt._stream_input is None


def test_default_model_rows_equal_each_prompt_alone():
    from mlx_specstream.default_model import load_default

    model, tokenizer = load_default()[:2]
    texts = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def "]
    prompts = [tokenizer.encode(t) for t in texts]
    tokens, passes = [[] for _ in prompts], 0
    for out in batch_generate_step(model, prompts, max_tokens=40, draft="streams"):
        passes += 1
        for r in out:
            tokens[r.uid] += r.tokens
    for p, got in zip(prompts, tokens):
        assert got == plain_greedy(model, p, 40)
    assert passes < 40


def test_streams_and_lookup_rows_equal_plain_decoding():
    """``"streams+ngram"``: a row drafts its lookup chain where its tokens have a match,
    else its streams' chain; on prompts that repeat, fewer passes than the streams
    alone; every row equals plain decoding. Rows of one batch may each draft from
    their own source."""
    model = stream_model()
    repeat = [p * 3 for p in PROMPTS]

    def run(draft):
        tokens, passes = [[] for _ in repeat], 0
        for out in batch_generate_step(model, repeat, max_tokens=LIMITS, draft=draft):
            passes += 1
            for r in out:
                tokens[r.uid] += r.tokens
        assert tokens == [plain_greedy(model, p, n) for p, n in zip(repeat, LIMITS)]
        return passes

    assert run("streams+ngram") < run("streams")
    batcher = SpecBatcher(model, streams=True)
    for p, n, d in zip(repeat, LIMITS, ["streams", "ngram", "streams+ngram", "streams"]):
        batcher.insert(p, max_tokens=n, draft=d, num_draft_tokens=3)
    tokens = [[] for _ in repeat]
    while len(batcher):
        for r in batcher.step():
            tokens[r.uid - 1] += r.tokens
    assert tokens == [plain_greedy(model, p, n) for p, n in zip(repeat, LIMITS)]


def test_auto_follows_the_tuning_of_the_streams():
    """Streams tuned off on this device (``tree_depth`` 0): ``"auto"`` drafts by prompt
    lookup, and ``"streams"`` still drafts with them (all of them)."""
    model = stream_model(tree_depth=0)
    kept = lambda draft: [[len(r.tokens) for r in out]  # noqa: E731
                          for out in batch_generate_step(model, PROMPTS, max_tokens=LIMITS,
                                                         draft=draft)]  # fmt: skip
    assert kept("auto") == kept("ngram") != kept("streams")
    assert max(n for out in kept("streams") for n in out) == 4
    assert batch.tuned_depth(model) == 0 and batch.tuned_depth(stream_model(tree_depth=2)) == 2


def test_a_row_cannot_ask_for_streams_a_batch_has_not():
    with pytest.raises(ValueError, match="in a batch without streams"):
        SpecBatcher(stream_model()).insert([1, 2], draft="streams")
    with pytest.raises(ValueError, match="one of"):
        SpecBatcher(stream_model(), streams=True).insert([1, 2], draft="medusa")


# ---- pipelined passes: each launched before the one before it is read -----------------


def run_batcher(model, rows, pipeline, keep_caches=False, joining=(), sampler=None,
                streams=True, draft_tokens=3):  # fmt: skip
    """Tokens, log-probabilities, finish reasons and passes per row of a SpecBatcher
    (``rows``: (prompt, max_tokens, draft) each, drafting ``draft_tokens``; ``joining``:
    rows inserted after the third pass), and the caches of finished rows."""
    batcher = SpecBatcher(model, stop_tokens=[15], streams=streams, pipeline=pipeline,
                          keep_caches=keep_caches)  # fmt: skip
    got, flights = {}, 0

    def insert(prompt, n, draft):
        uid = batcher.insert(prompt, max_tokens=n, draft=draft, sampler=sampler,
                             num_draft_tokens=draft_tokens if draft else 0)  # fmt: skip
        got[uid] = dict(tokens=[], logprobs=[], passes=0)

    for row in rows:
        insert(*row)
    step = 0
    while len(batcher):
        for r in batcher.step():
            g = got[r.uid]
            g["tokens"] += r.tokens
            g["logprobs"] += [round(x, 4) for x in r.logprobs]
            g["passes"] += 1
            g["finish"] = r.finish_reason
            if r.cache is not None:
                g["cache"] = [np.array(c.state[0]) for c in r.cache]
        flights += batcher._flight is not None
        step += 1
        if step == 3:
            for row in joining:
                insert(*row)
    return got, flights


ROWS = [(p, n, "streams") for p, n in zip(PROMPTS, LIMITS)]


@pytest.mark.parametrize("stream_pass", PASSES)
def test_pipelined_rows_equal_unpipelined(stream_pass):
    """Rows drafting with streams, and rows without drafts, joining mid-flight and
    leaving at a stop token or their length: tokens, log-probabilities, finish reasons,
    passes and returned caches equal the unpipelined loop's; passes were in flight."""
    model = stream_model()
    rows = ROWS[:3] + [(PROMPTS[3], LIMITS[3], None)]
    joining = [([5, 6, 7, 5, 6], 20, "streams"), ([9], 11, None)]
    kwargs = dict(keep_caches=True, joining=joining)
    want, none = run_batcher(model, rows, False, **kwargs)
    got, flights = run_batcher(model, rows, True, **kwargs)
    assert none == 0 and flights > 10
    for uid in want:
        for key in ("tokens", "logprobs", "passes", "finish"):
            assert got[uid][key] == want[uid][key], (uid, key)
        for a, b in zip(got[uid]["cache"], want[uid]["cache"]):
            np.testing.assert_array_equal(a, b)
    prompts = [r[0] for r in rows + joining]
    limits = [r[1] for r in rows + joining]
    for uid, p, n in zip(sorted(want), prompts, limits):
        plain = plain_greedy(model, p, n)
        cut = plain[: plain.index(15) + 1] if 15 in plain else plain
        assert got[uid]["tokens"] == cut


@pytest.mark.parametrize("drafter", ["streams", "medusa", "mtp", "parallelspec"])
@pytest.mark.parametrize("control", [False, True], ids=["pipelined", "control-unchecked"])
def test_pipelined_sampled_rows_keep_the_model_distribution(control, drafter, monkeypatch,
                                                            tmp_path):  # fmt: skip
    """Rows of two prompts interleaved, sampled at T = 1, drafting with the streams (or
    Medusa heads, an MTP layer or a ParallelSpec drafter) in pipelined passes: each
    prompt's rows
    against its exact distribution (chi-square). Control: a verifier that keeps the first
    draft token unchecked (the next choice is then drawn after the draft, not after the
    drawn token)."""
    from test_batch import sampled_pvalues

    from mlx_specstream.sample_utils import make_sampler

    if control:
        on_device, on_host = batch.accepted_on_device, batch.accepted
        monkeypatch.setattr(batch, "accepted_on_device",
                            lambda i, c, d: mx.maximum(on_device(i, c, d), mx.minimum(d, 1)))  # fmt: skip
        monkeypatch.setattr(batch, "accepted",
                            lambda d, c: on_host(d, c) if on_host(d, c)[:-1] or not d
                            else c[:2])  # fmt: skip
    shape = dict(hidden_size=32, intermediate_size=64)
    if drafter == "streams":
        model = tiny_spec_model("llama", vocab_size=6, weight_scale=4.0, num_streams=2,
                                mode="lossless", model_args=shape)  # fmt: skip
    elif drafter in ("medusa", "parallelspec"):
        from mlx_specstream.config import DrafterConfig
        from mlx_specstream.drafters import attach_drafter

        model = tiny_model("llama", vocab_size=6, weight_scale=4.0, **shape)
        # (the control's power depends on what the random drafter drafts: ParallelSpec's
        # seed 3 leaves it at p = 7e-6, seeds 4 and 6 at 2e-13 and 5e-12)
        seed = 4 if drafter == "parallelspec" else 3
        config = DrafterConfig(kind=drafter, num_draft_tokens=2, top_k=2)
        attach_drafter(model, config, seed=seed)
    else:
        from test_mtp import write_checkpoint

        from mlx_specstream import load

        write_checkpoint(tmp_path / "ckpt", "mimo", seed=3, vocab_size=6)
        model, _ = load(str(tmp_path / "ckpt"))
    p = sampled_pvalues(model, make_sampler(temp=1.0), streams=True, pipeline=True)
    if control:
        # (it would fail the test below: a prompt's rows are off their distribution)
        assert min(p) < 1e-6, f"the lenient verifier passed (p = {p}): the test has no power"
    else:
        assert min(p) > 1e-3, f"chi-square p = {p}"


def test_a_lookup_row_joining_lands_the_flight():
    """A row drafting by lookup that joins a flight of passes whose rows' tokens the
    device does not hold (none looked up) lands it: the pass in flight is read, the
    next is launched from the host with every row's tokens on the device, and every
    row still equals plain decoding."""
    model = stream_model()
    got, flights = run_batcher(model, ROWS[:2], True, joining=[(PROMPTS[3], 30, "ngram")])
    assert flights >= 2
    for g, (p, n) in zip(got.values(), [(PROMPTS[0], LIMITS[0]), (PROMPTS[1], LIMITS[1]),
                                         (PROMPTS[3], 30)]):  # fmt: skip
        plain = plain_greedy(model, p, n)
        assert g["tokens"] == (plain[: plain.index(15) + 1] if 15 in plain else plain)


def assert_pipelined_equals_unpipelined(model, rows, joining, streams, draft_tokens=3):
    """The pipelined loop's tokens, log-probabilities, passes, finish reasons and
    caches equal the unpipelined loop's, with passes in flight, and equal plain
    decoding; lookup saved passes. Returns the passes per row."""
    kwargs = dict(keep_caches=True, joining=joining, streams=streams, draft_tokens=draft_tokens)
    want, none = run_batcher(model, rows, False, **kwargs)
    got, flights = run_batcher(model, rows, True, **kwargs)
    assert none == 0 and flights > 10
    for uid in want:
        for key in ("tokens", "logprobs", "passes", "finish"):
            assert got[uid][key] == want[uid][key], (uid, key)
        for a, b in zip(got[uid]["cache"], want[uid]["cache"]):
            np.testing.assert_array_equal(a, b)
    everything = rows + joining
    for uid, (p, n, _) in zip(sorted(want), everything):
        plain = plain_greedy(model, p, n)
        assert got[uid]["tokens"] == (plain[: plain.index(15) + 1] if 15 in plain else plain)
    saved = [len(g["tokens"]) - g["passes"] for g, r in zip(got.values(), everything)
             if r[2] and "ngram" in r[2]]  # fmt: skip
    assert sum(saved) > 4, f"lookup saved {saved} passes: the test has no power"
    return [got[u]["passes"] for u in sorted(got)]


LOOKUP_PROMPTS = [[3, 4, 5, 3, 4, 5, 3], [7, 8, 9, 7, 8, 9, 7, 8], [2, 6, 2, 6], [1, 2, 1, 2, 1]]


@pytest.mark.parametrize("streams", [False, True], ids=["plain-model", "stream-model"])
def test_pipelined_lookup_rows_equal_unpipelined(streams):
    """Rows drafting by prompt lookup on the device (a copy of each row's tokens there),
    beside rows drafting with the streams (a stream model), both at once
    (``streams+ngram``) or not at all; rows joining mid-flight and leaving: the
    pipelined loop equals the unpipelined one, pass for pass."""
    model = stream_model() if streams else tiny_model("llama", vocab_size=16)
    drafts = [None, "streams", "streams+ngram", "ngram"] if streams else ["ngram"] * 3 + [None]
    rows = [(p, n, d) for p, n, d in zip(LOOKUP_PROMPTS, [40, 30, 36, 25], drafts)]
    joining = [([5, 6, 7, 5, 6], 28, "ngram"), ([9], 11, None)]
    assert_pipelined_equals_unpipelined(model, rows, joining, streams)


@pytest.mark.parametrize("control", [False, True])
def test_a_lookup_row_joining_a_flight_drafts_in_its_first_pass(control, monkeypatch):
    """A row that joins passes in flight drafts in its first pass what the host's lookup
    finds in its prompt (here the model's next three tokens: 4 tokens in one pass), as
    the unpipelined loop does. Control: joining without that draft, one token."""
    if control:
        monkeypatch.setattr(batch, "_row_draft", lambda row, n, chain: [])
    model = tiny_model("llama", vocab_size=16)
    batcher = SpecBatcher(model, pipeline=True)
    for p in LOOKUP_PROMPTS[:2]:
        batcher.insert(p, max_tokens=40, draft="ngram", num_draft_tokens=3)
    for _ in range(3):
        batcher.step()
    assert batcher._flight is not None  # (it joins a flight)
    prompt = [1, 5, 9, 1, 0, 14, 4, 9, 9, 1]  # (lookup: 0 14 4, the model's next tokens)
    uid = batcher.insert(prompt, max_tokens=12, draft="ngram", num_draft_tokens=3)
    got, first = [], None
    while len(batcher):
        for r in batcher.step():
            if r.uid == uid:
                first = len(r.tokens) if first is None else first
                got += r.tokens
    assert got == plain_greedy(model, prompt, 12)
    assert first == (1 if control else 4)


def test_negative_control_a_device_history_without_the_bonus_token(monkeypatch):
    """Lookup on a device history that leaves out each pass's last token drafts
    differently: the output stays plain decoding's (any draft is verified), but the
    passes differ, which the equality test above catches."""
    extended = batch._extended

    def forgetful(history, chosen, accepted, rows):
        tokens, lengths = extended(history, chosen, accepted, rows)
        return tokens, lengths - 1

    model = tiny_model("llama", vocab_size=16)
    rows = [(p, n, "ngram") for p, n in zip(LOOKUP_PROMPTS, [40, 30, 36, 25])]
    right = [g["passes"] for g in run_batcher(model, rows, True, streams=False)[0].values()]
    monkeypatch.setattr(batch, "_extended", forgetful)
    with pytest.raises(AssertionError, match="passes"):
        assert_pipelined_equals_unpipelined(model, rows, [], streams=False)
    wrong = run_batcher(model, rows, True, streams=False)[0]
    assert [g["passes"] for g in wrong.values()] != right
    for g, (p, n, _) in zip(wrong.values(), rows):
        plain = plain_greedy(model, p, n)
        assert g["tokens"] == (plain[: plain.index(15) + 1] if 15 in plain else plain)


def test_negative_control_a_pipelined_cache_advanced_one_too_far(monkeypatch):
    from mlx_specstream.ragged_cache import RaggedKVCache

    advance = RaggedKVCache.advance_on_device
    monkeypatch.setattr(RaggedKVCache, "advance_on_device",
                        lambda self, kept, most: advance(self, kept + 1, most + 1))  # fmt: skip
    model = stream_model()
    got, _ = run_batcher(model, ROWS, True)
    assert [g["tokens"] for g in got.values()] != [
        g["tokens"] for g in run_batcher(model, ROWS, False)[0].values()
    ]


def test_ragged_cache_advanced_on_the_device():
    """Offsets move with the device's counts at once; the host's ends, when it reads
    them; the size bounds the longest row meanwhile."""
    from mlx_specstream.ragged_cache import RaggedKVCache

    cache = RaggedKVCache([3, 1])
    cache.advance_on_device(mx.array([2, 1]), 3)
    assert cache.offset.tolist() == [5, 2] and cache.ends == [3, 1] and cache.size() == 6
    with pytest.raises(ValueError, match="unread"):
        cache.advance([1, 1])
    cache.settle([2, 1])
    assert cache.ends == [5, 2] and cache.size() == 5 and cache.offset.tolist() == [5, 2]


def test_rows_mask_golden():
    """rows_mask's worked example: two rows holding 1 and 0 tokens, two rows each."""
    from mlx_specstream.attention_masks import rows_mask

    got = rows_mask(mx.array([[True, False], [True, True]]), mx.array([1, 0]), 1)
    assert got.shape == (2, 1, 2, 3)
    assert got[:, 0].astype(mx.int32).tolist() == [
        [[1, 1, 0], [1, 1, 1]],
        [[1, 0, 0], [1, 1, 0]],
    ]

"""The server decodes requests that wait together in one batch (mlx-lm's continuous
batching), and a request decoding alone joins the batch when others arrive. Each
answer equals what the request gets alone (greedy: plain decoding, token for token on
CPU); sampled rows keep their own distribution; seeded requests, and models whose
batched pass fails, are served one at a time."""

import logging
from collections import Counter

import mlx.core as mx
import pytest
from helpers import tiny_hybrid, tiny_model, tiny_spec_model, word_tokenizer

from mlx_specstream import replies
from mlx_specstream.generate import stream_generate
from mlx_specstream.openai_api import parse_generation_args
from mlx_specstream.server import make_server, service_of

V = 64


@pytest.fixture
def service():
    """Starts model services (no HTTP: requests go to the generation thread as the
    handler hands them over); stops them after the test."""
    made = []

    def start(model, tok=None, **defaults):
        server = make_server(model, tok or word_tokenizer(V), "tiny", port=0, **defaults)
        made.append(server)
        return service_of(server)

    yield start
    for server in made:
        server.server_close()


def submit(svc, prompt, **body):
    return svc.submit(prompt, parse_generation_args({"max_tokens": 16, **body}, svc.defaults))


def submit_together(svc, requests):
    """Queues every request before the generation thread can take the first (it waits
    on the queue's condition, which this thread holds meanwhile)."""
    with svc._state:
        return [submit(svc, prompt, **body) for prompt, body in requests]


def answer(job):
    """Text, usage and log-probability records of each choice of a finished job."""
    text, usage, records = {}, {}, {}
    for index, piece, finish, u, new in job:
        text[index] = text.get(index, "") + piece
        if u is not None:
            usage[index] = u
        if new is not None:
            records[index] = records.get(index, []) + new
    return text, usage, records


def alone(model, tok, prompt, n, **kwargs):
    """Plain decoding's text and log-probabilities (mlx-lm's loop: speculative=False)."""
    rs = list(stream_generate(model, tok, prompt, max_tokens=n, speculative=False, **kwargs))
    return "".join(r.text for r in rs), [r.logprobs for r in rs]


PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13], [20], [30, 31, 30, 31, 30]]


def test_waiting_requests_are_decoded_together_as_each_alone(service):
    """Four requests waiting together run as one batch of four rows: each answer and
    its log-probabilities equal plain decoding of that request alone (one row with a
    repetition penalty, whose history is its own prompt and answer), and its usage
    says every token came from the batch (but for a last row left alone, which goes on
    alone). Control: rows whose replies are rotated (each request gets its
    neighbour's tokens) do not."""
    from mlx_lm.sample_utils import make_logits_processors

    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, tree_depth=3)
    tok = word_tokenizer(V)
    svc = service(model, tok)
    penalty = {"repetition_penalty": 1.5, "repetition_context_size": 4}
    bodies = [{"logprobs": 2, **(penalty if i == 3 else {})} for i in range(4)]
    jobs = submit_together(svc, list(zip(PROMPTS, bodies)))
    got = [answer(j) for j in jobs]
    assert svc.served["batched"] == 1 and svc.served["largest_batch"] == 4
    assert svc.served["alone"] == svc.served["taken_back"] <= 1
    whole = []
    for i, (p, (text, usage, records)) in enumerate(zip(PROMPTS, got)):
        kwargs = {"logits_processors": make_logits_processors(**penalty)} if i == 3 else {}
        want, logprobs = alone(model, tok, p, 16, **kwargs)
        assert text[0] == want
        if i == 3:  # (the penalty changed this answer)
            assert want != alone(model, tok, p, 16)[0]
        n = usage[0]["completion_tokens"]
        assert n == len(logprobs) == len(records[0])
        whole.append(usage[0]["speculative"]["batched_tokens"] == n)
        for rec, lp in zip(records[0], logprobs):
            assert abs(rec["logprob"] - lp[rec["id"]].item()) < 1e-5
    assert whole.count(False) == svc.served["taken_back"]

    def rotated(step):  # each row's event goes to the next row's request
        def call(self):
            out = step(self)
            events = [e for _, e, _ in out[1:] + out[:1]]
            return [(reply, e, cache) for (reply, _, cache), e in zip(out, events)]

        return call

    svc = service(model, tok)
    with pytest.MonkeyPatch().context() as mp:
        for kind in (replies.Batch, replies.SpecBatch):  # (the streams' rows: a SpecBatch)
            mp.setattr(kind, "step", rotated(kind.step))
        jobs = submit_together(svc, [(p, {}) for p in PROMPTS])
        texts = [answer(j)[0].get(0, "") for j in jobs]
    assert texts != [alone(model, tok, p, 16)[0] for p in PROMPTS]


def gated(monkeypatch, after: int):
    """Holds the first request that generates ``after`` tokens until ``open`` is set
    (``reached`` tells when it is held), so that others arrive while it runs alone."""
    import threading

    reached, gate, add = threading.Event(), threading.Event(), replies.Reply.add

    def held(self, *args, **kwargs):
        event = add(self, *args, **kwargs)
        if len(self.generated) == after and not reached.is_set():
            reached.set()
            assert gate.wait(60)
        return event

    monkeypatch.setattr(replies.Reply, "add", held)
    return reached, gate


def arrive_while_alone(svc, monkeypatch, first, others, n_before):
    """``first`` (40 tokens) decodes alone until ``n_before`` tokens, then ``others``
    (16 tokens each) arrive together; every answer."""
    reached, gate = gated(monkeypatch, n_before)
    job = submit(svc, first, max_tokens=40)
    assert reached.wait(60)
    jobs = submit_together(svc, [(p, {}) for p in others])
    gate.set()
    got = [answer(j) for j in [job] + jobs]
    monkeypatch.undo()
    return got


@pytest.mark.parametrize(
    "batch", ["streams", "medusa", "mtp", "parallelspec", "eagle1", "dflash", "plain"]
)
def test_a_request_decoding_alone_joins_requests_that_arrive(service, monkeypatch, batch,
                                                             tmp_path):  # fmt: skip
    """A request decoding alone, speculatively, when two others arrive hands its
    cache over and goes on in a batch with them, from its next token: its answer,
    and theirs, equal plain decoding; its usage counts the tokens before (some from
    accepted drafts) and those after. The batch's rows draft with the model's streams,
    Medusa heads, MTP layer, ParallelSpec, EAGLE-1 or DFlash drafter (the last four: their
    layers' rows starting at the hand-over), or (Medusa heads whose batch tuning has drafts off)
    decode plainly in mlx-lm's batch. Controls: a hand-over to mlx-lm's batch that
    leaves its last token out of the cache (an off-by-one) changes its answer; one to
    ours that leaves it in is refused."""
    if batch == "streams":
        model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, tree_depth=3)
    elif batch == "mtp":
        from test_mtp import write_checkpoint

        from mlx_specstream import load

        write_checkpoint(tmp_path / "ckpt", "mimo", seed=3, vocab_size=V)
        model, _ = load(str(tmp_path / "ckpt"))
    elif batch in ("eagle1", "dflash"):
        from dflash_helpers import write_dflash
        from eagle_helpers import write_base
        from test_eagle1 import write_eagle1

        from mlx_specstream import load

        base = write_base(tmp_path / "base", V, weight_scale=1.0)
        write = write_eagle1 if batch == "eagle1" else write_dflash
        write(tmp_path / "drafter", V, scale=1.0)
        model, _ = load(str(base), drafter=str(tmp_path / "drafter"))
    else:
        from mlx_specstream.config import DrafterConfig
        from mlx_specstream.drafters import attach_drafter

        kind = "parallelspec" if batch == "parallelspec" else "medusa"
        model = tiny_model("llama", vocab_size=V)
        attach_drafter(model, DrafterConfig(kind=kind, num_draft_tokens=2, top_k=2), seed=3)
        if batch == "plain":  # (measured for batches on this device: no drafts)
            model.speculative_streams.config.batch = dict(
                draft=None, num_draft_tokens=0, stream_pass="fused", rows=4
            )
    tok = word_tokenizer(V, eos=0)  # (a token this model never writes first: long answers)
    a, others = [3, 4, 5, 3, 4], PROMPTS[1:3]

    svc = service(model, tok)
    got = arrive_while_alone(svc, monkeypatch, a, others, 6)
    # (once the two others are done, it goes on alone again: see the next test)
    assert svc.served == dict(alone=2, batched=1, handed_over=1, taken_back=1, largest_batch=3)
    for p, (text, usage, _), n in zip([a] + others, got, [40, 16, 16]):
        assert text[0] == alone(model, tok, p, n)[0]
    spec = got[0][1][0]["speculative"]
    assert 0 < spec["batched_tokens"] < 40 - 6
    if batch in ("streams", "medusa"):  # (these random layers' drafts are rarely right)
        assert spec["accepted_draft_tokens"] > 0 and spec["forward_passes"] < 40

    svc = service(model, tok)
    assert svc.wait_idle(60) and svc.stream_batching == (batch != "plain")
    if batch == "plain":
        trim = replies.trim_prompt_cache
        monkeypatch.setattr(replies, "trim_prompt_cache", lambda cache, n: trim(cache, n + 1) - 1)
    else:
        monkeypatch.setattr(replies, "_held_by", lambda cache, sequence, short=0: cache)
    reached, gate = gated(monkeypatch, 6)
    job = submit(svc, a, max_tokens=40)
    assert reached.wait(60)
    submit_together(svc, [(p, {}) for p in others])
    gate.set()
    if batch == "plain":
        assert answer(job)[0][0] != alone(model, tok, a, 40)[0]
    else:
        with pytest.raises(ValueError, match="must leave the last one to feed"):
            answer(job)


def test_sampled_rows_keep_their_own_distribution(service):
    """At temperature 1, 320 choices of each of two prompts, decoded in batches of 32
    rows that mix both: each prompt's first tokens fit its own distribution
    (chi-square). Control: they do not fit the other prompt's."""
    from chi_square import chi_square_pvalue

    model = tiny_model("llama", vocab_size=V, weight_scale=1.0)
    tok = word_tokenizer(V)
    svc = service(model, tok)
    prompts = [[3, 4, 5], [40, 41]]
    body = {"max_tokens": 1, "temperature": 1.0, "n": 16, "logprobs": 1}
    mx.random.seed(0)  # (the generation thread draws from MLX's global key)
    jobs = submit_together(svc, [(p, body) for _ in range(20) for p in prompts])
    counts = [Counter(), Counter()]
    for i, job in enumerate(jobs):
        for records in answer(job)[2].values():
            counts[i % 2][records[0]["id"]] += 1
    assert svc.served["largest_batch"] == 640 and sum(counts[0].values()) == 320
    exact = []
    for p in prompts:
        probs = mx.softmax(model(mx.array([p]))[0, -1].astype(mx.float32)).tolist()
        exact.append(dict(enumerate(probs)))
    # (The generation thread shares MLX's global key with other threads, so the draws
    # are not fixed by the seed under load: over 40 seeds the p-values spread evenly
    # over (0.008, 0.99); 1e-4 keeps the chance of a false failure at 2 in 10,000.)
    assert chi_square_pvalue(counts[0], exact[0], 320) > 1e-4
    assert chi_square_pvalue(counts[1], exact[1], 320) > 1e-4
    assert chi_square_pvalue(counts[0], exact[1], 320) < 1e-6  # control
    assert chi_square_pvalue(counts[1], exact[0], 320) < 1e-6


def test_seeded_requests_are_served_one_at_a_time(service):
    """Seeded requests waiting together are decoded one after another, each
    speculatively, so an answer depends on its seed only: each equals the same
    request served again alone. Control: the same requests unseeded are batched."""
    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, tree_depth=3)
    svc = service(model)
    body = {"temperature": 1.0, "seed": 5}
    jobs = submit_together(svc, [(p, body) for p in PROMPTS[:3]])
    texts = [answer(j)[0][0] for j in jobs]
    assert svc.served == dict(alone=3, batched=0, handed_over=0, taken_back=0, largest_batch=0)
    again = [answer(submit(svc, p, **body))[0][0] for p in PROMPTS[:3]]
    assert texts == again
    submit_together(svc, [(p, {"temperature": 1.0}) for p in PROMPTS[:3]])
    assert svc.wait_idle(60) and svc.served["batched"] == 1


def test_one_at_a_time_where_batching_is_off(service, caplog):
    """``decode_concurrency=1``, or a model whose batched pass fails (mlx-lm's gemma2
    in MLX 0.32: its mask does not broadcast over a batch, which is logged), serve
    requests waiting together one at a time: each answer equals plain decoding.
    (Control: the batched case, in the tests above.)"""
    llama = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, tree_depth=3)
    gemma = tiny_spec_model("gemma2", vocab_size=V, num_streams=3, top_k=2, tree_depth=3)
    tok = word_tokenizer(V)
    with caplog.at_level(logging.WARNING, logger="mlx_specstream.server"):
        cases = [
            (llama, service(llama, tok, decode_concurrency=1)),
            (gemma, service(gemma, tok)),
        ]
    assert [r.message for r in caplog.records if "one at a time" in r.message] == [
        "requests are served one at a time: mlx-lm's batched decoding fails on this model "
        "(ValueError: [broadcast_shapes] Shapes (3,1,7,7) and (3,2,2,7,7) cannot be broadcast.)"
    ]
    for model, svc in cases:
        assert not svc.batching
        jobs = submit_together(svc, [(p, {}) for p in PROMPTS[:3]])
        for p, job in zip(PROMPTS[:3], jobs):
            assert answer(job)[0][0] == alone(model, tok, p, 16)[0]
        assert svc.served["alone"] == 3 and svc.served["batched"] == 0


def test_batching_fault_finds_a_wrong_batched_pass():
    """The start-up probe: none for llama; gemma2's error; and, for a model whose
    batched rows are wrong without raising (control: noise added to a batch's logits
    only), the gap it finds."""
    llama = tiny_model("llama", vocab_size=V)
    assert replies.batching_fault(llama) is None
    assert replies.batching_fault(tiny_model("gemma2", vocab_size=V)).startswith(
        "ValueError: [broadcast_shapes]"
    )

    class Noisy(type(llama)):
        def __call__(self, inputs, *args, **kwargs):
            out = super().__call__(inputs, *args, **kwargs)
            return out + 3.0 * mx.random.normal(out.shape) if inputs.shape[0] > 1 else out

    llama.__class__ = Noisy
    assert "differs from the same prompt alone by" in replies.batching_fault(llama)


def test_a_hybrid_model_batches_waiting_requests_but_decodes_alone_to_the_end(service, monkeypatch):
    """A model with recurrent layers: requests waiting together are batched (mlx-lm
    merges their states), each answer equal to plain decoding; one decoding alone
    with prompt lookup is not handed over (its state cannot be rewound to re-feed a
    token), so it finishes alone and the others are batched after it."""
    model, tok = tiny_hybrid("qwen3_next", vocab_size=V), word_tokenizer(V, eos=0)
    svc = service(model, tok, draft="ngram")
    jobs = submit_together(svc, [(p, {}) for p in PROMPTS])
    for p, job in zip(PROMPTS, jobs):
        assert answer(job)[0][0] == alone(model, tok, p, 16)[0]
    assert svc.served == dict(alone=0, batched=1, handed_over=0, taken_back=0, largest_batch=4)
    reached, gate = gated(monkeypatch, 3)
    first = submit(svc, [3, 9, 4, 3, 9, 4, 3], max_tokens=24)
    assert reached.wait(60)
    jobs = submit_together(svc, [(p, {}) for p in PROMPTS[:2]])
    gate.set()
    text, usage, _ = answer(first)
    assert text[0] == alone(model, tok, [3, 9, 4, 3, 9, 4, 3], 24)[0]
    assert usage[0]["speculative"]["batched_tokens"] == 0
    for p, job in zip(PROMPTS[:2], jobs):
        assert answer(job)[0][0] == alone(model, tok, p, 16)[0]
    assert svc.served == dict(alone=1, batched=2, handed_over=0, taken_back=0, largest_batch=4)


def test_a_client_leaving_a_batch(service):
    """A client that leaves mid-batch: its row goes, its cache goes into the LRU
    keyed by the tokens it holds (a follow-up with its prompt reuses it), and the
    other answers still equal plain decoding. Control: the LRU is empty before."""
    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, tree_depth=3)
    tok = word_tokenizer(V, eos=0)
    svc = service(model, tok)
    jobs = submit_together(svc, [(p, {"max_tokens": 40, "stream": True}) for p in PROMPTS[:3]])
    assert len(svc.prompt_cache) == 0
    leaving = iter(jobs[1])
    next(leaving)
    jobs[1].cancel()
    list(leaving)
    for p, job in zip([PROMPTS[0], PROMPTS[2]], [jobs[0], jobs[2]]):
        assert answer(job)[0][0] == alone(model, tok, p, 40)[0]
    want = alone(model, tok, PROMPTS[1], 40)[0].split()
    kept = [e.key for e in svc.prompt_cache._entries.values() if e.key[:7] == PROMPTS[1]]
    assert len(kept) == 1 and len(kept[0]) < len(PROMPTS[1]) + 40
    assert [f"t{t}" for t in kept[0][7:]] == want[: len(kept[0]) - 7]
    text, usage, _ = answer(submit(svc, PROMPTS[1], max_tokens=40))
    assert text[0].split() == want
    assert usage[0]["prompt_tokens_details"]["cached_tokens"] == len(PROMPTS[1]) - 1


def test_reply_holds_back_a_possible_stop_string():
    """A choice's events: text goes out once no stop string can start in it; the
    answer is cut before the stop string, which ends it (``"stop"``, with usage);
    an EOS token ends it without text. Control: without stop strings nothing is held."""
    tok = word_tokenizer(V, eos=9)

    class Job:
        tokens = [1, 2]

        def __init__(self, stop):
            self.args = {"stop": stop, "logprobs": None, "max_tokens": 8}

    lp = mx.zeros((V,))
    reply = replies.Reply(tok, Job(["t5"]), 0, cached=1)
    assert reply.add(1, lp, None) == (0, "t", None, None, None)  # (len("t5") - 1 chars held)
    assert reply.add(2, lp, None) == (0, "1 t", None, None, None)
    index, text, finish, usage, _ = reply.add(5, lp, None)
    assert (index, text, finish) == (0, "2 ", "stop")  # "t1 t2 t5" cut before "t5"
    assert usage["completion_tokens"] == 3 and usage["prompt_tokens_details"]["cached_tokens"] == 1
    reply = replies.Reply(tok, Job([]), 1, cached=0)
    assert [reply.add(t, lp, None) for t in (1, 2)] == [(1, "t1", None, None, None),
                                                         (1, " t2", None, None, None)]  # fmt: skip
    assert reply.add(9, lp, "stop")[1:3] == ("", "stop")
    assert reply.sequence == [1, 2, 1, 2, 9] and reply.usage["completion_tokens"] == 3


def test_concurrency_flags_are_checked():
    from mlx_specstream.server import main

    for flag in ("--decode-concurrency", "--prompt-concurrency"):
        with pytest.raises(SystemExit):
            main([flag, "0"])


def test_the_last_row_of_a_batch_goes_on_alone(service):
    """Two requests batched; once the short one is done, the long one, left alone
    with nobody waiting, is taken out of the batch and goes on speculatively from
    where it was: its answer equals plain decoding with its repetition penalty, its
    usage counts tokens from the batch and drafts accepted after it. It feeds its last
    tokens again, as many as the penalty reads (``min_fed``). Control: fed one token
    only, the penalty sees a shorter history, and the answer changes."""
    from mlx_lm.sample_utils import make_logits_processors

    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, tree_depth=3)
    tok = word_tokenizer(V, eos=0)
    penalty = {"repetition_penalty": 3.0, "repetition_context_size": 20}
    a = [3, 4, 5, 3, 4]
    want = alone(model, tok, a, 48, logits_processors=make_logits_processors(**penalty))[0]

    def run(min_fed=None):
        svc = service(model, tok)
        long, short = submit_together(svc, [(a, {"max_tokens": 48, **penalty}), ([7, 8], {})])
        if min_fed is not None:
            long.args["min_fed"] = min_fed
        (text, usage, _), (_, short_usage, _) = answer(long), answer(short)
        return svc, text[0], usage[0]["speculative"], short_usage[0]["completion_tokens"]

    svc, text, spec, together = run()
    assert svc.served == dict(alone=1, batched=1, handed_over=0, taken_back=1, largest_batch=2)
    assert text == want
    assert spec["batched_tokens"] == together < 48 and spec["accepted_draft_tokens"] > 0
    assert run(min_fed=1)[1] != want


def test_a_state_space_model_batches_with_its_penalties(service, monkeypatch):
    """mamba2 (no KV layer, so its cache does not say how many tokens it holds):
    waiting requests with a frequency penalty are batched, each answer equal to plain
    decoding with that penalty; every row's logits processors see its prompt once,
    then what it generated (recorded: the history grows by one token a step from the
    prompt's length)."""
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = tiny_hybrid("mamba2", vocab_size=V), word_tokenizer(V, eos=0)
    penalty = {"frequency_penalty": 1.5, "frequency_context_size": 20}
    svc = service(model, tok)
    jobs = submit_together(svc, [(p, penalty) for p in PROMPTS[:3]])
    for p, job in zip(PROMPTS[:3], jobs):
        want = alone(model, tok, p, 16, logits_processors=make_logits_processors(**penalty))[0]
        assert answer(job)[0][0] == want
    assert svc.served["batched"] == 1 and svc.served["largest_batch"] == 3
    histories = {}

    def per_row(**kwargs):
        row = []
        histories[len(histories)] = row
        return [lambda tokens, logits: (row.append(tokens.tolist()), logits)[1]]

    monkeypatch.setattr(replies, "make_logits_processors", per_row)
    for job in submit_together(svc, [(p, penalty) for p in PROMPTS[:3]]):
        answer(job)
    for p, row in zip(PROMPTS[:3], histories.values()):
        assert [h[: len(p)] for h in row] == [p] * len(row)
        assert [len(h) for h in row] == list(range(len(p), len(p) + len(row)))


def plain(model, tok, prompt, n, **kwargs):
    """mlx-lm's own decoding (a plain mlx-lm model): its text and log-probabilities."""
    from mlx_lm import stream_generate as mlx_lm_stream_generate

    rs = list(mlx_lm_stream_generate(model, tok, prompt, max_tokens=n, **kwargs))
    return "".join(r.text for r in rs), [r.logprobs for r in rs]


def lookup_service(service, model, tok, **defaults):
    svc = service(model, tok, draft="ngram", **defaults)
    assert svc.wait_idle(60) and svc.spec_batching
    return svc


def test_with_prompt_lookup_batched_rows_draft_and_equal_plain_decoding(service, monkeypatch):
    """``--draft ngram``: requests waiting together are decoded in one batch whose rows
    draft by prompt lookup (SpecBatch). Each answer and its log-probabilities equal
    plain decoding alone (one row with a repetition penalty), in fewer passes than
    tokens. Control: rows that keep one draft token more than they verified differ."""
    from mlx_lm.sample_utils import make_logits_processors

    from mlx_specstream import batch

    model, tok = tiny_model("llama", vocab_size=V), word_tokenizer(V, eos=0)
    svc = lookup_service(service, model, tok)
    penalty = {"repetition_penalty": 1.5, "repetition_context_size": 4}
    bodies = [{"logprobs": 2, "max_tokens": 24, "num_draft_tokens": 4,
               **(penalty if i == 3 else {})} for i in range(4)]  # fmt: skip
    got = [answer(j) for j in submit_together(svc, list(zip(PROMPTS, bodies)))]
    assert svc.served["batched"] == 1 and svc.served["largest_batch"] == 4
    drafted = 0
    for i, (p, (text, usage, records)) in enumerate(zip(PROMPTS, got)):
        kwargs = {"logits_processors": make_logits_processors(**penalty)} if i == 3 else {}
        want, logprobs = plain(model, tok, p, 24, **kwargs)
        assert text[0] == want
        n, spec = usage[0]["completion_tokens"], usage[0]["speculative"]
        assert n == len(logprobs) == len(records[0])
        for rec, lp in zip(records[0], logprobs):
            assert abs(rec["logprob"] - lp[rec["id"]].item()) < 1e-5
        assert spec["forward_passes"] + spec["accepted_draft_tokens"] == n
        drafted += spec["accepted_draft_tokens"]
    assert drafted > 0, "no row accepted a draft: the test has no power"

    real = batch.accepted
    monkeypatch.setattr(batch, "accepted", lambda d, c: c[: min(len(d), len(real(d, c))) + 1])
    svc = lookup_service(service, model, tok)
    jobs = submit_together(svc, list(zip(PROMPTS, bodies)))
    assert [answer(j)[0][0] for j in jobs] != [plain(model, tok, p, 24)[0] for p in PROMPTS]


def test_with_prompt_lookup_hand_over_and_take_back(service, monkeypatch):
    """A request decoding alone (with prompt lookup) hands its cache to a lookup batch
    when two others arrive, and goes on alone once they are done: every answer
    equals plain decoding."""
    model, tok = tiny_model("llama", vocab_size=V), word_tokenizer(V, eos=0)
    svc = lookup_service(service, model, tok)
    a, others = [3, 4, 5, 3, 4], PROMPTS[1:3]
    got = arrive_while_alone(svc, monkeypatch, a, others, 6)
    assert svc.served == dict(alone=2, batched=1, handed_over=1, taken_back=1, largest_batch=3)
    for p, (text, usage, _), n in zip([a] + others, got, [40, 16, 16]):
        assert text[0] == plain(model, tok, p, n)[0]
    assert 0 < got[0][1][0]["speculative"]["batched_tokens"] < 40 - 6


def test_a_stop_string_inside_accepted_drafts_keeps_a_cache_of_the_answer(service, monkeypatch):
    """A stop string met at the first of three tokens a row got in one pass (drafts
    "t4 t29" accepted, then "t4"): the answer is cut there, and the row's cache, cut
    to the answer's tokens, goes into the LRU. Control: the uncut cache holds a token
    past the answer and is not kept."""
    from mlx_specstream import replies as r

    model, tok = tiny_model("llama", vocab_size=V), word_tokenizer(V, eos=0)
    prompt, stop = [30, 31, 30, 31, 30], "t29 t4 t29 t4"
    body = {"max_tokens": 24, "num_draft_tokens": 4, "stop": [stop]}
    want = plain(model, tok, prompt, 24)[0]
    assert stop in want

    def kept(svc):
        jobs = submit_together(svc, [(prompt, body), (PROMPTS[0], {"max_tokens": 24})])
        text = answer(jobs[0])[0][0]
        assert text == want[: want.index(stop)] and svc.wait_idle(60)
        return [e.key for e in svc.prompt_cache._entries.values() if e.key[:5] == prompt]

    keys = kept(lookup_service(service, model, tok))
    assert len(keys) == 1 and keys[0][:5] == prompt
    # the prompt, then every token the answer generated: up to the stop string's end
    assert [f"t{t}" for t in keys[0][5:]] == (want[: want.index(stop)] + stop).split()
    held_by = r._held_by  # (still cut when a row joins, not when it ends)
    monkeypatch.setattr(
        r, "_held_by", lambda c, seq, short=0: held_by(c, seq, short) if short else c
    )
    assert kept(lookup_service(service, model, tok)) == []


def test_with_prompt_lookup_models_that_cannot_draft_in_a_batch_say_so(service, caplog):
    """A hybrid model (recurrent layers): its batch decodes plainly, with the reason
    logged. Control: without ``--draft ngram`` nothing is logged."""
    model, tok = tiny_hybrid("qwen3_next", vocab_size=V), word_tokenizer(V, eos=0)
    with caplog.at_level(logging.WARNING, logger="mlx_specstream.server"):
        svc = service(model, tok, draft="ngram")
        assert svc.wait_idle(60) and svc.batching and not svc.spec_batching
        plain = service(model, tok)
        assert plain.wait_idle(60) and plain.batching and not plain.spec_batching
    assert [r.message for r in caplog.records] == [
        "requests decoded together do not draft: batch_generate needs a plain key-value cache "
        "in every layer; layer 0 of this model has a ArraysCache (rotating caches that keep "
        "their first tokens, recurrent and state-space layers are not batched speculatively)"
    ]


def test_with_a_draft_model_requests_waiting_together_are_batched(service, monkeypatch):
    """``mlx_lm.server`` serves ``--draft-model`` requests one at a time; these are
    decoded together, every row drafting with the draft model (SpecBatch): answers
    and log-probabilities equal plain decoding, with drafts accepted. A request
    decoding alone hands both models' caches over when others arrive, and the LRU
    keeps both models' caches of a batched answer."""
    model, tok = tiny_model("llama", vocab_size=V), word_tokenizer(V, eos=0)
    draft_model = tiny_model("llama", vocab_size=V)  # (the same weights: drafts accepted)
    svc = service(model, tok, draft_model=draft_model)
    assert svc.wait_idle(60) and svc.spec_batching
    body = {"max_tokens": 24, "logprobs": 1}
    got = [answer(j) for j in submit_together(svc, [(p, body) for p in PROMPTS])]
    assert svc.served["batched"] == 1 and svc.served["largest_batch"] == 4
    for p, (text, usage, records) in zip(PROMPTS, got):
        want, logprobs = plain(model, tok, p, 24)
        assert text[0] == want
        for rec, lp in zip(records[0], logprobs):
            assert abs(rec["logprob"] - lp[rec["id"]].item()) < 1e-5
    assert sum(u[0]["speculative"]["accepted_draft_tokens"] for _, u, _ in got) > 0
    counts = kept_counts(svc)  # (every layer of an entry holds as many tokens)
    assert len(counts) == len(PROMPTS) and all(len(c) == 1 for c in counts)
    got = arrive_while_alone(svc, monkeypatch, [3, 4, 5, 3, 4], PROMPTS[1:3], 6)
    assert svc.served["handed_over"] == 1
    for p, (text, _, _), n in zip([[3, 4, 5, 3, 4]] + PROMPTS[1:3], got, [40, 16, 16]):
        assert text[0] == plain(model, tok, p, n)[0]

    # control: rows' caches taken as they are keep the draft model's layers a token
    # short of the model's (every draft accepted, then the bonus token)
    from mlx_specstream.batch import SpecBatcher

    monkeypatch.setattr(SpecBatcher, "_extract",
                        lambda self, b: [c.extract(b) for c in self.cache + self.draft_cache])  # fmt: skip
    svc = service(model, tok, draft_model=draft_model)
    for j in submit_together(svc, [(p, body) for p in PROMPTS]):
        answer(j)
    assert any(len(counts) > 1 for counts in kept_counts(svc))


def test_requests_with_a_heuristic_draft_schedule_are_decoded_alone(service, monkeypatch):
    """A request's ``draft_schedule`` reaches its generation; ``"heuristic"`` ones are
    decoded one at a time (a batch's rows draft fixed chains), with answers equal to plain
    decoding; the server's default applies to a request that names none; a bad value is
    refused, naming the field. Control: the same requests without it are batched."""
    import importlib

    from mlx_specstream.openai_api import RequestError

    gen_mod = importlib.import_module("mlx_specstream.generate")  # (the module, not the function)

    model, tok = tiny_model("llama", vocab_size=V), word_tokenizer(V, eos=0)
    draft_model = tiny_model("llama", vocab_size=V, seed=5)
    given, real = [], gen_mod.spec_generate_step
    monkeypatch.setattr(gen_mod, "spec_generate_step",
                        lambda *a, **k: given.append(k.get("draft_schedule")) or real(*a, **k))  # fmt: skip
    for body, batched in (({"draft_schedule": "heuristic"}, 0), ({}, 1)):
        svc = service(model, tok, draft_model=draft_model)
        assert svc.wait_idle(60) and svc.spec_batching
        got = [answer(j) for j in submit_together(svc, [(p, body) for p in PROMPTS])]
        assert svc.served["batched"] == batched
        for p, (text, _, _) in zip(PROMPTS, got):
            assert text[0] == alone(model, tok, p, 16)[0]
    assert given.count("heuristic") == len(PROMPTS)
    svc = service(model, tok, draft_model=draft_model, draft_schedule="heuristic")
    assert parse_generation_args({}, svc.defaults)["draft_schedule"] == "heuristic"
    assert parse_generation_args({"draft_schedule": None}, svc.defaults)["draft_schedule"] is None
    with pytest.raises(RequestError, match="'draft_schedule'='fast' must be null or one of"):
        parse_generation_args({"draft_schedule": "fast"}, svc.defaults)


def kept_counts(svc):
    """The tokens each layer of each LRU entry holds (model's layers, then the draft
    model's), as a set of distinct counts per entry."""
    assert svc.wait_idle(60)
    return {tuple(sorted({c.offset for c in e.cache})) for e in svc.prompt_cache._entries.values()}


def test_a_stream_model_batches_rows_that_draft_with_its_streams(service, monkeypatch):
    """A model whose lossless-mode streams draft on this device: requests waiting
    together are decoded in one batch whose rows draft with the streams (and one row
    by prompt lookup, as its request asks): answers and log-probabilities equal
    plain decoding, with drafts accepted. Control: rows that keep one draft token
    more than they verified differ."""
    from mlx_specstream import batch

    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, tree_depth=3,
                            stream_lora_rank=4)  # fmt: skip
    tok = word_tokenizer(V, eos=0)
    svc = service(model, tok)
    assert svc.wait_idle(60) and svc.spec_batching and svc.stream_batching
    bodies = [{"max_tokens": 24, "logprobs": 1, **({"draft": "ngram"} if i == 3 else {})}
              for i in range(4)]  # fmt: skip
    rows = []
    insert = batch.SpecBatcher.insert
    monkeypatch.setattr(batch.SpecBatcher, "insert",
                        lambda self, *a, **k: rows.append(k["draft"]) or insert(self, *a, **k))  # fmt: skip
    got = [answer(j) for j in submit_together(svc, list(zip(PROMPTS, bodies)))]
    assert svc.served["largest_batch"] == 4 and sorted(rows[:4]) == ["ngram"] + ["streams"] * 3
    for p, (text, usage, records) in zip(PROMPTS, got):
        want, logprobs = plain(model, tok, p, 24)
        assert text[0] == want
        for rec, lp in zip(records[0], logprobs):
            assert abs(rec["logprob"] - lp[rec["id"]].item()) < 1e-5
    assert sum(u[0]["speculative"]["accepted_draft_tokens"] for _, u, _ in got[:3]) > 0

    real, on_device = batch.accepted, batch.accepted_on_device
    monkeypatch.setattr(batch, "accepted", lambda d, c: c[: min(len(d), len(real(d, c))) + 1])
    monkeypatch.setattr(batch, "accepted_on_device",  # (the pipelined passes' verifier)
                        lambda i, c, d: mx.minimum(on_device(i, c, d) + 1, d))  # fmt: skip
    svc = service(model, tok)
    jobs = submit_together(svc, [(p, {"max_tokens": 24}) for p in PROMPTS])
    assert [answer(j)[0][0] for j in jobs] != [plain(model, tok, p, 24)[0] for p in PROMPTS]


def test_streams_that_do_not_draft_in_a_batch_say_so(service, caplog):
    """Streams tuned off on this device (``tree_depth`` 0): the batch decodes plainly,
    and the log says why."""
    tok = word_tokenizer(V, eos=0)
    off = tiny_spec_model("llama", vocab_size=V, num_streams=3, tree_depth=0)
    with caplog.at_level(logging.WARNING, logger="mlx_specstream.server"):
        svc = service(off, tok)
        assert svc.wait_idle(60) and svc.batching and not svc.spec_batching
    assert [r.message for r in caplog.records] == [
        "requests decoded together do not draft: the streams' tuning on this device has them off"
    ]


@pytest.mark.parametrize("tuned", ["streams", "ngram", None])
def test_the_batch_tuning_decides_how_rows_draft(service, monkeypatch, caplog, tuned):
    """A stream model whose streams draft alone on this device (``tree_depth`` 3) but
    whose tuning for batches (the config's ``batch``) chose the streams' chain of 2
    through the split pass unpipelined, lookup of 3 pipelined, or no drafts: the
    server's batch rows draft so, but for a request that names its draft; answers
    equal plain decoding."""
    from mlx_specstream import batch

    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, tree_depth=3,
                            stream_lora_rank=4)  # fmt: skip
    n = {"streams": 2, "ngram": 3, None: 0}[tuned]
    pipelined = tuned == "ngram"  # (lookup rows pipelined here only as tuned so)
    model.speculative_streams.config.batch = dict(draft=tuned, num_draft_tokens=n,
                                                  stream_pass="split", rows=4,
                                                  pipeline=pipelined)  # fmt: skip
    tok = word_tokenizer(V, eos=0)
    with caplog.at_level(logging.INFO, logger="mlx_specstream.server"):
        svc = service(model, tok)
        assert svc.wait_idle(60) and svc.batching
    assert svc.spec_batching == (tuned is not None)
    assert svc.stream_batching == (tuned == "streams")
    messages = [r.message for r in caplog.records if r.name == "mlx_specstream.server"]
    if tuned is None:
        assert messages == [
            "requests decoded together do not draft: the streams' tuning for batches has them off"
        ]
    else:
        source = {"streams": "the streams' chain of 2", "ngram": "prompt lookup of 3"}[tuned]
        assert messages == [f"requests decoded together draft with {source} tokens, as tuned "
                            "for batches of 4 on this device"]  # fmt: skip
    rows = []
    insert = batch.SpecBatcher.insert

    def record(self, *a, **k):
        rows.append((k["draft"], k["num_draft_tokens"], self.streams is not None, self.fused,
                     self.pipeline, self.drafts_on_device))  # fmt: skip
        return insert(self, *a, **k)

    monkeypatch.setattr(batch.SpecBatcher, "insert", record)
    bodies = [{"max_tokens": 20, **({"draft": "ngram"} if i == 3 else {})} for i in range(4)]
    got = [answer(j) for j in submit_together(svc, list(zip(PROMPTS, bodies)))]
    assert svc.served["largest_batch"] == 4
    if tuned is not None:
        streams = tuned == "streams"  # (through the tuned split pass)
        assert rows[:3] == [(tuned, n, streams, False, pipelined, pipelined)] * 3
        # (its own draft, lookup's default)
        assert rows[3] == ("ngram", 10, streams, False, pipelined, pipelined)
    for p, (text, _, _) in zip(PROMPTS, got):
        assert text[0] == plain(model, tok, p, 20)[0]


def test_a_shared_mode_model_batches_with_its_streams_in_every_pass(service):
    """A shared-mode model's main rows read their streams, so mlx-lm's batch would decode
    another model: its rows carry them in every pass (SpecBatch), and every answer
    equals the model's own decoding alone, with drafts accepted. With a draft model
    its requests are served one at a time, and the log says why."""
    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, mode="shared", tree_depth=3)
    tok = word_tokenizer(V, eos=0)
    svc = service(model, tok)
    assert svc.wait_idle(60) and svc.spec_batching and svc.stream_batching
    got = [answer(j) for j in submit_together(svc, [(p, {"max_tokens": 24}) for p in PROMPTS])]
    assert svc.served["largest_batch"] == 4
    for p, (text, _, _) in zip(PROMPTS, got):
        assert text[0] == alone(model, tok, p, 24)[0]  # (speculative=False: with its streams)
    assert sum(u[0]["speculative"]["accepted_draft_tokens"] for _, u, _ in got) > 0
    svc = service(model, tok, draft_model=tiny_model("llama", vocab_size=V))
    assert svc.wait_idle(60) and not svc.batching


def test_with_a_draft_model_a_request_asking_for_lookup_merges_it(service, monkeypatch):
    """``--draft-model`` and a request's ``"draft": "ngram"``: its row drafts its lookup
    chain where it matches, else the draft model's (as the server's requests alone merge
    them); every answer equals plain decoding."""
    from mlx_specstream import batch

    model, tok = tiny_model("llama", vocab_size=V), word_tokenizer(V, eos=0)
    svc = service(model, tok, draft_model=tiny_model("llama", vocab_size=V, seed=3))
    assert svc.wait_idle(60) and svc.spec_batching
    rows, insert = [], batch.SpecBatcher.insert
    monkeypatch.setattr(batch.SpecBatcher, "insert",
                        lambda self, *a, **k: rows.append(k["draft"]) or insert(self, *a, **k))  # fmt: skip
    repeat = [p * 3 for p in PROMPTS]
    bodies = [{"max_tokens": 24, **({"draft": "ngram"} if i % 2 else {})} for i in range(4)]
    got = [answer(j) for j in submit_together(svc, list(zip(repeat, bodies)))]
    assert svc.served["largest_batch"] == 4
    assert sorted(rows[:4]) == ["draft_model"] * 2 + ["draft_model+ngram"] * 2
    for p, (text, _, _) in zip(repeat, got):
        assert text[0] == plain(model, tok, p, 24)[0]


def assert_served_alone_like_mlx_lm(model, tok):
    """``--draft ngram`` on a model whose rows are not batched speculatively: requests
    waiting together, then a follow-up reusing the prompt cache, each answer equal to
    mlx-lm's plain decoding (served as mlx-lm's batches serve them, or one at a time)."""
    from mlx_lm import stream_generate as mlx_lm_stream_generate

    from mlx_specstream.server import make_server, service_of

    prompts = [[3, 4, 5, 3, 4, 5, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [20], [30, 31] * 5]
    prompts.append(prompts[0] + [1, 2])  # (a follow-up: its start is in the prompt cache)

    def plain(p):
        return "".join(r.text for r in mlx_lm_stream_generate(model, tok, p, max_tokens=30))

    server = make_server(model, tok, "tiny", port=0, draft="ngram")
    try:
        svc = service_of(server)
        assert svc.wait_idle(60) and not svc.spec_batching
        body = {"max_tokens": 30, "num_draft_tokens": 3}
        jobs = submit_together(svc, [(p, body) for p in prompts[:4]])
        assert [answer(j)[0][0] for j in jobs] == [plain(p) for p in prompts[:4]]
        assert answer(submit(svc, prompts[4], **body))[0][0] == plain(prompts[4])
    finally:
        server.server_close()

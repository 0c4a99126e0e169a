"""``draft_confidence`` on the model's own drafters' chains (transformers'
``assistant_confidence_threshold``, which cuts only a draft model's): each chain stops after
a draft its drafter gives less than the threshold, whether its levels come from one pass
(lossless streams, Medusa heads) or one after another (an MTP layer, EAGLE-3's drafter,
which then draft no further), on attention models (:class:`~mlx_specstream.decode.Decoder`)
and on hybrids (:class:`~mlx_specstream.recurrent.DrafterChains`,
:class:`~mlx_specstream.recurrent.StreamDrafts`). Greedy output equals plain decoding; each
verified chain is as long as its drafter's probabilities say; drawn chains keep the
distribution; the server takes a request's ``draft_confidence``; settings no chain takes are
refused."""

import pytest
from eagle_helpers import write_base, write_eagle
from helpers import plain_greedy, spec_tokens, stream_hybrid, tiny_spec_model
from mlx_lm.utils import load as mlx_lm_load
from test_drafter_chains import plain, run
from test_mtp import write_checkpoint

import mlx_specstream.decode as decode
import mlx_specstream.draft_confidence as draft_confidence
import mlx_specstream.drafters as drafters
import mlx_specstream.recurrent as recurrent
from mlx_specstream import load

PROMPT = [1, 5, 9, 3, 7, 2, 11, 4, 6]
LEVELS = 3


def own_model(kind, tmp_path):
    """``(model, plain model, tree settings of a chain of LEVELS)`` for ``kind``."""
    chain = dict(tree_top_k=1, tree_depth=LEVELS)
    if kind == "streams":
        model = tiny_spec_model("llama", num_streams=LEVELS)
        return model, model, chain
    if kind == "mtp":
        write_checkpoint(tmp_path / "mtp", "mimo", seed=3)
        return load(str(tmp_path / "mtp"))[0], mlx_lm_load(str(tmp_path / "mtp"))[0], chain
    if kind in ("medusa", "parallelspec"):  # (levels from one pass: the heads', its layer's)
        from test_drafters import drafter_model

        model = drafter_model(kind, num_draft_tokens=LEVELS)
        return model, model, chain
    base = write_base(tmp_path / "base")
    write_eagle(tmp_path / "eagle", layer_ids=[0, 3, 6])
    model, _ = load(str(base), drafter=str(tmp_path / "eagle"))
    return model, mlx_lm_load(str(base))[0], chain


def watch_cuts(m, module, sink):
    """``sink(top probabilities, levels kept)`` for every chain cut: by
    ``module.confident_levels``, and where a drafter that drafts level by level cut its own
    chain (``Decoder._cut`` and ``DrafterChains._cut`` then read no probabilities: the kept
    levels' are recomputed here from its logits)."""
    real = draft_confidence.confident_levels

    def cut(top, confidence):
        kept = real(top, confidence)
        sink(list(top), kept)
        return kept

    m.setattr(module, "confident_levels", cut)
    top = draft_confidence.top_probabilities
    if module is decode:
        real_cut = decode.Decoder._cut

        def own_cut(self, slog, drafted=None):
            out = real_cut(self, slog, drafted)
            if drafted is not None:
                sink(top(slog[:drafted]).tolist(), drafted)
            return out

        m.setattr(decode.Decoder, "_cut", own_cut)
    else:
        real_chain_cut = recurrent.DrafterChains._cut

        def chain_cut(self, logits):
            out = real_chain_cut(self, logits)
            if self.confidence is not None and out is logits:  # (cut by the drafter)
                sink(top(out).tolist(), out.shape[0])
            return out

        m.setattr(recurrent.DrafterChains, "_cut", chain_cut)


def recorded(monkeypatch, module, runs):
    """Events in order: ``("cut", top probabilities, levels kept)`` for every chain cut
    (:func:`watch_cuts`), ``("chain", drafts)`` for every chain verified (``runs``: a
    patcher of the verifying call that reports its drafts' count)."""
    events = []
    watch_cuts(monkeypatch, module, lambda top, kept: events.append(("cut", top, kept)))
    runs(lambda n: events.append(("chain", n)))
    return events


def decoder_chains(monkeypatch):
    def patch(report):
        real = decode.Decoder.launch
        monkeypatch.setattr(decode.Decoder, "launch",
                            lambda self, d, after=None: report(len(d.layout) - 1)
                            or real(self, d, after))  # fmt: skip

    return patch


def hybrid_chains(monkeypatch):
    def patch(report):
        real = recurrent.ChainCache.run
        monkeypatch.setattr(recurrent.ChainCache, "run",
                            lambda self, drafts, parents=None: report(len(drafts))
                            or real(self, drafts, parents))  # fmt: skip

    return patch


def assert_chains_follow_the_cuts(events, confidence, tail=3):
    """Each cut keeps the levels up to its first below ``confidence`` (or all ``LEVELS``;
    a drafter that drafts level by level drafted no further), and the chain verified next
    is exactly that long (but near ``max_tokens``, the last ``tail`` chains, which may be
    shorter); some chains are cut short, some are longer than one."""
    pairs = [(e, f) for e, f in zip(events, events[1:]) if e[0] == "cut" and f[0] == "chain"]
    assert len(pairs) > 4
    for (_, top, kept), (_, n) in pairs[:-tail]:
        sure = [p >= confidence for p in top[:kept]]
        assert all(sure[:-1]) and (kept == LEVELS or not sure[-1]), (top, kept)
        assert n == kept, (top, kept, n)
    assert any(k < LEVELS for _, _, k in (e for e, _ in pairs))
    assert any(k > 1 for _, _, k in (e for e, _ in pairs))


def middle_confidence(model, module, monkeypatch, **kwargs):
    """A threshold that cuts some chains and not others: the median of the drafter's top
    probabilities over a run whose threshold cuts nothing."""
    tops = []
    with monkeypatch.context() as m:
        watch_cuts(m, module, lambda top, kept: tops.extend(top))
        spec_tokens(model, PROMPT, 32, draft_confidence=1e-9, **kwargs)
    tops.sort()
    return tops[len(tops) // 2]


@pytest.mark.parametrize("kind", ["streams", "medusa", "parallelspec", "mtp", "eagle3"])
def test_own_chains_stop_where_the_drafter_is_unsure_and_output_is_plain(kind, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """Streams, Medusa heads and ParallelSpec (levels from one pass), an MTP layer and an
    EAGLE-3 drafter (levels one after another), greedy: output equals plain decoding, and
    every verified chain is as long as its drafter's probabilities say."""
    model, base, chain = own_model(kind, tmp_path)
    want = plain_greedy(base, PROMPT, 40)
    c = middle_confidence(model, decode, monkeypatch, **chain)
    events = recorded(monkeypatch, decode, decoder_chains(monkeypatch))
    got, _ = spec_tokens(model, PROMPT, 40, draft_confidence=c, **chain)
    assert got == want
    assert_chains_follow_the_cuts(events, c)


def test_negative_control_a_decoder_that_ignores_the_cut_fails_the_check(tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """Control for the check above: a decoder that verifies the whole chain whatever the
    cut (``drafted`` dropped) fails it."""
    model, _, chain = own_model("streams", tmp_path)
    c = middle_confidence(model, decode, monkeypatch, **chain)
    events = recorded(monkeypatch, decode, decoder_chains(monkeypatch))
    real = decode.Decoder._next_draft

    def uncut(self, *args):
        self.drafted = None
        return real(self, *args)

    monkeypatch.setattr(decode.Decoder, "_next_draft", uncut)
    spec_tokens(model, PROMPT, 40, draft_confidence=c, **chain)
    with pytest.raises(AssertionError):
        assert_chains_follow_the_cuts(events, c)


@pytest.mark.parametrize("kind", ["mtp", "eagle3"])
def test_level_by_level_drafters_draft_no_further(kind, tmp_path, monkeypatch):
    """An MTP layer's and an EAGLE-3 drafter's chains stop drafting at an unsure level:
    fewer runs of the layer on its own output than fixed chains take, the same without a
    threshold."""
    model, _, chain = own_model(kind, tmp_path)
    c = middle_confidence(model, decode, monkeypatch, **chain)
    runs, real = [], drafters.levels_again

    def counted(rt, depth, logits, out, cache, n, confidence=None):
        ran = real(rt, depth, logits, out, cache, n, confidence)
        runs.append(ran)
        return ran

    target = "mlx_specstream.mtp" if kind == "mtp" else "mlx_specstream.eagle"
    monkeypatch.setattr(f"{target}.levels_again", counted)
    counts = {}
    for confidence in (None, c):
        runs.clear()
        spec_tokens(model, PROMPT, 40, draft_confidence=confidence, **chain)
        counts[confidence] = sum(runs)
    assert counts[c] < counts[None]


@pytest.mark.parametrize("kind", ["mtp", "streams"])
def test_hybrid_chains_stop_where_the_drafter_is_unsure(kind, tmp_path, monkeypatch):
    """On a hybrid (chains verified through its own passes): Qwen3-Next's MTP layer
    (:class:`~mlx_specstream.recurrent.DrafterChains`) and lossless streams
    (:class:`~mlx_specstream.recurrent.StreamDrafts`): output equals mlx-lm's, and every
    verified chain is as long as the drafter's probabilities say."""
    if kind == "mtp":
        write_checkpoint(tmp_path / "next", "qwen3_next", seed=3)
        model, base = load(str(tmp_path / "next"))[0], mlx_lm_load(str(tmp_path / "next"))[0]
        kwargs = dict(num_draft_tokens=LEVELS)
    else:
        model = stream_hybrid("qwen3_next", vocab_size=32)
        base, kwargs = model, dict(tree_top_k=1)  # (its config's tree: top-3)
    want = plain(base, PROMPT, 40)
    tops = []
    with monkeypatch.context() as m:
        watch_cuts(m, recurrent, lambda top, kept: tops.extend(top))
        run(model, PROMPT, 40, draft_confidence=1e-9, **kwargs)
    c = sorted(tops)[len(tops) // 2]
    events = recorded(monkeypatch, recurrent, hybrid_chains(monkeypatch))
    got, _ = run(model, PROMPT, 40, draft_confidence=c, **kwargs)
    assert got == want
    assert_chains_follow_the_cuts(events, c)


@pytest.mark.parametrize("kind", ["mtp", "hybrid streams"])
def test_drawn_chains_keep_the_distribution(kind, tmp_path, monkeypatch):
    """Rejection sampling over drawn chains cut by the drafter's confidence keeps the
    model's distribution (chi-square): an MTP layer's on an attention model (some chains
    cut after one level, some not), the streams' on a hybrid (their one chain in three
    tokens, drafted after the prompt, cut after one level)."""
    from chi_square import chi_square_pvalue
    from test_sampling import exact_distribution, sample_counts

    from mlx_specstream.sample_utils import make_sampler

    if kind == "mtp":
        write_checkpoint(tmp_path / "ckpt", "mimo", seed=5, vocab_size=6, weight_scale=1.0,
                         num_hidden_layers=2)  # fmt: skip
        model, module = load(str(tmp_path / "ckpt"))[0], decode
        kwargs, confidence = dict(tree_top_k=1, tree_depth=2), 0.5  # (its median: 0.56)
    else:
        model, module = stream_hybrid("qwen3_next", vocab_size=6), recurrent
        kwargs, confidence = dict(tree_top_k=1), 0.3  # (its first level's: 0.28)
    kept = []
    watch_cuts(monkeypatch, module, lambda top, k: kept.append(k))
    sampler, n = make_sampler(temp=1.0), 1000
    counts = sample_counts(model, sampler, n, acceptance="rejection",
                           draft_confidence=confidence, **kwargs)  # fmt: skip
    p = chi_square_pvalue(counts, exact_distribution(model, sampler), n)
    assert p > 1e-3, f"chi-square p = {p:.2e}"
    assert 1 in kept and (kind != "mtp" or max(kept) > 1)


def test_settings_no_chain_takes_are_refused(tmp_path):
    """A tree (tree_top_k > 1), a grown tree, prompt lookup alone, no drafts (tree_depth 0)
    and pipelined steps, on an attention model and on a hybrid, each refused with the
    reason."""
    model, _, _ = own_model("mtp", tmp_path)
    cases = [
        (dict(tree_top_k=2), "this call drafts a tree 2 wide"),
        (dict(tree_top_k=2, dynamic_tree=True), "dynamic_tree grows a tree"),
        (dict(draft="ngram"), "prompt lookup's drafts .draft='ngram'. are the text's own"),
        (dict(tree_depth=0), "this call drafts none .tree_depth 0"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            spec_tokens(model, PROMPT, 4, draft_confidence=0.4, **kwargs)
    streams, _, chain = own_model("streams", tmp_path)  # (pipelined where not cut)
    with pytest.raises(ValueError, match="pipeline=True: draft_confidence reads"):
        spec_tokens(streams, PROMPT, 4, draft_confidence=0.4, pipeline=True, **chain)
    write_checkpoint(tmp_path / "next", "qwen3_next", seed=3)
    hybrid = load(str(tmp_path / "next"))[0]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            run(hybrid, PROMPT, 4, draft_confidence=0.4, max_tree_nodes=8, **kwargs)


def test_the_server_takes_a_request_s_draft_confidence(monkeypatch):
    """A request's ``draft_confidence`` reaches its decoding (output equal to plain
    decoding) and the request is decoded alone while the others batch; a value outside
    [0, 1) is refused, naming the field."""
    from test_server_batching import PROMPTS, alone, answer, submit_together

    from helpers import word_tokenizer

    from mlx_specstream.openai_api import RequestError, parse_generation_args
    from mlx_specstream.server import make_server, service_of

    model = tiny_spec_model("llama", num_streams=3, top_k=1, tree_depth=3)
    tok = word_tokenizer(64)
    given, real = [], decode.spec_generate_step

    def recording(*args, **kwargs):
        given.append(kwargs.get("draft_confidence"))
        return real(*args, **kwargs)

    import importlib

    monkeypatch.setattr(importlib.import_module("mlx_specstream.generate"), "spec_generate_step",
                        recording)  # fmt: skip
    server = make_server(model, tok, "tiny", port=0)
    try:
        svc = service_of(server)
        requests = [(PROMPTS[0], {"draft_confidence": 0.3})] + [(p, {}) for p in PROMPTS[1:3]]
        jobs = submit_together(svc, requests)
        for (p, _), job in zip(requests, jobs):
            assert answer(job)[0][0] == alone(model, tok, p, 16)[0]
        assert 0.3 in given and svc.served["alone"] >= 1
        for bad in (-0.1, 1, 1.5, "0.4", True):
            with pytest.raises(RequestError, match="draft_confidence"):
                parse_generation_args({"draft_confidence": bad}, svc.defaults)
    finally:
        server.server_close()


def test_the_tuner_times_cut_chains_and_stores_the_fastest(tmp_path, monkeypatch):
    """The tuner times the deepest chain cut at each of its thresholds (every other trial
    uncut, whatever an earlier tuning stored: ``draft_confidence=0``), stores the fastest,
    and prints its flags."""
    import json

    from helpers import word_tokenizer
    from test_tune import fake_speeds, saved_config

    from mlx_specstream import tune
    from mlx_specstream.config import SpecStreamConfig

    model = tiny_spec_model("llama", vocab_size=16, num_streams=3, top_k=2, prune_adapter_rank=0,
                            draft_confidence=0.9)  # fmt: skip
    tokenizer = word_tokenizer(16, eos=15)
    fast = lambda tps, s: 1e6 if s.get("draft_confidence") == 0.4 else tps  # noqa: E731
    measured = fake_speeds(monkeypatch, fast)
    choice, _, _ = tune.tune(model, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None)
    cut = [m for m in measured if m.get("draft_confidence")]
    assert sorted({m["draft_confidence"] for m in cut}) == sorted(tune.DRAFT_CONFIDENCES)
    assert all(m["tree_top_k"] == 1 and m["tree_depth"] == 3 for m in cut)
    assert all(m["draft_confidence"] == 0 for m in measured if not m.get("draft_confidence"))
    assert choice["draft_confidence"] == 0.4 and choice["tree_top_k"] == 1
    config = {"model_type": "llama", "speculative_streaming": SpecStreamConfig().to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert tune.save_choice(tmp_path, choice)["draft_confidence"] == 0.4
    assert saved_config(tmp_path).draft_confidence == 0.4
    assert tune.choice_flags(choice).endswith("--tree-depth 3 --max-tree-nodes 4 "
                                              "--draft-confidence 0.4")  # fmt: skip


def test_a_tuned_draft_confidence_cuts_the_chains_of_a_call_that_names_none(tmp_path,
                                                                           monkeypatch):  # fmt: skip
    """A config's ``draft_confidence`` (as the tuner stores it) cuts a call's chains where
    the call names none, as if it had: on an attention model and on a hybrid's MTP
    layer; ``draft_confidence=0`` drafts them uncut; a call's tree is not refused (the
    stored cut is for chains); a stored value outside (0, 1) is refused, naming it."""
    from dataclasses import replace

    from mlx_specstream.config import DrafterConfig, SpecStreamConfig
    from mlx_specstream.streams import get_runtime

    chain = dict(num_streams=3, top_k=1, tree_depth=3)
    c = middle_confidence(tiny_spec_model("llama", **chain), decode, monkeypatch)
    model = tiny_spec_model("llama", draft_confidence=c, **chain)
    want = plain_greedy(model, PROMPT, 40)
    events = recorded(monkeypatch, decode, decoder_chains(monkeypatch))
    assert spec_tokens(model, PROMPT, 40)[0] == want
    assert_chains_follow_the_cuts(events, c)
    events.clear()
    assert spec_tokens(model, PROMPT, 40, draft_confidence=0)[0] == want
    assert events and not [e for e in events if e[0] == "cut"]
    assert spec_tokens(model, PROMPT, 40, tree_top_k=2)[0] == want

    write_checkpoint(tmp_path / "next", "qwen3_next", seed=3)
    hybrid, base = load(str(tmp_path / "next"))[0], mlx_lm_load(str(tmp_path / "next"))[0]
    rt = get_runtime(hybrid)
    tops = []
    with monkeypatch.context() as m:
        watch_cuts(m, recurrent, lambda top, kept: tops.extend(top))
        run(hybrid, PROMPT, 40, draft_confidence=1e-9, num_draft_tokens=LEVELS)
    c = sorted(tops)[len(tops) // 2]
    rt.config = replace(rt.config, draft_confidence=c)
    events = recorded(monkeypatch, recurrent, hybrid_chains(monkeypatch))
    assert run(hybrid, PROMPT, 40, num_draft_tokens=LEVELS)[0] == plain(base, PROMPT, 40)
    assert_chains_follow_the_cuts(events, c)
    for section in (SpecStreamConfig, DrafterConfig):
        for bad in (0, 1.5, True):
            with pytest.raises(ValueError, match=r"\.draft_confidence=.*must be"):
                section(draft_confidence=bad)


def test_the_generate_cli_cuts_the_model_s_own_chains(capsys, monkeypatch):
    """``--draft-confidence`` without a draft model reaches the embedded model's own chains
    (its streams' chain of 3 cut; output identical to plain decoding); ``0`` is passed on
    as uncut."""
    import importlib

    gen_mod = importlib.import_module("mlx_specstream.generate")
    given, cuts, real = [], [], decode.spec_generate_step

    def recording(*args, **kwargs):
        given.append(kwargs.get("draft_confidence"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gen_mod, "spec_generate_step", recording)
    watch_cuts(monkeypatch, decode, lambda top, kept: cuts.append(kept))
    counts = []
    for value in ("0.4", "0"):
        given.clear()
        argv = ["--prompt", "def add(a, b):", "--max-tokens", "24", "--compare-plain",
                "--tree-top-k", "1", "--tree-depth", "3", "--draft-confidence", value]  # fmt: skip
        gen_mod.main(argv)
        assert "Output identical to plain decoding: yes" in capsys.readouterr().out
        assert given and set(given) == {float(value)}
        counts.append(len(cuts))
    assert counts[0] > 0 and counts[1] == counts[0]  # (the uncut run cut nothing)


def test_the_module_s_examples_golden():
    """:mod:`mlx_specstream.draft_confidence`'s docstring examples (the cut, the refusals,
    the threshold a call gets) and the range check's
    (:func:`mlx_specstream.config.confidence_fault`) hold."""
    import doctest

    from mlx_specstream import config

    results = doctest.testmod(draft_confidence)
    assert results.failed == 0 and results.attempted >= 7
    results = doctest.testmod(config)
    assert results.failed == 0 and results.attempted >= 1

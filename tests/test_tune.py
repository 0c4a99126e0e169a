"""The tuner measures both lossless stream passes and prompt lookup, and stores
the fastest; a call that names no draft source uses the stored one."""

import json

import pytest
from helpers import plain_greedy, spec_tokens, tiny_spec_model, word_tokenizer

from mlx_specstream import tune
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.precision import device_key


def saved_config(model_dir, device=None):
    """The stored section of ``model_dir/config.json`` as a config, with the
    settings tuned on ``device`` (default: this one) applied."""
    section = json.loads((model_dir / "config.json").read_text())["speculative_streaming"]
    return SpecStreamConfig.from_dict(section).for_device(device or device_key())


def fake_speeds(monkeypatch, speed):
    """Makes the tuner's measurements run for real but report ``speed(tps, settings)``
    (timing noise cannot decide a test); returns the list of measured settings."""
    measured, real = [], tune.tokens_per_second

    def fake(model, tokenizer, prompts, max_tokens, stream_pass=None, **settings):
        tps, tau = real(model, tokenizer, prompts, max_tokens, stream_pass=stream_pass, **settings)
        measured.append(dict(settings, stream_pass=stream_pass))
        return speed(tps, measured[-1]), tau

    monkeypatch.setattr(tune, "tokens_per_second", fake)
    return measured


def test_tune_measures_fused_and_split_and_saves_the_choice(tmp_path, monkeypatch):
    model = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2, prune_adapter_rank=0)
    tokenizer = word_tokenizer(16, eos=15)

    def speed(tps, settings):
        if settings.get("draft", "streams") != "streams":  # prompt lookup: its own test below
            return 1.0
        # Top-2 trees lead the fused grid (so split is measured on them) and
        # split wins there: the choice must carry it.
        if settings.get("tree_top_k") == 2 and settings["stream_pass"] is not None:
            return 1e6 if settings["stream_pass"] == "split" else 1e5
        return tps

    measured = fake_speeds(monkeypatch, speed)
    choice, _, _ = tune.tune(model, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None)
    assert {"fused", "split"} <= {m["stream_pass"] for m in measured}
    assert choice["stream_pass"] == "split" and choice["tree_top_k"] == 2

    config = {"model_type": "llama", "speculative_streaming": SpecStreamConfig().to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    entry = tune.save_choice(tmp_path, choice)
    assert saved_config(tmp_path).stream_pass == "split" == entry["stream_pass"]
    assert saved_config(tmp_path, "gpu:elsewhere").stream_pass == "fused"  # (only here)
    assert (tmp_path / "config.json.before-tune").exists()


def test_tune_measures_prompt_lookup_and_saves_it(tmp_path, monkeypatch):
    model = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2, prune_adapter_rank=0)
    tokenizer = word_tokenizer(16, eos=15)
    measured = fake_speeds(monkeypatch, lambda tps, s: 1e6 if s.get("draft") == "ngram" else tps)
    choice, _, _ = tune.tune(model, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None)
    assert {"streams", "ngram", "streams+ngram"} <= {m.get("draft") for m in measured}
    assert choice == {"draft": "ngram"}

    before = SpecStreamConfig(tree_depth=2, top_k=3).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"speculative_streaming": before}))
    tune.save_choice(tmp_path, choice)
    saved = json.loads((tmp_path / "config.json").read_text())["speculative_streaming"]
    assert saved == dict(before, tuned={device_key(): {"draft": "ngram"}})
    # The tree settings stay the model's own.
    assert saved_config(tmp_path).to_dict() == SpecStreamConfig.from_dict(saved).to_dict()
    resolved = saved_config(tmp_path)
    assert (resolved.draft, resolved.tree_depth, resolved.top_k) == ("ngram", 2, 3)
    # A later tuning that picks a tree drops the stored draft source again.
    tune.save_choice(tmp_path, dict(tree_depth=1, tree_top_k=2, max_tree_nodes=4,
                                    prune_threshold=0.0, draft="streams"))  # fmt: skip
    resolved = saved_config(tmp_path)
    assert resolved.draft is None and resolved.tree_depth == 1


PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4, 1, 5]


def test_the_configured_draft_source_is_the_default():
    """A model whose config names ``draft: "ngram"`` decodes with prompt lookup when
    the call names no source, and with its streams when it names ``"streams"``;
    both equal plain decoding."""
    model = tiny_spec_model("llama", vocab_size=8, num_streams=2, top_k=2, draft="ngram")
    default = spec_tokens(model, PROMPT, 24)
    lookup = spec_tokens(model, PROMPT, 24, draft="ngram")
    streams = spec_tokens(model, PROMPT, 24, draft="streams")
    want = plain_greedy(model, PROMPT, 24)
    assert default[0] == lookup[0] == streams[0] == want
    passes = [[r[3] for r in out[1]] for out in (default, lookup, streams)]
    assert passes[0] == passes[1]
    assert passes[0] != passes[2]  # (control: the two sources step differently here)
    model.speculative_streams.config.draft = None
    assert [r[3] for r in spec_tokens(model, PROMPT, 24)[1]] == passes[2]


def test_bad_configured_draft_source():
    with pytest.raises(ValueError, match="speculative_streaming.draft='bigram'"):
        SpecStreamConfig(draft="bigram")


def test_tune_a_plain_mlx_lm_model_measures_lookup_lengths_and_writes_nothing(
    tmp_path, monkeypatch, capsys
):
    """A plain mlx-lm model gets prompt lookup at several draft lengths, and several
    drafts per tree; the tuner reports the fastest and never writes into the model's
    files (``--save`` keeps the flags in the user's store: tests/test_tuned_store.py)."""
    from test_train import write_base

    base = write_base(tmp_path / "plain")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": " ".join(f"t{i % 5}" for i in range(24))}) + "\n")
    files = {f.name: f.read_bytes() for f in base.iterdir()}
    measured = fake_speeds(
        monkeypatch, lambda tps, s: 1e6 if s.get("num_draft_tokens") == 4 else 1.0
    )
    args = ["--model", str(base), "--prompts", str(prompts), "--max-tokens", "8"]
    tune.main(args)
    out = capsys.readouterr().out
    assert set(tune.LOOKUP_LENGTHS) <= {m.get("num_draft_tokens") for m in measured}
    assert set(tune.LOOKUP_CANDIDATES) <= {m.get("ngram_candidates") for m in measured}
    assert "Best: --draft ngram --num-draft-tokens 4" in out
    measured = fake_speeds(
        monkeypatch, lambda tps, s: 1e6 if s.get("ngram_candidates") == 4 else 1.0
    )
    tune.main(args)
    out = capsys.readouterr().out
    assert "Best: --draft ngram --num-draft-tokens 10 --ngram-candidates 4" in out
    assert "to decode so, pass: --draft ngram --num-draft-tokens 10 --ngram-candidates 4" in out
    tune.main(args + ["--save"])
    assert "--ngram-candidates 4 where a call names no drafting flag" in capsys.readouterr().out
    assert {f.name: f.read_bytes() for f in base.iterdir()} == files  # nothing written
    with pytest.raises(SystemExit):
        tune.main(["--model", str(base), "--prompts", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl does not exist" in capsys.readouterr().err


def test_tune_measures_pipelined_steps_and_the_config_choice_is_the_default(tmp_path, monkeypatch):
    """The tuner times pipelined steps for the fastest fused unpruned trees and
    stores the choice; a model whose config says ``pipeline: true`` then pipelines
    where a call's settings allow (here on a CPU), and runs other settings
    unpipelined without an error."""
    import mlx_specstream.decode as decode_module

    model = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2, prune_adapter_rank=0)
    tokenizer = word_tokenizer(16, eos=15)
    measured = fake_speeds(monkeypatch, lambda tps, s: 1e6 if s.get("pipeline") else tps)
    choice, _, _ = tune.tune(model, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None)
    assert {False, True} <= {m.get("pipeline") for m in measured}
    assert all(m["stream_pass"] == "fused" for m in measured if m.get("pipeline"))
    assert choice["pipeline"] is True and choice["tree_depth"] >= 1
    config = {"model_type": "llama", "speculative_streaming": SpecStreamConfig().to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert tune.save_choice(tmp_path, choice)["pipeline"] is True
    assert saved_config(tmp_path).pipeline is True

    seen = []
    real = decode_module.Decoder.launch_ahead
    monkeypatch.setattr(
        decode_module.Decoder, "launch_ahead", lambda d, p: seen.append(d.pipelined) or real(d, p)
    )
    model = tiny_spec_model("llama", vocab_size=8, num_streams=2, top_k=2, pipeline=True)
    want = plain_greedy(model, PROMPT, 24)
    assert spec_tokens(model, PROMPT, 24)[0] == want and seen and all(seen)
    seen.clear()
    assert spec_tokens(model, PROMPT, 24, draft="streams+ngram")[0] == want
    assert seen and not any(seen)
    seen.clear()
    assert spec_tokens(model, PROMPT, 24, pipeline=False)[0] == want and not any(seen)
    with pytest.raises(ValueError, match="speculative_streaming.pipeline='yes'"):
        SpecStreamConfig(pipeline="yes")


def test_verify_cost_note_names_float32_for_half_precision_on_cpu():
    """The tuner logs the measured c(16); where the model computes in bfloat16 on
    MLX's CPU backend (no BLAS for it) it also names float32. The timing itself is
    not asserted."""
    import mlx.core as mx

    model = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2)
    logs = []
    assert tune.verify_cost_note(model, log=logs.append) > 0
    assert len(logs) == 1 and "16 tokens costs" in logs[0]  # float32: the cost only
    model.set_dtype(mx.bfloat16)
    logs.clear()
    tune.verify_cost_note(model, log=logs.append)
    assert len(logs) == 2 and "bfloat16" in logs[1] and "--dtype float32" in logs[1]
    logs.clear()  # float32 scales, but quantized products: not BLAS either
    quantized = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2, quant_bits=4)
    tune.verify_cost_note(quantized, log=logs.append)
    assert len(logs) == 2 and "float32 with quantized weights" in logs[1]


def test_tune_refuses_to_save_a_choice_measured_in_another_dtype(tmp_path, capsys):
    """``--save`` stores a choice for the dtype the model generates in (its own): one
    measured with another ``--dtype`` is refused before anything is measured or written."""
    import shutil

    from mlx_specstream.default_model import DEFAULT_DIR

    model_dir = tmp_path / "model"
    shutil.copytree(DEFAULT_DIR, model_dir)
    files = {f.name: f.read_bytes() for f in model_dir.iterdir()}
    with pytest.raises(SystemExit):  # (stored in bfloat16; not the embedded model's path)
        tune.main(["--model", str(model_dir), "--dtype", "float32", "--save"])
    err = capsys.readouterr().err
    assert "--dtype float32 with --save" in err and "generates in mlx.core.bfloat16" in err
    assert {f.name: f.read_bytes() for f in model_dir.iterdir()} == files


def test_the_embedded_model_is_tuned_in_the_dtype_it_generates_in(monkeypatch):
    """``load_default`` runs the embedded (bfloat16-stored) model in float32 on the CPU
    backend, so the tuner measures it in float32 there, not as stored."""
    import mlx.core as mx

    from mlx_specstream.precision import compute_dtype

    seen = []

    def fake_tune(model, tokenizer, prompts, max_tokens, min_gain, confirm_rounds):
        seen.append(compute_dtype(model))
        return {"tree_depth": 0}, 1.0, 1.0

    monkeypatch.setattr(tune, "tune", fake_tune)
    monkeypatch.setattr(tune, "verify_cost_note", lambda model: seen.append("note"))
    tune.main(["--num-prompts", "1"])
    assert seen == ["note", mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16]


def test_tune_measures_where_the_stream_logits_are_computed_and_the_config_says(
    tmp_path, monkeypatch
):
    """The tuner times the fastest fused trees with the stream logits computed the other
    way than the device's default (here, on a CPU: by the pass's own head call) and
    stores it; a model whose config says so decodes that way, with plain decoding's
    output, and a call on a model whose config does not keeps the default."""
    import mlx_specstream.decode as decode_module

    model = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2, prune_adapter_rank=0)
    tokenizer = word_tokenizer(16, eos=15)
    measured = fake_speeds(
        monkeypatch, lambda tps, s: 1e6 if s.get("stream_logits_in_pass") else tps
    )
    choice, _, _ = tune.tune(model, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None)
    flipped = [m for m in measured if "stream_logits_in_pass" in m]
    assert flipped and all(m["stream_logits_in_pass"] is True for m in flipped)
    assert all(m["stream_pass"] in (None, "fused") for m in flipped)
    assert choice["stream_logits_in_pass"] is True
    config = {"model_type": "llama", "speculative_streaming": SpecStreamConfig().to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tune.save_choice(tmp_path, choice)
    assert saved_config(tmp_path).stream_logits_in_pass is True
    tune.save_choice(tmp_path, dict(choice, stream_logits_in_pass=None))
    assert saved_config(tmp_path).stream_logits_in_pass is None  # the default again

    seen = []
    real = decode_module.Decoder.launch
    monkeypatch.setattr(
        decode_module.Decoder,
        "launch",
        lambda d, *a, **k: seen.append(d.head_on_streams) or real(d, *a, **k),
    )
    for in_pass in (True, None):
        model = tiny_spec_model("llama", vocab_size=8, num_streams=2, top_k=2,
                                stream_logits_in_pass=in_pass)  # fmt: skip
        seen.clear()
        assert spec_tokens(model, PROMPT, 24)[0] == plain_greedy(model, PROMPT, 24)
        assert seen and all(h is bool(in_pass) for h in seen)
    with pytest.raises(ValueError, match="speculative_streaming.stream_logits_in_pass='yes'"):
        SpecStreamConfig(stream_logits_in_pass="yes")


def test_a_lucky_trial_does_not_turn_speculation_on(monkeypatch):
    """The gain that decides is the median of rounds timed back to back with plain
    decoding, not the fastest trial's one draw (this CPU's speed drifts)."""
    model = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2, prune_adapter_rank=0)
    tokenizer = word_tokenizer(16, eos=15)
    lookup_runs = []

    def lucky_once(tps, settings):
        if settings.get("speculative") is False:
            return 100.0
        if settings.get("draft") == "ngram":  # 2x in its trial, then 0.9x in every round
            lookup_runs.append(settings)
            return 200.0 if len(lookup_runs) == 1 else 90.0
        return 50.0

    measured = fake_speeds(monkeypatch, lucky_once)
    choice, tps, base = tune.tune(
        model, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None
    )
    # (every stream trial ties: the first, a fused one, is the fastest)
    assert choice == {"tree_depth": 0, "stream_pass": "fused"} and tps == base == 100.0
    assert len(lookup_runs) == 1 + 3  # its trial, then the three confirming rounds
    assert sum(m.get("speculative") is False for m in measured) == 1 + 3

    # Control: the same lucky trial decides when nothing confirms it.
    lookup_runs.clear()
    choice, tps, base = tune.tune(
        model, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None, confirm_rounds=0
    )
    assert choice == {"draft": "ngram"} and tps == 200.0


@pytest.mark.parametrize("faster", ["split", "fused"])
def test_plain_decoding_keeps_the_faster_stream_pass(tmp_path, monkeypatch, faster):
    """When no tree pays, the config still names the stream pass measured faster,
    for calls that turn speculation on (``--tree-depth 3``); each way round, so the
    check fails if the pass is not the measured one."""
    model = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2, prune_adapter_rank=0)
    tokenizer = word_tokenizer(16, eos=15)

    def speed(tps, settings):
        if settings.get("speculative") is False:
            return 100.0
        if settings.get("draft", "streams") != "streams":
            return 10.0
        return 60.0 if settings["stream_pass"] == faster else 40.0

    fake_speeds(monkeypatch, speed)
    choice, _, _ = tune.tune(model, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None)
    assert choice == {"tree_depth": 0, "stream_pass": faster}

    spec = SpecStreamConfig(stream_pass="split" if faster == "fused" else "fused").to_dict()
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "speculative_streaming": spec})
    )
    tune.save_choice(tmp_path, choice)
    saved = saved_config(tmp_path)
    assert saved.tree_depth == 0 and saved.stream_pass == faster


# ---- batches: how rows of a batch draft (tune --batch-size K) ---------------------------


def fake_batch_speeds(monkeypatch, speed):
    """As :func:`fake_speeds`, for the batch measurements."""
    measured, real = [], tune.batch_tokens_per_second

    def fake(model, tokenizer, prompts, max_tokens, rows=4, **settings):
        tps, tau = real(model, tokenizer, prompts, max_tokens, rows=rows, **settings)
        measured.append(dict(settings, rows=rows))
        return speed(tps, measured[-1]), tau

    monkeypatch.setattr(tune, "batch_tokens_per_second", fake)
    return measured


BATCH_PROMPTS = [[1, 2, 3, 1, 2], [4, 5, 4, 5]]


@pytest.mark.parametrize("winner", ["streams-split", "ngram", "none"])
def test_tune_batch_measures_every_way_and_stores_the_fastest(tmp_path, monkeypatch, winner):
    """Rows without drafts, lookup of each length, the streams' chain of each depth
    through each pass; the fastest is stored as the config's ``batch`` and
    batch_generate(draft="auto") follows it (each winner in turn, so a test of the
    wrong one fails); rows without drafts win when nothing beats them."""
    from mlx_specstream import batch as batch_module

    model = tiny_spec_model("llama", vocab_size=16, num_streams=2, mode="lossless",
                            stream_lora_rank=4, num_stream_layers=2)  # fmt: skip
    tokenizer = word_tokenizer(16, eos=15)

    pipelined = {"streams-split": False, "ngram": True, "none": None}[winner]

    def speed(tps, s):
        faster = 10.0 if s.get("pipeline") == pipelined else 0.0  # (pipelined or not)
        if winner == "streams-split" and s.get("stream_pass") == "split":
            return (300.0 if s["num_draft_tokens"] == 2 else 200.0) + faster
        if winner == "ngram" and s["draft"] == "ngram":
            return (300.0 if s["num_draft_tokens"] == 4 else 200.0) + faster
        return 100.0 if s["draft"] is None else 50.0

    measured = fake_batch_speeds(monkeypatch, speed)
    choice, tps, base = tune.tune_batch(model, tokenizer, BATCH_PROMPTS, max_tokens=6, rows=3,
                                        log=lambda *a: None, confirm_rounds=1)  # fmt: skip
    ways = {(m["draft"], m.get("num_draft_tokens"), m.get("stream_pass"), m.get("pipeline"))
            for m in measured}  # fmt: skip
    assert (None, None, None, None) in ways
    for on in (True, False):
        assert {("ngram", 2, None, on), ("ngram", 4, None, on)} <= ways
        assert {("streams", n, p, on) for n in (1, 2) for p in ("fused", "split")} <= ways
    assert all(m["rows"] == 3 for m in measured)
    want = {"streams-split": dict(draft="streams", num_draft_tokens=2, stream_pass="split"),
            "ngram": dict(draft="ngram", num_draft_tokens=4, stream_pass="fused"),
            "none": dict(draft=None, num_draft_tokens=0, stream_pass="fused")}[winner]  # fmt: skip
    assert choice == dict(want, rows=3, pipeline=pipelined)
    assert (tps, base) == ((310.0, 100.0) if winner != "none" else (100.0, 100.0))

    config = {"model_type": "llama", "speculative_streaming": SpecStreamConfig().to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    entry = tune.save_choice(tmp_path, {"tree_depth": 0, "batch": choice})
    assert entry["batch"] == choice and saved_config(tmp_path).batch == choice
    assert saved_config(tmp_path, "gpu:elsewhere").batch is None  # (only here)
    # A tree tuned alone later keeps the batch tuning; batches tuned alone keep the tree.
    tune.save_choice(tmp_path, dict(tree_depth=1, tree_top_k=2, max_tree_nodes=4,
                                    prune_threshold=0.0))  # fmt: skip
    assert saved_config(tmp_path).batch == choice and saved_config(tmp_path).tree_depth == 1
    other = dict(choice, rows=8)
    tune.save_choice(tmp_path, {"batch": other})
    assert saved_config(tmp_path).batch == other and saved_config(tmp_path).tree_depth == 1

    # batch_generate(draft="auto") inserts its rows as the tuning chose.
    model.speculative_streams.config.batch = choice
    inserted = []
    real_insert = batch_module.SpecBatcher.insert

    def insert(self, tokens, *a, **kw):
        inserted.append((self.streams is not None, self.fused, kw["draft"],
                         kw["num_draft_tokens"], self.pipeline, self.drafts_on_device))  # fmt: skip
        return real_insert(self, tokens, *a, **kw)

    monkeypatch.setattr(batch_module.SpecBatcher, "insert", insert)
    res = batch_module.batch_generate(model, tokenizer, BATCH_PROMPTS, max_tokens=8,
                                      return_token_ids=True)  # fmt: skip
    streams = want["draft"] == "streams"
    fused = want["stream_pass"] == "fused"
    n = want["num_draft_tokens"]
    on = (pipelined is not False, pipelined is True)  # (None: lookup rows on a GPU only)
    assert inserted == [(streams, fused, want["draft"], n) + on] * 2
    for got, p in zip(res.token_ids, BATCH_PROMPTS):  # (up to the EOS, as mlx-lm's)
        plain = plain_greedy(model, p, 8)
        assert got == (plain[: plain.index(15)] if 15 in plain else plain)


def test_tune_batch_on_a_plain_model_and_refusals(tmp_path):
    """A plain mlx-lm model gets lookup against no drafts; a config's ``batch`` that is
    not a tuning's is refused with its key named."""
    from helpers import tiny_model

    model = tiny_model("llama", vocab_size=16)
    tokenizer = word_tokenizer(16, eos=15)
    choice, _, _ = tune.tune_batch(model, tokenizer, BATCH_PROMPTS, max_tokens=4, rows=2,
                                   log=lambda *a: None, confirm_rounds=0)  # fmt: skip
    assert choice["draft"] in ("ngram", None) and choice["rows"] == 2
    good = dict(draft="streams", num_draft_tokens=2, stream_pass="fused", rows=4)
    assert SpecStreamConfig(batch=good).batch == good
    for bad, match in [
        (dict(good, draft="medusa"), "its draft must be"),
        (dict(good, num_draft_tokens=4), "num_streams=3"),
        (dict(good, stream_pass="both"), "stream_pass"),
        ({"draft": "ngram"}, "must have the keys"),
        (dict(good, pipeline="yes"), "its pipeline"),
    ]:
        with pytest.raises(ValueError, match=f"speculative_streaming.batch=.*{match}"):
            SpecStreamConfig(batch=bad)


def test_tune_lookup_on_a_hybrid_tries_lookup_trees(monkeypatch):
    """On a model with recurrent layers whose layers take trees (Qwen3-Next's shape),
    the lookup tuner also times several drafts per tree, and a winning tree is the
    choice; on one whose layers do not (Baichuan-M1), chains only."""
    from helpers import tiny_hybrid

    tokenizer = word_tokenizer(16, eos=15)
    prompts = [[1, 2, 3, 4, 1, 2, 5, 1, 2]]
    for arch, trees in (("qwen3_next", True), ("baichuan_m1", False)):
        measured = fake_speeds(
            monkeypatch, lambda tps, s: 1e6 if s.get("ngram_candidates") == 4 else 1.0
        )
        model = tiny_hybrid(arch, vocab_size=16)
        choice, _, _ = tune.tune_lookup(model, tokenizer, prompts, max_tokens=8, log=lambda m: None,
                                        confirm_rounds=0)  # fmt: skip
        tried = {m.get("ngram_candidates") for m in measured}
        assert (set(tune.LOOKUP_CANDIDATES) <= tried) == trees
        assert (choice.get("ngram_candidates") == 4) == trees


def test_the_flags_of_a_choice_not_stored_golden():
    """:func:`tune.choice_flags`, the flags printed for a checkpoint's tuning: its
    docstring's examples (golden)."""
    import doctest

    from mlx_specstream import tune

    results = doctest.testmod(tune)
    assert results.failed == 0 and results.attempted >= 3


@pytest.mark.parametrize("every_token_faster", [True, False])
def test_tune_times_every_token_against_the_draft_vocabulary_and_stores_it(
    every_token_faster, tmp_path, monkeypatch
):
    """A model with a draft vocabulary: its trials keep it (``draft_vocab`` True), the
    fastest trees are timed again ranking every token, and the faster way is stored for
    this device; ``load`` there then takes the directory's file, or not (another
    device: it does). Control: a model without one gets no such trials."""
    import numpy as np

    from mlx_specstream import load
    from mlx_specstream.draft_vocab import FILE, use_draft_vocab
    from mlx_specstream.utils import save

    model = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2, prune_adapter_rank=0)
    tokenizer = word_tokenizer(16, eos=15)
    use_draft_vocab(model, list(range(10)))

    def speed(tps, s):
        if s.get("draft", "streams") != "streams" or not s.get("tree_depth"):
            return 1.0
        return 1e6 if (s.get("draft_vocab") is False) == every_token_faster else 1e5

    measured = fake_speeds(monkeypatch, speed)
    choice, _, _ = tune.tune(model, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None)
    every = [m for m in measured if m.get("draft_vocab") is False]
    # (three trials; where every token wins, the later trials grow from them)
    assert all(m["tree_depth"] for m in every)
    assert len(every) == 3 if not every_token_faster else len(every) > 3
    assert all(m.get("draft_vocab") in (True, False) for m in measured if m.get("tree_depth"))
    assert choice["draft_vocab"] is (not every_token_faster)
    assert model.speculative_streams.draft_vocab is not None  # (restored after each trial)

    path = save(tmp_path / "m", model, tokenizer)
    assert (path / FILE).exists()
    tune.save_choice(path, choice)
    assert saved_config(path).draft_vocab is (not every_token_faster)
    loaded = load(str(path))[0].speculative_streams.draft_vocab
    assert (loaded is None) == every_token_faster
    monkeypatch.setattr("mlx_specstream.utils.device_key", lambda: "gpu:elsewhere")
    assert load(str(path))[0].speculative_streams.draft_vocab is not None
    assert load(str(path), draft_vocab=False)[0].speculative_streams.draft_vocab is None

    plain = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2, prune_adapter_rank=0)
    measured.clear()
    tune.tune(plain, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None)
    assert not any("draft_vocab" in m for m in measured)
    assert np.array_equal(np.array(model.speculative_streams.draft_vocab.ids), np.arange(10))
    with pytest.raises(ValueError, match="speculative_streaming.draft_vocab='yes'"):
        SpecStreamConfig(draft_vocab="yes")


@pytest.mark.parametrize("drafts", ["streams", "mtp"])
def test_on_a_hybrid_the_tuner_times_every_token_too(drafts, tmp_path, monkeypatch):
    """Streams or an MTP layer drafting chains on Qwen3-Next's shape: the two fastest
    drafting trials run again with every token ranked, and the choice carries
    ``draft_vocab`` either way (what ``save_choice`` stores)."""
    from helpers import stream_hybrid

    from mlx_specstream import load
    from mlx_specstream.draft_vocab import use_draft_vocab

    if drafts == "streams":
        model, vocab = stream_hybrid(vocab_size=16), 16
    else:
        from test_mtp import write_checkpoint

        write_checkpoint(tmp_path / "ckpt", "qwen3_next")
        model, vocab = load(str(tmp_path / "ckpt"))[0], 64
    use_draft_vocab(model, list(range(vocab // 2)))
    tokenizer = word_tokenizer(vocab, eos=vocab - 1)
    for every_token_faster in (True, False):

        def speed(tps, s):
            if s.get("draft", "streams") != "streams" or not (
                s.get("tree_depth") or s.get("num_draft_tokens")
            ):
                return 1.0
            return 1e6 if (s.get("draft_vocab") is False) == every_token_faster else 1e5

        measured = fake_speeds(monkeypatch, speed)
        choice, _, _ = tune.tune(model, tokenizer, [[1, 2, 3, 4]], max_tokens=6,
                                 log=lambda *a: None, confirm_rounds=0)  # fmt: skip
        every = [m for m in measured if m.get("draft_vocab") is False]
        assert len(every) >= 2 and (every_token_faster or len(every) == 2)
        assert choice["draft_vocab"] is (not every_token_faster) and choice["tree_depth"]
        assert model.speculative_streams.draft_vocab is not None
        monkeypatch.undo()


def test_tune_a_draft_model_pair_times_chains_and_trees_and_prints_their_flags(
    tmp_path, monkeypatch, capsys
):
    """``--draft-model DIR``: every chain length and tree (static and grown) and lookup
    merged into the fastest, each with the draft model, against plain decoding without
    it; the fastest's flags decode as it did (generate's own --compare-plain check);
    where nothing pays, plain decoding. Neither directory is written (``--save`` keeps the
    flags in the user's store: tests/test_tuned_store.py); --batch-size is refused."""
    from test_draft_model import write_model

    from mlx_specstream.generate import main as generate

    base, draft = write_model(tmp_path / "base"), write_model(tmp_path / "draft", seed=5)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": " ".join(f"t{i % 7}" for i in range(20))}) + "\n")
    files = {f: f.read_bytes() for d in (base, draft) for f in d.iterdir()}
    args = ["--model", str(base), "--draft-model", str(draft), "--prompts", str(prompts),
            "--max-tokens", "8", "--confirm-rounds", "1"]  # fmt: skip

    def grown_3_wins(tps, s):
        return 1e6 if s.get("dynamic_tree") and s.get("tree_top_k") == 3 else 1.0

    measured = fake_speeds(monkeypatch, grown_3_wins)
    tune.main(args)
    out = capsys.readouterr().out
    flags = "--num-draft-tokens 4 --tree-top-k 3 --max-tree-nodes 12 --dynamic-tree"
    assert f"Best: {flags} at" in out
    assert f"pass: --draft-model {draft} {flags}" in out
    plain = [m for m in measured if m.get("speculative") is False]
    drafted = [m for m in measured if m.get("speculative") is not False]
    assert plain and all("draft_model" not in m for m in plain)
    assert all(m["draft_model"] is not None for m in drafted)
    assert set(tune.DRAFT_MODEL_CHAINS) <= {m.get("num_draft_tokens") for m in drafted}
    assert set(tune.DRAFT_CONFIDENCES) <= {m.get("draft_confidence") for m in drafted}
    assert {"heuristic"} == {m["draft_schedule"] for m in drafted if "draft_schedule" in m}
    trees = {(m.get("tree_top_k"), m.get("dynamic_tree")) for m in drafted}
    assert {(k, d) for k, _, _ in tune.DRAFT_MODEL_TREES for d in (False, True)} <= trees
    assert any(m.get("draft") == "ngram" and m.get("tree_top_k") == 3 for m in drafted)
    monkeypatch.undo()
    generate(["--model", str(base), "--draft-model", str(draft), "--prompt", "t1 t2 t3",
              "--max-tokens", "12", "--compare-plain", "--ignore-chat-template",
              *flags.split()])  # fmt: skip
    assert "Output identical to plain decoding: yes" in capsys.readouterr().out

    fake_speeds(monkeypatch, lambda tps, s: 100.0 if s.get("speculative") is False else 90.0)
    tune.main(args)
    out = capsys.readouterr().out
    assert "Draft-model decoding does not pay on this device" in out
    assert "decode without it" in out and "Best:" not in out
    with pytest.raises(SystemExit):
        tune.main(args + ["--batch-size", "4"])
    assert "--batch-size with --draft-model: the tuner" in capsys.readouterr().err
    tune.main(args + ["--save"])
    assert "with --no-speculation where a call names no drafting flag" in capsys.readouterr().out
    assert {f: f.read_bytes() for d in (base, draft) for f in d.iterdir()} == files


def test_tune_a_draft_model_with_attention_chunks_tries_static_trees_only(monkeypatch):
    from helpers import tiny_model

    base, draft = tiny_model("llama4", vocab_size=16), tiny_model("llama4", seed=5,
                                                                  vocab_size=16)  # fmt: skip
    measured, logged = fake_speeds(monkeypatch, lambda tps, s: tps), []
    tune.tune_draft_model(base, word_tokenizer(16, eos=15), draft, [[1, 2, 3, 4]], max_tokens=6,
                          log=logged.append, confirm_rounds=0)  # fmt: skip
    assert any("grown trees: not tried" in line for line in logged)
    assert {m.get("dynamic_tree") for m in measured} == {None, False}
    assert any(m.get("tree_top_k") == 4 for m in measured)

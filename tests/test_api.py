"""The public API: mlx-lm compatible generation, loading, saving, the CLI."""

import json

import mlx.core as mx
import pytest
from helpers import plain_greedy, spec_tokens, tiny_model, tiny_spec_model, word_tokenizer
from mlx_lm.generate import GenerationResponse

import mlx_specstream
from mlx_specstream import SpecStreamConfig, attach_streams, generate, load, save, stream_generate
from mlx_specstream.streams import STREAMS_FILE

V = 8
PROMPT = [3, 1, 4, 1, 5]


def test_stream_generate_responses():
    model, tok = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2), word_tokenizer(
        V, eos=V + 5
    )
    ref = plain_greedy(model, PROMPT, 40)
    responses = list(stream_generate(model, tok, PROMPT, max_tokens=40))
    assert all(isinstance(r, GenerationResponse) for r in responses)
    assert [r.token for r in responses] == ref
    assert any(r.from_draft for r in responses) and not responses[0].from_draft
    passes = [r.forward_passes for r in responses]
    assert passes == sorted(passes) and passes[-1] < 40
    assert responses[-1].finish_reason == "length" and responses[-1].generation_tokens == 40
    # str, list and array prompts agree; generate() returns the streamed text.
    text = "".join(r.text for r in responses)
    as_str = " ".join(f"t{t}" for t in PROMPT)
    assert generate(model, tok, as_str, max_tokens=40) == text
    assert generate(model, tok, mx.array(PROMPT), max_tokens=40) == text


def test_speculative_false_is_one_token_per_pass():
    model, tok = tiny_spec_model("qwen2", vocab_size=V), word_tokenizer(V, eos=V + 5)
    responses = list(stream_generate(model, tok, PROMPT, max_tokens=20, speculative=False))
    assert [r.forward_passes for r in responses] == list(range(1, 21))
    assert [r.token for r in responses] == plain_greedy(model, PROMPT, 20)
    assert not any(r.from_draft for r in responses)


@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_max_tokens_is_exact(mode):
    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, mode=mode)
    full, _ = spec_tokens(model, PROMPT, 40)
    for m in range(1, 40):
        toks, records = spec_tokens(model, PROMPT, m)
        assert toks == full[:m]


def test_eos_inside_an_accepted_draft_stops_exactly():
    vocab = 32
    model = tiny_spec_model("llama", vocab_size=vocab, num_streams=3, top_k=2)
    toks, records = spec_tokens(model, PROMPT, 60)
    # A token that first appears as an accepted draft with another draft after it.
    i = next(
        i
        for i, (t, _, from_draft, _) in enumerate(records)
        if from_draft and t not in toks[:i] and i + 1 < len(records) and records[i + 1][2]
    )
    eos = toks[i]
    tok = word_tokenizer(vocab, eos=eos)
    responses = list(stream_generate(model, tok, PROMPT, max_tokens=60))
    assert [r.token for r in responses] == toks[: i + 1]
    assert responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses).split() == [f"t{t}" for t in toks[:i]]


def test_bad_generation_arguments():
    model, tok = tiny_spec_model("llama", vocab_size=V), word_tokenizer(V)
    with pytest.raises(ValueError, match="max_tokens"):
        generate(model, tok, PROMPT, max_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [], max_tokens=5)
    with pytest.raises(ValueError, match="tree_depth"):
        generate(model, tok, PROMPT, max_tokens=5, tree_depth=7)
    with pytest.raises(ValueError, match="prune_threshold"):
        generate(model, tok, PROMPT, max_tokens=5, prune_threshold=-0.5)
    plain = tiny_model("llama", vocab_size=V)
    with pytest.raises(ValueError, match="no speculative streams"):
        generate(plain, tok, PROMPT, max_tokens=5)


def test_per_call_tree_settings():
    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2)
    ref = plain_greedy(model, PROMPT, 40)
    for kwargs in [
        dict(tree_depth=1),
        dict(tree_top_k=3),
        dict(max_tree_nodes=2),
        dict(tree_depth=0),
    ]:
        toks, records = spec_tokens(model, PROMPT, 40, **kwargs)
        assert toks == ref
    assert records[-1][3] == 40  # tree_depth=0: no drafts


@pytest.mark.parametrize(
    "params, culprit",
    [
        (dict(num_streams=0), "num_streams"),
        (dict(num_stream_layers=0), "num_stream_layers"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=[2, 2]), "top_k"),
        (dict(prune_threshold=-0.1), "prune_threshold"),
        (dict(prune_threshold=1.5), "prune_threshold"),
        (dict(max_tree_nodes=0), "max_tree_nodes"),
        (dict(mode="fast"), "mode"),
        (dict(stream_positions="later"), "stream_positions"),
    ],
)
def test_config_validation(params, culprit):
    with pytest.raises(ValueError, match=culprit):
        SpecStreamConfig(**params)


def test_config_round_trip_and_unknown_keys():
    cfg = SpecStreamConfig(num_streams=2, top_k=[3, 1], mode="shared")
    assert SpecStreamConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="num_stream"):
        SpecStreamConfig.from_dict({"num_stream": 3})


def test_attach_refusals():
    with pytest.raises(ValueError, match="num_stream_layers=9 exceeds"):
        attach_streams(tiny_model("llama"), SpecStreamConfig(num_stream_layers=9))
    model = tiny_spec_model("llama")
    with pytest.raises(ValueError, match="already"):
        attach_streams(model, SpecStreamConfig(num_stream_layers=2))


def test_unsupported_architectures_are_refused():
    from mlx_lm.models import mamba, nanochat

    m = mamba.Model(
        mamba.ModelArgs(
            model_type="mamba",
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            state_size=4,
            num_hidden_layers=2,
            conv_kernel=4,
            use_bias=False,
            use_conv_bias=True,
            time_step_rank=4,
        )
    )
    with pytest.raises(ValueError, match="ArraysCache.*roll back"):
        attach_streams(m, SpecStreamConfig(num_stream_layers=1))
    # (nanochat rotates its queries in a function of its module, not a RoPE module)
    g = nanochat.Model(
        nanochat.ModelArgs(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=32, intermediate_size=64)
    )  # fmt: skip
    with pytest.raises(ValueError, match="nanochat.*RoPE"):
        attach_streams(g, SpecStreamConfig(num_stream_layers=1))


def test_save_load_round_trip(tmp_path):
    model = tiny_spec_model("qwen2", vocab_size=V, num_streams=3, top_k=2, prune_threshold=0.05)
    tok = word_tokenizer(V, eos=V + 5)
    want, _ = spec_tokens(model, PROMPT, 30)
    path = save(tmp_path / "m", model, tok)
    loaded, tok2 = load(str(path))
    assert spec_tokens(loaded, PROMPT, 30)[0] == want
    assert loaded.speculative_streams.config == model.speculative_streams.config
    # The directory is an ordinary mlx-lm model: plain mlx_lm.load gives the base model.
    import mlx_lm

    base, _ = mlx_lm.load(str(path))
    assert plain_greedy(base, PROMPT, 30) == want
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save(path, model, tok)
    assert list(tmp_path.iterdir()) == [path]  # no temporary leftovers


def test_hub_ids_resolve_through_huggingface_hub(tmp_path, monkeypatch):
    model = tiny_spec_model("llama", vocab_size=V)
    path = save(tmp_path / "m", model, word_tokenizer(V))
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded, _ = load("someone/tiny-specstream", revision="main")
    assert calls[0][0] == "someone/tiny-specstream" and STREAMS_FILE in calls[0][2]
    assert spec_tokens(loaded, PROMPT, 10)[0] == spec_tokens(model, PROMPT, 10)[0]


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_load_errors_name_the_culprit(tmp_path):
    model = tiny_spec_model("llama", vocab_size=V)
    tok = word_tokenizer(V)
    # Stream file without config section.
    a = save(tmp_path / "a", model, tok)
    _edit_config(a, lambda c: c.pop("speculative_streaming"))
    with pytest.raises(ValueError, match=f"{STREAMS_FILE} exists but .*config.json has no"):
        load(str(a))
    # Config section without stream file.
    b = save(tmp_path / "b", model, tok)
    (b / STREAMS_FILE).unlink()
    with pytest.raises(ValueError, match=f"section but .*{STREAMS_FILE} is missing"):
        load(str(b))
    # Neither: a plain model.
    (a / STREAMS_FILE).unlink()
    with pytest.raises(ValueError, match="plain model"):
        load(str(a))
    # A config value out of range names the file and the key.
    c = save(tmp_path / "c", model, tok)
    _edit_config(c, lambda cfg: cfg["speculative_streaming"].update(top_k=0))
    with pytest.raises(ValueError, match="config.json.*top_k"):
        load(str(c))
    # Streams that do not fit the config (gamma 3 saved, 2 declared) name the file.
    d = save(tmp_path / "d", model, tok)
    _edit_config(d, lambda cfg: cfg["speculative_streaming"].update(num_streams=2))
    with pytest.raises(ValueError, match=f"{STREAMS_FILE}.*embeddings"):
        load(str(d))
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / "missing-dir-that-is-not-a-repo" / "x"))


def _passes(model, tok, n=20):
    """Greedy tokens and forward passes of a call that names no tree settings."""
    out = list(stream_generate(model, tok, mx.array(PROMPT), max_tokens=n))
    return [r.token for r in out], out[-1].forward_passes


def test_settings_tuned_on_a_device_apply_there_only(tmp_path, monkeypatch):
    """A config's ``tuned`` entry applies on the device it names: a model tuned to
    plain decoding here decodes one token per pass here and with its own tree
    elsewhere (the control), with plain decoding's output both ways; saving
    writes the section back as stored, not this device's settings."""
    import mlx_specstream.utils as utils

    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2)
    tok = word_tokenizer(V, eos=V + 5)
    want = plain_greedy(model, PROMPT, 20)
    path = save(tmp_path / "m", model, tok)
    tuned = {"cpu:here": {"tree_depth": 0, "top_k": 1}, "gpu:there": {"tree_depth": 1}}
    _edit_config(path, lambda c: c["speculative_streaming"].update(tuned=tuned))

    monkeypatch.setattr(utils, "device_key", lambda: "cpu:here")
    here, _ = load(str(path))
    cfg = here.speculative_streams.config
    assert (cfg.tree_depth, cfg.top_k, cfg.tuned_on) == (0, 1, "cpu:here")
    assert _passes(here, tok) == (want, 20)  # one token per pass
    monkeypatch.setattr(utils, "device_key", lambda: "gpu:elsewhere")
    elsewhere, _ = load(str(path))
    cfg = elsewhere.speculative_streams.config
    assert (cfg.tree_depth, cfg.top_k, cfg.tuned_on) == (None, 2, None)
    tokens, passes = _passes(elsewhere, tok)
    assert tokens == want and passes < 20  # speculating with the model's own tree

    stored = json.loads((path / "config.json").read_text())["speculative_streaming"]
    again = save(tmp_path / "again", here, tok)
    assert json.loads((again / "config.json").read_text())["speculative_streaming"] == stored


@pytest.mark.parametrize(
    "tuned, culprit",
    [
        ({"cpu:x": {"mode": "shared"}}, r"tuned\['cpu:x'\]: unknown key\(s\) \['mode'\]"),
        ({"cpu:x": {"tree_depth": 9}}, r"tuned\['cpu:x'\]: .*tree_depth=9"),
        ({"cpu:x": {"stream_pass": "both"}}, r"tuned\['cpu:x'\]: .*stream_pass"),
        ({"cpu:x": 0}, r"tuned=\{'cpu:x': 0\}: must map device names to dicts"),
    ],
)
def test_bad_tuned_entries_name_the_device_and_key(tmp_path, tuned, culprit):
    path = save(tmp_path / "m", tiny_spec_model("llama", vocab_size=V), word_tokenizer(V))
    _edit_config(path, lambda c: c["speculative_streaming"].update(tuned=tuned))
    with pytest.raises(ValueError, match="config.json: speculative_streaming." + culprit):
        load(str(path))


def test_default_model_is_tuned_for_this_cpu_only(monkeypatch, capsys):
    """The shipped config turns speculation off where it was measured not to pay
    (a Linux x86-64 CPU, as CI's) and drafts a chain of 3 elsewhere; the CLI says
    which."""
    import importlib

    import mlx_specstream.utils as utils
    from mlx_specstream.generate import main

    generate_module = importlib.import_module("mlx_specstream.generate")  # (the module)

    argv = ["--prompt", "def f(x):", "--max-tokens", "8"]
    monkeypatch.setattr(utils, "device_key", lambda: "cpu:Linux-x86_64")
    main(argv)
    out = capsys.readouterr().out
    assert "measured on this device (cpu:Linux-x86_64) that it does not pay" in out
    assert "Forward passes: 8," in out
    for where in (utils, generate_module):
        monkeypatch.setattr(where, "device_key", lambda: "gpu:Apple M9")
    main(argv)
    out = capsys.readouterr().out
    assert "tuned on cpu:Linux-x86_64, not on this device (gpu:Apple M9)" in out
    assert "Forward passes: 8," not in out
    # There its own settings: a chain of 3 streams, as convert.recipes.STDLIB ships it.
    from convert.recipes import STDLIB

    model, _ = load()
    cfg = model.speculative_streams.config
    assert {k: getattr(cfg, k) for k in STDLIB.untuned_tree} == STDLIB.untuned_tree
    assert (cfg.top_k, cfg.max_tree_nodes, cfg.tree_depth, cfg.tuned_on) == (1, 4, None, None)


def test_default_model_cli(capsys):
    from mlx_specstream.generate import main

    main(["--prompt", "def f(x):", "--max-tokens", "12", "--seed", "0"])
    out = capsys.readouterr()
    assert "tokens-per-sec" in out.out and "tokens per forward pass" in out.out
    assert "Peak memory" in out.out
    main(["--prompt", "abc", "--max-tokens", "5", "--no-speculation", "--tree-top-k", "1"])
    assert "Forward passes: 5," in capsys.readouterr().out
    main(
        [
            "--prompt",
            "x = 1",
            "--max-tokens",
            "8",
            "--temp",
            "0.8",
            "--seed",
            "1",
            "--acceptance",
            "rejection",
        ]
    )
    assert "Generation: 8 tokens" in capsys.readouterr().out


def test_cli_compares_with_plain_decoding(capsys):
    """``--compare-plain``: mlx-lm's plain loop on the same weights, the speedup, and
    whether the outputs are identical (greedy)."""
    from mlx_specstream.generate import _generate, compare_with_plain, main, setup_arg_parser

    argv = ["--prompt", "def f(x):", "--max-tokens", "16", "--tree-depth", "3", "--compare-plain"]
    main(argv)
    out = capsys.readouterr().out
    assert "Plain decoding (mlx-lm's loop, same weights): 16 tokens" in out
    assert "Output identical to plain decoding: yes" in out
    # A seeded sampled run writes the same text with and without the comparison (its
    # warm-up does not move the random stream). Control: another seed writes otherwise.
    sampled = ["--prompt", "def f(x):", "--max-tokens", "16", "--tree-depth", "3", "--temp", "0.8"]
    outs = []
    for extra in (["--seed", "3", "--compare-plain"], ["--seed", "3"], ["--seed", "4"]):
        main(sampled + extra)
        outs.append(capsys.readouterr().out)
    assert "not compared token for token" in outs[0]
    texts = [out.split("=" * 10)[1] for out in outs]
    assert texts[0] == texts[1] != texts[2]
    # Negative control: a text other than plain decoding's is reported as different.
    from mlx_specstream.default_model import load_default

    model, tok = load_default()
    args = setup_arg_parser().parse_args(argv)
    prompt = tok.encode("def f(x):")
    text, response = _generate(model, tok, prompt, max_tokens=16, tree_depth=3)
    compare_with_plain(model, tok, prompt, text + " and more", response, args)
    assert "Output identical to plain decoding: NO" in capsys.readouterr().out


def test_cli_warns_when_the_drafts_are_almost_never_accepted(monkeypatch, capsys):
    """Streams that do not fit the model (random ones on a random model) draft about
    one token per pass: the CLI says so. Not for the shipped streams, not for prompt
    lookup (which often finds nothing to copy), not on a few passes."""
    import importlib

    from helpers import tiny_spec_model, word_tokenizer

    generate_module = importlib.import_module("mlx_specstream.generate")
    argv = ["--prompt", "def f(x):", "--max-tokens", "48", "--tree-depth", "3"]
    generate_module.main(argv)
    assert "[WARN] The drafts were almost never accepted" not in capsys.readouterr().out
    model = tiny_spec_model("llama", vocab_size=512, num_streams=3, top_k=2)
    tok = word_tokenizer(512)
    monkeypatch.setattr(generate_module, "load_model", lambda args, config: (model, tok))
    argv = ["--prompt", "t1 t2 t3", "--max-tokens", "48", "--tree-depth", "3", "--verbose", "1"]
    generate_module.main(argv)
    out = capsys.readouterr().out
    assert "Generation: 48 tokens" in out
    assert "[WARN] The drafts were almost never accepted: 1.0" in out
    generate_module.main(argv[:3] + ["16"] + argv[4:])  # 16 passes: too few to judge
    generate_module.main(argv + ["--draft", "ngram"])
    assert "[WARN]" not in capsys.readouterr().out


def test_public_names():
    for name in ["load", "generate", "stream_generate", "SpecStreamConfig", "attach_streams"]:
        assert hasattr(mlx_specstream, name)


def test_stream_lora_round_trip_and_bad_targets(tmp_path):
    model = tiny_spec_model(
        "phi3",
        vocab_size=V,
        num_streams=2,
        top_k=2,
        stream_lora_rank=4,
        stream_lora_targets=["self_attn.qkv_proj", "mlp.down_proj"],
    )
    tok = word_tokenizer(V, eos=V + 5)
    path = save(tmp_path / "m", model, tok)
    loaded, _ = load(str(path))
    assert spec_tokens(loaded, PROMPT, 30)[0] == spec_tokens(model, PROMPT, 30)[0]
    from mlx.utils import tree_flatten

    names = [n for n, _ in tree_flatten(loaded.speculative_streams.streams.parameters())]
    assert "lora.1.self_attn.qkv_proj.lora_a" in names and len(names) == 1 + 2 + 2 * 2 * 2
    with pytest.raises(ValueError, match="stream_lora_targets.*q_proj"):
        attach_streams(
            tiny_model("phi3"),
            SpecStreamConfig(
                num_stream_layers=1, stream_lora_rank=2, stream_lora_targets=["self_attn.q_proj"]
            ),
        )


def test_bad_kv_cache_options_are_refused_clearly():
    model, tok = tiny_spec_model("llama", vocab_size=V), word_tokenizer(V)
    for kwargs, culprit in [
        (dict(kv_bits=7), "kv_bits=7"),
        (dict(kv_bits=4, kv_group_size=48), "kv_group_size=48"),
        (dict(kv_bits=4, quantized_kv_start=-1), "quantized_kv_start=-1"),
    ]:
        with pytest.raises(ValueError, match=culprit):
            generate(model, tok, PROMPT, max_tokens=40, **kwargs)
    generate(model, tok, PROMPT, max_tokens=8, kv_bits=8)  # accepted (tests/test_kv_quant.py)


@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_logits_processors_follow_each_nodes_own_path(mode):
    """Repetition penalty and logit bias, applied per tree node with that node's
    history, give exactly the one-token-per-pass output (and mlx-lm's, lossless)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, mode=mode)
    procs = make_logits_processors(
        logit_bias={3: 2.0}, repetition_penalty=1.5, repetition_context_size=6
    )
    toks, records = spec_tokens(model, PROMPT, 40, logits_processors=procs)
    assert toks == spec_tokens(model, PROMPT, 40, logits_processors=procs, speculative=False)[0]
    assert any(r[2] for r in records)
    if mode == "lossless":
        ref = [
            t
            for t, _ in generate_step(
                mx.array(PROMPT), model, max_tokens=40, logits_processors=procs
            )
        ]
        assert toks == ref
    assert toks != spec_tokens(model, PROMPT, 40)[0]  # the processors did something


def test_stops_on_every_eos_token_id():
    model = tiny_spec_model("llama", vocab_size=32, num_streams=3, top_k=2)
    full, _ = spec_tokens(model, PROMPT, 40)
    tok = word_tokenizer(32, eos=31)
    second = full[5]
    tok.add_eos_token(f"t{second}")
    out = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=40)]
    assert out == full[: full.index(second) + 1]


def test_detokenizer_text_when_several_tokens_arrive_per_step():
    model, tok = load()
    prompt = "def parse(line):\n    "
    # The shipped config may be tuned to plain decoding: ask for a tree.
    responses = list(stream_generate(model, tok, prompt, max_tokens=48, tree_depth=3))
    assert max(r.generation_tokens for r in responses) > responses[-1].forward_passes
    text = "".join(r.text for r in responses)
    assert text == tok.decode([r.token for r in responses])


@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_prompt_cache_save_load_round_trip(tmp_path, mode):
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    model = tiny_spec_model("qwen2", vocab_size=V, num_streams=3, top_k=2, mode=mode)
    cache = make_prompt_cache(model)
    first, _ = spec_tokens(model, PROMPT, 20, prompt_cache=cache)
    # The cache holds the prompt and every generated token, as mlx-lm's does.
    assert cache[0].offset == len(PROMPT) + 20
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    follow_up = [7, 2, 5]
    got, _ = spec_tokens(model, follow_up, 20, prompt_cache=loaded)
    fresh_cache = make_prompt_cache(model)
    spec_tokens(model, PROMPT, 20, prompt_cache=fresh_cache)
    want, _ = spec_tokens(model, follow_up, 20, prompt_cache=fresh_cache)
    assert got == want


def test_generate_stays_the_function_after_its_submodule_is_imported():
    """``from mlx_specstream.generate import ...`` must not turn ``mlx_specstream.generate``
    into the module (mlx-lm keeps its function too). Control: a fresh interpreter without
    the package's guard gets the module."""
    import subprocess
    import sys

    code = (
        "import sys, types\n"
        "{guard}"
        "from mlx_specstream.generate import setup_arg_parser\n"
        "import mlx_specstream\n"
        "print(type(mlx_specstream.generate).__name__)\n"
    )
    unguard = "import mlx_specstream as p; p.__class__ = types.ModuleType\n"
    got = [
        subprocess.run(
            [sys.executable, "-c", code.format(guard=guard)], capture_output=True, text=True
        ).stdout.strip()
        for guard in ("", unguard)
    ]
    assert got == ["function", "module"]


@pytest.mark.parametrize("speculative", [True, False])
def test_prompt_progress_callback_is_called_as_mlx_lm_calls_it(speculative):
    """(processed, total) at 0, after every prefill chunk, and at the total once the
    first token is ready: the same calls as mlx-lm's ``generate_step``."""
    from mlx_lm.generate import generate_step

    model = tiny_spec_model("llama", vocab_size=32, num_streams=3, top_k=2)
    prompt = list(range(3, 14))
    ours, theirs = [], []
    spec_tokens(model, prompt, 6, prefill_step_size=4, speculative=speculative,
                prompt_progress_callback=lambda *a: ours.append(a))  # fmt: skip
    list(generate_step(mx.array(prompt), model, max_tokens=6, prefill_step_size=4,
                       prompt_progress_callback=lambda *a: theirs.append(a)))  # fmt: skip
    assert theirs == [(0, 11), (4, 11), (8, 11), (10, 11), (11, 11)]
    assert ours == theirs


def test_load_takes_mlx_lm_loads_arguments_in_its_order(tmp_path):
    """``load``'s leading parameters are ``mlx_lm.load``'s, in order, and act as
    there: ``return_config`` adds the config, ``model_config`` overrides it, and a
    ``lazy`` model decodes as an evaluated one."""
    import inspect

    from mlx_lm.utils import load as mlx_lm_load

    theirs = list(inspect.signature(mlx_lm_load).parameters)
    assert list(inspect.signature(load).parameters)[: len(theirs)] == theirs
    model = tiny_spec_model("llama", vocab_size=V, num_streams=2, top_k=2)
    path = save(tmp_path / "m", model, word_tokenizer(V, eos=V + 5))
    m, tok, config = load(str(path), return_config=True)
    assert config["speculative_streaming"]["num_streams"] == 2
    lazy, _ = load(str(path), lazy=True)
    assert spec_tokens(lazy, PROMPT, 20)[0] == spec_tokens(m, PROMPT, 20)[0]
    _, _, changed = load(str(path), None, {"rms_norm_eps": 0.5}, return_config=True)
    assert changed["rms_norm_eps"] == 0.5 and config["rms_norm_eps"] != 0.5
    assert len(load(None, return_config=True)) == 3  # the embedded model too
    assert len(load(None)) == 2

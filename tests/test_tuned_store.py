"""``tune --save`` for models whose files it does not write: a plain mlx-lm model, a draft-model
pair, a drafter from another directory, a checkpoint's own MTP layer. The choice is stored as
flags in the user's store (``mlx_specstream.tuned_store``), and ``generate``, ``chat`` and
``server`` decode with them where a call names no drafting flag."""

import doctest
import importlib
import json
import threading

import pytest
from test_draft_model import write_model
from test_tune import fake_speeds

import mlx_specstream.tuned_store as tuned_store
from mlx_specstream.precision import device_key

tune = importlib.import_module("mlx_specstream.tune")
gen = importlib.import_module("mlx_specstream.generate")  # (not the function so named)
PROMPT = " ".join(f"t{i % 7}" for i in range(20))


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "store" / "tuned.json"
    monkeypatch.setenv(tuned_store.STORE_VARIABLE, str(path))
    return path


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    return path


def files_of(*dirs):
    return {f: f.read_bytes() for d in dirs for f in d.iterdir()}


def spy_generations(monkeypatch) -> list:
    """The keyword arguments of every generation ``generate``'s CLI runs."""
    calls, real = [], gen.stream_generate

    def spy(model, tokenizer, prompt, **kwargs):
        calls.append(kwargs)
        return real(model, tokenizer, prompt, **kwargs)

    monkeypatch.setattr(gen, "stream_generate", spy)
    return calls


def test_doc_examples():
    result = doctest.testmod(tuned_store)
    assert result.failed == 0 and result.attempted > 0, result


def test_store_path_and_a_broken_store(tmp_path, monkeypatch):
    monkeypatch.delenv(tuned_store.STORE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert tuned_store.store_path() == tmp_path / "cache" / "mlx_specstream" / "tuned.json"
    monkeypatch.setenv(tuned_store.STORE_VARIABLE, str(tmp_path / "mine.json"))
    assert tuned_store.store_path() == tmp_path / "mine.json"
    (tmp_path / "mine.json").write_text("{not json")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    for call in (lambda: tuned_store.find_flags("cpu:x", tmp_path / "m"),
                 lambda: tuned_store.save_flags(["--draft", "ngram"], "cpu:x", tmp_path / "m")):  # fmt: skip
        with pytest.raises(ValueError, match="mine.json: not a store of tuned choices"):
            call()
    assert (tmp_path / "mine.json").read_text() == "{not json"  # (never overwritten)
    with pytest.raises(FileNotFoundError, match="nothing/config.json does not exist"):
        tuned_store.fingerprint(tmp_path / "nothing")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(ValueError, match="model.safetensors: not a safetensors file"):
        tuned_store.fingerprint(tmp_path / "m")


def test_entries_are_kept_per_model_pair_and_device(tmp_path, store):
    """One entry per (model, drafter, draft model, device): a second save replaces only its
    own; the fingerprint follows the weights' headers, not only config.json."""
    a, b = write_model(tmp_path / "a"), write_model(tmp_path / "b", seed=3)
    tuned_store.save_flags(["--draft", "ngram"], "cpu:x", a)
    tuned_store.save_flags(["--num-draft-tokens", "2"], "cpu:x", a, draft_model=b)
    tuned_store.save_flags(["--no-speculation"], "gpu:y", a)
    tuned_store.save_flags(["--draft", "ngram", "--num-draft-tokens", "4"], "cpu:x", a)
    assert tuned_store.find_flags("cpu:x", a) == (["--draft", "ngram", "--num-draft-tokens", "4"],
                                                  None)  # fmt: skip
    assert tuned_store.find_flags("cpu:x", a, draft_model=b) == (["--num-draft-tokens", "2"], None)
    assert tuned_store.find_flags("gpu:y", a) == (["--no-speculation"], None)
    assert tuned_store.find_flags("cpu:x", b) == (None, None)
    assert tuned_store.find_flags("cpu:x", a, drafter=b) == (None, None)
    assert len(json.loads(store.read_text())["choices"]) == 3
    # The same config, weights of another shape: the draft model's choice no longer applies.
    import mlx.core as mx

    mx.save_safetensors(str(b / "model.safetensors"), {"w": mx.zeros((2, 3))})
    flags, note = tuned_store.find_flags("cpu:x", a, draft_model=b)
    assert flags is None and "measured on other files" in note


def test_a_plain_model_s_lookup_is_stored_and_generate_decodes_with_it(
    tmp_path, store, prompts, monkeypatch, capsys
):
    """``tune --model PLAIN --save`` stores the fastest lookup's flags (the model's files
    untouched); ``generate --model PLAIN`` then decodes with them, its output mlx-lm's; any
    drafting flag overrides them (control); stored on another device or for other files,
    nothing applies and a plain model without flags is refused as before."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate as mlx_lm_generate

    base = write_model(tmp_path / "plain")
    before = files_of(base)
    fake_speeds(monkeypatch, lambda tps, s: 1e6 if s.get("num_draft_tokens") == 4 else 1.0)
    tune.main(["--model", str(base), "--prompts", str(prompts), "--max-tokens", "8",
               "--confirm-rounds", "0", "--save"])  # fmt: skip
    out = capsys.readouterr().out
    assert f"saved for this device ({device_key()}) in {store}" in out
    assert "--draft ngram --num-draft-tokens 4" in out
    assert files_of(base) == before
    [entry] = json.loads(store.read_text())["choices"]
    assert entry["flags"] == ["--draft", "ngram", "--num-draft-tokens", "4"]
    assert entry["model"] == str(base.resolve()) and entry["device"] == device_key()
    assert entry["measured"]["tokens_per_second"] == 1e6
    monkeypatch.undo()
    monkeypatch.setenv(tuned_store.STORE_VARIABLE, str(store))

    calls = spy_generations(monkeypatch)
    argv = ["--model", str(base), "--prompt", PROMPT, "--max-tokens", "12",
            "--ignore-chat-template"]  # fmt: skip
    gen.main(argv)
    out = capsys.readouterr().out
    assert "[INFO] Tuned for this device" in out and "--num-draft-tokens 4" in out
    assert calls[-1]["draft"] == "ngram" and calls[-1]["num_draft_tokens"] == 4
    plain, tok = mlx_lm_load(str(base))
    assert mlx_lm_generate(plain, tok, prompt=tok.encode(PROMPT), max_tokens=12) in out
    gen.main(argv + ["--draft", "ngram", "--num-draft-tokens", "2"])  # (control: the call's own)
    assert calls[-1]["num_draft_tokens"] == 2 and "Tuned for" not in capsys.readouterr().out
    from mlx_specstream.cli_args import with_stored_tuning

    for flag in (["--draft-vocab", "none"], ["--no-speculation"], ["--no-dynamic-tree"]):
        args = with_stored_tuning(gen.setup_arg_parser(), argv + flag, print)
        assert args.draft is None and args.num_draft_tokens is None, flag  # (none applied)

    stored = json.loads(store.read_text())
    stored["choices"][0]["device"] = "gpu:Another"
    store.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="is a plain model"):
        gen.main(argv)
    stored["choices"][0]["device"] = device_key()
    store.write_text(json.dumps(stored))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=512)))
    with pytest.raises(ValueError, match="is a plain model"):
        gen.main(argv)
    assert "measured on other files" in capsys.readouterr().out


def test_stored_plain_decoding_decodes_a_plain_model_one_token_a_pass(
    tmp_path, store, prompts, monkeypatch, capsys
):
    """Where no lookup pays, ``--no-speculation`` is stored, and ``generate --model PLAIN``
    decodes one token a pass (a plain model with --no-speculation loads)."""
    base = write_model(tmp_path / "plain")
    fake_speeds(monkeypatch, lambda tps, s: 100.0 if s.get("speculative") is False else 90.0)
    tune.main(["--model", str(base), "--prompts", str(prompts), "--max-tokens", "8",
               "--confirm-rounds", "0", "--save"])  # fmt: skip
    assert "--no-speculation" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setenv(tuned_store.STORE_VARIABLE, str(store))
    calls = spy_generations(monkeypatch)
    gen.main(["--model", str(base), "--prompt", PROMPT, "--max-tokens", "6",
              "--ignore-chat-template", "--compare-plain"])  # fmt: skip
    out = capsys.readouterr().out
    assert calls[-1]["speculative"] is False and "Output identical to plain decoding: yes" in out


def test_a_draft_model_pair_is_stored_and_its_draft_model_skipped_where_it_does_not_pay(
    tmp_path, store, monkeypatch, capsys
):
    """``tune --model T --draft-model D --save`` stores the pair's flags; ``generate`` with
    the pair decodes with them (output identical to plain decoding). Where the draft model
    does not pay, ``--no-speculation`` is stored and the draft model is not even loaded."""
    base, draft = write_model(tmp_path / "base"), write_model(tmp_path / "draft", seed=5)
    before = files_of(base, draft)
    # (no --prompts, and none in the directory: the embedded model's held-out prompts)
    args = ["--model", str(base), "--draft-model", str(draft), "--num-prompts", "1",
            "--max-tokens", "8", "--confirm-rounds", "0", "--save"]  # fmt: skip
    fake_speeds(monkeypatch, lambda tps, s: 1e6 if s.get("num_draft_tokens") == 2 else 1.0)
    tune.main(args)
    out = capsys.readouterr().out
    assert "--num-draft-tokens 2" in out
    assert f"{base} has no prompts.jsonl: timing the embedded model's held-out" in out
    assert files_of(base, draft) == before
    monkeypatch.undo()
    monkeypatch.setenv(tuned_store.STORE_VARIABLE, str(store))
    calls = spy_generations(monkeypatch)
    argv = ["--model", str(base), "--draft-model", str(draft), "--prompt", PROMPT,
            "--max-tokens", "10", "--ignore-chat-template", "--compare-plain"]  # fmt: skip
    gen.main(argv)
    out = capsys.readouterr().out
    assert calls[-1]["num_draft_tokens"] == 2 and calls[-1]["draft_model"] is not None
    assert "Output identical to plain decoding: yes" in out
    with pytest.raises(ValueError, match="is a plain model"):  # (the model alone: no entry)
        gen.main(argv[:2] + ["--prompt", PROMPT, "--max-tokens", "10"])

    fake_speeds(monkeypatch, lambda tps, s: 100.0 if s.get("speculative") is False else 90.0)
    tune.main(args)
    capsys.readouterr()
    monkeypatch.undo()
    monkeypatch.setenv(tuned_store.STORE_VARIABLE, str(store))
    calls = spy_generations(monkeypatch)
    loaded = []
    real = gen.load_draft_model
    monkeypatch.setattr(gen, "load_draft_model", lambda *a: loaded.append(1) or real(*a))
    gen.main(argv)
    assert calls[-1]["speculative"] is False and calls[-1]["draft_model"] is None and not loaded
    assert "Output identical to plain decoding: yes" in capsys.readouterr().out


def test_the_embedded_model_with_a_draft_model(tmp_path, store, monkeypatch, capsys):
    """No ``--model``: the embedded model, which keeps its own tuning in its config (never
    looked up alone), with ``--draft-model``: the pair's choice is stored and applied."""
    from mlx_specstream.default_model import DEFAULT_DIR, DRAFT_DIR

    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n")
    before = files_of(DEFAULT_DIR, DRAFT_DIR)
    fake_speeds(monkeypatch, lambda tps, s: 1e6 if s.get("num_draft_tokens") == 1 else 1.0)
    tune.main(["--draft-model", str(DRAFT_DIR), "--prompts", str(tmp_path / "p.jsonl"),
               "--num-prompts", "1", "--max-tokens", "6", "--confirm-rounds", "0", "--save"])  # fmt: skip
    assert f"decode {DEFAULT_DIR} with draft model {DRAFT_DIR}" in capsys.readouterr().out
    assert files_of(DEFAULT_DIR, DRAFT_DIR) == before
    monkeypatch.undo()
    monkeypatch.setenv(tuned_store.STORE_VARIABLE, str(store))
    calls = spy_generations(monkeypatch)
    gen.main(["--draft-model", str(DRAFT_DIR), "--prompt", "def add(a, b):", "--max-tokens", "8"])
    assert calls[-1]["num_draft_tokens"] == 1 and "Tuned for" in capsys.readouterr().out
    gen.main(["--prompt", "def add(a, b):", "--max-tokens", "8"])  # (alone: its own config)
    assert calls[-1]["draft_model"] is None and "Tuned for" not in capsys.readouterr().out


def test_chat_and_server_take_the_stored_flags(tmp_path, store, monkeypatch, capsys):
    """``chat`` decodes with the stored flags; the server takes them as its defaults where it
    has each flag, and says which it cannot take otherwise."""
    from mlx_specstream.cli_args import with_stored_tuning
    from mlx_specstream.server import setup_arg_parser as server_parser

    base = write_model(tmp_path / "plain")
    tuned_store.save_flags(["--draft", "ngram", "--num-draft-tokens", "3"], device_key(), base)
    chat = importlib.import_module("mlx_specstream.chat")
    logged = []
    args = with_stored_tuning(chat.setup_arg_parser(), ["--model", str(base)], logged.append)
    assert (args.draft, args.num_draft_tokens) == ("ngram", 3) and "Tuned for" in logged[-1]
    args = with_stored_tuning(server_parser(), ["--model", str(base)], logged.append)
    assert (args.draft, args.num_draft_tokens) == ("ngram", 3)
    args = with_stored_tuning(server_parser(), ["--model", str(base), "--draft", "ngram"], print)
    assert args.num_draft_tokens is None  # (a drafting flag given: nothing stored applies)
    tuned_store.save_flags(["--tree-top-k", "2", "--tree-depth", "2", "--max-tree-nodes", "5"],
                           device_key(), base)  # fmt: skip
    args = with_stored_tuning(server_parser(), ["--model", str(base)], logged.append)
    assert args.draft is None and "--tree-top-k" in logged[-1] and "does not take" in logged[-1]
    args = with_stored_tuning(chat.setup_arg_parser(), ["--model", str(base)], logged.append)
    assert (args.tree_top_k, args.tree_depth, args.max_tree_nodes) == (2, 2, 5)


def test_a_checkpoint_s_mtp_layer_and_a_drafter_pair_are_stored(tmp_path, store, monkeypatch,
                                                                 capsys):  # fmt: skip
    """A checkpoint whose own MTP layer drafts, and a model with an EAGLE-3 drafter from
    another directory: ``--save`` stores the tuned tree's flags (neither directory written),
    and ``generate`` decodes with them, identical to plain decoding."""
    from eagle_helpers import write_base, write_eagle
    from test_mtp import write_checkpoint

    write_checkpoint(tmp_path / "ckpt", "mimo", seed=3)
    ckpt = tmp_path / "ckpt"
    base = write_base(tmp_path / "base", 32)
    write_eagle(tmp_path / "eagle", 32, layer_ids=[0, 3, 6], scale=1.0)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "t1 t5 t9 t3"}) + "\n")
    before = files_of(ckpt, base, tmp_path / "eagle")

    def chain_of_2(tps, s):
        return 1e6 if s.get("tree_depth") == 2 and s.get("tree_top_k") == 1 else 1.0

    for pair in (
        ["--model", str(ckpt)],
        ["--model", str(base), "--drafter", str(tmp_path / "eagle")],
    ):
        fake_speeds(monkeypatch, chain_of_2)
        tune.main([*pair, "--prompts", str(tmp_path / "p.jsonl"), "--num-prompts", "1",
                   "--max-tokens", "8", "--confirm-rounds", "0", "--save"])  # fmt: skip
        assert "saved for this device" in capsys.readouterr().out
        monkeypatch.undo()
        monkeypatch.setenv(tuned_store.STORE_VARIABLE, str(store))
        calls = spy_generations(monkeypatch)
        gen.main([*pair, "--prompt", "t1 t5 t9 t3", "--max-tokens", "10",
                  "--ignore-chat-template", "--compare-plain"])  # fmt: skip
        out = capsys.readouterr().out
        assert calls[-1]["tree_depth"] == 2 and calls[-1]["tree_top_k"] == 1, out
        assert "Output identical to plain decoding: yes" in out
        monkeypatch.undo()
        monkeypatch.setenv(tuned_store.STORE_VARIABLE, str(store))
    assert files_of(ckpt, base, tmp_path / "eagle") == before
    assert len(json.loads(store.read_text())["choices"]) == 2


def test_save_refusals(tmp_path, store, prompts, capsys):
    """Batches are stored in a model directory's config only; a --dtype other than the
    model's is refused as for a model directory."""
    base = write_model(tmp_path / "plain")
    for extra, says in ((["--batch-size", "2"], "--save with --batch-size"),
                        (["--dtype", "float16"], "--dtype float16 with --save")):  # fmt: skip
        with pytest.raises(SystemExit):
            tune.main(["--model", str(base), "--prompts", str(prompts), "--save", *extra])
        assert says in capsys.readouterr().err
    assert not store.exists()


def test_the_server_takes_a_stored_no_speculation(tmp_path, store):
    """A stored ``--no-speculation`` reaches the server (its ``--no-speculation``: the default
    of a request's ``speculative``): a plain model then loads, and a draft-model pair serves
    requests one token a pass, as mlx-lm, unless a request asks for speculation (control:
    the same draft model's drafts accepted then)."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate as mlx_lm_generate
    from test_server import post

    from mlx_specstream.cli_args import load_draft_model, load_model, with_stored_tuning
    from mlx_specstream.server import make_server
    from mlx_specstream.server import setup_arg_parser as server_parser

    base, same = write_model(tmp_path / "plain"), write_model(tmp_path / "same")
    tuned_store.save_flags(["--no-speculation"], device_key(), base)
    args = with_stored_tuning(server_parser(), ["--model", str(base)], print)
    assert args.no_speculation
    load_model(args)  # (a plain model loads for plain decoding)
    tuned_store.save_flags(["--no-speculation"], device_key(), base, draft_model=same)
    args = with_stored_tuning(server_parser(), ["--model", str(base), "--draft-model", str(same)])
    model, tok = load_model(args)
    server = make_server(model, tok, "plain", port=0, draft_model=load_draft_model(args, tok),
                         no_speculation=args.no_speculation, max_tokens=24)  # fmt: skip
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    prompt = "t3 t4 t5 t3 t4 t5 t3 t4 t5 t3"
    plain, ptok = mlx_lm_load(str(base))
    want = mlx_lm_generate(plain, ptok, prompt=ptok.encode(prompt), max_tokens=24)
    drafted = []
    try:
        for extra in ({}, {"speculative": True}):
            body = {"prompt": prompt, "max_tokens": 24, **extra}
            status, payload = post(url + "/completions", json.dumps(body).encode())
            assert status == 200 and payload["choices"][0]["text"] == want
            drafted.append(payload["usage"]["speculative"]["accepted_draft_tokens"])
    finally:
        server.shutdown()
        server.server_close()
    assert drafted[0] == 0 and drafted[1] > 0


def test_tune_lists_and_forgets_what_it_stored(tmp_path, store, capsys):
    """``tune --stored`` lists every entry (model, pair, device, flags); ``tune --model M
    --forget`` removes this device's entry for M alone (its pair's stays), and says when
    there was none; generate then finds nothing for M."""
    a, b = write_model(tmp_path / "a"), write_model(tmp_path / "b", seed=3)
    tune.main(["--stored"])
    assert f"0 tuning(s) stored in {store}" in capsys.readouterr().out
    tuned_store.save_flags(["--draft", "ngram"], device_key(), a, measured={"tokens_per_second": 5})
    tuned_store.save_flags(["--num-draft-tokens", "2"], device_key(), a, draft_model=b)
    tuned_store.save_flags(["--no-speculation"], "gpu:Other", a)
    tune.main(["--stored"])
    out = capsys.readouterr().out
    assert f"3 tuning(s) stored in {store}" in out
    assert (
        f"- {a.resolve()} on {device_key()}: --draft ngram (saved " in out and "5.0 tokens/s" in out
    )
    assert (
        f"- {a.resolve()} with draft model {b.resolve()} on {device_key()}: --num-draft-tokens 2"
        in out
    )
    tune.main(["--model", str(a), "--forget"])
    assert "[INFO] removed for" in capsys.readouterr().out
    tune.main(["--model", str(a), "--forget"])
    assert "[INFO] nothing stored for" in capsys.readouterr().out
    assert tuned_store.find_flags(device_key(), a) == (None, None)
    assert tuned_store.find_flags(device_key(), a, draft_model=b)[0] == ["--num-draft-tokens", "2"]
    assert tuned_store.find_flags("gpu:Other", a)[0] == ["--no-speculation"]

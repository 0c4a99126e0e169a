"""The generate CLI and the server take mlx-lm's flags, with mlx-lm's defaults, and
act on them: adapters, extra EOS tokens, prefill chunks, XTC and min-p settings,
and mlx_lm.cache_prompt's prompt-cache files."""

import sys

import pytest
from helpers import tiny_spec_model, word_tokenizer

from mlx_specstream import save
from mlx_specstream.generate import setup_arg_parser

# The module itself (the package exports a function of the same name).
gen_mod = sys.modules["mlx_specstream.generate"]

V = 48
# mlx-lm's flags that these commands do not take, and why (a new one fails the test).
NOT_OURS = {
    "--image": "mlx-lm's vision models are not drafted for",
    "--quantize-activations": "an option of mlx-lm's own quantized kernels' experiments",
}
CHAT_NOT_OURS = {"--pipeline": "mlx-lm's distributed pipeline parallelism"}
# Flags whose defaults are ours, and why.
OWN_DEFAULTS = {
    "--model": "the embedded model",
    "--prompt": "a prompt the embedded model knows",
    "--max-tokens": "a length that shows the embedded model's speed",
    "--num-draft-tokens": "None: prompt lookup's longest draft, 10, as transformers'; with "
    "--draft-model mlx-lm's 3",
}
SERVER_NOT_OURS = {
    "--pipeline": "mlx-lm's distributed pipeline parallelism",
}


def flags_of(parser):
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def check_parity(ours, theirs, not_ours, command):
    """Every flag of mlx-lm's ``command`` is ours (but ``not_ours``), with its default."""
    ours, theirs = flags_of(ours), flags_of(theirs)
    missing = sorted(set(theirs) - set(ours) - set(not_ours))
    assert not missing, f"{command} flags we do not take: {missing}"
    differ = [
        (f, ours[f].default, a.default)
        for f, a in theirs.items()
        if f in ours and f not in OWN_DEFAULTS and ours[f].default != a.default
    ]
    assert not differ, f"defaults that differ from {command}'s: {differ}"


def test_every_mlx_lm_generate_and_chat_flag_is_ours_with_its_default():
    from mlx_lm.chat import setup_arg_parser as mlx_lm_chat_parser
    from mlx_lm.generate import setup_arg_parser as mlx_lm_parser

    from mlx_specstream.chat import setup_arg_parser as chat_parser

    check_parity(setup_arg_parser(), mlx_lm_parser(), NOT_OURS, "mlx_lm.generate")
    check_parity(chat_parser(), mlx_lm_chat_parser(), CHAT_NOT_OURS, "mlx_lm.chat")


def test_every_mlx_lm_server_flag_is_ours_with_its_default(monkeypatch):
    import argparse

    import mlx_lm.server

    from mlx_specstream.server import setup_arg_parser as server_parser

    class Built(Exception):  # mlx_lm.server builds its parser inside main()
        pass

    def capture(parser, *a, **k):
        raise Built(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Built) as built:
        mlx_lm.server.main()
    monkeypatch.undo()
    check_parity(server_parser(), built.value.args[0], SERVER_NOT_OURS, "mlx_lm.server")


def test_cli_flags_reach_the_loader_the_tokenizer_and_the_sampler(tmp_path, monkeypatch):
    seen = {}

    def record(model, tok, prompt, **kw):
        seen.update(kw, eos=set(tok.eos_token_ids), prompt=prompt)
        return "", None

    def fake_load(path, **kw):
        seen["load"] = kw
        return tiny_spec_model("llama", vocab_size=V), word_tokenizer(V, eos=V - 1)

    monkeypatch.setattr(gen_mod, "_generate", record)
    monkeypatch.setattr("mlx_specstream.utils.load", fake_load)
    gen_mod.main(
        ["--prompt", "t1 t2", "--adapter-path", "adapters", "--trust-remote-code",
         "--extra-eos-token", "t7", "t9", "--prefill-step-size", "64", "--temp", "0.8",
         "--min-p", "0.05", "--min-tokens-to-keep", "3", "--xtc-probability", "0.4",
         "--xtc-threshold", "0.2", "--tree-depth", "2"]
    )  # fmt: skip
    assert seen["load"]["adapter_path"] == "adapters"
    assert seen["load"]["tokenizer_config"] == {"trust_remote_code": True}
    assert seen["eos"] == {V - 1, 7, 9}
    assert seen["prefill_step_size"] == 64
    s = seen["sampler"]
    assert (s.temp, s.min_p, s.min_tokens_to_keep) == (0.8, 0.05, 3)
    assert (s.xtc_probability, s.xtc_threshold) == (0.4, 0.2)
    assert set(s.xtc_special_tokens) == {V - 1, 7, 9}  # the EOS tokens (no "\n" in this vocab)


@pytest.mark.parametrize(
    "flags, want",
    [
        ([], {"max_tree_nodes": None}),  # (None: the model's own cap)
        (["--max-tree-nodes", "5", "--dynamic-tree"], {"max_tree_nodes": 5, "dynamic_tree": True}),
        (["--no-dynamic-tree"], {"max_tree_nodes": None, "dynamic_tree": False}),
    ],
)
def test_tree_flags_reach_the_generator_as_given(monkeypatch, flags, want):
    """``--max-tree-nodes`` and ``--dynamic-tree`` / ``--no-dynamic-tree`` (from
    ``add_draft_args``, as chat's): their values, and no ``dynamic_tree`` unless given."""
    seen = {}
    monkeypatch.setattr(gen_mod, "_generate", lambda m, t, p, **kw: seen.update(kw) or ("", None))
    monkeypatch.setattr(
        "mlx_specstream.utils.load",
        lambda path, **kw: (tiny_spec_model("llama", vocab_size=V), word_tokenizer(V, eos=V - 1)),
    )
    gen_mod.main(["--prompt", "t1 t2", *flags])
    assert {k: seen[k] for k in ("max_tree_nodes", "dynamic_tree") if k in seen} == want


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """A lossless stream model directory and an ``mlx_lm.cache_prompt`` file of a prefix."""
    import mlx_lm.cache_prompt

    model = tiny_spec_model(
        "llama",
        vocab_size=V,
        num_streams=3,
        top_k=2,
        weight_scale=6.0,
        model_args=dict(num_attention_heads=2, num_key_value_heads=1),  # head_dim 32
    )
    path = save(tmp_path / "m", model, word_tokenizer(V, eos=V + 5))
    cache_file = tmp_path / "prefix.safetensors"
    prefix = " ".join(f"t{i}" for i in (3, 17, 9, 30, 12, 5, 41, 22, 8, 19, 33, 2))
    argv = ["cache_prompt", "--model", str(path), "--prompt", prefix,
            "--prompt-cache-file", str(cache_file)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    mlx_lm.cache_prompt.main()
    return path, cache_file


def run_cli(monkeypatch, argv):
    """The text of ``main(argv)`` and what it printed about plain decoding."""
    out = {}
    real = gen_mod._generate

    def keep(*a, **kw):
        out["text"], response = real(*a, **kw)
        return out["text"], response

    monkeypatch.setattr(gen_mod, "_generate", keep)
    gen_mod.main(argv)
    return out["text"]


def test_prompt_cache_file_continues_as_mlx_lm_does(cached, monkeypatch, capsys):
    from mlx_lm import generate as mlx_lm_generate
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.models.cache import load_prompt_cache

    path, cache_file = cached
    suffix = "t6 t28 t14"
    common = ["--prompt", suffix, "--max-tokens", "40", "--tree-depth", "3", "--tree-top-k", "2"]
    ours = run_cli(monkeypatch, ["--prompt-cache-file", str(cache_file), *common,
                                 "--compare-plain"])  # fmt: skip
    assert "Output identical to plain decoding: yes" in capsys.readouterr().out
    model, tok = mlx_lm_load(str(path))
    want = mlx_lm_generate(
        model, tok, suffix, max_tokens=40, prompt_cache=load_prompt_cache(str(cache_file))
    )
    assert ours == want
    # Negative control: the same prompt without the cached prefix.
    assert run_cli(monkeypatch, ["--model", str(path), *common]) != want


def test_prompt_cache_file_mismatches_are_refused(cached, tmp_path):
    path, cache_file = cached
    with pytest.raises(ValueError, match="made with the model .* not --model"):
        gen_mod.main(["--model", str(tmp_path / "other"), "--prompt-cache-file", str(cache_file)])
    with pytest.raises(ValueError, match="--kv-group-size 64 does not match"):
        import mlx_lm.models.cache as c

        q = [
            layer.to_quantized(group_size=32, bits=8)
            for layer in c.load_prompt_cache(str(cache_file))
        ]
        c.save_prompt_cache(str(tmp_path / "q.safetensors"), q, {"model": str(path),
                                                                   "tokenizer_config": "{}"})  # fmt: skip
        gen_mod.main(["--prompt-cache-file", str(tmp_path / "q.safetensors"), "--kv-bits", "8"])  # fmt: skip


def test_prompt_cache_file_of_a_shared_mode_model_is_refused(tmp_path, monkeypatch):
    import mlx_lm.cache_prompt

    model = tiny_spec_model("llama", vocab_size=V, num_streams=2, mode="shared")
    path = save(tmp_path / "m", model, word_tokenizer(V, eos=V + 5))
    cache_file = tmp_path / "prefix.safetensors"
    argv = ["cache_prompt", "--model", str(path), "--prompt", "t3 t4 t5",
            "--prompt-cache-file", str(cache_file)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    mlx_lm.cache_prompt.main()
    with pytest.raises(ValueError, match="shared-mode"):
        gen_mod.main(["--prompt-cache-file", str(cache_file), "--prompt", "t6"])


def test_prefill_response_continues_the_assistant_message():
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if not loop.last or "
        "add_generation_prompt %}</{{ m['role'] }}>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    hf = word_tokenizer(V, chat_template=template)._tokenizer

    class Recording:  # the template's text, as the tokenizer is given it
        has_chat_template, chat_template, texts = True, template, []
        apply_chat_template = staticmethod(hf.apply_chat_template)

        def encode(self, text, **kw):
            self.texts.append(text)
            return []

    tok = Recording()
    for argv, want in [
        (["--prefill-response", "t2 t3"], "<user>t1</user><assistant>t2 t3"),
        ([], "<user>t1</user><assistant>"),
    ]:
        tok.texts.clear()
        gen_mod.chat_prompt(tok, setup_arg_parser().parse_args(["--prompt", "t1", *argv]))
        assert tok.texts == [want]


def test_python_m_mlx_specstream_runs_a_command_and_every_script_has_a_main():
    """``python -m mlx_specstream generate ...`` as ``python -m mlx_lm generate``; every
    console script of pyproject.toml names a module's ``main``; a typo is refused."""
    import subprocess
    from importlib.metadata import entry_points
    from pathlib import Path

    from mlx_specstream.cli import COMMANDS

    root = Path(__file__).resolve().parents[1]
    scripts = {
        e.name: e
        for e in entry_points(group="console_scripts")
        if e.name.startswith("mlx_specstream.")
    }  # (as installed from pyproject.toml)
    assert sorted(scripts) == sorted(f"mlx_specstream.{c}" for c in COMMANDS)
    for name, entry in scripts.items():
        assert entry.value == f"{name}:main" and callable(entry.load())
    run = [sys.executable, "-m", "mlx_specstream"]
    out = subprocess.run(run + ["generate", "--prompt", "def f(x):", "--max-tokens", "4"],
                         capture_output=True, text=True, timeout=300, cwd=root)  # fmt: skip
    assert out.returncode == 0 and "Generation: 4 tokens" in out.stdout, out.stderr[-2000:]
    out = subprocess.run(run + ["generat"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "unknown command 'generat'" in out.stderr

"""generate.py: the speculative figures that --verbose prints (the same ones as the
server's ``usage.speculative``), and ``draft=`` passed through only when set."""

import sys

import pytest
from helpers import tiny_spec_model, word_tokenizer

from mlx_specstream.generate import SpeculativeUsage, generate, setup_arg_parser, stream_generate

# The module itself: ``import mlx_specstream.generate as m`` can give the function
# of the same name, which the package exports lazily.
gen_mod = sys.modules["mlx_specstream.generate"]

V = 64


def test_verbose_prints_the_counted_figures(capsys):
    """Passes, accepted draft tokens and tokens per pass, counted here from the
    responses. Control: without speculation, one pass per token and no drafts."""
    model, tok = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2), word_tokenizer(V)
    ids = tok.encode("t3 t4 t5")
    rs = list(stream_generate(model, tok, ids, max_tokens=24))
    passes, accepted = rs[-1].forward_passes, sum(r.from_draft for r in rs)
    assert accepted > 0 and passes < len(rs)
    usage = SpeculativeUsage()
    for r in rs:
        usage.add(r)
    assert usage.as_dict() == {
        "forward_passes": passes,
        "accepted_draft_tokens": accepted,
        "tokens_per_pass": round(len(rs) / passes, 4),
        "batched_tokens": 0,
    }
    generate(model, tok, ids, max_tokens=24, verbose=True)
    line = (
        f"Forward passes: {passes}, accepted draft tokens: {accepted}, "
        f"{len(rs) / passes:.2f} tokens per forward pass"
    )
    assert line in capsys.readouterr().out
    generate(model, tok, ids, max_tokens=24, verbose=True, speculative=False)
    out = capsys.readouterr().out
    assert line not in out
    assert "Forward passes: 24, accepted draft tokens: 0, 1.00 tokens per forward pass" in out


def test_draft_is_passed_on_only_when_set(monkeypatch):
    seen = []
    real = gen_mod.spec_generate_step

    def recording(prompt, model, **kwargs):
        seen.append(kwargs)
        return real(prompt, model, **kwargs)

    monkeypatch.setattr(gen_mod, "spec_generate_step", recording)
    model, tok = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2), word_tokenizer(V)
    want = generate(model, tok, "t3 t4 t5 t3 t4", max_tokens=12)
    assert "draft" not in seen[-1]
    assert generate(model, tok, "t3 t4 t5 t3 t4", max_tokens=12, draft="ngram") == want
    assert seen[-1]["draft"] == "ngram"
    with pytest.raises(ValueError, match="draft='typo'"):
        generate(model, tok, "t3", max_tokens=4, draft="typo")


def test_cli_draft_flag():
    assert setup_arg_parser().parse_args([]).draft is None
    assert setup_arg_parser().parse_args(["--draft", "streams+ngram"]).draft == "streams+ngram"
    with pytest.raises(SystemExit):
        setup_arg_parser().parse_args(["--draft", "typo"])


def test_cli_kv_cache_flags_match_mlx_lm_and_reach_generate(monkeypatch):
    from mlx_lm.generate import setup_arg_parser as mlx_lm_parser

    flags = ["--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "7"]
    ours, theirs = setup_arg_parser(), mlx_lm_parser()
    for dest in ("kv_bits", "kv_group_size", "quantized_kv_start", "max_kv_size"):
        assert getattr(ours.parse_args([]), dest) == getattr(theirs.parse_args([]), dest), dest
        assert getattr(ours.parse_args(flags), dest) == getattr(theirs.parse_args(flags), dest)
    seen = {}
    monkeypatch.setattr(
        gen_mod, "_generate", lambda model, tok, prompt, **kw: seen.update(kw) or ("", None)
    )
    gen_mod.main(["--prompt", "x", "--max-tokens", "2", "--max-kv-size", "512", *flags])
    assert (seen["kv_bits"], seen["kv_group_size"], seen["quantized_kv_start"]) == (8, 32, 7)
    assert seen["max_kv_size"] == 512


def test_cli_runs_a_plain_mlx_lm_model_with_prompt_lookup(tmp_path, monkeypatch, capsys):
    """``--draft ngram`` on a plain mlx-lm directory loads it with the verifier only;
    without it the directory is refused, naming the way to decode it."""
    from test_train import write_base

    base = write_base(tmp_path / "plain")
    seen = {}

    def record(model, tok, prompt, **kw):
        seen.update(kw, runtime=type(model.speculative_streams.config).__name__)
        return "", None

    monkeypatch.setattr(gen_mod, "_generate", record)
    args = ["--model", str(base), "--prompt", "t1 t2 t3 t1 t2", "--max-tokens", "4"]
    gen_mod.main(args + ["--draft", "ngram", "--num-draft-tokens", "4"])
    assert seen["draft"] == "ngram" and seen["num_draft_tokens"] == 4
    assert seen["runtime"] == "VerifierConfig" and "ngram_candidates" not in seen
    gen_mod.main(args + ["--draft", "ngram", "--ngram-candidates", "3"])
    assert seen["ngram_candidates"] == 3
    with pytest.raises(ValueError, match="--draft ngram"):
        gen_mod.main(args)


def test_a_plain_model_decodes_with_lookup_as_mlx_lm(tmp_path):
    from mlx_lm import generate as mlx_lm_generate
    from test_train import write_base

    from mlx_specstream.utils import load

    model, tok = load(str(write_base(tmp_path / "plain")), allow_plain=True)
    prompt = "t1 t2 t3 t1 t2 t3 t1"
    want = mlx_lm_generate(model, tok, prompt, max_tokens=16)
    assert generate(model, tok, prompt, max_tokens=16, draft="ngram", num_draft_tokens=4) == want


def test_mlx_lm_arguments_this_decoder_does_not_take_are_refused_by_name():
    """``draft_model`` is taken as mlx-lm takes it (its text is mlx-lm's with the same
    draft model); input embeddings are refused, naming the argument."""
    import mlx.core as mx
    from helpers import tiny_model
    from mlx_lm import generate as mlx_lm_generate

    model, tok = tiny_spec_model("llama", vocab_size=V), word_tokenizer(V)
    assert generate(model, tok, "t3 t4", max_tokens=4, draft_model=None)
    draft = tiny_model("llama", vocab_size=V, seed=7)
    want = mlx_lm_generate(model, tok, "t3 t4", max_tokens=12, draft_model=draft)
    assert generate(model, tok, "t3 t4", max_tokens=12, draft_model=draft) == want
    with pytest.raises(ValueError, match="input_embeddings"):
        generate(model, tok, "t3 t4", max_tokens=4, input_embeddings=mx.zeros((2, 64)))

"""``python -m mlx_specstream.chat``: ``mlx_lm.chat`` with our decoder. A scripted
conversation (with a reset) answers exactly as mlx_lm.chat answers it on the same
weights; the negative control feeds each turn to a cache one token short."""

import sys

import pytest
from helpers import tiny_spec_model, word_tokenizer
from mlx_lm.cli_ui import ChatUI

from mlx_specstream import save
from mlx_specstream.cache import trim_prompt_cache

chat_mod = pytest.importorskip("mlx_specstream.chat")

V = 64
TEMPLATE = "{% for m in messages %}t1 {{ m['content'] }} {% endfor %}t2"
QUERIES = ["t10 t33 t46", "t20 t5", "t7", "r", "t10 t33 t46", "h", "q"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, weight_scale=6.0)
    tok = word_tokenizer(V, eos=V - 1, chat_template=TEMPLATE)
    return save(tmp_path_factory.mktemp("chat") / "m", model, tok)


def converse(monkeypatch, run):
    """The answers of one scripted conversation, one string per turn."""
    queries, answers = iter(QUERIES), [""]
    monkeypatch.setattr(ChatUI, "prompt", lambda self: next(queries))
    monkeypatch.setattr(
        ChatUI, "stream_token", lambda self, text: answers.__setitem__(-1, answers[-1] + text)
    )
    monkeypatch.setattr(ChatUI, "end_turn", lambda self, response: answers.append(""))
    run()
    return answers[:-1]


def test_a_conversation_answers_as_mlx_lm_chat(model_dir, monkeypatch, capsys):
    import mlx_lm.chat

    argv = ["--model", str(model_dir), "--max-tokens", "20", "--system-prompt", "t3"]
    monkeypatch.setattr(sys, "argv", ["mlx_lm.chat", *argv])
    want = converse(monkeypatch, mlx_lm.chat.main)
    assert len(want) == 4 and want[0] == want[3]  # (the reset starts afresh)
    assert all(want) and want[1] != want[2]
    for extra in ([], ["--tree-depth", "3", "--tree-top-k", "2"], ["--no-speculation"],
                  ["--draft", "ngram"], ["--draft-model", str(model_dir)]):  # fmt: skip
        got = converse(monkeypatch, lambda: chat_mod.main(argv + extra))
        assert got == want, extra
    assert "tokens per forward pass" in capsys.readouterr().out

    # Negative control: each turn fed to a cache that lost the last answer's final token.
    generate = chat_mod.stream_generate

    def one_short(*args, prompt_cache, **kwargs):
        trim_prompt_cache(prompt_cache, 1 if prompt_cache[0].offset else 0)
        return generate(*args, prompt_cache=prompt_cache, **kwargs)

    monkeypatch.setattr(chat_mod, "stream_generate", one_short)
    got = converse(monkeypatch, lambda: chat_mod.main(argv + ["--tree-depth", "3"]))
    assert got[0] == want[0] and got[1:3] != want[1:3]


def test_a_recurrent_model_converses_as_mlx_lm_chat(tmp_path, monkeypatch):
    """A hybrid model (recurrent and attention layers) with ``--draft ngram`` or a draft
    model (itself): the same answers as mlx_lm.chat, turn after turn on one cache, reset
    included."""
    import mlx_lm.chat
    from helpers import HYBRID_ARGS, tiny_hybrid
    from mlx_lm.utils import save_config, save_model

    path = tmp_path / "hybrid"
    path.mkdir()
    save_model(path, tiny_hybrid("qwen3_next", vocab_size=V))
    save_config({**HYBRID_ARGS["qwen3_next"], "vocab_size": V, "model_type": "qwen3_next"},
                path / "config.json")  # fmt: skip
    word_tokenizer(V, eos=V - 1, chat_template=TEMPLATE).save_pretrained(str(path))
    argv = ["--model", str(path), "--max-tokens", "20"]
    monkeypatch.setattr(sys, "argv", ["mlx_lm.chat", *argv])
    want = converse(monkeypatch, mlx_lm.chat.main)
    assert len(want) == 4 and want[0] == want[3] and want[1] != want[2]
    for extra in (["--draft", "ngram"], ["--draft-model", str(path)]):
        assert converse(monkeypatch, lambda: chat_mod.main(argv + extra)) == want, extra


@pytest.mark.parametrize(
    "flags, want",
    [
        ([], {}),  # (nothing passed: the model's own settings apply)
        (["--max-tree-nodes", "5", "--dynamic-tree"], {"max_tree_nodes": 5, "dynamic_tree": True}),
        (["--no-dynamic-tree"], {"dynamic_tree": False}),
    ],
)
def test_tree_flags_reach_the_generator_only_when_given(model_dir, monkeypatch, flags, want):
    """``--max-tree-nodes`` and ``--dynamic-tree`` / ``--no-dynamic-tree``, generate's
    flags: each turn's ``stream_generate`` gets their exact values, and nothing when omitted."""
    seen, queries = [], iter(["t7", "q"])
    monkeypatch.setattr(ChatUI, "prompt", lambda self: next(queries))
    monkeypatch.setattr(chat_mod, "stream_generate", lambda *a, **kw: seen.append(kw) or iter(()))
    chat_mod.main(["--model", str(model_dir), *flags])
    assert len(seen) == 1
    assert {k: seen[0][k] for k in ("max_tree_nodes", "dynamic_tree") if k in seen[0]} == want

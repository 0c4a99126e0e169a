"""``examples/``: what each example shows still works."""

import importlib.util
from pathlib import Path

from helpers import plain_greedy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embed_in_app(capsys):
    """The app's completer streams plain decoding's text, cancels when asked, and
    serves again afterwards; the script runs end to end."""
    app = load_example("embed_in_app").CodeCompleter()
    pieces = []
    result = app.complete("def read_config(path):\n", max_tokens=24, on_text=pieces.append)
    prompt = app.tokenizer.encode("def read_config(path):\n")
    assert result["text"] == "".join(pieces)
    assert result["text"] == app.tokenizer.decode(plain_greedy(app.model, prompt, 24))
    assert not result["cancelled"] and result["tokens"] == 24
    result = app.complete("class Cache:\n", max_tokens=500, should_stop=lambda: True)
    assert result["cancelled"] and result["tokens"] == 1
    assert app.complete("class Cache:\n", max_tokens=8)["tokens"] == 8
    load_example("embed_in_app").main()
    out = capsys.readouterr().out
    assert "cancelled=True" in out and "request 2: " in out

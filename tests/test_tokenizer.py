"""The build's tokenizer (``convert.tokenizer``): SentencePiece BPE with byte fallback,
saved for transformers, round-trips code exactly, with and without newline pieces."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")

from convert.tokenizer import NEWLINE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Forty small standard-library modules as a training corpus, eight more held out."""
    d = tmp_path_factory.mktemp("tok")
    std = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(std.glob("*.py"), key=lambda p: (p.stat().st_size, p.name))
    files = [p for p in files if p.stat().st_size > 2000][:48]
    for name, part in (("train.jsonl", files[:40]), ("eval.jsonl", files[40:])):
        with open(d / name, "w") as f:
            for p in part:
                f.write(json.dumps({"text": p.read_text()}) + "\n")
    return d


def _train(corpus, out, *extra):
    cmd = [sys.executable, "-m", "convert.tokenizer", "--corpus", str(corpus / "train.jsonl"),
           "--out", str(out), "--vocab-size", "600", *extra]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out))


@pytest.mark.parametrize("newline_pieces", [False, True])
def test_round_trips_held_out_code(corpus, tmp_path, newline_pieces):
    extra = ["--newline-pieces"] if newline_pieces else []
    tok = _train(corpus, tmp_path / "tok", *extra)
    texts = [json.loads(line)["text"] for line in open(corpus / "eval.jsonl")]
    texts += ["x = 'é ☃ 𝔘'\r\n\tif a:\n\n\n        pass  \n", "\n\n", "", " "]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    vocab = tok.get_vocab()
    starts = [p for p in vocab if p.startswith(NEWLINE)]
    assert bool(starts) == newline_pieces  # a newline starts pieces only when asked


def test_newline_pieces_take_fewer_tokens_and_name_their_one_exception(corpus, tmp_path):
    plain = _train(corpus, tmp_path / "plain")
    nl = _train(corpus, tmp_path / "nl", "--newline-pieces")
    texts = [json.loads(line)["text"] for line in open(corpus / "eval.jsonl")]

    def count(tok):
        return sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)

    assert count(nl) < count(plain)
    # The documented exception: U+E000 in the text comes back as a newline.
    text = f"a{NEWLINE}b"
    assert nl.decode(nl.encode(text, add_special_tokens=False)) == "a\nb"
    assert plain.decode(plain.encode(text, add_special_tokens=False)) == text


def test_same_tokenizer_from_two_processes_when_sampling_lines(corpus, tmp_path):
    """Fewer --input-sentences than the corpus has lines: the sample is ours and seeded.
    (SentencePiece's own sampling gave a different piece order in each process.)"""
    a = _train(corpus, tmp_path / "a", "--input-sentences", "500", "--newline-pieces")
    b = _train(corpus, tmp_path / "b", "--input-sentences", "500", "--newline-pieces")
    assert a.get_vocab() == b.get_vocab()
    c = _train(corpus, tmp_path / "c", "--input-sentences", "500", "--seed", "1")
    assert c.get_vocab() != a.get_vocab()  # the seed matters: a sample was drawn

"""Trains a SentencePiece BPE tokenizer (byte fallback) and saves it in Hugging
Face format (``tokenizer.json`` + ``tokenizer_config.json``, plus the original
``tokenizer.model``), which ``transformers`` and mlx-lm load.

Run as ``python -m convert.tokenizer --corpus runs/default/corpus/train.jsonl
--out runs/default/tokenizer``. Whitespace is kept exactly (identity
normalisation, no dummy prefix), so indentation round-trips. SentencePiece
trains on lines, so by default a newline is never part of a piece and is encoded
by byte fallback as ``<0x0A>``: one token per line of code.

``--newline-pieces`` lets a newline start a piece, so that the newline and the
next line's indentation (``"\n        "``) can be one token. Newlines become the
private-use character U+E000 (``NEWLINE``) in training and in the tokenizer's
normaliser, and every line is trained as a sentence that starts with it; the
decoder maps it back. Text that itself contains U+E000 decodes with a newline in
its place (the one text that does not round-trip).
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}
NEWLINE = "\ue000"


def train_sentencepiece(
    corpus_jsonl: Path,
    out_dir: Path,
    vocab_size: int = 8000,
    seed: int = 0,
    input_sentences: int = 2_000_000,
    newline_pieces: bool = False,
):
    """Trains on at most ``input_sentences`` lines of the corpus, a seeded random
    sample when it has more (a large corpus would otherwise be cut to its first
    lines, i.e. to the packages that sort first). The sample is drawn here, not by
    SentencePiece, whose own sampling differs from one process to the next."""
    import random

    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in open(corpus_jsonl):
        text = json.loads(line)["text"]
        if newline_pieces:  # every line after the first starts with its newline
            text = text.replace("\n", "\n" + NEWLINE)
        lines.extend(text.split("\n"))
    if len(lines) > input_sentences:
        keep = sorted(random.Random(seed).sample(range(len(lines)), input_sentences))
        lines = [lines[i] for i in keep]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for line in lines:
            f.write(line)
            f.write("\n")
        lines_file = f.name
    spm.SentencePieceTrainer.train(
        input=lines_file,
        model_prefix=str(out_dir / "spm"),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=100000,
        input_sentence_size=0,  # every line of the file: the sample above
        shuffle_input_sentence=False,
        seed_sentencepiece_size=1_000_000,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    Path(lines_file).unlink()
    return out_dir / "spm.model"


def bpe_merges(vocab: dict) -> list:
    """BPE merges of a SentencePiece vocabulary: each piece's splits into two
    pieces of the vocabulary, ordered by the merged piece's rank."""
    merges = []
    for piece, rank in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def to_hf(spm_model: Path, out_dir: Path, newline_pieces: bool = False):
    """Writes a ``PreTrainedTokenizerFast`` equivalent of ``spm_model``."""
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=bpe_merges({p: i for p, i in vocab.items() if not sp.is_byte(i)}),
            unk_token=SPECIALS["unk"],
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    if newline_pieces:
        # Training sentences were lines that start with their newline: split before each.
        tok.normalizer = normalizers.Sequence(
            [normalizers.Replace("\n", NEWLINE), normalizers.Replace(" ", "\u2581")]
        )
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(NEWLINE), behavior="merged_with_next")
        steps = [decoders.Replace("\u2581", " "), decoders.Replace(NEWLINE, "\n")]
    else:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        # Sentences were lines in training: keep each newline a piece of its own.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n"), behavior="isolated")
        steps = [decoders.Replace("\u2581", " ")]
    tok.decoder = decoders.Sequence([*steps, decoders.ByteFallback(), decoders.Fuse()])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=SPECIALS["unk"],
        bos_token=SPECIALS["bos"],
        eos_token=SPECIALS["eos"],
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(out_dir))
    return hf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="runs/default/corpus/train.jsonl")
    parser.add_argument("--out", default="runs/default/tokenizer")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument(
        "--input-sentences", type=int, default=2_000_000, help="Lines sampled for training"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--newline-pieces",
        action="store_true",
        help="Let a newline and the next line's indentation form one token",
    )
    args = parser.parse_args()
    out = Path(args.out)
    train_sentencepiece(
        Path(args.corpus), out, args.vocab_size, args.seed, args.input_sentences,
        args.newline_pieces,
    )  # fmt: skip
    (out / "spm.model").rename(out / "tokenizer.model")
    (out / "spm.vocab").unlink()
    hf = to_hf(out / "tokenizer.model", out, args.newline_pieces)
    sample = "def f(x):\n    return x  # done\n"
    assert hf.decode(hf.encode(sample)) == sample, "tokenizer does not round-trip code"
    print(f"vocab {len(hf)}; '{sample!r}' -> {len(hf.encode(sample))} tokens")


if __name__ == "__main__":
    main()

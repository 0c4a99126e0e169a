"""The code recipe's tokenizer figures: characters per token, byte-fallback share and
exact round trips, for one or more tokenizers on a corpus; and the time the fine-tune's
reader takes to tokenize text rows, batched against one text at a time.

``python benchmarks/tokenizer_figures.py --corpus runs/code/corpus --tokenizers
runs/code/tokenizer runs/code/tokenizer-nl`` (tokenizers from ``convert.tokenizer``,
without and with ``--newline-pieces``). Prints one JSON line per figure.
"""

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert.finetune import _windows, encode_batched, read_examples  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="runs/code/corpus")
    p.add_argument("--tokenizers", nargs="+", required=True)
    p.add_argument("--reader-files", type=int, default=3000, help="Training files timed")
    args = p.parse_args()
    from transformers import AutoTokenizer

    corpus = Path(args.corpus)
    texts = {
        s: [json.loads(l)["text"] for l in open(corpus / f"{s}.jsonl")] for s in ("eval", "train")
    }
    for name in args.tokenizers:
        tok = AutoTokenizer.from_pretrained(name)
        for split, t in texts.items():
            enc = list(encode_batched(tok, t, add_special_tokens=False, split_special_tokens=True))
            n, c = sum(map(len, enc)), sum(map(len, t))
            row = dict(tokenizer=name, split=split, tokens=n, chars=c, chars_per_token=round(c / n, 3),
                       byte_fallback=sum(1 for e in enc for i in e if 3 <= i < 259))  # fmt: skip
            if split == "eval":
                row["round_trip_failures"] = sum(tok.decode(e) != x for e, x in zip(enc, t))
            print(json.dumps(row), flush=True)
    # The fine-tune's reader: text rows batched, against one text at a time.
    tok = AutoTokenizer.from_pretrained(args.tokenizers[0])
    with tempfile.TemporaryDirectory() as d:
        sub = Path(d) / "sub.jsonl"
        with open(sub, "w") as f:
            f.writelines(itertools.islice(open(corpus / "train.jsonl"), args.reader_files))
        tic = time.perf_counter()
        ref = []
        for line in open(sub):
            ref += _windows(tok.encode(json.loads(line)["text"]), 256, 0)
        one = time.perf_counter() - tic
        tic = time.perf_counter()
        got = read_examples([str(sub)], tok, 256, 0)
        batched = time.perf_counter() - tic
        chars = sum(len(json.loads(l)["text"]) for l in open(sub))
    print(json.dumps(dict(reader_files=args.reader_files, chars=chars, one_at_a_time_s=round(one, 1),
                          batched_s=round(batched, 1), same_examples=ref == got)))  # fmt: skip


if __name__ == "__main__":
    main()

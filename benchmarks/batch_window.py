"""A batch of rows speculating on a sliding-window model, past its window: the KV bytes
its window layers hold and its speed, against mlx-lm's ``batch_generate``.

    python benchmarks/batch_window.py [--shape gemma3-small] [--dtype f32] [--batch 4]
        [--prompt-tokens 512] [--max-tokens 128] [--rounds 2] [--tag cpu]

Random weights of a Gemma 3 shape (window layers and global layers); each row's prompt
is a random stretch of tokens repeated (so prompt lookup drafts), longer than the
window. Ways, in the same run, on the same weights:

* **mlx-lm batch_generate**: its rotating batch caches (a window layer holds its window);
* **ours, lookup**: ``mlx_specstream.batch_generate(draft="ngram")``: each window layer's
  ragged cache drops the columns 2 windows behind its shortest row
  (``RaggedKVCache.forget``);
* **ours, lookup, whole context**: the same with ``forget`` off (what the batch held
  before session 30: every position of every row).

Figures: generated tokens per second of the whole batch (prefill included), × mlx-lm,
whether every row equals mlx-lm's one-at-a-time greedy tokens, and the KV bytes of the
batch's window layers after its last pass (mlx-lm's rotating caches hold one window). Results go to
``benchmarks/results/batch_window[-TAG].{md,json}``.
"""

import argparse
import time

import mlx.core as mx
from mlx_lm import batch_generate as mlx_lm_batch_generate
from mlx_lm.generate import generate_step

from mlx_specstream.batch import SpecBatcher, batch_generate
from mlx_specstream.ragged_cache import RaggedKVCache
from report import heading, machine_info, write_results
from shapes import SHAPES, random_model


class _Tokenizer:
    """What both ``batch_generate``s read of a tokenizer: no stop token here."""

    eos_token_ids = set()
    eos_token_id = None

    def decode(self, ids):
        return ""

    def encode(self, text):
        return []


def window_bytes(batcher: SpecBatcher) -> int:
    """KV bytes of the batch's window layers now."""
    return sum(c.nbytes for c in batcher.cache or [] if getattr(c, "window", None))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="gemma3-small", choices=[s for s in SHAPES if "gemma3" in s])
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-draft-tokens", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    model = random_model(args.shape, args.dtype, streams=False)
    window, vocab = SHAPES[args.shape]["sliding_window"], SHAPES[args.shape]["vocab_size"]
    prompts = []
    for b in range(args.batch):
        stretch = mx.random.randint(0, vocab, (96,), key=mx.random.key(b + 1)).tolist()
        prompts.append((stretch * (args.prompt_tokens // 96 + 1))[: args.prompt_tokens])
    n = args.max_tokens
    want = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=n)] for p in prompts]

    peak = {}
    forget = RaggedKVCache.forget
    step = SpecBatcher.step

    def watched(self):  # (the window layers' bytes after each pass; the last is kept)
        out = step(self)
        if self.rows:
            peak["bytes"] = window_bytes(self)
        return out

    def ours(whole: bool):
        SpecBatcher.step = watched
        RaggedKVCache.forget = (lambda self: None) if whole else forget
        peak.clear()
        try:
            r = batch_generate(model, _Tokenizer(), prompts, max_tokens=n, draft="ngram",
                               num_draft_tokens=args.num_draft_tokens, return_token_ids=True)  # fmt: skip
        finally:
            SpecBatcher.step, RaggedKVCache.forget = step, forget
        return r.token_ids, peak["bytes"]

    def theirs():
        r = mlx_lm_batch_generate(model, _Tokenizer(), prompts, max_tokens=n, return_token_ids=True)  # fmt: skip
        return getattr(r, "token_ids", None), None

    ways = {"mlx-lm batch_generate": theirs, "ours: lookup": lambda: ours(False),
            "ours: lookup, whole context": lambda: ours(True)}  # fmt: skip
    results = {}
    for _ in range(args.rounds):
        for name, run in ways.items():
            mx.clear_cache()
            t0 = time.perf_counter()
            tokens, held = run()
            seconds = time.perf_counter() - t0
            r = results.setdefault(name, dict(seconds=[], held_bytes=held))
            r["seconds"].append(seconds)
            r["identical"] = tokens is not None and [list(t) for t in tokens] == want
    base = min(results["mlx-lm batch_generate"]["seconds"])
    rows = []
    for name, r in results.items():
        r["tokens_per_s"] = args.batch * n / min(r["seconds"])
        held = "" if r["held_bytes"] is None else f"{r['held_bytes'] / 2**20:.1f}"
        rows.append(f"| {name} | {r['tokens_per_s']:.1f} | {base / min(r['seconds']):.2f}x | "
                    f"{'yes' if r['identical'] else 'no'} | {held} |")  # fmt: skip
    info = machine_info(shape=args.shape, dtype=args.dtype, window=window, batch=args.batch,
                        prompt_tokens=args.prompt_tokens, max_tokens=n,
                        num_draft_tokens=args.num_draft_tokens)  # fmt: skip
    text = "\n".join(
        [
            heading("A speculative batch past a sliding window", info),
            "",
            f"`{info['command']}`: {args.shape} ({args.dtype}, random weights, window "
            f"{window}), {args.batch} rows of {args.prompt_tokens}-token prompts, {n} tokens "
            "each; lookup drafts.",
            "",
            "| way | tokens/s | × mlx-lm | identical to one at a time | window layers' KV MiB at the end |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    write_results("batch_window", args.tag, text, dict(info=info, results=results))


if __name__ == "__main__":
    main()

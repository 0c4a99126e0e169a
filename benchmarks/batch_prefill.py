"""Prefilling the prompts of a batch together against one at a time, and against
mlx-lm's ``batch_generate``, on the same weights.

    python benchmarks/batch_prefill.py [--model DIR] [--dtype float32] [--batch 1,4,8,16]
        [--lengths 64,256,1024] [--rounds 3] [--tag TAG]

For each batch size K and prompt length L, K prompts of L-16 to L tokens (random
tokens; prefill does not depend on what they say) get one generated token each:

* **ours, together**: ``mlx_specstream.batch_generate(draft=None)``, every row that
  joins prefilled in one pass per ``prefill_step_size`` tokens (each padded to the
  longest), as mlx-lm's batches prefill;
* **ours, one at a time**: the same with ``prefill_batch_size=1``, as rows were
  prefilled before (one pass per row);
* **mlx-lm batch_generate**: its batched prefill (``prefill_batch_size`` 8).

Figure: prompt tokens per second up to the first token of every row (the first
decoding pass included), medians of the rounds. Every row's first token is checked
against the others'. Results go to ``benchmarks/results/batch_prefill[-TAG].{md,json}``.
"""

import argparse
import random
import statistics
import time

import mlx.core as mx
from mlx_lm import batch_generate as mlx_lm_batch_generate

from mlx_specstream.batch import batch_generate
from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.utils import load
from report import heading, machine_info, write_results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_DIR))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", default="1,4,8,16")
    ap.add_argument("--lengths", default="64,256,1024")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    model, tokenizer = load(args.model)
    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    vocab = model.args.vocab_size if hasattr(model, "args") else 1000
    rng = random.Random(0)

    def ours(prompts, **kw):
        res = batch_generate(model, tokenizer, prompts, max_tokens=1, draft=None,
                             return_token_ids=True, **kw)  # fmt: skip
        return res.token_ids

    def mlx_lm(prompts):
        return mlx_lm_batch_generate(model, tokenizer, prompts, max_tokens=1,
                                     return_token_ids=True).token_ids  # fmt: skip

    ways = {
        "ours, together": ours,
        "ours, one at a time": lambda ps: ours(ps, prefill_batch_size=1),
        "mlx-lm batch_generate": mlx_lm,
    }
    rows = []
    for L in [int(x) for x in args.lengths.split(",")]:
        for K in [int(x) for x in args.batch.split(",")]:
            prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(L - 16, L))]
                       for _ in range(K)]  # fmt: skip
            tokens = sum(map(len, prompts))
            for way in ways.values():  # warm-up
                way([p[:16] for p in prompts])
            times, outs = {w: [] for w in ways}, {}
            for _ in range(args.rounds):
                for name, way in ways.items():
                    tic = time.perf_counter()
                    outs[name] = way(prompts)
                    times[name].append(time.perf_counter() - tic)
            same = len({str(o) for o in outs.values()}) == 1
            base = statistics.median(times["ours, one at a time"])
            for name in ways:
                t = statistics.median(times[name])
                row = dict(length=L, batch=K, way=name, prompt_tps=tokens / t, seconds=t,
                           vs_one_at_a_time=base / t, identical=same)  # fmt: skip
                rows.append(row)
                print(f"L={L:5d} K={K:3d} {name:24s} {row['prompt_tps']:9.1f} tok/s  "
                      f"{row['vs_one_at_a_time']:.2f}x  identical={same}", flush=True)  # fmt: skip
    info = machine_info(dtype=args.dtype, rounds=args.rounds)
    lines = [
        heading("Prefilling a batch's prompts together", info),
        "",
        f"`{info['command']}`: K prompts of L-16 to L tokens, one token generated per row; "
        "prompt tokens per second up to every row's first token, medians of the rounds.",
        "",
        "| L | K | way | prompt tokens/s | vs ours, one at a time | identical |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['length']} | {r['batch']} | {r['way']} | {r['prompt_tps']:.1f} | "
                     f"{r['vs_one_at_a_time']:.2f}x | {r['identical']} |")  # fmt: skip
    write_results("batch_prefill", args.tag, "\n".join(lines) + "\n", dict(info, rows=rows))


if __name__ == "__main__":
    main()

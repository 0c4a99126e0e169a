"""Speculation on MLX's CPU backend in float32 and in bfloat16, on one model.

    python benchmarks/cpu_dtype.py [--model DIR --prompts FILE] [--tag stock]
    benchmarks/with_openblas.sh python benchmarks/cpu_dtype.py --tag openblas

MLX's CPU backend hands float32 matrix products to BLAS and multiplies bfloat16
with its own loops. With a fast BLAS a pass over 16 tokens then costs little
more than one in float32, and about 16 in bfloat16; with the reference BLAS of
the Linux wheel, both grow with the rows. This script measures, for each dtype:
c(16) of a plain pass (``benchmark.verify_cost_curve``), greedy tokens/s of
one token per pass, of prompt lookup with 2, 4 and 10 drafts, and of a chain of
3 stream drafts with the stream logits from a head call of their own or from
the pass's own head call (``stream_logits_in_pass``), on the same prompts
(``tune.tokens_per_second``: medians over prompts, mean tau). Every output is
the model's own greedy decoding (the tests check that; timings only here).

This 2-core machine's speed drifts by up to a third between minutes, so each of
``--repeats`` rounds times plain decoding and then every setting, and a
setting's speedup is the median over rounds of its tokens/s over the same
round's plain tokens/s (the tokens/s shown are medians over rounds).
Writes ``benchmarks/results/cpu_dtype[-TAG].{md,json}``.
"""

import argparse
import statistics

import mlx.core as mx
from report import heading, machine_info, write_results

from mlx_specstream import load
from mlx_specstream.benchmark import load_prompts, verify_cost_curve
from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.tune import tokens_per_second

CHAIN = dict(draft="streams", tree_depth=3, tree_top_k=1, max_tree_nodes=4, prune_threshold=0.0)
SETTINGS = {
    "prompt lookup, 2 drafts": dict(draft="ngram", num_draft_tokens=2),
    "prompt lookup, 4 drafts": dict(draft="ngram", num_draft_tokens=4),
    "prompt lookup, 10 drafts": dict(draft="ngram", num_draft_tokens=10),
    "chain of 3 streams, own head call": dict(CHAIN, stream_logits_in_pass=False),
    "chain of 3 streams, logits in the pass": dict(CHAIN, stream_logits_in_pass=True),
}


def spread(ratios):
    """``1.04x`` for one round, ``1.04x [0.92-1.16]`` for several."""
    median = f"{statistics.median(ratios):.2f}x"
    return median if len(ratios) == 1 else f"{median} [{min(ratios):.2f}-{max(ratios):.2f}]"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Model directory (default: the shipped model)")
    p.add_argument("--prompts", default=None, help="JSONL of prompts (default: the model's)")
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="Rounds of plain + every setting")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"])  # fmt: skip
    p.add_argument("--tag", default="")
    args = p.parse_args()
    model_dir = args.model or str(DEFAULT_DIR)
    model, tokenizer = load(model_dir)
    prompts = load_prompts(
        args.prompts or f"{model_dir}/prompts.jsonl", tokenizer, args.num_prompts, 96
    )
    rows = []
    # float32 first, so that bfloat16 sees the same rounding as a fresh load
    for dtype in sorted(args.dtypes, key=["float32", "bfloat16"].index):
        model.set_dtype(getattr(mx, dtype))
        c16 = verify_cost_curve(model, sizes=(1, 16), repeats=5, kinds=("plain",))["plain"][16][1]
        tokens_per_second(model, tokenizer, prompts[:1], 16)  # warm-up
        plains, samples = [], {name: [] for name in SETTINGS}
        for _ in range(args.repeats):
            plain, _ = tokens_per_second(
                model, tokenizer, prompts, args.max_tokens, speculative=False
            )
            plains.append(plain)
            for name, settings in SETTINGS.items():
                tps, tau = tokens_per_second(model, tokenizer, prompts, args.max_tokens, **settings)
                samples[name].append((tps, tau, tps / plain))
                print(f"{dtype} {name}: {tps:.1f} tokens/s ({tps / plain:.2f}x), tau {tau:.2f}")
        row = dict(dtype=dtype, c16=c16, plain=statistics.median(plains), plains=plains, runs={})
        for name, runs in samples.items():
            row["runs"][name] = dict(
                tps=statistics.median(r[0] for r in runs),
                tau=runs[0][1],  # greedy: the same tokens every round
                speedup=statistics.median(r[2] for r in runs),
                speedups=[r[2] for r in runs],
            )
        rows.append(row)
    info = machine_info(model=model_dir, prompts=args.num_prompts, max_tokens=args.max_tokens)
    names = list(SETTINGS)
    lines = [
        heading("Speculation in float32 and bfloat16 on MLX's CPU backend", info),
        "",
        f"`{info['command']}`: {model_dir}, {args.num_prompts} held-out prompts x "
        f"{args.max_tokens} tokens, greedy, {args.repeats} round(s); tokens/s (x plain "
        "decoding in the same dtype and round, median over rounds [lowest-highest]), tau.",
        "",
        "| dtype | c(16) plain | plain tokens/s | " + " | ".join(names) + " |",
        "|---" * (3 + len(names)) + "|",
    ]
    for r in rows:
        cells = [
            f"{r['runs'][n]['tps']:.1f} ({spread(r['runs'][n]['speedups'])}), "
            f"tau {r['runs'][n]['tau']:.2f}"
            for n in names
        ]
        lines.append(
            f"| {r['dtype']} | {r['c16']:.1f} | {r['plain']:.1f} | " + " | ".join(cells) + " |"
        )
    write_results("cpu_dtype", args.tag, "\n".join(lines) + "\n", dict(info=info, rows=rows))


if __name__ == "__main__":
    main()

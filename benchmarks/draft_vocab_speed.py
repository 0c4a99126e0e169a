"""A draft vocabulary (``mlx_specstream.draft_vocab``) on a trained model: tau, speed and
coverage for several sizes, against mlx-lm plain decoding of the same weights.

    benchmarks/with_openblas.sh python benchmarks/draft_vocab_speed.py \
        --data ../runs/mtp/corpus/train.jsonl --sizes 0,4000,2000,1000 --tag openblas
    ... --model ../runs/mtp/ckpt-d3 --tag mtp-openblas    # a model with MTP layers

The draft vocabulary of each size is counted from ``--data`` (the model's training
text), as ``python -m mlx_specstream.draft_vocab`` counts it; size 0 ranks every token.
On the shipped model's held-out prompts, greedy: for each size, mlx-lm's plain
``generate_step`` and ours (a chain of 3 and, for streams, the 16-node tree of top-3)
timed back to back, every output checked against mlx-lm's. Reports tokens/s, the ratio
to mlx-lm, tau and the share of the generated tokens the vocabulary holds. Writes
``benchmarks/results/draft_vocab_speed[-TAG].{md,json}``.
"""

import argparse
import json
import time

import mlx.core as mx
from mlx_lm.generate import generate_step

import mlx_specstream
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.draft_vocab import (
    WINDOW,
    count_tokens,
    coverage,
    head_rows,
    use_draft_vocab,
    vocab_of_examples,
)
from mlx_specstream.train_data import load_examples
from report import heading, machine_info, write_results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="Model directory (default: the shipped one)")
    ap.add_argument("--data", required=True, help="Text to count the tokens of")
    ap.add_argument("--sizes", default="0,4000,2000,1000")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (the best is kept)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    info = machine_info(**vars(args))
    model, tokenizer = mlx_specstream.load(args.model, draft_vocab=False)
    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    rt = model.speculative_streams
    own = "streams" if rt.drafter is None else rt.config.kind
    rows_v = head_rows(model)
    train, _, _ = load_examples([args.data], tokenizer, WINDOW, 0)
    texts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]
    prompts = [mx.array(tokenizer.encode(t)) for t in texts[: args.prompts]]
    N = args.max_tokens
    settings = {f"{own} chain 3": dict(tree_top_k=1, tree_depth=3)}
    if rt.drafter is None:
        settings[f"{own} tree 16 (top-3)"] = dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16)

    def plain(x):
        return [t for t, _ in generate_step(x, model, max_tokens=N)], N

    def ours(s):
        def run(x):
            out = list(spec_generate_step(x, model, max_tokens=N, **s))
            return [t for t, *_ in out], out[-1][3]

        return run

    def timed(run):
        best, outs, passes = None, None, 0
        for _ in range(args.rounds):
            outs, passes, tic = [], 0, time.perf_counter()
            for p in prompts:
                toks, n = run(p)
                outs.append(toks)
                passes += n
            t = time.perf_counter() - tic
            best = t if best is None else min(best, t)
        return best, outs, passes

    for run in [plain] + [ours(s) for s in settings.values()]:  # warm-up
        run(prompts[0][:16])
    _, want, _ = timed(plain)
    generated = count_tokens(want, rows_v)
    results, lines = [], [heading("A draft vocabulary: tau and speed by size", info)]
    lines.append(f"\nCommand: `{info['command']}`\n")
    lines.append(
        f"Model: {args.model or 'the shipped model'} ({own}), {args.dtype}, vocabulary "
        f"{rows_v}; counted from `{args.data}`; {len(prompts)} held-out prompts, {N} tokens "
        "each, greedy. Every output equals mlx-lm's. ratio: mlx-lm plain's time / ours, "
        "timed back to back (best of the rounds). covers: the share of the generated "
        "tokens in the vocabulary.\n"
    )
    lines.append(
        "| draft vocabulary | covers | drafts | tokens/s | mlx-lm tokens/s | ratio | tau |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for size in [int(s) for s in args.sizes.split(",")]:
        ids = None
        if size:
            ids, _, text = vocab_of_examples(train, [], tokenizer, rows_v, size)
            print(text, flush=True)
        use_draft_vocab(model, ids)
        share = 1.0 if ids is None else coverage(generated, ids)
        for name, s in settings.items():
            base_t, _, _ = timed(plain)
            t, outs, passes = timed(ours(s))
            assert outs == want, f"{size}/{name}: output differs from mlx-lm's greedy tokens"
            tokens = sum(len(o) for o in outs)
            row = dict(size=size or rows_v, covers=share, drafts=name, tokens_per_s=tokens / t,
                       plain_tokens_per_s=tokens / base_t, ratio=base_t / t,
                       tau=tokens / passes)  # fmt: skip
            results.append(row)
            lines.append(
                f"| {'every token' if not size else size} | {100 * share:.1f}% | {name} | "
                f"{row['tokens_per_s']:.1f} | {row['plain_tokens_per_s']:.1f} | "
                f"{row['ratio']:.2f}x | {row['tau']:.2f} |"
            )
            print(lines[-1], flush=True)
    path = write_results(
        "draft_vocab_speed", args.tag, "\n".join(lines) + "\n", dict(info=info, rows=results)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

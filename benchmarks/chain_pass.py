"""A chain verified by the plain pass against the same chain verified as a tree, paired.

    python benchmarks/chain_pass.py [--rounds 12] [--tag TAG]
    benchmarks/with_openblas.sh python benchmarks/chain_pass.py --tag openblas

Since e8f0cf7 a draft that is a chain (prompt lookup's, a chain of streams) runs
through the lower layers, and through the upper ones when no stream rows are
inserted, as the plain model's multi-token pass: the model's own causal mask
and RoPE offset. Before, it was verified as any tree: a mask joined to the
prefix each step and RoPE per row. Here the tree path is forced by marking no
layout a chain, in the same process, alternating with the plain path
``--rounds`` times (3 held-out prompts x 64 tokens each), so the drift of a
shared machine falls on both: the figure is the median of the per-round
ratios of the time per step. Outputs are checked against mlx-lm's.
Writes ``benchmarks/results/chain_pass[-TAG].{md,json}``.
"""

import argparse
import statistics

import mlx.core as mx
from mlx_lm.generate import generate_step

import mlx_specstream
import mlx_specstream.layout as layout
from mlx_specstream.benchmark import load_prompts
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.default_model import DEFAULT_DIR
from report import heading, machine_info, time_after_first, write_results

CASES = {
    "n-gram": (dict(draft="ngram"), False),
    "chain 3, split": (dict(tree_top_k=1, tree_depth=3), True),
    "chain 3, fused": (dict(tree_top_k=1, tree_depth=3), False),
}


def step_seconds(model, prompts, want, settings, as_tree):
    """Seconds per step after the first, with every layout a tree when ``as_tree``."""
    layout._layout.cache_clear()
    real_init = layout.TreeLayout.__init__

    def tree_init(self, parents):
        real_init(self, parents)
        self.is_chain = False

    if as_tree:
        layout.TreeLayout.__init__ = tree_init
    try:
        t = passes = 0
        for x, ref in zip(prompts, want):
            dt, dp, out = time_after_first(
                spec_generate_step(x, model, max_tokens=len(ref), **settings)
            )
            t, passes = t + dt, passes + dp
            assert out == ref, "output differs from mlx-lm's"
        return t / passes
    finally:
        layout.TreeLayout.__init__ = real_init
        layout._layout.cache_clear()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    model, tokenizer = mlx_specstream.load()
    prompts = [mx.array(x) for x in load_prompts(DEFAULT_DIR / "prompts.jsonl", tokenizer, 3, 96)]
    want = [[t for t, _ in generate_step(x, model, max_tokens=64)] for x in prompts]
    rt = model.speculative_streams
    rows = []
    for name, (settings, split) in CASES.items():
        rt.split_streams = split
        for as_tree in (True, False):  # warm-up
            step_seconds(model, prompts, want, settings, as_tree)
        pairs = [
            (step_seconds(model, prompts, want, settings, True),
             step_seconds(model, prompts, want, settings, False))
            for _ in range(args.rounds)
        ]  # fmt: skip
        ratios = sorted(b / a for a, b in pairs)
        row = dict(case=name, tree_ms=1e3 * statistics.median(a for a, _ in pairs),
                   plain_ms=1e3 * statistics.median(b for _, b in pairs),
                   ratio=statistics.median(ratios), q1=ratios[len(ratios) // 4],
                   q3=ratios[(3 * len(ratios)) // 4])  # fmt: skip
        rows.append(row)
        print(f"{name:16s} as a tree {row['tree_ms']:.2f} ms, plain pass "
              f"{row['plain_ms']:.2f} ms, ratio {row['ratio']:.3f} "
              f"({row['q1']:.3f}-{row['q3']:.3f})", flush=True)  # fmt: skip
    info = machine_info(rounds=args.rounds)
    lines = [
        heading("A chain as the plain pass or as a tree", info),
        "",
        f"`{info['command']}`: shipped model, 3 held-out prompts x 64 tokens, greedy, "
        f"{args.rounds} alternating rounds; ms per step (medians) and the median per-round "
        "ratio plain pass / as a tree, with its quartiles.",
        "",
        "| draft | as a tree: ms/step | plain pass: ms/step | ratio | quartiles |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['tree_ms']:.2f} | {r['plain_ms']:.2f} | **{r['ratio']:.3f}** | "
        f"{r['q1']:.3f}-{r['q3']:.3f} |"
        for r in rows
    ]
    write_results("chain_pass", args.tag, "\n".join(lines) + "\n", dict(info=info, rows=rows))


if __name__ == "__main__":
    main()

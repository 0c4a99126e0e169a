"""Pipelined against unpipelined decoding, paired, beside mlx-lm's plain decoding.

    python benchmarks/pipeline.py [--models shipped] [--rounds 8] [--tag TAG]
    benchmarks/with_openblas.sh python benchmarks/pipeline.py --tag openblas
    MLX_ENABLE_TF32=0 python benchmarks/pipeline.py --models shipped,qwen2-0.5b,llama-8b --tag gpu

Pipelined, step ``k + 1`` is launched before step ``k``'s host read, from the
tree step ``k`` drafted on the device (``spec_generate_step(pipeline=True)``),
so the host builds one step's graph while the device runs the previous one.
For each model (the shipped default, or a random model of a real shape with
random lossless streams, bf16), each tree (a chain of 3 drafts, a 16-node
top-3 tree, prompt lookup's chain of up to 10), greedy: ``--rounds`` rounds, each timing mlx-lm's
``generate_step``, our loop unpipelined and pipelined on the same prompts,
so a shared machine's drift falls on all three. Reported: medians of ms per
generated token and per step, r(n) = a step / mlx-lm's time per token (the
trees have n = 4 and 16 nodes: issue #11's r(4) and r(16)), the median
per-round ratio pipelined / unpipelined (per step) with its quartiles, and
whether each output equals mlx-lm's. Writes ``benchmarks/results/pipeline[-TAG].{md,json}``.
"""

import argparse
import statistics

import mlx.core as mx
from mlx_lm.generate import generate_step

import mlx_specstream
from mlx_specstream.decode import spec_generate_step
from report import heading, machine_info, shipped_dtype, time_after_first, write_results
from shapes import SHAPES, random_model

TREES = {
    "chain 3": dict(tree_top_k=1, tree_depth=3, max_tree_nodes=4),
    "k3 x3, 16 nodes": dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16),
    # Pipelined, the lookup runs on the device and always drafts a chain of 10.
    "prompt lookup": dict(draft="ngram"),
}


def one_round(model, prompts, max_tokens, tree):
    """Per loop: seconds per token and per step over the prompts, outputs."""
    runs = {
        "mlx-lm": lambda x: generate_step(x, model, max_tokens=max_tokens),
        "unpipelined": lambda x: spec_generate_step(
            x, model, max_tokens=max_tokens, prune_threshold=0.0, pipeline=False, **tree
        ),
        "pipelined": lambda x: spec_generate_step(
            x, model, max_tokens=max_tokens, prune_threshold=0.0, pipeline=True, **tree
        ),
    }
    out = {}
    for name, run in runs.items():
        t = n = steps = 0
        outputs = []
        for x in prompts:
            dt, dp, tokens = time_after_first(run(x))
            t, n, steps = t + dt, n + len(tokens) - 1, steps + dp
            outputs.append(tokens)
        out[name] = dict(token=t / n, step=t / steps, outputs=outputs, tau=(n / steps))
    return out


def measure(model, prompts, max_tokens, rounds):
    rows = []
    for tree_name, tree in TREES.items():
        one_round(model, prompts[:1], 8, tree)  # warm-up
        per_round = [one_round(model, prompts, max_tokens, tree) for _ in range(rounds)]
        med = lambda loop, key: statistics.median(r[loop][key] for r in per_round)  # noqa: E731
        ratios = sorted(r["pipelined"]["step"] / r["unpipelined"]["step"] for r in per_round)
        want = per_round[0]["mlx-lm"]["outputs"]
        rows.append(
            dict(tree=tree_name, plain_ms=1e3 * med("mlx-lm", "token"),
                 unpiped_ms=1e3 * med("unpipelined", "token"),
                 piped_ms=1e3 * med("pipelined", "token"),
                 unpiped_step_ms=1e3 * med("unpipelined", "step"),
                 piped_step_ms=1e3 * med("pipelined", "step"),
                 tau=per_round[0]["pipelined"]["tau"],
                 tau_unpiped=per_round[0]["unpipelined"]["tau"], ratio=statistics.median(ratios),
                 q1=ratios[len(ratios) // 4], q3=ratios[(3 * len(ratios)) // 4],
                 identical={loop: per_round[0][loop]["outputs"] == want
                            for loop in ("unpipelined", "pipelined")})  # fmt: skip
        )
        r = rows[-1]
        print(f"  {tree_name}: mlx-lm {r['plain_ms']:.2f} ms/token; ours {r['unpiped_ms']:.2f} "
              f"unpipelined (tau {r['tau_unpiped']:.2f}), {r['piped_ms']:.2f} pipelined (tau "
              f"{r['tau']:.2f}); per step "
              f"pipelined/unpipelined {r['ratio']:.3f} ({r['q1']:.3f}-{r['q3']:.3f}); "
              f"identical to mlx-lm {r['identical']}", flush=True)  # fmt: skip
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="shipped",
                   help=f"comma-separated: shipped, {', '.join(SHAPES)}")  # fmt: skip
    p.add_argument("--dtype", default="bf16", help="random models' dtype")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    results = []
    for name in args.models.split(","):
        if name == "shipped":
            model = mlx_specstream.load()[0]
            dtype = shipped_dtype(model)
        elif name in SHAPES:
            model, dtype = random_model(name, args.dtype), args.dtype
        else:
            p.error(f"--models: unknown model {name!r}; choose shipped or one of {list(SHAPES)}")
        model.speculative_streams.split_streams = False  # pipelining needs the fused pass
        vocab = model.args.vocab_size
        prompts = [mx.random.randint(0, vocab, (args.prompt_tokens,), key=mx.random.key(i))
                   for i in range(args.prompts)]  # fmt: skip
        print(f"{name} ({dtype})", flush=True)
        for row in measure(model, prompts, args.max_tokens, args.rounds):
            results.append(dict(model=name, dtype=dtype, **row))
        del model
        mx.clear_cache()
    info = machine_info(prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                        max_tokens=args.max_tokens, rounds=args.rounds)  # fmt: skip
    lines = [
        heading("Pipelined against unpipelined decoding", info),
        "",
        f"`{info['command']}`: {args.prompts} random prompts of {args.prompt_tokens} tokens, "
        f"{args.max_tokens} tokens each, greedy, fused stream pass, {args.rounds} rounds "
        "timing the three loops in turn; medians. ratio = pipelined / unpipelined time per "
        "step, median of the per-round ratios (quartiles). identical: output equals mlx-lm's.",
        "",
        "| model | tree | mlx-lm ms/token | ours unpipelined ms/token | ours pipelined ms/token "
        "| tau unpipelined -> pipelined | step ms unpipelined -> pipelined "
        "| r(n) unpipelined -> pipelined | ratio "
        "| quartiles | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        same = "/".join("yes" if r["identical"][k] else "no" for k in ("unpipelined", "pipelined"))
        lines.append(
            f"| {r['model']} ({r['dtype']}) | {r['tree']} | {r['plain_ms']:.2f} "
            f"| {r['unpiped_ms']:.2f} | {r['piped_ms']:.2f} | {r['tau_unpiped']:.2f} -> {r['tau']:.2f} "
            f"| {r['unpiped_step_ms']:.2f} -> {r['piped_step_ms']:.2f} "
            f"| {r['unpiped_step_ms'] / r['plain_ms']:.2f} -> {r['piped_step_ms'] / r['plain_ms']:.2f} "
            f"| **{r['ratio']:.3f}** "
            f"| {r['q1']:.3f}-{r['q3']:.3f} | {same} |"
        )
    write_results("pipeline", args.tag, "\n".join(lines) + "\n", dict(info=info, rows=results))


if __name__ == "__main__":
    main()

"""What one speculative step costs against plain decoding, by tree size, on real model shapes.

    python benchmarks/step_cost.py [--models shipped,qwen2-0.5b] [--dtypes bf16,q4]
    MLX_ENABLE_TF32=0 python benchmarks/step_cost.py --models shipped,qwen2-0.5b,llama-3b,llama-8b

For each model (the shipped default, or a random model of a real shape with
random lossless streams: tau is not the point here, the step's cost is), each
dtype and each tree of n = 1, 4, 8, 16 nodes (greedy, no pruning):

* r(n) = wall time of one of our steps / mlx-lm's per-token time (its
  pipelined ``generate_step``) on the same weights, in the same run; the
  speedup a step can give is tau / r(n), printed for tau = 2, 3, 4;
* o(n) = our step / one plain mlx-lm forward over the same n tokens,
  evaluated synchronously: our fixed cost over the pass itself;
* c(n) = that plain forward over n tokens / over one token: MLX's own width cost;
* peak memory of a generation with the 16-node tree / of plain decoding.

Our loop runs with the package's defaults: on a GPU, the fused pass is
pipelined (``spec_generate_step(pipeline=None)``; ``benchmarks/pipeline.py``
compares both ways), the split pass is not.

Results go to ``benchmarks/results/step_cost[-TAG].{md,json}`` with the device
and versions.
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

import mlx_specstream
from mlx_specstream.decode import spec_generate_step
from report import heading, machine_info, shipped_dtype, time_after_first, write_results
from shapes import SHAPES, random_model

# n tree nodes, root included: a root alone, a chain of 3, top-2 and top-3 trees of depth 3.
TREES = {
    1: dict(tree_top_k=1, tree_depth=1, max_tree_nodes=1),
    4: dict(tree_top_k=1, tree_depth=3, max_tree_nodes=4),
    8: dict(tree_top_k=2, tree_depth=3, max_tree_nodes=8),
    16: dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16),
}


def per_pass(gen):
    """Seconds per pass after the first token (prefill excluded), and the tokens."""
    seconds, passes, tokens = time_after_first(gen)
    return seconds / max(passes, 1), tokens


def plain_per_token(model, prompt, max_tokens):
    return per_pass(generate_step(prompt, model, max_tokens=max_tokens))


def our_step(model, prompt, max_tokens, tree):
    return per_pass(
        spec_generate_step(prompt, model, max_tokens=max_tokens, prune_threshold=0.0, **tree)
    )


def plain_forward(model, prompt, n, reps):
    """Median seconds of one synchronous plain forward over ``n`` tokens after the prompt."""
    cache = make_prompt_cache(model)
    mx.eval(model(prompt[None], cache=cache))
    x = prompt[:n][None]
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        mx.eval(model(x, cache=cache))
        times.append(time.perf_counter() - t0)
        for c in cache:
            c.trim(n)
    return statistics.median(times[1:])


def peak_gb(fn) -> float:
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    fn()
    mx.synchronize()
    return mx.get_peak_memory() / 1e9


def measure(model, prompts, max_tokens, runs, reps):
    """One model's row set: per-token, per-step and forward times, peak memory."""
    rows = []
    for x in prompts[:1]:  # warm-up and compiled paths
        plain_per_token(model, x, 8)
        for tree in TREES.values():
            our_step(model, x, 8, tree)
    plain_t = [plain_per_token(model, x, max_tokens)[0] for _ in range(runs) for x in prompts]
    per_token = statistics.median(plain_t)
    fwd = {n: plain_forward(model, prompts[0], n, reps) for n in TREES}
    for n, tree in TREES.items():
        steps = []
        for _ in range(runs):
            for x in prompts:
                step, _ = our_step(model, x, max_tokens, tree)
                steps.append(step)
        step = statistics.median(steps)
        rows.append(dict(n=n, step_ms=step * 1e3, r=step / per_token, o=step / fwd[n],
                         c=fwd[n] / fwd[1], forward_ms=fwd[n] * 1e3,
                         bound={tau: tau * per_token / step for tau in (2, 3, 4)}))  # fmt: skip
    peak_plain = peak_gb(lambda: plain_per_token(model, prompts[0], max_tokens))
    peak_ours = peak_gb(lambda: our_step(model, prompts[0], max_tokens, TREES[16]))
    return dict(plain_ms_per_token=per_token * 1e3, rows=rows, peak_plain_gb=peak_plain,
                peak_ours_gb=peak_ours)  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="shipped,qwen2-0.5b",
                   help=f"comma-separated: shipped, {', '.join(SHAPES)}")  # fmt: skip
    p.add_argument("--dtypes", default="bf16,q4", help="random models: bf16, q4")
    p.add_argument("--stream-pass", default="own", choices=["own", "fused", "split", "both"],
                   help="lossless stream pass: the model's own (random models: fused), one, "
                   "or both")  # fmt: skip
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="plain forwards per n")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    results = []
    for name in args.models.split(","):
        if name == "shipped":
            cases = [(None, lambda: mlx_specstream.load()[0])]
        elif name in SHAPES:
            cases = [(d, lambda d=d: random_model(name, d)) for d in args.dtypes.split(",")]
        else:
            p.error(f"--models: unknown model {name!r}; choose shipped or one of {list(SHAPES)}")
        for dtype, build in cases:
            model = build()
            dtype = dtype or shipped_dtype(model)
            vocab = model.args.vocab_size
            prompts = [mx.random.randint(0, vocab, (args.prompt_tokens,), key=mx.random.key(i))
                       for i in range(args.prompts)]  # fmt: skip
            rt = model.speculative_streams
            own = "split" if rt.split_streams else "fused"
            passes = {"own": [own], "both": ["fused", "split"]}.get(args.stream_pass)
            for stream_pass in passes or [args.stream_pass]:
                rt.split_streams = stream_pass == "split"
                res = measure(model, prompts, args.max_tokens, args.runs, args.reps)
                res.update(model=name, dtype=dtype, stream_pass=stream_pass)
                results.append(res)
                print(f"{name} {dtype} {stream_pass}: plain {res['plain_ms_per_token']:.2f} "
                      "ms/token, " + ", ".join(f"r({r['n']}) {r['r']:.2f} o({r['n']}) {r['o']:.2f}"
                                               for r in res["rows"]), flush=True)  # fmt: skip
            del model, rt
            mx.clear_cache()
    info = machine_info(
        prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        runs=args.runs,
    )
    lines = [
        heading("Step cost", info),
        "",
        f"`{info['command']}`: {args.prompts} random prompts of {args.prompt_tokens} tokens, "
        f"{args.max_tokens} tokens each, greedy, medians over {args.runs} runs. "
        "r = our step / mlx-lm's per-token time; o = our step / a synchronous plain forward "
        "over the same n tokens; c = that forward / a one-token forward; tau/r = the speedup "
        "bound at that tau.",
        "",
        "| model | dtype | pass | plain ms/token | n | step ms | r(n) | o(n) | c(n) "
        "| 2/r | 3/r | 4/r | peak ours/plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        mem = res["peak_ours_gb"] / res["peak_plain_gb"]
        for r in res["rows"]:
            b = r["bound"]
            lines.append(
                f"| {res['model']} | {res['dtype']} | {res['stream_pass']} "
                f"| {res['plain_ms_per_token']:.2f} | {r['n']} | {r['step_ms']:.2f} | {r['r']:.2f} "
                f"| {r['o']:.2f} | {r['c']:.2f} | {b[2]:.2f}x | {b[3]:.2f}x | {b[4]:.2f}x "
                f"| {mem:.2f} ({res['peak_ours_gb']:.2f}/{res['peak_plain_gb']:.2f} GB) |"
            )
    text = "\n".join(lines) + "\n"
    write_results("step_cost", args.tag, text, dict(info=info, results=results))


if __name__ == "__main__":
    main()

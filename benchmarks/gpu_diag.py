"""Two GPU questions about the shipped model, in one short run.

    MLX_ENABLE_TF32=0 python benchmarks/gpu_diag.py

1. Where our greedy output first differs from mlx-lm's (the model as loaded:
   bfloat16 on a GPU), the plain model's top-2 log-probability gap there: a
   near-tie or a bug.
2. Whether a step's time depends on seeing new shapes: the same generation run
   twice on a prompt length not seen before, per-item times of both runs
   (``benchmarks/cold_shapes.py`` asks this one more closely).

Session 33's run: ``results/gpu-s33-diag.log`` (stopped at its time limit
during question 2).
"""

import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step

import mlx_specstream
from mlx_specstream.decode import spec_generate_step

TREES = {
    "chain 3": dict(tree_top_k=1, tree_depth=3, max_tree_nodes=4),
    "k3 x3, 16 nodes": dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16),
    "lookup": dict(draft="ngram"),
}


def plain(model, x, n):
    toks, lps = [], []
    for tok, lp in generate_step(x, model, max_tokens=n):
        toks.append(int(tok))
        lps.append(lp)
    return toks, lps


def ours(model, x, n, pipeline, tree):
    gen = spec_generate_step(x, model, max_tokens=n, prune_threshold=0.0, pipeline=pipeline,
                             **tree)  # fmt: skip
    return [int(t) for t, *_ in gen]


def timed(gen):
    times, t0 = [], time.perf_counter()
    for _ in gen:
        t = time.perf_counter()
        times.append(t - t0)
        t0 = t
    return times


def main():
    model = mlx_specstream.load()[0]
    vocab = model.args.vocab_size
    print("device", mx.default_device(), "mlx", mx.__version__, flush=True)
    prompts = [mx.random.randint(0, vocab, (64,), key=mx.random.key(i)) for i in range(2)]
    for i, x in enumerate(prompts):
        want, lps = plain(model, x, 64)
        for name, tree in TREES.items():
            for pipeline in (False, True):
                try:
                    got = ours(model, x, 64, pipeline, tree)
                except ValueError as e:
                    print(f"prompt {i} {name} pipeline={pipeline}: {e}", flush=True)
                    continue
                j = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), None)
                if j is None:
                    print(f"prompt {i} {name} pipeline={pipeline}: identical", flush=True)
                    continue
                top = mx.sort(lps[j])[-2:].tolist()
                print(f"prompt {i} {name} pipeline={pipeline}: first differs at {j}: plain "
                      f"{want[j]} (logprob {lps[j][want[j]].item():.7f}) ours {got[j]} "
                      f"(logprob {lps[j][got[j]].item():.7f}); plain top-2 gap "
                      f"{top[1] - top[0]:.3e}", flush=True)  # fmt: skip
    for length in (37, 53):
        x = mx.random.randint(0, vocab, (length,), key=mx.random.key(100 + length))
        for name, make in (
            ("mlx-lm", lambda: generate_step(x, model, max_tokens=48)),
            ("ours chain 3", lambda: spec_generate_step(x, model, max_tokens=48,
                                                        **TREES["chain 3"])),
            ("ours 16 nodes", lambda: spec_generate_step(x, model, max_tokens=48,
                                                         **TREES["k3 x3, 16 nodes"])),
        ):  # fmt: skip
            a, b = timed(make()), timed(make())
            print(f"prompt of {length}, {name}: first run {1e3 * sum(a[1:]):.1f} ms "
                  f"(median item {1e3 * statistics.median(a[1:]):.2f}), same again "
                  f"{1e3 * sum(b[1:]):.1f} ms (median {1e3 * statistics.median(b[1:]):.2f}); "
                  f"first run's items ms: {[round(1e3 * t, 1) for t in a[1:12]]}", flush=True)


if __name__ == "__main__":
    main()

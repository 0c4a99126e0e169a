"""Our verifier against mlx-lm's speculative loop, on the same drafts.

    python benchmarks/draft_verifier.py [--models shipped,small] [--dtypes bf16] [--tag TAG]
    MLX_ENABLE_TF32=0 python benchmarks/draft_verifier.py --models shipped,qwen2-0.5b,llama-8b --tag gpu

The draft model is a copy of the base's own weights, so both loops accept every
draft (tau = k + 1) and draft the same tokens: what differs between the two is
the loop's own cost, the figure issue #11 asks to cut. For each model (the shipped
default, or a random model of a real shape) and dtype, with ``k`` drafts per step:

* mlx-lm plain decoding's tokens/s;
* mlx-lm's draft-model decoding (``speculative_generate_step``) with that copy;
* ours (``spec_generate_step(draft_model=...)``) with the same copy;
* for the shipped model, also both with its embedded 2.7 MB draft model (a real,
  partly right drafter: tau below k + 1).

Tokens/s are timed from the first token (prefill excluded), medians over prompts
and runs, interleaved. Every output is checked against plain decoding.
Results go to ``benchmarks/results/draft_verifier[-TAG].{md,json}``.
"""

import argparse
import statistics

import mlx.core as mx
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step, speculative_generate_step

import mlx_specstream
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.default_model import DRAFT_DIR
from report import heading, machine_info, shipped_dtype, time_after_first, write_results
from shapes import SHAPES, random_model


def with_passes(gen):
    """mlx-lm's speculative items ``(token, logprobs, from_draft)`` with the passes so
    far appended, as ours yield them: a pass's tokens end at its token not from a
    draft (or at the last token), and each of them counts the pass."""
    passes, new_pass = 0, True
    for token, logprobs, from_draft in gen:
        passes += new_pass
        new_pass = not from_draft
        yield token, logprobs, from_draft, passes


def counted(gen, total):
    """``gen``'s items; ``total[0]`` ends as the passes of the whole generation."""
    for item in gen:
        total[0] = item[3] if len(item) > 3 else total[0] + 1
        yield item


def loops(model, draft, k):
    """The three loops over ``(prompt, max_tokens)``: generators of ``(token, ...)``."""
    return {
        "mlx-lm plain": lambda x, n: generate_step(x, model, max_tokens=n),
        "mlx-lm draft model": lambda x, n: with_passes(
            speculative_generate_step(x, model, draft, num_draft_tokens=k, max_tokens=n)
        ),
        "ours, same draft model": lambda x, n: spec_generate_step(
            x, model, max_tokens=n, draft_model=draft, num_draft_tokens=k
        ),
    }


def measure(methods, prompts, max_tokens, runs):
    """Median tokens/s and tokens per pass of each method; ``False`` where an output
    differs from the first method's (plain decoding)."""
    for fn in methods.values():  # warm-up (compiled paths)
        time_after_first(fn(prompts[0], 8))
    times = {name: [] for name in methods}
    tau, same = {name: [] for name in methods}, dict.fromkeys(methods, True)
    for _ in range(runs):
        for x in prompts:
            ref = None
            for name, fn in methods.items():
                total = [0]
                seconds, _, tokens = time_after_first(counted(fn(x, max_tokens), total))
                tokens = [int(t) for t in tokens]
                ref = tokens if ref is None else ref
                same[name] &= tokens == ref
                times[name].append((len(tokens) - 1) / seconds)
                tau[name].append(len(tokens) / total[0])  # (every pass, the first too)
    return {
        name: dict(tps=statistics.median(t), tau=statistics.mean(tau[name]), same=same[name])
        for name, t in times.items()
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="shipped,small",
                   help=f"comma-separated: shipped, {', '.join(SHAPES)}")  # fmt: skip
    p.add_argument("--dtypes", default="bf16", help="random models: f32, bf16, f16, q4")
    p.add_argument("--num-draft-tokens", type=int, default=3)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    k, rows = args.num_draft_tokens, []
    for name in args.models.split(","):
        if name == "shipped":
            cases = [(None, lambda: (mlx_specstream.load()[0], mlx_specstream.load()[0]))]
        elif name in SHAPES:
            cases = [
                (d, lambda d=d: (random_model(name, d, False), random_model(name, d, False)))
                for d in args.dtypes.split(",")
            ]
        else:
            p.error(f"--models: unknown model {name!r}; choose shipped or one of {list(SHAPES)}")
        for dtype, build in cases:
            model, copy = build()
            dtype = dtype or shipped_dtype(model)
            vocab = model.args.vocab_size
            prompts = [mx.random.randint(0, vocab, (args.prompt_tokens,), key=mx.random.key(i))
                       for i in range(args.prompts)]  # fmt: skip
            methods = loops(model, copy, k)
            if name == "shipped":  # a real drafter too: the embedded draft model
                small = mlx_lm_load(str(DRAFT_DIR))[0]
                real = loops(model, small, k)
                methods["mlx-lm, embedded draft"] = real["mlx-lm draft model"]
                methods["ours, embedded draft"] = real["ours, same draft model"]
            res = measure(methods, prompts, args.max_tokens, args.runs)
            plain = res["mlx-lm plain"]["tps"]
            for method, r in res.items():
                rows.append(dict(model=name, dtype=dtype, method=method, **r,
                                 vs_plain=r["tps"] / plain))  # fmt: skip
            ours, theirs = res["ours, same draft model"]["tps"], res["mlx-lm draft model"]["tps"]
            print(f"{name} {dtype}: plain {plain:.1f} tok/s, mlx-lm draft {theirs:.1f}, "
                  f"ours {ours:.1f} ({ours / theirs:.2f}x mlx-lm's loop)", flush=True)  # fmt: skip
            del model, copy, methods
            mx.clear_cache()
    info = machine_info(k=k, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                        max_tokens=args.max_tokens, runs=args.runs)  # fmt: skip
    lines = [
        heading("Our verifier against mlx-lm's speculative loop, same drafts", info),
        "",
        f"`{info['command']}`: {args.prompts} random prompts of {args.prompt_tokens} tokens, "
        f"{args.max_tokens} tokens each, greedy, {k} drafts per step, medians over "
        f"{args.runs} runs. 'same draft model': a copy of the base's weights drafts (every "
        "draft accepted by both loops), so the loops' own costs are what differ.",
        "",
        "| model | dtype | method | tokens/s | vs mlx-lm plain | tokens per pass "
        "| output = plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['method']} | {r['tps']:.1f} "
            f"| {r['vs_plain']:.2f}x | {r['tau']:.2f} | {'yes' if r['same'] else 'NO'} |"
        )
    write_results("draft_verifier", args.tag, "\n".join(lines) + "\n", dict(info=info, rows=rows))


if __name__ == "__main__":
    main()

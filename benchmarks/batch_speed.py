"""Batched decoding whose rows speculate (the model's streams, prompt lookup or a
draft model in every row), against mlx-lm's batched and
one-at-a-time decoding on the same weights.

    python benchmarks/batch_speed.py [--model DIR] [--dtype float32] [--batch 1,2,4,8]
        [--draft-tokens 2,4] [--max-tokens 128] [--rounds 2] [--ways SUBSTRINGS]
        [--pipeline-ab] [--tag TAG]

For each batch size K, K prompts are decoded greedily for ``--max-tokens`` tokens
each, in two tasks: **completion** (the shipped model's held-out prompts) and
**copying** (each prompt, then its first line again: text the model has seen).
Ways, interleaved in every round, on the same weights:

* **mlx-lm batch_generate**: mlx-lm's continuous batching, one token per row per pass;
* **mlx-lm one at a time**: its ``generate_step`` over each prompt in turn;
* **mlx-lm draft model, one at a time**: its ``speculative_generate_step`` with the
  shipped draft model (3 drafts; mlx-lm's draft-model decoding is batch-1 only);
* **ours, no drafts**: ``mlx_specstream.batch_generate(draft=None)``;
* **ours, streams (fused / split)**: ``mlx_specstream.batch_generate`` with each row
  drafting the chain of the model's own (lossless-mode) streams, when it has them,
  their rows in the verifying pass or in a second pass (an attached drafter, Medusa
  heads, an MTP layer or ParallelSpec: its chain, one pass); with several MTP layers,
  also the first one alone drafting every level (``first MTP layer alone``);
* **ours, lookup D**: ``mlx_specstream.batch_generate`` with prompt-lookup drafts of up
  to D tokens;
* **ours, draft model (3)**: ``mlx_specstream.batch_generate`` with the shipped draft
  model drafting 3 tokens in every row (mlx-lm has no batched draft-model decoding);
* **ours, draft model (3) + lookup**: the same, each row drafting its lookup chain
  where its tokens have a match instead (``draft="ngram"`` with ``draft_model=``).

``--pipeline-ab`` runs each of our ways twice more, with ``pipeline=True`` and
``pipeline=False`` (the default, ``None``, pipelines rows drafting by lookup, with a
draft model or a drafter layer (MTP, ParallelSpec) on a GPU only); ``--ways`` keeps
only the ways whose names contain one of its comma-separated substrings (mlx-lm's
``batch_generate``, the baseline, always runs).

Figures: generated tokens (up to each row's first EOS) per second of the whole batch (prefill included, as a
user of ``batch_generate`` waits for it), each way's median over rounds, against
mlx-lm's ``batch_generate``; τ = tokens a row got per pass that decoded it. Every
output is checked against mlx-lm's one-at-a-time greedy tokens. Results go to
``benchmarks/results/batch_speed[-TAG].{md,json}``.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import batch_generate as mlx_lm_batch_generate
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step, speculative_generate_step

from mlx_specstream.batch import batch_generate, stream_runtime
from mlx_specstream.default_model import DEFAULT_DIR, DRAFT_DIR
from mlx_specstream.mtp import use_mtp_layers
from mlx_specstream.utils import load
from report import heading, machine_info, write_results


def task_prompts(tokenizer, model_dir, n):
    texts = [json.loads(line)["prompt"] for line in open(model_dir / "prompts.jsonl")]
    texts = [texts[i % len(texts)] for i in range(n)]
    return {
        "completion": [tokenizer.encode(t) for t in texts],
        "copying": [tokenizer.encode(t + "\n\n" + t.split("\n")[0] + "\n") for t in texts],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_DIR))
    ap.add_argument("--draft-model", default=str(DRAFT_DIR))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", default="1,2,4,8")
    ap.add_argument("--draft-tokens", default="2,4")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ways", default=None, help="comma-separated substrings of way names")
    ap.add_argument("--pipeline-ab", action="store_true",
                    help="our ways that can pipeline, with pipeline=True and False too")  # fmt: skip
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    model, tokenizer = load(args.model)
    draft_model, _ = mlx_lm_load(args.draft_model)
    for m in (model, draft_model):
        m.set_dtype(getattr(mx, args.dtype))
        mx.eval(m.parameters())
    N, sizes = args.max_tokens, [int(k) for k in args.batch.split(",")]
    lengths = [int(d) for d in args.draft_tokens.split(",")]

    def one_at_a_time(prompts, make):
        return [[t for t, *_ in make(mx.array(p))] for p in prompts], None

    def mlx_lm_batched(ps):
        res = mlx_lm_batch_generate(model, tokenizer, ps, max_tokens=N, return_token_ids=True)
        return res.token_ids, None

    def mlx_lm_plain(ps):
        return one_at_a_time(ps, lambda x: generate_step(x, model, max_tokens=N))

    def mlx_lm_drafted(ps):
        return one_at_a_time(
            ps,
            lambda x: speculative_generate_step(
                x, model, draft_model, num_draft_tokens=3, max_tokens=N
            ),
        )

    ways = {
        "mlx-lm batch_generate": mlx_lm_batched,
        "mlx-lm one at a time": mlx_lm_plain,
        "mlx-lm draft model (3), one at a time": mlx_lm_drafted,
        "ours, no drafts": lambda ps, **kw: _ours(model, tokenizer, ps, N, draft=None, **kw),
    }
    rt = stream_runtime(model)
    if rt is not None:  # (an attached drafter: one pass, no split)
        for how in ("fused", "split") if rt.streams is not None else ("fused",):
            ways[f"ours, streams ({how})"] = lambda ps, how=how, **kw: _ours(
                model, tokenizer, ps, N, draft="streams", stream_pass=how, **kw
            )
    layers = getattr(rt.drafter, "num_layers", 1) if rt is not None else 1
    if layers > 1:  # (several MTP layers: the first alone drafting every level, as before)
        ways["ours, streams (fused), first MTP layer alone"] = lambda ps, **kw: _first_layer(
            model, tokenizer, ps, N, layers, **kw
        )
    for d in lengths:
        ways[f"ours, lookup {d}"] = lambda ps, d=d, **kw: _ours(
            model, tokenizer, ps, N, draft="ngram", num_draft_tokens=d, **kw
        )
    ways["ours, draft model (3)"] = lambda ps, **kw: _ours(
        model, tokenizer, ps, N, draft_model=draft_model, num_draft_tokens=3, **kw
    )
    ways["ours, draft model (3) + lookup"] = lambda ps, **kw: _ours(
        model, tokenizer, ps, N, draft_model=draft_model, draft="ngram", num_draft_tokens=3, **kw
    )
    if args.pipeline_ab:
        for name, way in list(ways.items()):
            if name.startswith("ours"):
                ways[name + ", pipelined"] = lambda ps, way=way: way(ps, pipeline=True)
                ways[name + ", unpipelined"] = lambda ps, way=way: way(ps, pipeline=False)
    if args.ways:
        keep = args.ways.split(",")
        ways = {n: w for n, w in ways.items()
                if n == "mlx-lm batch_generate" or any(k in n for k in keep)}  # fmt: skip
    rows = []
    for task, every in task_prompts(tokenizer, Path(args.model), max(sizes)).items():
        for K in sizes:
            prompts = every[:K]
            times = {w: [] for w in ways}
            cut = _until_eos(tokenizer)
            want = cut([[t for t, _ in generate_step(mx.array(p), model, max_tokens=N)]
                        for p in prompts])  # fmt: skip
            tokens = sum(map(len, want))
            taus, same = {}, {}
            for way in ways.values():  # warm-up
                way([p[:8] for p in prompts])
            for _ in range(args.rounds):
                for name, way in ways.items():
                    tic = time.perf_counter()
                    outs, tau = way(prompts)
                    times[name].append(time.perf_counter() - tic)
                    same[name] = same.get(name, True) and cut(outs) == want
                    taus[name] = tau
            base = statistics.median(times["mlx-lm batch_generate"])
            for name in ways:
                t = statistics.median(times[name])
                row = dict(task=task, batch=K, way=name, tokens_per_s=tokens / t,
                           vs_batch_generate=base / t, tau=taus[name], identical=same[name])  # fmt: skip
                rows.append(row)
                tau = "" if taus[name] is None else f"  tau {taus[name]:.2f}"
                print(f"{task:10s} K={K} {name:38s} {row['tokens_per_s']:7.1f} tok/s  "
                      f"{row['vs_batch_generate']:.2f}x{tau}  identical={same[name]}", flush=True)  # fmt: skip
    info = machine_info(dtype=args.dtype, max_tokens=N, rounds=args.rounds)
    lines = [
        heading("Batched decoding whose rows speculate", info),
        "",
        f"`{info['command']}`: K prompts x {N} tokens, greedy, {args.dtype}; tokens/s of the "
        "whole batch (prefill included), medians of the rounds; every output checked against "
        "mlx-lm's one-at-a-time greedy tokens. tau = tokens a row got per pass that decoded it.",
        "",
        "| task | K | way | tokens/s | vs mlx-lm batch_generate | tau | identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tau = "" if r["tau"] is None else f"{r['tau']:.2f}"
        lines.append(f"| {r['task']} | {r['batch']} | {r['way']} | {r['tokens_per_s']:.1f} | "
                     f"{r['vs_batch_generate']:.2f}x | {tau} | {r['identical']} |")  # fmt: skip
    write_results("batch_speed", args.tag, "\n".join(lines) + "\n", dict(info, rows=rows))


def _until_eos(tokenizer):
    """Each output up to its first EOS token (batched ways stop there; mlx-lm's
    ``generate_step`` goes on)."""
    eos = set(tokenizer.eos_token_ids)

    def cut(outs):
        return [o[: next((i for i, t in enumerate(o) if t in eos), len(o))] for o in outs]

    return cut


def _ours(model, tokenizer, prompts, N, **kwargs):
    res = batch_generate(model, tokenizer, prompts, max_tokens=N, return_token_ids=True, **kwargs)
    return res.token_ids, res.stats.tokens_per_pass


def _first_layer(model, tokenizer, prompts, N, layers, **kwargs):
    """Rows drafting with the first of a drafter's ``layers`` MTP layers alone."""
    use_mtp_layers(model, 1)
    try:
        return _ours(model, tokenizer, prompts, N, draft="streams", **kwargs)
    finally:
        use_mtp_layers(model, layers)


if __name__ == "__main__":
    main()

"""Prompt lookup on long contexts: the per-step lookup cost, rescanning against the index.

    python benchmarks/ngram_context.py [--contexts 256,896] [--histories 1024,4096,16384,65536]
    benchmarks/with_openblas.sh python benchmarks/ngram_context.py --tag openblas

The text is real code the shipped model never trained on: mlx-lm's model files
(held out of every corpus), concatenated in sorted order, tokenized by the shipped
model's tokenizer and cut to each length. Two measurements:

* **lookup alone**, for each of ``--histories`` (as long as users' contexts get):
  host time per decode step of the n-gram lookup and its update, replaying the
  text as a decode would (two tokens accepted per step), without a model;
* **decoding**, for each of ``--contexts`` (the shipped model reads at most
  1,024 positions): the shipped model writes ``--max-tokens`` greedy tokens
  after the context, in the same process, runs interleaved:

* mlx-lm plain ``generate_step``;
* ours, ``draft="ngram"``, with :class:`mlx_specstream.ngram.NgramIndex` (the
  decoder's lookup: O(1) per token);
* ours, ``draft="ngram"``, with the lookup rescanning the whole history every
  step (:func:`mlx_specstream.ngram.ngram_draft`, the decoder's lookup before
  the index; swapped in here).

Reports tokens/s, the speedup over mlx-lm plain, tau, and the host time of the
lookups per step. Every output is checked against mlx-lm's greedy tokens.
Writes ``benchmarks/results/ngram_context[-TAG].{md,json}``.
"""

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step

import mlx_specstream
import mlx_specstream.decode as decode
from mlx_specstream.ngram import NgramIndex, ngram_draft
from report import heading, machine_info, write_results


class RescanningLookup(NgramIndex):
    """The lookup as it was before the index: ``ngram_draft`` over the history."""

    def extend(self, tokens):
        self.tokens.extend(int(t) for t in tokens)

    def draft(self, max_tokens=10):
        return ngram_draft(self.tokens, max_tokens, self.max_ngram, self.min_ngram)


def timed_lookups(index_type, clock):
    """``index_type`` with its ``extend`` and ``draft`` host time added to ``clock``."""

    class Timed(index_type):
        def extend(self, tokens):
            t0 = time.perf_counter()
            super().extend(list(tokens))
            clock["s"] += time.perf_counter() - t0

        def draft(self, max_tokens=10):
            t0 = time.perf_counter()
            try:
                return super().draft(max_tokens)
            finally:
                clock["s"] += time.perf_counter() - t0
                clock["calls"] += 1

    return Timed


def after_first(gen):
    """Tokens of ``(token, passes so far)`` pairs, and the tokens/s and tokens per
    pass after the first pass (prefill and first step excluded)."""
    out, t1, p1, n = [], None, 0, 0
    for token, passes in gen:
        out.append(token)
        if t1 is None:
            t1, p1 = time.perf_counter(), passes
        n += passes > p1
    return out, n / (time.perf_counter() - t1), n / max(passes - p1, 1)


def code_tokens(tokenizer):
    """mlx-lm's model sources, concatenated and tokenized."""
    files = sorted((Path(mlx_lm.__file__).parent / "models").glob("*.py"))
    return tokenizer.encode("\n\n".join(f.read_text() for f in files))


def lookup_us_per_step(index_type, tokens, length, steps=200, accepted=2):
    """Median host microseconds of one step's update and lookup, at a history of
    ``length`` tokens growing by ``accepted`` tokens per step."""
    index = index_type(tokens[:length])
    times = []
    for i in range(length, length + steps * accepted, accepted):
        t0 = time.perf_counter()
        index.extend(tokens[i : i + accepted])
        index.draft(10)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="256,896")
    ap.add_argument("--histories", default="1024,4096,16384,65536")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    model, tokenizer = mlx_specstream.load(None)
    N = args.max_tokens
    lookups = {"index": NgramIndex, "rescan": RescanningLookup}

    def plain(x):
        return after_first(
            (t, i + 1) for i, (t, _) in enumerate(generate_step(x, model, max_tokens=N))
        )

    def ours(x, lookup):
        clock = {"s": 0.0, "calls": 0}
        decode.NgramIndex = timed_lookups(lookups[lookup], clock)
        try:
            gen = decode.spec_generate_step(x, model, max_tokens=N, draft="ngram")
            return (*after_first((t, p) for t, _, _, p in gen), clock)
        finally:
            decode.NgramIndex = NgramIndex

    code = code_tokens(tokenizer)
    micro = []
    for L in [int(v) for v in args.histories.split(",")]:
        if L + 400 > len(code):
            raise SystemExit(f"--histories: mlx-lm's model sources hold {len(code)} tokens only")
        us = {k: lookup_us_per_step(t, code, L) for k, t in lookups.items()}
        micro.append(dict(history=L, **{f"{k}_us": v for k, v in us.items()}))
        print(f"history {L:6d}: index {us['index']:7.1f} us/step, rescan {us['rescan']:7.1f}",
              flush=True)  # fmt: skip
    rows = []
    for L in [int(v) for v in args.contexts.split(",")]:
        x = mx.array(code[:L])
        want = plain(x)[0]  # warm-up, reference
        for lookup in lookups:
            ours(x, lookup)
        rates = {k: [] for k in ("plain", *lookups)}
        per_step, tau = {k: [] for k in lookups}, {"plain": 1.0}
        for _ in range(args.runs):
            rates["plain"].append(plain(x)[1])
            for lookup in lookups:
                out, rate, tau[lookup], clock = ours(x, lookup)
                assert out == want, f"context {L}, {lookup}: output differs from mlx-lm's"
                rates[lookup].append(rate)
                per_step[lookup].append(clock["s"] / clock["calls"])
        base = statistics.median(rates["plain"])
        for method in rates:
            rate = statistics.median(rates[method])
            row = dict(context=L, method=method, tokens_per_s=rate, speedup=rate / base,
                       tau=tau[method],
                       lookup_us=1e6 * statistics.median(per_step[method])
                       if method in per_step else None)  # fmt: skip
            rows.append(row)
            look = f"{row['lookup_us']:8.1f} us/step" if row["lookup_us"] is not None else ""
            print(f"{L:6d} {method:7s} {row['tokens_per_s']:7.1f} tok/s {row['speedup']:.2f}x "
                  f"tau {row['tau']:.2f} {look}", flush=True)  # fmt: skip
    info = machine_info(contexts=args.contexts, histories=args.histories, max_tokens=N,
                        runs=args.runs)  # fmt: skip
    lines = [
        heading("Prompt lookup on long contexts", info),
        "",
        f"`{info['command']}`: the shipped model, greedy, {N} tokens after the first `context` "
        f"tokens of mlx-lm's model sources, timed after the first step; medians of {args.runs} "
        "interleaved runs; outputs checked against mlx-lm's. `index`: the decoder's n-gram "
        "index; `rescan`: the lookup rescanning the history each step (before the index). "
        "lookup = host time of the n-gram lookups and updates per step.",
        "",
        "Lookup alone (no model): host time per step of the update (2 accepted tokens) and "
        "the lookup, median of 200 steps.",
        "",
        "| history tokens | index us/step | rescan us/step | rescan / index |",
        "|---|---|---|---|",
        *[f"| {m['history']} | {m['index_us']:.1f} | {m['rescan_us']:.1f} | "
          f"{m['rescan_us'] / m['index_us']:.0f}x |" for m in micro],  # fmt: skip
        "",
        "Decoding:",
        "",
        "| context | method | tokens/s | vs mlx-lm plain | tau | lookup us/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        look = f"{r['lookup_us']:.1f}" if r["lookup_us"] is not None else ""
        lines.append(f"| {r['context']} | {r['method']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['tau']:.2f} | {look} |")  # fmt: skip
    write_results("ngram_context", args.tag, "\n".join(lines) + "\n",
                  dict(info=info, lookup=micro, rows=rows))  # fmt: skip


if __name__ == "__main__":
    main()

"""Prompt-lookup drafting (``draft="ngram"``) against mlx-lm, on completion and on copying.

    python benchmarks/ngram_speed.py [--prompts 4] [--max-tokens 96] [--tag TAG]
    benchmarks/with_openblas.sh python benchmarks/ngram_speed.py --tag openblas
    benchmarks/with_openblas.sh python benchmarks/ngram_speed.py --dtype float32 \
        --candidates 1,2,3,4 --tag openblas-candidates

Two tasks on the shipped model's held-out prompts, greedy:

* ``complete``: the first ``--prompt-tokens`` tokens of a snippet; the model
  writes on. Drafts come only from repetition inside the text.
* ``repeat``: the whole snippet, a blank line, then its first line again; a
  model that copies (as code edits and quoting do) writes the snippet out a
  second time, so the prompt holds the continuation.

Same weights, same run: mlx-lm plain ``generate_step``, mlx-lm with the
shipped draft model (``num_draft_tokens=3``), and ours with ``draft="ngram"``,
with the model's streams (chain of 3), with both merged, with the same draft
model, and with the draft model and prompt lookup merged; with ``--candidates``,
also prompt lookup with that many drafts per tree (``ngram_candidates``) under a
16-node cap (the shipped config's 4 nodes leave no room for a second draft).
``--model DIR`` runs another model on the same prompts (a checkpoint with its MTP
layers, ``--num-mtp-layers`` of them: the "own drafts" rows are then theirs, named by
the drafter's kind). ``--dtype`` casts both models (default: as shipped). Every output is
checked against mlx-lm's greedy tokens. Reports tokens/s, speedup over mlx-lm
plain and tau (tokens per forward pass). Writes
``benchmarks/results/ngram_speed[-TAG].{md,json}``.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step
from mlx_lm.generate import stream_generate as mlx_stream_generate

import mlx_specstream
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.default_model import DEFAULT_DIR, DRAFT_DIR


def ours_settings(own: str) -> dict:
    """Our ways, ``own`` naming the model's own drafts (``streams``, ``mtp``, ...)."""
    return {
        "ours: ngram": dict(draft="ngram"),
        f"ours: {own} (chain 3)": dict(tree_top_k=1, tree_depth=3),
        f"ours: {own}+ngram": dict(draft="streams+ngram", tree_top_k=1, tree_depth=3),
    }


def task_prompts(tokenizer, n, prompt_tokens):
    texts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")][:n]
    complete = [tokenizer.encode(t)[:prompt_tokens] for t in texts]
    repeat = [tokenizer.encode(t + "\n\n" + t.split("\n")[0] + "\n") for t in texts]
    return {"complete": complete, "repeat": repeat}


def timed(run, prompts):
    """Total wall time, the outputs and the forward passes over all prompts."""
    outs, passes = [], 0
    tic = time.perf_counter()
    for p in prompts:
        toks, n = run(mx.array(p))
        outs.append(toks)
        passes += n
    return time.perf_counter() - tic, outs, passes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="Model directory (default: the shipped one)")
    ap.add_argument("--num-mtp-layers", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--candidates", default=None, help="e.g. 1,2,4: ngram_candidates runs")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    model, tokenizer = mlx_specstream.load(args.model, num_mtp_layers=args.num_mtp_layers)
    rt = model.speculative_streams
    own = "streams" if rt.drafter is None else rt.config.kind
    draft_model, _ = mlx_lm.load(str(DRAFT_DIR))
    # (a model with a drafter attached takes no draft model: its base, loaded again, does)
    base = model if rt.drafter is None else mlx_lm.load(args.model)[0]
    if args.dtype is not None:
        for m in {id(m): m for m in (model, draft_model, base)}.values():
            m.set_dtype(getattr(mx, args.dtype))
            mx.eval(m.parameters())
    N = args.max_tokens

    def plain(x):
        return [t for t, _ in generate_step(x, model, max_tokens=N)], N

    def drafted(x):
        rs = list(mlx_stream_generate(model, tokenizer, x, max_tokens=N, draft_model=draft_model,
                                      num_draft_tokens=3))  # fmt: skip
        # A pass verifies a run of drafts and yields the accepted ones plus one.
        return [r.token for r in rs], sum(not r.from_draft for r in rs)

    def ours(settings):
        target = base if "draft_model" in settings else model

        def run(x):
            out = list(spec_generate_step(x, target, max_tokens=N, **settings))
            return [t for t, *_ in out], out[-1][3]

        return run

    runs = {"mlx-lm plain": plain, "mlx-lm draft model (3)": drafted}
    runs.update({name: ours(s) for name, s in ours_settings(own).items()})
    runs["ours: draft model (3)"] = ours(dict(draft_model=draft_model, num_draft_tokens=3))
    runs["ours: draft model (3)+ngram"] = ours(
        dict(draft_model=draft_model, num_draft_tokens=3, draft="ngram")
    )
    for k in [] if args.candidates is None else [int(c) for c in args.candidates.split(",")]:
        runs[f"ours: ngram x{k} (16 nodes)"] = ours(
            dict(draft="ngram", max_tree_nodes=16, ngram_candidates=k)
        )
    rows, raw = [], {}
    for task, prompts in task_prompts(tokenizer, args.prompts, args.prompt_tokens).items():
        for run in runs.values():  # warm-up: compile and allocate once
            run(mx.array(prompts[0][:16]))
        base_t, want, _ = timed(plain, prompts)
        for name, run in runs.items():
            t, outs, passes = (
                (base_t, want, len(prompts) * N) if name == "mlx-lm plain" else timed(run, prompts)
            )
            assert outs == want, f"{task}/{name}: output differs from mlx-lm's greedy tokens"
            tokens = sum(len(o) for o in outs)
            row = dict(task=task, method=name, tokens_per_s=tokens / t, speedup=base_t / t,
                       tau=tokens / passes)  # fmt: skip
            rows.append(row)
            print(f"{task:9s} {name:26s} {row['tokens_per_s']:7.1f} tok/s  "
                  f"{row['speedup']:.2f}x  tau {row['tau']:.2f}", flush=True)  # fmt: skip
        raw[task] = [len(p) for p in prompts]
    cmd = "python benchmarks/ngram_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None
    )
    versions = f"MLX {mx.__version__}, mlx-lm {mlx_lm.__version__}"
    lines = [
        f"# Prompt-lookup drafting ({mx.default_device()}, {versions}, {platform.machine()})",
        "",
        f"`{cmd}`: {args.prompts} prompts x {N} tokens, greedy, outputs checked against "
        "mlx-lm's. tau = tokens per forward pass of the large model. Model: "
        f"{args.model or 'the shipped one'}.",
        "",
        "| task | method | tokens/s | speedup vs mlx-lm plain | tau |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['tau']:.2f} |")  # fmt: skip
    out = Path(__file__).parent / "results" / f"ngram_speed{'-' + args.tag if args.tag else ''}"
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    meta = dict(command=cmd, versions=versions, machine=platform.platform(), prompt_tokens=raw)
    out.with_suffix(".json").write_text(json.dumps(dict(meta, rows=rows), indent=1))
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()

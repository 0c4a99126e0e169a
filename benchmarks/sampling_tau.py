"""Tokens per forward pass when sampling, for both lossless designs and two trees.

``python benchmarks/sampling_tau.py [--model DIR] [--runs 3]``

Explains the sampling rows of ``RESULTS.md``: for each temperature, tree
(the one tuned for this device and the model's own, unless they decode
plainly, and the package default: top-3 per stream, 16 nodes) and acceptance design, the
mean tau over held-out prompts and seeded runs. It also reports how peaked the model's own distribution is
along its sampled outputs (the mean probability of its top token at that
temperature), which bounds what a deterministic draft can earn: a
``"target-sample"`` node accepts a drafted child at most with the target
probability of that child. Writes ``benchmarks/results/sampling_tau[-TAG].{md,json}``.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

from mlx_specstream import load, stream_generate
from mlx_specstream.benchmark import default_tree_settings, load_prompts, machine_info
from mlx_specstream.decode import ACCEPTANCE
from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.sample_utils import make_sampler


def top_probability(model, prompt, tokens, temp):
    """Mean probability of the model's top token at ``temp`` over ``tokens``'s positions."""
    ids = mx.array([list(prompt) + list(tokens[:-1])])
    logits = model(ids)[0, len(prompt) - 1 :].astype(mx.float32)
    p = mx.softmax(logits / temp, axis=-1)
    return mx.mean(mx.max(p, axis=-1)).item()


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--temps", type=float, nargs="+", default=[0.0, 0.7, 1.0])
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--tag", default="", help="results go to sampling_tau[-TAG].{md,json}")
    args = p.parse_args(argv)
    model_dir = Path(args.model) if args.model else DEFAULT_DIR
    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    prompts = load_prompts(
        model_dir / "prompts.jsonl", tokenizer, args.num_prompts, args.prompt_tokens
    )
    cfg = model.speculative_streams.config
    own = cfg.stored or cfg  # the section's own settings (devices not tuned)
    # A tree that decodes plainly is left out: nothing to measure.
    trees = {}
    if cfg.tuned_on and cfg.tree_depth != 0:
        trees[f"tuned for {cfg.tuned_on}"] = {}
    if own.tree_depth != 0:
        trees[f"model's own (k={own.top_k}, {own.max_tree_nodes} nodes)"] = dict(
            tree_top_k=own.top_k,
            tree_depth=own.num_streams if own.tree_depth is None else own.tree_depth,
            max_tree_nodes=own.max_tree_nodes,
            prune_threshold=own.prune_threshold,
            draft=own.draft or "streams",
        )
    trees["default (k=3, 16 nodes)"] = default_tree_settings(cfg)
    rows = []
    for temp in args.temps:
        for tree_name, tree in trees.items():
            for acceptance in ACCEPTANCE if temp > 0 else ACCEPTANCE[:1]:
                taus, peaks = [], []
                for i, prompt in enumerate(prompts):
                    for run in range(args.runs if temp > 0 else 1):
                        mx.random.seed(1000 * i + run)
                        toks = []
                        for r in stream_generate(
                            model,
                            tokenizer,
                            prompt,
                            max_tokens=args.max_tokens,
                            sampler=make_sampler(temp=temp),
                            acceptance=acceptance,
                            **tree,
                        ):
                            toks.append(r.token)
                        taus.append(r.generation_tokens / r.forward_passes)
                        if temp > 0:
                            peaks.append(top_probability(model, prompt, toks, temp))
                rows.append(
                    dict(
                        temp=temp,
                        tree=tree_name,
                        acceptance="greedy" if temp == 0 else acceptance,
                        tau=statistics.mean(taus),
                        tau_stdev=statistics.stdev(taus) if len(taus) > 1 else 0.0,
                        top_probability=statistics.mean(peaks) if peaks else None,
                        generations=len(taus),
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    info = machine_info()
    info["command"] = " ".join(["python benchmarks/sampling_tau.py"] + sys.argv[1:])
    lines = [
        "| temperature | tree | acceptance | tau (mean ± sd) | mean top-token probability | generations |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['temp']} | {r['tree']} | {r['acceptance']} | {r['tau']:.2f} ± "
            f"{r['tau_stdev']:.2f} | {_fmt(r['top_probability'])} | {r['generations']} |"
        )
    lines += ["", f"Command: `{info['command']}`; mlx {info['mlx']}, mlx-lm {info['mlx_lm']}."]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "sampling_tau" + (f"-{args.tag}" if args.tag else "")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "info": info}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Trees against chains of drafts on a model with recurrent layers, after training streams.

    python benchmarks/hybrid_trees.py [--iters 60] [--prompts 8] [--tag cpu]

A tiny Qwen3-Next-shaped model (the tests' config: Gated DeltaNet and attention layers in
turn, vocabulary 64, random weights) gets lossless streams on its top layer from
``mlx_specstream.train --self-distill`` on the tests' cycle data (as
``tests/test_hybrid_streams.py`` trains it), then decodes greedily from the first two
tokens of the training windows, each way:

* the streams' top tokens as a chain of 3 (``tree_top_k=1``: session 31's only way);
* the streams' trees (session 32): top-2 per level in 8 nodes, top-3 in 16;
* prompt lookup with 1, 2 and 4 drafts per tree (``ngram_candidates``).

Printed per way: tokens per pass (tau), tokens/s, and whether every output equals mlx-lm's
greedy decoding. A tiny model's pass costs what its dispatch costs, so its tokens/s say
little about a real model's; tau is the figure (``recurrent_step.py`` times the steps).
Results go to ``benchmarks/results/hybrid_trees[-TAG].{md,json}``.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx_lm.utils import save_config, save_model

from report import heading, machine_info, write_results

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import HYBRID_ARGS, plain_greedy, tiny_hybrid, word_tokenizer  # noqa: E402
from test_train import V, write_cycle_jsonl  # noqa: E402

from mlx_specstream import load, stream_generate  # noqa: E402
from mlx_specstream.train import main as train_main  # noqa: E402

WAYS = {
    "streams: chain of 3": dict(tree_top_k=1),
    "streams: top-2 tree, 8 nodes": dict(tree_top_k=2, max_tree_nodes=8),
    "streams: top-3 tree, 16 nodes": dict(tree_top_k=3, max_tree_nodes=16),
    "lookup: 1 draft (chain)": dict(draft="ngram", num_draft_tokens=4),
    "lookup: 2 drafts per tree": dict(draft="ngram", num_draft_tokens=4, ngram_candidates=2),
    "lookup: 4 drafts per tree": dict(draft="ngram", num_draft_tokens=4, ngram_candidates=4),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    info = machine_info(iters=args.iters, prompts=args.prompts, max_tokens=args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        base, out = Path(tmp) / "base", Path(tmp) / "out"
        base.mkdir()
        save_model(base, tiny_hybrid("qwen3_next", vocab_size=V, weight_scale=1.0))
        save_config({**HYBRID_ARGS["qwen3_next"], "vocab_size": V, "model_type": "qwen3_next"},
                    base / "config.json")  # fmt: skip
        word_tokenizer(V).save_pretrained(str(base))
        data = write_cycle_jsonl(Path(tmp) / "data.jsonl")
        t0 = time.perf_counter()
        train_main(["--model", str(base), "--data", str(data), "--out", str(out),
                    "--iters", str(args.iters), "--no-tune", "--self-distill",
                    "--batch-size", "4", "--learning-rate", "1e-2", "--stream-lora-rank", "8",
                    "--max-seq-length", "16", "--window-prompt", "2",
                    "--steps-per-report", str(args.iters)])  # fmt: skip
        train_s = time.perf_counter() - t0
        model, tok = load(str(out))
        plain, _ = mlx_lm.load(str(base))
        lines = list(open(data))[: args.prompts]
        prompts = [tok.encode(json.loads(line)["text"])[:2] for line in lines]
        wants = [plain_greedy(plain, prompt, args.max_tokens) for prompt in prompts]
        results = {}
        for name, kwargs in WAYS.items():
            tokens = passes = 0
            seconds, same = 0.0, True
            for prompt, want in zip(prompts, wants):
                t0 = time.perf_counter()
                got = list(stream_generate(model, tok, mx.array(prompt),
                                           max_tokens=args.max_tokens, **kwargs))  # fmt: skip
                seconds += time.perf_counter() - t0
                same &= [r.token for r in got] == want[: len(got)]
                tokens, passes = tokens + len(got), passes + got[-1].forward_passes
            results[name] = dict(tau=tokens / passes, tps=tokens / seconds, identical=same)
    lines = [heading("Trees against chains of drafts on a model with recurrent layers", info),
             "", f"`{info['command']}`", "",
             f"Tiny Qwen3-Next shape (vocabulary {V}), streams on its top layer trained "
             f"{args.iters} steps ({train_s:.0f} s); {args.prompts} prompts of 2 tokens, "
             f"{args.max_tokens} tokens each, greedy.", "",
             "| drafts | tau | tokens/s | output identical to mlx-lm's |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tau']:.2f} | {r['tps']:.0f} | "
                     f"{'yes' if r['identical'] else 'NO'} |")  # fmt: skip
    write_results("hybrid_trees", args.tag, "\n".join(lines) + "\n",
                  dict(info=info, train_seconds=train_s, results=results))  # fmt: skip


if __name__ == "__main__":
    main()

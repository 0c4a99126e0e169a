"""What a step with Medusa heads costs: heads trained here (one block each, the base's own
LM head) against released ones (an LM head of their own per head, as FasterDecoding's and
vLLM's checkpoints hold), and released ones ranking a draft vocabulary, against mlx-lm's
plain decoding of the same weights.

    benchmarks/with_openblas.sh python benchmarks/medusa_step.py --models small,qwen2-0.5b \
        --tag cpu-openblas
    MLX_ENABLE_TF32=0 python benchmarks/medusa_step.py --dtypes bf16,q4 --tag gpu

Random weights of the shape and random heads. Tau is not the point here (random models
repeat themselves, so some drafts are right: it is reported); the step's cost is:

* r = our ms per step (its pass and drafting) with a chain of n drafts (or the 16-node
  tree of top-3 over every head) / mlx-lm's per-token ms (its pipelined
  ``generate_step``), same weights, same run: the tau that way needs to break even (at
  tau, the speedup is about tau / r);
* heads ms: the heads the tree reads, run alone over one state (evaluated), median.

A released head's LM head is as large as the base's (``V x D``), so each level drafted
reads one more; a chain of n runs the first n heads only. Results go to
``benchmarks/results/medusa_step[-TAG].{md,json}``.
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from mlx_lm.generate import generate_step

from mlx_specstream.config import DrafterConfig
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.draft_vocab import use_draft_vocab
from mlx_specstream.drafters import make_drafter
from mlx_specstream.streams import StreamRuntime
from report import heading, machine_info, write_results
from shapes import random_model

WAYS = {  # name: (released heads, chain lengths and trees as spec_generate_step's settings)
    "chain 1": dict(tree_top_k=1, tree_depth=1, max_tree_nodes=2),
    "chain 2": dict(tree_top_k=1, tree_depth=2, max_tree_nodes=3),
    "chain 3": dict(tree_top_k=1, tree_depth=3, max_tree_nodes=4),
    "16 nodes (top-3)": dict(tree_top_k=3, max_tree_nodes=16),
}


def with_heads(model, dtype: str, heads: int, released: bool, seed: int = 1):
    """``model`` with ``heads`` random Medusa heads: trained here's (one block, the base's
    head) or a released checkpoint's (one block and an LM head of its own each); their
    matrices quantized as the base's are for ``q4``."""
    medusa = dict(layers_per_head=1, lm_heads=heads, fc_bias=True, token_map_size=None)
    config = DrafterConfig(kind="medusa", num_draft_tokens=heads,
                           medusa=medusa if released else None)  # fmt: skip
    mx.random.seed(seed)
    drafter = make_drafter(config, model)
    drafter.update(
        tree_map(lambda p: mx.random.normal(p.shape) * p.shape[-1] ** -0.5,
                          drafter.parameters())  # fmt: skip
    )
    drafter.set_dtype(mx.float32 if dtype == "f32" else mx.bfloat16)
    if dtype == "q4":
        nn.quantize(drafter, group_size=64, bits=4)
    mx.eval(drafter.parameters())
    model.speculative_streams = StreamRuntime(model, config, drafter=drafter)
    return drafter


def per_token(make, runs: int):
    """(seconds per token, tokens per pass) after the first pass (prefill out), the median
    run of ``runs`` after a warm-up."""
    times = []
    for _ in range(runs + 1):
        t0, p0, n = None, 0, 0
        for i, item in enumerate(make()):
            passes = item[3] if len(item) > 3 else i + 1
            if t0 is None:
                t0, p0 = time.perf_counter(), passes
                continue
            n += 1
        times.append(((time.perf_counter() - t0) / max(1, n), n / max(1, passes - p0)))
    times = sorted(times[1:])
    return times[len(times) // 2]


def heads_ms(model, levels: int, runs: int = 20) -> float:
    """Median ms of the first ``levels`` heads over one random state, evaluated."""
    rt = model.speculative_streams
    h = mx.random.normal((1, model.args.hidden_size))
    times = []
    for _ in range(runs + 2):
        t0 = time.perf_counter()
        mx.eval(rt.drafter.draft_rows(rt, h, levels))
        times.append(time.perf_counter() - t0)
    times = sorted(times[2:])
    return times[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small,qwen2-0.5b")
    ap.add_argument("--dtypes", default="f32")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--draft-vocab", type=int, default=32768,
                    help="released heads also ranking this many tokens (0: not)")  # fmt: skip
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    info = machine_info(**vars(args))
    lines = [heading("Medusa heads: a step's cost, trained here's against released ones", info)]
    lines.append(f"\nCommand: `{info['command']}`\n")
    lines.append(
        "step ms: our ms per step (a pass and its drafting); r: that / mlx-lm's per-token "
        "ms, same weights, same run: the tau that way needs to break even. heads ms: the "
        "heads the tree reads, alone over one state. tau: tokens per pass (random weights "
        "repeat themselves, so some drafts are right), and our tokens/s against mlx-lm's. "
        "Trained here: one block each and the base's LM head (one product for all "
        "levels); released: an LM head of their own each (one product per level).\n"
    )
    data = {}
    for shape in args.models.split(","):
        for dtype in args.dtypes.split(","):
            model = random_model(shape, dtype, streams=False)
            vocab = model.args.vocab_size
            prompt = mx.array([(31 * i + 7) % vocab for i in range(args.prompt_tokens)])
            kinds = [("trained here", False, 0), ("released", True, 0)]
            if args.draft_vocab and args.draft_vocab < vocab:
                kinds.append((f"released, drafts rank {args.draft_vocab}", True, args.draft_vocab))
            lines.append(f"\n### {shape}, {dtype}: {args.heads} heads, vocabulary {vocab}\n")
            lines.append("| heads | mlx-lm ms/token | " + " | ".join(
                f"{w}: step ms, r, heads ms, tau, vs mlx-lm" for w in WAYS) + " |")  # fmt: skip
            lines.append("|---|---|" + "---|" * len(WAYS))
            for name, released, size in kinds:
                with_heads(model, dtype, args.heads, released)
                if size:  # (which tokens does not change the cost: a seeded random set)
                    ids = np.random.default_rng(0).choice(vocab, size, replace=False)
                    use_draft_vocab(model, ids)
                plain, _ = per_token(lambda: generate_step(
                    prompt, model, max_tokens=args.max_tokens), args.runs)  # fmt: skip
                row = dict(plain_ms=plain * 1e3)
                for way, tree in WAYS.items():
                    ms, tau = per_token(lambda: spec_generate_step(
                        prompt, model, max_tokens=args.max_tokens, **tree), args.runs)  # fmt: skip
                    levels = tree.get("tree_depth", args.heads)
                    row[way] = dict(step_ms=ms * tau * 1e3, r=ms * tau / plain, tau=tau,
                                    speedup=plain / ms, heads_ms=heads_ms(model, levels))  # fmt: skip
                data[f"{shape}-{dtype}-{name}"] = row
                cells = " | ".join(f"{row[w]['step_ms']:.1f}, {row[w]['r']:.2f}, "
                                   f"{row[w]['heads_ms']:.1f}, {row[w]['tau']:.2f}, "
                                   f"{row[w]['speedup']:.2f}x" for w in WAYS)  # fmt: skip
                lines.append(f"| {name} | {row['plain_ms']:.2f} | {cells} |")
                print(lines[-1], flush=True)
                model.speculative_streams = None
            model = None  # (its weights freed before the next shape)
    path = write_results("medusa_step", args.tag, "\n".join(lines) + "\n", dict(info=info, **data))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""What a step of a checkpoint's MTP layers drafting chains costs on a hybrid (Qwen3-Next,
Qwen3.5: Gated DeltaNet layers) or an attention model (MiMo's layout, several layers),
against mlx-lm's plain decoding of the same weights.

    python benchmarks/mtp_step.py [--models qwen3_next-small,qwen3_next-0.6b] [--tag cpu]
    python benchmarks/mtp_step.py --models mimo-0.5b --layers 1,3 --tag cpu-mimo
    python benchmarks/mtp_step.py --models mimo-0.5b --layers 3 --draft-vocab 0,32768
    python benchmarks/mtp_step.py --models qwen3_next-0.6b --trees "2,8;3,16" --tag cpu-trees
    MLX_ENABLE_TF32=0 python benchmarks/mtp_step.py --dtypes bf16,q4 --tag gpu

``--layers K`` gives the drafter K MTP layers, layer k drafting level k (attention models
only; the hybrids' checkpoints keep one). ``--draft-vocab K`` makes their head rank K
tokens only (:mod:`mlx_specstream.draft_vocab`).

Random weights of the shape, a random MTP layer in Qwen3-Next's layout (one attention
layer, the base's head): its drafts are all rejected, so each step yields one token
and takes the dearer path (the recurrent states rolled back). Tau is not the point
here; the step's cost is:

* r(n) = our time per token with chains of n drafts / mlx-lm's per-token time (its
  pipelined ``generate_step``), same weights, same run: the tau a chain of n needs
  to break even (at tau, the speedup is about tau / r(n); accepted steps skip the
  roll-back and cost a little less);
* draft = the MTP layer's share of a step: n runs of its layer and of the base's LM
  head (timed with the step's own host read of the chain);
* r(0): our chain loop without drafts;
* every draft right: the same chains with the layer's drafts replaced by the right
  tokens (the layer still runs, its cost kept), so every chain is accepted whole: tau
  n + 1 and the most a chain of n gives on this device, against mlx-lm;
* ``--trees "k,nodes;..."``: r of a step whose tree is the static tree of the layer's
  levels (top-k, at most ``nodes`` nodes, 3 levels) and of one grown from the layer's own
  drafts (``dynamic_tree=True``: each level one run of the layer over ``k`` rows), every
  draft rejected: the tau each needs to break even.

Results go to ``benchmarks/results/mtp_step[-TAG].{md,json}``.
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate_step

from mlx_specstream.config import DrafterConfig
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.draft_vocab import use_draft_vocab
from mlx_specstream.mtp import MTPDrafter
from mlx_specstream.recurrent import has_recurrent_layers
from mlx_specstream.streams import StreamRuntime
from report import heading, machine_info, write_results
from shapes import random_model

CHAINS = (1, 2, 3)


def with_random_mtp(model, dtype: str, seed: int = 1, layers: int = 1):
    """``model`` with ``layers`` random MTP layers drafting (as ``mtp.attach_mtp`` puts a
    checkpoint's), their matrices quantized as the base's are for ``q4``."""
    config = DrafterConfig(kind="mtp", num_draft_tokens=max(CHAINS), top_k=1, max_tree_nodes=4,
                           num_mtp_layers=layers)  # fmt: skip
    mx.random.seed(seed)
    drafter = MTPDrafter(config, model)
    drafter.set_dtype(mx.float32 if dtype == "f32" else mx.bfloat16)
    if dtype == "q4":
        nn.quantize(drafter, group_size=64, bits=4)
    mx.eval(drafter.parameters())
    model.speculative_streams = StreamRuntime(model, config, drafter=drafter)
    return drafter


def measure(model, prompt, max_tokens: int, runs: int, trees=()) -> dict:
    """ms per token of mlx-lm's loop, of ours without drafts and with chains of n
    (medians of ``runs``), and each chain step's drafting ms; then the same chains with
    the layer's drafts replaced by the right tokens (the layer still runs), every chain
    accepted whole: the best a chain of n gives on this device."""
    drafted = []
    real = MTPDrafter.draft
    text = list(prompt) + [int(t) for t, _ in generate_step(mx.array(prompt), model,
                                                            max_tokens=max_tokens + 8)]  # fmt: skip

    def right(self, rt, state, *args, **kwargs):  # (the layer's work, then the right tokens)
        logits = real(self, rt, state, *args, **kwargs)
        mx.eval(logits)  # (else nothing reads the last level's head: never computed)
        a = state.offset - 1  # (its last row: token a's state with token a + 1)
        want = mx.array(text[a + 2 : a + 2 + logits.shape[0]])
        return (mx.arange(logits.shape[-1])[None] == want[:, None]).astype(logits.dtype) * 30

    def timed(self, *args, **kwargs):  # (the step reads the chain at once: evaluated here)
        t0 = time.perf_counter()
        out = real(self, *args, **kwargs)
        mx.eval(out)
        drafted.append(time.perf_counter() - t0)
        return out

    def per_token(make):
        """(seconds per token, tau) after the first pass (prefill and first pass out),
        counting only the tokens of the later passes; median of the runs."""
        times = []
        for _ in range(runs + 1):  # (the first: warm-up)
            t0, p0, n = None, 0, 0
            for i, item in enumerate(make()):
                passes = item[3] if len(item) > 3 else i + 1
                if t0 is None:
                    t0, p0 = time.perf_counter(), passes
                n += passes > p0
            seconds = time.perf_counter() - t0
            times.append((seconds / max(1, n), n / max(1, passes - p0)))
        times = sorted(times[1:])
        return times[len(times) // 2]

    def chain(n):  # (a hybrid's drafter drafts chains of n; elsewhere, a tree of one path)
        if has_recurrent_layers(model):
            return dict(num_draft_tokens=n)
        return dict(tree_top_k=1, tree_depth=n, max_tree_nodes=n + 1)

    p = mx.array(prompt)
    plain, _ = per_token(lambda: generate_step(p, model, max_tokens=max_tokens))
    rows = {}
    ours, _ = per_token(lambda: spec_generate_step(p, model, max_tokens=max_tokens,
                                                   speculative=False))  # fmt: skip
    rows[0] = dict(ms=ours * 1e3, r=ours / plain, tau=1.0, draft_ms=0.0)
    MTPDrafter.draft = timed
    try:
        for n in CHAINS:
            drafted.clear()
            ms, tau = per_token(
                lambda: spec_generate_step(p, model, max_tokens=max_tokens, **chain(n))
            )
            drafted.sort()
            rows[n] = dict(ms=ms * 1e3, r=ms / plain, tau=tau,
                           draft_ms=drafted[len(drafted) // 2] * 1e3)  # fmt: skip
        MTPDrafter.draft = right
        for n in CHAINS:
            ms, tau = per_token(
                lambda: spec_generate_step(p, model, max_tokens=max_tokens, **chain(n))
            )
            rows[n].update(right_ms=ms * 1e3, right_speedup=plain / ms, right_tau=tau)
    finally:
        MTPDrafter.draft = real
    shapes = {}
    for k, nodes in trees:  # (the static tree of the layer's levels, then grown)
        for grown in (False, True):
            tree = dict(tree_top_k=k, max_tree_nodes=nodes, dynamic_tree=grown)
            ms, tau = per_token(lambda: spec_generate_step(p, model, max_tokens=max_tokens,
                                                           **tree))  # fmt: skip
            shapes[f"top-{k}, {nodes} nodes, {'grown' if grown else 'static'}"] = dict(
                ms=ms * 1e3, r=ms / plain, tau=tau
            )
    return dict(plain_ms=plain * 1e3, rows=rows, trees=shapes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="qwen3_next-small,qwen3_next-0.6b")
    ap.add_argument("--dtypes", default="f32")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", default="1", help="MTP layers drafting, e.g. 1,3")
    ap.add_argument(
        "--draft-vocab",
        default="0",
        help="draft vocabulary sizes, e.g. 0,32768 (0: every token; else a random set)",
    )
    ap.add_argument("--trees", default="", help='tree shapes "k,nodes;..." timed static '
                    "and grown (one MTP layer)")  # fmt: skip
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    trees = [tuple(int(x) for x in t.split(",")) for t in args.trees.split(";") if t]
    info = machine_info(**vars(args))
    lines = [heading("A checkpoint's MTP layers drafting chains: the step's cost", info)]
    lines.append(f"\nCommand: `{info['command']}`\n")
    lines.append(
        "r(n): our ms per token with chains of n (every draft rejected: one token a step) / "
        "mlx-lm's per-token ms, same weights, same run; a chain of n breaks even at "
        "tau = r(n). draft: the MTP layer's ms a step (n runs of its layer and the head). "
        "Every draft right: the layer's drafts replaced by the right tokens (the layer still "
        "runs), every chain accepted whole: the most a chain of n gives here.\n"
    )
    data = {}
    runs = [(shape, dtype, int(k), int(v)) for shape in args.models.split(",")
            for dtype in args.dtypes.split(",") for k in args.layers.split(",")
            for v in args.draft_vocab.split(",")]  # fmt: skip
    for shape, dtype, layers, size in runs:
        model = random_model(shape, dtype, streams=False)
        with_random_mtp(model, dtype, layers=layers)
        vocab = model.args.vocab_size
        if size:  # (which tokens does not change the cost: a seeded random set)
            use_draft_vocab(model, np.random.default_rng(0).choice(vocab, size, replace=False))
        prompt = [(31 * i + 7) % vocab for i in range(args.prompt_tokens)]
        res = measure(model, prompt, args.max_tokens, args.runs, trees if layers == 1 else ())
        name = (f"{shape}-{dtype}" + (f"-{layers}layers" if layers > 1 else "")
                + (f"-vocab{size}" if size else ""))  # fmt: skip
        data[name] = res
        ranks = f", drafts rank {size} of {vocab} tokens" if size else ""
        lines.append(f"\n### {shape}, {dtype}, {layers} MTP layer(s){ranks}: mlx-lm "
                     f"{res['plain_ms']:.2f} ms/token\n")  # fmt: skip
        lines.append("| chain of n | ours ms/token | r(n) | draft ms a step | tau | every "
                     "draft right: ms/token | tau | vs mlx-lm |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|---|")
        for n, row in res["rows"].items():
            best = ("| | | " if not n else f"| {row['right_ms']:.2f} | {row['right_tau']:.2f} | "
                    f"{row['right_speedup']:.2f}x |")  # fmt: skip
            lines.append(f"| {n} | {row['ms']:.2f} | {row['r']:.2f} | {row['draft_ms']:.2f} "
                         f"| {row['tau']:.2f} {best}")  # fmt: skip
        if res["trees"]:
            lines.append("\n| tree (every draft rejected) | ours ms/token | r | tau |")
            lines.append("|---|---|---|---|")
            for name_, row in res["trees"].items():
                lines.append(f"| {name_} | {row['ms']:.2f} | {row['r']:.2f} | {row['tau']:.2f} |")
        print("\n".join(lines[-(len(res["rows"]) + 3 + 2 * bool(res["trees"])
                                 + len(res["trees"])) :]), flush=True)  # fmt: skip
        del model
    path = write_results("mtp_step", args.tag, "\n".join(lines) + "\n", dict(info=info, **data))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

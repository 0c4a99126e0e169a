"""How many kernels one decoding step launches: ours against mlx-lm's plain passes.

    python benchmarks/step_graph.py [--models shipped,shipped-bf16,qwen2-0.5b,llama-8b] [--tag TAG]

On a GPU a small model's decoding is bound by kernel launches and by the host
building the graph, not by arithmetic (the shipped model: 1.15 ms for a plain
synchronous pass on an H100, issue #11, for microseconds of arithmetic). A
step that launches k kernels more than a plain pass pays for them on every
step, however wide the GPU is. The counts are exact, and the same on every
machine of one backend, so this script measures that overhead on a CPU too:

* nodes: every primitive of the step's graph, views included (host work);
* kernels: the primitives that are not views, as MLX builds them on this
  device (its CPU backend builds RMS norm, RoPE and attention from several);
* GPU kernels: the same, with each fused op that MLX's CUDA backend runs as
  one kernel counted once (:class:`mlx_specstream.kernels.FastOps`: RMS norm,
  RoPE; attention in bf16, or over one row); an estimate on a CPU, and the
  GPU's own count (equal to the kernels column) on a GPU.

mlx-lm's step is its ``generate_step`` graph: the forward over n tokens, the
log-softmax and the argmax. Ours is everything one of our steps evaluates
(pass, acceptance, next draft; pipelined: also the fold of the previous step),
the median over a generation's steps after the first; "outside the pass" is
what is not part of the main logits' graph; "compaction" what an unpipelined
step's host read evaluates on its own after a tree (the most over the steps). Random models of real depth take
tiny widths (the graph does not depend on them) and the shipped model's
lossless streams (gamma 3, 4 stream layers, stream LoRA rank 16, fused pass).

Writes ``benchmarks/results/step_graph[-TAG].{md,json}``.
"""

import argparse
import statistics

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import mlx_specstream
import mlx_specstream.decode as decode
import mlx_specstream.streams as streams
from mlx_specstream import SpecStreamConfig, attach_streams
from mlx_specstream.kernels import FastOps, graph_size, recorded_steps
from report import heading, machine_info, write_results
from shapes import SHAPES, random_model

TINY = dict(hidden_size=64, intermediate_size=128, vocab_size=512, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)  # fmt: skip
STREAMS = dict(num_streams=3, num_stream_layers=4, stream_lora_rank=16, mode="lossless",
               stream_pass="fused")  # fmt: skip
CASES = {
    "chain of 3": dict(tree_top_k=1, tree_depth=3, max_tree_nodes=4),
    "16-node tree": dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16),
    "prompt lookup, 3 drafts": dict(draft="ngram", num_draft_tokens=3),
}


def plain_step(model, prompt, n, ops: FastOps) -> dict:
    """The graph of mlx-lm's greedy step over ``n`` tokens after ``prompt``."""
    cache = make_prompt_cache(model)
    mx.eval(model(prompt[None], cache=cache))
    ops.reset()
    logits = model(prompt[-n:][None], cache=cache)[:, -1]
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    return graph_size([mx.argmax(logprobs, axis=-1), logprobs], ops)


def our_steps(model, prompt, settings, ops: FastOps, max_tokens: int) -> dict:
    """Median graph of one of our greedy steps after the first, and tau, with the
    decoder's choices as on a GPU (the fused pass's own head computes the streams')."""
    # (and RoPE as MLX's call, which a GPU runs as one kernel, not from the CPU's tables)
    on_gpu, decode.on_gpu, streams.on_gpu = decode.on_gpu, lambda: True, lambda: True
    try:
        with recorded_steps(ops) as steps:
            gen = decode.spec_generate_step(prompt, model, max_tokens=max_tokens, **settings)
            out = list(gen)
    finally:
        decode.on_gpu = streams.on_gpu = on_gpu
    later = steps[1:]
    med = {k: statistics.median(s[k] for s in later) for k in later[0] if k != "by_primitive"}
    # A tree whose accepted path leaves the first children is compacted after the step.
    med["compaction_max"] = max(s["compaction"] for s in later)
    return dict(**med, tau=len(out) / out[-1][3], steps=len(steps),
                by_primitive=later[len(later) // 2]["by_primitive"])  # fmt: skip


def as_on_gpu(model):
    """``model``, its runtime set as on MLX's CUDA backend: the fused stream pass,
    additive masks and the gathered stream-LoRA product (the decoder's GPU choices
    are made in :func:`our_steps`)."""
    rt = model.speculative_streams
    rt.split_streams, rt.additive_masks = False, True
    if rt.lora_targets:
        rt.gather_lora = True
    return model


def build(name: str, dtype: str):
    """The model, its runtime set as on a GPU (:func:`as_on_gpu`). ``shipped`` is
    the embedded model in float32 (the dtype of identical output on a GPU, with
    TF32 off), ``shipped-bf16`` in bfloat16, as stored and as a GPU loads it."""
    if name in ("shipped", "shipped-bf16"):
        model, _ = mlx_specstream.load()
        model.set_dtype(mx.bfloat16 if name == "shipped-bf16" else mx.float32)
    else:
        model = random_model(name, dtype, streams=False, **TINY)
        attach_streams(model, SpecStreamConfig(**STREAMS), seed=1)
    return as_on_gpu(model)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="shipped,shipped-bf16,qwen2-0.5b,llama-8b",
                    help=f"comma-separated: shipped, shipped-bf16, {', '.join(SHAPES)}")  # fmt: skip
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16"],
                    help="random models' dtype (shipped: float32; shipped-bf16: bfloat16)")  # fmt: skip
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    info = machine_info(max_tokens=args.max_tokens, dtype=args.dtype, streams=STREAMS,
                        tiny_widths=TINY)  # fmt: skip
    lines = [
        heading("Kernels per decoding step: ours against mlx-lm's plain step", info),
        "",
        f"`{info['command']}`: random models in {args.dtype} (the shipped one in float32, "
        "and in bfloat16, as stored and as a GPU loads it). "
        "Greedy; one step's graph, counted before it runs. GPU kernels count each fused op "
        "that MLX's CUDA backend runs as one kernel once (RMS norm, RoPE; attention in "
        "bf16, or over one row); `/ plain n` divides by mlx-lm's step over the same n "
        "tokens, `/ plain 1` by its one-token step (its cost per token where launches bound "
        "it); outside the pass: kernels not in the main logits' graph; compaction: the most "
        "kernels a step's host read evaluated to gather a tree's accepted rows (a "
        "pipelined pass folds them instead; their writes are as many, in the next pass).",
        "",
        "| model | step | n | nodes | kernels | GPU kernels | outside the pass | "
        "/ plain n (GPU) | / plain 1 (GPU) | compaction (max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    data = dict(info=info, models={})
    with FastOps() as ops:
        for name in args.models.split(","):
            if name not in ("shipped", "shipped-bf16") and name not in SHAPES:
                ap.error(
                    f"--models: unknown model {name!r}; choose shipped, shipped-bf16 or one "
                    f"of {list(SHAPES)}"
                )
            model = build(name, args.dtype)
            vocab = model.args.vocab_size
            prompt = mx.random.randint(0, vocab, (64,), key=mx.random.key(0))
            prompt = mx.concatenate([prompt, prompt[:32]])  # something for prompt lookup to find
            plain = {n: plain_step(model, prompt, n, ops) for n in (1, 4, 16)}
            rows = [dict(step=f"mlx-lm, {n} token{'s' * (n > 1)}", n=n, **p)
                    for n, p in plain.items()]  # fmt: skip
            for case, settings in CASES.items():
                for pipelined in (False, True):
                    s = our_steps(model, prompt, dict(settings, pipeline=pipelined), ops,
                                  args.max_tokens)  # fmt: skip
                    s["n"] = n = round(s["n"])  # (the median tree: unpipelined lookup varies)
                    if n not in plain:
                        plain[n] = plain_step(model, prompt, n, ops)
                    label = f"ours, {case}{', pipelined' if pipelined else ''}"
                    rows.append(dict(step=label, **s))
            for r in rows:
                r["vs_plain_n"] = r["gpu_kernels"] / plain[r["n"]]["gpu_kernels"]
                r["vs_plain_1"] = r["gpu_kernels"] / plain[1]["gpu_kernels"]
                outside, compaction = r.get("outside_pass"), r.get("compaction_max")
                lines.append(
                    f"| {name} | {r['step']} | {r['n']} | {r['nodes']:.0f} | {r['kernels']:.0f} | "
                    f"{r['gpu_kernels']:.0f} | {'' if outside is None else f'{outside:.0f}'} | "
                    f"{r['vs_plain_n']:.2f} | {r['vs_plain_1']:.2f} | "
                    f"{'' if compaction is None else compaction} |"
                )
            data["models"][name] = rows
    write_results("step_graph", args.tag, "\n".join(lines) + "\n", data)


if __name__ == "__main__":
    main()

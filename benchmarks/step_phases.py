"""Each phase of one decode step, evaluated on its own (synchronously), against plain passes.

    benchmarks/with_openblas.sh python benchmarks/step_phases.py [--tree chain3] [--stream-pass fused]
    MLX_ENABLE_TF32=0 python benchmarks/step_phases.py --shape qwen2-0.5b --dtype bfloat16 --tag gpu

The decoder builds a step as one lazy graph, so its own timers cannot say
which part costs what. This script runs the same pieces in order on the
shipped model, ``--model`` or a random model of ``--shape`` with random
streams (a 96-token prompt in the cache, a fixed tree, the same cache length
every repetition: warm shapes), with an ``mx.eval`` after each:

* ``pass``: the verify pass over the tree (fused: with every node's stream
  rows; split: main rows only), or with ``head in pass`` the fused pass whose
  head call also covers the stream rows;
* ``accept``: log-softmax, argmax and the tree walk;
* ``draft``: the decoder's own drafting (``Decoder._stream_logits`` and
  ``_draft_tokens``): the accepted node's stream logits (the head over its
  stream rows, the split pass's second partial pass, or a gather) and the top-k;
* ``commit``: the host read of the accepted node and the cache compaction;

beside plain mlx-lm forwards over 1 and over n tokens. Medians of ``--reps``.
Each phase's ``build`` is the host's share: the time to build its lazy graph,
before the evaluation (on a GPU the device runs after it; a plain token's
build is what mlx-lm's loop overlaps with the device's previous pass).
Writes ``benchmarks/results/step_phases[-TAG].{md,json}``.
"""

import argparse
import os
import statistics
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import mlx_specstream
from mlx_specstream.cache import commit_path
from mlx_specstream.decode import Decoder
from mlx_specstream.ngram import NGRAM_DRAFT_TOKENS
from mlx_specstream.precision import compute_dtype
from mlx_specstream.settings import greedy
from mlx_specstream.tree import accept, path_to, static_tree
from report import heading, machine_info, write_results
from shapes import SHAPES, random_model

TINY = dict(hidden_size=64, intermediate_size=128, vocab_size=512, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)  # fmt: skip
TREES = {"chain3": ([1, 1, 1], 3, 4), "k2x3-8": ([2, 2, 2], 3, 8), "k3x3-16": ([3, 3, 3], 3, 16)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", default="chain3", choices=sorted(TREES))
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--tag", default="")
    p.add_argument("--model", default=None, help="Model directory (default: the shipped model)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="A random model of this shape with random streams, instead of --model")  # fmt: skip
    p.add_argument("--tiny-widths", action="store_true",
                   help="--shape's depth with tiny widths: the host's figures at real depth")  # fmt: skip
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="Compute dtype (default: as the model generates)")  # fmt: skip
    args = p.parse_args()
    if args.shape and args.model:
        p.error("--shape and --model: pass one")
    if args.shape:
        tiny = TINY if args.tiny_widths else {}
        model = random_model(args.shape, {"float32": "f32"}.get(args.dtype, "bf16"), **tiny)
    else:
        model, _ = mlx_specstream.load(args.model)
        if args.dtype:
            model.set_dtype(getattr(mx, args.dtype))
    rt = model.speculative_streams
    ks, depth, nodes = TREES[args.tree]
    n = len(static_tree(ks, depth, nodes).parents)
    tokens = mx.array([(7 * i + 5) % model.args.vocab_size for i in range(n)])
    cache = make_prompt_cache(model)
    mx.eval(model(mx.arange(10, 106)[None], cache=cache))
    prefix = cache[0].offset

    def rewind():
        for c in cache:
            c.trim(c.offset - prefix)

    times, builds, hosts = {}, {}, {}

    def timed(fn, row, phase):
        """``fn``'s result, its arrays evaluated; records the seconds it took in
        all and to build its graph."""
        mx.synchronize()
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        t1 = time.perf_counter()
        if hasattr(out, "logits"):  # a pass's StepOutput
            arrays = (out.logits, out.stream_hidden, out.stream_logits)
        else:
            arrays = out if isinstance(out, tuple) else (out,)
        mx.eval([a for a in arrays if a is not None])
        add(row, phase, time.perf_counter() - t0)
        builds.setdefault(row, {}).setdefault(phase, []).append(t1 - t0)
        hosts.setdefault(row, {}).setdefault(phase, []).append(time.thread_time() - c0)
        return out

    def add(row, phase, seconds):
        times.setdefault(row, {}).setdefault(phase, []).append(seconds)

    variants = {
        "fused": (True, False),
        "fused, head in pass": (True, True),
        "split": (False, False),
    }
    for _ in range(args.reps):
        for k in (1, n):
            timed(lambda: model(tokens[:k][None], cache=cache), f"plain forward over {k}", "total")
            rewind()
        for name, (all_streams, head_in_pass) in variants.items():
            rt.split_streams = not all_streams
            # The decoder's own drafting code, with its stream pass and head placement set.
            dec = Decoder(rt, cache, [], greedy, [], (ks, depth, 0.0, nodes), "target-sample",
                          None, NGRAM_DRAFT_TOKENS, -1)  # fmt: skip
            dec.head_on_streams = head_in_pass
            step = timed(lambda: _pass(dec, tokens), name, "pass")
            last, targets = timed(lambda: _accept(tokens, step), name, "accept")
            timed(lambda: dec._draft_tokens(dec._stream_logits(step, last), targets[last]), name,
                  "draft")  # fmt: skip
            t0 = time.perf_counter()
            path = path_to(last.item(), step.kept_parents)
            commit_path(cache, prefix, [path] * rt.num_layers)
            mx.eval([c.keys for c in cache])
            add(name, "commit", time.perf_counter() - t0)
            rewind()
    table = []
    for row, phases in times.items():
        med = {k: statistics.median(v) * 1e3 for k, v in phases.items()}
        med.setdefault("total", sum(med.values()))
        build = {k: statistics.median(v) * 1e3 for k, v in builds[row].items()}
        host_by = {k: statistics.median(v) * 1e3 for k, v in hosts[row].items()}
        host = sum(host_by.values())
        table.append(
            dict(row=row, **med, build=sum(build.values()), builds=build, host=host, hosts=host_by)
        )
    info = machine_info(tree=args.tree, nodes=n, reps=args.reps, shape=args.shape,
                        tf32=os.environ.get("MLX_ENABLE_TF32"))  # fmt: skip
    lines = [
        heading("Step phases", info),
        "",
        f"`{info['command']}`: "
        + (
            f"a random {args.shape}-shaped model{' (tiny widths)' * args.tiny_widths} with "
            "random streams"
            if args.shape
            else args.model or "shipped model"
        )
        + f" ({compute_dtype(model)}), tree {args.tree} ({n} nodes) after a 96-token "
        f"prompt, each phase evaluated on its own, medians of {args.reps} (ms); host build: "
        "the time to build the graphs of the pass, acceptance and draft, before their "
        "evaluation (plain: the forward's); host CPU: the main thread's CPU time for the "
        "same phases, building and evaluating (MLX's CPU backend computes on other threads: "
        "there it is the host's whole share; on a GPU it includes any spinning wait).",
        "",
        "| step | pass | accept | draft | commit | total | host build | host CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        cells = [f"{r[k]:.2f}" if k in r else "" for k in ("pass", "accept", "draft", "commit")]
        lines.append(
            f"| {r['row']} | "
            + " | ".join(cells)
            + f" | {r['total']:.2f} | {r['build']:.2f} | {r['host']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    write_results("step_phases", args.tag, text, dict(info=info, table=table))


def _pass(dec, tokens):
    """The verify pass as the decoder launches it."""
    return dec.rt.forward(tokens, dec.layout, dec.cache, 0.0, dec.all_streams,
                          stream_logits=dec.head_on_streams)  # fmt: skip


def _accept(tokens, step):
    logprobs = step.logits - mx.logsumexp(step.logits, axis=-1, keepdims=True)
    targets = mx.argmax(logprobs, axis=-1)
    layout = step.layout
    _, last = accept(tokens, layout.parents_mx, layout.ancestors_mx, targets, layout.depth_mx)
    return last, targets


if __name__ == "__main__":
    main()

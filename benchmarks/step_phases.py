"""Each phase of one decode step, evaluated on its own (synchronously), against plain passes.

    benchmarks/with_openblas.sh python benchmarks/step_phases.py [--tree chain3] [--stream-pass fused]

The decoder builds a step as one lazy graph, so its own timers cannot say
which part costs what. This script runs the same pieces in order on the
shipped model or ``--model`` (a 96-token prompt in the cache, a fixed
tree), with an ``mx.eval`` after each:

* ``pass``: the verify pass over the tree (fused: with every node's stream
  rows; split: main rows only), or with ``head in pass`` the fused pass whose
  head call also covers the stream rows;
* ``accept``: log-softmax, argmax and the tree walk;
* ``draft``: the decoder's own drafting (``Decoder._stream_logits`` and
  ``_draft_tokens``): the accepted node's stream logits (the head over its
  stream rows, the split pass's second partial pass, or a gather) and the top-k;
* ``commit``: the host read of the accepted node and the cache compaction;

beside plain mlx-lm forwards over 1 and over n tokens. Medians of ``--reps``.
Writes ``benchmarks/results/step_phases[-TAG].{md,json}``.
"""

import argparse
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

TREES = {"chain3": ([1, 1, 1], 3, 4), "k2x3-8": ([2, 2, 2], 3, 8), "k3x3-16": ([3, 3, 3], 3, 16)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", default="chain3", choices=sorted(TREES))
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--tag", default="")
    p.add_argument("--model", default=None, help="Model directory (default: the shipped model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="Compute dtype (default: as the model generates)")  # fmt: skip
    args = p.parse_args()
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

    def timed(fn):
        """(result, seconds) of ``fn`` with its arrays evaluated."""
        t0 = time.perf_counter()
        out = fn()
        if hasattr(out, "logits"):  # a pass's StepOutput
            arrays = (out.logits, out.stream_hidden, out.stream_logits)
        else:
            arrays = out if isinstance(out, tuple) else (out,)
        mx.eval([a for a in arrays if a is not None])
        return out, time.perf_counter() - t0

    times = {}

    def add(row, phase, seconds):
        times.setdefault(row, {}).setdefault(phase, []).append(seconds)

    variants = {
        "fused": (True, False),
        "fused, head in pass": (True, True),
        "split": (False, False),
    }
    for _ in range(args.reps):
        for k in (1, n):
            _, t = timed(lambda: model(tokens[:k][None], cache=cache))
            rewind()
            add(f"plain forward over {k}", "total", t)
        for name, (all_streams, head_in_pass) in variants.items():
            rt.split_streams = not all_streams
            # The decoder's own drafting code, with its stream pass and head placement set.
            dec = Decoder(rt, cache, [], greedy, [], (ks, depth, 0.0, nodes), "target-sample",
                          None, NGRAM_DRAFT_TOKENS, -1)  # fmt: skip
            dec.head_on_streams = head_in_pass
            step, t = timed(lambda: _pass(dec, tokens))
            add(name, "pass", t)
            (last, targets), t = timed(lambda: _accept(tokens, step))
            add(name, "accept", t)
            _, t = timed(lambda: dec._draft_tokens(dec._stream_logits(step, last), targets[last]))
            add(name, "draft", t)
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
        table.append(dict(row=row, **med))
    info = machine_info(tree=args.tree, nodes=n, reps=args.reps)
    lines = [
        heading("Step phases", info),
        "",
        f"`{info['command']}`: {args.model or 'shipped model'} "
        f"({compute_dtype(model)}), tree {args.tree} ({n} nodes) after a 96-token "
        f"prompt, each phase evaluated on its own, medians of {args.reps} (ms).",
        "",
        "| step | pass | accept | draft | commit | total |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        cells = [f"{r[k]:.2f}" if k in r else "" for k in ("pass", "accept", "draft", "commit")]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {r['total']:.2f} |")
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

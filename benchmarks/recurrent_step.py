"""What a prompt-lookup step costs on a model with recurrent layers, against plain decoding.

    python benchmarks/recurrent_step.py [--models qwen3_next-small] [--dtypes f32] [--tag cpu]
    python benchmarks/recurrent_step.py --streams --trees [--models qwen3_next-small]
    MLX_ENABLE_TF32=0 python benchmarks/recurrent_step.py --models qwen3_next-0.6b --dtypes bf16,q4

A step of :mod:`mlx_specstream.recurrent` feeds the pending tokens and n drafts in
one pass whose recurrent mixers are called twice (split after the pending tokens),
reads the tokens drawn at every row, and either keeps the drafts or rolls the
caches back to the split. On random weights of a hybrid shape (tau is not the
point: the step's cost is), for n = 0, 1, 3, 7, 10 drafts:

* r(n) = one step (pass, verification, roll-back; synchronous) / mlx-lm's
  per-token time (its pipelined ``generate_step``) on the same weights, in the
  same run; the speedup a step can give is tau / r(n), printed for tau = 2, 3, 4;
* o(n) = that step / one plain forward over the same n + 1 tokens (unsplit,
  synchronous): the split mixers' second call and the step's own work;
* c(n) = that plain forward / a plain forward over one token: MLX's width cost.

With ``--streams``, random lossless streams go on the model's top layer (an
attention layer) and two more columns time their step (session 31,
:class:`~mlx_specstream.recurrent.StreamDrafts`), for n up to the 3 streams: r_s(n)
with the fused stream pass (every row's stream rows ride in the verifying pass) and
with the split one (the accepted token's stream rows through the top layer and the
head in a pass of their own, after the verification).

With ``--trees`` (and ``--streams``), a third table times a step over the streams'
static trees (session 32: top-2 and top-3 per level, 3 levels, 8 and 16 nodes), whose
recurrent mixers read the tree as a batch of its root-to-leaf paths
(:meth:`~mlx_specstream.recurrent.ChainCache.run`), both stream passes, against a chain
of 3 and against a plain forward over as many tokens (o_s).

The step times the roll-back path (every draft rejected, one token accepted), the
dearer of the two; such steps alternate between one pending token (a pass that is not
split) and two (a split pass). A second table times one pass over one pending token
and n drafts both ways, whole and split after the token: what not splitting such a
pass saves. Results go to ``benchmarks/results/recurrent_step[-TAG].{md,json}``.
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlx_specstream import SpecStreamConfig, attach_streams
from mlx_specstream.recurrent import ChainCache, StreamDrafts, verify_chain, verify_tree
from mlx_specstream.streams import get_runtime
from mlx_specstream.tree import static_tree
from report import heading, machine_info, time_after_first, write_results
from shapes import random_model

DRAFTS = (0, 1, 3, 7, 10)
TREES = ((2, 8), (3, 16))  # (top-k per level, nodes) of 3-level stream trees (--trees)


def median_seconds(fn, runs: int) -> float:
    fn()  # (warm-up)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, prompt: list, runs: int, vocab: int, streams: bool = False) -> dict:
    seconds, passes, _ = time_after_first(generate_step(mx.array(prompt), model, max_tokens=runs))
    plain = seconds / passes

    def chain_state(runtime=None):
        state = ChainCache(model, None, runtime=runtime)
        state.tokens = list(prompt)
        state.feed(len(prompt) - 1)
        return state

    state = chain_state()
    argmax = lambda x: mx.argmax(x, axis=-1)  # noqa: E731
    rows = {}
    for n in DRAFTS:
        drafts = [(7 * i + 3) % vocab for i in range(n)]

        def stepper(state, drafter=None):
            def step():  # every draft rejected: one token accepted, the caches rolled back
                logits = state.run(drafts)
                a, new, _ = verify_chain(logits, drafts, state.tokens, argmax, [])
                if drafter is not None:
                    drafter.after_pass(a)
                state.commit(a == len(drafts))
                state.tokens += new

            return step

        step = stepper(state)

        cache = make_prompt_cache(model)
        model(mx.array(prompt)[None], cache=cache)
        mx.eval([c.state for c in cache])

        def forward(width):
            def run():
                mx.eval(model(mx.array(drafts[:width] + [1] * (width - len(drafts)))[None],
                              cache=cache))  # fmt: skip

            return run

        ours = median_seconds(step, runs)
        wide, one = median_seconds(forward(n + 1), runs), median_seconds(forward(1), runs)
        rows[n] = dict(step_ms=ours * 1e3, r=ours / plain, o=ours / wide, c=wide / one)
        rt = get_runtime(model) if streams else None
        for stream_pass in ("fused", "split") if streams and n <= rt.config.num_streams else ():
            rt.split_streams = stream_pass == "split"
            with_streams = chain_state(rt)
            ms = median_seconds(stepper(with_streams, StreamDrafts(with_streams)), runs)
            rows[n].update({f"{stream_pass}_ms": ms * 1e3, f"r_{stream_pass}": ms / plain})
    return dict(plain_ms=plain * 1e3, rows=rows)


def tree_steps(model, prompt: list, runs: int, vocab: int, plain: float) -> dict:
    """Median ms of a stream-tree step (every draft rejected: rolled back) per tree
    shape and stream pass, with r_s against mlx-lm's per-token time ``plain`` (ms)
    and o_s against a plain forward over the tree's nodes and one pending token."""
    rt, argmax, rows = get_runtime(model), (lambda x: mx.argmax(x, axis=-1)), {}
    cache = make_prompt_cache(model)
    model(mx.array(prompt)[None], cache=cache)
    mx.eval([c.state for c in cache])
    for k, nodes in TREES:
        tree = static_tree([k] * 3, 3, nodes)
        parents, drafts = list(tree.parents), [(7 * i + 3) % vocab for i in range(nodes - 1)]

        def wide():
            mx.eval(model(mx.array([1] + drafts)[None], cache=cache))
            for c in cache:
                if hasattr(c, "trim"):
                    c.trim(nodes)

        row = dict(wide_ms=median_seconds(wide, runs) * 1e3)
        for stream_pass in ("fused", "split"):
            rt.split_streams = stream_pass == "split"
            state = ChainCache(model, None, runtime=rt)
            state.tokens = list(prompt)
            state.feed(len(prompt) - 1)
            drafter = StreamDrafts(state, None, tree)

            def step():
                logits = state.run(drafts, parents)
                path, new, _ = verify_tree(logits, drafts, parents, state.tokens, argmax, [])
                drafter.after_pass(path[-1])
                state.commit(False, path)
                state.tokens += new

            ms = median_seconds(step, runs) * 1e3
            row.update({f"{stream_pass}_ms": ms, f"r_{stream_pass}": ms / plain,
                        f"o_{stream_pass}": ms / row["wide_ms"]})  # fmt: skip
        rows[f"top-{k}, {nodes} nodes"] = row
    return rows


def split_cost(model, prompt: list, runs: int, vocab: int) -> dict:
    """Median ms of one pass over one pending token and n drafts, whole and split
    after the token (the KV rows are trimmed after each; the recurrent state runs
    on, which does not change the time)."""
    state = ChainCache(model, None)
    state.tokens = list(prompt)
    state.feed(len(prompt) - 1)
    rows = {}
    for n in DRAFTS[1:]:
        x = mx.array(prompt[-1:] + [(7 * i + 3) % vocab for i in range(n)])[None]

        def one_pass(at):
            def run():
                state.split.at, state.split.kept = at, []
                mx.eval(model(x, cache=state.cache), [c.state for c in state.cache])
                state.split.at = None
                for c in state.kv:
                    c.trim(n + 1)

            return run

        whole, split = median_seconds(one_pass(None), runs), median_seconds(one_pass(1), runs)
        rows[n] = dict(whole_ms=whole * 1e3, split_ms=split * 1e3)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="qwen3_next-small")
    p.add_argument("--dtypes", default="f32")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--streams", action="store_true", help="also time the streams' step")
    p.add_argument("--trees", action="store_true", help="with --streams: their trees' steps")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    info = machine_info(runs=args.runs, prompt_tokens=args.prompt_tokens, streams=args.streams)
    results = {}
    lines = [heading("A prompt-lookup step on a recurrent model, against plain decoding", info),
             "", f"`{info['command']}`", "",
             "| model | dtype | plain ms/token | drafts n | step ms | r(n) | o(n) | c(n + 1) "
             "| bound tau=2 / 3 / 4 | streams' step ms, fused / split | r_s(n) fused / split |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            model = random_model(name, dtype, streams=False)
            if args.streams:  # (one stream layer: the top layer attends)
                attach_streams(model, SpecStreamConfig(num_streams=3, num_stream_layers=1))
            vocab = model.args.vocab_size
            prompt = [(13 * i + 5) % vocab for i in range(args.prompt_tokens)]
            res = results.setdefault(name, {})[dtype] = measure(model, prompt, args.runs, vocab,
                                                                args.streams)  # fmt: skip
            res["split_cost"] = split_cost(model, prompt, args.runs, vocab)
            if args.trees:
                res["trees"] = tree_steps(model, prompt, args.runs, vocab, res["plain_ms"])
            for n, row in res["rows"].items():
                bound = " / ".join(f"{tau / row['r']:.2f}x" for tau in (2, 3, 4))
                s = (f"{row['fused_ms']:.2f} / {row['split_ms']:.2f} | "
                     f"{row['r_fused']:.2f} / {row['r_split']:.2f}"
                     if "r_fused" in row else "- | -")  # fmt: skip
                lines.append(
                    f"| {name} | {dtype} | {res['plain_ms']:.2f} | {n} | {row['step_ms']:.2f} | "
                    f"{row['r']:.2f} | {row['o']:.2f} | {row['c']:.2f} | {bound} | {s} |"
                )
            del model
            mx.clear_cache()
    lines += ["", "One pass over one pending token and n drafts, whole and split after the token:",
              "", "| model | dtype | drafts n | whole ms | split ms | split / whole |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, by_dtype in results.items():
        for dtype, res in by_dtype.items():
            for n, row in res["split_cost"].items():
                lines.append(
                    f"| {name} | {dtype} | {n} | {row['whole_ms']:.2f} | {row['split_ms']:.2f} | "
                    f"{row['split_ms'] / row['whole_ms']:.2f} |"
                )
    if args.trees:
        lines += ["", "A step over the streams' tree (3 levels; every draft rejected), both "
                  "stream passes, against a chain of 3 (above) and a plain forward over as "
                  "many tokens (o_s):", "",
                  "| model | dtype | tree | plain forward ms | step ms fused / split "
                  "| r_s fused / split | o_s fused / split |", "|---|---|---|---|---|---|---|"]
        for name, by_dtype in results.items():
            for dtype, res in by_dtype.items():
                for shape, row in res["trees"].items():
                    lines.append(
                        f"| {name} | {dtype} | {shape} | {row['wide_ms']:.2f} | "
                        f"{row['fused_ms']:.2f} / {row['split_ms']:.2f} | "
                        f"{row['r_fused']:.2f} / {row['r_split']:.2f} | "
                        f"{row['o_fused']:.2f} / {row['o_split']:.2f} |"
                    )
    write_results("recurrent_step", args.tag, "\n".join(lines) + "\n",
                  dict(info=info, results=results))  # fmt: skip


if __name__ == "__main__":
    main()

"""Where a step's wall time goes on the host: building the graph, dispatching it, waiting.

    python benchmarks/dispatch_split.py [--steps 40] [--tag TAG]
    benchmarks/with_openblas.sh python benchmarks/dispatch_split.py --tag openblas

mlx-lm's ``generate_step`` builds and dispatches token k + 1's graph
(``mx.async_eval``) before it waits for token k, so only the longer of the
two shows in its time per token. Our unpipelined step cannot: the next tree's
shape and the cache's length depend on the accepted path, read on the host;
the pipelined one can (``pipeline=True``, the GPU default). This script
splits, on the shipped model after a 96-token prompt, each pass into

* ``build``: Python building the lazy graph (model, acceptance, next draft);
* ``dispatch``: ``mx.async_eval`` returning (on MLX's CPU backend it runs each
  primitive's host-side encoding in the calling thread);
* ``wait``: the rest, until the results are ready (``mx.eval``);
* ``finish`` (ours): the host read, cache compaction and next draft;

for plain passes over 1 and 4 tokens (with mlx-lm's log-softmax and argmax)
and for greedy decoding with prompt lookup and with the model's streams
(evaluated synchronously here, to separate the parts). Medians over
``--steps`` steps; outputs of the decoding cases are checked against mlx-lm's.
``--as-gpu`` builds every step as the decoder does on a GPU (the fused stream
pass, additive masks, the gathered stream-LoRA product, RoPE as one kernel,
pipelined steps where marked), still run on this CPU: its build column is the
host work a GPU step starts with, and on a small model the longer of that and
the device time is what a pipelined step costs.
Writes ``benchmarks/results/dispatch_split[-TAG].{md,json}``.
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import make_prompt_cache

import mlx_specstream
import mlx_specstream.decode as decode
import mlx_specstream.streams as streams
from mlx_specstream.benchmark import load_prompts
from mlx_specstream.default_model import DEFAULT_DIR
from report import heading, machine_info, write_results

CASES = {
    "n-gram": (dict(draft="ngram"), False),
    "n-gram, pipelined": (dict(draft="ngram", pipeline=True), False),
    "chain 3, fused": (dict(tree_top_k=1, tree_depth=3), False),
    "chain 3, fused, pipelined": (dict(tree_top_k=1, tree_depth=3, pipeline=True), False),
    "chain 3, split": (dict(tree_top_k=1, tree_depth=3), True),
    "k3 x3, 16 nodes, split": (dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16), True),
    "k3 x3, 16 nodes, fused, pipelined": (
        dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16, pipeline=True),
        False,
    ),
}


def plain_parts(model, prompt, n, steps):
    """Medians (ms) of build, dispatch and wait of a plain pass over ``n`` tokens."""
    cache = make_prompt_cache(model)
    mx.eval(model(prompt[None], cache=cache))
    x = prompt[-n:][None]
    parts = []
    with mx.stream(generation_stream):
        for _ in range(steps + 2):
            t0 = time.perf_counter()
            logits = model(x, cache=cache)[:, -1]
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            y = mx.argmax(logprobs, axis=-1)
            t1 = time.perf_counter()
            mx.async_eval(y, logprobs)
            t2 = time.perf_counter()
            mx.eval(y, logprobs)
            t3 = time.perf_counter()
            parts.append((t1 - t0, t2 - t1, t3 - t2))
            for c in cache:
                c.trim(n)
    return [1e3 * statistics.median(p[i] for p in parts[2:]) for i in range(3)]


def decoding_parts(model, prompt, want, settings):
    """Medians (ms) of build, dispatch, wait and finish per step of our greedy
    decoding, each pass evaluated before the host goes on; and tau."""
    parts = {"build": [], "dispatch": [], "wait": [], "finish": []}
    real_launch, real_finish, real_async = (
        decode.Decoder.launch, decode.Decoder.finish, decode.mx.async_eval,
    )  # fmt: skip
    clock = {}

    def async_eval(*args):
        t0 = time.perf_counter()
        real_async(*args)
        clock["dispatch"] = time.perf_counter() - t0
        clock["args"] = args

    def launch(self, draft, after=None):
        t0 = time.perf_counter()
        pending = real_launch(self, draft, after)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        mx.eval(*clock["args"])
        parts["wait"].append(time.perf_counter() - t1)
        parts["build"].append(total - clock["dispatch"])
        parts["dispatch"].append(clock["dispatch"])
        return pending

    def finish(self, pending, folded=False):
        t0 = time.perf_counter()
        try:
            return real_finish(self, pending, folded)
        finally:
            parts["finish"].append(time.perf_counter() - t0)

    decode.Decoder.launch, decode.Decoder.finish, decode.mx.async_eval = launch, finish, async_eval
    try:
        out = list(decode.spec_generate_step(prompt, model, max_tokens=len(want), **settings))
    finally:
        decode.Decoder.launch, decode.Decoder.finish = real_launch, real_finish
        decode.mx.async_eval = real_async
    assert [t for t, *_ in out] == want, "output differs from mlx-lm's"
    medians = {k: 1e3 * statistics.median(v[1:]) for k, v in parts.items()}
    return medians, len(out) / out[-1][3]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tag", default="")
    ap.add_argument("--as-gpu", action="store_true", help="build each step as on a GPU")
    args = ap.parse_args()
    if args.as_gpu:  # (the decoder's and the runtime's GPU choices)
        decode.on_gpu = streams.on_gpu = lambda: True
    model, tokenizer = mlx_specstream.load()
    prompt = mx.array(load_prompts(DEFAULT_DIR / "prompts.jsonl", tokenizer, 1, 96)[0])
    want = [t for t, _ in generate_step(prompt, model, max_tokens=args.steps)]  # warm-up too
    t0 = None
    for i, _ in enumerate(generate_step(prompt, model, max_tokens=args.steps)):
        if i == 0:
            t0 = time.perf_counter()
    per_token = 1e3 * (time.perf_counter() - t0) / (args.steps - 1)
    rows = []
    for n in (1, 4):
        build, dispatch, wait = plain_parts(model, prompt, n, args.steps)
        rows.append(dict(case=f"plain pass, {n} token{'s' * (n > 1)}", tau=1.0, build=build,
                         dispatch=dispatch, wait=wait, finish=0.0))  # fmt: skip
    rt = model.speculative_streams
    if args.as_gpu:
        rt.additive_masks, rt.gather_lora = True, bool(rt.lora_targets)
    for name, (settings, split) in CASES.items():
        if args.as_gpu and split:
            continue  # (a GPU fuses the stream pass)
        settings = dict({"pipeline": False}, **settings)  # (unless named: the GPU default)
        rt.split_streams = split
        decoding_parts(model, prompt, want, settings)  # warm-up
        medians, tau = decoding_parts(model, prompt, want, settings)
        rows.append(dict(case=name, tau=tau, **medians))
    info = machine_info(steps=args.steps, mlx_lm_ms_per_token=per_token, as_gpu=args.as_gpu)
    lines = [
        heading("A step's host time: build, dispatch, wait", info),
        "",
        f"`{info['command']}`: shipped model"
        + (", each step built as on a GPU and run on this CPU" if args.as_gpu else "")
        + ", one 96-token held-out prompt, greedy, medians "
        f"over {args.steps} steps, each pass evaluated before the next (ms). mlx-lm's "
        f"pipelined `generate_step`: **{per_token:.2f} ms per token** in the same process.",
        "",
        "| pass | tau | build | dispatch (`async_eval`) | wait | finish (host) | sum |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total = r["build"] + r["dispatch"] + r["wait"] + r["finish"]
        r["sum"] = total
        lines.append(
            f"| {r['case']} | {r['tau']:.2f} | {r['build']:.2f} | {r['dispatch']:.2f} | "
            f"{r['wait']:.2f} | {r['finish']:.2f} | {total:.2f} |"
        )
    write_results("dispatch_split", args.tag, "\n".join(lines) + "\n", dict(info=info, rows=rows))


if __name__ == "__main__":
    main()

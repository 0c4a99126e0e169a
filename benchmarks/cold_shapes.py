"""What a pass costs the first time it meets a new cache length, against the same pass again.

    python benchmarks/cold_shapes.py [--dtypes f32,bf16] [--lengths 24] [--tag TAG]
    MLX_ENABLE_TF32=0 python benchmarks/cold_shapes.py --tag gpu

On the GPU (session 33) a step of ours on a prompt it had not seen cost 25-58
ms where the same step repeated over the same cache lengths cost 2.8-3.5 ms,
while mlx-lm's one-token passes cost 0.8 ms either way. Every decode
step meets a new cache length, so only the cold figure is what a user gets.
This script finds which operation carries that cost:

* primitives, each over ``--lengths`` cache lengths never used before (cold),
  then the same lengths again (warm): attention over one query row without a
  mask (mlx-lm's decoding), over n rows with ``mask="causal"`` (mlx-lm's
  draft-model verification), with a bool mask (our trees), with that mask
  over the cache rounded up to a multiple of 256 columns (a candidate cure:
  the shapes then change once per 256 tokens), and the matmul and softmax the
  attention runs as when it has no fused kernel (float32);
* whole generations of the shipped model on a prompt length never used before,
  then the same generation again (``--models``: the shipped model, or random
  ones of real shapes in bfloat16): mlx-lm's plain and draft-model decoding and
  ours (a chain of 3 pipelined and not, a 16-node tree), with the runtime's default column
  buckets (``StreamRuntime.kv_bucket``: 256 on CUDA in bfloat16) and without,
  milliseconds per token;
* with ``--no-graphs``, the primitives again in a child process with
  ``MLX_USE_CUDA_GRAPHS=0`` (MLX's CUDA backend replays each evaluation's
  kernels as a CUDA graph, cached by its shape of nodes);
* with ``--no-cudnn``, the primitives and the first of ``--models``' generations
  again in a child process with ``MLX_CUDA_USE_CUDNN_SDPA=0``: attention over
  several rows then runs as MLX's unfused matmul and softmax, whose kernels do
  not depend on the shapes; if the cold cost is cuDNN's graph building, it
  goes away there.

Writes ``benchmarks/results/cold_shapes[-TAG].{md,json}``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step, speculative_generate_step

import mlx_specstream
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.default_model import DRAFT_DIR
from report import heading, machine_info, write_results
from shapes import SHAPES, random_model

DTYPES = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16}
HEADS, HEAD_DIM, BUCKET = 8, 64, 256


def rounded(n: int, step: int = BUCKET) -> int:
    return -(-n // step) * step


def attention(n: int, mask: str, dtype, length: int, keys, values):
    """One attention call over ``length`` cached columns, as a decode or verify pass makes it."""
    q = mx.ones((1, HEADS, n, HEAD_DIM), dtype=dtype)
    if mask == "bucketed":  # the cache's columns up to the next multiple of 256, hidden past length
        width = rounded(length)
        cols = mx.arange(width)[None] < length - n + 1 + mx.arange(n)[:, None]
        return mx.fast.scaled_dot_product_attention(
            q, keys[:, :, :width], values[:, :, :width], scale=0.125, mask=cols
        )
    k, v = keys[:, :, :length], values[:, :, :length]
    if mask == "none":
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)
    if mask == "causal":
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    cols = mx.arange(length)[None] < length - n + 1 + mx.arange(n)[:, None]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=cols)


def primitive_cases(dtype):
    """``name -> fn(length)``; each builds one op over a cache ``length`` columns long."""
    room = 4096
    keys = mx.random.normal((1, HEADS, room, HEAD_DIM)).astype(dtype)
    values = mx.random.normal((1, HEADS, room, HEAD_DIM)).astype(dtype)
    mx.eval(keys, values)
    q4 = mx.ones((1, HEADS, 4, HEAD_DIM), dtype=dtype)
    return {
        "attention, 1 row, no mask (mlx-lm decoding)": lambda L: attention(
            1, "none", dtype, L, keys, values),
        "attention, 4 rows, causal (mlx-lm draft model)": lambda L: attention(
            4, "causal", dtype, L, keys, values),
        "attention, 4 rows, bool mask (ours)": lambda L: attention(
            4, "bool", dtype, L, keys, values),
        "attention, 16 rows, bool mask (ours)": lambda L: attention(
            16, "bool", dtype, L, keys, values),
        "attention, 4 rows, bool mask, 256-column buckets": lambda L: attention(
            4, "bucketed", dtype, L, keys, values),
        "matmul q k^T, 4 rows": lambda L: q4 @ keys[:, :, :L].swapaxes(-1, -2),
        "softmax over 4 rows": lambda L: mx.softmax(
            (q4 @ keys[:, :, :L].swapaxes(-1, -2)).astype(mx.float32), axis=-1),
    }  # fmt: skip


def timed(fn) -> float:
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t0


def primitives(dtypes, count: int) -> list:
    """Median ms of each case over ``count`` new cache lengths, then over the same again."""
    rows, start = [], 300
    for name in dtypes:
        for case, fn in primitive_cases(DTYPES[name]).items():
            lengths = range(start, start + count)
            start += count + 7  # every case meets lengths no earlier one used
            cold = [timed(lambda: fn(L)) for L in lengths]
            warm = [timed(lambda: fn(L)) for L in lengths]
            rows.append(dict(dtype=name, case=case, cold_ms=1e3 * statistics.median(cold),
                             warm_ms=1e3 * statistics.median(warm),
                             cold_max_ms=1e3 * max(cold)))  # fmt: skip
            r = rows[-1]
            print(f"{name} {case}: cold {r['cold_ms']:.3f} ms (max {r['cold_max_ms']:.1f}), "
                  f"warm {r['warm_ms']:.3f} ms", flush=True)  # fmt: skip
    return rows


def timing(gen) -> tuple:
    """Milliseconds per token and per pass after a generator's first item (prefill
    excluded). Items: mlx-lm's ``(token, logprobs)`` (a pass each) or
    ``(token, logprobs, from_draft)`` (a pass per token not from a draft), ours
    ``(token, logprobs, from_draft, passes so far)``."""
    tokens = passes = 0
    first = None
    for item in gen:
        if first is None:
            first = time.perf_counter()
            p0 = item[3] if len(item) > 3 else 0
            continue
        tokens += 1
        if len(item) > 3:
            passes = item[3] - p0
        else:
            passes += not (len(item) > 2 and item[2])
    ms = 1e3 * (time.perf_counter() - first)
    return ms / max(tokens, 1), ms / max(passes, 1)


def generations(name: str, max_tokens: int) -> list:
    """A model on a prompt length never used before, then the same run again: the
    shipped one (its draft model for mlx-lm's), or a random one of a real shape in
    bfloat16 with random streams (a copy of its base drafting for mlx-lm)."""
    if name == "shipped":
        model, draft = mlx_specstream.load()[0], mlx_lm.load(str(DRAFT_DIR))[0]
    else:
        model, draft = random_model(name, "bf16"), random_model(name, "bf16", streams=False)
    vocab = model.args.vocab_size
    chain = dict(tree_top_k=1, tree_depth=3, max_tree_nodes=4)
    tree = dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16)
    warm_up = mx.random.randint(0, vocab, (20,), key=mx.random.key(0))
    rt = model.speculative_streams
    ours = lambda **t: lambda x, n: spec_generate_step(x, model, max_tokens=n, **t)  # noqa: E731
    cases = {  # (loop, the runtime's kv_bucket: None its default, 0 none)
        "mlx-lm plain": (lambda x, n: generate_step(x, model, max_tokens=n), None),
        "mlx-lm draft model, 3 drafts": (lambda x, n: speculative_generate_step(
            x, model, draft, num_draft_tokens=3, max_tokens=n), None),
        "ours, chain of 3": (ours(**chain), None),
        "ours, chain of 3, no column buckets": (ours(**chain), 0),
        "ours, chain of 3, unpipelined": (ours(pipeline=False, **chain), None),
        "ours, chain of 3, unpipelined, no column buckets": (ours(pipeline=False, **chain), 0),
        "ours, 16-node tree": (ours(**tree), None),
        "ours, 16-node tree, no column buckets": (ours(**tree), 0),
    }  # fmt: skip
    rows = []
    for i, (case, (run, bucket)) in enumerate(cases.items()):
        rt.kv_bucket = bucket
        for _ in run(warm_up, 8):  # the kernels each loop compiles once, not timed
            pass
        x = mx.random.randint(0, vocab, (41 + 13 * i,), key=mx.random.key(1 + i))
        (cold, cold_pass), (warm, warm_pass) = timing(run(x, max_tokens)), timing(
            run(x, max_tokens)
        )
        rows.append(dict(model=name, case=case, prompt_tokens=x.size, cold_ms=cold, warm_ms=warm,
                         cold_pass_ms=cold_pass, warm_pass_ms=warm_pass))  # fmt: skip
        print(f"{name}, {case}: cold {cold:.2f} ms/token ({cold_pass:.2f} ms/pass), warm "
              f"{warm:.2f} ({warm_pass:.2f})", flush=True)  # fmt: skip
    rt.kv_bucket = None
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="f32,bf16", help=f"comma-separated: {', '.join(DTYPES)}")
    p.add_argument("--lengths", type=int, default=24, help="new cache lengths per case")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--models", default="shipped",
                   help=f"whole generations: shipped and/or a shape of {list(SHAPES)}")  # fmt: skip
    p.add_argument(
        "--no-graphs",
        action="store_true",
        help="also the primitives with MLX_USE_CUDA_GRAPHS=0 (a child process)",
    )
    p.add_argument(
        "--no-cudnn",
        action="store_true",
        help="also the primitives and the first model's generations with "
        "MLX_CUDA_USE_CUDNN_SDPA=0 (a child process)",
    )
    p.add_argument("--primitives-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-models", default="", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            p.error(f"--dtypes: unknown dtype {name!r}; choose from {list(DTYPES)}")
    for name in args.models.split(","):
        if name != "shipped" and name not in SHAPES:
            p.error(f"--models: unknown model {name!r}; choose shipped or one of {list(SHAPES)}")
    if args.primitives_only:  # a child: its rows as JSON on the last line
        models = [m for m in args.child_models.split(",") if m]
        gens = [row for name in models for row in generations(name, args.max_tokens)]
        print(json.dumps(dict(primitives=primitives(args.dtypes.split(","), args.lengths),
                              generations=gens)))  # fmt: skip
        return
    prim = primitives(args.dtypes.split(","), args.lengths)
    gens = [row for name in args.models.split(",") for row in generations(name, args.max_tokens)]

    def child(variable: str, models: str = "") -> dict:
        """The primitives (and ``models``' generations) in a child process with
        ``variable=0``; its lines are printed as they come."""
        print(f"-- again with {variable}=0", flush=True)
        cmd = [sys.executable, __file__, "--primitives-only", "--dtypes", args.dtypes,
               "--lengths", str(args.lengths), "--max-tokens", str(args.max_tokens),
               "--child-models", models]  # fmt: skip
        env = dict(os.environ, **{variable: "0"})
        lines = []
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:  # (streamed: a stage stopped mid-child keeps its lines)
                lines.append(line.rstrip("\n"))
                if not line.startswith("{"):
                    print(lines[-1], flush=True)
        if proc.returncode:
            raise SystemExit(f"{variable}=0 child exited {proc.returncode}")
        return json.loads(lines[-1])

    no_graphs = child("MLX_USE_CUDA_GRAPHS")["primitives"] if args.no_graphs else None
    no_cudnn = (
        child("MLX_CUDA_USE_CUDNN_SDPA", args.models.split(",")[0]) if args.no_cudnn else None
    )
    info = machine_info(lengths=args.lengths, max_tokens=args.max_tokens,
                        tf32=os.environ.get("MLX_ENABLE_TF32"))  # fmt: skip
    lines = [
        heading("Cold shapes", info),
        "",
        f"`{info['command']}`. Primitives: {HEADS} heads of {HEAD_DIM}, medians over "
        f"{args.lengths} cache lengths never used before (cold), then the same lengths again "
        "(warm), each call evaluated alone.",
        "",
        "| dtype | case | cold ms | warm ms | cold / warm | worst cold ms |"
        + (" no graphs: cold / warm ms |" if no_graphs else "")
        + (" no cuDNN: cold / warm ms |" if no_cudnn else ""),
        "|---|---|---|---|---|---|" + ("---|" if no_graphs else "") + ("---|" if no_cudnn else ""),
    ]
    for i, r in enumerate(prim):
        extra = "".join(
            f" {other[i]['cold_ms']:.3f} / {other[i]['warm_ms']:.3f} |"
            for other in (no_graphs, no_cudnn and no_cudnn["primitives"])
            if other
        )
        lines.append(
            f"| {r['dtype']} | {r['case']} | {r['cold_ms']:.3f} | {r['warm_ms']:.3f} "
            f"| {r['cold_ms'] / r['warm_ms']:.2f} | {r['cold_max_ms']:.1f} |{extra}"
        )
    lines += [
        "",
        f"Whole generations (`--models {args.models}`), greedy, {args.max_tokens} tokens after "
        "a prompt of a length no "
        "earlier run used (each loop warmed up once on another prompt), each loop on its own "
        "prompt: ms per generated token and per pass after the first, in the first run "
        "(cold) and in the same run again (warm). Loops on different prompts accept "
        "different numbers of drafts: compare a loop's cold and warm figures, and passes "
        "across loops.",
        "",
        "| model | loop | prompt tokens | cold ms/token | warm ms/token | cold ms/pass "
        "| warm ms/pass | cold / warm (pass) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in gens + [
        dict(g, case=g["case"] + ", no cuDNN") for g in (no_cudnn or {}).get("generations", [])
    ]:
        lines.append(f"| {r['model']} | {r['case']} | {r['prompt_tokens']} | {r['cold_ms']:.2f} "
                     f"| {r['warm_ms']:.2f} | {r['cold_pass_ms']:.2f} | {r['warm_pass_ms']:.2f} "
                     f"| {r['cold_pass_ms'] / r['warm_pass_ms']:.2f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    write_results(
        "cold_shapes",
        args.tag,
        text,
        dict(info=info, primitives=prim, generations=gens, no_graphs=no_graphs, no_cudnn=no_cudnn),
    )


if __name__ == "__main__":
    main()

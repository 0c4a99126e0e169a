"""Pipelined cache writes in place, against writes that allocate new buffers (before session 34).

    python benchmarks/pipeline_copies.py [--contexts 900,3900] [--tag TAG]

Until session 34 a pipelined pass kept the views its cache writes returned
(``FoldingCache.fetched``) past the pass. They share the cache buffers, so
while steps overlap the next pass's writes could not update them in place:
MLX allocated new buffers, and a generation's peak memory held every layer's
keys and values twice. A ``FoldingCache`` now keeps only where the view ends.
This script times both in one process (the old behaviour by keeping the views
on the ``FoldingCache`` again)
on a random model with Llama 3 8B's KV layout (8 KV heads of 128, here 4
layers of small width, so that the copies are not hidden by the rest), greedy,
after prompts of ``--contexts`` tokens: ms per pass and the memory the
generation allocated above its caches, pipelined (views released / kept) and
unpipelined,
and mlx-lm's ms per token on the same weights. Outputs are checked against
mlx-lm's.

Writes ``benchmarks/results/pipeline_copies[-TAG].{md,json}``.
"""

import argparse
import time

import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_specstream import SpecStreamConfig, attach_streams
from mlx_specstream.cache import FoldingCache
from mlx_specstream.decode import spec_generate_step
from report import heading, machine_info, write_results
from shapes import random_model

KV_LAYOUT = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=512, vocab_size=512,
                 num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=131072)  # fmt: skip
WAYS = {
    "streams, chain of 3": dict(tree_top_k=1, tree_depth=3, max_tree_nodes=4),
    "prompt lookup, 3 drafts": dict(draft="ngram", num_draft_tokens=3),
}


def measure(gen) -> tuple:
    """(ms per pass after the first token, MiB allocated above what was live then,
    the tokens). Nothing is synchronized between items: a pipelined loop's steps
    overlap as they do in use (synchronized, the copies below do not happen)."""
    first = next(gen)
    mx.synchronize()
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    rest = list(gen)
    ms = 1e3 * (time.perf_counter() - t0)
    passes = rest[-1][3] - first[3] if len(first) > 3 else len(rest)
    peak = (mx.get_peak_memory() - active) / 2**20
    return ms / passes, peak, [first[0]] + [r[0] for r in rest]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="900,3900",
                   help="prompt lengths, comma-separated (each leaves room in its cache's "
                   "last 256 rows for the tokens generated: no growth while measured)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--tag", default="")
    args = p.parse_args()
    model = random_model("small", args.dtype, streams=False, **KV_LAYOUT)
    attach_streams(model, SpecStreamConfig(num_streams=3, num_stream_layers=1), seed=1)
    writes = FoldingCache.update_and_fetch

    def keeping_views(self, keys, values):  # (the behaviour before session 34)
        self.kept = writes(self, keys, values)
        return self.kept

    rows = []
    for context in map(int, args.contexts.split(",")):
        prompt = mx.random.randint(0, KV_LAYOUT["vocab_size"], (context,), key=mx.random.key(0))
        rows_held = -(-(context + args.max_tokens + 8) // 256) * 256  # (a KVCache's steps)
        array_mib = 8 * 128 * rows_held * (4 if args.dtype == "f32" else 2) / 2**20
        gen = generate_step(prompt, model, max_tokens=args.max_tokens)
        ms, peak, want = measure(gen)
        rows.append(dict(context=context, way="mlx-lm plain", ms=ms, peak=peak, identical=True,
                         array_mib=array_mib))  # fmt: skip
        for way, settings in WAYS.items():
            for label, pipeline, keep in (("pipelined, views released", True, False),
                                          ("pipelined, views kept (before)", True, True),
                                          ("unpipelined", False, False)):  # fmt: skip
                FoldingCache.update_and_fetch = keeping_views if keep else writes
                try:
                    gen = spec_generate_step(prompt, model, max_tokens=args.max_tokens,
                                             pipeline=pipeline, **settings)  # fmt: skip
                    ms, peak, got = measure(gen)
                finally:
                    FoldingCache.update_and_fetch = writes
                rows.append(dict(context=context, way=f"{way}, {label}", ms=ms, peak=peak,
                                 identical=got == want, array_mib=array_mib))  # fmt: skip
        for r in rows[-7:]:
            print(f"{context} {r['way']}: {r['ms']:.2f} ms/pass, {r['peak']:.1f} MiB above the "
                  f"caches (8 arrays of {r['array_mib']:.1f} MiB), identical {r['identical']}",
                  flush=True)  # fmt: skip
    info = machine_info(contexts=args.contexts, max_tokens=args.max_tokens, dtype=args.dtype,
                        kv_layout=KV_LAYOUT)  # fmt: skip
    lines = [
        heading("Pipelined cache writes: in place against copies", info),
        "",
        f"`{info['command']}`: a random model with Llama 3 8B's KV layout (8 KV heads of 128; "
        f"4 layers of width 256, {args.dtype}), random streams, greedy, {args.max_tokens} "
        "tokens after a random prompt of each length; ms per forward pass after the first "
        "token (mlx-lm: per token), MiB the generation allocated above what was live after "
        "its first token (the caches: 8 arrays, keys and values of 4 layers), output "
        "identical to mlx-lm's.",
        "",
        "| context | loop | ms / pass | MiB above the caches | one cache array, MiB | identical |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['context']} | {r['way']} | {r['ms']:.2f} | {r['peak']:.1f} | "
                     f"{r['array_mib']:.1f} | {'yes' if r['identical'] else 'no'} |")  # fmt: skip
    write_results("pipeline_copies", args.tag, "\n".join(lines) + "\n", dict(info=info, rows=rows))


if __name__ == "__main__":
    main()

"""How often greedy speculative output is identical to plain decoding, and whether every
divergence is a near-tie: ours and mlx-lm's draft-model decoding, on the same weights.

    python benchmarks/fidelity.py --models small --dtypes f32,bf16,f16,q4
    MLX_ENABLE_TF32=0 python benchmarks/fidelity.py --models qwen2-0.5b,llama-8b --dtypes f32,bf16,q4

For each random model of a published shape (``benchmarks/shapes.py``) and each
dtype, ``--prompts`` random prompts are decoded for ``--max-tokens`` tokens by
mlx-lm's plain ``generate_step`` (the reference), by ours with a forced tree,
and by mlx-lm's ``speculative_generate_step`` with a small random draft model
of the same vocabulary. Each output that differs is scored at its first
differing token by :func:`mlx_specstream.fidelity.first_divergence`: a near-tie
when the plain model's logits of the two tokens are within the dtype's rounding
bound. Random streams rarely draft right, but every step still verifies a tree
in one multi-row pass, which is what rounds differently from a one-row pass.

Writes ``benchmarks/results/fidelity[-TAG].{md,json}``.
"""

import argparse
import importlib

import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_specstream.decode import spec_generate_step
from mlx_specstream.fidelity import first_divergence
from report import heading, machine_info, write_results
from shapes import SHAPES, random_model

TREES = {
    "chain 3": dict(tree_top_k=1, tree_depth=3),
    "k3 x3, 16 nodes": dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16),
}


def draft_model_for(shape: str, dtype: str):
    """A 2-layer random model of the same family and vocabulary, for mlx-lm's draft decoding."""
    small = dict(hidden_size=256, num_hidden_layers=2, intermediate_size=704,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 tie_word_embeddings=True)  # fmt: skip
    return random_model(shape, dtype, streams=False, seed=7, **small)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="small", help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--dtypes", default="f32,bf16,f16,q4")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--num-draft-tokens", type=int, default=3)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    spec = importlib.import_module("mlx_lm.generate").speculative_generate_step
    results = []
    for name in args.models.split(","):
        if name not in SHAPES:
            p.error(f"--models: unknown model {name!r}; choose from {list(SHAPES)}")
        for dtype in args.dtypes.split(","):
            model, draft = random_model(name, dtype), draft_model_for(name, dtype)
            vocab = SHAPES[name]["vocab_size"]
            methods = {f"ours: {t}": None for t in TREES}
            methods[f"mlx-lm draft model ({args.num_draft_tokens})"] = None
            rows = {m: dict(identical=0, near_ties=0, beyond=0, worst=0.0) for m in methods}
            for i in range(args.prompts):
                prompt = mx.random.randint(0, vocab, (args.prompt_tokens,), key=mx.random.key(i))
                plain = [
                    int(t) for t, _ in generate_step(prompt, model, max_tokens=args.max_tokens)
                ]
                outs = {
                    f"ours: {t}": [int(o[0]) for o in spec_generate_step(
                        prompt, model, max_tokens=args.max_tokens, **tree)]
                    for t, tree in TREES.items()
                }  # fmt: skip
                outs[f"mlx-lm draft model ({args.num_draft_tokens})"] = [
                    int(t) for t, _, _ in spec(prompt, model, draft, max_tokens=args.max_tokens,
                                               num_draft_tokens=args.num_draft_tokens)
                ]  # fmt: skip
                for method, out in outs.items():
                    d = first_divergence(model, prompt.tolist(), out, plain)
                    r = rows[method]
                    if d is None:
                        r["identical"] += 1
                    else:
                        r["near_ties" if d.near_tie else "beyond"] += 1
                        r["worst"] = max(r["worst"], abs(d.gap) / d.bound)
            for method, r in rows.items():
                results.append(dict(model=name, dtype=dtype, method=method, **r))
                print(f"{name} {dtype} {method}: {r}", flush=True)
            del model, draft
            mx.clear_cache()
    info = machine_info(prompts=args.prompts, max_tokens=args.max_tokens)
    lines = [
        heading("Fidelity to plain decoding", info),
        "",
        f"`{info['command']}`: {args.prompts} random prompts x {args.max_tokens} greedy tokens "
        "per model, dtype and method. A divergence is scored at its first differing token: "
        "near-tie when the plain model's two logits are within the dtype's rounding bound "
        "(`mlx_specstream.fidelity`); worst = the largest gap / bound among divergences.",
        "",
        "| model | dtype | method | identical | diverged at a near-tie | diverged beyond "
        "the bound | worst gap / bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['method']} | {r['identical']}/{args.prompts} "
            f"| {r['near_ties']} | {r['beyond']} | {r['worst']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    write_results("fidelity", args.tag, text, dict(info=info, results=results))


if __name__ == "__main__":
    main()

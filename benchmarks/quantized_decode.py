"""mlx-lm's plain decoding speed of a model in float32 and quantized (MLX's kernels).

    python benchmarks/quantized_decode.py --tag s60

A base shipped at fewer bits runs MLX's quantized matmuls unless something dequantizes it.
This times ``mlx_lm.generate`` on the same prompt for the model cast to float32 (what
``load_default`` runs on a CPU today) and quantized at each of ``--bits`` (affine, groups
of 64, ``mlx_lm``'s ``quantize_model``), after one warm-up generation each, best of
``--runs``.
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm import generate, load
from mlx_lm.utils import quantize_model

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "mlx_specstream" / "models" / "default"))
    p.add_argument("--bits", default="8,4,3")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    rows = []
    for bits in [None] + [int(b) for b in args.bits.split(",")]:
        model, tokenizer = load(args.model)
        if bits:
            model, _ = quantize_model(model, {}, 64, bits)
        else:
            model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
        generate(model, tokenizer, "def f(x):", max_tokens=8)
        best = 0.0
        for _ in range(args.runs):
            tic = time.perf_counter()
            out = generate(model, tokenizer, "def fibonacci(n):", max_tokens=args.max_tokens)
            n = len(tokenizer.encode(out))
            best = max(best, n / (time.perf_counter() - tic))
        rows.append((bits, best))
        print(f"{bits or 'float32'}: {best:.1f} tokens/s", flush=True)
    lines = [
        f"# mlx-lm's plain decoding, float32 and quantized: `{Path(args.model).name}`",
        "",
        f"`python benchmarks/quantized_decode.py --bits {args.bits} --max-tokens "
        f"{args.max_tokens} --runs {args.runs}" + (f" --tag {args.tag}`" if args.tag else "`"),
        f"({platform.platform()}, {mx.default_device()}, MLX {mx.__version__}, Python "
        f"{sys.version.split()[0]}; best of {args.runs}, after a warm-up)",
        "",
        "| weights | tokens/s | against float32 |",
        "|---|---|---|",
    ] + [f"| {f'{b}-bit' if b else 'float32'} | {v:.1f} | {v / rows[0][1]:.2f}x |" for b, v in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.tag:
        out = ROOT / "benchmarks" / "results" / f"quantized_decode-{args.tag}.md"
        out.write_text(text)
        print(f"[INFO] wrote {out}")


if __name__ == "__main__":
    main()

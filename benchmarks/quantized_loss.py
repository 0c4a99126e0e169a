"""Held-out loss of a model with its matrices quantized at several bits (MLX's affine).

    python benchmarks/quantized_loss.py --eval-data CORPUS/eval.jsonl --tag s60

What shipping a base at fewer bits costs: each matrix (and the embedding) goes through
``mx.quantize`` / ``mx.dequantize`` at ``--bits`` with groups of 64, from its stored
bfloat16 values, and the model's mean cross-entropy over ``--windows`` held-out windows of
256 tokens is set beside the unquantized one's. Dequantized weights are multiplied as
float32 matrices, so the figure is the rounding's, not a kernel's.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load

ROOT = Path(__file__).resolve().parent.parent
WINDOW, GROUP = 256, 64


def windows(tokenizer, eval_data: Path, n: int) -> mx.array:
    """``n`` windows of ``WINDOW + 1`` tokens spread evenly over the held-out files."""
    texts = [json.loads(line)["text"] for line in eval_data.read_text().splitlines()]
    ids = [tokenizer.encode(t) for t in texts]
    rows = [r[i : i + WINDOW + 1] for r in ids for i in range(0, len(r) - WINDOW, WINDOW)]
    if len(rows) < n:
        raise ValueError(f"{eval_data}: {len(rows)} windows of {WINDOW} tokens, fewer than {n}")
    return mx.array(rows[:: len(rows) // n][:n])


def mean_nll(model, x: mx.array, batch: int = 16) -> float:
    total = 0.0
    for i in range(0, x.shape[0], batch):
        b = x[i : i + batch]
        logits = model(b[:, :-1]).astype(mx.float32)
        total += nn.losses.cross_entropy(logits, b[:, 1:], reduction="sum").item()
    return total / (x.shape[0] * WINDOW)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "mlx_specstream" / "models" / "default"))
    p.add_argument("--eval-data", required=True, help="held-out JSONL with a 'text' field")
    p.add_argument("--windows", type=int, default=96)
    p.add_argument("--bits", default="8,4,3")
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    model, tokenizer = load(args.model)
    stored = dict(tree_flatten(model.parameters()))
    x = windows(tokenizer, Path(args.eval_data), args.windows)
    rows = []
    for bits in [None] + [int(b) for b in args.bits.split(",")]:
        weights = {}
        for k, v in stored.items():
            if bits and v.ndim == 2 and v.shape[-1] % GROUP == 0:
                v = mx.dequantize(*mx.quantize(v, GROUP, bits), GROUP, bits)
            weights[k] = v.astype(mx.float32)
        model.update(tree_unflatten(list(weights.items())))
        tic = time.perf_counter()
        rows.append((bits, mean_nll(model, x), time.perf_counter() - tic))
        print(f"{bits or 'stored'}: {rows[-1][1]:.4f} nats/token", flush=True)
    plain = rows[0][1]
    lines = [
        f"# Held-out loss at fewer bits: `{Path(args.model).name}`",
        "",
        f"`python benchmarks/quantized_loss.py --eval-data {args.eval_data} "
        f"--windows {args.windows} --bits {args.bits}"
        + (f" --tag {args.tag}`" if args.tag else "`"),
        f"({platform.platform()}, MLX {mx.__version__}, Python {sys.version.split()[0]}; "
        f"{args.windows} windows of {WINDOW} tokens; affine, groups of {GROUP})",
        "",
        "| weights | nats/token | difference |",
        "|---|---|---|",
    ] + [f"| {f'{b}-bit' if b else 'as stored'} | {v:.4f} | {v - plain:+.4f} |" for b, v, _ in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.tag:
        out = ROOT / "benchmarks" / "results" / f"quantized_loss-{args.tag}.md"
        out.write_text(text)
        print(f"[INFO] wrote {out}")


if __name__ == "__main__":
    main()

"""One matrix product over 1, 4 and 16 rows in float32 and bfloat16 on MLX's default device.

    benchmarks/with_openblas.sh python benchmarks/matmul_rows.py [--tag openblas]

The shape is the code-cpu sibling's head (16,000 x 256). On MLX's CPU backend a
float32 product goes to BLAS and a bfloat16 one runs MLX's own loops; this shows
how each grows with the rows verified in one pass. Medians of 20 (ms). Writes
``benchmarks/results/matmul_rows[-TAG].{md,json}``.
"""

import argparse
import statistics
import time

import mlx.core as mx
from report import heading, machine_info, write_results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", default="")
    args = p.parse_args()
    table = {}
    for dtype in (mx.float32, mx.bfloat16):
        w = mx.random.normal((16000, 256)).astype(dtype)
        for n in (1, 4, 16):
            x = mx.random.normal((n, 256)).astype(dtype)
            mx.eval(w, x)
            times = []
            for _ in range(23):
                t0 = time.perf_counter()
                mx.eval(x @ w.T)
                times.append(time.perf_counter() - t0)
            table.setdefault(str(dtype).split(".")[-1], {})[n] = statistics.median(times[3:]) * 1e3
    info = machine_info()
    lines = [heading("A 16,000 x 256 product over n rows", info), "", f"`{info['command']}`", "",
             "| dtype | 1 row | 4 rows | 16 rows |", "|---|---|---|---|"]  # fmt: skip
    for dtype, row in table.items():
        lines.append(f"| {dtype} | " + " | ".join(f"{row[n]:.2f} ms" for n in (1, 4, 16)) + " |")
    write_results("matmul_rows", args.tag, "\n".join(lines) + "\n", dict(info=info, table=table))


if __name__ == "__main__":
    main()

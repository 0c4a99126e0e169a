"""The stream recipe's learning rate at a short budget: tau against lr.

    benchmarks/with_openblas.sh python benchmarks/stream_lr.py [--lrs 1e-3,3e-3,1e-2]

``benchmarks/train_parity.py`` found that a bias-corrected Adam helped the
100-step budget a lot, which suggested that its lr (1e-3) is too low for
budgets this short. This trains the same streams as
``benchmarks/lora_targets.py`` (the shipped base in float32, 800
self-distilled stdlib windows, 100 steps x 8, LoRA rank 16 on every module,
seed 0; its work folder, so its lr 1e-3 model is reused) at each lr and
reports tau (greedy, the default and a chain tree, held-out prompts), whether
the output equals the base's, and stream top-1 on held-out self-distilled
windows. Writes ``benchmarks/results/stream_lr.{md,json}``.
"""

import argparse

from lora_targets import TREES, evaluate, train_streams
from report import heading, machine_info, write_results
from train_parity import base_greedy, held_out_prompts, held_out_windows, prepare_work


def out_name(lr: str, iters: int) -> str:
    """The trained model's folder; lora_targets.py's "all" model is lr 1e-3 at 100 steps."""
    return "all" if (lr, iters) == ("1e-3", 100) else f"all-lr{lr}-{iters}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/lora_targets")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    work, corpus = prepare_work(args.work)
    lrs = args.lrs.split(",")
    dirs = {lr: train_streams(work, corpus, out_name(lr, args.iters), args.iters, 16, lr=lr)
            for lr in lrs}  # fmt: skip

    prompts = held_out_prompts(args.num_prompts)
    base = base_greedy(work, prompts, args.max_tokens)
    held_out = held_out_windows(work, corpus, args.eval_windows)
    rows = []
    for lr in lrs:
        row = dict(lr=float(lr), **evaluate(dirs[lr], prompts, base, held_out, args.max_tokens))
        rows.append(row)
        print(f"[lr {lr}] {row}", flush=True)

    info = machine_info(iters=args.iters, prompts=args.num_prompts, max_tokens=args.max_tokens)
    lines = [
        heading("Stream training: tau against the learning rate", info),
        "",
        f"`{info['command']}`: `python -m mlx_specstream.train` on the shipped base (float32), "
        f"800 self-distilled stdlib windows, {args.iters} steps x 8 windows of 128 tokens, "
        "gamma 3, N_s 4, LoRA rank 16 on every module, seed 0. tau greedy on "
        f"{args.num_prompts} held-out prompts x {args.max_tokens} tokens; top-1 on "
        f"{len(held_out)} held-out self-distilled windows.",
        "",
        "| lr | " + " | ".join(f"tau, {t}" for t in TREES) + " | output = base's | "
        "stream top-1 (1 / 2 / 3) |",
        "|---|" + "---|" * (len(TREES) + 2),
    ]
    for r in rows:
        taus = " | ".join(f"{r['tau'][t]:.3f}" for t in TREES)
        top1 = " / ".join(f"{a:.3f}" for a in r["top1"])
        lines.append(f"| {r['lr']:g} | {taus} | {r['lossless']} | {top1} |")
    write_results("stream_lr", args.tag, "\n".join(lines) + "\n", dict(info=info, rows=rows))


if __name__ == "__main__":
    main()

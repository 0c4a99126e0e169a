"""Which linear modules the stream LoRA should adapt: tau against kernels per step.

    benchmarks/with_openblas.sh python benchmarks/lora_targets.py [--iters 100]

The stream LoRA is what a lossless-mode step launches most beyond mlx-lm's own
step (60 GPU kernels in 4 stream layers: ``benchmarks/RESULTS.md``, "Kernels
per step"). Each group of targets that reads one input costs a step two
kernels (its row-scaled input, one product with the A factors side by side)
and each target one more (its ``addmm``). This trains the same streams with
the LoRA on every linear module, on the attention's only, on the MLP's only,
and with none, by ``python -m mlx_specstream.train`` at the budget of
``benchmarks/train_parity.py`` (the shipped base in float32, 800
self-distilled stdlib windows, 100 steps of 8), and reports for each:

* tau (greedy, the default and the paper's tree, on the default model's
  held-out prompts) and whether the output equals the base's;
* stream top-1 on held-out self-distilled windows;
* GPU kernels per pipelined step (chain of 3, 16-node tree) on random qwen2-0.5B and
  llama-8B shapes in bf16, counted as ``benchmarks/step_graph.py`` counts.

Stages resume (each trained model is kept in ``--work``). Writes
``benchmarks/results/lora_targets.{md,json}``.
"""

import argparse
import sys
from pathlib import Path

from report import heading, machine_info, write_results
from train_parity import (
    base_greedy,
    held_out_prompts,
    held_out_windows,
    measure_tau,
    prepare_work,
    run,
    stream_accuracy,
)

ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
VARIANTS = {  # name: (rank, targets)
    "all (7 modules)": (16, None),
    "attention (q, k, v, o)": (16, ATTENTION),
    "MLP (gate, up, down)": (16, MLP),
    "none": (0, None),
}
TREES = {
    "default (k=3, depth 3, <= 16 nodes)": dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16),
    "chain of 3": dict(tree_top_k=1, tree_depth=3),
}
CASES = {
    "chain of 3": dict(tree_top_k=1, tree_depth=3, max_tree_nodes=4),
    "16-node tree": dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16),
}


def train(args, work: Path, corpus: Path, name: str, rank: int, targets) -> Path:
    return train_streams(work, corpus, slug(name), args.iters, rank, targets)


def train_streams(
    work: Path,
    corpus: Path,
    out: str,
    iters: int,
    rank: int,
    targets=None,
    lr: str = "1e-3",
    examples: int = 800,
    save_every: int = 25,
) -> Path:
    """``python -m mlx_specstream.train`` on ``work``'s base at this study's budget
    (or ``iters`` steps on ``examples`` self-distilled windows) into ``work / out``
    (kept: a finished model is not retrained)."""
    out = work / out
    if not (out / "config.json").exists():
        # fmt: off
        cmd = [sys.executable, "-m", "mlx_specstream.train", "--model", work / "base-mlx",
               "--data", corpus / "train.jsonl", "--out", out, "--max-seq-length", "128",
               "--iters", iters, "--save-every", save_every, "--steps-per-report", "25",
               "--resume", "--no-tune", "--num-streams", "3", "--num-stream-layers", "4",
               "--stream-lora-rank", rank, "--window-prompt", "32", "--batch-size", "8",
               "--learning-rate", lr, "--max-examples", examples, "--seed", "0",
               "--self-distill", "--top-k", "3"]
        # fmt: on
        if targets:
            cmd += ["--stream-lora-targets", *targets]
        run(cmd, work / f"{out.name}.log")
    return out


def slug(name: str) -> str:
    return name.split(" ")[0].lower()


def evaluate(model: Path, prompts, base, held_out, max_tokens: int) -> dict:
    """tau per tree of :data:`TREES`, whether every output equals the base's greedy
    output ``base``, and stream top-1 on ``held_out`` windows."""
    row = dict(tau={}, lossless=True)
    for tree_name, tree in TREES.items():
        taus, outputs = measure_tau(model, prompts, max_tokens, tree)
        row["tau"][tree_name] = sum(taus) / len(taus)
        row["lossless"] &= outputs == base
    row["top1"] = stream_accuracy(model, held_out)["streams"]
    return row


def kernels(rank: int, targets, shapes) -> dict:
    """GPU kernels per greedy step, and per mlx-lm step, as step_graph.py counts them."""
    import mlx.core as mx

    from mlx_specstream import SpecStreamConfig, attach_streams
    from mlx_specstream.kernels import FastOps
    from shapes import random_model
    from step_graph import STREAMS, TINY, as_on_gpu, our_steps, plain_step

    out = {}
    with FastOps() as ops:
        for shape in shapes:
            model = random_model(shape, "bf16", streams=False, **TINY)
            spec = dict(STREAMS, stream_lora_rank=rank, stream_lora_targets=targets)
            attach_streams(model, SpecStreamConfig(**spec), seed=1)
            as_on_gpu(model)
            prompt = mx.random.randint(0, model.args.vocab_size, (64,), key=mx.random.key(0))
            plain = plain_step(model, prompt, 4, ops)["gpu_kernels"]
            row = {"plain": plain}
            for case, settings in CASES.items():
                row[case] = our_steps(model, prompt, settings, ops, 24)["gpu_kernels"]
            out[shape] = row
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/lora_targets")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--shapes", default="qwen2-0.5b,llama-8b")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    work, corpus = prepare_work(args.work)
    dirs = {name: train(args, work, corpus, name, *v) for name, v in VARIANTS.items()}

    prompts = held_out_prompts(args.num_prompts)
    base = base_greedy(work, prompts, args.max_tokens)
    held_out = held_out_windows(work, corpus, args.eval_windows)
    shapes = args.shapes.split(",")
    rows = []
    for name, (rank, targets) in VARIANTS.items():
        row = dict(variant=name, rank=rank, targets=targets)
        row.update(evaluate(dirs[name], prompts, base, held_out, args.max_tokens))
        row["kernels"] = kernels(rank, targets, shapes)
        rows.append(row)
        print(f"[{name}] {row}", flush=True)

    info = machine_info(iters=args.iters, prompts=args.num_prompts, max_tokens=args.max_tokens)
    head = " | ".join(f"{s}: {c}" for s in shapes for c in CASES)
    lines = [
        heading("Stream LoRA targets: tau against kernels per step", info),
        "",
        f"`{info['command']}`: `python -m mlx_specstream.train` on the shipped base (float32), "
        f"800 self-distilled stdlib windows, {args.iters} steps x 8 windows of 128 tokens, "
        "lr 1e-3, gamma 3, N_s 4, rank 16, seed 0. tau greedy on "
        f"{args.num_prompts} held-out prompts x {args.max_tokens} tokens; top-1 on "
        f"{len(held_out)} held-out self-distilled windows. GPU kernels per greedy step "
        "(pipelined, as on a GPU by default; bf16, random streams of the same targets), with "
        "mlx-lm's 4-token step in brackets.",
        "",
        "| targets | " + " | ".join(f"tau, {t}" for t in TREES) + " | output = base's | "
        "stream top-1 (1 / 2 / 3) | " + head + " |",
        "|---|" + "---|" * (len(TREES) + 2 + len(shapes) * len(CASES)),
    ]
    for r in rows:
        taus = " | ".join(f"{r['tau'][t]:.3f}" for t in TREES)
        top1 = " / ".join(f"{a:.3f}" for a in r["top1"])
        ks = " | ".join(
            f"{r['kernels'][s][c]:.0f} ({r['kernels'][s]['plain']:.0f})"
            for s in shapes
            for c in CASES
        )
        lines.append(f"| {r['variant']} | {taus} | {r['lossless']} | {top1} | {ks} |")
    write_results("lora_targets", args.tag, "\n".join(lines) + "\n", dict(info=info, rows=rows))


if __name__ == "__main__":
    main()

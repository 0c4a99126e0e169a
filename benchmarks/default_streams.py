"""The shipped model's streams against streams retrained on its own base.

    benchmarks/with_openblas.sh python benchmarks/default_streams.py [--iters 1000] [--ship]

The shipped streams were fine-tuned by the stdlib recipe in PyTorch: LoRA on every
linear module of the 4 stream layers, lr 1e-3, 500 steps of 64 windows. Two small
studies on the same base found that lr 1e-2 drafts 12-23% more tokens per pass, and
that the LoRA on the MLP alone keeps 99% of the tau with 32 fewer kernels per step
(``benchmarks/RESULTS.md``). This retrains the streams on the shipped base with
``python -m mlx_specstream.train`` at those settings (``--iters`` steps of 8
self-distilled stdlib windows of 128 tokens, ``--examples`` of them; stages resume)
and compares both sets of streams:

* tau (greedy, float32) with the 16-node tree and a chain of 3 on the default
  model's held-out prompts, and whether every output equals mlx-lm's greedy
  output of the base;
* stream top-1 on held-out self-distilled windows;
* GPU kernels per greedy step (chain of 3, 16-node tree), as ``step_graph.py``
  counts them.

``--candidate DIR`` compares given model directories instead (streams trained on the
shipped base elsewhere, e.g. by the stdlib recipe's lossless stage). ``--ship`` then
replaces the shipped streams by the candidate that drafts most with the 16-node
tree, if it drafts more than they do and keeps the output (see :func:`ship`). Writes
``benchmarks/results/default_streams[-TAG].{md,json}``.
"""

import argparse
import shutil
from pathlib import Path

from lora_targets import MLP, TREES, evaluate, train_streams
from report import heading, machine_info, write_results
from train_parity import base_greedy, held_out_prompts, held_out_windows, prepare_work

from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.streams import STREAMS_FILE


def step_kernels(model_dir: Path) -> dict:
    """GPU kernels per greedy step of ``model_dir``'s streams (median after the first
    step), and of mlx-lm's one-token step, as ``step_graph.py`` counts them."""
    import mlx.core as mx

    from mlx_specstream import load
    from mlx_specstream.kernels import FastOps
    from step_graph import CASES, as_on_gpu, our_steps, plain_step

    out = {}
    with FastOps() as ops:
        model, _ = load(str(model_dir))
        model.set_dtype(mx.float32)
        as_on_gpu(model)
        prompt = mx.random.randint(0, model.args.vocab_size, (64,), key=mx.random.key(0))
        out["mlx-lm, 1 token"] = plain_step(model, prompt, 1, ops)["gpu_kernels"]
        for case in ("chain of 3", "16-node tree"):
            s = our_steps(model, prompt, CASES[case], ops, 24)
            out[case] = s["gpu_kernels"]
    return out


def ship(candidate: Path, target: Path = DEFAULT_DIR) -> None:
    """Replaces ``target``'s streams by ``candidate``'s, as the build's ship stage would:
    its streams file and ``config.json`` (untuned: ``python -m mlx_specstream.tune --save``
    comes next, and keeps this config as ``config.json.before-tune``). The base's
    weights must be the same bits in both; they, the tokenizer and the prompts stay."""
    import mlx.core as mx

    weights = "model.safetensors"
    ours, theirs = mx.load(str(target / weights)), mx.load(str(candidate / weights))
    differ = sorted(k for k in ours.keys() | theirs.keys()
                    if k not in ours or k not in theirs or ours[k].dtype != theirs[k].dtype
                    or not mx.array_equal(ours[k], theirs[k]).item())  # fmt: skip
    if differ:
        raise ValueError(f"{candidate / weights}: not the shipped base ({differ[:3]} differ)")
    for name in (STREAMS_FILE, "config.json"):
        shutil.copy(candidate / name, target / name)
    (target / "config.json.before-tune").unlink(missing_ok=True)  # the old streams' config
    print(f"[INFO] shipped {candidate}'s streams into {target}; tune its tree next")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/default_streams")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--examples", type=int, default=4000, help="Self-distilled windows")
    p.add_argument("--learning-rate", default="1e-2")
    p.add_argument("--targets", choices=["mlp", "all"], default="mlp")
    p.add_argument("--num-prompts", type=int, default=19)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--candidate", action="append", default=[], metavar="DIR",
                   help="Compare this model directory (streams on the shipped base) instead of "
                   "training one; repeatable")  # fmt: skip
    p.add_argument("--ship", action="store_true",
                   help="Ship the candidate that drafts most, if it beats the shipped streams")  # fmt: skip
    p.add_argument("--tag", default="")
    args = p.parse_args()
    work, corpus = prepare_work(args.work)
    targets = MLP if args.targets == "mlp" else None
    if args.candidate:
        candidates = {str(d): Path(d) for d in args.candidate}
    else:
        name = f"{args.targets}-lr{args.learning_rate}-{args.iters}"
        candidates = {f"retrained ({name})": train_streams(
            work, corpus, name, args.iters, 16, targets, args.learning_rate, args.examples,
            save_every=100)}  # fmt: skip
    for label, d in candidates.items():
        if not (d / STREAMS_FILE).exists():
            raise FileNotFoundError(f"--candidate {label}: no {STREAMS_FILE} in {d}")

    prompts = held_out_prompts(args.num_prompts)
    base = base_greedy(work, prompts, args.max_tokens)
    held_out = held_out_windows(work, corpus, args.eval_windows)
    models = {"shipped": DEFAULT_DIR, **candidates}
    rows = {}
    for label, model_dir in models.items():
        rows[label] = evaluate(model_dir, prompts, base, held_out, args.max_tokens)
        rows[label]["kernels"] = step_kernels(model_dir)
        print(f"[{label}] {rows[label]}", flush=True)

    info = machine_info(iters=args.iters, examples=args.examples, lr=args.learning_rate,
                        targets=args.targets, prompts=len(prompts), max_tokens=args.max_tokens)  # fmt: skip
    trees = list(TREES)
    lines = [
        heading("The shipped streams against streams retrained on the shipped base", info),
        "",
        f"`{info['command']}`. "
        + (
            ""
            if args.candidate
            else f"Retrained: `python -m mlx_specstream.train` on the shipped base (float32), "
            f"{args.examples} self-distilled stdlib windows of 128 tokens, {args.iters} steps "
            f"x 8, lr {args.learning_rate} (linear decay), LoRA rank 16 on "
            f"{'the MLP (gate, up, down)' if targets else 'every linear module'}, seed 0. "
        )
        + "tau "
        f"greedy in float32 on {len(prompts)} held-out prompts x {args.max_tokens} tokens; "
        f"top-1 on {len(held_out)} held-out self-distilled windows; GPU kernels of one greedy "
        "step (median after the first), as `step_graph.py` counts them.",
        "",
        f"| streams | tau, {trees[0]} | tau, {trees[1]} | output = base's | "
        "stream top-1 (1 / 2 / 3) | GPU kernels: mlx-lm 1 token / chain of 3 / 16-node |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        k = r["kernels"]
        lines.append(
            f"| {label} | {r['tau'][trees[0]]:.3f} | {r['tau'][trees[1]]:.3f} | "
            f"{'yes' if r['lossless'] else 'NO'} | "
            f"{' / '.join(f'{a:.3f}' for a in r['top1'])} | "
            f"{k['mlx-lm, 1 token']:.0f} / {k['chain of 3']:.0f} / {k['16-node tree']:.0f} |"
        )
    best = max(candidates, key=lambda c: (rows[c]["lossless"], rows[c]["tau"][trees[0]]))
    better = (
        rows[best]["lossless"] and rows[best]["tau"][trees[0]] > rows["shipped"]["tau"][trees[0]]
    )
    data = dict(info=info, rows=rows, best=best, better=better)
    write_results("default_streams", args.tag, "\n".join(lines) + "\n", data)
    if args.ship:
        if not better:
            raise SystemExit(
                "[INFO] not shipped: no candidate drafts more than the shipped streams"
            )
        ship(candidates[best])


if __name__ == "__main__":
    main()

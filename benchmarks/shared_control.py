"""Shared mode against its control: what the stream losses cost the main stream, and buy.

    python benchmarks/shared_control.py [--weights 0.1,0.5] [--steps 400] [--tag TAG]

Issue #12 asks shared mode (paper Eq. 1: the LoRA shared by the main stream and the
streams, the main stream attending to its own streams) to keep its held-out loss within
0.02 nats of a control fine-tune that has the same LoRA, data and budget and no streams,
while drafting τ ≥ 3.5. Earlier CPU builds missed it by 0.46 nats (code-cpu sibling, stream
weight α_j 0.5) and drafted τ 1.80 there. This runs, on the shipped base (built by
``python -m convert.build_default_model``: ``--work``'s ``base/model`` and ``corpus``),
the stdlib recipe's shared-mode fine-tune for each stream-loss weight α_j in ``--weights``
and its control (``convert.finetune --control``), all at ``--steps`` steps and
``--learning-rate``, then measures each:

* held-out main-stream loss on the fine-tunes' own evaluation windows (the issue's figure),
  and on 8 held-out files x 256 tokens of the converted model as it decodes;
* stream top-1 per stream on the evaluation windows;
* τ (greedy, float32) with the paper's 16-node tree and a chain of 3 on the default
  model's held-out prompts.

Every fine-tune and conversion is skipped when its output exists, so an interrupted run
continues. Writes ``benchmarks/results/shared_control[-TAG].{md,json}``.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_targets import TREES  # noqa: E402
from report import heading, machine_info, write_results  # noqa: E402
from train_parity import held_out_prompts, measure_tau  # noqa: E402

from convert.build_default_model import main_stream_loss, run  # noqa: E402
from convert.recipes import STDLIB  # noqa: E402


def fine_tune(base: Path, out: Path, extra) -> None:
    """The stdlib recipe's shared-mode fine-tune of ``base`` with ``extra`` arguments
    (the last occurrence of a flag wins), unless ``out`` holds a finished one."""
    if (out / "metrics.json").exists():
        print(f"[skip] {out} (trained)")
        return
    data = [
        "--data",
        base / "corpus" / "train.jsonl",
        "--eval-data",
        base / "corpus" / "eval.jsonl",
    ]
    run("convert.finetune", "--model", base / "base" / "model", "--out", out, *data,
        *STDLIB.ss_common, *STDLIB.ss_shared, *extra)  # fmt: skip


def convert(hf: Path) -> Path:
    mlx = hf.parent / f"{hf.name}-mlx"
    if not (mlx / "config.json").exists():
        run("convert", "--hf-path", hf, "--mlx-path", mlx, *STDLIB.convert)
    return mlx


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/shared_study", help="Where the fine-tunes go")
    p.add_argument("--base", default="runs/default", help="A stdlib build's work folder")
    p.add_argument("--weights", default="0.1,0.5", help="Stream-loss weights alpha_j")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--learning-rate", default="1e-3")
    p.add_argument(
        "--stream-learning-rate", default=None, help="The stream parameters' own (shared runs)"
    )
    p.add_argument("--num-prompts", type=int, default=19)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    work, base = Path(args.work), Path(args.base)
    budget = ["--max-steps", str(args.steps), "--learning-rate", args.learning_rate]
    weights = [w.strip() for w in args.weights.split(",")]
    runs = {"control": ["--control", *budget]}
    own = (
        []
        if args.stream_learning_rate is None
        else ["--stream-learning-rate", args.stream_learning_rate]
    )
    runs.update({f"a{w}": ["--stream-loss-weight", w, *budget, *own] for w in weights})
    for name, extra in runs.items():
        fine_tune(base, work / name, extra)

    prompts = held_out_prompts(args.num_prompts)
    rows = {}
    for name in runs:
        metrics = json.loads((work / name / "metrics.json").read_text())
        row = {
            "eval_main_loss": metrics["eval_main_loss"],
            "stream_top1": [metrics[k] for k in sorted(metrics) if k.startswith("eval_stream_")],
        }
        if name != "control":  # the control has no streams to decode with
            mlx = convert(work / name)
            row["decoded_main_loss"] = main_stream_loss(mlx, base / "corpus" / "eval.jsonl")
            for tree, kw in TREES.items():
                taus, _ = measure_tau(mlx, prompts, args.max_tokens, kw)
                row[f"tau {tree}"] = sum(taus) / len(taus)
        rows[name] = row
        print(name, row, flush=True)
    base_loss = main_stream_loss(base / "mlx" / "lossless", base / "corpus" / "eval.jsonl")

    info = machine_info(steps=args.steps, learning_rate=args.learning_rate, weights=weights,
                        stream_learning_rate=args.stream_learning_rate,
                        recipe_shared=list(STDLIB.ss_shared), recipe_common=list(STDLIB.ss_common),
                        num_prompts=args.num_prompts, max_tokens=args.max_tokens)  # fmt: skip
    control = rows["control"]["eval_main_loss"]
    lines = [
        heading("Shared mode against its control, on the shipped base", info),
        "",
        f"`{info['command']}`",
        "",
        f"{args.steps} steps of 8 x 128 corpus tokens, lr {args.learning_rate}"
        + ("" if own == [] else f" (stream parameters: {args.stream_learning_rate})")
        + ", LoRA r 32 on "
        f"every linear module, 3 streams in the top 4 layers. Held-out main-stream loss: the "
        f"fine-tunes' evaluation windows (control {control:.4f}), and 8 held-out files x 256 "
        f"tokens decoded by the converted model (the pretrained base: {base_loss:.4f}). τ: "
        f"{args.num_prompts} held-out prompts x {args.max_tokens} tokens, greedy, float32.",
        "",
        "| fine-tune | main loss, eval windows | vs control | main loss, decoded files | "
        "vs base | stream top-1 (1 / 2 / 3) | τ, 16-node tree | τ, chain of 3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        label = "control (no streams)" if name == "control" else f"shared, α_j = {name[1:]}"
        top1 = " / ".join(f"{a:.3f}" for a in r["stream_top1"]) or "-"
        decoded = r.get("decoded_main_loss")
        cells = [
            label,
            f"{r['eval_main_loss']:.4f}",
            f"{r['eval_main_loss'] - control:+.4f}",
            "-" if decoded is None else f"{decoded:.4f}",
            "-" if decoded is None else f"{decoded - base_loss:+.4f}",
            top1,
            *(f"{r[f'tau {t}']:.2f}" if f"tau {t}" in r else "-" for t in TREES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    data = dict(info=info, base_decoded_main_loss=base_loss, rows=rows)
    write_results("shared_control", args.tag, "\n".join(lines) + "\n", data)


if __name__ == "__main__":
    main()

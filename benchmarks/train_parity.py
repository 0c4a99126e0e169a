"""Stream training in MLX against the PyTorch recipe: tau at an equal budget.

``python benchmarks/train_parity.py [--work runs/train_parity] [--iters 100]``

On the shipped default model's base (a 6.5M Llama, cast to float32 on both
sides), the same self-distilled stdlib windows, the same steps, batch,
learning rate, streams and LoRA rank:

1. ``python -m convert.finetune --mode lossless --self-distill ...`` then
   ``python -m convert`` (PyTorch, transformers' Trainer);
2. ``python -m mlx_specstream.train --self-distill ...`` (MLX);
3. tau (tokens per forward pass, greedy) of both with the same tree on the
   default model's held-out prompts, plus a check that both decode exactly
   the base model's greedy tokens.

Every stage is skipped when its output exists, and the MLX trainer resumes
from its checkpoint, so an interrupted run continues. Run it under
``benchmarks/with_openblas.sh`` for MLX timings that are not dominated by the
Linux wheel's reference BLAS (the PyTorch run is started without the
interposed library). Writes ``benchmarks/results/train_parity.{json,md}``.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DIR = ROOT / "mlx_specstream" / "models" / "default"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def run(cmd, log: Path, env=None) -> float:
    """Runs ``cmd`` (echoed), its output teed into ``log``; returns the wall time."""
    print("+", " ".join(map(str, cmd)), flush=True)
    tic = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            f.write(chunk.decode(errors="replace"))
            f.flush()
        if proc.wait():
            raise subprocess.CalledProcessError(proc.returncode, cmd, f"see {log}")
    seconds = time.perf_counter() - tic
    print(f"  ({seconds:.0f} s, log {log})", flush=True)
    return seconds


def make_bases(work: Path):
    """The default model's base in float32, as an MLX and as a HF directory."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config, save_model
    from safetensors.numpy import save_file

    config = json.loads((DEFAULT_DIR / "config.json").read_text())
    config.pop("speculative_streaming")
    config.update(dtype="float32", torch_dtype="float32")
    model, _ = mlx_lm.load(str(DEFAULT_DIR))
    model.set_dtype(mx.float32)
    for name in ("base-mlx", "base-hf"):
        (work / name).mkdir(parents=True, exist_ok=True)
        for f in TOKENIZER_FILES:
            shutil.copy(DEFAULT_DIR / f, work / name / f)
    save_model(work / "base-mlx", model)
    save_config(config, work / "base-mlx" / "config.json")
    # mlx-lm's Llama parameters carry the transformers names.
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    save_file(weights, str(work / "base-hf" / "model.safetensors"), metadata={"format": "pt"})
    (work / "base-hf" / "config.json").write_text(json.dumps(config, indent=2))
    check_bases(work, model)


def prepare_work(work: str):
    """``(work, corpus)``: the work folder with the stdlib corpus and both bases
    (each made once; later runs find them there)."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    if not (corpus / "train.jsonl").exists():
        run([sys.executable, "-m", "convert.corpus", "--out", corpus], work / "corpus.log")
    if not (work / "base-hf" / "config.json").exists():
        make_bases(work)
    return work, corpus


def held_out_prompts(n: int) -> list:
    """The default model's first ``n`` held-out prompts."""
    prompts = [json.loads(l)["prompt"] for l in open(DEFAULT_DIR / "prompts.jsonl")]
    return prompts[:n]


def check_bases(work: Path, mlx_model):
    """Both bases give the same logits on a held-out prompt."""
    import mlx.core as mx
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(work / "base-hf"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(work / "base-hf"))
    prompt = json.loads(open(DEFAULT_DIR / "prompts.jsonl").readline())["prompt"]
    ids = tok.encode(prompt)[:64]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = np.array(mlx_model(mx.array([ids]))[0])
    diff = float(np.abs(got - want).max())
    print(f"[INFO] base logits, MLX vs transformers: max abs difference {diff:.2e}")
    if diff > 1e-3:
        raise RuntimeError(f"the MLX and HF bases differ (max abs logit difference {diff})")


def recipe(args):
    """The flags both trainers share (their names differ only for the window length)."""
    # fmt: off
    return ["--num-streams", "3", "--num-stream-layers", "4", "--stream-lora-rank", "16",
            "--window-prompt", "32", "--batch-size", str(args.batch_size),
            "--learning-rate", str(args.learning_rate), "--max-examples", str(args.max_examples),
            "--seed", "0", "--self-distill", "--top-k", "3",
            "--distill-batch-size", str(args.distill_batch_size)]
    # fmt: on


def train_torch(args, work: Path, corpus: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD",)}
    seconds = run(
        [sys.executable, "-m", "convert.finetune", "--mode", "lossless",
         "--model", work / "base-hf", "--data", corpus / "train.jsonl", "--out", work / "torch",
         "--max-length", "128", "--max-steps", args.iters, "--save-steps", "50",
         "--eval-steps", "1000000", *recipe(args)],
        work / "torch.log", env=env,
    )  # fmt: skip
    run(
        [sys.executable, "-m", "convert", "--hf-path", work / "torch", "--mlx-path",
         work / "torch-mlx"],
        work / "convert.log", env=env,
    )  # fmt: skip
    return seconds


def train_mlx(args, work: Path, corpus: Path) -> float:
    return run(
        [sys.executable, "-m", "mlx_specstream.train", "--model", work / "base-mlx",
         "--data", corpus / "train.jsonl", "--out", work / "mlx", "--max-seq-length", "128",
         "--iters", args.iters, "--save-every", "25", "--steps-per-report", "25", "--resume",
         "--no-tune", *recipe(args)],
        work / "mlx.log",
    )  # fmt: skip


def measure_tau(model_dir: Path, prompts, max_tokens: int, tree: dict):
    """Per-prompt tau and the generated tokens (greedy, float32)."""
    import mlx.core as mx

    from mlx_specstream import load, stream_generate

    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    taus, outputs = [], []
    for text in prompts:
        responses = list(
            stream_generate(model, tokenizer, tokenizer.encode(text), max_tokens=max_tokens, **tree)
        )
        taus.append(responses[-1].generation_tokens / responses[-1].forward_passes)
        outputs.append([r.token for r in responses])
    return taus, outputs


def base_greedy(work: Path, prompts, max_tokens: int):
    import mlx_lm
    from mlx_lm.generate import generate_step

    import mlx.core as mx

    model, tokenizer = mlx_lm.load(str(work / "base-mlx"))
    out = []
    for text in prompts:
        steps = generate_step(mx.array(tokenizer.encode(text)), model, max_tokens=max_tokens)
        tokens = []
        for t, _ in steps:
            tokens.append(t)
            if t in tokenizer.eos_token_ids:
                break
        out.append(tokens)
    return out


def held_out_windows(work: Path, corpus: Path, n: int):
    """``n`` held-out stdlib windows (modules never trained on), self-distilled
    by the base, as both trainers build their training windows."""
    import mlx_lm

    from mlx_specstream.train_data import load_examples, self_distill, subset

    model, tokenizer = mlx_lm.load(str(work / "base-mlx"))
    examples, _, _ = load_examples([str(corpus / "eval.jsonl")], tokenizer, 128, 32)
    return self_distill(model, tokenizer, subset(examples, n, 0), desc="held-out windows")


def stream_accuracy(model_dir: Path, examples):
    """Per-stream top-1 accuracy of a model's streams on ``examples``."""
    import mlx.core as mx

    from mlx_specstream import load
    from mlx_specstream.train import StreamLoss, evaluate

    model, _ = load(str(model_dir))
    model.set_dtype(mx.float32)
    _, acc = evaluate(StreamLoss(model), examples)
    return {"streams": acc.top1(), "early_exit": acc.early_top1()}


def phase_seconds(log: Path) -> dict:
    """Self-distillation and training-loop wall times, from the final
    ``[mm:ss<...]`` of each progress bar in a trainer's log."""
    import re

    text = open(log, errors="replace").read().replace("\r", "\n")
    out = {}
    for phase, pattern in (
        ("self_distillation", r"self-distillation: 100%"),
        ("training_loop", r"(?:training streams: )?100%\|[^\n]*\b(\d+)/\1\b"),
    ):
        bars = [l for l in text.splitlines() if re.search(pattern, l) and "[" in l]
        if bars:
            m = re.search(r"\[(?:(\d+):)?(\d+):(\d+)<", bars[-1])
            h, mnt, sec = (int(x or 0) for x in m.groups())
            out[phase] = 3600 * h + 60 * mnt + sec
    return out


def versions():
    import mlx.core as mx
    import mlx_lm
    import torch
    import transformers

    cpu = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        platform.processor(),
    )
    preload = os.environ.get("LD_PRELOAD", "")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "mlx_device": str(mx.default_device()),
        "torch_device": gpu or "cpu",
        "machine": f"{cpu}, {os.cpu_count()} cores (shared), {platform.system()}",
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mlx_blas": "OpenBLAS (interposed)" if "openblas" in preload else "the wheel's own",
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/train_parity")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--max-examples", type=int, default=800)
    p.add_argument("--distill-batch-size", type=int, default=32, help="Both trainers' batch")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--eval-windows", type=int, default=64, help="Held-out windows for top-1")
    p.add_argument("--name", default="train_parity", help="Result file name in benchmarks/results")
    args = p.parse_args()
    work, corpus = prepare_work(args.work)
    times_file = work / "times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    if not (work / "torch-mlx" / "config.json").exists():
        times["pytorch"] = train_torch(args, work, corpus)
        times_file.write_text(json.dumps(times))
    if not (work / "mlx" / "config.json").exists():
        times["mlx"] = train_mlx(args, work, corpus)
        times_file.write_text(json.dumps(times))

    prompts = held_out_prompts(args.num_prompts)
    base = base_greedy(work, prompts, args.max_tokens)
    trees = {
        "paper (k=3, depth 3, <= 40 nodes)": dict(tree_top_k=3, tree_depth=3, max_tree_nodes=40),
        "default (k=3, depth 3, <= 16 nodes)": dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16),
    }
    results = {
        "settings": vars(args),
        "versions": versions(),
        "train_seconds": times,
        "phase_seconds": {side: phase_seconds(work / f"{side}.log") for side in ("torch", "mlx")},
        "tau": {},
    }
    for tree_name, tree in trees.items():
        row = {}
        for side, model_dir in (("pytorch", work / "torch-mlx"), ("mlx", work / "mlx")):
            taus, outputs = measure_tau(model_dir, prompts, args.max_tokens, tree)
            lossless = outputs == base
            row[side] = {"mean": sum(taus) / len(taus), "per_prompt": taus, "lossless": lossless}
        row["ratio"] = row["mlx"]["mean"] / row["pytorch"]["mean"]
        results["tau"][tree_name] = row
        print(
            f"[tau] {tree_name}: PyTorch recipe {row['pytorch']['mean']:.3f}, "
            f"MLX {row['mlx']['mean']:.3f} (ratio {row['ratio']:.3f}); lossless: "
            f"{row['pytorch']['lossless']} / {row['mlx']['lossless']}"
        )
    held_out = held_out_windows(work, corpus, args.eval_windows)
    results["held_out_top1"] = {
        side: stream_accuracy(model_dir, held_out)
        for side, model_dir in (("pytorch", work / "torch-mlx"), ("mlx", work / "mlx"))
    }
    print(f"[top-1 on {len(held_out)} held-out windows] {results['held_out_top1']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(results))
    print(f"[INFO] wrote {RESULTS / args.name}.json and .md")


def markdown(r) -> str:
    s, v = r["settings"], r["versions"]
    lines = [
        f"Budget: {s['iters']} steps x batch {s['batch_size']} windows of 128 tokens (32-token "
        f"prompt), {s['max_examples']} self-distilled stdlib windows, lr {s['learning_rate']}, "
        "gamma 3, N_s 4, stream LoRA r 16, alpha_j 0.1; tau greedy on "
        f"{s['num_prompts']} held-out prompts, {s['max_tokens']} tokens.",
        "",
        "| tree | PyTorch recipe tau | MLX tau | MLX / PyTorch | lossless (PyTorch / MLX) |",
        "|---|---|---|---|---|",
    ]
    for name, row in r["tau"].items():
        lines.append(
            f"| {name} | {row['pytorch']['mean']:.3f} | {row['mlx']['mean']:.3f} | "
            f"{row['ratio']:.3f} | {row['pytorch']['lossless']} / {row['mlx']['lossless']} |"
        )
    acc = r["held_out_top1"]
    lines += [
        "",
        f"Stream top-1 on {s['eval_windows']} held-out self-distilled windows (streams 1/2/3; "
        "early exit):",
        "",
        "| trainer | stream top-1 | early-exit top-1 |",
        "|---|---|---|",
    ]
    for side, label in (("pytorch", "PyTorch recipe"), ("mlx", "MLX")):
        streams = " / ".join(f"{a:.3f}" for a in acc[side]["streams"])
        lines.append(f"| {label} | {streams} | {acc[side]['early_exit']:.3f} |")
    t, ph = r["train_seconds"], r["phase_seconds"]
    lines += [
        "",
        f"Training wall time, self-distillation included: PyTorch {t.get('pytorch', 0):.0f} s, "
        f"MLX {t.get('mlx', 0):.0f} s (MLX BLAS: {v['mlx_blas']}). Self-distillation: "
        f"PyTorch {ph['torch'].get('self_distillation', 0)} s, "
        f"MLX {ph['mlx'].get('self_distillation', 0)} s; training loop: "
        f"PyTorch {ph['torch'].get('training_loop', 0)} s, "
        f"MLX {ph['mlx'].get('training_loop', 0)} s.",
        "",
        f"Machine: {v['machine']}; Python {v['python']}, mlx {v['mlx']}, mlx-lm {v['mlx_lm']}, "
        f"torch {v['torch']}, transformers {v['transformers']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

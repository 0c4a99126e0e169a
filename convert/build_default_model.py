"""Rebuilds the embedded default model from scratch, on CPU.

``python -m convert.build_default_model [--work runs/default]``

Stages (each skipped when its output exists, so an interrupted build resumes;
the trainers also resume from their own checkpoints):

1. corpus: this Python's standard library, split by module (``convert.corpus``);
2. tokenizer: SentencePiece BPE, 8k, byte fallback (``convert.tokenizer``);
3. base model: a 6.5M-parameter Llama pretrained from scratch (``convert.pretrain``);
4. draft model: a 1M-parameter Llama for mlx-lm's ``--draft-model``;
5. Speculative Streaming fine-tunes in shared and lossless mode (``convert.finetune``);
6. conversion to MLX (``python -m convert``; bfloat16 storage to fit 25 MB);
7. held-out prompts, and the choice of mode: the higher tokens per forward pass among
   the modes whose main stream keeps the base's held-out loss (within 0.05 nats);
8. shipping into ``mlx_specstream/models/`` and tuning the tree (on Linux with
   OpenBLAS interposed: the mlx-cpu wheel's reference BLAS makes every extra
   verified row cost nearly a full row, unlike the machines users run).

Every command is printed before it runs, and each training stage's wall time is
recorded in ``WORK/stage_times.json``. ``build_drafters`` (run by
``benchmarks/compare_drafters.py``, not by this command) adds self-distilled data
(``convert.distill``) and Medusa-1 and ParallelSpec drafters on the frozen base.
"""

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGE_TIMES = "stage_times.json"
PACKAGE_MODELS = Path(__file__).resolve().parent.parent / "mlx_specstream" / "models"
SHIP_LIMIT_MB = 25
# CPU budget: a few hundred steps of 8 x 128 tokens (the paper trains 5 epochs and can afford
# alpha_j = 0.1; with this budget the streams need a larger weight to learn anything).
# fmt: off
SS_COMMON = [
    "--num-streams", "3", "--num-stream-layers", "4", "--top-k", "3", "--max-length", "128",
    "--batch-size", "8", "--learning-rate", "1e-3", "--eval-steps", "200", "--save-steps", "100",
]
SS_SHARED = ["--mode", "shared", "--lora-rank", "32", "--lora-alpha", "64", "--max-steps", "400",
             "--stream-loss-weight", "0.5"]
SS_LOSSLESS = ["--mode", "lossless", "--stream-lora-rank", "16", "--stream-loss-weight", "1.0",
               "--self-distill", "--window-prompt", "32", "--max-steps", "500"]
# Alternative drafters on the same frozen base, for benchmarks/compare_drafters.py: the
# same steps, batch and window as the lossless fine-tune, on self-distilled data.
DRAFTER_COMMON = ["--num-draft-tokens", "3", "--top-k", "3", "--max-length", "128",
                  "--batch-size", "8", "--learning-rate", "1e-3", "--max-steps", "500",
                  "--eval-steps", "250", "--save-steps", "100"]
DRAFTER_KINDS = ("medusa", "parallelspec")
# fmt: on


def run(*cmd):
    cmd = [sys.executable, "-m", *map(str, cmd)]
    print("+", " ".join(cmd), flush=True)
    tic = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - tic:.0f} s)", flush=True)


def stage(name, output: Path, fn, work: Path = None):
    """Runs ``fn`` unless ``output`` exists; records its wall time in
    ``work/stage_times.json`` (the training-time column of the drafter comparison)."""
    if output.exists():
        print(f"[skip] {name}: {output} exists")
        return
    print(f"[stage] {name}")
    tic = time.perf_counter()
    fn()
    if work is not None:
        times_file = work / STAGE_TIMES
        times = json.loads(times_file.read_text()) if times_file.exists() else {}
        times[name] = round(time.perf_counter() - tic, 1)
        times_file.write_text(json.dumps(times, indent=2))


def make_prompts(eval_jsonl: Path, out: Path, per_file=2, chars=320):
    """Prompts from held-out modules: text from a top-level ``def``/``class`` line on."""
    with open(out, "w") as f:
        for line in open(eval_jsonl):
            text = json.loads(line)["text"]
            starts = [m.start() for m in re.finditer(r"^(def|class) ", text, re.M)]
            for s in starts[1 : 1 + per_file]:
                f.write(json.dumps({"prompt": text[s : s + chars]}) + "\n")


def mean_tau(model_dir: Path, prompts: Path, n=8, max_tokens=96):
    """Tokens per forward pass with the paper's tree (greedy), on held-out prompts."""
    code = (
        "import json,sys;import mlx.core as mx;from mlx_specstream import load, stream_generate;"
        f"m,t=load('{model_dir}');m.set_dtype(mx.float32);taus=[]\n"
        f"for l in list(open('{prompts}'))[:{n}]:\n"
        "  p=t.encode(json.loads(l)['prompt'])\n"
        f"  for r in stream_generate(m,t,p,max_tokens={max_tokens},tree_top_k=3,max_tree_nodes=40): pass\n"
        "  taus.append(r.generation_tokens/r.forward_passes)\n"
        "print(sum(taus)/len(taus))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main_stream_loss(model_dir: Path, eval_jsonl: Path, n=8, tokens=256) -> float:
    """Held-out next-token loss (nats) of a converted model's main stream.

    In shared mode the main rows attend to their own streams, so the loss comes
    from one multi-stream pass over each text (a chain tree), as it decodes. In
    lossless mode it is the base model's own loss.
    """
    code = (
        "import json;import mlx.core as mx\n"
        "from mlx_specstream import load\nfrom mlx_lm.models.cache import make_prompt_cache\n"
        f"m,t=load('{model_dir}');m.set_dtype(mx.float32);rt=m.speculative_streams;losses=[]\n"
        f"for l in list(open('{eval_jsonl}'))[:{n}]:\n"
        "  r=json.loads(l);ids=t.encode(r.get('text') or r['prompt']+r.get('completion',''))"
        f"[:{tokens}]\n"
        "  out=rt.forward(ids,[-1]+list(range(len(ids)-1)),make_prompt_cache(m))\n"
        "  lp=out.logits.astype(mx.float32);lp=lp-mx.logsumexp(lp,-1,keepdims=True)\n"
        "  losses.append(-mx.take_along_axis(lp[:-1],mx.array(ids[1:])[:,None],-1).mean().item())\n"
        "print(sum(losses)/len(losses))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


# A mode may change the model's output (shared mode fine-tunes the base) by at
# most this much held-out loss before speed stops being worth it.
MAX_LOSS_INCREASE = 0.05


def choose_mode(w: Path, prompts: Path) -> str:
    """The mode to ship: the higher tau among modes whose main stream is, on
    held-out text, within MAX_LOSS_INCREASE nats of the pretrained base."""
    taus = {mode: mean_tau(w / "mlx" / mode, prompts) for mode in ("shared", "lossless")}
    losses = {
        mode: main_stream_loss(w / "mlx" / mode, w / "corpus" / "eval.jsonl")
        for mode in ("shared", "lossless")
    }
    base_loss = losses["lossless"]  # lossless mode keeps the pretrained base exactly
    ok = [m for m in taus if losses[m] <= base_loss + MAX_LOSS_INCREASE]
    best = max(ok, key=taus.get)
    print(
        f"[INFO] tokens per forward pass (paper tree): {taus}; held-out main-stream loss: "
        f"{ {m: round(v, 3) for m, v in losses.items()} } (base {base_loss:.3f}); "
        f"shipping {best} mode"
    )
    (w / "choice.json").write_text(
        json.dumps(
            {
                "tau": taus,
                "main_stream_loss": losses,
                "base_loss": base_loss,
                "max_loss_increase": MAX_LOSS_INCREASE,
                "shipped": best,
            },
            indent=2,
        )
    )
    return best


def build_drafters(w: Path):
    """Medusa-1 and ParallelSpec drafters on the frozen base, converted to MLX
    (``runs/default/mlx/{medusa,parallelspec}``), for the drafter comparison."""
    distilled = w / "distilled"
    for split, n in (("train", 4000), ("eval", 200)):
        stage(
            f"self-distilled {split} data",
            distilled / f"{split}.jsonl",
            lambda split=split, n=n: run(
                "convert.distill", "--model", w / "base" / "model",
                "--data", w / "corpus" / f"{split}.jsonl", "--out", distilled / f"{split}.jsonl",
                "--max-length", "128", "--window-prompt", "32", "--max-examples", n,
            ),
            work=w,
        )  # fmt: skip
    for kind in DRAFTER_KINDS:
        stage(
            f"{kind} drafter",
            w / kind / "config.json",
            lambda kind=kind: run(
                "convert.train_drafter", "--kind", kind, "--model", w / "base" / "model",
                "--data", distilled / "train.jsonl", "--eval-data", distilled / "eval.jsonl",
                "--out", w / kind, *DRAFTER_COMMON,
            ),
            work=w,
        )  # fmt: skip
        stage(
            f"convert {kind}",
            w / "mlx" / kind,
            lambda kind=kind: run(
                "convert", "--hf-path", w / kind, "--mlx-path", w / "mlx" / kind,
                "--dtype", "bfloat16",
            ),
        )  # fmt: skip


def build_base(w: Path):
    """Stages 1-3: corpus, tokenizer, pretrained base."""
    stage(
        "corpus",
        w / "corpus" / "manifest.json",
        lambda: run("convert.corpus", "--out", w / "corpus"),
    )
    stage(
        "tokenizer",
        w / "tokenizer" / "tokenizer.json",
        lambda: run(
            "convert.tokenizer", "--corpus", w / "corpus" / "train.jsonl", "--out", w / "tokenizer"
        ),
    )
    common = ["--corpus", w / "corpus", "--tokenizer", w / "tokenizer"]
    stage(
        "base model",
        w / "base" / "model",
        lambda: run("convert.pretrain", *common, "--out", w / "base"),
        work=w,
    )


def build_models(w: Path) -> Path:
    """Stages 4-7 up to the mode choice: mlx-lm draft model, both fine-tunes, MLX
    conversions and held-out prompts. Returns the prompts file."""
    common = ["--corpus", w / "corpus", "--tokenizer", w / "tokenizer"]
    stage(
        "draft model",
        w / "draft" / "model",
        lambda: run(
            "convert.pretrain",
            *common,
            "--out",
            w / "draft",
            "--max-steps",
            "600",
            "--learning-rate",
            "3e-3",
            "--arch",
            json.dumps(
                dict(
                    hidden_size=96,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    intermediate_size=256,
                )
            ),
        ),
        work=w,
    )
    data = ["--data", w / "corpus" / "train.jsonl", "--eval-data", w / "corpus" / "eval.jsonl"]
    stage(
        "shared-mode fine-tune",
        w / "ss-shared" / "config.json",
        lambda: run(
            "convert.finetune",
            "--model",
            w / "base" / "model",
            *data,
            "--out",
            w / "ss-shared",
            *SS_SHARED,
            *SS_COMMON,
        ),
        work=w,
    )
    stage(
        "lossless-mode fine-tune",
        w / "ss-lossless" / "config.json",
        lambda: run(
            "convert.finetune",
            "--model",
            w / "base" / "model",
            *data,
            "--out",
            w / "ss-lossless",
            *SS_LOSSLESS,
            *SS_COMMON,
        ),
        work=w,
    )
    for mode in ("shared", "lossless"):
        stage(
            f"convert {mode}",
            w / "mlx" / mode,
            lambda mode=mode: run(
                "convert",
                "--hf-path",
                w / f"ss-{mode}",
                "--mlx-path",
                w / "mlx" / mode,
                "--dtype",
                "bfloat16",
            ),
        )
    stage(
        "convert draft",
        w / "mlx" / "draft",
        lambda: run(
            "mlx_lm",
            "convert",
            "--hf-path",
            w / "draft" / "model",
            "--mlx-path",
            w / "mlx" / "draft",
            "--dtype",
            "bfloat16",
        ),
    )
    prompts = w / "prompts.jsonl"
    stage("held-out prompts", prompts, lambda: make_prompts(w / "corpus" / "eval.jsonl", prompts))

    return prompts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/default", help="Working directory for all artifacts")
    p.add_argument("--force-ship", action="store_true", help="Replace an already shipped model")
    args = p.parse_args()
    w = Path(args.work)
    tic = time.perf_counter()
    build_base(w)
    prompts = build_models(w)

    best = choose_mode(w, prompts)

    target, draft = PACKAGE_MODELS / "default", PACKAGE_MODELS / "draft"
    if target.exists() or draft.exists():
        if not args.force_ship:
            raise FileExistsError(f"{target} already exists; pass --force-ship to replace it.")
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(draft, ignore_errors=True)
    shutil.copytree(w / "mlx" / best, target)
    shutil.copytree(w / "mlx" / "draft", draft)
    shutil.copy(prompts, target / "prompts.jsonl")
    for d in (target, draft):
        (d / "README.md").unlink(missing_ok=True)  # mlx-lm's generic model card
    size = sum(f.stat().st_size for f in PACKAGE_MODELS.rglob("*") if f.is_file()) / 1e6
    print(f"[INFO] shipped {size:.1f} MB into {PACKAGE_MODELS}")
    if size > SHIP_LIMIT_MB:
        raise RuntimeError(f"shipped models take {size:.1f} MB > {SHIP_LIMIT_MB} MB")
    tune = [sys.executable, "-m", "mlx_specstream.tune", "--save"]
    if platform.system() == "Linux":
        # The Linux mlx-cpu wheel bundles reference BLAS, whose cost grows linearly
        # with verified rows; tune on OpenBLAS, closer to what users' machines do.
        print("[INFO] tuning with OpenBLAS interposed (benchmarks/with_openblas.sh)")
        tune = [
            str(Path(__file__).resolve().parent.parent / "benchmarks" / "with_openblas.sh")
        ] + tune
    print("+", " ".join(tune), flush=True)
    subprocess.run(tune, check=True)
    print(f"[INFO] build finished in {(time.perf_counter() - tic) / 60:.1f} min")


if __name__ == "__main__":
    main()

"""Rebuilds the embedded default model from scratch.

``python -m convert.build_default_model [--recipe stdlib|code] [--work runs/default]``

The recipe (``convert.recipes``) sets data, sizes and budgets; the stages are
the same for all. Each is skipped when its output exists, so an interrupted
build resumes (the trainers also resume from their own checkpoints):

1. corpus: the standard library (``convert.corpus``) or every Python source of
   this interpreter with the evaluation packages held out (``convert.code_corpus``);
2. tokenizer: SentencePiece BPE with byte fallback (``convert.tokenizer``);
3. base model: a Llama pretrained from scratch (``convert.pretrain``), then, where the
   recipe asks, replaced by its 8-bit round trip (``convert.transport``), the form in
   which it travels between machines;
4. draft model: a small Llama for mlx-lm's ``--draft-model``, same tokenizer (and
   round trip);
5. self-distilled data (``convert.distill``): the base's greedy continuations;
6. Speculative Streaming fine-tunes in shared and lossless mode (``convert.finetune``),
   and, where the recipe asks, shared mode's control (no streams, same budget);
7. Medusa-1 and ParallelSpec drafters on the frozen base, where the recipe asks
   (else ``benchmarks/compare_drafters.py`` builds them);
8. conversion to MLX (``python -m convert``);
9. held-out prompts, the parse-rate quality figure (``convert.code_quality``), and
   the choice of mode: the higher tokens per forward pass among the modes whose
   main stream keeps the base's held-out loss (within 0.05 nats);
10. shipping into ``mlx_specstream/models/`` (or ``--package-models``) and tuning
    the tree (on Linux with OpenBLAS interposed: the mlx-cpu wheel's reference
    BLAS makes every extra verified row cost nearly a full row, unlike the
    machines users run).

Every command is printed before it runs, and each stage's wall time is recorded
in ``WORK/stage_times.json``. On CUDA the training stages run in bfloat16. Every
training stage comes before the first that needs MLX. ``--only`` runs named stages
alone, ``--stop-after`` stops after one, and ``--time-limit`` caps each training
stage: ``benchmarks/gpu_build.sh`` runs the build that way on a machine lent by
the minute, carrying its pieces between runs with ``convert.carry``.
"""

import argparse
import functools
import importlib.util
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from mlx_specstream.config import CONFIG_KEY, SpecStreamConfig, write_config

from .from_package import PROVENANCE as PACKAGE_RECORD
from .recipes import RECIPES, STDLIB, Recipe
from .stage_runner import run_module_as_main
from .transport import MANIFEST as TRANSPORT_MANIFEST
from .transport import pack, unpack

STAGE_TIMES = "stage_times.json"
PACKAGE_MODELS = Path(__file__).resolve().parent.parent / "mlx_specstream" / "models"
DRAFTER_KINDS = ("medusa", "parallelspec")


# Imported once, by the process the stages fork from: each stage then starts without
# paying for them (about 5 s a stage on 2 cores, most of a smoke build's time).
PRELOADED = ("torch", "transformers", "peft")


def run(*cmd):
    """Runs ``python -m cmd...`` as a child process (forked from a server process where
    the platform can, else a new interpreter); a failure raises ``CalledProcessError``."""
    args = [str(c) for c in cmd]
    full = [sys.executable, "-m", *args]
    print("+", " ".join(full), flush=True)
    tic = time.perf_counter()
    forks = "forkserver" in multiprocessing.get_all_start_methods()
    code = run_forked(args) if forks else subprocess.run(full).returncode
    if code:
        raise subprocess.CalledProcessError(code, full)
    print(f"  ({time.perf_counter() - tic:.0f} s)", flush=True)


@functools.cache
def forkserver():
    """multiprocessing's forkserver context, its server importing ``PRELOADED`` (those
    installed) and nothing else: a clean process to fork stages from, unlike this one,
    whose own torch threads a forked stage would wait on for ever."""
    forks = multiprocessing.get_context("forkserver")
    forks.set_forkserver_preload([n for n in PRELOADED if importlib.util.find_spec(n)])
    return forks


def run_forked(args) -> int:
    """``python -m args...`` in a process forked from :func:`forkserver`'s server;
    returns its exit status."""
    sys.stdout.flush(), sys.stderr.flush()
    child = forkserver().Process(target=run_module_as_main, args=(list(args),))
    child.start()
    child.join()
    return child.exitcode


class StopBuild(Exception):
    """Raised after the stage named by ``--stop-after``."""


STOP_AFTER = {"name": None}
ONLY = set()  # --only: the stages to run; the others are passed over
SEEN = set()  # every stage name met


def stage(name, output: Path, fn, work: Path = None):
    """Runs ``fn`` unless ``output`` exists; records its wall time in
    ``work/stage_times.json`` (the training-time column of the drafter comparison)."""
    SEEN.add(name)
    if ONLY and name not in ONLY:
        print(f"[pass] {name}")
        return
    if output.exists():
        print(f"[skip] {name}: {output} exists")
    else:
        print(f"[stage] {name}")
        tic = time.perf_counter()
        fn()
        if work is not None:
            _record_time(work, name, tic)
    if STOP_AFTER["name"] == name:
        raise StopBuild(name)


def _record_time(work: Path, name: str, tic: float):
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


def mean_tau(model_dir: Path, prompts: Path, n=8, max_tokens=96) -> float:
    """Tokens per forward pass with the paper's tree (greedy), on held-out prompts.

    MLX is imported here: the training stages run where it is not installed yet.
    """
    import mlx.core as mx

    from mlx_specstream import load, stream_generate

    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    taus = []
    for line in list(open(prompts))[:n]:
        ids = tokenizer.encode(json.loads(line)["prompt"])
        for r in stream_generate(
            model, tokenizer, ids, max_tokens=max_tokens, tree_top_k=3, max_tree_nodes=40
        ):
            pass
        taus.append(r.generation_tokens / r.forward_passes)
    return sum(taus) / len(taus)


def main_stream_loss(model_dir: Path, eval_jsonl: Path, n=8, tokens=256) -> float:
    """Held-out next-token loss (nats) of a converted model's main stream.

    In shared mode the main rows attend to their own streams, so the loss comes
    from one multi-stream pass over each text (a chain tree), as it decodes. In
    lossless mode it is the base model's own loss.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_specstream import load

    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    losses = []
    for line in list(open(eval_jsonl))[:n]:
        r = json.loads(line)
        ids = tokenizer.encode(r.get("text") or r["prompt"] + r.get("completion", ""))[:tokens]
        chain = [-1] + list(range(len(ids) - 1))  # (each row's parent: the one before)
        out = model.speculative_streams.forward(ids, chain, make_prompt_cache(model))
        lp = out.logits.astype(mx.float32)
        lp = lp - mx.logsumexp(lp, -1, keepdims=True)
        losses.append(-mx.take_along_axis(lp[:-1], mx.array(ids[1:])[:, None], -1).mean().item())
    return sum(losses) / len(losses)


# A mode may change the model's output (shared mode fine-tunes the base) by at
# most this much held-out loss before speed stops being worth it.
MAX_LOSS_INCREASE = 0.05


def choose_mode(w: Path, prompts: Path, r: Recipe = STDLIB) -> str:
    """The mode to ship: the higher tau among modes whose main stream is, on
    held-out text, within MAX_LOSS_INCREASE nats of the pretrained base. Also
    records shared mode's loss against its control's (the paper's claim), when built."""
    taus = {
        mode: mean_tau(w / "mlx" / mode, prompts, r.tau_prompts, r.tau_max_tokens)
        for mode in ("shared", "lossless")
    }
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
    choice = {
        "recipe": r.name,
        "tau": taus,
        "main_stream_loss": losses,
        "base_loss": base_loss,
        "max_loss_increase": MAX_LOSS_INCREASE,
        "shipped": best,
    }
    if r.control:
        # Held-out main-stream loss of the fine-tunes' own evaluation (same windows).
        shared, control = (
            json.loads((w / d / "metrics.json").read_text())["eval_main_loss"]
            for d in ("ss-shared", "ss-control")
        )
        choice["shared_vs_control"] = {"shared": shared, "control": control,
                                       "difference": shared - control}  # fmt: skip
        print(f"[INFO] shared mode {shared:.4f} vs control {control:.4f} nats (held-out)")
    (w / "choice.json").write_text(json.dumps(choice, indent=2))
    return best


def on_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def build_distilled(w: Path, r: Recipe = STDLIB):
    """Self-distilled train and eval data (the base's own greedy continuations),
    shared by the lossless fine-tune (where the recipe says) and the drafters."""
    n_train, n_eval, extra = r.distill
    eval_data = _eval_data(w, r)
    for split, n, data in (
        ("train", n_train, w / "corpus" / "train.jsonl"),
        ("eval", n_eval, eval_data),
    ):
        stage(
            f"self-distilled {split} data",
            w / "distilled" / f"{split}.jsonl",
            lambda data=data, split=split, n=n: run(
                "convert.distill", "--model", w / "base" / "model", "--data", data,
                "--out", w / "distilled" / f"{split}.jsonl", "--max-examples", n, *extra,
                *_gpu(r), *(("--time-limit", r.time_limit) if r.time_limit else ()),
            ),
            work=w,
        )  # fmt: skip


def build_drafters(w: Path, r: Recipe = STDLIB):
    """Medusa-1 and ParallelSpec drafters on the frozen base, converted to MLX
    (``WORK/mlx/{medusa,parallelspec}``), for the drafter comparison."""
    train_drafters(w, r)
    convert_drafters(w, r)


def train_drafters(w: Path, r: Recipe = STDLIB):
    build_distilled(w, r)
    distilled = w / "distilled"
    for kind in DRAFTER_KINDS:
        stage(
            f"{kind} drafter",
            w / kind / "config.json",
            lambda kind=kind: run(
                "convert.train_drafter", "--kind", kind, "--model", w / "base" / "model",
                "--data", distilled / "train.jsonl", "--eval-data", distilled / "eval.jsonl",
                "--out", w / kind, *r.drafter_common, *_train(r),
            ),
            work=w,
        )  # fmt: skip


def convert_drafters(w: Path, r: Recipe = STDLIB):
    for kind in DRAFTER_KINDS:
        stage(
            f"convert {kind}",
            w / "mlx" / kind,
            lambda kind=kind: run(
                "convert", "--hf-path", w / kind, "--mlx-path", w / "mlx" / kind,
                *frozen_base_convert(w, r),
            ),
            work=w,
        )  # fmt: skip


def frozen_base_convert(w: Path, r: Recipe) -> tuple:
    """The conversion arguments of a model whose base is the frozen base: where the base was
    restored from a quantized package (``convert.from_package``), that package's quantized
    tensors (``--quantized-like``) instead of quantizing it anew, so the base stays the
    shipped one bit for bit."""
    record = w / "base" / PACKAGE_RECORD
    if "--quantize" not in r.convert or not record.exists():
        return tuple(r.convert)
    skip = {"--quantize", "--q-bits", "--q-group-size"}
    args, i = [], 0
    while i < len(r.convert):
        a = r.convert[i]
        if a in skip:
            i += 1 if a == "--quantize" else 2
            continue
        args.append(a)
        i += 1
    return (*args, "--quantized-like", json.loads(record.read_text())["from"])


def sample_eval_files(eval_jsonl: Path, out: Path, n: int):
    """``n`` held-out files, evenly spaced through ``eval_jsonl`` (every package
    of a sorted corpus is represented), for evaluations run during training."""
    lines = open(eval_jsonl).readlines()
    if len(lines) < n:
        raise ValueError(f"{eval_jsonl}: {len(lines)} held-out files, fewer than {n}")
    step = len(lines) / n
    out.write_text("".join(lines[int(i * step)] for i in range(n)))


def _eval_data(w: Path, r: Recipe) -> Path:
    sample = w / "corpus" / "eval-sample.jsonl"
    return sample if r.eval_sample_files else w / "corpus" / "eval.jsonl"


def _adapter(model_dir: Path):
    """``--adapter-path`` for a fine-tune saved with ``--save-adapter``."""
    adapter = model_dir / "adapter"
    return ("--adapter-path", adapter) if adapter.exists() else ()


def _gpu(r: Recipe):
    return r.gpu_args if on_cuda() else ()


def _train(r: Recipe):
    """Arguments every training stage takes: bfloat16 on CUDA (or the recipe's CPU
    micro-batches elsewhere), the time limit."""
    limit = ("--time-limit", r.time_limit) if r.time_limit else ()
    return (*(r.gpu_args if on_cuda() else r.cpu_args), *limit)


def round_trip(d: Path):
    """``d/model`` becomes its 8-bit round trip (``convert.transport``), the form in
    which it travels; the trained weights stay in ``d/model-trained``. The pack is
    renamed into place last: it is the stage's mark of completion."""
    for partial in (d / "transport.tmp", d / "model.tmp"):
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted round trip
    pack(d / "model", d / "transport.tmp")
    unpack(d / "transport.tmp", d / "model.tmp")
    # A stale copy of an interrupted round trip: ``model`` is the trained model now.
    shutil.rmtree(d / "model-trained", ignore_errors=True)
    (d / "model").rename(d / "model-trained")
    (d / "model.tmp").rename(d / "model")
    (d / "transport.tmp").rename(d / "transport")


def check_corpus(w: Path):
    """A corpus rebuilt on another machine must be the one the carried models saw
    (``convert.carry`` brings its manifest as ``corpus-expected.json``)."""
    expected = w / "corpus-expected.json"
    if not expected.exists():
        return
    want = json.loads(expected.read_text())["sha256"]
    got = json.loads((w / "corpus" / "manifest.json").read_text())["sha256"]
    if want != got:
        raise ValueError(
            f"{w / 'corpus' / 'manifest.json'}: sha256 {got} differs from {expected}'s {want}: "
            "this machine's sources are not those the carried models were trained on."
        )


def build_base(w: Path, r: Recipe = STDLIB, roots=()):
    """Stages 1-3: corpus, tokenizer, pretrained base. ``roots`` (``KIND:DIR``)
    replace this interpreter's sources in the code corpus."""
    if r.corpus == "code":
        corpus_cmd = ["convert.code_corpus", "--out", w / "corpus"]
        corpus_cmd += [a for root in roots for a in ("--root", root)]
    elif roots:
        raise ValueError(f"--root applies to the code corpus, not recipe {r.name!r}")
    else:
        corpus_cmd = ["convert.corpus", "--out", w / "corpus"]
    stage("corpus", w / "corpus" / "manifest.json", lambda: run(*corpus_cmd), work=w)
    check_corpus(w)
    if r.eval_sample_files:
        sample = _eval_data(w, r)
        stage(
            "held-out sample",
            sample,
            lambda: sample_eval_files(w / "corpus" / "eval.jsonl", sample, r.eval_sample_files),
        )
    stage(
        "tokenizer",
        w / "tokenizer" / "tokenizer.json",
        lambda: run(
            "convert.tokenizer", "--corpus", w / "corpus" / "train.jsonl",
            "--out", w / "tokenizer", *r.tokenizer,
        ),
        work=w,
    )  # fmt: skip
    pretrain(w, r, "base", r.base)


def pretrain(w: Path, r: Recipe, name: str, args) -> None:
    """The stages that pretrain ``w/name`` (``"base"`` or ``"draft"``) with
    ``convert.pretrain`` and, where the recipe says, replace it by its 8-bit round trip."""
    common = ["--corpus", w / "corpus", "--tokenizer", w / "tokenizer"]
    stage(
        f"{name} model",
        w / name / "model",
        lambda: run("convert.pretrain", *common, "--out", w / name, *args, *_train(r)),
        work=w,
    )
    if r.round_trip:
        stage(f"{name} round trip", w / name / "transport" / TRANSPORT_MANIFEST,
              lambda: round_trip(w / name), work=w)  # fmt: skip


def build_models(w: Path, r: Recipe = STDLIB) -> Path:
    """Stages 4-9 up to the mode choice: mlx-lm's draft model, the fine-tunes (and
    drafters), then the MLX conversions and held-out prompts: every stage that needs
    PyTorch alone comes before the first that needs MLX. Returns the prompts file."""
    pretrain(w, r, "draft", r.draft)
    data = ["--data", w / "corpus" / "train.jsonl", "--eval-data", _eval_data(w, r)]
    fine_tunes = {
        "shared-mode fine-tune": ("ss-shared", [*data, *r.ss_common, *r.ss_shared]),
        "lossless-mode fine-tune": ("ss-lossless", [*data, *r.ss_common, *r.ss_lossless]),
    }
    if r.control:
        fine_tunes["shared-mode control fine-tune"] = (
            "ss-control",
            [*data, *r.ss_common, *r.ss_shared, "--control"],
        )
    if r.lossless_on_distilled:
        build_distilled(w, r)
        distilled = ["--data", w / "distilled" / "train.jsonl",
                     "--eval-data", w / "distilled" / "eval.jsonl"]  # fmt: skip
        fine_tunes["lossless-mode fine-tune"] = (
            "ss-lossless",
            [*distilled, *r.ss_common, *r.ss_lossless],
        )
    for name, (sub, args) in fine_tunes.items():
        stage(
            name,
            w / sub / "config.json",
            lambda sub=sub, args=args: run(
                "convert.finetune", "--model", w / "base" / "model", "--out", w / sub, *args,
                *_train(r),
            ),
            work=w,
        )  # fmt: skip
    if r.drafters:
        train_drafters(w, r)
    for mode in ("shared", "lossless"):
        args = r.convert if mode == "shared" else frozen_base_convert(w, r)  # (shared: a LoRA)
        stage(
            f"convert {mode}",
            w / "mlx" / mode,
            lambda mode=mode, args=args: run(
                "convert", "--hf-path", w / f"ss-{mode}", "--mlx-path", w / "mlx" / mode,
                *args, *_adapter(w / f"ss-{mode}"),
            ),
            work=w,
        )  # fmt: skip
    stage(
        "convert draft",
        w / "mlx" / "draft",
        lambda: run(
            "mlx_lm", "convert", "--hf-path", w / "draft" / "model",
            "--mlx-path", w / "mlx" / "draft", *r.draft_convert,
        ),
        work=w,
    )  # fmt: skip
    if r.drafters:
        convert_drafters(w, r)
    prompts = w / "prompts.jsonl"
    stage("held-out prompts", prompts, lambda: make_prompts(w / "corpus" / "eval.jsonl", prompts))
    if r.quality_prompts:
        stage(
            "quality",
            w / "quality.json",
            lambda: run(
                "convert.code_quality", "--model", w / "mlx" / "lossless",
                "--eval-data", w / "corpus" / "eval.jsonl",
                "--num-prompts", r.quality_prompts, "--max-tokens", r.quality_max_tokens,
                "--out", w / "quality.json",
            ),
            work=w,
        )  # fmt: skip
    return prompts


def ship(w: Path, best: str, r: Recipe, models: Path, force: bool):
    """Copies the chosen mode and the draft model into ``models`` (the package's)."""
    target, draft = models / "default", models / "draft"
    if target.exists() or draft.exists():
        if not force:
            raise FileExistsError(f"{target} already exists; pass --force-ship to replace it.")
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(draft, ignore_errors=True)
    shutil.copytree(w / "mlx" / best, target)
    shutil.copytree(w / "mlx" / "draft", draft)
    if r.untuned_tree:
        set_untuned_tree(target, r.untuned_tree)
    shutil.copy(w / "prompts.jsonl", target / "prompts.jsonl")
    for d in (target, draft):
        (d / "README.md").unlink(missing_ok=True)  # mlx-lm's generic model card
    size = sum(f.stat().st_size for f in models.rglob("*") if f.is_file()) / 1e6
    print(f"[INFO] shipped {size:.1f} MB into {models}")
    if size > r.ship_limit_mb:
        raise RuntimeError(f"shipped models take {size:.1f} MB > {r.ship_limit_mb} MB")


def set_untuned_tree(model_dir: Path, settings: dict) -> dict:
    """Sets the draft settings of ``model_dir``'s streams section that apply where no
    tuning was stored for the device; checked as the package reads them."""
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    section = dict(config[CONFIG_KEY], **settings)
    SpecStreamConfig.from_dict(section)  # (refuses an unknown key or a bad value)
    config[CONFIG_KEY] = section
    write_config(config_file, config)
    return section


def tune_shipped(target: Path):
    """Tunes the shipped model on this machine as users' installs run it (the stock
    wheel): the choice applies on this kind of device only (``tuned`` in its config)."""
    tune = [sys.executable, "-m", "mlx_specstream.tune", "--save", "--model", str(target)]
    print("+", " ".join(tune), flush=True)
    subprocess.run(tune, check=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="stdlib",
                   help="Data, sizes and budgets (convert.recipes)")  # fmt: skip
    p.add_argument("--work", default=None, help="Working directory (default: runs/RECIPE)")
    p.add_argument("--root", action="append", default=[], metavar="KIND:DIR",
                   help="Code corpus source root instead of this interpreter's")  # fmt: skip
    p.add_argument("--package-models", default=str(PACKAGE_MODELS),
                   help="Where to ship the models (default: the package's)")  # fmt: skip
    p.add_argument("--force-ship", action="store_true", help="Replace an already shipped model")
    p.add_argument("--stop-after", default=None, metavar="STAGE",
                   help="Stop once this stage is done (its name as the build prints it)")  # fmt: skip
    p.add_argument("--only", default=None, metavar="STAGE[,STAGE]",
                   help="Run these stages alone (their inputs must exist), passing over the rest")  # fmt: skip
    p.add_argument("--time-limit", type=float, default=None,
                   help="Minutes per training stage; a stage cut short says so in its metrics.json")  # fmt: skip
    p.add_argument("--no-tune", action="store_true",
                   help="Ship without tuning the tree (mlx_specstream.tune --save does it later)")  # fmt: skip
    args = p.parse_args(argv)
    r = replace(RECIPES[args.recipe], time_limit=args.time_limit)
    w = Path(args.work or f"runs/{'default' if r.name == 'stdlib' else r.name}")
    STOP_AFTER["name"] = args.stop_after
    ONLY.clear()
    ONLY.update(args.only.split(",") if args.only else ())
    try:
        build(w, r, args)
    except StopBuild as done:
        print(f"[INFO] stopped after stage {done}")
        return
    if args.stop_after:
        raise ValueError(f"--stop-after {args.stop_after!r}: the build has no stage of that name")
    unknown = ONLY - SEEN
    if unknown:
        raise ValueError(f"--only: the build has no stage named {sorted(unknown)}")


def build(w: Path, r: Recipe, args):
    """Every stage, in order (see the module's docstring)."""
    tic = time.perf_counter()
    build_base(w, r, args.root)
    prompts = build_models(w, r)
    choice = w / "choice.json"
    stage("choice.json", choice, lambda: choose_mode(w, prompts, r), work=w)
    best = json.loads(choice.read_text())["shipped"] if choice.exists() else None
    models = Path(args.package_models)
    shipped = w / "shipped.json"

    def ship_and_tune():
        ship(w, best, r, models, args.force_ship)
        if not args.no_tune:
            tune_shipped(models / "default")
        shipped.write_text(json.dumps({"mode": best, "to": str(models), "tuned": not args.no_tune}))

    stage("ship", shipped, ship_and_tune, work=w)
    print(f"[INFO] build finished in {(time.perf_counter() - tic) / 60:.1f} min")


if __name__ == "__main__":
    main()

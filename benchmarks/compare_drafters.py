"""Drafters compared on one base model, in the shape of the paper's Table 1.

``python benchmarks/compare_drafters.py [--work runs/default]``
(or ``benchmarks/with_openblas.sh python benchmarks/compare_drafters.py``)

From a fresh checkout this first builds every model it compares, resuming
whatever already exists in ``--work`` (``convert.build_default_model``'s
stages; several hours on 2 CPU cores): the pretrained base, mlx-lm's draft
model, Speculative Streaming in shared and lossless mode, and Medusa-1 and
ParallelSpec drafters on the frozen base, all with 500 steps of 8 x 128
tokens. Then, greedy, on the same held-out prompts, with one warm-up and a
fresh cache per run, it measures plain mlx-lm decoding, mlx-lm's two-model
speculative decoding, prompt lookup (no drafter), and each single-model
drafter with the same draft trees. Every output is checked against plain decoding of the model it runs
(the base itself for everything but shared mode, whose base is fine-tuned).
Writes ``benchmarks/results/drafters[-NAME].{md,json}``.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_specstream.benchmark import (  # noqa: E402
    load_prompts,
    machine_info,
    provenance_lines,
    run_mlx_lm,
    run_specstream,
)

# (name, directory under work/mlx, stage name in stage_times.json)
DRAFTERS = [
    ("Speculative Streaming, shared mode", "shared", "shared-mode fine-tune"),
    ("Speculative Streaming, lossless mode", "lossless", "lossless-mode fine-tune"),
    ("Medusa-1 heads", "medusa", "medusa drafter"),
    ("ParallelSpec drafter", "parallelspec", "parallelspec drafter"),
]
# draft="streams": the model's own drafts, whatever draft source a tuning stored.
TREES = {
    "k=3, 16 nodes": dict(
        tree_top_k=3, tree_depth=3, max_tree_nodes=16, prune_threshold=0.0, draft="streams"
    ),
    "chain (k=1)": dict(
        tree_top_k=1, tree_depth=3, max_tree_nodes=4, prune_threshold=0.0, draft="streams"
    ),
}


def build(work: Path, recipe: str = "stdlib"):
    from convert.build_default_model import build_base, build_drafters, build_models
    from convert.recipes import RECIPES

    r = RECIPES[recipe]
    build_base(work, r)
    build_models(work, r)
    build_drafters(work, r)


def drafting_module(model):
    rt = model.speculative_streams
    return rt.drafter if rt.drafter is not None else rt.streams


def extra_parameters(model):
    return sum(v.size for _, v in tree_flatten(drafting_module(model).parameters()))


def weight_bytes(*modules):
    return sum(v.nbytes for m in modules for _, v in tree_flatten(m.parameters()))


def measure(methods, prompts, runs):
    """Runs every method on every prompt, interleaved (prompt by prompt, so slow
    drifts of the machine hit all methods alike), after one warm-up each.

    Returns, per method: median tokens/s (median of runs per prompt, then over
    prompts), mean tau, peak memory, and the outputs of the first runs. Peak
    memory is the method's own weights plus the peak of what generation
    allocates on top of everything resident (other methods' models included).
    """
    for m in methods:
        m["fn"](prompts[0])
    for m in methods:
        m.update(tps=[], taus=[], outputs=[], peak=0.0)
    for i, prompt in enumerate(prompts):
        for m in methods:
            mx.reset_peak_memory()
            resident = mx.get_active_memory()
            per_run = []
            for run in range(runs):
                tokens, t, passes = m["fn"](prompt)
                per_run.append(t)
                m["taus"].append(len(tokens) / passes)
                if run == 0:
                    m["outputs"].append(tokens)
            m["peak"] = max(m["peak"], (m["weights"] + mx.get_peak_memory() - resident) / 1e9)
            m["tps"].append(statistics.median(per_run))
        print(f"[{i + 1}/{len(prompts)}] measured", flush=True)
    for m in methods:
        m.update(
            tokens_per_s=statistics.median(m.pop("tps")),
            tau=statistics.mean(m.pop("taus")),
            peak_memory_gb=m.pop("peak"),
        )


def main(argv=None):
    import mlx_lm

    from convert.recipes import RECIPES

    from mlx_specstream import load

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/default", help="Build directory (resumed)")
    p.add_argument("--recipe", default="stdlib", help="The build's recipe (convert.recipes)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="Activations and unquantized weights")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="drafters", help="Prefix of the result files")
    args = p.parse_args(argv)
    w = Path(args.work)
    build(w, args.recipe)
    dtype = getattr(mx, args.dtype)
    times = json.loads((w / "stage_times.json").read_text())
    # Quality (the paper's "Metric" column): held-out next-token loss of the model whose
    # output is produced; every method but shared mode outputs the frozen base's tokens.
    choice = json.loads((w / "choice.json").read_text())
    losses = choice["main_stream_loss"]
    base_dir = w / "mlx" / "lossless"  # the frozen base (lossless mode never changes it)

    plain, tokenizer = mlx_lm.load(str(base_dir))
    plain.set_dtype(dtype)
    draft, _ = mlx_lm.load(str(w / "mlx" / "draft"))
    draft.set_dtype(dtype)
    draft_params = sum(v.size for _, v in tree_flatten(draft.parameters()))
    prompts = load_prompts(w / "prompts.jsonl", tokenizer, args.num_prompts, args.prompt_tokens)
    base_params = sum(v.size for _, v in tree_flatten(plain.parameters()))

    lossless_loss = losses["lossless"]
    methods = [
        dict(method="Plain decoding (mlx-lm)", tree="-", extra_parameters=0, training_s=None,
             loss=lossless_loss, weights=weight_bytes(plain),
             fn=lambda q: run_mlx_lm(plain, tokenizer, q, args.max_tokens)),
        dict(method=f"Two-model SD (mlx-lm, {draft_params / 1e6:.1f}M draft, 3 tokens)",
             tree="chain", extra_parameters=draft_params,
             training_s=times.get("draft model"), loss=lossless_loss,
             weights=weight_bytes(plain, draft),
             fn=lambda q: run_mlx_lm(plain, tokenizer, q, args.max_tokens, draft, 3)),
    ]  # fmt: skip
    lookup, _ = load(str(base_dir))  # the base with the verifier: its streams stay unused
    lookup.set_dtype(dtype)
    methods.append(
        dict(method="Prompt lookup (no drafter)", tree="chain of up to 10", extra_parameters=0,
             training_s=None, loss=lossless_loss, weights=weight_bytes(plain),
             fn=lambda q: run_specstream(lookup, tokenizer, q, args.max_tokens, draft="ngram"))
    )  # fmt: skip
    references = {"base": None}
    for name, sub, stage in DRAFTERS:
        model, _ = load(str(w / "mlx" / sub))
        model.set_dtype(dtype)
        mode = model.speculative_streams.config.mode
        reference = "base"
        if mode == "shared":  # its base is fine-tuned: compare with its own plain decoding
            reference = name
            references[name] = [
                run_specstream(model, tokenizer, q, args.max_tokens, speculative=False)[0]
                for q in prompts
            ]
        levels = model.speculative_streams.config.num_streams
        for tree_name, tree in TREES.items():
            tree = {**tree, "tree_depth": min(tree["tree_depth"], levels)}  # (toy recipes)
            methods.append(
                dict(method=name, tree=tree_name, extra_parameters=extra_parameters(model),
                     training_s=times.get(stage), loss=losses[mode], reference=reference,
                     weights=weight_bytes(model, drafting_module(model)),
                     fn=lambda q, model=model, tree=tree: run_specstream(
                         model, tokenizer, q, args.max_tokens, **tree))
            )  # fmt: skip
    measure(methods, prompts, args.runs)
    references["base"] = methods[0]["outputs"]
    for m in methods[1:]:
        if m.pop("outputs") != references[m.pop("reference", "base")]:
            raise AssertionError(f"{m['method']} ({m['tree']}): output differs from plain decoding")
    methods[0].pop("outputs")
    rows = [{k: v for k, v in m.items() if k not in ("fn", "weights")} for m in methods]
    ref_stats = rows[0]
    base_tps = ref_stats["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base_tps
    info = machine_info()
    info.update(
        command=" ".join(["python benchmarks/compare_drafters.py"] + sys.argv[1:]),
        work=str(w),
        base_parameters=base_params,
        prompts=len(prompts),
        runs=args.runs,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
        distill_s=times.get("self-distilled train data", 0)
        + times.get("self-distilled eval data", 0),
        recipe=args.recipe,
        lossless_distill=(
            "trains on the same set and excludes it too"
            if RECIPES[args.recipe].lossless_on_distilled
            else "includes its own self-distillation"
        ),
    )
    write(Path(args.output_dir), args.name, rows, info)


def write(out_dir: Path, name: str, rows, info):
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "| method | tree | speedup (tokens/s ratio) | tokens/s | tau (tokens per target pass) "
        "| held-out loss (nats) | extra parameters | training time | peak memory (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        extra = (
            "-"
            if not r["extra_parameters"]
            else f"{r['extra_parameters']:.1e} ({100 * r['extra_parameters'] / info['base_parameters']:.1f}%)"
        )
        train = "-" if r["training_s"] is None else f"{r['training_s'] / 60:.0f} min"
        lines.append(
            f"| {r['method']} | {r['tree']} | {r['speedup']:.2f}x | {r['tokens_per_s']:.1f} | "
            f"{r['tau']:.2f} | {r['loss']:.3f} | {extra} | {train} | {r['peak_memory_gb']:.3f} |"
        )
    lines += [
        "",
        f"Greedy, {info['dtype']}, {info['prompts']} held-out prompts x {info['runs']} runs, "
        f"{info['max_tokens']} new tokens; base {info['base_parameters']:,} parameters. Every "
        "output identical to plain decoding of the model that ran it. Training time: wall time "
        "of the build stage on the machine that ran it; the Medusa and ParallelSpec stages exclude "
        f"the self-distillation they share ({info['distill_s'] / 60:.0f} min), the lossless "
        f"stream fine-tune {info['lossless_distill']}; the two-model row's time is the draft "
        "model's "
        "pretraining. Peak memory: the method's weights plus the peak that "
        "generation allocates on top of them.",
        *provenance_lines(info),
    ]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps({"rows": rows, "info": info}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

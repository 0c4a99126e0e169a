"""Speculative Streaming against mlx-lm on the same weights.

``python -m mlx_specstream.benchmark [--model DIR] [--draft-model DIR]``

For each prompt, and with a fresh cache every run:

* mlx-lm plain generation on the model's base weights;
* mlx-lm speculative decoding with a small draft model (if one is given);
* the same draft model's drafts through this package's tree verifier
  (``draft_model=``), which measures the verifier's cost against mlx-lm's loop, and
  the draft model's own dynamic tree (``dynamic_tree=True``, top-4, 16 nodes) where it
  can grow one;
* Speculative Streaming with the package's default tree (top-3 per stream,
  at most 16 nodes), and with the tuned tree (``--tuned-*`` flags or the
  config's own settings, as ``mlx_specstream.tune`` saved them).

All runs are greedy, after one warm-up. Every output is checked: it must be
identical to ``speculative=False`` decoding of the same model, and in
lossless mode also to mlx-lm's own output. The script reports tokens/s and
its ratio to plain decoding, tokens per forward pass (tau), forward passes,
the verify-cost curve c(n) = t(n)/t(1), peak memory and the extra parameters.
It writes a CSV, a markdown summary and a PNG next to each other, and
records the machine, the versions and the command line.
"""

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .cli_args import add_draft_vocab_arg, add_num_mtp_layers_arg
from .config import SpecStreamConfig
from .draft_model import grows_trees
from .dynamic_tree import drafter_grows
from .generate import stream_generate
from .recurrent import has_recurrent_layers
from .streams import attach_verifier, get_runtime
from .support import tree_on_chains_refusal

DEFAULT_TREE = "SS default tree (k=3, 16 nodes)"
GROWN_SHAPE = dict(num_draft_tokens=5, tree_top_k=4, max_tree_nodes=16)  # (a draft model's)
GROWN_TREE = "SS verifier, draft model's grown tree (k=4, 16 nodes)"
DEFAULT_GROWN = "SS default tree, grown (k=3, 16 nodes)"  # (a drafter that grows where asked)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_tree_settings(cfg: SpecStreamConfig) -> dict:
    """The package's default tree (SpecStreamConfig's defaults: top-3 per stream,
    at most 16 nodes, no pruning) over every stream, drafted by the model's own
    streams, whatever ``cfg`` was tuned to (a tree size or prompt lookup)."""
    defaults = SpecStreamConfig()
    return {
        "tree_top_k": defaults.top_k,
        "tree_depth": cfg.num_streams,
        "prune_threshold": defaults.prune_threshold,
        "max_tree_nodes": defaults.max_tree_nodes,
        "draft": "streams",
    }


def grows_where_asked(model) -> bool:
    """Whether ``model``'s drafter grows dynamic trees only where asked (an MTP layer,
    :mod:`mlx_specstream.dynamic_tree`), and can here (on recurrent layers: where the model
    takes trees): then the benchmark times its default tree both ways."""
    drafter = get_runtime(model).drafter
    if not drafter_grows(drafter):
        return False
    if has_recurrent_layers(model) and tree_on_chains_refusal(model) is not None:
        return False
    return not drafter.grows_by_default


def machine_info(argv=None):
    import mlx_lm

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": str(mx.default_device()),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "command": " ".join(
            ["python -m mlx_specstream.benchmark"] + (sys.argv[1:] if argv is None else argv)
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def provenance_lines(info):
    """The machine, versions and command lines that close every results file."""
    return [
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['platform']}, {info['device']}; "
        f"python {info['python']}, mlx {info['mlx']}, mlx-lm {info['mlx_lm']}; {info['date']}.",
        "",
        f"Command: `{info['command']}`",
    ]


def load_prompts(path, tokenizer, n, prompt_tokens):
    """Prompts from held-out code: the first ``prompt_tokens`` tokens of each entry."""
    prompts = []
    for line in open(path):
        text = json.loads(line)["prompt"]
        prompts.append(tokenizer.encode(text)[:prompt_tokens])
        if len(prompts) == n:
            break
    return prompts


def check_outputs(outputs: dict, prompt: int, lossless: bool) -> list:
    """Checks one prompt's greedy outputs (method name -> tokens) against plain
    decoding's (``"SS no speculation"``).

    Ours must equal it (all methods in lossless mode, where the base model is plain
    decoding's model too; else ours): ``AssertionError`` otherwise. mlx-lm's own
    methods are reported instead, as notes saying where they leave it: its
    draft-model decoding does on sliding-window models once a window is full.

    Example: ``check_outputs({"SS no speculation": [1, 2], "mlx-lm draft model":
    [1, 3]}, 0, True)`` returns ``["prompt 0: mlx-lm draft model leaves plain
    decoding's output at token 1"]``.
    """
    reference, notes = outputs["SS no speculation"], []
    for name, tokens in outputs.items():
        if tokens == reference or not (name.startswith("SS") or lossless):
            continue
        if not name.startswith("mlx-lm"):
            raise AssertionError(f"prompt {prompt}: '{name}' output differs from plain decoding")
        at = next((j for j, (a, b) in enumerate(zip(tokens, reference)) if a != b),
                  min(len(tokens), len(reference)))  # fmt: skip
        notes.append(f"prompt {prompt}: {name} leaves plain decoding's output at token {at}")
    return notes


def run_mlx_lm(model, tokenizer, prompt, max_tokens, draft_model=None, num_draft_tokens=3):
    from mlx_lm.generate import stream_generate as mlx_stream_generate

    kwargs = (
        {"draft_model": draft_model, "num_draft_tokens": num_draft_tokens} if draft_model else {}
    )
    tokens, passes = [], 0
    for r in mlx_stream_generate(
        model, tokenizer, mx.array(prompt), max_tokens=max_tokens, **kwargs
    ):
        tokens.append(r.token)
        passes += not r.from_draft
        last = r
    return tokens, last.generation_tps, passes


def run_specstream(model, tokenizer, prompt, max_tokens, **tree):
    tokens = []
    for r in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=max_tokens, **tree):
        tokens.append(r.token)
        last = r
    return tokens, last.generation_tps, last.forward_passes


def verify_cost_curve(
    model, sizes=(1, 2, 4, 8, 16, 32), context=128, repeats=5, kinds=("plain", "specstream")
):
    """Median time of one forward pass over ``n`` new tokens (a chain) after
    ``context`` cached tokens, for the plain model and for a Speculative
    Streaming step (streams included), relative to ``n = 1``. The context is
    computed once per kind, and each timed pass trimmed off again (computed anew
    each time where the caches cannot be trimmed: recurrent layers)."""
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    def prefilled():
        cache = make_prompt_cache(model)
        model(mx.zeros((1, context), dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    rt = get_runtime(model) if "specstream" in kinds else None
    out = {kind: {} for kind in kinds}
    for kind in out:
        cache = prefilled()
        for n in sizes:
            times = []
            for _ in range(repeats + 1):
                if can_trim_prompt_cache(cache):  # (back to the context: the last pass cut off)
                    for c in cache:
                        c.trim(c.offset - context)
                else:
                    cache = prefilled()
                tokens = [1] * n
                tic = time.perf_counter()
                if kind == "plain":
                    mx.eval(model(mx.array([tokens]), cache=cache))
                else:
                    step = rt.forward(tokens, list(range(-1, n - 1)), cache)
                    mx.eval(
                        step.logits,
                        *[a for a in (step.stream_hidden, step.hidden) if a is not None],
                    )
                times.append(time.perf_counter() - tic)
            out[kind][n] = statistics.median(times[1:])
        base = out[kind][sizes[0]]
        out[kind] = {n: (t, t / base) for n, t in out[kind].items()}
    return out


def weight_bytes(model) -> int:
    """Bytes of a model's weights as stored (quantized ones packed): what plain decoding
    reads for every token."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def parameter_counts(model):
    rt = get_runtime(model)
    base = sum(v.size for _, v in tree_flatten(model.parameters()))
    module = rt.streams if rt.drafter is None else rt.drafter
    extra = sum(v.size for _, v in tree_flatten(module.parameters()))
    return base, extra


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Benchmark Speculative Streaming against mlx-lm.")
    p.add_argument("--model", default=None, help="Model directory (default: the embedded model)")
    add_num_mtp_layers_arg(p)
    add_draft_vocab_arg(p)
    p.add_argument(
        "--draft-model", default=None, help="mlx-lm draft model (default: the embedded draft)"
    )
    p.add_argument("--num-draft-tokens", type=int, default=3)
    p.add_argument("--prompts", default=None, help="JSONL with a 'prompt' per line")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tuned-top-k", type=int, default=None)
    p.add_argument("--tuned-depth", type=int, default=None)
    p.add_argument("--tuned-prune-threshold", type=float, default=None)
    p.add_argument("--tuned-max-tree-nodes", type=int, default=None)
    p.add_argument(
        "--sampling-temps",
        type=float,
        nargs="*",
        default=[0.7, 1.0],
        help="Also measure tau for both acceptance designs at these temperatures",
    )
    p.add_argument(
        "--sampling-runs", type=int, default=1, help="Seeded runs per prompt when sampling"
    )
    p.add_argument(
        "--sampling-prompts", type=int, default=4, help="Prompts used for the sampling table"
    )
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--name", default="default", help="Prefix of the result files")
    return p


def main(argv=None):
    import mlx_lm

    from .utils import load, resolve_model_path

    args = setup_arg_parser().parse_args(argv)
    if args.model is None:
        from .default_model import DEFAULT_DIR, DRAFT_DIR

        model_dir, draft_dir = DEFAULT_DIR, args.draft_model or DRAFT_DIR
    else:
        model_dir, draft_dir = resolve_model_path(args.model), args.draft_model
    dtype = DTYPES[args.dtype]
    model, tokenizer = load(
        str(model_dir), num_mtp_layers=args.num_mtp_layers, draft_vocab=args.draft_vocab
    )
    model.set_dtype(dtype)
    plain, _ = mlx_lm.load(str(model_dir))
    plain.set_dtype(dtype)
    draft = None
    if draft_dir:
        draft, _ = mlx_lm.load(str(draft_dir))
        draft.set_dtype(dtype)
    rt = get_runtime(model)
    cfg = rt.config
    prompts_file = args.prompts or Path(model_dir) / "prompts.jsonl"
    prompts = load_prompts(prompts_file, tokenizer, args.num_prompts, args.prompt_tokens)

    tuned = {
        "tree_top_k": args.tuned_top_k,
        "tree_depth": args.tuned_depth,
        "prune_threshold": args.tuned_prune_threshold,
        "max_tree_nodes": args.tuned_max_tree_nodes,
    }
    default_tree = default_tree_settings(cfg)
    # The tuned setting is the config's, whose draft source may be prompt lookup.
    source = getattr(cfg, "draft", None) or "streams"
    tuned_name = "SS tuned tree" if source == "streams" else f"SS tuned (draft={source})"
    default_name, run_tuned = DEFAULT_TREE, tuned
    if has_recurrent_layers(model) and rt.drafter is not None:
        # (a drafter on recurrent layers drafts chains: every level, or the tuned length)
        default_tree = {"num_draft_tokens": cfg.num_streams}
        default_name, tuned_name = f"SS chain of {cfg.num_streams}", "SS tuned chain"
        run_tuned = {} if args.tuned_depth is None else {"num_draft_tokens": args.tuned_depth}
    methods = {
        "mlx-lm plain": lambda p: run_mlx_lm(plain, tokenizer, p, args.max_tokens),
        "SS no speculation": lambda p: run_specstream(
            model, tokenizer, p, args.max_tokens, speculative=False
        ),
        default_name: lambda p: run_specstream(
            model, tokenizer, p, args.max_tokens, **default_tree
        ),
        tuned_name: lambda p: run_specstream(model, tokenizer, p, args.max_tokens, **run_tuned),
    }
    if grows_where_asked(model):  # (an MTP layer: the default tree static, then grown)
        grown_from = default_tree
        if has_recurrent_layers(model):  # (beside its chain: the static tree of its levels)
            grown_from = dict(default_tree_settings(cfg), prune_threshold=None)
            methods[DEFAULT_TREE] = lambda p: run_specstream(
                model, tokenizer, p, args.max_tokens, **grown_from
            )
        grown_from["dynamic_tree"] = False
        methods[DEFAULT_GROWN] = lambda p: run_specstream(
            model, tokenizer, p, args.max_tokens, **dict(grown_from, dynamic_tree=True)
        )
    if draft is not None:
        methods["mlx-lm draft model"] = lambda p: run_mlx_lm(
            plain, tokenizer, p, args.max_tokens, draft, args.num_draft_tokens
        )
        # The same drafts through our tree verifier: its cost against mlx-lm's loop (on
        # the base alone where the model has a drafter of its own: Medusa, MTP, ...).
        verifier = model
        if rt.drafter is not None:
            verifier, _ = mlx_lm.load(str(model_dir))
            verifier.set_dtype(dtype)
            if not has_recurrent_layers(verifier):  # (else chains through its own passes)
                attach_verifier(verifier)
        methods["SS verifier, same draft model"] = lambda p: run_specstream(
            verifier, tokenizer, p, args.max_tokens, draft_model=draft,
            num_draft_tokens=args.num_draft_tokens,
        )  # fmt: skip
        # Its own tree grown as EAGLE-2's (a copy: the verifier's hooks go on its layers).
        chains = has_recurrent_layers(verifier) or has_recurrent_layers(draft)
        if not chains and grows_trees(draft):
            grower, _ = mlx_lm.load(str(draft_dir))
            grower.set_dtype(dtype)
            methods[GROWN_TREE] = lambda p: run_specstream(
                verifier, tokenizer, p, args.max_tokens, draft_model=grower, dynamic_tree=True,
                **GROWN_SHAPE,
            )  # fmt: skip

    for fn in methods.values():  # warm-up
        fn(prompts[0])
    rows, outputs, differing = [], {}, []
    for i, prompt in enumerate(prompts):
        for name, fn in methods.items():
            mx.reset_peak_memory()
            for run in range(args.runs):
                tokens, tps, passes = fn(prompt)
                outputs.setdefault((i, name), tokens)
                rows.append(
                    dict(
                        prompt=i,
                        method=name,
                        run=run,
                        tokens=len(tokens),
                        tokens_per_s=tps,
                        forward_passes=passes,
                        tau=len(tokens) / passes,
                        peak_memory_gb=mx.get_peak_memory() / 1e9,
                    )
                )
        notes = check_outputs(
            {name: outputs[(i, name)] for name in methods}, i, cfg.mode == "lossless"
        )
        differing.extend(notes)
        print(f"[{i + 1}/{len(prompts)}] " + ("; ".join(notes) or "outputs identical across "
              "methods"), flush=True)  # fmt: skip

    weights = weight_bytes(plain)
    summary = summarize(rows, methods, weights)
    # Sampling uses the tuned tree, or the default one when tuning chose plain decoding.
    tuned_depth = cfg.tree_depth if tuned["tree_depth"] is None else tuned["tree_depth"]
    sampling_tree, tree = (
        (default_name, default_tree)
        if tuned_depth == 0 and source == "streams"
        else (tuned_name, run_tuned)
    )
    sampling = sampling_table(model, tokenizer, prompts, args, tree)
    curve = verify_cost_curve(model)
    base_params, extra = parameter_counts(model)
    info = machine_info(argv)
    info.update(
        model=str(model_dir),
        draft_model=str(draft_dir),
        mode=cfg.mode,
        dtype=args.dtype,
        base_parameters=base_params,
        stream_parameters=extra,
        stream_parameter_ratio=extra / base_params,
        weight_bytes=weights,
        tuned_tree=tuned,
        tuned_on=getattr(cfg, "tuned_on", None),
        config=cfg.to_dict(),
        prompts=len(prompts),
        runs=args.runs,
        max_tokens=args.max_tokens,
        sampling_runs=args.sampling_runs,
        sampling_prompts=min(args.sampling_prompts, len(prompts)),
        sampling_tree=sampling_tree,
        mlx_lm_differs=differing,
    )
    write_results(Path(args.output_dir), args.name, rows, summary, curve, info, sampling)


def sampling_table(model, tokenizer, prompts, args, tree):
    """Mean tau and median tokens/s of seeded sampling, per temperature and acceptance design."""
    from .decode import ACCEPTANCE
    from .sample_utils import make_sampler

    out = []
    for temp in args.sampling_temps:
        for acceptance in ACCEPTANCE:
            taus, tps = [], []
            for i, prompt in enumerate(prompts[: args.sampling_prompts]):
                for run in range(args.sampling_runs):
                    mx.random.seed(1000 * i + run)
                    for r in stream_generate(
                        model,
                        tokenizer,
                        mx.array(prompt),
                        max_tokens=args.max_tokens,
                        sampler=make_sampler(temp=temp),
                        acceptance=acceptance,
                        **tree,
                    ):
                        pass
                    taus.append(r.generation_tokens / r.forward_passes)
                    tps.append(r.generation_tps)
            out.append(
                dict(
                    temp=temp,
                    acceptance=acceptance,
                    tau=statistics.mean(taus),
                    tokens_per_s=statistics.median(tps),
                )
            )
            print(
                f"sampling T={temp} {acceptance}: tau {out[-1]['tau']:.2f}, "
                f"{out[-1]['tokens_per_s']:.1f} tokens/s",
                flush=True,
            )
    return out


def summarize(rows, methods, weights: int):
    """Per method: median tokens/s, mean tau and passes, peak memory, the speedup over
    mlx-lm plain, and gpt-fast's "bandwidth achieved": the base's weight bytes times
    tokens/s (plain decoding reads them once per token; above the device's memory
    bandwidth is beyond what plain decoding can reach)."""
    out = {}
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        # Median over runs per prompt, then median over prompts.
        per_prompt = {}
        for r in mine:
            per_prompt.setdefault(r["prompt"], []).append(r["tokens_per_s"])
        out[name] = {
            "tokens_per_s": statistics.median(statistics.median(v) for v in per_prompt.values()),
            "tau": statistics.mean(r["tau"] for r in mine),
            "forward_passes": statistics.mean(r["forward_passes"] for r in mine),
            "tokens": statistics.mean(r["tokens"] for r in mine),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in mine),
        }
    base = out["mlx-lm plain"]["tokens_per_s"]
    for v in out.values():
        v["speedup"] = v["tokens_per_s"] / base
        v["bandwidth_gbps"] = weights * v["tokens_per_s"] / 1e9
    return out


def write_results(out_dir: Path, name, rows, summary, curve, info, sampling=()):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# Benchmark: {info['model']}",
        "",
        "| method | tokens/s | vs mlx-lm plain | tokens per forward pass (tau) | forward passes "
        "| peak memory (GB) | bandwidth achieved (GB/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, v in summary.items():
        lines.append(
            f"| {m} | {v['tokens_per_s']:.1f} | {v['speedup']:.2f}x | {v['tau']:.2f} | "
            f"{v['forward_passes']:.1f} | {v['peak_memory_gb']:.3f} | {v['bandwidth_gbps']:.2f} |"
        )
    if sampling:
        greedy_tau = summary[info["sampling_tree"]]["tau"]
        lines += [
            "",
            f"Sampling with '{info['sampling_tree']}' (greedy tau {greedy_tau:.2f}), "
            f"{info['sampling_prompts']} prompts x {info['sampling_runs']} seeded "
            "run(s); both designs are lossless:",
            "",
            "| temperature | acceptance | tau | vs greedy tau | tokens/s |",
            "|---|---|---|---|---|",
        ]
        for r in sampling:
            lines.append(
                f"| {r['temp']} | {r['acceptance']} | {r['tau']:.2f} | "
                f"{r['tau'] / greedy_tau:.2f} | {r['tokens_per_s']:.1f} |"
            )
    sizes = sorted(curve["plain"])
    lines += [
        "",
        "Verify cost c(n) = t(n)/t(1), one forward pass over n new tokens after 128 cached:",
        "",
        "| n | " + " | ".join(str(n) for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for kind in ("plain", "specstream"):
        lines.append(
            f"| {kind} | "
            + " | ".join(
                f"{curve[kind][n][1]:.2f} ({curve[kind][n][0] * 1e3:.1f} ms)" for n in sizes
            )
            + " |"
        )
    lines += [
        "",
        f"Bandwidth achieved, as gpt-fast prints it: the base's {info['weight_bytes'] / 1e6:.1f} MB "
        "of weights times tokens/s. Plain decoding reads them once per token, so it cannot go "
        "past the device's memory bandwidth; speculation can.",
        "",
        f"Extra parameters: {info['stream_parameters']:,} ({100 * info['stream_parameter_ratio']:.3f}% of "
        f"{info['base_parameters']:,}). Mode: {info['mode']}, dtype: {info['dtype']}, "
        f"{info['prompts']} prompts x {info['runs']} runs, {info['max_tokens']} tokens, greedy; "
        "every output of ours identical to plain decoding"
        + "".join(f"; {note}" for note in info.get("mlx_lm_differs", []))
        + ". Tuned settings: "
        + (
            f"those stored for this device ({info['tuned_on']})."
            if info.get("tuned_on")
            else "none stored for this device (the model's own)."
        ),
        *provenance_lines(info),
    ]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(
        json.dumps({"summary": summary, "curve": curve, "info": info}, indent=2)
    )
    plot(out_dir / f"{name}.png", summary, curve)
    print("\n".join(lines))


def plot(path, summary, curve):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[WARNING] matplotlib is not installed: no plot written to {path}")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(summary)
    a.barh(names, [summary[n]["tokens_per_s"] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        a.text(
            summary[n]["tokens_per_s"],
            i,
            f" {summary[n]['speedup']:.2f}x, tau {summary[n]['tau']:.2f}",
            va="center",
        )
    a.set_xlim(0, 1.45 * max(summary[n]["tokens_per_s"] for n in names))
    a.set_xlabel("tokens/s (greedy)")
    a.set_title("Decoding speed")
    for kind in curve:
        ns = sorted(curve[kind])
        b.plot(ns, [curve[kind][n][1] for n in ns], "o-", label=kind)
    b.set_xscale("log", base=2)
    b.set_xlabel("new tokens per forward pass (n)")
    b.set_ylabel("c(n) = t(n) / t(1)")
    b.set_title("Verify cost")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

"""The shipped model's step cost in this tree against an earlier commit, interleaved.

    python benchmarks/step_before_after.py --before e6114d7 [--runs 3]

Checks the earlier commit out into a temporary git worktree and runs the same
measurement in a fresh process for each tree (before, then after, ``--runs``
times, so load on the machine falls on both): greedy decoding of held-out
prompts with speculation forced on, wall time per forward pass after the first
token, tokens per pass, and mlx-lm's per-token time in the same process.
Outputs must equal mlx-lm's. Results go to
``benchmarks/results/step_before_after[-TAG].{md,json}``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from report import machine_info, time_after_first, write_results

ROOT = Path(__file__).resolve().parent.parent
TREES = {
    "chain 3": dict(tree_top_k=1, tree_depth=3),
    "k3 x3, 16 nodes": dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16),
    "n-gram": dict(draft="ngram"),  # (no streams: both "passes" run the same step)
}


def child(prompts: int, prompt_tokens: int, max_tokens: int, ngram: bool = True) -> dict:
    """Runs in the measured tree's interpreter: per-pass times for each tree."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    import mlx_specstream
    from mlx_specstream.benchmark import load_prompts
    from mlx_specstream.decode import spec_generate_step
    from mlx_specstream.default_model import DEFAULT_DIR

    model, tokenizer = mlx_specstream.load()
    xs = load_prompts(Path(DEFAULT_DIR) / "prompts.jsonl", tokenizer, prompts, prompt_tokens)
    xs = [mx.array(x) for x in xs]

    want = [time_after_first(generate_step(x, model, max_tokens=max_tokens))[2]
            for x in xs]  # (warm-up too)  # fmt: skip
    plain = [time_after_first(generate_step(x, model, max_tokens=max_tokens)) for x in xs]
    res = dict(plain_ms=1e3 * sum(t for t, _, _ in plain) / sum(p for _, p, _ in plain))
    rt = model.speculative_streams
    # Trees that predate the fused/split choice have one way to draft: "as built".
    passes_to_try = ("split", "fused") if hasattr(rt, "split_streams") else ("as built",)
    if hasattr(rt, "stream_logits_in_pass"):  # the tuner's third choice: one head call per step
        passes_to_try += ("fused, logits in pass",)
    for stream_pass in passes_to_try:
        if stream_pass != "as built":
            rt.split_streams = stream_pass == "split"
        if hasattr(rt, "stream_logits_in_pass"):
            rt.stream_logits_in_pass = True if stream_pass == "fused, logits in pass" else None
        for name, tree in TREES.items():
            if "draft" in tree and not ngram:
                continue
            time_after_first(spec_generate_step(xs[0], model, max_tokens=8, **tree))  # warm-up
            t = passes = tokens = 0
            for x, ref in zip(xs, want):
                gen = spec_generate_step(x, model, max_tokens=max_tokens, **tree)
                dt, ps, out = time_after_first(gen)
                assert [int(v) for v in out] == [int(v) for v in ref], f"{name}: output differs"
                t, passes, tokens = t + dt, passes + ps, tokens + len(out) - 1
            res[f"{name} | {stream_pass}"] = dict(step_ms=1e3 * t / passes, tau=tokens / passes)
    return res


def render(info: dict, results: dict) -> tuple:
    """The markdown table and its rows: each stream pass before and after, then the
    faster pass of each tree before against the faster one after."""
    lines = [
        f"# Step cost before ({info['before']}) and after ({info['after']}) ({info['device']}, "
        f"MLX {info['mlx']}, mlx-lm {info['mlx_lm']}, {info['machine']})",
        "",
        f"`{info['command']}`: shipped model, {info['prompts']} held-out prompts x "
        f"{info['max_tokens']} tokens, greedy, speculation forced on, medians of {info['runs']} "
        "interleaved runs (each in a fresh process). r = step / mlx-lm's per-token time in the "
        "same process; tau = tokens per step.",
        "",
        "| tree | pass | before: step ms | after: step ms | after / before | r before | r after "
        "| tau before | tau after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def med(key, which, field="step_ms"):
        runs = results[which]
        if field == "r":
            return statistics.median(r[key]["step_ms"] / r["plain_ms"] for r in runs)
        return statistics.median(r[key][field] for r in runs)

    table = []
    for name in TREES:
        if not any(k.startswith(name + " |") for k in results["before"][0]):
            continue  # (left out: --no-ngram)
        keys = {w: {k.split(" | ")[1]: k for k in results[w][0] if k.startswith(name + " |")}
                for w in results}  # fmt: skip
        pairs = [
            (p, keys["before"][p], keys["after"][p]) for p in keys["after"] if p in keys["before"]
        ]
        best = {w: min(keys[w].values(), key=lambda k, w=w: med(k, w)) for w in results}
        pairs.append(("faster of each", best["before"], best["after"]))
        for label, kb, ka in pairs:
            if label == "faster of each":
                label = f"faster: {kb.split(' | ')[1]} -> {ka.split(' | ')[1]}"
            row = dict(tree=name, passes=label, before_ms=med(kb, "before"),
                       after_ms=med(ka, "after"), r_before=med(kb, "before", "r"),
                       r_after=med(ka, "after", "r"), tau_before=results["before"][-1][kb]["tau"],
                       tau_after=results["after"][-1][ka]["tau"])  # fmt: skip
            row["ratio"] = row["after_ms"] / row["before_ms"]
            table.append(row)
            lines.append(
                f"| {name} | {label} | {row['before_ms']:.1f} | {row['after_ms']:.1f} "
                f"| **{row['ratio']:.2f}** | {row['r_before']:.2f} | {row['r_after']:.2f} "
                f"| {row['tau_before']:.2f} | {row['tau_after']:.2f} |"
            )
    plain = {k: statistics.median(r["plain_ms"] for r in results[k]) for k in results}
    lines += ["", f"mlx-lm plain: {plain['before']:.2f} ms/token in the 'before' processes, "
              f"{plain['after']:.2f} in the 'after' ones."]  # fmt: skip
    return "\n".join(lines) + "\n", table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="the earlier commit (required)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--tag", default="")
    p.add_argument("--no-ngram", action="store_true",
                   help="leave prompt lookup out (commits before it existed)")  # fmt: skip
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--render", metavar="JSON", help="re-render a saved result's markdown")
    args = p.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        text, _ = render(saved["info"], saved["runs"])
        Path(args.render).with_suffix(".md").write_text(text)
        print(text)
        return
    if args.child:
        print(json.dumps(child(args.prompts, args.prompt_tokens, args.max_tokens,
                               not args.no_ngram)))  # fmt: skip
        return
    if not args.before:
        p.error("--before is required")
    before = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    after = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    if subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, check=True,
                      capture_output=True, text=True).stdout.strip():  # fmt: skip
        after += " with uncommitted changes"
    results = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), before], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
        try:
            for run in range(args.runs):
                for key, tree in (("before", old), ("after", ROOT)):
                    env = dict(os.environ, PYTHONPATH=str(tree))
                    cmd = [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--child",
                        "--prompts",
                        str(args.prompts),
                        "--prompt-tokens",
                        str(args.prompt_tokens),
                        "--max-tokens",
                        str(args.max_tokens),
                    ]
                    cmd += ["--no-ngram"] if args.no_ngram else []  # fmt: skip
                    out = subprocess.run(cmd, env=env, cwd=tmp, check=True, capture_output=True,
                                         text=True).stdout  # fmt: skip
                    results[key].append(json.loads(out.strip().splitlines()[-1]))
                    print(f"run {run} {key}: {results[key][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT,
                           capture_output=True)  # fmt: skip
    info = machine_info(before=before, after=after, prompts=args.prompts,
                        max_tokens=args.max_tokens, runs=args.runs)  # fmt: skip
    text, table = render(info, results)
    write_results("step_before_after", args.tag, text, dict(info=info, table=table, runs=results))


if __name__ == "__main__":
    main()

"""What one decode step costs, against mlx-lm's own per-token time, and where it goes.

    python benchmarks/step_profile.py [--model DIR] [--prompts 4] [--max-tokens 128]
    benchmarks/with_openblas.sh python benchmarks/step_profile.py

For each tree (a chain, and top-k trees of several sizes) and each lossless
stream pass (``fused``: streams inside the verify pass; ``split``: a second
pass for the accepted node's streams), greedy, on held-out prompts:

* r = wall time per step / mlx-lm's per-token time (its pipelined
  ``generate_step``) on the same weights, in the same run: speedup = tau / r;
* tau (tokens per step) and tokens/s;
* the step's phases, host wall time per step: ``launch`` (building the pass,
  the acceptance and the next draft as one graph, and starting it), ``finish``
  (all of it), inside it ``commit`` (compacting the caches) and ``next tree``,
  and ``wait + walk`` = the rest of ``finish``: mostly the host read waiting for
  the device (the device runs while the generator yields too).

Every output is checked against mlx-lm's greedy tokens. Results go to
``benchmarks/results/step_profile[-TAG].{md,json}`` with the machine and versions.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step

import mlx_specstream
import mlx_specstream.decode as decode
from mlx_specstream.benchmark import load_prompts
from mlx_specstream.default_model import DEFAULT_DIR

TREES = {
    "chain 2": dict(tree_top_k=1, tree_depth=2),
    "chain 3": dict(tree_top_k=1, tree_depth=3),
    "k2 x3, 8 nodes": dict(tree_top_k=2, tree_depth=3, max_tree_nodes=8),
    "k3 x3, 16 nodes": dict(tree_top_k=3, tree_depth=3, max_tree_nodes=16),
}


class PhaseTimer:
    """Wraps the decoder's phases with wall clocks (host time, in seconds) while open."""

    PHASES = ((decode.Decoder, "launch", "launch"), (decode.Decoder, "finish", "finish"),
              (decode.Decoder, "_next_draft", "next tree"), (decode, "commit_path", "commit"))  # fmt: skip

    def __enter__(self):
        self.t = {key: 0.0 for _, _, key in self.PHASES}
        self.saved = [(owner, name, getattr(owner, name)) for owner, name, _ in self.PHASES]
        for owner, name, key in self.PHASES:
            setattr(owner, name, self._timed(getattr(owner, name), key))
        return self

    def __exit__(self, *exc):
        for owner, name, real in self.saved:
            setattr(owner, name, real)

    def _timed(self, real, key):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.t[key] += time.perf_counter() - t0

        return timed


def plain_run(model, prompt, max_tokens):
    t0 = time.perf_counter()
    out = [t for t, _ in generate_step(prompt, model, max_tokens=max_tokens)]
    return out, time.perf_counter() - t0


def spec_run(model, prompt, max_tokens, **tree):
    t0, out, passes = time.perf_counter(), [], 0
    for token, _, _, passes in decode.spec_generate_step(
        prompt, model, max_tokens=max_tokens, **tree
    ):
        out.append(token)
    return out, time.perf_counter() - t0, passes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    model, tokenizer = mlx_specstream.load(args.model)
    model_dir = Path(args.model or DEFAULT_DIR)
    prompts = load_prompts(model_dir / "prompts.jsonl", tokenizer, args.prompts, args.prompt_tokens)
    prompts = [mx.array(x) for x in prompts]
    rt = model.speculative_streams
    # Warm-up, and the reference tokens.
    want = [plain_run(model, x, args.max_tokens)[0] for x in prompts]
    plain_t = []
    rows = []
    for run in range(args.runs):
        plain_t += [plain_run(model, x, args.max_tokens)[1] / args.max_tokens for x in prompts]
        for name, tree in TREES.items():
            for stream_pass in ("fused", "split"):
                rt.split_streams = stream_pass == "split"
                t, passes, n = 0.0, 0, 0
                for x, ref in zip(prompts, want):
                    out, dt, ps = spec_run(model, x, args.max_tokens, **tree)
                    assert out == ref, f"{name}/{stream_pass}: output differs from mlx-lm"
                    t, passes, n = t + dt, passes + ps, n + len(out)
                with PhaseTimer() as timer:  # a separate, instrumented pass over the prompts
                    for x in prompts:
                        spec_run(model, x, args.max_tokens, **tree)
                rows.append(
                    dict(
                        tree=name,
                        stream_pass=stream_pass,
                        run=run,
                        time=t,
                        passes=passes,
                        tokens=n,
                        phases=timer.t,
                    )
                )
    per_token = statistics.median(plain_t)
    table = []
    for name in TREES:
        for stream_pass in ("fused", "split"):
            rs = [r for r in rows if r["tree"] == name and r["stream_pass"] == stream_pass]
            step = statistics.median(r["time"] / r["passes"] for r in rs)
            tau = rs[-1]["tokens"] / rs[-1]["passes"]
            ph = {k: v / rs[-1]["passes"] * 1e3 for k, v in rs[-1]["phases"].items()}
            ph["wait + walk"] = ph["finish"] - ph["commit"] - ph["next tree"]
            table.append(
                dict(
                    tree=name,
                    stream_pass=stream_pass,
                    step_ms=step * 1e3,
                    tau=tau,
                    r=step / per_token,
                    speedup=tau * per_token / step,
                    phases_ms=ph,
                )
            )
    info = dict(
        command=" ".join(sys.argv),
        machine=platform.machine(),
        processor=platform.processor(),
        python=platform.python_version(),
        mlx=mx.__version__,
        mlx_lm=mlx_lm.__version__,
        device=str(mx.default_device()),
        model=str(model_dir),
        prompts=args.prompts,
        max_tokens=args.max_tokens,
        runs=args.runs,
        plain_ms_per_token=per_token * 1e3,
    )
    lines = [
        f"# Step profile ({info['device']}, MLX {info['mlx']}, mlx-lm {info['mlx_lm']})",
        "",
        f"`{info['command']}`: {args.prompts} prompts x {args.max_tokens} tokens, greedy, "
        f"median of {args.runs} runs. mlx-lm plain: {per_token * 1e3:.2f} ms/token.",
        "",
        "| tree | pass | step ms | r = step / plain token | tau | speedup | launch ms | finish ms | wait + walk | commit | next tree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        ph = r["phases_ms"]
        lines.append(
            f"| {r['tree']} | {r['stream_pass']} | {r['step_ms']:.1f} | {r['r']:.2f} | {r['tau']:.2f} "
            f"| {r['speedup']:.2f}x | {ph['launch']:.1f} | {ph['finish']:.1f} | {ph['wait + walk']:.1f} "
            f"| {ph['commit']:.1f} | {ph['next tree']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / f"step_profile{'-' + args.tag if args.tag else ''}"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps(dict(info=info, table=table, rows=rows), indent=1)
    )


if __name__ == "__main__":
    main()

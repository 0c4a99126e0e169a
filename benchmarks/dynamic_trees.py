"""Dynamic draft trees (EAGLE-2's) against the static tree of the same drafter's levels.

    cd benchmarks && ./with_openblas.sh python dynamic_trees.py --model ../runs/eagle/model --tag cpu-openblas

An EAGLE-3 drafter's static tree puts level ``j``'s top-k, drafted along the top-1 chain,
under every node of level ``j - 1``; a dynamic tree (:mod:`mlx_specstream.dynamic_tree`)
drafts each expanded node's children from that node's own path and keeps the best paths.
On the default model's 19 held-out prompts, greedy, float32, with the directory's drafter
(``eagle_trained.py`` writes one trained on the shipped base to ``runs/eagle/model``):

* tau of chains and of each tree shape (top-k x depth, node cap), static and dynamic,
  every output checked against mlx-lm's greedy tokens;
* tokens/s on the first ``--speed-prompts`` prompts: mlx-lm plain, mlx-lm's draft-model
  decoding (the embedded draft model, 3 tokens), ours with a chain of 3 and with
  ``--speed-trees``, the same weights in one run, rounds interleaved (median).

With ``--temp T,...``, sampling instead (``make_sampler(temp=T)``): per tree shape, tau
of the static tree drawn from the drafter's levels and of the drawn dynamic tree, both by
recursive rejection, and of the dynamic (top-k) tree by target sampling, over every
prompt with ``--seeds`` seeds; then tokens/s against mlx-lm's plain and draft-model
decoding with the same sampler. Sampling keeps the distribution (tests/test_drawn_tree.py,
tests/test_dynamic_tree.py), so no output is compared here.

    cd benchmarks && ./with_openblas.sh python dynamic_trees.py --model ../runs/eagle/eagle1-model --temp 0.7,1.0 --tag eagle1-sampling-cpu-openblas

A model directory whose drafter is a checkpoint's MTP layer works the same way (its
trees grown on the layer; ``mtp_trained.py`` builds one, saved with ``num_draft_tokens``
5 in its drafter section so that trees may be 5 levels deep):

    cd benchmarks && ./with_openblas.sh python dynamic_trees.py --model ../runs/mtp/dir5 --rounds 5 --tag mtp-cpu-openblas

With ``--draft-model DIR``, the trees are a draft model's (``draft_model=``, its levels
``num_draft_tokens`` deep) on ``--model`` (default: the embedded model, its streams off):

    cd benchmarks && ./with_openblas.sh python dynamic_trees.py --model ../mlx_specstream/models/default --draft-model ../mlx_specstream/models/draft --tag draft-model-cpu-openblas

Writes ``benchmarks/results/dynamic_trees[-TAG].{md,json}``.
"""

import argparse
import json
import statistics

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler
from mtp_trained import taus_against_mlx_lm
from report import heading, machine_info, time_after_first, write_results

from mlx_specstream import load
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.default_model import DEFAULT_DIR, DRAFT_DIR
from mlx_specstream.sample_utils import make_sampler

CHAINS = (3, 4)
SHAPES = ((2, 4, 8), (3, 4, 12), (4, 5, 16), (8, 5, 32))  # (top-k, depth, nodes)


def shape_name(k: int, depth: int, nodes: int, dynamic: bool) -> str:
    return f"top-{k} x {depth}, {nodes} nodes, {'dynamic' if dynamic else 'static'}"


def trees(shapes=SHAPES) -> dict:
    out = {f"chain of {d}": dict(tree_top_k=1, tree_depth=d, max_tree_nodes=d + 1)
           for d in CHAINS}  # fmt: skip
    for k, depth, nodes in shapes:
        for dynamic in (False, True):
            out[shape_name(k, depth, nodes, dynamic)] = dict(
                tree_top_k=k, tree_depth=depth, max_tree_nodes=nodes, dynamic_tree=dynamic
            )
    return out


SAMPLED = {  # (name, acceptance, dynamic_tree)
    "static, rejection": ("rejection", False),
    "drawn dynamic, rejection": ("rejection", True),
    "dynamic, target-sample": ("target-sample", True),
}


def with_draft_model(trees: dict, draft) -> dict:
    """``trees`` drafted by the mlx-lm model ``draft`` (``None``: as they are): each tree's
    depth is the draft model's ``num_draft_tokens``."""
    if draft is None:
        return trees
    out = {}
    for name, tree in trees.items():
        tree = dict(tree, draft_model=draft)
        tree["num_draft_tokens"] = tree.pop("tree_depth")
        out[name] = tree
    return out


def sampled_trees(shapes=SHAPES) -> dict:
    out = {f"chain of {d}, rejection": dict(tree_top_k=1, tree_depth=d, max_tree_nodes=d + 1,
                                            acceptance="rejection") for d in CHAINS}  # fmt: skip
    for k, depth, nodes in shapes:
        for way, (acceptance, dynamic) in SAMPLED.items():
            out[f"top-{k} x {depth}, {nodes} nodes, {way}"] = dict(
                tree_top_k=k, tree_depth=depth, max_tree_nodes=nodes, dynamic_tree=dynamic,
                acceptance=acceptance,
            )  # fmt: skip
    return out


def sampled_taus(model, prompts, max_tokens: int, trees: dict, temp: float, seeds: int) -> dict:
    """Tokens per pass of each tree when sampling at ``temp``: every prompt, each seed."""
    out = {}
    for name, tree in trees.items():
        tokens = passes = 0
        for prompt in prompts:
            for seed in range(seeds):
                mx.random.seed(seed)
                got = list(spec_generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                              sampler=make_sampler(temp=temp), **tree))  # fmt: skip
                tokens, passes = tokens + len(got), passes + got[-1][3]
        out[name] = dict(tau=tokens / passes)
        print(f"T={temp} {name}: tau {tokens / passes:.3f}", flush=True)
    return out


def timed_ways(speed_trees: str, chain: str, variants: dict) -> dict:
    """The ways timed: our chain of 3 (named with ``chain``), then each ``top-k,depth,nodes``
    shape of ``speed_trees`` in each of ``variants`` (name: settings)."""
    ways = {f"ours: chain of 3{chain}": dict(tree_top_k=1, tree_depth=3, max_tree_nodes=4)}
    for spec in speed_trees.split(";"):
        k, depth, nodes = map(int, spec.split(","))
        for way, settings in variants.items():
            ways[f"ours: top-{k} x {depth}, {nodes} nodes, {way}"] = dict(
                tree_top_k=k, tree_depth=depth, max_tree_nodes=nodes, **settings
            )
    return ways


def speeds(model, plain, draft, prompts, max_tokens: int, ways: dict, rounds: int,
           temp: float = 0.0) -> dict:  # fmt: skip
    """Median tokens/s (after each prompt's first token) of mlx-lm plain, mlx-lm's
    draft-model decoding and each of ``ways``, rounds interleaved; sampling at ``temp``
    (mlx-lm's sampler for mlx-lm, ours for ours)."""

    def run(name, prompt):
        p = mx.array(prompt)
        kw = {} if not temp else dict(sampler=mlx_lm_sampler(temp=temp))
        if name == "mlx-lm plain":
            return generate_step(p, plain, max_tokens=max_tokens, **kw)
        if name == "mlx-lm draft model (3)":
            return speculative_generate_step(p, plain, draft, num_draft_tokens=3,
                                             max_tokens=max_tokens, **kw)  # fmt: skip
        kw = {} if not temp else dict(sampler=make_sampler(temp=temp))
        return spec_generate_step(p, model, max_tokens=max_tokens, **kw, **ways[name])

    names = ["mlx-lm plain", "mlx-lm draft model (3)"] + list(ways)
    for name in names:  # (warm-up)
        time_after_first(run(name, prompts[0]))
    per = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            tokens = seconds = 0.0
            for prompt in prompts:
                s, _, toks = time_after_first(run(name, prompt))
                tokens, seconds = tokens + len(toks) - 1, seconds + s
            per[name].append(tokens / seconds)
    return {n: statistics.median(v) for n, v in per.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/eagle/model", help="the base with its drafter")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--speed-prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--speed-trees",
        default="2,4,8;4,5,16",
        help="top-k,depth,nodes;... timed static and dynamic (beside the chain of 3)",
    )
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--temp", default="", help="T,...: sampling at these temperatures instead")
    p.add_argument("--seeds", type=int, default=2, help="sampling: seeds per prompt")
    p.add_argument("--skip-tau", action="store_true", help="sampling: speed only")
    p.add_argument("--draft-model", default=None, help="trees of this mlx-lm draft model")
    p.add_argument("--shapes", default=None, help="top-k,depth,nodes;... whose tau is measured")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    args.shapes = (
        SHAPES
        if args.shapes is None
        else [tuple(map(int, spec.split(","))) for spec in args.shapes.split(";")]
    )
    info = machine_info(model=args.model, max_tokens=args.max_tokens, draft_model=args.draft_model)
    model, tok = load(args.model)
    model.set_dtype(mx.float32)
    args.drafts = None  # (the trees' draft model: None, the model's drafter)
    if args.draft_model:
        args.drafts, _ = mlx_lm.load(args.draft_model)
        args.drafts.set_dtype(mx.float32)
    args.source = source = (
        f"`{args.draft_model}`" if args.draft_model else f"the drafter of `{args.model}`"
    )
    plain, _ = mlx_lm.load(str(DEFAULT_DIR))
    plain.set_dtype(mx.float32)
    texts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]
    if args.temp:
        return sampling(args, info, model, tok, plain, texts)
    taus = taus_against_mlx_lm(model, tok, plain, texts, args.max_tokens,
                               with_draft_model(trees(args.shapes), args.drafts))  # fmt: skip
    lines = [heading("Dynamic draft trees against static ones", info), "",
             f"`{info['command']}`: {source} on the default model's "
             f"{len(texts)} held-out prompts, greedy, float32, {args.max_tokens} tokens.", "",
             "| tree | tau | identical to mlx-lm |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {n} | {v['tau']:.3f} | {'yes' if v['identical'] else 'no'} |"
              for n, v in taus.items()]  # fmt: skip
    data = dict(info=info, tau=taus)
    if not args.skip_speed:
        draft, _ = mlx_lm.load(str(DRAFT_DIR))
        draft.set_dtype(mx.float32)
        ways = timed_ways(args.speed_trees, "", {"static": dict(dynamic_tree=False),
                                                 "dynamic": dict(dynamic_tree=True)})  # fmt: skip
        ways = with_draft_model(ways, args.drafts)
        prompts = [tok.encode(t) for t in texts[: args.speed_prompts]]
        tps = speeds(model, plain, draft, prompts, args.max_tokens, ways, args.rounds)
        base = tps["mlx-lm plain"]
        lines += ["", f"Tokens/s on the first {len(prompts)} prompts, median of {args.rounds} "
                  "interleaved rounds (after each prompt's first token):", "",
                  "| way | tokens/s | vs mlx-lm plain | vs mlx-lm draft model |",
                  "|---|---|---|---|"]  # fmt: skip
        dm = tps["mlx-lm draft model (3)"]
        lines += [f"| {n} | {v:.1f} | {v / base:.2f}x | {v / dm:.2f}x |" for n, v in tps.items()]
        data["tokens_per_s"] = tps
    write_results("dynamic_trees", args.tag, "\n".join(lines) + "\n", data)


def sampling(args, info, model, tok, plain, texts) -> None:
    """``--temp``: tau of static, drawn and top-k dynamic trees when sampling, then speed."""
    temps = [float(t) for t in args.temp.split(",")]
    prompts = [tok.encode(t) for t in texts]
    lines = [heading("Dynamic draft trees when sampling", info), "",
             f"`{info['command']}`: {args.source}, float32, "
             f"{args.max_tokens} tokens, `make_sampler(temp=T)`."]  # fmt: skip
    if not args.skip_tau:
        lines += ["", f"Tau on the default model's {len(texts)} held-out prompts x {args.seeds} "
                  "seeds:", "", "| T | tree | tau |", "|---|---|---|"]  # fmt: skip
    data = dict(info=info, tau={}, tokens_per_s={})
    for temp in [] if args.skip_tau else temps:
        taus = sampled_taus(
            model,
            prompts,
            args.max_tokens,
            with_draft_model(sampled_trees(args.shapes), args.drafts),
            temp,
            args.seeds,
        )
        lines += [f"| {temp} | {n} | {v['tau']:.3f} |" for n, v in taus.items()]
        data["tau"][str(temp)] = taus
    if not args.skip_speed:
        draft, _ = mlx_lm.load(str(DRAFT_DIR))
        draft.set_dtype(mx.float32)
        ways = timed_ways(args.speed_trees, ", rejection",
                          {way: dict(acceptance=a, dynamic_tree=d)
                           for way, (a, d) in SAMPLED.items()})  # fmt: skip
        ways = with_draft_model(ways, args.drafts)
        lines += ["", f"Tokens/s on the first {args.speed_prompts} prompts, median of "
                  f"{args.rounds} interleaved rounds (after each prompt's first token):", "",
                  "| T | way | tokens/s | vs mlx-lm plain | vs mlx-lm draft model |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for temp in temps:
            mx.random.seed(0)
            tps = speeds(model, plain, draft, prompts[: args.speed_prompts], args.max_tokens,
                         ways, args.rounds, temp)  # fmt: skip
            base, dm = tps["mlx-lm plain"], tps["mlx-lm draft model (3)"]
            lines += [f"| {temp} | {n} | {v:.1f} | {v / base:.2f}x | {v / dm:.2f}x |"
                      for n, v in tps.items()]  # fmt: skip
            data["tokens_per_s"][str(temp)] = tps
    write_results("dynamic_trees", args.tag, "\n".join(lines) + "\n", data)


if __name__ == "__main__":
    main()

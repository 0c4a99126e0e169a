"""Chains cut where their drafter is unsure (``draft_confidence``, transformers'
``assistant_confidence_threshold``) against fixed chains.

    cd benchmarks && ./with_openblas.sh python draft_confidence.py --tag cpu-openblas
    cd benchmarks && ./with_openblas.sh python draft_confidence.py --model ../runs/mtp/dir5 \
        --tag mtp-cpu-openblas

Without ``--model``, the embedded draft model drafts for the embedded base (its streams
off); with ``--model DIR``, that model's own drafter (its streams, MTP layer or EAGLE
drafter) drafts chains of its levels. Float32, greedy, on the default model's held-out
prompts:

* per way: tokens per pass (tau), drafts verified per pass, draft passes per generated
  token (the draft model's, or the drafter layer's runs: an MTP layer's, an EAGLE
  drafter's; streams draft inside the verifying pass), and whether every output equals
  mlx-lm's greedy decoding;
* tokens/s on the first ``--speed-prompts`` prompts: mlx-lm plain, mlx-lm's draft-model
  decoding (3 tokens, its default) and each way, the same weights in one run, rounds
  interleaved (median).

Writes ``benchmarks/results/draft_confidence[-TAG].{md,json}``.
"""

import argparse
import json

import mlx.core as mx
import mlx_lm
from dynamic_trees import speeds
from mtp_trained import taus_against_mlx_lm
from report import heading, machine_info, write_results

import mlx_specstream.decode as decode
import mlx_specstream.draft_model as draft_model_mod
import mlx_specstream.eagle as eagle
import mlx_specstream.mtp as mtp
from mlx_specstream import load
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.default_model import DEFAULT_DIR, DRAFT_DIR


def ways(draft, chains=(1, 2, 3, 4), longest: int = 8, thresholds=(0.3, 0.4, 0.6, 0.8)):
    out = {f"chain of {n}": dict(draft_model=draft, num_draft_tokens=n) for n in chains}
    for c in thresholds:
        out[f"up to {longest}, confidence {c}"] = dict(
            draft_model=draft, num_draft_tokens=longest, draft_confidence=c
        )
    return out


def own_ways(longest: int = 5, thresholds=(0.3, 0.4, 0.6, 0.8)):
    """The model's own drafter's chains: fixed (1 to ``longest``), and up to ``longest`` cut
    at each threshold."""
    def chain(n):  # (n levels, n + 1 nodes: not the config's cap)
        return dict(tree_top_k=1, tree_depth=n, max_tree_nodes=n + 1)

    out = {f"chain of {n}": chain(n) for n in range(1, longest + 1)}
    for c in thresholds:
        out[f"up to {longest}, confidence {c}"] = dict(chain(longest), draft_confidence=c)
    return out


def counts(model, tok, texts, max_tokens: int, settings: dict) -> dict:
    """Draft passes per generated token (a draft model's, its prompt prefill excluded; or
    an MTP layer's or EAGLE drafter's runs, each level one) and drafts verified per pass."""
    calls, launched = [], []
    real_step, real_launch = draft_model_mod.DraftModel._step, decode.Decoder.launch
    real_again = {m: m.levels_again for m in (mtp, eagle)}

    def step(self, tokens):
        calls.append(1)
        return real_step(self, tokens)

    def launch(self, draft, after=None):
        launched.append(len(draft.layout) - 1)
        return real_launch(self, draft, after)

    def again(module):
        def counted(*args, **kwargs):
            ran = real_again[module](*args, **kwargs)
            calls.append(1 + ran)  # (the first level, then the runs on its own output)
            return ran

        return counted

    draft_model_mod.DraftModel._step, decode.Decoder.launch = step, launch
    for m in real_again:
        m.levels_again = again(m)
    try:
        tokens = sum(len(list(spec_generate_step(mx.array(tok.encode(t)), model,
                                                 max_tokens=max_tokens, **settings)))
                     for t in texts)  # fmt: skip
    finally:
        draft_model_mod.DraftModel._step, decode.Decoder.launch = real_step, real_launch
        for m, f in real_again.items():
            m.levels_again = f
    return dict(draft_passes=sum(calls) / tokens, drafts_per_pass=sum(launched) / len(launched))


def tau_table(taus: dict) -> list:
    """The markdown table of each way's tau, drafts per pass, draft passes per token and
    whether its outputs equal mlx-lm's."""
    lines = ["| way | tau | drafts per pass | draft passes per token | identical to mlx-lm |",
             "|---|---|---|---|---|"]  # fmt: skip
    return lines + [f"| {n} | {v['tau']:.3f} | {v['drafts_per_pass']:.2f} | "
                    f"{v['draft_passes']:.2f} | {'yes' if v['identical'] else 'no'} |"
                    for n, v in taus.items()]  # fmt: skip


def float32_models(source):
    """``source`` loaded as ours (streams or drafter attached) and as mlx-lm's plain model,
    the embedded draft model and the default model's held-out prompts; float32."""
    model, tok = load(str(source))
    plain, _ = mlx_lm.load(str(source))
    draft, _ = mlx_lm.load(str(DRAFT_DIR))
    for m in (model, plain, draft):
        m.set_dtype(mx.float32)
    texts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]
    return model, tok, plain, draft, texts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--speed-prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default=None,
                   help="a model whose own drafter drafts (default: the embedded draft model "
                   "for the embedded base)")  # fmt: skip
    p.add_argument(
        "--longest",
        type=int,
        default=None,
        help="the longest cut chain (default: 8 for the draft model, 5 else)",
    )
    p.add_argument("--tag", default="")
    args = p.parse_args()
    info = machine_info(max_tokens=args.max_tokens, rounds=args.rounds)
    source = DEFAULT_DIR if args.model is None else args.model
    model, tok, plain, draft, texts = float32_models(source)
    if args.model is None:
        all_ways, what = ways(draft, longest=args.longest or 8), "Draft-model chains"
        who = "the embedded draft model for the embedded base (streams off)"
    else:
        all_ways, what = own_ways(longest=args.longest or 5), "A model's own chains"
        who = f"`{args.model}`'s own drafter"
    taus = taus_against_mlx_lm(model, tok, plain, texts, args.max_tokens, all_ways)
    for name, settings in all_ways.items():
        taus[name].update(counts(model, tok, texts, args.max_tokens, settings))
    lines = [heading(f"{what} cut where the drafter is unsure", info), "",
             f"`{info['command']}`: {who}, the default model's {len(texts)} held-out prompts, "
             f"greedy, float32, {args.max_tokens} tokens.", ""]  # fmt: skip
    lines += tau_table(taus)
    prompts = [tok.encode(t) for t in texts[: args.speed_prompts]]
    tps = speeds(model, plain, draft, prompts, args.max_tokens, all_ways, args.rounds)
    base, dm = tps["mlx-lm plain"], tps["mlx-lm draft model (3)"]
    lines += ["", f"Tokens/s on the first {len(prompts)} prompts, median of {args.rounds} "
              "interleaved rounds (after each prompt's first token):", "",
              "| way | tokens/s | vs mlx-lm plain | vs mlx-lm draft model |",
              "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {n} | {v:.1f} | {v / base:.2f}x | {v / dm:.2f}x |" for n, v in tps.items()]
    print("\n".join(lines))
    write_results("draft_confidence", args.tag, "\n".join(lines) + "\n",
                  dict(info=info, tau=taus, tokens_per_s=tps))  # fmt: skip


if __name__ == "__main__":
    main()

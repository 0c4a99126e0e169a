"""Draft-model chains cut where the draft model is unsure (``draft_confidence``,
transformers' ``assistant_confidence_threshold``) against fixed chains.

    cd benchmarks && ./with_openblas.sh python draft_confidence.py --tag cpu-openblas

The embedded draft model drafts for the embedded base (its streams off), float32, greedy,
on the default model's held-out prompts:

* per way: tokens per pass (tau), draft-model passes per generated token, and whether
  every output equals mlx-lm's greedy decoding;
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

import mlx_specstream.draft_model as draft_model_mod
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


def draft_passes(model, tok, texts, max_tokens: int, settings: dict) -> float:
    """The draft model's passes per generated token (its prompt prefill excluded)."""
    calls, real = [], draft_model_mod.DraftModel._step

    def counted(self, tokens):
        calls.append(1)
        return real(self, tokens)

    draft_model_mod.DraftModel._step = counted
    try:
        tokens = sum(len(list(spec_generate_step(mx.array(tok.encode(t)), model,
                                                 max_tokens=max_tokens, **settings)))
                     for t in texts)  # fmt: skip
    finally:
        draft_model_mod.DraftModel._step = real
    return len(calls) / tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--speed-prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    info = machine_info(max_tokens=args.max_tokens, rounds=args.rounds)
    model, tok = load(str(DEFAULT_DIR))
    model.set_dtype(mx.float32)
    plain, _ = mlx_lm.load(str(DEFAULT_DIR))
    plain.set_dtype(mx.float32)
    draft, _ = mlx_lm.load(str(DRAFT_DIR))
    draft.set_dtype(mx.float32)
    texts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]
    all_ways = ways(draft)
    taus = taus_against_mlx_lm(model, tok, plain, texts, args.max_tokens, all_ways)
    for name, settings in all_ways.items():
        taus[name]["draft_passes"] = draft_passes(model, tok, texts, args.max_tokens, settings)
    lines = [heading("Draft-model chains cut where the draft model is unsure", info), "",
             f"`{info['command']}`: the embedded draft model for the embedded base (streams "
             f"off), the default model's {len(texts)} held-out prompts, greedy, float32, "
             f"{args.max_tokens} tokens.", "",
             "| way | tau | draft passes per token | identical to mlx-lm |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {n} | {v['tau']:.3f} | {v['draft_passes']:.2f} | "
              f"{'yes' if v['identical'] else 'no'} |" for n, v in taus.items()]  # fmt: skip
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

"""A draft model's chains under transformers' heuristic schedule (``draft_schedule=
"heuristic"``: 2 longer after a step that accepted every draft, 1 shorter after one that
did not) against fixed chains, mlx-lm plain and mlx-lm's draft-model decoding.

    cd benchmarks && ./with_openblas.sh python draft_schedule.py --tag cpu-openblas
    cd benchmarks && python draft_schedule.py --tag cpu-stock

The embedded draft model drafts for the embedded base (its streams off), float32, greedy
(and ``--temp T`` sampled speeds), on the default model's held-out prompts:

* per way: tokens per pass (tau), drafts verified per pass, draft passes per generated
  token, and whether every greedy output equals mlx-lm's greedy decoding;
* tokens/s on the first ``--speed-prompts`` prompts: mlx-lm plain, mlx-lm's draft-model
  decoding (3 tokens, its default) and each way, the same weights in one run, rounds
  interleaved (median).

Writes ``benchmarks/results/draft_schedule[-TAG].{md,json}``.
"""

import argparse

from draft_confidence import counts, float32_models, tau_table
from dynamic_trees import speeds
from mtp_trained import taus_against_mlx_lm
from report import heading, machine_info, write_results

from mlx_specstream.default_model import DEFAULT_DIR


def ways(draft, chains=(2, 3, 4, 6), longest=(4, 6, 8)) -> dict:
    """Fixed chains, heuristic ones up to each of ``longest``, and the longest heuristic
    one cut at transformers' default confidence (0.4), as its assistant models run."""
    out = {f"chain of {n}": dict(draft_model=draft, num_draft_tokens=n) for n in chains}
    for n in longest:
        out[f"heuristic, up to {n}"] = dict(
            draft_model=draft, num_draft_tokens=n, draft_schedule="heuristic"
        )
    out[f"heuristic, up to {max(longest)}, confidence 0.4"] = dict(
        draft_model=draft, num_draft_tokens=max(longest), draft_schedule="heuristic",
        draft_confidence=0.4,
    )  # fmt: skip
    return out


def speed_table(tps: dict, title: str) -> list:
    base, dm = tps["mlx-lm plain"], tps["mlx-lm draft model (3)"]
    lines = ["", title, "", "| way | tokens/s | vs mlx-lm plain | vs mlx-lm draft model |",
             "|---|---|---|---|"]  # fmt: skip
    return lines + [f"| {n} | {v:.1f} | {v / base:.2f}x | {v / dm:.2f}x |" for n, v in tps.items()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--speed-prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--temp", type=float, default=0.0, help="also time sampling at this T")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    info = machine_info(max_tokens=args.max_tokens, rounds=args.rounds)
    model, tok, plain, draft, texts = float32_models(DEFAULT_DIR)
    all_ways = ways(draft)
    taus = taus_against_mlx_lm(model, tok, plain, texts, args.max_tokens, all_ways)
    for name, settings in all_ways.items():
        taus[name].update(counts(model, tok, texts, args.max_tokens, settings))
    lines = [heading("A draft model's chains under transformers' heuristic schedule", info), "",
             f"`{info['command']}`: the embedded draft model for the embedded base (streams "
             f"off), the default model's {len(texts)} held-out prompts, greedy, float32, "
             f"{args.max_tokens} tokens.", ""]  # fmt: skip
    lines += tau_table(taus)
    prompts = [tok.encode(t) for t in texts[: args.speed_prompts]]
    tps = {"greedy": speeds(model, plain, draft, prompts, args.max_tokens, all_ways, args.rounds)}
    lines += speed_table(tps["greedy"], f"Greedy tokens/s on the first {len(prompts)} prompts, "
                         f"median of {args.rounds} interleaved rounds (after each prompt's "
                         "first token):")  # fmt: skip
    if args.temp:
        key = f"T={args.temp}"
        tps[key] = speeds(model, plain, draft, prompts, args.max_tokens, all_ways, args.rounds,
                          temp=args.temp)  # fmt: skip
        lines += speed_table(tps[key], f"Sampled at T = {args.temp} (mlx-lm's sampler for "
                             "mlx-lm, ours for ours), tokens/s as above:")  # fmt: skip
    print("\n".join(lines))
    write_results("draft_schedule", args.tag, "\n".join(lines) + "\n",
                  dict(info=info, tau=taus, tokens_per_s=tps))  # fmt: skip


if __name__ == "__main__":
    main()

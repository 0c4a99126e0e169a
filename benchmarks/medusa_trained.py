"""Medusa-1 heads trained here on the shipped base, in the released checkpoints' layout: LM
heads of their own (Medusa-1's recipe) against the base's LM head for every head.

    cd benchmarks && ./with_openblas.sh python medusa_trained.py --work ../runs/medusa1 --tag cpu-openblas

No Medusa checkpoint can be downloaded here, so this trains heads for the shipped base (a
6.5M Llama), frozen, on the self-distilled stdlib windows ``eagle_trained.py`` uses, with
the package's loss (:class:`mlx_specstream.medusa_training.MedusaLoss`, what ``python -m
mlx_specstream.train --drafter medusa`` trains with): head ``j`` over the base's normed
state of row ``i`` predicts token ``i + j + 2``, weighted ``0.8 ** j``. Two sets at the same
budget: ``own`` (each head's LM head its own, started from the base's) and ``base``
(blocks only, ranked by the base's head). Each is written as FasterDecoding's code writes
heads (``medusa_lm_head.safetensors``: ``{j}.{l}.linear.*``, ``{j}.{L}.weight``) and read
back by ``load(base, drafter=DIR)``. Then, on the default model's held-out prompts,
greedy, float32: held-out top-1 per head and tau of chains and static trees, every output
checked against mlx-lm's; and ``mlx_specstream.benchmark`` with a chain of 3 against
mlx-lm's plain and draft-model decoding. Writes
``benchmarks/results/medusa_trained[-TAG].{md,json}``.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
from eagle1_trained import base, examples, top1
from mlx.utils import tree_flatten
from mtp_trained import benchmark_chain, fit, full, tau_table, taus_against_mlx_lm
from mtp_trained import windows
from report import heading, machine_info, write_results

from mlx_specstream import load
from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.medusa_training import MedusaLoss, attach_medusa_for_training


def train(model, rows, args, lm_heads: str):
    """Fresh heads (Medusa's first weights) trained with the package's loss, the base
    frozen; its last states of every window computed once (the loss reads them)."""
    drafter = attach_medusa_for_training(model, args.heads, lm_heads=lm_heads)
    model.freeze()
    loss = MedusaLoss(model)
    states_of = loss.features

    def loss_of(d, states, ids):  # (the package's loss over the base's states of the batch)
        loss.features = lambda _: states
        try:
            return loss(examples(ids.tolist()))[0]
        finally:
            del loss.features

    trained = fit(drafter, loss_of, states_of, rows, args.iters, args.batch_size,
                  args.learning_rate, log_every=50)  # fmt: skip
    return drafter, loss, trained


def write_checkpoint(out: Path, drafter) -> Path:
    """``out``: the heads as FasterDecoding's code writes them (``{j}.{l}.linear.*``, each
    head's LM head ``{j}.{L}.weight``), with its ``config.json``."""
    out.mkdir(parents=True, exist_ok=True)
    layers = len(drafter.heads[0])
    weights = {}
    for key, w in tree_flatten(drafter.parameters()):
        parts = key.split(".")
        if parts[0] == "heads":  # heads.j.l.linear.what
            weights[".".join(parts[1:])] = w
        else:  # lm_heads.j.weight
            weights[f"{parts[1]}.{layers}.weight"] = w
    mx.save_safetensors(str(out / "medusa_lm_head.safetensors"), weights)
    config = dict(medusa_num_heads=len(drafter.heads), medusa_num_layers=layers,
                  base_model_name_or_path=str(DEFAULT_DIR))  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def trees(heads: int) -> dict:
    out = {f"chain of {d}": dict(tree_top_k=1, tree_depth=d, max_tree_nodes=d + 1)
           for d in range(1, heads + 1)}  # fmt: skip
    out["top-2 x 4, 8 nodes"] = dict(tree_top_k=2, tree_depth=min(4, heads), max_tree_nodes=8)
    out["top-3, 16 nodes"] = dict(tree_top_k=3, max_tree_nodes=16)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/medusa1")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--lm-heads", default="own,base")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    work = Path(args.work).resolve()
    info = machine_info(**vars(args))
    model, tok = base()
    eagle = work.parent / "eagle"  # (eagle_trained.py's windows, where already distilled)
    rows = full(windows(eagle if eagle.exists() else work, model, tok, args.examples, "train"))
    held = full(windows(eagle if eagle.exists() else work, model, tok, 64, "eval"))
    texts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]
    plain, _ = base()
    lines = [heading("Medusa-1 heads trained here on the shipped base", info), "",
             f"`{info['command']}`: {args.heads} heads, one block each, trained {args.iters} "
             f"steps x {args.batch_size} self-distilled windows each way; held-out top-1 per "
             f"head (64 windows); tau on the default model's {len(texts)} held-out prompts, "
             f"greedy, float32, {args.max_tokens} tokens."]  # fmt: skip
    data = {}
    for lm_heads in args.lm_heads.split(","):
        model, _ = base()
        name = f"medusa-{lm_heads}-{args.heads}h-{args.iters}"
        weights = work / f"{name}.safetensors"
        if weights.exists():
            drafter = attach_medusa_for_training(model, args.heads, lm_heads=lm_heads)
            drafter.load_weights(str(weights))
            loss, trained = MedusaLoss(model), json.loads(weights.with_suffix(".json").read_text())
        else:
            work.mkdir(parents=True, exist_ok=True)
            drafter, loss, trained = train(model, rows, args, lm_heads)
            drafter.save_weights(str(weights))
            weights.with_suffix(".json").write_text(json.dumps(trained))
        acc = top1(loss, held)
        print(f"{lm_heads}: held-out top-1 per head {acc}", flush=True)
        ckpt = write_checkpoint(work / name, drafter)
        spec, tok = load(str(DEFAULT_DIR), drafter=str(ckpt))
        spec.set_dtype(mx.float32)
        taus = taus_against_mlx_lm(spec, tok, plain, texts, args.max_tokens, trees(args.heads))
        bench = {}
        if not args.skip_speed:
            from mlx_specstream.utils import save

            saved = work / f"{name}-model"
            if not saved.exists():
                _, _, config = load(str(DEFAULT_DIR), drafter=str(ckpt), return_config=True)
                save(saved, spec, tok, config={**config, "torch_dtype": "float32"},
                     extra_files=[DEFAULT_DIR / "prompts.jsonl"])  # fmt: skip
            bench = benchmark_chain(saved, work, name, 3, args.max_tokens)
        data[lm_heads] = dict(trained=trained, top1=acc, tau=taus, bench=bench)
        size = sum(v.size for _, v in tree_flatten(drafter.parameters()))
        each = " / ".join(f"{a:.3f}" for a in acc)
        lines += ["", f"### LM heads: {lm_heads} ({size:,} parameters; {trained['seconds']:.0f} "
                  f"s, last loss {trained['loss_last']:.3f})", "",
                  f"Held-out top-1 of heads 1-{args.heads}: {each}", ""]  # fmt: skip
        lines += tau_table(taus)
        if bench:
            lines += ["", f"`python {bench['command']}`:", "",
                      (work / "bench" / f"{name}.md").read_text()]  # fmt: skip
    write_results("medusa_trained", args.tag, "\n".join(lines) + "\n", dict(info=info, **data))


if __name__ == "__main__":
    main()

"""A DFlash drafter, trained here on the shipped base: what block drafting gives.

    benchmarks/with_openblas.sh python benchmarks/dflash_trained.py --work runs/eagle --tag cpu-openblas

No DFlash checkpoint for this base can be downloaded here, so this trains one for the
shipped base (a 6.5M Llama), frozen, on the self-distilled stdlib windows of
``mtp_trained.py`` (the base's own greedy continuations; the same cached windows as
``eagle_trained.py`` where ``--work`` is shared), with the package's block loss
(:class:`mlx_specstream.dflash_training.DFlashLoss`: blocks of the bonus token and masks
at anchors spread over each window's completion, levels weighted ``exp(-(j-1)/decay)``).

It is written as z-lab's code writes a checkpoint (``DFlashDraftModel``, safetensors,
``dflash_config``) and read back by ``load(base, drafter=DIR)``, as a user's download
would be. Then, on the default model's held-out prompts, greedy, float32: top-1 per
level on held-out windows; tau of chains and a tree, and whether every output equals
mlx-lm's; and ``mlx_specstream.benchmark``'s tokens/s against mlx-lm's plain and
draft-model decoding on the same weights (the embedded 2.4M draft model), in the same
run. Writes ``benchmarks/results/dflash_trained[-TAG].{md,json}``.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
from eagle_trained import base, measure_trained, prompts, saved_directory
from mlx.utils import tree_flatten
from mtp_trained import PROMPT, benchmark_chain, fit, full, result_lines, taus_against_mlx_lm
from mtp_trained import windows
from report import heading, machine_info, write_results

from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.dflash import DFlashDrafter
from mlx_specstream.dflash_training import DFlashLoss, attach_dflash_for_training, rarest_token


def examples(rows):
    return [{"input_ids": r, "prompt_len": PROMPT} for r in rows]


def train(model, rows, args):
    """The drafter (its first weights from the base's top layers), the base frozen."""
    mask = rarest_token(examples(rows), model.args.vocab_size)
    drafter = attach_dflash_for_training(model, args.layers, args.draft_layers, args.block_size,
                                         mask)  # fmt: skip
    model.freeze()
    loss = DFlashLoss(model, args.blocks)

    def loss_of(d, _, ids):  # (the package's loss: the base's features under stop_gradient)
        return loss(examples(ids.tolist()))[0]

    trained = fit(drafter, loss_of, lambda ids: ids, rows, args.iters, args.batch_size,
                  args.learning_rate, log_every=50)  # fmt: skip
    return drafter, trained, mask


def top1(model, rows, blocks: int) -> list:
    """Each level's top-1 on held-out windows (blocks at the loss's anchors)."""
    from mlx_specstream.train import _accuracy

    loss = DFlashLoss(model, blocks)
    acc = _accuracy(loss)
    for i in range(0, len(rows), 16):
        acc.add(loss(examples(rows[i : i + 16]))[1])
    return acc.top1()


def write_checkpoint(work: Path, drafter, model, mask: int) -> Path:
    """``work/dflash``: the drafter as z-lab's code writes one."""
    out = work / "dflash"
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(drafter.parameters())))
    s = drafter._settings
    config = {k: s[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "intermediate_size",
                                "rms_norm_eps", "rope_theta", "max_position_embeddings",
                                "layer_types")}  # fmt: skip
    config.update(
        architectures=["DFlashDraftModel"], model_type="qwen3", hidden_act="silu",
        vocab_size=model.args.vocab_size, attention_bias=False,
        num_target_layers=len(model.layers),
        dflash_config=dict(block_size=s["block_size"], mask_token_id=mask,
                           target_layer_ids=[i - 1 for i in drafter.feature_layers]),
    )  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def trees(levels: int) -> dict:
    """The chains and the tree whose tau is measured."""
    out = {f"chain of {d}": dict(tree_top_k=1, tree_depth=d, max_tree_nodes=d + 1)
           for d in range(1, levels + 1)}  # fmt: skip
    out["top-2 x 4, 8 nodes"] = dict(tree_top_k=2, tree_depth=4, max_tree_nodes=8)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/eagle")
    p.add_argument("--layers", default=None, help="target layer ids (default: DFlash's spread)")
    p.add_argument("--draft-layers", type=int, default=2)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--blocks", type=int, default=16, help="blocks per window")
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--bench-depth", type=int, default=4, help="the benchmark's tuned chain")
    p.add_argument("--skip-benchmark", action="store_true")
    p.add_argument(
        "--full-block",
        action="store_true",
        help="draft every mask of the trained block each step (DFlashDrafter.full_block), "
        "keeping the levels the tree asks for",
    )
    p.add_argument(
        "--trained",
        default=None,
        help="Measure instead the tau of a model directory written by python -m "
        "mlx_specstream.train --drafter dflash on the shipped base (nothing is trained)",
    )
    p.add_argument("--tag", default="")
    args = p.parse_args()
    DFlashDrafter.full_block = args.full_block
    if args.trained:
        measured = trees(args.block_size - 1)
        return measure_trained(Path(args.trained), args.max_tokens, args.tag, measured)
    args.layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, tok = base()
    info = machine_info(iters=args.iters, batch_size=args.batch_size, lr=args.learning_rate,
                        examples=args.examples, layers=args.layers, blocks=args.blocks,
                        block_size=args.block_size, draft_layers=args.draft_layers,
                        full_block=args.full_block)  # fmt: skip
    rows = full(windows(work, model, tok, args.examples, "train"))
    held = full(windows(work, model, tok, 64, "eval"))
    name = f"dflash-b{args.block_size}-l{args.draft_layers}-{args.iters}"
    name += "" if args.blocks == 16 else f"-k{args.blocks}"
    weights = work / f"{name}.safetensors"
    if weights.exists():
        trained = json.loads(weights.with_suffix(".json").read_text())
        drafter = attach_dflash_for_training(model, args.layers, args.draft_layers,
                                             args.block_size, trained["mask"])  # fmt: skip
        drafter.load_weights(str(weights))
        mask = trained["mask"]
    else:
        drafter, trained, mask = train(model, rows, args)
        trained["mask"] = mask
        drafter.save_weights(str(weights))
        weights.with_suffix(".json").write_text(json.dumps(trained))
    acc = top1(model, held, args.blocks)
    print(f"held-out top-1 per level: {acc}", flush=True)
    ckpt = write_checkpoint(work, drafter, model, mask)
    import mlx_lm

    from mlx_specstream import load

    spec, tok = load(str(DEFAULT_DIR), drafter=str(ckpt))
    spec.set_dtype(mx.float32)
    plain, _ = mlx_lm.load(str(DEFAULT_DIR))
    plain.set_dtype(mx.float32)
    taus = taus_against_mlx_lm(spec, tok, plain, prompts(), args.max_tokens,
                               trees(args.block_size - 1))  # fmt: skip
    bench = {}
    if not args.skip_benchmark:
        model_dir = saved_directory(work, ckpt)
        bench = benchmark_chain(model_dir, work, f"dflash{args.tag}", args.bench_depth,
                                args.max_tokens)  # fmt: skip
    ids = [i - 1 for i in drafter.feature_layers]
    lines = [heading("Trained DFlash drafter on the shipped base", info), ""]
    lines.append(f"`{info['command']}`: {args.draft_layers} draft layers reading the outputs of "
                 f"the base's layers {ids}, blocks of {args.block_size} (mask token {mask}), "
                 f"trained {args.iters} steps x {args.batch_size} self-distilled windows x "
                 f"{args.blocks} blocks ({trained['seconds']:.0f} s, last loss "
                 f"{trained['loss_last']:.3f}). Each step drafts "
                 + ("every mask of the block" if args.full_block else "as many masks as the "
                    "tree has levels") + ".")  # fmt: skip
    lines += result_lines("level", acc, taus, bench, work / "bench" / f"dflash{args.tag}.md")
    write_results("dflash_trained", args.tag, "\n".join(lines) + "\n",
                  dict(info=info, trained=trained, top1=acc, tau=taus, benchmark=bench))  # fmt: skip


if __name__ == "__main__":
    main()

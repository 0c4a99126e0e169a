"""An EAGLE-1 drafter, trained here on the shipped base: what EAGLE-2's drafting gives.

    cd benchmarks && ./with_openblas.sh python eagle1_trained.py --work ../runs/eagle --tag cpu-openblas

No EAGLE-1 checkpoint can be downloaded here, so this trains one for the shipped base (a
6.5M Llama), frozen, on the self-distilled stdlib windows ``eagle_trained.py`` uses, with
the package's EAGLE-1 loss (:class:`mlx_specstream.eagle1_training.Eagle1Loss`, what
``python -m mlx_specstream.train --drafter eagle`` trains with): row ``i`` (the base's
feature ``f_i``, its final norm's output, and the embedding of token ``i + 1``) predicts
the feature ``f_{i + 1}`` (smooth L1) and, through the base's LM head, token ``i + 2``
(cross-entropy, weight 0.1), the input features with uniform noise in ``[-0.1, 0.1]``;
``--ttt-steps K`` above 1 also trains levels 2..K on the drafter's own outputs. The layer
starts as a copy of the base's last layer (its input norm dropped), ``fc`` as ``[0, I]``.

It is written as EAGLE's code writes one (``fc``, ``layers.0.*``, a one-layer Llama
``config.json``) and read back by ``load(base, drafter=DIR)``. Then, on the default
model's held-out prompts, greedy, float32: held-out top-1 of each trained level, and tau
of chains of 1-4 levels and of trees, static and dynamic (EAGLE-2's), every output checked
against mlx-lm's. Writes ``benchmarks/results/eagle1_trained[-TAG].{md,json}``; the base
with the drafter, saved, goes to ``WORK/eagle1-model`` (``-kK`` for K above 1; for
``dynamic_trees.py``).
"""

import argparse
import itertools
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mtp_trained import PROMPT, fit, full, tau_table, taus_against_mlx_lm, windows
from report import heading, machine_info, write_results

from mlx_specstream import load
from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.eagle1_training import Eagle1Loss, attach_eagle1_for_training


def base():
    import mlx_lm

    model, tok = mlx_lm.load(str(DEFAULT_DIR))
    model.set_dtype(mx.float32)
    return model, tok


def examples(rows):
    return [{"input_ids": r, "prompt_len": PROMPT} for r in rows]


def train(model, rows, args):
    """The drafter (its first weights from the base's last layer), the base frozen; each
    iteration's noise drawn from its step, as ``train_streams`` draws it."""
    drafter = attach_eagle1_for_training(model)
    model.freeze()
    loss = Eagle1Loss(model, args.ttt_steps)
    steps = itertools.count()

    def loss_of(d, _, ids):  # (the package's loss: the base's features under stop_gradient)
        loss.train_step = next(steps)
        return loss(examples(ids.tolist()))[0]

    trained = fit(drafter, loss_of, lambda ids: ids, rows, args.iters, args.batch_size,
                  args.learning_rate, log_every=50)  # fmt: skip
    loss.train_step = None
    return drafter, loss, trained


def top1(loss, rows) -> list:
    """Each trained level's top-1 on held-out windows, from the last prompt token on."""
    from mlx_specstream.train import _accuracy

    acc = _accuracy(loss)
    for i in range(0, len(rows), 16):
        acc.add(loss(examples(rows[i : i + 16]))[1])
    return acc.top1()


def write_checkpoint(work: Path, drafter, model) -> Path:
    """``work/eagle1``: the drafter as EAGLE's code writes one (``layers.0.*``)."""
    out = work / "eagle1"
    out.mkdir(parents=True, exist_ok=True)
    weights = {("layers.0." + k[len("layer.") :] if k.startswith("layer.") else k): w
               for k, w in tree_flatten(drafter.parameters())}  # fmt: skip
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    a = model.args
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1,
                  hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
                  num_key_value_heads=a.num_key_value_heads, intermediate_size=a.intermediate_size,
                  rms_norm_eps=a.rms_norm_eps, rope_theta=a.rope_theta, hidden_act="silu",
                  vocab_size=a.vocab_size, max_position_embeddings=a.max_position_embeddings)  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def trees() -> dict:
    out = {f"chain of {d}": dict(tree_top_k=1, tree_depth=d, max_tree_nodes=d + 1)
           for d in (1, 2, 3, 4)}  # fmt: skip
    for k, depth, nodes in ((2, 4, 8), (4, 5, 16)):
        for dynamic in (False, True):
            name = f"top-{k} x {depth}, {nodes} nodes, {'dynamic' if dynamic else 'static'}"
            out[name] = dict(tree_top_k=k, tree_depth=depth, max_tree_nodes=nodes,
                             dynamic_tree=dynamic)  # fmt: skip
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/eagle")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--ttt-steps", type=int, default=1, help="levels trained (EAGLE-1's: 1)")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    work = Path(args.work).resolve()
    model, tok = base()
    info = machine_info(iters=args.iters, batch_size=args.batch_size, lr=args.learning_rate,
                        ttt_steps=args.ttt_steps, examples=args.examples)  # fmt: skip
    rows = full(windows(work, model, tok, args.examples, "train"))
    held = full(windows(work, model, tok, 64, "eval"))
    name = f"eagle1-loss-{args.iters}-k{args.ttt_steps}"
    weights = work / f"{name}.safetensors"
    if weights.exists():
        drafter = attach_eagle1_for_training(model)
        drafter.load_weights(str(weights))
        loss = Eagle1Loss(model, args.ttt_steps)
        trained = json.loads(weights.with_suffix(".json").read_text())
    else:
        drafter, loss, trained = train(model, rows, args)
        drafter.save_weights(str(weights))
        weights.with_suffix(".json").write_text(json.dumps(trained))
    acc = top1(loss, held)
    print(f"held-out top-1 of levels 1-{args.ttt_steps}: {acc}", flush=True)
    ckpt = write_checkpoint(work, drafter, model)
    spec, tok = load(str(DEFAULT_DIR), drafter=str(ckpt))
    spec.set_dtype(mx.float32)
    plain, _ = base()
    texts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]
    taus = taus_against_mlx_lm(spec, tok, plain, texts, args.max_tokens, trees())
    suffix = "" if args.ttt_steps == 1 else f"-k{args.ttt_steps}"
    saved = work / f"eagle1-model{suffix}"
    shutil.rmtree(saved, ignore_errors=True)  # (this script's own, from a former run)
    from mlx_specstream.utils import save

    _, _, config = load(str(DEFAULT_DIR), drafter=str(ckpt), return_config=True)
    save(saved, spec, tok, config={**config, "torch_dtype": "float32"},
         extra_files=[DEFAULT_DIR / "prompts.jsonl"])  # fmt: skip
    each = " / ".join(f"{a:.3f}" for a in acc)
    lines = [heading("Trained EAGLE-1 drafter on the shipped base", info), "",
             f"`{info['command']}`: trained {args.iters} steps x {args.batch_size} "
             f"self-distilled windows, {args.ttt_steps} level(s) ({trained['seconds']:.0f} s, "
             f"last loss {trained['loss_last']:.3f}); held-out top-1 of levels 1-"
             f"{args.ttt_steps} (64 windows): {each}. tau on the default model's {len(texts)} "
             f"held-out prompts, greedy, float32, {args.max_tokens} tokens:", ""]  # fmt: skip
    lines += tau_table(taus)
    write_results("eagle1_trained", args.tag, "\n".join(lines) + "\n",
                  dict(info=info, trained=trained, top1=acc, tau=taus))  # fmt: skip


if __name__ == "__main__":
    main()

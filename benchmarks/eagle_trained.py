"""An EAGLE-3 drafter, trained here on the shipped base: what EAGLE-3 drafting gives.

    benchmarks/with_openblas.sh python benchmarks/eagle_trained.py --work runs/eagle --tag cpu-openblas

No EAGLE-3 checkpoint can be downloaded here, so this trains one for the shipped base
(a 6.5M Llama), frozen, on self-distilled stdlib windows (the base's own greedy
continuations, as ``mtp_trained.py`` makes them), with EAGLE-3's "training-time test"
(:mod:`mlx_specstream.eagle_training`: its ``ttt_logits`` and first weights; here over
whole windows in batches, every row supervised).

It is written as an EAGLE checkpoint (``LlamaForCausalLMEagle3``, safetensors) and read
back by ``load(base, drafter=DIR)``, as a user's download would be. Then, on the
default model's held-out prompts, greedy, float32: top-1 per step on held-out windows;
tau of chains of 1-4 levels and a tree, and whether every output equals mlx-lm's; and
``mlx_specstream.benchmark``'s tokens/s against mlx-lm's plain and draft-model decoding
on the same weights (the embedded 2.4M draft model), in the same run. Writes
``benchmarks/results/eagle_trained[-TAG].{md,json}``.
"""

import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mtp_trained import benchmark_chain, fit, full, result_lines, tau_table, taus_against_mlx_lm
from mtp_trained import windows
from report import heading, machine_info, write_results

from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.eagle_training import STEP_WEIGHT, attach_eagle_for_training, eagle_settings_for
from mlx_specstream.eagle_training import drafter_features, ttt_logits
from mlx_specstream.streams import get_runtime


def base():
    """The shipped base (float32, without its streams) and its tokenizer."""
    import mlx_lm

    model, tok = mlx_lm.load(str(DEFAULT_DIR))
    model.set_dtype(mx.float32)
    return model, tok


def weighted_loss(drafter, model, feats, ids, steps: int):
    """EAGLE-3's training-time test loss over whole windows (every row), weighted
    ``0.8 ** k`` per step, and each step's logits (the package's ``ttt_logits``)."""
    logits = ttt_logits(drafter, get_runtime(model), feats, ids, steps)
    n = logits[0].shape[1]
    losses = [STEP_WEIGHT**k * nn.losses.cross_entropy(z, ids[:, k + 2 : k + 2 + n], reduction="mean")
              for k, z in enumerate(logits)]  # fmt: skip
    return sum(losses), logits


def train(model, rows, layers, iters: int, batch: int, lr: float, steps: int, num_layers=1):
    drafter = attach_eagle_for_training(model, layers, num_layers=num_layers)
    model.freeze()
    trained = fit(drafter, lambda d, f, ids: weighted_loss(d, model, f, ids, steps)[0],
                  lambda ids: drafter_features(model, ids), rows, iters, batch, lr, log_every=50)  # fmt: skip
    return drafter, trained


def top1(drafter, model, rows, steps: int) -> list:
    """Each step's top-1 on held-out windows' continuations (step k: token i + k + 2)."""
    ids = mx.array(rows)
    _, logits = weighted_loss(drafter, model, drafter_features(model, ids), ids, steps)
    n = logits[0].shape[1]
    hits = [(mx.argmax(lg, axis=-1) == ids[:, k + 2 : k + 2 + n])[:, 32:]
            for k, lg in enumerate(logits)]  # fmt: skip
    return [h.astype(mx.float32).mean().item() for h in hits]


def write_checkpoint(work: Path, drafter, model) -> Path:
    """``work/eagle3`` (``eagle3-{n}layers``): the drafter as EAGLE's code writes one (``midlayer.*``, ``d2t``), or
    one of several layers as the speculators write it (``layers.{i}.*``,
    ``transformer_layer_config``)."""
    n = 1 + len(drafter.upper)
    out = work / ("eagle3" if n == 1 else f"eagle3-{n}layers")
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for k, w in tree_flatten(drafter.parameters()):
        if k.startswith("layer."):
            k = ("midlayer." if n == 1 else "layers.0.") + k[len("layer.") :]
        elif k.startswith("upper."):
            i, rest = k[len("upper.") :].split(".", 1)
            k = f"layers.{int(i) + 1}.{rest}"
        weights[k] = w
    weights["d2t"] = weights["d2t"].astype(mx.int64)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    e = eagle_settings_for(model, drafter.feature_layers, model.args.vocab_size)
    layer = {k: e[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                               "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta",
                               "max_position_embeddings")}  # fmt: skip
    layer.update(num_hidden_layers=n, vocab_size=model.args.vocab_size, hidden_act="silu")
    config = dict(draft_vocab_size=e["draft_vocab_size"],
                  eagle_aux_hidden_state_layer_ids=drafter.feature_layers)  # fmt: skip
    if n == 1:
        config.update(architectures=["LlamaForCausalLMEagle3"], **layer)
    else:
        config.update(architectures=["Eagle3Speculator"], speculators_model_type="eagle3",
                      transformer_layer_config={**layer, "model_type": "llama"})  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def tau_and_identity(ckpt: Path, prompts, max_tokens: int, trees: dict) -> dict:
    """Greedy tau per tree on ``prompts`` with the checkpoint read back by ``load``, and
    whether each output equals mlx-lm's."""
    import mlx_lm

    from mlx_specstream import load

    model, tok = load(str(DEFAULT_DIR), drafter=str(ckpt))
    model.set_dtype(mx.float32)
    plain, _ = mlx_lm.load(str(DEFAULT_DIR))
    plain.set_dtype(mx.float32)
    return taus_against_mlx_lm(model, tok, plain, prompts, max_tokens, trees)


def saved_directory(work: Path, ckpt: Path) -> Path:
    """``work/model``: the shipped base with the drafter, as ``save`` writes it (float32)."""
    from mlx_specstream import load
    from mlx_specstream.utils import save

    model, tok, config = load(str(DEFAULT_DIR), drafter=str(ckpt), return_config=True)
    model.set_dtype(mx.float32)
    shutil.rmtree(work / "model", ignore_errors=True)  # (this script's own, from a former run)
    save(work / "model", model, tok, config={**config, "torch_dtype": "float32"},
         extra_files=[DEFAULT_DIR / "prompts.jsonl"])  # fmt: skip
    return work / "model"


def trees() -> dict:
    """The chains and the tree whose tau is measured."""
    out = {f"chain of {d}": dict(tree_top_k=1, tree_depth=d, max_tree_nodes=d + 1)
           for d in (1, 2, 3, 4)}  # fmt: skip
    out["top-2 x 4, 8 nodes"] = dict(tree_top_k=2, tree_depth=4, max_tree_nodes=8)
    return out


def measure_trained(model_dir: Path, max_tokens: int, tag: str, measured=None) -> None:
    """``--trained DIR``: tau of the directory's drafter (EAGLE-3's, EAGLE-1's or DFlash's) on the
    default model's held-out prompts over the trees ``measured`` (default :func:`trees`),
    each output checked against mlx-lm's; written as ``eagle_trained-TAG``,
    ``eagle1_trained-TAG`` or ``dflash_trained-TAG``."""
    import mlx_lm

    from mlx_specstream import load

    kind = json.loads((model_dir / "config.json").read_text())["drafter"]["kind"]
    name, file = {"eagle3": ("EAGLE-3", "eagle_trained"), "dflash": ("DFlash", "dflash_trained"),
                  "eagle": ("EAGLE-1", "eagle1_trained")}[kind]  # fmt: skip
    info = machine_info(trained=str(model_dir))
    model, tok = load(str(model_dir))
    model.set_dtype(mx.float32)
    plain, _ = mlx_lm.load(str(DEFAULT_DIR))
    plain.set_dtype(mx.float32)
    taus = taus_against_mlx_lm(model, tok, plain, prompts(), max_tokens, measured or trees())
    lines = [heading(f"{name} drafter trained by mlx_specstream.train", info), "",
             f"`{info['command']}`: the drafter in `{model_dir}`, on the default model's "
             "held-out prompts, greedy, float32.", ""]  # fmt: skip
    lines += tau_table(taus)
    write_results(file, tag, "\n".join(lines) + "\n", dict(info=info, tau=taus))


def prompts() -> list:
    return [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/eagle")
    p.add_argument("--layers", default="2,4,6", help="the base's layers whose inputs it reads")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--num-layers", type=int, default=1, help="the drafter's decoder layers")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--bench-depth", type=int, default=3, help="the benchmark's tuned chain")
    p.add_argument("--skip-benchmark", action="store_true")
    p.add_argument(
        "--trained",
        default=None,
        help="Measure instead the tau of a model directory written by python -m "
        "mlx_specstream.train --drafter eagle3 on the shipped base (nothing is trained)",
    )
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if args.trained:
        return measure_trained(Path(args.trained), args.max_tokens, args.tag)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    layers = [int(x) for x in args.layers.split(",")]
    model, tok = base()
    info = machine_info(iters=args.iters, batch_size=args.batch_size, lr=args.learning_rate,
                        examples=args.examples, layers=layers, ttt_steps=args.ttt_steps,
                        num_layers=args.num_layers)  # fmt: skip
    rows = full(windows(work, model, tok, args.examples, "train"))
    held = full(windows(work, model, tok, 64, "eval"))
    suffix = "" if args.num_layers == 1 else f"-{args.num_layers}layers"
    weights = work / f"eagle3-{args.iters}{suffix}.safetensors"
    if weights.exists():
        drafter = attach_eagle_for_training(model, layers, num_layers=args.num_layers)
        drafter.load_weights(str(weights))
        trained = json.loads(weights.with_suffix(".json").read_text())
    else:
        drafter, trained = train(model, rows, layers, args.iters, args.batch_size,
                                 args.learning_rate, args.ttt_steps, args.num_layers)  # fmt: skip
        drafter.save_weights(str(weights))
        weights.with_suffix(".json").write_text(json.dumps(trained))
    acc = top1(drafter, model, held, 4)
    print(f"held-out top-1 per step (token i + k + 2): {acc}", flush=True)
    ckpt = write_checkpoint(work, drafter, model)
    taus = tau_and_identity(ckpt, prompts(), args.max_tokens, trees())
    bench = {}
    if not args.skip_benchmark:
        model_dir = saved_directory(work, ckpt)
        bench = benchmark_chain(model_dir, work, f"eagle{args.tag}", args.bench_depth,
                                args.max_tokens)  # fmt: skip
    lines = [heading("Trained EAGLE-3 drafter on the shipped base", info), ""]
    lines.append(f"`{info['command']}`: a drafter of {args.num_layers} layer(s) reading the "
                 "inputs of the base's layers "
                 f"{layers} (6: its last output), trained {args.iters} steps x "
                 f"{args.batch_size} self-distilled windows, {args.ttt_steps} training-time-test "
                 f"steps ({trained['seconds']:.0f} s, last loss {trained['loss_last']:.3f}).")  # fmt: skip
    lines += result_lines("level", acc, taus, bench, work / "bench" / f"eagle{args.tag}.md")
    write_results("eagle_trained", args.tag, "\n".join(lines) + "\n",
                  dict(info=info, trained=trained, top1=acc, tau=taus, benchmark=bench))  # fmt: skip


if __name__ == "__main__":
    main()

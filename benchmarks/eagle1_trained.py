"""An EAGLE-1 drafter, trained here on the shipped base: what EAGLE-2's drafting gives.

    cd benchmarks && ./with_openblas.sh python eagle1_trained.py --work ../runs/eagle --tag cpu-openblas

No EAGLE-1 checkpoint can be downloaded here, so this trains one for the shipped base (a
6.5M Llama), frozen, on the self-distilled stdlib windows ``eagle_trained.py`` uses, with
EAGLE-1's loss: row ``i`` (the base's feature ``f_i``, its final norm's output, and the
embedding of token ``i + 1``) predicts the feature ``f_{i + 1}`` (smooth L1) and, through
the base's LM head, token ``i + 2`` (cross-entropy, weight 0.1); the input features get
uniform noise in ``[-0.1, 0.1]``, as EAGLE trains (so deeper levels, run on the
drafter's own predictions, stay close). The layer starts as a copy of the base's last
layer (its input norm dropped), ``fc`` as ``[0, I]`` (the feature alone).

It is written as EAGLE's code writes one (``fc``, ``layers.0.*``, a one-layer Llama
``config.json``) and read back by ``load(base, drafter=DIR)``. Then, on the default
model's held-out prompts, greedy, float32: held-out top-1 of the first level, and tau of
chains of 1-4 levels and of trees, static and dynamic (EAGLE-2's), every output checked
against mlx-lm's. Writes ``benchmarks/results/eagle1_trained[-TAG].{md,json}``; the base
with the drafter, saved, goes to ``WORK/eagle1-model`` (for ``dynamic_trees.py``).
"""

import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mtp_trained import fit, full, tau_table, taus_against_mlx_lm, windows
from report import heading, machine_info, write_results

from mlx_specstream import load
from mlx_specstream.config import DrafterConfig
from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.eagle1 import EAGLE1_DEFAULTS, Eagle1Drafter
from mlx_specstream.mtp import _lm_head

CLS_WEIGHT, NOISE = 0.1, 0.1


def base():
    import mlx_lm

    model, tok = mlx_lm.load(str(DEFAULT_DIR))
    model.set_dtype(mx.float32)
    return model, tok


def new_drafter(model) -> Eagle1Drafter:
    """A drafter of the base's shape: its last layer copied (no input norm), ``fc`` taking
    the feature alone."""
    a = model.args
    settings = dict(hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
                    num_key_value_heads=a.num_key_value_heads, head_dim=None,
                    intermediate_size=a.intermediate_size, rms_norm_eps=a.rms_norm_eps,
                    rope_theta=a.rope_theta, rope_scaling=None,
                    max_position_embeddings=a.max_position_embeddings, fc_bias=True,
                    own_embeddings=False)  # fmt: skip
    drafter = Eagle1Drafter(DrafterConfig(kind="eagle", eagle=settings, **EAGLE1_DEFAULTS), model)
    last = dict(tree_flatten(model.model.layers[-1].parameters()))
    drafter.layer.load_weights([(k, v) for k, v in last.items() if "input_layernorm" not in k])
    D = a.hidden_size
    drafter.fc.weight = mx.concatenate([mx.zeros((D, D)), mx.eye(D)], axis=1)
    drafter.fc.bias = mx.zeros((D,))
    return drafter


def predict(drafter, model, feats, ids):
    """The drafter's outputs over whole windows: row ``i`` pairs ``feats[:, i]`` with the
    embedding of token ``i + 1``, causal."""
    n = ids.shape[1] - 1
    e = model.model.embed_tokens(ids[:, 1:])
    x = drafter.fc(mx.concatenate([e, feats[:, :n]], axis=-1))
    return drafter.layer(x, "causal", None)


def eagle1_loss(drafter, model, feats, ids, noise=True):
    """EAGLE-1's loss and the first level's logits."""
    if noise:
        feats = feats + mx.random.uniform(-NOISE, NOISE, feats.shape)
    out = predict(drafter, model, feats, ids)[:, :-1]  # (rows with a next feature)
    target = mx.stop_gradient(feats[:, 1 : out.shape[1] + 1])
    reg = nn.losses.smooth_l1_loss(out, target, reduction="mean")
    logits = _lm_head(model)(out)
    cls = nn.losses.cross_entropy(logits, ids[:, 2:], reduction="mean")
    return reg + CLS_WEIGHT * cls, logits


def features(model, ids):
    """The base's features: its last state after the final norm (mlx-lm's ``model.model``)."""
    return model.model(ids)


def top1(drafter, model, rows) -> float:
    ids = mx.array(rows)
    _, logits = eagle1_loss(drafter, model, features(model, ids), ids, noise=False)
    hits = (mx.argmax(logits, axis=-1) == ids[:, 2:])[:, 32:]
    return hits.astype(mx.float32).mean().item()


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
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    work = Path(args.work).resolve()
    model, tok = base()
    info = machine_info(iters=args.iters, batch_size=args.batch_size, lr=args.learning_rate,
                        examples=args.examples)  # fmt: skip
    rows = full(windows(work, model, tok, args.examples, "train"))
    held = full(windows(work, model, tok, 64, "eval"))
    weights = work / f"eagle1-{args.iters}.safetensors"
    drafter = new_drafter(model)
    if weights.exists():
        drafter.load_weights(str(weights))
        trained = json.loads(weights.with_suffix(".json").read_text())
    else:
        model.freeze()
        trained = fit(drafter, lambda d, f, ids: eagle1_loss(d, model, f, ids)[0],
                      lambda ids: features(model, ids), rows, args.iters, args.batch_size,
                      args.learning_rate, log_every=50)  # fmt: skip
        drafter.save_weights(str(weights))
        weights.with_suffix(".json").write_text(json.dumps(trained))
    acc = top1(drafter, model, held)
    print(f"held-out top-1 of level 1: {acc:.3f}", flush=True)
    ckpt = write_checkpoint(work, drafter, model)
    spec, tok = load(str(DEFAULT_DIR), drafter=str(ckpt))
    spec.set_dtype(mx.float32)
    plain, _ = base()
    texts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]
    taus = taus_against_mlx_lm(spec, tok, plain, texts, args.max_tokens, trees())
    saved = work / "eagle1-model"
    shutil.rmtree(saved, ignore_errors=True)  # (this script's own, from a former run)
    from mlx_specstream.utils import save

    _, _, config = load(str(DEFAULT_DIR), drafter=str(ckpt), return_config=True)
    save(saved, spec, tok, config={**config, "torch_dtype": "float32"},
         extra_files=[DEFAULT_DIR / "prompts.jsonl"])  # fmt: skip
    lines = [heading("Trained EAGLE-1 drafter on the shipped base", info), "",
             f"`{info['command']}`: trained {args.iters} steps x {args.batch_size} "
             f"self-distilled windows ({trained['seconds']:.0f} s, last loss "
             f"{trained['loss_last']:.3f}); held-out top-1 of level 1 (64 windows): {acc:.3f}. "
             f"tau on the default model's {len(texts)} held-out prompts, greedy, float32, "
             f"{args.max_tokens} tokens:", ""]  # fmt: skip
    lines += tau_table(taus)
    write_results("eagle1_trained", args.tag, "\n".join(lines) + "\n",
                  dict(info=info, trained=trained, top1=acc, tau=taus))  # fmt: skip


if __name__ == "__main__":
    main()

"""An EAGLE-3 drafter, trained here on the shipped base: what EAGLE-3 drafting gives.

    benchmarks/with_openblas.sh python benchmarks/eagle_trained.py --work runs/eagle --tag cpu-openblas

No EAGLE-3 checkpoint can be downloaded here, so this trains one for the shipped base
(a 6.5M Llama), frozen, on self-distilled stdlib windows (the base's own greedy
continuations, as ``mtp_trained.py`` makes them), with EAGLE-3's "training-time test":
step 0's row ``i`` reads the base's fused features of token ``i`` and token ``i + 1``'s
embedding and learns token ``i + 2``; step ``k``'s row ``i`` reads step ``k - 1``'s
output at ``i`` and token ``i + k + 1``, learns token ``i + k + 2``, sits at position
``i + k`` and attends to step 0's rows up to ``i`` and to its own earlier steps at ``i``,
as the drafter's deeper levels do when it drafts. Losses weighted ``0.8 ** k``. The
drafter starts with the base's final norm and LM head and its last layer's MLP.

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
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mtp_trained import full, windows
from report import heading, machine_info, write_results

from mlx_specstream.config import DrafterConfig
from mlx_specstream.default_model import DEFAULT_DIR, DRAFT_DIR
from mlx_specstream.eagle import EAGLE_DEFAULTS, Eagle3Drafter


def base(work: Path):
    """The shipped base (float32, without its streams) and its tokenizer."""
    import mlx_lm

    model, tok = mlx_lm.load(str(DEFAULT_DIR))
    model.set_dtype(mx.float32)
    return model, tok


def features(model, ids: mx.array, layers) -> mx.array:
    """``(B, L, 3 D)``: the inputs of the base's ``layers`` (``N``: its last output)."""
    h, inputs = model.model.embed_tokens(ids), []
    for layer in model.model.layers:
        inputs.append(h)
        h = layer(h, "causal", None)
    inputs.append(h)
    return mx.concatenate([inputs[i] for i in layers], axis=-1)


def settings(model, layers) -> dict:
    """The drafter section's ``eagle`` settings: a layer as wide as the base's."""
    a = model.args
    return dict(
        hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim,
        intermediate_size=a.intermediate_size, rms_norm_eps=a.rms_norm_eps,
        rope_theta=a.rope_theta, rope_scaling=None, max_position_embeddings=2048,
        attention_bias=False, mlp_bias=False, draft_vocab_size=a.vocab_size,
        target_hidden_size=a.hidden_size, norm_before_residual=False,
        feature_layers=list(layers), own_embeddings=False,
    )  # fmt: skip


def new_drafter(model, layers) -> Eagle3Drafter:
    config = DrafterConfig(kind="eagle3", eagle=settings(model, layers), **EAGLE_DEFAULTS)
    drafter = Eagle3Drafter(config, model)
    drafter.layer.mlp.update(model.model.layers[-1].mlp.parameters())
    drafter.layer.self_attn.o_proj.update(model.model.layers[-1].self_attn.o_proj.parameters())
    drafter.norm.update(model.model.norm.parameters())
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    drafter.lm_head.weight = mx.array(head.weight)
    D = model.args.hidden_size
    drafter.fc.weight = mx.concatenate([mx.eye(D)] * 3, axis=1) / 3  # (features averaged)
    return drafter


def ttt_loss(drafter, model, feats, ids, steps: int):
    """EAGLE-3's training-time test over ``steps`` (see the module's docstring). Returns
    the weighted loss and each step's logits."""
    layer, attn = drafter.layer, drafter.layer.self_attn
    B, L = ids.shape
    n = L - steps - 1  # (rows i whose every step has its target)
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    h = drafter.fc(feats[:, :n])
    causal = mx.tril(mx.ones((n, n), dtype=mx.bool_))
    keys, values, losses, logits = [], [], [], []
    for k in range(steps):
        e = model.model.embed_tokens(ids[:, k + 1 : k + 1 + n])
        hn = layer.hidden_norm(h)
        x = mx.concatenate([layer.input_layernorm(e), hn], axis=-1)

        def heads(proj, count, rope=True):
            y = proj(x).reshape(B, n, count, hd).transpose(0, 2, 1, 3)
            y = attn.rope(y, offset=k) if rope else y
            return mx.repeat(y, H // count, axis=1)

        q = heads(attn.q_proj, H)
        keys.append(heads(attn.k_proj, KV))
        values.append(heads(attn.v_proj, KV, rope=False))
        first = mx.where(causal, (q @ keys[0].transpose(0, 1, 3, 2)) * attn.scale, -mx.inf)
        own = [(q * kk).sum(-1, keepdims=True) * attn.scale for kk in keys[1:]]
        p = mx.softmax(mx.concatenate([first] + own, axis=-1), axis=-1)
        out = p[..., :n] @ values[0]
        for m, vv in enumerate(values[1:]):
            out = out + p[..., n + m : n + m + 1] * vv
        a = h + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, n, H * hd))
        h = a + layer.mlp(layer.post_attention_layernorm(a))
        logits.append(drafter.lm_head(drafter.norm(h)))
        target = ids[:, k + 2 : k + 2 + n]
        losses.append(0.8**k * nn.losses.cross_entropy(logits[-1], target, reduction="mean"))
    return sum(losses), logits


def check_against_drafting(drafter, model, feats, ids) -> float:
    """The largest gap between step 0's and 1's logits here and the drafter's own
    (its ``step`` on a cache, then ``recur`` on its output): one forward, two ways."""
    from mlx_lm.models.cache import KVCache

    class Runtime:  # (what the drafter reads of the runtime: the base's embeddings)
        embed = staticmethod(model.model.embed_tokens)

    _, logits = ttt_loss(drafter, model, feats[:1], ids[:1], 2)
    n, i = logits[0].shape[1], 40
    cache = KVCache()
    out = drafter.step(Runtime, feats[0, : i + 1], ids[0, 1 : i + 2], cache)[-1:]
    first = drafter.lm_head(drafter.norm(out))
    out = drafter.recur(Runtime, out, ids[0, i + 2 : i + 3], cache)
    second = drafter.lm_head(drafter.norm(out))
    assert i < n
    return max(
        mx.abs(first[0] - logits[0][0, i]).max().item(),
        mx.abs(second[0] - logits[1][0, i]).max().item(),
    )


def train(model, rows, layers, iters: int, batch: int, lr: float, steps: int):
    drafter = new_drafter(model, layers)
    model.freeze()
    opt = optim.AdamW(learning_rate=optim.cosine_decay(lr, iters), weight_decay=0.0)
    grad = nn.value_and_grad(drafter, lambda d, f, ids: ttt_loss(d, model, f, ids, steps)[0])
    data = mx.array(rows)
    t0 = time.perf_counter()
    feats = []  # the frozen base's features of every window, once
    for i in range(0, len(rows), 64):
        feats.append(features(model, data[i : i + 64], layers))
        mx.eval(feats[-1])
    feats = mx.concatenate(feats)
    rng = np.random.default_rng(0)
    losses = []
    for it in range(iters):
        pick = mx.array(rng.choice(len(rows), batch, replace=False))
        loss, g = grad(drafter, feats[pick], data[pick])
        opt.update(drafter, g)
        mx.eval(drafter.parameters(), opt.state, loss)
        losses.append(loss.item())
        if (it + 1) % 50 == 0:
            rate = (time.perf_counter() - t0) / (it + 1)
            print(
                f"iter {it + 1}: loss {np.mean(losses[-50:]):.3f} ({rate:.2f} s/iter)", flush=True
            )
    gap = check_against_drafting(drafter, model, feats[:1], data[:1])
    return drafter, dict(seconds=time.perf_counter() - t0, loss_last=float(np.mean(losses[-50:])),
                         drafting_gap=gap)  # fmt: skip


def top1(drafter, model, rows, layers, steps: int) -> list:
    """Each step's top-1 on held-out windows' continuations (step k: token i + k + 2)."""
    ids = mx.array(rows)
    _, logits = ttt_loss(drafter, model, features(model, ids, layers), ids, steps)
    n = logits[0].shape[1]
    hits = [(mx.argmax(lg, axis=-1) == ids[:, k + 2 : k + 2 + n])[:, 32:]
            for k, lg in enumerate(logits)]  # fmt: skip
    return [h.astype(mx.float32).mean().item() for h in hits]


def write_checkpoint(work: Path, drafter, model) -> Path:
    """``work/eagle3``: the drafter as EAGLE's code writes one (``midlayer.*``, ``d2t``)."""
    out = work / "eagle3"
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for k, w in tree_flatten(drafter.parameters()):
        weights[k.replace("layer.", "midlayer.", 1) if k.startswith("layer.") else k] = w
    weights["d2t"] = weights["d2t"].astype(mx.int64)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    e = settings(model, drafter.feature_layers)
    config = {k: e[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta",
                                "draft_vocab_size", "max_position_embeddings")}  # fmt: skip
    config.update(architectures=["LlamaForCausalLMEagle3"], num_hidden_layers=1,
                  vocab_size=model.args.vocab_size, hidden_act="silu",
                  eagle_aux_hidden_state_layer_ids=drafter.feature_layers)  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def tau_and_identity(ckpt: Path, prompts, max_tokens: int, trees: dict) -> dict:
    """Greedy tau per tree on ``prompts`` with the checkpoint read back by ``load``, and
    whether each output equals mlx-lm's."""
    import mlx_lm
    from mlx_lm.generate import generate_step

    from mlx_specstream import load
    from mlx_specstream.decode import spec_generate_step

    model, tok = load(str(DEFAULT_DIR), drafter=str(ckpt))
    model.set_dtype(mx.float32)
    plain, _ = mlx_lm.load(str(DEFAULT_DIR))
    plain.set_dtype(mx.float32)
    want = []
    for p in prompts:
        steps = generate_step(mx.array(tok.encode(p)), plain, max_tokens=max_tokens)
        want.append([t for t, _ in steps])
    out = {}
    for name, tree in trees.items():
        tokens = passes = 0
        same = True
        for p, w in zip(prompts, want):
            got = list(spec_generate_step(mx.array(tok.encode(p)), model, max_tokens=max_tokens,
                                          **tree))  # fmt: skip
            same &= [g[0] for g in got] == w
            tokens, passes = tokens + len(got), passes + got[-1][3]
        out[name] = dict(tau=tokens / passes, identical=bool(same))
        print(f"{name}: tau {tokens / passes:.3f}, identical {same}", flush=True)
    return out


def saved_directory(work: Path, ckpt: Path) -> Path:
    """``work/model``: the shipped base with the drafter, as ``save`` writes it (float32)."""
    from mlx_specstream import load
    from mlx_specstream.utils import save

    model, tok, config = load(str(DEFAULT_DIR), drafter=str(ckpt), return_config=True)
    model.set_dtype(mx.float32)
    save(work / "model", model, tok, config={**config, "torch_dtype": "float32"})
    return work / "model"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/eagle")
    p.add_argument("--layers", default="2,4,6", help="the base's layers whose inputs it reads")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--bench-depth", type=int, default=3, help="the benchmark's tuned chain")
    p.add_argument("--skip-benchmark", action="store_true")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    layers = [int(x) for x in args.layers.split(",")]
    model, tok = base(work)
    info = machine_info(iters=args.iters, batch_size=args.batch_size, lr=args.learning_rate,
                        examples=args.examples, layers=layers, ttt_steps=args.ttt_steps)  # fmt: skip
    rows = full(windows(work, model, tok, args.examples, "train"))
    held = full(windows(work, model, tok, 64, "eval"))
    weights = work / f"eagle3-{args.iters}.safetensors"
    if weights.exists():
        drafter = new_drafter(model, layers)
        drafter.load_weights(str(weights))
        trained = json.loads(weights.with_suffix(".json").read_text())
    else:
        drafter, trained = train(model, rows, layers, args.iters, args.batch_size,
                                 args.learning_rate, args.ttt_steps)  # fmt: skip
        drafter.save_weights(str(weights))
        weights.with_suffix(".json").write_text(json.dumps(trained))
    print(f"training and drafting logits differ by {trained['drafting_gap']:.1e}", flush=True)
    acc = top1(drafter, model, held, layers, 4)
    print(f"held-out top-1 per step (token i + k + 2): {acc}", flush=True)
    ckpt = write_checkpoint(work, drafter, model)
    prompts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]
    trees = {f"chain of {d}": dict(tree_top_k=1, tree_depth=d, max_tree_nodes=d + 1)
             for d in (1, 2, 3, 4)}  # fmt: skip
    trees["top-2 x 4, 8 nodes"] = dict(tree_top_k=2, tree_depth=4, max_tree_nodes=8)
    taus = tau_and_identity(ckpt, prompts, args.max_tokens, trees)
    bench = {}
    if not args.skip_benchmark:
        d = args.bench_depth
        model_dir = saved_directory(work, ckpt)
        cmd = [sys.executable, "-m", "mlx_specstream.benchmark", "--model", str(model_dir),
               "--draft-model", str(DRAFT_DIR), "--dtype", "float32", "--tuned-top-k", "1",
               "--tuned-depth", str(d), "--tuned-max-tree-nodes", str(d + 1), "--max-tokens",
               str(args.max_tokens), "--output-dir", str(work / "bench"),
               "--name", f"eagle{args.tag}"]  # fmt: skip
        subprocess.run(cmd, check=True)
        bench = json.loads((work / "bench" / f"eagle{args.tag}.json").read_text())
        bench["command"] = " ".join(cmd[1:])
    lines = [heading("Trained EAGLE-3 drafter on the shipped base", info), ""]
    lines.append(f"`{info['command']}`: a drafter reading the inputs of the base's layers "
                 f"{layers} (6: its last output), trained {args.iters} steps x "
                 f"{args.batch_size} self-distilled windows, {args.ttt_steps} training-time-test "
                 f"steps ({trained['seconds']:.0f} s, last loss {trained['loss_last']:.3f}); "
                 f"its training forward and its drafting differ by "
                 f"{trained['drafting_gap']:.1e} in logits.")  # fmt: skip
    per = ", ".join(f"level {k + 1} (token i + {k + 2}) {a:.3f}" for k, a in enumerate(acc))
    lines += ["", f"Held-out top-1 (64 self-distilled eval windows): {per}", ""]
    lines += ["| tree | tau | identical to mlx-lm |", "|---|---|---|"]
    lines += [f"| {k} | {v['tau']:.3f} | {'yes' if v['identical'] else 'no'} |"
              for k, v in taus.items()]  # fmt: skip
    if bench:
        lines += ["", f"`python {bench['command']}`:", ""]
        lines.append((work / "bench" / f"eagle{args.tag}.md").read_text())
    write_results("eagle_trained", args.tag, "\n".join(lines) + "\n",
                  dict(info=info, trained=trained, top1=acc, tau=taus, benchmark=bench))  # fmt: skip


if __name__ == "__main__":
    main()

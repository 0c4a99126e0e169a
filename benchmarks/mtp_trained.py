"""A checkpoint's MTP layer, trained: what MTP drafting gives on this machine.

    python benchmarks/mtp_trained.py --work runs/mtp [--iters 1000] [--tag cpu]
    benchmarks/with_openblas.sh python benchmarks/mtp_trained.py --work runs/mtp --tag cpu-openblas

No checkpoint with an MTP layer can be downloaded here, so this builds one the way MiMo
was built, at the shipped model's size. Its base is the shipped base (a 6.5M Llama)
written as a MiMo checkpoint: MiMo's decoder layers are Qwen2's, so the Llama's weights
with zero q/k/v biases compute the same logits (checked). Its MTP layer, in MiMo's
layout, is trained with the base frozen on self-distilled stdlib windows (the base's own
greedy continuations, from the modules the shipped model trained on): row ``i`` reads
token ``i``'s last hidden state and token ``i + 1``'s embedding and learns token
``i + 2``. The layer starts as a copy of the base's last decoder layer. Stages resume
from ``--work``.

Then, on the default model's held-out prompts, greedy, float32: the MTP layer's top-1
on held-out windows; tau of MTP chains of 1-3 levels (the deeper levels are the layer
run again on its own output, never trained for it) and whether every output equals
mlx-lm's; and ``mlx_specstream.benchmark``'s tokens/s against mlx-lm's plain and
draft-model decoding on the same weights (the embedded 2.4M draft model), in the same run. Writes
``benchmarks/results/mtp_trained[-TAG].{md,json}``.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from report import heading, machine_info, write_results

from mlx_specstream.config import DrafterConfig
from mlx_specstream.default_model import DEFAULT_DIR, DRAFT_DIR
from mlx_specstream.mtp import FAMILIES, MTP_DEFAULTS, MTPDrafter, attach_mtp, depth_prefix

WINDOW, PROMPT = 160, 32  # training windows: 32 stdlib tokens, 128 of the base's


def mimo_base(work: Path):
    """The shipped base as a MiMo model (float32) and its tokenizer, written once to
    ``work/base`` without an MTP layer; its logits are checked against the Llama's."""
    import mlx_lm
    from mlx_lm.utils import load_model

    out = work / "base"
    llama, tok = mlx_lm.load(str(DEFAULT_DIR))
    llama.set_dtype(mx.float32)
    if not (out / "config.json").exists():
        a = llama.args
        config = dict(
            model_type="mimo", hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
            intermediate_size=a.intermediate_size, num_attention_heads=a.num_attention_heads,
            num_key_value_heads=a.num_key_value_heads, rms_norm_eps=a.rms_norm_eps,
            vocab_size=a.vocab_size, max_position_embeddings=a.max_position_embeddings,
            rope_theta=a.rope_theta, tie_word_embeddings=True, num_nextn_predict_layers=1,
        )  # fmt: skip
        weights = dict(tree_flatten(llama.parameters()))
        for i, layer in enumerate(llama.model.layers):  # Qwen2's q/k/v biases, zero
            for name in ("q_proj", "k_proj", "v_proj"):
                rows = getattr(layer.self_attn, name).weight.shape[0]
                weights[f"model.layers.{i}.self_attn.{name}.bias"] = mx.zeros((rows,))
        tmp = work / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        tok.save_pretrained(str(tmp))
        tmp.rename(out)
    mimo, _ = load_model(out)
    ids = mx.array(tok.encode(json.loads(open(DEFAULT_DIR / "prompts.jsonl").readline())["prompt"]))
    gap = mx.abs(mimo(ids[None]) - llama(ids[None])).max().item()
    assert gap < 1e-4, f"the MiMo copy's logits differ from the Llama's by {gap}"
    return mimo, tok, gap


def windows(work: Path, model, tok, n: int, split: str):
    """``n`` self-distilled stdlib windows of ``split`` (``train`` or ``eval``), cached."""
    from mlx_specstream.train_data import load_examples, self_distill, subset

    cache = work / f"windows-{split}-{n}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    corpus = work / "corpus"
    if not (corpus / "train.jsonl").exists():
        subprocess.run([sys.executable, "-m", "convert.corpus", "--out", str(corpus)], check=True)
    examples, _, _ = load_examples([str(corpus / f"{split}.jsonl")], tok, WINDOW, PROMPT)
    rows = [ex["input_ids"] for ex in self_distill(model, tok, subset(examples, n, 0))]
    cache.write_text(json.dumps(rows))
    return rows


def full(rows):
    """The windows of the full length (a file's last window can be shorter)."""
    return [r for r in rows if len(r) == WINDOW]


def hidden_states(model, ids: mx.array) -> mx.array:
    """The base's last decoder layer's output (before the final norm: MiMo's MTP input)."""
    h = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        h = layer(h, "causal", None)
    return h


def mtp_loss(drafter, model, h, ids):
    """Cross-entropy of token i + 2 from row i (token i's state, token i + 1's embedding);
    with several MTP layers, their mean, as DeepSeek-V3 trains its MTP modules: layer k's
    row i reads layer k - 1's output at i and token i + k's embedding, and learns token
    i + k + 1. Returns the loss and each layer's logits."""
    losses, logits = [], []
    for k, depth in enumerate(drafter.all_depths):
        n = ids.shape[1] - 2 - k
        emb = model.model.embed_tokens(ids[:, k + 1 : k + 1 + n])
        emb = mx.concatenate([mx.zeros_like(emb[:, :1]), emb[:, 1:]], axis=1)  # position 0
        out = depth.step(h[:, :n], emb)
        logits.append(depth.logits(model, out))
        losses.append(nn.losses.cross_entropy(logits[-1], ids[:, k + 2 :], reduction="mean"))
        h = depth.passed_on(out)
    return sum(losses) / len(losses), logits


def new_drafter(model, depths: int) -> MTPDrafter:
    return MTPDrafter(DrafterConfig(kind="mtp", num_mtp_layers=depths, **MTP_DEFAULTS), model)


def train(model, rows, iters: int, batch: int, lr: float, depths: int = 1, log_every: int = 100):
    """The MTP layers, the base frozen; each starts from a copy of the base's last layer."""
    drafter = new_drafter(model, depths)
    D = model.args.hidden_size
    eye = mx.eye(D)
    for depth in drafter.all_depths:
        depth.layer.update(model.model.layers[-1].parameters())
        depth.proj.weight = mx.concatenate([eye, eye], axis=1) * 0.5  # [h; e] averaged
    model.freeze()
    trained = fit(drafter, lambda d, h, ids: mtp_loss(d, model, h, ids)[0],
                  lambda ids: hidden_states(model, ids), rows, iters, batch, lr, log_every)  # fmt: skip
    return drafter, trained


def fit(drafter, loss_of, states_of, rows, iters: int, batch: int, lr: float, log_every=100):
    """Trains ``drafter`` on windows ``rows``: ``batch`` windows a step (a seeded draw),
    AdamW with a cosine decay from ``lr``, the loss ``loss_of(drafter, states, ids)``; the
    frozen base's ``states_of(ids)`` of every window computed once, first."""
    opt = optim.AdamW(learning_rate=optim.cosine_decay(lr, iters), weight_decay=0.0)
    grad = nn.value_and_grad(drafter, loss_of)
    data = mx.array(rows)
    t0 = time.perf_counter()
    states = []
    for i in range(0, len(rows), 64):
        states.append(states_of(data[i : i + 64]))
        mx.eval(states[-1])
    states = mx.concatenate(states)
    rng = np.random.default_rng(0)
    losses = []
    for it in range(iters):
        pick = mx.array(rng.choice(len(rows), batch, replace=False))
        loss, g = grad(drafter, states[pick], data[pick])
        opt.update(drafter, g)
        mx.eval(drafter.parameters(), opt.state, loss)
        losses.append(loss.item())
        if (it + 1) % log_every == 0:
            rate = (time.perf_counter() - t0) / (it + 1)
            print(f"iter {it + 1}: loss {np.mean(losses[-log_every:]):.3f} ({rate:.2f} s/iter)",
                  flush=True)  # fmt: skip
    return dict(seconds=time.perf_counter() - t0, loss_last=float(np.mean(losses[-50:])))


def top1(drafter, model, rows) -> list:
    """Each MTP layer's top-1 on held-out windows' continuations (layer k: token i + k + 1,
    from the true tokens before it)."""
    ids = mx.array(rows)
    _, logits = mtp_loss(drafter, model, hidden_states(model, ids), ids)
    hits = [(mx.argmax(lg, axis=-1) == ids[:, k + 2 :])[:, PROMPT - 1 :]
            for k, lg in enumerate(logits)]  # fmt: skip
    return [h.astype(mx.float32).mean().item() for h in hits]


def write_checkpoint(work: Path, drafter, name: str = "ckpt") -> Path:
    """``work/name``: the MiMo base plus the MTP layers under MiMo's names."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(work / "base", out)
    layout = FAMILIES["mimo"]
    names = dict(embed_norm=layout.embed_norm, hidden_norm=layout.hidden_norm,
                 proj=layout.proj, final_norm=layout.final_norm)  # fmt: skip
    weights = dict(mx.load(str(out / "model.safetensors")))
    layers = json.loads((work / "base" / "config.json").read_text())["num_hidden_layers"]
    for d, depth in enumerate(drafter.all_depths):
        prefix = depth_prefix(layout, layers, d)
        for k, w in tree_flatten(depth.parameters()):
            head, rest = k.split(".", 1)
            if head == "depths":
                continue
            weights[prefix + (rest if head == "layer" else f"{names[head]}.{rest}")] = w
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((out / "config.json").read_text())
    config["num_nextn_predict_layers"] = len(drafter.all_depths)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(DEFAULT_DIR / "prompts.jsonl", out)
    return out


def tau_and_identity(ckpt: Path, prompts, max_tokens: int, trees: dict, layers: int = 1) -> dict:
    """Greedy tau per tree on ``prompts`` with ``layers`` of the checkpoint's MTP layers,
    and whether each output equals mlx-lm's."""
    import mlx_lm

    model, tok = mlx_lm.load(str(ckpt))
    attach_mtp(model, ckpt, DrafterConfig(kind="mtp", num_mtp_layers=layers, **MTP_DEFAULTS))
    plain, _ = mlx_lm.load(str(ckpt))
    return taus_against_mlx_lm(model, tok, plain, prompts, max_tokens, trees)


def taus_against_mlx_lm(model, tok, plain, prompts, max_tokens: int, trees: dict) -> dict:
    """Greedy tau of ``model`` per tree on ``prompts``, and whether each output equals
    mlx-lm's greedy decoding of ``plain``."""
    from mlx_lm.generate import generate_step

    from mlx_specstream.decode import spec_generate_step

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


def benchmark_chain(model_dir: Path, work: Path, name: str, depth: int, max_tokens: int) -> dict:
    """``mlx_specstream.benchmark`` on ``model_dir`` with a tuned chain of ``depth``, against
    mlx-lm's plain and draft-model decoding (the embedded draft model), float32; its
    results, written to ``work/bench/NAME.{md,json}``, with the command."""
    cmd = [sys.executable, "-m", "mlx_specstream.benchmark", "--model", str(model_dir),
           "--draft-model", str(DRAFT_DIR), "--dtype", "float32", "--tuned-top-k", "1",
           "--tuned-depth", str(depth), "--tuned-max-tree-nodes", str(depth + 1),
           "--max-tokens", str(max_tokens), "--output-dir", str(work / "bench"),
           "--name", name]  # fmt: skip
    subprocess.run(cmd, check=True)
    bench = json.loads((work / "bench" / f"{name}.json").read_text())
    bench["command"] = " ".join(cmd[1:])
    return bench


def result_lines(what: str, acc, taus: dict, bench: dict, bench_md: Path) -> list:
    """A results file's held-out top-1 per ``what`` (layer, level), tau table and benchmark."""
    per = ", ".join(f"{what} {k + 1} (token i + {k + 2}) {a:.3f}" for k, a in enumerate(acc))
    lines = ["", f"Held-out top-1 (64 self-distilled eval windows): {per}", ""] + tau_table(taus)
    if bench:
        lines += ["", f"`python {bench['command']}`:", "", bench_md.read_text()]
    return lines


def tau_table(taus: dict) -> list:
    """The lines of a table of tau per tree, and whether each output equals mlx-lm's."""
    return ["| tree | tau | identical to mlx-lm |", "|---|---|---|"] + [
        f"| {k} | {v['tau']:.3f} | {'yes' if v['identical'] else 'no'} |" for k, v in taus.items()
    ]


def chain(depth: int) -> dict:
    return dict(tree_top_k=1, tree_depth=depth, max_tree_nodes=depth + 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/mtp")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--skip-benchmark", action="store_true")
    p.add_argument("--bench-depth", type=int, default=2, help="the benchmark's tuned MTP chain")
    p.add_argument(
        "--depths",
        type=int,
        default=1,
        help="MTP layers trained (DeepSeek-V3's sequential modules); with more "
        "than one, tau is measured with the first alone and with all",
    )
    p.add_argument("--tag", default="")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, tok, gap = mimo_base(work)
    info = machine_info(iters=args.iters, batch_size=args.batch_size, lr=args.learning_rate,
                        examples=args.examples, llama_mimo_logit_gap=gap,
                        depths=args.depths)  # fmt: skip
    rows = full(windows(work, model, tok, args.examples, "train"))
    held = full(windows(work, model, tok, 64, "eval"))
    depths = "" if args.depths == 1 else f"-d{args.depths}"
    weights = work / f"mtp-{args.iters}{depths}.safetensors"
    if weights.exists():
        drafter = new_drafter(model, args.depths)
        drafter.load_weights(str(weights))
        trained = json.loads(weights.with_suffix(".json").read_text())
    else:
        drafter, trained = train(model, rows, args.iters, args.batch_size, args.learning_rate,
                                 args.depths)  # fmt: skip
        drafter.save_weights(str(weights))
        weights.with_suffix(".json").write_text(json.dumps(trained))
    acc = top1(drafter, model, held)
    print(f"held-out top-1 per layer (token i + k + 1): {acc}", flush=True)
    ckpt = write_checkpoint(work, drafter, f"ckpt{depths}")
    prompts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]
    taus = {}
    for layers in sorted({1, args.depths}):
        trees = {f"chain of {d}": chain(d) for d in (1, 2, 3)}
        tau = tau_and_identity(ckpt, prompts, args.max_tokens, trees, layers)
        taus.update({f"{k}, {layers} MTP layer(s)": v for k, v in tau.items()})
    bench = {}
    if not args.skip_benchmark:
        bench = benchmark_chain(ckpt, work, f"mtp{args.tag}", args.bench_depth, args.max_tokens)
    what = "layer" if args.depths == 1 else f"{args.depths} layers"
    lines = [heading(f"Trained MTP {what} (MiMo layout) on the shipped base", info), ""]
    lines.append(f"`{info['command']}`: the shipped base as a MiMo checkpoint (logits within "
                 f"{gap:.1e} of the Llama's), its MTP {what} trained {args.iters} steps x "
                 f"{args.batch_size} self-distilled windows of {WINDOW} tokens "
                 f"({trained['seconds']:.0f} s, last loss {trained['loss_last']:.3f}).")  # fmt: skip
    lines += result_lines("layer", acc, taus, bench, work / "bench" / f"mtp{args.tag}.md")
    write_results("mtp_trained", args.tag,
                  "\n".join(lines) + "\n", dict(info=info, trained=trained, top1=acc, tau=taus,
                                                benchmark=bench))  # fmt: skip


if __name__ == "__main__":
    main()

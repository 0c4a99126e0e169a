"""Which of mlx-lm's architectures speculate exactly here: a survey of every model module.

    python benchmarks/architectures.py [--tag cpu] [--only llama,ministral3]

For each module of ``mlx_lm.models``, a tiny random model (4 layers of width 64, 8 tokens): the
tests' configs where they have one (``tests/helpers.py``), else every size field of its
``ModelArgs`` set small and its other required fields filled with common values. Each
model is built and decoded in a process of its own (a crash or a default config too big
for memory costs that row only), greedy, 40 tokens after a prompt that repeats itself:

* mlx-lm's plain decoding (``generate_step``);
* ours with prompt lookup (``draft="ngram"``, 4-token chains);
* ours with prompt lookup merging 3 drafts into a tree (``ngram_candidates=3``,
  session 32; on a model with recurrent layers its mixers read the tree along its paths);
* ours with random streams drafting trees (3 streams, top-2, 6 nodes); on a model with
  recurrent layers, on its top layer (chains of 3 in session 31, trees since 32);
* ours with a random ParallelSpec drafter (session 38: one decoder layer of the model's
  own class, built as the layer after the last), 3 levels, top-2 trees of 6 nodes; on a
  model with recurrent layers, chains of 3.
* ours with a random draft model of the same architecture (``draft_model=``, session 54)
  growing dynamic trees (3 levels, top-2, 6 nodes, ``dynamic_tree=True``); on a model
  with recurrent layers, the draft model's chain of 3 (trees are refused there).

A row says ``exact`` when our tokens equal mlx-lm's, with the drafts accepted (tokens
that came from drafts) so a row with none is seen to prove little, else the error our
package raised (refusals name their reason) or ``DIFFERS`` (a fault: lossless is the
promise). Rows whose tiny model could not be built say why: they test nothing. Results go
to ``benchmarks/results/architectures[-TAG].{md,json}``.
"""

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import traceback
from pathlib import Path

import mlx.core as mx
import mlx_lm.models
from mlx_lm.generate import generate_step

from report import heading, machine_info, write_results

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import helpers  # noqa: E402  (the tests' tiny configs)

NOT_MODELS = {"base", "cache", "rope_utils", "switch_layers", "activations", "bitlinear_layers",
              "gated_delta", "pipeline", "ssm", "mla", "olmo"}  # (olmo needs ai2-olmo)  # fmt: skip
# Every size field a tiny model sets, where its ModelArgs has it.
SIZES = dict(
    hidden_size=64, num_hidden_layers=4, num_layers=4, n_layer=4, n_layers=4,
    intermediate_size=128, num_attention_heads=4, n_head=4, num_heads=4,
    num_key_value_heads=2, num_kv_heads=2, vocab_size=8, head_dim=16,
    moe_intermediate_size=32, num_experts=4, n_routed_experts=4, num_local_experts=4,
    num_experts_per_tok=2, moe_topk=2, n_shared_experts=1, num_shared_experts=1,
    num_shared_expert=1, shared_expert_intermediate_size=32, kv_lora_rank=16, q_lora_rank=32,
    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
    n_group=1, topk_group=1, max_position_embeddings=512, linear_num_value_heads=4,
    linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, sliding_window=8, index_head_dim=16, index_n_heads=2,
    index_topk=8, ffn_hidden_size=128, expert_ffn_hidden_size=32, dim_model_base=64,
    n_embd=64, n_inner=128, n_ctx=512, n_positions=512, d_model=64, attention_window_size=8,
    sliding_window_size=8, swa_head_dim=16, swa_v_head_dim=16, swa_num_attention_heads=4,
    swa_num_key_value_heads=2, intermediate_size_mlp=128, num_attention_groups=2,
    model_max_length=512, moe_num_experts=4,
)  # fmt: skip
# Values for the other fields a ModelArgs requires.
REQUIRED = dict(
    rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False, mlp_bias=False,
    tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
    layer_norm_eps=1e-5, layer_norm_epsilon=1e-5, norm_eps=1e-5, partial_rotary_factor=0.5,
    use_qk_norm=True, qk_norm=True, rope_scaling=None, routed_scaling_factor=1.0,
    use_bias=False, post_norm=False, logits_scaling=1.0, attention_multiplier=0.25,
    embedding_multiplier=1.0, residual_multiplier=1.0, scale_depth=1.0, scale_emb=1.0,
    hidden_act="silu", use_qkv_bias=False, layernorm_epsilon=1e-5, swa_rope_theta=10000.0,
)  # fmt: skip
PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4, 1, 5, 2, 6]
N = 40


def tests_config(arch):
    """The tests' tiny model of ``arch`` (``tests/helpers.py``) with the weights of a
    ``seed`` (``make(seed=0)``), or None."""
    if arch in helpers.HYBRID_ARGS:
        return lambda seed=0: helpers.tiny_hybrid(arch, vocab_size=8, seed=seed)
    if arch in helpers.CHAIN_ARGS:  # (random where mlx-lm starts at zero)
        return lambda seed=0: helpers.tiny_chain_model(arch, seed=seed)
    configs = {**helpers.ARCH_ARGS, **helpers.WINDOWED_ARGS, **helpers.MORE_ARGS}
    if arch in configs or arch == "gemma3n":  # (Gemma 3n: helpers.GEMMA3N)
        return lambda seed=0: helpers.tiny_model(arch, vocab_size=8, seed=seed)
    return None


def generic_model(arch, seed=0):
    """A tiny random model from ``arch``'s ModelArgs: size fields small, required ones filled."""
    fields = dataclasses.fields(importlib.import_module(f"mlx_lm.models.{arch}").ModelArgs)
    required = {f.name for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}  # fmt: skip
    params = {k: v for k, v in SIZES.items() if k in {f.name for f in fields}}
    params.update({k: v for k, v in REQUIRED.items() if k in required})
    # (layer matrices scaled up, as the tests' models: else they repeat one token)
    model = helpers.random_model(arch, params, vocab_size=SIZES["vocab_size"], seed=seed)
    mx.eval(model.parameters())
    return model


def ours(model, **kwargs):
    from mlx_specstream.decode import spec_generate_step

    out = list(spec_generate_step(mx.array(PROMPT), model, max_tokens=N, **kwargs))
    return [int(o[0]) for o in out], sum(int(o[2]) for o in out)


def outcome(want, run):
    """``exact (k drafted)``, ``DIFFERS at token i``, or the error raised."""
    try:
        got, drafted = run()
    except Exception as e:  # (refusals name their reason)
        return " ".join(f"{type(e).__name__}: {e}".split())[:200]
    if got == want:
        return f"exact ({drafted} drafted)"
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"DIFFERS at token {first}"


def survey_one(arch) -> dict:
    from mlx_specstream import SpecStreamConfig, attach_streams
    from mlx_specstream.config import DrafterConfig
    from mlx_specstream.drafters import attach_drafter
    from mlx_specstream.recurrent import has_recurrent_layers

    made = tests_config(arch)
    row = {"arch": arch, "config": "tests" if made else "generic"}
    make = made or (lambda seed=0: generic_model(arch, seed))
    try:
        model = make()
        want = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=N)]
    except Exception as e:
        row["built"] = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        return row
    row["built"], row["distinct"] = "yes", len(set(want))
    row["lookup"] = outcome(want, lambda: ours(model, draft="ngram", num_draft_tokens=4))
    row["lookup_trees"] = outcome(
        want, lambda: ours(make(), draft="ngram", num_draft_tokens=4, ngram_candidates=3)
    )

    def streams():
        m = make()
        if has_recurrent_layers(m):  # (the top layer's streams: on_chains)
            config = SpecStreamConfig(num_streams=3, num_stream_layers=1, top_k=2)
            attach_streams(m, config, seed=1)
            return ours(m, max_tree_nodes=6)
        attach_streams(m, SpecStreamConfig(num_streams=3, num_stream_layers=2, top_k=2), seed=1)
        return ours(m, max_tree_nodes=6)

    row["streams"] = outcome(want, streams)

    def parallelspec():
        m = make()
        trees = not has_recurrent_layers(m)
        config = DrafterConfig(kind="parallelspec", num_draft_tokens=3, top_k=2 if trees else 1)
        attach_drafter(m, config, seed=1)
        return ours(m, **(dict(max_tree_nodes=6) if trees else {}))

    row["parallelspec"] = outcome(want, parallelspec)

    def draft_model_trees():
        m = make()
        if has_recurrent_layers(m):
            return ours(m, draft_model=make(seed=5), num_draft_tokens=3)
        return ours(m, draft_model=make(seed=5), num_draft_tokens=3, tree_top_k=2,
                    max_tree_nodes=6, dynamic_tree=True)  # fmt: skip

    row["draft_model_trees"] = outcome(want, draft_model_trees)
    return row


def architectures():
    found = (m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__))
    return sorted(a for a in found if a not in NOT_MODELS)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=None, help="comma-separated architectures")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # (a child process's row)
    p.add_argument("--memory-gb", type=float, default=8.0,
                   help="address-space limit of each child process")  # fmt: skip
    p.add_argument("--timeout", type=int, default=300, help="seconds per architecture")
    args = p.parse_args()
    if args.one:
        try:
            row = survey_one(args.one)
        except Exception:
            row = {"arch": args.one, "built": traceback.format_exc(limit=1)[-160:]}
        print("ROW " + json.dumps(row))
        return

    archs = args.only.split(",") if args.only else architectures()
    limit = f"ulimit -v {int(args.memory_gb * 2**20)}; "
    rows = []
    for arch in archs:
        cmd = limit + f"exec {sys.executable} {Path(__file__).name} --one {arch}"
        try:
            done = subprocess.run(["bash", "-c", cmd], cwd=Path(__file__).parent,
                                  capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
            out = [l for l in done.stdout.splitlines() if l.startswith("ROW ")]
            row = json.loads(out[-1][4:]) if out else {
                "arch": arch, "built": f"process ended with code {done.returncode} (its "
                "default config too big for --memory-gb, or a crash)"}  # fmt: skip
        except subprocess.TimeoutExpired:
            row = {"arch": arch, "built": f"timed out after {args.timeout} s"}
        print(json.dumps(row), flush=True)
        rows.append(row)

    info = machine_info(prompt_tokens=len(PROMPT), max_tokens=N)
    built = [r for r in rows if r.get("built") == "yes"]
    exact = lambda r, k: r.get(k, "").startswith("exact")  # noqa: E731
    differs = [r["arch"] for r in built
               if "DIFFERS" in r["lookup"] + r.get("lookup_trees", "") + r["streams"]
               + r.get("parallelspec", "") + r.get("draft_model_trees", "")]  # fmt: skip
    lines = [
        heading("mlx-lm's architectures through our verifier", info), "",
        f"`{info['command']}`", "",
        f"{len(rows)} model modules; {len(built)} built as tiny random models; "
        f"prompt lookup exact on {sum(exact(r, 'lookup') for r in built)}, lookup trees "
        f"on {sum(exact(r, 'lookup_trees') for r in built)}, stream trees exact on "
        f"{sum(exact(r, 'streams') for r in built)}, ParallelSpec exact on "
        f"{sum(exact(r, 'parallelspec') for r in built)}, a draft model's grown trees on "
        f"{sum(exact(r, 'draft_model_trees') for r in built)}; output different from "
        f"mlx-lm's on {len(differs)}{': ' + ', '.join(differs) if differs else ''}.", "",
        "| architecture | tiny config | prompt lookup | lookup trees | stream trees | "
        "ParallelSpec | draft model's grown trees |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        if r.get("built") != "yes":
            lines.append(f"| {r['arch']} | {r.get('config', 'generic')} | not built: "
                         f"{r['built']} | | | | |")  # fmt: skip
        else:
            lines.append(f"| {r['arch']} | {r['config']} | {r['lookup']} | "
                         f"{r.get('lookup_trees', '-')} | {r['streams']} | "
                         f"{r.get('parallelspec', '-')} | {r.get('draft_model_trees', '-')} |")  # fmt: skip
    write_results("architectures", args.tag, "\n".join(lines) + "\n", {"info": info, "rows": rows})


if __name__ == "__main__":
    main()

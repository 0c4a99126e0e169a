"""What the fixed tree topology costs in tau: the static tree against a tree scored per step.

    python benchmarks/scored_topology.py --max-tokens 128 --tag cpu

The decoder drafts the streams' tree in one topology for a whole generation
(``tree.static_tree``: ranks per level, capped by a fixed rank prior), so its masks and
positions are built once and the next tree's tokens never leave the device. A tree
scored per step (``tree.build_draft_tree``, the Cartesian product of each level's top-k
capped by this step's own path log-probabilities, as DDTree and Sequoia-style trees are
chosen) adapts its shape to how sure each level is, at the price of a host read of the
scores and new masks every step. This measures the tau that price would buy: the
embedded model's streams on its held-out prompts, greedy, each tree shape both ways,
every output checked against mlx-lm's greedy tokens. The scored trees are made by
routing ``Decoder._next_draft`` through ``build_draft_tree`` (a measurement only).

Writes ``benchmarks/results/scored_topology[-TAG].{md,json}``.
"""

import argparse
import json

import mlx.core as mx
from mlx_lm.generate import generate_step
from report import heading, machine_info, write_results

import mlx_specstream.decode as decode
from mlx_specstream.default_model import DEFAULT_DIR, load_default
from mlx_specstream.layout import layout_of
from mlx_specstream.tree import build_draft_tree, top_k_desc

SHAPES = ((2, 8), (3, 8), (3, 16), (4, 16), (4, 32))  # (top-k, nodes), 3 levels


def score_each_step():
    """Routes the decoder's next static tree through :func:`build_draft_tree` over the
    accepted node's stream log-probabilities (kept by ``_draft_tokens``); returns the
    function that undoes it."""
    real_tokens, real_next = decode.Decoder._draft_tokens, decode.Decoder._next_draft

    def draft_tokens(self, slog, root):
        self.last_stream_logits = slog
        return real_tokens(self, slog, root)

    def next_draft(self, next_tokens, token, q):
        depth = min(self.depth, self._room())
        slog = getattr(self, "last_stream_logits", None)
        if next_tokens is None or slog is None or depth <= 0:
            return real_next(self, next_tokens, token, q)
        lp = slog[:depth].astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        top = top_k_desc(lp, self.kmax)
        scores = mx.take_along_axis(lp, top, axis=-1)
        tree = build_draft_tree(token, top.tolist(), scores.tolist(), self.tree_nodes)
        return decode.Draft(layout_of(tree.parents), tree.tokens)

    def restore():
        decode.Decoder._draft_tokens, decode.Decoder._next_draft = real_tokens, real_next

    decode.Decoder._draft_tokens, decode.Decoder._next_draft = draft_tokens, next_draft
    return restore


def tau(model, prompts, refs, max_tokens: int, **tree) -> tuple:
    tokens = passes = 0
    same = True
    for p, ref in zip(prompts, refs):
        out = list(decode.spec_generate_step(mx.array(p), model, max_tokens=max_tokens, **tree))
        same &= [o[0] for o in out] == ref
        tokens, passes = tokens + len(out), passes + out[-1][3]
    return tokens / passes, bool(same)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    info = machine_info(max_tokens=args.max_tokens)
    model, tok = load_default()
    texts = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")]
    prompts = [tok.encode(t) for t in texts]
    refs = [[int(t) for t, _ in generate_step(mx.array(q), model, max_tokens=args.max_tokens)]
            for q in prompts]  # fmt: skip
    rows = {}
    for k, nodes in SHAPES:
        tree = dict(tree_top_k=k, tree_depth=3, max_tree_nodes=nodes)
        static = tau(model, prompts, refs, args.max_tokens, **tree)
        restore = score_each_step()
        try:
            scored = tau(model, prompts, refs, args.max_tokens, **tree)
        finally:
            restore()
        rows[f"top-{k}, {nodes} nodes"] = dict(static=static, scored=scored)
        print(f"top-{k}, {nodes} nodes: tau {static[0]:.3f} static, {scored[0]:.3f} scored",
              flush=True)  # fmt: skip
    lines = [heading("Fixed tree topology against a tree scored per step", info), "",
             f"`{info['command']}`: the embedded model's streams, its {len(texts)} held-out "
             f"prompts, greedy, {args.max_tokens} tokens, 3 levels.", "",
             "| tree | tau static | tau scored per step | gain | identical to mlx-lm |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        (s, s_ok), (d, d_ok) = r["static"], r["scored"]
        lines.append(f"| {name} | {s:.3f} | {d:.3f} | {100 * (d / s - 1):+.1f}% | "
                     f"{'yes' if s_ok and d_ok else 'no'} |")  # fmt: skip
    write_results("scored_topology", args.tag, "\n".join(lines) + "\n", dict(info=info, tau=rows))


if __name__ == "__main__":
    main()

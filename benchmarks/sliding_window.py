"""Speculation on a model with sliding-window layers, past its window, against mlx-lm.

    python benchmarks/sliding_window.py [--shape gemma3-small] [--dtype f32] [--tag cpu]
    MLX_ENABLE_TF32=0 python benchmarks/sliding_window.py --shape gemma3-270m --dtype bf16 \\
        --prompt-tokens 2048 --tag gpu

Random weights of a Gemma 3 shape (window layers and global layers); the prompt is a
random stretch of tokens repeated, longer than the window. The draft model is the
model's own first six layers (one window pattern), embedding and head (a layer-skip
draft: it agrees with the model often, not always). Every way decodes the same prompt
in the same run:

* mlx-lm plain decoding (its rotating caches: a window layer holds its window only);
* mlx-lm's draft-model decoding (``speculative_generate_step``): once a window layer's
  rotating cache is full, mlx-lm cannot trim it, so rejected drafts stay in every
  layer's cache and its output leaves plain decoding's;
* ours with prompt lookup, with the same draft model, and with both: the window layers
  keep every token a window to come can see (``mlx_specstream.cache.model_caches``),
  the masks apply the window.

For each: tokens/s after the first token and × mlx-lm plain, tokens per pass, whether
the output is plain decoding's token for token (else where it first leaves it), the
bytes of the model's KV caches at the end and the peak memory. A generation's own
caches hold 2 to 3 windows in the window layers (``WindowKVCache``), and so does a
reusable prompt cache (``make_prompt_cache``); one made with ``bounded=False`` (the last
way) keeps the whole context there. Results go to
``benchmarks/results/sliding_window[-TAG].{md,json}``.
"""

import argparse
import time

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

import mlx_specstream.decode as decode
from mlx_specstream.cache import make_prompt_cache, model_caches
from mlx_specstream.decode import spec_generate_step
from report import heading, machine_info, write_results
from shapes import SHAPES, random_model

LAYERS = None  # the model's layers (a cache list may hold the draft model's after them)


def layer_skip_draft(model, shape: str, dtype: str, layers: int = 6):
    """A model of ``shape`` with the first ``layers`` of ``model``'s layers, its
    embedding, final norm and head (the weights are shared, not copied)."""
    draft = random_model(shape, dtype, streams=False, num_hidden_layers=layers)
    keep = [(k, v) for k, v in tree_flatten(model.parameters())
            if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers]  # fmt: skip
    draft.load_weights(keep, strict=True)
    return draft


def run(gen, cache) -> dict:
    """Tokens, seconds after the first, passes, the KV bytes of ``cache`` (the model's
    layers; a list holding it: the generation's own) at the end, and the peak memory."""
    tokens, t0, passes = [], None, 0
    mx.clear_cache()
    mx.reset_peak_memory()
    for item in gen:
        tokens.append(int(item[0]))
        passes = item[3] if len(item) > 3 else passes + (1 if len(item) < 3 or not item[2] else 0)
        if t0 is None:
            t0, p0 = time.perf_counter(), passes
    seconds = time.perf_counter() - t0
    cache = cache[0] if cache and isinstance(cache[0], list) else cache
    kv = sum(c.nbytes for c in cache[:LAYERS])
    return dict(tokens=tokens, seconds=seconds, passes=passes - p0, kv_bytes=kv,
                peak_bytes=mx.get_peak_memory())  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="gemma3-small", choices=[s for s in SHAPES if "gemma3" in s])
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-draft-tokens", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="runs per way (the fastest is kept)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    global LAYERS
    model = random_model(args.shape, args.dtype, streams=False)
    LAYERS = len(model.layers)
    draft = layer_skip_draft(model, args.shape, args.dtype)
    window = SHAPES[args.shape]["sliding_window"]
    rng = mx.random.randint(0, SHAPES[args.shape]["vocab_size"], (96,), key=mx.random.key(1))
    stretch = rng.tolist()
    prompt = (stretch * (args.prompt_tokens // len(stretch) + 1))[: args.prompt_tokens]
    x, n, k = mx.array(prompt), args.max_tokens, args.num_draft_tokens

    def ways():
        c = mlx_lm_cache(model)
        yield "mlx-lm plain", c, generate_step(x, model, max_tokens=n, prompt_cache=c)
        c = mlx_lm_cache(model) + mlx_lm_cache(draft)
        yield "mlx-lm draft model", c[: len(model.layers)], speculative_generate_step(
            x, model, draft, num_draft_tokens=k, max_tokens=n, prompt_cache=c
        )
        for name, kw in [
            ("ours: lookup", dict(draft="ngram", num_draft_tokens=k)),
            ("ours: draft model", dict(draft_model=draft, num_draft_tokens=k)),
            (
                "ours: draft model + lookup",
                dict(draft_model=draft, draft="ngram", num_draft_tokens=k),
            ),
        ]:
            made = []  # (the generation's own caches, for their bytes)
            decode.model_caches = lambda *a, **kw: made.append(model_caches(*a, **kw)) or made[-1]
            yield name, made, spec_generate_step(x, model, max_tokens=n, **kw)
        decode.model_caches = model_caches
        for name, bounded in [("", True), (", bounded=False", False)]:
            c = make_prompt_cache(model, bounded=bounded)  # (False: keeps the whole context)
            gen = spec_generate_step(
                x, model, max_tokens=n, prompt_cache=c, draft="ngram", num_draft_tokens=k
            )
            yield f"ours: lookup, a reusable prompt cache{name}", c, gen

    results = {}
    for _ in range(args.rounds):
        for name, cache, gen in ways():
            r = run(gen, cache)
            if name not in results or r["seconds"] < results[name]["seconds"]:
                results[name] = r
    plain = results["mlx-lm plain"]
    rows = []
    for name, r in results.items():
        differs = next(
            (i for i, (a, b) in enumerate(zip(r["tokens"], plain["tokens"])) if a != b), None
        )
        r.update(
            tokens_per_s=(len(r["tokens"]) - 1) / r["seconds"],
            per_pass=(len(r["tokens"]) - 1) / max(r["passes"], 1),
            identical=differs is None and len(r["tokens"]) == len(plain["tokens"]),
            first_difference=differs,
        )
        rows.append(
            f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | "
            f"{r['per_pass']:.2f} | {'yes' if r['identical'] else f'no (token {differs})'} | "
            f"{r['kv_bytes'] / 2**20:.1f} | {r['peak_bytes'] / 2**20:.0f} |"
        )
    info = machine_info(shape=args.shape, dtype=args.dtype, window=window,
                        prompt_tokens=args.prompt_tokens, max_tokens=n, num_draft_tokens=k)  # fmt: skip
    text = "\n".join(
        [
            heading("Speculation past a sliding window", info),
            "",
            f"`{info['command']}`: {args.shape} ({args.dtype}, random weights, window {window}), "
            f"a {args.prompt_tokens}-token prompt, {n} tokens; draft model: its first 6 layers.",
            "",
            "| way | tokens/s | × mlx-lm plain | tokens per pass | identical to plain | KV MiB at the end | peak MiB |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    for r in results.values():
        r.pop("tokens")
    write_results("sliding_window", args.tag, text, dict(info=info, results=results))


if __name__ == "__main__":
    main()

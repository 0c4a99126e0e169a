"""Throughput of the server with several clients at once: batched, one at a time, and mlx-lm.

    python benchmarks/server_concurrency.py [--model DIR] [--dtype float32] [--clients 1,2,4,8]
        [--max-tokens 128] [--tree-depth 3 --stream-pass fused] [--rounds 2] [--tag TAG]

For each number of clients K, K different prompts (the default model's held-out
prompts) are asked at once, greedily, for ``--max-tokens`` tokens each, and the
wall time until the last answer is done gives the figure that matters for a
server: generated tokens per second, all clients together. Four ways, interleaved
in every round, on the same weights:

* **ours, batched** (the default): ``mlx_specstream.server`` over loopback with the
  official ``openai`` client, one thread per client. Requests that wait together
  are decoded together by mlx-lm's ``BatchGenerator``; a request decoding alone
  when others arrive joins them.
* **ours, one at a time** (``--decode-concurrency 1``): each request decoded
  speculatively (with the model's tuned settings, or ``--tree-depth``), in
  arrival order.
* **mlx-lm batch_generate**: mlx-lm's batched decoding of the same prompts in one
  call (what ``mlx_lm.server`` runs for them, without HTTP, detokenizing or its
  scheduling).
* **mlx-lm one at a time**: mlx-lm's ``generate_step`` over each prompt in turn.

Every answer of ours is checked against mlx-lm's one-at-a-time text (the script
says how many are identical). Also reported: the mean time from sending a
request to its last token. Results go to
``benchmarks/results/server_concurrency[-TAG].{md,json}``. Both models are cast to
``--dtype`` (float32 by default, as ``mlx_specstream.benchmark``: MLX's CPU backend
multiplies bfloat16 without BLAS, so that a verified row costs nearly a full pass).
"""

import argparse
import dataclasses
import json
import statistics
import threading
import time
from pathlib import Path

import mlx.core as mx
import openai
from mlx_lm import batch_generate
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step, speculative_generate_step

from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.server import make_server
from mlx_specstream.utils import load
from report import heading, machine_info, write_results


def held_out_prompts(model_dir, n):
    lines = (Path(model_dir) / "prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    return [prompts[i % len(prompts)] for i in range(n)]


def ask_at_once(client, prompts, max_tokens):
    """Every prompt from its own thread at once: (seconds until the last answer,
    the answers, each request's seconds, tokens generated)."""
    texts, seconds, errors = [None] * len(prompts), [None] * len(prompts), []
    tokens = [0] * len(prompts)
    go = threading.Barrier(len(prompts) + 1)

    def worker(i):
        go.wait()
        tic = time.perf_counter()
        try:
            r = client.completions.create(
                model="bench", prompt=prompts[i], max_tokens=max_tokens, temperature=0
            )
            texts[i], tokens[i] = r.choices[0].text, r.usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        seconds[i] = time.perf_counter() - tic

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    go.wait()
    tic = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - tic, texts, seconds, sum(tokens)


def start_server(model, tok, **defaults):
    server = make_server(model, tok, "bench", port=0, prompt_cache_size=0, **defaults)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return server, openai.OpenAI(base_url=url, api_key="none", timeout=3600, max_retries=0)


def mlx_lm_one_at_a_time(model, tok, prompts, max_tokens, draft_model=None, **kwargs):
    """mlx-lm's loop over each prompt in turn (its draft-model decoding with
    ``draft_model``, as ``mlx_lm.server --draft-model`` serves requests)."""
    tic, texts, seconds, tokens = time.perf_counter(), [], [], 0
    for p in prompts:
        out, x = [], mx.array(tok.encode(p))
        steps = (generate_step(x, model, max_tokens=max_tokens) if draft_model is None else
                 speculative_generate_step(x, model, draft_model, max_tokens=max_tokens,
                                           **kwargs))  # fmt: skip
        for t, *_ in steps:
            out.append(t)
            if t in tok.eos_token_ids:  # (counted, as mlx-lm counts it; not text)
                break
        tokens += len(out)
        texts.append(tok.decode(out[:-1] if out[-1] in tok.eos_token_ids else out))
        seconds.append(time.perf_counter() - tic)
    return time.perf_counter() - tic, texts, seconds, tokens


def mlx_lm_batched(model, tok, prompts, max_tokens):
    tic = time.perf_counter()
    ids = [tok.encode(p) for p in prompts]
    r = batch_generate(model, tok, ids, max_tokens=max_tokens, return_token_ids=True)
    dt = time.perf_counter() - tic
    return dt, r.texts, [dt] * len(prompts), sum(len(t) for t in r.token_ids)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_DIR))
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--tree-depth", type=int, default=None, help="a chain of N stream drafts")
    p.add_argument("--stream-pass", choices=["fused", "split"], default=None)
    p.add_argument(
        "--draft",
        choices=["ngram", "streams+ngram"],
        default=None,
        help="the server's drafts (batched rows draft by prompt lookup too)",
    )
    p.add_argument("--num-draft-tokens", type=int, default=None)
    p.add_argument(
        "--draft-model",
        default=None,
        help="a draft model directory: our server drafts with it, batched rows too; "
        "mlx-lm's way is its draft-model decoding one request at a time, as "
        "mlx_lm.server serves --draft-model",
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tag", default="")
    args = p.parse_args()

    model, tok = load(args.model)
    rt = model.speculative_streams
    changes = {}
    if args.tree_depth is not None:
        changes.update(tree_depth=args.tree_depth, top_k=1, max_tree_nodes=args.tree_depth + 1)
    if args.stream_pass is not None:
        changes.update(stream_pass=args.stream_pass)
    rt.config = dataclasses.replace(rt.config, **changes)
    plain, plain_tok = mlx_lm_load(args.model)
    for m in (model, plain):
        m.set_dtype(getattr(mx, args.dtype))
        mx.eval(m.parameters())
    clients = [int(c) for c in args.clients.split(",")]
    prompts = held_out_prompts(args.model, max(clients))
    drafts = {k: v for k, v in [("draft", args.draft), ("num_draft_tokens", args.num_draft_tokens)]
              if v is not None}  # fmt: skip
    draft_model = None
    if args.draft_model is not None:
        draft_model, _ = mlx_lm_load(args.draft_model)
        draft_model.set_dtype(getattr(mx, args.dtype))
        mx.eval(draft_model.parameters())
    batched, batched_client = start_server(model, tok, draft_model=draft_model, **drafts)
    alone, alone_client = start_server(
        model, tok, decode_concurrency=1, draft_model=draft_model, **drafts
    )
    ways = {
        "ours, batched": lambda ps: ask_at_once(batched_client, ps, args.max_tokens),
        "ours, one at a time": lambda ps: ask_at_once(alone_client, ps, args.max_tokens),
        "mlx-lm batch_generate": lambda ps: mlx_lm_batched(plain, plain_tok, ps, args.max_tokens),
        "mlx-lm one at a time": lambda ps: mlx_lm_one_at_a_time(
            plain, plain_tok, ps, args.max_tokens
        ),
    }
    if draft_model is not None:
        k = args.num_draft_tokens or 3
        ways["mlx-lm draft model, one at a time"] = lambda ps: mlx_lm_one_at_a_time(
            plain, plain_tok, ps, args.max_tokens, draft_model=draft_model, num_draft_tokens=k
        )
    ways["ours, batched"](prompts[:2])  # warm-up: compile, first-call costs
    ways["ours, one at a time"](prompts[:1])
    info = machine_info(
        max_tokens=args.max_tokens,
        dtype=args.dtype,
        config={k: getattr(rt.config, k) for k in ("tree_depth", "top_k", "max_tree_nodes",
                                                   "stream_pass", "draft")},  # fmt: skip
        server_drafts=drafts,
        draft_model=args.draft_model,
    )
    rows, data = [], {"info": info, "results": []}
    for k in clients:
        ps = prompts[:k]
        runs = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                runs[name].append(way(ps))
        reference = runs["mlx-lm one at a time"][0][1]
        for name, results in runs.items():
            seconds = statistics.median(r[0] for r in results)
            tokens = results[0][3]
            identical = sum(a == b for a, b in zip(results[0][1], reference))
            latency = statistics.mean(statistics.mean(r[2]) for r in results)
            row = dict(clients=k, way=name, seconds=seconds, tokens=tokens,
                       tokens_per_s=tokens / seconds, mean_latency_s=latency,
                       identical=f"{identical}/{k}")  # fmt: skip
            data["results"].append(row)
            rows.append(row)
    for server in (batched, alone):
        server.shutdown()
        server.server_close()
    base = {r["clients"]: r["tokens_per_s"] for r in rows if r["way"] == "mlx-lm one at a time"}
    lines = [
        heading("Server throughput with concurrent clients", info),
        "",
        f"`{info['command']}`; {args.dtype}, greedy, {args.max_tokens} tokens a request, "
        f"median of {args.rounds} rounds; settings {info['config']}, server {drafts}.",
        "",
        "| clients | way | tokens/s (all clients) | x mlx-lm one at a time | mean latency (s) "
        "| identical to mlx-lm |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['way']} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / base[r['clients']]:.2f} | {r['mean_latency_s']:.2f} | "
            f"{r['identical']} |"
        )
    write_results("server_concurrency", args.tag, "\n".join(lines) + "\n", data)


if __name__ == "__main__":
    main()

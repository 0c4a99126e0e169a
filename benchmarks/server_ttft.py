"""Time to first token of a 4-turn chat, with and without the server's prompt cache.

    python benchmarks/server_ttft.py [--model DIR] [--reps 5] [--max-tokens 48]

Starts ``mlx_specstream.server`` in this process twice on the same model: with
the prompt cache (``--prompt-cache-size 10``, the default) and without it
(``0``). The official ``openai`` client holds a 4-turn conversation over
loopback: each user turn is a Python snippet from the default model's
held-out prompts, each answer is streamed greedily. The time to first token
is measured at the client, from sending the request to the first content
chunk. Each repetition starts from an empty cache, and the two servers take
turns going first. Greedy answers must be identical with and without the
cache (the script stops otherwise).

Writes ``benchmarks/results/server_ttft.json`` and prints a markdown table.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import openai

from mlx_specstream.default_model import DEFAULT_DIR
from mlx_specstream.server import make_server, service_of
from mlx_specstream.utils import load

TURNS = 4


def user_turns(n):
    lines = (Path(DEFAULT_DIR) / "prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:n]]


def start(model, tok, cache_size, max_tokens):
    server = make_server(
        model, tok, "bench", port=0, max_tokens=max_tokens, prompt_cache_size=cache_size
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return server, openai.OpenAI(base_url=url, api_key="none", timeout=600, max_retries=0)


def conversation(client, users, max_tokens):
    """One 4-turn chat: per turn (ttft_s, total_s, prompt_tokens, cached_tokens, answer)."""
    messages, out = [], []
    for user in users:
        messages.append({"role": "user", "content": user})
        tic = time.perf_counter()
        ttft, answer, usage = None, "", None
        stream = client.chat.completions.create(
            model="bench",
            messages=messages,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - tic
                answer += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        total = time.perf_counter() - tic
        out.append(
            dict(
                ttft_s=ttft if ttft is not None else total,
                total_s=total,
                prompt_tokens=usage.prompt_tokens,
                cached_tokens=usage.prompt_tokens_details.cached_tokens,
                completion_tokens=usage.completion_tokens,
                answer=answer,
            )
        )
        messages.append({"role": "assistant", "content": answer})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Model directory (default: the embedded model)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", default="benchmarks/results/server_ttft.json")
    args = p.parse_args()

    model, tok = load(args.model)
    users = user_turns(TURNS)
    servers = {
        "cache": start(model, tok, 10, args.max_tokens),
        "no cache": start(model, tok, 0, args.max_tokens),
    }
    conversation(servers["no cache"][1], users[:1], 8)  # warm-up (compiles, allocations)
    runs = {name: [] for name in servers}
    for rep in range(args.reps):
        order = list(servers) if rep % 2 == 0 else list(servers)[::-1]
        for name in order:
            server, client = servers[name]
            service_of(server).prompt_cache.trim_to(0)  # every repetition starts cold
            runs[name].append(conversation(client, users, args.max_tokens))
        answers = {name: [t["answer"] for t in runs[name][-1]] for name in servers}
        if answers["cache"] != answers["no cache"]:
            sys.exit("The answers with and without the prompt cache differ: " f"{answers}")
    for server, client in servers.values():
        client.close()
        server.shutdown()
        server.server_close()

    table = []
    for t in range(TURNS):
        row = {"turn": t + 1}
        for name in servers:
            ttfts = [run[t]["ttft_s"] for run in runs[name]]
            row[name] = {
                "ttft_median_s": statistics.median(ttfts),
                "ttft_min_s": min(ttfts),
                "prompt_tokens": runs[name][0][t]["prompt_tokens"],
                "cached_tokens": runs[name][0][t]["cached_tokens"],
            }
        table.append(row)
    lines = [
        "| turn | prompt tokens | cached (cache on) | TTFT no cache, median (min) | "
        "TTFT cache, median (min) | speedup (medians) |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        off, on = row["no cache"], row["cache"]
        lines.append(
            f"| {row['turn']} | {on['prompt_tokens']} | {on['cached_tokens']} | "
            f"{off['ttft_median_s'] * 1e3:.1f} ms ({off['ttft_min_s'] * 1e3:.1f}) | "
            f"{on['ttft_median_s'] * 1e3:.1f} ms ({on['ttft_min_s'] * 1e3:.1f}) | "
            f"{off['ttft_median_s'] / on['ttft_median_s']:.2f}x |"
        )
    result = {
        "command": " ".join(["python"] + sys.argv),
        "model": args.model or "embedded default",
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}",
        "mlx": mx.__version__,
        "blas": "OpenBLAS (interposed by benchmarks/with_openblas.sh)"
        if "openblas" in os.environ.get("LD_PRELOAD", "")
        else "the mlx wheel's own",
        "reps": args.reps,
        "max_tokens": args.max_tokens,
        "table": table,
        "runs": {name: [[{k: v for k, v in t.items() if k != "answer"} for t in run]
                        for run in rs] for name, rs in runs.items()},  # fmt: skip
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    print(f"[wrote {args.out}]")


if __name__ == "__main__":
    main()

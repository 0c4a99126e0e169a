"""Embedding mlx-specstream in a Python application.

Run: ``python examples/embed_in_app.py`` (uses the embedded default model).

Shows three things an app needs:

1. one model loaded once and reused across requests, behind a lock, since
   speculative decoding keeps one KV cache per generation and is batch-1;
2. a streaming callback that receives text as it is produced;
3. cancelling a generation midway (closing the generator frees its cache and
   leaves the model ready for the next request).
"""

import threading
import time
from typing import Callable, Optional

import mlx_specstream
from mlx_specstream.sample_utils import make_sampler


class CodeCompleter:
    """A tiny service object: load once, complete many times."""

    def __init__(self, model_path: Optional[str] = None):
        self.model, self.tokenizer = mlx_specstream.load(model_path)
        self._lock = threading.Lock()  # one generation at a time on this model

    def complete(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.0,
        on_text: Optional[Callable[[str], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
    ) -> dict:
        """Generates a completion, streaming text to ``on_text``; ``should_stop``
        is polled after every token and cancels the generation when it returns True."""
        sampler = make_sampler(temp=temperature)
        text, response, cancelled = "", None, False
        with self._lock:
            stream = mlx_specstream.stream_generate(
                self.model, self.tokenizer, prompt, max_tokens=max_tokens, sampler=sampler
            )
            try:
                for response in stream:
                    text += response.text
                    if on_text:
                        on_text(response.text)
                    if should_stop and should_stop():
                        cancelled = True
                        break
            finally:
                stream.close()  # releases the generation's cache at once
        return {
            "text": text,
            "tokens": response.generation_tokens if response else 0,
            "forward_passes": response.forward_passes if response else 0,
            "tokens_per_second": response.generation_tps if response else 0.0,
            "cancelled": cancelled,
        }


def main():
    app = CodeCompleter()

    print("--- 1. streaming a completion")
    result = app.complete(
        "def read_config(path):\n", max_tokens=64, on_text=lambda t: print(t, end="", flush=True)
    )
    print(
        f"\n[{result['tokens']} tokens in {result['forward_passes']} forward passes, "
        f"{result['tokens_per_second']:.1f} tokens/s]"
    )

    print("--- 2. cancelling after 0.2 s")
    start = time.perf_counter()
    result = app.complete(
        "class Cache:\n", max_tokens=500, should_stop=lambda: time.perf_counter() - start > 0.2
    )
    print(f"cancelled={result['cancelled']} after {result['tokens']} tokens")

    print("--- 3. the same model serves further requests, from several threads")
    results = {}

    def worker(i):
        results[i] = app.complete(f"def helper_{i}(x):\n", max_tokens=24, temperature=0.7)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in sorted(results):
        print(f"request {i}: {results[i]['tokens']} tokens: {results[i]['text']!r}")


if __name__ == "__main__":
    main()

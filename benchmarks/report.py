"""What every benchmark writes: the machine and versions, and its results as markdown + JSON."""

import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm

RESULTS = Path(__file__).parent / "results"


def machine_info(**extra) -> dict:
    """The command line, machine, device and versions, plus ``extra`` settings."""
    return dict(command=" ".join(["python"] + sys.argv), machine=platform.machine(),
                processor=platform.processor(), python=platform.python_version(),
                mlx=mx.__version__, mlx_lm=mlx_lm.__version__, device=str(mx.default_device()),
                **extra)  # fmt: skip


def shipped_dtype(model) -> str:
    """The dtype the embedded model computes in as loaded here (float32 on a CPU; on a GPU
    its stored bfloat16), as ``"float32"``."""
    from mlx_specstream.precision import compute_dtype

    return str(compute_dtype(model)).split(".")[-1]


def heading(title: str, info: dict) -> str:
    """A results file's first line: the title, device, versions and machine."""
    return f"# {title} ({info['device']}, MLX {info['mlx']}, mlx-lm {info['mlx_lm']}, {info['machine']})"


def write_results(name: str, tag: str, text: str, data: dict) -> Path:
    """Prints ``text`` and writes ``results/NAME[-TAG].md`` and ``.json`` (a dotted tag stays whole)."""
    print(text)
    stem = RESULTS / f"{name}{'-' + tag if tag else ''}"
    stem.parent.joinpath(stem.name + ".md").write_text(text)
    stem.parent.joinpath(stem.name + ".json").write_text(json.dumps(data, indent=1))
    return stem


def time_after_first(gen):
    """Times a decoding generator from its first item on (prefill and first pass excluded).

    Items are mlx-lm's ``(token, logprobs)``, one pass each, or ours
    ``(token, logprobs, from_draft, passes so far)``.

    Returns:
        tuple: the seconds and the passes after the first item, and every token.
    """
    tokens, t0, p0, passes = [], None, 0, 0
    for item in gen:
        tokens.append(item[0])
        passes = item[3] if len(item) > 3 else len(tokens)
        if t0 is None:
            t0, p0 = time.perf_counter(), passes
    return time.perf_counter() - t0, passes - p0, tokens

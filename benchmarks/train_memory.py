"""Peak memory and time of a stream-training step, with and without ``--grad-checkpoint``.

``python benchmarks/train_memory.py [--model DIR] [--batch-size 8] [--max-seq-length 256]``

On a base model (default: the shipped default model's base), streams attached as
``mlx_specstream.train`` attaches them, one optimizer step over a batch of windows cut
from this interpreter's ``json`` package sources (text the base has not memorised
matters not: memory and time depend on shapes only). Each mode runs a warm-up step,
then ``--steps`` measured ones; the peak is MLX's (``mx.get_peak_memory``) above what
was allocated before the step. Writes ``benchmarks/results/train_memory[-TAG].{md,json}``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
from report import heading, machine_info, write_results  # noqa: E402

from mlx_specstream.config import SpecStreamConfig  # noqa: E402
from mlx_specstream.streams import get_runtime  # noqa: E402
from mlx_specstream.train import (  # noqa: E402
    StreamLoss,
    attach_for_training,
    make_optimizer,
    make_step,
)
from mlx_specstream.train_data import text_windows  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "mlx_specstream" / "models" / "default"


def windows(tokenizer, batch_size: int, length: int):
    """``batch_size`` windows of ``length`` tokens of the ``json`` package's sources."""
    import json as package

    text = "\n".join(p.read_text() for p in sorted(Path(package.__file__).parent.glob("*.py")))
    ids = tokenizer.encode(text)
    out = text_windows(ids, length, 2)
    if len(out) < batch_size:
        raise SystemExit(f"only {len(out)} windows of {length} tokens in the json sources")
    return out[:batch_size]


def measure(model_dir: Path, examples, window_at_a_time: bool, steps: int, spec):
    model, _ = mlx_lm.load(str(model_dir))
    attach_for_training(model, spec, seed=0)
    streams = get_runtime(model).streams
    step = make_step(StreamLoss(model, 0.1), streams, make_optimizer(1e-3, steps + 1),
                     window_at_a_time=window_at_a_time)  # fmt: skip
    step([examples])  # warm-up: the optimizer state exists from here on
    peaks, times = [], []
    for _ in range(steps):
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        step([examples])
        times.append(time.perf_counter() - tic)
        peaks.append(mx.get_peak_memory() - before)
    params = dict(tree_flatten(streams.parameters()))
    return dict(peak_mb=max(peaks) / 2**20, step_s=float(np.median(times)),
                checksum=float(sum(mx.sum(v).item() for v in params.values())))  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_DIR))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--num-streams", type=int, default=3)
    p.add_argument("--num-stream-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    spec = SpecStreamConfig(num_streams=args.num_streams, num_stream_layers=args.num_stream_layers,
                            mode="lossless", stream_lora_rank=8)  # fmt: skip
    _, tokenizer = mlx_lm.load(args.model)
    examples = windows(tokenizer, args.batch_size, args.max_seq_length)
    rows = {}
    for name, flag in (("whole batch", False), ("--grad-checkpoint", True)):
        rows[name] = measure(Path(args.model), examples, flag, args.steps, spec)
        print(name, json.dumps(rows[name]), flush=True)
    info = machine_info(model=args.model, batch_size=args.batch_size,
                        max_seq_length=args.max_seq_length, num_streams=args.num_streams,
                        num_stream_layers=args.num_stream_layers, steps=args.steps)  # fmt: skip
    a, b = rows["whole batch"], rows["--grad-checkpoint"]
    lines = [
        heading("Stream training: peak memory of a step", info),
        "",
        f"`{info['command']}`: a batch of {args.batch_size} windows of {args.max_seq_length} "
        f"tokens, gamma {args.num_streams}, {args.num_stream_layers} stream layers.",
        "",
        "| mode | peak above the step's start (MB) | time per step (s) |",
        "|---|---|---|",
        *(f"| {k} | {v['peak_mb']:.1f} | {v['step_s']:.2f} |" for k, v in rows.items()),
        "",
        f"Peak x{b['peak_mb'] / a['peak_mb']:.2f}, time x{b['step_s'] / a['step_s']:.2f}; "
        f"the streams after the steps agree to {abs(a['checksum'] - b['checksum']):.2e} "
        "(sum of every parameter).",
        "",
    ]
    write_results("train_memory", args.tag, "\n".join(lines), {"info": info, "rows": rows})


if __name__ == "__main__":
    main()

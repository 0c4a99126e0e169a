"""Quantizes the base of a model directory with streams (or another drafter).

Run as ``python -m mlx_specstream.quantize --model DIR --out NEW [--q-bits 4]
[--q-group-size 64] [--q-mode affine] [--dtype bfloat16]``.

``mlx_lm.convert -q`` would quantize the base but leave the drafter behind. This
quantizes the base with ``mlx_lm``'s ``quantize_model`` (its defaults, modes and
``quantization`` config entry) and writes it with the drafter unchanged, bit for
bit, in float. Decoding stays lossless: the output equals mlx-lm's decoding of
the quantized base. Settings tuned on the float model (``tuned``) are dropped,
because they were measured on other weights: run ``mlx_specstream.tune --save``
on the result.
"""

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

import mlx.core as mx

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def quantize(
    model_path: str,
    out: str,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: str = "affine",
    dtype: Optional[str] = None,
) -> Path:
    """Writes ``out``: the model of ``model_path`` with its base quantized.

    Args:
        model_path (str): a model directory (or hub repo) that :func:`mlx_specstream.load` reads.
        out (str): the new directory; it must not exist.
        q_bits, q_group_size, q_mode: as ``mlx_lm.convert``'s (``None``: the mode's default).
        dtype (str, optional): cast the base's float weights first (``float16``,
          ``bfloat16``, ``float32``).

    Returns:
        Path: ``out``.

    Raises:
        FileExistsError: ``out`` exists.
        ValueError: the base is already quantized, or ``dtype`` is unknown.
    """
    from mlx_lm.utils import load as mlx_lm_load
    from mlx_lm.utils import quantize_model

    from .utils import _attach, read_stream_config, resolve_model_path, save

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite it.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    src = resolve_model_path(model_path)
    drafting = read_stream_config(src)  # (refuses a plain model, naming the ways to get one)
    model, tokenizer, config = mlx_lm_load(str(src), return_config=True)
    if "quantization" in config:
        raise ValueError(
            f"{src / 'config.json'} already has a 'quantization' entry "
            f"({config['quantization']}): its base is quantized."
        )
    if dtype is not None:
        model.set_dtype(DTYPES[dtype])
    # The base is quantized before the drafter is attached, so the drafter's
    # hooks wrap the quantized modules and its weights stay as they are.
    model, config = quantize_model(model, config, q_group_size, q_bits, mode=q_mode)
    _attach(model, src, dataclasses.replace(drafting, tuned=None))
    extra = [src / "prompts.jsonl"] if (src / "prompts.jsonl").exists() else []
    return save(out, model, tokenizer, config=config, extra_files=extra)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Quantize the base of a model with streams (or a drafter), keeping the drafter."
    )
    p.add_argument("--model", required=True, help="Model directory or Hugging Face repo")
    p.add_argument("--out", required=True, help="New model directory (must not exist)")
    p.add_argument("--q-bits", type=int, default=None, help="Bits per weight (default: 4)")
    p.add_argument(
        "--q-group-size", type=int, default=None, help="Group size for quantization (default: 64)"
    )
    p.add_argument(
        "--q-mode",
        default="affine",
        choices=["affine", "mxfp4", "nvfp4", "mxfp8"],
        help="The quantization mode (mlx_lm.convert's).",
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="Cast the base's weights first"
    )
    args = p.parse_args(argv)
    out = quantize(args.model, args.out, args.q_bits, args.q_group_size, args.q_mode, args.dtype)
    print(f"[INFO] wrote {out}; `python -m mlx_specstream.tune --model {out} --save` tunes it here")


if __name__ == "__main__":
    main()

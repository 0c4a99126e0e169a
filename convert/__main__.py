"""``python -m convert``: HF / PyTorch checkpoint with streams -> MLX model directory."""

import argparse

from .convert import DTYPES, convert


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face checkpoint with speculative streams to MLX."
    )
    parser.add_argument("--hf-path", required=True, help="Local HF model directory or hub id")
    parser.add_argument("--mlx-path", default="mlx_model", help="Output directory (must not exist)")
    parser.add_argument(
        "--adapter-path", default=None, help="PEFT LoRA adapter to merge (shared mode)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Base weights dtype")
    parser.add_argument("-q", "--quantize", action="store_true", help="Quantize the base model")
    parser.add_argument("--q-bits", type=int, default=4, help="Bits per weight")
    parser.add_argument("--q-group-size", type=int, default=64, help="Quantization group size")
    parser.add_argument("--revision", default=None, help="Hub revision")
    parser.add_argument(
        "--quantized-like",
        default=None,
        metavar="DIR",
        help="An mlx-lm model holding this base quantized (a package the base was restored "
        "from): its quantized tensors are reused, checked against the base's weights",
    )
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    out = convert(
        args.hf_path,
        args.mlx_path,
        adapter_path=args.adapter_path,
        dtype=args.dtype,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        revision=args.revision,
        quantized_like=args.quantized_like,
    )
    print(f"[INFO] wrote {out}")


if __name__ == "__main__":
    main()

"""``python -m convert.medusa --src DIR_OR_REPO --out DIR``: FasterDecoding's Medusa heads
saved by PyTorch (``medusa_lm_head.pt``) rewritten as ``medusa_lm_head.safetensors``, which
``mlx_specstream.load(base, drafter=OUT)`` reads.

Every tensor is kept, under its name and in its dtype (a residual block that FasterDecoding
repeats within a head is saved under each of its names, each its own copy);
``config.json`` is copied as it is. ``OUT`` must not exist.
"""

import argparse
from pathlib import Path

from .eagle3 import rewrite_pickles

PICKLE = "medusa_lm_head.pt"


def _pickle(src: Path):
    if not (src / PICKLE).is_file():
        raise FileNotFoundError(f"{src}: no {PICKLE} to convert")
    return [src / PICKLE]


def convert_medusa(src, out) -> Path:
    """Writes ``out``: ``src``'s ``config.json`` and its heads as
    ``medusa_lm_head.safetensors`` (:func:`~convert.eagle3.rewrite_pickles`)."""
    return rewrite_pickles(src, out, _pickle, "medusa_lm_head.safetensors", ["*.json", PICKLE])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="The Medusa heads' directory or Hub repo")
    p.add_argument("--out", required=True, help="Output directory (must not exist)")
    args = p.parse_args(argv)
    out = convert_medusa(args.src, args.out)
    print(f"[INFO] wrote {out} (use it as drafter=, --drafter)")


if __name__ == "__main__":
    main()

"""``python -m convert.eagle3 --src DIR_OR_REPO --out DIR``: an EAGLE-3 drafter saved by PyTorch
(``pytorch_model.bin``, or its shards and index) rewritten as ``model.safetensors``, which
``mlx_specstream.load(base, drafter=OUT)`` reads.

EAGLE's own checkpoints (yuhuili/EAGLE3-*, lmsys, AngelSlim's) are PyTorch pickles; the
runtime reads safetensors only (no torch). Every tensor is kept, under its name and in
its dtype; ``config.json`` is copied as it is. ``OUT`` must not exist.
"""

import argparse
import json
import shutil
from pathlib import Path
from typing import Dict


def _pickles(src: Path):
    """The checkpoint's ``.bin`` files: the index's shards, else ``pytorch_model.bin``."""
    index = src / "pytorch_model.bin.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / n for n in names]
    single = src / "pytorch_model.bin"
    if not single.exists():
        raise FileNotFoundError(f"{src}: no pytorch_model.bin (nor its index) to convert")
    return [single]


def read_tensors(files) -> Dict[str, "object"]:
    """Every tensor of the pickles ``files`` (``weights_only``: no code runs), each its
    own copy (a module saved twice under two names shares its storage)."""
    import torch

    tensors = {}
    for file in files:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        for key, value in state.items():
            if key in tensors:
                raise ValueError(f"{file}: tensor {key!r} is in two shards")
            tensors[key] = value.clone().contiguous()
    return tensors


def rewrite_pickles(src, out, pickles, written: str, patterns) -> Path:
    """Writes ``out``: ``src``'s ``config.json`` and the tensors of its pickles
    (``pickles(src)``) as one safetensors file named ``written``; ``src`` may be a Hub
    repo (its files matching ``patterns`` are fetched).

    Raises:
        FileExistsError: ``out`` exists.
        FileNotFoundError: ``src`` has no ``config.json`` or no pickle.
    """
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite it.")
    if not src.exists():  # (a Hub repo: its JSON files and pickles only)
        from huggingface_hub import snapshot_download

        src = Path(snapshot_download(str(src), allow_patterns=list(patterns)))
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src / 'config.json'} does not exist")
    tensors = read_tensors(pickles(src))
    out.mkdir(parents=True)
    shutil.copy(src / "config.json", out / "config.json")
    save_file(tensors, str(out / written), metadata={"format": "pt"})
    return out


def convert_eagle3(src, out) -> Path:
    """Writes ``out``: ``src``'s ``config.json`` and its tensors as ``model.safetensors``
    (:func:`rewrite_pickles`)."""
    return rewrite_pickles(src, out, _pickles, "model.safetensors", ["*.json", "*.bin"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="The EAGLE-3 checkpoint's directory or Hub repo")
    p.add_argument("--out", required=True, help="Output directory (must not exist)")
    args = p.parse_args(argv)
    out = convert_eagle3(args.src, args.out)
    print(f"[INFO] wrote {out} (use it as drafter=, --drafter)")


if __name__ == "__main__":
    main()

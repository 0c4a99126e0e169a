"""Carries a trained Hugging Face model between machines in small files.

``python -m convert.transport pack MODEL_DIR OUT_DIR`` /
``python -m convert.transport unpack OUT_DIR MODEL_DIR``

The GPU machine keeps nothing between loans and takes at most 64 MiB per run,
the tracked tree included; files come back at most 16 MB each. A 32M-parameter
base is 64 MB in bfloat16, so it travels as 8-bit: every floating matrix with at
least ``MIN_QUANTIZED`` elements becomes int8 with one float32 scale per row
(symmetric, ``scale = max|row| / 127``), everything else travels in float32.
The packed file is cut into parts of at most ``--part-mb`` MB, with a manifest
that holds each part's sha256.

``unpack`` writes the dequantized weights in float32 as a model directory. The
round trip is lossy (at most ``scale / 2`` per element), so when a model
travels, **the unpacked weights are the model**: every later stage (fine-tunes,
conversion, evaluation) starts from them, on whichever machine it runs.
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

MANIFEST = "transport.json"
PACKED = "weights.int8.safetensors"
MIN_QUANTIZED = 4096
SCALE_SUFFIX = ".__scale__"
# Small files of the model directory that travel as they are.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def quantize_rows(w):
    """``(int8 values, float32 per-row scales)`` of a 2-D float tensor."""
    import torch

    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q, scale):
    return q.float() * scale[:, None]


def load_weights(model_dir: Path, pattern: str = "*.safetensors") -> dict:
    """Every tensor of a model directory's ``pattern`` files, by name."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob(pattern))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no {pattern} weights")
    weights = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            if k in weights:
                raise ValueError(f"{f}: tensor {k!r} is also in another weights file")
            weights[k] = v
    return weights


def write_parts(data: bytes, folder: Path, stem: str, part_mb: float) -> list:
    """Cuts ``data`` into ``folder/STEM.partNN`` files of at most ``part_mb`` MB; returns
    their ``{"file", "sha256"}`` records, in order (for a manifest)."""
    size, parts = int(part_mb * 1e6), []
    for i in range(0, len(data), size):
        chunk = data[i : i + size]
        name = f"{stem}.part{len(parts):02d}"
        (folder / name).write_bytes(chunk)
        parts.append({"file": name, "sha256": hashlib.sha256(chunk).hexdigest()})
    return parts


def read_parts(folder: Path, parts: list, manifest_file: Path, what: str) -> bytes:
    """The data that :func:`write_parts` cut, each part checked against its sha256;
    a missing or damaged part is named (``what`` says whose part it is)."""
    chunks = []
    for part in parts:
        path = folder / part["file"]
        if not path.exists():
            raise FileNotFoundError(f"{path}: a part of {what} is missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise ValueError(f"{path}: sha256 differs from {manifest_file}'s (a damaged part)")
        chunks.append(data)
    return b"".join(chunks)


def pack(model_dir, out_dir, part_mb: float = 15.0) -> dict:
    """Writes ``out_dir`` (which must not exist): the parts, the side files and the
    manifest. Returns the manifest."""
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; refusing to overwrite it.")
    weights = load_weights(model_dir)
    packed, kinds = {}, {}
    for k, v in weights.items():
        if k.endswith(SCALE_SUFFIX):
            raise ValueError(f"{model_dir}: tensor {k!r} ends with the scales' suffix")
        if v.is_floating_point() and v.ndim == 2 and v.numel() >= MIN_QUANTIZED:
            packed[k], packed[k + SCALE_SUFFIX] = quantize_rows(v)
            kinds[k] = "int8-rows"
        else:
            packed[k] = v.float() if v.is_floating_point() else v
            kinds[k] = "exact"
    out_dir.mkdir(parents=True)
    whole = out_dir / PACKED
    save_file({k: v.contiguous() for k, v in packed.items()}, str(whole))
    data = whole.read_bytes()
    whole.unlink()
    parts = write_parts(data, out_dir, PACKED, part_mb)
    side = [f for f in SIDE_FILES if (model_dir / f).exists()]
    for f in side:
        shutil.copy(model_dir / f, out_dir / f)
    manifest = {"parts": parts, "side_files": side, "tensors": kinds, "bytes": len(data)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def unpack(packed_dir, model_dir) -> Path:
    """Writes the model directory ``model_dir`` (which must not exist) from a pack."""
    from safetensors.torch import load, save_file

    packed_dir, model_dir = Path(packed_dir), Path(model_dir)
    if model_dir.exists():
        raise FileExistsError(f"{model_dir} exists; refusing to overwrite it.")
    manifest_file = packed_dir / MANIFEST
    if not manifest_file.exists():
        raise FileNotFoundError(f"{manifest_file}: not a packed model (no manifest)")
    manifest = json.loads(manifest_file.read_text())
    packed = load(read_parts(packed_dir, manifest["parts"], manifest_file, "the packed model"))
    weights = {}
    for k, kind in manifest["tensors"].items():
        if kind == "int8-rows":
            weights[k] = dequantize_rows(packed[k], packed[k + SCALE_SUFFIX])
        else:
            weights[k] = packed[k]
    model_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(model_dir / "model.safetensors"))
    for f in manifest["side_files"]:
        shutil.copy(packed_dir / f, model_dir / f)
    return model_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="Model directory -> 8-bit parts")
    a.add_argument("model_dir")
    a.add_argument("out_dir")
    a.add_argument("--part-mb", type=float, default=15.0)
    b = sub.add_parser("unpack", help="8-bit parts -> model directory (float32)")
    b.add_argument("packed_dir")
    b.add_argument("model_dir")
    args = p.parse_args(argv)
    if args.command == "pack":
        m = pack(args.model_dir, args.out_dir, args.part_mb)
        print(f"[INFO] {len(m['parts'])} parts, {m['bytes'] / 1e6:.1f} MB, in {args.out_dir}")
    else:
        print(f"[INFO] wrote {unpack(args.packed_dir, args.model_dir)}")


if __name__ == "__main__":
    main()

"""Restores a build's base model and tokenizer from a shipped MLX model directory.

``python -m convert.from_package MODEL_DIR WORK``

Between sessions nothing survives but the committed tree: a build's working
directory (``runs/...``) is gone, and a 32M-parameter base is far too large to
commit on its own. The package does hold it, though: the embedded default model
is the base, in mlx-lm's format (3-bit for the code recipe), beside its streams.
This writes what the build's later stages read from it, **without MLX** (the GPU
machine has PyTorch only until MLX is installed):

* ``WORK/base/model``: a Hugging Face checkpoint whose weights are the package's
  as ``mx.dequantize`` gives them, bit for bit (``(q * scales) + biases`` in the
  scales' dtype, each operation rounded there), and whose config is the package's
  without mlx-lm's quantization keys and this package's streams section;
* ``WORK/tokenizer``: the package's tokenizer files;
* ``WORK/base/from-package.json``: where it came from (each file's sha256).

The restored base is the one the package ships, so streams and drafters trained
on it later fit the model users run. The streams file is not part of the base and
is left out. Nothing is overwritten: an existing ``WORK/base`` or ``WORK/tokenizer``
is refused.
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from .transport import load_weights

# Keys mlx-lm adds to a quantized model's config, and this package's streams section.
DROPPED_CONFIG_KEYS = ("quantization", "quantization_config", "speculative_streaming")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "chat_template.jinja")  # fmt: skip
SIDE_FILES = ("generation_config.json",)
STREAMS_FILE = "speculative_streams.safetensors"
PROVENANCE = "from-package.json"
ROWS_AT_ONCE = 256


def unpack_bits(packed, bits: int, n: int):
    """The ``n`` unsigned ``bits``-bit values per row that MLX packs into ``uint32`` words,
    as one little-endian bit stream per row (value ``i`` at bits ``i*bits .. i*bits+bits-1``).

    Example: the word ``0x00000021`` holds, at 4 bits, the values ``1, 2, 0, 0, 0, 0, 0, 0``.
    """
    import torch

    words = packed.to(torch.int64) & 0xFFFFFFFF  # (safetensors reads uint32 as int32 here)
    stream = (words[..., None] >> torch.arange(32)) & 1  # (..., words, 32) bits, low first
    stream = stream.reshape(*words.shape[:-1], -1)
    if stream.shape[-1] < n * bits:
        raise ValueError(f"{stream.shape[-1]} bits per row hold fewer than {n} values of {bits}")
    chunks = stream[..., : n * bits].reshape(*words.shape[:-1], n, bits)
    return (chunks * (1 << torch.arange(bits))).sum(-1)


def dequantize(packed, scales, biases, bits: int, group_size: int):
    """MLX's affine dequantization: ``q * scales + biases`` per group of ``group_size``
    values along the last axis, computed in the scales' dtype as ``mx.dequantize`` does."""
    import torch

    shape, groups, n = scales.shape, scales.shape[-1], ROWS_AT_ONCE
    packed, scales, biases = (t.reshape(-1, t.shape[-1]) for t in (packed, scales, biases))
    rows = []
    for i in range(0, packed.shape[0], n):  # (its bit stream takes 256 bytes a word)
        q = unpack_bits(packed[i : i + n], bits, groups * group_size)
        q = q.to(scales.dtype).reshape(-1, groups, group_size)
        rows.append(q * scales[i : i + n, :, None] + biases[i : i + n, :, None])
    return torch.cat(rows).reshape(*shape[:-1], groups * group_size)


def _layer_quantization(config: dict, name: str):
    """``(bits, group_size)`` of the weight ``name`` (``None``: not quantized), from the
    config's ``quantization`` section and its per-layer entries (mlx-lm's format)."""
    q = config.get("quantization")
    if q is None:
        return None
    layer = q.get(name[: -len(".weight")], True)
    if layer is False:
        return None
    spec = {**q, **layer} if isinstance(layer, dict) else q
    mode = spec.get("mode", "affine")
    if mode != "affine":
        raise ValueError(f"quantization mode {mode!r} of {name!r}: only 'affine' is restored")
    return int(spec["bits"]), int(spec["group_size"])


def base_weights(model_dir: Path, config: dict) -> dict:
    """The base's tensors, by Hugging Face name, dequantized where the package quantized."""
    stored = load_weights(model_dir, "model*.safetensors")
    weights = {}
    for k, v in stored.items():
        if k.endswith((".scales", ".biases")):
            if k.rsplit(".", 1)[0] + ".weight" not in stored:
                raise ValueError(f"{model_dir}: {k!r} has no weight beside it")
            continue
        quant = _layer_quantization(config, k) if k.endswith(".weight") else None
        if quant is not None and k[: -len("weight")] + "scales" in stored:
            stem = k[: -len("weight")]
            if stem + "biases" not in stored:
                raise ValueError(f"{model_dir}: {k!r} is quantized but {stem}biases is missing")
            bits, group = quant
            v = dequantize(v, stored[stem + "scales"], stored[stem + "biases"], bits, group)
        elif not v.is_floating_point():
            raise ValueError(f"{model_dir}: {k!r} is {v.dtype} without scales (a quantized "
                             "weight whose config entry or scales are missing)")  # fmt: skip
        weights[k] = v.contiguous()
    return weights


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def restore(model_dir, work) -> Path:
    """Writes ``work/base/model``, ``work/tokenizer`` and the provenance record from the
    mlx-lm model directory ``model_dir``; returns ``work/base/model``."""
    from safetensors.torch import save_file

    model_dir, work = Path(model_dir), Path(work)
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: not a model directory (no config.json)")
    for d in (work / "base", work / "tokenizer"):
        if d.exists():
            raise FileExistsError(f"{d} exists; refusing to overwrite it.")
    tokenizer = [f for f in TOKENIZER_FILES if (model_dir / f).exists()]
    if "tokenizer.json" not in tokenizer:
        raise FileNotFoundError(
            f"{model_dir / 'tokenizer.json'}: the package's tokenizer is missing"
        )
    config = json.loads(config_file.read_text())
    weights = base_weights(model_dir, config)
    hf_config = {k: v for k, v in config.items() if k not in DROPPED_CONFIG_KEYS}
    if "lm_head.weight" not in weights:  # (mlx-lm drops a tied head: the embedding is it)
        if hf_config.get("tie_word_embeddings") is False:
            raise ValueError(f"{config_file}: tie_word_embeddings is false but the weights have "
                             "no lm_head.weight")  # fmt: skip
        hf_config["tie_word_embeddings"] = True
    out = work / "base" / "model"
    out.mkdir(parents=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (work / "tokenizer").mkdir(parents=True)
    for f in tokenizer:
        shutil.copy(model_dir / f, out / f)
        shutil.copy(model_dir / f, work / "tokenizer" / f)
    for f in SIDE_FILES:
        if (model_dir / f).exists():
            shutil.copy(model_dir / f, out / f)
    record = {
        "from": str(model_dir.resolve()),
        "quantization": config.get("quantization"),
        "files": {p.name: _sha256(p) for p in sorted(model_dir.iterdir())
                  if p.is_file() and p.name != STREAMS_FILE},  # fmt: skip
        "tensors": len(weights),
    }
    (work / "base" / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="a shipped mlx-lm model directory (e.g. the default's)")
    p.add_argument("work", help="the build's working directory (its base/ must not exist)")
    args = p.parse_args(argv)
    out = restore(args.model_dir, args.work)
    print(f"[INFO] wrote {out} and {Path(args.work) / 'tokenizer'} from {args.model_dir}")


if __name__ == "__main__":
    main()

"""Hugging Face / PyTorch checkpoint with speculative streams -> MLX model directory.

``python -m convert --hf-path DIR_OR_REPO --mlx-path OUT [--adapter-path PEFT_DIR]
[--dtype float16] [-q --q-bits 4 --q-group-size 64]``

Input: a ``transformers`` model directory (or hub id) whose ``config.json`` has
a ``"speculative_streaming"`` section, with weights in single or sharded
``model*.safetensors`` or ``pytorch_model*.bin``, and stream tensors either
in ``speculative_streams.safetensors`` or inside the weights under the
``speculative_streams.`` prefix. A PEFT LoRA adapter (shared mode) is merged
into the base. Output: an mlx-lm model directory plus
``speculative_streams.safetensors`` that ``mlx_specstream.load`` runs; the
streams stay float32 when the base is cast or quantized.
"""

import json
from pathlib import Path
from typing import Dict, Optional, Union

import mlx.core as mx

from mlx_specstream.config import (
    CONFIG_KEY,
    DRAFTER_FILE,
    DRAFTER_KEY,
    DrafterConfig,
    SpecStreamConfig,
)
from mlx_specstream.streams import STREAMS_FILE

STREAM_PREFIX = "speculative_streams."
DRAFTER_PREFIX = "drafter."
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def _progress(items, desc):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file", leave=False)


def _read_safetensors(path: Path) -> Dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises a bare RuntimeError/ValueError on corrupt files
        raise ValueError(f"{path}: cannot read safetensors file ({e})") from e


def _read_bin(path: Path) -> Dict[str, mx.array]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path}: reading .bin checkpoints needs torch (pip install torch==2.13.0)"
        ) from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read PyTorch checkpoint ({e})") from e
    out = {}
    for name, t in state.items():
        # numpy has no bfloat16: go through float32 and cast back.
        arr = mx.array(t.detach().float().numpy())
        out[name] = (
            arr.astype(mx.bfloat16)
            if t.dtype == torch.bfloat16
            else arr.astype(DTYPES.get(str(t.dtype).replace("torch.", ""), mx.float32))
        )
    return out


def weight_files(model_dir: Path):
    """The checkpoint files of ``model_dir``: safetensors preferred, then ``.bin``."""
    files = sorted(p for p in model_dir.glob("model*.safetensors"))
    if not files:
        files = sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir}: no weights (model*.safetensors or pytorch_model*.bin)."
        )
    for index in list(model_dir.glob("*.index.json")):
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (model_dir / s).exists())
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
    return files


def read_weights(model_dir: Path) -> Dict[str, mx.array]:
    """All tensors of a checkpoint, with the file each came from checked for duplicates."""
    weights, origin = {}, {}
    for path in _progress(weight_files(model_dir), "reading weights"):
        part = _read_safetensors(path) if path.suffix == ".safetensors" else _read_bin(path)
        for k, v in part.items():
            if k in weights:
                raise ValueError(f"{path}: tensor '{k}' also appears in {origin[k]}")
            weights[k], origin[k] = v, path
    return weights


def stream_weight_map(config: SpecStreamConfig, hidden: int, lora_shapes=None) -> Dict[str, tuple]:
    """The explicit name -> shape map of the stream tensors a config declares."""
    shapes = {"embeddings": (config.num_streams, hidden)}
    if config.prune_adapter_rank:
        r = config.prune_adapter_rank
        shapes["prune_adapter.down.weight"] = (r, hidden)
        shapes["prune_adapter.up.weight"] = (hidden, r)
    if config.stream_init_rank:
        r = config.stream_init_rank
        shapes["stream_init.down.weight"] = (r, hidden)
        shapes["stream_init.up.weight"] = (hidden, r)
    for j, layer in enumerate(lora_shapes or []):
        for name, (d_in, d_out) in layer.items():
            shapes[f"lora.{j}.{name}.lora_a"] = (config.stream_lora_rank, d_in)
            shapes[f"lora.{j}.{name}.lora_b"] = (d_out, config.stream_lora_rank)
    return shapes


def drafter_names_to_mlx(model, tensors: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """ParallelSpec's ``layer.*`` tensors carry the HF names of a decoder layer;
    the architecture's own ``sanitize`` maps them as it maps the base's layers."""
    if not hasattr(model, "sanitize") or not any(k.startswith("layer.") for k in tensors):
        return tensors
    i = len(model.layers) - 1
    probe = f"model.layers.{i}."
    layer = {probe + k[len("layer.") :]: v for k, v in tensors.items() if k.startswith("layer.")}
    mapped = model.sanitize(dict(layer))
    out = {k: v for k, v in tensors.items() if not k.startswith("layer.")}
    for k, v in mapped.items():
        if not k.startswith(probe):
            raise ValueError(f"drafter tensor '{k}' does not map into one decoder layer")
        out["layer." + k[len(probe) :]] = v
    return out


def check_tensors(found: Dict[str, mx.array], expected: Dict[str, tuple], where: str):
    """Refuses missing, unexpected and mis-shaped tensors, naming each."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"{where}: missing tensors {missing}")
    if unexpected:
        raise ValueError(f"{where}: unexpected tensors {unexpected}")
    for name, shape in expected.items():
        if tuple(found[name].shape) != tuple(shape):
            raise ValueError(
                f"{where}: tensor '{name}' has shape {tuple(found[name].shape)}, expected {tuple(shape)}"
            )


def merge_peft_adapter(weights: Dict[str, mx.array], adapter_dir: Path) -> int:
    """Merges a PEFT LoRA adapter into ``weights`` in place: W += B @ A * scale."""
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} does not exist (not a PEFT adapter directory).")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA.")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
    files = sorted(adapter_dir.glob("adapter_model*.safetensors")) or sorted(
        adapter_dir.glob("adapter_model*.bin")
    )
    if not files:
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors or .bin")
    adapter = {}
    for f in files:
        adapter.update(_read_safetensors(f) if f.suffix == ".safetensors" else _read_bin(f))
    merged = 0
    for key in sorted(k for k in adapter if ".lora_A." in k):
        base = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        a, b = adapter[key], adapter.get(key.replace(".lora_A.", ".lora_B."))
        target = f"{base}.weight"
        if b is None or target not in weights:
            raise ValueError(
                f"{files[0]}: LoRA tensor '{key}' has no matching lora_B or base weight '{target}'"
            )
        w = weights[target]
        delta = (b.astype(mx.float32) @ a.astype(mx.float32)) * scale
        if cfg.get("fan_in_fan_out"):
            delta = delta.T
        weights[target] = (w.astype(mx.float32) + delta).astype(w.dtype)
        merged += 1
    return merged


# Activations mlx-lm hard-codes for some architectures, whatever hidden_act says.
MLX_LM_ACTIVATIONS = {
    "gpt_neox": {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"},
    "starcoder2": {"gelu"},
}


def warn_activation_mismatch(config: dict, config_file) -> None:
    allowed = MLX_LM_ACTIVATIONS.get(config.get("model_type"))
    act = config.get("hidden_act")
    if allowed and act and act not in allowed:
        print(
            f"[WARNING] {config_file}: hidden_act={act!r}, but mlx-lm's {config['model_type']} always "
            f"uses {sorted(allowed)[0]!r}; MLX logits will differ slightly from PyTorch's."
        )


def normalize_rope_config(config: dict) -> None:
    """Copies transformers-5 ``rope_parameters`` to the top-level ``rope_theta`` /
    ``rope_scaling`` keys that several mlx-lm architectures read (otherwise they
    silently fall back to their own default theta)."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return
    if "rope_theta" in params:
        config.setdefault("rope_theta", params["rope_theta"])
    if "partial_rotary_factor" in params:
        config.setdefault("partial_rotary_factor", params["partial_rotary_factor"])
    if params.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", params)
    if config.get("model_type") == "gpt_neox":  # mlx-lm keeps the transformers-4 names
        config.setdefault("rotary_emb_base", config.get("rope_theta", 10000.0))
        config.setdefault("rotary_pct", config.get("partial_rotary_factor", 1.0))


def resolve(path_or_repo: str, revision: Optional[str] = None) -> Path:
    path = Path(path_or_repo)
    if path.exists():
        return path
    if path.is_absolute() or path_or_repo.startswith((".", "~")) or path_or_repo.count("/") > 1:
        raise FileNotFoundError(f"{path} does not exist.")
    from huggingface_hub import snapshot_download

    patterns = [
        "*.json",
        "*.safetensors",
        "*.bin",
        "tokenizer.model",
        "*.txt",
        "*.jinja",
        "*.tiktoken",
    ]
    return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=patterns))


def quantize_like_package(model, config: dict, package: Path) -> dict:
    """Quantizes ``model``'s layers as the mlx-lm model in ``package`` stores them, with its
    very tensors, after checking that each dequantizes to the layer's weight (so the
    package's base is this one); returns ``config`` with the package's quantization."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    package_config = json.loads((package / "config.json").read_text())
    section = package_config.get("quantization")
    if section is None:
        raise ValueError(f"{package / 'config.json'}: not a quantized model (no quantization)")
    stored = {}
    for f in sorted(package.glob("model*.safetensors")):
        stored.update(mx.load(str(f)))
    own = dict(tree_flatten(model.parameters()))
    layers = {}
    for k in stored:
        if k.endswith(".scales"):
            path = k[: -len(".scales")]
            spec = section.get(path) if isinstance(section.get(path), dict) else section
            if spec.get("mode", "affine") != "affine":
                raise ValueError(f"{package}: {path} is {spec['mode']}; only affine is reused")
            bits, group = int(spec["bits"]), int(spec["group_size"])
            weight = stored[path + ".weight"]
            values = mx.dequantize(weight, stored[k], stored[path + ".biases"], group, bits)
            if path + ".weight" not in own or not mx.array_equal(values, own[path + ".weight"]):
                raise ValueError(
                    f"{package}: {path}.weight does not dequantize to this model's weight: "
                    "the package holds another base (or this one was fine-tuned)"
                )
            layers[path] = {"bits": bits, "group_size": group}
    nn.quantize(model, class_predicate=lambda path, m: layers.get(path, False))
    model.load_weights([(k, v) for k, v in stored.items() if k.rsplit(".", 1)[0] in layers],
                       strict=False)  # fmt: skip
    for key in ("quantization", "quantization_config"):
        if key in package_config:
            config[key] = package_config[key]
    return config


def convert(
    hf_path: str,
    mlx_path: Union[str, Path],
    adapter_path: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    revision: Optional[str] = None,
    quantized_like: Optional[Union[str, Path]] = None,
) -> Path:
    """Converts a HF checkpoint with streams into an MLX model directory.

    Args:
        hf_path: local directory or hub id.
        mlx_path: the new output directory (must not exist).
        adapter_path: a PEFT LoRA adapter to merge into the base (shared mode).
        dtype: ``float16``, ``bfloat16`` or ``float32`` for the base weights.
          Default: the checkpoint's own.
        quantize: quantize the base (affine, ``q_bits``/``q_group_size``).
        quantized_like: an mlx-lm model directory holding this base quantized (the package
          a build restored its base from, ``convert.from_package``): its quantized tensors
          are taken as they are, once every one dequantizes to the base's weight, instead of
          quantizing anew (which moves 5-51% of the codes of a dequantized base).

    Returns:
        Path: ``mlx_path``.
    """
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import _get_classes, quantize_model

    from mlx_specstream.streams import attach_streams, get_runtime, lora_shapes
    from mlx_specstream.utils import save

    mlx_path = Path(mlx_path)
    if mlx_path.exists():
        raise FileExistsError(f"{mlx_path} already exists; refusing to overwrite it.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    src = resolve(hf_path, revision)
    config_file = src / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} does not exist.")
    config = json.loads(config_file.read_text())
    if CONFIG_KEY not in config and DRAFTER_KEY not in config:
        raise ValueError(
            f"{config_file} has no '{CONFIG_KEY}' or '{DRAFTER_KEY}' section: this is not a "
            "checkpoint with streams or a drafter (fine-tune one with `python -m convert.finetune` "
            "or `python -m convert.train_drafter`)."
        )
    if CONFIG_KEY in config and DRAFTER_KEY in config:
        raise ValueError(f"{config_file} has both a '{CONFIG_KEY}' and a '{DRAFTER_KEY}' section.")
    key, cls, file = (
        (CONFIG_KEY, SpecStreamConfig, STREAMS_FILE)
        if CONFIG_KEY in config
        else (DRAFTER_KEY, DrafterConfig, DRAFTER_FILE)
    )
    try:
        spec = cls.from_dict(config[key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: {e}") from e
    prefix = STREAM_PREFIX if key == CONFIG_KEY else DRAFTER_PREFIX

    weights = read_weights(src)
    streams = {k[len(prefix) :]: weights.pop(k) for k in list(weights) if k.startswith(prefix)}
    stream_file = src / file
    if stream_file.exists():
        for k, v in _read_safetensors(stream_file).items():
            if k in streams:
                raise ValueError(f"{stream_file}: '{k}' is also in the model weights")
            streams[k] = v
    if not streams:
        raise ValueError(
            f"{config_file} declares '{key}' but {src} has no "
            f"{'stream' if key == CONFIG_KEY else 'drafter'} tensors "
            f"(neither {file} nor '{prefix}*' keys)."
        )
    if adapter_path is not None:
        if spec.mode == "lossless":  # (drafters keep the base frozen too)
            raise ValueError(
                f"{adapter_path}: a PEFT adapter changes the base model, but lossless mode keeps it "
                f"frozen; stream-only LoRA belongs in {STREAMS_FILE}."
            )
        n = merge_peft_adapter(weights, Path(adapter_path))
        print(f"[INFO] merged {n} LoRA deltas from {adapter_path}")

    try:
        model_class, args_class = _get_classes(config)
    except ValueError as e:
        raise ValueError(f"{config_file}: unsupported architecture: {e}") from e
    normalize_rope_config(config)
    warn_activation_mismatch(config, config_file)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    from mlx.utils import tree_flatten

    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    check_tensors(weights, expected, f"{src} (base model weights)")
    model.load_weights(list(weights.items()))
    hidden = int(config.get("hidden_size") or config.get("n_embd"))
    vocab = expected[next(k for k in expected if "embed" in k and k.endswith("weight"))][0]

    tokenizer = load_tokenizer(src)
    if len(tokenizer.get_vocab()) > vocab:
        raise ValueError(
            f"{src}: the tokenizer has {len(tokenizer.get_vocab())} tokens but the embedding "
            f"has only {vocab} rows."
        )
    if dtype is not None:
        model.set_dtype(DTYPES[dtype])
        config["torch_dtype"] = dtype
    if quantized_like is not None:
        if quantize:
            raise ValueError("--quantized-like takes the package's bits: drop --quantize")
        config = quantize_like_package(model, config, Path(quantized_like))
    elif quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits)

    if key == DRAFTER_KEY:
        from mlx_specstream.drafters import attach_drafter

        streams = drafter_names_to_mlx(model, streams)
        attach_drafter(model, spec)  # shape template; replaced below
        module = get_runtime(model).drafter
        expected = {k: v.shape for k, v in tree_flatten(module.parameters())}
        check_tensors(streams, expected, f"{src} (drafter tensors)")
    else:
        attach_streams(model, spec)  # shape template; replaced below
        expected = stream_weight_map(spec, hidden, lora_shapes(model, spec))
        check_tensors(streams, expected, f"{src} (stream tensors)")
        module = get_runtime(model).streams
    module.load_weights([(k, v.astype(mx.float32)) for k, v in streams.items()], strict=True)
    mx.eval(module.parameters())
    config.pop(key)
    # Keep the generation config (extra EOS ids) next to the model, as mlx-lm does.
    extra = [p for p in [src / "generation_config.json"] if p.exists()]
    return save(mlx_path, model, tokenizer, config, extra_files=extra)

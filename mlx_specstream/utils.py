"""Loading and saving models with speculative streams."""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import CONFIG_KEY, DRAFTER_FILE, DRAFTER_KEY, DrafterConfig, SpecStreamConfig
from .draft_vocab import FILE as DRAFT_VOCAB_FILE
from .draft_vocab import drafts_by_head, save_draft_vocab, use_draft_vocab
from .drafters import attach_drafter
from .dflash import attach_dflash, is_dflash_checkpoint
from .eagle import attach_eagle, is_eagle_checkpoint
from .eagle1 import attach_eagle1, is_eagle1_checkpoint
from .medusa import attach_medusa, is_medusa_checkpoint
from .mtp import (
    attach_mtp,
    fetch_mtp_checkpoint,
    has_mtp_weights,
    mtp_config,
    mtp_layers_in_config,
    use_mtp_layers,
)
from .precision import device_key
from .recurrent import chains_only, split_recurrent_mixers
from .streams import STREAMS_FILE, attach_streams, attach_verifier, get_runtime

ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    STREAMS_FILE,
    DRAFTER_FILE,
    DRAFT_VOCAB_FILE,
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


def resolve_model_path(path_or_hf_repo: str, revision: Optional[str] = None) -> Path:
    """A local directory as is; anything else is fetched from the Hugging Face Hub."""
    path = Path(path_or_hf_repo)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; expected a model directory.")
        return path
    if not is_hub_id(path_or_hf_repo):
        raise FileNotFoundError(f"Model directory {path} does not exist.")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(path_or_hf_repo, revision=revision, allow_patterns=ALLOW_PATTERNS)
    )


def is_hub_id(path_or_hf_repo: str) -> bool:
    """Whether a path that does not exist reads as a Hugging Face repo (``owner/name``)."""
    return not (
        Path(path_or_hf_repo).is_absolute()
        or path_or_hf_repo.startswith((".", "~"))
        or path_or_hf_repo.count("/") > 1
    )


def is_plain(model_path: Path) -> bool:
    """Whether ``model_path`` holds a plain mlx-lm model: no drafting section in
    its ``config.json`` and no stream or drafter weights."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return not any(key in config for key in (CONFIG_KEY, DRAFTER_KEY)) and not any(
        (Path(model_path) / f).exists() for f in (STREAMS_FILE, DRAFTER_FILE)
    )


def read_stream_config(model_path: Path) -> Union[SpecStreamConfig, DrafterConfig]:
    """Reads and checks the drafting section of ``model_path/config.json``:
    ``"speculative_streaming"`` (streams) or ``"drafter"`` (Medusa, ParallelSpec).

    Raises:
        ValueError: when a section and its weight file do not come together.
    """
    config_file = model_path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} does not exist.")
    with open(config_file) as f:
        config = json.load(f)
    found = []
    for key, file, cls in (
        (CONFIG_KEY, STREAMS_FILE, SpecStreamConfig),
        (DRAFTER_KEY, DRAFTER_FILE, DrafterConfig),
    ):
        section, has_file = config.get(key), (model_path / file).exists()
        if section is None and has_file:
            raise ValueError(
                f"{model_path / file} exists but {config_file} has no '{key}' section."
            )
        if section is not None and not has_file:
            raise ValueError(
                f"{config_file} has a '{key}' section but {model_path / file} is missing."
            )
        if section is not None:
            try:
                found.append(cls.from_dict(section))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{config_file}: {e}") from e
    if not found:
        mtp = ""
        if mtp_layers_in_config(config):  # (declared, but not in its safetensors)
            n = mtp_layers_in_config(config)
            said = "Its config declares" if mtp_layers_in_config(config, True) else (
                f"Checkpoints of {config['model_type']} have"
            )  # fmt: skip
            mtp = (
                f" {said} {n} MTP layer(s), but its safetensors hold "
                "none (mlx_lm.convert drops them): pass the original checkpoint as drafter= "
                "(--drafter) to draft with its MTP layer."
            )
        raise ValueError(
            f"{model_path} is a plain model: {config_file} has no '{CONFIG_KEY}' or "
            f"'{DRAFTER_KEY}' section. Convert a model with streams or a drafter, train streams "
            "(python -m mlx_specstream.train), or decode it with prompt lookup (--draft ngram, "
            "draft='ngram') or a draft model (--draft-model DIR, draft_model=); "
            "python -m mlx_specstream.tune --model DIR --save measures which pays on this "
            "device and keeps it for the command lines." + mtp
        )
    if len(found) > 1:
        raise ValueError(
            f"{config_file} has both a '{CONFIG_KEY}' and a '{DRAFTER_KEY}' section; a model "
            "directory holds one drafting method (load another with drafter=...)."
        )
    return found[0]


def _attach(model, model_path: Path, config):
    if isinstance(config, DrafterConfig):
        attach_drafter(model, config, weights=model_path / DRAFTER_FILE)
    else:
        attach_streams(model, config, weights=model_path / STREAMS_FILE)


def _base_fingerprint(config_file: Path) -> dict:
    config = json.loads(config_file.read_text())
    text = {**config, **(config.get("text_config") or {})}  # (Qwen3.5's: its language model's)
    keys = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    return {"model_type": config.get("model_type"), **{k: text.get(k) for k in keys}}


def load(
    path_or_hf_repo: Optional[str] = None,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    drafter: Optional[str] = None,
    allow_plain: bool = False,
    num_mtp_layers: Optional[int] = None,
    draft_vocab: Union[None, bool, str, Path] = None,
    dequantize: bool = False,
) -> Union[Tuple[nn.Module, Any], Tuple[nn.Module, Any, Dict[str, Any]]]:
    """Loads a model with speculative streams (or another drafter) and its tokenizer.

    The arguments up to ``trust_remote_code`` are ``mlx_lm.load``'s, in its order.

    Args:
        path_or_hf_repo (str, optional): a directory with an mlx-lm model plus
          ``speculative_streams.safetensors`` and the ``"speculative_streaming"``
          config section (or ``drafter.safetensors`` and a ``"drafter"``
          section), or a Hugging Face repo holding one. ``None`` loads the
          embedded default model.
        tokenizer_config (dict, optional): extra tokenizer arguments.
        model_config (dict, optional): overrides of the model's config, as in mlx-lm.
        adapter_path (str, optional): LoRA or DoRA adapters from ``mlx_lm.lora``
          applied to the base, as ``mlx_lm.load`` applies them: decoding then
          equals mlx-lm's decoding of the adapted model. The drafts still come
          from streams trained on the base, so they may be accepted less often.
        lazy (bool): leave the base's weights unevaluated until first used. Default: ``False``.
        return_config (bool): also return the model's config dict. Default: ``False``.
        revision (str, optional): hub revision.
        trust_remote_code (bool): passed to mlx-lm's loader. Default: ``False``.
        drafter (str, optional): a model directory (or repo) whose drafter
          (streams, Medusa heads, ParallelSpec, MTP layers), or an EAGLE-3, EAGLE-1,
          DFlash or released Medusa checkpoint (FasterDecoding's, vLLM's, TGI's heads),
          replaces the model's own. It
          must have been trained on this base: the base is used as it is, so a
          shared-mode stream model (whose base was fine-tuned) is refused.
        allow_plain (bool): load a plain mlx-lm model (no streams, no drafter)
          with the tree verifier only, for prompt lookup (``draft="ngram"``),
          instead of refusing it. Default: ``False``.
        num_mtp_layers (int, optional): where the drafter is a checkpoint's MTP
          layers, how many of them draft (the first ones; from a checkpoint only
          those are read). Default: every layer the checkpoint has (at most 3), or
          as the model directory's config says (or its tuning for this device).
        draft_vocab (str or bool, optional): a draft vocabulary file
          (``python -m mlx_specstream.draft_vocab``): the drafter's head ranks only
          its tokens, which costs less a level on a large vocabulary and stays
          lossless. Default (``None``): the drafter directory's own
          ``draft_vocab.safetensors``, if it has one. ``False``: every token.
        dequantize (bool): load a quantized base's layers as float matrices (the values
          ``mx.dequantize`` gives) before any drafter attaches, as
          ``mlx_lm.utils.dequantize_model`` does: where MLX's quantized matmuls are slow
          (its CPU backend: 10x slower than float32 on the embedded model). The model
          decoded is then the dequantized one. Default: ``False`` (the embedded model:
          dequantized on a CPU).

    Returns:
        tuple: ``(model, tokenizer)``, or ``(model, tokenizer, config)`` with
        ``return_config``, as ``mlx_lm.load`` returns them.
    """
    mlx_lm_args = dict(
        tokenizer_config=tokenizer_config,
        model_config=model_config,
        adapter_path=adapter_path,
        lazy=lazy,
        trust_remote_code=trust_remote_code,
    )
    if path_or_hf_repo is None:
        from .default_model import load_default

        loaded = load_default(
            drafter, return_config=return_config, draft_vocab=draft_vocab,
            dequantize=dequantize or None, **mlx_lm_args,
        )  # fmt: skip
        if num_mtp_layers is not None:
            use_mtp_layers(loaded[0], num_mtp_layers)
        return loaded
    from mlx_lm.utils import dequantize_model
    from mlx_lm.utils import load as mlx_lm_load

    def base_load(path):
        model, tokenizer, config = mlx_lm_load(str(path), return_config=True, **mlx_lm_args)
        if dequantize:  # (before a drafter's hooks take the layers as they are)
            dequantize_model(model)
        return model, tokenizer, config

    def finish(model, tokenizer, config):
        _use_draft_vocab(model, source, draft_vocab)
        return (model, tokenizer, config) if return_config else (model, tokenizer)

    model_path = resolve_model_path(path_or_hf_repo, revision)
    source, shapes = model_path, None
    if drafter is not None:  # (a Hub checkpoint's MTP layer: its shards only, not all of it)
        remote = not Path(drafter).exists() and is_hub_id(drafter)
        fetched = fetch_mtp_checkpoint(drafter, revision) if remote else None
        source, shapes = fetched or (resolve_model_path(drafter, revision), None)
    own = _own_format_drafter(source) if drafter is not None else None
    if drafter is None and is_plain(model_path) and is_medusa_checkpoint(model_path):
        own = "a Medusa", attach_medusa  # (heads beside its own weights: TGI's Medusa models)
    if own is not None:  # an EAGLE-3, DFlash, EAGLE-1 or Medusa drafter's checkpoint
        name, attach = own
        if num_mtp_layers is not None:
            raise ValueError(
                f"num_mtp_layers={num_mtp_layers}: {source} holds {name} drafter, not MTP layers"
            )
        _refuse_shared_base(model_path, source)
        model, tokenizer, config = base_load(model_path)
        # (Medusa heads quantized as the base is, as a checkpoint's MTP layers are)
        quantized = {"quantization": config.get("quantization")} if attach is attach_medusa else {}
        attach(model, source, **quantized)
        return finish(model, tokenizer, config)
    if is_plain(source) and has_mtp_weights(source):  # the checkpoint's own MTP layer
        if drafter is not None:
            _check_drafter_base(model_path, source)
        model, tokenizer, config = base_load(model_path)
        attach_mtp(model, source, mtp_config(source, num_mtp_layers, shapes),
                   quantization=config.get("quantization"), shapes=shapes)  # fmt: skip
        return finish(model, tokenizer, config)
    if num_mtp_layers is not None and drafter is None and is_plain(model_path):
        raise ValueError(
            f"num_mtp_layers={num_mtp_layers}: {model_path} has no MTP layer (no drafter of "
            "its own, no MTP tensors in its safetensors)"
        )
    if allow_plain and drafter is None and is_plain(model_path):
        model, tokenizer, config = base_load(model_path)
        if chains_only(model):  # (chains through its own passes, without the verifier)
            split_recurrent_mixers(model)
        else:
            attach_verifier(model)
        return finish(model, tokenizer, config)
    # The settings tuned on this device, where the config has some.
    spec = read_stream_config(source).for_device(device_key())
    if drafter is not None:
        _check_drafter_base(model_path, source)
    model, tokenizer, config = base_load(model_path)
    _attach(model, source, spec)
    if num_mtp_layers is not None:
        use_mtp_layers(model, num_mtp_layers)
    return finish(model, tokenizer, config)


def _own_format_drafter(source: Path):
    """``(what it is, its attach function)`` where ``source`` is a drafter checkpoint of
    its own format (EAGLE-3's, DFlash's, EAGLE-1's, released Medusa heads), else ``None``."""
    if is_medusa_checkpoint(source):
        return "a Medusa", attach_medusa
    if is_eagle_checkpoint(source):
        return "an EAGLE-3", attach_eagle
    if is_dflash_checkpoint(source):
        return "a DFlash", attach_dflash
    if is_eagle1_checkpoint(source):
        return "an EAGLE-1", attach_eagle1
    return None


def _use_draft_vocab(model, source, draft_vocab) -> None:
    """Sets the draft vocabulary ``load`` was given, or the drafter directory's own."""
    if draft_vocab is False:
        return
    own = Path(source) / DRAFT_VOCAB_FILE
    if draft_vocab is None and not own.is_file():
        return
    config = getattr(getattr(model, "speculative_streams", None), "config", None)
    if draft_vocab is None and getattr(config, "draft_vocab", None) is False:
        return  # (every token measured faster on this device, or the config says so)
    if not drafts_by_head(model):
        raise ValueError(
            f"draft_vocab={str(draft_vocab or own)!r}: this model has no drafter whose head "
            "ranks tokens (no streams, MTP layers, Medusa heads or ParallelSpec): "
            "a draft vocabulary applies to those."
        )
    use_draft_vocab(model, own if draft_vocab is None else draft_vocab)


def _refuse_shared_base(model_path: Path, source: Path) -> None:
    """Refuses a drafter from ``source`` for a shared-mode stream model (its base was
    fine-tuned with its streams)."""
    own = json.loads((model_path / "config.json").read_text()).get(CONFIG_KEY) or {}
    if own.get("mode") == "shared":
        raise ValueError(
            f"{model_path} is a shared-mode stream model: its base was fine-tuned with the "
            f"streams, so the drafter in {source} would not match it."
        )


def _check_drafter_base(model_path: Path, source: Path) -> None:
    """Refuses a drafter from ``source`` for the base in ``model_path`` when they differ."""
    if (model_path / "config.json").exists() and _base_fingerprint(
        model_path / "config.json"
    ) != _base_fingerprint(source / "config.json"):
        raise ValueError(
            f"The drafter in {source} was trained on a different base: "
            f"{_base_fingerprint(source / 'config.json')} in its config.json, "
            f"{_base_fingerprint(model_path / 'config.json')} in {model_path}."
        )
    _refuse_shared_base(model_path, source)


def save_streams(path: Union[str, Path], model: nn.Module) -> None:
    """Writes ``speculative_streams.safetensors`` (or, for a model with another
    drafter, ``drafter.safetensors``) into ``path``."""
    rt = get_runtime(model)
    module, file = (rt.streams, STREAMS_FILE) if rt.drafter is None else (rt.drafter, DRAFTER_FILE)
    # (an MTP layer quantized with its base is written so: streams.quantize_like reads it)
    weights = dict(tree_flatten(module.parameters()))
    mx.save_safetensors(str(Path(path) / file), weights, metadata={"format": "mlx"})


def save(
    path: Union[str, Path],
    model: nn.Module,
    tokenizer,
    config: Optional[Dict[str, Any]] = None,
    extra_files: Sequence[Union[str, Path]] = (),
) -> Path:
    """Writes a complete model directory that :func:`load` reads back.

    The directory is an ordinary mlx-lm model (``mlx_lm.load`` loads the base
    model from it) plus the stream file and config section, and the draft
    vocabulary the drafter ranks, if one is set. It is written to
    a temporary directory first and moved into place, and an existing
    ``path`` is never overwritten.

    Args:
        path: the new directory.
        model: a model with streams attached.
        tokenizer: its tokenizer.
        config (dict, optional): the model's config dict. Default: the set
          fields of ``model.args``.
        extra_files: files copied into the directory as they are.
    """
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it.")
    runtime = get_runtime(model)
    if config is None:
        # Unset (None) fields would not validate as a transformers config.
        config = {k: v for k, v in vars(model.args).items() if v is not None}
    config = dict(config)
    # (one drafting section: a base whose directory had streams, saved with a drafter, or
    # the other way round, keeps only the one that drafts)
    own, other = (CONFIG_KEY, DRAFTER_KEY) if runtime.drafter is None else (DRAFTER_KEY, CONFIG_KEY)
    config.pop(other, None)
    config[own] = runtime.config.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        save_streams(tmp, model)
        if runtime.draft_vocab is not None:  # (load reads it back from the directory)
            save_draft_vocab(tmp / DRAFT_VOCAB_FILE, runtime.draft_vocab.ids, {"format": "mlx"})
        tokenizer.save_pretrained(str(tmp))
        for f in extra_files:
            shutil.copy(f, tmp)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

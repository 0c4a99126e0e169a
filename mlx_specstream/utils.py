"""Loading and saving models with speculative streams."""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import CONFIG_KEY, SpecStreamConfig
from .streams import STREAMS_FILE, attach_streams, get_runtime

ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    STREAMS_FILE,
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
    if (
        path.is_absolute()
        or path_or_hf_repo.startswith((".", "~"))
        or path_or_hf_repo.count("/") > 1
    ):
        raise FileNotFoundError(f"Model directory {path} does not exist.")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(path_or_hf_repo, revision=revision, allow_patterns=ALLOW_PATTERNS)
    )


def read_stream_config(model_path: Path) -> SpecStreamConfig:
    """Reads and checks the stream section of ``model_path/config.json``.

    Raises:
        ValueError: when the section and the stream file do not come together.
    """
    config_file = model_path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} does not exist.")
    with open(config_file) as f:
        config = json.load(f)
    section = config.get(CONFIG_KEY)
    has_file = (model_path / STREAMS_FILE).exists()
    if section is None and not has_file:
        raise ValueError(
            f"{model_path} is a plain model: {config_file} has no '{CONFIG_KEY}' section and "
            f"there is no {STREAMS_FILE}. Convert a model with streams, or use "
            "mlx_specstream.attach_streams(model, config) on a model from mlx_lm.load."
        )
    if section is None:
        raise ValueError(
            f"{model_path / STREAMS_FILE} exists but {config_file} has no '{CONFIG_KEY}' section."
        )
    if not has_file:
        raise ValueError(
            f"{config_file} has a '{CONFIG_KEY}' section but {model_path / STREAMS_FILE} is missing."
        )
    try:
        return SpecStreamConfig.from_dict(section)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: {e}") from e


def load(
    path_or_hf_repo: Optional[str] = None,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    revision: Optional[str] = None,
) -> Tuple[nn.Module, Any]:
    """Loads a model with speculative streams and its tokenizer.

    Args:
        path_or_hf_repo (str, optional): a directory with an mlx-lm model plus
          ``speculative_streams.safetensors`` and the ``"speculative_streaming"``
          config section, or a Hugging Face repo holding one. ``None`` loads the
          embedded default model.
        tokenizer_config (dict, optional): extra tokenizer arguments.
        revision (str, optional): hub revision.

    Returns:
        tuple: ``(model, tokenizer)``, as ``mlx_lm.load`` returns them.
    """
    if path_or_hf_repo is None:
        from .default_model import load_default

        return load_default()
    from mlx_lm.utils import load as mlx_lm_load

    model_path = resolve_model_path(path_or_hf_repo, revision)
    config = read_stream_config(model_path)
    model, tokenizer = mlx_lm_load(str(model_path), tokenizer_config=tokenizer_config)
    attach_streams(model, config, weights=model_path / STREAMS_FILE)
    return model, tokenizer


def save_streams(path: Union[str, Path], model: nn.Module) -> None:
    """Writes ``speculative_streams.safetensors`` (float weights) into ``path``."""
    streams = get_runtime(model).streams
    weights = dict(tree_flatten(streams.parameters()))
    mx.save_safetensors(str(Path(path) / STREAMS_FILE), weights, metadata={"format": "mlx"})


def save(
    path: Union[str, Path],
    model: nn.Module,
    tokenizer,
    config: Optional[Dict[str, Any]] = None,
    extra_files: Sequence[Union[str, Path]] = (),
) -> Path:
    """Writes a complete model directory that :func:`load` reads back.

    The directory is an ordinary mlx-lm model (``mlx_lm.load`` loads the base
    model from it) plus the stream file and config section. It is written to
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
    config[CONFIG_KEY] = runtime.config.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        save_streams(tmp, model)
        tokenizer.save_pretrained(str(tmp))
        for f in extra_files:
            shutil.copy(f, tmp)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

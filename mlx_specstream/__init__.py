"""Speculative Streaming for MLX: fast, lossless decoding without a draft model."""

import importlib
import sys
import types

__version__ = "0.1.0"

# Public name -> submodule. Imported on first use, so that
# ``python -m mlx_specstream.generate`` does not import its own module twice.
_EXPORTS = {
    "DrafterConfig": "config",
    "SpecStreamConfig": "config",
    "SpecGenerationResponse": "generate",
    "attach_drafter": "drafters",
    "attach_streams": "streams",
    "batch_generate": "batch",
    "generate": "generate",
    "load": "utils",
    "load_prompt_cache": "cache_file",
    "make_prompt_cache": "cache",
    "save": "utils",
    "save_prompt_cache": "cache_file",
    "stream_generate": "generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlx_specstream' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    # Importing a submodule sets it as a package attribute; the public name wins.
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing submodule ``generate`` sets it as a package attribute; the
        # exported function of that name stays public, as in mlx-lm.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

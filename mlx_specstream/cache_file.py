"""Prompt caches of ours in files that mlx-lm reads: mlx-lm's ``save_prompt_cache``
and ``load_prompt_cache``, for the layer caches it cannot name.

A bounded window layer (:class:`~mlx_specstream.cache.WindowKVCache`, and a chunked
layer's :class:`~mlx_specstream.cache.ChunkKVCache`) has dropped its first rows; it is
written as mlx-lm's ``KVCache`` with a row for every position, zeros where rows were
dropped (no window to come sees them: every mask drops those columns), and its window
goes in the file's metadata. DeepSeek V3.2's :class:`~mlx_specstream.cache.KVCacheList`
is written as mlx-lm's ``CacheList`` of its members. So mlx-lm's ``load_prompt_cache``
reads the file (window layers whole, as a ``bounded=False`` cache of ours keeps them),
and :func:`load_prompt_cache` reads it back bounded, holding the rows it held.

Example: a Gemma 3 cache whose window layers (window 512) hold positions 1024..2999 of
3000 is written with 3000 rows in each, the first 1024 zeros, and the metadata
``{"mlx_specstream_windows": '{"0": ["window", 512, 1024], ...}'}``.
"""

import json
from typing import Dict, Optional

from mlx_lm.models.cache import CacheList
from mlx_lm.models.cache import load_prompt_cache as load_mlx_lm_cache
from mlx_lm.models.cache import save_prompt_cache as save_mlx_lm_cache

from .cache import (
    ChunkKVCache,
    KVCacheList,
    SpecPromptCache,
    WindowKVCache,
    adopt_kv_lists,
    whole_rows,
)

# The metadata entry {layer: [kind, size, start]} (no dot: mlx-lm nests dotted keys).
WINDOWS_KEY = "mlx_specstream_windows"


def save_prompt_cache(file_name: str, cache: list, metadata: Optional[Dict[str, str]] = None):
    """Saves ``cache`` (a prompt cache of ours, or mlx-lm's) to a ``.safetensors`` file
    that mlx-lm's ``load_prompt_cache`` reads, as mlx-lm's ``save_prompt_cache``.

    Args:
        file_name (str): the file.
        cache (list): the layer caches (not changed).
        metadata (dict, optional): strings kept with it (``mlx_lm.cache_prompt``'s
          ``model``, ``chat_template``, ...).

    Raises:
        ValueError: ``metadata`` uses this module's key.
    """
    metadata = dict(metadata or {})
    if WINDOWS_KEY in metadata:
        raise ValueError(f"metadata: the key {WINDOWS_KEY!r} is this package's own")
    windows, layers = {}, list(cache)
    for i, c in enumerate(layers):
        if isinstance(c, WindowKVCache):
            kind = "chunk" if isinstance(c, ChunkKVCache) else "window"
            windows[str(i)] = [kind, c.window, c.start]
            layers[i] = whole_rows(c)
        elif isinstance(c, KVCacheList):
            layers[i] = CacheList(*c.caches)
    if windows:
        metadata[WINDOWS_KEY] = json.dumps(windows)
    save_mlx_lm_cache(file_name, layers, metadata)


def load_prompt_cache(file_name: str, return_metadata: bool = False):
    """Loads a prompt cache saved by :func:`save_prompt_cache` (or by mlx-lm), its window
    layers bounded again (the rows they held), as a
    :class:`~mlx_specstream.cache.SpecPromptCache`.

    Returns:
        The cache, and with ``return_metadata`` the metadata saved with it.
    """
    cache, metadata = load_mlx_lm_cache(file_name, return_metadata=True)
    for i, (kind, size, start) in json.loads(metadata.pop(WINDOWS_KEY, "{}")).items():
        c = cache[int(i)]
        bounded = ChunkKVCache(size, bounded=True) if kind == "chunk" else WindowKVCache(size)
        if c.keys is not None:  # (the rows it held: the zeros before them dropped)
            bounded.keys, bounded.values = c.keys[..., start:, :], c.values[..., start:, :]
        bounded.offset, bounded.start = c.offset, start
        cache[int(i)] = bounded
    adopt_kv_lists(cache)
    cache = SpecPromptCache(cache)
    return (cache, metadata) if return_metadata else cache

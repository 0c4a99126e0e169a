"""Prompt caches of ours saved to files mlx-lm reads (``mlx_specstream.cache_file``):
bounded window layers written whole (zeros where rows were dropped), DeepSeek V3.2's
key-cache pairs as mlx-lm's ``CacheList``; read back by mlx-lm's ``load_prompt_cache``
or bounded again by ours, a cache goes on as plain decoding of what it holds."""

import json

import pytest
from helpers import plain_greedy, spec_tokens, tiny_model
from mlx_lm.models.cache import CacheList, KVCache
from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load
from test_sliding_window import blind_to_windows

from mlx_specstream import load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_specstream.cache import ChunkKVCache, KVCacheList, WindowKVCache, cache_tokens
from mlx_specstream.cache_file import WINDOWS_KEY

PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]


def conversation(arch, tmp_path):
    """A tiny ``arch`` model, its cache after 50 tokens saved to a file (with a model
    name in the metadata), the tokens it holds, and the file."""
    model = tiny_model(arch, vocab_size=8)
    cache = make_prompt_cache(model)
    got, _ = spec_tokens(model, PROMPT, 40, draft="ngram", prompt_cache=cache)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache, {"model": "tiny"})
    return model, cache, (PROMPT + got)[: cache_tokens(cache)], path


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_oss", "llama4", "deepseek_v32"])
def test_a_saved_cache_goes_on_as_plain_decoding(arch, tmp_path):
    """Read back by ours (bounded again: the same rows as before the save) and, where
    mlx-lm's models take mlx-lm's caches in those layers, by mlx-lm's loader."""
    model, cache, held, path = conversation(arch, tmp_path)
    want = plain_greedy(model, held + [5, 2], 30)
    ours, metadata = load_prompt_cache(path, return_metadata=True)
    assert metadata == {"model": "tiny"}
    assert [type(c) for c in ours] == [type(c) for c in cache]
    for a, b in zip(ours, cache):
        assert getattr(a, "start", 0) == getattr(b, "start", 0) and a.offset == b.offset
    assert spec_tokens(model, [5, 2], 30, draft="ngram", prompt_cache=ours)[0] == want
    if arch != "llama4":  # (its chunked layers read ChunkedKVCache's own attributes)
        theirs = mlx_lm_load(path)
        assert all(type(c) in (KVCache, CacheList) for c in theirs)
        assert spec_tokens(model, [5, 2], 30, draft="ngram", prompt_cache=theirs)[0] == want


def test_the_file_holds_every_position_and_names_the_windows(tmp_path):
    model, cache, held, path = conversation("gemma3_text", tmp_path)
    assert cache[0].start > 0
    _, metadata = mlx_lm_load(path, return_metadata=True)
    start = cache[0].start
    assert json.loads(metadata[WINDOWS_KEY]) == {
        "0": ["window", 8, start],
        "2": ["window", 8, start],
    }
    theirs = mlx_lm_load(path)
    assert theirs[0].keys.shape[2] == theirs[0].offset == len(held)
    assert (theirs[0].keys[..., : cache[0].start, :] == 0).all().item()
    assert isinstance(cache[0], WindowKVCache) and not isinstance(cache[0], ChunkKVCache)


def test_deepseek_v32_pairs_are_written_as_mlx_lms_cache_lists(tmp_path):
    _, cache, _, path = conversation("deepseek_v32", tmp_path)
    assert all(type(c) is KVCacheList for c in cache)
    assert all(type(c) is CacheList for c in mlx_lm_load(path))


def test_negative_control_the_zero_rows_seen_without_the_window(tmp_path, monkeypatch):
    """The zero rows are harmless only because every mask drops the columns past the
    window: with masks blind to it, the loaded cache goes on otherwise."""
    model, _, held, path = conversation("gemma3_text", tmp_path)
    want = plain_greedy(model, held + [5, 2], 30)
    blind_to_windows(monkeypatch)
    theirs = mlx_lm_load(path)
    assert spec_tokens(model, [5, 2], 30, draft="ngram", prompt_cache=theirs)[0] != want


def test_the_metadata_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match=WINDOWS_KEY):
        save_prompt_cache(str(tmp_path / "c.safetensors"), [KVCache()], {WINDOWS_KEY: "x"})

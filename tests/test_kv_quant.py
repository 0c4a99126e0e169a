"""Quantized KV caches (mlx-lm's ``kv_bits``) and never-filling rotating caches.

Compaction gathers the packed data, scales and biases along the token axis;
:class:`KVQuantizer` converts at mlx-lm's moments and caps tree depth so that
no step straddles the conversion. End to end, greedy output, log-probabilities
and caches equal mlx-lm's own with the same ``kv_bits``; converting one token
late, or letting a step straddle the conversion, makes them differ.
"""

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_model, tiny_spec_model
from mlx_lm.generate import generate_step, maybe_quantize_kv_cache
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache, make_prompt_cache

from mlx_specstream.cache import (
    KVQuantizer,
    check_cache,
    commit_path,
    prefill_chunks,
    window_rows,
)
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.streams import attach_verifier

PROMPT = [3, 1, 4, 1, 5, 2, 6]
N_TOKENS = 40
GROUP = 32  # mx.quantize needs a head dimension divisible by the group size (>= 32)
HEADS_32 = dict(num_attention_heads=2, num_key_value_heads=1)  # hidden 64: head_dim 32
MODEL_ARGS = {
    "llama": HEADS_32,
    "qwen2": HEADS_32,
    "gpt_neox": dict(num_attention_heads=2),
    "phi3": dict(num_attention_heads=2, num_key_value_heads=2),
}


def spec_model(arch, **cfg):
    cfg = {"num_streams": 3, "top_k": 2, **cfg}
    return tiny_spec_model(arch, vocab_size=8, model_args=MODEL_ARGS[arch], **cfg)


def rows(c, n=None):
    """The first ``n`` rows (default: all) of a layer's keys and values, dequantized."""
    n = c.offset if n is None else n
    if isinstance(c, QuantizedKVCache):
        return [
            np.array(
                mx.dequantize(*[a[..., :n, :] for a in x], group_size=c.group_size, bits=c.bits)
            )
            for x in (c.keys, c.values)
        ]
    return [np.array(c.keys[..., :n, :]), np.array(c.values[..., :n, :])]


def packed(c, n=None):
    """The first ``n`` rows of every array a layer stores (packed as stored)."""
    n = c.offset if n is None else n
    arrays = [*c.keys, *c.values] if isinstance(c, QuantizedKVCache) else [c.keys, c.values]
    return [np.array(a[..., :n, :]) for a in arrays]


# ---- compaction ---------------------------------------------------------------

KINDS = {
    "plain": KVCache,
    "quantized4": lambda: QuantizedKVCache(group_size=GROUP, bits=4),
    "quantized8": lambda: QuantizedKVCache(group_size=64, bits=8),
    "rotating": lambda: RotatingKVCache(max_size=64, keep=4),  # never fills here
}


def _random_rows(n, seed):
    k = mx.random.normal((1, 2, n, 64), key=mx.random.key(seed))
    v = mx.random.normal((1, 2, n, 64), key=mx.random.key(seed + 1))
    return k, v


def _filled(kind, k, v):
    c = KINDS[kind]()
    c.update_and_fetch(k, v)
    return c


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(
    "keep, kept_rows",
    [
        ([0, 2], [0, 1, 2, 4]),  # gather: prefix 0 1, then rows 2 and 4
        ([0, 1], [0, 1, 2, 3]),  # a prefix: plain trim
        ([0, 3, 5], [0, 1, 2, 5, 7]),
        ([0], [0, 1, 2]),
    ],
)
def test_commit_path_equals_a_cache_of_the_kept_rows(kind, keep, kept_rows):
    """Every stored array (packed data, scales, biases) equals, bit for bit, a
    cache fed the kept rows only; appending then continues after them."""
    k, v = _random_rows(8, seed=len(keep))
    c = _filled(kind, k, v)
    commit_path([c], 2, [keep])
    idx = mx.array(kept_rows)
    want = _filled(kind, k[:, :, idx], v[:, :, idx])
    assert c.offset == want.offset == len(kept_rows)
    for got, ref in zip(packed(c), packed(want)):
        np.testing.assert_array_equal(got, ref)
    k2, v2 = _random_rows(1, seed=99)
    c.update_and_fetch(k2, v2)
    want.update_and_fetch(k2, v2)
    for got, ref in zip(packed(c), packed(want)):
        np.testing.assert_array_equal(got, ref)


def _trim_only(cache, prefix, keep_per_layer):
    for c, keep in zip(cache, keep_per_layer):
        c.trim(c.offset - (prefix + len(keep)))


@pytest.mark.parametrize("kind", ["quantized4", "quantized8"])
def test_negative_control_a_trim_only_rollback_of_a_quantized_cache_differs(monkeypatch, kind):
    import test_kv_quant

    monkeypatch.setattr(test_kv_quant, "commit_path", _trim_only)
    with pytest.raises(AssertionError):
        test_commit_path_equals_a_cache_of_the_kept_rows(kind, [0, 2], [0, 1, 2, 4])


def test_commit_path_on_a_mixed_list():
    """Plain and quantized layers in one list compact alike (different keep lists)."""
    k, v = _random_rows(8, seed=3)
    cache = [_filled("plain", k, v), _filled("quantized4", k, v), _filled("quantized8", k, v)]
    keeps = [[0, 2, 3], [0, 4], [0, 1]]
    commit_path(cache, 2, keeps)
    for c, keep, kind in zip(cache, keeps, ["plain", "quantized4", "quantized8"]):
        idx = mx.array([0, 1] + [2 + i for i in keep])
        want = _filled(kind, k[:, :, idx], v[:, :, idx])
        for got, ref in zip(packed(c), packed(want)):
            np.testing.assert_array_equal(got, ref)


# ---- the cache kinds accepted --------------------------------------------------


def test_check_cache_kinds():
    plain, quant = KVCache(), QuantizedKVCache(group_size=GROUP, bits=4)
    check_cache([plain, plain])
    check_cache([plain, quant], allow_quantized=True)
    with pytest.raises(ValueError, match=r"needs a KVCache per layer, got \['QuantizedKVCache'\]"):
        check_cache([plain, quant])
    with pytest.raises(ValueError, match=r"got \['RotatingKVCache'\].*rotating \(max_kv_size\)"):
        check_cache([RotatingKVCache(max_size=64)], allow_quantized=True)
    from mlx_lm.models.cache import ArraysCache

    with pytest.raises(ValueError, match=r"got \['ArraysCache'\]: recurrent caches"):
        check_cache([ArraysCache(2)], allow_quantized=True, max_rows=8)


def test_a_rotating_cache_is_accepted_only_when_its_window_never_fills():
    need = window_rows(cached=3, prompt=10, max_tokens=20, step_rows=16 * 4)
    assert need == 3 + 10 + 20 + 64
    check_cache([RotatingKVCache(max_size=need)], max_rows=need)
    with pytest.raises(ValueError, match=f"max_size={need - 1} .*max_kv_size >= {need}"):
        check_cache([RotatingKVCache(max_size=need - 1, keep=4), KVCache()], max_rows=need)
    # a model's own sliding window (nothing kept at its start): ours keeps every token
    with pytest.raises(ValueError, match=r"mlx_specstream.make_prompt_cache\(model\)"):
        check_cache([RotatingKVCache(max_size=need - 1), KVCache()], max_rows=need)
    with pytest.raises(ValueError, match="max_tokens=-1"):
        window_rows(0, 10, -1, 64)


# ---- when mlx-lm converts ------------------------------------------------------


class Recorder:
    """Wraps a model; records, for every call, the offset it starts at, its
    length and whether the first layer's cache is quantized then."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        self.calls.append(
            (cache[0].offset, inputs.shape[1], isinstance(cache[0], QuantizedKVCache))
        )
        return self.model(inputs, cache=cache, **kwargs)


def mlx_lm_calls(prompt_len, step, start, max_tokens=12):
    model = tiny_model("qwen2", vocab_size=16, **HEADS_32)
    rec = Recorder(model)
    list(
        generate_step(
            mx.array(list(range(1, prompt_len + 1))), rec, max_tokens=max_tokens,
            prompt_cache=make_prompt_cache(model), prefill_step_size=step,
            kv_bits=4, kv_group_size=GROUP, quantized_kv_start=start,
        )
    )  # fmt: skip
    return rec.calls


CASES = [(7, 4, 0), (7, 4, 5), (7, 4, 6), (7, 4, 7), (7, 4, 12), (1, 4, 0), (1, 4, 3), (9, 3, 3)]


@pytest.mark.parametrize("prompt_len, step, start", CASES)
def test_prefill_chunks_are_mlx_lms(prompt_len, step, start):
    calls = mlx_lm_calls(prompt_len, step, start)
    chunks = prefill_chunks(prompt_len, step)
    assert [n for _, n, _ in calls[: len(chunks)]] == chunks
    assert all(n == 1 for _, n, _ in calls[len(chunks) :])


def test_prefill_chunks_examples():
    assert prefill_chunks(10, 4) == [4, 4, 1]
    assert prefill_chunks(1, 4) == []
    assert prefill_chunks(2, 2048) == [1]
    with pytest.raises(ValueError, match="prefill_step_size=0"):
        prefill_chunks(5, 0)


@pytest.mark.parametrize("prompt_len, step, start", CASES)
def test_full_precision_room_is_what_mlx_lm_feeds_before_converting(prompt_len, step, start):
    """At every one-token call of mlx-lm's decoding on a full-precision cache,
    the room is the number of calls, from that one on, that still see full
    precision; on a quantized cache there is no limit."""
    calls = mlx_lm_calls(prompt_len, step, start)
    decode = [(o, q) for o, n, q in calls[len(prefill_chunks(prompt_len, step)) :]]
    assert decode[-1][1], "the recording must reach the conversion"
    quant = KVQuantizer(4, GROUP, start)
    for i, (offset, quantized) in enumerate(decode):
        cache = [QuantizedKVCache(GROUP, 4) if quantized else KVCache() for _ in range(2)]
        for c in cache:
            c.offset = offset
        if quantized:
            assert quant.full_precision_room(cache) is None
            assert quant.max_tree_depth(cache) is None
        else:
            fed = next(j for j, (_, q) in enumerate(decode[i:]) if q)
            assert quant.full_precision_room(cache) == fed
            assert quant.max_tree_depth(cache) == fed - 1


def test_full_precision_room_examples():
    quant = KVQuantizer(4, GROUP, quantized_kv_start=10)

    def at(offset):
        c = KVCache()
        c.offset = offset
        return [c]

    assert [quant.full_precision_room(at(o)) for o in (6, 9, 10, 12)] == [4, 1, 1, 1]


@pytest.mark.parametrize("offset", [1, 5, 6, 7, 300])
def test_maybe_quantize_is_mlx_lms(offset):
    """Same layers converted, to bit-identical packed arrays, as mlx-lm's own."""
    k, v = _random_rows(offset, seed=offset)

    def cache():
        layers = [KVCache(), KVCache(), QuantizedKVCache(GROUP, 4)]
        for c in layers:
            c.update_and_fetch(k, v)
        return layers

    ours, theirs = cache(), cache()
    KVQuantizer(4, GROUP, quantized_kv_start=6).maybe_quantize(ours)
    maybe_quantize_kv_cache(theirs, quantized_kv_start=6, kv_group_size=GROUP, kv_bits=4)
    assert [type(c) for c in ours] == [type(c) for c in theirs]
    assert isinstance(ours[0], QuantizedKVCache) == (offset >= 6)
    for a, b in zip(ours, theirs):
        for x, y in zip(packed(a), packed(b)):
            np.testing.assert_array_equal(x, y)


def test_quantizer_arguments():
    assert KVQuantizer.from_args(None) is None
    assert KVQuantizer.from_args(4, 32, 7) == KVQuantizer(4, 32, 7)
    with pytest.raises(ValueError, match="kv_bits=7"):
        KVQuantizer(7)
    with pytest.raises(ValueError, match="kv_group_size=16"):
        KVQuantizer(4, 16)
    with pytest.raises(ValueError, match="quantized_kv_start=-1"):
        KVQuantizer(4, 64, -1)


# ---- a tree pass over a quantized cache -----------------------------------------

TREE_TOKENS, TREE_PARENTS = [6, 1, 2, 3, 5, 0], [-1, 0, 0, 1, 3, 2]  # paths 0-1-3-4, 0-2-5
PATH = [0, 1, 3, 4]


@pytest.mark.parametrize("arch, stream_pass", [("llama", "fused"), ("qwen2", "split")])
@pytest.mark.parametrize("quantized_layers", ["all", "lower half"])
def test_tree_pass_over_a_quantized_cache_equals_one_token_calls(
    arch, stream_pass, quantized_layers
):
    """A multi-stream pass (bool tree mask, per-row RoPE positions) on a
    quantized cache gives, at the nodes of a path, mlx-lm's logits when it
    feeds that path one token per call to an equal cache; after compaction to
    the path, the caches are equal too."""
    model = spec_model(arch, stream_pass=stream_pass)
    rt = model.speculative_streams
    quant = KVQuantizer(4, GROUP, quantized_kv_start=0)

    def prefilled():
        cache = make_prompt_cache(model)
        model(mx.array([PROMPT[:-1]]), cache=cache)
        layers = cache if quantized_layers == "all" else cache[: len(cache) // 2]
        quant.maybe_quantize(layers)
        cache[: len(layers)] = layers
        return cache

    cache, want = prefilled(), prefilled()
    assert any(isinstance(c, QuantizedKVCache) for c in cache)
    start = cache[0].offset
    out = rt.forward(TREE_TOKENS, TREE_PARENTS, cache, all_streams=not rt.split_streams)
    commit_path(cache, start, [PATH] * len(cache))
    ref = [model(mx.array([[TREE_TOKENS[a]]]), cache=want)[0, -1] for a in PATH]
    np.testing.assert_allclose(
        np.array(out.logits[mx.array(PATH)]), np.array(mx.stack(ref)), atol=1e-4
    )
    for layer, (c, w) in enumerate(zip(cache, want)):
        assert type(c) is type(w) and c.offset == w.offset == start + len(PATH), layer
        for x, y in zip(rows(c), rows(w)):
            np.testing.assert_allclose(x, y, atol=1e-4, err_msg=f"layer {layer}")


def test_negative_control_tree_pass_check_catches_a_trim_only_rollback(monkeypatch):
    import test_kv_quant

    monkeypatch.setattr(test_kv_quant, "commit_path", _trim_only)
    with pytest.raises(AssertionError):
        test_tree_pass_over_a_quantized_cache_equals_one_token_calls("llama", "fused", "all")


# ---- end to end: greedy equals mlx-lm's greedy with the same kv_bits --------------


def run_both(model, bits, start, n_tokens=N_TOKENS, **spec_kwargs):
    """mlx-lm's greedy and ours, same kv settings and prefill chunks, each with its cache."""
    kv = dict(kv_bits=bits, kv_group_size=GROUP, quantized_kv_start=start, prefill_step_size=4)
    ref_cache, spec_cache = make_prompt_cache(model), make_prompt_cache(model)
    ref = list(
        generate_step(mx.array(PROMPT), model, max_tokens=n_tokens, prompt_cache=ref_cache, **kv)
    )
    out = list(
        spec_generate_step(
            mx.array(PROMPT), model, max_tokens=n_tokens, prompt_cache=spec_cache,
            **kv, **spec_kwargs,
        )
    )  # fmt: skip
    return ref, out, ref_cache, spec_cache


def assert_like_mlx_lm(ref, out, ref_cache, spec_cache):
    assert [t for t, _ in ref] == [o[0] for o in out]
    for i, ((_, want), got) in enumerate(zip(ref, out)):
        np.testing.assert_allclose(
            np.array(got[1]), np.array(want), atol=1e-4, err_msg=f"token {i}"
        )
    # Both caches are quantized (or not) alike; the rows both hold are equal.
    assert [type(c) for c in spec_cache] == [type(c) for c in ref_cache]
    n = min(spec_cache[0].offset, ref_cache[0].offset)
    assert n >= len(PROMPT) + len(out) - 1
    for layer, (c, w) in enumerate(zip(spec_cache, ref_cache)):
        for x, y in zip(rows(c, n), rows(w, n)):
            np.testing.assert_allclose(x, y, atol=1e-4, err_msg=f"layer {layer}")


# start 0: quantized from the first prefill chunk; 13, 20 and 21: steps reach
# the conversion in the middle of generation (prompt 7, 40 tokens); 47: only
# mlx-lm's last call (feeding the last token, offset 46 -> 47) converts, so the
# caches must end quantized alike although ours holds 46 tokens.
SETTINGS = [(4, 0), (4, 13), (4, 21), (8, 20), (4, 47)]


@pytest.mark.parametrize("bits, start", SETTINGS)
@pytest.mark.parametrize(
    "arch, stream_pass", [("llama", "fused"), ("qwen2", "split"), ("gpt_neox", "fused")]
)
def test_greedy_equals_mlx_lm_with_kv_bits(arch, stream_pass, bits, start):
    model = spec_model(arch, stream_pass=stream_pass)
    ref, out, ref_cache, spec_cache = run_both(model, bits, start)
    assert out[-1][3] < len(out), "no draft accepted"
    assert_like_mlx_lm(ref, out, ref_cache, spec_cache)


@pytest.mark.parametrize("bits, start", [(4, 0), (4, 13)])
def test_ngram_drafts_on_any_model_equal_mlx_lm_with_kv_bits(bits, start):
    model = tiny_model("phi3", vocab_size=8, **MODEL_ARGS["phi3"])
    attach_verifier(model)
    ref, out, ref_cache, spec_cache = run_both(model, bits, start, draft="ngram")
    assert out[-1][3] < len(out), "no draft accepted"
    assert_like_mlx_lm(ref, out, ref_cache, spec_cache)


def test_shared_mode_with_kv_bits_equals_one_token_per_pass():
    """Shared-mode K/V depend on the streams, so the reference is the same model
    decoding one token per pass, with the same kv_bits."""
    model = spec_model("llama", mode="shared")
    kv = dict(kv_bits=4, kv_group_size=GROUP, quantized_kv_start=13, prefill_step_size=4)
    caches = [make_prompt_cache(model) for _ in range(2)]
    one = list(spec_generate_step(mx.array(PROMPT), model, max_tokens=N_TOKENS,
                                  prompt_cache=caches[0], speculative=False, **kv))  # fmt: skip
    tree = list(spec_generate_step(mx.array(PROMPT), model, max_tokens=N_TOKENS,
                                   prompt_cache=caches[1], **kv))  # fmt: skip
    assert tree[-1][3] < len(tree), "no draft accepted"
    assert_like_mlx_lm([(t, lp) for t, lp, *_ in one], tree, caches[0], caches[1])


def test_negative_control_converting_one_token_late_differs(monkeypatch):
    """Converting at quantized_kv_start + 1 (and capping trees for that point)
    changes the output and the caches: the equality check fails."""
    convert = KVQuantizer.maybe_quantize
    room = KVQuantizer.full_precision_room

    def late(self, cache):
        if cache[0].offset >= self.quantized_kv_start + 1:
            convert(self, cache)

    def late_room(self, cache):
        r = room(self, cache)
        return None if r is None else r + 1

    monkeypatch.setattr(KVQuantizer, "maybe_quantize", late)
    monkeypatch.setattr(KVQuantizer, "full_precision_room", late_room)
    for arch, stream_pass in [("llama", "fused"), ("qwen2", "split")]:
        with pytest.raises(AssertionError):
            assert_like_mlx_lm(*run_both(spec_model(arch, stream_pass=stream_pass), 4, 13))


def test_negative_control_a_step_straddling_the_conversion_differs(monkeypatch):
    """Without the depth cap a tree verified at full precision holds tokens that
    mlx-lm feeds to a quantized cache: the equality check fails."""
    monkeypatch.setattr(KVQuantizer, "full_precision_room", lambda self, cache: None)
    model = spec_model("llama", stream_pass="fused")
    for start in (13, 21):
        with pytest.raises(AssertionError):
            assert_like_mlx_lm(*run_both(model, 4, start))


# ---- end to end: a rotating cache whose window never fills ----------------------


def test_max_kv_size_that_never_fills_equals_mlx_lm():
    model = spec_model("qwen2")
    max_kv_size = 256  # > prompt + 20 tokens + one pass of at most 16 nodes with 3 streams each
    cache = make_prompt_cache(model, max_kv_size=max_kv_size)
    assert all(type(c) is RotatingKVCache for c in cache)
    want = [
        t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=20, max_kv_size=max_kv_size)
    ]
    out = list(spec_generate_step(mx.array(PROMPT), model, max_tokens=20, prompt_cache=cache))
    assert out[-1][3] < len(out), "no draft accepted"
    assert [o[0] for o in out] == want
    with pytest.raises(ValueError, match="max_kv_size"):
        list(spec_generate_step(mx.array(PROMPT), model, max_tokens=20, max_kv_size=40))

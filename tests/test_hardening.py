"""Long runs, memory stability, reuse after cancelling, and bad input to generation."""

import gc

import mlx.core as mx
import pytest
from helpers import plain_greedy, spec_tokens, tiny_model, tiny_spec_model, word_tokenizer
from mlx_lm.models.cache import ArraysCache, RotatingKVCache

from mlx_specstream import generate, stream_generate
from mlx_specstream.sample_utils import make_sampler

V = 64
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
LONG = 800  # past three of the KV cache's 256-row growth blocks


def first_difference(got, want):
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)


@pytest.mark.parametrize(
    "mode, arch, tree",
    [
        ("lossless", "llama", dict(num_streams=3, top_k=2)),
        ("lossless", "qwen3", dict(num_streams=2, top_k=[3, 1], max_tree_nodes=5)),
        ("shared", "qwen2", dict(num_streams=3, top_k=1)),
    ],
)
def test_long_generations_stay_identical_across_cache_growth(mode, arch, tree):
    """The KV cache grows in blocks of 256 rows; hundreds of tree steps, their
    compactions and block boundaries must never change a token."""
    model = tiny_spec_model(arch, vocab_size=V, mode=mode, **tree)
    toks, records = spec_tokens(model, PROMPT, LONG)
    if mode == "lossless":
        want = plain_greedy(model, PROMPT, LONG)
    else:
        want = spec_tokens(model, PROMPT, LONG, speculative=False)[0]
    assert len(toks) == LONG
    i = first_difference(toks, want)
    assert i is None, f"token {i} differs: {toks[i:i + 5]} vs {want[i:i + 5]}"
    assert len(set(toks[-500:])) > 3, "the model fell into a loop: the run proves little"
    assert records[-1][3] < LONG  # drafts were accepted along the way


def test_memory_stays_flat_over_20_generations():
    model, tok = tiny_spec_model("llama", vocab_size=V, top_k=2), word_tokenizer(V)
    active = []
    for i in range(20):
        generate(model, tok, [t + i % 7 for t in PROMPT], max_tokens=48)
        # Earlier tests' garbage, freed whenever the collector runs, would move
        # the figure: collected first, so what stays is what a generation keeps.
        gc.collect()
        mx.clear_cache()
        active.append(mx.get_active_memory())
    # Nothing outlives a generation: active memory after the first is constant.
    assert max(active[1:]) - min(active[1:]) <= 16 * 1024, active


def test_a_generator_closed_midway_leaves_the_model_reusable():
    model, tok = tiny_spec_model("llama", vocab_size=V, top_k=2), word_tokenizer(V)
    want = generate(model, tok, PROMPT, max_tokens=30)
    gen = stream_generate(model, tok, PROMPT, max_tokens=200)
    for n, _ in enumerate(gen):
        if n == 5:
            break
    gen.close()
    assert model.speculative_streams.state is None  # no step left half-done
    assert generate(model, tok, PROMPT, max_tokens=30) == want


def test_bad_prompts_are_refused_with_the_reason():
    model, tok = tiny_spec_model("llama", vocab_size=V), word_tokenizer(V)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [], max_tokens=4)
    with pytest.raises(
        ValueError, match=r"token 2 has id 64, outside the model's vocabulary \[0, 64\)"
    ):
        generate(model, tok, [1, 2, 64], max_tokens=4)
    with pytest.raises(ValueError, match="token 0 has id -3"):
        generate(model, tok, [-3], max_tokens=4)
    with pytest.raises(ValueError, match="1-D"):
        generate(model, tok, mx.array([[1, 2]]), max_tokens=4)
    with pytest.raises(ValueError, match="not valid UTF-8: byte 3"):
        generate(model, tok, b"t1 \xff t2", max_tokens=4)
    with pytest.raises(ValueError, match="lone surrogate"):
        generate(model, tok, "t1 \ud800 t2", max_tokens=4)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"max_tokens={bad}"):
            generate(model, tok, PROMPT, max_tokens=bad)


def test_prompt_longer_than_the_context_is_refused():
    model = tiny_spec_model("qwen3", vocab_size=V, model_args=dict(max_position_embeddings=16))
    tok = word_tokenizer(V)
    generate(model, tok, list(range(16)), max_tokens=4)  # exactly the context: fine
    with pytest.raises(ValueError, match="17 tokens, more than the model's context of 16"):
        generate(model, tok, list(range(17)), max_tokens=4)


def test_unusual_unicode_prompts_decode_losslessly():
    """Byte-fallback tokenizers take any text; the runtime must too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mlx_lm.tokenizer_utils import TokenizerWrapper

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    raw.decoder = decoders.ByteFallback()
    tok = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<0x00>"))
    model = tiny_spec_model("llama", vocab_size=256, top_k=2)
    for text in ["naïve café", "ß∑∂ — 中文 العربية", "emoji 🐍🚀 a\u0301", "tab\tnul\x01"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        toks = [r.token for r in stream_generate(model, tok, text, max_tokens=24)]
        assert toks == plain_greedy(model, ids, len(toks))


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(temp=-0.5), "temp=-0.5"),
        (dict(temp=0.7, top_p=1.5), "top_p=1.5"),
        (dict(temp=0.7, top_p=-0.1), "top_p=-0.1"),
        (dict(temp=0.7, min_p=2.0), "min_p=2.0"),
        (dict(temp=0.7, top_k=-1), "top_k=-1"),
    ],
)
def test_invalid_sampling_values(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        make_sampler(**kwargs)


def test_unsupported_cache_types_are_refused():
    model, tok = tiny_spec_model("llama", vocab_size=V), word_tokenizer(V)
    layers = len(model.layers)
    rotating = [RotatingKVCache(max_size=4096) for _ in range(layers)]
    with pytest.raises(ValueError, match="max_tokens=-1"):  # no bound: it could rotate
        next(stream_generate(model, tok, PROMPT, max_tokens=-1, prompt_cache=rotating))
    with pytest.raises(ValueError, match="RotatingKVCache max_size=32"):  # would rotate
        generate(
            model,
            tok,
            PROMPT,
            max_tokens=40,
            prompt_cache=[RotatingKVCache(max_size=32) for _ in range(layers)],
        )
    with pytest.raises(ValueError, match=r"\['ArraysCache'\].*recurrent"):
        generate(
            model, tok, PROMPT, max_tokens=4, prompt_cache=[ArraysCache(2) for _ in range(layers)]
        )
    # (Quantized caches are accepted: tests/test_kv_quant.py.)
    plain = tiny_model("llama", vocab_size=V)
    with pytest.raises(ValueError, match="no speculative streams"):
        generate(plain, tok, PROMPT, max_tokens=4)

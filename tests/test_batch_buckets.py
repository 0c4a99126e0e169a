"""A batch's rows with their columns in buckets (``RaggedKVCache.bucket``): each pass
reads its caches to a multiple of the bucket, the mask hiding what lies past each
row's own tokens, so attention's shapes change once per bucket (MLX's CUDA backend
builds a cuDNN graph per shape; by default 256 there in bfloat16/float16, 0 here).
Forced on this CPU, every row still equals its prompt decoded alone, pipelined or not,
drafting by lookup, a draft model or the streams; control: the padded columns seen."""

import mlx.core as mx
import pytest
from helpers import plain_greedy, tiny_model
from test_batch import alone, decode
from test_batch_streams import PROMPTS as STREAM_PROMPTS
from test_batch_streams import LIMITS as STREAM_LIMITS
from test_batch_streams import stream_model
from test_pipeline import view_widths

from mlx_specstream import precision
from mlx_specstream.batch import batch_generate_step
from mlx_specstream.ragged_cache import RaggedKVCache


@pytest.fixture
def widths(monkeypatch):
    """Forces 16-column buckets and records the width of every view a pass reads."""
    seen = view_widths(monkeypatch, RaggedKVCache)
    monkeypatch.setattr(RaggedKVCache, "bucket", 16)
    return seen


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "starcoder2", "gpt_neox"])
def test_lookup_rows_in_buckets_equal_each_prompt_alone(arch, pipeline, widths):
    model = tiny_model(arch, vocab_size=16)
    got, passes = decode(model, num_draft_tokens=3, draft="ngram", pipeline=pipeline)
    assert got == alone(model)
    assert widths and all(w % 16 == 0 for w in widths)


def test_draft_model_rows_in_buckets_equal_each_prompt_alone(widths):
    model, draft = tiny_model("llama", vocab_size=16), tiny_model("qwen2", vocab_size=16, seed=3)
    assert decode(model, draft_model=draft, num_draft_tokens=3)[0] == alone(model)
    assert widths and all(w % 16 == 0 for w in widths)


@pytest.mark.parametrize("stream_pass", ["fused", "split"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_stream_rows_in_buckets_equal_each_prompt_alone(arch, stream_pass, widths):
    model = stream_model(arch)
    tokens = [[] for _ in STREAM_PROMPTS]
    for out in batch_generate_step(model, STREAM_PROMPTS, max_tokens=STREAM_LIMITS,
                                   draft="streams", stream_pass=stream_pass):  # fmt: skip
        for r in out:
            tokens[r.uid] += r.tokens
    for p, n, got in zip(STREAM_PROMPTS, STREAM_LIMITS, tokens):
        assert got == plain_greedy(model, p, n)
    assert widths and all(w % 16 == 0 for w in widths)


def test_negative_control_padded_columns_seen(monkeypatch, widths):
    """A mask that lets the rows see the columns past their tokens: the batch's probe
    refuses the model (a row differs from its tokens alone)."""
    make_mask = RaggedKVCache.make_mask

    def seen(self, N, *args, **kwargs):
        mask = make_mask(self, N, *args, **kwargs)
        past = mx.arange(mask.shape[-1]) >= self.size() + N
        return mask | past

    monkeypatch.setattr(RaggedKVCache, "make_mask", seen)
    model = tiny_model("llama", vocab_size=16)
    with pytest.raises(ValueError, match="differs from the same tokens alone"):
        decode(model, num_draft_tokens=3, draft="ngram")


def test_default_bucket(monkeypatch):
    """0 on this CPU and in float32 and before any keys; 256 on CUDA in bfloat16, in
    sliding-window layers too; a model whose layers cannot take buckets keeps its rows
    at 0."""
    c = RaggedKVCache([0, 0])
    assert c.column_bucket() == 0  # (no keys yet)
    c.update_and_fetch(mx.zeros((2, 1, 3, 4), mx.bfloat16), mx.zeros((2, 1, 3, 4), mx.bfloat16))
    assert c.column_bucket() == 0  # (this CPU)
    monkeypatch.setattr("mlx_specstream.cache.on_cuda", lambda: True)  # (default_bucket's)
    assert c.column_bucket() == 256 and c.pass_width(2) == 256
    f32 = RaggedKVCache([0])
    f32.update_and_fetch(mx.zeros((1, 1, 3, 4)), mx.zeros((1, 1, 3, 4)))
    assert f32.column_bucket() == 0
    window = RaggedKVCache([0, 0], window=8)
    window.update_and_fetch(
        mx.zeros((2, 1, 3, 4), mx.bfloat16), mx.zeros((2, 1, 3, 4), mx.bfloat16)
    )
    assert window.column_bucket() == 256 and window.pass_width(2) == 256
    assert precision.on_gpu() is False  # (the rest of this module ran unforced here)

"""RoPE tables (mlx_specstream.rope): bit for bit MLX's own RoPE, used by the CPU step; and the
stream LoRA factors the runtime keeps between passes."""

import doctest

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import rope_utils

from helpers import tiny_spec_model
from mlx_specstream import rope
from mlx_specstream.kernels import count_kernels
from mlx_specstream.layout import layout_of

POS = [0, 7, 7, 8, 130, 131]  # repeated and out-of-order rows, as a tree's are


def _modules():
    llama3 = rope_utils.initialize_rope(
        16, 10000.0, False,
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        max_position_embeddings=4096,
    )  # fmt: skip
    assert type(llama3).__name__ == "Llama3RoPE"
    return {
        "rope": (nn.RoPE(16), 16),
        "traditional": (nn.RoPE(16, traditional=True), 16),
        "partial dims": (nn.RoPE(8, base=500.0), 16),
        "scaled": (nn.RoPE(16, scale=0.25), 16),
        "llama3": (llama3, 16),
        "proportional": (rope_utils.ProportionalRoPE(16, 8), 16),
    }


MODULES = _modules()


def test_docstring_example():
    result = doctest.testmod(rope)
    assert result.failed == 0 and result.attempted > 0, result


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_rotate_is_mlx_rope_bit_for_bit(name, dtype):
    module, head_dim = MODULES[name]
    call = type(module).__call__
    pos = mx.array(POS, dtype=mx.int32)
    x = (4 * mx.random.normal((1, 3, len(POS), head_dim), key=mx.random.key(1))).astype(dtype)
    t = rope.tables(call, module, pos, head_dim, dtype)
    got = rotate = rope.rotate(x, t)
    # The step's per-row call: one row per position on the batch axis.
    per_row = module(x.transpose(2, 1, 0, 3), offset=pos).transpose(2, 1, 0, 3)
    assert got.dtype == dtype and mx.array_equal(rotate, per_row).item()
    # The plain pass's call: contiguous rows from an int offset.
    rows = mx.arange(40, 44, dtype=mx.int32)
    xs = x[:, :, :4]
    plain = module(xs, offset=40)
    assert mx.array_equal(rope.rotate(xs, rope.tables(call, module, rows, head_dim, dtype)), plain)
    # Control: tables one position off give other values.
    off = rope.tables(call, module, pos + 1, head_dim, dtype)
    assert not mx.array_equal(rope.rotate(x, off), per_row).item()


def test_only_classes_whose_call_is_the_rotation_get_tables():
    assert rope.rope_settings(nn.RoPE(8, traditional=True)) == (8, True)
    su = rope_utils.SuScaledRoPE(16, max_position_embeddings=4096, short_factor=1.0,
                                 long_factor=1.0)  # scales its input first  # fmt: skip
    assert rope.rope_settings(su) is None
    assert rope.rope_settings(nn.Linear(2, 2)) is None

    # A hooked module is judged by the class it had before the hook.
    hooked = nn.RoPE(8)
    hooked.__class__ = type("RoPE", (nn.RoPE,), {"_spec_hook": True})
    assert rope.rope_settings(hooked) == (8, False)
    # A subclass that changes the call is not on the list.
    sub = type("MyRoPE", (nn.RoPE,), {"__call__": lambda self, x, offset=0: x})(8)
    assert rope.rope_settings(sub) is None


def _step_pass(model, with_tables: bool):
    """A fused multi-stream pass over a small tree after an 8-token prefix."""
    from mlx_lm.models.cache import make_prompt_cache

    rt = model.speculative_streams
    keys = rt._rope_keys
    if not with_tables:
        rt._rope_keys = dict.fromkeys(keys)  # (per RoPE module)
    try:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.arange(1, 9)[None], cache=cache))
        out = rt.forward(mx.array([3, 4, 5, 6]), layout_of([-1, 0, 0, 1]), cache)
        kernels = count_kernels([out.logits, out.stream_hidden])
        mx.eval(out.logits, out.stream_hidden)
        return out, kernels
    finally:
        rt._rope_keys = keys


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("kept", [True, False])
def test_the_cpu_step_reads_each_table_once_and_computes_the_same_pass(arch, kept, monkeypatch):
    if not kept:  # positions beyond a kept table: tables read for the pass's own positions
        monkeypatch.setattr("mlx_specstream.streams.MAX_ROPE_TABLE", 0)
    model = tiny_spec_model(arch, num_stream_layers=2, num_streams=2)
    with_t, k_with = _step_pass(model, True)
    without, k_without = _step_pass(model, False)
    layers = len(model.layers)
    # MLX's RoPE computes cosines for q and k in every layer. Kept tables are computed
    # once, outside the pass (it gathers rows); else one table per position array: the
    # tree rows below the stream layers, and the main and stream rows in them.
    assert k_without["Cos"] == 2 * layers
    assert k_with["Cos"] == (0 if kept else 2)
    assert mx.array_equal(with_t.logits, without.logits).item()
    assert mx.array_equal(with_t.stream_hidden, without.stream_hidden).item()
    if kept:
        (table,) = model.speculative_streams._full_rope_tables.values()
        assert table.cos.shape[0] == 512  # (grown by doubling from 512 positions)


def test_a_wrong_table_changes_the_pass(monkeypatch):
    """Control for the test above: the pass does use the tables."""
    model = tiny_spec_model("qwen2", num_stream_layers=2, num_streams=2)
    want, _ = _step_pass(model, False)
    real = rope.tables
    monkeypatch.setattr(
        "mlx_specstream.streams.tables", lambda call, m, pos, *a: real(call, m, pos + 1, *a)
    )
    got, _ = _step_pass(model, True)
    assert not mx.array_equal(got.logits, want.logits).item()


def test_plain_decoding_and_gpus_keep_mlx_rope(monkeypatch):
    """Outside a step (mlx-lm's own loop on the hooked model) the hooks defer to the
    module; on a GPU, where RoPE is one kernel, no tables are made."""
    model = tiny_spec_model("qwen2", num_stream_layers=2, num_streams=2)
    assert count_kernels([model(mx.array([[1, 2, 3]]))])["Cos"] == 2 * len(model.layers)
    monkeypatch.setattr("mlx_specstream.streams.on_gpu", lambda: True)
    _, kernels = _step_pass(model, True)
    assert kernels["Cos"] == 2 * len(model.layers)


def test_new_stream_lora_weights_reach_the_next_pass():
    """The runtime keeps each LoRA target's factors between passes; replacing the
    parameter arrays (as training and load_weights do) must reach the next pass.
    Control: a model that had the new weights from the start gives the same output,
    which differs from the old weights' output."""
    from mlx.utils import tree_map

    def with_new_weights(model):
        streams = model.speculative_streams.streams
        streams.update(tree_map(lambda p: p * 1.5, streams.parameters()))
        return model

    warm = tiny_spec_model("qwen2", num_stream_layers=2, num_streams=2, stream_lora_rank=4)
    before, _ = _step_pass(warm, True)
    _step_pass(warm, True)  # a second pass: the LoRA groups are learned by now
    after, _ = _step_pass(with_new_weights(warm), True)
    fresh = with_new_weights(
        tiny_spec_model("qwen2", num_stream_layers=2, num_streams=2, stream_lora_rank=4)
    )
    want, _ = _step_pass(fresh, True)
    assert mx.array_equal(after.stream_hidden, want.stream_hidden).item()
    assert not mx.allclose(before.stream_hidden, want.stream_hidden, atol=1e-4).item()


def test_a_kept_table_grows_to_cover_the_positions():
    model = tiny_spec_model("qwen2", num_stream_layers=2, num_streams=2)
    rt = model.speculative_streams
    layer = model.layers[0].self_attn.rope
    key, call = rt._rope_keys[id(layer)], nn.RoPE.__call__
    first = rt._full_rope_table(key, layer, call, 16, mx.float32, 10)
    grown = rt._full_rope_table(key, layer, call, 16, mx.float32, 700)
    assert (first.cos.shape[0], grown.cos.shape[0]) == (512, 1024)
    pos = mx.array([3, 511, 699], dtype=mx.int32)
    x = mx.random.normal((1, 2, 3, 16))
    want = layer(x.transpose(2, 1, 0, 3), offset=pos).transpose(2, 1, 0, 3)
    got = rope.rotate(x, grown._replace(cos=grown.cos[pos], sin=grown.sin[pos]))
    assert mx.array_equal(got, want).item()

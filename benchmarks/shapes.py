"""Random mlx-lm models of published shapes, for benchmarks where the weights do not matter."""

import importlib

import mlx.core as mx
import mlx.nn as nn

from mlx_specstream import SpecStreamConfig, attach_streams

# Published configs of these models (random weights of the same shapes); "small" is a
# 4-layer llama with a 32k vocabulary, for quick runs on a CPU.
SHAPES = {
    "small": dict(model_type="llama", hidden_size=256, num_hidden_layers=4,
                  intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=32000, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
                       intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                       vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                       tie_word_embeddings=True),
    # MiMo's layout (a Qwen2 base whose checkpoints hold MTP layers) at Qwen2-0.5B's shape,
    # and a small one for quick runs.
    "mimo-small": dict(model_type="mimo", hidden_size=256, num_hidden_layers=4,
                       intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=32000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       num_nextn_predict_layers=1),
    "mimo-0.5b": dict(model_type="mimo", hidden_size=896, num_hidden_layers=24,
                      intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                      vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                      tie_word_embeddings=True, num_nextn_predict_layers=1),
    "llama-3b": dict(model_type="llama", hidden_size=3072, num_hidden_layers=28,
                     intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
                     head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=5e5,
                     tie_word_embeddings=True),
    "llama-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                     intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256, rms_norm_eps=1e-5, rope_theta=5e5,
                     tie_word_embeddings=False),
    # Hybrids: Qwen3-Next's layout (3 Gated DeltaNet layers to 1 attention layer) with
    # dense MLPs, at Qwen3-0.6B's width and depth; and a small one for CPU runs.
    "qwen3_next-0.6b": dict(model_type="qwen3_next", hidden_size=1024, num_hidden_layers=28,
                            intermediate_size=3072, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, linear_num_value_heads=16,
                            linear_num_key_heads=16, linear_key_head_dim=128,
                            linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=0,
                            num_experts_per_tok=1, decoder_sparse_step=1,
                            shared_expert_intermediate_size=0, mlp_only_layers=[],
                            moe_intermediate_size=0, rms_norm_eps=1e-6, vocab_size=151936,
                            rope_theta=1e7, partial_rotary_factor=0.25,
                            max_position_embeddings=32768, full_attention_interval=4,
                            tie_word_embeddings=True),
    "qwen3_next-small": dict(model_type="qwen3_next", hidden_size=256, num_hidden_layers=8,
                             intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=64, linear_num_value_heads=4, linear_num_key_heads=4,
                             linear_key_head_dim=64, linear_value_head_dim=64,
                             linear_conv_kernel_dim=4, num_experts=0, num_experts_per_tok=1,
                             decoder_sparse_step=1, shared_expert_intermediate_size=0,
                             mlp_only_layers=[], moe_intermediate_size=0, rms_norm_eps=1e-6,
                             vocab_size=32000, rope_theta=1e7, partial_rotary_factor=0.25,
                             max_position_embeddings=32768, full_attention_interval=4,
                             tie_word_embeddings=True),
    # Sliding-window attention: Gemma 3 270M's published shape (5 window layers of 512
    # tokens to each global one), and a small one (window 128) for CPU runs.
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, num_hidden_layers=18,
                        intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=256, vocab_size=262144, rms_norm_eps=1e-6,
                        query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
                        rope_local_base_freq=10000.0, rope_global_base_freq=1000000.0,
                        max_position_embeddings=32768),
    "gemma3-small": dict(model_type="gemma3_text", hidden_size=256, num_hidden_layers=12,
                         intermediate_size=704, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=64, vocab_size=32000, rms_norm_eps=1e-6,
                         query_pre_attn_scalar=64, sliding_window=128, sliding_window_pattern=6,
                         rope_local_base_freq=10000.0, rope_global_base_freq=1000000.0,
                         max_position_embeddings=32768),
    # gpt-oss's layout (sliding windows of 128 on every other layer, heads of 64, attention
    # sinks, experts) at a small width: its head size takes cuDNN's attention on CUDA in
    # half precision, as Gemma 3's 256 does not.
    "gpt_oss-small": dict(model_type="gpt_oss", hidden_size=512, num_hidden_layers=8,
                          intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=64, num_local_experts=4, num_experts_per_tok=2,
                          sliding_window=128, rms_norm_eps=1e-5, rope_theta=150000,
                          layer_types=["sliding_attention", "full_attention"] * 4,
                          rope_scaling=None, swiglu_limit=7.0, vocab_size=32000),
}  # fmt: skip
DTYPES = ("f32", "bf16", "f16", "q4")


def random_model(shape: str, dtype: str, streams: bool = True, seed: int = 0, **overrides):
    """A random model of ``SHAPES[shape]`` (with ``overrides``) in ``f32``, ``bf16``,
    ``f16`` or ``q4`` (4-bit over bf16), with random lossless streams unless ``streams``
    is False."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {DTYPES}")
    args = {**SHAPES[shape], **overrides}
    module = importlib.import_module(f"mlx_lm.models.{args['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(args))
    model.set_dtype({"f32": mx.float32, "f16": mx.float16}.get(dtype, mx.bfloat16))
    if dtype == "q4":
        nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    if streams:
        attach_streams(model, SpecStreamConfig(num_streams=3), seed=seed + 1)
    return model

"""Tiny random mlx-lm models and tokenizers for the tests."""

import importlib
import inspect

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_map_with_path

from mlx_specstream import SpecStreamConfig, attach_streams

BASE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=64)

ARCH_ARGS = {
    "llama": dict(
        intermediate_size=128,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": dict(
        intermediate_size=128, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True
    ),
    "qwen3": dict(
        intermediate_size=128,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
    "phi3": dict(intermediate_size=128, num_key_value_heads=2, rms_norm_eps=1e-5),
    "gemma2": dict(
        intermediate_size=128,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=16.0,
    ),
    "gpt_neox": dict(
        max_position_embeddings=4096,
        layer_norm_eps=1e-5,
        rotary_emb_base=10000,
        rotary_pct=0.5,
        intermediate_size=128,
    ),
    "starcoder2": dict(intermediate_size=128, num_key_value_heads=2, norm_epsilon=1e-5),
}
ARCHS = sorted(ARCH_ARGS)

# Models whose layers alternate a sliding window (8 tokens here) with full attention:
# mlx-lm gives the window layers a RotatingKVCache (cache.model_caches replaces it).
WINDOWED_ARGS = {
    "gemma3_text": dict(
        intermediate_size=128, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        query_pre_attn_scalar=16.0, sliding_window=8, sliding_window_pattern=2,
        rope_local_base_freq=10000.0, rope_global_base_freq=1000000.0,
    ),
    "gpt_oss": dict(
        intermediate_size=64, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, rms_norm_eps=1e-5, rope_theta=150000,
        layer_types=["sliding_attention", "full_attention"] * 2, rope_scaling=None,
        swiglu_limit=7.0,
    ),
    "olmo3": dict(
        intermediate_size=128, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=512, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    "cohere2": dict(
        head_dim=16, intermediate_size=128, num_key_value_heads=2, rope_theta=10000.0,
        layer_norm_eps=1e-5, sliding_window=8, sliding_window_pattern=2,
    ),
}  # fmt: skip
WINDOWED = sorted(WINDOWED_ARGS)

# More of mlx-lm's architectures (tests/test_architectures.py): mixtures of experts,
# latent attention, NoPE layers, Ministral 3's position-scaled attention, and the
# vision-language wrappers whose language model mlx-lm loads (Gemma 3, Mistral 3).
MINISTRAL3 = dict(
    model_type="ministral3",
    hidden_size=64,
    num_hidden_layers=4,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    vocab_size=64,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    # (the attention scale steps every 8 positions here, every 16,384 in Ministral 3)
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "llama_4_scaling_beta": 0.1,
        "original_max_position_embeddings": 8,
    },
)
GEMMA4_TEXT = dict(
    num_hidden_layers=6, intermediate_size=128, num_key_value_heads=2, head_dim=16,
    global_head_dim=32, num_kv_shared_layers=2, hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=64, sliding_window=8, sliding_window_pattern=3,
    max_position_embeddings=512,
)  # fmt: skip
# Gemma 3n (its AltUp stacks 4 hidden states per token): the last 2 of its 6 layers
# are handed the cache of the last earlier layer of their kind.
GEMMA3N = dict(text_config=dict(
    model_type="gemma3n_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
    num_attention_heads=4, head_dim=16, rms_norm_eps=1e-6, num_key_value_heads=2,
    num_kv_shared_layers=2, vocab_size_per_layer_input=64, sliding_window=8,
    max_position_embeddings=512, rope_local_base_freq=10000.0, rope_theta=1000000.0,
    final_logit_softcapping=30.0,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    activation_sparsity_pattern=[0.0] * 6, hidden_size_per_layer_input=8, altup_num_inputs=4,
    altup_coef_clip=120.0, altup_correct_scale=True, altup_active_idx=0, laurel_rank=8,
))  # fmt: skip
_QWEN3_MOE = dict(
    intermediate_size=128,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
    num_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
)
_DEEPSEEK_V3 = dict(  # multi-head latent attention
    intermediate_size=128,
    num_key_value_heads=2,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    max_position_embeddings=512,
)
_YARN = {
    "type": "yarn",
    "factor": 1.0,
    "original_max_position_embeddings": 512,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0,
}
# Llama 4's language model: layers 0-2 attend in chunks of 8 positions (RoPE, llama3
# scaling), layer 3 to every token without RoPE, its queries scaled by position (a step
# every 4 positions); experts (top-1) in layers 1 and 3.
LLAMA4_TEXT = dict(
    model_type="llama4_text",
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=64,
    intermediate_size_mlp=128,
    attention_bias=False,
    attention_chunk_size=8,
    interleave_moe_layer_step=2,
    max_position_embeddings=512,
    num_experts_per_tok=1,
    num_local_experts=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    use_qk_norm=True,
    floor_scale=4,
    attn_scale=0.5,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
)
_NAS_BLOCKS = [  # (Nemotron-NAS: layers 1 and 3 without attention, 2 without an MLP)
    dict(attention=dict(n_heads_in_group=2), ffn=dict(ffn_mult=1.0)),
    dict(attention=dict(no_op=True), ffn=dict(ffn_mult=1.5)),
    dict(attention=dict(n_heads_in_group=4), ffn=dict(no_op=True)),
    dict(attention=dict(no_op=True), ffn=dict(ffn_mult=1.0)),
]
MORE_ARGS = {
    "nemotron-nas": dict(block_configs=_NAS_BLOCKS),
    "qwen3_moe": _QWEN3_MOE,
    "mixtral": dict(intermediate_size=128, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2),
    "deepseek_v3": _DEEPSEEK_V3,
    "glm4_moe": dict(
        intermediate_size=128, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=1, topk_group=1, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, attention_bias=False, tie_word_embeddings=False, norm_topk_prob=True,
        partial_rotary_factor=0.5, use_qk_norm=True, rope_scaling=None, routed_scaling_factor=1.0,
    ),
    "granite": dict(
        intermediate_size=128, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False, mlp_bias=False,
        logits_scaling=1.0, attention_multiplier=0.25, embedding_multiplier=1.0,
        residual_multiplier=1.0,
    ),
    "smollm3": dict(  # layer 3 is a NoPE layer (its RoPE module passes its input on)
        intermediate_size=128, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-5,
    ),
    "olmo2": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, rms_norm_eps=1e-5),
    "cohere": dict(intermediate_size=128, num_key_value_heads=2),
    "exaone": dict(  # RoPE inside attn.attention
        num_layers=4, intermediate_size=128, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, rope_theta=10000.0, layer_norm_epsilon=1e-5,
    ),
    "exaone4": dict(  # three window layers with RoPE, then a global layer without
        intermediate_size=128, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
        rope_scaling=None, sliding_window=8, sliding_window_pattern="LLLG",
    ),
    "llama4_text": dict(  # layer 3 without RoPE; experts in layers 1 and 3
        intermediate_size=128, intermediate_size_mlp=128, num_key_value_heads=2,
        rms_norm_eps=1e-5, rope_theta=10000.0, head_dim=16, tie_word_embeddings=False,
        no_rope_layers=[1, 1, 1, 0], use_qk_norm=True, num_local_experts=2,
        num_experts_per_tok=1, interleave_moe_layer_step=2, moe_layers=[1, 3],
    ),
    "ministral3": {  # window layers beside full ones
        **MINISTRAL3, "layer_types": ["sliding_attention", "full_attention"] * 2,
        "sliding_window": 8,
    },
    "mistral3": dict(text_config=MINISTRAL3),  # (Ministral 3, Devstral 2 checkpoints)
    "gemma3": dict(text_config={**BASE, **WINDOWED_ARGS["gemma3_text"],
                                "model_type": "gemma3_text"}),
    # Gemma 4: its last 2 layers read the keys and values of the last earlier layer
    # of their kind (sliding, sliding, full, sliding | sliding, full); per-layer inputs.
    "qwen3_vl": dict(text_config=dict(  # Qwen3-VL's language model (multimodal RoPE)
        model_type="qwen3_vl_text", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
        rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]},
    )),
    "qwen3_vl_moe": dict(text_config={**BASE, **_QWEN3_MOE, "model_type": "qwen3_moe"}),
    "pixtral": dict(text_config={**BASE, **ARCH_ARGS["llama"], "model_type": "llama"}),
    "kimi_vl": dict(text_config={**BASE, **_DEEPSEEK_V3, "model_type": "deepseek_v3"}),
    "deepseek_v2": {**_DEEPSEEK_V3, "rope_scaling": _YARN, "topk_method": "greedy"},
    "minicpm3": dict(  # latent attention, LongRoPE
        dim_model_base=64, intermediate_size=128, rms_norm_eps=1e-5, num_key_value_heads=4,
        q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, kv_lora_rank=16,
        scale_depth=1.4, scale_emb=12, max_position_embeddings=512,
        rope_scaling={"type": "longrope", "original_max_position_embeddings": 512,
                      "short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
    ),
    "mistral4": {  # latent attention, experts, Llama 4's attention scale (every 8 positions)
        **_DEEPSEEK_V3, "num_key_value_heads": 4, "routed_scaling_factor": 1.0,
        "norm_topk_prob": True, "rms_norm_eps": 1e-5,
        "rope_parameters": {**_YARN, "rope_theta": 10000.0, "llama_4_scaling_beta": 0.1,
                            "original_max_position_embeddings": 8},
    },
    "gemma4_text": GEMMA4_TEXT,
    "gemma4": dict(text_config={**BASE, **GEMMA4_TEXT, "model_type": "gemma4_text"}),
    "llama4": dict(text_config=LLAMA4_TEXT),
    # MiniMax M1/M2: experts in every layer (scaled too: see random_model), partial RoPE
    "minimax": dict(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=512,
                    num_experts_per_tok=2, num_local_experts=4, shared_intermediate_size=0,
                    rms_norm_eps=1e-5, rope_theta=10000.0, rotary_dim=8, head_dim=16),
    # Step 3.5: window layers (their own head counts, half RoPE) beside full ones
    "step3p5": dict(num_attention_groups=2, head_dim=16, intermediate_size=128, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"] * 2,
                    partial_rotary_factors=[0.5, 1.0, 0.5, 1.0],
                    attention_other_setting={"num_attention_heads": 4, "num_attention_groups": 2},
                    moe_num_experts=4, moe_top_k=2, moe_intermediate_size=32,
                    share_expert_dim=32, moe_layers_enum="1,3", max_position_embeddings=512),
    # Arcee's AFMoE (Trinity): RoPE window layers, NoPE full layers (rope None), gated
    "afmoe": dict(layer_types=["sliding_attention", "full_attention"] * 2, intermediate_size=128,
                  moe_intermediate_size=32, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, num_experts=4, num_experts_per_tok=2,
                  num_shared_experts=1, num_dense_layers=1, sliding_window=8),
    # MiMo-V2-Flash: window layers with attention sinks beside full ones, other head sizes
    "mimo_v2_flash": dict(
        num_experts_per_tok=2, hybrid_layer_pattern=[1, 0, 1, 0], moe_layer_freq=[0, 1, 0, 1],
        add_swa_attention_sink_bias=True, add_full_attention_sink_bias=False,
        sliding_window_size=8, intermediate_size=128, moe_intermediate_size=32,
        num_key_value_heads=2, n_shared_experts=None, n_routed_experts=4,
        routed_scaling_factor=1.0, topk_method="noaux_tc", scoring_func="sigmoid",
        norm_topk_prob=True, n_group=1, topk_group=1, max_position_embeddings=512,
        layernorm_epsilon=1e-5, rope_theta=10000.0, swa_rope_theta=10000.0,
        swa_num_attention_heads=4, swa_num_key_value_heads=2, head_dim=16, v_head_dim=16,
        swa_head_dim=16, swa_v_head_dim=16, partial_rotary_factor=0.5),
    # K-EXAONE (exaone_moe): three window layers, then a full one; experts after layer 0
    "exaone_moe": dict(intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2,
                       head_dim=16, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                       rms_norm_eps=1e-5, max_position_embeddings=512, sliding_window=8,
                       layer_types=["sliding_attention"] * 3 + ["full_attention"],
                       is_moe_layer=[False, True, True, True]),
    # DBRX: attention one module deeper (norm_attn_norm.attn), clipped QKV
    "dbrx": dict(d_model=64, n_layers=4, n_heads=4,
                 ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
                 attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0}),
}  # fmt: skip
# DeepSeek V3.2's sparse attention (DSA): an indexer picks each query's top 6 keys
# (past 6 tokens the attention is sparse), its keys cached beside the latent ones.
_DSA = dict(_DEEPSEEK_V3, index_head_dim=16, index_n_heads=2, index_topk=6)
MORE_ARGS["deepseek_v32"] = _DSA
MORE_ARGS["glm_moe_dsa"] = dict(  # GLM-5: the same attention, its RoPE in rope_parameters
    {k: v for k, v in _DSA.items() if k != "max_position_embeddings"},
    routed_scaling_factor=1.0, topk_method="noaux_tc", scoring_func="sigmoid",
    norm_topk_prob=True, moe_layer_freq=1, max_position_embeddings=512, rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, attention_bias=False,
)  # fmt: skip
MORE_ARGS.update({  # (session 29: more of mlx-lm's modules)
    # Kimi K2.5: DeepSeek V3's language model (latent attention, experts) in a VL wrapper
    "kimi_k25": dict(text_config={**BASE, **_DEEPSEEK_V3, "model_type": "deepseek_v3"}),
    # Qwen2-VL: a Qwen2 language model in a VL wrapper
    "qwen2_vl": dict(text_config={**BASE, **ARCH_ARGS["qwen2"], "model_type": "qwen2"}),
    # Lille 130M: fused QKV, norms inside attention and MLP (MLP width 256 from n_embd 64)
    "lille-130m": dict(block_size=512, layer_norm_eps=1e-5, n_embd=64, n_head=4, n_kv_heads=2,
                       n_layer=4, rope_theta=10000.0),
    # Mellum: experts in every layer (scaled), window layers beside full ones
    "mellum": dict(
        intermediate_size=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        rms_norm_eps=1e-6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        max_position_embeddings=512, norm_topk_prob=True, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                         "sliding_attention": {"rope_theta": 10000.0}},
    ),
    # Spark 2.5: three window layers (half RoPE) then a full one; fused QKV, head-wise
    # sigmoid output gates
    "spark2_5": dict(
        intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=8,
        max_position_embeddings=512,
        rope_parameters={"sliding_attention": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                         "full_attention": {"rope_theta": 1000000.0}},
    ),
})  # fmt: skip
# Hunyuan (without cross-layer attention: see test_architectures), experts, NTK-alpha RoPE;
# GPT-J (its model passes each layer's input by name, inputs=), partial interleaved RoPE
_HUNYUAN = dict(
    intermediate_size=64, num_key_value_heads=2, attention_bias=False, moe_topk=2,
    num_experts=4, num_shared_expert=1, use_mixed_mlp_moe=True, use_qk_norm=True,
    rms_norm_eps=1e-5, rope_theta=10000.0, use_cla=False, cla_share_factor=2,
    moe_intermediate_size=32, rope_scaling={"alpha": 1.0, "factor": 1.0, "type": "dynamic"},
)  # fmt: skip
MORE_ARGS["hunyuan"] = _HUNYUAN
# Qwen (v1) and PLaMo: RoPE named rotary_emb (PLaMo's layers take attention_mask=);
# OpenELM: per-layer head counts, its width named model_dim
# Phixtral: its attention is the layer's ``mixer``; its width named model_dim
MORE_ARGS["phixtral"] = dict(model_dim=64, num_heads=4, num_layers=4, rotary_dim=8,
                             num_experts_per_tok=2, num_local_experts=4)  # fmt: skip
MORE_ARGS["qwen"] = dict(kv_channels=16, intermediate_size=128, max_position_embeddings=512)
MORE_ARGS["plamo"] = dict(intermediate_size=128, rms_norm_eps=1e-6, n_shared_head=2)
MORE_ARGS["openelm"] = dict(
    head_dim=16, num_transformer_layers=4, model_dim=64, ffn_dim_divisor=16,
    num_query_heads=[4, 4, 4, 4], num_kv_heads=[2, 2, 1, 1],
    ffn_multipliers=[1.0, 1.5, 2.0, 2.0],
)  # fmt: skip
MORE_ARGS["gptj"] = dict(n_embd=64, n_head=4, n_layer=4, rotary_dim=8, n_positions=512)
# Absolute position embeddings added to the inputs (wpe): GPT-2, StarCoder (gpt_bigcode).
MORE_ARGS["gpt2"] = dict(n_ctx=512, n_embd=64, n_head=4, n_layer=4, n_positions=512,
                         layer_norm_epsilon=1e-5)  # fmt: skip
MORE_ARGS["gpt_bigcode"] = dict(n_embd=64, n_layer=4, n_inner=128, n_head=4, n_positions=512,
                                layer_norm_epsilon=1e-5)  # fmt: skip
# Models whose feed-forward layers are mostly experts (3-D matrices): those are scaled too.
SCALED_EXPERTS = {"minimax", "afmoe", "dbrx", "mellum"}
MORE = sorted(MORE_ARGS)

# Hybrid and state-space models: recurrent layers (ArraysCache) beside or instead of
# attention layers; prompt lookup runs on them (mlx_specstream.recurrent).
HYBRID_LFM2 = dict(  # short convolutions, attention in layers 1 and 3
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, norm_eps=1e-5, conv_bias=False, conv_L_cache=3,
    block_dim=64, block_multiple_of=16, block_ffn_dim_multiplier=1.0,
    block_auto_adjust_ff_dim=False, block_ff_dim=128, full_attn_idxs=[1, 3],
)  # fmt: skip
HYBRID_ARGS = {
    "qwen3_next": dict(  # Gated DeltaNet layers, full attention every second layer
        hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        num_experts=0, num_experts_per_tok=1, decoder_sparse_step=1,
        shared_expert_intermediate_size=64, mlp_only_layers=[], moe_intermediate_size=64,
        rms_norm_eps=1e-6, rope_theta=10000.0, partial_rotary_factor=0.5,
        max_position_embeddings=512, full_attention_interval=2,
    ),
    "lfm2": HYBRID_LFM2,
    "qwen3_5": dict(text_config=dict(  # Qwen 3.5: qwen3_next's mixers in a vision-language wrapper
        model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, full_attention_interval=2,
        rope_parameters={"type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000,
                         "partial_rotary_factor": 0.5},
    )),
    "falcon_h1": dict(  # a Mamba-2 mixer and an attention side by side in every layer
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
        mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=16,
        max_position_embeddings=512, rope_theta=10000.0,
    ),
    "qwen3_5_moe": dict(text_config=dict(  # Qwen 3.5's hybrid with experts
        model_type="qwen3_5_moe_text", hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
        max_position_embeddings=512, full_attention_interval=2, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
    )),
    "granitemoehybrid": dict(  # Granite 4: Mamba-2 and attention layers, experts
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, max_position_embeddings=512,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=False,
        embedding_multiplier=1.0, attention_multiplier=0.25, logits_scaling=1.0,
        residual_multiplier=1.0, layer_types=["mamba", "attention", "mamba", "attention"],
        rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2,
        shared_intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_proj_bias=False,
        mamba_d_state=8, mamba_d_conv=4, mamba_n_groups=1, mamba_conv_bias=True,
    ),
    "nemotron_h": dict(  # an MLP layer (no cache) first: caches are not one per layer
        hidden_size=64, intermediate_size=128, max_position_embeddings=512,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=False, mamba_num_heads=4,
        mamba_head_dim=16, mamba_proj_bias=False, ssm_state_size=8, conv_kernel=4, n_groups=1,
        mlp_bias=False, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True,
        hybrid_override_pattern="-M*M", num_hidden_layers=4, head_dim=16,
        time_step_limit=(0.0, float("inf")),
    ),
    "lfm2_moe": dict(  # LFM2's short convolutions, experts past the first layer
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, use_expert_bias=True,
        num_dense_layers=1, norm_eps=1e-5, conv_bias=False, conv_L_cache=3,
        full_attn_idxs=[1, 3],
    ),
    "lfm2-vl": dict(text_config={**HYBRID_LFM2, "model_type": "lfm2"}),  # LFM2-VL's
    "jamba": dict(  # Mamba layers, attention every second layer, experts
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1,
        expert_layer_period=2, mamba_d_conv=4, mamba_d_state=8, mamba_expand=2, num_experts=4,
        num_experts_per_tok=2, rms_norm_eps=1e-6, max_position_embeddings=512,
    ),
    "mamba2": dict(  # state-space layers only
        num_heads=4, head_dim=16, hidden_size=32, intermediate_size=64, state_size=8,
        num_hidden_layers=2, layer_norm_epsilon=1e-5, conv_kernel=4, n_groups=1,
        use_bias=False, use_conv_bias=True, tie_word_embeddings=True,
        time_step_limit=(0.0, float("inf")), time_step_rank=4,
    ),
}  # fmt: skip
_MORE_HYBRIDS = {  # (session 29; BASE's sizes under each)
    # RecurrentGemma (session 30): RG-LRU blocks and a local-attention block, window 8
    "recurrent_gemma": dict(
        attention_bias=False, conv1d_width=4, intermediate_size=128, logits_soft_cap=30.0,
        num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=10000.0, attention_window_size=8,
        block_types=["recurrent", "recurrent", "attention"],
    ),
    # Gear: short-convolution key/value mixers (recurrent) beside full attention layers
    # (untied head: tied, the random model repeats one token)
    "gear": dict(
        intermediate_size=128, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        layer_types=["conv_mixer", "full_attention"] * 2, tie_word_embeddings=False,
        max_position_embeddings=512, sliding_window=8, rope_theta=10000.0,
    ),
    # Mamba (v1): selective state-space layers only
    "mamba": dict(intermediate_size=128, state_size=8, conv_kernel=4, use_bias=False,
                  use_conv_bias=True, time_step_rank=4),
    # Kimi Linear: Kimi delta attention (recurrent) in layers 0 and 2, NoPE latent
    # attention in 1 and 3, experts after layer 0
    "kimi_linear": dict(
        num_key_value_heads=4, intermediate_size=128, head_dim=16, rope_theta=10000.0,
        rms_norm_eps=1e-5, model_max_length=512, num_experts=4, moe_intermediate_size=32,
        linear_attn_config={"kda_layers": [1, 3], "num_heads": 4, "head_dim": 16,
                            "short_conv_kernel_size": 4},
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        mla_use_nope=True, num_experts_per_token=2, num_shared_experts=1,
        first_k_dense_replace=1,
    ),
    # OLMo hybrid: Gated DeltaNet layers beside full attention (every second layer)
    "olmo_hybrid": dict(
        intermediate_size=128, num_key_value_heads=2, rms_norm_eps=1e-6,
        max_position_embeddings=512, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        linear_allow_neg_eigval=True, tie_word_embeddings=False, attention_bias=False,
        head_dim=16, layer_types=["linear_attention", "full_attention"] * 2,
    ),
    # Ling hybrid (bailing_hybrid): linear attention (gated, recurrent) in layers 0 and 2,
    # latent attention with half RoPE in 1 and 3; experts after layer 0
    "bailing_hybrid": dict(
        intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4, num_experts=4,
        num_experts_per_tok=2, num_shared_experts=1, n_group=1, topk_group=1,
        first_k_dense_replace=1, layer_group_size=2, group_norm_size=4, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=512, routed_scaling_factor=1.0,
        head_dim=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        q_lora_rank=32,
    ),
    # Ling linear (bailing_moe_linear): linear attention (recurrent) in layers 0 and 2,
    # softmax attention with half RoPE in 1 and 3; experts after layer 0
    "bailing_moe_linear": dict(
        intermediate_size=128, max_position_embeddings=512, moe_intermediate_size=32,
        num_experts=4, num_shared_experts=1, norm_topk_prob=True, num_experts_per_tok=2,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, first_k_dense_replace=1,
        layer_group_size=2, group_norm_size=4, use_qk_norm=True, partial_rotary_factor=0.5,
        head_dim=16, topk_group=1,
    ),
    # Baichuan-M1: keys and values mixed with the previous token's (a 2-tap convolution,
    # its state in an ArraysCache beside each KV cache); full attention only (with window
    # layers it is refused: VARIANTS).
    # (conv_k, conv_v start as zeros, which zero the keys and values: see INIT)
    "baichuan_m1": dict(
        intermediate_size=128, num_key_value_heads=2, rope_theta=10000.0, sliding_window=8,
        sliding_window_layers=[], conv_window=2, rms_norm_eps=1e-6,
    ),
    # LongCat-Flash with n-gram embeddings: the input embedding adds hashed embeddings of
    # the 2- and 3-grams ending at each token (the last 2 tokens kept in an ArraysCache
    # ahead of the layers' caches)
    "longcat_flash_ngram": dict(
        ffn_hidden_size=128, moe_topk=2, expert_ffn_hidden_size=32, n_routed_experts=4,
        zero_expert_num=2, num_layers=2, max_position_embeddings=512, kv_lora_rank=16,
        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        routed_scaling_factor=1.0, rms_norm_eps=1e-5, rope_theta=10000.0,
        mla_scale_q_lora=True, mla_scale_kv_lora=True, ngram_vocab_size_ratio=4,
        emb_neighbor_num=3, emb_split_num=2,
    ),
}  # fmt: skip
_MORE_HYBRIDS.update({  # (session 31)
    # RWKV-7: a time mix (WKV state, token shift) and a channel mix (its own token shift)
    # in every layer, writing slots 0-1 and 2 of one ArraysCache; heads of 32 (mlx-lm's
    # Metal WKV kernel takes multiples of 32)
    "rwkv7": dict(
        intermediate_size=128, norm_eps=1e-5, head_dim=32, a_low_rank_dim=8, v_low_rank_dim=8,
        gate_low_rank_dim=8, decay_low_rank_dim=8, tie_word_embeddings=False,
    ),
    # Kimi K3: delta attention (recurrent, short convolution) in layers 0 and 2, NoPE
    # latent attention with an output gate in 1 and 3; grouped experts through a normed
    # latent after layer 0; attention residuals over blocks of 2 layers
    "kimi_k3": dict(text_config=dict(
        **BASE, model_type="kimi_k3", num_key_value_heads=4, intermediate_size=128,
        rms_norm_eps=1e-5, max_position_embeddings=512,
        linear_attn_config=dict(kda_layers=[1, 3], num_heads=2, head_dim=32,
                                short_conv_kernel_size=4),
        activation_situ_beta=1.0, attn_res_block_size=2, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, mla_use_nope=True,
        mla_use_output_gate=True, num_experts=4, num_experts_per_token=2,
        num_shared_experts=1, moe_intermediate_size=32, routed_scaling_factor=1.0,
        first_k_dense_replace=1, moe_layer_freq=1, use_grouped_topk=True,
        num_expert_group=2, topk_group=1, routed_expert_hidden_size=32,
        latent_moe_use_norm=True, tie_word_embeddings=False,
    )),
})  # fmt: skip
HYBRID_ARGS.update({arch: {**BASE, **args} for arch, args in _MORE_HYBRIDS.items()})


def _random_convolutions(model):
    """Baichuan-M1's 2-tap key/value convolutions, random (mlx-lm starts them at zero,
    which zeroes the keys and values)."""
    for layer in model.layers:
        attn = layer.self_attn
        attn.conv_k = mx.random.uniform(-1, 1, attn.conv_k.shape)
        attn.conv_v = mx.random.uniform(-1, 1, attn.conv_v.shape)


def _uniform(a, lo, hi):
    return mx.random.uniform(lo, hi, a.shape).astype(a.dtype)


def _random_rwkv7_mixes(model):
    """RWKV-7's token-shift mixes, k_k, k_a, r_k and output norm, random (mlx-lm starts
    them at zero, and the zero norm zeroes every time mix)."""
    for layer in model.layers:
        att = layer.attn
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(att, name, _uniform(getattr(att, name), 0.0, 1.0))
        att.k_k, att.k_a = _uniform(att.k_k, 0.5, 1.5), _uniform(att.k_a, 0.0, 1.0)
        att.r_k = _uniform(att.r_k, -1.0, 1.0)
        att.g_norm.weight = _uniform(att.g_norm.weight, 0.5, 1.5)
        att.g_norm.bias = _uniform(att.g_norm.bias, -0.1, 0.1)
        layer.ffn.x_k = _uniform(layer.ffn.x_k, 0.0, 1.0)


HYBRID_INIT = {"baichuan_m1": _random_convolutions, "rwkv7": _random_rwkv7_mixes}
HYBRIDS = sorted(HYBRID_ARGS)

# Models the tree verifier cannot take (mlx_specstream.recurrent.tree_refusal), whose own
# passes verify chains: their positions out of its reach (nanochat: RoPE in a function;
# talkie: layers called with its embeddings too), a cache per layer pass
# (IQuest-Loop-Coder), several key caches a layer (MiniMax M3's block-sparse attention).
CHAIN_ARGS = {
    "nanochat": dict(intermediate_size=128, num_key_value_heads=2),
    "talkie": dict(intermediate_size=128, head_dim=16),
    "iquestloopcoder": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16,
                            rms_norm_eps=1e-5),
    "minimax_m3_vl": dict(text_config=dict(
        hidden_size=64, intermediate_size=32, dense_intermediate_size=128,
        shared_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, rope_theta=10000.0, head_dim=16, rotary_dim=8,
        routed_scaling_factor=1.0, moe_layer_freq=[0, 1, 1, 1],
        sparse_attention_freq=[0, 1, 0, 1], index_n_heads=2, index_head_dim=16,
        index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
    )),
    # LongCat-Flash: two latent attentions a layer (a CacheList of two KVCaches), two
    # dense MLPs and a shortcut MoE with identity experts; 2 layers, 4 attentions
    "longcat_flash": dict(
        attention_method="MLA", zero_expert_type="identity", ffn_hidden_size=128, moe_topk=2,
        expert_ffn_hidden_size=32, n_routed_experts=4, zero_expert_num=2, num_layers=2,
        max_position_embeddings=512, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=1.0, rms_norm_eps=1e-5,
        rope_theta=10000.0, mla_scale_q_lora=True, mla_scale_kv_lora=True,
        attention_bias=False,
    ),
    # Apple's AFM 7: 2 layers with caches, 2 attending to the last one's keys and values
    "afm7": dict(
        hidden_dim=64, num_layers=4, num_kv_reuse_layers=2, num_heads=4, num_kv_heads=2,
        hidden_dim_scale_factor=2.0, rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
    # DeepSeek V4.1 (its release's layout in 5 layers): a window of 8 rows, groups of 2
    # compressed in layers 1-2, every token in 3-4, an indexer keeping 4, layers reading
    # earlier ones' latents and candidate blocks, 4 hyper-connection streams; its
    # LayerCache cannot be trimmed, and a chain keeps it aside whole
    "deepseek_v41": dict(
        num_hidden_layers=5, head_dim=32, q_lora_rank=32, qk_rope_head_dim=8, o_groups=2,
        o_lora_rank=16, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        rms_norm_eps=1e-6, sliding_window=8, compress_ratios=[0, 2, 2, 1, 1],
        kv_source_layer_ids=[1, 3], index_source_layer_ids=[1, 3, 4],
        candidate_source_layer_id=3, candidate_topk_blocks=2, candidate_block_size=2,
        index_n_heads=2, index_head_dim=32, index_topk=4, compress_rope_theta=10000.0,
        rope_theta=10000.0, max_position_embeddings=512, hc_mult=4, hc_sinkhorn_iters=5,
    ),
}  # fmt: skip
CHAIN_MODELS = sorted(CHAIN_ARGS)


def tiny_chain_model(arch, vocab_size=16, seed=0, **overrides):
    """A random tiny model of ``CHAIN_ARGS``; parameters mlx-lm starts at zero (talkie's
    head, DeepSeek V4.1's routers and hyper-connection mixes) drawn at random, else
    every token is the same."""
    model = random_model(arch, {**BASE, **CHAIN_ARGS[arch], **overrides}, vocab_size, seed)
    mx.random.seed(seed + 1)
    model.update(tree_map(
        lambda w: mx.random.normal(w.shape) * (0.5 if w.ndim == 1 else 1.0)
        if w.size and not mx.any(w).item() else w,
        model.parameters(),
    ))  # fmt: skip
    mx.eval(model.parameters())
    return model


def random_model(arch, args, vocab_size, seed=0, weight_scale=4.0, **overrides):
    """mlx-lm's ``arch`` model from ``args`` (a vision-language wrapper's
    ``text_config`` gets the vocabulary too), random in ``seed``, its decoder layers'
    matrices multiplied by ``weight_scale`` (see ``tiny_model``); not evaluated."""
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    params = {**args, "vocab_size": vocab_size, "model_type": arch, **overrides}
    if "num_vocab" in inspect.signature(module.ModelArgs).parameters:  # (Phixtral's name)
        params["num_vocab"] = vocab_size
    if "text_config" in params:  # a vision-language wrapper: its language model's args
        params["text_config"] = {**params["text_config"], "vocab_size": vocab_size}
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(params))
    model.update(
        tree_map_with_path(
            lambda path, w: w * weight_scale if _is_layer_matrix(path, w, arch) else w,
            model.parameters(),
        )
    )
    return model


def tiny_hybrid(arch="qwen3_next", vocab_size=8, seed=0, weight_scale=4.0, **overrides):
    """A random tiny mlx-lm model with recurrent layers (see ``tiny_model``)."""
    model = random_model(arch, HYBRID_ARGS[arch], vocab_size, seed, weight_scale, **overrides)
    HYBRID_INIT.get(arch, lambda m: None)(model)
    mx.eval(model.parameters())
    return model


def stream_hybrid(arch="qwen3_next", vocab_size=8, **kwargs):
    """A tiny model with recurrent layers and random lossless streams on its top layer
    (an attention layer: ``support.on_chains``)."""
    model = tiny_hybrid(arch, vocab_size=vocab_size, **kwargs)
    attach_streams(model, SpecStreamConfig(num_streams=3, num_stream_layers=1), seed=1)
    return model


def tiny_model(
    arch="llama", vocab_size=64, seed=0, dtype=None, quant_bits=None, weight_scale=4.0, **overrides
):
    """A random tiny mlx-lm model of architecture ``arch`` (no streams).

    ``weight_scale`` multiplies the decoder layers' matrices: at the default
    init, random tiny models fall into one-token loops; scaled up, their greedy
    output is varied, so drafts are sometimes right and sometimes wrong.
    """
    args = {**BASE, **{**ARCH_ARGS, **WINDOWED_ARGS, **MORE_ARGS, "gemma3n": GEMMA3N}[arch]}
    model = random_model(arch, args, vocab_size, seed, weight_scale, **overrides)
    if dtype is not None:
        model.set_dtype(dtype)
    if quant_bits is not None:
        nn.quantize(model, group_size=32, bits=quant_bits)
    mx.eval(model.parameters())
    return model


def _is_layer_matrix(path, w, arch=None):
    experts = arch in SCALED_EXPERTS and w.ndim == 3
    return (w.ndim == 2 or experts) and any(f".{n}." in path for n in ("layers", "h", "blocks"))


def tiny_spec_model(
    arch="llama",
    vocab_size=64,
    seed=0,
    stream_seed=1,
    dtype=None,
    quant_bits=None,
    weight_scale=4.0,
    model_args=None,
    **cfg,
):
    """A tiny random model with random streams (``cfg`` goes to SpecStreamConfig,
    ``model_args`` to the architecture's ModelArgs)."""
    model = tiny_model(
        arch, vocab_size, seed, dtype, quant_bits, weight_scale, **(model_args or {})
    )
    cfg.setdefault("num_stream_layers", 2)
    attach_streams(model, SpecStreamConfig(**cfg), seed=stream_seed)
    return model


def word_tokenizer(vocab_size=64, eos=None, chat_template=None):
    """A whitespace WordLevel tokenizer over ``t0 .. t{V-1}``, mlx-lm wrapped."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = vocab_size - 1 if eos is None else eos
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}")
    hf.chat_template = chat_template
    return TokenizerWrapper(hf)


def plain_greedy(model, prompt, max_tokens, **kwargs):
    """mlx-lm's own greedy decoding (the hooks are inactive outside our steps); ``kwargs``
    go to its ``generate_step`` (e.g. ``logits_processors``)."""
    from mlx_lm.generate import generate_step

    gen = generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kwargs)
    return [t for t, _ in gen]


def near_ties_allowed(model) -> bool:
    """Whether greedy output may leave plain decoding's at a near-tie: on a GPU, in
    bfloat16 or float16 or with quantized weights, where a pass over several rows
    runs other kernels than a one-row pass (``tests/test_near_tie.py``)."""
    from mlx.utils import tree_flatten

    from mlx_specstream import precision

    low = precision.compute_dtype(model) != mx.float32
    quantized = any(v.dtype == mx.uint32 for _, v in tree_flatten(model.parameters()))
    return precision.on_gpu() and (low or quantized)


def assert_lossless(model, prompt, got, want):
    """``got`` equals ``want`` (plain decoding's tokens after ``prompt``) token for
    token, or, where :func:`near_ties_allowed`, first leaves it at a near-tie
    (:func:`mlx_specstream.fidelity.first_divergence`)."""
    if not near_ties_allowed(model):
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert first is None and len(got) == len(want), (
            f"first difference at token {first}: {got[first:first + 5]} vs "
            f"{want[first:first + 5]}"
            if first is not None
            else f"{len(got)} != {len(want)} tokens"
        )
        return
    from mlx_specstream.fidelity import first_divergence

    d = first_divergence(model, prompt, list(got), list(want))
    assert d is None or d.near_tie, f"prompt {prompt}: {d} is not a near-tie"


def spec_tokens(model, prompt, max_tokens, **kwargs):
    """Tokens and per-token records of Speculative Streaming decoding."""
    from mlx_specstream.decode import spec_generate_step

    out = list(spec_generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kwargs))
    return [o[0] for o in out], out


def tree_logits_off_plain(model, prompt, tree, rt=None):
    """Per node of ``tree`` (``(tokens, parents)``), the largest difference between its
    logits in one pass after ``prompt`` (the model's runtime, or ``rt``) and the
    model's own logits after the prompt and the node's path (with caches, as decoding
    runs it)."""
    import numpy as np

    from mlx_specstream import make_prompt_cache
    from mlx_specstream.tree import path_to

    rt = rt or model.speculative_streams
    cache = make_prompt_cache(model)
    model(mx.array(prompt)[None], cache=cache)
    got = np.array(rt.forward(*tree, cache).logits)
    want = []
    for k in range(len(tree[0])):
        path = prompt + [tree[0][a] for a in path_to(k, tree[1])]
        want.append(np.array(model(mx.array(path)[None], cache=make_prompt_cache(model))[0, -1]))
    return np.abs(got - np.stack(want)).max(axis=-1)


def assert_lookup_equals_mlx_lm(model, prompt, max_tokens, **kwargs):
    """Prompt lookup (4 draft tokens, ``kwargs`` to our loop) gives mlx-lm's greedy
    tokens and log-probabilities, with drafts accepted (the test has power)."""
    from mlx_lm.generate import generate_step

    want = list(generate_step(mx.array(prompt), model, max_tokens=max_tokens))
    got, records = spec_tokens(model, prompt, max_tokens, draft="ngram", num_draft_tokens=4,
                               **kwargs)  # fmt: skip
    assert got == [int(t) for t, _ in want]
    assert sum(r[2] for r in records) > 5, "no lookup draft accepted: the test has no power"
    for (_, lp), r in zip(want, records):  # the same distributions, token by token
        assert mx.allclose(lp, r[1], atol=1e-4)


def assert_prompt_caches_carried(model, tok, caches, held, check_cache, eos=7, n=20):
    """``batch_generate`` from ``caches`` (each holding the tokens ``held``) over two
    turns, then again from the caches it returns: each row's tokens equal plain
    decoding of its whole conversation; ``check_cache`` is called on each returned
    cache (which holds all but its row's last token)."""
    from mlx_specstream import batch_generate

    turns = [[5, 2], [6]]
    kwargs = dict(return_token_ids=True, draft="ngram", num_draft_tokens=3)
    first = batch_generate(model, tok, turns, max_tokens=n, prompt_caches=caches,
                           return_prompt_caches=True, **kwargs)  # fmt: skip
    gens = [ids + [eos] * (r == "stop") for ids, r in zip(first.token_ids, first.finish_reasons)]
    for t, gen, c in zip(turns, gens, first.caches):
        assert gen == plain_greedy(model, held + t, n)[: len(gen)]
        check_cache(c)
    second = batch_generate(model, tok, [[gen[-1], 1] for gen in gens], max_tokens=n,
                            prompt_caches=first.caches, **kwargs)  # fmt: skip
    for t, gen, ids in zip(turns, gens, second.token_ids):
        assert ids == plain_greedy(model, held + t + gen + [1], n)[: len(ids)]


def bucket_views(monkeypatch) -> list:
    """Records ``(columns, first row's position)`` of every view a pass's caches in
    buckets return (pipelined or not)."""
    from mlx_specstream.cache import BucketedCache, FoldingCache, first_row

    views = []
    for cls in (FoldingCache, BucketedCache):
        real = cls.update_and_fetch

        def spy(self, keys, values, real=real):
            out = real(self, keys, values)
            views.append((out[0].shape[2], first_row(self.cache)))
            return out

        monkeypatch.setattr(cls, "update_and_fetch", spy)
    return views


def benchmark_settings(monkeypatch) -> list:
    """The keyword arguments of every ``mlx_specstream.benchmark.run_specstream`` call
    from now on (each row's settings), appended as the calls come."""
    from mlx_specstream import benchmark

    settings, real = [], benchmark.run_specstream

    def recording(model, tokenizer, prompt, max_tokens, **kwargs):
        settings.append(kwargs)
        return real(model, tokenizer, prompt, max_tokens, **kwargs)

    monkeypatch.setattr(benchmark, "run_specstream", recording)
    return settings

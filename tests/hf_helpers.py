"""Tiny random ``transformers`` checkpoints with speculative streams, for the converter tests."""

import json
from pathlib import Path

import torch

from mlx_specstream.config import CONFIG_KEY, SpecStreamConfig

HF_CONFIGS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    "phi3": (
        "Phi3Config",
        dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
    "gemma2": (
        "Gemma2Config",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            pad_token_id=0,
        ),
    ),
    # mlx-lm's gpt_neox hard-codes a 4 * hidden MLP and tanh-GELU; starcoder2 exact GELU.
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            rotary_pct=0.5, use_parallel_residual=True, intermediate_size=256, hidden_act="gelu_new"
        ),
    ),
    "starcoder2": ("Starcoder2Config", dict(num_key_value_heads=2, hidden_act="gelu")),
}


def hf_model(arch, vocab_size=64, seed=0, weight_scale=3.0, **overrides):
    import transformers

    cls, extra = HF_CONFIGS[arch]
    params = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    config = getattr(transformers, cls)(**{**params, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ".layers." in name:
                p.mul_(weight_scale)
    return model.eval()


def hf_tokenizer(vocab_size=64):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{vocab_size - 1}")


def randomize_streams(msm, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in msm.streams.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if name == "embeddings" else p.shape[-1] ** -0.5))


def write_checkpoint(
    path: Path, model, spec: SpecStreamConfig, fmt="safetensors", streams="file", seed=1
):
    """Saves ``model`` with ``save_pretrained`` in ``fmt`` (safetensors, bin, sharded,
    sharded-bin) plus random stream tensors, in their own file or embedded."""
    from safetensors.torch import save_file

    from convert.msa import MultiStreamModel

    msm = MultiStreamModel(model, spec)
    randomize_streams(msm, seed)
    kwargs = dict(safe_serialization=fmt in ("safetensors", "sharded"))
    if fmt.startswith("sharded"):
        kwargs["max_shard_size"] = "100KB"
    model.save_pretrained(str(path), **kwargs)
    # Embeddings are padded past the tokenizer, as in real checkpoints.
    hf_tokenizer(model.config.vocab_size - 8).save_pretrained(str(path))
    cfg = json.loads((path / "config.json").read_text())
    cfg[CONFIG_KEY] = spec.to_dict()
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous() for k, v in msm.streams.state_dict().items()}
    if streams == "file":
        save_file(state, str(path / "speculative_streams.safetensors"))
    else:  # embedded in the (single-file safetensors) model weights
        from safetensors.torch import load_file

        weights = load_file(str(path / "model.safetensors"))
        weights.update({f"speculative_streams.{k}": v for k, v in state.items()})
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return msm

"""What a recipe's shipped models take, counted from its architectures before any training.

The models ship inside the package, so they count against the tracked tree, which travels
to the GPU machine with every run (at most 30 MB, beside a part of MLX). A build learns its
package's size at its last stage (``ship`` refuses one above ``Recipe.ship_limit_mb``);
this counts it from the recipe alone: each tensor of the base, the draft model and the
lossless streams (built on PyTorch's meta device: nothing is allocated), at the bits the
recipe's conversion arguments name, as mlx-lm stores them (``bits / 8`` bytes a weight and a
16-bit scale and bias per group), plus one copy of the tokenizer per model directory (mlx-lm's
``--draft-model`` loads a directory with its own).
"""

import json
from typing import Optional, Sequence

from .recipes import Recipe

TREE_MB = 30.0
# The tracked tree outside mlx_specstream/models: 6.36 MB in session 60 (README, results,
# tests, code), with room to grow.
OTHER_FILES_MB = 7.0
# tokenizer.json and tokenizer_config.json of convert.tokenizer's BPE, per 1,000 pieces:
# 1.87 MB for 16,000 pieces with --newline-pieces (session 60), 0.84 MB for 8,000 without.
TOKENIZER_MB_PER_1K_PIECES = 0.118


def flag(args: Sequence[str], name: str, default=None):
    """The value after ``name`` in ``args`` (``default`` when absent)."""
    return args[args.index(name) + 1] if name in args else default


def llama(recipe_args: Sequence[str], vocab: int):
    """The Llama a ``convert.pretrain`` stage builds from ``recipe_args``, on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .pretrain import DEFAULT_ARCH

    arch = {**DEFAULT_ARCH, **json.loads(flag(recipe_args, "--arch", "{}"))}
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **arch))


def conversion_bits(convert_args: Sequence[str]) -> Optional[int]:
    """The bits a conversion stores the model's matrices in (``None``: 16-bit)."""
    if "--quantize" not in convert_args and "-q" not in convert_args:
        return None
    return int(flag(convert_args, "--q-bits", 4))


def model_bytes(model, bits: Optional[int], group: int = 64) -> int:
    """Bytes of ``model`` as mlx-lm saves it: matrices (the embedding too) whose rows
    split into groups at ``bits`` with a 16-bit scale and bias per group, the rest 16-bit."""
    total = 0
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if bits is not None and p.ndim == 2 and p.shape[-1] % group == 0:
            total += p.numel() * bits // 8 + p.numel() // group * 4
        else:
            total += p.numel() * 2
    return total


def stream_bytes(recipe: Recipe, base) -> int:
    """The lossless streams' float32 tensors: the stream embeddings, the stream-only LoRA on
    each stream layer's targeted linear modules (``convert.finetune``'s default: all), and
    the pruning adapter (rank 8). The recipe's arguments are read by the fine-tune's own
    parser, so its defaults apply."""
    import torch

    from .finetune import setup_arg_parser

    a = setup_arg_parser().parse_args(
        ["--model", "m", "--data", "d", "--out", "o",
         *map(str, (*recipe.ss_common, *recipe.ss_lossless))]
    )  # fmt: skip
    layer = base.model.layers[-1]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    lora = sum(a.stream_lora_rank * (linears[t].in_features + linears[t].out_features)
               for t in a.stream_lora_targets or linears)  # fmt: skip
    h = base.config.hidden_size
    return 4 * (a.num_streams * h + a.num_stream_layers * lora + 2 * 8 * h)


def shipped_bytes(recipe: Recipe, tokenizer_bytes: Optional[int] = None) -> dict:
    """Each part of what ``recipe`` ships, in bytes: ``base``, ``streams``, ``draft``,
    ``tokenizers`` and their ``total``. ``tokenizer_bytes``: one copy's (default: estimated
    from the vocabulary size)."""
    vocab = int(flag(recipe.tokenizer, "--vocab-size"))
    if tokenizer_bytes is None:
        tokenizer_bytes = int(vocab / 1000 * TOKENIZER_MB_PER_1K_PIECES * 1e6)
    base = llama(recipe.base, vocab)
    parts = {
        "base": model_bytes(base, conversion_bits(recipe.convert)),
        "streams": stream_bytes(recipe, base),
        "draft": model_bytes(llama(recipe.draft, vocab), conversion_bits(recipe.draft_convert)),
        "tokenizers": 2 * tokenizer_bytes,
    }
    parts["total"] = sum(parts.values())
    return parts

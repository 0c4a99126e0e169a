"""The model used when none is given.

No trained model ships yet, so this builds a tiny randomly initialised
Llama-architecture model with random streams and a byte-level tokenizer, in
memory and deterministically. Its text is noise; it exists so the package
runs end to end on a fresh machine with no download.
"""

import sys

import mlx.core as mx

from .config import SpecStreamConfig
from .streams import attach_streams

NOTICE = (
    "[mlx_specstream] No trained default model is shipped yet: using a tiny randomly "
    "initialised Llama model (its output is noise). Pass --model for a real one."
)


def byte_tokenizer():
    """A 256-symbol byte-level BPE tokenizer (no merges) plus an end-of-text token."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    return TokenizerWrapper(hf)


def load_default():
    """Returns ``(model, tokenizer)`` for the random default model, printing a notice."""
    from mlx_lm.models import llama

    print(NOTICE, file=sys.stderr)
    tokenizer = byte_tokenizer()
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=6,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=len(tokenizer.get_vocab()),
        tie_word_embeddings=True,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    attach_streams(model, SpecStreamConfig(num_streams=3, num_stream_layers=2, top_k=2), seed=0)
    return model, tokenizer

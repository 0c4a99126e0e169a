"""The embedded default model: loads offline, decodes losslessly, and drafts well."""

import json
import os

import mlx.core as mx
import pytest
from helpers import plain_greedy, spec_tokens

from mlx_specstream import load
from mlx_specstream.default_model import DEFAULT_DIR, DRAFT_DIR

PROMPTS = [json.loads(line)["prompt"] for line in open(DEFAULT_DIR / "prompts.jsonl")][:4]
# Every stream: the shipped config may be tuned to plain decoding (tree_depth 0).
CONFIG = json.loads((DEFAULT_DIR / "config.json").read_text())
GAMMA = CONFIG["speculative_streaming"]["num_streams"]
# The shipped streams average 3.0 tokens per pass on these prompts; a random or broken
# model stays near 1.0, and so do the drowned streams of the control below.
TAU_BAR = 2.5


@pytest.fixture(scope="module")
def default():
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from a hub
    model, tokenizer = load()
    return model, tokenizer


def test_loads_offline_as_float32_on_cpu(default):
    model, tokenizer = default
    assert model.model.embed_tokens.weight.dtype == mx.float32
    assert len(tokenizer.get_vocab()) == model.args.vocab_size
    # Its directory is an ordinary mlx-lm model too.
    import mlx_lm

    base, _ = mlx_lm.load(str(DEFAULT_DIR))
    draft, _ = mlx_lm.load(str(DRAFT_DIR))
    assert draft.args.vocab_size == base.args.vocab_size


def test_decodes_losslessly_and_fast_on_held_out_code(default):
    model, tokenizer = default
    taus = []
    for text in PROMPTS:
        prompt = tokenizer.encode(text)
        toks, records = spec_tokens(
            model, prompt, 64, tree_top_k=3, max_tree_nodes=40, tree_depth=GAMMA
        )
        assert toks == spec_tokens(model, prompt, 64, speculative=False)[0]
        if model.speculative_streams.config.mode == "lossless":
            assert toks == plain_greedy(model, prompt, 64)
        taus.append(len(toks) / records[-1][3])
    assert sum(taus) / len(taus) > TAU_BAR, taus


def test_negative_control_drowned_streams_draft_badly(default):
    """The tau bar above can fail: the same model with stream rows drowned in noise.

    (Fresh small random embeddings are not a reliable control: a shared-mode
    base can tell the streams apart by the mask alone, see benchmarks/RESULTS.md.)
    """
    import mlx_lm

    from mlx_specstream import attach_streams

    base, tokenizer = mlx_lm.load(str(DEFAULT_DIR))
    base.set_dtype(mx.float32)
    shipped = default[0].speculative_streams
    streams = attach_streams(base, shipped.config, weights=None, seed=0)
    streams.update(shipped.streams.parameters())  # the trained streams, then the noise
    streams.embeddings = 300.0 * mx.random.normal(streams.embeddings.shape, key=mx.random.key(0))
    taus = []
    for text in PROMPTS[:2]:
        toks, records = spec_tokens(
            base, tokenizer.encode(text), 64, tree_top_k=3, max_tree_nodes=40, tree_depth=GAMMA
        )
        taus.append(len(toks) / records[-1][3])
    assert sum(taus) / len(taus) < TAU_BAR, taus


def test_a_quantized_default_runs_dequantized_in_float32_on_a_cpu(tmp_path, monkeypatch):
    """The code recipe ships its base quantized; on a CPU it runs as its weights dequantized
    (bit for bit mx.dequantize's), in float32, and still decodes as plain decoding does.
    Control: the same weights dequantized at 3 bits differ."""
    import shutil

    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.utils import quantize_model, save_config, save_model

    import mlx_specstream.default_model as default_model

    quantized, config = mlx_lm.utils.load_model(DEFAULT_DIR, lazy=False, strict=False)
    quantized, config = quantize_model(quantized, config, 64, 4)
    copy = tmp_path / "default"
    save_model(copy, quantized)
    save_config(config, copy / "config.json")
    for f in DEFAULT_DIR.iterdir():
        if f.name not in ("config.json",) and not f.name.startswith("model"):
            shutil.copy(f, copy / f.name)
    monkeypatch.setattr(default_model, "DEFAULT_DIR", copy)
    model, tokenizer = load()
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                   for _, m in model.named_modules())  # fmt: skip
    q = quantized.model.layers[0].mlp.down_proj
    want = mx.dequantize(q.weight, q.scales, q.biases, 64, 4).astype(mx.float32)
    got = model.model.layers[0].mlp.down_proj.weight
    assert got.dtype == mx.float32 and mx.array_equal(got, want)
    original = mlx_lm.utils.load_model(DEFAULT_DIR, lazy=False, strict=False)[0]
    w = original.model.layers[0].mlp.down_proj.weight
    assert not mx.array_equal(got, mx.dequantize(*mx.quantize(w, 64, 3), 64, 3).astype(got.dtype))
    prompt = tokenizer.encode(PROMPTS[0])
    toks, records = spec_tokens(model, prompt, 32, tree_top_k=1, tree_depth=GAMMA)
    assert toks == plain_greedy(model, prompt, 32) and records[-1][3] < len(toks)

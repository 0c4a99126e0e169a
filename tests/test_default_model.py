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

"""``python -m mlx_specstream.quantize``: the base quantized by mlx-lm's
``quantize_model``, the drafter kept bit for bit, decoding still lossless."""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import spec_tokens, tiny_spec_model, word_tokenizer

from mlx_specstream import load, save
from mlx_specstream.quantize import main, quantize

V = 64
PROMPT = [3, 17, 42, 8, 29, 11]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, stream_lora_rank=4)
    model.speculative_streams.config.tuned = {"cpu:Test": {"tree_depth": 0}}
    path = save(tmp_path_factory.mktemp("q") / "m", model, word_tokenizer(V, eos=V + 5))
    return path


def test_quantized_base_keeps_its_streams_and_decodes_as_mlx_lm(model_dir, tmp_path):
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load as mlx_lm_load

    out = quantize(str(model_dir), tmp_path / "q4", q_bits=4, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    source = json.loads((model_dir / "config.json").read_text())["speculative_streaming"]
    assert source["tuned"] and config["speculative_streaming"]["tuned"] is None  # (float's)
    before = mx.load(str(model_dir / "speculative_streams.safetensors"))
    after = mx.load(str(out / "speculative_streams.safetensors"))
    assert before.keys() == after.keys()
    assert all(np.array_equal(np.array(before[k]), np.array(after[k])) for k in before)

    model, _ = load(str(out))
    got, _ = spec_tokens(model, PROMPT, 40, tree_depth=3, tree_top_k=2)
    base, _ = mlx_lm_load(str(out))
    want = [t for t, _ in generate_step(mx.array(PROMPT), base, max_tokens=40)]
    assert got == want
    # Control: the float model decodes otherwise (the base was quantized).
    float_model, _ = load(str(model_dir))
    assert spec_tokens(float_model, PROMPT, 40, tree_depth=3)[0] != want


def test_bad_quantize_input_is_refused_by_name(model_dir, tmp_path):
    out = quantize(str(model_dir), tmp_path / "q8", q_bits=8, q_group_size=32)
    with pytest.raises(FileExistsError, match="q8 already exists"):
        main(["--model", str(model_dir), "--out", str(out)])
    with pytest.raises(ValueError, match="already has a 'quantization' entry"):
        main(["--model", str(out), "--out", str(tmp_path / "again")])
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("kind", ["medusa", "parallelspec"])
def test_a_drafter_is_kept_too(tmp_path, kind):
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load as mlx_lm_load
    from test_drafters import drafter_model

    path = save(tmp_path / "m", drafter_model(kind), word_tokenizer(V, eos=V + 5))
    out = quantize(str(path), tmp_path / "q", q_bits=4, q_group_size=32)
    before, after = (mx.load(str(p / "drafter.safetensors")) for p in (path, out))
    assert all(np.array_equal(np.array(before[k]), np.array(after[k])) for k in before)
    model, _ = load(str(out))
    base, _ = mlx_lm_load(str(out))
    want = [t for t, _ in generate_step(mx.array(PROMPT), base, max_tokens=30)]
    assert spec_tokens(model, PROMPT, 30)[0] == want

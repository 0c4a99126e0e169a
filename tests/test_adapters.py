"""mlx-lm adapters (``mlx_lm.lora``'s ``--adapter-path``) on a model with streams.

``load(..., adapter_path=...)`` applies them as ``mlx_lm.load`` does; greedy
decoding must then equal mlx-lm's on the adapted model, with the stream LoRA
going around the adapted layers. The negative control is the same model without
its adapters, whose output differs.
"""

import json

import mlx.core as mx
import pytest
from helpers import tiny_model, tiny_spec_model, word_tokenizer
from mlx.utils import tree_flatten

from mlx_specstream import load, save
from mlx_specstream.generate import generate
from mlx_specstream.model_parts import linear_modules

V = 48
PROMPT = " ".join(f"t{i}" for i in (3, 17, 9, 30, 12))


def write_adapters(path, model, kind):
    """Random adapters on every layer's linear modules, saved as ``mlx_lm.lora`` saves them."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = len(model.layers)
    params = {"rank": 4, "scale": 4.0, "dropout": 0.0}
    linear_to_lora_layers(model, n, params, use_dora=kind == "dora")
    mx.random.seed(5)
    weights = {
        k: mx.random.normal(v.shape) * 0.5 if k.endswith("lora_b") else v
        for k, v in tree_flatten(model.trainable_parameters())
        if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")
    }
    assert weights
    path.mkdir()
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    config = {"fine_tune_type": kind, "num_layers": n, "lora_parameters": params}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapted_model_decodes_as_mlx_lm_decodes_it(tmp_path, kind):
    from mlx_lm import generate as mlx_lm_generate
    from mlx_lm import load as mlx_lm_load

    spec = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2, stream_lora_rank=4)
    path = save(tmp_path / "m", spec, word_tokenizer(V, eos=V + 5))
    adapters = write_adapters(tmp_path / "adapters", tiny_model("llama", vocab_size=V), kind)

    model, tok = load(str(path), adapter_path=str(adapters))
    rt = model.speculative_streams
    # The stream LoRA wraps the adapted modules, by their own names.
    assert rt.lora_targets[0] == linear_modules(spec.layers[0])
    assert not any(t.endswith(".linear") for t in rt.lora_targets[0])
    ours = generate(model, tok, PROMPT, max_tokens=40, tree_depth=3, tree_top_k=2)
    base, _ = mlx_lm_load(str(path))
    adapted, _ = mlx_lm_load(str(path), adapter_path=str(adapters))
    want = mlx_lm_generate(adapted, tok, PROMPT, max_tokens=40)
    assert ours == want
    assert want != mlx_lm_generate(base, tok, PROMPT, max_tokens=40)  # the adapters matter
    plain, ptok = load(str(path))  # negative control: without them
    assert generate(plain, ptok, PROMPT, max_tokens=40, tree_depth=3, tree_top_k=2) != want


def test_adapters_on_a_plain_model_with_prompt_lookup(tmp_path):
    from mlx_lm import generate as mlx_lm_generate
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.utils import save_config, save_model

    base = tiny_model("llama", vocab_size=V)
    path = tmp_path / "plain"
    path.mkdir()
    save_model(path, base)
    save_config({k: v for k, v in vars(base.args).items() if v is not None}, path / "config.json")
    word_tokenizer(V, eos=V + 5).save_pretrained(str(path))
    adapters = write_adapters(tmp_path / "adapters", tiny_model("llama", vocab_size=V), "lora")
    prompt = PROMPT + " " + PROMPT  # something to look up
    model, tok = load(str(path), allow_plain=True, adapter_path=str(adapters))
    ours = generate(model, tok, prompt, max_tokens=40, draft="ngram")
    adapted, _ = mlx_lm_load(str(path), adapter_path=str(adapters))
    assert ours == mlx_lm_generate(adapted, tok, prompt, max_tokens=40)
    assert ours != mlx_lm_generate(mlx_lm_load(str(path))[0], tok, prompt, max_tokens=40)


def test_a_missing_adapter_path_is_named(tmp_path):
    spec = tiny_spec_model("llama", vocab_size=V)
    path = save(tmp_path / "m", spec, word_tokenizer(V, eos=V + 5))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(str(path), adapter_path=str(tmp_path / "nowhere"))

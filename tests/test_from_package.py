"""Restoring a build's base from a shipped package (``convert.from_package``): the
weights are MLX's dequantized ones bit for bit, the checkpoint is the model MLX runs,
and bad packages are refused by name."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hf_helpers import hf_model, hf_tokenizer  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from convert.from_package import PROVENANCE, dequantize, restore, unpack_bits  # noqa: E402

V = 256


def _package(d, dtype):
    """A tiny Llama in mlx-lm's format, 4-bit with group 64, its down projections at 8
    bits with group 32 (a per-layer entry, as mlx-lm's mixed recipes write)."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    hf = hf_model("llama", vocab_size=V, tie_word_embeddings=True)
    with torch.no_grad():  # (logits of a few units)
        hf.model.embed_tokens.weight.mul_(50)
    hf.save_pretrained(str(d / "hf"))
    hf_tokenizer(V).save_pretrained(str(d / "hf"))
    model, config = load_model(d / "hf", lazy=False)
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))

    def bits(path, module, config=None):
        if not hasattr(module, "to_quantized"):
            return False
        return {"bits": 8, "group_size": 32} if "down_proj" in path else True

    model, config = quantize_model(model, config, 64, 4, quant_predicate=bits)
    out = d / "mlx"
    save_model(out, model)
    save_config(config, out / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(d / "hf" / f, out / f)
    return out, model


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """In bfloat16, as packages ship."""
    return _package(tmp_path_factory.mktemp("package"), mx.bfloat16)


@pytest.fixture(scope="module")
def package32(tmp_path_factory):
    """In float32: MLX's forward then rounds no more than transformers' does."""
    return _package(tmp_path_factory.mktemp("package32"), mx.float32)


def _mlx_weights(model):
    """Each weight as MLX dequantizes it, by name (float32 numpy)."""
    flat = dict(tree_flatten(model.parameters()))
    out = {}
    for k, v in flat.items():
        if k.endswith((".scales", ".biases")):
            continue
        stem = k[: -len("weight")]
        if stem + "scales" in flat:
            module = model
            for part in stem[:-1].split("."):
                module = module[int(part)] if part.isdigit() else getattr(module, part)
            v = mx.dequantize(v, flat[stem + "scales"], flat[stem + "biases"],
                              group_size=module.group_size, bits=module.bits)  # fmt: skip
        out[k] = np.array(v.astype(mx.float32))
    return out


def test_restored_weights_are_mlx_s_dequantized_ones_bit_for_bit(package, tmp_path):
    src, model = package
    config = json.loads((src / "config.json").read_text())
    assert config["quantization"]["model.layers.0.mlp.down_proj"] == {"bits": 8, "group_size": 32}
    base = restore(src, tmp_path / "work")
    got = load_file(str(base / "model.safetensors"))
    want = _mlx_weights(model)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k].float().numpy(), want[k]), k
    # Negative control: the same values computed in float32 and rounded once differ from
    # MLX's (it rounds the product and the sum in the scales' dtype).
    flat = dict(tree_flatten(model.parameters()))
    stem = "model.layers.0.self_attn.q_proj."
    s, b = (torch.from_numpy(np.array(flat[stem + n].astype(mx.float32)))
            for n in ("scales", "biases"))  # fmt: skip
    q = torch.from_numpy(np.array(flat[stem + "weight"]).view(np.int32))
    once = dequantize(q, s, b, 4, 64).to(torch.bfloat16).float()
    assert not np.array_equal(once.numpy(), want[stem + "weight"])
    # The record names the package's files (the streams file is not the base's).
    record = json.loads((tmp_path / "work" / "base" / PROVENANCE).read_text())
    assert "model.safetensors" in record["files"] and record["tensors"] == len(want)
    assert (tmp_path / "work" / "tokenizer" / "tokenizer.json").exists()


def test_the_restored_checkpoint_is_the_model_mlx_runs(package32, tmp_path):
    """transformers' forward over the restored checkpoint gives MLX's logits (float32, to
    the rounding of two matmul kernels), and its config carries no quantization. Control:
    the checkpoint with two layers' query projections swapped does not."""
    from transformers import AutoModelForCausalLM

    src, model = package32
    base = restore(src, tmp_path / "work")
    config = json.loads((base / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tokens = [[3, 17, 42, 99, 5, 200, 7]]
    with torch.no_grad():
        ours = hf(torch.tensor(tokens)).logits[0].numpy()
    theirs = np.array(model(mx.array(tokens))[0].astype(mx.float32))
    close = np.abs(ours - theirs).max()
    assert close < 1e-4 * np.abs(theirs).max()
    layers = hf.model.layers
    with torch.no_grad():
        q0 = layers[0].self_attn.q_proj.weight.clone()
        layers[0].self_attn.q_proj.weight.copy_(layers[1].self_attn.q_proj.weight)
        layers[1].self_attn.q_proj.weight.copy_(q0)
        swapped = hf(torch.tensor(tokens)).logits[0].numpy()
    assert np.abs(swapped - theirs).max() > 1e-2 * np.abs(theirs).max()


def test_unpack_bits_reads_mlx_s_bit_stream():
    """Golden values: 4 bits in one word (low bits first), and 3 bits across two words."""
    word = torch.tensor([[0x00000021]], dtype=torch.int32)
    assert unpack_bits(word, 4, 8).tolist() == [[1, 2, 0, 0, 0, 0, 0, 0]]
    # 3 bits: the eleventh value (5 = 0b101) straddles the words, bits 30-32.
    values = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 5]
    stream = sum(v << (3 * i) for i, v in enumerate(values))
    words = torch.tensor([[stream & 0xFFFFFFFF, stream >> 32]], dtype=torch.int64)
    assert unpack_bits(words.to(torch.int32), 3, 11).tolist() == [values]
    with pytest.raises(ValueError, match="64 bits per row hold fewer than 22 values of 3"):
        unpack_bits(words.to(torch.int32), 3, 22)


def _edited(src, to, edit):
    """A copy of the package ``src`` at ``to`` whose config ``edit`` changes in place."""
    shutil.copytree(src, to)
    config = json.loads((to / "config.json").read_text())
    edit(config)
    (to / "config.json").write_text(json.dumps(config))
    return to


def test_bad_packages_are_refused_by_name(package, tmp_path):
    src, _ = package
    restore(src, tmp_path / "work")
    with pytest.raises(FileExistsError, match="base exists"):
        restore(src, tmp_path / "work")
    no_tok = _edited(src, tmp_path / "no_tok", lambda c: None)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        restore(no_tok, tmp_path / "w2")
    fp4 = _edited(src, tmp_path / "fp4", lambda c: c["quantization"].update(mode="mxfp4"))
    with pytest.raises(ValueError, match="mode 'mxfp4'.*only 'affine'"):
        restore(fp4, tmp_path / "w3")

    def unquantized(c):
        c.pop("quantization"), c.pop("quantization_config", None)

    with pytest.raises(ValueError, match="without scales"):
        restore(_edited(src, tmp_path / "unq", unquantized), tmp_path / "w4")
    untied = _edited(src, tmp_path / "untied", lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(ValueError, match="tie_word_embeddings is false but .* no lm_head"):
        restore(untied, tmp_path / "w6")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        restore(tmp_path / "nowhere", tmp_path / "w5")


def _stored_tensors(model_dir):
    return {k: v for f in model_dir.glob("model*.safetensors") for k, v in mx.load(str(f)).items()}


def test_a_model_on_the_restored_base_converts_with_the_package_s_very_tensors(package, tmp_path):
    """Streams trained on a restored base convert with the package's quantized tensors
    (``--quantized-like``), so the new model's base is the shipped one bit for bit.
    Control: quantizing the restored base anew at the same bits moves codes. A base that
    is not the package's is refused by name."""
    from hf_helpers import write_checkpoint
    from transformers import AutoModelForCausalLM

    from convert.convert import convert
    from mlx_specstream.config import SpecStreamConfig

    src, _ = package
    base = restore(src, tmp_path / "work")
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    write_checkpoint(tmp_path / "ckpt", hf, SpecStreamConfig(num_streams=2, num_stream_layers=1))
    out = convert(tmp_path / "ckpt", tmp_path / "mlx", dtype="bfloat16", quantized_like=src)
    shipped = _stored_tensors(src)
    made = _stored_tensors(out)
    assert made.keys() == shipped.keys()
    assert all(mx.array_equal(made[k], shipped[k]) for k in shipped)
    assert (
        json.loads((out / "config.json").read_text())["quantization"]
        == json.loads((src / "config.json").read_text())["quantization"]
    )
    anew = convert(tmp_path / "ckpt", tmp_path / "anew", dtype="bfloat16", quantize=True)
    again = _stored_tensors(anew)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not mx.array_equal(again[key], shipped[key])
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    write_checkpoint(tmp_path / "other", hf, SpecStreamConfig(num_streams=2, num_stream_layers=1))
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight does not dequantize"):
        convert(tmp_path / "other", tmp_path / "mlx2", dtype="bfloat16", quantized_like=src)

"""Carrying a model in 8-bit parts (``convert.transport``): the round trip's error
stays inside its stated bound, parts stay small, and damage is named."""

import json

import pytest

torch = pytest.importorskip("torch")

from hf_helpers import hf_model, hf_tokenizer  # noqa: E402

from convert.transport import MANIFEST, SCALE_SUFFIX, pack, quantize_rows, unpack  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    model = hf_model("llama", vocab_size=256, tie_word_embeddings=True)
    model.save_pretrained(str(d / "hf"))
    hf_tokenizer(256).save_pretrained(str(d / "hf"))
    return d / "hf"


def _weights(path):
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_round_trip_within_half_a_step_per_element(model_dir, tmp_path):
    manifest = pack(model_dir, tmp_path / "packed", part_mb=0.05)
    assert len(manifest["parts"]) > 1
    assert all(
        (tmp_path / "packed" / p["file"]).stat().st_size <= 50_000 for p in manifest["parts"]
    )
    unpack(tmp_path / "packed", tmp_path / "back")
    before, after = _weights(model_dir), _weights(tmp_path / "back")
    assert before.keys() == after.keys()
    quantized = [k for k, kind in manifest["tensors"].items() if kind == "int8-rows"]
    assert "model.embed_tokens.weight" in quantized and "model.norm.weight" not in quantized
    for k, w in before.items():
        if k in quantized:
            _, scale = quantize_rows(w)
            err = (after[k] - w.float()).abs()
            assert (err <= scale[:, None] / 2 + 1e-6).all(), k
            assert err.max() > 0  # lossy, as documented
        else:
            assert torch.equal(after[k], w.float()), k
    # The unpacked directory is a model transformers loads, with tied embeddings kept.
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        a, b = back(ids).logits, ref(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_wrong_scales_break_the_bound(model_dir, tmp_path):
    """Negative control for the bound above: dequantizing with doubled scales fails it."""
    w = _weights(model_dir)["model.embed_tokens.weight"]
    q, scale = quantize_rows(w)
    err = (q.float() * (2 * scale)[:, None] - w.float()).abs()
    assert not (err <= scale[:, None] / 2 + 1e-6).all()


def test_damaged_or_missing_parts_are_named(model_dir, tmp_path):
    pack(model_dir, tmp_path / "p", part_mb=0.05)
    manifest = json.loads((tmp_path / "p" / MANIFEST).read_text())
    first = tmp_path / "p" / manifest["parts"][0]["file"]
    data = bytearray(first.read_bytes())
    data[100] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{first.name}: sha256 differs"):
        unpack(tmp_path / "p", tmp_path / "m1")
    first.unlink()
    with pytest.raises(FileNotFoundError, match=f"{first.name}: a part .* is missing"):
        unpack(tmp_path / "p", tmp_path / "m2")
    with pytest.raises(FileNotFoundError, match="not a packed model"):
        unpack(tmp_path, tmp_path / "m3")


def test_refuses_to_overwrite(model_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        pack(model_dir, tmp_path / "taken")
    pack(model_dir, tmp_path / "p")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        unpack(tmp_path / "p", tmp_path / "taken")


def test_a_key_that_looks_like_a_scale_is_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    save_file({"w" + SCALE_SUFFIX: torch.zeros(2)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="scales' suffix"):
        pack(tmp_path / "m", tmp_path / "p")

"""PyTorch side: reference multi-stream attention parity with the MLX runtime
after conversion, quantized conversion, PEFT merge, and the converter's errors."""

import json

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import plain_greedy, spec_tokens  # noqa: E402
from hf_helpers import HF_CONFIGS, hf_model, write_checkpoint  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from convert.convert import convert  # noqa: E402
from convert.msa import causal_visibility  # noqa: E402
from mlx_specstream import SpecStreamConfig, load  # noqa: E402
from mlx_specstream.cache import commit_path  # noqa: E402
from mlx_specstream.streams import STREAMS_FILE  # noqa: E402
from mlx_specstream.tree import ancestor_mask, tree_depths  # noqa: E402

SEQ, PROMPT_LEN = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], 5
TREE = ([SEQ[-1], 7, 2, 9, 4], [-1, 0, 1, 0, 3])
TOL = 1e-4


def mlx_teacher_forced(model, seq, prompt_len):
    """Main and stream logits at each completion position, decoding one forced token per step."""
    rt = model.speculative_streams
    cache = make_prompt_cache(model)
    model(mx.array([seq[: prompt_len - 1]]), cache=cache)
    mains, streams = [], []
    for t in range(prompt_len - 1, len(seq)):
        out = rt.forward([seq[t]], [-1], cache)
        mains.append(np.array(out.logits[0]))
        streams.append(
            np.array(rt.head(out.stream_hidden.reshape(1, rt.config.num_streams, -1))[0])
        )
        commit_path(cache, t, [[0]] * rt.num_layers)
    return np.stack(mains), np.stack(streams)


def mlx_tree(model, prefix, tokens, parents):
    rt = model.speculative_streams
    cache = make_prompt_cache(model)
    model(mx.array([prefix]), cache=cache)
    out = rt.forward(tokens, parents, cache)
    g = rt.config.num_streams
    s = rt.head(out.stream_hidden.reshape(1, len(tokens) * g, -1))[0]
    return np.array(out.logits), np.array(s).reshape(len(tokens), g, -1)


def torch_tree(msm, prefix, tokens, parents):
    n, T = len(prefix), len(tokens)
    vis = torch.zeros(n + T, n + T, dtype=torch.bool)
    vis[:n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    vis[n:, :n] = True
    vis[n:, n:] = torch.from_numpy(ancestor_mask(parents))
    pos = torch.tensor(list(range(n)) + [n + d for d in tree_depths(parents)])[None]
    on = (torch.arange(n + T) >= n)[None]
    with torch.no_grad():
        out = msm(torch.tensor([prefix + tokens]), vis[None], pos, stream_on=on)
    return out["main_logits"][0, n:].numpy(), out["stream_logits"][0, n:].numpy()


def check_parity(hf, msm, model):
    ids = torch.tensor([SEQ])
    T = len(SEQ)
    with torch.no_grad():
        base = hf(ids).logits[0].numpy()
        out = msm(
            ids,
            causal_visibility(torch.tensor([T]), T),
            torch.arange(T)[None],
            stream_on=(torch.arange(T) >= PROMPT_LEN - 1)[None],
        )
    # The converted base model equals transformers' own forward.
    np.testing.assert_allclose(np.array(model(mx.array([SEQ])))[0], base, atol=TOL)
    # Training layout (PyTorch) == incremental decoding (MLX), main and streams.
    main, streams = mlx_teacher_forced(model, SEQ, PROMPT_LEN)
    np.testing.assert_allclose(main, out["main_logits"][0, PROMPT_LEN - 1 :].numpy(), atol=TOL)
    np.testing.assert_allclose(streams, out["stream_logits"][0, PROMPT_LEN - 1 :].numpy(), atol=TOL)
    # A draft tree after a prefix.
    prefix = SEQ[:-1]
    m1, s1 = mlx_tree(model, prefix, *TREE)
    m2, s2 = torch_tree(msm, prefix, *TREE)
    np.testing.assert_allclose(m1, m2, atol=TOL)
    np.testing.assert_allclose(s1, s2, atol=TOL)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded", "sharded-bin"])
@pytest.mark.parametrize("arch", sorted(HF_CONFIGS))
def test_parity_lossless(tmp_path, arch, fmt):
    spec = SpecStreamConfig(num_streams=3, num_stream_layers=2, stream_lora_rank=4)
    hf = hf_model(arch)
    msm = write_checkpoint(tmp_path / "hf", hf, spec, fmt=fmt)
    if fmt.startswith("sharded"):
        assert len(list((tmp_path / "hf").glob("*.index.json"))) == 1
    model, _ = load(str(convert(str(tmp_path / "hf"), tmp_path / "mlx")))
    check_parity(hf, msm, model)


@pytest.mark.parametrize("arch", sorted(HF_CONFIGS))
def test_parity_shared_embedded_streams(tmp_path, arch):
    spec = SpecStreamConfig(
        num_streams=2, num_stream_layers=3, mode="shared", stream_positions="offset"
    )
    hf = hf_model(arch)
    msm = write_checkpoint(tmp_path / "hf", hf, spec, streams="embedded")
    model, _ = load(str(convert(str(tmp_path / "hf"), tmp_path / "mlx")))
    check_parity(hf, msm, model)


def test_negative_control_parity_detects_a_wrong_stream_mask(tmp_path, monkeypatch):
    """The parity check fails when the PyTorch mask lets streams see later streams."""
    import convert.msa as msa

    spec = SpecStreamConfig(num_streams=3, num_stream_layers=2)
    hf = hf_model("llama")
    msm = write_checkpoint(tmp_path / "hf", hf, spec)
    model, _ = load(str(convert(str(tmp_path / "hf"), tmp_path / "mlx")))
    real = msa.multi_stream_mask

    def leaky(visible, gamma, shared, stream_on):
        m = real(visible, gamma, shared, stream_on)
        T = visible.shape[1]
        m[:, T:, T:] |= m[:, T:, T:].transpose(1, 2)  # streams also see later streams
        return m

    monkeypatch.setattr(msa, "multi_stream_mask", leaky)
    with pytest.raises(AssertionError):
        check_parity(hf, msm, model)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_conversion_decodes_losslessly(tmp_path, bits):
    spec = SpecStreamConfig(num_streams=3, num_stream_layers=2, top_k=2)
    write_checkpoint(tmp_path / "hf", hf_model("qwen2", vocab_size=16), spec)
    from convert.__main__ import main

    main(
        [
            "--hf-path",
            str(tmp_path / "hf"),
            "--mlx-path",
            str(tmp_path / "q"),
            "-q",
            "--q-bits",
            str(bits),
            "--q-group-size",
            "32",
        ]
    )
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    model, _ = load(str(tmp_path / "q"))
    assert model.speculative_streams.streams.embeddings.dtype == mx.float32
    prompt = [3, 1, 4, 1, 5]
    toks, records = spec_tokens(model, prompt, 48)
    assert toks == plain_greedy(model, prompt, 48)


def test_dtype_conversion(tmp_path):
    spec = SpecStreamConfig(num_streams=2, num_stream_layers=2)
    write_checkpoint(tmp_path / "hf", hf_model("llama", vocab_size=16), spec)
    model, _ = load(str(convert(str(tmp_path / "hf"), tmp_path / "m", dtype="bfloat16")))
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert model.speculative_streams.streams.embeddings.dtype == mx.float32
    assert spec_tokens(model, [1, 2, 3], 32)[0] == plain_greedy(model, [1, 2, 3], 32)


def test_peft_adapter_is_merged_in_shared_mode(tmp_path):
    from peft import LoraConfig, get_peft_model

    spec = SpecStreamConfig(num_streams=2, num_stream_layers=2, mode="shared")
    hf = hf_model("llama")
    msm = write_checkpoint(tmp_path / "hf", hf, spec)
    peft_model = get_peft_model(
        hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = peft_model.merge_and_unload()
    msm.model = merged
    with pytest.raises(ValueError, match="lossless mode keeps it frozen"):
        lossless = SpecStreamConfig(num_streams=2, num_stream_layers=2)
        write_checkpoint(tmp_path / "hf2", hf_model("llama"), lossless)
        convert(str(tmp_path / "hf2"), tmp_path / "x", adapter_path=str(tmp_path / "adapter"))
    out = convert(str(tmp_path / "hf"), tmp_path / "mlx", adapter_path=str(tmp_path / "adapter"))
    model, _ = load(str(out))
    check_parity(merged, msm, model)


# ---- bad inputs: a clear error naming the culprit, and no output left behind ----


@pytest.fixture
def checkpoint(tmp_path):
    spec = SpecStreamConfig(num_streams=2, num_stream_layers=2)
    write_checkpoint(tmp_path / "hf", hf_model("llama"), spec)
    return tmp_path / "hf"


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def rewrite_streams(path, fn):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / STREAMS_FILE))
    fn(state)
    save_file(state, str(path / STREAMS_FILE))


CASES = {
    "missing config.json": (
        lambda p: (p / "config.json").unlink(),
        FileNotFoundError,
        "config.json does not exist",
    ),
    "streams declared, tensors missing": (
        lambda p: (p / STREAMS_FILE).unlink(),
        ValueError,
        "declares 'speculative_streaming' but .* no stream tensors",
    ),
    "one stream tensor missing": (
        lambda p: rewrite_streams(p, lambda s: s.pop("prune_adapter.up.weight")),
        ValueError,
        r"stream tensors\): missing tensors \['prune_adapter.up.weight'\]",
    ),
    "wrong shape": (
        lambda p: rewrite_streams(p, lambda s: s.update(embeddings=torch.zeros(3, 64))),
        ValueError,
        r"tensor 'embeddings' has shape \(3, 64\), expected \(2, 64\)",
    ),
    "unexpected stream tensor": (
        lambda p: rewrite_streams(p, lambda s: s.update(extra=torch.zeros(2))),
        ValueError,
        r"unexpected tensors \['extra'\]",
    ),
    "unexpected base tensor": (
        lambda p: _add_base_tensor(p),
        ValueError,
        r"base model weights\): unexpected tensors \['model.bogus.weight'\]",
    ),
    "tokenizer larger than the embedding": (
        lambda p: _big_tokenizer(p),
        ValueError,
        "tokenizer has 80 tokens but the embedding has only 64 rows",
    ),
    "corrupt safetensors": (
        lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64),
        ValueError,
        "model.safetensors: cannot read",
    ),
    "unsupported architecture": (
        lambda p: edit_config(p, lambda c: c.update(model_type="no_such_arch")),
        ValueError,
        "unsupported architecture",
    ),
    "bad stream config value": (
        lambda p: edit_config(p, lambda c: c["speculative_streaming"].update(num_streams=0)),
        ValueError,
        "config.json: speculative_streaming.num_streams=0",
    ),
    "no stream section": (
        lambda p: edit_config(p, lambda c: c.pop("speculative_streaming")),
        ValueError,
        "has no 'speculative_streaming' or 'drafter' section",
    ),
}


def _add_base_tensor(path):
    from safetensors.torch import load_file, save_file

    w = load_file(str(path / "model.safetensors"))
    w["model.bogus.weight"] = torch.zeros(2, 2)
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})


def _big_tokenizer(path):
    from hf_helpers import hf_tokenizer

    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        (path / f).unlink(missing_ok=True)
    hf_tokenizer(80).save_pretrained(str(path))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_inputs(checkpoint, case):
    damage, error, message = CASES[case]
    damage(checkpoint)
    out = checkpoint.parent / "out"
    with pytest.raises(error, match=message):
        convert(str(checkpoint), out)
    assert not out.exists()
    assert [p.name for p in checkpoint.parent.iterdir()] == ["hf"]  # no temporary leftovers


def test_existing_output_is_never_overwritten(checkpoint):
    out = checkpoint.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        convert(str(checkpoint), out)
    assert (out / "keep.txt").read_text() == "user data"


def test_missing_shard_is_named(tmp_path):
    spec = SpecStreamConfig(num_streams=2, num_stream_layers=2)
    write_checkpoint(tmp_path / "hf", hf_model("llama"), spec, fmt="sharded")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shards that are missing: \\['{shard.name}'\\]"):
        convert(str(tmp_path / "hf"), tmp_path / "out")


@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(prune_adapter_rank=0),
        dict(stream_init_rank=4),
        dict(stream_lora_rank=4, num_streams=2),
    ],
)
def test_explicit_weight_map_matches_the_stream_module(params):
    """The converter's hand-written name -> shape map agrees with SpeculativeStreams."""
    from helpers import tiny_model
    from mlx.utils import tree_flatten

    from convert.convert import stream_weight_map
    from mlx_specstream import attach_streams
    from mlx_specstream.streams import lora_shapes

    model = tiny_model("llama")
    spec = SpecStreamConfig(num_stream_layers=2, **params)
    streams = attach_streams(model, spec)
    actual = {k: tuple(v.shape) for k, v in tree_flatten(streams.parameters())}
    assert stream_weight_map(spec, 64, lora_shapes(model, spec)) == actual


def test_hub_id_input_resolves_through_huggingface_hub(checkpoint, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = convert("someone/tiny-ss", checkpoint.parent / "mlx", revision="v1")
    assert calls[0][:2] == ("someone/tiny-ss", "v1")
    assert "*.bin" in calls[0][2] and "*.safetensors" in calls[0][2]
    assert (out / "speculative_streams.safetensors").exists()

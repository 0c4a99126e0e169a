"""The fine-tuning recipe: streams learn a predictable future, and the
converted result decodes losslessly with more than one token per pass."""

import json
import random
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import plain_greedy, spec_tokens  # noqa: E402
from hf_helpers import hf_model, hf_tokenizer  # noqa: E402

from convert.convert import convert  # noqa: E402
from convert.finetune import main as finetune  # noqa: E402
from convert.finetune import shifted_targets  # noqa: E402
from mlx_specstream import load  # noqa: E402

V = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Cyclic token patterns: after one period the future is fully predictable."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    patterns = [[rng.randrange(1, V - 2) for _ in range(rng.choice([5, 6, 7]))] for _ in range(6)]

    def example():
        p, s = rng.choice(patterns), rng.randrange(7)
        return " ".join(f"t{p[(s + i) % len(p)]}" for i in range(48))

    for name, n in [("train.jsonl", 240), ("eval.jsonl", 32)]:
        with open(d / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": example()}) + "\n")
    base = hf_model("llama", vocab_size=V, weight_scale=1.0)
    base.save_pretrained(str(d / "base"))
    hf_tokenizer(V).save_pretrained(str(d / "base"))
    return d


def run(data, out, *extra):
    finetune(
        [
            "--model",
            str(data / "base"),
            "--data",
            str(data / "train.jsonl"),
            "--eval-data",
            str(data / "eval.jsonl"),
            "--out",
            str(out),
            "--num-streams",
            "3",
            "--num-stream-layers",
            "2",
            "--max-length",
            "48",
            "--batch-size",
            "16",
            "--eval-steps",
            "1000",
            "--save-steps",
            "1000",
            *extra,
        ]
    )


def eval_accuracy(capsys):
    """Per-stream top-1 accuracy from the final evaluation line the recipe prints."""
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith('{"eval_loss"')][-1]
    return json.loads(line)


def test_shifted_targets():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0]])
    got = shifted_targets(ids, torch.tensor([5]), torch.tensor([2]), 2)
    # Supervised from the last prompt token (t = 1); t + 2 must be < length 5.
    assert got.tolist() == [[-100, 8, 9, -100, -100, -100]]


def test_read_examples_batches_text_rows_in_order(tmp_path):
    """Text rows are tokenized in batches; the examples are those of encoding each row
    alone, in file order, between the pair and pre-tokenized rows."""
    from convert.finetune import _windows, read_examples

    tok = hf_tokenizer(V)
    rows = [{"text": " ".join(f"t{i % 7}" for i in range(n))} for n in (30, 5, 61, 2, 44)]
    rows.insert(2, {"prompt": "t1 t2", "completion": "t3 t4"})
    rows.insert(4, {"input_ids": [4, 5, 6, 7], "prompt_len": 2})
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = []
    for r in rows:
        if "text" in r:
            want += _windows(tok.encode(r["text"]), 16, 3)
        elif "prompt" in r:
            p, c = tok.encode(r["prompt"]), tok.encode(r["completion"]) + [tok.eos_token_id]
            want.append({"input_ids": (p + c)[:16], "prompt_len": len(p)})
        else:
            want.append(r)
    assert read_examples([str(path)], tok, 16, 3) == want


def test_shifted_targets_of_sequences_shorter_than_the_shift():
    # A batch of 2-token windows (a file's tail) has no target 3 tokens ahead.
    got = shifted_targets(torch.tensor([[5, 6]]), torch.tensor([2]), torch.tensor([1]), 3)
    assert got.tolist() == [[-100, -100]]


def test_control_fine_tune_is_a_plain_lora_fine_tune(data, tmp_path):
    """Shared mode's control: the same LoRA and budget, next-token loss only, no streams.
    Its held-out main loss sits beside the shared run's in metrics.json."""
    from transformers import AutoModelForCausalLM

    common = [
        "--mode",
        "shared",
        "--lora-rank",
        "8",
        "--max-steps",
        "30",
        "--learning-rate",
        "3e-3",
    ]
    run(data, tmp_path / "ss", *common, "--stream-loss-weight", "0.5")
    run(data, tmp_path / "control", *common, "--control")
    ss, control = (
        json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ss", "control")
    )
    assert "eval_stream_1_top1" in ss and "eval_stream_1_top1" not in control
    base_loss = 3.47  # ln 32: the untrained base is near uniform (weight_scale 1 keeps it so)
    assert control["eval_main_loss"] < base_loss - 0.5  # it trained
    assert ss["eval_main_loss"] < base_loss
    # A plain model (no streams section) whose weights moved from the base's.
    config = json.loads((tmp_path / "control" / "config.json").read_text())
    assert "speculative_streaming" not in config
    assert not (tmp_path / "control" / "speculative_streams.safetensors").exists()
    tuned = AutoModelForCausalLM.from_pretrained(str(tmp_path / "control"))
    base = AutoModelForCausalLM.from_pretrained(str(data / "base"))
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(tuned.state_dict().values(), base.state_dict().values())
    ]
    assert max(moved) > 1e-3


def test_control_needs_shared_mode_lora(data, tmp_path):
    with pytest.raises(ValueError, match="--control"):
        run(data, tmp_path / "c", "--mode", "lossless", "--control", "--max-steps", "1")
    with pytest.raises(ValueError, match="--lora-rank"):
        run(data, tmp_path / "c", "--lora-rank", "0", "--control", "--max-steps", "1")


def test_stream_learning_rate_is_the_stream_parameters_own(data, tmp_path):
    """--stream-learning-rate trains the stream parameters at their own rate while the
    LoRA shared with the main stream keeps --learning-rate (0 here: the base stays put).
    (The build's control takes the shared run's flags; it has no stream parameters.)"""
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    def shared(name, *extra):
        run(data, tmp_path / name, "--mode", "shared", "--lora-rank", "8", "--max-steps", "3",
            "--learning-rate", "0", *extra)  # fmt: skip
        streams = load_file(str(tmp_path / name / "speculative_streams.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / name))
        return streams["embeddings"], model.state_dict()

    init, _ = shared("frozen")  # (same seed: the same initial embeddings)
    moved, weights = shared("streams", "--stream-learning-rate", "1e-2")
    assert abs(moved - init).max() > 1e-3  # Adam moves each by about lr per step
    base = AutoModelForCausalLM.from_pretrained(str(data / "base")).state_dict()
    assert all(torch.equal(weights[k], base[k]) for k in base)
    run(data, tmp_path / "control", "--mode", "shared", "--lora-rank", "8", "--max-steps", "1",
        "--control", "--stream-learning-rate", "1e-2")  # fmt: skip
    assert (tmp_path / "control" / "metrics.json").exists()


def test_shared_mode_streams_learn_and_decode_faster(data, tmp_path, capsys):
    run(data, tmp_path / "untrained", "--mode", "shared", "--lora-rank", "16", "--max-steps", "1")
    before = eval_accuracy(capsys)
    run(
        data,
        tmp_path / "hf",
        "--mode",
        "shared",
        "--lora-rank",
        "16",
        "--max-steps",
        "200",
        "--learning-rate",
        "3e-3",
        "--stream-loss-weight",
        "0.5",
    )
    after = eval_accuracy(capsys)
    for j in (1, 2, 3):
        assert before[f"eval_stream_{j}_top1"] < 0.3  # chance is 1/32: untrained streams fail
        assert after[f"eval_stream_{j}_top1"] > 0.8
    model, tok = load(str(convert(str(tmp_path / "hf"), tmp_path / "mlx")))
    words = json.loads(open(data / "eval.jsonl").readline())["text"].split()
    prompt = tok.encode(" ".join(words[:12]))
    toks, records = spec_tokens(model, prompt, 40)
    assert toks == spec_tokens(model, prompt, 40, speculative=False)[0]
    assert len(toks) / records[-1][3] > 1.5


def test_lossless_mode_self_distilled_with_stream_lora(data, tmp_path, capsys):
    run(
        data,
        tmp_path / "hf",
        "--mode",
        "lossless",
        "--self-distill",
        "--window-prompt",
        "8",
        "--stream-lora-rank",
        "8",
        "--max-steps",
        "150",
        "--learning-rate",
        "3e-3",
        "--stream-loss-weight",
        "1.0",
    )
    after = eval_accuracy(capsys)
    assert "eval_main_top1" in after
    for j in (1, 2, 3):
        assert after[f"eval_stream_{j}_top1"] > 0.5
    model, tok = load(str(convert(str(tmp_path / "hf"), tmp_path / "mlx")))
    assert model.speculative_streams.config.stream_lora_rank == 8
    prompt = [3, 9, 4, 1, 5, 9, 2, 6]
    toks, records = spec_tokens(model, prompt, 40)
    assert toks == plain_greedy(model, prompt, 40)  # the frozen base, token for token
    assert len(toks) / records[-1][3] > 1.5


def test_stream_lora_targets_adapts_only_the_named_modules(data, tmp_path):
    named = ["self_attn.q_proj", "self_attn.v_proj"]
    run(data, tmp_path / "hf", "--mode", "lossless", "--stream-lora-rank", "4",
        "--max-steps", "2", "--stream-lora-targets", *named)  # fmt: skip
    model, _ = load(str(convert(str(tmp_path / "hf"), tmp_path / "mlx")))
    rt = model.speculative_streams
    assert rt.config.stream_lora_targets == named and rt.lora_targets == [named, named]
    with pytest.raises(ValueError, match=r"stream_lora_targets: \['self_attn.nope'\] are not"):
        run(data, tmp_path / "bad", "--mode", "lossless", "--stream-lora-rank", "4",
            "--max-steps", "2", "--stream-lora-targets", "self_attn.nope")  # fmt: skip


def test_shared_mode_adapter_output_converts(data, tmp_path):
    run(
        data,
        tmp_path / "hf",
        "--mode",
        "shared",
        "--lora-rank",
        "4",
        "--max-steps",
        "20",
        "--save-adapter",
    )
    assert (tmp_path / "hf" / "adapter" / "adapter_config.json").exists()
    model, _ = load(
        str(
            convert(
                str(tmp_path / "hf"),
                tmp_path / "mlx",
                adapter_path=str(tmp_path / "hf" / "adapter"),
            )
        )
    )
    prompt = [3, 1, 4, 1, 5]
    assert spec_tokens(model, prompt, 24)[0] == spec_tokens(model, prompt, 24, speculative=False)[0]


def test_refuses_to_overwrite_a_model(data, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        run(data, tmp_path / "hf", "--max-steps", "1")


def test_checkpoints_save_and_resume_with_tied_embeddings(data, tmp_path, capsys):
    """Checkpointing a model whose head shares the embedding, then resuming from it."""
    base = hf_model("llama", vocab_size=V, weight_scale=1.0, tie_word_embeddings=True)
    assert base.config.tie_word_embeddings
    base.save_pretrained(str(tmp_path / "base"))
    hf_tokenizer(V).save_pretrained(str(tmp_path / "base"))
    args = [
        "--model",
        str(tmp_path / "base"),
        "--data",
        str(data / "train.jsonl"),
        "--out",
        str(tmp_path / "hf"),
        "--num-streams",
        "2",
        "--num-stream-layers",
        "2",
        "--max-length",
        "48",
        "--batch-size",
        "4",
        "--save-steps",
        "2",
        "--eval-steps",
        "1000",
        "--lora-rank",
        "4",
    ]
    finetune(args + ["--max-steps", "2"])
    assert (tmp_path / "hf" / "checkpoints" / "checkpoint-2" / "pytorch_model.bin").exists()
    # Keep only the checkpoints, as an interrupted run leaves them, and go on to step 4.
    for p in (tmp_path / "hf").iterdir():
        if p.name != "checkpoints":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    finetune(args + ["--max-steps", "4"])
    assert (tmp_path / "hf" / "checkpoints" / "checkpoint-4").exists()
    model, _ = load(str(convert(str(tmp_path / "hf"), tmp_path / "mlx")))
    assert (
        spec_tokens(model, [1, 2, 3], 8)[0]
        == spec_tokens(model, [1, 2, 3], 8, speculative=False)[0]
    )

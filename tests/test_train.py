"""``python -m mlx_specstream.train``: lossless-mode streams trained in MLX.

Tiny random models on predictable (cyclic) data: the streams learn far above
chance, the base never changes, the written directory decodes losslessly,
an interrupted run resumes to the same result, and bad input is refused by
name. The loss matches ``convert.finetune``'s on the same model and batch.
"""

import gc
import json
import random
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import ARCH_ARGS, BASE, plain_greedy, tiny_model, word_tokenizer
from mlx.utils import tree_flatten

import mlx_specstream.train as train_module
from mlx_specstream import SpecStreamConfig, load, stream_generate
from mlx_specstream.streams import get_runtime
from mlx_specstream.train import (
    StreamLoss,
    attach_for_training,
    batch_indices,
    evaluate,
    train_streams,
)
from mlx_specstream.train import main as train_main
from mlx_specstream.train_data import DataError, load_examples, self_distill, text_windows

V = 64
CYCLE = [3, 17, 42, 8, 29]  # every row repeats it: the future is fully predictable
SPEC = dict(num_streams=3, num_stream_layers=2, stream_lora_rank=8)
RECIPE = dict(batch_size=4, learning_rate=1e-2, stream_weight=1.0)
# fmt: off
CLI_RECIPE = ["--batch-size", "4", "--learning-rate", "1e-2", "--stream-loss-weight", "1",
              "--num-stream-layers", "2", "--stream-lora-rank", "8", "--max-seq-length", "16",
              "--window-prompt", "2", "--steps-per-report", "5"]
# fmt: on


def quiet(*args):
    pass


def cycle_ids(rng, length=16):
    s = rng.randrange(len(CYCLE))
    return [CYCLE[(s + i) % len(CYCLE)] for i in range(length)]


def cycle_examples(n, seed):
    rng = random.Random(seed)
    return [ex for _ in range(n) for ex in text_windows(cycle_ids(rng), 16, 2)]


def write_cycle_jsonl(path, n=48, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in cycle_ids(rng))}) + "\n")
    return path


def write_base(path, arch="llama", quant_bits=None, tokenizer=None):
    """A tiny mlx-lm model directory, as ``mlx_lm.load`` reads it."""
    from mlx_lm.utils import save_config, save_model

    model = tiny_model(arch, V, weight_scale=1.0, quant_bits=quant_bits)
    path.mkdir()
    save_model(path, model)
    config = {**BASE, **ARCH_ARGS[arch], "vocab_size": V, "model_type": arch}
    if quant_bits:
        config["quantization"] = {"group_size": 32, "bits": quant_bits}
    save_config(config, path / "config.json")
    (tokenizer or word_tokenizer(V)).save_pretrained(str(path))
    return path


def host_copy(model):
    """The model's parameters copied to the host (float32 or packed ints)."""
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def same_arrays(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_cycle_jsonl(tmp_path_factory.mktemp("data") / "cycle.jsonl")


# ---- learning, and the frozen base ----------------------------------------------------------


def train_tiny(arch):
    """Trains fresh streams on a tiny ``arch`` model for 50 steps of cyclic data: the
    held-out evaluations before and after, the result, and whether the base is
    bit-identical afterwards."""
    model = tiny_model(arch, V, weight_scale=1.0)
    base = host_copy(model)
    attach_for_training(model, SpecStreamConfig(**SPEC), seed=0)
    loss = StreamLoss(model, 1.0)
    held_out = cycle_examples(8, seed=1)
    _, before = evaluate(loss, held_out)
    result = train_streams(model, cycle_examples(64, seed=0), iters=50, log=quiet, **RECIPE)
    _, after = evaluate(loss, held_out)
    return before, after, result, same_arrays(host_copy(model), base)


def test_streams_learn_far_above_chance_and_the_base_stays_bit_identical():
    before, after, result, unchanged = train_tiny("llama")
    # Chance is 1/64; untrained streams predict the token after the next one.
    assert max(before.top1()) < 0.2, before.text()
    assert min(after.top1()) > 0.8, after.text()
    assert after.early_top1() > 0.5, after.text()
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert unchanged


def test_negative_control_training_the_base_changes_it():
    """The bit-identity check can fail: a variant that also trains the base changes it."""

    class BaseAndStreams(nn.Module):
        def __init__(self, base, streams):
            super().__init__()
            self.base = base
            self.streams = streams

    model = tiny_model("llama", V, weight_scale=1.0)
    base = host_copy(model)
    streams = attach_for_training(model, SpecStreamConfig(**SPEC), seed=0)
    both = BaseAndStreams(model, streams)
    train_streams(model, cycle_examples(8, 0), iters=2, trainable=both, log=quiet, **RECIPE)
    assert not same_arrays(host_copy(model), base)


def test_a_quantized_base_trains_and_stays_bit_identical():
    model = tiny_model("llama", V, weight_scale=1.0, quant_bits=4)
    assert isinstance(model.layers[-1].self_attn.q_proj, nn.QuantizedLinear)
    base = host_copy(model)
    attach_for_training(model, SpecStreamConfig(**SPEC), seed=0)
    loss = StreamLoss(model, 1.0)
    held_out = cycle_examples(8, seed=1)
    _, before = evaluate(loss, held_out)
    train_streams(model, cycle_examples(64, seed=0), iters=40, log=quiet, **RECIPE)
    _, after = evaluate(loss, held_out)
    assert min(after.top1()) > 0.6 > max(before.top1()) + 0.3, (before.text(), after.text())
    assert same_arrays(host_copy(model), base)


def test_the_loss_matches_convert_finetune_on_the_same_model_and_batch(tmp_path):
    """Same targets, masks, weights and early-exit term as the PyTorch recipe."""
    torch = pytest.importorskip("torch")
    from hf_helpers import hf_model, write_checkpoint

    from convert.convert import convert
    from convert.finetune import SpecStreamTrainingModel, collate

    spec = SpecStreamConfig(mode="lossless", **SPEC)
    msm = write_checkpoint(tmp_path / "hf", hf_model("llama", V), spec)
    model, _ = load(str(convert(str(tmp_path / "hf"), tmp_path / "mlx")))
    rng = random.Random(0)
    batch = [
        {"input_ids": [rng.randrange(V) for _ in range(20)], "prompt_len": 5},
        {"input_ids": [rng.randrange(V) for _ in range(13)], "prompt_len": 1},
        {"input_ids": [rng.randrange(V) for _ in range(9)], "prompt_len": 6},
    ]
    with torch.no_grad():
        want = SpecStreamTrainingModel(msm, 0.0, 0.1)(**collate(batch))
    got, metrics = StreamLoss(model, 0.1)(batch)
    assert got.item() == pytest.approx(want["loss"].item(), rel=1e-4)
    for j in range(3):
        hits, count = want["correct"][f"stream_{j + 1}"]
        assert (metrics["hits"][j].item(), metrics["counts"][j]) == (hits, count)
    assert (metrics["early_hits"].item(), metrics["early_count"]) == want["correct"]["early_exit"]


# ---- the command line ---------------------------------------------------------------------


def test_cli_writes_a_model_that_loads_decodes_losslessly_and_is_tuned(
    base_dir, data_file, tmp_path, monkeypatch, capsys
):
    import mlx_lm

    import mlx_specstream.tune as tune_module

    # Tune over one tree shape only (and its pruning thresholds), to stay fast.
    one_tree = [dict(tree_depth=3, tree_top_k=2, max_tree_nodes=8, prune_threshold=0.0)]
    monkeypatch.setattr(tune_module, "candidate_trees", lambda *a: one_tree)
    budgets, real_tune = [], tune_module.tune
    monkeypatch.setattr(tune_module, "tune",
                        lambda *a, **k: budgets.append(k["max_tokens"]) or real_tune(*a, **k))  # fmt: skip
    out = tmp_path / "out"
    argv = ["--model", str(base_dir), "--data", str(data_file), "--out", str(out), "--iters", "30"]
    train_main(argv + ["--self-distill", "--tune-max-tokens", "24", *CLI_RECIPE])
    printed = capsys.readouterr().out
    assert "stream top-1" in printed and "tuned the draft tree" in printed
    assert budgets == [24]  # (--tune-max-tokens: each timed generation's length)
    with pytest.raises(ValueError, match="--tune-max-tokens 0: must be >= 1"):
        train_main(argv + ["--tune-max-tokens", "0"])
    assert not (out / "training").exists()
    assert (out / "config.json.before-tune").exists() and (out / "prompts.jsonl").exists()
    # The base weights on disk are the source's, bit for bit.
    src, dst = mx.load(str(base_dir / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert src.keys() == dst.keys()
    assert all(mx.array_equal(src[k], dst[k]).item() and src[k].dtype == dst[k].dtype for k in src)
    # Lossless: speculative decoding gives the base model's own greedy tokens.
    model, tokenizer = load(str(out))
    base, _ = mlx_lm.load(str(base_dir))
    rng = random.Random(5)
    passes = tokens = 0
    for _ in range(3):
        prompt = cycle_ids(rng, 4)
        got = list(
            stream_generate(model, tokenizer, prompt, max_tokens=24, tree_depth=3, tree_top_k=2)
        )
        want = plain_greedy(base, prompt, 24)
        if tokenizer.eos_token_id in want:  # generation stops at EOS
            want = want[: want.index(tokenizer.eos_token_id) + 1]
        assert [r.token for r in got] == want
        passes, tokens = passes + got[-1].forward_passes, tokens + len(got)
    assert passes < tokens  # drafts were accepted: the streams learned the base's continuations
    # The output directory is never overwritten.
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        train_main(argv + ["--no-tune", *CLI_RECIPE])
    with pytest.raises(FileExistsError, match="already holds a trained model"):
        train_main(argv + ["--no-tune", "--resume", *CLI_RECIPE])


def test_cli_on_a_quantized_base_writes_it_unchanged(data_file, tmp_path):
    import mlx_lm

    base_dir = write_base(tmp_path / "q4", quant_bits=4)
    out = tmp_path / "out"
    train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                "--iters", "3", "--no-tune", *CLI_RECIPE])  # fmt: skip
    src, dst = mx.load(str(base_dir / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert any(k.endswith(".scales") for k in src) and src.keys() == dst.keys()
    assert all(mx.array_equal(src[k], dst[k]).item() and src[k].dtype == dst[k].dtype for k in src)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    model, tokenizer = load(str(out))
    base, _ = mlx_lm.load(str(base_dir))
    prompt = cycle_ids(random.Random(2), 4)
    got = stream_generate(model, tokenizer, prompt, max_tokens=12, tree_depth=3, tree_top_k=2)
    want = plain_greedy(base, prompt, 12)
    got = [r.token for r in got]
    assert got == want[: len(got)] and (len(got) == 12 or got[-1] == tokenizer.eos_token_id)


def test_resume_continues_where_it_stopped(base_dir, data_file, tmp_path, monkeypatch, capsys):
    def run(out, *extra):
        train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                    "--iters", "6", "--save-every", "2", "--no-tune", *CLI_RECIPE, *extra])  # fmt: skip

    other = (["--learning-rate", "1e-3"], "--learning-rate 0.01, not 0.001")
    assert_resumes_as_straight(run, tmp_path, monkeypatch, capsys, other,
                               "speculative_streams.safetensors")  # fmt: skip


def assert_resumes_as_straight(run, tmp_path, monkeypatch, capsys, other, weights):
    """``run(out, *flags)`` straight, then killed after its step-4 checkpoint and resumed:
    the ``weights`` file written equals the straight run's; ``OUT`` is refused without
    ``--resume`` and with ``other``'s flags (``(flags, message)``)."""
    run(tmp_path / "straight")

    class Killed(Exception):
        pass

    save = train_module.save_checkpoint

    def save_then_die(training_dir, step, module, optimizer):
        save(training_dir, step, module, optimizer)
        if step == 4:
            raise Killed

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path / "resumed")
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    with pytest.raises(FileExistsError, match="pass --resume"):
        run(tmp_path / "resumed")
    with pytest.raises(ValueError, match=other[1]):
        run(tmp_path / "resumed", "--resume", *other[0])
    capsys.readouterr()
    run(tmp_path / "resumed", "--resume")
    assert "resuming from step 4" in capsys.readouterr().out
    a = mx.load(str(tmp_path / "straight" / weights))
    b = mx.load(str(tmp_path / "resumed" / weights))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-5, atol=1e-7)


def test_the_optimizer_steps_as_torch_adamw_under_trainer():
    """Bias-corrected AdamW, linear decay to 0, norm-1 clipping: the same
    parameters after a few steps as torch's (convert.finetune's optimizer)."""
    torch = pytest.importorskip("torch")
    import mlx.optimizers as optim
    from transformers import get_linear_schedule_with_warmup

    from mlx_specstream.train import make_optimizer

    rng = np.random.default_rng(0)
    w0, grads = rng.normal(size=(4, 3)), [rng.normal(size=(4, 3)) * 3 for _ in range(5)]
    tw = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.AdamW([tw], lr=1e-2, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(topt, 0, 5)
    params, opt = {"w": mx.array(w0, dtype=mx.float32)}, make_optimizer(1e-2, 5)
    for g in grads:
        tw.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([tw], 1.0)
        topt.step()
        sched.step()
        clipped, _ = optim.clip_grad_norm({"w": mx.array(g, dtype=mx.float32)}, 1.0)
        params = opt.apply_gradients(clipped, params)
    np.testing.assert_allclose(np.array(params["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_batches_are_a_function_of_the_step():
    first = [batch_indices(s, 10, 4, seed=0) for s in range(5)]  # 20 draws: two epochs
    assert first == [batch_indices(s, 10, 4, seed=0) for s in range(5)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) == sorted(flat[10:])
    assert first != [batch_indices(s, 10, 4, seed=1) for s in range(5)]


# ---- bad input ---------------------------------------------------------------------------


def run_cli(base_dir, data, out, *extra):
    train_main(["--model", str(base_dir), "--data", str(data), "--out", str(out),
                "--iters", "1", "--no-tune", *CLI_RECIPE, *extra])  # fmt: skip


def lora_modules(out):
    """The module paths that the stream LoRA written to ``out`` adapts."""
    keys = mx.load(str(out / "speculative_streams.safetensors")).keys()
    return {k.split(".", 2)[2].rsplit(".", 1)[0] for k in keys if k.startswith("lora.")}


def test_stream_lora_targets_adapts_only_the_named_modules(base_dir, data_file, tmp_path):
    named = ["self_attn.q_proj", "self_attn.v_proj"]
    run_cli(base_dir, data_file, tmp_path / "qv", "--stream-lora-targets", *named)
    config = json.loads((tmp_path / "qv" / "config.json").read_text())["speculative_streaming"]
    assert config["stream_lora_targets"] == named and lora_modules(tmp_path / "qv") == set(named)
    run_cli(base_dir, data_file, tmp_path / "all")  # control: every linear module
    assert lora_modules(tmp_path / "all") > set(named)
    with pytest.raises(ValueError, match=r"stream_lora_targets: \['self_attn.nope'\] are not"):
        run_cli(base_dir, data_file, tmp_path / "bad", "--stream-lora-targets", "self_attn.nope")
    assert not (tmp_path / "bad").exists()


def test_missing_or_empty_data_is_refused_by_name(base_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="--data .*nowhere.jsonl does not exist"):
        run_cli(base_dir, tmp_path / "nowhere.jsonl", tmp_path / "o1")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl holds no training examples"):
        run_cli(base_dir, tmp_path / "empty.jsonl", tmp_path / "o2")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="emptydir is an empty directory"):
        run_cli(base_dir, tmp_path / "emptydir", tmp_path / "o3")
    (tmp_path / "bad.jsonl").write_text('{"text": "t1 t2 t3 t4 t5"}\n{"body": "t1"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected 'text'.*the row has \['body'\]"):
        run_cli(base_dir, tmp_path / "bad.jsonl", tmp_path / "o4")
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl:1: not valid JSON"):
        run_cli(base_dir, tmp_path / "broken.jsonl", tmp_path / "o5")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))  # nothing written


def test_data_too_short_for_the_window_is_refused_by_name(base_dir, tmp_path):
    (tmp_path / "short.txt").write_text("t1 t2 t3")
    with pytest.raises(
        DataError, match=r"short.txt \(3 tokens\).*--window-prompt 2 needs at least 4"
    ):
        run_cli(base_dir, tmp_path / "short.txt", tmp_path / "o1")
    (tmp_path / "pc.jsonl").write_text(
        json.dumps({"prompt": "t1 " * 20, "completion": "t2"}) + "\n"
    )
    with pytest.raises(
        DataError, match=r"pc.jsonl:1: the prompt \(20 tokens\).*--max-seq-length 16"
    ):
        run_cli(base_dir, tmp_path / "pc.jsonl", tmp_path / "o2")
    with pytest.raises(DataError, match="--window-prompt 15 does not fit --max-seq-length 16"):
        run_cli(base_dir, tmp_path / "short.txt", tmp_path / "o3", "--window-prompt", "15")


def test_a_model_without_a_kv_cache_is_refused_by_name(tmp_path, data_file):
    from mlx_lm.models import mamba
    from mlx_lm.utils import save_config, save_model

    args = dict(model_type="mamba", vocab_size=V, hidden_size=32, intermediate_size=64,
                state_size=4, num_hidden_layers=2, conv_kernel=4, use_bias=False,
                use_conv_bias=True, time_step_rank=4)  # fmt: skip
    path = tmp_path / "mamba"
    path.mkdir()
    save_model(path, mamba.Model(mamba.ModelArgs(**args)))
    save_config(args, path / "config.json")
    word_tokenizer(V).save_pretrained(str(path))
    culprit = f"--model {re.escape(str(path))}: Model type 'mamba' uses .*Cache.*roll"
    with pytest.raises(ValueError, match=culprit):
        train_main(["--model", str(path), "--data", str(data_file), "--out",
                    str(tmp_path / "out"), "--num-stream-layers", "1", "--no-tune"])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_chat_data_needs_a_chat_template(tmp_path):
    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "t1"}]}) + "\n"
    )
    with pytest.raises(DataError, match="chat.jsonl:1: 'messages' needs a chat template"):
        load_examples([str(tmp_path / "chat.jsonl")], word_tokenizer(V), 16, 2)


# ---- data formats --------------------------------------------------------------------------

CHAT_TEMPLATE = (  # t1 content t2 per message; t3 opens the assistant's turn
    "{% for m in messages %}{% if m['role'] == 'assistant' %}t3 {% endif %}"
    "t1 {{ m['content'] }} t2 {% endfor %}{% if add_generation_prompt %}t3 {% endif %}"
)


def test_data_formats(tmp_path):
    tok = word_tokenizer(V)
    rows = [
        {"text": " ".join(f"t{i}" for i in range(1, 21))},
        {"prompt": "t5 t6 t7", "completion": "t8 t9"},
    ]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, valid, _ = load_examples([str(tmp_path / "mixed.jsonl")], tok, 16, 2)
    assert valid == []
    # Text: windows of 16 with 2 prompt tokens (the 4-token tail is kept: 4 >= 2 + 2).
    assert [ex["input_ids"] for ex in train[:2]] == [list(range(1, 17)), list(range(17, 21))]
    assert [ex["prompt_len"] for ex in train[:2]] == [2, 2]
    # A base tokenizer: prompt + completion + EOS, as convert.finetune builds it.
    assert train[2] == {"input_ids": [5, 6, 7, 8, 9, V - 1], "prompt_len": 3, "kind": "completion"}

    # A chat template: mlx_lm.lora's formatting, the prompt masked as with --mask-prompt.
    chat = word_tokenizer(V, chat_template=CHAT_TEMPLATE)
    (tmp_path / "lora").mkdir()
    msgs = [{"role": "user", "content": "t5"}, {"role": "assistant", "content": "t8 t9"}]
    (tmp_path / "lora" / "train.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    (tmp_path / "lora" / "valid.jsonl").write_text(json.dumps(rows[1]) + "\n")
    (tmp_path / "lora" / "notes.txt").write_text("t1 " * 40)  # not read: mlx_lm.lora layout
    train, valid, _ = load_examples([str(tmp_path / "lora")], chat, 16, 2)
    assert train == [{"input_ids": [1, 5, 2, 3, 1, 8, 9, 2], "prompt_len": 4, "kind": "completion"}]
    assert valid == [
        {"input_ids": [1, 5, 6, 7, 2, 3, 1, 8, 9, 2], "prompt_len": 6, "kind": "completion"}
    ]

    # A directory of code/text files (binary files are skipped), recursively.
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "a.py").write_text("t1 t2 t3 t4 t5")
    (tmp_path / "src" / "pkg" / "b.txt").write_text("t6 t7 t8 t9")
    (tmp_path / "src" / "blob.bin").write_bytes(b"\x00\xff\x10")
    train, _, _ = load_examples([str(tmp_path / "src")], tok, 16, 2)
    assert [ex["input_ids"] for ex in train] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]


def test_self_distillation_is_the_base_models_greedy_continuation():
    from mlx_specstream.train_data import _suppress

    model = tiny_model("llama", V, weight_scale=4.0)
    tok = word_tokenizer(V)
    rng = random.Random(0)
    windows = [
        {"input_ids": [rng.randrange(V) for _ in range(12)], "prompt_len": 3, "kind": "text"}
        for _ in range(5)
    ]
    prompt = {"input_ids": [4, 5, 6] + [7] * 9, "prompt_len": 3, "kind": "completion"}
    got = self_distill(model, tok, windows + [prompt], batch_size=4)
    no_eos = [_suppress([tok.eos_token_id])]
    for ex, new in zip(windows, got):
        p = ex["input_ids"][:3]
        assert new["input_ids"] == p + greedy(model, p, 9, no_eos) and new["prompt_len"] == 3
    want = greedy(model, [4, 5, 6], 9)
    if tok.eos_token_id in want:  # a prompt's continuation ends at EOS
        want = want[: want.index(tok.eos_token_id) + 1]
    assert got[-1]["input_ids"] == [4, 5, 6] + want


def greedy(model, prompt, n, logits_processors=None):
    from mlx_lm.generate import generate_step

    steps = generate_step(
        mx.array(prompt), model, max_tokens=n, logits_processors=logits_processors
    )
    return [t for t, _ in steps]


def test_streams_of_a_trained_model_are_the_only_new_parameters():
    model = tiny_model("llama", V, weight_scale=1.0)
    streams = attach_for_training(model, SpecStreamConfig(**SPEC), seed=0)
    names = {k for k, _ in tree_flatten(get_runtime(model).streams.trainable_parameters())}
    assert "embeddings" in names and "prune_adapter.up.weight" in names
    assert any(k.endswith(".lora_b") for k in names)
    # LoRA starts as a no-op and the pruning adapter as the identity, as in convert.finetune.
    for k, v in tree_flatten(streams.parameters()):
        if k.endswith(".lora_b") or k == "prune_adapter.up.weight":
            assert not mx.any(v).item(), k


# ---- mlx_lm.lora's training options ------------------------------------------------------------


def test_gradient_accumulation_equals_one_larger_batch():
    """Two micro-batches of 4 accumulated take the step one batch of 8 takes (the
    windows have equal lengths, so the per-batch means agree); control: one
    micro-batch alone steps elsewhere."""
    from mlx_specstream.train import make_optimizer, make_step

    examples = cycle_examples(8, seed=0)[:8]
    after = []
    for batches in ([examples[:4], examples[4:]], [examples], [examples[:4]]):
        model = tiny_model("llama", V, weight_scale=1.0)
        attach_for_training(model, SpecStreamConfig(**SPEC), seed=0)
        streams = get_runtime(model).streams
        step = make_step(StreamLoss(model, 1.0), streams, make_optimizer(1e-2, 4))
        step(batches)
        after.append(dict(tree_flatten(streams.parameters())))
    for k in after[0]:
        np.testing.assert_allclose(np.array(after[0][k]), np.array(after[1][k]), atol=1e-6)
    assert any(not np.allclose(np.array(after[2][k]), np.array(after[1][k])) for k in after[1])


class OwnMeans(StreamLoss):
    """A control: each window's loss divided by its own positions, not the batch's."""

    def __call__(self, batch, normalizers=None):
        return super().__call__(batch)


def test_grad_checkpoint_takes_the_same_step_a_window_at_a_time():
    """``--grad-checkpoint``: windows' shares of the batch's loss, each differentiated on
    its own, give the batch's step, at a lower peak memory (windows of 64 tokens).
    Control: each window's own mean loss, summed, steps elsewhere."""
    from mlx_specstream.train import make_optimizer, make_step

    rng = random.Random(0)
    examples = [text_windows(cycle_ids(rng, 80), 64, 2)[0] for _ in range(4)]
    after, peaks = [], []
    for mode in ("batch", "window", "own means"):
        model = tiny_model("llama", V, weight_scale=1.0)
        attach_for_training(model, SpecStreamConfig(**SPEC), seed=0)
        streams = get_runtime(model).streams
        loss = (OwnMeans if mode == "own means" else StreamLoss)(model, 1.0)
        step = make_step(loss, streams, make_optimizer(1e-2, 4), window_at_a_time=mode != "batch")
        gc.collect()
        mx.reset_peak_memory()
        before = mx.get_active_memory()  # (other tests' arrays may still be alive)
        step([examples])
        peaks.append(mx.get_peak_memory() - before)
        after.append(dict(tree_flatten(streams.parameters())))
    for k in after[0]:
        np.testing.assert_allclose(np.array(after[1][k]), np.array(after[0][k]), atol=1e-6)
    assert any(not np.allclose(np.array(after[2][k]), np.array(after[0][k])) for k in after[0])
    assert peaks[1] < 0.7 * peaks[0], peaks


@pytest.mark.parametrize("name", ["adam", "sgd", "adafactor"])
def test_other_optimizers_train_the_streams(name):
    model = tiny_model("llama", V, weight_scale=1.0)
    base = host_copy(model)
    attach_for_training(model, SpecStreamConfig(**SPEC), seed=0)
    lr = {"adam": 1e-2, "sgd": 1.0, "adafactor": 1e-2}[name]
    recipe = {**RECIPE, "learning_rate": lr}
    result = train_streams(model, cycle_examples(64, seed=0), iters=20, log=quiet,
                           optimizer=name, **recipe)  # fmt: skip
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    assert same_arrays(host_copy(model), base)


def test_bad_training_options_are_refused_by_name():
    from mlx_specstream.train import make_optimizer

    with pytest.raises(ValueError, match="--optimizer 'lion'"):
        make_optimizer(1e-3, 10, "lion")
    model = tiny_model("llama", V, weight_scale=1.0)
    attach_for_training(model, SpecStreamConfig(**SPEC), seed=0)
    with pytest.raises(ValueError, match="--grad-accumulation-steps 0"):
        train_streams(model, cycle_examples(8, 0), iters=2, log=quiet, grad_accumulation_steps=0)


def test_held_out_evaluation_every_steps_per_eval(base_dir, data_file, tmp_path, monkeypatch):
    """``--steps-per-eval``/``--val-batches``: a validation line every N steps on
    that many held-out batches; the CLI's optimizer and accumulation flags reach
    the training, and --resume refuses a checkpoint made with another optimizer."""
    lines, seen = [], {}
    model = tiny_model("llama", V, weight_scale=1.0)
    attach_for_training(model, SpecStreamConfig(**SPEC), seed=0)
    train_streams(model, cycle_examples(16, 0), iters=6, log=lines.append, steps_per_report=100,
                  valid=cycle_examples(8, 1), steps_per_eval=2, val_batches=1, **RECIPE)  # fmt: skip
    evals = [x for x in lines if "val loss" in x]
    assert [x.split(":")[0] for x in evals] == ["Iter 2", "Iter 4"], lines
    real = train_module.train_streams

    def record(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(train_module, "train_streams", record)
    args = [
        "--model",
        str(base_dir),
        "--data",
        str(data_file),
        "--out",
        str(tmp_path / "o"),
        "--iters",
        "2",
        "--no-tune",
        *CLI_RECIPE,
        "--optimizer",
        "sgd",
        "--grad-accumulation-steps",
        "2",
        "--steps-per-eval",
        "1",
        "--val-batches",
        "-1",
        "--grad-checkpoint",
    ]
    # fmt: skip
    train_main(args)
    assert (seen["optimizer"], seen["grad_accumulation_steps"]) == ("sgd", 2)
    assert (seen["steps_per_eval"], seen["val_batches"]) == (1, -1) and "valid" in seen
    assert seen["grad_checkpoint"] is True

    class Killed(Exception):
        pass

    monkeypatch.setattr(
        train_module, "train_streams", lambda *a, **kw: (_ for _ in ()).throw(Killed)
    )
    out = ["--out", str(tmp_path / "p")]
    with pytest.raises(Killed):
        train_main(args[:4] + out + args[6:])
    with pytest.raises(ValueError, match="--optimizer 'sgd', not 'adam'"):
        train_main(args[:4] + out + args[6:] + ["--resume", "--optimizer", "adam"])


def assert_train_cli_decodes_losslessly(tmp_path, arch, config, extra=()):
    """A Mac user's three lines on a saved tiny ``arch`` directory (``config`` its
    config.json): ``mlx_specstream.train`` (with the flags ``extra``), then ``load``
    and generate: the base model's greedy tokens, with drafts accepted."""
    import random

    import mlx_lm
    from helpers import plain_greedy, tiny_model, word_tokenizer
    from mlx_lm.utils import save_config, save_model

    from mlx_specstream import load, stream_generate

    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir()
    save_model(base, tiny_model(arch, V, weight_scale=1.0))
    save_config(config, base / "config.json")
    word_tokenizer(V).save_pretrained(str(base))
    data = write_cycle_jsonl(tmp_path / "data.jsonl")
    train_main(["--model", str(base), "--data", str(data), "--out", str(out), "--iters", "60",
                "--no-tune", *CLI_RECIPE, *extra])  # fmt: skip
    model, tokenizer = load(str(out))
    plain, _ = mlx_lm.load(str(base))
    rng, passes, tokens = random.Random(5), 0, 0
    for _ in range(3):
        prompt = cycle_ids(rng, 4)
        got = list(stream_generate(model, tokenizer, prompt, max_tokens=24, tree_depth=3,
                                   tree_top_k=2))  # fmt: skip
        want = plain_greedy(plain, prompt, 24)
        if tokenizer.eos_token_id in want:  # generation stops at EOS
            want = want[: want.index(tokenizer.eos_token_id) + 1]
        assert [r.token for r in got] == want
        passes, tokens = passes + got[-1].forward_passes, tokens + len(got)
    assert passes < tokens  # drafts were accepted


def test_cli_writes_a_draft_vocabulary_of_the_training_completions(base_dir, data_file, tmp_path,
                                                                  capsys):  # fmt: skip
    """``--draft-vocab-size 8``: the five tokens of the data and the EOS, then the lowest
    ids uncounted; the directory loads with it and decodes as plain decoding. A size
    that cuts nothing is refused before anything is written."""
    import mlx_lm

    out = tmp_path / "out"
    train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                "--iters", "3", "--no-tune", "--draft-vocab-size", "8", *CLI_RECIPE])  # fmt: skip
    assert "[INFO] draft vocabulary: Counted" in capsys.readouterr().out
    ids = np.array(mx.load(str(out / "draft_vocab.safetensors"))["token_ids"]).tolist()
    assert ids == sorted(CYCLE + [0, 1, V - 1])
    model, tokenizer = load(str(out))
    assert np.array(get_runtime(model).draft_vocab.ids).tolist() == ids
    base, _ = mlx_lm.load(str(base_dir))
    prompt = cycle_ids(random.Random(2), 4)
    got = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12,
                                            tree_depth=3, tree_top_k=2)]  # fmt: skip
    assert got == plain_greedy(base, prompt, 12)[: len(got)]
    with pytest.raises(ValueError, match=f"--draft-vocab-size {V}: a draft vocabulary holds"):
        train_main(["--model", str(base_dir), "--data", str(data_file),
                    "--out", str(tmp_path / "big"), "--draft-vocab-size", str(V)])  # fmt: skip
    assert not (tmp_path / "big").exists()

"""``python -m mlx_specstream.train --drafter eagle``: EAGLE-1 drafters trained in MLX
(mlx_specstream.eagle1_training) on tiny random models and predictable (cyclic) data: its
levels compute what the drafter computes when it drafts, the noise is drawn while training
only and the same on a resume, the drafter learns far above chance with the base unchanged,
the written directory (a 4-bit base) decodes losslessly with drafts taken."""

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_model
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from test_train import V, cycle_examples, cycle_ids, host_copy, write_base
from test_train import write_cycle_jsonl
from test_train_eagle import assert_decodes_as_the_base_with_drafts_taken
from test_train_eagle import assert_learns_with_the_base_unchanged
from test_train_eagle import assert_window_shares_add_up

from mlx_specstream.eagle1_training import (
    Eagle1Loss,
    attach_eagle1_for_training,
    eagle1_ttt_states,
    window_noise,
)
from mlx_specstream.mtp import _final_norm, head_logits
from mlx_specstream.precision import device_key
from mlx_specstream.streams import get_runtime
from mlx_specstream.train import main as train_main

# fmt: off
CLI = ["--drafter", "eagle", "--batch-size", "4", "--learning-rate", "1e-2",
       "--max-seq-length", "16", "--window-prompt", "2", "--steps-per-report", "5"]
# fmt: on


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny 4-bit base directory and test_train's cyclic data file."""
    root = tmp_path_factory.mktemp("eagle1-train")
    return write_base(root / "llama", quant_bits=4), write_cycle_jsonl(root / "cycle.jsonl")


def random_drafter(model):
    drafter = attach_eagle1_for_training(model)
    mx.random.seed(3)  # (away from its first weights: a random drafter)
    drafter.fc.weight = mx.random.normal(drafter.fc.weight.shape) * 0.3
    return drafter


def test_its_levels_compute_what_drafting_computes():
    """Level 1's and level 2's outputs at a row equal the drafter's own: ``step`` over the
    real rows up to that row on a cache, then ``again`` on its output (the level after,
    at the next position); control: level 2 from the next real feature instead."""
    model = tiny_model("llama", V, weight_scale=1.0, num_hidden_layers=3)
    drafter = random_drafter(model)
    rt = get_runtime(model)
    ids = mx.array(cycle_ids(random.Random(1), 16))
    raw = rt.prefill_rows(ids[None], [KVCache() for _ in model.layers])
    states = eagle1_ttt_states(drafter, rt, _final_norm(model)(raw), ids[None], 2)
    for i in (0, 5, 12):
        cache = KVCache()
        out = drafter.step(rt, raw[0, : i + 1], ids[1 : i + 2], cache)[-1:]
        np.testing.assert_allclose(out[0], states[0][0, i], atol=1e-4)
        again = drafter.again(rt, out, ids[i + 2 : i + 3], cache)
        np.testing.assert_allclose(again[0], states[1][0, i], atol=1e-4)
        cache = KVCache()
        drafter.step(rt, raw[0, : i + 1], ids[1 : i + 2], cache)
        wrong = drafter.step(rt, raw[0, i + 1 : i + 2], ids[i + 2 : i + 3], cache)
        assert not np.allclose(wrong[0], states[1][0, i], atol=1e-2)


def test_first_weights_come_from_the_base_s_last_layer_where_they_fit():
    """The layer's projections, MLP and post-attention norm are the base's last layer's (a
    4-bit base's dequantized); Qwen2's biased q/k/v projections do not fit and stay the
    drafter's own; ``fc`` passes the feature alone."""

    def weight(linear):
        if "scales" not in linear:
            return linear.weight
        return mx.dequantize(linear.weight, linear.scales, linear.biases, linear.group_size,
                             linear.bits)  # fmt: skip

    for arch, bits in (("llama", None), ("llama", 4), ("qwen2", None)):
        model = tiny_model(arch, V, weight_scale=1.0, quant_bits=bits)
        drafter = attach_eagle1_for_training(model)
        ours, last = drafter.layer, model.layers[-1]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            same = mx.array_equal(ours.self_attn[name].weight, weight(last.self_attn[name]))
            assert same.item() == (arch == "llama" or name == "o_proj"), (arch, bits, name)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert mx.array_equal(ours.mlp[name].weight, weight(last.mlp[name])).item()
        norm = last.post_attention_layernorm.weight
        assert mx.array_equal(ours.post_attention_layernorm.weight, norm).item()
        h = mx.random.normal((3, drafter.fc.weight.shape[0]))
        e = mx.random.normal(h.shape)
        np.testing.assert_allclose(drafter.fc(mx.concatenate([e, h], -1)), h, atol=1e-6)


def test_noise_is_drawn_while_training_only_per_window_and_step():
    """With ``train_step`` set the loss differs from evaluation's (the noise), is the same
    again for the same step, another for another step; a window alone draws what it draws
    in a batch (its shares add up, as ``--grad-checkpoint`` needs)."""
    model = tiny_model("llama", V, weight_scale=1.0)
    attach_eagle1_for_training(model)
    loss = Eagle1Loss(model, 2)
    batch = cycle_examples(4, seed=2)
    clean = loss(batch)[0].item()
    loss.train_step = 7
    noisy = loss(batch)[0].item()
    assert noisy != clean and loss(batch)[0].item() == noisy
    loss.train_step = 8
    assert loss(batch)[0].item() != noisy
    assert_window_shares_add_up(loss)
    rows = [cycle_ids(random.Random(1), 12), cycle_ids(random.Random(2), 12)]
    assert rows[0] != rows[1]
    both = window_noise(rows, 8, 3)
    assert mx.array_equal(both[1], window_noise(rows[1:], 8, 3)[0]).item()
    assert float(mx.abs(both).max()) <= 0.1 and not mx.array_equal(both[0], both[1]).item()


def test_it_learns_far_above_chance_and_the_base_stays_bit_identical():
    """Both levels' held-out top-1 from below 0.3 to above 0.8 in 40 steps, the loss down
    by a third (the features' regression keeps a floor), the base bit for bit; ``evaluate``
    draws no noise (``train_step`` back to ``None``)."""
    model = tiny_model("llama", V, weight_scale=1.0)
    base = host_copy(model)
    attach_eagle1_for_training(model)
    loss = Eagle1Loss(model, 2)
    assert_learns_with_the_base_unchanged(model, base, loss, drop=0.67)
    assert loss.train_step is None


def test_the_loss_is_eagle_1_s():
    """One level's loss recomputed from its definition: smooth L1 to the next feature (mean
    over the width) plus 0.1 times the next-but-one token's cross-entropy, over rows from
    the last prompt token on; control: without the feature term it is another."""
    import mlx.nn as nn

    model = tiny_model("llama", V, weight_scale=1.0)
    drafter = random_drafter(model)
    loss = Eagle1Loss(model, 1)
    ex = cycle_examples(1, seed=6)[0]
    ids = mx.array([ex["input_ids"]])
    f = loss.features(ids)
    out = eagle1_ttt_states(drafter, loss.rt, f, ids, 1)[0][0]
    lo, L = ex["prompt_len"] - 1, ids.shape[1]
    reg = nn.losses.smooth_l1_loss(out[lo:], f[0, lo + 1 : L - 1], reduction="none").mean(-1)
    ce = nn.losses.cross_entropy(head_logits(model, out[lo:]), ids[0, lo + 2 :], reduction="none")
    got = loss([ex])[0].item()
    np.testing.assert_allclose(got, (reg + 0.1 * ce).mean().item(), rtol=1e-5)
    assert not np.isclose(got, (0.1 * ce).mean().item(), rtol=1e-2)


def test_cli_trains_a_4_bit_base_s_drafter_that_decodes_losslessly(inputs, tmp_path, capsys):
    """The written directory holds the 4-bit base bit for bit, ``drafter.safetensors``, an
    ``eagle`` section and the draft vocabulary ``--draft-vocab-size`` asks for; loaded, it
    gives the base's greedy tokens in fewer passes than tokens, and it is tuned."""
    base_dir, data_file = inputs
    out = tmp_path / "out"
    train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                "--iters", "30", "--self-distill", "--draft-vocab-size", "20",
                "--tune-max-tokens", "16", *CLI])  # fmt: skip
    printed = capsys.readouterr().out
    assert "level top-1" in printed and "tuned the draft tree" in printed
    assert "1 level(s) trained" in printed
    section = json.loads((out / "config.json").read_text())["drafter"]
    assert section["kind"] == "eagle" and section["eagle"]["fc_bias"] is True
    assert (out / "drafter.safetensors").is_file()
    model = assert_decodes_as_the_base_with_drafts_taken(out, base_dir)
    assert mx.load(str(out / "draft_vocab.safetensors"))["token_ids"].size == 20
    # (in use unless the tuner timed every token ranked faster on this device)
    tuned = section["tuned"][device_key()]
    vocab = get_runtime(model).draft_vocab
    assert vocab.ids.size == 20 if tuned.get("draft_vocab", True) else vocab is None, tuned
    trained = dict(tree_flatten(get_runtime(model).drafter.parameters()))
    assert "fc.bias" in trained and not any("embed_tokens" in k for k in trained)


def test_resume_continues_where_it_stopped(inputs, tmp_path, monkeypatch, capsys):
    """Killed after its step-4 checkpoint and resumed: the same drafter as a straight run
    (the noise drawn again from each step), two levels trained."""
    base_dir, data_file = inputs
    from test_train import assert_resumes_as_straight

    def run(out, *extra):
        train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                    "--iters", "6", "--save-every", "2", "--no-tune", "--ttt-steps", "2", *CLI,
                    *extra])  # fmt: skip

    other = (["--ttt-steps", "3"], "--ttt-steps 2, not 3")
    assert_resumes_as_straight(run, tmp_path, monkeypatch, capsys, other, "drafter.safetensors")


def test_bad_options_are_refused_by_name_before_anything_is_written(inputs, tmp_path):
    base_dir, data_file = inputs
    for flags, match in ((["--ttt-steps", "0"], "--ttt-steps 0"),
                         (["--draft-vocab-size", str(V + 1)], f"--draft-vocab-size {V + 1}")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            train_main(["--model", str(base_dir), "--data", str(data_file), "--out",
                        str(tmp_path / "out"), *flags, *CLI])  # fmt: skip
        assert not (tmp_path / "out").exists()

"""``python -m mlx_specstream.train --drafter medusa``: Medusa-1 heads trained in MLX
(mlx_specstream.medusa_training) on tiny random models and predictable (cyclic) data, in
the released checkpoints' layout: the loss is Medusa-1's, the first weights are Medusa's,
the heads learn far above chance with the base unchanged, the written directory (a 4-bit
base) decodes losslessly with drafts taken, and a resume equals the straight run."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import tiny_model
from mlx.utils import tree_map
from test_train import V, cycle_examples, host_copy, write_base, write_cycle_jsonl
from test_train_eagle import assert_decodes_as_the_base_with_drafts_taken
from test_train_eagle import assert_learns_with_the_base_unchanged

from mlx_specstream.medusa_training import MedusaLoss, attach_medusa_for_training
from mlx_specstream.streams import get_runtime
from mlx_specstream.train import main as train_main

# fmt: off
CLI = ["--drafter", "medusa", "--batch-size", "4", "--learning-rate", "1e-2",
       "--max-seq-length", "16", "--window-prompt", "2", "--steps-per-report", "5"]
# fmt: on


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny 4-bit base directory and test_train's cyclic data file."""
    root = tmp_path_factory.mktemp("medusa-train")
    return write_base(root / "llama", quant_bits=4), write_cycle_jsonl(root / "cycle.jsonl")


def randomized(drafter, seed=3):
    """The heads away from their first weights (random blocks and LM heads)."""
    mx.random.seed(seed)
    drafter.update(tree_map(lambda v: 0.3 * mx.random.normal(v.shape), drafter.parameters()))
    return drafter


@pytest.mark.parametrize("lm_heads", ["own", "base"])
def test_the_loss_is_medusa_1_s(lm_heads):
    """The loss recomputed from its definition: head j over the base's normed state of row i
    (mlx-lm's own pass), its blocks, its LM head (or the base's), cross-entropy against
    token i + j + 2, mean over the rows from the last prompt token on, weighted 0.8 ** j;
    control: heads weighted alike give another."""
    model = tiny_model("llama", V, weight_scale=1.0)
    drafter = randomized(attach_medusa_for_training(model, 3, 2, lm_heads))
    loss = MedusaLoss(model)
    ex = cycle_examples(1, seed=6)[0]
    ids = mx.array([ex["input_ids"]])
    x = model.model(ids)[0]  # (mlx-lm's: after the final norm)
    lo, n = ex["prompt_len"] - 1, ids.shape[1] - 3 - 1
    terms = []
    for j, blocks in enumerate(drafter.heads):
        y = x[lo:n]
        for block in blocks:
            z = y @ block.linear.weight.T + block.linear.bias
            y = y + z * mx.sigmoid(z)
        head = drafter.lm_heads[j].weight if lm_heads == "own" else model.lm_head.weight
        ce = nn.losses.cross_entropy(y @ head.T, ids[0, lo + j + 2 : n + j + 2])
        terms.append(ce.mean().item())
    got = loss([ex])[0].item()
    np.testing.assert_allclose(got, sum(0.8**j * t for j, t in enumerate(terms)), rtol=1e-5)
    assert not np.isclose(got, sum(terms), rtol=1e-2)


def test_first_weights_are_medusa_s():
    """Blocks zero and each own LM head the base's (4-bit: dequantized), so every head's
    first draft is the base's own next token; ``base`` holds no LM head of its own."""
    model = tiny_model("llama", V, weight_scale=1.0, quant_bits=4)
    drafter = attach_medusa_for_training(model, 3)
    head = model.lm_head
    want = mx.dequantize(head.weight, head.scales, head.biases, head.group_size, head.bits)
    for j in range(3):
        assert mx.array_equal(drafter.lm_heads[j].weight, want).item()
        assert not mx.any(drafter.heads[j][0].linear.weight).item()
    rt = get_runtime(model)
    h = rt.prefill_rows(mx.array([[3, 17, 42, 8]]), [None] * len(model.layers))[0]
    drafts = mx.argmax(drafter.draft_rows(rt, h), axis=-1)  # (4, 3)
    base = mx.argmax(model(mx.array([[3, 17, 42, 8]]))[0], axis=-1)
    assert mx.array_equal(drafts, mx.repeat(base[:, None], 3, axis=1)).item()
    model = tiny_model("llama", V, weight_scale=1.0)
    assert attach_medusa_for_training(model, 3, lm_heads="base").lm_heads == []


@pytest.mark.parametrize("lm_heads", ["own", "base"])
def test_it_learns_far_above_chance_and_the_base_stays_bit_identical(lm_heads):
    """Every head's held-out top-1 from below 0.3 to above 0.8 in 40 steps, the loss
    halved, the base bit for bit."""
    model = tiny_model("llama", V, weight_scale=1.0)
    base = host_copy(model)
    attach_medusa_for_training(model, 3, lm_heads=lm_heads)
    assert_learns_with_the_base_unchanged(model, base, MedusaLoss(model))


def test_cli_trains_a_4_bit_base_s_heads_that_decode_losslessly(inputs, tmp_path, capsys):
    """The written directory holds the 4-bit base bit for bit, ``drafter.safetensors`` and
    a ``medusa`` section (the released heads' layout); loaded, it gives the base's greedy
    tokens in fewer passes than tokens, and it is tuned."""
    base_dir, data_file = inputs
    out = tmp_path / "out"
    train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                "--iters", "30", "--self-distill", "--num-streams", "3",
                "--tune-max-tokens", "16", *CLI])  # fmt: skip
    printed = capsys.readouterr().out
    assert "head top-1" in printed and "tuned the draft tree" in printed
    assert "3 Medusa heads (LM heads of their own)" in printed
    section = json.loads((out / "config.json").read_text())["drafter"]
    assert section["kind"] == "medusa" and section["num_draft_tokens"] == 3
    assert section["medusa"] == {"layers_per_head": 1, "lm_heads": 3, "fc_bias": True,
                                 "token_map_size": None}  # fmt: skip
    assert_decodes_as_the_base_with_drafts_taken(out, base_dir)


def test_resume_continues_where_it_stopped(inputs, tmp_path, monkeypatch, capsys):
    """Killed after its step-4 checkpoint and resumed: the same heads as a straight run."""
    base_dir, data_file = inputs
    from test_train import assert_resumes_as_straight

    def run(out, *extra):
        train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                    "--iters", "6", "--save-every", "2", "--no-tune", "--medusa-lm-heads",
                    "base", *CLI, *extra])  # fmt: skip

    other = (["--medusa-num-layers", "2"], "--medusa-num-layers 1, not 2")
    assert_resumes_as_straight(run, tmp_path, monkeypatch, capsys, other, "drafter.safetensors")


def test_bad_options_are_refused_by_name_before_anything_is_written(inputs, tmp_path):
    base_dir, data_file = inputs
    for flags, match in ((["--num-streams", "0"], "--num-streams 0"),
                         (["--medusa-num-layers", "0"], "--medusa-num-layers 0"),
                         (["--draft-vocab-size", str(V + 1)], f"--draft-vocab-size {V + 1}")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            train_main(["--model", str(base_dir), "--data", str(data_file), "--out",
                        str(tmp_path / "out"), *flags, *CLI])  # fmt: skip
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("drafter", ["eagle3", "eagle", "dflash", "medusa"])
def test_each_drafter_s_training_refuses_a_base_it_cannot_run_on(drafter):
    """Phi-3-small's passes cannot equal its one-token decoding: every drafter's training
    refuses it with the reason before anything is trained, as loading the result would."""
    from helpers import BASE, random_model

    from mlx_specstream.dflash_training import attach_dflash_for_training
    from mlx_specstream.eagle1_training import attach_eagle1_for_training
    from mlx_specstream.eagle_training import attach_eagle_for_training

    args = dict(dense_attention_every_n_layers=2, ff_intermediate_size=64, gegelu_limit=20.0,
                layer_norm_epsilon=1e-5, num_key_value_heads=2, blocksparse_block_size=32,
                blocksparse_num_local_blocks=1, blocksparse_vert_stride=2)  # fmt: skip
    model = random_model("phi3small", {**BASE, **args}, 100352)  # (past its dummy ids)
    attach = dict(eagle3=attach_eagle_for_training, eagle=attach_eagle1_for_training,
                  dflash=attach_dflash_for_training,
                  medusa=lambda m: attach_medusa_for_training(m, 3))[drafter]  # fmt: skip
    with pytest.raises(ValueError, match="adds its boolean causal mask"):
        attach(model)
    assert getattr(model, "speculative_streams", None) is None

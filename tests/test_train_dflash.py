"""``python -m mlx_specstream.train --drafter dflash``: DFlash drafters trained in MLX
(mlx_specstream.dflash_training) on tiny random models and predictable (cyclic) data: the
block loss computes what the drafter computes when it drafts, the drafter learns far
above chance, the base never changes, the written directory decodes losslessly with
drafts taken, an interrupted run resumes to the same drafter."""

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_model
from mlx_lm.models.cache import KVCache
from test_train import V, cycle_ids, host_copy, write_base
from test_train import write_cycle_jsonl
from test_train_eagle import assert_decodes_as_the_base_with_drafts_taken
from test_train_eagle import assert_learns_with_the_base_unchanged, assert_window_shares_add_up

from mlx_specstream.cache import KVCacheList
from mlx_specstream.dflash_training import (
    DFlashLoss,
    anchors,
    attach_dflash_for_training,
    block_logits,
    default_layers,
)
from mlx_specstream.precision import device_key
from mlx_specstream.streams import get_runtime
from mlx_specstream.train import main as train_main

# fmt: off
CLI = ["--drafter", "dflash", "--batch-size", "4", "--learning-rate", "1e-2", "--block-size",
       "5", "--max-seq-length", "16", "--window-prompt", "2", "--steps-per-report", "5"]
# fmt: on


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """test_train's tiny base directory and cyclic data file."""
    root = tmp_path_factory.mktemp("dflash-train")
    return write_base(root / "llama"), write_cycle_jsonl(root / "cycle.jsonl")


def test_default_layers_and_anchors_are_exact():
    """z-lab's target layers (36 layers, 5 draft layers: 1, 9, 17, 25, 33); anchors every
    stride-th completion position from the window's offset, at most ``count``."""
    assert default_layers(36, 5) == [1, 9, 17, 25, 33]
    assert default_layers(52, 5) == [1, 13, 25, 37, 49]
    assert default_layers(6, 2) == [1, 3] and default_layers(6, 1) == [3]
    assert anchors(8, 3, [1, 0, 0, 0, 0, 0, 0, 0], 2) == [4, 6]  # (the docstring's example)
    assert anchors(8, 3, [0] * 8, 2) == [3, 5]
    assert anchors(8, 3, [0] * 8, 9) == [3, 4, 5, 6]
    assert anchors(4, 3, [0] * 4, 2) == []


def test_the_block_loss_computes_what_drafting_computes():
    """Each block's logits in a batch of blocks equal the drafter's own drafting after
    the context rows before its start (a fresh cache), with the bonus token and masks;
    control: one context row more (the block's own token's)."""
    model = tiny_model("llama", V, weight_scale=1.0, num_hidden_layers=6)
    drafter = attach_dflash_for_training(model, [1, 3, 4], 2, 5, mask=V - 1)
    mx.random.seed(3)  # (away from its first weights: a random drafter)
    drafter.fc.weight = mx.random.normal(drafter.fc.weight.shape) * 0.1
    rt = get_runtime(model)
    ids = mx.array([cycle_ids(random.Random(s), 16) for s in (1, 2)])
    feats = rt.prefill_rows(ids, [KVCache() for _ in model.layers])
    starts = [[2, 7, 13], [1, 8, 14]]
    logits = block_logits(drafter, rt, feats, ids, starts)
    for b in range(2):
        for a, p in enumerate(starts[b]):
            got = logits[b * 3 + a]
            for extra, same in ((0, True), (1, False)):
                cache = KVCacheList(*(KVCache() for _ in drafter.layers))
                context = drafter.context(feats[b, : p + extra])[None]
                out = drafter.run(drafter.block(rt, ids[b, p], 4), context, cache)
                want = drafter.level_logits(rt, out[0, 1:])
                assert np.allclose(got, want, atol=1e-4) == same, (b, p, extra)


def test_it_learns_far_above_chance_and_the_base_stays_bit_identical():
    model = tiny_model("llama", V, weight_scale=1.0)
    base = host_copy(model)
    attach_dflash_for_training(model, None, 2, 4, mask=V - 1)
    assert_learns_with_the_base_unchanged(model, base, DFlashLoss(model, 8))


def test_cli_writes_a_model_that_decodes_losslessly_with_its_drafts(inputs, tmp_path, capsys):
    """The written directory holds the base bit for bit, ``drafter.safetensors`` and a
    ``dflash`` section (with a draft vocabulary of ``--draft-vocab-size`` tokens); loaded,
    it gives the base's greedy tokens in fewer passes than tokens, and it is tuned."""
    base_dir, data_file = inputs
    out = tmp_path / "out"
    train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                "--iters", "30", "--self-distill", "--draft-vocab-size", "40",
                "--tune-max-tokens", "16", *CLI])  # fmt: skip
    printed = capsys.readouterr().out
    assert "level top-1" in printed and "tuned the draft tree" in printed
    assert "the mask token: id" in printed
    section = json.loads((out / "config.json").read_text())["drafter"]
    assert section["kind"] == "dflash" and section["dflash"]["block_size"] == 5
    assert section["num_draft_tokens"] == 4 and (out / "draft_vocab.safetensors").is_file()
    model = assert_decodes_as_the_base_with_drafts_taken(out, base_dir)
    assert mx.load(str(out / "draft_vocab.safetensors"))["token_ids"].size == 40
    # (in use unless the tuner timed every token ranked faster on this device)
    tuned = section["tuned"][device_key()]
    vocab = get_runtime(model).draft_vocab
    assert vocab.ids.size == 40 if tuned.get("draft_vocab", True) else vocab is None, tuned


def test_resume_continues_where_it_stopped(inputs, tmp_path, monkeypatch, capsys):
    base_dir, data_file = inputs
    from test_train import assert_resumes_as_straight

    def run(out, *extra):
        train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                    "--iters", "6", "--save-every", "2", "--no-tune", *CLI, *extra])  # fmt: skip

    other = (["--blocks-per-window", "3"], "--blocks-per-window 16, not 3")
    assert_resumes_as_straight(run, tmp_path, monkeypatch, capsys, other, "drafter.safetensors")


def test_bad_dflash_options_are_refused_by_name_before_anything_is_written(inputs, tmp_path):
    base_dir, data_file = inputs
    for flags, match in ((["--target-layer-ids", "0", "3"], r"--target-layer-ids \[0, 3\]"),
                         (["--block-size", "1"], "--block-size 1"),
                         (["--draft-layers", "0"], "--draft-layers 0"),
                         (["--blocks-per-window", "0"], "--blocks-per-window 0")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            train_main(["--model", str(base_dir), "--data", str(data_file), "--out",
                        str(tmp_path / "out"), *CLI, *flags])  # fmt: skip
        assert not (tmp_path / "out").exists()


def test_windows_of_one_length_run_together_and_give_each_window_s_share():
    """As ``--grad-checkpoint`` needs (:func:`test_train_eagle.assert_window_shares_add_up`)."""
    model = tiny_model("llama", V, weight_scale=1.0)
    attach_dflash_for_training(model, None, 1, 4, mask=V - 1)
    assert_window_shares_add_up(DFlashLoss(model, 4))

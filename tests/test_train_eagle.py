"""``python -m mlx_specstream.train --drafter eagle3``: EAGLE-3 drafters trained in MLX
(mlx_specstream.eagle_training) on tiny random models and predictable (cyclic) data: the
training-time test computes what the drafter computes when it drafts, the drafter learns
far above chance, the base never changes, the written directory decodes losslessly with
drafts taken, an interrupted run resumes to the same drafter."""

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from helpers import plain_greedy, tiny_model
from mlx_lm.models.cache import KVCache
from test_train import V, cycle_examples, cycle_ids, host_copy, quiet, same_arrays, write_base
from test_train import write_cycle_jsonl

from mlx_specstream import load, stream_generate
from mlx_specstream.eagle_training import EagleLoss, attach_eagle_for_training, ttt_logits
from mlx_specstream.streams import get_runtime
from mlx_specstream.train import evaluate, train_streams
from mlx_specstream.train import main as train_main

RECIPE = dict(batch_size=4, learning_rate=1e-2)
# fmt: off
CLI = ["--drafter", "eagle3", "--batch-size", "4", "--learning-rate", "1e-2",
       "--max-seq-length", "16", "--window-prompt", "2", "--steps-per-report", "5"]
# fmt: on


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """test_train's tiny base directory and cyclic data file."""
    root = tmp_path_factory.mktemp("eagle-train")
    return write_base(root / "llama"), write_cycle_jsonl(root / "cycle.jsonl")


def test_the_training_time_test_computes_what_drafting_computes():
    """Step 0's and step 1's logits at a row equal the drafter's own: its ``step`` over
    the real rows up to that row on a cache, then ``again`` on its output (the level
    after, at the next position); control: step 1 through ``fc`` again."""
    model = tiny_model("llama", V, weight_scale=1.0, num_hidden_layers=6)
    drafter = attach_eagle_for_training(model, [1, 3, 6])
    mx.random.seed(3)  # (away from its first weights: a random drafter)
    drafter.fc.weight = mx.random.normal(drafter.fc.weight.shape) * 0.1
    rt = get_runtime(model)
    ids = mx.array(cycle_ids(random.Random(1), 16))
    feats = rt.prefill_rows(ids[None], model.make_cache() if hasattr(model, "make_cache")
                            else [KVCache() for _ in model.layers])  # fmt: skip
    logits = ttt_logits(drafter, rt, feats, ids[None], 2)
    for i in (0, 5, 11):
        cache = KVCache()
        out = drafter.step(rt, feats[0, : i + 1], ids[1 : i + 2], cache)[-1:]
        first = drafter.lm_head(drafter.norm(out))
        np.testing.assert_allclose(first[0], logits[0][0, i], atol=1e-4)
        again = drafter.again(rt, out, ids[i + 2 : i + 3], cache)
        np.testing.assert_allclose(drafter.lm_head(drafter.norm(again))[0], logits[1][0, i],
                                   atol=1e-4)  # fmt: skip
        cache = KVCache()
        out = drafter.step(rt, feats[0, : i + 1], ids[1 : i + 2], cache)[-1:]
        wrong = drafter.step(rt, mx.concatenate([out] * 3, axis=-1), ids[i + 2 : i + 3], cache)
        assert not np.allclose(drafter.lm_head(drafter.norm(wrong))[0], logits[1][0, i], atol=1e-2)


@pytest.mark.parametrize("options", [
    dict(num_layers=2), dict(layer_type="qwen3", num_layers=2, attention_bias=True),
    dict(norm_output=True, fc_norm=True), dict(norm_before_fc=True, layer_ids=[1, 2, 4, 6]),
])  # fmt: skip
def test_the_training_time_test_computes_what_drafting_computes_for_every_shape(tmp_path,
                                                                               options):  # fmt: skip
    """The speculators' shapes (several layers, Qwen3's, the features' norms, the final
    norm's output passed on) train as they draft: step 0's and step 1's logits at a row
    equal the loaded drafter's ``step`` then ``again`` over a cache of its own; controls:
    the other side of the final norm passed on, the first layer alone."""
    from eagle_helpers import write_base, write_eagle

    base = write_base(tmp_path / "base", V)
    ids_ = options.pop("layer_ids", [1, 3, 6])
    write_eagle(tmp_path / "eagle", V, style="speculators", layer_ids=ids_, scale=1.0, **options)
    model, _ = load(str(base), drafter=str(tmp_path / "eagle"))
    rt = get_runtime(model)
    drafter = rt.drafter
    ids = mx.array(cycle_ids(random.Random(1), 14))
    feats = rt.prefill_rows(ids[None], [KVCache() for _ in model.layers])
    logits = ttt_logits(drafter, rt, feats, ids[None], 2)
    for i in (0, 6, 10):
        cache = drafter.new_cache()
        out = drafter.step(rt, feats[0, : i + 1], ids[1 : i + 2], cache)[-1:]
        np.testing.assert_allclose(drafter.tree_logits(rt, out)[0], logits[0][0, i], atol=1e-4)
        again = drafter.again(rt, out, ids[i + 2 : i + 3], cache)
        np.testing.assert_allclose(drafter.tree_logits(rt, again)[0], logits[1][0, i], atol=1e-4)
    drafter._norm_output = not drafter._norm_output
    flipped = ttt_logits(drafter, rt, feats, ids[None], 2)
    drafter._norm_output = not drafter._norm_output
    assert not np.allclose(flipped[1], logits[1], atol=1e-2)
    if drafter.upper:
        upper, drafter.upper = drafter.upper, []
        alone = ttt_logits(drafter, rt, feats, ids[None], 2)
        drafter.upper = upper
        assert not np.allclose(alone[0], logits[0], atol=1e-2)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_it_learns_far_above_chance_and_the_base_stays_bit_identical(num_layers):
    model = tiny_model("llama", V, weight_scale=1.0)
    base = host_copy(model)
    attach_eagle_for_training(model, num_layers=num_layers)
    assert_learns_with_the_base_unchanged(model, base, EagleLoss(model, 3))


def assert_learns_with_the_base_unchanged(model, base: dict, loss, drop: float = 0.5) -> None:
    """40 steps of ``loss`` on cyclic data take every level's held-out top-1 from below 0.3
    (chance: 1/64) to above 0.8, the loss below ``drop`` times its first, and leave the
    base (``base``, its :func:`host_copy` before the drafter was attached) bit for bit."""
    held_out = cycle_examples(8, seed=1)
    _, before = evaluate(loss, held_out)
    result = train_streams(model, cycle_examples(64, seed=0), iters=40, log=quiet, loss=loss,
                           **RECIPE)  # fmt: skip
    _, after = evaluate(loss, held_out)
    assert max(before.top1()) < 0.3, before.text()
    assert min(after.top1()) > 0.8, after.text()
    assert result.losses[-1] < drop * result.losses[0]
    base_now = {k: v for k, v in host_copy(model).items() if not k.startswith("speculative")}
    assert same_arrays(base_now, base)


def test_cli_writes_a_model_that_decodes_losslessly_with_its_drafts(inputs, tmp_path, capsys):
    """The written directory holds the base bit for bit, ``drafter.safetensors`` and an
    ``eagle3`` section (its own draft vocabulary of ``--draft-vocab-size`` tokens, two
    layers with ``--eagle-num-layers 2``); loaded, it gives the base's greedy tokens in
    fewer passes than tokens, and it is tuned."""

    base_dir, data_file = inputs

    out = tmp_path / "out"
    train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                "--iters", "30", "--self-distill", "--draft-vocab-size", "20",
                "--eagle-num-layers", "2", "--tune-max-tokens", "16", *CLI])  # fmt: skip
    printed = capsys.readouterr().out
    assert "step top-1" in printed and "tuned the draft tree" in printed
    section = json.loads((out / "config.json").read_text())["drafter"]
    assert section["kind"] == "eagle3" and section["eagle"]["draft_vocab_size"] == 20
    assert section["eagle"]["num_layers"] == 2
    assert_decodes_as_the_base_with_drafts_taken(out, base_dir)


def assert_decodes_as_the_base_with_drafts_taken(out, base_dir):
    """The directory ``out`` holds ``base_dir``'s weights bit for bit and gives its greedy
    tokens on three cyclic prompts, in fewer passes than tokens; returns the loaded model."""
    import mlx_lm

    src, dst = mx.load(str(base_dir / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert src.keys() == dst.keys() and all(mx.array_equal(src[k], dst[k]).item() for k in src)
    model, tokenizer = load(str(out))
    base, _ = mlx_lm.load(str(base_dir))
    rng, passes, tokens = random.Random(5), 0, 0
    for _ in range(3):
        prompt = cycle_ids(rng, 4)
        got = list(stream_generate(model, tokenizer, prompt, max_tokens=24, tree_depth=3))
        want = plain_greedy(base, prompt, 24)
        if tokenizer.eos_token_id in want:
            want = want[: want.index(tokenizer.eos_token_id) + 1]
        assert [r.token for r in got] == want
        passes, tokens = passes + got[-1].forward_passes, tokens + len(got)
    assert passes < tokens, (passes, tokens)  # (drafts were taken)
    return model


def test_resume_continues_where_it_stopped(inputs, tmp_path, monkeypatch, capsys):
    base_dir, data_file = inputs
    from test_train import assert_resumes_as_straight

    def run(out, *extra):
        train_main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                    "--iters", "6", "--save-every", "2", "--no-tune", *CLI, *extra])  # fmt: skip

    other = (["--ttt-steps", "2"], "--ttt-steps 3, not 2")
    assert_resumes_as_straight(run, tmp_path, monkeypatch, capsys, other, "drafter.safetensors")


def test_bad_eagle_options_are_refused_by_name_before_anything_is_written(inputs, tmp_path):
    base_dir, data_file = inputs
    for flags, match in ((["--eagle-layers", "0", "1", "9"], r"--eagle-layers \[0, 1, 9\]"),
                         (["--ttt-steps", "0"], "--ttt-steps 0"),
                         (["--eagle-num-layers", "0"], "--eagle-num-layers 0")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            train_main(["--model", str(base_dir), "--data", str(data_file), "--out",
                        str(tmp_path / "out"), *flags, *CLI])  # fmt: skip
        assert not (tmp_path / "out").exists()


def test_windows_of_one_length_run_together_and_give_each_window_s_share():
    """A batch of windows of two lengths: its loss is the sum of each window's share
    (computed alone, with the batch's normalizers), as ``--grad-checkpoint`` needs;
    control: with another batch's normalizers the shares add up to another loss."""
    model = tiny_model("llama", V, weight_scale=1.0)
    attach_eagle_for_training(model)
    assert_window_shares_add_up(EagleLoss(model, 3))


def assert_window_shares_add_up(loss) -> None:
    """A batch of windows of two lengths: ``loss`` of it is the sum of each window's
    share (computed alone, with the batch's normalizers); control: with another
    batch's normalizers the shares add up to another loss."""
    batch = cycle_examples(2, seed=4)[:5] + [dict(input_ids=cycle_ids(random.Random(9), 12),
                                                  prompt_len=3)]  # fmt: skip
    assert len({len(ex["input_ids"]) for ex in batch}) == 2
    whole, metrics = loss(batch)
    norm = loss.normalizers(batch)
    shares = sum(loss([ex], norm)[0] for ex in batch)
    np.testing.assert_allclose(whole.item(), shares.item(), rtol=1e-5)
    assert sum(metrics["counts"]) == sum(norm[0])
    other = loss.normalizers(batch[:2])
    assert not np.isclose(sum(loss([ex], other)[0] for ex in batch).item(), whole.item(), rtol=1e-3)

"""Dynamic trees grown by a checkpoint's MTP layer (``dynamic_tree=True``, EAGLE-2's trees
on the layer: :meth:`~mlx_specstream.mtp.MTPDrafter.draft_tree`): each node's children
are the layer's own top-k after that node's path, computed from scratch from the raw
tensors; greedy output equals plain decoding; drawn trees keep the distribution when
sampling; where the layer cannot grow one, the reason is given."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import spec_tokens
from mlx_lm.generate import generate_step
from mlx_lm.utils import load as mlx_lm_load
from test_dynamic_tree import (
    assert_drawn_trees_keep_the_distribution,
    assert_grown_children,
    log_softmax,
)
from test_mtp import ARGS, CHAINS, reference_levels, write_checkpoint

import mlx_specstream.decode as decode
import mlx_specstream.dynamic_tree as dynamic_tree
import mlx_specstream.mtp as mtp
from mlx_specstream import load
from mlx_specstream.model_parts import no_positions

TREE = dict(tree_top_k=3, tree_depth=3, max_tree_nodes=10, dynamic_tree=True)
PROMPT = [4, 8, 15, 16, 23]
SPARSE = ("deepseek_v32", "glm_moe_dsa")  # (an indexer picks each row's keys)
GROWING = [a for a in sorted(ARGS) if a not in CHAINS and a not in SPARSE]


def recorded_trees(model, monkeypatch, max_tokens=24, **tree):
    """The greedy text and, for each grown tree, its candidates (tokens, parents,
    scores), the last row ``a`` of the context the layer's cache held and the root."""
    seen, real = [], mtp.MTPDrafter.draft_tree

    def recording(self, rt, state, hidden, path, path_tokens, token, k, depth, drawn=None):
        cands = real(self, rt, state, hidden, path, path_tokens, token, k, depth, drawn)
        seen.append(([np.array(c) for c in cands], state.offset - 1, token))
        return cands

    monkeypatch.setattr(mtp.MTPDrafter, "draft_tree", recording)
    toks, _ = spec_tokens(model, PROMPT, max_tokens, **tree)
    monkeypatch.undo()
    return PROMPT + toks, seen


def assert_children_are_the_layer_s(plain, ref, text, seen, k, **control):
    """Every expanded candidate's children are the layer's top-``k`` recomputed from
    scratch (:func:`~test_mtp.reference_levels`) over the context and that candidate's
    path, scored by the path's log-probabilities. Returns how many nodes were checked."""
    checked = 0
    for (tokens, parents, scores), a, root in seen:
        assert text[a + 1] == root  # (the cache holds rows 0..a; the root is token a + 1)

        def after(path):
            logits = reference_levels(plain, ref, text, a, None, path=path, **control)[-1]
            return log_softmax(logits)

        checked += assert_grown_children(tokens, parents, scores, k, after)
    return checked


def full_trees(seen, k=3, depth=3):
    return [s for s in seen if len(s[0][0]) == 1 + k + (depth - 1) * k * k]


@pytest.mark.parametrize(
    "arch,own_head",
    [("mimo", False), ("deepseek_v3", False), ("glm4_moe", True), ("step3p5", True)]
    + [("mimo_v2_flash", False), ("exaone_moe", False), ("ernie4_5_moe", False)],
)
def test_each_node_s_children_are_the_layer_s_top_k_after_its_path(arch, own_head, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    """At every step each expanded node's children and scores equal the MTP layer's
    top-k recomputed from the checkpoint's raw tensors along that node's path: the layer
    again on its own output at each deeper position, each row seeing the context and its
    own ancestors (a window layer: its last ``window`` keys). Controls: the rows one
    position later (where the layer applies positions); every tree row seeing every
    other; a window layer seeing every key."""
    ref = write_checkpoint(tmp_path / "ckpt", arch, own_head=own_head)
    model, _ = load(str(tmp_path / "ckpt"))
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    text, seen = recorded_trees(model, monkeypatch, **TREE)
    want = [t for (t, _), _ in zip(generate_step(mx.array(PROMPT), plain), range(24))]
    assert text[len(PROMPT) :] == want
    full = full_trees(seen)
    assert len(full) >= 4
    if arch in ("step3p5", "mimo_v2_flash"):  # (steps past the window's first slide)
        full = [s for s in full if s[1] + 3 > ref["window"] + 2] + full[:1]
    assert assert_children_are_the_layer_s(plain, ref, text, full[:4], 3) >= 4 * 7

    controls = {"all rows": lambda r, p, k: mx.ones(real_mask(r, p, k).shape, dtype=mx.bool_)}
    real_mask, real_rows = dynamic_tree.expand_mask, mtp.MTPDrafter.rows_at
    if not no_positions(model.speculative_streams.drafter.layer):
        controls["one later"] = lambda self, rt, h, t, cache, at: real_rows(
            self, rt, h, t, cache, (at[0] + 1, at[1])
        )
    if ref["window"]:

        def no_window(self, rt, h, t, cache, at):
            self._window, window = None, self._window
            try:
                return real_rows(self, rt, h, t, cache, at)
            finally:
                self._window = window

        controls["no window"] = no_window
    for name, wrong in controls.items():
        owner = dynamic_tree if name == "all rows" else mtp.MTPDrafter
        monkeypatch.setattr(owner, "expand_mask" if name == "all rows" else "rows_at", wrong)
        text2, bad = recorded_trees(model, monkeypatch, **TREE)
        bad = full_trees(bad)
        if name == "no window":
            bad = [s for s in bad if s[1] + 3 > ref["window"] + 2]
        with pytest.raises(AssertionError):
            assert_children_are_the_layer_s(plain, ref, text2, bad[:3], 3)


@pytest.mark.parametrize("arch", GROWING)
def test_greedy_equals_plain_decoding(arch, tmp_path):
    """Grown trees of two shapes, on every family whose MTP layer grows them: mlx-lm's
    tokens; the layer's tree is grown (not its static one) and takes more than one token
    a pass somewhere."""
    write_checkpoint(tmp_path / "ckpt", arch, seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    for prompt, tree in [([3], TREE), ([1, 5, 9, 3, 7, 2, 11], dict(TREE, tree_top_k=2))]:
        want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(40))]
        got, out = spec_tokens(model, prompt, 40, **tree)
        assert got == want, tree
    assert model.speculative_streams.drafter.growth_refusal() is None


def test_prompt_lookup_merged_in_and_a_reused_prompt_cache(tmp_path, monkeypatch):
    """``draft="streams+ngram"`` merges the lookup chain into the grown tree; turn after
    turn on one prompt cache (the layer's rows kept with it) the answers equal mlx-lm's
    with its own cache, the trees grown at every turn that speculates."""
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    from mlx_specstream.cache import make_prompt_cache

    write_checkpoint(tmp_path / "ckpt", "deepseek_v3", seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    ours, theirs = make_prompt_cache(model), mlx_lm_cache(plain)
    grew, real = [], mtp.MTPDrafter.draft_tree
    monkeypatch.setattr(mtp.MTPDrafter, "draft_tree",
                        lambda *a, **k: grew.append(1) or real(*a, **k))  # fmt: skip
    for prompt, n, kw in [([3, 1, 4, 1, 5], 20, {}), ([3, 1, 4, 1], 16, dict(draft="streams+ngram")),
                          ([2, 7], 12, dict(speculative=False)), ([1], 16, {})]:  # fmt: skip
        grew.clear()
        ref = [int(t) for t, _ in generate_step(mx.array(prompt), plain, max_tokens=n,
                                                prompt_cache=theirs)]  # fmt: skip
        got, _ = spec_tokens(model, prompt, n, prompt_cache=ours, **TREE, **kw)
        assert got == ref, kw
        assert bool(grew) == (kw.get("speculative") is not False), kw
        assert ours[0].offset == theirs[0].offset


def test_negative_control_drafts_accepted_unchecked_break_equality(tmp_path, monkeypatch):
    """Accepting the grown tree's last node (and its path) unchecked changes the output:
    the equality above can fail."""
    write_checkpoint(tmp_path / "ckpt", "mimo", seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    good, _ = spec_tokens(model, [1, 5, 9], 30, **TREE)

    def accept_all(tokens, parents, ancestors, targets, depth):
        return None, mx.array(tokens.shape[0] - 1)

    monkeypatch.setattr(decode, "_accept", accept_all)
    bad, _ = spec_tokens(model, [1, 5, 9], 30, **TREE)
    assert bad != good


def test_static_trees_by_default_and_grown_where_asked_or_stored(tmp_path, monkeypatch):
    """An MTP layer fills its static tree unless the call (or the model's config, as
    ``tune --save`` stores it) asks for a grown one; ``dynamic_tree=False`` wins over a
    config's ``true``."""
    write_checkpoint(tmp_path / "ckpt", "mimo", seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    grown = []
    real = mtp.MTPDrafter.draft_tree
    monkeypatch.setattr(mtp.MTPDrafter, "draft_tree",
                        lambda *a, **k: grown.append(1) or real(*a, **k))  # fmt: skip
    tree = {k: v for k, v in TREE.items() if k != "dynamic_tree"}
    spec_tokens(model, PROMPT, 12, **tree)
    assert not grown
    spec_tokens(model, PROMPT, 12, **tree, dynamic_tree=True)
    assert grown
    rt = model.speculative_streams
    rt.config = type(rt.config)(**{**rt.config.__dict__, "dynamic_tree": True})
    grown.clear()
    spec_tokens(model, PROMPT, 12, **tree)
    assert grown
    grown.clear()
    spec_tokens(model, PROMPT, 12, **tree, dynamic_tree=False)
    assert not grown


@pytest.mark.parametrize("arch", SPARSE)
def test_sparse_attention_layers_are_refused_with_the_reason(arch, tmp_path):
    write_checkpoint(tmp_path / "ckpt", arch, seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="sparse attention"):
        spec_tokens(model, PROMPT, 8, **TREE)
    got, _ = spec_tokens(model, PROMPT, 8, **dict(TREE, dynamic_tree=False))  # (static: works)
    assert len(got) == 8


def test_several_layers_are_refused_with_the_reason(tmp_path):
    """Three MTP layers draft one level each: a grown tree (one layer run again) is
    refused, naming ``num_mtp_layers=1``; with one of them it grows, as mlx-lm decodes."""
    write_checkpoint(tmp_path / "ckpt", "step3p5", own_head=True, depths=3)
    model, _ = load(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="num_mtp_layers=1"):
        spec_tokens(model, PROMPT, 8, **TREE)
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    want = [t for (t, _), _ in zip(generate_step(mx.array(PROMPT), plain), range(16))]
    model.speculative_streams.drafter.use_layers(1)
    got, _ = spec_tokens(model, PROMPT, 16, **TREE)
    assert got == want


def test_sampling_keeps_the_distribution(tmp_path, monkeypatch):
    """Recursive rejection over the layer's drawn trees (each node's children drawn from
    the layer's distribution after that node's path) samples the model's distribution
    (chi-square); control: every node verified against the root's distribution."""
    from test_sampling import exact_distribution

    from mlx_specstream.sample_utils import make_sampler

    # (of seeds 0-3 at base weight scales 1 and 2, seed 2 at 2 shows the control's bias
    # most: p 3.5e-36 at 800 draws; at scale 1 every seed's stays above 1e-6)
    write_checkpoint(tmp_path / "ckpt", "mimo", seed=2, vocab_size=6, weight_scale=2.0,
                     num_hidden_layers=2)  # fmt: skip
    model, _ = load(str(tmp_path / "ckpt"))
    sampler = make_sampler(temp=1.0)
    tree = dict(tree_top_k=2, tree_depth=2, max_tree_nodes=5, dynamic_tree=True)
    exact = exact_distribution(model, sampler)
    assert_drawn_trees_keep_the_distribution(model, sampler, exact, tree, monkeypatch)


def test_the_tuner_tries_grown_trees_on_its_fastest_and_stores_the_choice(tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """On a directory with one MTP layer the tuner's grid fills static trees, then grows
    its three fastest wide ones; the fastest (a fake measure: grown top-3 trees) is stored
    for this device, ``dynamic_tree`` with it, and the next load grows its trees."""
    import json

    from test_mtp import tune_with_fake_timings

    from mlx_specstream.precision import device_key

    def speed(s):  # (grown top-3 trees fastest)
        k, grown = s["tree_top_k"], s.get("dynamic_tree")
        return 100.0 + 10 * s["tree_depth"] + 5 * k + (300 if grown and k == 3 else 0)

    write_checkpoint(tmp_path / "ckpt", "mimo", seed=3)
    tried = tune_with_fake_timings(tmp_path / "ckpt", tmp_path / "dir", speed, monkeypatch)
    trees = [s for s in tried if "tree_depth" in s and s.get("draft") == "streams"]
    wide = [s for s in trees if s["tree_top_k"] > 1]
    grid = [s for s in wide if s["dynamic_tree"] is False]
    grown = [s for s in wide if s["dynamic_tree"] is True]
    assert len(grid) > 3 and wide[: len(grid)] == grid  # (the grid first, every tree static)
    assert len(grown) == 3 and all(dict(s, dynamic_tree=False) in grid for s in grown)
    tuned = json.loads((tmp_path / "dir" / "config.json").read_text())["drafter"]["tuned"]
    assert tuned[device_key()]["dynamic_tree"] is True and tuned[device_key()]["top_k"] == 3
    model, _ = load(str(tmp_path / "dir"))
    assert model.speculative_streams.config.dynamic_tree is True
    grew = []
    real = mtp.MTPDrafter.draft_tree
    monkeypatch.setattr(mtp.MTPDrafter, "draft_tree",
                        lambda *a, **k: grew.append(1) or real(*a, **k))  # fmt: skip
    spec_tokens(model, PROMPT, 8)
    assert grew


def test_the_benchmark_times_the_layer_s_default_tree_static_and_grown(tmp_path, monkeypatch):
    """``mlx_specstream.benchmark`` on a checkpoint whose MTP layer grows trees where asked:
    the default tree's row static (whatever a tuning stored), and a row of it grown."""
    import json

    from helpers import benchmark_settings

    from mlx_specstream import benchmark

    write_checkpoint(tmp_path / "ckpt", "mimo", seed=3)
    (tmp_path / "ckpt" / "prompts.jsonl").write_text(json.dumps({"prompt": "t1 t5 t9 t3"}) + "\n")
    settings = benchmark_settings(monkeypatch)
    benchmark.main(["--model", str(tmp_path / "ckpt"), "--num-prompts", "1", "--max-tokens", "8",
                    "--runs", "1", "--sampling-temps", "--output-dir", str(tmp_path / "out"),
                    "--name", "t"])  # fmt: skip
    summary = (tmp_path / "out" / "t.md").read_text()
    assert benchmark.DEFAULT_TREE in summary and benchmark.DEFAULT_GROWN in summary
    trees = [s for s in settings if s.get("max_tree_nodes") == 16]
    assert {s.get("dynamic_tree") for s in trees} == {False, True}
    assert all(s["tree_top_k"] == 3 and s["tree_depth"] == 3 for s in trees)

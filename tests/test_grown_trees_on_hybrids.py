"""Dynamic trees grown by a checkpoint's MTP layer on hybrid models (Qwen3-Next, Qwen3.5,
Nemotron 3, Ling 2.5/3: :meth:`~mlx_specstream.recurrent.DrafterChains.grown_drafts`),
verified through the model's own passes: each node's children are the layer's top-k
after that node's path, recomputed from the raw tensors; a tree's accepted path gives the
layer its nodes' states; greedy output equals mlx-lm's; drawn trees keep the
distribution; the config's choice (a tuning's) is honoured; what grows no tree is refused
with the reason."""

from dataclasses import replace

import mlx.core as mx
import pytest
from helpers import tiny_hybrid
from mlx_lm.utils import load as mlx_lm_load
from test_drafter_chains import PROMPTS, plain, run
from test_mtp import HYBRIDS, write_checkpoint
from test_mtp_trees import PROMPT, TREE, assert_children_are_the_layer_s, recorded_trees

import mlx_specstream.dynamic_tree as dynamic_tree
import mlx_specstream.mtp as mtp
import mlx_specstream.recurrent as recurrent
from mlx_specstream import load
from mlx_specstream.config import DrafterConfig
from mlx_specstream.drafters import attach_drafter
from mlx_specstream.model_parts import ropes_of

FAMILIES = (*HYBRIDS, "nemotron_h", "bailing_hybrid", "bailing_moe_v3")


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5", "nemotron_h", "bailing_hybrid"])
def test_each_node_s_children_are_the_layer_s_top_k_after_its_path(arch, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    """Every step's grown candidates equal the MTP layer's top-3 recomputed from scratch
    along each node's path (the layer again on its own output at each deeper position,
    each row seeing the context and its own ancestors). Controls: every tree row seeing
    every other; the rows one position later (where the layer applies positions:
    Nemotron-H's attention has no RoPE)."""
    ref = write_checkpoint(tmp_path / "ckpt", arch)
    model, _ = load(str(tmp_path / "ckpt"))
    base, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    text, seen = recorded_trees(model, monkeypatch, **TREE)
    assert text[len(PROMPT) :] == plain(base, PROMPT, 24)
    assert len(seen) >= 4 and all(len(s[0][0]) == 1 + 3 + 2 * 9 for s in seen[:4])
    assert assert_children_are_the_layer_s(base, ref, text, seen[:4], 3) >= 4 * 7

    real_mask, real_rows = dynamic_tree.expand_mask, mtp.MTPDrafter.rows_at
    controls = {"all rows": lambda r, p, k: mx.ones(real_mask(r, p, k).shape, dtype=mx.bool_)}
    if ropes_of(model.speculative_streams.drafter.layer):
        controls["one later"] = lambda self, rt, h, t, cache, at: real_rows(
            self, rt, h, t, cache, (at[0] + 1, at[1])
        )
    for name, wrong in controls.items():
        owner = dynamic_tree if name == "all rows" else mtp.MTPDrafter
        monkeypatch.setattr(owner, "expand_mask" if name == "all rows" else "rows_at", wrong)
        text2, bad = recorded_trees(model, monkeypatch, **TREE)
        with pytest.raises(AssertionError):
            assert_children_are_the_layer_s(base, ref, text2, bad[:3], 3)


def right_path_second(text, cut):
    """``DrafterChains.grown_drafts`` run as it is (the layer grows its tree from its rows),
    its tree then replaced by a wrong first child and, beside it, the right path of the
    text (``cut``: its last token wrong, so the caches roll back)."""
    real = recurrent.DrafterChains.grown_drafts

    def oracle(self, n):
        tokens, parents = real(self, n)
        right = text[len(self.tokens) : len(self.tokens) + len(set(parents)) - 1][:n]
        if not tokens or len(right) < 2:
            return tokens, parents
        if cut:
            right[-1] = (right[-1] + 1) % self.vocab
        tokens = [(right[0] + 1) % self.vocab] + right
        return tokens, [-1, 0, 0] + list(range(2, len(right) + 1))

    return oracle


@pytest.mark.parametrize("arch", ["qwen3_5", "nemotron_h"])
@pytest.mark.parametrize("cut", [False, True])
def test_a_tree_s_accepted_path_gives_the_layer_its_nodes_states(arch, cut, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    """Each pass verifies a tree whose second branch is the right path (whole, or with a
    wrong last token: the caches roll back and the accepted tokens are fed again): output
    equals mlx-lm's, and the trees the layer grows at the next steps equal the
    from-scratch computation, so it got the accepted nodes' states. Control: the first
    branch's states instead."""
    ref = write_checkpoint(tmp_path / "ckpt", arch)
    model, _ = load(str(tmp_path / "ckpt"))
    base, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    text = PROMPT + plain(base, PROMPT, 40)
    paths, real_accepted = [], recurrent.DrafterChains.accepted_path
    monkeypatch.setattr(recurrent.DrafterChains, "grown_drafts", right_path_second(text, cut))
    monkeypatch.setattr(recurrent.DrafterChains, "accepted_path",
                        lambda self, path: paths.append(path) or real_accepted(self, path))  # fmt: skip
    got, seen = recorded_trees(model, monkeypatch, max_tokens=24, **TREE)
    assert got == text[: len(got)]
    taken = [p for p in paths if len(p) > 1]
    assert len(taken) >= 4 and all(p[1] == 2 for p in taken)  # (the second branch)
    assert all(len(p) == (3 if cut else 4) for p in taken[:4])
    assert assert_children_are_the_layer_s(base, ref, text, seen[1:4], 3) >= 3 * 7

    monkeypatch.setattr(recurrent.DrafterChains, "grown_drafts", right_path_second(text, cut))
    monkeypatch.setattr(recurrent.DrafterChains, "accepted_path",
                        lambda self, path: real_accepted(self, list(range(len(path)))))  # fmt: skip
    got, seen = recorded_trees(model, monkeypatch, max_tokens=24, **TREE)
    with pytest.raises(AssertionError):
        assert_children_are_the_layer_s(base, ref, got, seen[1:4], 3)


def test_greedy_equals_mlx_lm_on_every_hybrid_family(tmp_path, monkeypatch):
    """Grown top-2 trees (8 nodes) and top-3 trees (10 nodes, 3 deep) on Qwen3-Next,
    Qwen3.5 (dense and experts), Nemotron 3 and Ling 2.5/3, prompts fed in chunks of 4:
    mlx-lm's tokens; the trees verified are grown ones (the layer's ``draft_tree``), not
    the static tree of its levels."""
    grown, real = [], mtp.MTPDrafter.draft_tree
    monkeypatch.setattr(mtp.MTPDrafter, "draft_tree",
                        lambda self, *a: grown.append(a) or real(self, *a))  # fmt: skip
    for arch in FAMILIES:
        write_checkpoint(tmp_path / arch, arch, seed=3)
        model, _ = load(str(tmp_path / arch))
        base, _ = mlx_lm_load(str(tmp_path / arch))
        for prompt, tree in zip(PROMPTS, [dict(tree_top_k=2, max_tree_nodes=8), TREE, TREE]):
            grown.clear()
            tree = dict(tree, dynamic_tree=True)
            got, out = run(model, prompt, 24, prefill_step_size=4, **tree)
            assert got == plain(base, prompt, 24, prefill_step_size=4), (arch, prompt)
            assert len(grown) >= out[-1][3] - 2, arch  # (every pass but the first, the last)


def test_negative_control_a_walk_down_the_first_path_is_caught(tmp_path, monkeypatch):
    """A verifier that accepts each grown tree's first child unchecked breaks equality."""
    write_checkpoint(tmp_path / "ckpt", "qwen3_5", seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    base, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    real = recurrent.verify_tree

    def lenient(logits, drafts, parents, history, sampler, processors, q=None, q_rows=None):
        path, new, logprobs = real(logits, drafts, parents, history, sampler, processors)
        if len(path) == 1 and len(parents) > 1:
            path, new = [0, 1], [drafts[0], int(mx.argmax(logprobs[0]).item())]
            logprobs = mx.concatenate([logprobs, logprobs])
        return path, new, logprobs

    monkeypatch.setattr(recurrent, "verify_tree", lenient)
    got, _ = run(model, PROMPTS[1], 24, **TREE)
    assert got != plain(base, PROMPTS[1], 24)


def test_sampling_keeps_the_distribution(tmp_path, monkeypatch):
    """Recursive rejection over the layer's drawn trees on a hybrid (each node's children
    drawn from the layer's distribution after that node's path, verified against that
    node's own distribution: :func:`~mlx_specstream.recurrent.verify_tree`'s ``q_rows``)
    samples the model's distribution (chi-square); control: every node verified against
    the root's distribution."""
    from test_dynamic_tree import assert_drawn_trees_keep_the_distribution
    from test_sampling import exact_distribution

    from mlx_specstream.sample_utils import make_sampler

    write_checkpoint(tmp_path / "ckpt", "qwen3_5", seed=2, vocab_size=6, weight_scale=2.0,
                     num_hidden_layers=2, full_attention_interval=2)  # fmt: skip
    model, _ = load(str(tmp_path / "ckpt"))
    sampler = make_sampler(temp=1.0)
    tree = dict(tree_top_k=2, tree_depth=2, max_tree_nodes=5, dynamic_tree=True)
    exact = exact_distribution(model, sampler)
    assert_drawn_trees_keep_the_distribution(model, sampler, exact, tree, monkeypatch,
                                             module=recurrent)  # fmt: skip


def test_the_config_s_choice_is_honoured_and_refusals_name_the_reason(tmp_path, monkeypatch):
    """A config that stores ``dynamic_tree: true`` (a tuning's) grows trees on a hybrid;
    ``dynamic_tree=False`` the static tree of its levels (the same tokens). Refused with
    the reason: a chain asked for (``num_draft_tokens``) and a grown tree, Medusa heads
    (static levels), prompt lookup alone."""
    write_checkpoint(tmp_path / "ckpt", "qwen3_5", seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    base, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    rt = model.speculative_streams  # (as tune --save stores it for this device)
    rt.config = replace(rt.config, top_k=2, max_tree_nodes=8, dynamic_tree=True)
    grown, real = [], mtp.MTPDrafter.draft_tree
    monkeypatch.setattr(mtp.MTPDrafter, "draft_tree",
                        lambda self, *a: grown.append(a) or real(self, *a))  # fmt: skip
    want = plain(base, PROMPTS[1], 16)
    assert run(model, PROMPTS[1], 16)[0] == want and grown
    grown.clear()
    assert run(model, PROMPTS[1], 16, dynamic_tree=False)[0] == want and not grown
    for kwargs in (dict(num_draft_tokens=2), dict(draft="ngram")):
        with pytest.raises(ValueError, match="a grown tree needs an attached drafter"):
            run(model, PROMPTS[1], 4, dynamic_tree=True, **kwargs)
    heads = tiny_hybrid("qwen3_5", vocab_size=16)
    attach_drafter(heads, DrafterConfig(kind="medusa", num_draft_tokens=3), seed=2)
    with pytest.raises(ValueError, match="medusa drafter fills static trees"):
        run(heads, PROMPTS[1], 4, tree_top_k=2, dynamic_tree=True)

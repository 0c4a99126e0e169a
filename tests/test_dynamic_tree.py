"""Dynamic draft trees (EAGLE-2's, mlx_specstream.dynamic_tree) for EAGLE-3 drafters:
golden selections and masks, every node's children recomputed from the raw tensors
along that node's own path, greedy output equal to mlx-lm's, sampling that keeps the
distribution, and the settings' refusals."""

import doctest

import mlx.core as mx
import numpy as np
import pytest
from eagle_helpers import reference_levels, write_base, write_eagle
from helpers import plain_greedy, spec_tokens
from mlx_lm import load as mlx_lm_load

import mlx_specstream.decode as decode
import mlx_specstream.dynamic_tree as dynamic_tree
from mlx_specstream import eagle, load
from mlx_specstream.dynamic_tree import expand_mask, select_nodes
from mlx_specstream.tree import path_to, tree_depths

V = 64
PROMPT = [4, 8, 15, 16, 23]
LAYERS = [0, 3, 6]


def test_the_docstrings_examples_hold():
    result = doctest.testmod(dynamic_tree)
    assert result.attempted >= 4 and result.failed == 0


def test_select_nodes_keeps_the_best_paths_depth_first():
    """Golden trees: the cap, ties to the shallower then earlier candidate, ``-inf``
    dropped, the best child first. Candidates: 1, 2 under the root; 3, 4 under 1; 5
    under 2; 6 under 3."""
    tokens = [-1, 10, 20, 30, 40, 50, 60]
    parents = [-1, 0, 0, 1, 1, 2, 3]
    scores = [0.0, -0.1, -0.4, -0.4, -0.3, -float("inf"), -0.9]
    t = select_nodes(9, tokens, parents, scores, 7)  # (all finite ones: 6 nodes)
    assert (t.tokens, t.parents) == ([9, 10, 40, 30, 60, 20], [-1, 0, 1, 1, 3, 0])
    t = select_nodes(9, tokens, parents, scores, 4)  # 1, 4, then 2 and 3 tie: 2 is shallower
    assert (t.tokens, t.parents) == ([9, 10, 40, 20], [-1, 0, 1, 0])
    t = select_nodes(9, tokens, parents, scores, 1)
    assert (t.tokens, t.parents) == ([9], [-1])
    with pytest.raises(AssertionError, match="above its parent"):  # (control: a bad input)
        select_nodes(9, [-1, 1, 2], [-1, 0, 1], [0.0, -0.5, -0.1], 2)


def test_expand_mask_follows_each_row_s_ancestors():
    m2 = expand_mask(None, None, 3)
    m3 = expand_mask(m2, mx.array([2, 2, 0]), 3)
    m4 = expand_mask(m3, mx.array([1, 0, 0]), 3)
    want = np.zeros((3, 9), bool)
    want[:, 6:] = np.eye(3, dtype=bool)
    want[0, [2, 4]] = True  # (row 1 of level 3: under row 2 of level 2)
    want[1, [2, 3]] = want[2, [2, 3]] = True  # (row 0 of level 3: under row 2)
    assert (np.array(m4) == want).all()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("dynamic") / "base", V)


@pytest.fixture(scope="module")
def checkpoint(base_dir):
    return write_eagle(base_dir.parent / "eagle", V, layer_ids=LAYERS,
                       draft_vocab=list(range(0, V, 2)) + [V - 1])  # fmt: skip


def recorded_candidates(model, monkeypatch, prompt, max_tokens=24, **tree):
    """The greedy text and, for each step's dynamic tree, its candidates (tokens,
    parents, scores), the last row ``a`` of the accepted text and the bonus token."""
    seen, real = [], eagle.Eagle3Drafter.draft_tree

    def recording(self, rt, state, hidden, path, path_tokens, token, k, depth, drawn=None):
        cands = real(self, rt, state, hidden, path, path_tokens, token, k, depth, drawn)
        a = rt._tree[4] + len(path) - 1
        seen.append(([np.array(c) for c in cands], a, token))
        return cands

    monkeypatch.setattr(eagle.Eagle3Drafter, "draft_tree", recording)
    toks, _ = spec_tokens(model, prompt, max_tokens, **tree)
    monkeypatch.undo()
    return prompt + toks, seen


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def assert_children_from_their_own_paths(plain, ref, text, seen, k, shift=0):
    """Every expanded candidate's children are the top-``k`` of the drafter's levels
    recomputed from the raw tensors along that candidate's own path (positions one
    later with ``shift``), scored by their path's log-probabilities."""
    checked = 0
    for (tokens, parents, scores), a, token in seen:
        if a + 1 >= len(text):
            continue

        def after(path):
            wide = reference_levels(plain, ref, text, a, len(path) + 1, LAYERS, path=path,
                                    shift=shift)  # fmt: skip
            return log_softmax(wide[-1])

        checked += assert_grown_children(tokens, parents, scores, k, after)
    return checked


def assert_grown_children(tokens, parents, scores, k, after):
    """One grown tree's candidates (``tokens``, ``parents``, ``scores``): every expanded
    candidate's children are the top-``k`` of ``after(path)``, the log-probabilities
    after its path (its tokens below the root), each scored by its parent's score plus
    its log-probability. Returns how many candidates were expanded."""
    kids = {}
    for c in range(1, len(parents)):
        kids.setdefault(int(parents[c]), []).append(c)
    for node, children in kids.items():
        lp = after([int(tokens[n]) for n in path_to(node, [int(p) for p in parents])[1:]])
        want = np.argsort(-lp, kind="stable")[:k]
        assert sorted(int(tokens[c]) for c in children) == sorted(want.tolist()), node
        for c in children:
            np.testing.assert_allclose(scores[c], scores[node] + min(lp[tokens[c]], 0.0),
                                       atol=2e-4)  # fmt: skip
    return len(kids)


def test_each_node_s_children_are_drafted_from_its_own_path(base_dir, checkpoint, monkeypatch):
    """At each step, every expanded node's children and scores equal the drafter's top-k
    recomputed from scratch (mlx-lm's base layers, the checkpoint's raw tensors) along
    that node's path: its tokens at positions ``a + 1, a + 2, ...``, each row seeing
    the context and its own ancestors only. Controls: the rows one position later; a
    mask that lets every tree row see every other (the recorded drafts then differ)."""
    model, _ = load(str(base_dir), drafter=str(base_dir.parent / "eagle"))
    plain, _ = mlx_lm_load(str(base_dir))
    tree = dict(tree_top_k=3, tree_depth=3, max_tree_nodes=10)
    text, seen = recorded_candidates(model, monkeypatch, PROMPT, **tree)
    assert text == PROMPT + plain_greedy(plain, PROMPT, 24)
    assert all(len(s[0][0]) == 1 + 3 + 2 * 9 for s in seen[:4])  # (later: near max_tokens)
    checked = assert_children_from_their_own_paths(plain, checkpoint, text, seen[:4], 3)
    assert checked >= 4 * 7  # (the root, 3 nodes of level 1, 3 of level 2: each step)
    with pytest.raises(AssertionError):
        assert_children_from_their_own_paths(plain, checkpoint, text, seen[:2], 3, shift=1)

    def every_row(rows_mask, parent_rows, k):
        m = expand_mask(rows_mask, parent_rows, k)
        return mx.ones(m.shape, dtype=mx.bool_)

    monkeypatch.setattr(dynamic_tree, "expand_mask", every_row)
    text2, wrong = recorded_candidates(model, monkeypatch, PROMPT, **tree)
    with pytest.raises(AssertionError):
        assert_children_from_their_own_paths(plain, checkpoint, text2, wrong[:2], 3)


def test_a_drafter_of_several_qwen3_layers_grows_each_node_from_its_own_path(base_dir, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    """The speculators' later layout (two Qwen3 layers with biases, the final norm's
    output passed on): every level of the tree runs both layers at its nodes (each layer
    on its own cache), and every expanded node's children equal the drafter from scratch
    along its path; control: the rows one position later."""
    ref = write_eagle(tmp_path / "eagle", V, style="speculators", layer_ids=LAYERS, num_layers=2,
                      layer_type="qwen3", attention_bias=True, norm_output=True)  # fmt: skip
    model, _ = load(str(base_dir), drafter=str(tmp_path / "eagle"))
    plain, _ = mlx_lm_load(str(base_dir))
    tree = dict(tree_top_k=2, tree_depth=3, max_tree_nodes=8)
    text, seen = recorded_candidates(model, monkeypatch, PROMPT, max_tokens=12, **tree)
    assert text == PROMPT + plain_greedy(plain, PROMPT, 12)
    assert assert_children_from_their_own_paths(plain, ref, text, seen[:3], 2) >= 3 * 4
    with pytest.raises(AssertionError):
        assert_children_from_their_own_paths(plain, ref, text, seen[:2], 2, shift=1)


def test_a_dynamic_chain_drafts_what_the_static_chain_drafts(base_dir, checkpoint, monkeypatch):
    """With ``top_k = 1`` the dynamic tree is the argmax chain: the same tokens as the
    drafter's levels (control: another drafter's chain differs)."""
    model, _ = load(str(base_dir), drafter=str(base_dir.parent / "eagle"))
    rt = model.speculative_streams
    state = rt.drafter.start(0)
    feats = mx.random.normal((len(PROMPT), rt.drafter.fc.weight.shape[1]))
    levels = rt.drafter.draft(rt, state, feats, list(range(len(PROMPT))), PROMPT, 7, levels=4)
    chain = [int(t) for t in mx.argmax(levels, axis=-1).tolist()]
    state.trim_to(0)
    cands = rt.drafter.draft_tree(rt, state, feats, list(range(len(PROMPT))), PROMPT, 7, 1, 4)
    tree = dynamic_tree.draft_tree(cands, 7, 5)
    assert tree.parents == [-1, 0, 1, 2, 3] and tree.tokens == [7] + chain
    assert state.offset == len(PROMPT)  # (the tree's rows trimmed)
    state.trim_to(0)
    other = rt.drafter.draft_tree(rt, state, feats * 3, list(range(len(PROMPT))), PROMPT, 7, 1, 4)
    assert dynamic_tree.draft_tree(other, 7, 5).tokens != tree.tokens


@pytest.mark.parametrize("tree", [dict(tree_top_k=2, tree_depth=4, max_tree_nodes=8),
                                  dict(tree_top_k=4, tree_depth=5, max_tree_nodes=16),
                                  dict(tree_top_k=3, tree_depth=2, max_tree_nodes=4)])  # fmt: skip
def test_greedy_equals_plain_decoding(base_dir, checkpoint, tree):
    model, _ = load(str(base_dir), drafter=str(base_dir.parent / "eagle"))
    plain, _ = mlx_lm_load(str(base_dir))
    for prompt in ([3], PROMPT):
        want = plain_greedy(plain, prompt, 40)
        got, _ = spec_tokens(model, prompt, 40, **tree)
        assert got == want, (tree, prompt)
    got, _ = spec_tokens(model, PROMPT, 40, draft="streams+ngram", **tree)
    assert got == plain_greedy(plain, PROMPT, 40)


def test_negative_control_a_wrong_verifier_is_caught(base_dir, checkpoint, monkeypatch):
    model, _ = load(str(base_dir), drafter=str(base_dir.parent / "eagle"))
    tree = dict(tree_top_k=2, tree_depth=4, max_tree_nodes=8)
    right, _ = spec_tokens(model, PROMPT, 30, **tree)

    def accept_all(tokens, parents, ancestors, targets, depth):
        return None, mx.array(tokens.shape[0] - 1)

    monkeypatch.setattr(decode, "_accept", accept_all)
    wrong, _ = spec_tokens(model, PROMPT, 30, **tree)
    assert wrong != right


def test_dynamic_trees_are_used_by_default_and_can_be_turned_off(base_dir, checkpoint,
                                                                 monkeypatch):  # fmt: skip
    """Trees of ``top_k > 1`` are dynamic unless ``dynamic_tree=False`` (or the config's
    ``dynamic_tree: false``); chains are drafted as levels either way."""
    model, _ = load(str(base_dir), drafter=str(base_dir.parent / "eagle"))
    tree = dict(tree_top_k=2, tree_depth=3, max_tree_nodes=6)
    _, seen = recorded_candidates(model, monkeypatch, PROMPT, **tree)
    assert seen
    _, seen = recorded_candidates(model, monkeypatch, PROMPT, dynamic_tree=False, **tree)
    assert not seen
    _, seen = recorded_candidates(model, monkeypatch, PROMPT, tree_top_k=1, tree_depth=3)
    assert not seen
    model.speculative_streams.config.dynamic_tree = False
    _, seen = recorded_candidates(model, monkeypatch, PROMPT, **tree)
    assert not seen
    _, seen = recorded_candidates(model, monkeypatch, PROMPT, dynamic_tree=True, **tree)
    assert seen


def test_dynamic_trees_are_refused_where_a_drafter_cannot_grow_them(base_dir, checkpoint):
    from helpers import tiny_spec_model

    streams = tiny_spec_model("llama", vocab_size=V, num_streams=2, num_stream_layers=1)
    with pytest.raises(ValueError, match="dynamic_tree=True: .*speculative streams"):
        spec_tokens(streams, [1, 2], 4, dynamic_tree=True, tree_top_k=2)
    # (a draft model grows them: tests/test_draft_model_trees.py, also its refusals)
    with pytest.raises(ValueError, match="dynamic_tree='yes'"):
        spec_tokens(streams, [1, 2], 4, dynamic_tree="yes")


def assert_drawn_trees_keep_the_distribution(model, sampler, exact, tree, monkeypatch,
                                             n=1500, m=800, module=decode):  # fmt: skip
    """Recursive rejection over drawn dynamic trees (``tree``) samples ``exact``, the
    model's distribution under ``sampler`` (chi-square p > 1e-3 in ``n`` draws), some walk
    reading several nodes' rows; control: every node verified against the root's
    distribution (p < 1e-6 in ``m`` draws). ``module``: where the decoding loop calls
    ``accept_by_rejection`` (``recurrent`` on a hybrid). Returns each walk's ``(parents,
    rows)``."""
    from chi_square import chi_square_pvalue
    from test_sampling import sample_counts

    real_walk, walked = module.accept_by_rejection, []

    def recording(tokens, parents, target, q, uniforms, rows=None):
        walked.append((list(parents), rows))
        return real_walk(tokens, parents, target, q, uniforms, rows)

    def roots(tokens, parents, target, q, uniforms, rows=None):
        return real_walk(tokens, parents, target, q, uniforms, [0] * len(tokens))

    for walk, draws in ((recording, n), (roots, m)):
        with monkeypatch.context() as mp:
            mp.setattr(module, "accept_by_rejection", walk)
            counts = sample_counts(model, sampler, draws, acceptance="rejection", **tree)
        p = chi_square_pvalue(counts, exact, draws)
        if walk is recording:
            assert p > 1e-3, f"chi-square p = {p:.2e}"
            assert any(r is not None and max(r) > 1 for _, r in walked)  # (several nodes' rows)
        else:
            assert p < 1e-6, f"another node's distribution passed (p = {p:.2e}): no power"
    return walked


def test_sampling_keeps_the_distribution(tmp_path, monkeypatch):
    """Recursive rejection over drawn dynamic trees, and target sampling over dynamic
    trees, sample the base's distribution (chi-square). Controls: each node verified
    against the root's distribution instead of its own; a walk that takes a node's first
    child whatever the target is."""
    from chi_square import chi_square_pvalue
    from test_sampling import exact_distribution, sample_counts

    from mlx_specstream.sample_utils import make_sampler

    # (3 layers keep the draws cheap; of seeds 0-9, seed 8's shows both controls' biases
    # most: p 1e-82 and 3e-21; several seeds leave the first control above 1e-6)
    base = write_base(tmp_path / "base", 6, layers=3, seed=8, weight_scale=1.0)
    write_eagle(tmp_path / "eagle", 6, layer_ids=[0, 2, 3], scale=1.0, head_scale=4.0)
    model, _ = load(str(base), drafter=str(tmp_path / "eagle"))
    sampler, n = make_sampler(temp=1.0), 1500
    exact = exact_distribution(model, sampler)
    tree = dict(tree_top_k=2, tree_depth=2, max_tree_nodes=5, dynamic_tree=True)
    walked = assert_drawn_trees_keep_the_distribution(model, sampler, exact, tree, monkeypatch)
    grown = [rows for parents, rows in walked if rows is not None and len(parents) > 2]
    assert len(grown) > n // 2
    counts = sample_counts(model, sampler, n, acceptance="target-sample", **tree)
    p = chi_square_pvalue(counts, exact, n)
    assert p > 1e-3, f"chi-square p = {p:.2e}"
    real = decode._accept

    def first_child_taken(tokens, parents, ancestors, targets, depth):
        _, last = real(tokens, parents, ancestors, targets, depth)
        return None, mx.minimum(mx.maximum(last, 1), tokens.shape[0] - 1)  # (node 1 taken)

    monkeypatch.setattr(decode, "_accept", first_child_taken)
    m = 500  # (a gross bias: p = 0 in float64 at 1500 draws)
    p = chi_square_pvalue(sample_counts(model, sampler, m, acceptance="target-sample", **tree),
                          exact, m)  # fmt: skip
    assert p < 1e-6, f"a biased walk passed (p = {p:.2e}): no power"


def test_the_generate_command_takes_the_flag(base_dir, checkpoint, capsys, monkeypatch):
    """``--dynamic-tree`` / ``--no-dynamic-tree``: the same text, trees grown or not."""
    from mlx_specstream.generate import main

    grown, real = [], eagle.Eagle3Drafter.draft_tree

    def counted(self, *args):
        grown.append(1)
        return real(self, *args)

    monkeypatch.setattr(eagle.Eagle3Drafter, "draft_tree", counted)

    args = ["--model", str(base_dir), "--drafter", str(base_dir.parent / "eagle"), "--prompt",
            "w1 w2", "--max-tokens", "12", "--tree-top-k", "2", "--max-tree-nodes", "6",
            "--ignore-chat-template"]  # fmt: skip
    texts, counts = [], []
    for flag in ("--no-dynamic-tree", "--dynamic-tree"):
        main(args + [flag])
        texts.append(capsys.readouterr().out.split("==========")[1].strip())
        counts.append(len(grown))
    assert texts[0] and texts[0] == texts[1]
    assert counts[0] == 0 and counts[1] >= 5


def test_tree_depths_of_a_dynamic_tree_stay_within_its_depth(base_dir, checkpoint, monkeypatch):
    model, _ = load(str(base_dir), drafter=str(base_dir.parent / "eagle"))
    _, seen = recorded_candidates(model, monkeypatch, PROMPT, tree_top_k=3, tree_depth=2,
                                  max_tree_nodes=16)  # fmt: skip
    full = [s for s in seen if len(s[0][0]) == 1 + 3 + 9]  # (not near max_tokens: one level)
    assert len(full) >= 4
    for (tokens, parents, scores), _, token in full:
        tree = select_nodes(token, tokens.tolist(), parents.tolist(), scores.tolist(), 16)
        assert max(tree_depths(tree.parents)) == 2 and len(tree.tokens) == 1 + 3 + 9


@pytest.mark.parametrize("static_faster", [True, False])
def test_the_tuner_times_static_trees_too_and_stores_the_choice(static_faster, base_dir,
                                                                checkpoint, tmp_path,
                                                                monkeypatch):  # fmt: skip
    """Trees wider than a chain are timed grown (``dynamic_tree=True``), the three
    fastest again static; the faster way is stored for this device, and the saved
    directory then drafts that way there (another device: grown, the default)."""
    from test_tune import fake_speeds

    from mlx_specstream import tune
    from mlx_specstream.utils import save

    model, tok, config = load(str(base_dir), drafter=str(base_dir.parent / "eagle"),
                              return_config=True)  # fmt: skip

    def speed(tps, s):
        if s.get("draft", "streams") != "streams" or s.get("tree_top_k", 1) < 2:
            return 1.0
        return 1e6 if (s.get("dynamic_tree") is False) == static_faster else 1e5

    measured = fake_speeds(monkeypatch, speed)
    choice, _, _ = tune.tune(model, tok, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None)
    static = [m for m in measured if m.get("dynamic_tree") is False]
    assert all(m["tree_top_k"] > 1 for m in measured if "dynamic_tree" in m)
    assert len(static) == 3 if not static_faster else len(static) >= 3
    assert choice["dynamic_tree"] is (not static_faster) and choice["tree_top_k"] > 1
    path = save(tmp_path / "m", model, tok, config=config)
    entry = tune.save_choice(path, choice)
    assert entry["dynamic_tree"] is (not static_faster)
    monkeypatch.undo()
    loaded, _ = load(str(path))
    _, seen = recorded_candidates(loaded, monkeypatch, PROMPT, max_tokens=8)
    assert bool(seen) is (not static_faster)
    monkeypatch.setattr("mlx_specstream.utils.device_key", lambda: "gpu:elsewhere")
    loaded, _ = load(str(path))
    _, seen = recorded_candidates(loaded, monkeypatch, PROMPT, max_tokens=8,
                                  **{k: choice[k] for k in ("tree_top_k", "max_tree_nodes")})  # fmt: skip
    assert seen

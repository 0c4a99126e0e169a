"""Attached drafters on models with recurrent layers (recurrent.DrafterChains): a
checkpoint's MTP layer (Qwen3-Next, Qwen3.5), ParallelSpec and Medusa heads draft
chains, or the static trees of their levels, verified through the model's own passes
(a tree's nodes read along its paths by the recurrent mixers). Greedy output equals
mlx-lm's, a reused prompt cache keeps the drafter's rows (its drafts then equal a
from-scratch computation over the whole text), a tree's accepted path gives the
drafter its nodes' states, and settings no chain takes are refused."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import benchmark_settings, tiny_hybrid
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load
from test_mtp import _quantized_copy, reference_levels, write_checkpoint

import mlx_specstream.mtp as mtp
import mlx_specstream.recurrent as recurrent
from mlx_specstream import load
from mlx_specstream.cache import drafter_state_of
from mlx_specstream.config import DrafterConfig
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.drafters import attach_drafter

PROMPTS = [[3], [1, 5, 9, 3, 7, 2, 11, 4, 6], [2, 2, 4, 4, 2, 2, 4, 4, 2, 2, 4]]


def run(model, prompt, max_tokens, **kwargs):
    out = list(spec_generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kwargs))
    return [int(o[0]) for o in out], out


def plain(model, prompt, max_tokens, **kwargs):
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kwargs)
    return [int(t) for t, _ in steps]


RELEASED = dict(layers_per_head=2, lm_heads=3, fc_bias=True, token_map_size=None)


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5"])
@pytest.mark.parametrize("kind", ["parallelspec", "medusa", "released medusa"])
def test_attached_drafters_equal_mlx_lm(arch, kind):
    """Random ParallelSpec and Medusa drafters (heads trained here, and a released
    checkpoint's: LM heads of their own) on hybrids, prompts fed in chunks of 4 tokens:
    mlx-lm's greedy tokens, some of them drafted."""
    model = tiny_hybrid(arch, vocab_size=16)
    released = kind.startswith("released")
    config = DrafterConfig(kind=kind.split()[-1], num_draft_tokens=3,
                           medusa=RELEASED if released else None)  # fmt: skip
    attach_drafter(model, config, seed=2)
    plain_model = tiny_hybrid(arch, vocab_size=16)
    drafted = 0
    for prompt in PROMPTS:
        got, out = run(model, prompt, 32, prefill_step_size=4)
        assert got == plain(plain_model, prompt, 32, prefill_step_size=4), prompt
        drafted += sum(o[2] for o in out)
    assert drafted > 0


def test_negative_control_a_verifier_that_accepts_every_draft_is_caught(monkeypatch):
    """Chains (``num_draft_tokens``) and the config's tree (top-3, 16 nodes): accepting
    every chain, or the tree's first path, unchecked changes the output."""
    model = tiny_hybrid("qwen3_next", vocab_size=16)
    attach_drafter(model, DrafterConfig(kind="parallelspec", num_draft_tokens=3), seed=2)
    want = run(model, PROMPTS[1], 32, num_draft_tokens=3)[0]
    assert run(model, PROMPTS[1], 32)[0] == want  # (the tree)
    real, real_tree = recurrent.verify_chain, recurrent.verify_tree

    def accept_all(logits, drafts, history, sampler, processors):
        _, new, logprobs = real(logits, drafts, history, sampler, processors)
        return len(drafts), drafts + new[-1:], logprobs

    def first_path(logits, drafts, parents, history, sampler, processors, q=None, q_rows=None):
        path, new, logprobs = real_tree(logits, drafts, parents, history, sampler, processors, q)
        first = [0] + [i for i in range(1, len(parents)) if parents[i] == i - 1][:2]
        return first, [drafts[i - 1] for i in first[1:]] + new[-1:], logprobs

    with monkeypatch.context() as mp:
        mp.setattr(recurrent, "verify_chain", accept_all)
        assert run(model, PROMPTS[1], 32, num_draft_tokens=3)[0] != want
    monkeypatch.setattr(recurrent, "verify_tree", first_path)
    assert run(model, PROMPTS[1], 32)[0] != want


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5_moe"])
def test_a_reused_prompt_cache_keeps_the_mtp_rows(arch, tmp_path, monkeypatch):
    """Two calls on one prompt cache (a conversation's turns), as with mlx-lm: its
    tokens, and the second call's drafts continue the first's MTP rows (no row
    again, none missing): each equals a from-scratch computation over the whole text."""
    ref = write_checkpoint(tmp_path / "ckpt", arch, seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    base, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    turns = [PROMPTS[1], [4, 6, 1]]
    theirs, text_theirs = make_prompt_cache(base), []
    for t in turns:
        text_theirs += t
        text_theirs += plain(base, t, 12, prompt_cache=theirs)
    seen = []
    real_draft = mtp.MTPDrafter.draft

    def recording(self, rt, state, hidden, path, path_tokens, token, levels=None):
        logits = real_draft(self, rt, state, hidden, path, path_tokens, token, levels)
        seen.append((np.array(logits.astype(mx.float32)), state.cache.offset - 1, token))
        return logits

    monkeypatch.setattr(mtp.MTPDrafter, "draft", recording)
    ours, text = make_prompt_cache(model), []
    for i, t in enumerate(turns):
        text += t
        text += run(model, t, 12, prompt_cache=ours)[0]
        state = drafter_state_of(ours)
        # (every token's row but the last, whose state waits for the next prompt)
        assert state.cache.offset == len(text) - 1 and state.pending_hidden is not None
    monkeypatch.undo()
    assert text == text_theirs
    checked = 0
    for logits, a, token in seen:
        if a + 1 >= len(text) or logits.shape[0] < 2:
            continue  # (a call's last drafts, unused; hold's row feeds)
        assert text[a + 1] == token
        want = reference_levels(base, ref, text, a, logits.shape[0])
        np.testing.assert_allclose(logits, want, atol=2e-4, rtol=2e-4)
        checked += a >= len(turns[0]) + 12  # (the second call's)
    assert checked >= 3


def test_the_chain_is_as_long_as_asked(tmp_path, monkeypatch):
    """``num_draft_tokens`` caps the chain (the config's levels by default); the MTP
    layer runs once per level of each chain."""
    write_checkpoint(tmp_path / "ckpt", "qwen3_5", seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    events = []
    real_step, real_verify = mtp.MTPDrafter.step, recurrent.verify_chain

    def step(self, *args, **kwargs):
        events.append("step")
        return real_step(self, *args, **kwargs)

    def verify(logits, drafts, *args):
        events.append(len(drafts))
        return real_verify(logits, drafts, *args)

    monkeypatch.setattr(mtp.MTPDrafter, "step", step)
    monkeypatch.setattr(recurrent, "verify_chain", verify)
    for n in (None, 1, 2):
        events.clear()
        run(model, PROMPTS[1], 16, **({} if n is None else dict(num_draft_tokens=n)))
        levels = mtp.MTP_DEFAULTS["num_draft_tokens"] if n is None else n
        chains = [e for e in events if e != "step"]
        assert chains[0] == max(chains) == levels  # (the last ones: as many as tokens left)
        steps = 0
        for e in events:  # (each chain: that many runs of the layer just before it)
            if e == "step":
                steps += 1
            else:
                assert steps == e
                steps = 0


def test_settings_no_chain_takes_are_refused(tmp_path):
    write_checkpoint(tmp_path / "ckpt", "qwen3_next", seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="num_draft_tokens=2 sets a chain.*tree_top_k"):
        run(model, PROMPTS[1], 4, tree_top_k=2, num_draft_tokens=2)
    with pytest.raises(ValueError, match="dynamic_tree=True: .*a grown tree needs an attached"):
        run(model, PROMPTS[1], 4, draft="ngram", dynamic_tree=True)
    with pytest.raises(ValueError, match="prune_threshold=0.5: not with recurrent layers"):
        run(model, PROMPTS[1], 4, prune_threshold=0.5)
    got, out = run(model, PROMPTS[2], 16, draft="ngram")  # (lookup instead: as on any model)
    assert got == plain(mlx_lm_load(str(tmp_path / "ckpt"))[0], PROMPTS[2], 16)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_a_quantized_hybrid_takes_the_layer_from_the_checkpoint(arch, tmp_path):
    """A 4-bit copy of a Qwen3.5 (no MTP tensors) with ``drafter=`` the checkpoint:
    the layer quantized as mlx_lm.convert quantizes the base (Qwen3.5-MoE's router in 8
    bits, its model's rule), the 4-bit base's own tokens."""
    import mlx.nn as nn

    write_checkpoint(tmp_path / "ckpt", arch, seed=3)
    q = _quantized_copy(tmp_path / "ckpt", tmp_path / "q4")
    with pytest.raises(ValueError, match="drafter="):
        load(str(q))
    model, _ = load(str(q), drafter=str(tmp_path / "ckpt"))
    drafter = model.speculative_streams.drafter
    assert isinstance(drafter.proj, nn.QuantizedLinear) and drafter.proj.bits == 4
    if arch == "qwen3_5_moe":
        assert drafter.layer.mlp.gate.bits == 8
    base, _ = mlx_lm_load(str(q))
    for prompt in PROMPTS[1:]:
        assert run(model, prompt, 24)[0] == plain(base, prompt, 24)


def test_the_tuner_times_chains_and_trees_and_stores_the_fastest(tmp_path, capsys, monkeypatch):
    """``mlx_specstream.tune --save`` on a saved Qwen3-Next with its MTP layer times
    chains of 1-3, the chain of 3 cut where the layer is unsure (``draft_confidence``), the
    static trees of its levels, the three fastest of them grown, and prompt lookup (alone,
    and merged into the fastest), and stores the fastest, which the next load drafts (fake
    timings: a chain of 2 fastest, then a static top-2 tree, then the same tree grown,
    then lookup merged in, then the cut chain)."""
    import importlib
    import json

    from mlx_specstream.precision import device_key
    from mlx_specstream.utils import save

    tune = importlib.import_module("mlx_specstream.tune")
    write_checkpoint(tmp_path / "ckpt", "qwen3_next", seed=3)
    model, tok, config = load(str(tmp_path / "ckpt"), return_config=True)
    out = tmp_path / "out"
    save(out, model, tok, config=config)
    (out / "prompts.jsonl").write_text(json.dumps({"prompt": "t1 t5 t9 t3"}) + "\n")
    argv = ["--model", str(out), "--num-prompts", "1", "--max-tokens", "8", "--confirm-rounds",
            "0", "--batch-size", "0", "--save"]  # fmt: skip
    real_tps = tune.tokens_per_second
    for fastest, want in [
        (dict(num_draft_tokens=2), (2, 1, 3)),
        (dict(tree_depth=2, tree_top_k=2, max_tree_nodes=7, dynamic_tree=False), (2, 2, 7)),
        (dict(tree_depth=2, tree_top_k=2, max_tree_nodes=7, dynamic_tree=True), (2, 2, 7)),
        (dict(draft="streams+ngram"), None),  # (merged into the first chain: no tree said)
        (dict(num_draft_tokens=3, draft_confidence=0.4), (3, 1, 4)),
    ]:

        def fake(model, tokenizer, prompts, max_tokens, **s):
            tps, tau = real_tps(model, tokenizer, prompts, max_tokens, **s)  # (runs for real)
            win = all(s.get(k) == v for k, v in fastest.items())
            # (the same tree the other kind: second, so that it is among those grown)
            near = all(s.get(k) == v for k, v in fastest.items() if k != "dynamic_tree")
            return (1e6 if win else 1e3 if near else 100.0), tau

        with monkeypatch.context() as mp:
            mp.setattr(tune, "tokens_per_second", fake)
            tune.main(argv)
        log = capsys.readouterr().out
        assert all(f"{{'num_draft_tokens': {n}}}" in log for n in (1, 2, 3))
        assert "'tree_top_k': 2" in log and "'tree_top_k': 3" in log
        assert "{'draft': 'ngram'}" in log and "'draft': 'streams+ngram'" in log
        assert all(f"'draft_confidence': {c}" in log for c in tune.DRAFT_CONFIDENCES)
        assert log.count("'dynamic_tree': True") >= 3  # (the three fastest wide trees, grown)
        entry = json.loads((out / "config.json").read_text())["drafter"]["tuned"][device_key()]
        assert entry.get("draft") == fastest.get("draft")
        assert entry.get("dynamic_tree", False) == fastest.get("dynamic_tree", False)
        assert entry.get("draft_confidence") == fastest.get("draft_confidence")
        if want is None:
            continue
        assert (entry["tree_depth"], entry["top_k"], entry["max_tree_nodes"]) == want
        seen, real, real_tree = [], recurrent.verify_chain, recurrent.verify_tree
        real_grow = recurrent.DrafterChains.grown_drafts
        with monkeypatch.context() as mp:
            mp.setattr(recurrent.DrafterChains, "grown_drafts",
                       lambda self, n: seen.append("grown") or real_grow(self, n))  # fmt: skip
            mp.setattr(
                recurrent,
                "verify_chain",
                lambda lg, d, *a: seen.append(("chain", len(d))) or real(lg, d, *a),
            )
            mp.setattr(recurrent, "verify_tree",
                       lambda lg, d, p, *a: seen.append(("tree", len(p))) or real_tree(lg, d, p, *a))  # fmt: skip
            run(load(str(out))[0], PROMPTS[1], 12)
        # (the random layer is never 0.4 sure: a stored cut stops its chains at one level)
        chain = 1 if fastest.get("draft_confidence") else want[0]
        assert [x for x in seen if x != "grown"][0] == (
            ("chain", chain) if want[1] == 1 else ("tree", 7)
        )
        assert ("grown" in seen) == fastest.get("dynamic_tree", False)


def test_the_benchmark_runs_the_drafters_chains(tmp_path, monkeypatch):
    """``python -m mlx_specstream.benchmark`` on a Qwen3-Next checkpoint with its MTP layer:
    rows of chains (every level; the tuned length) and of the default tree of its levels,
    static and grown; every output identical to plain decoding (check_outputs raises
    otherwise)."""
    import json

    from mlx_specstream import benchmark

    write_checkpoint(tmp_path / "ckpt", "qwen3_next", seed=3)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "t1 t5 t9 t3"}) + "\n")
    settings = benchmark_settings(monkeypatch)
    benchmark.main(
        ["--model", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.jsonl"), "--max-tokens",
         "12", "--runs", "1", "--sampling-temps", "--output-dir", str(tmp_path / "out"),
         "--name", "t", "--tuned-depth", "2"]
    )  # fmt: skip
    assert {"num_draft_tokens": 3} in settings and {"num_draft_tokens": 2} in settings
    trees = [s for s in settings if any(k.startswith("tree_") for k in s)]
    assert {s.get("dynamic_tree") for s in trees} == {False, True}
    assert all(s["tree_top_k"] == 3 and s["max_tree_nodes"] == 16 for s in trees)
    summary = (tmp_path / "out" / "t.md").read_text()
    assert "SS chain of 3" in summary and "SS tuned chain" in summary
    assert benchmark.DEFAULT_TREE in summary and benchmark.DEFAULT_GROWN in summary


def test_served_alone_and_together(tmp_path, monkeypatch):
    """The server with a Qwen3-Next checkpoint's MTP layer: a request alone drafts with
    it (two turns on the server's prompt cache), requests together decode in a batch;
    every answer is mlx-lm's greedy text."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import mlx_lm

    from mlx_specstream.server import make_server, wait_idle

    openai = pytest.importorskip("openai")
    write_checkpoint(tmp_path / "ckpt", "qwen3_next", seed=3)
    model, tok = load(str(tmp_path / "ckpt"))
    base, base_tok = mlx_lm_load(str(tmp_path / "ckpt"))
    server = make_server(model, tok, "tiny", port=0, max_tokens=16)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", timeout=120, max_retries=0)
    try:

        def ask(prompt):
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
            return r.choices[0].text

        drafts, real = [], mtp.MTPDrafter.draft
        monkeypatch.setattr(
            mtp.MTPDrafter, "draft", lambda *a, **k: drafts.append(1) or real(*a, **k)
        )
        prompts = ["t1 t5 t9 t3", "t1 t5 t9 t3 t7 t2", "t4 t6 t1"]
        for p in prompts[:2]:  # (the second extends the first: the cache across turns)
            assert ask(p) == mlx_lm.generate(base, base_tok, p, max_tokens=16)
        assert drafts  # (alone: the MTP layer drafted)
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(ask, prompts))
        assert got == [mlx_lm.generate(base, base_tok, p, max_tokens=16) for p in prompts]
    finally:
        client.close()
        server.shutdown()
        assert wait_idle(server)
        server.server_close()


def test_kv_bits_equals_mlx_lm_s_own_loop(tmp_path):
    """``kv_bits`` with a Qwen3-Next checkpoint's MTP layer drafting: the KV layers
    convert where mlx-lm's loop converts them (before, during and after the prompt,
    fed in chunks of 4), and the tokens are mlx-lm's with the same options."""
    write_checkpoint(tmp_path / "ckpt", "qwen3_next", seed=3, head_dim=32)  # (a group's width)
    model, _ = load(str(tmp_path / "ckpt"))
    base, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    for qs in (0, 4, 12, 40):
        opts = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=qs, prefill_step_size=4)
        for prompt in PROMPTS:
            assert run(model, prompt, 24, **opts)[0] == plain(base, prompt, 24, **opts), (
                qs,
                prompt,
            )


def checked_draft(base, ref, text, checked):
    """``MTPDrafter.draft`` returning ``(logits, a)``, each step's levels checked against
    the from-scratch computation over ``text`` at its last row ``a`` (appended to
    ``checked``)."""
    real = mtp.MTPDrafter.draft

    def draft(self, rt, state, hidden, path, path_tokens, token, levels=None):
        logits = real(self, rt, state, hidden, path, path_tokens, token, levels)
        a = state.cache.offset - 1  # (the last row: token a's state, token a + 1)
        want = reference_levels(base, ref, text, a, logits.shape[0])
        np.testing.assert_allclose(np.array(logits.astype(mx.float32)), want, atol=2e-4, rtol=2e-4)
        checked.append(a)
        return logits, a

    return draft


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5"])
def test_chains_accepted_whole_keep_the_rows_in_step(arch, tmp_path, monkeypatch):
    """The MTP layer's drafts replaced by the right tokens (its own computation still
    run, on its rows): every chain is accepted whole, so the states are never rolled
    back and each pass yields its chain and a bonus token; output equals mlx-lm's,
    and the layer's own levels still equal the from-scratch computation each step."""
    ref = write_checkpoint(tmp_path / "ckpt", arch, seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    base, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    prompt, n = PROMPTS[1], 25
    text = prompt + plain(base, prompt, n + 4)
    checked = []
    draft = checked_draft(base, ref, text, checked)

    def oracle(self, *args, **kwargs):
        logits, a = draft(self, *args, **kwargs)
        right = mx.array(text[a + 2 : a + 2 + logits.shape[0]])
        return (mx.arange(logits.shape[-1])[None] == right[:, None]).astype(logits.dtype) * 30

    monkeypatch.setattr(mtp.MTPDrafter, "draft", oracle)
    got, out = run(model, prompt, n)
    assert got == text[len(prompt) : len(prompt) + n]
    assert out[-1][3] == -(-n // 4) and len(checked) >= out[-1][3] - 1  # (chains of 3, whole)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
@pytest.mark.parametrize("cut", [False, True])
def test_a_tree_s_accepted_path_gives_the_layer_its_nodes_states(arch, cut, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    """The MTP layer's levels made to rank the right token second on level 1 and first
    below (its own computation still run on its rows): each full top-2 tree (15 nodes)
    is accepted along
    a path that is not its first, whole (``cut`` False: the caches keep that path's
    rows and states) or cut after level 2 (``cut``: the right level-3 token not drafted,
    the caches rolled back, the accepted tokens fed again). Output equals mlx-lm's, and
    every step's levels equal the from-scratch computation, so the layer got the
    accepted nodes' states. Control: the first path's states instead."""
    ref = write_checkpoint(tmp_path / "ckpt", arch, seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    base, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    prompt, n = PROMPTS[1], 25
    text = prompt + plain(base, prompt, n + 4)
    checked, paths = [], []
    draft = checked_draft(base, ref, text, checked)

    def oracle(self, *args, **kwargs):
        logits, a = draft(self, *args, **kwargs)
        V = logits.shape[-1]
        right = text[a + 2 : a + 2 + logits.shape[0]]
        rows = []
        for level, t in enumerate(right):
            row = [0.0] * V
            if level == 0:  # (second: a wrong token first)
                row[t], row[(t + 1) % V] = 29.0, 30.0
            elif cut and level == 2:  # (two wrong tokens only)
                row[(t + 1) % V], row[(t + 2) % V] = 30.0, 29.0
            else:
                row[t] = 30.0
            rows.append(row)
        rows += [[0.0] * V] * (logits.shape[0] - len(rows))
        return mx.array(rows, dtype=logits.dtype)

    real_accepted = recurrent.DrafterChains.accepted_path
    monkeypatch.setattr(mtp.MTPDrafter, "draft", oracle)
    monkeypatch.setattr(recurrent.DrafterChains, "accepted_path",
                        lambda self, path: paths.append(path) or real_accepted(self, path))  # fmt: skip
    tree = dict(tree_top_k=2, max_tree_nodes=15)  # (full: every path 3 deep, unpadded)
    got, out = run(model, prompt, n, **tree)
    assert got == text[len(prompt) : len(prompt) + n]
    taken = [p for p in paths if len(p) > 1]
    assert taken and all(p[1] != 1 for p in taken)  # (never the first path's first node)
    assert all(len(p) == (3 if cut else 4) for p in taken[:-1])
    assert len(checked) >= out[-1][3] - 1

    def first_nodes(self, path):
        return real_accepted(self, list(range(len(path))))

    monkeypatch.setattr(recurrent.DrafterChains, "accepted_path", first_nodes)
    with pytest.raises(AssertionError):
        run(model, prompt, n, **tree)


def test_greedy_equals_mlx_lm_with_trees_on_every_hybrid_family(tmp_path):
    """The MTP layer's top-2 trees (8 nodes) on Qwen3-Next, Qwen3.5 (dense and experts),
    Nemotron 3 and Ling 2.5/3: mlx-lm's tokens, prompts fed in chunks of 4; the mixers'
    cache slots read the same after a call as before (the split hooks on them)."""
    from mlx_specstream.model_parts import cache_slots

    for arch in ("qwen3_next", "qwen3_5", "qwen3_5_moe", "nemotron_h", "bailing_hybrid",
                 "bailing_moe_v3"):  # fmt: skip
        write_checkpoint(tmp_path / arch, arch, seed=3)
        model, _ = load(str(tmp_path / arch))
        base, _ = mlx_lm_load(str(tmp_path / arch))
        slots = cache_slots(model)
        for prompt in PROMPTS:
            got, _ = run(model, prompt, 24, tree_top_k=2, max_tree_nodes=8, prefill_step_size=4)
            assert got == plain(base, prompt, 24, prefill_step_size=4), (arch, prompt)
            assert cache_slots(model) == slots, arch


@pytest.mark.parametrize("arch", ["qwen3_5", "nemotron_h"])
def test_prompt_lookup_merged_into_the_layer_s_chain_and_tree(arch, tmp_path, monkeypatch):
    """``draft="streams+ngram"`` on a hybrid: prompt lookup's drafts merged into the MTP
    layer's chain (the config's, 4 nodes) or its top-2 tree (8), first: mlx-lm's tokens,
    trees with lookup's branches verified, and fewer passes than the layer alone on a prompt that
    repeats itself (its random layer rarely drafts right)."""
    write_checkpoint(tmp_path / "ckpt", arch, seed=3)
    model, _ = load(str(tmp_path / "ckpt"))
    base, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    prompt = PROMPTS[2] + plain(base, PROMPTS[2], 16) + PROMPTS[2]  # (its own text again)
    want = plain(base, prompt, 24)
    trees, real = [], recurrent.verify_tree
    monkeypatch.setattr(recurrent, "verify_tree",
                        lambda lg, d, p, *a: trees.append(p) or real(lg, d, p, *a))  # fmt: skip
    for tree in ({}, dict(tree_top_k=2, max_tree_nodes=8)):
        trees.clear()
        alone = run(model, prompt, 24, **tree)[1][-1][3]
        got, out = run(model, prompt, 24, draft="streams+ngram", **tree)
        assert got == want, tree
        assert out[-1][3] < alone, tree
        assert trees or not tree  # (the chain's 4 nodes: lookup's chain may fill them)

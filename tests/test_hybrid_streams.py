"""Lossless-mode streams on models with recurrent layers (Qwen3-Next, Qwen 3.5, LFM2,
Granite 4, ...), drafting chains (mlx_specstream.recurrent.StreamDrafts): greedy
output equal to mlx-lm's, each chain the streams a full multi-stream pass computes
at that token, training in MLX, the tuner, the server and the refusals (sampling:
test_recurrent's chi-square tests)."""

import json
import random

import mlx.core as mx
import pytest
from helpers import HYBRID_ARGS, plain_greedy, stream_hybrid, tiny_hybrid, word_tokenizer
from mlx_lm.models.cache import make_prompt_cache
from test_recurrent import PROMPTS, lookup, one_order_rows

import mlx_specstream.recurrent as recurrent
from mlx_specstream import SpecStreamConfig, attach_streams
from mlx_specstream.streams import get_runtime
from mlx_specstream.support import TreeUnsupported
from mlx_specstream.tree import path_to

# Hybrids whose top layer attends (a KVCache): one stream layer there.
# (Jamba's and Kimi Linear's attention applies no positions: model_parts.reads_positions)
STREAM_HYBRIDS = ["bailing_hybrid", "bailing_moe_linear", "gear", "granitemoehybrid", "jamba",
                  "kimi_linear", "lfm2", "lfm2-vl", "lfm2_moe", "olmo_hybrid", "qwen3_5",
                  "qwen3_5_moe", "qwen3_next"]  # fmt: skip


@pytest.mark.parametrize(
    "arch",
    STREAM_HYBRIDS + [f"{a} chain" for a in STREAM_HYBRIDS]
    + ["qwen3_5 split", "lfm2 split", "qwen3_5 split chain", "lfm2 split chain"],
)  # fmt: skip
def test_stream_trees_and_chains_equal_plain(arch, monkeypatch):
    """mlx-lm's greedy tokens, in fewer passes than tokens (random streams: some of
    their drafts are right), with the fused stream pass and the split one, from the
    config's tree (16 nodes: the recurrent mixers read it along its paths) or a chain
    of the streams' top tokens."""
    arch, split, chain = arch.split(" ")[0], " split" in arch, arch.endswith("chain")
    model, accepted, trees = stream_hybrid(arch), 0, []
    get_runtime(model).split_streams = split
    run = recurrent.ChainCache.run

    def spy(self, drafts, parents=None):
        out = run(self, drafts, parents)
        trees.append(self.tree)
        return out

    monkeypatch.setattr(recurrent.ChainCache, "run", spy)
    for prompt in PROMPTS:
        got, records = lookup(
            model, prompt, 40, draft=None, **(dict(tree_top_k=1) if chain else {})
        )
        assert got == plain_greedy(model, prompt, 40)
        accepted += sum(r[2] for r in records)
        assert records[-1][3] == 40 - sum(r[2] for r in records)  # a pass per token not drafted
    assert accepted > 0, "no draft accepted: the test has no power"
    assert any(trees) != chain and (all(not t for t in trees) if chain else sum(trees) > 10)


def stream_drafts_against_the_full_pass(model, prompt, n, monkeypatch, row_shift=0, **kwargs):
    """Each chain's stream logits (at the last accepted token) beside those a full
    multi-stream pass over the whole output computes at that token: the largest
    difference, whether every chain is their greedy tokens, and how many chains.
    ``row_shift=-1`` takes the streams of the token before (where there is one)."""
    seen = []
    after_pass = recurrent.StreamDrafts.after_pass

    def spy(self, node):
        state = self.state
        parents = self.parents if state.tree else None
        depth = node if parents is None else len(path_to(node, parents)) - 1
        shift = row_shift if state.first_row + node + row_shift >= 0 else 0
        after_pass(self, node + shift)
        seen.append((state.held + state.first_row + depth, self.logits))

    monkeypatch.setattr(recurrent.StreamDrafts, "after_pass", spy)
    got, records = lookup(model, prompt, n, draft=None, **kwargs)
    monkeypatch.undo()
    assert sum(r[2] for r in records) > 0, "no draft accepted: the test has no power"
    sequence = prompt + got
    full = get_runtime(model).forward(mx.array(sequence), [-1] + list(range(len(sequence) - 1)),
                                      make_prompt_cache(model), stream_logits=True)  # fmt: skip
    diff = max(mx.abs(full.stream_logits[p] - logits).max().item() for p, logits in seen)
    same = all(
        full.stream_logits[p].argmax(-1).tolist() == logits.argmax(-1).tolist()
        for p, logits in seen
    )
    return diff, same, len(seen)


@pytest.mark.parametrize("shape", ["tree", "chain"])
@pytest.mark.parametrize("stream_pass", ["fused", "fused, head after the pass", "split"])
@pytest.mark.parametrize("arch", ["qwen3_next", "lfm2"])
def test_each_chain_is_the_streams_of_a_full_pass(arch, stream_pass, shape, monkeypatch):
    """The streams of the last accepted token, read from the verifying pass (fused:
    every row's stream logits from the pass's own head call, or the accepted row's
    stream states through the head after it) or computed after it over the caches
    as it left them (split), equal a full multi-stream pass's over the whole sequence
    at that token (Gated DeltaNet and short-convolution layers below), after a chain
    or a tree of drafts."""
    model = stream_hybrid(arch, vocab_size=16)
    get_runtime(model).split_streams = stream_pass == "split"
    get_runtime(model).stream_logits_in_pass = stream_pass != "fused, head after the pass"
    kwargs = dict(tree_top_k=1) if shape == "chain" else {}
    diff, same, chains = stream_drafts_against_the_full_pass(
        model, PROMPTS[2], 24, monkeypatch, **kwargs
    )
    assert chains > 5 and same and diff < 1e-4


@pytest.mark.parametrize("shape", ["tree", "chain"])
@pytest.mark.parametrize("stream_pass", ["fused", "split"])
def test_negative_control_streams_of_the_row_before(stream_pass, shape, monkeypatch):
    model = stream_hybrid("qwen3_next", vocab_size=16)
    get_runtime(model).split_streams = stream_pass == "split"
    kwargs = dict(tree_top_k=1) if shape == "chain" else {}
    diff, same, _ = stream_drafts_against_the_full_pass(
        model, PROMPTS[2], 24, monkeypatch, -1, **kwargs
    )
    assert diff > 1e-2 and not same


def test_the_stream_rows_leave_no_keys_behind():
    """A reused prompt cache holds what mlx-lm's loop leaves (no stream row's keys),
    and the next call continues as plain decoding does."""
    model = stream_hybrid("qwen3_next")
    ours, theirs = make_prompt_cache(model), make_prompt_cache(model)
    got, _ = lookup(model, PROMPTS[1], 13, draft=None, prompt_cache=ours)
    assert got == plain_greedy(model, PROMPTS[1], 13, prompt_cache=theirs)
    for a, b in zip(ours, theirs):
        if hasattr(b, "offset"):
            assert a.offset == b.offset
    nxt = [got[-1], 5, 6]
    want = plain_greedy(model, nxt, 20, prompt_cache=theirs)
    assert lookup(model, nxt, 20, draft=None, prompt_cache=ours)[0] == want


def test_stream_shapes_and_refusals(monkeypatch):
    """What the streams draft: the config's tree (top_k 3, 16 nodes, 3 levels), a tree
    the call sets, ``tree_depth`` levels of it, a chain of ``num_draft_tokens`` (0: one
    token per pass). Refused with the reason: more levels than streams, a chain and a
    tree at once, pruning, a tree where the model takes none (the config's: a warning,
    and a chain), shared mode, a stream layer without a KV cache."""
    import mlx_specstream.decode as decode

    model = stream_hybrid("qwen3_next")
    want = plain_greedy(model, PROMPTS[0], 24)
    for kwargs, longest in ((dict(), 3), (dict(tree_depth=2), 2), (dict(num_draft_tokens=1), 1),
                            (dict(tree_top_k=2, max_tree_nodes=5), 3)):  # fmt: skip
        got, records = lookup(model, PROMPTS[0], 24, draft=None, **kwargs)
        assert got == want
        runs = [sum(1 for r in records if r[3] == k and r[2]) for k in {r[3] for r in records}]
        assert max(runs) <= longest
    rt = get_runtime(model)
    assert decode.streams_on_chains(rt, model, (None,) * 4, None)[0].parents == tuple(
        __import__("mlx_specstream.tree", fromlist=["x"]).static_tree([3] * 3, 3, 16).parents
    )
    assert decode.streams_on_chains(rt, model, (2, 2, None, 3), None) == (None, 2)  # (a chain)
    import dataclasses  # (a config tuned to a chain: top_k 1)

    config = rt.config
    rt.config = dataclasses.replace(config, top_k=1, tree_depth=2)
    assert decode.streams_on_chains(rt, model, (None,) * 4, None) == (None, 2)
    rt.config = config
    got, records = lookup(model, PROMPTS[0], 24, draft=None, tree_depth=0)
    assert got == want and records[-1][3] == 24
    with pytest.raises(ValueError, match="in \\[0, 3\\]"):
        lookup(model, PROMPTS[0], 4, draft=None, num_draft_tokens=4)
    with pytest.raises(ValueError, match="tree_top_k a tree: pass one or the other"):
        lookup(model, PROMPTS[0], 4, draft=None, tree_top_k=2, num_draft_tokens=2)
    with pytest.raises(ValueError, match="prune_threshold=0.1: not with recurrent layers"):
        lookup(model, PROMPTS[0], 4, draft=None, prune_threshold=0.1)
    monkeypatch.setattr(decode, "tree_on_chains_refusal", lambda m: "a reason")
    with pytest.warns(UserWarning, match="cannot take \\(a reason\\): its streams draft a chain"):
        assert lookup(model, PROMPTS[0], 24, draft=None)[0] == want
    with pytest.raises(ValueError, match="no tree of drafts here: a reason"):
        lookup(model, PROMPTS[0], 4, draft=None, tree_top_k=2)
    with pytest.raises(TreeUnsupported, match="Lossless-mode streams run on it"):
        attach_streams(tiny_hybrid("qwen3_next"), SpecStreamConfig(num_stream_layers=1,
                                                                   mode="shared"))  # fmt: skip
    with pytest.raises(TreeUnsupported, match="every stream layer keeps a KVCache"):
        attach_streams(tiny_hybrid("qwen3_next"), SpecStreamConfig(num_stream_layers=2))
    # Prompt lookup on the same model: chains of lookup drafts, streams left out.
    assert lookup(model, PROMPTS[0], 24, draft="ngram")[0] == want


def test_negative_control_a_tree_read_in_one_order_by_the_mixers(monkeypatch):
    """The recurrent mixers reading a tree's nodes as one sequence (every node after
    the one before, siblings included) instead of along its paths: the output differs."""
    monkeypatch.setattr(recurrent, "path_rows", one_order_rows)
    model = stream_hybrid("qwen3_next")
    assert any(lookup(model, p, 40, draft=None)[0] != plain_greedy(model, p, 40) for p in PROMPTS)


def test_tree_on_chains_refusal_golden():
    """Hybrids whose stream trees the verifier takes, and those it refuses with the
    reason: a layer keeping a mixer's state inside its attention (Baichuan-M1), a layer called
    otherwise than layer(x, mask, cache) (RecurrentGemma)."""
    from mlx_specstream.support import tree_on_chains_refusal

    for arch in STREAM_HYBRIDS:
        assert tree_on_chains_refusal(tiny_hybrid(arch)) is None, arch
    assert "beside an attention's keys" in tree_on_chains_refusal(tiny_hybrid("baichuan_m1"))
    # (Falcon-H1's layers take the attention's mask apart from the mixer's: trees run)
    assert tree_on_chains_refusal(tiny_hybrid("falcon_h1")) is None
    assert "takes (x, cache, mask)" in tree_on_chains_refusal(tiny_hybrid("recurrent_gemma"))


def test_train_in_mlx_then_load_and_generate_faster(tmp_path, capsys):
    """A Mac user's three lines on a saved Qwen3-Next-shaped directory: train streams
    (self-distilled), load, generate: mlx-lm's greedy tokens, with most of the streams'
    drafts accepted on the prompts they learned; the tuner times trees and chains; the
    generate command takes tree flags and ``--draft streams+ngram`` there."""
    import mlx_lm
    from mlx_lm.utils import save_config, save_model
    from test_train import V, write_cycle_jsonl

    from mlx_specstream import load, stream_generate
    from mlx_specstream.train import main as train_main

    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir()
    save_model(base, tiny_hybrid("qwen3_next", vocab_size=V, weight_scale=1.0))
    save_config({**HYBRID_ARGS["qwen3_next"], "vocab_size": V, "model_type": "qwen3_next"},
                base / "config.json")  # fmt: skip
    tokenizer = word_tokenizer(V)
    tokenizer.save_pretrained(str(base))
    data = write_cycle_jsonl(tmp_path / "data.jsonl")
    train_main(["--model", str(base), "--data", str(data), "--out", str(out), "--iters", "60",
                "--no-tune", "--self-distill", "--batch-size", "4", "--learning-rate", "1e-2",
                "--stream-lora-rank", "8", "--max-seq-length", "16",
                "--window-prompt", "2", "--steps-per-report", "30"])  # fmt: skip
    model, tok = load(str(out))
    # (no --num-stream-layers: its top layers that attend, here the top one)
    assert get_runtime(model).config.num_stream_layers == 1
    plain, _ = mlx_lm.load(str(base))
    passes = tokens = 0
    for line in list(open(data))[:4]:
        prompt = tok.encode(json.loads(line)["text"])[:2]  # (a self-distilled window's start)
        got = list(stream_generate(model, tok, prompt, max_tokens=16))
        want = plain_greedy(plain, prompt, 16)
        assert [r.token for r in got] == want[: len(got)]
        passes, tokens = passes + got[-1].forward_passes, tokens + len(got)
    assert tokens / passes > 1.4, f"tau {tokens / passes:.2f}: the trained streams rarely drafted"
    from mlx_specstream.tune import DRAFT_CONFIDENCES, candidate_trees, tune

    log = []
    choice, _, _ = tune(model, tok, [[3, 9, 4, 3]], max_tokens=8, log=log.append,
                        confirm_rounds=0)  # fmt: skip
    # (every candidate tree, chains and trees, with the fused stream pass; the deepest
    # chain cut where the streams are unsure; the two fastest split)
    # (the trials' own lines: where speculation pays, a "Best: {...}" line names one again)
    streams_only = [line for line in log if line.startswith("{'") and "'draft': 'streams'," in line]
    assert sum("'stream_pass': 'fused'" in line and "stream_logits_in_pass" not in line
               and "draft_confidence" not in line
               for line in streams_only) == len(candidate_trees(3, False))  # fmt: skip
    assert all(any(f"'draft_confidence': {c}" in line for line in streams_only)
               for c in DRAFT_CONFIDENCES)  # fmt: skip
    assert sum("'stream_logits_in_pass': False" in line for line in streams_only) == 2
    assert sum("'stream_pass': 'split'" in line for line in streams_only) == 2
    assert any("'tree_top_k': 3" in line for line in log)  # (trees, not only chains)
    # (prompt lookup alone, and merged with the fastest)
    assert sum(line.startswith("{'draft': 'ngram'}") for line in log) == 1
    assert sum("'draft': 'streams+ngram'" in line for line in log) == 1
    assert choice == {"tree_depth": 0} or choice.get("draft") in ("streams", "ngram",
                                                                   "streams+ngram")  # fmt: skip
    # The generate command on the written directory: a tree the flags set, and lookup
    # merged into the streams' tree, each identical to plain decoding.
    import importlib

    gen_mod = importlib.import_module("mlx_specstream.generate")
    prompt = " ".join(json.loads(next(open(data)))["text"].split()[:2])
    common = ["--model", str(out), "--prompt", prompt, "--max-tokens", "16",
              "--ignore-chat-template", "--compare-plain"]  # fmt: skip
    for extra in (["--tree-top-k", "2", "--max-tree-nodes", "6"], ["--draft", "streams+ngram"]):
        gen_mod.main([*common, *extra])
        assert "Output identical to plain decoding: yes" in capsys.readouterr().out, extra


def test_untrained_prompts_still_decode_as_plain():
    """(Whatever the streams draft, the output is mlx-lm's: random prompts.)"""
    model = stream_hybrid("lfm2", vocab_size=16)
    rng = random.Random(3)
    for _ in range(3):
        prompt = [rng.randrange(16) for _ in range(6)]
        assert lookup(model, prompt, 20, draft=None)[0] == plain_greedy(model, prompt, 20)


def test_served_alone_and_together():
    """The server on a Qwen3-Next shape with streams: a request alone drafts with the
    streams' chains, a follow-up turn starts from the kept cache, requests that wait
    together go to mlx-lm's batches; every answer equals mlx-lm's plain decoding."""
    from test_server import assert_served_alone_and_together

    assert_served_alone_and_together(stream_hybrid("qwen3_next", vocab_size=32), 32)


def test_attending_top_layers_golden():
    """The top layers in a row with a KVCache: Qwen3-Next's tiny shape attends every
    second layer (1), a Llama in all (4), Mamba 2 in none (0)."""
    from helpers import tiny_model

    from mlx_specstream.support import attending_top_layers

    assert attending_top_layers(tiny_hybrid("qwen3_next")) == 1
    assert attending_top_layers(tiny_model("llama", 8)) == 4
    assert attending_top_layers(tiny_hybrid("mamba2")) == 0


def test_reads_positions_golden():
    """Attention calls that may place tokens (an ``offset`` read, a RoPE-named call)
    against those that cannot (Jamba's, Kimi Linear's: no RoPE at all)."""
    import mlx.nn as nn
    from helpers import tiny_chain_model, tiny_model

    from mlx_specstream.model_parts import attention_of, reads_positions

    assert not reads_positions(attention_of(tiny_hybrid("jamba").layers[3]))
    assert not reads_positions(attention_of(tiny_hybrid("kimi_linear").layers[3]))
    assert reads_positions(attention_of(tiny_chain_model("nanochat").layers[0]))  # (a function)
    assert reads_positions(attention_of(tiny_model("llama", 8).layers[0]))  # (self.rope)

    class Shifted(nn.Module):  # (positions from the cache's offset, by no RoPE name)
        def __call__(self, x, mask=None, cache=None):
            return x * cache.offset

    class Unreadable(nn.Module):
        pass

    Unreadable.__call__ = eval("lambda self, x, mask=None, cache=None: x")
    assert reads_positions(Shifted()) and reads_positions(Unreadable())


def test_streams_on_kimi_k3_are_refused_with_the_reason():
    """Its layers mix in earlier blocks' states per token (attention residuals)."""
    with pytest.raises(ValueError, match="attention residuals"):
        stream_hybrid("kimi_k3")


def test_kv_bits_equals_mlx_lm_s_own_loop():
    """mlx-lm's ``kv_bits`` with the streams' chains, before, during and after the
    prompt: tokens and every yielded log-probability equal mlx-lm's own loop."""
    from mlx_lm.generate import generate_step

    model, accepted = stream_hybrid("qwen3_next", head_dim=32), 0  # (a group divides 32)
    for qs in (0, 9, 20):
        opts = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=qs, prefill_step_size=4)
        for prompt in PROMPTS:
            ref = list(generate_step(mx.array(prompt), model, max_tokens=24, **opts))
            got, records = lookup(model, prompt, 24, draft=None, **opts)
            assert got == [int(t) for t, _ in ref], (qs, prompt)
            assert max(mx.abs(r[1] - lp).max().item() for r, (_, lp) in zip(records, ref)) == 0
            accepted += sum(r[2] for r in records)
    assert accepted > 5, "drafts were rarely accepted: the test has no power"


def oracle_trees(model, prompt, n, monkeypatch, wrong_row=False, last=False, caches=None):
    """Decodes with one path of each tree (its first; with ``last``, its last leaf's)
    set to mlx-lm's greedy continuation (the other nodes the streams', the first
    path's first node kept off it), so that path is accepted whole and kept
    (``ChainCache.commit``): the tokens, mlx-lm's, and how many trees kept their path.
    ``wrong_row`` keeps the recurrent states of another path instead. ``caches``:
    ours and mlx-lm's, reused (holding the same earlier tokens)."""
    ours, theirs = caches or (None, None)
    want = plain_greedy(model, prompt, n + 8, prompt_cache=theirs)
    draft, commit, kept = recurrent.StreamDrafts.draft, recurrent.ChainCache.commit, []

    def oracle(self, levels):
        drafts = draft(self, levels)
        if self.tree is not None and drafts:
            at, parents = len(self.tokens) - len(prompt), self.parents
            depths = [len(path_to(i, parents)) for i in range(len(parents))]
            deepest = max(i for i, d in enumerate(depths) if d == max(depths))  # (the last)
            path = path_to(deepest if last else 1, parents)[1:]
            while not last and path[-1] + 1 < len(parents) and parents[path[-1] + 1] == path[-1]:
                path.append(path[-1] + 1)  # (the first path: each node under the one before)
            if last and len(path) > 1 and path[0] != 1:  # (node 1 off the oracle's token)
                drafts[0] = (want[at] + 1) % model.args.vocab_size
            for depth, node in enumerate(path):
                drafts[node - 1] = want[at + depth]
        return drafts

    def spy(self, all_accepted, path=None):
        if self.tree and path is not None and tuple(path) in self.whole_paths:
            kept.append(path)
            if wrong_row:
                r = self.whole_paths[tuple(path)]
                for c, wrote in self.split.path_states:
                    for i, a in wrote.items():  # (the next row's, or the one before)
                        other = r + 1 if r + 1 < a.shape[0] else r - 1
                        wrote[i] = mx.concatenate([a[other : other + 1]] * a.shape[0])
        return commit(self, all_accepted, path)

    monkeypatch.setattr(recurrent.StreamDrafts, "draft", oracle)
    monkeypatch.setattr(recurrent.ChainCache, "commit", spy)
    got, records = lookup(model, prompt, n, draft=None, prompt_cache=ours)
    monkeypatch.undo()
    return got, want[:n], kept


@pytest.mark.parametrize("arch", ["qwen3_next", "lfm2", "jamba", "bailing_moe_linear"])
def test_a_tree_s_first_path_accepted_whole_is_kept(arch, monkeypatch):
    """The tree's first path accepted whole: the caches keep its rows and its
    recurrent states (no pending tokens ride along again), and decoding goes on as
    mlx-lm's greedy loop."""
    model = stream_hybrid(arch)
    got, want, kept = oracle_trees(model, PROMPTS[0], 30, monkeypatch)
    assert got == want and len(kept) >= 5


@pytest.mark.parametrize("arch", ["qwen3_next", "lfm2"])
def test_another_deepest_path_accepted_whole_is_kept(arch, monkeypatch):
    """The tree's last path accepted whole (not the first): its KV rows are gathered
    after the pending ones (cache.commit_path) and its row of the mixers' states kept;
    decoding goes on as mlx-lm's greedy loop."""
    model = stream_hybrid(arch)
    got, want, kept = oracle_trees(model, PROMPTS[0], 30, monkeypatch, last=True)
    assert got == want and sum(p[1] != 1 for p in kept) >= 5
    # A reused cache (holding earlier tokens): the rows gathered are the tree's own.
    ours, theirs = make_prompt_cache(model), make_prompt_cache(model)
    assert lookup(model, PROMPTS[1], 9, draft=None, prompt_cache=ours)[0] == plain_greedy(
        model, PROMPTS[1], 9, prompt_cache=theirs
    )
    got, want, kept = oracle_trees(model, [5, 6], 30, monkeypatch, last=True,
                                   caches=(ours, theirs))  # fmt: skip
    assert got == want and sum(p[1] != 1 for p in kept) >= 5


@pytest.mark.parametrize("last", [False, True])
def test_negative_control_the_states_of_another_path_kept(last, monkeypatch):
    model = stream_hybrid("qwen3_next")
    got, want, kept = oracle_trees(model, PROMPTS[0], 30, monkeypatch, wrong_row=True, last=last)
    assert kept and got != want


@pytest.mark.parametrize("arch", ["qwen3_next", "lfm2", "jamba"])
def test_streams_with_prompt_lookup_merged_equal_plain(arch, monkeypatch):
    """``draft="streams+ngram"``: prompt lookup's drafts merged into the streams' tree
    (or chain), first, under ``max_tree_nodes``: mlx-lm's greedy output; the merged
    draft's first path is lookup's draft wherever lookup found one."""
    model = stream_hybrid(arch)
    draft, merged = recurrent.StreamDrafts.draft, []

    def spy(self, n):
        out = draft(self, n)
        found = [c for c in self.lookup.drafts(min(n, self.lookup_tokens)) if c]
        if found:
            first = found[0][: len(out)]
            merged.append(out[: len(first)] == first)
        return out

    monkeypatch.setattr(recurrent.StreamDrafts, "draft", spy)
    for kwargs in (dict(), dict(tree_top_k=1, num_draft_tokens=4), dict(ngram_candidates=3)):
        for prompt in PROMPTS:
            prompt = prompt + prompt[:4] + prompt
            got, records = lookup(model, prompt, 40, draft="streams+ngram", **kwargs)
            assert got == plain_greedy(model, prompt, 40)
            assert records[-1][3] == 40 - sum(r[2] for r in records)
    assert len(merged) > 20 and all(merged)

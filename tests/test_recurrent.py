"""Prompt lookup on models with recurrent layers (mlx_specstream.recurrent): greedy
output equal to mlx-lm's, the caches left as mlx-lm leaves them, sampling that keeps
the distribution, and the refusals."""

import importlib
import itertools
import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    CHAIN_MODELS,
    HYBRIDS,
    plain_greedy,
    stream_hybrid,
    tiny_chain_model,
    tiny_hybrid,
    word_tokenizer,
)
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    RotatingKVCache,
    make_prompt_cache,
)
from mlx_lm.sample_utils import make_logits_processors

import mlx_specstream.recurrent as recurrent
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.recurrent import (
    SplitPoint,
    check_recurrent_cache,
    has_recurrent_layers,
    verify_chain,
    verify_tree,
)
from mlx_specstream.sample_utils import make_sampler

PROMPTS = [[3, 1, 4, 1, 5, 2, 6, 3, 1, 4], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [7, 7, 2, 5, 7, 7, 2]]


def lookup(model, prompt, max_tokens, **kwargs):
    """Tokens and records of prompt lookup through the public generator."""
    kwargs.setdefault("draft", "ngram")
    out = list(spec_generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kwargs))
    return [int(o[0]) for o in out], out


@pytest.mark.parametrize("arch", HYBRIDS + CHAIN_MODELS)
def test_lookup_on_a_recurrent_model_equals_plain(arch):
    """Gated DeltaNet (qwen3_next), short-convolution (lfm2) and state-space (mamba2)
    layers, and models the tree verifier cannot take (test_chain_models): mlx-lm's
    greedy output, in fewer passes than tokens."""
    model = tiny_hybrid(arch) if arch in HYBRIDS else tiny_chain_model(arch)
    accepted = 0
    for prompt in PROMPTS:
        got, records = lookup(model, prompt, 40, num_draft_tokens=6)
        assert got == plain_greedy(model, prompt, 40)
        accepted += sum(r[2] for r in records)
        assert records[-1][3] == 40 - sum(r[2] for r in records)  # a pass per token not drafted
    assert accepted > 10, "drafts were rarely accepted: the test has no power"


# Hybrids whose layers the tree verifier cannot take apart (support.tree_on_chains_refusal):
# a mixer's state inside an attention, RoPE out of reach, a layer called as
# layer(x, cache, mask). (Nemotron-H's caches pair with its mixer and attention layers;
# Falcon-H1's layers take the attention's mask apart from the mixer's.)
NO_LOOKUP_TREES = {"baichuan_m1", "longcat_flash_ngram", "recurrent_gemma"}


@pytest.mark.parametrize("arch", HYBRIDS)
def test_lookup_trees_on_a_recurrent_model_equal_plain(arch, monkeypatch):
    """Several prompt-lookup drafts merged into one tree (``ngram_candidates=3``): the
    attention layers take the tree verifier's masks, the recurrent mixers read the
    tree along its paths (a model without attention needs no verifier); mlx-lm's
    greedy output. Where the layers do not allow a tree, refused with the reason."""
    model = tiny_hybrid(arch)
    prompts = [p + p[:4] + p for p in PROMPTS]  # (repeats: several earlier occurrences)
    if arch in NO_LOOKUP_TREES:
        with pytest.raises(ValueError, match="no tree of drafts here: "):
            lookup(model, prompts[0], 8, ngram_candidates=3)
        return
    run, trees = recurrent.ChainCache.run, []

    def spy(self, drafts, parents=None):
        out = run(self, drafts, parents)
        trees.append(self.tree)
        return out

    monkeypatch.setattr(recurrent.ChainCache, "run", spy)
    for prompt in prompts:
        got, records = lookup(model, prompt, 40, ngram_candidates=3, max_tree_nodes=12)
        assert got == plain_greedy(model, prompt, 40)
        assert records[-1][3] == 40 - sum(r[2] for r in records)
    assert sum(trees) > 10, "few trees: the test has no power"


def one_order_rows(parents):
    """A control's ``tree.path_rows``: the tree's nodes as one row, each after the one
    before (siblings included), as a chain would be read."""
    n = len(parents) - 1
    return np.arange(n, dtype=np.int32)[None], np.zeros(n, np.int32), np.arange(n, dtype=np.int32)


@pytest.mark.parametrize("arch", ["qwen3_next", "mamba2"])
def test_negative_control_lookup_trees_read_in_one_order(arch, monkeypatch):
    """The mixers reading a lookup tree's nodes as one sequence: the output differs
    (with attention, and without: Mamba 2 needs no verifier)."""
    monkeypatch.setattr(recurrent, "path_rows", one_order_rows)
    model = tiny_hybrid(arch)
    prompts = [p + p[:4] + p for p in PROMPTS]
    assert any(
        lookup(model, p, 40, ngram_candidates=3)[0] != plain_greedy(model, p, 40) for p in prompts
    )


def test_lookup_drafts_golden():
    """The docstring's example: two drafts after the last ``1 2``, merged under it."""
    drafts = recurrent.LookupDrafts(candidates=2, max_nodes=16)
    drafts.tokens = [1, 2, 3, 9, 1, 2, 4, 1, 2]
    assert drafts.draft(3) == [4, 1, 2, 3, 9, 1] and drafts.parents == [-1, 0, 1, 2, 0, 4, 5]
    assert recurrent.LookupDrafts().draft(3) == [] and recurrent.LookupDrafts().parents is None
    one = recurrent.LookupDrafts(candidates=2)
    one.tokens = [5, 1, 2, 7, 1, 2]  # (one earlier occurrence: a chain)
    assert one.draft(3) == [7, 1, 2] and one.parents is None


def test_negative_control_recurrent_state_not_rolled_back(monkeypatch):
    """Mixers that do not split their call keep no state to go back to: the rejected
    drafts stay in the recurrent layers, and the output changes (unless the pass goes
    back to before its pending tokens, as it does for states no split mixer keeps)."""
    model = tiny_hybrid("qwen3_next")
    model.recurrent_split = SplitPoint()  # (split_recurrent_mixers then wraps nothing)
    assert all(lookup(model, p, 40)[0] == plain_greedy(model, p, 40) for p in PROMPTS)
    monkeypatch.setattr(recurrent.ChainCache, "unsplit_states", lambda self: False)
    assert any(lookup(model, p, 40)[0] != plain_greedy(model, p, 40) for p in PROMPTS)


@pytest.mark.parametrize("arch", ["longcat_flash_ngram", "baichuan_m1"])
def test_negative_control_states_no_split_mixer_keeps(arch, monkeypatch):
    """LongCat's n-gram context (an ArraysCache its embedding writes, ahead of the
    layers') and Baichuan-M1's key/value convolutions (an ArraysCache inside the
    attention's CacheList) are no split mixer's: a rejection goes back to before the
    pending tokens. Control: treated as kept, the rejected drafts stay in them."""
    model = tiny_hybrid(arch)
    monkeypatch.setattr(recurrent.ChainCache, "unsplit_states", lambda self: False)
    assert any(lookup(model, p, 40)[0] != plain_greedy(model, p, 40) for p in PROMPTS)


def test_negative_control_split_inputs_that_keep_the_offset(monkeypatch):
    """Ling's linear attention applies RoPE from an ``offset`` its layer passes: the
    second part of a split call starts ``at`` tokens later. Control: the same offset
    for both parts changes the output."""
    model = tiny_hybrid("bailing_moe_linear")
    assert all(lookup(model, p, 40)[0] == plain_greedy(model, p, 40) for p in PROMPTS)
    split = recurrent.split_inputs

    def same_offset(arguments, x_name, at):
        rest = split(arguments, x_name, at)
        rest.pop("offset", None)
        return rest

    monkeypatch.setattr(recurrent, "split_inputs", same_offset)
    assert any(lookup(model, p, 40)[0] != plain_greedy(model, p, 40) for p in PROMPTS)


def test_logits_processors_see_each_row_s_own_history():
    model = tiny_hybrid("lfm2")
    processors = make_logits_processors(repetition_penalty=1.5, repetition_context_size=8)
    for prompt in PROMPTS:
        want = plain_greedy(model, prompt, 32, logits_processors=processors)
        got, records = lookup(model, prompt, 32, logits_processors=processors)
        assert got == want
    # Control: the processors change the output here.
    assert got != plain_greedy(model, prompt, 32)


def state_of(cache):
    """Every array a cache list holds, up to each KV cache's offset."""
    out = []
    for c in cache:
        if isinstance(c, KVCache):
            out += [c.keys[..., : c.offset, :], c.values[..., : c.offset, :]]
        else:
            out += list(c.cache)
    return out


def close_after(model, prompt, n, cache):
    """Takes ``n`` tokens of prompt lookup on ``cache``, then closes the generator."""
    gen = spec_generate_step(mx.array(prompt), model, draft="ngram", prompt_cache=cache)
    for _ in range(n):
        next(gen)
    gen.close()


def test_the_cache_holds_every_yielded_token_as_mlx_lm_leaves_it(monkeypatch):
    """Closed after each number of tokens (inside steps whose drafts were all accepted,
    or not), and then continued with a second prompt: the caches hold what mlx-lm's
    loop leaves, array for array, and the follow-up equals mlx-lm's."""
    model = tiny_hybrid("qwen3_next", weight_scale=0.5)  # (it accepts whole drafts here)
    prompt, follow = PROMPTS[2], [5, 6, 5, 6]
    inside, hold = [], recurrent.ChainCache.hold

    def spy(self, end):
        inside.append(self.held > end)
        hold(self, end)

    monkeypatch.setattr(recurrent.ChainCache, "hold", spy)
    for n in range(1, 16):
        ours, theirs = make_prompt_cache(model), make_prompt_cache(model)
        close_after(model, prompt, n, ours)
        ref = generate_step(mx.array(prompt), model, prompt_cache=theirs)
        for _ in range(n):
            next(ref)
        ref.close()
        assert ours[1].offset == theirs[1].offset == len(prompt) + n
        for a, b in zip(state_of(ours), state_of(theirs)):
            assert mx.array_equal(a, b), n
        want = [t for t, _ in generate_step(mx.array(follow), model, max_tokens=12,
                                            prompt_cache=theirs)]  # fmt: skip
        assert lookup(model, follow, 12, prompt_cache=ours)[0] == want, n
    assert sum(inside) >= 3, "no close fell inside a step's drafts: the test has no power"


def test_negative_control_a_cache_left_past_the_yielded_tokens_differs(monkeypatch):
    """Without the last step's roll-back on close, a cache closed inside a step whose
    drafts were all accepted holds tokens that were never yielded."""

    def feed_only(self, end):
        if self.held < end:
            self.feed(end)

    monkeypatch.setattr(recurrent.ChainCache, "hold", feed_only)
    model, prompt = tiny_hybrid("qwen3_next", weight_scale=0.5), PROMPTS[2]
    offsets = []
    for n in range(1, 16):
        cache = make_prompt_cache(model)
        close_after(model, prompt, n, cache)
        offsets.append(cache[1].offset - len(prompt) - n)
    assert max(offsets) > 0


@pytest.mark.parametrize("cached", [False, True])
def test_a_call_without_a_prompt_cache_feeds_no_pass_after_its_last_token(cached, monkeypatch):
    """The caches of a call given none are dropped when it ends: the yielded tokens are
    the same, and the last one is not fed. Control: given a prompt cache, it is fed."""
    model, prompt = tiny_hybrid("qwen3_next"), PROMPTS[0]
    held, real = [], recurrent.ChainCache.hold

    def recording(self, end):
        held.append(end)
        real(self, end)

    monkeypatch.setattr(recurrent.ChainCache, "hold", recording)
    cache = make_prompt_cache(model) if cached else None
    got, _ = lookup(model, prompt, 20, prompt_cache=cache)
    assert got == plain_greedy(model, prompt, 20)
    assert held == ([len(prompt) + 20] if cached else [])
    if cached:
        assert cache[1].offset == len(prompt) + 20  # (layer 1 attends: its KV cache)


def sampled(make):
    """``make``'s Qwen3-Next for the sampling tests: two layers (a Gated DeltaNet layer and
    an attention layer, 4 before) keep their many draws cheap."""
    return make("qwen3_next", vocab_size=V, weight_scale=1.0, num_hidden_layers=2)


# A hybrid model, one the tree verifier cannot take (test_chain_models), and a hybrid's
# streams (test_hybrid_streams: 3 tokens, as the first pass drafts nothing).
def attached_hybrid():
    """A sampled hybrid with a random ParallelSpec drafter attached (2 levels; its
    config's tree, top-3: recurrent.DrafterChains)."""
    from mlx_specstream.config import DrafterConfig
    from mlx_specstream.drafters import attach_drafter

    model = sampled(tiny_hybrid)
    attach_drafter(model, DrafterConfig(kind="parallelspec", num_draft_tokens=2), seed=1)
    return model


SAMPLED = {
    "qwen3_next": (lambda: sampled(tiny_hybrid), {}),
    "qwen3_next drafter+ngram": (  # (lookup merged into an attached drafter's tree)
        attached_hybrid,
        dict(n_tokens=3, draft="streams+ngram", prompt=[1, 4, 2, 5, 1, 4, 3, 1, 4]),
    ),
    "nanochat": (lambda: tiny_chain_model("nanochat", vocab_size=V), {}),
    "qwen3_next streams": (  # (greedy stream drafts; drawn ones: the rejection tests)
        lambda: sampled(stream_hybrid),
        dict(n_tokens=3, draft="streams", acceptance="target-sample"),
    ),
    "qwen3_next lookup tree": (  # ("1 4" twice before the end: two drafts, a tree)
        lambda: sampled(tiny_hybrid),
        dict(ngram_candidates=3, prompt=[1, 4, 2, 5, 1, 4, 3, 1, 4]),
    ),
    "qwen3_next streams+ngram": (  # (lookup merged into the streams' tree: target-sample)
        lambda: sampled(stream_hybrid),
        dict(n_tokens=3, draft="streams+ngram", prompt=[1, 4, 2, 5, 1, 4, 3, 1, 4]),
    ),
    "qwen3_next stream chain": (  # (the streams' top tokens as a chain; above, a tree)
        lambda: sampled(stream_hybrid),
        dict(n_tokens=3, draft="streams", acceptance="target-sample", tree_top_k=1),
    ),
}


@pytest.mark.parametrize("arch", sorted(SAMPLED))
def test_sampling_keeps_the_distribution(arch):
    make, kwargs = SAMPLED[arch]
    p, drafted = lookup_pvalue(make(), **kwargs)
    assert drafted > N_SAMPLES // 20, "drafts were rarely accepted: the test has no power"
    assert p > 1e-3, f"chi-square p = {p:.2e}"


@pytest.mark.parametrize("arch", sorted(SAMPLED))
def test_negative_control_an_unchecked_first_draft_is_caught(arch, monkeypatch):
    def lenient(logits, drafts, history, sampler, processors):
        a, new, logprobs = verify_chain(logits, drafts, history, sampler, processors)
        if drafts and a == 0:  # the first draft accepted unchecked
            a, new = 1, drafts[:1] + [int(sampler(logprobs[1:2]).item())]
        return a, new, logprobs

    def lenient_tree(logits, drafts, parents, history, sampler, processors, q=None, q_rows=None):
        path, new, logprobs = verify_tree(logits, drafts, parents, history, sampler, processors)
        if len(path) == 1 and len(parents) > 1:  # the first child accepted unchecked
            lp = logits[1:2] - mx.logsumexp(logits[1:2], axis=-1, keepdims=True)
            path, new = [0, 1], drafts[:1] + [int(sampler(lp).item())]
        return path, new, logprobs

    monkeypatch.setattr(recurrent, "verify_chain", lenient)
    monkeypatch.setattr(recurrent, "verify_tree", lenient_tree)
    make, kwargs = SAMPLED[arch]
    p, _ = lookup_pvalue(make(), 500, **kwargs)
    assert p < 1e-6, f"the lenient verifier passed (p = {p:.2e}): the test has no power"


V, N_TOKENS, SAMPLE_PROMPT, N_SAMPLES = 6, 2, [1, 4, 2, 5, 1, 4], 1500


def lookup_pvalue(model, n_samples=N_SAMPLES, n_tokens=N_TOKENS, prompt=SAMPLE_PROMPT, **kwargs):
    from chi_square import chi_square_pvalue

    sampler = make_sampler(temp=1.0)
    counts, drafted = {}, 0
    for i in range(n_samples):
        mx.random.seed(i)
        _, out = lookup(model, prompt, n_tokens, sampler=sampler, **kwargs)
        key = tuple(int(o[0]) for o in out)
        counts[key] = counts.get(key, 0) + 1
        drafted += sum(o[2] for o in out)
    seqs = list(itertools.product(range(V), repeat=n_tokens))
    logits = model(mx.array([prompt + list(s[:-1]) for s in seqs]))
    probs = np.array(mx.softmax(logits[:, len(prompt) - 1 :], axis=-1))
    exact = {
        s: float(np.prod([probs[i, t, tok] for t, tok in enumerate(s)])) for i, s in enumerate(seqs)
    }
    return chi_square_pvalue(counts, exact, n_samples), drafted


def test_verify_chain_golden():
    """The docstring's example: drafts [4, 7] against draws [4, 9, 2] and [4, 7, 2]."""

    def rows(*tokens):
        return mx.array(np.eye(10, dtype=np.float32)[list(tokens)] * 20)

    argmax = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    a, new, logprobs = verify_chain(rows(4, 9, 2), [4, 7], [1], argmax, [])
    assert (a, new, logprobs.shape) == (1, [4, 9], (3, 10))
    assert verify_chain(rows(4, 7, 2), [4, 7], [1], argmax, [])[:2] == (2, [4, 7, 2])
    assert verify_chain(rows(5), [], [1], argmax, [])[:2] == (0, [5])


def test_verify_tree_golden():
    """The docstring's example: drafts [4, 7, 5], 4 then 7 and 5 beside 4, against
    draws [5, 1, 3, 2] accept node 3; [4, 7, 3, 2] the path 0-1-2; a leaf's draw is
    the bonus token. Logits processors see each node's own path."""

    def rows(*tokens):
        return mx.array(np.eye(10, dtype=np.float32)[list(tokens)] * 20)

    argmax = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    parents = [-1, 0, 1, 0]
    path, new, logprobs = verify_tree(rows(5, 1, 3, 2), [4, 7, 5], parents, [1], argmax, [])
    assert (path, new, logprobs.shape) == ([0, 3], [5, 2], (2, 10))
    assert verify_tree(rows(4, 7, 3, 2), [4, 7, 5], parents, [1], argmax, [])[:2] == (
        [0, 1, 2], [4, 7, 3])  # fmt: skip
    seen = []

    def spy(history, logits):
        seen.append(history.tolist())
        return logits

    verify_tree(rows(4, 7, 3, 2), [4, 7, 5], parents, [9, 1], argmax, [spy])
    assert seen == [[9, 1], [9, 1, 4], [9, 1, 4, 7], [9, 1, 5]]


def test_plain_decoding_and_refusals():
    model = tiny_hybrid("qwen3_next")
    prompt = PROMPTS[0]
    got, records = lookup(model, prompt, 16, draft=None, speculative=False)
    assert got == plain_greedy(model, prompt, 16) and records[-1][3] == 16
    for kwargs, match in [
        (
            dict(draft=None),
            r"prompt lookup \(draft='ngram'\), a draft model, its lossless-mode streams"
            r".*or its attached drafter \(its MTP layer.*got draft=None",
        ),
        (dict(draft="streams+ngram"), "got draft='streams\\+ngram'"),
        (dict(draft_model=tiny_hybrid("qwen3_next")), "draft='ngram' with a draft_model"),
        (dict(tree_top_k=2, max_tree_nodes=4), "max_tree_nodes, tree_top_k: not supported"),
        (dict(pipeline=True), "pipeline: not supported"),
        (dict(acceptance="greedy"), "acceptance='greedy'"),
        (dict(max_kv_size=64), "max_kv_size: not supported"),
        (dict(prompt_cache=[RotatingKVCache(max_size=64)] * 4), r"got \['RotatingKVCache'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            lookup(model, prompt, 4, **{"draft": "ngram", **kwargs})
    with pytest.raises(ValueError, match="left_padding or lengths"):
        check_recurrent_cache([ArraysCache(2, left_padding=[1])])


def test_which_models_take_the_recurrent_path():
    """Recurrent states, alone or inside a CacheList, take it; attention-only models,
    sliding windows included, keep the tree verifier."""
    from helpers import tiny_model

    assert all(has_recurrent_layers(tiny_hybrid(arch)) for arch in HYBRIDS)
    model = tiny_model("llama")
    assert not has_recurrent_layers(model)
    model.make_cache = lambda: [RotatingKVCache(max_size=8), KVCache()]
    assert not has_recurrent_layers(model)
    model.make_cache = lambda: [KVCache(), CacheList(KVCache(), ArraysCache(2))]
    assert has_recurrent_layers(model)


def test_negative_control_falcon_h1_mixer_states_not_rolled_back(monkeypatch):
    """Falcon-H1 keeps each layer's mixer state in a CacheList beside its attention's
    KV cache: a roll-back blind to the states inside (the layers' own caches only)
    leaves the rejected drafts in the mixers, and the output changes."""
    model = tiny_hybrid("falcon_h1")
    assert all(type(c).__name__ == "CacheList" for c in model.make_cache())
    blind = property(lambda self: [c for c in self.cache if isinstance(c, ArraysCache)])
    monkeypatch.setattr(recurrent.ChainCache, "recurrent", blind)
    assert any(lookup(model, p, 40)[0] != plain_greedy(model, p, 40) for p in PROMPTS)


@pytest.mark.parametrize("pattern", ["M-*M", "*-M-", "-M*M"])
def test_nemotron_h_layers_without_a_cache_leave_every_mixer_split(pattern):
    """Nemotron-H's MLP layers keep no cache, so its caches are not one per layer.
    Mixers found by pairing layer i with cache i (before session 28) split the wrong
    modules: "M-*M" gave other tokens than plain decoding, the others were refused."""
    model = tiny_hybrid("nemotron_h", hybrid_override_pattern=pattern)
    got, records = lookup(model, PROMPTS[0], 40)
    assert got == plain_greedy(model, PROMPTS[0], 40) and sum(r[2] for r in records) > 0


def test_a_recurrent_state_written_twice_in_a_pass_is_refused():
    """Mixers are found by the cache they are handed (the layers' caches need not be
    one per layer: Nemotron-H's MLP layers keep none); two mixers writing one slot of a
    state could not be rolled back, and are refused (RWKV-7's two mixers write slots of
    their own: test_chain_models). Control: the model's own caches run."""
    model = tiny_hybrid("qwen3_next")  # (layers 0 and 2 recurrent)
    assert lookup(model, PROMPTS[0], 8)[0] == plain_greedy(model, PROMPTS[0], 8)
    shared = ArraysCache(2)
    model.make_cache = lambda: [shared, KVCache(), shared, KVCache()]
    with pytest.raises(ValueError, match="a recurrent state written twice in one pass"):
        lookup(model, PROMPTS[0], 8)
    model.make_cache = lambda: [CacheList(RotatingKVCache(8), ArraysCache(2))] * 4
    with pytest.raises(ValueError, match=r"got \['RotatingKVCache'\]"):
        lookup(model, PROMPTS[0], 4)


@pytest.mark.parametrize("arch, drafter", [("lfm2", "qwen3_next"), ("nanochat", "nanochat")])
def test_the_generate_command_runs_a_recurrent_model_directory(arch, drafter, tmp_path, capsys):
    """``--draft ngram`` and ``--draft-model`` on saved mlx-lm hybrid models, and on a
    model the tree verifier cannot take (nanochat, refused at load before session 31):
    the CLI's own comparison with mlx-lm's plain decoding says the output is identical;
    ``tune`` times prompt lookup on it (drafts per tree on LFM2, not on nanochat)."""
    from helpers import BASE, CHAIN_ARGS, HYBRID_ARGS
    from mlx_lm.utils import save_config, save_model

    gen_mod = importlib.import_module("mlx_specstream.generate")

    def write(arch, seed):
        path = tmp_path / f"{arch}-{seed}"
        path.mkdir()
        if arch in CHAIN_ARGS:
            model, args = tiny_chain_model(arch, 64, seed), {**BASE, **CHAIN_ARGS[arch]}
        else:
            model, args = tiny_hybrid(arch, vocab_size=64, seed=seed), HYBRID_ARGS[arch]
        save_model(path, model)
        save_config({**args, "vocab_size": 64, "model_type": arch}, path / "config.json")
        word_tokenizer(64).save_pretrained(str(path))
        return path

    path, small = write(arch, 0), write(drafter, 1)
    prompt = " ".join(f"t{i}" for i in [3, 9, 4, 3, 9, 4, 3, 9])
    common = ["--prompt", prompt, "--max-tokens", "24", "--ignore-chat-template", "--compare-plain"]
    for extra in (["--draft", "ngram"], ["--draft-model", str(small)]):
        gen_mod.main(["--model", str(path), *extra, *common])
        assert "Output identical to plain decoding: yes" in capsys.readouterr().out, extra
    # The tuner times prompt lookup's draft lengths against plain decoding on it too.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt}) + "\n")
    tune_mod = importlib.import_module("mlx_specstream.tune")
    tune_mod.main(["--model", str(path), "--prompts", str(prompts), "--num-prompts", "1",
                   "--max-tokens", "8", "--confirm-rounds", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert "{'draft': 'ngram', 'num_draft_tokens': 10}" in out and "one token per pass" in out
    # (drafts per tree: on LFM2, a tree through the verifier; nanochat takes chains only)
    assert ("ngram_candidates" in out) == (arch == "lfm2")
    with pytest.raises(ValueError, match="plain model.*--draft ngram"):  # (no streams)
        gen_mod.main(["--model", str(path), "--draft", "streams", "--prompt", prompt])


# ---- a draft model's chain --------------------------------------------------------


def test_a_copy_of_the_model_drafting_is_accepted_every_time():
    """A draft model with the model's own weights: every draft is accepted, so each pass
    yields num_draft_tokens + 1 tokens (control: the counts are exact)."""
    model, copy = tiny_hybrid("qwen3_next"), tiny_hybrid("qwen3_next")
    for k in (1, 3):
        got, records = lookup(model, PROMPTS[0], 24, draft=None, draft_model=copy,
                              num_draft_tokens=k)  # fmt: skip
        assert got == plain_greedy(model, PROMPTS[0], 24)
        assert records[-1][3] == -(-24 // (k + 1))
        assert sum(r[2] for r in records) == 24 - records[-1][3]


@pytest.mark.parametrize(
    "target, drafter",
    [("qwen3_next", "lfm2"), ("lfm2", "qwen3_next"), ("llama", "mamba2"), ("mamba2", "llama"),
     ("falcon_h1", "qwen3_next"), ("llama", "falcon_h1"), ("nanochat", "llama"),
     ("llama", "nanochat"), ("talkie", "nanochat")],
)  # fmt: skip
def test_draft_model_chains_equal_plain(target, drafter):
    """Hybrid, state-space and attention models drafting for each other (a model with
    recurrent layers on either side takes the chain loop, and so does a target the tree
    verifier cannot take; as a draft model it needs only its passes): mlx-lm's greedy
    output."""
    from helpers import CHAIN_ARGS, tiny_model

    def make(arch, seed):
        if arch in CHAIN_ARGS:
            return tiny_chain_model(arch, vocab_size=8, seed=seed)
        return tiny_hybrid(arch, seed=seed) if arch in HYBRIDS else tiny_model(arch, 8, seed)

    model, small = make(target, 0), make(drafter, 1)
    accepted = 0
    for prompt in PROMPTS:
        got, records = lookup(model, prompt, 32, draft=None, draft_model=small,
                              num_draft_tokens=3)  # fmt: skip
        assert got == plain_greedy(model, prompt, 32)
        accepted += sum(r[2] for r in records)
    assert accepted > 0, "no draft accepted: the test has no power"


def test_negative_control_a_draft_model_state_left_past_the_accepted_drafts():
    """Without going back to the last accepted draft, the draft model drafts from a state
    that holds rejected tokens: its drafts then rarely match a copy of the model."""
    model, copy = tiny_hybrid("qwen3_next"), tiny_hybrid("qwen3_next")
    real = recurrent.DraftModelChain.back_to
    _, records = lookup(model, PROMPTS[0], 24, draft=None, draft_model=copy, num_draft_tokens=3)
    full = sum(r[2] for r in records)
    recurrent.DraftModelChain.back_to = lambda self, end: None
    try:
        _, records = lookup(model, PROMPTS[0], 24, draft=None, draft_model=copy,
                            num_draft_tokens=3)  # fmt: skip
    finally:
        recurrent.DraftModelChain.back_to = real
    assert sum(r[2] for r in records) < full


def test_both_caches_hold_every_yielded_token():
    """Closed after each number of tokens: the model's cache as mlx-lm leaves it and the
    draft model's holding the same tokens, array for array; a follow-up call on the
    pair equals mlx-lm's."""
    model, small = tiny_hybrid("qwen3_next"), tiny_hybrid("qwen3_next", seed=1)
    prompt, follow = PROMPTS[2], [5, 6, 5, 6]
    for n in range(1, 12):
        pair = make_prompt_cache(model) + make_prompt_cache(small)
        gen = spec_generate_step(mx.array(prompt), model, draft_model=small, prompt_cache=pair,
                                 num_draft_tokens=3)  # fmt: skip
        yielded = [int(next(gen)[0]) for _ in range(n)]
        gen.close()
        theirs = make_prompt_cache(model)
        ref = generate_step(mx.array(prompt), model, prompt_cache=theirs)
        for _ in range(n):
            next(ref)
        ref.close()
        drafts = make_prompt_cache(small)
        small(mx.array(prompt + yielded)[None], cache=drafts)
        for a, b in zip(state_of(pair), state_of(theirs) + state_of(drafts)):
            assert mx.array_equal(a, b), n
        want = [t for t, _ in generate_step(mx.array(follow), model, max_tokens=12,
                                            prompt_cache=theirs)]  # fmt: skip
        got = lookup(model, follow, 12, draft=None, draft_model=small, prompt_cache=pair)[0]
        assert got == want, n


def test_plain_decoding_with_a_draft_model_keeps_its_cache_following():
    model, small = tiny_hybrid("qwen3_next"), tiny_hybrid("lfm2", seed=1)
    pair = make_prompt_cache(model) + make_prompt_cache(small)
    got, records = lookup(model, PROMPTS[1], 10, draft=None, draft_model=small,
                          speculative=False, prompt_cache=pair)  # fmt: skip
    assert got == plain_greedy(model, PROMPTS[1], 10) and records[-1][3] == 10
    assert pair[1].offset == pair[5].offset == len(PROMPTS[1]) + 10
    with pytest.raises(ValueError, match="must hold the model's 4 followed by the draft model's 4"):
        lookup(model, PROMPTS[1], 4, draft=None, draft_model=small, prompt_cache=pair[:4])


def test_drafts_from_a_larger_vocabulary_are_cut_to_the_model_s():
    """A draft model with 16 tokens drafting for a model with 8 drafts ids below 8 only
    (control: uncut, its drafts reach past the model's vocabulary)."""
    small = tiny_hybrid("qwen3_next", vocab_size=16, seed=1)

    def drafted(vocab_size):
        drafter = recurrent.DraftModelChain(small, None, vocab_size)
        drafter.tokens = list(PROMPTS[0])
        out = []
        for _ in range(10):
            d = drafter.draft(3)
            drafter.commit(1)
            drafter.tokens += d[:1] + [0]
            out += d
        return out

    assert max(drafted(8)) < 8
    assert max(drafted(None)) >= 8
    model = tiny_hybrid("qwen3_next")
    got, _ = lookup(model, PROMPTS[0], 16, draft=None, draft_model=small)
    assert got == plain_greedy(model, PROMPTS[0], 16)


def test_the_prompt_checkpoint_holds_all_but_the_prompt_s_last_token():
    """``prompt_checkpoint_callback`` gets the caches (with a draft model, both models')
    once they hold the prompt but its last token, array for array as a cache fed just
    those tokens; speculative or not. An attention model's caches are trimmed back
    instead: it is refused there."""
    import copy

    from helpers import tiny_model

    model, small = tiny_hybrid("qwen3_next"), tiny_hybrid("lfm2", seed=1)
    prompt = PROMPTS[0]
    want = make_prompt_cache(model) + make_prompt_cache(small)
    model(mx.array(prompt[:-1])[None], cache=want[:4])
    small(mx.array(prompt[:-1])[None], cache=want[4:])
    for kwargs in (dict(), dict(draft=None, draft_model=small), dict(speculative=False)):
        got = []
        _, records = lookup(model, prompt, 8, **kwargs,
                            prompt_checkpoint_callback=lambda c: got.append(copy.deepcopy(c)))  # fmt: skip
        assert len(got) == 1
        expected = want if "draft_model" in kwargs else want[:4]
        assert len(got[0]) == len(expected)
        for a, b in zip(state_of(got[0]), state_of(expected)):
            assert mx.array_equal(a, b), kwargs
    whole = make_prompt_cache(model)  # control: the whole prompt in differs
    model(mx.array(prompt)[None], cache=whole)
    assert not all(mx.array_equal(a, b) for a, b in zip(state_of(got[0]), state_of(whole)))
    with pytest.raises(ValueError, match="prompt_checkpoint_callback is for models with"):
        lookup(tiny_model("llama", 8), prompt, 4, prompt_checkpoint_callback=print)


def test_the_lru_keeps_the_prefixes_of_an_untrimmable_cache():
    from mlx_specstream.prompt_cache import PromptCacheLRU

    model = tiny_hybrid("qwen3_next")
    lru = PromptCacheLRU(max_size=4)
    for n in (4, 8):
        cache = make_prompt_cache(model)
        model(mx.array(PROMPTS[1][:n])[None], cache=cache)
        lru.insert(PROMPTS[1][:n], cache)
    assert lru.keys() == [PROMPTS[1][:4], PROMPTS[1][:8]]
    cache, n = lru.fetch(PROMPTS[1][:6] + [7, 7])
    assert n == 4 and cache[1].offset == 4  # the shorter one, whole: the longer runs past


def test_rejection_sampling_accepts_every_draft_of_a_copy_of_the_model():
    """Drafts drawn from the draft model's distribution and verified by rejection
    sampling: with the model's own weights drafting, p = q and every draft is accepted
    at T = 1, in ceil(n / (k + 1)) passes. Drawn target tokens compared with greedy
    drafts (``"target-sample"``) accept fewer on the same pair."""
    model, copy = tiny_hybrid("qwen3_next"), tiny_hybrid("qwen3_next")
    sampler = make_sampler(temp=1.0)
    passes = {}
    for acceptance in ("rejection", "target-sample"):
        mx.random.seed(0)
        _, records = lookup(model, PROMPTS[0], 24, draft=None, draft_model=copy, sampler=sampler,
                            num_draft_tokens=3, acceptance=acceptance)  # fmt: skip
        passes[acceptance] = records[-1][3]
    assert passes["rejection"] == 6 < passes["target-sample"]
    with pytest.raises(ValueError, match="needs the target distribution"):
        from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

        lookup(model, PROMPTS[0], 4, draft=None, draft_model=copy, acceptance="rejection",
               sampler=mlx_lm_sampler(temp=1.0))  # fmt: skip


def drawn_drafts(drafter: str):
    """A hybrid and the settings of chains drawn from a distribution: a draft model's,
    (3 tokens: the first pass drafts nothing) its own streams' (test_hybrid_streams), or
    an attached drafter's (a random ParallelSpec layer: recurrent.DrafterChains; the
    static tree of its levels, or a chain)."""
    if drafter.startswith("attached drafter"):  # (its config's tree, top-3; or a chain)
        model = attached_hybrid()
        chain = dict(num_draft_tokens=2) if drafter.endswith("chain") else {}
        return model, dict(n_tokens=3, draft=None, **chain)
    if drafter.startswith("stream"):  # (a tree of drawn drafts, or a chain)
        model = sampled(stream_hybrid)
        chain = dict(tree_top_k=1) if drafter == "stream chain" else {}
        return model, dict(n_tokens=3, draft="streams", **chain)
    model = sampled(tiny_hybrid)
    small = tiny_hybrid("lfm2", vocab_size=V, seed=1, weight_scale=1.0)
    return model, dict(draft=None, draft_model=small, num_draft_tokens=2)


DRAWN = ["draft model", "streams", "stream chain", "attached drafter", "attached drafter chain"]


@pytest.mark.parametrize("drafter", DRAWN)
def test_rejection_sampling_keeps_the_distribution(drafter, monkeypatch):
    model, kwargs = drawn_drafts(drafter)
    trees, real = [], recurrent.verify_tree
    monkeypatch.setattr(recurrent, "verify_tree",
                        lambda lg, d, p, *a: trees.append(p) or real(lg, d, p, *a))  # fmt: skip
    p, drafted = lookup_pvalue(model, **kwargs)
    assert bool(trees) == (drafter in ("streams", "attached drafter"))  # (drawn trees)
    assert drafted > N_SAMPLES // 20, "drafts were rarely accepted: the test has no power"
    assert p > 1e-3, f"chi-square p = {p:.2e}"


@pytest.mark.parametrize("drafter", DRAWN)
def test_negative_control_rejection_that_accepts_every_draft_is_caught(drafter, monkeypatch):
    def accept_all(tokens, parents, target_probs, draft_probs, uniforms, rows=None):
        path = [0]  # (down the first child of each node: a chain's every node)
        while path[-1] + 1 < len(parents) and parents[path[-1] + 1] == path[-1]:
            path.append(path[-1] + 1)
        return path, int(np.argmax(target_probs[path[-1]]))

    monkeypatch.setattr(recurrent, "accept_by_rejection", accept_all)
    model, kwargs = drawn_drafts(drafter)
    p, _ = lookup_pvalue(model, 500, **kwargs)
    assert p < 1e-6, f"accepting every draft passed (p = {p:.2e}): the test has no power"


def kv_bits_runs(qs_values=(0, 3, 9, 11, 14, 20)):
    """(tokens equal, largest log-probability difference) against mlx-lm's own loop with
    the same ``kv_bits`` options, per quantized_kv_start, prompt and drafter (lookup
    chains, a draft model, lookup trees)."""
    model = tiny_hybrid("qwen3_next", head_dim=32)  # (a head dimension a group divides)
    small = tiny_hybrid("lfm2", seed=1, num_attention_heads=2, num_key_value_heads=1)
    out = []
    for qs in qs_values:
        opts = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=qs, prefill_step_size=4)
        for prompt in PROMPTS:
            ref = list(generate_step(mx.array(prompt), model, max_tokens=24, **opts))
            for kwargs in (dict(), dict(draft=None, draft_model=small, num_draft_tokens=3),
                           dict(ngram_candidates=3, max_tree_nodes=8)):  # fmt: skip
                got, records = lookup(model, prompt, 24, **kwargs, **opts)
                diff = max(mx.abs(r[1] - lp).max().item() for r, (_, lp) in zip(records, ref))
                out.append((got == [int(t) for t, _ in ref], diff, sum(r[2] for r in records)))
    return out


def test_kv_bits_converts_where_mlx_lm_does():
    """``kv_bits`` on a hybrid model, with prompt lookup and a draft model: the KV layers
    convert where mlx-lm's loop converts them (before, during and after the prompt,
    prefilled in chunks of 4), so the tokens and every yielded log-probability equal
    mlx-lm's exactly."""
    runs = kv_bits_runs()
    assert all(same for same, _, _ in runs) and max(d for _, d, _ in runs) == 0.0
    assert sum(n for *_, n in runs) > 20, "drafts were rarely accepted: the test has no power"
    # A reused pair of caches gets the converted layers back, and continues as mlx-lm's.
    from mlx_lm.models.cache import QuantizedKVCache

    model = tiny_hybrid("qwen3_next", head_dim=32)
    small = tiny_hybrid("lfm2", seed=1, num_attention_heads=2, num_key_value_heads=1)
    opts = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=12)
    pair, theirs = make_prompt_cache(model) + make_prompt_cache(small), make_prompt_cache(model)
    for prompt in (PROMPTS[0], [5, 6, 5, 6]):
        want = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=10,
                                                 prompt_cache=theirs, **opts)]  # fmt: skip
        got = lookup(model, prompt, 10, draft=None, draft_model=small, prompt_cache=pair, **opts)
        assert got[0] == want
    assert isinstance(pair[1], QuantizedKVCache) and isinstance(pair[5], QuantizedKVCache)


def test_negative_control_a_pass_across_the_conversion_differs(monkeypatch):
    """Passes allowed to reach past the position where mlx-lm converts: some positions
    then attend to a full-precision cache where mlx-lm's attend to a quantized one."""
    from mlx_specstream.cache import KVQuantizer

    monkeypatch.setattr(KVQuantizer, "full_precision_room", lambda self, cache: None)
    assert max(d for _, d, _ in kv_bits_runs((11, 14))) > 1e-3


# ---- RecurrentGemma: a local-attention window beside recurrent blocks -------------------


def test_reads_mask_golden():
    """RecurrentGemma's recurrent blocks are handed the attention's mask and never read
    it; Mamba 2's mixer reads its mask."""
    gemma, mamba = tiny_hybrid("recurrent_gemma"), tiny_hybrid("mamba2")
    blocks = [layer.temporal_block for layer in gemma.layers]
    assert [recurrent.reads_mask(b) for b in blocks] == [False, False, True, False]
    assert recurrent.reads_mask(mamba.layers[0].mixer)


@pytest.mark.parametrize("num_draft_tokens", [4, 12])
def test_recurrent_gemma_window_layer_drops_rows_and_stays_exact(num_draft_tokens, monkeypatch):
    """Its window layer keeps a ``WindowKVCache`` (mlx-lm's rotating cache could not be
    cut): lookup chains shorter and longer than the window equal plain decoding past
    it, the layer holds at most 3 windows, and no trim is cut short at its bound.
    Control: masks blind to the window."""
    from test_sliding_window import blind_to_windows

    from mlx_specstream.cache import WindowKVCache

    cut, trim = [], WindowKVCache.trim

    def spy(self, n):
        if n > self.trimmable():
            cut.append(n)
        return trim(self, n)

    monkeypatch.setattr(WindowKVCache, "trim", spy)
    model = tiny_hybrid("recurrent_gemma")
    for prompt in PROMPTS:
        from mlx_specstream import make_prompt_cache as ours

        cache = ours(model)
        got, _ = lookup(model, prompt, 60, num_draft_tokens=num_draft_tokens, prompt_cache=cache)
        assert got == plain_greedy(model, prompt, 60)
        window = cache[2]
        assert type(window) is WindowKVCache and window.start > 0
        assert window.offset - window.start <= 3 * 8 and not cut
    blind_to_windows(monkeypatch)
    assert lookup(model, PROMPTS[0], 60)[0] != plain_greedy(model, PROMPTS[0], 60)


def test_recurrent_gemma_mixers_that_read_a_mask_are_still_refused(monkeypatch):
    """Control of ``reads_mask``: taken to read it, the recurrent blocks refuse the split
    pass, as mixers that read a padding mask do."""
    monkeypatch.setattr(recurrent, "reads_mask", lambda module: True)
    with pytest.raises(ValueError, match="takes no mask"):
        lookup(tiny_hybrid("recurrent_gemma", seed=7), PROMPTS[0], 20)


def test_nemotron_h_caches_pair_with_its_mixer_and_attention_layers():
    """Nemotron-H makes caches for its Mamba and attention layers only (pattern
    ``-M*M``: 3 caches for 4 layers); ``cache_slots`` pairs them in order, so the
    tree verifier knows which layers are recurrent (lookup trees run on it)."""
    from mlx_specstream.model_parts import cache_slots
    from mlx_specstream.support import tree_on_chains_refusal

    model = tiny_hybrid("nemotron_h")
    assert [layer.block_type for layer in model.layers] == ["-", "M", "*", "M"]
    assert cache_slots(model) == [None, 0, 1, 2] and tree_on_chains_refusal(model) is None


def test_lookup_merged_golden():
    """Lookup's drafts go first, the drafter's after them under the cap; a chain stays one;
    without a match the drafts are as given."""
    from mlx_specstream.ngram import NgramIndex
    from mlx_specstream.recurrent import lookup_merged

    history = [5, 6, 7, 5, 6]
    assert lookup_merged(NgramIndex(), history, [9], None, 3, 16) == (
        [7, 5, 6, 9],
        [-1, 0, 1, 2, 0],
    )
    assert lookup_merged(NgramIndex(), history, [7, 8], None, 3, 16) == (
        [7, 5, 6, 8],
        [-1, 0, 1, 2, 1],
    )
    assert lookup_merged(NgramIndex(), history, [9], None, 3, 3) == ([7, 5], None)
    assert lookup_merged(NgramIndex(), [1, 2, 3], [9, 4], [-1, 0, 0], 3, 16) == ([9, 4], [-1, 0, 0])

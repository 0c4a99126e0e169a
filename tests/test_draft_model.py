"""Draft-model decoding (``draft_model=``, as mlx-lm's) through the tree verifier:
greedy output equals plain decoding and mlx-lm's own draft-model decoding, a draft
model with the base's weights has every draft accepted (its cache follows the
base's), sampling keeps the distribution, and a reused prompt cache holds the
model's layers then the draft model's, as mlx-lm keeps them."""

import math

import mlx.core as mx
import pytest
from helpers import plain_greedy, spec_tokens, tiny_model
from mlx.utils import tree_map
from mlx_lm.models.cache import make_prompt_cache

import mlx_specstream.decode as decode
from mlx_specstream.draft_model import draft_model_tree

PROMPT = [4, 8, 15, 16, 23]


def noisy_copy(arch="llama", scale=0.005, **kw):
    """The base's weights plus noise: it drafts right often, not always."""
    model = tiny_model(arch, **kw)
    mx.random.seed(11)
    model.update(tree_map(lambda w: w + scale * mx.random.normal(w.shape), model.parameters()))
    mx.eval(model.parameters())
    return model


def all_accepted_passes(n_tokens, k):
    """Passes when every draft is accepted: each pass yields ``k + 1`` tokens, the
    first one too (the draft model drafts after the prompt, as mlx-lm's loop does)."""
    return math.ceil(n_tokens / (k + 1))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tree", [dict(num_draft_tokens=3), dict(num_draft_tokens=2, tree_top_k=2)])
def test_greedy_equals_plain_decoding(arch, tree):
    base = tiny_model(arch)
    ref = plain_greedy(base, PROMPT, 48)
    same = tiny_model(arch)  # the base's weights: every draft is right
    toks, out = spec_tokens(base, PROMPT, 48, draft_model=same, **tree)
    assert toks == ref
    assert out[-1][3] == all_accepted_passes(48, tree["num_draft_tokens"])
    for draft in (noisy_copy(arch), tiny_model(arch, seed=5)):
        toks, out = spec_tokens(base, PROMPT, 48, draft_model=draft, **tree)
        assert toks == ref
    assert out[-1][3] > all_accepted_passes(48, tree["num_draft_tokens"])  # (a poor drafter)


def test_partly_right_drafts_are_accepted_and_output_stays_exact():
    """A noisy copy drafts right part of the time: some passes accept drafts,
    some none, so the draft cache keeps some fed drafts and trims others."""
    base = tiny_model("llama")
    ref = plain_greedy(base, PROMPT, 64)
    toks, out = spec_tokens(base, PROMPT, 64, draft_model=noisy_copy(), num_draft_tokens=3)
    assert toks == ref
    passes = out[-1][3]
    assert all_accepted_passes(64, 3) < passes < 48, passes


# A prompt that the tiny models' greedy text (vocabulary 8) repeats parts of.
LOOKUP_PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_lookup_merged_in_equals_plain_and_saves_passes(arch):
    """``draft="ngram"`` with a draft model: its tree and the prompt-lookup chain in
    one tree. Output equals plain decoding, in fewer passes than either source
    alone (a poor draft model and a noisy copy)."""
    base = tiny_model(arch, vocab_size=8)
    ref = plain_greedy(base, LOOKUP_PROMPT, 48)
    _, lookup = spec_tokens(base, LOOKUP_PROMPT, 48, draft="ngram")
    for draft in (tiny_model(arch, vocab_size=8, seed=5), noisy_copy(arch, 0.05, vocab_size=8)):
        _, alone = spec_tokens(base, LOOKUP_PROMPT, 48, draft_model=draft, num_draft_tokens=3)
        toks, both = spec_tokens(
            base, LOOKUP_PROMPT, 48, draft_model=draft, num_draft_tokens=3, draft="ngram"
        )
        assert toks == ref
        assert both[-1][3] < min(alone[-1][3], lookup[-1][3]), (both[-1], alone[-1], lookup[-1])


def accept_first_child(real):
    """``decode._accept`` (``real``) that also takes the root's first child unchecked: the
    equality tests' control."""

    def accept(tokens, parents, ancestors, targets, depth):
        _, last = real(tokens, parents, ancestors, targets, depth)
        return None, mx.maximum(last, mx.array(1 if tokens.size > 1 else 0))

    return accept


def generate_cli_gives(tmp_path, capsys, monkeypatch, flags, key):
    """Runs the generate CLI with ``--compare-plain`` on a tiny pair (``--draft-model``) with
    ``flags``; checks its output equals plain decoding, and returns the values of the
    generator's keyword ``key`` it was called with."""
    import importlib

    gen_mod = importlib.import_module("mlx_specstream.generate")  # (the module, not the function)
    base = write_model(tmp_path / "base")
    small = write_model(tmp_path / "small", seed=3)
    given, real = [], decode.spec_generate_step

    def recording(*args, **kwargs):
        given.append(kwargs.get(key))
        return real(*args, **kwargs)

    monkeypatch.setattr(gen_mod, "spec_generate_step", recording)
    gen_mod.main(["--model", str(base), "--draft-model", str(small), "--prompt", "t4 t8 t15",
                  "--max-tokens", "12", "--compare-plain", "--ignore-chat-template", *flags])  # fmt: skip
    assert "Output identical to plain decoding: yes" in capsys.readouterr().out
    return given


@pytest.mark.parametrize("draft", [None, "ngram"])
def test_negative_control_unchecked_drafts_break_equality(monkeypatch, draft):
    """Accepting the first child without checking it: the equality test fails."""
    base = tiny_model("llama")
    ref = plain_greedy(base, PROMPT, 32)
    monkeypatch.setattr(decode, "_accept", accept_first_child(decode._accept))
    toks, _ = spec_tokens(base, PROMPT, 32, draft_model=tiny_model("llama", seed=5), draft=draft)
    assert toks != ref


def test_equals_mlx_lm_draft_model_decoding():
    from mlx_lm.generate import speculative_generate_step

    base, draft = tiny_model("llama"), noisy_copy()
    theirs = [
        (int(t), from_draft)
        for t, _, from_draft in speculative_generate_step(
            mx.array(PROMPT), base, draft, num_draft_tokens=3, max_tokens=40
        )
    ]
    ours, out = spec_tokens(base, PROMPT, 40, draft_model=draft, num_draft_tokens=3)
    assert [t for t, *_ in theirs] == ours
    # The same drafts accepted at the same steps, so as many passes: a pass ends at each
    # token not from a draft, and at the end (mlx-lm's last pass may yield drafts only).
    flags = [from_draft for _, from_draft in theirs]
    assert [from_draft for *_, from_draft, _ in out][:-2] == flags[:-2]
    assert out[-1][3] == flags.count(False) + flags[-1]


@pytest.mark.parametrize("vocab", [70, 60])
def test_a_draft_vocabulary_of_another_size_is_cut_or_padded(vocab):
    """Draft logits over more tokens are cut to the model's, over fewer padded
    with -inf (as Qwen sizes differ in padding): output stays exact."""
    base = tiny_model("llama")
    ref = plain_greedy(base, PROMPT, 32)
    draft = tiny_model("llama", vocab_size=vocab, seed=3)
    toks, _ = spec_tokens(base, PROMPT, 32, draft_model=draft, num_draft_tokens=3, tree_top_k=2)
    assert toks == ref


@pytest.mark.parametrize("draft", [None, "ngram"])
def test_a_reused_prompt_cache_holds_both_models_as_mlx_lm_s(draft):
    """Turn by turn, the answers equal mlx-lm's plain generate_step with its own
    cache; both halves of the cache hold the same tokens after every call, one
    closed early; drafts stay all accepted with the base's weights (the draft
    cache follows the conversation, also where a lookup chain was accepted
    instead of its drafts). Control: a draft cache one token short is refused."""
    from mlx_lm.generate import generate_step

    base, same = tiny_model("llama"), tiny_model("llama")
    ours = make_prompt_cache(base) + make_prompt_cache(same)
    theirs = make_prompt_cache(base)
    turns = [([4, 8, 15], 20, None), ([16, 23], 16, 5), ([42, 7, 9, 3], 24, None)]
    for prompt, n, close_after in turns:
        ref = []
        for t, _ in generate_step(mx.array(prompt), base, max_tokens=n, prompt_cache=theirs):
            ref.append(int(t))
            if close_after and len(ref) == close_after:
                break
        gen = decode.spec_generate_step(
            mx.array(prompt), base, max_tokens=n, prompt_cache=ours, draft_model=same,
            num_draft_tokens=3, draft=draft,
        )  # fmt: skip
        got, passes = [], 0
        for t, _, _, passes in gen:
            got.append(t)
            if close_after and len(got) == close_after:
                gen.close()
                break
        assert got == ref
        if not close_after:  # (a lookup chain longer than the drafts may be accepted)
            assert (
                (passes <= all_accepted_passes(n, 3))
                if draft
                else (passes == all_accepted_passes(n, 3))
            )
        assert ours[0].offset == ours[-1].offset == theirs[0].offset
    for c in ours[len(base.layers) :]:
        c.trim(1)
    with pytest.raises(ValueError, match="draft model's layers hold"):
        next(decode.spec_generate_step(mx.array([5]), base, prompt_cache=ours, draft_model=same))


def test_plain_decoding_keeps_the_draft_cache_in_step():
    """``speculative=False`` with a draft model: mlx-lm's plain loop, and the draft
    model's cache takes in the same tokens."""
    base, same = tiny_model("llama"), tiny_model("llama")
    cache = make_prompt_cache(base) + make_prompt_cache(same)
    toks, _ = spec_tokens(base, PROMPT, 12, draft_model=same, prompt_cache=cache, speculative=False)
    assert toks == plain_greedy(base, PROMPT, 12)
    assert cache[0].offset == cache[-1].offset == len(PROMPT) + 12
    toks, out = spec_tokens(base, [3, 1], 16, draft_model=same, prompt_cache=cache)
    assert out[-1][3] == all_accepted_passes(16, 2)


def test_bad_input_is_named():
    base, draft = tiny_model("llama"), tiny_model("llama", seed=5)
    cases = [
        (dict(prompt_cache=make_prompt_cache(base)), "prompt_cache holds"),
        (dict(draft="streams+ngram"), "streams are off"),
        (dict(tree_depth=5, num_draft_tokens=3), "tree_depth"),
        (dict(num_draft_tokens=0), "num_draft_tokens=0"),
        (dict(tree_top_k=[2, 2, 2], num_draft_tokens=2), "tree_top_k"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            next(decode.spec_generate_step(mx.array(PROMPT), base, draft_model=draft, **kwargs))


def test_draft_model_tree_golden():
    assert draft_model_tree(3) == ([1, 1, 1], 3, 0.0, 4)
    assert draft_model_tree(2, tree_top_k=[2]) == ([2, 1], 2, 0.0, 5)
    assert draft_model_tree(2, tree_top_k=3) == ([3, 3], 2, 0.0, 13)
    assert draft_model_tree(2, tree_top_k=3, max_tree_nodes=6) == ([3, 3], 2, 0.0, 6)


def sampled_pair():
    """The sampling tests' model and draft model (vocabulary of 6). Two layers keep the
    draws cheap; of draft seeds 1-6, seed 3's shows the next level's q control's bias most
    (p 9e-42 at 1500 draws, against 4e-4 to 2e-22)."""
    kw = dict(
        vocab_size=6, weight_scale=1.0, hidden_size=32, intermediate_size=64, num_hidden_layers=2
    )
    return tiny_model("llama", **kw), tiny_model("llama", seed=3, **kw)


def drawn_chains(monkeypatch, n, **kwargs):
    """Chi-square p-value of ``n`` rejection-sampled generations of the sampling pair
    (temperature 1, 3 tokens, the draft model's options ``kwargs``) against the model's
    exact distribution, and the set of lengths of the chains the draft model drew."""
    from chi_square import chi_square_pvalue
    from test_sampling import exact_distribution, sample_counts

    import mlx_specstream.draft_model as draft_model_mod
    from mlx_specstream.sample_utils import make_sampler

    base, draft = sampled_pair()
    lengths, real = set(), draft_model_mod.DraftModel._draft

    def recording(self, *args):
        out = real(self, *args)
        lengths.add(self.drafted)
        return out

    monkeypatch.setattr(draft_model_mod.DraftModel, "_draft", recording)
    sampler = make_sampler(temp=1.0)
    counts = sample_counts(base, sampler, n, acceptance="rejection", draft_model=draft, **kwargs)
    return chi_square_pvalue(counts, exact_distribution(base, sampler), n), lengths


def draft_model_pvalue(n):
    """Chi-square p-value of ``n`` rejection-sampled generations with a draft model
    against the model's exact distribution (vocabulary of 6, 3 tokens)."""
    from chi_square import chi_square_pvalue
    from test_sampling import exact_distribution, sample_counts

    from mlx_specstream.sample_utils import make_sampler

    base, draft = sampled_pair()
    sampler = make_sampler(temp=1.0)
    counts = sample_counts(
        base, sampler, n, acceptance="rejection", draft_model=draft, num_draft_tokens=2,
        tree_top_k=2,
    )  # fmt: skip
    return chi_square_pvalue(counts, exact_distribution(base, sampler), n)


def test_sampling_keeps_the_distribution():
    """Rejection sampling against the draft model's own distributions (target
    sampling takes its drafts as any deterministic proposal, as prompt lookup's)."""
    p = draft_model_pvalue(1000)
    assert p > 1e-3, f"chi-square p = {p:.2e}"


def test_sampling_with_prompt_lookup_merged_in_keeps_the_distribution():
    """The draft model's tree with a lookup chain merged in, verified by target
    sampling (a lookup chain is a deterministic proposal); the vocabulary of 6
    makes the lookup find a match most steps. Control: drafts accepted unchecked."""
    from chi_square import chi_square_pvalue
    from test_sampling import exact_distribution, sample_counts

    from mlx_specstream.sample_utils import make_sampler

    base, draft = sampled_pair()
    sampler = make_sampler(temp=1.0)
    exact = exact_distribution(base, sampler)

    def pvalue(n):
        counts = sample_counts(base, sampler, n, draft_model=draft, num_draft_tokens=2,
                               draft="ngram")  # fmt: skip
        return chi_square_pvalue(counts, exact, n)

    p = pvalue(1000)
    assert p > 1e-3, f"chi-square p = {p:.2e}"
    # Control: the first child accepted unchecked (as in the greedy control) fails.
    real = decode._accept

    def accept_first_child(tokens, parents, ancestors, targets, depth):
        _, last = real(tokens, parents, ancestors, targets, depth)
        return None, mx.maximum(last, mx.array(1 if tokens.size > 1 else 0))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode, "_accept", accept_first_child)
        p = pvalue(400)
    assert p < 1e-6, f"unchecked drafts passed (p = {p:.2e}): no power"


def test_negative_control_drafts_verified_against_another_level_s_q_fail(monkeypatch):
    from test_sampling import verify_against_the_next_level_s_q

    verify_against_the_next_level_s_q(monkeypatch)
    p = draft_model_pvalue(1500)
    assert p < 1e-6, f"mismatched draft distributions passed (p = {p:.2e}): no power"


def write_model(path, vocab_size=64, seed=0):
    """A tiny mlx-lm model directory with a word-level tokenizer."""
    from helpers import ARCH_ARGS, BASE, word_tokenizer
    from mlx_lm.utils import save_config, save_model

    model = tiny_model("llama", vocab_size=vocab_size, seed=seed)
    path.mkdir()
    save_model(path, model)
    save_config({**BASE, **ARCH_ARGS["llama"], "vocab_size": vocab_size, "model_type": "llama"},
                path / "config.json")  # fmt: skip
    word_tokenizer(vocab_size).save_pretrained(str(path))
    return path


def test_generate_cli_takes_mlx_lm_s_draft_model_flags(tmp_path, capsys):
    """``--draft-model`` and ``--num-draft-tokens`` as ``mlx_lm.generate`` takes them:
    a plain mlx-lm model, the output identical to plain decoding (its own
    ``--compare-plain`` check), every draft accepted with the base's weights;
    a draft model with another vocabulary is refused, naming both sizes."""
    import importlib

    gen_mod = importlib.import_module("mlx_specstream.generate")
    base = write_model(tmp_path / "base")
    same = write_model(tmp_path / "same")
    argv = ["--model", str(base), "--draft-model", str(same), "--prompt", "t4 t8 t15",
            "--max-tokens", "17", "--compare-plain", "--ignore-chat-template"]  # fmt: skip
    gen_mod.main(argv + ["--num-draft-tokens", "4"])
    out = capsys.readouterr().out
    assert "Output identical to plain decoding: yes" in out
    assert "Forward passes: 4," in out  # ceil(17 / 5)
    gen_mod.main(argv)  # mlx_lm.generate's default: 3 drafts
    assert "Forward passes: 5," in capsys.readouterr().out  # ceil(17 / 4)
    other = write_model(tmp_path / "other", vocab_size=70)
    with pytest.raises(ValueError, match="70 tokens, the model's 64"):
        gen_mod.main(["--model", str(base), "--draft-model", str(other), "--prompt", "t1"])


def test_kv_bits_quantize_both_caches_and_the_reused_cache_holds_them():
    """``kv_bits`` with a draft model: greedy output equals mlx-lm's with the same
    options, turn after turn; both models' layers in the user's cache are the
    converted (quantized) ones, holding the same tokens, also after a plain call."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import QuantizedKVCache

    heads = dict(num_attention_heads=2, num_key_value_heads=1)  # head_dim 32: groups of 32
    base, draft = tiny_model("llama", **heads), noisy_copy(**heads)
    kv = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=12)
    ours = make_prompt_cache(base) + make_prompt_cache(draft)
    theirs = make_prompt_cache(base)
    turns = [([4, 8, 15], 16, {}), ([16, 23], 12, dict(speculative=False)), ([9], 12, {}),
             ([4, 8, 15, 16], 16, dict(draft="ngram"))]  # fmt: skip
    for prompt, n, options in turns:
        ref = [
            int(t)
            for t, _ in generate_step(
                mx.array(prompt), base, max_tokens=n, prompt_cache=theirs, **kv
            )
        ]
        got, _ = spec_tokens(base, prompt, n, draft_model=draft, prompt_cache=ours, **options, **kv)
        assert got == ref
        assert all(type(c) is QuantizedKVCache for c in ours)
        assert ours[0].offset == ours[-1].offset == theirs[0].offset

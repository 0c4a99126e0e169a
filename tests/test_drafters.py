"""Medusa-1 heads and the ParallelSpec drafter in the MLX runtime: greedy output
equals plain decoding (several architectures and dtypes), sampling keeps the
distribution, the ParallelSpec drafter's cached passes equal a from-scratch
pass over the accepted text (mask K/V never stay), and bad configs are refused."""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_lossless, plain_greedy, spec_tokens, tiny_model
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.base import create_causal_mask

import mlx_specstream.drafters as drafters
from mlx_specstream import load
from mlx_specstream.config import DrafterConfig
from mlx_specstream.drafters import attach_drafter
from mlx_specstream.utils import save

KINDS = ("medusa", "parallelspec")


def drafter_model(kind, arch="llama", dtype=None, quant_bits=None, weight_scale=4.0, seed=0, **cfg):
    model = tiny_model(arch, dtype=dtype, quant_bits=quant_bits, weight_scale=weight_scale)
    cfg = {"num_draft_tokens": 3, "top_k": 2, "max_tree_nodes": 10, **cfg}
    attach_drafter(model, DrafterConfig(kind=kind, **cfg), seed=seed)
    return model


def zero_drafter(model):
    """Medusa heads at their zero initialisation: each predicts the base's own
    next token, which is right whenever the model repeats itself."""
    d = model.speculative_streams.drafter
    d.update(tree_map(mx.zeros_like, d.parameters()))


CASES = [
    ("medusa", "llama", None, None),
    ("medusa", "qwen2", mx.bfloat16, None),
    ("medusa", "phi3", mx.float16, None),
    ("parallelspec", "llama", None, None),
    ("parallelspec", "qwen3", mx.bfloat16, None),
    ("parallelspec", "starcoder2", None, None),
    ("parallelspec", "llama", None, 4),
]


@pytest.mark.parametrize("kind,arch,dtype,bits", CASES)
def test_greedy_equals_plain_decoding(kind, arch, dtype, bits):
    model = drafter_model(kind, arch, dtype=dtype, quant_bits=bits)
    for prompt in ([3], [1, 5, 9, 3, 7, 2, 11]):
        ref = plain_greedy(model, prompt, 48)
        toks, out = spec_tokens(model, prompt, 48)
        assert_lossless(model, prompt, toks, ref)
        assert out[-1][3] <= len(toks)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_with_accepted_drafts_equals_plain(kind):
    """A low-weight model repeats itself, so drafts get accepted (fewer passes
    than tokens) and the accept path is exercised, not only rejections."""
    model = drafter_model(kind, weight_scale=1.0, top_k=3, max_tree_nodes=20)
    if kind == "medusa":
        zero_drafter(model)
    prompt = [4, 8, 15, 16, 23]
    ref = plain_greedy(model, prompt, 64)
    toks, out = spec_tokens(model, prompt, 64)
    assert toks == ref
    if kind == "medusa":
        assert out[-1][3] < len(toks) / 2


def test_negative_control_wrong_verification_is_caught(monkeypatch):
    """Accepting the drafter's first child without checking it breaks equality:
    the lossless test above can fail."""
    import mlx_specstream.decode as decode

    real = decode._accept

    def accept_first_child(tokens, parents, ancestors, targets, depth):
        _, last = real(tokens, parents, ancestors, targets, depth)
        return None, mx.maximum(last, mx.array(1 if tokens.size > 1 else 0))

    model = drafter_model("medusa")
    ref = plain_greedy(model, [1, 5, 9], 32)
    monkeypatch.setattr(decode, "_accept", accept_first_child)
    toks, _ = spec_tokens(model, [1, 5, 9], 32)
    assert toks != ref


def standalone_levels(model, ids, a):
    """``(k, V)`` draft logits at position ``a`` of ``ids`` from scratch: the base's
    states over ``ids[:a + 1]``, then (ParallelSpec) one causal drafter pass over
    real rows ``0..a`` (row ``i`` paired with ``ids[i + 1]``) and the masks."""
    rt = model.speculative_streams
    d = rt.drafter
    h = rt.prefill(mx.array(ids[: a + 1]), None, keep_hidden=True)
    if getattr(rt.config, "medusa", None) is not None:  # (a released checkpoint's heads)
        return d.draft_rows(rt, h[a][None])[0]
    if isinstance(d, drafters.MedusaHeads):
        return rt.head(mx.concatenate([head(h[a][None]) for head in d.heads])[None])[0]
    emb = rt.embed(mx.array(ids[1 : a + 2])).astype(h.dtype)
    real = d.fc(mx.concatenate([h, emb], axis=-1))
    x = mx.concatenate([real, d.masks], axis=0)[None]
    out = d.layer(x, create_causal_mask(x.shape[1]), None)  # (DSA's indexer takes an array)
    return rt.head(out[:, -d.masks.shape[0] - 1 :])[0]


@pytest.mark.parametrize(
    "kind,arch", [(kind, "llama") for kind in KINDS] + [("parallelspec", "deepseek_v32")]
)
def test_cached_drafts_equal_from_scratch_drafts(kind, arch, monkeypatch):
    """Every step's draft logits equal a from-scratch pass over the accepted
    text plus the bonus token; the drafter cache keeps real rows only. On DeepSeek
    V3.2 (sparse attention, past 6 keys) the drafter's layer keeps its latent and
    indexer keys in one cache (``drafters.new_layer_cache``)."""
    model = drafter_model(kind, arch, weight_scale=1.0, top_k=3, max_tree_nodes=20)
    if kind == "medusa":
        zero_drafter(model)
    seen = []
    real_draft = type(model.speculative_streams.drafter).draft

    def recording(self, rt, state, hidden, path, path_tokens, token, levels=None):
        logits = real_draft(self, rt, state, hidden, path, path_tokens, token, levels)
        a = rt._tree[4] + len(path) - 1  # committed prefix + accepted nodes - 1
        offset = None if state.cache is None else state.cache.offset
        seen.append((np.array(logits.astype(mx.float32)), a, token, offset))
        return logits

    def recording_at(self, rt, hidden, node, levels=None):  # Medusa: in the step's graph
        logits = real_draft_at(self, rt, hidden, node, levels)
        a = rt._tree[4] + int(rt._kept_layout.depth[node.item()])
        seen.append((np.array(logits.astype(mx.float32)), a, None, None))
        return logits

    if kind == "medusa":
        real_draft_at = type(model.speculative_streams.drafter).draft_at
        monkeypatch.setattr(type(model.speculative_streams.drafter), "draft_at", recording_at)
    else:
        monkeypatch.setattr(type(model.speculative_streams.drafter), "draft", recording)
    prompt = [4, 8, 15, 16, 23]
    toks, _ = spec_tokens(model, prompt, 40, tree_top_k=3, max_tree_nodes=20)
    text = prompt + toks
    monkeypatch.undo()
    checked = 0
    for logits, a, token, offset in seen:
        if a + 1 >= len(text):
            continue  # the drafts of the very last step go unused
        assert token is None or text[a + 1] == token  # the bonus follows the last accepted node
        expected = np.array(standalone_levels(model, text, a).astype(mx.float32))
        expected = expected[: logits.shape[0]]  # (Medusa: the heads the tree reads)
        np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=2e-4)
        if offset is not None:
            assert offset == a + 1  # real rows 0..a, no [MASK] rows
        checked += 1
    assert checked >= len(seen) - 1 and checked > 5


def test_drafter_levels_shift_with_the_text(monkeypatch):
    """Negative control for the check above: drafts of a shifted position differ."""
    model = drafter_model("parallelspec")
    text = [4, 8, 15, 16, 23, 42, 7, 9]
    a = np.array(standalone_levels(model, text, 5))
    b = np.array(standalone_levels(model, text, 4))
    assert not np.allclose(a, b, atol=1e-3)


# The sampling tests' model: two layers (four before) keep their many draws cheap.
SAMPLED_MODEL = dict(
    vocab_size=6, weight_scale=1.0, hidden_size=32, intermediate_size=64, num_hidden_layers=2
)


def test_sampling_with_drafters_keeps_the_distribution():
    from chi_square import chi_square_pvalue
    from test_sampling import exact_distribution, sample_counts

    from mlx_specstream.sample_utils import make_sampler

    n = 1500
    for kind, acceptance, temp in (
        ("medusa", "rejection", 1.0),
        ("parallelspec", "target-sample", 0.7),
    ):
        model = tiny_model("llama", **SAMPLED_MODEL)
        attach_drafter(model, DrafterConfig(kind=kind, num_draft_tokens=2, top_k=2), seed=3)
        sampler = make_sampler(temp=temp)
        counts = sample_counts(model, sampler, n, acceptance=acceptance)
        p = chi_square_pvalue(counts, exact_distribution(model, sampler), n)
        assert p > 1e-3, f"{kind} {acceptance}: chi-square p = {p:.2e}"


def test_medusa_rejection_drawn_at_every_node_keeps_the_distribution(monkeypatch):
    """Where rows cost little (``stream_logits_in_pass``, a GPU's default), Medusa's
    next drafts are drawn at every node before the walk: no draft after it (one
    host read), and the distribution is the model's. Control: the same draws
    verified against the next level's draft distribution fail."""
    from chi_square import chi_square_pvalue
    from test_sampling import (
        exact_distribution,
        sample_counts,
        verify_against_the_next_level_s_q,
    )

    from mlx_specstream.sample_utils import make_sampler
    from mlx_specstream.streams import get_runtime

    def after_the_walk(*args):
        raise AssertionError("the heads drafted after the walk: a second host read")

    monkeypatch.setattr(drafters.MedusaHeads, "draft", after_the_walk)
    model = tiny_model("llama", **SAMPLED_MODEL)
    attach_drafter(model, DrafterConfig(kind="medusa", num_draft_tokens=2, top_k=2), seed=3)
    get_runtime(model).stream_logits_in_pass = True
    sampler, n = make_sampler(temp=1.0), 1500
    exact = exact_distribution(model, sampler)
    counts = sample_counts(model, sampler, n, acceptance="rejection")
    p = chi_square_pvalue(counts, exact, n)
    assert p > 1e-3, f"chi-square p = {p:.2e}"

    verify_against_the_next_level_s_q(monkeypatch)
    counts = sample_counts(model, sampler, n, acceptance="rejection")
    p = chi_square_pvalue(counts, exact, n)
    assert p < 1e-6, f"mismatched draft distributions passed (p = {p:.2e}): no power"


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip_and_drafter_flag(kind, tmp_path):
    from helpers import word_tokenizer

    model = drafter_model(kind)
    tok = word_tokenizer()
    path = save(tmp_path / "m", model, tok)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["drafter"]["kind"] == kind and "speculative_streaming" not in cfg
    loaded, _ = load(str(path))
    a = dict(tree_flatten(model.speculative_streams.drafter.parameters()))
    b = dict(tree_flatten(loaded.speculative_streams.drafter.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    assert spec_tokens(loaded, [1, 2, 3], 20)[0] == plain_greedy(model, [1, 2, 3], 20)
    # The same drafter on a base loaded from another directory (mlx-lm's --draft-model style).
    base, _ = load(str(path), drafter=str(path))
    assert base.speculative_streams.config.kind == kind


def test_bad_drafter_configs_are_refused(tmp_path):
    from helpers import word_tokenizer

    with pytest.raises(ValueError, match="drafter.kind='hydra'"):
        DrafterConfig(kind="hydra")
    with pytest.raises(ValueError, match="drafter.eagle=None: .*kind 'eagle' one of"):
        DrafterConfig(kind="eagle")  # (an EAGLE-1 drafter: its layer's settings needed)
    with pytest.raises(ValueError, match="Unknown key"):
        DrafterConfig.from_dict({"kind": "medusa", "heads": 3})
    with pytest.raises(ValueError, match="tree_depth"):
        DrafterConfig(num_draft_tokens=2, tree_depth=3)
    with pytest.raises(ValueError, match="ParallelSpec needs >= 2"):
        drafter_model("parallelspec", num_draft_tokens=1)
    model = drafter_model("medusa")
    with pytest.raises(ValueError, match="already has"):
        attach_drafter(model, DrafterConfig())
    path = save(tmp_path / "m", model, word_tokenizer())
    (path / "drafter.safetensors").rename(path / "moved.safetensors")
    with pytest.raises(ValueError, match="drafter.safetensors is missing"):
        load(str(path))
    other = save(tmp_path / "o", drafter_model("medusa"), word_tokenizer())
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_size"] = 128
    (other / "config.json").write_text(json.dumps(cfg))
    (path / "moved.safetensors").rename(path / "drafter.safetensors")
    with pytest.raises(ValueError, match="different base"):
        load(str(path), drafter=str(other))


def test_one_drafter_pass_per_step_whatever_k(monkeypatch):
    """ParallelSpec drafts every level in one layer pass: layer calls equal
    target passes, for k = 2 and k = 4."""
    for k in (2, 4):
        model = drafter_model("parallelspec", num_draft_tokens=k, top_k=1, max_tree_nodes=8)
        layer = model.speculative_streams.drafter.layer
        calls = []
        real_call = type(layer).__call__
        monkeypatch.setattr(
            type(layer),
            "__call__",
            lambda self, *a, **kw: calls.append(1) or real_call(self, *a, **kw),
        )
        _, out = spec_tokens(model, [1, 2, 3], 30)
        monkeypatch.undo()
        assert len(calls) == out[-1][3]


def test_a_tuned_drafter_tree_is_stored_for_this_device_and_loads_there(tmp_path, monkeypatch):
    """The tuner's choice for a Medusa model goes under the drafter section's
    ``tuned`` for this device, with the tree settings and the draft source (``None``:
    the drafter's tree; a drafter does not pipeline); loading applies it here and not
    on another device (the control)."""
    import mlx_specstream.utils as utils
    from helpers import word_tokenizer

    from mlx_specstream import tune
    from mlx_specstream.precision import device_key

    model = drafter_model("medusa")
    tok = word_tokenizer(model.args.vocab_size)
    monkeypatch.setattr(
        tune, "tokens_per_second",
        lambda m, t, p, n, stream_pass=None, **s: (1e6 if s.get("tree_top_k") == 1 else 1.0, 2.0),
    )  # fmt: skip
    choice, _, _ = tune.tune(model, tok, [[1, 2, 3]], max_tokens=4, log=lambda *a: None)
    assert choice["tree_top_k"] == 1
    path = save(tmp_path / "m", model, tok)
    entry = tune.save_choice(path, choice)
    assert set(entry) == {"tree_depth", "top_k", "max_tree_nodes", "draft"}
    assert entry["top_k"] == 1 and entry["draft"] is None
    here, _ = load(str(path))
    assert here.speculative_streams.config.top_k == 1
    assert here.speculative_streams.config.tuned_on == device_key()
    monkeypatch.setattr(utils, "device_key", lambda: "gpu:elsewhere")
    there, _ = load(str(path))
    assert there.speculative_streams.config.top_k == 2  # the model's own


# One architecture per kind of decoder layer a ParallelSpec drafter's layer is built from
# (drafters.new_decoder_layer), each once failing: latent attention and soft-capping
# (an array mask), other layer counts and embedding names (DBRX, Qwen), constructor flags
# (EXAONE 4, AFMoE, Llama 4, MiMo-V2-Flash), per-layer settings that end at the last
# layer (Step 3.5), shared keys (Gemma 4), a layer that hands on its keys (Hunyuan), a
# last layer without attention (Nemotron-NAS), Llama 4's attention scale by position
# (Ministral 3 and its Mistral 3 wrapper, Mistral 4: tiny models' scale steps every 8
# positions), a mask by another name (PLaMo's attention_mask), and hybrids (their
# attention layer; chains).
SWEEP = ["deepseek_v3", "gemma2", "dbrx", "qwen", "exaone4", "afmoe", "llama4_text",
         "mimo_v2_flash", "step3p5", "gemma4_text", "hunyuan", "nemotron-nas",
         "ministral3", "mistral3", "mistral4", "plamo"]  # fmt: skip
HYBRID_SWEEP = ["lfm2", "jamba", "granitemoehybrid", "nemotron_h", "kimi_linear"]


@pytest.mark.parametrize("arch", SWEEP + HYBRID_SWEEP)
def test_parallelspec_builds_its_layer_on_every_kind_of_model(arch):
    from helpers import HYBRID_ARGS, tiny_hybrid
    from mlx_lm.generate import generate_step

    make = tiny_hybrid if arch in HYBRID_ARGS else tiny_model
    model, plain = make(arch, vocab_size=8), make(arch, vocab_size=8)
    hybrid = arch in HYBRID_SWEEP
    config = DrafterConfig(kind="parallelspec", num_draft_tokens=3, top_k=1 if hybrid else 2)
    drafter = attach_drafter(model, config, seed=1)
    if hybrid:  # (its layer is one of the model's attention layers)
        assert not any("mamba" in k or "conv" in k for k, _ in tree_flatten(drafter.parameters()))
    prompt = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]
    want = [int(t) for t, _ in generate_step(mx.array(prompt), plain, max_tokens=40)]
    got, _ = spec_tokens(model, prompt, 40, **({} if hybrid else dict(max_tree_nodes=6)))
    assert [int(t) for t in got] == want


@pytest.mark.parametrize(
    "arch,refusal",
    [("baichuan_m1", "beside other state in one cache"), ("falcon_h1", "takes \\(h, cache")],
)
def test_parallelspec_refuses_a_layer_it_cannot_build_and_says_why(arch, refusal):
    from helpers import HYBRID_ARGS, tiny_hybrid

    model = (tiny_hybrid if arch in HYBRID_ARGS else tiny_model)(arch, vocab_size=8)
    with pytest.raises(ValueError, match=refusal):
        attach_drafter(model, DrafterConfig(kind="parallelspec", num_draft_tokens=3))


def test_a_layer_constructor_argument_not_known_is_named(monkeypatch):
    """A decoder layer whose constructor takes a required argument not known here is
    refused by that argument's name, not built with a guess."""
    from mlx_lm.models import llama

    model, real = tiny_model("llama"), llama.TransformerBlock.__init__

    def init(self, args, use_sliding=False, *, mystery):
        real(self, args, use_sliding)

    monkeypatch.setattr(llama.TransformerBlock, "__init__", init)
    with pytest.raises(ValueError, match="'mystery' is not known"):
        attach_drafter(model, DrafterConfig(kind="parallelspec", num_draft_tokens=3))


def test_a_drafter_layer_takes_llama4_s_attention_scale_at_its_rows_positions():
    """Ministral 3's layer computes its own attention scale from its cache's offset when
    given none: the drafter's explicit scale (run_layer) gives the same rows at positions
    past the scale's first step (8 in the tiny model); a scale of one does not."""
    from mlx_lm.models.cache import KVCache

    from mlx_specstream.drafters import attention_scale_settings, new_decoder_layer, run_layer

    model = tiny_model("ministral3", vocab_size=8)
    layer, settings = new_decoder_layer(model), attention_scale_settings(model)
    assert settings == (0.1, 8)
    mx.random.seed(0)
    past, x = mx.random.normal((1, 12, 64)), mx.random.normal((1, 3, 64))
    caches = [KVCache() for _ in range(3)]  # (the scale is the queries': same keys in each)
    for c in caches:
        run_layer(layer, past, c, scale=settings)
    ours = run_layer(layer, x, caches[0], scale=settings)
    mask = create_causal_mask(3, offset=12)
    own = layer(x, None, mask, caches[1])  # (its attention's own scale at offset 12)
    assert mx.allclose(ours, own, atol=1e-5).item()
    unscaled = layer(x, mx.ones((3, 1)), mask, caches[2])
    assert not mx.allclose(ours, unscaled, atol=1e-3).item()


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_lookup_merged_into_the_drafters_tree(kind, monkeypatch):
    """``draft="streams+ngram"`` with Medusa heads or ParallelSpec: prompt lookup's chains
    merged into the drafter's tree (room made beside its nodes). Greedy output equals plain
    decoding with real lookup on a model that repeats itself; with lookup proposing the true
    continuation, steps accept more tokens than the drafter's levels and the bonus (with the
    drafter alone, never) and the output is still plain decoding's."""
    import mlx_specstream.decode as decode

    model = drafter_model(kind, weight_scale=1.0, top_k=2, max_tree_nodes=6)
    prompt = [4, 8, 15, 16, 23]
    ref = plain_greedy(model, prompt, 40)
    full = prompt + ref

    def per_pass(draft):  # (the tokens each pass gave)
        toks, out = spec_tokens(model, prompt, 40, draft=draft, num_draft_tokens=6)
        assert toks == ref
        return [sum(o[3] == n for o in out) for n in sorted({o[3] for o in out})]

    per_pass("streams+ngram")  # (real lookup: plain decoding's output)
    alone = per_pass("streams")
    assert max(alone) <= 4  # (3 levels and the bonus)
    monkeypatch.setattr(decode.Decoder, "_lookup", lambda self, room: [
        full[len(self.history): len(self.history) + min(self.ngram_tokens, room)]
    ])  # fmt: skip
    merged = per_pass("streams+ngram")
    assert max(merged) > 4 and len(merged) < len(alone)


def test_the_tuner_tries_prompt_lookup_with_a_drafter_and_stores_it(tmp_path, monkeypatch):
    """The tuner times prompt lookup alone and merged into the drafter's fastest tree;
    the merged choice (fake timings: the fastest) is stored as ``draft`` for this device,
    and a call that names no draft source then merges lookup in (its lookup runs), giving
    plain decoding's output. Control: on another device, no lookup runs."""
    import mlx_specstream.decode as decode
    import mlx_specstream.utils as utils
    from helpers import word_tokenizer

    from mlx_specstream import tune

    model = drafter_model("parallelspec")
    tok = word_tokenizer(model.args.vocab_size)
    tried = []

    def fake(m, t, p, n, **s):
        tried.append(s)
        return (1e6 if s.get("draft") == "streams+ngram" else 1.0 + s.get("tree_depth", 0)), 2.0

    monkeypatch.setattr(tune, "tokens_per_second", fake)
    choice, _, _ = tune.tune(model, tok, [[1, 2, 3]], max_tokens=4, log=lambda *a: None)
    assert {"draft": "ngram"} in tried and choice["draft"] == "streams+ngram"
    assert choice["tree_depth"] == 3  # (the fastest tree's, lookup merged in)
    path = save(tmp_path / "m", model, tok)
    assert tune.save_choice(path, choice)["draft"] == "streams+ngram"
    lookups, real = [], decode.Decoder._lookup
    monkeypatch.setattr(
        decode.Decoder,
        "_lookup",
        lambda self, room: lookups.append(self.ngrams is not None) or real(self, room),
    )
    here, _ = load(str(path))
    prompt = [1, 5, 9, 3, 7, 2, 11]
    assert spec_tokens(here, prompt, 24)[0] == plain_greedy(here, prompt, 24) and all(lookups)
    monkeypatch.setattr(utils, "device_key", lambda: "gpu:elsewhere")
    lookups.clear()
    there, _ = load(str(path))
    assert spec_tokens(there, prompt, 24)[0] == plain_greedy(there, prompt, 24)
    assert lookups and not any(lookups)

"""Models whose last layers read the keys and values of an earlier layer (KV sharing)
speculate exactly.

Gemma 4: its KV-sharing layers get their source's keys and values from the layer loop
(``previous_kvs``), its layers return them with their hidden states, and every layer
takes a per-token input (``per_layer_input``). The tiny model's 6 layers are sliding,
sliding, full, sliding | sliding, full (window 8); the last 2 read layers 3 and 2.
With 2 stream layers both read a lower layer's keys; with 3, layer 3 keeps its own
(stream rows included) and layer 4 reads it. (Lookup drafts and stream trees on
``gemma4_text`` and the ``gemma4`` wrapper also run in test_architectures.)

Gemma 3n: its KV-sharing layers are handed their source's cache and read what it
holds (``keys_and_values``), and its AltUp stacks 4 hidden states per token: prompt
lookup and draft models run on it, streams and drafters are refused.
"""

import logging

import helpers

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    assert_lossless,
    plain_greedy,
    spec_tokens,
    tiny_model,
    tiny_spec_model,
    word_tokenizer,
)
from test_batch import LIMITS, alone, decode
from test_cache_and_masks import TREE

import mlx_specstream.streams as streams
from mlx_lm.models.cache import KVCache

from mlx_specstream import (
    DrafterConfig,
    SpecStreamConfig,
    attach_drafter,
    attach_streams,
    make_prompt_cache,
)
from mlx_specstream.cache import WindowKVCache
from mlx_specstream.model_parts import kv_sources, own_class
from mlx_specstream.streams import attach_verifier
from mlx_specstream.support import TreeUnsupported

PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]  # (repeats: lookup drafts from the first step)
N = 48  # (six windows of 8)
SHARING = [4, 5]  # the layers that read another layer's keys and values


def test_kv_sources_golden():
    """The docstring's example: layers 4 and 5 read the last earlier layer of their kind."""
    assert kv_sources(tiny_model("gemma4_text", vocab_size=8)) == [0, 1, 2, 3, 3, 2]
    assert kv_sources(tiny_model("gemma4", vocab_size=8)) == [0, 1, 2, 3, 3, 2]
    assert kv_sources(tiny_model("llama", vocab_size=8)) == [0, 1, 2, 3]


@pytest.mark.parametrize("stream_layers", [2, 3])
@pytest.mark.parametrize(
    "cfg, kwargs",
    [
        ({}, dict(pipeline=True)),
        (dict(stream_pass="split"), {}),
        (dict(prune_threshold=0.05), {}),
        (dict(prune_threshold=0.05, stream_pass="split"), {}),
    ],
)
def test_stream_trees_equal_plain(stream_layers, cfg, kwargs):
    model = tiny_spec_model("gemma4_text", vocab_size=8, num_streams=3, top_k=2,
                            num_stream_layers=stream_layers, **cfg)  # fmt: skip
    want = plain_greedy(model, PROMPT, N)
    got, records = spec_tokens(model, PROMPT, N, max_tree_nodes=6, **kwargs)
    assert got == want
    assert len({r[3] for r in records}) < N - 5, "no draft accepted: the test has no power"


@pytest.mark.parametrize("stream_layers", [2, 3])
def test_split_stream_pass_equals_full_pass(stream_layers):
    """A node's streams computed alone after the verifying pass (their per-token
    inputs the node's, from that pass) equal those of the full pass. Control: with
    the inputs of the stream pass's own placeholder tokens they differ."""
    model = tiny_spec_model("gemma4_text", num_streams=3, num_stream_layers=stream_layers)
    want, got = split_and_full(model)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_negative_control_stream_rows_with_their_placeholders_inputs(monkeypatch):
    model = tiny_spec_model("gemma4_text", num_streams=3)
    own = streams.StreamRuntime._upper_inputs
    monkeypatch.setattr(
        streams.StreamRuntime, "_upper_inputs",
        lambda self, i, kwargs: kwargs if self.state == "streams" else own(self, i, kwargs),
    )  # fmt: skip
    want, got = split_and_full(model)
    assert np.abs(got - want).max() > 1e-2


def split_and_full(model):
    """Every node's stream logits of one pass over test_cache_and_masks' TREE: the
    full pass's, and the split passes' (one per node)."""
    rt = model.speculative_streams

    def fresh():
        cache = make_prompt_cache(model)
        model(mx.array(PROMPT)[None], cache=cache)
        return cache

    full = rt.forward(*TREE, fresh())
    want = np.array(rt.head(full.stream_hidden.reshape(1, -1, full.stream_hidden.shape[-1]))[0])
    want = want.reshape(len(full.kept), 3, -1)
    got = []
    for node in range(len(full.kept)):
        cache = fresh()
        split = rt.forward(*TREE, cache, all_streams=False)
        np.testing.assert_allclose(np.array(split.logits), np.array(full.logits), atol=1e-5)
        got.append(np.array(rt.draft_streams(mx.array(node), cache)))
    return want, np.stack(got)


WIDE = ([7, 1, 2, 3, 4, 5], [-1, 0, 0, 0, 1, 4])  # siblings 1, 2, 3; a path 0-1-4-5


def tree_logits_off_plain(model, rt=None):
    """Per node of WIDE, its logits' largest difference from the model's own after the
    prompt and the node's path (``helpers.tree_logits_off_plain``)."""
    return helpers.tree_logits_off_plain(model, PROMPT, WIDE, rt)


def test_tree_rows_logits_are_plain_decodings():
    model = tiny_spec_model("gemma4_text", num_streams=3)
    assert tree_logits_off_plain(model).max() < 1e-5


def test_negative_control_sharing_layers_at_their_sources_offset(monkeypatch):
    """A KV-sharing layer's queries take the tree's positions: rotated at the offset
    its source passes on (the rows' indices, not their depths), the nodes below the
    root's first child get other logits."""
    model = tiny_spec_model("gemma4_text", num_streams=3)
    for i in SHARING:
        rope = model.layers[i].self_attn.rope
        base = own_class(rope)
        call = lambda self, x, offset=0, base=base: base.__call__(self, x, offset=offset)  # noqa
        monkeypatch.setattr(type(rope), "__call__", call)
    off = tree_logits_off_plain(model)
    assert off[:2].max() < 1e-5 and off[2:].min() > 1e-3


def test_negative_control_sharing_layers_rows_see_their_ancestors_only(monkeypatch):
    """Upper rows read a lower layer's tree rows through their nodes' ancestors
    (``_over_lower``): in the lower rows' causal order instead, a node sees the
    siblings before it, and those nodes get other logits."""
    model = tiny_spec_model("gemma4_text", num_streams=3)

    def causal(self, nodes, columns):
        if columns is not None:
            columns = mx.array(np.tril(np.ones(columns.shape, bool)))
        own(self, nodes, columns)

    own = streams.StreamRuntime._set_upper_rows
    monkeypatch.setattr(streams.StreamRuntime, "_set_upper_rows", causal)
    off = tree_logits_off_plain(model)
    assert off[:2].max() < 1e-5 and off[[2, 3, 4, 5]].min() > 1e-3


@pytest.mark.parametrize("arch", ["gemma4_text", "gemma4"])
def test_target_and_draft_model(arch):
    model = tiny_model(arch, vocab_size=8)
    want = plain_greedy(model, PROMPT, N)
    draft = tiny_model(arch, vocab_size=8, seed=3)
    assert spec_tokens(model, PROMPT, N, draft_model=draft, num_draft_tokens=3)[0] == want
    got, records = spec_tokens(model, PROMPT, N, draft_model=model, num_draft_tokens=3)
    assert got == want and len({r[3] for r in records}) == N // 4  # (a copy: all accepted)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(draft="ngram", num_draft_tokens=3, pipeline=True),
        dict(draft="ngram", num_draft_tokens=3, pipeline=False),
        dict(draft_model="seed 3", num_draft_tokens=2),
    ],
)
def test_batch_rows_equal_each_prompt_alone(kwargs):
    model = tiny_model("gemma4_text", vocab_size=16, seed=1)
    if "draft_model" in kwargs:
        kwargs = {**kwargs, "draft_model": tiny_model("gemma4_text", vocab_size=16, seed=3)}
    want = alone(model)  # (test_batch's prompts, each decoded alone)
    got, passes = decode(model, **kwargs)
    assert got == want
    assert passes < max(LIMITS)


@pytest.mark.parametrize("stream_layers", [2, 3])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(draft="streams", stream_pass="fused", pipeline=True),
        dict(draft="streams", stream_pass="fused", pipeline=False),
        dict(draft="streams", stream_pass="split", pipeline=True),
        dict(draft="streams", stream_pass="split", pipeline=False),
        dict(draft="streams+ngram", stream_pass="fused"),
    ],
)
def test_batch_rows_drafting_with_streams_equal_each_prompt_alone(stream_layers, kwargs):
    model = tiny_spec_model("gemma4_text", vocab_size=16, seed=1, num_streams=3,
                            num_stream_layers=stream_layers)  # fmt: skip
    got, passes = decode(model, **kwargs)
    assert got == alone(model)
    assert passes < max(LIMITS)


def batch_stream_gaps(stream_pass, positions="same"):
    """test_batch_streams' gaps between each row's stream logits in a batch and its
    sequence's alone, over 4 passes (before the first row ends)."""
    from test_batch_streams import stream_gaps, stream_model

    return max(stream_gaps(stream_model("gemma4_text", positions), stream_pass, passes=4))


@pytest.mark.parametrize("positions", ["same", "offset"])
@pytest.mark.parametrize("stream_pass", ["fused", "split"])
def test_batch_row_streams_equal_the_sequence_alone(stream_pass, positions):
    assert batch_stream_gaps(stream_pass, positions) < 1e-4


@pytest.mark.parametrize("stream_pass", ["fused", "split"])
@pytest.mark.parametrize("control", ["inputs", "columns"])
def test_negative_controls_batch_row_streams(stream_pass, control, monkeypatch):
    """A batch's stream rows with the per-token inputs of another token (the row's
    first, or the placeholder tokens of the split pass), or seeing every row of the
    lower layer whose keys they read, differ from the sequence's own."""
    rt = streams.StreamRuntime
    if control == "inputs":
        own = rt._upper_inputs

        def other(self, i, kwargs):  # (the batch's passes only)
            nodes = self._upper_nodes
            if self.state == "streams" and nodes is not None and nodes.ndim == 2:
                return kwargs
            if self.state == "rows" and nodes is not None:
                self._upper_nodes = mx.zeros_like(nodes)
            try:
                return own(self, i, kwargs)
            finally:
                self._upper_nodes = nodes

        monkeypatch.setattr(rt, "_upper_inputs", other)
    else:
        own = rt._layer_mask

        def blind(self, i, mask, cols, dtype):
            if self._reads_lower[i] and self._over_lower is not None and self.state != "step":
                if self.state == "rows" or self._upper_nodes.ndim == 2:
                    self._over_lower = mx.ones_like(self._over_lower)
            return own(self, i, mask, cols, dtype)

        monkeypatch.setattr(rt, "_layer_mask", blind)
    assert batch_stream_gaps(stream_pass) > 1e-2


def test_shared_mode_streams_reading_a_lower_layers_keys_are_refused():
    """In shared mode main rows read their stream rows, which a KV-sharing layer
    never writes."""
    model = tiny_model("gemma4_text", vocab_size=8)
    with pytest.raises(ValueError, match="use lossless mode"):
        attach_streams(model, SpecStreamConfig(num_streams=2, num_stream_layers=2, mode="shared"))
    cfg = SpecStreamConfig(num_streams=2, num_stream_layers=1, mode="shared")
    with pytest.raises(ValueError, match="use lossless mode"):  # (layer 5 reads layer 2)
        attach_streams(tiny_model("gemma4_text", vocab_size=8), cfg)


def test_caches_that_do_not_match_the_sharing_are_refused(monkeypatch):
    model = tiny_model("gemma4_text", vocab_size=8)
    made = type(model).make_cache
    monkeypatch.setattr(type(model), "make_cache", lambda self: made(self)[:3])
    with pytest.raises(TreeUnsupported, match="makes 3 caches for its 6 layers, of which 4 keep"):
        attach_verifier(model)


def test_streams_train_in_mlx_and_the_base_stays_bit_identical():
    """``mlx_specstream.train``'s loss runs the same passes: on Gemma 4 the streams
    learn far above chance (1/64) and the base does not change."""
    from test_train import train_tiny

    before, after, result, unchanged = train_tiny("gemma4_text")
    assert max(before.top1()) < 0.2, before.text()
    assert min(after.top1()) > 0.5, after.text()
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert unchanged


def test_the_server_decodes_waiting_requests_together_with_stream_drafts(caplog):
    """A Gemma 4 with streams served to clients at once: the requests are batched,
    their rows draft with the streams, and each answer equals plain decoding alone."""
    from test_server_batching import PROMPTS, alone, answer, submit_together

    from mlx_specstream.server import make_server, service_of

    model = tiny_spec_model("gemma4_text", vocab_size=64, num_streams=3, top_k=2, tree_depth=3)
    tok = word_tokenizer(64)
    with caplog.at_level(logging.INFO, logger="mlx_specstream.server"):
        server = make_server(model, tok, "tiny", port=0)
    try:
        svc = service_of(server)
        assert svc.stream_batching
        jobs = submit_together(svc, [(p, {}) for p in PROMPTS])
        got = [answer(j)[0][0] for j in jobs]
        assert svc.served["batched"] == 1 and svc.served["largest_batch"] == 4
    finally:
        server.server_close()
    assert got == [alone(model, tok, p, 16)[0] for p in PROMPTS]
    assert not [r.message for r in caplog.records if "do not draft" in r.message]


# ---- Gemma 3n ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(draft="ngram", num_draft_tokens=4),
        dict(draft="ngram", num_draft_tokens=4, pipeline=True),
        dict(draft="ngram", num_draft_tokens=3, ngram_candidates=3),  # (trees)
    ],
)
def test_gemma3n_lookup_equals_plain(kwargs):
    model = tiny_model("gemma3n", vocab_size=8)
    got, records = spec_tokens(model, PROMPT, N, **kwargs)
    assert got == plain_greedy(model, PROMPT, N)
    assert sum(r[2] for r in records) > 10, "drafts were rarely accepted: the test has no power"


def test_gemma3n_target_and_draft_model():
    model = tiny_model("gemma3n", vocab_size=8)
    want = plain_greedy(model, PROMPT, N)
    draft = tiny_model("gemma3n", vocab_size=8, seed=3)
    assert spec_tokens(model, PROMPT, N, draft_model=draft, num_draft_tokens=3)[0] == want
    got, records = spec_tokens(model, PROMPT, N, draft_model=model, num_draft_tokens=3)
    assert got == want and len({r[3] for r in records}) == N // 4  # (a copy: all accepted)


@pytest.mark.parametrize("pipeline", [True, False])
def test_gemma3n_batch_rows_equal_each_prompt_alone(pipeline):
    model = tiny_model("gemma3n", vocab_size=16, seed=1)
    got, passes = decode(model, draft="ngram", num_draft_tokens=3, pipeline=pipeline)
    assert got == alone(model)
    assert passes < max(LIMITS)


def test_gemma3n_tree_rows_logits_are_plain_decodings(monkeypatch):
    """Each node of a tree gets the model's own logits after its path; control: the
    KV-sharing layers' queries at the pass's offset (the rows' indices) change the
    logits of the nodes past the root's first child."""
    model = tiny_model("gemma3n", vocab_size=64)
    rt = streams.attach_verifier(model)
    assert tree_logits_off_plain(model, rt).max() < 1e-5
    for i in SHARING:
        rope = model.layers[i].self_attn.rope
        base = own_class(rope)
        call = lambda self, x, offset=0, base=base: base.__call__(self, x, offset=offset)  # noqa
        monkeypatch.setattr(type(rope), "__call__", call)
    off = tree_logits_off_plain(model, rt)
    assert off[:2].max() < 1e-5 and off[2:].min() > 1e-3


def test_gemma3n_window_caches_hand_over_the_rows_they_hold():
    """A window layer's cache drops rows as the generation goes (WindowKVCache): what
    it hands a KV-sharing layer starts at its first row. Control: mlx-lm's KVCache
    reading of it (rows counted from position 0) does not fit the mask."""
    model = tiny_model("gemma3n", vocab_size=8)
    want = plain_greedy(model, PROMPT, N)
    assert spec_tokens(model, PROMPT, N, draft="ngram", num_draft_tokens=4)[0] == want
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WindowKVCache, "keys_and_values", KVCache.keys_and_values)
        with pytest.raises(ValueError, match="broadcast"):
            spec_tokens(model, PROMPT, N, draft="ngram", num_draft_tokens=4)


@pytest.mark.parametrize(
    "attach",
    [
        lambda m: attach_streams(m, SpecStreamConfig(num_streams=3, num_stream_layers=2)),
        lambda m: attach_drafter(m, DrafterConfig(kind="medusa", num_draft_tokens=3)),
    ],
)
def test_gemma3n_streams_and_drafters_are_refused_with_the_reason(attach):
    with pytest.raises(ValueError, match="stacked \\(Gemma 3n's AltUp\\); streams and drafters"):
        attach(tiny_model("gemma3n", vocab_size=8))


def test_gemma4_train_cli_writes_a_model_that_loads_and_decodes_losslessly(tmp_path):
    """A Mac user's three lines on a Gemma 4 directory (``test_train``'s check)."""
    from helpers import GEMMA4_TEXT
    from test_train import BASE, V, assert_train_cli_decodes_losslessly

    config = {**BASE, **GEMMA4_TEXT, "vocab_size": V, "model_type": "gemma4_text"}
    assert_train_cli_decodes_losslessly(tmp_path, "gemma4_text", config)


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("gemma4_text", dict(quant_bits=4, model_args=dict(hidden_size_per_layer_input=32))),
        ("gemma4_text", dict(dtype=mx.bfloat16)),
        ("gemma3n", dict(dtype=mx.bfloat16)),
    ],
)
def test_low_precision_and_4_bit_weights_decode_as_plain_on_cpu(arch, kwargs):
    """As users hold them: bfloat16 and 4-bit weights (groups of 32: the per-layer
    inputs widened to 32), prompt lookup and (Gemma 4) stream trees, token for token."""
    kwargs = dict(kwargs)
    args = kwargs.pop("model_args", {})
    model = tiny_model(arch, vocab_size=8, **kwargs, **args)
    got, records = spec_tokens(model, PROMPT, N, draft="ngram", num_draft_tokens=4, pipeline=True)
    assert_lossless(model, PROMPT, got, plain_greedy(model, PROMPT, N))
    assert sum(r[2] for r in records) > 10
    if arch == "gemma4_text":
        model = tiny_spec_model(arch, vocab_size=8, num_streams=3, top_k=2, model_args=args,
                                **kwargs)  # fmt: skip
        got, records = spec_tokens(model, PROMPT, N, max_tree_nodes=6)
        assert_lossless(model, PROMPT, got, plain_greedy(model, PROMPT, N))
        assert len({r[3] for r in records}) < N - 5, "no draft accepted: the test has no power"

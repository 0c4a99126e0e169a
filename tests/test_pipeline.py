"""Pipelined decoding: each step is launched before the previous one's host read.

The pass of step ``k + 1`` moves step ``k``'s accepted rows into place and
writes its own rows at an offset only the device knows. Its output must equal
plain decoding token for token, its caches must end as the unpipelined
loop's do, and a wrong accepted length or path must break it (controls).
"""

import traceback

import mlx.core as mx
import pytest
from helpers import ARCHS, plain_greedy, spec_tokens, tiny_spec_model
from mlx_lm.models.cache import KVCache

import mlx_specstream.decode as decode_module
from mlx_specstream.cache import BucketedCache, Fold, FoldingCache, make_prompt_cache
import mlx_specstream.streams as streams_module
from mlx_specstream.layout import (
    bucketed,
    layout_of,
    pad_hidden,
    place_mask,
    place_window,
    window_table,
    with_prefix,
)
from mlx_specstream.sample_utils import make_sampler
from mlx_specstream.tree import fold_destinations, path_table, path_to, stream_attention_mask

PROMPTS = [[5], [3, 1, 4, 1, 5, 1, 2, 6, 5, 3, 5, 0, 1, 7]]
MAX_TOKENS = 48
SHAPES = {
    "chain-g1-k1": dict(num_streams=1, top_k=1),
    "g2-k3": dict(num_streams=2, top_k=3, max_tree_nodes=13),
    "g4-k[3,2,1,1]-capped": dict(num_streams=4, top_k=[3, 2, 1, 1], max_tree_nodes=9),
}


# ---- pure pieces --------------------------------------------------------------------
def test_place_mask_golden():
    mask = mx.array([[1, 0], [1, 1]]).astype(mx.bool_)
    got = place_mask(mask, mx.array(2), 5).astype(mx.int32).tolist()
    assert got == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    got = place_mask(mask, mx.array(0), 3).astype(mx.int32).tolist()
    assert got == [[1, 0, 0], [1, 1, 0]]


def test_place_window_golden():
    mask = mx.array([[1, 0], [1, 1]]).astype(mx.bool_)
    got = place_window(mask, 1, mx.array(1), 4).astype(mx.int32).tolist()
    assert got == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]


def test_window_table_golden():
    mask = mx.array([[1, 0], [1, 1]]).astype(mx.bool_)
    got = window_table(mask, 3).astype(mx.int32).tolist()
    assert got == [[[1, 0, 0], [1, 1, 0]], [[1, 1, 0], [1, 1, 1]]]
    assert window_table(mask, 3) is window_table(mask, 3)  # built once
    other = mx.array([[1, 0], [0, 1]]).astype(mx.bool_)  # control: another mask, its own table
    assert window_table(other, 3)[1].astype(mx.int32).tolist() == [[1, 1, 0], [1, 0, 1]]


@pytest.mark.parametrize("prefix", [1, 255, 256, 300, 1000, 40])
def test_with_prefix_prepends_visible_columns(prefix):
    """Long prefixes grow the kept all-True columns; shorter ones after them reuse them."""
    mask = mx.array([[1, 0, 0], [1, 1, 0]]).astype(mx.bool_)
    got = with_prefix(mask, prefix)
    assert got.shape == (2, prefix + 3)
    assert got[:, :prefix].all().item() and mx.array_equal(got[:, prefix:], mask)


@pytest.mark.parametrize("parents", [[-1, 0, 1, 0], [-1, 0, 0, 1, 2, 1]])
def test_place_window_is_place_mask(parents):
    """The window built on its own, then joined to the prefix, is the mask placed
    over the whole view, for every base, accepted length and spare width."""
    ancestors = layout_of(parents).ancestors
    for m in (mx.array(ancestors), mx.array(stream_attention_mask(ancestors, 2, False))):
        for base in (0, 1, 9):
            for accepted in range(4):
                for width in (accepted + m.shape[1], accepted + m.shape[1] + 2):
                    want = place_mask(m, mx.array(base + accepted), base + width)
                    got = place_window(m, base, mx.array(accepted), width)
                    assert mx.array_equal(got, want), (base, accepted, width)


@pytest.mark.parametrize("parents", [[-1], [-1, 0, 1, 0], [-1, 0, 0, 1, 2, 1]])
@pytest.mark.parametrize("prefix", [0, 1, 7])
def test_place_mask_at_a_known_offset_is_with_prefix(parents, prefix):
    """Tree and multi-stream masks alike."""
    ancestors = layout_of(parents).ancestors
    for m in (ancestors, stream_attention_mask(ancestors, 2, False)):
        m = mx.array(m)
        want = with_prefix(m, prefix)
        got = place_mask(m, mx.array(prefix), prefix + m.shape[1])
        assert mx.array_equal(got, want)
        # Longer views hide the extra columns.
        longer = place_mask(m, mx.array(prefix), prefix + m.shape[1] + 3)
        assert mx.array_equal(longer[:, : want.shape[1]], want) and not longer[:, -3:].any()


def test_path_table_rows_are_the_paths():
    parents = [-1, 0, 0, 1, 2, 3, 1]
    table = path_table(parents)
    assert table.shape == (7, 4)
    for n in range(7):
        path = path_to(n, parents)
        assert table[n, : len(path)].tolist() == path
        assert set(table[n, len(path) :].tolist()) <= {n}


def test_fold_destinations_golden():
    """The docstring's table: the i-th node on each path goes to i, the rest to len(path)."""
    assert fold_destinations([-1, 0, 1, 0], 5).tolist() == [
        [0, 1, 1, 1, 1],
        [0, 1, 2, 2, 2],
        [0, 1, 2, 3, 3],
        [0, 2, 2, 1, 2],
    ]
    with pytest.raises(ValueError, match="rows=2"):
        fold_destinations([-1, 0, 1, 0], 2)


@pytest.mark.parametrize("parents", [[-1], [-1, 0, 0, 1, 2, 3, 1], [-1, 0, 0, 0, 1, 2, 3]])
def test_fold_destinations_place_each_path_in_order(parents):
    """Scattering rows by a table row puts that path's rows first, in order, and every
    other row (streams included) on the first slot after it."""
    rows = 3 * len(parents)
    table = fold_destinations(parents, rows)
    for n in range(len(parents)):
        path = path_to(n, parents)
        slots = {}
        for r, d in enumerate(table[n].tolist()):
            slots.setdefault(d, []).append(r)
        assert [slots[i] for i in range(len(path))] == [[a] for a in path]
        assert sorted(slots) == list(range(len(path) + 1))


def test_folding_cache_worked_example():
    """The docstring's example: prefix 5, rows a b c d of the tree [-1, 0, 0, 1], path
    [0, 2] (moves [0, 2, 1, 2]), then x y."""
    row = lambda v: mx.full((1, 1, 1, 2), float(v))  # noqa: E731
    c = KVCache()
    c.update_and_fetch(mx.concatenate([row(i) for i in range(5)], 2), mx.zeros((1, 1, 5, 2)))
    first = FoldingCache(c, None, 0)
    tree = mx.concatenate([row(v) for v in (10, 11, 12, 13)], axis=2)  # a b c d
    keys, _ = first.update_and_fetch(tree, tree)
    assert keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13]
    assert c.offset == 5  # offsets are the decoder's to set
    moves = layout_of([-1, 0, 0, 1]).fold_table(4)[2]
    assert moves.tolist() == [0, 2, 1, 2]
    fold = Fold(5, mx.array(2), mx.array([0, 2, 2]), [first.rows], moves=moves)
    xy = mx.concatenate([row(20), row(21)], axis=2)
    keys, values = FoldingCache(c, fold, 0).update_and_fetch(xy, xy)
    assert keys.shape[2] == 10
    assert keys[0, 0, :9, 0].tolist() == [0, 1, 2, 3, 4, 10, 12, 20, 21]
    assert mx.array_equal(keys[..., 5:9, :], values[..., 5:9, :])  # values move alike
    assert mx.eval(keys) is None and c.keys.shape[2] == 256  # written in place
    # Control: the moves of another accepted node put its rows there instead.
    c.offset = 5
    other = layout_of([-1, 0, 0, 1]).fold_table(4)[1]  # node 1: path [0, 1]
    fold = Fold(5, mx.array(2), mx.array([0, 1, 1]), [first.rows], moves=other)
    keys, _ = FoldingCache(c, fold, 0).update_and_fetch(xy, xy)
    assert keys[0, 0, :9, 0].tolist() == [0, 1, 2, 3, 4, 10, 11, 20, 21]
    with pytest.raises(ValueError, match="moves"):
        FoldingCache(
            c, Fold(5, mx.array(2), mx.array([0, 2, 2]), [first.rows]), 0
        ).update_and_fetch(xy, xy)


def test_folding_cache_after_a_chain_moves_nothing():
    """The docstring's chain: rows a b c d, path [0, 1] accepted, then x y: the
    same visible rows as the gathered fold, from no gather."""
    row = lambda v: mx.full((1, 1, 1, 2), float(v))  # noqa: E731
    ends = []
    for chain in (False, True):
        c = KVCache()
        c.update_and_fetch(mx.concatenate([row(i) for i in range(5)], 2), mx.zeros((1, 1, 5, 2)))
        first = FoldingCache(c, None, 0)
        chain_rows = mx.concatenate([row(v) for v in (10, 11, 12, 13)], axis=2)
        first.update_and_fetch(chain_rows, chain_rows)
        moves = None if chain else layout_of([-1, 0, 1, 2]).fold_table(4)[1]
        fold = Fold(5, mx.array(2), mx.array([0, 1, 1, 1]), [first.rows], chain, moves)
        xy = mx.concatenate([row(20), row(21)], axis=2)
        keys, _ = FoldingCache(c, fold, 0).update_and_fetch(xy, xy)
        ends.append(keys[0, 0, :9, 0].tolist())
        assert mx.eval(keys) is None and c.keys.shape[2] == 256  # written in place
    assert ends[0] == ends[1] == [0, 1, 2, 3, 4, 10, 11, 20, 21]


# ---- decoding -------------------------------------------------------------------------
@pytest.fixture
def folds(monkeypatch):
    """Counts the folds built, to show the pipelined path ran."""
    made = []
    real = decode_module.Fold
    monkeypatch.setattr(decode_module, "Fold", lambda *a: made.append(a) or real(*a))
    return made


def run(model, prompt, **kwargs):
    return spec_tokens(model, prompt, MAX_TOKENS, **kwargs)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_pipelined_lossless_equals_mlx_lm(arch, shape, folds):
    model = tiny_spec_model(arch, vocab_size=8, mode="lossless", **SHAPES[shape])
    drafted = 0
    for prompt in PROMPTS:
        toks, records = run(model, prompt, pipeline=True)
        assert toks == plain_greedy(model, prompt, MAX_TOKENS)
        # Same passes as the unpipelined loop: the same trees were verified.
        assert [r[3] for r in records] == [r[3] for r in run(model, prompt, pipeline=False)[1]]
        drafted += sum(r[2] for r in records)
    assert drafted > 0 and folds, "no draft accepted or nothing pipelined: the test is empty"


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_pipelined_shared_equals_nonspeculative(arch, folds):
    model = tiny_spec_model(arch, vocab_size=8, mode="shared", **SHAPES["g2-k3"])
    for prompt in PROMPTS:
        want = run(model, prompt, speculative=False)[0]
        assert run(model, prompt, pipeline=True)[0] == want
    assert folds


@pytest.mark.parametrize("wrong", ["accepted length", "moves", "a tree taken for a chain"])
def test_negative_control_wrong_fold(monkeypatch, wrong):
    """Folding one row too many, moving the wrong rows, or none after a tree (as
    after a chain) must change the output."""
    real = decode_module.Fold

    def bad(prefix, accepted, path, rows, chain, moves):
        if wrong == "accepted length":
            return real(prefix, accepted + 1, path, rows, chain, moves)
        if wrong == "moves" and moves is not None:  # every row onto the root's slot
            return real(prefix, accepted, path, rows, chain, mx.zeros_like(moves))
        return real(prefix, accepted, path, rows, True, moves)

    monkeypatch.setattr(decode_module, "Fold", bad)
    model = tiny_spec_model("llama", vocab_size=8, mode="lossless", **SHAPES["g2-k3"])
    prompt = PROMPTS[1]
    assert run(model, prompt, pipeline=True)[0] != plain_greedy(model, prompt, MAX_TOKENS)


def test_pipelined_sampling_is_the_unpipelined_sampling():
    """target-sample draws its targets on the device in launch order: with the
    same seed both loops draw the same tokens (the distribution is
    test_sampling's chi-square case). Without a token limit, as the unpipelined
    loop verifies shallower trees just before one."""
    from mlx_specstream.decode import spec_generate_step

    model = tiny_spec_model("qwen2", vocab_size=8, **SHAPES["g2-k3"])
    sampler = make_sampler(temp=0.8)
    for seed in range(3):
        got = []
        for pipeline in (True, False):
            mx.random.seed(seed)
            gen = spec_generate_step(mx.array([1, 2, 3]), model, max_tokens=-1, sampler=sampler,
                                     acceptance="target-sample", pipeline=pipeline)  # fmt: skip
            got.append([next(gen)[0] for _ in range(MAX_TOKENS)])
            gen.close()
        assert got[0] == got[1]


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 8, 13])
def test_caches_end_as_unpipelined_and_continue(max_tokens):
    """Whatever step ends the call, the prompt cache holds the prompt and every
    yielded token (as mlx-lm's), and a follow-up call fed the next token continues
    plain decoding."""
    model = tiny_spec_model("llama", vocab_size=8, **SHAPES["g2-k3"])
    prompt, more = [3, 1, 4, 1, 5], 10
    want = plain_greedy(model, prompt, max_tokens + more)
    for pipeline in (True, False):
        cache = make_prompt_cache(model)
        first = spec_tokens(model, prompt, max_tokens, prompt_cache=cache, pipeline=pipeline)[0]
        assert first == want[:max_tokens]
        assert all(c.offset == len(prompt) + max_tokens for c in cache)
        nxt = want[max_tokens : max_tokens + 1]
        rest = spec_tokens(model, nxt, more - 1, prompt_cache=cache, pipeline=pipeline)[0]
        assert first + nxt + rest == want


def test_closing_early_leaves_a_usable_cache():
    model = tiny_spec_model("qwen3", vocab_size=8, **SHAPES["g4-k[3,2,1,1]-capped"])
    prompt = [2, 7, 1, 6, 2, 6]
    want = plain_greedy(model, prompt, 30)
    from mlx_specstream.decode import spec_generate_step

    cache = make_prompt_cache(model)
    gen = spec_generate_step(mx.array(prompt), model, max_tokens=-1, prompt_cache=cache,
                             pipeline=True)  # fmt: skip
    got = [next(gen)[0] for _ in range(11)]
    gen.close()
    assert got == want[:11] and cache[0].offset == len(prompt) + 11
    got += want[11:12] + spec_tokens(model, want[11:12], 18, prompt_cache=cache, pipeline=True)[0]
    assert got == want


REFUSED = {
    "streams+ngram": dict(draft="streams+ngram"),
    "pruning": dict(prune_threshold=0.2),
    "kv_bits": dict(kv_bits=4),
    "processors": dict(logits_processors=[lambda toks, logits: logits]),
    "rejection": dict(sampler=make_sampler(temp=1.0), acceptance="rejection"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_pipeline_true_refuses_settings_that_read_the_host(case):
    model = tiny_spec_model("llama", vocab_size=8, **SHAPES["g2-k3"])
    with pytest.raises(ValueError, match="pipeline=True"):
        run(model, [1, 2], pipeline=True, **REFUSED[case])


def test_split_stream_pass_is_refused():
    model = tiny_spec_model("llama", vocab_size=8, stream_pass="split", **SHAPES["g2-k3"])
    with pytest.raises(ValueError, match="split stream pass"):
        run(model, [1, 2], pipeline=True)


def test_default_is_pipelined_on_a_gpu_only(monkeypatch):
    model = tiny_spec_model("llama", vocab_size=8, **SHAPES["g2-k3"])
    seen = []
    real = decode_module.Decoder.launch_ahead
    monkeypatch.setattr(
        decode_module.Decoder, "launch_ahead", lambda d, p: seen.append(d.pipelined) or real(d, p)
    )
    run(model, [1, 2])
    assert seen and not any(seen)
    monkeypatch.setattr(decode_module, "on_gpu", lambda: True)  # (also: head on stream rows)
    seen.clear()
    assert run(model, [1, 2])[0] == plain_greedy(model, [1, 2], MAX_TOKENS)
    assert seen and all(seen)
    seen.clear()  # settings that read the host: not pipelined, and no error
    run(model, [1, 2], draft="streams+ngram")
    assert seen and not any(seen)


# ---- a pipelined launch never waits for the device -----------------------------------
# Tables kept between steps (built once, or grown by doubling): evaluated when made.
GROWN = {"kept_columns", "_full_rope_table", "window_table"}


def launch_reads(monkeypatch, model, prompt, **kwargs) -> list:
    """The host reads (``item``, ``tolist``, ``mx.eval``, ``mx.synchronize``) made while
    the pipelined generator launches a step ahead of its predecessor's host read, as
    ``(kind, function)`` pairs, followed by the number of such launches; a read there
    would make the host wait for the device."""
    reads, inside, launches = [], [False], [0]

    def spy(kind, real):
        def call(*args, **kw):
            if inside[0]:
                frame = traceback.extract_stack(limit=2)[0]
                reads.append((kind, frame.name))
            return real(*args, **kw)

        return call

    for name in ("item", "tolist"):
        monkeypatch.setattr(mx.array, name, spy(name, getattr(mx.array, name)))
    for name in ("eval", "synchronize"):
        monkeypatch.setattr(mx, name, spy(name, getattr(mx, name)))
    real = decode_module.Decoder.launch_ahead

    def launch_ahead(dec, p):
        inside[0] = True
        launches[0] += 1
        try:
            return real(dec, p)
        finally:
            inside[0] = False

    monkeypatch.setattr(decode_module.Decoder, "launch_ahead", launch_ahead)
    toks, records = spec_tokens(model, prompt, 120, pipeline=True, **kwargs)
    assert toks == plain_greedy(model, prompt, 120)
    assert launches[0] > 10, "too few launches ahead: the test is empty"
    return reads + [launches[0]]


@pytest.mark.parametrize("bucket", [0, 16])
@pytest.mark.parametrize("case", ["chain", "tree", "lookup"])
def test_pipelined_launch_reads_nothing(case, bucket, monkeypatch):
    """Launching step k + 1 builds its graph from step k's device outputs alone: no host
    read, so the device never idles for it (tables built once or grown by doubling aside)."""
    shape = {"chain": "chain-g1-k1", "tree": "g2-k3", "lookup": "g2-k3"}[case]
    model = tiny_spec_model("llama", vocab_size=8, **SHAPES[shape])
    model.speculative_streams.kv_bucket = bucket
    kwargs = dict(draft="ngram", num_draft_tokens=3) if case == "lookup" else {}
    reads = launch_reads(monkeypatch, model, PROMPTS[1], **kwargs)
    launches = reads.pop()
    assert [r for r in reads if r[1] not in GROWN] == []
    assert len(reads) < launches / 5  # (each table built once, or grown by doubling)


def test_launch_reads_control(monkeypatch):
    """Control: a launch that reads its tree's tokens back is caught."""
    model = tiny_spec_model("llama", vocab_size=8, **SHAPES["g2-k3"])
    real = decode_module.Decoder.launch

    def reading_launch(dec, draft, after=None):
        p = real(dec, draft, after)
        p.tokens.tolist()
        return p

    monkeypatch.setattr(decode_module.Decoder, "launch", reading_launch)
    reads = launch_reads(monkeypatch, model, PROMPTS[1])
    assert ("tolist", "reading_launch") in reads[:-1]


# ---- a pipelined pass writes the caches in place --------------------------------------
WIDE_KV = dict(num_attention_heads=8, num_key_value_heads=8, head_dim=128)  # 4 MiB a layer array


def step_peak_mib(model, **kwargs) -> float:
    """MiB a pipelined generation's steps allocate above what is live after its first
    token (the caches: 4 layers, keys and values, 4 MiB each at 1024 rows, which 900
    prompt tokens and 24 more never outgrow), the last token's pass into a prompt cache
    included."""
    from mlx_specstream import make_prompt_cache

    prompt = mx.random.randint(0, 32, (900,), key=mx.random.key(0))
    cache = make_prompt_cache(model)
    gen = decode_module.spec_generate_step(
        prompt, model, max_tokens=24, pipeline=True, prompt_cache=cache, **kwargs
    )
    next(gen)
    mx.synchronize()
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    assert len(list(gen)) == 23
    return (mx.get_peak_memory() - active) / 2**20


@pytest.mark.parametrize("draft", ["streams", "ngram"])
def test_pipelined_writes_update_the_caches_in_place(draft, monkeypatch):
    """Each pipelined pass writes its rows into the cache buffers in place: its steps
    allocate far less than one layer's keys. Control: the views a pass's writes return,
    kept past the pass (on the FoldingCache, as before session 34), share those buffers while the steps
    overlap, and the writes then allocate new ones: the peak holds the caches twice."""
    from helpers import tiny_model

    if draft == "streams":
        model = tiny_spec_model("llama", vocab_size=32, num_streams=2, top_k=2, model_args=WIDE_KV)
        kwargs = dict(max_tree_nodes=5)
    else:
        model = tiny_model("llama", 32, max_position_embeddings=4096, **WIDE_KV)
        kwargs = dict(draft="ngram", num_draft_tokens=3)
    assert step_peak_mib(model, **kwargs) < 4
    real = FoldingCache.update_and_fetch

    def keeping_views(self, keys, values):
        self.kept = real(self, keys, values)
        return self.kept

    monkeypatch.setattr(FoldingCache, "update_and_fetch", keeping_views)
    assert step_peak_mib(model, **kwargs) > 16


# ---- column buckets: a pipelined pass's shapes change once per bucket ------------------
def test_bucketed_and_pad_hidden_golden():
    assert [bucketed(c, 256) for c in (1, 255, 256, 300, 512)] == [256, 256, 256, 512, 512]
    assert bucketed(300, 0) == 300
    mask = mx.array([[1, 0, 0], [1, 1, 0]]).astype(mx.bool_)
    assert pad_hidden(mask, 4).astype(mx.int32).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert pad_hidden(mask, 3) is mask and pad_hidden(mask, 0) is mask
    wide = pad_hidden(mx.ones((2, 300), dtype=mx.bool_), 256)  # (more than the kept zeros)
    assert wide.shape == (2, 512) and wide[:, :300].all().item() and not wide[:, 300:].any().item()


def test_folding_cache_bucketed_view():
    """The worked example's first pass with 8-column buckets: 9 rows written, a view of 16
    whose last 7 columns are the buffer's zeros; the rows appended are the pass's own."""
    row = lambda v: mx.full((1, 1, 1, 2), float(v))  # noqa: E731
    c = KVCache()
    c.update_and_fetch(mx.concatenate([row(i + 1) for i in range(5)], 2), mx.zeros((1, 1, 5, 2)))
    tree = mx.concatenate([row(v) for v in (10, 11, 12, 13)], axis=2)
    cache = FoldingCache(c, None, 0, bucket=8)
    keys, values = cache.update_and_fetch(tree, tree)
    assert keys.shape[2] == values.shape[2] == 16
    assert keys[0, 0, :, 0].tolist() == [1, 2, 3, 4, 5, 10, 11, 12, 13] + [0] * 7
    assert cache.rows[0].shape[2] == 4 and c.offset == 5
    assert FoldingCache(c, None, 0).update_and_fetch(tree, tree)[0].shape[2] == 9  # control


def view_widths(monkeypatch, cls=FoldingCache):
    """Records the width of every view ``cls``'s ``update_and_fetch`` returns: a pipelined
    pass's caches (:class:`FoldingCache`), or an unpipelined one's in buckets."""
    widths = []
    real = cls.update_and_fetch

    def spy(self, keys, values):
        out = real(self, keys, values)
        widths.append(out[0].shape[2])
        return out

    monkeypatch.setattr(cls, "update_and_fetch", spy)
    return widths


@pytest.mark.parametrize("bucket", [4, 16, 256])
@pytest.mark.parametrize("arch", ARCHS)
def test_bucketed_pipelined_equals_mlx_lm(arch, bucket, monkeypatch):
    """With the views' columns rounded up to a multiple of ``bucket`` (and the masks
    hiding the columns past each pass's rows), output equals mlx-lm's, and every view
    the passes read was that wide."""
    widths = view_widths(monkeypatch)
    for shape in ("chain-g1-k1", "g2-k3"):
        model = tiny_spec_model(arch, vocab_size=8, mode="lossless", **SHAPES[shape])
        model.speculative_streams.kv_bucket = bucket
        for prompt in PROMPTS:
            assert run(model, prompt, pipeline=True)[0] == plain_greedy(model, prompt, MAX_TOKENS)
    assert widths and all(w % bucket == 0 for w in widths)
    assert len(set(widths)) < len(widths) // 4  # shapes repeat: few widths over many passes


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bucketed_pipelined_prompt_lookup_equals_mlx_lm(arch, monkeypatch):
    """Prompt lookup on any mlx-lm model (the verifier's runtime) takes buckets too."""
    from helpers import tiny_model

    widths = view_widths(monkeypatch)
    model = tiny_model(arch, 8, weight_scale=1.0)
    want = plain_greedy(model, LOOP_PROMPT, MAX_TOKENS)
    assert run(model, LOOP_PROMPT, draft="ngram", pipeline=True)[0] == want  # (attaches)
    model.speculative_streams.kv_bucket = 16
    widths.clear()
    assert run(model, LOOP_PROMPT, draft="ngram", pipeline=True)[0] == want
    assert widths and all(w % 16 == 0 for w in widths)


def test_bucketed_cache_view():
    """BucketedCache's example: offset 5, 4 rows, 8-column buckets: a view of 16 columns,
    the offset grown by 4 (as the cache's own update), the rest the buffer's zeros."""
    row = lambda v: mx.full((1, 1, 1, 2), float(v))  # noqa: E731
    c = KVCache()
    c.update_and_fetch(mx.concatenate([row(i + 1) for i in range(5)], 2), mx.zeros((1, 1, 5, 2)))
    rows = mx.concatenate([row(v) for v in (10, 11, 12, 13)], axis=2)
    view = BucketedCache(c, 8)
    assert view.offset == 5
    keys, values = view.update_and_fetch(rows, rows)
    assert keys.shape[2] == values.shape[2] == 16 and c.offset == view.offset == 9
    assert keys[0, 0, :, 0].tolist() == [1, 2, 3, 4, 5, 10, 11, 12, 13] + [0] * 7
    assert view.step == c.step  # (everything else is the cache's)


UNPIPELINED = {  # (stream pass, tree): chains take our masks in buckets, pruned trees too
    "fused chain": ("fused", SHAPES["chain-g1-k1"]),
    "split tree": ("split", SHAPES["g2-k3"]),
    "fused pruned tree": ("fused", dict(num_streams=3, top_k=2, prune_threshold=0.1)),
}


@pytest.mark.parametrize("case", sorted(UNPIPELINED))
@pytest.mark.parametrize("arch", ARCHS)
def test_bucketed_unpipelined_equals_mlx_lm(arch, case, monkeypatch):
    widths = view_widths(monkeypatch, BucketedCache)
    stream_pass, shape = UNPIPELINED[case]
    model = tiny_spec_model(arch, vocab_size=8, mode="lossless", **shape)
    rt = model.speculative_streams
    rt.split_streams, rt.kv_bucket = stream_pass == "split", 16
    for prompt in PROMPTS:
        assert run(model, prompt, pipeline=False)[0] == plain_greedy(model, prompt, MAX_TOKENS)
    assert widths and all(w % 16 == 0 for w in widths)


def test_bucketed_unpipelined_lookup_and_sampling(monkeypatch):
    """Prompt lookup through the verifier's runtime equals mlx-lm's in buckets; sampled
    tokens (rejection sampling, same seed) are those drawn without buckets."""
    from helpers import tiny_model

    from mlx_specstream.decode import spec_generate_step

    widths = view_widths(monkeypatch, BucketedCache)
    model = tiny_model("qwen3", 8, weight_scale=1.0)
    want = plain_greedy(model, LOOP_PROMPT, MAX_TOKENS)
    assert run(model, LOOP_PROMPT, draft="ngram", pipeline=False)[0] == want  # (attaches)
    model.speculative_streams.kv_bucket = 16
    assert run(model, LOOP_PROMPT, draft="ngram", pipeline=False)[0] == want
    assert widths
    spec = tiny_spec_model("llama", vocab_size=8, **SHAPES["g2-k3"])
    got = []
    for bucket in (0, 16):
        spec.speculative_streams.kv_bucket = bucket
        mx.random.seed(3)
        gen = spec_generate_step(mx.array([1, 2, 3]), spec, max_tokens=MAX_TOKENS,
                                 sampler=make_sampler(temp=0.8), acceptance="rejection")  # fmt: skip
        got.append([t for t, *_ in gen])
    assert got[0] == got[1]


@pytest.mark.parametrize("pipeline", [True, False])
def test_negative_control_bucket_columns_visible(monkeypatch, pipeline):
    """Padding the masks with visible columns (the buffer's zeros and stale rows
    attended) must change the output."""
    visible = lambda mask, b: mx.logical_not(pad_hidden(mx.logical_not(mask), b))  # noqa: E731
    monkeypatch.setattr(streams_module, "pad_hidden", visible)
    model = tiny_spec_model("llama", vocab_size=8, mode="lossless", **SHAPES["g2-k3"])
    model.speculative_streams.kv_bucket = 16
    prompt = PROMPTS[1]
    assert run(model, prompt, pipeline=pipeline)[0] != plain_greedy(model, prompt, MAX_TOKENS)


def test_bucket_default_on_cuda_in_half_precision_only(monkeypatch):
    """By default: 256 on MLX's CUDA backend in bfloat16/float16, 0 in float32 and
    on other devices; a bucket asked for over caches it cannot take is refused."""
    from mlx_lm.models.cache import QuantizedKVCache

    rt = tiny_spec_model("llama", vocab_size=8).speculative_streams
    cache = [KVCache() for _ in range(rt.num_layers)]
    for c in cache:
        c.update_and_fetch(mx.zeros((1, 2, 3, 8), mx.bfloat16), mx.zeros((1, 2, 3, 8), mx.bfloat16))
    assert rt._pass_bucket(cache) == 0  # (this CPU)
    monkeypatch.setattr(streams_module, "on_cuda", lambda: True)
    monkeypatch.setattr("mlx_specstream.cache.on_cuda", lambda: True)  # (default_bucket's)
    assert rt._pass_bucket(cache) == 256
    f32 = [KVCache() for _ in range(rt.num_layers)]
    for c in f32:
        c.update_and_fetch(mx.zeros((1, 2, 3, 8)), mx.zeros((1, 2, 3, 8)))
    assert rt._pass_bucket(f32) == 0
    quantized = cache[:-1] + [QuantizedKVCache()]
    assert rt._pass_bucket(quantized) == 0
    rt.kv_bucket = 0
    assert rt._pass_bucket(cache) == 0
    rt.kv_bucket = 64
    assert rt._pass_bucket(cache) == 64
    with pytest.raises(ValueError, match="kv_bucket=64: column buckets need plain KVCache"):
        rt._pass_bucket(quantized)


# ---- prompt lookup, pipelined: the history and the lookup on the device ----------------
LOOP_PROMPT = [3, 1, 4, 1, 5, 1, 2, 6, 5, 3, 5, 0, 1, 7, 3, 1, 4, 1, 5]


@pytest.mark.parametrize("arch", ARCHS)
def test_pipelined_prompt_lookup_equals_mlx_lm(arch):
    """Any mlx-lm model (the verifier alone): output equals mlx-lm's, drafts accepted."""
    from helpers import tiny_model

    model = tiny_model(arch, 8, weight_scale=1.0)
    toks, records = run(model, LOOP_PROMPT, draft="ngram", pipeline=True)
    assert toks == plain_greedy(model, LOOP_PROMPT, MAX_TOKENS)
    assert records[-1][3] < len(toks) // 2


def lookup_on_device_appending(extra, seen):
    """Decoder._lookup_on_device, recording the history its lookup read into
    ``seen``, then adding ``extra`` to the history's new length."""
    real = decode_module.Decoder._lookup_on_device

    def patched(self, p):
        out = real(self, p)
        history, length = self.device_history
        seen.append((history, length))
        self.device_history = history, length + extra
        return out

    return patched


@pytest.mark.parametrize("extra", [0, -1])
def test_device_history_is_the_text_so_far(monkeypatch, extra):
    """Every device lookup sees exactly the prompt and the tokens decoded so far;
    control: a history that forgets one token per step (``extra=-1``) does not."""
    from helpers import tiny_model

    seen = []
    monkeypatch.setattr(decode_module.Decoder, "_lookup_on_device",
                        lookup_on_device_appending(extra, seen))  # fmt: skip
    model = tiny_model("qwen2", 8)  # (varied text: a lost token shows)
    toks, _ = run(model, LOOP_PROMPT, draft="ngram", pipeline=True)
    assert toks == plain_greedy(model, LOOP_PROMPT, MAX_TOKENS)  # lossless whatever the drafts
    text = LOOP_PROMPT + toks  # (a step's tokens past max_tokens are not yielded: cut there)
    right = [h.tolist()[: min(n.item(), len(text))] == text[: n.item()] for h, n in seen]
    assert len(seen) > 3 and (all(right) if extra == 0 else not all(right))


def test_a_cache_without_spare_room_grows():
    """A cache whose buffers end at its offset (as one loaded from a file) grows
    when the pipelined pass writes past it."""
    model = tiny_spec_model("llama", vocab_size=8, **SHAPES["g2-k3"])
    prompt = [3, 1, 4, 1, 5, 1, 2, 6]
    cache = make_prompt_cache(model)
    model(mx.array(prompt[:-1])[None], cache=cache)
    for c in cache:
        c.keys, c.values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
    got = spec_tokens(model, prompt[-1:], 40, prompt_cache=cache, pipeline=True)[0]
    assert got == plain_greedy(model, prompt, 40)
    assert cache[0].keys.shape[2] > len(prompt) + 40  # grown by the pipelined writes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_pipelined_medusa_heads_equal_mlx_lm(arch):
    """Medusa heads draft from the accepted node's state alone, so they are
    pipelined too: same output as mlx-lm, same passes as unpipelined."""
    from test_drafters import drafter_model, zero_drafter

    model = drafter_model("medusa", arch, weight_scale=1.0, top_k=3, max_tree_nodes=20)
    zero_drafter(model)  # (heads that predict the base's own next token: drafts get accepted)
    prompt = [4, 8, 15, 16, 23]
    toks, records = spec_tokens(model, prompt, MAX_TOKENS, pipeline=True)
    assert toks == plain_greedy(model, prompt, MAX_TOKENS)
    unpiped = spec_tokens(model, prompt, MAX_TOKENS, pipeline=False)[1]
    assert [r[3] for r in records] == [r[3] for r in unpiped] and records[-1][3] < len(toks)


def test_parallelspec_is_not_pipelined():
    from test_drafters import drafter_model

    model = drafter_model("parallelspec")
    with pytest.raises(ValueError, match="pipeline=True: only trees drafted on the device"):
        spec_tokens(model, [1, 2, 3], 8, pipeline=True)

"""Kernel counts of lazy graphs (mlx_specstream.kernels), and what the step launches.

Counts are exact, so these are equalities: a step that launches kernels it
should not fails here on any machine.
"""

import doctest

import mlx.core as mx
import pytest
from helpers import plain_greedy, spec_tokens, tiny_spec_model

import mlx_specstream.decode as decode_module
from mlx_specstream import kernels
from mlx_specstream.decode import spec_generate_step
from mlx_specstream.kernels import FastOps, count_kernels, count_nodes, recorded_steps
from mlx_specstream.precision import on_gpu
from mlx_specstream.tree import fold_destinations


def test_docstring_examples():
    result = doctest.testmod(kernels)
    assert result.failed == 0 and result.attempted > 0, result


def test_counts_are_exact_and_skip_views_and_evaluated_inputs():
    x = mx.ones((2, 3))
    mx.eval(x)
    y = (x.T @ x).reshape(9) + 1  # Transpose, Matmul, Reshape, Broadcast (of 1), Add
    assert count_kernels([y]) == {"Matmul": 1, "Add": 1}
    assert sum(count_nodes([y]).values()) > 2
    mx.eval(y)
    assert count_kernels([y]) == {}  # evaluated: nothing left to run


def test_fast_ops_count_as_one_gpu_kernel():
    x, w = mx.ones((1, 4, 8)), mx.ones((8,))
    q = mx.ones((1, 2, 1, 8))
    mx.eval(x, w, q)
    real = mx.fast.rms_norm
    with FastOps() as ops:
        y = mx.fast.rms_norm(x, w, 1e-5)
        assert ops.surplus == sum(count_kernels([y]).values()) - 1 > 0
        ops.reset()
        one_row = mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0)
        assert ops.surplus == sum(count_kernels([one_row]).values()) - 1
        ops.reset()
        q4 = mx.ones((1, 2, 4, 8))
        mx.fast.scaled_dot_product_attention(q4, q4, q4, scale=1.0, mask="causal")
        assert ops.calls["scaled_dot_product_attention"] == 1
        assert ops.surplus == 0  # several rows: CUDA runs the same graph
    assert mx.fast.rms_norm is real  # restored


def pipelined_steps(model, prompt, monkeypatch, chain_flag=None, **settings):
    """Kernels of each pipelined launch; ``chain_flag`` overrides Fold's ``chain``."""
    if chain_flag is not None:
        real = decode_module.Fold

        def fold(prefix, accepted, path, rows, chain, moves):
            if chain and not chain_flag:  # move the chain's rows as a tree's: its fold table row
                table = fold_destinations(list(range(-1, path.shape[0] - 1)), rows[-1][0].shape[2])
                moves = mx.take(mx.array(table), accepted - 1, axis=0)
            return real(prefix, accepted, path, rows, chain_flag, moves)

        monkeypatch.setattr(decode_module, "Fold", fold)
    with recorded_steps() as steps:
        out = [t for t, *_ in spec_generate_step(mx.array(prompt), model, max_tokens=12, pipeline=True,
                                                 **settings)]  # fmt: skip
    return out, [s["kernels"] for s in steps]


@pytest.mark.parametrize(
    "settings", [dict(tree_top_k=1, tree_depth=3), dict(draft="ngram", num_draft_tokens=3)]
)
def test_a_pass_after_a_chain_moves_no_rows(monkeypatch, settings):
    """After a chain the accepted rows are in place: a folded pass launches 2 kernels
    per layer fewer (a scatter of keys and of values) than the same pass folding
    them as after a tree, and its output is the same. A tree's fold also adds its
    prefix to the destinations once per step, and here takes them from the
    chain's fold table (a subtraction and a gather, which the decoder's own
    folds do on the accepted node instead)."""
    model = tiny_spec_model("llama", vocab_size=8, mode="lossless", num_streams=3)
    prompt = [3, 1, 4, 1, 5, 1, 2, 6, 5, 3, 5, 0, 1, 7, 3, 1, 4]
    out, lean = pipelined_steps(model, prompt, monkeypatch, **settings)
    out_moved, moved = pipelined_steps(model, prompt, monkeypatch, chain_flag=False, **settings)
    assert out == out_moved == plain_greedy(model, prompt, 12)
    assert lean[0] == moved[0]  # the first pass folds nothing either way
    extra = 2 * len(model.layers) + 1 + 2
    assert len(lean) > 2 and all(m - k == extra for k, m in zip(lean[1:], moved[1:]))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3", "phi3"])
@pytest.mark.parametrize("pipeline", [False, True])
def test_additive_masks_decode_as_bool_masks(arch, pipeline, monkeypatch):
    """Masks handed to the layers in additive form (as on CUDA, where a bool mask
    costs a conversion in every layer) give plain decoding's output; control: an
    additive mask that hides nothing does not."""
    model = tiny_spec_model(arch, vocab_size=8, mode="lossless", num_streams=2, top_k=3,
                            max_tree_nodes=13)  # fmt: skip
    rt = model.speculative_streams
    prompt = [3, 1, 4, 1, 5, 1, 2, 6, 5, 3, 5, 0, 1, 7]
    want = plain_greedy(model, prompt, 24)
    seen = []
    real = type(rt)._attention_mask

    def recording(self, mask, dtype):
        out = real(self, mask, dtype)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(type(rt), "_attention_mask", recording)
    rt.additive_masks = True
    try:
        assert spec_tokens(model, prompt, 24, pipeline=pipeline)[0] == want
        assert seen and all(d != mx.bool_ for d in seen)
        monkeypatch.setattr(type(rt), "_attention_mask", lambda self, m, d: mx.zeros(m.shape, d))
        assert spec_tokens(model, prompt, 24, pipeline=pipeline)[0] != want
    finally:
        rt.additive_masks = False


def lora_stream_model(arch, **settings):
    """A tiny lossless model whose stream LoRA has nonzero B factors (they start at
    zero), and a function that runs one fused pass over a 4-node tree after a
    prompt: its ``[main logits, stream logits]`` and the kernels they took."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_spec_model(arch, vocab_size=16, mode="lossless", num_streams=2,
                            stream_lora_rank=4, stream_pass="fused", **settings)  # fmt: skip
    rt = model.speculative_streams
    mx.random.seed(3)
    rt.streams.update(tree_unflatten([
        (k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(rt.streams.parameters())
        if k.endswith("lora_b")
    ]))  # fmt: skip

    def step():
        cache = make_prompt_cache(model)
        rt.prefill(mx.array([1, 2, 3, 4, 5]), cache)
        out = rt.forward(mx.array([3, 5, 7, 2]), [-1, 0, 1, 0], cache, all_streams=True,
                         stream_logits=True)  # fmt: skip
        logits = [out.logits, out.stream_logits]
        kernels = sum(count_kernels(logits).values())
        mx.eval(logits)
        return logits, kernels

    return model, step


@pytest.mark.parametrize(
    "arch, shared",
    [("llama", {3, 2}), ("qwen2", {3, 2}), ("starcoder2", {3}), ("gpt_neox", set())],
)  # (gpt_neox fuses q, k and v into one projection: nothing to share)
def test_lora_targets_reading_one_input_share_one_product(arch, shared, monkeypatch):
    """The first pass learns which stream-LoRA targets read one input (q, k and v;
    gate and up); later passes compute one product with their A factors side by
    side and give each target its own block: the same stream logits, and the
    main logits bit for bit. Control: giving a target its neighbour's block."""
    model, step = lora_stream_model(arch)
    rt = model.speculative_streams

    def stream_logits():
        return step()[0]

    first = stream_logits()  # per target, learning the groups
    groups = set(rt._lora_groups.values())
    assert {len(g) for g in groups if len(g) > 1} == shared, groups
    grouped = stream_logits()
    assert mx.array_equal(first[0], grouped[0])
    assert mx.allclose(first[1], grouped[1], atol=1e-5, rtol=1e-5)
    if not shared:  # no neighbours to swap with
        return
    real = type(rt)._lora_input

    def neighbours_block(self, j, name, x, main):
        t, block, b_t, alpha = real(self, j, name, x, main)
        r = self.config.stream_lora_rank
        shift = r if block.stop + r <= t.shape[-1] else -r if block.start >= r else 0
        return t, slice(block.start + shift, block.stop + shift), b_t, alpha

    monkeypatch.setattr(type(rt), "_lora_input", neighbours_block)
    wrong = stream_logits()
    assert mx.array_equal(first[0], wrong[0])  # main rows never read the LoRA
    assert not mx.allclose(first[1], wrong[1], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_gathered_stream_lora_product_is_the_scaled_one(arch, monkeypatch):
    """Where launches bound a step (GPUs), the stream LoRA's A product zeroes the
    main rows by picking a zero factor per row (``mx.gather_mm``) instead of
    scaling the input first: one kernel per group of targets fewer, the main
    logits bit for bit, the stream logits as before, and greedy decoding is
    plain decoding. Control: rows that all pick the A factors give the main
    rows the LoRA too."""
    model, step = lora_stream_model(arch, stream_lora_alpha=6.0)
    rt = model.speculative_streams
    assert rt.gather_lora == on_gpu()  # a CPU scales the input (its gather_mm is slower)
    rt.gather_lora = False
    step(), step()  # (the first learns which targets share an input, the next groups them)
    scaled, scaled_kernels = step()
    rt.gather_lora = True
    step()  # (the first pass with it stacks the factors, once)
    gathered, gathered_kernels = step()
    groups = len({(j, group) for (j, _), group in rt._lora_groups.items()})
    assert gathered_kernels == scaled_kernels - groups
    assert mx.array_equal(scaled[0], gathered[0])
    assert mx.allclose(scaled[1], gathered[1], atol=1e-5, rtol=1e-5)
    prompt = [3, 1, 4, 1, 5, 1, 2, 6, 5, 3, 5, 0, 1, 7]
    assert spec_tokens(model, prompt, 24)[0] == plain_greedy(model, prompt, 24)
    real = type(rt)._gathered_product

    def every_row_picks_a(self, x, key, main):
        return real(self, x, key, 0)

    monkeypatch.setattr(type(rt), "_gathered_product", every_row_picks_a)
    wrong, _ = step()
    assert not mx.allclose(scaled[0], wrong[0], atol=1e-3)

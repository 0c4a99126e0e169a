"""Certified greedy targets: the argmax of a node's logits stands in for mlx-lm's
argmax of its log-softmax only where the two surely agree.

Subtracting a row's log-sum-exp can merge two close values into one float, and
then mlx-lm's greedy pick is the earlier index. The decoder must find those rows
(tree.certified_argmax) and fall back to the full log-softmax; these tests build
such a row on purpose, with a control where the certificate is too lax.
"""

import doctest
import math

import mlx.core as mx
import numpy as np
import pytest
from helpers import plain_greedy, spec_tokens, tiny_spec_model
from mlx_lm.generate import generate_step

import mlx_specstream.decode as decode_module
from mlx_specstream import tree
from mlx_specstream.sample_utils import make_sampler
from mlx_specstream.tree import certified_argmax

PROMPT = [3, 1, 4, 1, 5, 1, 2, 6, 5, 3, 5, 0, 1, 7]
TIE = [1, 2, 3, 4]  # the tokens of the merging near-tie, the maximum second


def near_tie(tokens, logits):
    """A logits processor that leaves four tokens on top, the second ahead of the
    others by one float spacing (2**-24): their log-probabilities merge, so
    mlx-lm's greedy pick is the first of them, the logits' argmax the second."""
    row = mx.full(logits.shape, -1e9, dtype=logits.dtype)
    values = mx.array([[0.5, 0.5 + 2**-24, 0.5, 0.5]], dtype=logits.dtype)
    return mx.put_along_axis(row, mx.array([TIE]), values, axis=-1)


def test_docstring_examples():
    result = doctest.testmod(tree)
    assert result.failed == 0 and result.attempted > 0, result


def test_the_near_tie_is_real():
    """Precondition of the decoding tests: mlx-lm's argmax differs from the logits'."""
    logits = near_tie(None, mx.zeros((1, 16)))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    assert mx.argmax(logits, axis=-1).item() == TIE[1]
    assert mx.argmax(logprobs, axis=-1).item() == TIE[0]
    assert certified_argmax(logits)[1].tolist() == [False]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_certified_rows_agree_with_mlx_lm(dtype):
    """On random rows, half with planted near-ties, every certified argmax is
    mlx-lm's; the certificate is the documented gap test; in float32 (where the
    decoder uses it) clear rows are certified."""
    rng = np.random.default_rng(0)
    V = 512
    rows = rng.normal(size=(400, V)).astype(np.float32)
    # Near-ties: copy the maximum to an earlier index, nudged down by a few spacings.
    for r in range(0, 400, 2):
        j = int(rows[r].argmax())
        if j > 0:
            rows[r, rng.integers(0, j)] = rows[r, j] - rng.integers(0, 4) * 2.0**-22
    x = mx.array(rows).astype(dtype)
    top, ok = certified_argmax(x)
    want = mx.argmax(x - mx.logsumexp(x, axis=-1, keepdims=True), axis=-1)
    ok, agree = np.array(ok), np.array(top == want)
    assert agree[ok].all()
    if dtype != mx.float16:  # (float16 rounds the planted ties into exact ones)
        assert not agree.all()  # there were rows to catch
    u = float(mx.finfo(dtype).eps) * 2 ** math.ceil(math.log2(math.log(V) + 1))
    xs = np.array(x.astype(mx.float32))
    for r in range(len(xs)):
        j = int(np.array(top)[r])
        runner = xs[r, :j].max() if j else -np.inf
        assert ok[r] == (xs[r, j] - runner > 2 * u)
    if dtype == mx.float32:
        assert ok[1::2].mean() > 0.95 and not ok[0::2].all()


def spec_with_tie(model, **kwargs):
    return spec_tokens(model, PROMPT, 12, logits_processors=[near_tie], **kwargs)[0]


def plain_with_tie(model):
    return plain_greedy(model, PROMPT, 12, logits_processors=[near_tie])


@pytest.fixture
def fallbacks(monkeypatch):
    """Counts the steps whose accepted path was not certified."""
    made = []
    real = decode_module.Decoder._uncertified

    def counted(self, p):
        made.append(1)
        return real(self, p)

    monkeypatch.setattr(decode_module.Decoder, "_uncertified", counted)
    return made


@pytest.mark.parametrize("settings", [dict(tree_top_k=3, tree_depth=2), dict(draft="ngram")])
def test_near_tie_falls_back_to_mlx_lms_pick(settings, fallbacks, monkeypatch):
    model = tiny_spec_model("llama", vocab_size=16, mode="lossless", num_streams=2, top_k=3)
    want = plain_with_tie(model)
    assert set(want) == {TIE[0]}
    assert spec_with_tie(model, pipeline=False, **settings) == want
    assert fallbacks  # the certificate caught the merged rows
    # Control: a certificate that always passes yields the logits' argmax instead.
    lax = lambda logits: (
        mx.argmax(logits, axis=-1),
        mx.ones(logits.shape[:1], mx.bool_),
    )  # noqa: E731
    monkeypatch.setattr(decode_module, "_certified_argmax", lax)
    assert set(spec_with_tie(model, pipeline=False, **settings)) == {TIE[1]}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_step_uncertified_still_equals_plain_decoding(arch, fallbacks, monkeypatch):
    """With every certificate failing, each step takes the full log-softmax and drops
    its drafts: the output is still mlx-lm's, token for token."""
    model = tiny_spec_model(arch, vocab_size=16, mode="lossless", num_streams=2, top_k=3)
    fail = lambda logits: (
        mx.argmax(logits, axis=-1),
        mx.zeros(logits.shape[:1], mx.bool_),
    )  # noqa: E731
    monkeypatch.setattr(decode_module, "_certified_argmax", fail)
    got = spec_tokens(model, PROMPT, 24, pipeline=False)[0]
    assert got == plain_greedy(model, PROMPT, 24)
    assert len(fallbacks) > 3
    # Control: certificates that pass with wrong targets change the output.
    wrong = lambda logits: (
        mx.argmin(logits, axis=-1),
        mx.ones(logits.shape[:1], mx.bool_),
    )  # noqa: E731
    monkeypatch.setattr(decode_module, "_certified_argmax", wrong)
    assert spec_tokens(model, PROMPT, 24, pipeline=False)[0] != got


@pytest.mark.parametrize("sampler", [None, make_sampler(temp=0.0)])
def test_yielded_logprobs_are_mlx_lms(sampler):
    """The log-probabilities yielded with certified targets (computed per yielded
    row) equal mlx-lm's; control: another row's do not."""
    model = tiny_spec_model("llama", vocab_size=16, mode="lossless", num_streams=2, top_k=3)
    prompt = mx.array(PROMPT)
    want = [lp for _, lp in generate_step(prompt, model, max_tokens=16)]
    got = [o[1] for o in spec_tokens(model, PROMPT, 16, sampler=sampler, pipeline=False)[1]]
    assert len(got) == len(want)
    assert all(mx.allclose(g, w, atol=1e-5).item() for g, w in zip(got, want))
    assert not all(mx.allclose(g, w, atol=1e-5).item() for g, w in zip(got[1:], want))


def test_certified_steps_skip_the_full_log_softmax(monkeypatch):
    """Certified greedy steps compute no log-sum-exp over the tree's rows (a
    per-row one only for what is yielded); control: a sampling decoder does."""
    model = tiny_spec_model("llama", vocab_size=16, mode="lossless", num_streams=2, top_k=3)
    seen = []
    real = mx.logsumexp
    monkeypatch.setattr(
        mx, "logsumexp", lambda x, *a, **k: seen.append(x.shape) or real(x, *a, **k)
    )
    spec_tokens(model, PROMPT, 16, pipeline=False, tree_top_k=3, tree_depth=2)
    assert seen and all(s[0] == 1 for s in seen if len(s) == 2)
    seen.clear()
    spec_tokens(model, PROMPT, 16, pipeline=False, tree_top_k=3, tree_depth=2,
                sampler=make_sampler(temp=0.7), acceptance="target-sample")  # fmt: skip
    assert any(len(s) == 2 and s[0] > 1 for s in seen)

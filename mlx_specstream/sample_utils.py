"""Samplers that also expose the distribution they sample from.

Lossless speculative sampling by rejection needs the target distribution
itself, not only draws from it. :func:`make_sampler` takes mlx-lm's
``make_sampler`` arguments and returns a :class:`DistributionSampler` that
samples exactly like mlx-lm's (the same filters, in the same order, then a
categorical draw at ``temp``) and whose :meth:`DistributionSampler.probs`
returns that distribution.

XTC ("exclude top choices") is random per draw: with probability
``xtc_probability`` the tokens above ``xtc_threshold`` are removed, all but the
least likely of them. Its distribution is the mixture of the two outcomes, and
every row of a tree pass tosses its own coin, so the tokens of one step are as
independent as those of successive plain steps.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass(frozen=True)
class DistributionSampler:
    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    top_k: int = 0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    xtc_special_tokens: Tuple[int, ...] = ()

    def __post_init__(self):
        if not (self.temp >= 0):
            raise ValueError(f"temp={self.temp!r} must be >= 0")
        if not (0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r} must be in [0, 1] (0 or 1: off)")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0: off)")
        if not (0.0 <= self.xtc_probability <= 1.0):
            raise ValueError(f"xtc_probability={self.xtc_probability!r} must be in [0, 1]")
        if not (0.0 <= self.xtc_threshold <= 0.5):
            raise ValueError(f"xtc_threshold={self.xtc_threshold!r} must be in [0, 0.5]")
        object.__setattr__(self, "xtc_special_tokens", tuple(self.xtc_special_tokens))

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def _filtered(self, logprobs: mx.array, xtc: bool) -> mx.array:
        """mlx-lm's filters in its order (top-p, min-p, XTC when ``xtc``, top-k), then ``temp``."""
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, self.min_tokens_to_keep)
        if xtc:
            logprobs = mx.where(xtc_mask(logprobs, self.xtc_threshold,
                                         self.xtc_special_tokens), -mx.inf, logprobs)  # fmt: skip
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs * (1.0 / self.temp)

    def logits(self, logprobs: mx.array) -> mx.array:
        """Filtered, tempered logits (``-inf`` outside the kept set), as mlx-lm samples
        them; with XTC, each row tosses its own coin."""
        if self.xtc_probability == 0:
            return self._filtered(logprobs, False)
        toss = mx.random.uniform(shape=logprobs.shape[:-1] + (1,)) < self.xtc_probability
        return mx.where(toss, self._filtered(logprobs, True), self._filtered(logprobs, False))

    def probs(self, logprobs: mx.array) -> mx.array:
        """The distribution a draw comes from; one-hot at the argmax when greedy.
        With XTC, the mixture of the filtered and the unfiltered distributions."""
        if self.greedy:
            return mx.eye(logprobs.shape[-1])[mx.argmax(logprobs, axis=-1)]
        probs = mx.softmax(self._filtered(logprobs, False).astype(mx.float32), axis=-1)
        if self.xtc_probability == 0:
            return probs
        cut = mx.softmax(self._filtered(logprobs, True).astype(mx.float32), axis=-1)
        return (1 - self.xtc_probability) * probs + self.xtc_probability * cut

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        return mx.random.categorical(self.logits(logprobs))


def xtc_mask(logits: mx.array, threshold: float, special_tokens: Tuple[int, ...] = ()) -> mx.array:
    """The tokens XTC removes, as mlx-lm's ``apply_xtc`` removes them when its coin says so:
    every token whose probability exceeds that of the least likely token above
    ``threshold``, except ``special_tokens``.

    Example: probabilities ``[0.5, 0.3, 0.15, 0.05]`` with threshold 0.1 remove
    tokens 0 and 1 (0.15 is the least likely above 0.1, and is kept).
    """
    probs = mx.softmax(logits, -1)
    least = mx.where(probs > threshold, probs, mx.inf).min(axis=-1, keepdims=True)
    mask = probs > least
    if special_tokens:
        mask[..., list(special_tokens)] = False
    return mask


def xtc_special_tokens(tokenizer) -> List[int]:
    """The tokens XTC never removes, as mlx-lm's commands pass them: a line break
    and the EOS tokens."""
    return tokenizer.encode("\n") + list(tokenizer.eos_token_ids)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.1,
    xtc_special_tokens: Optional[Sequence[int]] = None,
) -> DistributionSampler:
    """mlx-lm's ``make_sampler`` arguments, as a :class:`DistributionSampler`."""
    return DistributionSampler(
        temp,
        top_p,
        min_p,
        min_tokens_to_keep,
        top_k,
        xtc_probability,
        xtc_threshold,
        tuple(xtc_special_tokens or ()),
    )

"""Samplers that also expose the distribution they sample from.

Lossless speculative sampling by rejection needs the target distribution
itself, not only draws from it. :func:`make_sampler` takes mlx-lm's
``make_sampler`` arguments and returns a :class:`DistributionSampler` that
samples exactly like mlx-lm's (the same filters, in the same order, then a
categorical draw at ``temp``) and whose :meth:`DistributionSampler.probs`
returns that distribution.
"""

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass(frozen=True)
class DistributionSampler:
    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    top_k: int = 0

    def __post_init__(self):
        if not (self.temp >= 0):
            raise ValueError(f"temp={self.temp!r} must be >= 0")
        if not (0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r} must be in [0, 1] (0 or 1: off)")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0: off)")

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def logits(self, logprobs: mx.array) -> mx.array:
        """Filtered, tempered logits (``-inf`` outside the kept set), as mlx-lm samples them."""
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, self.min_tokens_to_keep)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs * (1.0 / self.temp)

    def probs(self, logprobs: mx.array) -> mx.array:
        """The distribution a draw comes from; one-hot at the argmax when greedy."""
        if self.greedy:
            return mx.eye(logprobs.shape[-1])[mx.argmax(logprobs, axis=-1)]
        return mx.softmax(self.logits(logprobs).astype(mx.float32), axis=-1)

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        return mx.random.categorical(self.logits(logprobs))


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
) -> DistributionSampler:
    """mlx-lm's ``make_sampler`` arguments (without XTC), as a :class:`DistributionSampler`."""
    return DistributionSampler(temp, top_p, min_p, min_tokens_to_keep, top_k)

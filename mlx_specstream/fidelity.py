"""Whether a greedy divergence from plain decoding is only a near-tie.

On a GPU in bfloat16, float16 or a quantized dtype, a verify pass over n tree
rows and plain decoding's pass over one row run different kernels, which sum
in different orders and so round differently. Where the plain model's best
two logits are within that rounding of each other, the argmax can flip: the
output leaves plain decoding's there, and only there, without any bug.

The bound, derived from the dtype's rounding (first order): with machine
epsilon ``eps`` (bfloat16 2^-7, float16 2^-10, float32 2^-23), every stored
activation carries a relative rounding error of at most ``eps / 2``. A pass
through ``L`` decoder layers stores ``2L`` sublayer outputs added to the
residual stream, then the final norm's output and the logits: ``2L + 2``
roundings, each a relative perturbation of at most ``eps / 2`` that reaches a
logit ``z`` as at most ``eps / 2 * |z|`` when activations keep their scale
through the residual stream (the assumption of this first-order bound; it is
not a worst case over all weights). The two computations round independently,
so one logit differs by at most ``(2L + 2) * eps * |z|``, and the gap between
two logits by at most the sum over both::

    bound = (2L + 2) * eps * (|z_plain| + |z_ours|)

Worked example: bfloat16, 4 layers, logits 3.0 (plain's token) and 1.0 (ours):
``10 * 2^-7 * 4.0 = 0.3125``; a divergence there is a near-tie only if the
plain model scores the two tokens within 0.3125 of each other.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .precision import compute_dtype

EPSILON = {mx.float32: 2.0**-23, mx.bfloat16: 2.0**-7, mx.float16: 2.0**-10}


def near_tie_bound(z_plain: float, z_ours: float, dtype: mx.Dtype, num_layers: int) -> float:
    """The largest logit gap that rounding in ``dtype`` can flip (module docstring)."""
    if dtype not in EPSILON:
        raise ValueError(f"dtype={dtype}: no rounding bound for it (one of {list(EPSILON)}).")
    return (2 * num_layers + 2) * EPSILON[dtype] * (abs(z_plain) + abs(z_ours))


@dataclass
class Divergence:
    """The first token where a decoding left plain decoding's output."""

    index: int  # position in the generated tokens
    plain_token: int
    our_token: int
    gap: float  # the plain model's logit of its token minus that of ours
    bound: float

    @property
    def near_tie(self) -> bool:
        return abs(self.gap) <= self.bound


def first_divergence(
    model: nn.Module, prompt: Sequence[int], ours: List[int], plain: List[int]
) -> Optional[Divergence]:
    """Compares two greedy outputs of one prompt and scores where they first differ.

    The plain model's logits at that position come from one pass over the
    prompt and the common prefix (the model without our hooks).

    Args:
        model: the model both outputs came from.
        prompt: the prompt tokens.
        ours, plain: the generated tokens (ours, and plain decoding's).

    Returns:
        Divergence or None: ``None`` when the outputs are identical.
    """
    i = next((k for k, (a, b) in enumerate(zip(ours, plain)) if a != b), None)
    if i is None:
        if len(ours) != len(plain):
            raise ValueError(f"Outputs agree but have {len(ours)} and {len(plain)} tokens.")
        return None
    logits = model(mx.array(list(prompt) + plain[:i])[None])[0, -1].astype(mx.float32)
    z_plain, z_ours = logits[plain[i]].item(), logits[ours[i]].item()
    bound = near_tie_bound(z_plain, z_ours, compute_dtype(model), len(model.layers))
    return Divergence(i, plain[i], ours[i], z_plain - z_ours, bound)

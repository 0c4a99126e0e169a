"""Training Medusa-1 heads for an mlx-lm model, in MLX (``mlx_specstream.train --drafter
medusa``), in the released checkpoints' layout (:mod:`mlx_specstream.medusa`).

The base is frozen; its last states come from its own pass through the runtime's hooks,
never differentiated. Head ``j`` over the state of row ``i`` after the base's final norm
predicts token ``i + j + 2`` (cross-entropy, weight ``0.8 ** j``: Medusa-1's
``lambda_j``). The first weights are Medusa's: every residual block zero (a head's output
starts as the normed state itself) and, with ``--medusa-lm-heads own`` (Medusa-1's
recipe), each head's LM head a copy of the base's (dequantized), so every head starts by
drafting the base's own next token. ``--medusa-lm-heads base`` trains the blocks alone
and ranks their outputs with the base's head (TGI's layout without LM heads of their
own): a step then reads no extra ``V x D`` per level.
"""

from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .config import DrafterConfig
from .draft_vocab import head_rows
from .drafters import check_drafter_base
from .eagle_training import EagleLoss, _float_weight
from .medusa import MedusaCheckpointHeads
from .mtp import _head_module
from .streams import StreamRuntime

LM_HEADS = ("own", "base")


def check_heads(heads: int, layers: int, lm_heads: str) -> None:
    """Refuses a head count or block count below 1, or an unknown LM-head choice, naming
    the flag."""
    for flag, value in (("--num-streams", heads), ("--medusa-num-layers", layers)):
        if value < 1:
            raise ValueError(f"{flag} {value}: Medusa heads need at least 1")
    if lm_heads not in LM_HEADS:
        raise ValueError(f"--medusa-lm-heads {lm_heads!r}: one of {LM_HEADS}")


def attach_medusa_for_training(model, heads: int, layers: int = 1, lm_heads: str = "own",
                               tree: Optional[dict] = None) -> MedusaCheckpointHeads:  # fmt: skip
    """Puts fresh Medusa heads on ``model`` (an mlx-lm model without a drafter): ``heads``
    of ``layers`` residual blocks each, all zero, with LM heads of their own copied from
    the base's (``lm_heads="own"``) or none (``"base"``), in float32.

    Raises:
        ValueError: a base these heads cannot run on (:func:`~mlx_specstream.drafters.check_drafter_base`).
    """

    check_heads(heads, layers, lm_heads)
    check_drafter_base(model)
    own = lm_heads == "own"
    medusa = dict(layers_per_head=layers, lm_heads=heads if own else 0, fc_bias=True,
                  token_map_size=None)  # fmt: skip
    config = DrafterConfig(kind="medusa", num_draft_tokens=heads, medusa=medusa, **(tree or {}))
    drafter = MedusaCheckpointHeads(config, model)
    drafter.update({"heads": tree_map(mx.zeros_like, drafter.parameters()["heads"])})
    if own:
        weight = _float_weight(_head_module(model)).astype(mx.float32)
        for head in drafter.lm_heads:
            head.weight = weight
    drafter.set_dtype(mx.float32)
    mx.eval(drafter.parameters())
    model.speculative_streams = StreamRuntime(model, config, drafter=drafter)
    return drafter


class MedusaLoss(EagleLoss):
    """Medusa-1's loss of ``model``'s heads, with
    :class:`~mlx_specstream.train.StreamLoss`'s interface (``gamma``: the heads): head
    ``j`` at row ``i`` against token ``i + j + 2``, weighted ``0.8 ** j``, over the rows
    every head supervises (from the last prompt token on)."""

    label = "head"

    def __init__(self, model):
        super().__init__(model, steps=len(model.speculative_streams.drafter.heads))

    def _base_to_draft(self) -> np.ndarray:
        return np.arange(head_rows(self.model), dtype=np.int32)  # (every token ranked)

    def step_sums(self, rows: List[List[int]], lo: int, n: int):
        """Each head's summed cross-entropy and top-1 hits over rows ``[lo, n)`` of
        windows ``rows`` (of one length)."""
        ids = mx.array(rows, dtype=mx.int32)
        h = self.features(ids)[:, lo:n]  # (the last layer's states, before the final norm)
        B, L, D = h.shape
        logits = self.drafter.draft_rows(self.rt, h.reshape(B * L, D)).reshape(B, L, self.gamma, -1)
        return [
            self.token_sums(logits[:, :, j], ids[:, lo + j + 2 : n + j + 2])
            for j in range(self.gamma)
        ]


def trainable_summary(drafter: MedusaCheckpointHeads) -> str:
    """What is trained, for the run's log."""
    size = sum(v.size for _, v in tree_flatten(drafter.trainable_parameters()))
    own = "LM heads of their own" if drafter.lm_heads else "the base's LM head"
    return f"{len(drafter.heads)} Medusa heads ({own}), {size:,} trainable parameters"

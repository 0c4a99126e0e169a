"""Training an EAGLE-1 drafter for an mlx-lm model, in MLX (``mlx_specstream.train
--drafter eagle``): its first weights, and EAGLE-1's loss.

The base is frozen; its features ``f`` are its last states after its final norm (the
input of its LM head: what :class:`~mlx_specstream.eagle1.Eagle1Drafter` reads), from its
own pass through the runtime's hooks, never differentiated. Row ``i`` pairs ``f_i`` with
token ``i + 1``'s embedding and predicts the next feature ``f_{i + 1}`` (smooth L1, mean
over the width) and, through the base's LM head, token ``i + 2`` (cross-entropy, weight
0.1): EAGLE-1's loss. While training, the features get uniform noise in ``[-0.1, 0.1]``,
as EAGLE trains, so that deeper levels, run on the drafter's own predictions, stay close;
each window's noise is drawn from the step and the window, so a resumed run draws the same.

``--ttt-steps K`` above 1 (EAGLE-1's own recipe: 1) also trains the deeper levels on the
drafter's own outputs, as EAGLE-3's training-time test does
(:func:`~mlx_specstream.eagle_training.ttt_states`)::

    step 0, row i: fc([e(t_{i+1}); f_i])        -> f_{i+1}, t_{i+2}
    step k, row i: fc([e(t_{i+k+1}); o_{k-1,i}]) -> f_{i+k+1}, t_{i+k+2}   (weight 0.8 ** k)
"""

import zlib
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import DrafterConfig
from .draft_vocab import head_rows
from .drafters import check_drafter_base
from .eagle1 import EAGLE1_DEFAULTS, Eagle1Drafter
from .eagle_training import EagleLoss, base_layer_settings, copy_parts, ttt_states
from .model_parts import hidden_size
from .mtp import _final_norm, head_logits
from .streams import StreamRuntime

CLS_WEIGHT = 0.1  # (EAGLE's p_w: the token loss's weight beside the feature loss's 1)
NOISE = 0.1  # (EAGLE's uniform noise on the input features, half-width)
# The base's last layer's parts the drafter's layer starts from (where names and shapes agree).
COPIED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp", "post_attention_layernorm")  # fmt: skip


def eagle1_settings_for(model) -> dict:
    """The drafter section's ``eagle`` settings of an EAGLE-1 drafter for ``model``: a
    layer of the base's shape (:func:`~mlx_specstream.eagle_training.base_layer_settings`),
    ``fc`` with a bias (EAGLE's)."""
    return dict(base_layer_settings(model), fc_bias=True, own_embeddings=False)


def attach_eagle1_for_training(model, tree: Optional[dict] = None, seed: int = 0) -> Eagle1Drafter:
    """Puts a fresh EAGLE-1 drafter on ``model`` (an mlx-lm model without a drafter).

    Its first weights: the base's last layer's attention projections, MLP and
    post-attention norm where names and shapes agree (a quantized linear dequantized),
    ``fc`` ``[0, I]`` (the feature alone, no bias); the rest MLX's own initialisation,
    drawn after seeding with ``seed``.

    Raises:
        ValueError: a base this drafter cannot run on (:func:`~mlx_specstream.drafters.check_drafter_base`).
    """
    check_drafter_base(model)
    config = DrafterConfig(
        kind="eagle", eagle=eagle1_settings_for(model), **{**EAGLE1_DEFAULTS, **(tree or {})}
    )
    mx.random.seed(seed)
    drafter = Eagle1Drafter(config, model)
    copy_parts(drafter.layer, model.layers[-1], COPIED)
    D = hidden_size(model)
    drafter.fc.weight = mx.concatenate([mx.zeros((D, D)), mx.eye(D)], axis=1)
    drafter.fc.bias = mx.zeros((D,))
    mx.eval(drafter.parameters())
    model.speculative_streams = StreamRuntime(model, config, drafter=drafter)
    return drafter


def window_noise(rows: List[List[int]], width: int, step: int) -> mx.array:
    """``(B, L, width)`` uniform noise in ``[-NOISE, NOISE]``, each window's drawn from
    ``step`` and its tokens alone (the same for a resumed run, and for a window of a batch
    computed on its own)."""
    out = []
    for row in rows:
        key = mx.random.key(zlib.crc32(np.asarray(row, np.int32).tobytes(), step))
        out.append(mx.random.uniform(-NOISE, NOISE, (len(row), width), key=key))
    return mx.stack(out)


class Eagle1Loss(EagleLoss):
    """EAGLE-1's loss of ``model``'s EAGLE-1 drafter (feature regression and tokens), with
    :class:`~mlx_specstream.train.StreamLoss`'s interface; ``steps`` above 1 train the
    deeper levels on the drafter's own outputs (see the module's docstring).

    ``train_step`` is the optimizer step being taken (set by
    :func:`~mlx_specstream.train.train_streams`): the features get noise then, never while
    evaluating (``None``).
    """

    label = "level"

    def __init__(self, model, steps: int = 1):
        super().__init__(model, steps)
        self.train_step: Optional[int] = None

    def _base_to_draft(self) -> np.ndarray:
        return np.arange(head_rows(self.model), dtype=np.int32)  # (the base's head: every token)

    def features(self, ids: mx.array) -> mx.array:
        """The base's last states of windows ``ids`` after its final norm, never differentiated."""
        return _final_norm(self.model)(super().features(ids))  # (the norm's weight: the base's)

    def step_sums(self, rows: List[List[int]], lo: int, n: int):
        """Each step's summed loss (the feature's smooth L1, mean over the width, plus
        ``CLS_WEIGHT`` times the token's cross-entropy) and top-1 hits over rows
        ``[lo, n)`` of windows ``rows`` (of one length)."""
        ids = mx.array(rows, dtype=mx.int32)
        feats = self.features(ids)
        given = feats
        if self.train_step is not None:
            given = feats + window_noise(rows, feats.shape[-1], self.train_step)
        out = []
        for k, o in enumerate(eagle1_ttt_states(self.drafter, self.rt, given, ids, self.gamma)):
            o = o[:, lo:n]
            target = feats[:, lo + k + 1 : n + k + 1]
            reg = nn.losses.smooth_l1_loss(o, target, reduction="none").mean(-1).sum()
            ce, hits = self.token_sums(head_logits(self.model, o), ids[:, lo + k + 2 : n + k + 2])
            out.append((reg + CLS_WEIGHT * ce, hits))
        return out


def eagle1_ttt_states(drafter: Eagle1Drafter, rt, feats: mx.array, ids: mx.array, steps: int):
    """The drafter's outputs over ``steps`` levels, ``(B, n, D)`` each, rows ``i < n = L -
    steps - 1`` of features ``feats`` (normed, ``(B, L, D)``) and windows ``ids``
    ``(B, L)`` (see the module's docstring): what its drafting computes from each row."""
    n = ids.shape[1] - steps - 1

    def layer_input(k, h):
        x = drafter.inputs(rt, h, ids[:, k + 1 : k + 1 + n])
        return x, x  # (no input norm: EAGLE drops the first layer's)

    return ttt_states([drafter.layer], feats[:, :n], steps, layer_input)

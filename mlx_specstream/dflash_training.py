"""Training a DFlash drafter for an mlx-lm model, in MLX (``mlx_specstream.train
--drafter dflash``): its first weights, and DFlash's block loss.

The base is frozen: its features come from its own pass through the runtime's hooks
(the states the drafter reads when it drafts), never differentiated. A window's
blocks start at anchors ``p`` (every ``stride``-th position of its completion, at an
offset set by the window's tokens, so a resumed run sees the same ones)::

    block at p:  [t_p, MASK, ..., MASK]     at positions p .. p + B - 1
    context:     the fused features of t_0 .. t_{p-1}
    mask row j:  learns t_{p+j}, weighted exp(-(j - 1) / decay)

as the drafter runs when it drafts after ``t_{p-1}`` with the bonus token ``t_p``.
All of a batch's blocks run in one pass of each layer (one batch row per block, the
context's keys shared by the blocks of a window).

Example (a window ``t0..t7``, prompt of 3, ``B = 3``, stride 2, offset 1)::

    anchors 4, 6:  [t4 M M] sees f0..f3 -> t5 t6;  [t6 M M] sees f0..f5 -> t7 (t8 unknown)
"""

import math
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from .config import DrafterConfig
from .dflash import DFLASH_DEFAULTS, DFlashDrafter, block_attend, context_keys
from .drafters import check_drafter_base
from .eagle_training import copy_parts, drafter_features
from .model_parts import hidden_size, text_args
from .streams import StreamRuntime, get_runtime

BLOCK_SIZE = 8  # (the bonus token and 7 masks; z-lab trains 16 for 8B bases)
DRAFT_LAYERS = 2  # (z-lab's 8B drafters have 5)


def default_layers(num_layers: int, count: int) -> List[int]:
    """DFlash's target layers for a base of ``num_layers``: ``count`` spread evenly from
    layer 1 to layer ``N - 3`` (z-lab's ``[1, 9, 17, 25, 33]`` for 36 layers and 5)."""
    first, last = min(1, num_layers - 2), max(num_layers - 3, 0)
    if count == 1:
        return [num_layers // 2]
    return [round(first + i * (last - first) / (count - 1)) for i in range(count)]


def check_layers(model, layers: Optional[Sequence[int]], count: int) -> List[int]:
    """The target layers (DFlash's default where ``None``), checked against ``model``.

    Raises:
        ValueError: naming ``--target-layer-ids``, unless indices in ``[0, N - 2]``.
    """
    N = len(model.layers)
    layers = default_layers(N, count) if layers is None else list(layers)
    if not layers or not all(0 <= i <= N - 2 for i in layers):
        raise ValueError(f"--target-layer-ids {layers}: layer indices in [0, {N - 2}] (their "
                         "outputs; the base has {N} layers)".replace("{N}", str(N)))  # fmt: skip
    return layers


def check_block(block_size: int, draft_layers: int = 1, blocks: int = 1) -> None:
    """Refuses a block of under 2 rows, no layers or no blocks a window, naming the option."""
    if block_size < 2:
        raise ValueError(f"--block-size {block_size}: at least 2 (the bonus token and a mask)")
    if draft_layers < 1:
        raise ValueError(f"--draft-layers {draft_layers}: at least 1")
    if blocks < 1:
        raise ValueError(f"--blocks-per-window {blocks}: at least 1")


def dflash_settings_for(model, layers, draft_layers: int, block_size: int, mask: int) -> dict:
    """The drafter section's ``dflash`` settings of a drafter for ``model``: Qwen3 layers
    of the base's width, heads and MLP (its own ``ModelArgs``' values)."""
    a = text_args(model)
    D, heads = hidden_size(model), a.num_attention_heads
    return dict(
        hidden_size=D, num_hidden_layers=draft_layers, num_attention_heads=heads,
        num_key_value_heads=getattr(a, "num_key_value_heads", None) or heads,
        head_dim=getattr(a, "head_dim", None) or D // heads,
        intermediate_size=a.intermediate_size, rms_norm_eps=getattr(a, "rms_norm_eps", 1e-6),
        rope_theta=float(getattr(a, "rope_theta", None) or 10000.0), rope_scaling=None,
        max_position_embeddings=getattr(a, "max_position_embeddings", None) or 32768,
        layer_types=["full_attention"] * draft_layers, sliding_window=None, is_causal=None,
        block_size=block_size, mask_token_id=int(mask), feature_layers=[i + 1 for i in layers],
        input_embedding_scale=1.0, output_multiplier=1.0, final_logit_softcapping=None,
    )  # fmt: skip


def rarest_token(examples, vocab: int) -> int:
    """The mask token: the id least frequent in ``examples``' windows (the lowest of
    those never seen), a row of the base's embeddings as DFlash's ``<|MASK|>`` is."""
    counts = np.zeros(vocab, dtype=np.int64)
    for ex in examples:
        ids = np.asarray(ex["input_ids"])
        counts += np.bincount(ids[ids < vocab], minlength=vocab)
    return int(np.argmin(counts))


def attach_dflash_for_training(
    model,
    layers: Optional[Sequence[int]] = None,
    draft_layers: int = DRAFT_LAYERS,
    block_size: int = BLOCK_SIZE,
    mask: int = 0,
    tree: Optional[dict] = None,
    seed: int = 0,
) -> DFlashDrafter:
    """Puts a fresh DFlash drafter on ``model`` (an mlx-lm model without a drafter).

    Its first weights: ``fc`` averaging the feature layers, the base's final norm, and
    where the base's top ``draft_layers`` layers are Llama-like of the same shapes, their
    attention projections, MLPs and norms (``q_norm``, ``k_norm`` at one); the rest
    random (MLX's own initialisation, drawn after seeding with ``seed``).

    Raises:
        ValueError: a base this drafter cannot run on (refused before training, as
          loading the result would: :func:`~mlx_specstream.drafters.check_drafter_base`).
    """
    from .mtp import _final_norm

    check_drafter_base(model)
    check_block(block_size, draft_layers)
    layers = check_layers(model, layers, draft_layers)
    settings = dflash_settings_for(model, layers, draft_layers, block_size, mask)
    tree = {**DFLASH_DEFAULTS, "num_draft_tokens": block_size - 1, **(tree or {})}
    tree["tree_depth"] = min(tree["tree_depth"], block_size - 1)
    config = DrafterConfig(kind="dflash", dflash=settings, **tree)
    mx.random.seed(seed)
    drafter = DFlashDrafter(config, model)
    top = model.layers[len(model.layers) - draft_layers :]
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
             "post_attention_layernorm")  # fmt: skip
    for ours, theirs in zip(drafter.layers[-len(top) :], top):
        copy_parts(ours, theirs, parts)
    final_norm = _final_norm(model)
    if isinstance(final_norm, nn.RMSNorm) and final_norm.weight.shape == drafter.norm.weight.shape:
        drafter.norm.weight = final_norm.weight.astype(mx.float32)
    D, m = hidden_size(model), len(layers)
    drafter.fc.weight = mx.concatenate([mx.eye(D)] * m, axis=1) / m
    drafter.update(tree_map(lambda w: w.astype(mx.float32), drafter.parameters()))
    mx.eval(drafter.parameters())
    model.speculative_streams = StreamRuntime(model, config, drafter=drafter)
    return drafter


def anchors(length: int, prompt_len: int, tokens: Sequence[int], count: int) -> List[int]:
    """A window's block starts: up to ``count`` positions ``p`` in
    ``[max(prompt_len, 1), length - 2]``, every ``stride``-th, from an offset set by the
    window's tokens (a different one per window, the same on every run)."""
    lo, hi = max(prompt_len, 1), length - 2
    if hi < lo:
        return []
    n = hi - lo + 1
    stride = max(1, math.ceil(n / count))
    offset = int(np.asarray(tokens, dtype=np.int64).sum()) % stride
    return list(range(lo + offset, hi + 1, stride))[:count]


def block_logits(drafter: DFlashDrafter, rt, feats: mx.array, ids: mx.array, starts):
    """``(B * A, blocks - 1, V)`` logits of the mask rows of ``A`` blocks per window,
    starting at ``starts`` ``(B, A)`` (host ints) of windows ``ids`` ``(B, L)`` with
    their features ``feats`` ``(B, L, m D)``."""
    B, L = ids.shape
    A = len(starts[0])
    size = drafter._settings["block_size"]
    p = mx.array(np.asarray(starts, dtype=np.int32).reshape(-1))  # (B * A,)
    first = mx.take_along_axis(ids, mx.array(np.asarray(starts, np.int32)), axis=1).reshape(-1)
    x = drafter.block(rt, first, size - 1)
    context = mx.repeat(drafter.context(feats), A, axis=0)  # (B * A, L, D)
    seen = mx.concatenate(
        [mx.arange(L)[None] < p[:, None], mx.ones((B * A, size), dtype=mx.bool_)], axis=1
    )[
        :, None, None, :
    ]  # (each block: the context before its start, and itself)
    hd = drafter._head_dim
    for layer in drafter.layers:  # (the context at positions 0 .. L - 1, each block at its own)
        keys, values = context_keys(layer, context, hd)
        x = block_attend(layer, x, keys, values, p, seen, hd)
    out = drafter.norm(x)[:, 1:]
    return drafter.level_logits(rt, out)


def decay_for(block_size: int) -> float:
    """DFlash's loss decay for a block: 7 for 16 rows, 5 for 10, 4 for 8 (and in between)."""
    return float(np.interp(block_size, [8, 10, 16], [4.0, 5.0, 7.0]))


class DFlashLoss:
    """The block loss of ``model``'s DFlash drafter, with
    :class:`~mlx_specstream.train.StreamLoss`'s interface (``gamma``: the levels).

    Args:
        model: a model with a DFlash drafter attached.
        blocks (int): blocks per window (anchors).
    """

    label = "level"  # (each accuracy entry: a mask row of the block)

    def __init__(self, model, blocks: int = 16):
        self.model, self.rt = model, get_runtime(model)
        self.drafter = self.rt.drafter
        self.gamma = self.drafter._settings["block_size"] - 1
        check_block(self.gamma + 1, blocks=blocks)
        self.blocks = blocks
        decay = decay_for(self.gamma + 1)
        self.weights = [math.exp(-j / decay) for j in range(self.gamma)]

    def features(self, ids: mx.array) -> mx.array:
        """The features the drafter reads of windows ``ids``, never differentiated."""
        return mx.stop_gradient(drafter_features(self.model, ids))

    def _anchors(self, ex) -> List[int]:
        return anchors(len(ex["input_ids"]), int(ex["prompt_len"]), ex["input_ids"], self.blocks)

    def normalizers(self, batch):
        """The batch's supervised rows per level (targets inside the window), and no
        early exit."""
        counts = [0] * self.gamma
        for ex in batch:
            L = len(ex["input_ids"])
            for p in self._anchors(ex):
                for j in range(min(self.gamma, L - 1 - p)):
                    counts[j] += 1
        return counts, 0

    def __call__(self, batch, normalizers=None):
        """``(loss, metrics)`` of a batch, as :class:`~mlx_specstream.train.StreamLoss`;
        windows of one length and anchor count run together."""
        counts, _ = self.normalizers(batch)
        ce_sum, hits = [0.0] * self.gamma, [0.0] * self.gamma
        groups = {}
        for ex in batch:
            starts = self._anchors(ex)
            if starts:
                key = (len(ex["input_ids"]), len(starts))
                groups.setdefault(key, []).append((ex["input_ids"], starts))
        for (L, _), rows in groups.items():
            ids = mx.array([r[0] for r in rows], dtype=mx.int32)
            starts = [r[1] for r in rows]
            logits = block_logits(self.drafter, self.rt, self.features(ids), ids, starts)
            at = np.asarray(starts).reshape(-1, 1) + np.arange(1, self.gamma + 1)  # (targets)
            y = mx.take_along_axis(
                mx.repeat(ids, len(starts[0]), axis=0), mx.array(np.minimum(at, L - 1)), axis=1
            )
            known = mx.array(at < L)
            ce = nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="none")
            right = (mx.argmax(logits, axis=-1) == y) & known
            for j in range(self.gamma):
                ce_sum[j] = ce_sum[j] + mx.where(known[:, j], ce[:, j], 0.0).sum()
                hits[j] = hits[j] + right[:, j].sum()
        divide = (normalizers or (counts, 0))[0]
        loss = mx.array(0.0)
        for j in range(self.gamma):
            if counts[j]:
                loss = loss + self.weights[j] * ce_sum[j] / divide[j]
        metrics = {"hits": [mx.array(h) for h in hits], "counts": counts,
                   "early_hits": mx.array(0.0), "early_count": 0}  # fmt: skip
        return loss, metrics

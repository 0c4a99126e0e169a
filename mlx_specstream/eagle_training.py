"""Training an EAGLE-3 drafter for an mlx-lm model, in MLX (``mlx_specstream.train
--drafter eagle3``): its first weights, and EAGLE-3's "training-time test" loss, run
through every layer of the drafter (``--eagle-num-layers``; a released drafter's
layers, norms and kind run as they draft).

The base is frozen: its features come from its own pass through the runtime's hooks
(:meth:`~mlx_specstream.streams.StreamRuntime.prefill_rows`, the states the drafter
reads when it drafts), never differentiated. Over ``K`` steps (``--ttt-steps``)::

    step 0, row i: h = fc(features of token i), token i + 1      -> learns token i + 2
    step k, row i: h = step k - 1's output at i, token i + k + 1 -> learns token i + k + 2

Step ``k``'s row ``i`` sits at position ``i + k`` and attends to step 0's rows up to
``i`` and to its own earlier steps' rows at ``i``: exactly what the drafter's deeper
levels attend to when it drafts from position ``i`` (the real rows up to it, then its
own rows). Losses are weighted ``0.8 ** k`` (EAGLE-3's), over rows from the last prompt
token on whose target lies in the window and in the draft vocabulary.

Example (a step and a window of 6 tokens ``t0..t5``, ``K = 2``: rows ``i = 0..2``)::

    step 0: (f0, t1) (f1, t2) (f2, t3)  -> t2 t3 t4   causal over step 0
    step 1: (o0, t2) (o1, t3) (o2, t4)  -> t3 t4 t5   row i: step 0's rows <= i, itself
"""

from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .config import DrafterConfig
from .drafters import check_drafter_base
from .eagle import EAGLE_DEFAULTS, Eagle3Drafter, default_layers
from .model_parts import hidden_size, text_args
from .streams import StreamRuntime, get_runtime

STEP_WEIGHT = 0.8  # (EAGLE-3's per-step loss weight, to the power of the step)


def base_layer_settings(model) -> dict:
    """A Llama layer of ``model``'s width, heads and MLP (the base's own ``ModelArgs``'
    values): what an EAGLE drafter's layer trained here is shaped as."""
    a = text_args(model)
    D = hidden_size(model)
    heads = a.num_attention_heads
    return dict(
        hidden_size=D, num_attention_heads=heads,
        num_key_value_heads=getattr(a, "num_key_value_heads", None) or heads,
        head_dim=getattr(a, "head_dim", None) or D // heads,
        intermediate_size=a.intermediate_size, rms_norm_eps=getattr(a, "rms_norm_eps", 1e-6),
        rope_theta=float(getattr(a, "rope_theta", 10000.0)), rope_scaling=None,
        max_position_embeddings=getattr(a, "max_position_embeddings", None),
    )  # fmt: skip


def eagle_settings_for(model, layers: Sequence[int], draft_vocab_size: int,
                       num_layers: int = 1) -> dict:  # fmt: skip
    """The drafter section's ``eagle`` settings of an EAGLE-3 drafter for ``model``:
    ``num_layers`` Llama layers of the base's shape (:func:`base_layer_settings`)."""
    return dict(
        base_layer_settings(model), attention_bias=False, mlp_bias=False,
        draft_vocab_size=draft_vocab_size, target_hidden_size=hidden_size(model),
        norm_before_residual=False, feature_layers=list(layers), own_embeddings=False,
        num_layers=num_layers, layer_type="llama", norm_before_fc=False, fc_norm=False,
        norm_output=False,
    )  # fmt: skip


def check_layers(model, layers: Optional[Sequence[int]]) -> List[int]:
    """The feature layers (EAGLE-3's default where ``None``), checked against ``model``.

    Raises:
        ValueError: naming ``--eagle-layers``, unless three indices in ``[0, N]``.
    """
    N = len(model.layers)
    layers = default_layers(N) if layers is None else list(layers)
    if len(layers) != 3 or not all(0 <= i <= N for i in layers):
        raise ValueError(f"--eagle-layers {layers}: three layer indices in [0, {N}]")
    return layers


def attach_eagle_for_training(
    model,
    layers: Optional[Sequence[int]] = None,
    draft_ids=None,
    tree: Optional[dict] = None,
    seed: int = 0,
    num_layers: int = 1,
) -> Eagle3Drafter:
    """Puts a fresh EAGLE-3 drafter of ``num_layers`` Llama layers on ``model`` (an mlx-lm
    model without a drafter).

    Its first weights: ``fc`` averaging the three feature layers, the base's final norm,
    its LM head's rows of ``draft_ids`` (default every token) as the head, and where the
    base's last layer is a Llama-like one of the same shapes, its MLP and output
    projection (each further layer: the base's last layer whole, where it fits); the rest
    random (MLX's own initialisation, drawn after seeding with ``seed``).

    Raises:
        ValueError: a feature layer outside ``[0, N]``, fewer than one layer, or a base
          this drafter cannot run on (refused before training, as loading the result
          would: :func:`~mlx_specstream.drafters.check_drafter_base`).
    """
    from .draft_vocab import head_owner
    from .mtp import _final_norm

    check_drafter_base(model)
    layers = check_layers(model, layers)
    owner, key = head_owner(model)
    weight = _float_weight(owner[key])
    V = weight.shape[0]
    ids = mx.arange(V, dtype=mx.int32) if draft_ids is None else mx.array(draft_ids, mx.int32)
    config = DrafterConfig(
        kind="eagle3",
        eagle=eagle_settings_for(model, layers, int(ids.shape[0]), num_layers),
        **{**EAGLE_DEFAULTS, **(tree or {})},
    )
    mx.random.seed(seed)
    drafter = Eagle3Drafter(config, model)
    copy_parts(drafter.layer, model.layers[-1], ("mlp", "self_attn.o_proj"))
    whole = ("mlp", "self_attn", "input_layernorm", "post_attention_layernorm")
    for block in drafter.upper:
        copy_parts(block, model.layers[-1], whole)
    final_norm = _final_norm(model)
    if isinstance(final_norm, nn.RMSNorm) and final_norm.weight.shape == drafter.norm.weight.shape:
        drafter.norm.weight = final_norm.weight.astype(mx.float32)
    drafter.lm_head.weight = mx.take(weight, ids, axis=0).astype(mx.float32)
    drafter.d2t = ids - mx.arange(ids.shape[0], dtype=mx.int32)
    D = hidden_size(model)
    drafter.fc.weight = mx.concatenate([mx.eye(D)] * 3, axis=1) / 3
    drafter.freeze(keys=["d2t"], recurse=False)  # (ids, never trained)
    mx.eval(drafter.parameters())
    model.speculative_streams = StreamRuntime(model, config, drafter=drafter)
    return drafter


def copy_parts(ours: nn.Module, theirs: nn.Module, names) -> None:
    """Copies the parameters of ``theirs``' submodules ``names`` (dotted paths) into
    ``ours``' where every name and shape agrees (quantized linears' weights dequantized,
    inside a submodule too); any other stays as it was."""
    for name in names:
        mine, base = ours, theirs
        try:
            for part in name.split("."):
                mine, base = mine[part], base[part]
            new = _float_parameters(base)
            have = dict(tree_flatten(mine.parameters()))
            given = dict(tree_flatten(new))
            if given.keys() != have.keys() or any(given[k].shape != have[k].shape for k in have):
                continue
            mine.update(tree_map(lambda w: w.astype(mx.float32), new))
            mx.eval(mine.parameters())
        except (KeyError, AttributeError, ValueError):
            continue


def _float_parameters(module: nn.Module) -> dict:
    """``module``'s parameters with every quantized linear's or embedding's weight
    dequantized (its scales and biases gone)."""
    if "scales" in module:
        bias = {"bias": module["bias"]} if "bias" in module else {}
        return {"weight": _float_weight(module), **bias}
    out = {}
    for k, v in module.items():
        if isinstance(v, nn.Module):
            out[k] = _float_parameters(v)
        elif isinstance(v, list) and v and all(isinstance(m, nn.Module) for m in v):
            out[k] = [_float_parameters(m) for m in v]
        elif isinstance(v, mx.array):
            out[k] = v
    return out


def _float_weight(head: nn.Module) -> mx.array:
    """The rows of a (possibly quantized) linear or embedding head, in float."""
    if not isinstance(head.get("weight"), mx.array):
        raise ValueError(
            f"a drafter's head starts from the base's LM head: a linear or embedding, "
            f"not a {type(head).__name__}"
        )
    if "scales" not in head:
        return head["weight"]
    return mx.dequantize(head["weight"], head["scales"], head.get("biases"),
                         group_size=head.group_size, bits=head.bits,
                         mode=getattr(head, "mode", "affine"))  # fmt: skip


def ttt_logits(drafter: Eagle3Drafter, rt, feats: mx.array, ids: mx.array, steps: int):
    """The training-time test's logits over its draft vocabulary: one ``(B, n, V_draft)``
    per step, rows ``i < n = L - steps - 1`` of ``feats`` ``(B, L, m D)`` and ``ids``
    ``(B, L)`` (see the module's docstring), through every layer of the drafter (its
    features' norms, its further layers, the final norm's output passed on where
    ``norm_output``: as it drafts)."""
    layer = drafter.layer
    n = ids.shape[1] - steps - 1
    h = drafter.fuse(feats[:, :n])

    def layer_input(k, h):
        e = drafter.embed(rt, ids[:, k + 1 : k + 1 + n]).astype(h.dtype)
        hn = layer.hidden_norm(h)
        x = mx.concatenate([layer.input_layernorm(e), hn], axis=-1)
        return x, hn if layer._norm_first else h

    passed = drafter.norm if drafter._norm_output else None
    states = ttt_states([layer] + drafter.upper, h, steps, layer_input, passed)
    return [drafter.tree_logits(rt, s) for s in states]


def ttt_states(layers, h: mx.array, steps: int, layer_input, passed=None) -> List[mx.array]:
    """A drafter's outputs over ``steps`` steps of the training-time test, rows ``(B, n,
    D)`` each: step ``k`` runs ``layers`` in turn (each one's ``self_attn``, ``mlp`` and
    norms), the first on ``layer_input(k, h)`` = ``(x,
    residual)``, ``x`` the attention's input from the previous step's output ``h`` (step
    0: ``h`` given), each further one on the one before's output; its rows at positions
    ``i + k``, each attending (in each layer) to step 0's rows up to ``i`` and to its own
    earlier steps' rows at ``i`` (see the module's docstring). ``passed``: what a step's
    output goes through before the next step reads it (and is returned), if anything."""
    B, n = h.shape[:2]
    causal = mx.tril(mx.ones((n, n), dtype=mx.bool_))
    kept = [([], []) for _ in layers]  # (each layer's keys and values, a list per step)
    states = []
    for k in range(steps):
        x, residual = layer_input(k, h)
        for j, layer in enumerate(layers):
            if j:
                x, residual = layer.input_layernorm(h), h
            a = residual + _ttt_attention(layer.self_attn, x, k, *kept[j], causal)
            h = a + layer.mlp(layer.post_attention_layernorm(a))
        h = h if passed is None else passed(h)
        states.append(h)
    return states


def _ttt_attention(attn, x: mx.array, k: int, keys: list, values: list, causal: mx.array):
    """Step ``k``'s attention over rows ``x`` ``(B, n, C)`` (Llama's or Qwen3's: its norms
    of the heads' queries and keys), its keys and values appended to ``keys``, ``values``."""
    B, n = x.shape[:2]
    H, KV = attn.n_heads, attn.n_kv_heads

    def heads(proj, count, norm=None, rope=True):
        y = proj(x).reshape(B, n, count, -1)
        y = (y if norm is None else norm(y)).transpose(0, 2, 1, 3)
        y = attn.rope(y, offset=k) if rope else y  # (step k's rows at positions i + k)
        return mx.repeat(y, H // count, axis=1)

    q = heads(attn.q_proj, H, getattr(attn, "q_norm", None))
    keys.append(heads(attn.k_proj, KV, getattr(attn, "k_norm", None)))
    values.append(heads(attn.v_proj, KV, rope=False))
    first = (q @ keys[0].transpose(0, 1, 3, 2)) * attn.scale
    first = mx.where(causal, first, mx.array(-mx.inf, first.dtype))
    own = [(q * kk).sum(-1, keepdims=True) * attn.scale for kk in keys[1:]]
    p = mx.softmax(mx.concatenate([first] + own, axis=-1), axis=-1, precise=True)
    out = p[..., :n] @ values[0]
    for m, vv in enumerate(values[1:]):
        out = out + p[..., n + m : n + m + 1] * vv
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, n, -1))


def drafter_features(model, ids: mx.array) -> mx.array:
    """``(B, L, m D)``: the features ``model``'s drafter (EAGLE-3's, DFlash's) reads of
    windows ``ids`` ``(B, L)``, from the base's own pass through the runtime's hooks."""
    from mlx_lm.models.cache import make_prompt_cache

    return get_runtime(model).prefill_rows(ids, make_prompt_cache(model))


def check_steps(steps: int) -> None:
    """Refuses a training-time test of fewer than one step, naming ``--ttt-steps``."""
    if steps < 1:
        raise ValueError(f"--ttt-steps {steps}: at least 1")


class EagleLoss:
    """The training-time test loss of ``model``'s EAGLE-3 drafter, with
    :class:`~mlx_specstream.train.StreamLoss`'s interface (``gamma``: the steps).

    Args:
        model: a model with an EAGLE-3 drafter attached.
        steps (int): ``K``, the training-time test's steps.
    """

    label = "step"  # (each accuracy entry: a step of the training-time test)

    def __init__(self, model, steps: int = 3):
        check_steps(steps)
        self.model = model
        self.rt = get_runtime(model)
        self.drafter = self.rt.drafter
        self.gamma = steps
        to_draft = self._base_to_draft()
        self._known = to_draft >= 0  # (on the host: the normalizers read no device)
        self._to_draft = mx.array(to_draft)

    def _base_to_draft(self) -> np.ndarray:
        """Each base token's id in the drafter's head (its d2t's), ``-1`` where it has none."""
        d = self.drafter
        to_draft = np.full(d._vocab, -1, dtype=np.int32)
        to_draft[np.arange(d.d2t.shape[0]) + np.array(d.d2t)] = np.arange(d.d2t.shape[0])
        return to_draft

    def features(self, ids: mx.array) -> mx.array:
        """:func:`drafter_features` of windows ``ids``, never differentiated."""
        return mx.stop_gradient(drafter_features(self.model, ids))

    def span(self, length: int, prompt_len: int):
        """The rows ``[lo, n)`` of a window that every step supervises: from the last
        prompt token on, while every step's target lies in the window."""
        n = length - self.gamma - 1
        return max(prompt_len - 1, 0), n

    def normalizers(self, batch):
        """The batch's supervised rows per step (targets outside the draft vocabulary
        left out), and no early exit."""
        counts = [0] * self.gamma
        for ex in batch:
            lo, n = self.span(len(ex["input_ids"]), int(ex["prompt_len"]))
            for k in range(self.gamma):
                if n > lo:
                    counts[k] += int(self._known[ex["input_ids"][lo + k + 2 : n + k + 2]].sum())
        return counts, 0

    def __call__(self, batch, normalizers=None):
        """``(loss, metrics)`` of a batch, as :class:`~mlx_specstream.train.StreamLoss`;
        windows of one length and prompt length run together (one pass of the base and
        of each step over all of them)."""
        counts, _ = self.normalizers(batch)
        sums, hits = [0.0] * self.gamma, [0.0] * self.gamma
        groups = {}
        for ex in batch:
            key = (len(ex["input_ids"]), int(ex["prompt_len"]))
            groups.setdefault(key, []).append(ex["input_ids"])
        for (length, prompt_len), rows in groups.items():
            lo, n = self.span(length, prompt_len)
            if n <= lo:
                continue
            for k, (s, h) in enumerate(self.step_sums(rows, lo, n)):
                sums[k], hits[k] = sums[k] + s, hits[k] + h
        divide = (normalizers or (counts, 0))[0]
        loss = mx.array(0.0)
        for k in range(self.gamma):
            if counts[k]:
                loss = loss + STEP_WEIGHT**k * sums[k] / divide[k]
        metrics = {"hits": [mx.array(h) for h in hits], "counts": counts,
                   "early_hits": mx.array(0.0), "early_count": 0}  # fmt: skip
        return loss, metrics

    def step_sums(self, rows: List[List[int]], lo: int, n: int):
        """Each step's summed loss and top-1 hits over rows ``[lo, n)`` of windows
        ``rows`` (of one length): cross-entropy over the draft vocabulary."""
        ids = mx.array(rows, dtype=mx.int32)
        logits = ttt_logits(self.drafter, self.rt, self.features(ids), ids, self.gamma)
        out = []
        for k, z in enumerate(logits):
            out.append(self.token_sums(z[:, lo:n], ids[:, lo + k + 2 : n + k + 2]))
        return out

    def token_sums(self, z: mx.array, targets: mx.array):
        """Summed cross-entropy and top-1 hits of logits ``z`` over the base's token ids
        ``targets``, those outside the draft vocabulary left out."""
        z = z.astype(mx.float32)
        y = self._to_draft[targets]
        known = y >= 0
        ce = nn.losses.cross_entropy(z, mx.maximum(y, 0), reduction="none")
        return mx.where(known, ce, 0.0).sum(), ((mx.argmax(z, axis=-1) == y) & known).sum()

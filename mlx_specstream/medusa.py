"""Released Medusa-1 heads (Cai et al., arXiv 2401.10774) through the tree verifier.

A released Medusa checkpoint holds ``k`` heads over the base's last hidden state after its
final norm (the input of its LM head). Head ``j`` is a few residual blocks and an LM head
of its own, and drafts the token ``j + 2`` places ahead (tree level ``j + 1``)::

    x = norm(h)                          # the base's final norm
    x = x + SiLU(W_l x + b_l)            # l = 0 .. layers_per_head - 1
    logits_j = lm_head_j(x)              # its own head (initialised from the base's)

Heads trained here (:class:`~mlx_specstream.drafters.MedusaHeads`) differ: one block
over the state before the norm, then the base's own norm and head.

Checkpoints read (``load(base, drafter=DIR)``; safetensors only):

* FasterDecoding's (``medusa_lm_head.safetensors``; TensorRT-LLM and TGI read the
  same): ``{j}.{l}.linear.{weight,bias}`` and ``{j}.{L}.weight`` (the head's LM head,
  after its ``L`` blocks), with ``medusa_num_heads`` and ``medusa_num_layers`` in
  ``config.json``. FasterDecoding's uploaded configs may name fewer heads than the file
  holds (its own loader then asks for 5): the heads in the tensors are read. Without
  the ``{j}.{L}.weight`` heads (TGI's second layout), the base's LM head ranks each
  head's output. ``medusa_lm_head.pt`` (a PyTorch pickle) converts with
  ``python -m convert.medusa``. Such heads beside a model's own weights (a model's
  ``config.json`` with ``medusa_num_heads``: TGI's Medusa models) are that model's:
  ``load(DIR)`` drafts with them.
* vLLM's (``model_type: "medusa"``): ``blocks.{j}.layers.{l}.{weight,bias}``,
  ``lm_heads.{j}.weight`` (one shared head where ``original_lm_head``), and
  ``token_map`` where ``truncated_vocab_size`` is below the vocabulary: the heads rank
  only those tokens (a head of every token is cut to them, as vLLM does).

Example:
    >>> model, tok = load("mlx-community/vicuna-7b-v1.3-4bit",
    ...                   drafter="FasterDecoding/medusa-vicuna-7b-v1.3")
"""

import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .config import MEDUSA_KEYS, DrafterConfig
from .draft_vocab import head_rows, widened
from .drafters import MedusaHeads, ResBlock, attach_checkpoint_drafter, checkpoint_files
from .drafters import refuse_attached
from .model_parts import hidden_size
from .mtp import _final_norm, head_logits

HEADS_FILE, PICKLE = "medusa_lm_head.safetensors", "medusa_lm_head.pt"
PICKLE_HINT = (
    "FasterDecoding's Medusa heads are a PyTorch pickle (medusa_lm_head.pt); rewrite them "
    "as safetensors with: python -m convert.medusa --src DIR_OR_HUB_REPO --out DIR"
)
# FasterDecoding's names: a block's linear, or (no ``linear``) the head's LM head.
_FASTER = re.compile(r"(\d+)\.(\d+)\.(linear\.)?(weight|bias)")
_VLLM_BLOCK = re.compile(r"blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)")
_VLLM_HEAD = re.compile(r"lm_heads\.(\d+)\.weight")


def is_medusa_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds released Medusa heads: alone (FasterDecoding's config with
    ``medusa_num_heads`` and no model's settings, or vLLM's ``"medusa"``), or beside the
    weights of the model they draft for (a model's config with ``medusa_num_heads`` and
    ``medusa_lm_head.safetensors``, as TGI's Medusa models keep them)."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        return False
    config = json.loads(file.read_text())
    if config.get("model_type") == "medusa":
        return True
    if "medusa_num_heads" not in config:
        return False
    return "num_attention_heads" not in config or any(
        (path / name).is_file() for name in (HEADS_FILE, PICKLE)
    )


def _heads_files(path: Path):
    """``medusa_lm_head.safetensors`` where there is one (beside a model's weights too),
    else every safetensors file (vLLM's heads alone)."""
    if (Path(path) / HEADS_FILE).is_file():
        return [Path(path) / HEADS_FILE]
    if (Path(path) / PICKLE).is_file():
        raise ValueError(f"{path}: its heads are {PICKLE} only. {PICKLE_HINT}")
    return checkpoint_files(path, PICKLE_HINT)


def read_medusa_weights(path: Path) -> Dict[str, mx.array]:
    """The heads' tensors under :class:`MedusaCheckpointHeads`' names
    (``heads.{j}.{l}.linear.*``, ``lm_heads.{j}.weight``, ``token_map``).

    Raises:
        ValueError: naming the file and tensor, for a name neither format has.
    """
    weights = {}
    for file in _heads_files(path):
        for key, value in mx.load(str(file)).items():
            name = key
            for prefix in ("medusa_heads.", "medusa_head.", "model."):
                name = name[len(prefix) :] if name.startswith(prefix) else name
            m = _FASTER.fullmatch(name)
            if m and (m.group(3) or m.group(4) == "weight"):
                j, l, linear, what = m.groups()
                ours = f"heads.{j}.{l}.linear.{what}" if linear else f"lm_heads.{j}.{l}.weight"
            elif m := _VLLM_BLOCK.fullmatch(name):
                ours = "heads.{}.{}.linear.{}".format(*m.groups())
            elif _VLLM_HEAD.fullmatch(name) or name in ("token_map", "lm_head.weight"):
                ours = "lm_heads.0.weight" if name == "lm_head.weight" else name
            else:
                raise ValueError(f"{file}: tensor {key!r} is not a Medusa head's (neither "
                                 "FasterDecoding's nor vLLM's names)")  # fmt: skip
            if ours in weights:
                raise ValueError(f"{file}: tensor {key!r} is in the checkpoint twice")
            weights[ours] = value
    return weights


def medusa_layout(path: Path, model: nn.Module, weights: dict) -> Tuple[int, dict, dict]:
    """``(heads, the section's medusa dict, the weights as the drafter takes them)`` of
    the checkpoint in ``path`` (its tensors ``weights``, :func:`read_medusa_weights`) on
    ``model``, its base. FasterDecoding's LM heads ``lm_heads.{j}.{L}`` are renamed
    ``lm_heads.{j}``; a head of every token is cut to ``token_map``'s rows.

    Raises:
        ValueError: naming the file and key, for heads that do not fit the base or
          each other.
    """
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    D, vocab = hidden_size(model), head_rows(model)

    def fail(why):
        raise ValueError(f"{file}: {why}")

    blocks: Dict[int, set] = {}
    for key in weights:
        if key.startswith("heads."):
            j, l = key.split(".")[1:3]
            blocks.setdefault(int(j), set()).add(int(l))
    k = len(blocks)
    if k == 0 or sorted(blocks) != list(range(k)):
        fail(f"its tensors hold heads {sorted(blocks)}: heads 0..k-1, each of residual blocks")
    layers = len(blocks[0])
    for j, ls in blocks.items():
        if sorted(ls) != list(range(layers)):
            fail(f"head {j} has blocks {sorted(ls)}, head 0 has {layers}")
    vllm = config.get("model_type") == "medusa"  # (vLLM's names; else FasterDecoding's)
    names = (
        ("num_hidden_layers", "num_heads") if vllm else ("medusa_num_layers", "medusa_num_heads")
    )
    said = config.get(names[0], layers)
    if said != layers:
        fail(f"{names[0]}={said}: its tensors hold {layers} block(s) per head")
    said = config.get(names[1], k)
    if said > k:
        fail(f"{names[1]}={said}: its tensors hold {k} head(s)")
    for name, size in (("hidden_size", D), ("vocab_size", vocab)):
        if config.get(name, size) != size:
            fail(f"{name}={config[name]}: the base's is {size}")
    out = {}
    for key, value in weights.items():  # (FasterDecoding's head j's LM head: after its blocks)
        parts = key.split(".")
        if key.startswith("lm_heads.") and len(parts) == 4:
            if int(parts[2]) != layers:
                fail(f"{key}: a head's LM head follows its {layers} block(s)")
            key = f"lm_heads.{parts[1]}.weight"
        out[key] = value
    heads = sorted(int(key.split(".")[1]) for key in out if key.startswith("lm_heads."))
    if heads not in ([], [0], list(range(k))):
        fail(f"LM heads {heads} for {k} heads: one per head, one shared, or none (the base's)")
    if config.get("original_lm_head") and len(heads) > 1:
        fail(f"original_lm_head=true (one LM head for all, as vLLM reads it): its tensors "
             f"hold {len(heads)}")  # fmt: skip
    biases = sum(key.endswith(".bias") for key in out if key.startswith("heads."))
    if biases not in (0, k * layers):
        fail(f"{biases} of its {k * layers} residual blocks have biases")
    if biases and vllm and not config.get("medusa_fc_bias"):
        fail("medusa_fc_bias is not true, so vLLM reads its blocks without the biases its "
             "tensors hold")  # fmt: skip
    token_map = out.get("token_map")
    if token_map is not None and not heads:
        fail("a token_map without LM heads of its own (the base's ranks every token)")
    said = config.get("truncated_vocab_size") or vocab
    if (token_map is None) != (said >= vocab) or (token_map is not None and token_map.size != said):
        fail(f"truncated_vocab_size={said} with "
             f"{'no token_map' if token_map is None else f'a token_map of {token_map.size}'} "
             f"(a base of {vocab} tokens)")  # fmt: skip
    if token_map is not None:
        out["token_map"] = token_map = _checked_token_map(file, token_map, vocab)
        for key in [key for key in out if key.startswith("lm_heads.")]:
            if out[key].shape[0] == vocab and len(token_map) < vocab:
                out[key] = out[key][token_map]  # (a head of every token: its rows, as vLLM)
    medusa = {
        "layers_per_head": layers,
        "lm_heads": len(heads),
        "fc_bias": biases > 0,
        "token_map_size": None if token_map is None else int(token_map.shape[0]),
    }
    assert sorted(medusa) == sorted(MEDUSA_KEYS)
    return k, medusa, out


def _checked_token_map(file: Path, token_map: mx.array, vocab: int) -> mx.array:
    """``token_map`` as ``int32`` ids; refused where they are not distinct ids of the base."""
    ids = token_map.astype(mx.float32).tolist() if token_map.ndim == 1 else None
    if not ids or any(i != int(i) or not 0 <= i < vocab for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(
            f"{file}: its token_map {tuple(token_map.shape)} must list distinct token ids in "
            f"0..{vocab - 1}"
        )
    return token_map.astype(mx.int32)


class MedusaCheckpointHeads(MedusaHeads):
    """``heads.{j}.{l}.linear.{weight,bias}``, ``lm_heads.{j}.weight`` (one shared head
    where the section says so) and ``token_map`` (the ids the LM heads rank, if not all)."""

    def __init__(self, config: DrafterConfig, model: nn.Module):
        nn.Module.__init__(self)
        medusa, D = config.medusa, hidden_size(model)
        self.heads = [
            [ResBlock(D, medusa["fc_bias"]) for _ in range(medusa["layers_per_head"])]
            for _ in range(config.num_draft_tokens)
        ]
        V = medusa["token_map_size"] or head_rows(model)
        self.lm_heads = [nn.Linear(D, V, bias=False) for _ in range(medusa["lm_heads"])]
        self._own_heads = medusa["lm_heads"] > 0
        if medusa["token_map_size"] is not None:
            self.token_map = mx.arange(V, dtype=mx.int32)
            self.own_draft_vocab = True  # (its heads rank the token map's ids: no other)
        self._vocab = head_rows(model)

    def draft_rows(self, rt, hidden: mx.array, levels=None) -> mx.array:
        """``(R, levels, V)`` logits of the first ``levels`` heads (all by default) from
        ``R`` last-layer states ``(R, D)``: each head over the base's normed state, with
        its own LM head (over a draft vocabulary, where one is set, or the token map's
        ids; ``-inf`` elsewhere). Heads past ``levels`` never run: each reads an LM head."""
        x, vocab = _final_norm(rt.model)(hidden), rt.draft_vocab
        states = []
        for blocks in self.heads[:levels]:
            y = x
            for block in blocks:
                y = block(y)
            states.append(y)
        if not self._own_heads:  # (TGI's layout: the base's LM head, one product for all)
            return head_logits(rt.model, mx.stack(states, axis=1), vocab)
        heads = [self.lm_heads[j % len(self.lm_heads)] for j in range(len(states))]
        logits = mx.stack([(h if vocab is None else vocab.restrict(h))(y)
                           for h, y in zip(heads, states)], axis=1)  # fmt: skip
        if vocab is not None:
            return vocab.widen(logits)
        return widened(logits, self.token_map, self._vocab) if "token_map" in self else logits


def medusa_config(checkpoint: Path, model: nn.Module, weights: dict) -> Tuple[DrafterConfig, dict]:
    """The drafter section of ``checkpoint``'s heads on ``model`` (the package's Medusa
    defaults: top-3 per level, 16 nodes, every head a level) and the tensors the drafter
    takes (:func:`medusa_layout`)."""
    k, medusa, weights = medusa_layout(checkpoint, model, weights)
    return DrafterConfig(kind="medusa", num_draft_tokens=k, medusa=medusa), weights


def attach_medusa(model: nn.Module, checkpoint: Path, config: Optional[DrafterConfig] = None,
                  quantization: Optional[dict] = None):  # fmt: skip
    """Puts ``checkpoint``'s released Medusa heads on ``model`` (an mlx-lm model of
    their base, any quantization), their matrices quantized as the base's are where
    ``quantization`` (the base config's) says, as a checkpoint's MTP layers are: each LM
    head of their own is as large as the base's.

    Returns:
        MedusaCheckpointHeads: the drafter (also ``model.speculative_streams.drafter``).

    Raises:
        ValueError: naming the checkpoint, where its tensors do not fit.
    """
    refuse_attached(model)
    own, weights = medusa_config(checkpoint, model, read_medusa_weights(checkpoint))
    return attach_checkpoint_drafter(model, config or own, weights, checkpoint, "Medusa",
                                     quantization=quantization)  # fmt: skip

"""A checkpoint's own multi-token prediction (MTP) layer as a drafter.

DeepSeek-V3, GLM-4.5, MiMo, Qwen3-Next, Qwen3.5, Step 3.5, MiMo-V2-Flash, K-EXAONE,
Nemotron 3 and ERNIE 4.5 MoE checkpoints (:data:`FAMILIES`) ship an MTP layer beside the
model, trained with it to predict the token after next; ``mlx_lm.load`` drops it. Here
it drafts for the same tree verifier as streams, so output stays the base
model's. One MTP step (row ``i`` pairs token ``i``'s last hidden state ``h``
with the embedding of token ``i + 1``, on its own KV cache)::

    x = proj([hidden_norm(h); embed_norm(e)])     # MiMo: hidden first
    x = proj([embed_norm(e); hidden_norm(h)])     # the others
    o = layer(x)                                  # one decoder layer of the base's class
    logits = lm_head(final_norm(o))               # the base's LM head

The rows of the accepted path go into the cache; the last one (the last
accepted node and the bonus token) gives draft level 1. Deeper levels run the
same layer again on its own output and the previous level's argmax (as vLLM
does), rows trimmed after. A checkpoint with several MTP layers (Step 3.5's and
MiMo-V2-Flash's three) drafts level ``k`` with its layer ``k``, run as DeepSeek-V3
trains its MTP modules: layer ``k``'s row ``i`` reads layer ``k - 1``'s output at ``i``
(MiMo-V2-Flash's layers: the base's state, as SGLang runs them) and token ``i + k``,
drafted where not yet known (:meth:`MTPDrafter._draft_depths`, :class:`DepthsState`).
The conventions per family follow vLLM's
``mimo_mtp.py``, ``deepseek_mtp.py`` and ``qwen3_5_mtp.py``: MiMo reads the hidden
state before the base's final norm and recurses on ``final_norm(o)``; DeepSeek-V3
reads it after the final norm and recurses on ``o``, GLM-4.5 and GLM-5 on
``final_norm(o)`` (as SGLang runs them); Qwen3-Next and
Qwen3.5 read it after the final norm and recurse on ``final_norm(o)``. These zero the
embedding of the row at position 0. Step 3.5 (``step3p5_mtp.py``) reads the hidden
state before the final norm, recurses on ``o`` and has a head of its own; MiMo-V2-Flash,
K-EXAONE, Nemotron 3 and ERNIE 4.5 (whose layer has no final norm of its own: the base's,
as Baidu's FastDeploy runs it) follow Qwen3.5's rule; their MTP layers are built as
their engines build them (:attr:`MTPLayout.block`: window layers, dense MLPs, K-EXAONE's
without RoPE, Nemotron 3's an attention block and an experts block). Qwen3-Next,
Qwen3.5 and Nemotron 3 are hybrids (Gated DeltaNet, Mamba-2 layers): their drafts are
verified through the model's own passes, as chains or trees (static, or grown where asked:
:mod:`mlx_specstream.recurrent`). Qwen3-Next's, Qwen3.5's and
Step 3.5's checkpoints store every RMSNorm weight less one, as mlx-lm reads them.

Example:
    >>> model, tok = load("MiMo-7B-RL")                  # its MTP layer drafts
    >>> model, tok = load("MiMo-7B-RL-4bit", drafter="MiMo-7B-RL")  # from the original
    >>> model, tok = load("Qwen3.5-9B")                   # a hybrid: chains or trees
    >>> model, tok = load("Step-3.5-Flash")               # its three MTP layers draft in turn
"""

import glob
import json
import re
import struct
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCacheList
from .draft_vocab import head_owner
from .config import DrafterConfig
from .drafters import (
    DrafterState,
    attention_scale_settings,
    quantize_as_base,
    levels_again,
    continue_or_start,
    new_decoder_layer,
    new_layer_cache,
    new_rows,
    own_class,
    position_refusal,
    refuse_attached,
    run_layer,
)
from .dynamic_tree import grown_candidates
from .model_parts import hidden_size, text_args
from .recurrent import has_recurrent_layers
from .streams import quantize_like


@dataclass(frozen=True)
class MTPLayout:
    """Where a family's checkpoint keeps its MTP layer, and how the layer runs.

    ``prefix`` is formatted with ``n`` (the layer's index after the base's: the base's
    ``num_hidden_layers`` for the first) and ``d`` (0 for the first MTP layer); the
    decoder layer's tensors sit under ``prefix + layer`` with the base layers' names.
    """

    prefix: str
    embed_norm: str
    hidden_norm: str
    proj: str
    final_norm: str  # ("": none of its own, the base's final norm)
    hidden_first: bool = False  # the projection's input is [hidden; embedding]
    normed_hidden: bool = True  # reads the base's hidden state after its final norm
    recurse_normed: bool = True  # deeper levels read final_norm(o), not o
    skip: tuple = ()  # the layer's copies of the base's tensors (its embeddings)
    head: str = ""  # the layer's own LM head, read where it differs from the base's
    head_optional: bool = False  # a checkpoint without it: the base's head
    layer: str = ""  # where the decoder layer's tensors sit under prefix
    # Whether a checkpoint (its safetensors headers: key -> shape) stores every RMSNorm
    # weight less one, as mlx-lm's sanitize then reads the base (None: never; True: always).
    norms_less_one: Union[None, bool, Callable[[Dict[str, list]], bool]] = None
    zero_first: bool = True  # the row at position 0 reads no embedding (DeepSeek's rule)
    renames: tuple = ()  # (theirs, ours): the decoder layer's tensor names, by prefix
    # The decoder layer where it is not the base's next layer: model -> a fresh layer
    block: Optional[Callable[[nn.Module], nn.Module]] = None
    # The name the decoder layer's tensors are sanitized under: the base's layer 0 (for
    # Nemotron-H's two blocks, layers.0 and layers.1: the base's layers 0 and 1); "{last}"
    # is the base's last layer (Ling's sanitize stacks experts of its MoE layers only)
    sanitized_as: str = "model.layers.0."
    undeclared: int = 0  # the layer count of a family whose configs may not declare it
    # With several MTP layers: layer k reads layer k - 1's output (DeepSeek-V3's modules,
    # Step 3.5's), or every layer the base's state (MiMo-V2-Flash's, as SGLang runs them)
    chain_layers: bool = True
    expects: tuple = ()  # (config key, the only value read here where the key is present)


_DEEPSEEK = MTPLayout(
    prefix="model.layers.{n}.",
    embed_norm="enorm",
    hidden_norm="hnorm",
    proj="eh_proj",
    final_norm="shared_head.norm",
    hidden_first=False,
    normed_hidden=True,
    recurse_normed=False,
    skip=("embed_tokens.",),
    head="shared_head.head",
    head_optional=True,  # (GLM-5's checkpoints store none: the base's, as vLLM shares it)
)
# GLM's NextN layers (GLM-4.5, GLM-4.7-Flash, GLM-5): DeepSeek's layout, deeper levels on
# final_norm(o), as SGLang runs them (vLLM's o collapses GLM-5's acceptance past level 1)
_GLM = replace(_DEEPSEEK, recurse_normed=True)


def _expert_per_key(shapes: Dict[str, list]) -> bool:
    """mlx-lm's Qwen3-Next rule: a checkpoint with experts one by one is Hugging Face's."""
    return any(re.search(r"layers\.\d+\.mlp\.experts\.0\.up_proj\.weight$", k) for k in shapes)


def _unsanitized_conv1d(shapes: Dict[str, list]) -> bool:
    """mlx-lm's Qwen3.5 rule: a convolution not yet moved to MLX's layout is Hugging Face's."""
    return any("conv1d.weight" in k and s[-1] != 1 for k, s in shapes.items())


def _qwen(norms_less_one) -> MTPLayout:
    return MTPLayout(
        prefix="mtp.",
        embed_norm="pre_fc_norm_embedding",
        hidden_norm="pre_fc_norm_hidden",
        proj="fc",
        final_norm="norm",
        hidden_first=False,
        normed_hidden=True,
        recurse_normed=True,
        layer="layers.0.",
        norms_less_one=norms_less_one,
    )


def _extended(args, n: int, **fill):
    """``args`` with its per-layer lists ``fill`` (name -> value) reaching index ``n``
    (a list that ends at the base's last layer gets ``value`` for the MTP layer)."""
    lists = {}
    for name, value in fill.items():
        have = getattr(args, name, None)
        if isinstance(have, list) and len(have) <= n:
            lists[name] = have + [value] * (n + 1 - len(have))
    return replace(args, **lists) if lists else args


def _step_block(model) -> nn.Module:
    """Step 3.5's MTP layers (index 45+): a window layer with a dense MLP, as vLLM builds
    them; the per-layer lists of configs that end at layer 44 are read as NeMo fills them."""
    args = text_args(model)
    fill = dict(layer_types="sliding_attention", rope_theta=10000.0)
    return new_decoder_layer(model, _extended(args, args.num_hidden_layers, **fill))


def _mimo_v2_block(model) -> nn.Module:
    """MiMo-V2-Flash's MTP layer: a window layer (its head counts, sinks) with a dense MLP."""
    return new_decoder_layer(model, is_sliding_window=True, is_moe=False)


def _exaone_block(model) -> nn.Module:
    """K-EXAONE's MTP layer: full attention without RoPE and a dense MLP (its config's
    ``mtp_layer_types: ["full_attention"]``, as vLLM, SGLang and TensorRT-LLM build it)."""
    args = text_args(model)
    fill = dict(layer_types="full_attention", is_moe_layer=False)
    return new_decoder_layer(model, _extended(args, args.num_hidden_layers, **fill))


def _ernie_block(model) -> nn.Module:
    """ERNIE 4.5's MTP layer: a dense layer (its experts end at the base's last layer)."""
    args = text_args(model)
    return new_decoder_layer(model, replace(args, moe_layer_end_index=args.num_hidden_layers - 1))


class BlockSequence(nn.Module):
    """Blocks run in turn as one decoder layer (Nemotron-H's MTP layer: an attention block,
    on the layer's KV cache, then an experts block)."""

    def __init__(self, blocks: List[nn.Module]):
        super().__init__()
        self.layers = blocks

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        for block in self.layers:
            x = block(x, mask, cache) if block.block_type == "*" else block(x)
        return x


def _bailing_block(model) -> nn.Module:
    """Ling's MTP layer (Ling 2.5's and Ling 3's): the layer after the base's last, latent
    attention and experts, as vLLM builds it (never the linear attention of a group's
    first layers)."""
    cls, args = own_class(model.layers[-1]), text_args(model)
    return cls(args, args.num_hidden_layers)


def _nemotron_blocks(model) -> nn.Module:
    """Nemotron-H's MTP layer: its pattern ``"*E"`` (the released one, which vLLM builds)."""
    cls, args = own_class(model.layers[-1]), text_args(model)
    return BlockSequence([cls(args, "*"), cls(args, "E")])


FAMILIES = {
    "mimo": MTPLayout(
        prefix="model.mtp_layers.{d}.",
        embed_norm="token_layernorm",
        hidden_norm="hidden_layernorm",
        proj="input_proj",
        final_norm="final_layernorm",
        hidden_first=True,
        normed_hidden=False,
        recurse_normed=True,
    ),
    "deepseek_v3": _DEEPSEEK,
    "glm4_moe": _GLM,
    "glm4_moe_lite": _GLM,  # GLM-4.7-Flash (latent attention)
    "deepseek_v32": _DEEPSEEK,  # (sparse attention: the layer keeps its indexer's keys too)
    "glm_moe_dsa": _GLM,  # GLM-5
    "qwen3_next": _qwen(_expert_per_key),
    "qwen3_5": _qwen(_unsanitized_conv1d),
    "qwen3_5_moe": _qwen(_unsanitized_conv1d),
    # Step 3.5 (Step-3.5-Flash): 3 MTP layers, each with its own head;
    # every norm zero-centred (stored less one); the base's hidden state before its norm
    "step3p5": MTPLayout(
        prefix="model.layers.{n}.",
        embed_norm="enorm",
        hidden_norm="hnorm",
        proj="eh_proj",
        final_norm="shared_head.norm",
        normed_hidden=False,
        recurse_normed=False,
        skip=("embed_tokens.",),
        head="shared_head.output",
        norms_less_one=True,
        zero_first=False,
        renames=(("transformer.", ""),),  # (some checkpoints nest the layer one deeper)
        block=_step_block,
    ),
    # MiMo-V2-Flash: 3 MTP layers, its config declares none
    "mimo_v2_flash": MTPLayout(
        prefix="model.mtp.layers.{d}.",
        embed_norm="enorm",
        hidden_norm="hnorm",
        proj="eh_proj",
        final_norm="final_layernorm",
        zero_first=False,
        renames=(("pre_mlp_layernorm.", "post_attention_layernorm."),),
        block=_mimo_v2_block,
        undeclared=1,
        chain_layers=False,
    ),
    # Nemotron-H (Nemotron 3): the layer is two blocks, mtp.layers.0 (attention, with the
    # projection) and mtp.layers.1 (experts, with the final norm); a hybrid: chains
    "nemotron_h": MTPLayout(
        prefix="mtp.",
        embed_norm="layers.0.enorm",
        hidden_norm="layers.0.hnorm",
        proj="layers.0.eh_proj",
        final_norm="layers.1.final_layernorm",
        zero_first=False,
        block=_nemotron_blocks,
        sanitized_as="backbone.",  # (the blocks' tensors: backbone.layers.{0, 1}.*)
        expects=(("mtp_hybrid_override_pattern", "*E"),
                 ("mtp_layers_block_type", ["attention", "moe"])),  # fmt: skip
    ),
    # ERNIE 4.5 MoE: model.mtp_{emb_norm, hidden_norm, linear_proj, block}.0, no final norm
    # of its own (Baidu's FastDeploy applies the base's, and recurses on its output)
    "ernie4_5_moe": MTPLayout(
        prefix="model.mtp_",
        embed_norm="emb_norm.0",
        hidden_norm="hidden_norm.0",
        proj="linear_proj.0",
        final_norm="",
        layer="block.0.",
        zero_first=False,
        block=_ernie_block,
    ),
    # Ling 2.5 (bailing_hybrid, BailingMoeV2_5ForCausalLM): DeepSeek's names, the layer
    # after the base's; its output normed (final_layernorm) for the next level, as vLLM
    # runs it; the embedding at position 0 zeroed (vLLM's V2.5)
    # (no head of its own either: vLLM loads the base's lm_head there)
    "bailing_hybrid": replace(
        _DEEPSEEK,
        final_norm="final_layernorm",
        recurse_normed=True,
        block=_bailing_block,
        sanitized_as="model.layers.{last}.",
    ),
    # K-EXAONE: Qwen3-Next's names, plain norms, the layer full attention without RoPE
    "exaone_moe": replace(
        _qwen(None),
        zero_first=False,
        block=_exaone_block,
        undeclared=1,
        expects=(("mtp_layer_types", ["full_attention"]),),
    ),
}
# Ling 3 (a bailing_hybrid config of BailingMoeV3ForCausalLM, mlx-lm's bailing_moe_v3):
# Ling 2.5's layout, no embedding zeroed (vLLM's V3)
FAMILIES["bailing_moe_v3"] = replace(FAMILIES["bailing_hybrid"], zero_first=False)
# The decoder layer's RMSNorm weights that mlx-lm's Qwen3-Next/3.5 sanitize adds one to.
_LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight",
                "k_norm.weight")  # fmt: skip
# A chain: deeper levels are drafted from the first level's argmax only.
MTP_DEFAULTS = dict(num_draft_tokens=3, top_k=1, max_tree_nodes=4)


def _norm_eps(args) -> float:
    """The RMSNorm epsilon (MiMo-V2-Flash's named ``layernorm_epsilon``, Nemotron-H's
    ``layer_norm_epsilon``)."""
    for name in ("rms_norm_eps", "layernorm_epsilon", "layer_norm_epsilon"):
        if getattr(args, name, None) is not None:
            return getattr(args, name)
    raise ValueError(f"{args.model_type}: no RMSNorm epsilon in its config.")


def mtp_decoder_layer(model) -> nn.Module:
    """A fresh decoder layer as the family's MTP layer is built: the base's next layer,
    or the settings of :attr:`MTPLayout.block`."""
    layout = mtp_layout(model_family(model))
    return layout.block(model) if layout.block else new_decoder_layer(model)


def layer_window(layer: nn.Module, args) -> Optional[int]:
    """How many keys a window ``layer`` sees (the base's ``sliding_window``: Step 3.5's,
    MiMo-V2-Flash's MTP layers); None for a layer that sees every key."""
    if not (getattr(layer, "is_sliding", False) or getattr(layer, "is_sliding_window", False)):
        return None
    for name in ("sliding_window", "sliding_window_size"):
        if getattr(args, name, None):
            return getattr(args, name)
    raise ValueError(f"{args.model_type}: a window layer, but no sliding_window in its config.")


def model_family(model) -> str:
    """``model``'s MTP family: its config's ``model_type``, or the mlx-lm module it loads
    into where that is a family of its own (Ling 3's ``bailing_hybrid`` configs load into
    ``bailing_moe_v3``)."""
    module = type(model).__module__.rsplit(".", 1)[-1]
    return module if module in FAMILIES else model.args.model_type


def mtp_layout(model_type: str) -> MTPLayout:
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} has no MTP layout here; MTP layers are read for "
            f"{sorted(FAMILIES)}."
        )
    return FAMILIES[model_type]


def _final_norm(model) -> nn.Module:
    inner = model.model if hasattr(model, "model") else model.backbone  # (Nemotron-H's)
    return inner.norm if "norm" in inner else inner.norm_f


def _head_module(model) -> nn.Module:
    """The module holding the base's LM head (:func:`~mlx_specstream.draft_vocab.head_path`:
    ``lm_head``, GPT-NeoX's ``embed_out``, or the tied embeddings)."""
    parent, key = head_owner(model)
    return parent[key]


def _lm_head(model, vocab=None):
    """The base's LM head without its final norm (a linear head, or tied embeddings'
    ``as_linear``); with a draft ``vocab``, restricted to its tokens' rows."""
    head = _head_module(model)
    head = head if vocab is None else vocab.restrict(head)
    return head.as_linear if isinstance(head, (nn.Embedding, nn.QuantizedEmbedding)) else head


def head_logits(model, x: mx.array, vocab=None) -> mx.array:
    """The base's LM head (without its final norm) on ``x``; only ``vocab``'s tokens where
    a draft vocabulary is given (``-inf`` elsewhere:
    :class:`~mlx_specstream.draft_vocab.DraftVocab`)."""
    logits = _lm_head(model, vocab)(x)
    return logits if vocab is None else vocab.widen(logits)


class MTPDepth(nn.Module):
    """``embed_norm``, ``hidden_norm``, ``proj`` ``(D, 2D)``, ``layer.*`` and
    ``final_norm`` (and ``head`` where the checkpoint's differs from the base's): one
    of a checkpoint's MTP layers (:func:`read_mtp_weights`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._layout = mtp_layout(model_family(model))
        args = text_args(model)
        D, eps = hidden_size(model), _norm_eps(args)
        self.embed_norm = nn.RMSNorm(D, eps=eps)
        self.hidden_norm = nn.RMSNorm(D, eps=eps)
        self.proj = nn.Linear(2 * D, D, bias=False)
        # (DeepSeek-V3's and GLM-4.5's are mixture-of-experts layers; Qwen3-Next's and
        # Qwen3.5's attend, as vLLM builds them)
        self.layer = mtp_decoder_layer(model)
        self.final_norm = nn.RMSNorm(D, eps=eps)
        self._window = layer_window(self.layer, args)
        self._scale = attention_scale_settings(model)

    def step(self, hidden: mx.array, emb: mx.array, cache=None, at=None) -> mx.array:
        """The layer's output over rows pairing ``hidden`` ``(L, D)`` (or a batch,
        ``(B, L, D)``) with next-token embeddings ``emb``, causal, appended to
        ``cache`` (``None``: none, as in training); with ``at`` ``(position, mask)``
        every row at ``position``, seeing the columns ``mask`` says
        (:func:`~mlx_specstream.drafters.run_layer`)."""
        h, e = self.hidden_norm(hidden), self.embed_norm(emb)
        x = mx.concatenate([h, e] if self._layout.hidden_first else [e, h], axis=-1)
        x = self.proj(x.astype(self.embed_norm.weight.dtype))
        x = x if x.ndim == 3 else x[None]
        out = run_layer(self.layer, x, cache, self._window, self._scale, at=at)
        return out if hidden.ndim == 3 else out[0]

    def logits(self, model, out: mx.array, vocab=None) -> mx.array:
        """The layer's logits over ``out``: its final norm, then its own head or the
        base's; only ``vocab``'s tokens where a draft vocabulary is given (``-inf``
        elsewhere: :class:`~mlx_specstream.draft_vocab.DraftVocab`)."""
        if "head" not in self:
            return head_logits(model, self.final_norm(out), vocab)
        head = self.head if vocab is None else vocab.restrict(self.head)
        logits = head(self.final_norm(out))
        return logits if vocab is None else vocab.widen(logits)

    def passed_on(self, out: mx.array) -> mx.array:
        """What the next run reads of this layer's output ``o``: ``final_norm(o)`` or ``o``."""
        return self.final_norm(out) if self._layout.recurse_normed else out

    def again(self, rt, out: mx.array, token: mx.array, cache) -> mx.array:
        """The layer once more on its own output ``out`` and the previous level's
        ``token`` (a deeper level), appended to ``cache``."""
        return self.step(self.passed_on(out), rt.embed(token), cache)

    def level_logits(self, rt, out: mx.array) -> mx.array:
        """A level's logits from the layer's output, under ``rt``'s draft vocabulary."""
        return self.logits(rt.model, out, rt.draft_vocab)


class MTPDrafter(MTPDepth):
    """A checkpoint's MTP layers as a drafter: the first one's parameters, and the
    others' in ``depths``. With one layer, each deeper level runs it again on its own
    output (as vLLM does); with ``K``, layer ``k`` drafts level ``k`` (:meth:`draft`),
    the last one also the levels past ``K``.

    It holds the layers of the config as stored (``config.stored``, where a tuning
    applied) and drafts with the first ``config.num_mtp_layers`` of them
    (:meth:`use_layers` changes that)."""

    def __init__(self, config: DrafterConfig, model: nn.Module):
        super().__init__(model)
        self._levels = config.num_draft_tokens
        held = (config.stored or config).num_mtp_layers
        if held > 1:
            self._check_depths(model)
            self.depths = [MTPDepth(model) for _ in range(held - 1)]
        self.use_layers(config.num_mtp_layers)

    @staticmethod
    def _check_depths(model):
        if not multi_depth(mtp_layout(model_family(model))):
            raise ValueError(
                f"{model.args.model_type}: its checkpoints' MTP layers are read one only "
                "(num_mtp_layers=1)."
            )
        if has_recurrent_layers(model):
            raise ValueError(
                f"{model.args.model_type}: several MTP layers (num_mtp_layers > 1) draft "
                "for attention-only models; this one has recurrent layers."
            )

    @property
    def held_depths(self) -> List[MTPDepth]:
        """Every layer held, the first one first."""
        return [self] + list(getattr(self, "depths", []))

    @property
    def all_depths(self) -> List[MTPDepth]:
        """The layers that draft: the first :attr:`num_layers` held."""
        return self.held_depths[: self.num_layers]

    @property
    def num_layers(self) -> int:
        """How many of the held layers draft."""
        return self._used

    def use_layers(self, n: int) -> None:
        """Drafts with the first ``n`` layers held from the next generation on (a
        generation's state of another count is not continued)."""
        held = len(self.held_depths)
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= held):
            raise ValueError(
                f"num_mtp_layers={n!r}: this drafter holds {held} MTP layer(s); give 1 to {held}"
            )
        self._used = n

    def start(self, prompt_cache_offset: int, previous=None, levels=None) -> DrafterState:
        """A generation's state: one layer's, or the first ``n`` layers' where a tree of
        ``levels`` (default: all) reads ``n`` of them (no layer past the levels runs).
        ``previous`` (kept with a reused prompt cache) continues where it has as many."""
        n = self.num_layers if levels is None else max(1, min(self.num_layers, levels))
        if n == 1:
            previous = None if isinstance(previous, DepthsState) else previous
            return continue_or_start(prompt_cache_offset, previous, self.layer)
        if isinstance(previous, DepthsState) and len(previous.cache.caches) == n:
            state = continue_or_start(prompt_cache_offset, previous, self.layer)
            if state is previous:
                return state
        # (states kept for trims: a generation's end drops at most a step's tokens and
        # the bonus, a follow-up one more)
        caches = [new_layer_cache(d.layer) for d in self.all_depths[:n]]
        return DepthsState(caches, back=self._levels + 3)

    def load_weights(self, file_or_weights, strict: bool = True):
        """As ``nn.Module.load_weights``; weights with ``head.*`` (a checkpoint whose
        MTP head differs from the base's), at any depth, give that layer a head of its
        own first."""
        weights = file_or_weights
        if isinstance(weights, str):
            weights = list(mx.load(weights).items())
        D = self.embed_norm.weight.shape[0]  # (a quantized head's weight is packed)
        for key, w in weights:
            if not key.endswith("head.weight"):
                continue
            lead = key[: -len("head.weight")]
            depth = self if not lead else self.held_depths[int(lead.split(".")[1]) + 1]
            if "head" not in depth:
                depth.head = nn.Linear(D, w.shape[0], bias=False)
        quantize_like(self, dict(weights))  # (the heads as they were saved)
        return super().load_weights(weights, strict=strict)

    drafts_level_by_level = True  # (one layer's chain may stop early: draft_confidence)

    def draft(self, rt, state, hidden, path, path_tokens, token, levels=None,
              confidence=None) -> mx.array:  # fmt: skip
        """``(levels, V)`` logits of the next tree's levels from the accepted path (each
        level one more run of a layer: only as many as the tree has). One layer drafting,
        fewer where a ``confidence`` stops the chain
        (:func:`~mlx_specstream.drafters.levels_again`); several layers draft every level
        (each runs over rows it keeps: the caller cuts the chain)."""
        levels = self._levels if levels is None else min(levels, self._levels)
        if isinstance(state, DepthsState):
            feats, nxt = self._new_rows(rt, state, hidden, path, path_tokens, token)
            return self._draft_depths(rt, state, feats, nxt, levels)
        out = self.context_out(rt, state, hidden, path, path_tokens, token)
        logits = [self.logits(rt.model, out, rt.draft_vocab)]
        ran = levels_again(rt, self.all_depths[-1], logits, out, state.cache, levels - 1,
                           confidence)  # fmt: skip
        state.cache.trim(ran)  # the recursion's rows never stay
        return mx.concatenate(logits, axis=0)

    def _new_rows(self, rt, state, hidden, path, path_tokens, token):
        """The accepted path's new rows (:func:`~mlx_specstream.drafters.new_rows`), the
        base's states on the side of its final norm the family reads."""
        feats, nxt = new_rows(state, hidden, path, path_tokens, token)
        return (_final_norm(rt.model)(feats) if self._layout.normed_hidden else feats), nxt

    def context_out(self, rt, state, hidden, path, path_tokens, token) -> mx.array:
        """``(1, D)``: the layer's output that drafts level 1, after the accepted path's
        new rows are appended to its cache (one layer drafting)."""
        feats, nxt = self._new_rows(rt, state, hidden, path, path_tokens, token)
        emb = self._from_position_0(rt.embed(mx.array(nxt)), state.cache)
        return self.step(feats, emb, state.cache)[-1:]

    # ---- dynamic trees (mlx_specstream.dynamic_tree: EAGLE-2's, on this layer) ------
    grows_by_default = False  # (static trees unless asked or tuned: a level costs k rows)

    def growth_refusal(self) -> Optional[str]:
        """Why this drafter cannot grow dynamic trees, or ``None``: one layer drafts every
        level (several layers each draft their own), and that layer can run a level's
        rows at one position (:func:`~mlx_specstream.drafters.position_refusal`)."""
        if self.num_layers > 1:
            return (f"its {self.num_layers} MTP layers draft one level each (a grown tree "
                    "runs one layer again on its own output: num_mtp_layers=1)")  # fmt: skip
        return position_refusal(self.layer)

    def draft_tree(self, rt, state, hidden, path, path_tokens, token, k: int, depth: int,
                   drawn=None):  # fmt: skip
        """The candidates of the next dynamic tree, ``k`` wide and ``depth`` levels deep,
        or of a drawn one (:func:`~mlx_specstream.dynamic_tree.grown_candidates`): each
        node's children are this layer's top-``k`` after that node's own path (the
        call's settings refused a layer that cannot: :meth:`growth_refusal`)."""
        if self._window is not None and depth > self._window:
            raise ValueError(f"dynamic_tree=True: a tree {depth} levels deep; this MTP layer "
                             f"attends within a window of {self._window}.")  # fmt: skip
        return grown_candidates(self, rt, state, hidden, path, path_tokens, token, k, depth,
                                drawn)  # fmt: skip

    def rows_at(self, rt, h: mx.array, tokens: mx.array, cache, at) -> mx.array:
        """The layer over rows pairing its own outputs ``h`` ``(k, D)`` (on the side of
        its final norm the family passes on) with ``tokens``' embeddings, every row at
        ``at`` = ``(position, mask)``; a window layer's rows see no key more than
        ``window - 1`` positions back (a tree no deeper than the window: its own rows
        are all nearer)."""
        position, mask = at
        if self._window is not None:  # (column c: position c; the tree's columns all pass)
            mask = mask & (mx.arange(mask.shape[1]) > position - self._window)
        return self.step(self.passed_on(h), rt.embed(tokens), cache, at=(position, mask))

    def tree_logits(self, rt, out: mx.array) -> mx.array:
        """A node's children's logits (every token: :meth:`tree_ids`)."""
        return self.level_logits(rt, out)

    def tree_ids(self) -> None:
        return None

    def _from_position_0(self, emb: mx.array, cache) -> mx.array:
        """``emb``, the embeddings of rows appended to ``cache``, with the row at position 0
        zeroed where the family reads no embedding there (DeepSeek's rule)."""
        if self._layout.zero_first and cache.offset == 0:
            return mx.concatenate([mx.zeros_like(emb[:1]), emb[1:]])
        return emb

    def _draft_depths(self, rt, state: "DepthsState", feats, nxt, levels) -> mx.array:
        """Layers ``1..K`` over the rows of positions ``[P, N)``: the held ones and the
        new ones, their base states ``feats`` and next tokens ``nxt``. Layer ``k``'s row
        ``i`` reads layer ``k - 1``'s output at ``i`` (MiMo-V2-Flash's: the base's state,
        :attr:`MTPLayout.chain_layers`) and the embedding of token ``i + k``; tokens past
        ``N`` are the levels drafted so far. Rows whose tokens are all known (all but the
        last ``K - 1``) stay in the caches; the others are trimmed and held."""
        if state.held_next:
            feats = mx.concatenate([state.held_hidden, feats], axis=0)
            nxt = state.held_next + nxt
        caches, P = state.cache.caches, state.cache.offset
        depths = self.all_depths[: len(caches)]  # (the generation's: see start)
        M, lag = len(nxt), len(depths) - 1
        keep = max(0, M - lag)  # (rows that stay: positions [P, P + keep))
        emb = rt.embed(mx.array(nxt))  # (tokens P + 1 .. N)
        drafted, logits, h = [], [], feats
        for k, (depth, cache) in enumerate(zip(depths, caches)):
            rows = M if k < levels else keep  # (a layer past the levels: its kept rows)
            if rows == 0:
                break
            e = mx.concatenate([emb] + drafted, axis=0)[k : k + rows]
            out = depth.step(h[:rows], self._from_position_0(e, cache), cache)
            if k < levels:
                logits.append(depth.logits(rt.model, out[-1:], rt.draft_vocab))
                drafted.append(rt.embed(mx.argmax(logits[-1], axis=-1)))
            if k == len(depths) - 1 and levels > len(depths):
                levels_again(rt, self.all_depths[-1], logits, out[-1:], cache, levels - len(depths))
            cache.trim(cache.offset - P - keep)  # (the drafting rows never stay)
            h = depth.passed_on(out) if self._layout.chain_layers else feats
        state.advance(feats, nxt, keep)
        return mx.concatenate(logits, axis=0)


class DepthsState(DrafterState):
    """What an MTP drafter with ``K`` layers keeps during one generation.

    Layer ``k``'s row ``i`` needs token ``i + k``, known ``k - 1`` tokens after layer
    1's: every layer's cache holds the rows of the same positions ``[0, P)`` (a
    :class:`~mlx_specstream.cache.KVCacheList` of theirs), those of the last ``K - 1``
    positions are run again with each step's new rows, from the base's states held
    here with their next tokens. The states of up to ``back`` positions before ``P`` are
    kept too, so that a trim by a few tokens (a generation's end, a follow-up that edits
    the last token) leaves every row reading the tokens before the trim point only.

    Example: ``K = 3``, rows of positions 0..9 seen (tokens 1..10 known): the caches hold
    positions 0..7 (layer 3's row 7 read token 10), positions 8 and 9 are held. Trimmed to
    8 tokens (``offset`` 8: token 8 is the last whose row may be read), the caches keep
    0..5 and positions 6, 7 are held again.
    """

    def __init__(self, caches: list, back: int = 0):
        super().__init__(needs_prompt=True, cache=KVCacheList(*caches))
        self.lag, self.most_back = len(caches) - 1, back
        self.states: Optional[mx.array] = None  # (positions [P - back, offset), D)
        self.next_tokens: List[int] = []  # (each one's next token)
        self.back = 0

    @property
    def offset(self) -> int:
        return self.cache.offset + len(self.next_tokens) - self.back

    @property
    def held_hidden(self) -> Optional[mx.array]:
        return self.states[self.back :] if self.held_next else None

    @property
    def held_next(self) -> List[int]:
        return self.next_tokens[self.back :]

    def advance(self, states: mx.array, next_tokens: List[int], kept: int):
        """After a step: ``states`` ``(M, D)`` of the held and new positions, and their
        next tokens; the first ``kept`` went into the caches."""
        if self.back:
            states = mx.concatenate([self.states[: self.back], states], axis=0)
            next_tokens = self.next_tokens[: self.back] + next_tokens
        held = len(next_tokens) - self.back - kept
        self.back = min(self.most_back, self.back + kept)
        first = len(next_tokens) - self.back - held
        self.states, self.next_tokens = states[first:], next_tokens[first:]

    def trim_to(self, offset: int):
        """Keeps rows that read the first ``offset + 1`` tokens only (``offset`` as a
        one-layer drafter's: the rows of the first ``offset`` positions)."""
        if offset < self.offset:
            P = self.cache.offset
            target = max(0, offset - self.lag)  # (its rows read tokens up to ``offset``)
            if P - target > self.back:  # (their states are gone: start again)
                self.cache.trim(P)
                self.states, self.next_tokens, self.back = None, [], 0
            else:
                self.cache.trim(P - target)
                self.back -= P - target
                n = self.back + offset - target
                self.states, self.next_tokens = self.states[:n], self.next_tokens[:n]
        if self.offset != offset - 1:
            self.pending_hidden = None


# ---- reading a checkpoint's MTP layer --------------------------------------------
def mtp_layers_in_config(config: dict, declared_only: bool = False) -> int:
    """How many MTP layers ``config.json`` declares (0 for a family without them):
    ``num_nextn_predict_layers``, or Qwen3.5's ``mtp_num_hidden_layers`` (in its
    ``text_config``); for a family whose configs may declare none (MiMo-V2-Flash, early
    K-EXAONE), the family's count (its safetensors then tell), or with ``declared_only`` 0."""
    if config.get("model_type") not in FAMILIES:
        return 0
    for section in (config, config.get("text_config") or {}):
        for key in ("num_nextn_predict_layers", "mtp_num_hidden_layers"):
            if key in section:
                return int(section[key] or 0)
    return 0 if declared_only else FAMILIES[config["model_type"]].undeclared


def multi_depth(layout: MTPLayout) -> bool:
    """Whether a family's MTP layers after the first are read (each under a prefix of
    its own: DeepSeek's layout, MiMo's, MiMo-V2-Flash's)."""
    return "{n}" in layout.prefix or "{d}" in layout.prefix


def depth_prefix(layout: MTPLayout, num_hidden_layers: int, depth: int = 0) -> str:
    """Where MTP layer ``depth`` (0: the first) keeps its tensors."""
    return layout.prefix.format(n=num_hidden_layers + depth, d=depth)


def _mtp_prefix(config: dict, depth: int = 0) -> str:
    """Where ``config.json``'s family keeps its MTP layer ``depth``'s tensors."""
    layers = (config.get("text_config") or config)["num_hidden_layers"]
    return depth_prefix(FAMILIES[config["model_type"]], layers, depth)


def mtp_layers_present(config: dict, keys, most: int) -> int:
    """How many of ``config.json``'s MTP layers (at most ``most``, and as many as it
    declares) hold tensors among ``keys``, counted from the first."""
    layout = FAMILIES[config["model_type"]]
    declared = mtp_layers_in_config(config, declared_only=True) or most
    n = 0
    while n < min(most, declared) and (n == 0 or multi_depth(layout)):
        prefix = _mtp_prefix(config, n)
        if not any(k.startswith(prefix) for k in keys):
            break
        n += 1
    return n


def _same_as_base_head(model, head: mx.array) -> bool:
    """Whether ``head`` ``(V, D)`` is the base's LM head: equal, or for a quantized base
    equal once quantized the same way."""
    base = _head_module(model)
    if "scales" in base:
        q = mx.quantize(head, group_size=base.group_size, bits=base.bits)
        mine = dict(zip(("weight", "scales", "biases"), q))
        return all(k in base and mx.array_equal(base[k], v).item() for k, v in mine.items())
    return mx.array_equal(base.weight, head.astype(base.weight.dtype)).item()


def _shards(path: Path, prefix: str) -> List[Path]:
    """The safetensors files of ``path`` that may hold keys under ``prefix``."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path / f for k, f in weight_map.items() if k.startswith(prefix)})
    return [Path(f) for f in sorted(glob.glob(str(path / "*.safetensors")))]


def _headers(files: List[Path]) -> Dict[str, list]:
    """Key -> shape of the tensors in ``files``, read from their safetensors headers
    (the data is not read)."""
    shapes = {}
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _checkpoint_keys(path: Path) -> List[str]:
    """Every tensor name in ``path``'s safetensors (its index's, else the headers')."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    return list(_headers(_shards(path, "")))


def has_mtp_weights(path: Path) -> bool:
    """Whether ``path`` is a checkpoint whose config declares MTP layers and whose
    safetensors hold the first one."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        return False
    config = json.loads(config_file.read_text())
    if not mtp_layers_in_config(config):
        return False
    prefix = _mtp_prefix(config)
    return any(k.startswith(prefix) for k in _headers(_shards(path, prefix)))


def fetch_mtp_checkpoint(repo: str, revision: Optional[str] = None):
    """For ``drafter=`` a Hugging Face repo whose config declares an MTP layer: a
    snapshot of its JSON files and of the safetensors shards that hold its MTP layers only
    (at most three; not the whole checkpoint: a 4-bit copy's user needs only these), and every
    tensor's shape, read from the shards' headers on the Hub (the layer's norms follow the checkpoint's
    layout, :attr:`MTPLayout.norms_less_one`).

    Returns:
        tuple: ``(local directory, {key: shape})``, or ``None`` when the repo's config
        declares no MTP layer, or its headers cannot be read on the Hub (offline: it is
        then fetched whole, as any model, from the local cache too).
    """
    from huggingface_hub import get_safetensors_metadata, hf_hub_download, snapshot_download

    config = json.loads(Path(hf_hub_download(repo, "config.json", revision=revision)).read_text())
    if not mtp_layers_in_config(config):
        return None
    prefix = _mtp_prefix(config)
    try:
        meta = get_safetensors_metadata(repo, revision=revision)
    except Exception as e:  # (offline, or headers the Hub cannot read: all of it, as any model)
        warnings.warn(f"{repo}: its safetensors headers could not be read on the Hub ({e}); "
                      "fetching the whole checkpoint for its MTP layer.", stacklevel=3)  # fmt: skip
        return None
    n = mtp_layers_present(config, meta.weight_map, MTP_DEFAULTS["num_draft_tokens"])
    prefixes = tuple(_mtp_prefix(config, d) for d in range(max(n, 1)))
    files = sorted({f for k, f in meta.weight_map.items() if k.startswith(prefixes)})
    if not files:
        raise ValueError(
            f"{repo}: its config declares {mtp_layers_in_config(config)} MTP layer(s), but its "
            f"safetensors hold no tensor under '{prefix}'."
        )
    path = snapshot_download(repo, revision=revision, allow_patterns=["*.json", *files])
    shapes = {k: list(t.shape) for f in meta.files_metadata.values() for k, t in f.tensors.items()}
    return Path(path), shapes


def read_mtp_weights(
    path: Path, model: nn.Module, shapes: Optional[Dict[str, list]] = None, depth: int = 0
) -> Dict[str, mx.array]:
    """MTP layer ``depth``'s tensors (0: the first) in ``path``'s safetensors, named as
    :class:`MTPDepth`'s parameters. The decoder layer's tensors go through the
    base model's own ``sanitize`` (experts stacked, FP8 dequantized) as its layer 0.
    Where the checkpoint stores RMSNorm weights less one (Qwen3-Next's and Qwen3.5's
    Hugging Face layout, told as mlx-lm tells it from ``shapes``, every tensor's shape:
    by default read from ``path``'s headers), each of the layer's gets one added.

    Raises:
        ValueError: naming the file and key of what is missing.
    """
    path = Path(path)
    layout = mtp_layout(model_family(model))
    prefix = depth_prefix(layout, text_args(model).num_hidden_layers, depth)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    for key, value in layout.expects:  # (settings of the layer that are not read here)
        if key in config and config[key] != value:
            raise ValueError(
                f"{config_file}: {key} is {config[key]!r}; the MTP layer is read here as "
                f"{value!r} only."
            )
    found = {}
    for f in _shards(path, prefix):
        found.update(
            {k[len(prefix) :]: v for k, v in mx.load(str(f)).items() if k.startswith(prefix)}
        )
    for theirs, ours in layout.renames:  # (the decoder layer's tensors under other names)
        lead = layout.layer + theirs
        found = {layout.layer + ours + k[len(lead) :] if k.startswith(lead) else k: v
                 for k, v in found.items()}  # fmt: skip
    # (a wrapper's sanitize puts its language model's name first)
    lead = layout.sanitized_as.format(last=text_args(model).num_hidden_layers - 1)
    for name in (layout.proj, layout.head):  # an FP8 matrix: the base's sanitize dequantizes
        scale = f"{name}.weight_scale_inv"
        if name and scale in found and f"{name}.weight" in found:
            pair = {lead + k: found.pop(k) for k in (f"{name}.weight", scale)}
            pair = model.sanitize(pair) if hasattr(model, "sanitize") else pair
            if lead + scale in pair:
                raise ValueError(
                    f"{path}: '{prefix}{name}.weight' is stored in FP8 with its "
                    f"'{scale}', which {model.args.model_type}'s sanitize does not dequantize."
                )
            found[f"{name}.weight"] = pair[f"{lead}{name}.weight"]
    if not found:
        raise ValueError(
            f"{path}: no tensors under '{prefix}' in its safetensors: the MTP layer is not "
            "there (mlx_lm.convert drops it; load the original checkpoint, or pass it as "
            "drafter=)."
        )
    weights = {}
    if not layout.final_norm:  # (a copy of the base's)
        weights["final_norm.weight"] = _final_norm(model).weight
    for ours, theirs in (
        ("embed_norm.weight", layout.embed_norm),
        ("hidden_norm.weight", layout.hidden_norm),
        ("proj.weight", layout.proj),
        ("final_norm.weight", layout.final_norm),
    ):
        if not theirs:
            continue
        key = theirs + ".weight"
        if key not in found:
            raise ValueError(f"{path}: the MTP layer has no '{prefix}{key}'.")
        weights[ours] = found.pop(key)
    key = layout.head + ".weight"
    if layout.head and key not in found and not layout.head_optional:
        raise ValueError(f"{path}: the MTP layer has no '{prefix}{key}'.")
    if layout.head and key in found:
        head = found.pop(key)
        if not _same_as_base_head(model, head):  # (DeepSeek-V3's is a copy: not kept)
            weights["head.weight"] = head
    found = {k: v for k, v in found.items() if not k.startswith(layout.skip)}
    other = sorted(k for k in found if not k.startswith(layout.layer))
    if other:
        raise ValueError(f"{path}: the MTP layer has tensors not read here: {prefix}{other[0]}.")
    block = {f"{lead}{k[len(layout.layer):]}": v for k, v in found.items()}
    norms = {}
    if layout.norms_less_one is not None:  # (set aside: sanitize adds one to some only)
        norms = {k: block.pop(k) for k in list(block) if k.endswith(_LAYER_NORMS)}
    if hasattr(model, "sanitize"):
        block = model.sanitize(block)
    weights.update({"layer." + k.split(lead, 1)[1]: v for k, v in block.items() if lead in k})
    weights.update({"layer." + k[len(lead) :]: v for k, v in norms.items()})
    rule = layout.norms_less_one  # (True: no headers to read)
    if norms and (rule is True or rule(_headers(_shards(path, "")) if shapes is None else shapes)):
        for k in ["embed_norm.weight", "hidden_norm.weight", "final_norm.weight"] + [
            "layer." + k[len(lead) :] for k in norms
        ]:
            weights[k] = weights[k] + 1.0
    return weights


def mtp_config(
    checkpoint: Path, num_mtp_layers: Optional[int] = None, shapes: Optional[Dict[str, list]] = None
) -> DrafterConfig:
    """The drafter settings of ``checkpoint``'s MTP layers: a chain of 3, drafted by its
    first ``num_mtp_layers`` layers (default: as many as it has, at most 3).

    Raises:
        ValueError: naming the checkpoint and how many it has, where it has fewer.
    """
    with open(Path(checkpoint) / "config.json") as f:
        keys = shapes if shapes is not None else _checkpoint_keys(Path(checkpoint))
        n = max(mtp_layers_present(json.load(f), keys, MTP_DEFAULTS["num_draft_tokens"]), 1)
    if num_mtp_layers is not None and not (
        isinstance(num_mtp_layers, int)
        and not isinstance(num_mtp_layers, bool)
        and 1 <= num_mtp_layers <= n
    ):
        raise ValueError(
            f"num_mtp_layers={num_mtp_layers!r}: {checkpoint} has {n} MTP layer(s) that draft "
            f"(at most {MTP_DEFAULTS['num_draft_tokens']} are read); give 1 to {n}"
        )
    return DrafterConfig(kind="mtp", num_mtp_layers=num_mtp_layers or n, **MTP_DEFAULTS)


def attach_mtp(
    model: nn.Module,
    checkpoint: Path,
    config: Optional[DrafterConfig] = None,
    quantization: Optional[dict] = None,
    shapes: Optional[Dict[str, list]] = None,
) -> MTPDrafter:
    """Puts ``checkpoint``'s MTP layers on ``model`` as its drafter.

    Args:
        model (nn.Module): an mlx-lm model of the checkpoint's base (any
          quantization), without streams or drafter.
        checkpoint (Path): a Hugging Face checkpoint directory with its MTP layer.
        config (DrafterConfig, optional): the draft tree and the MTP layers read
          (``num_mtp_layers``). Default: a chain of 3, drafted by as many of the
          checkpoint's layers as it has (at most 3).
        quantization (dict, optional): ``{"group_size", "bits"}`` of a quantized
          base: the layer's matrices are quantized the same way.
        shapes (dict, optional): every tensor's shape in the checkpoint, where some of
          its shards are not on disk (:func:`fetch_mtp_checkpoint`).

    Returns:
        MTPDrafter: the drafter (also ``model.speculative_streams.drafter``).
    """
    from .streams import StreamRuntime
    from .support import check_supported

    refuse_attached(model)
    config = mtp_config(checkpoint, shapes=shapes) if config is None else config
    check_supported(model, config)
    drafter = MTPDrafter(config, model)
    weights = {}
    for d in range(config.num_mtp_layers):
        lead = f"depths.{d - 1}." if d else ""
        layer = read_mtp_weights(checkpoint, model, shapes, depth=d)
        weights.update({lead + k: v for k, v in layer.items()})
    try:
        drafter.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(f"{checkpoint}: its MTP layer does not fit this model: {e}") from e
    quantize_as_base(drafter, model, quantization)
    mx.eval(drafter.parameters())
    model.speculative_streams = StreamRuntime(model, config, drafter=drafter)
    return drafter


def use_mtp_layers(model: nn.Module, n: int) -> None:
    """Drafts with the first ``n`` of ``model``'s MTP layers (as ``load(...,
    num_mtp_layers=n)`` does): fewer layers cost less a step and may draft less well.
    The layers held stay, so ``save`` still writes all of them.

    Raises:
        ValueError: naming the model's drafter where it is not MTP layers, or the
          count where it holds fewer.
    """
    rt = getattr(model, "speculative_streams", None)
    drafter = None if rt is None else rt.drafter
    if not isinstance(drafter, MTPDrafter):
        what = type(drafter).__name__ if drafter is not None else "no drafter"
        what = "its speculative streams" if rt is not None and rt.streams is not None else what
        raise ValueError(
            f"num_mtp_layers={n}: the model drafts with {what}, not a checkpoint's MTP layers"
        )
    drafter.use_layers(n)
    stored, tuned_on = rt.config.stored or rt.config, rt.config.tuned_on
    rt.config = replace(rt.config, num_mtp_layers=n)
    rt.config.stored, rt.config.tuned_on = stored, tuned_on

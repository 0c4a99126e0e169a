"""The ``"speculative_streaming"`` section of a model's ``config.json``."""

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Union

CONFIG_KEY = "speculative_streaming"
MODES = ("shared", "lossless")
STREAM_POSITIONS = ("same", "offset")
STREAM_PASSES = ("fused", "split")
# Draft sources a call (or a tuned config) can choose: the model's own streams or
# drafter, prompt lookup, or both merged into one tree.
DRAFTS = ("streams", "ngram", "streams+ngram")


def write_config(config_file: Path, config: dict) -> None:
    """Writes a model's ``config.json`` atomically: a temporary file, then a rename."""
    tmp = Path(config_file).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=4, sort_keys=True))
    tmp.replace(config_file)


class _Section:
    """What both ``config.json`` sections share: per-level draft widths,
    settings tuned per device, and reading/writing the section (unknown keys
    are refused).

    ``tuned`` maps a device (:func:`mlx_specstream.precision.device_key`) to
    the settings ``python -m mlx_specstream.tune`` measured fastest there. They
    apply on that device only; elsewhere the section's own settings do. So::

        "speculative_streaming": {"top_k": 3, "max_tree_nodes": 16, ...,
            "tuned": {"cpu:Linux-x86_64": {"tree_depth": 0, "stream_pass": "split"}}}

    decodes plainly on a Linux CPU and with the 16-node tree on a Mac's GPU.
    """

    SECTION = ""
    # The settings a tuning may store for one device.
    TUNED_FIELDS = ("tree_depth", "top_k", "max_tree_nodes")
    # The device whose tuned settings this config carries, and the config as stored,
    # before they were applied (see for_device); None on a config as stored.
    tuned_on = None
    stored = None

    def _check_tuned(self):
        """Refuses a ``tuned`` entry with an unknown key or a bad value."""
        tuned = self.tuned
        if tuned is None:
            return
        if not (isinstance(tuned, dict) and all(isinstance(e, dict) for e in tuned.values())):
            raise ValueError(
                f"{self.SECTION}.tuned={tuned!r}: must map device names to dicts of settings"
            )
        for device, entry in tuned.items():
            unknown = sorted(set(entry) - set(self.TUNED_FIELDS))
            if unknown:
                raise ValueError(
                    f"{self.SECTION}.tuned[{device!r}]: unknown key(s) {unknown}; a tuning "
                    f"stores {list(self.TUNED_FIELDS)}"
                )
            try:
                replace(self, tuned=None, **entry)
            except ValueError as e:
                raise ValueError(f"{self.SECTION}.tuned[{device!r}]: {e}") from None

    def for_device(self, device: str):
        """This config with the settings tuned on ``device`` applied, or itself
        when none were. The result's ``tuned_on`` is ``device`` or ``None``, and
        its :meth:`to_dict` is still the section as stored."""
        entry = (self.tuned or {}).get(device)
        if not entry:
            return self
        resolved = replace(self, **entry)
        resolved.tuned_on, resolved.stored = device, self
        return resolved

    def top_k_per_stream(self) -> List[int]:
        """The draft width of each stream (tree level), as ``num_streams`` ints."""
        if isinstance(self.top_k, list):
            return list(self.top_k)
        return [self.top_k] * self.num_streams

    @classmethod
    def from_dict(cls, params: dict):
        """Builds the config from a ``config.json`` section, refusing unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"Unknown key(s) {unknown} in the '{cls.SECTION}' config section; "
                f"known keys: {sorted(known)}"
            )
        return cls(**params)

    def to_dict(self) -> dict:
        """The section as ``config.json`` holds it (tuned settings under ``tuned``)."""
        return asdict(self.stored or self)


@dataclass
class SpecStreamConfig(_Section):
    """Speculative Streaming settings of one model.

    Args:
        num_streams (int): gamma, the speculative streams per position. Stream
          ``j`` predicts the token ``j`` places after the main stream's token.
          Default: ``3``.
        num_stream_layers (int): N_s, the top layers that run multi-stream
          attention. Streams are inserted before layer ``N - N_s``. Default: ``4``.
        top_k (int or list of int): tokens taken from each stream for the draft
          tree, one value for all streams or one per stream. Default: ``3``.
        prune_threshold (float): a draft node whose early-exit transition
          probability from its parent is below this is removed with its subtree
          before the stream layers. ``0`` turns pruning off. Default: ``0.0``.
        max_tree_nodes (int): hard cap on the draft tree size, root included.
          Default: ``16``.
        tree_depth (int, optional): streams used for drafting, at most
          ``num_streams``; ``0`` turns speculation off (plain decoding), which
          ``python -m mlx_specstream.tune`` stores when speculation does not pay
          on a device. Default: ``None`` (all streams).
        mode (str): ``"lossless"``: the main stream never attends to streams, so
          the main logits are exactly the base model's. ``"shared"``: the main
          stream also attends to its own position's streams (paper Eq. 1).
          Default: ``"lossless"``.
        stream_positions (str): RoPE position of stream ``j`` of a node at
          position ``p``: ``"same"`` uses ``p`` (the stream embedding carries the
          offset), ``"offset"`` uses ``p + j``. Default: ``"same"``.
        prune_adapter_rank (int): rank of the early-exit adapter o_theta used for
          pruning. Default: ``8``.
        stream_init_rank (int): rank of the optional map f_eta applied to the
          main state when streams are created (``0``: identity, as in the
          paper's experiments). Default: ``0``.
        stream_lora_rank (int): rank of LoRA adapters that act on stream rows
          only, in the stream layers (``0``: none). In lossless mode they let
          the streams adapt while the main stream stays the base model.
          Default: ``0``.
        stream_lora_alpha (float): LoRA scale numerator (scale = alpha / rank),
          as in peft. Default: ``32.0``.
        stream_lora_targets (list of str, optional): linear modules of each
          stream layer that get stream LoRA, by path inside the layer (e.g.
          ``"self_attn.q_proj"``). Default: every linear module of the layer.
        stream_pass (str): how a lossless-mode step computes the next draft.
          ``"fused"``: the verify pass also carries the stream rows of every
          tree node, and the accepted node's are read on the device (one pass
          per step). ``"split"``: the verify pass has main rows only, then a
          second, partial pass runs the accepted node's streams through the
          stream layers (fewer rows; pays where wide passes are expensive,
          e.g. a CPU with a slow BLAS). ``python -m mlx_specstream.tune``
          measures both. Shared mode always fuses. Default: ``"fused"``.
        draft (str, optional): the draft source used when a call names none:
          ``"streams"`` (the streams' tree), ``"ngram"`` (prompt lookup) or
          ``"streams+ngram"``. ``python -m mlx_specstream.tune`` stores the
          fastest. Default: ``None``, the streams.
        pipeline (bool, optional): whether a call that does not say launches
          each step before the previous one's host read, where its settings
          allow (``spec_generate_step(pipeline=...)``).
          ``python -m mlx_specstream.tune`` stores what it measured faster.
          Default: ``None``, on a GPU only.
        stream_logits_in_pass (bool, optional): whether a fused pass's own head
          call also computes every node's stream logits (one read of the head's
          weights per step) instead of a separate head call over the accepted
          node's stream rows. ``python -m mlx_specstream.tune`` stores what it
          measured faster. Default: ``None``, on a GPU only.
        batch (dict, optional): how rows of a batch draft where a call leaves it
          to the model (``batch_generate(draft="auto")``, the server's batches):
          ``{"draft": "streams" | "ngram" | null, "num_draft_tokens": n,
          "stream_pass": "fused" | "split", "rows": K, "pipeline": bool}``
          (``null``: no drafts; ``rows``: the batch size it was measured at;
          ``pipeline``, optional: whether its passes are pipelined).
          ``python -m mlx_specstream.tune --batch-size K`` stores the fastest.
          Default: ``None``, the streams where ``tree_depth`` leaves them on.
        tuned (dict, optional): device name -> the settings above that
          ``python -m mlx_specstream.tune --save`` measured fastest on that
          device (``tree_depth``, ``top_k``, ``max_tree_nodes``,
          ``prune_threshold``, ``stream_pass``, ``draft``, ``pipeline``,
          ``stream_logits_in_pass``, ``batch``, ``draft_vocab``), applied there
          only. Default: ``None``.
        draft_vocab (bool, optional): ``false``: the streams rank every token,
          though the directory has a draft vocabulary (``draft_vocab.safetensors``,
          :mod:`mlx_specstream.draft_vocab`). ``python -m mlx_specstream.tune``
          stores it where every token measured faster. Default: ``None``, the
          draft vocabulary where the directory has one.
        draft_confidence (float, optional): where a call's drafts are a chain (``top_k``
          1) and it names no ``draft_confidence``, each chain stops after a draft the
          streams give less than this probability (:mod:`mlx_specstream.draft_confidence`).
          ``python -m mlx_specstream.tune`` stores it where a cut chain measured fastest.
          Default: ``None``, chains of ``tree_depth``.
    """

    SECTION = CONFIG_KEY
    TUNED_FIELDS = _Section.TUNED_FIELDS + (
        "prune_threshold",
        "stream_pass",
        "draft",
        "pipeline",
        "stream_logits_in_pass",
        "batch",
        "draft_vocab",
        "draft_confidence",
    )

    num_streams: int = 3
    num_stream_layers: int = 4
    top_k: Union[int, List[int]] = 3
    prune_threshold: float = 0.0
    max_tree_nodes: int = 16
    tree_depth: Optional[int] = None
    mode: str = "lossless"
    stream_positions: str = "same"
    prune_adapter_rank: int = 8
    stream_init_rank: int = 0
    stream_lora_rank: int = 0
    stream_lora_alpha: float = 32.0
    stream_lora_targets: Optional[List[str]] = None
    stream_pass: str = "fused"
    draft: Optional[str] = None
    pipeline: Optional[bool] = None
    stream_logits_in_pass: Optional[bool] = None
    batch: Optional[dict] = None
    tuned: Optional[Dict[str, dict]] = None
    draft_vocab: Optional[bool] = None
    draft_confidence: Optional[float] = None

    def __post_init__(self):
        def require(ok, name, why):
            if not ok:
                raise ValueError(f"speculative_streaming.{name}={getattr(self, name)!r}: {why}")

        for name in ("num_streams", "num_stream_layers", "max_tree_nodes"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                name,
                "must be an integer >= 1",
            )
        for name in ("prune_adapter_rank", "stream_init_rank", "stream_lora_rank"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                name,
                "must be an integer >= 0",
            )
        ks = self.top_k if isinstance(self.top_k, list) else [self.top_k]
        require(
            all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks),
            "top_k",
            "must be an integer >= 1 or a list of them",
        )
        require(
            not isinstance(self.top_k, list) or len(self.top_k) == self.num_streams,
            "top_k",
            f"a list needs one entry per stream ({self.num_streams})",
        )
        require(
            isinstance(self.prune_threshold, (int, float)) and 0.0 <= self.prune_threshold <= 1.0,
            "prune_threshold",
            "must be a probability in [0, 1] (0 turns pruning off)",
        )
        require(
            isinstance(self.stream_lora_alpha, (int, float)) and self.stream_lora_alpha > 0,
            "stream_lora_alpha",
            "must be a positive number",
        )
        require(
            self.stream_lora_targets is None
            or (
                isinstance(self.stream_lora_targets, list)
                and len(self.stream_lora_targets) > 0
                and all(isinstance(t, str) and t for t in self.stream_lora_targets)
            ),
            "stream_lora_targets",
            "must be a non-empty list of module paths inside a layer, or null",
        )
        require(
            self.tree_depth is None
            or (
                isinstance(self.tree_depth, int)
                and not isinstance(self.tree_depth, bool)
                and 0 <= self.tree_depth <= self.num_streams
            ),
            "tree_depth",
            f"must be null or an integer in [0, num_streams={self.num_streams}]",
        )
        require(self.mode in MODES, "mode", f"must be one of {MODES}")
        require(self.stream_pass in STREAM_PASSES, "stream_pass", f"must be one of {STREAM_PASSES}")
        require(
            self.draft is None or self.draft in DRAFTS, "draft", f"must be null or one of {DRAFTS}"
        )
        for name in ("pipeline", "stream_logits_in_pass", "draft_vocab"):
            require(getattr(self, name) in (None, True, False), name, "must be null, true or false")
        require(self.batch is None or not batch_choice_fault(self.batch, self.num_streams),
                "batch", str(batch_choice_fault(self.batch, self.num_streams)))  # fmt: skip
        fault = confidence_fault(self.draft_confidence, stored=True)
        require(fault is None, "draft_confidence", str(fault))
        require(
            self.stream_positions in STREAM_POSITIONS,
            "stream_positions",
            f"must be one of {STREAM_POSITIONS}",
        )
        self._check_tuned()


BATCH_DRAFTS = ("streams", "ngram", None)


def confidence_fault(confidence, stored: bool = False) -> Optional[str]:
    """What is wrong with a ``draft_confidence`` (``None``: nothing): a call's is a number
    in [0, 1) (0: no cut), a config's (``stored``) null or a number in (0, 1). (Here, not in
    :mod:`~mlx_specstream.draft_confidence`: this module imports without MLX.)

    Example:
        >>> confidence_fault(0), confidence_fault(0, stored=True)
        (None, 'must be null or a number in (0, 1)')
    """
    if confidence is None:
        return None
    number = isinstance(confidence, (int, float)) and not isinstance(confidence, bool)
    if number and (0 < confidence < 1 or confidence == 0 and not stored):
        return None
    return "must be null or a number in (0, 1)" if stored else "must be a number in [0, 1) (0: off)"


def eagle_fault(eagle: dict) -> Optional[str]:
    """What is wrong with an EAGLE-3 section's layers and norms (:data:`EAGLE_KEYS`), or
    ``None``."""
    n = eagle["num_layers"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"num_layers={n!r} (an integer >= 1)"
    if eagle["layer_type"] not in EAGLE_LAYER_TYPES:
        return f"layer_type={eagle['layer_type']!r} (one of {EAGLE_LAYER_TYPES})"
    if eagle["norm_before_fc"] and eagle["fc_norm"]:
        return "norm_before_fc and fc_norm both true (one norm of the features or the other)"
    ids = eagle["feature_layers"]
    if not isinstance(ids, list) or not ids:
        return f"feature_layers={ids!r} (a list of the base's layers)"
    return None


def medusa_fault(medusa, num_heads: int) -> Optional[str]:
    """What is wrong with a drafter section's ``medusa`` dict (:data:`MEDUSA_KEYS`) for
    ``num_heads`` heads, or ``None``."""

    def count(v, least):
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    if not isinstance(medusa, dict) or sorted(medusa) != sorted(MEDUSA_KEYS):
        return f"keys {sorted(medusa) if isinstance(medusa, dict) else medusa!r}"
    if not count(medusa["layers_per_head"], 1):
        return f"layers_per_head={medusa['layers_per_head']!r} (an integer >= 1)"
    if medusa["lm_heads"] not in (0, 1, num_heads):
        return (f"lm_heads={medusa['lm_heads']!r} (0: the base's, 1: one shared, or one per "
                f"head: {num_heads})")  # fmt: skip
    if medusa["fc_bias"] not in (True, False):
        return f"fc_bias={medusa['fc_bias']!r} (true or false)"
    size = medusa["token_map_size"]
    if size is not None and not (count(size, 1) and medusa["lm_heads"]):
        return f"token_map_size={size!r} (null, or an integer >= 1 with LM heads of their own)"
    return None


def batch_choice_fault(choice, num_streams: int) -> Optional[str]:
    """Why ``choice`` is not a batch setting (:attr:`SpecStreamConfig.batch`), or
    ``None``."""
    if not isinstance(choice, dict):
        return "must be a dict"
    keys = {"draft", "num_draft_tokens", "stream_pass", "rows"}
    if not keys <= set(choice) <= keys | {"pipeline"}:
        return f"must have the keys {sorted(keys)} (and optionally 'pipeline')"
    if choice["draft"] not in BATCH_DRAFTS:
        return f"its draft must be one of {BATCH_DRAFTS}"
    for key in ("num_draft_tokens", "rows"):
        n = choice[key]
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            return f"its {key} must be an integer >= 0"
    if choice["draft"] == "streams" and not 1 <= choice["num_draft_tokens"] <= num_streams:
        return f"with draft 'streams', its num_draft_tokens must be 1 to num_streams={num_streams}"
    if choice["stream_pass"] not in STREAM_PASSES:
        return f"its stream_pass must be one of {STREAM_PASSES}"
    if choice.get("pipeline") not in (None, True, False):
        return "its pipeline must be null, true or false"
    return None


DRAFTER_KEY = "drafter"
DRAFTER_FILE = "drafter.safetensors"
DRAFTER_KINDS = ("medusa", "parallelspec", "mtp", "eagle3", "dflash", "eagle")
# The drafters that can grow dynamic trees (a config's ``dynamic_tree`` true)
GROWING_KINDS = ("eagle3", "eagle", "mtp")
# What an EAGLE-3 drafter's section holds of its checkpoint (mlx_specstream.eagle).
EAGLE_KEYS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
    "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "attention_bias",
    "mlp_bias", "draft_vocab_size", "target_hidden_size", "norm_before_residual",
    "feature_layers", "own_embeddings", "num_layers", "layer_type", "norm_before_fc",
    "fc_norm", "norm_output",
)  # fmt: skip
# The EAGLE-3 settings a section written before they were read lacks, with what it meant:
# one Llama layer, no norm of the features before ``fc``, its output passed on unnormed.
EAGLE_LATER_KEYS = dict(
    num_layers=1, layer_type="llama", norm_before_fc=False, fc_norm=False, norm_output=False
)
# The decoder layers an EAGLE-3 drafter may be made of (their mlx-lm modules' names).
EAGLE_LAYER_TYPES = ("llama", "qwen3")
# What an EAGLE-1 drafter's section holds of its checkpoint (mlx_specstream.eagle1).
EAGLE1_KEYS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
    "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "fc_bias",
    "own_embeddings",
)  # fmt: skip
# What a released Medusa checkpoint's heads are (mlx_specstream.medusa).
MEDUSA_KEYS = ("layers_per_head", "lm_heads", "fc_bias", "token_map_size")
# What a DFlash drafter's section holds of its checkpoint (mlx_specstream.dflash).
DFLASH_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
    "max_position_embeddings", "layer_types", "sliding_window", "is_causal", "block_size",
    "mask_token_id", "feature_layers", "input_embedding_scale", "output_multiplier",
    "final_logit_softcapping",
)  # fmt: skip


@dataclass
class DrafterConfig(_Section):
    """The ``"drafter"`` section of a model's ``config.json``: an attached
    drafter other than speculative streams, verified by the same tree verifier.

    Args:
        kind (str): ``"medusa"``: Medusa-1 heads, one residual block per head
          over the last hidden state, sharing the base's final norm and LM head (a
          released checkpoint's heads, with ``medusa``: :mod:`mlx_specstream.medusa`).
          ``"parallelspec"``: a ParallelSpec drafter, one decoder layer of the
          base's architecture over (hidden state, next-token embedding) pairs
          plus ``num_draft_tokens - 1`` trainable [MASK] embeddings, drafting
          all levels in one pass; it shares the base's final norm and LM head.
          ``"mtp"``: a checkpoint's own multi-token prediction layer
          (:mod:`mlx_specstream.mtp`), run again on its output for each deeper level.
          ``"eagle3"``: an EAGLE-3 drafter (:mod:`mlx_specstream.eagle`): a decoder
          layer of its own (or several) over the base's layers' states, fused.
          ``"dflash"``: a DFlash drafter (:mod:`mlx_specstream.dflash`): a few layers of
          its own drafting a block of masks in one pass, over several of the base's
          layers' states. ``"eagle"``: an EAGLE-1 drafter (:mod:`mlx_specstream.eagle1`,
          EAGLE-2's checkpoints): one Llama layer of its own over the base's last state.
        num_draft_tokens (int): k, the draft tree's levels per step (Medusa
          heads, or ParallelSpec's last real row plus its masks). Default: ``3``.
        top_k, max_tree_nodes, tree_depth: the draft tree, as in
          :class:`SpecStreamConfig` (``tree_depth`` counts levels).
        tuned (dict, optional): device name -> the tree settings (and for
          ``"mtp"`` the layers that draft, ``num_mtp_layers``, at most the section's;
          for ``"eagle3"``, ``"eagle"`` and ``"mtp"`` whether its tree grows, ``dynamic_tree``)
          ``python -m mlx_specstream.tune --save`` measured fastest on that
          device, applied there only. Default: ``None``.
        num_mtp_layers (int): for ``"mtp"``, how many of the checkpoint's MTP layers
          draft: layer ``k`` drafts level ``k`` (Step 3.5's and MiMo-V2-Flash's three),
          the last one also every deeper level. At most ``num_draft_tokens``. In a
          model directory's config: the layers it holds. Default: ``1``.
        draft (str, optional): the draft source used when a call names none:
          ``"streams"`` (the drafter's tree), ``"ngram"`` (prompt lookup) or
          ``"streams+ngram"`` (lookup merged into the drafter's tree).
          ``python -m mlx_specstream.tune`` stores the fastest. Default: ``None``,
          the drafter's tree.
        draft_vocab (bool, optional): as in :class:`SpecStreamConfig`.
        batch (dict, optional): as in :class:`SpecStreamConfig` (``"streams"``: the
          drafter's chain).
        eagle (dict, optional): for ``"eagle3"`` and ``"eagle"`` (and only there), its
          layer's settings (for ``"eagle"``: :data:`EAGLE1_KEYS`, the rest below)
          as read from its checkpoint (:data:`EAGLE_KEYS`): its layers' shape, count
          and kind (``num_layers``, ``layer_type``: Llama's or Qwen3's), its draft
          vocabulary's size, ``feature_layers``, the base's layers whose inputs it reads
          (``len(model.layers)``: the last layer's output), and the speculators' norms
          (``norm_before_fc``, ``fc_norm``, ``norm_output``); a section without the
          last five means one Llama layer and none of those norms.
        dflash (dict, optional): for ``"dflash"`` (and only there), its settings as
          read from its checkpoint (:data:`DFLASH_KEYS`): its layers' shape and
          attention, ``block_size``, ``mask_token_id`` and ``feature_layers`` (the
          base's layers whose inputs it reads).
        medusa (dict, optional): for ``"medusa"`` heads read from a released checkpoint
          (:mod:`mlx_specstream.medusa`; ``None``: heads trained here), their shape
          (:data:`MEDUSA_KEYS`): residual blocks per head, how many LM heads of their own
          (one per head, one shared, or none: the base's), whether the blocks have
          biases, and the size of the vocabulary their heads rank (``None``: every token).
        dynamic_tree (bool, optional): for ``"eagle3"``, ``"eagle"`` and ``"mtp"``, whether
          its trees are grown from its own drafts (:mod:`mlx_specstream.dynamic_tree`);
          ``false``: the static tree of its levels. Default: ``None``, EAGLE's grown
          wherever the tree is wider than a chain, MTP layers' static.
        draft_confidence (float, optional): as in :class:`SpecStreamConfig` (the drafter's
          chains, cut where it is unsure).
    """

    SECTION = DRAFTER_KEY
    TUNED_FIELDS = _Section.TUNED_FIELDS + (
        "num_mtp_layers", "draft", "draft_vocab", "batch", "dynamic_tree", "draft_confidence",
    )  # fmt: skip

    kind: str = "medusa"
    num_draft_tokens: int = 3
    top_k: Union[int, List[int]] = 3
    max_tree_nodes: int = 16
    tree_depth: Optional[int] = None
    tuned: Optional[Dict[str, dict]] = None
    num_mtp_layers: int = 1
    draft: Optional[str] = None
    draft_vocab: Optional[bool] = None
    batch: Optional[dict] = None
    eagle: Optional[dict] = None
    dflash: Optional[dict] = None
    dynamic_tree: Optional[bool] = None
    medusa: Optional[dict] = None
    draft_confidence: Optional[float] = None

    # A drafter never changes the base model and never prunes: the tree verifier
    # treats it like a lossless-mode stream model with no stream layers.
    mode = "lossless"
    prune_threshold = 0.0
    num_stream_layers = 0
    stream_lora_rank = 0

    def __post_init__(self):
        def require(ok, name, why):
            if not ok:
                raise ValueError(f"{DRAFTER_KEY}.{name}={getattr(self, name)!r}: {why}")

        require(self.kind in DRAFTER_KINDS, "kind", f"must be one of {DRAFTER_KINDS}")
        if self.kind == "eagle3" and isinstance(self.eagle, dict):  # (an older section's)
            self.eagle = {**EAGLE_LATER_KEYS, **self.eagle}
        for name in ("num_draft_tokens", "max_tree_nodes"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                name,
                "must be an integer >= 1",
            )
        ks = self.top_k if isinstance(self.top_k, list) else [self.top_k]
        require(
            all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)
            and (not isinstance(self.top_k, list) or len(ks) == self.num_draft_tokens),
            "top_k",
            f"must be an integer >= 1 or a list of {self.num_draft_tokens} of them",
        )
        require(
            self.tree_depth is None
            or (
                isinstance(self.tree_depth, int)
                and not isinstance(self.tree_depth, bool)
                and 0 <= self.tree_depth <= self.num_draft_tokens
            ),
            "tree_depth",
            f"must be null or an integer in [0, num_draft_tokens={self.num_draft_tokens}]",
        )
        n = self.num_mtp_layers
        require(
            isinstance(n, int)
            and not isinstance(n, bool)
            and 1 <= n <= self.num_draft_tokens
            and (n == 1 or self.kind == "mtp"),
            "num_mtp_layers",
            f"must be an integer in [1, num_draft_tokens={self.num_draft_tokens}] (above 1 "
            "for kind 'mtp' only)",
        )
        require(
            self.draft is None or self.draft in DRAFTS, "draft", f"must be null or one of {DRAFTS}"
        )
        require(
            self.draft_vocab in (None, True, False), "draft_vocab", "must be null, true or false"
        )
        require(
            self.dynamic_tree in (None, False)
            or (self.dynamic_tree is True and self.kind in GROWING_KINDS),
            "dynamic_tree",
            "must be null or false, or true for kinds 'eagle3', 'eagle' and 'mtp' (whose "
            "trees grow from their drafts)",
        )
        fault = None if self.batch is None else batch_choice_fault(self.batch, self.num_streams)
        require(fault is None, "batch", str(fault))
        require(
            (self.eagle is None) == (self.kind not in ("eagle3", "eagle"))
            and (
                self.eagle is None
                or sorted(self.eagle)
                == sorted(EAGLE_KEYS if self.kind == "eagle3" else EAGLE1_KEYS)
            ),
            "eagle",
            f"kind 'eagle3' needs a dict of {list(EAGLE_KEYS)}, kind 'eagle' one of "
            f"{list(EAGLE1_KEYS)}, no other kind one",
        )
        fault = eagle_fault(self.eagle) if self.kind == "eagle3" else None
        require(fault is None, "eagle", str(fault))
        require(
            (self.dflash is None) == (self.kind != "dflash")
            and (self.dflash is None or sorted(self.dflash) == sorted(DFLASH_KEYS)),
            "dflash",
            f"kind 'dflash' (and no other) needs a dict of {list(DFLASH_KEYS)}",
        )
        fault = None if self.medusa is None else medusa_fault(self.medusa, self.num_draft_tokens)
        fault = "kind 'medusa' only" if self.medusa is not None and self.kind != "medusa" else fault
        require(fault is None, "medusa", f"null, or a dict of {list(MEDUSA_KEYS)}: {fault}")
        fault = confidence_fault(self.draft_confidence, stored=True)
        require(fault is None, "draft_confidence", str(fault))
        self._check_tuned()

    @classmethod
    def from_dict(cls, params: dict):
        """As :meth:`_Section.from_dict`; refuses a device's tuned ``num_mtp_layers``
        above the layers the section holds."""
        config = super().from_dict(params)
        for device, entry in (config.tuned or {}).items():
            n = entry.get("num_mtp_layers", 1)
            if n > config.num_mtp_layers:
                raise ValueError(
                    f"{DRAFTER_KEY}.tuned[{device!r}].num_mtp_layers={n}: more MTP layers "
                    f"than the section's num_mtp_layers={config.num_mtp_layers} holds"
                )
        return config

    @property
    def num_streams(self) -> int:
        """Draft levels, under the name the tree settings use for streams."""
        return self.num_draft_tokens


@dataclass
class VerifierConfig:
    """A model with no drafter of its own: only the tree verifier runs, on
    drafts from outside the model (prompt lookup). ``max_tree_nodes`` caps
    the draft as for the other configs."""

    max_tree_nodes: int = 16

    num_streams = 0
    top_k = 1
    tree_depth = 0
    mode = "lossless"
    prune_threshold = 0.0
    num_stream_layers = 0
    stream_lora_rank = 0

    def top_k_per_stream(self) -> List[int]:
        return []

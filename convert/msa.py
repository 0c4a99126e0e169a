"""Reference multi-stream attention for Hugging Face ``transformers`` models.

The same semantics as the MLX runtime (``mlx_specstream/streams.py``), over an
unmodified HF causal LM: forward pre-hooks on the decoder layers swap in our
4-D masks and rotary embeddings, insert the stream rows before layer
``N - N_s`` and hand the upper layers their own positions. One forward pass
covers both layouts:

* training (paper Fig. 14): a causal sequence with streams at every position,
  visible to their own main row (shared mode) only where ``stream_on``;
* inference: a committed prefix plus a draft tree with ancestor visibility.

Stream parameters carry exactly the MLX names (``embeddings``,
``prune_adapter.down.weight``, ``lora.0.self_attn.q_proj.lora_a``, ...), so a
``state_dict`` saved here is a valid ``speculative_streams.safetensors``.
"""

from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from mlx_specstream.config import SpecStreamConfig

NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f")


class LowRankAdapter(nn.Module):
    """``x + up(down(x))``; ``up`` starts at zero, so the adapter starts as the identity."""

    def __init__(self, dims: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dims, rank, bias=False)
        self.up = nn.Linear(rank, dims, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return x + self.up(self.down(x))


class LoraPair(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.lora_a = nn.Parameter(torch.randn(rank, d_in) / d_in**0.5)
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank))


class StreamParameters(nn.Module):
    """PyTorch twin of ``mlx_specstream.streams.SpeculativeStreams``."""

    def __init__(self, config: SpecStreamConfig, hidden_size: int, lora_shapes=None):
        super().__init__()
        self.embeddings = nn.Parameter(0.02 * torch.randn(config.num_streams, hidden_size))
        if config.prune_adapter_rank > 0:
            self.prune_adapter = LowRankAdapter(hidden_size, config.prune_adapter_rank)
        if config.stream_init_rank > 0:
            self.stream_init = LowRankAdapter(hidden_size, config.stream_init_rank)
        if config.stream_lora_rank > 0:
            self.lora = nn.ModuleList()
            for shapes in lora_shapes:
                layer = nn.ModuleDict()
                for name, (d_in, d_out) in shapes.items():
                    node = layer
                    *parents, leaf = name.split(".")
                    for part in parents:
                        if part not in node:
                            node[part] = nn.ModuleDict()
                        node = node[part]
                    node[leaf] = LoraPair(d_in, d_out, config.stream_lora_rank)
                self.lora.append(layer)

    def make_streams(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` main states -> ``(B, T * gamma, D)`` stream rows, position-major."""
        if hasattr(self, "stream_init"):
            h = self.stream_init(h)
        B, T, D = h.shape
        s = h[:, :, None, :] + self.embeddings.to(h.dtype)
        return s.reshape(B, T * self.embeddings.shape[0], D)


def decoder(model):
    """The inner decoder (``LlamaModel``, ``GPTNeoXModel``, ...) of a causal LM,
    looking through peft wrappers."""
    inner = model
    while hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.base_model if inner.base_model is not inner else inner.model


def stream_lora_targets(model, config: SpecStreamConfig) -> List[Dict[str, Tuple[int, int]]]:
    """Per stream layer, ``{module path: (in, out)}`` of the linears that get stream LoRA."""
    layers = decoder(model).layers
    first = len(layers) - config.num_stream_layers
    out = []
    for i in range(first, len(layers)):
        linears = {n: m for n, m in layers[i].named_modules() if isinstance(m, nn.Linear)}
        names = config.stream_lora_targets or sorted(linears)
        missing = [n for n in names if n not in linears]
        if missing:
            raise ValueError(
                f"speculative_streaming.stream_lora_targets: {missing} are not linear modules of "
                f"layer {i}; its linear modules are {sorted(linears)}."
            )
        out.append({n: (linears[n].in_features, linears[n].out_features) for n in names})
    return out


def multi_stream_mask(
    visible: torch.Tensor, gamma: int, shared: bool, stream_on: torch.Tensor
) -> torch.Tensor:
    """Boolean multi-stream mask over ``T`` main rows and ``T * gamma`` stream rows.

    Same rule as ``mlx_specstream.tree.stream_attention_mask``, batched, with
    ``visible`` ``(B, T, T)`` saying which main rows a main row sees (causal for
    a sequence, ancestors for a tree) and ``stream_on`` ``(B, T)`` saying where
    a main row may see its own streams in shared mode (the training layout
    has stream rows at prompt positions too; they must stay invisible there).
    """
    B, T, _ = visible.shape
    g = gamma
    node = torch.arange(T, device=visible.device)
    s_node = node.repeat_interleave(g)  # stream row -> its main row
    s_j = torch.arange(g, device=visible.device).repeat(T)
    same = s_node[:, None] == s_node[None, :]
    ss = same & (s_j[None, :] <= s_j[:, None])  # streams 1..j of the same node
    sm = visible[:, s_node, :]  # (B, T*g, T): stream sees its node's visible main rows
    ms = (node[:, None] == s_node[None, :]) & shared  # (T, T*g)
    ms = ms[None] & stream_on[:, :, None]
    top = torch.cat([visible, ms], dim=2)
    bottom = torch.cat([sm, ss[None].expand(B, -1, -1)], dim=2)
    return torch.cat([top, bottom], dim=1)


def additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean ``(B, Q, K)`` -> additive ``(B, 1, Q, K)`` in ``dtype``."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, neg)[:, None]


class MultiStreamModel(nn.Module):
    """A HF causal LM plus its stream parameters, run with multi-stream attention.

    Args:
        model: a ``transformers`` causal LM (possibly peft-wrapped; shared-mode
          LoRA then acts on main and stream rows alike).
        config: the stream settings.
        streams: existing stream parameters, or None for a fresh initialisation.
    """

    def __init__(self, model, config: SpecStreamConfig, streams: Optional[StreamParameters] = None):
        super().__init__()
        self.model = model
        self.config = config
        base = decoder(model)
        self.num_layers = len(base.layers)
        if config.num_stream_layers > self.num_layers:
            raise ValueError(
                f"speculative_streaming.num_stream_layers={config.num_stream_layers} exceeds "
                f"the model's {self.num_layers} layers."
            )
        self.first_top = self.num_layers - config.num_stream_layers
        if streams is None:
            lora = stream_lora_targets(model, config) if config.stream_lora_rank else None
            streams = StreamParameters(config, model.config.hidden_size, lora)
        self.streams = streams
        self._ctx = None

    # ---- the model's own tail, for early-exit logits ------------------------
    def head(self, h: torch.Tensor) -> torch.Tensor:
        base = decoder(self.model)
        norm = next(getattr(base, n) for n in NORM_NAMES if hasattr(base, n))
        logits = self.model.get_output_embeddings()(norm(h))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- hooks ---------------------------------------------------------------
    @contextmanager
    def _hooks(self):
        base = decoder(self.model)
        handles = [
            layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)
            for i, layer in enumerate(base.layers)
        ]
        if self.config.stream_lora_rank:
            for j, layer in enumerate(base.layers[self.first_top :]):
                for name, module in layer.named_modules():
                    pair = _find(self.streams.lora[j], name)
                    if pair is not None:
                        handles.append(module.register_forward_hook(self._lora_hook(pair)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _pre_hook(self, i):
        def hook(module, args, kwargs):
            ctx = self._ctx
            h = args[0] if args else kwargs.pop("hidden_states")
            if i == self.first_top:
                ctx["layer_input"] = h
                h = torch.cat([h, self.streams.make_streams(h)], dim=1)
            upper = i >= self.first_top
            kwargs["attention_mask"] = ctx["upper_mask" if upper else "lower_mask"]
            kwargs["position_ids"] = ctx["upper_pos" if upper else "lower_pos"]
            kwargs["position_embeddings"] = ctx["upper_rope" if upper else "lower_rope"]
            return (h,) + tuple(args[1:]), kwargs

        return hook

    def _lora_hook(self, pair: LoraPair):
        scale = self.config.stream_lora_alpha / self.config.stream_lora_rank

        def hook(module, args, output):
            T = self._ctx["T"]
            x = args[0][:, T:]
            delta = (x @ pair.lora_a.T.to(x.dtype)) @ pair.lora_b.T.to(x.dtype)
            return torch.cat([output[:, :T], output[:, T:] + scale * delta], dim=1)

        return hook

    # ---- forward --------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        visible: torch.Tensor,
        positions: torch.Tensor,
        stream_on: Optional[torch.Tensor] = None,
        early_exit: bool = False,
    ):
        """One multi-stream pass.

        Args:
            input_ids: ``(B, T)`` main-row tokens.
            visible: ``(B, T, T)`` bool, main-row visibility (causal or tree).
            positions: ``(B, T)`` position ids of the main rows.
            stream_on: ``(B, T)`` bool, main rows that see their own streams in
              shared mode. Default: all.
            early_exit: also return the pruning adapter's early-exit logits
              (computed on detached layer-``N - N_s`` states).

        Returns:
            dict: ``main_logits`` ``(B, T, V)``, ``stream_logits``
            ``(B, T, gamma, V)`` and, with ``early_exit``, ``early_logits``.
        """
        B, T = input_ids.shape
        g = self.config.num_streams
        if stream_on is None:
            stream_on = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        dtype = self.model.get_output_embeddings().weight.dtype
        upper_vis = multi_stream_mask(visible, g, self.config.mode == "shared", stream_on)
        offsets = torch.arange(1, g + 1, device=positions.device)
        if self.config.stream_positions == "same":
            offsets = torch.zeros_like(offsets)
        stream_pos = (positions[:, :, None] + offsets).reshape(B, T * g)
        upper_pos = torch.cat([positions, stream_pos], dim=1)
        rotary = decoder(self.model).rotary_emb
        probe = torch.zeros(1, dtype=dtype, device=input_ids.device)
        self._ctx = {
            "T": T,
            "lower_mask": additive(visible, dtype),
            "upper_mask": additive(upper_vis, dtype),
            "lower_pos": positions,
            "upper_pos": upper_pos,
            "lower_rope": rotary(probe, positions),
            "upper_rope": rotary(probe, upper_pos),
        }
        try:
            with self._hooks():
                logits = self.model(
                    input_ids=input_ids, position_ids=positions, use_cache=False
                ).logits
            out = {
                "main_logits": logits[:, :T],
                "stream_logits": logits[:, T:].reshape(B, T, g, -1),
            }
            if early_exit:
                h = self._ctx["layer_input"].detach()
                out["early_logits"] = self.head(self.streams.prune_adapter(h))
            return out
        finally:
            self._ctx = None


def _find(module_dict, path: str):
    node = module_dict
    for part in path.split("."):
        if not isinstance(node, nn.ModuleDict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, LoraPair) else None


def causal_visibility(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``(B, T, T)`` causal visibility that hides right padding beyond ``lengths``."""
    idx = torch.arange(T, device=lengths.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    valid = idx[None, None, :] < lengths[:, None, None]
    # Padding rows see themselves, so no row is fully masked.
    return (causal & valid) | torch.eye(T, dtype=torch.bool, device=lengths.device)[None]

"""Reference Medusa-1 heads and ParallelSpec drafter for Hugging Face models.

Both sit on a frozen causal LM and read the output of its last decoder layer
(before the final norm), and both share the base's final norm and LM head.
Parameter names equal the MLX ones (``mlx_specstream/drafters.py``), so a
``state_dict`` saved here is a valid ``drafter.safetensors``:

* Medusa: ``heads.{j}.linear.{weight,bias}``; head ``j`` (0-based) maps the
  state at position ``t`` to ``x + SiLU(W x + b)`` and predicts ``x[t + 2 + j]``.
  With ``--medusa-lm-heads own`` or ``base``, heads in the released checkpoints' layout
  instead (``mlx_specstream.medusa``): blocks over the normed state, then LM heads of
  their own (``lm_heads.{j}.weight``, copies of the base's) or the base's.
* ParallelSpec: ``fc.weight`` ``(D, 2D)`` maps (hidden state at ``i``,
  embedding of ``x[i + 1]``) to a real row that predicts ``x[i + 2]``;
  ``masks`` ``(k - 1, D)`` are the [MASK] rows, mask ``m`` after anchor ``a``
  predicting ``x[a + 2 + m]``; ``layer.*`` is one decoder layer of the base's
  own class (initialised from its last layer).
"""

import copy
from typing import Dict

import torch
from torch import nn

from mlx_specstream.config import DrafterConfig

from .msa import additive, decoder

IGNORE = -100


class ResBlock(nn.Module):
    """``x + SiLU(linear(x))``, starting as the identity (zero weights, as Medusa)."""

    def __init__(self, dims: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(dims, dims, bias=bias)
        nn.init.zeros_(self.linear.weight)
        if bias:
            nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """Heads trained here (``heads.{j}.linear.*``: one block over the state before the final
    norm, then the base's norm and head), or with ``config.medusa`` a released
    checkpoint's (``heads.{j}.{l}.linear.*`` over the normed state, then ``lm_heads.{j}``
    copied from the base's head, or none: the base's head; ``mlx_specstream.medusa``)."""

    def __init__(self, config: DrafterConfig, model):
        super().__init__()
        D, medusa = model.config.hidden_size, config.medusa
        if medusa is None:
            self.heads = nn.ModuleList(ResBlock(D) for _ in range(config.num_draft_tokens))
            return
        self.heads = nn.ModuleList(
            nn.ModuleList(ResBlock(D, medusa["fc_bias"]) for _ in range(medusa["layers_per_head"]))
            for _ in range(config.num_draft_tokens)
        )
        base = model.get_output_embeddings().weight
        self.lm_heads = nn.ModuleList(
            nn.Linear(D, base.shape[0], bias=False) for _ in range(medusa["lm_heads"])
        )
        with torch.no_grad():  # (Medusa-1's start: every head drafts the base's next token)
            for head in self.lm_heads:
                head.weight.copy_(base)


class ParallelSpecDrafter(nn.Module):
    def __init__(self, config: DrafterConfig, model):
        super().__init__()
        D = model.config.hidden_size
        self.fc = nn.Linear(2 * D, D, bias=False)
        with torch.no_grad():  # start as (hidden state + token embedding)
            self.fc.weight.copy_(torch.cat([torch.eye(D), torch.eye(D)], dim=1))
        self.masks = nn.Parameter(0.02 * torch.randn(config.num_draft_tokens - 1, D))
        self.layer = copy.deepcopy(decoder(model).layers[-1])
        self.layer.requires_grad_(True)


DRAFTERS = {"medusa": MedusaHeads, "parallelspec": ParallelSpecDrafter}


def group_layout(T: int, k: int):
    """Rows, positions and visibility of ParallelSpec's grouped training layout.

    ``T`` real rows are followed by one group of ``k - 1`` masks per anchor
    ``a`` (every real row). Real rows are causal among real rows and never see
    masks; mask ``m`` of group ``a`` sits at position ``a + m`` and sees real
    rows ``<= a`` and masks ``1..m`` of its own group only.

    Example: ``T = 2, k = 2`` gives rows ``[r0 r1 | m(a=0) | m(a=1)]``,
    positions ``[0 1 1 2]`` and visibility (row sees column)::

        r0    1 0 0 0
        r1    1 1 0 0
        m@0   1 0 1 0
        m@1   1 1 0 1

    Returns:
        tuple: ``positions`` ``(R,)`` long and ``visible`` ``(R, R)`` bool,
        with ``R = T * k``.
    """
    g = k - 1
    real = torch.arange(T)
    anchor = real.repeat_interleave(g)  # mask row -> its anchor
    m = torch.arange(1, g + 1).repeat(T)  # mask row -> its offset
    positions = torch.cat([real, anchor + m])
    rr = real[:, None] >= real[None, :]
    mr = anchor[:, None] >= real[None, :]
    mm = (anchor[:, None] == anchor[None, :]) & (m[None, :] <= m[:, None])
    top = torch.cat([rr, torch.zeros(T, T * g, dtype=torch.bool)], dim=1)
    bottom = torch.cat([mr, mm], dim=1)
    return positions, torch.cat([top, bottom], dim=0)


class DrafterTrainingModel(nn.Module):
    """A frozen base plus a trainable drafter, with the drafter's loss for Trainer.

    Loss: the mean over draft levels ``l = 0..k-1`` of the cross-entropy of
    level ``l`` at position ``t`` against ``y[t + 2 + l]`` (completion tokens
    only; Medusa weights level ``l`` by ``0.8 ** l`` as in Medusa-1).
    """

    def __init__(self, model, config: DrafterConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.drafter = DRAFTERS[config.kind](config, model)
        self._features = None
        decoder(model).layers[-1].register_forward_hook(self._keep_features)

    def _keep_features(self, module, args, output):
        self._features = output[0] if isinstance(output, tuple) else output

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        from .msa import NORM_NAMES

        base = decoder(self.model)
        return next(getattr(base, n) for n in NORM_NAMES if hasattr(base, n))(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(self.final_norm(h))

    def released_medusa_logits(self, f: torch.Tensor) -> torch.Tensor:
        """``(B, T, k, V)`` of released heads: each over the normed state, its blocks,
        then its own LM head (or the base's, without the norm again)."""
        x, d, out = self.final_norm(f), self.drafter, []
        for j, blocks in enumerate(d.heads):
            y = x
            for block in blocks:
                y = block(y)
            own = d.lm_heads[j % len(d.lm_heads)] if len(d.lm_heads) else None
            out.append(own(y) if own is not None else self.model.get_output_embeddings()(y))
        return torch.stack(out, dim=2)

    def features(self, input_ids):
        """Last-layer outputs of the frozen base, ``(B, T, D)`` (right padding
        cannot reach earlier rows under the causal mask)."""
        with torch.no_grad():
            self.model(input_ids=input_ids, use_cache=False)
        return self._features.detach()

    def level_logits(self, input_ids, lengths) -> torch.Tensor:
        """``(B, T, k, V)``: level ``l`` at position ``t`` predicts ``y[t + 2 + l]``."""
        f = self.features(input_ids)
        if self.config.kind == "medusa" and self.config.medusa is not None:
            return self.released_medusa_logits(f)
        if self.config.kind == "medusa":
            return torch.stack([self.head(h(f)) for h in self.drafter.heads], dim=2)
        return self.parallelspec_logits(f, input_ids, lengths)

    def parallelspec_logits(self, f, input_ids, lengths):
        B, T, D = f.shape
        k = self.config.num_draft_tokens
        d = self.drafter
        emb = self.model.get_input_embeddings()(input_ids)
        nxt = torch.cat([emb[:, 1:], torch.zeros_like(emb[:, :1])], dim=1)
        real = d.fc(torch.cat([f, nxt], dim=-1))
        masks = d.masks.to(real.dtype)[None].expand(B, T, k - 1, D).reshape(B, T * (k - 1), D)
        positions, visible = group_layout(T, k)
        positions, visible = positions.to(f.device), visible.to(f.device)
        # Padded real rows (and their groups) see themselves only.
        valid = torch.arange(T, device=f.device)[None] < lengths[:, None]
        valid = torch.cat([valid, valid.repeat_interleave(k - 1, dim=1)], dim=1)
        visible = visible[None] & valid[:, None, :]
        visible = visible | torch.eye(T * k, dtype=torch.bool, device=f.device)[None]
        out = self.run_layer(torch.cat([real, masks], dim=1), positions, visible)
        logits = self.head(out)
        level0 = logits[:, :T, None]
        rest = logits[:, T:].reshape(B, T, k - 1, -1)
        return torch.cat([level0, rest], dim=2)

    def run_layer(self, x, positions, visible):
        """The drafter layer over rows ``x`` with explicit positions and visibility."""
        B = x.shape[0]
        pos = positions[None].expand(B, -1) if positions.dim() == 1 else positions
        rope = decoder(self.model).rotary_emb(x, pos)
        out = self.drafter.layer(
            x,
            attention_mask=additive(visible.expand(B, -1, -1), x.dtype),
            position_ids=pos,
            position_embeddings=rope,
        )
        return out[0] if isinstance(out, tuple) else out

    def forward(self, input_ids, lengths, prompt_lens):
        from .finetune import _correct, shifted_targets

        logits = self.level_logits(input_ids, lengths)
        ce = nn.functional.cross_entropy
        loss = torch.zeros((), device=input_ids.device)
        correct = {}
        weight_sum = 0.0
        for level in range(self.config.num_draft_tokens):
            t = shifted_targets(input_ids, lengths, prompt_lens, level + 2)
            w = 0.8**level if self.config.kind == "medusa" else 1.0
            weight_sum += w
            if (t != IGNORE).any():
                loss = loss + w * ce(
                    logits[:, :, level].flatten(0, 1).float(), t.flatten(), ignore_index=IGNORE
                )
            correct[f"level_{level + 1}"] = _correct(logits[:, :, level], t)
        return {"loss": loss / weight_sum, "correct": correct}

    def drafter_state(self) -> Dict[str, torch.Tensor]:
        return {
            k: v.detach().float().contiguous().cpu() for k, v in self.drafter.state_dict().items()
        }

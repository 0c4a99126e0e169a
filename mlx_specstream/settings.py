"""Per-call settings of a decode: the tree, the acceptance rule, the draft
source, and the checks on the prompt."""

from typing import List, Optional, Tuple, Union

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .sample_utils import DistributionSampler
from .streams import StreamRuntime
from .tree import path_to

ACCEPTANCE = ("target-sample", "rejection")


def apply_processors(processors, history, tokens, parents, logits):
    """Runs mlx-lm logits processors on each tree node with that node's own history."""
    rows = []
    for a in range(logits.shape[0]):
        context = mx.array(history + [tokens[i] for i in path_to(a, parents)[1:]])
        row = logits[a : a + 1]
        for processor in processors:
            row = processor(context, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


def resolve_tree_settings(
    rt: StreamRuntime,
    tree_top_k: Union[None, int, List[int]] = None,
    tree_depth: Optional[int] = None,
    prune_threshold: Optional[float] = None,
    max_tree_nodes: Optional[int] = None,
) -> Tuple[List[int], int, float, int]:
    """Per-call tree settings, defaulting to the model's config; validated."""
    cfg = rt.config
    if tree_depth is None:
        tree_depth = cfg.num_streams if cfg.tree_depth is None else cfg.tree_depth
    depth = tree_depth
    if not (isinstance(depth, int) and 0 <= depth <= cfg.num_streams):
        raise ValueError(
            f"tree_depth={tree_depth!r} must be an integer in [0, {cfg.num_streams}] "
            "(the model has that many streams)."
        )
    if tree_top_k is None:
        ks = cfg.top_k_per_stream()
    elif isinstance(tree_top_k, int):
        ks = [tree_top_k] * cfg.num_streams
    else:
        ks = list(tree_top_k) + [1] * (cfg.num_streams - len(tree_top_k))
    if any(not isinstance(k, int) or k < 1 for k in ks) or len(ks) != cfg.num_streams:
        raise ValueError(f"tree_top_k={tree_top_k!r}: need integers >= 1, at most one per stream.")
    threshold = cfg.prune_threshold if prune_threshold is None else prune_threshold
    if not (0.0 <= threshold <= 1.0):
        raise ValueError(f"prune_threshold={prune_threshold!r} must be in [0, 1].")
    if threshold > 0 and (rt.streams is None or "prune_adapter" not in rt.streams):
        raise ValueError("prune_threshold > 0 needs a pruning adapter (prune_adapter_rank > 0).")
    nodes = cfg.max_tree_nodes if max_tree_nodes is None else max_tree_nodes
    if not (isinstance(nodes, int) and nodes >= 1):
        raise ValueError(f"max_tree_nodes={max_tree_nodes!r} must be an integer >= 1.")
    return ks, depth, float(threshold), nodes


def greedy(logprobs: mx.array) -> mx.array:
    """mlx-lm's greedy sampler: the argmax."""
    return mx.argmax(logprobs, axis=-1)


def dynamic_tree_setting(rt: StreamRuntime, dynamic_tree, draft_model, ks, depth: int) -> bool:
    """Whether this call's drafter grows dynamic trees (:mod:`mlx_specstream.dynamic_tree`):
    as the call asks, else as the model's config does.

    ``None`` (the call's and the config's) means: where the drafter grows them by
    default (an EAGLE drafter: EAGLE-3's, EAGLE-1's) and the tree is wider than a chain;
    an MTP layer and a draft model grow them where asked (``True``, or a tuned config).
    Asked for where the drafts cannot grow one (streams, Medusa heads, several MTP
    layers), it is refused with the reason.
    """
    if dynamic_tree not in (None, True, False):
        raise ValueError(f"dynamic_tree={dynamic_tree!r}: pass True, False or None.")
    wide = depth > 0 and max(ks[:depth]) > 1
    if draft_model is not None:
        return bool(dynamic_tree and wide)
    drafter = rt.drafter
    asked = getattr(rt.config, "dynamic_tree", None) if dynamic_tree is None else dynamic_tree
    grows = hasattr(drafter, "draft_tree")
    why = drafter.growth_refusal() if grows else None
    if asked and (not grows or why is not None):
        source = "" if dynamic_tree else " (the model's config)"
        if why is not None:
            raise ValueError(f"dynamic_tree=True{source}: {why}; pass dynamic_tree=False.")
        if drafter is None:
            what = "the model's speculative streams fill"
        else:
            what = f"its {getattr(rt.config, 'kind', 'attached')} drafter fills"
        raise ValueError(
            f"dynamic_tree=True{source}: {what} static trees; dynamic trees are grown by "
            "drafters that run again on their own output, one node at a time (EAGLE's, an "
            "MTP layer, or a draft_model's)."
        )
    if asked is None:
        asked = grows and drafter.grows_by_default
    return bool(asked and grows and wide)


def default_acceptance(sampler) -> str:
    if sampler is greedy or isinstance(sampler, DistributionSampler):
        return "rejection"
    warnings.warn(
        "This sampler gives draws only, not its distribution, so drafts are verified by "
        "acceptance='target-sample', which accepts fewer drafts when sampling than "
        "'rejection'. Pass a sampler from mlx_specstream.sample_utils.make_sampler "
        "(same arguments as mlx-lm's) to use 'rejection'.",
        stacklevel=3,
    )
    return "target-sample"


def check_prompt(model: nn.Module, prompt: mx.array):
    """Refuses an empty prompt, token ids outside the vocabulary, and a prompt
    longer than the model's context (``max_position_embeddings``, when known)."""
    if prompt.ndim != 1:
        raise ValueError(f"The prompt must be a 1-D array of token ids, got shape {prompt.shape}.")
    if prompt.size == 0:
        raise ValueError("The prompt is empty: give at least one token.")
    args = getattr(model, "args", None)
    vocab = getattr(args, "vocab_size", None)
    if vocab is not None:
        ids = np.array(prompt)
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"Prompt token {i} has id {ids[i]}, outside the model's vocabulary "
                f"[0, {vocab})."
            )
    context = getattr(args, "max_position_embeddings", None)
    if context and prompt.size > context:
        raise ValueError(
            f"The prompt has {prompt.size} tokens, more than the model's context of {context} "
            "(max_position_embeddings in config.json)."
        )

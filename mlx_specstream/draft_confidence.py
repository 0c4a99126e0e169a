"""Chains cut where their drafter is unsure (``draft_confidence``; transformers'
``assistant_confidence_threshold``): a chain stops after a draft its drafter gives less
than the threshold, so a step verifies the drafts likely to be accepted and, where the
levels run one after another (a draft model, EAGLE's drafter, an MTP layer), drafts no
further. The cut reads the drafter's own probabilities only, so a drawn chain cut by it
stays a valid proposal for rejection sampling.
"""

from typing import List, Optional

import mlx.core as mx

from .config import confidence_fault


def top_probabilities(logits: mx.array) -> mx.array:
    """``(L,)``: each level's largest probability under its logits ``(L, V)`` (on the
    device, for :func:`confident_levels`)."""
    return mx.softmax(logits.astype(mx.float32), axis=-1).max(axis=-1)


def unsure(logits: mx.array, confidence: Optional[float]) -> bool:
    """Whether a chain stops after the draft of ``logits`` (``(V,)`` or ``(1, V)``, its
    argmax): its drafter gives it less than ``confidence`` (``None``: never). A host read."""
    if confidence is None:
        return False
    return top_probabilities(logits).max().item() < confidence


def own_cut(drafter, confidence: Optional[float]) -> dict:
    """The keyword arguments of ``drafter.draft`` that let a drafter drafting level by
    level (an MTP layer, EAGLE's) stop its own chain at ``confidence``; empty for other
    drafters and without one (the caller then cuts the chain it gets)."""
    if confidence is None or not getattr(drafter, "drafts_level_by_level", False):
        return {}
    return {"confidence": confidence}


def confident_levels(top: List[float], confidence: Optional[float]) -> int:
    """How many levels of a chain stay when it stops after the first draft whose
    probability (``top``, level by level) is below ``confidence`` (``None``: all).

    Example:
        >>> confident_levels([0.9, 0.3, 0.8], 0.5)
        2
        >>> confident_levels([0.9, 0.7, 0.8], 0.5)
        3
        >>> confident_levels([0.2, 0.9], 0.5)
        1
    """
    if confidence is not None:
        for i, p in enumerate(top):
            if p < confidence:
                return i + 1
    return len(top)


def check_draft_confidence(confidence) -> None:
    """Refuses a ``draft_confidence`` that is not a number in [0, 1) (0: no cut)."""
    fault = confidence_fault(confidence)
    if fault is not None:
        raise ValueError(f"draft_confidence={confidence!r} {fault}.")


def chain_confidence(asked, stored, refusal: Optional[str]) -> Optional[float]:
    """The threshold a call's chains are cut at (``None``: none): the one it ``asked`` for
    (0: none, whatever the model's config says; refused with ``refusal``, the reason its
    drafts are no chain), else the model's tuned one, ``stored``, where its drafts are a
    chain.

    Example:
        >>> chain_confidence(None, 0.4, None), chain_confidence(0, 0.4, None)
        (0.4, None)
        >>> chain_confidence(None, 0.4, "a tree") is None  # (tuned for its chains)
        True
    """
    if asked is None:
        return stored if refusal is None else None
    if asked == 0:
        return None
    if refusal is not None:
        raise ValueError(f"{refusal}.")
    return asked


def chain_refusal(ks: List[int], depth: int, dynamic: bool, lookup_only: bool) -> Optional[str]:
    """Why a call's drafts take no ``draft_confidence`` (``None``: they do): it cuts a
    chain, the drafter's levels' first choices (``ks[:depth]`` all 1, not grown).

    Example:
        >>> chain_refusal([1, 1, 1], 3, False, False) is None
        True
        >>> chain_refusal([2, 1], 2, False, False)
        'draft_confidence stops a chain; this call drafts a tree 2 wide (tree_top_k): pass tree_top_k=1'
    """
    if lookup_only:
        return (
            "draft_confidence stops a drafter's chain; prompt lookup's drafts (draft='ngram') "
            "are the text's own, with no probabilities"
        )
    if depth == 0:
        return (
            "draft_confidence stops a drafter's chain; this call drafts none (tree_depth 0: "
            "speculation is off, as asked or as tuned on this device)"
        )
    if dynamic:
        return (
            "draft_confidence stops a chain; dynamic_tree grows a tree scored by its own "
            "nodes: pass one or the other"
        )
    if max(ks[:depth]) > 1:
        return (
            f"draft_confidence stops a chain; this call drafts a tree {max(ks[:depth])} wide "
            "(tree_top_k): pass tree_top_k=1"
        )
    return None

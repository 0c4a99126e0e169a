"""mlx-lm's draft-model decoding through our verifier: a small model that shares
the base's vocabulary drafts a greedy chain, and each level's top-k is a tree level.

Its KV cache follows the base's (mlx-lm's convention: a reused ``prompt_cache`` is
the model's layers followed by the draft model's). Between steps it holds the
committed tokens it has fed, then the drafts it fed while drafting; the next step
keeps those of the drafts that were accepted and feeds the rest of the new
context in one pass.
"""

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

from .cache import ChunkKVCache, WindowKVCache, model_caches
from .draft_confidence import unsure
from .draft_schedule import DraftLength
from .dynamic_tree import grow, grow_drawn, log_softmax
from .layout import with_prefix

# The caches of the layers a draft model grows trees in (DraftModel.draft_tree): plain or
# quantized keys and values, or a sliding window's.
GROWING_CACHES = (KVCache, QuantizedKVCache, WindowKVCache)


class DraftModel:
    """A small mlx-lm model drafting for the verifier (``draft_model=``).

    Example: after the prompt ``[5, 6, 7]`` the cache holds ``[5, 6]`` and ``7``
    waits. ``draft([7], 9)`` (the root accepted alone, then 9) feeds ``[7, 9]``,
    drafts ``x1`` from 9's logits, feeds ``x1`` and so on: ``k`` levels of logits,
    ``k - 1`` drafts fed. If the next step accepts ``[9, x1, a]`` and then 4, only
    ``a`` and 4 are fed: ``x1``'s row is already there.

    Args:
        model (nn.Module): the draft model (an mlx-lm model).
        cache (list): its KV caches, holding ``offset`` tokens, the same as the base's.
        num_draft_tokens (int): the chain's length ``k``.
        quant (KVQuantizer, optional): quantizes its cache as the model's
          (``kv_bits``), after every call, as mlx-lm's draft-model loop does.
        confidence (float, optional): stops a chain after a draft whose probability
          under the draft model is below it (transformers' ``assistant_confidence_threshold``):
          :attr:`drafted` then says how many levels are real.
        schedule (str, optional): ``"heuristic"``: each chain is :attr:`length`'s ``now``
          long (at most ``k``), which the caller updates after each step
          (:mod:`mlx_specstream.draft_schedule`); ``None`` or ``"constant"``: ``k``.
    """

    def __init__(self, model: nn.Module, cache: list, num_draft_tokens: int, quant=None,
                 confidence: Optional[float] = None, schedule: Optional[str] = None):  # fmt: skip
        self.model, self.cache, self.k, self.quant = model, cache, num_draft_tokens, quant
        self.confidence = confidence
        self.length = DraftLength(num_draft_tokens, schedule)
        self.drafted = num_draft_tokens  # the last chain's real levels (the rest repeat)
        self.fed = cache[0].offset if cache else 0  # committed tokens in the cache
        self.unfed: List[int] = []  # committed tokens not fed yet
        self.drafts: Optional[mx.array] = None  # the drafts fed after them

    def prefill(self, tokens: List[int], step: int) -> None:
        """Feeds context tokens in chunks of ``step`` (a prompt's body)."""
        for i in range(0, len(tokens), step):
            chunk = tokens[i : i + step]
            self._feed(mx.array(chunk))
            self.fed += len(chunk)
            self._forget()
            mx.eval([c.state for c in self.cache])

    def extend(self, tokens: List[int]) -> None:
        """Context tokens to feed with the next draft (a prompt's last token)."""
        self.unfed.extend(tokens)

    def draft(self, accepted: List[int], token: int, vocab_size: int) -> mx.array:
        """``(k, V)`` float32 logits: level ``j`` after ``token`` and the greedy
        drafts of the levels before it.

        Args:
            accepted (list): the step's accepted tokens, its root first (the root
              is context already: the previous draft's ``token``).
            token (int): the token after them.
            vocab_size (int): the model's output size ``V``; the draft's logits
              are cut or padded (``-inf``) to it.
        """
        return self._draft(self.unfed + list(accepted[1:]) + [token], vocab_size)

    def first_draft(self, vocab_size: int) -> mx.array:
        """``(k, V)`` logits after the prompt, whose last token waits (:meth:`extend`):
        the first tree's drafts, as mlx-lm's loop drafts before its first pass."""
        return self._draft(list(self.unfed), vocab_size)

    def _draft(self, new: List[int], vocab_size: int) -> mx.array:
        drafts = [] if self.drafts is None else self.drafts.tolist()
        same = 0  # the drafts fed last time that the new context repeats
        while same < min(len(drafts), len(new) - 1) and drafts[same] == new[same]:
            same += 1
        self._trim_to(self.fed + same)
        logits = self._step(mx.array(new[same:]))
        self.fed += len(new)
        self.unfed, levels, fed = [], [logits], []
        while len(levels) < self.length.now and not self._unsure(levels[-1]):
            fed.append(mx.argmax(levels[-1]).reshape(1))
            levels.append(self._step(fed[-1]))
        self.drafts = mx.concatenate(fed) if fed else None
        self._forget()
        self.drafted = len(levels)  # (then the last level repeated: the shape stays (k, V))
        levels += [levels[-1]] * (self.k - len(levels))
        return _fit(mx.stack(levels), vocab_size)

    def _unsure(self, logits: mx.array) -> bool:
        """Whether the chain stops after the draft of ``logits`` (:func:`unsure`)."""
        return unsure(logits, self.confidence)

    def ready_to_grow(self) -> None:
        """Readies the draft model to grow dynamic trees (:meth:`draft_tree`): the tree
        verifier's hooks on its layers (:func:`~mlx_specstream.streams.attach_verifier`).

        Raises:
            ValueError: its layers' caches are not ``KVCache``s or sliding windows'
              (attention chunks, a sparse attention's lists), or it carries streams or a
              drafter of its own.
        """
        from .streams import attach_verifier  # (streams imports the drafters' modules)

        bad = sorted({type(c).__name__ for c in self.cache if type(c) not in GROWING_CACHES})
        if bad:
            raise ValueError(
                "dynamic_tree=True with draft_model: the draft model grows its trees in "
                "layers with a KVCache or a sliding window each (no attention chunks or "
                f"sparse attention); it has {bad}."
            )
        rt = getattr(self.model, "speculative_streams", None)
        if rt is None:
            attach_verifier(self.model)
        elif rt.streams is not None or rt.drafter is not None:
            raise ValueError(
                "dynamic_tree=True with draft_model: the draft model carries streams or a drafter "
                "of its own; pass it as mlx_lm.load gives it."
            )

    def draft_tree(self, accepted: List[int], token: int, vocab_size: int, k: int, depth: int,
                   drawn=None):  # fmt: skip
        """The candidates of a dynamic tree rooted at ``token`` (EAGLE-2's, grown by the
        draft model: :func:`~mlx_specstream.dynamic_tree.grow`), ``k`` wide and
        ``depth`` levels deep; ``drawn`` ``(budgets, probs)``: a drawn tree's
        (:func:`~mlx_specstream.dynamic_tree.grow_drawn`), each node's distribution
        ``probs`` of its log-probabilities. ``accepted``, ``token``: as :meth:`draft`.

        Feeds the new context (its last row gives level 1), then one pass per deeper
        level over the ``k`` best nodes of the level above, each row at its level's
        position and seeing the context and its own ancestors' rows
        (:meth:`~mlx_specstream.streams.StreamRuntime.masked_pass`); those rows are
        trimmed after, so the cache holds the context alone.
        """
        return self._grow(self.unfed + list(accepted[1:]) + [token], vocab_size, k, depth, drawn)

    def first_tree(self, vocab_size: int, k: int, depth: int, drawn=None):
        """:meth:`draft_tree`'s candidates after the prompt, whose last token waits."""
        return self._grow(list(self.unfed), vocab_size, k, depth, drawn)

    def _grow(self, new: List[int], vocab_size: int, k: int, depth: int, drawn):
        rt = self.model.speculative_streams  # (attached by the caller: attach_verifier)
        self._trim_to(self.fed)
        first = self._step(mx.array(new))[None]
        self.fed += len(new)
        self.unfed, start = [], self.fed

        def dist(logits):  # (the ranked log-probabilities; a drawn tree's distributions)
            lp = log_softmax(_fit(logits, vocab_size))
            return lp if drawn is None else drawn[1](lp)

        def expand(level, h, tokens, mask):
            pos = mx.full((tokens.shape[0],), start + level - 2, dtype=mx.int32)
            logits = rt.masked_pass(tokens, pos, with_prefix(mask, start), self.cache, level - 1)
            return h, dist(logits)

        out = mx.zeros((1, 1))  # (a draft model keeps no states between levels)
        if drawn is None:
            candidates = grow(out, dist(first), expand, k, depth)
        else:
            candidates = grow_drawn(out, dist(first), expand, k, drawn[0])
        mx.eval(candidates)
        self._trim_to(self.fed)  # (the tree's rows never stay)
        if any(c.offset != self.fed for c in self.cache):  # (a window's trim stops short)
            offsets = [c.offset for c in self.cache]
            raise RuntimeError(f"draft cache not trimmed to its {self.fed} tokens: {offsets}")
        self._forget()
        return candidates

    def _forget(self) -> None:
        """Window layers drop the rows no window after the committed tokens sees (the
        drafts fed after them stay cut as from a ``KVCache``)."""
        for c in self.cache:
            if isinstance(c, WindowKVCache):
                c.forget(self.fed)

    def _step(self, tokens: mx.array) -> mx.array:
        """The logits after ``tokens`` (fed to the cache), float32."""
        return self._feed(tokens)[0, -1].astype(mx.float32)

    def _feed(self, tokens: mx.array) -> mx.array:
        logits = self.model(tokens[None], cache=self.cache)
        if self.quant is not None:
            self.quant.maybe_quantize(self.cache)
        return logits

    def _trim_to(self, n: int) -> None:
        offset = self.cache[0].offset
        if offset > n:
            for c in self.cache:
                c.trim(offset - n)
        self.drafts = None

    def hold(self, history: List[int], start: int, end: int) -> None:
        """Leaves the cache holding the first ``end`` tokens, as the base's:
        ``history`` is the context from position ``start`` on."""
        self._trim_to(min(self.fed, end))
        self.fed = min(self.fed, end)
        self.unfed = []
        if end > self.fed:
            self._feed(mx.array(history[self.fed - start : end - start]))
            self.fed = end
        self._forget()
        mx.eval([c.state for c in self.cache])

    def rewind(self, n: int) -> None:
        """Keeps at most ``n`` tokens (a failed generation)."""
        self._trim_to(min(self.fed, n))
        self.fed, self.unfed = min(self.fed, n), []


def grows_trees(draft_model: nn.Module) -> bool:
    """Whether ``draft_model``'s layers can grow dynamic trees (:meth:`DraftModel.draft_tree`):
    each attends to a ``KVCache`` or a sliding window, none to attention chunks or a sparse
    attention's lists (a model with recurrent layers verifies chains: the caller's check)."""
    return all(type(c) in GROWING_CACHES for c in model_caches(draft_model, bounded=True))


def _fit(logits: mx.array, vocab_size: int) -> mx.array:
    """``(k, V')`` logits over ``vocab_size`` tokens: cut, or padded with ``-inf``."""
    V = logits.shape[-1]
    if V >= vocab_size:
        return logits[:, :vocab_size]
    pad = mx.full((logits.shape[0], vocab_size - V), -mx.inf, dtype=logits.dtype)
    return mx.concatenate([logits, pad], axis=-1)


def draft_model_tree(num_draft_tokens: int, tree_top_k=None, max_tree_nodes=None):
    """The tree settings ``(ks, depth, prune_threshold, max_nodes)`` of a draft
    model's drafts: ``num_draft_tokens`` levels, ``tree_top_k`` per level (default
    1: mlx-lm's chain), every node kept unless ``max_tree_nodes`` caps them.

    Example:
        >>> draft_model_tree(3)
        ([1, 1, 1], 3, 0.0, 4)
        >>> draft_model_tree(2, tree_top_k=[2])
        ([2, 1], 2, 0.0, 5)
    """
    k = num_draft_tokens
    if tree_top_k is None:
        ks = [1] * k
    elif isinstance(tree_top_k, int):
        ks = [tree_top_k] * k
    else:
        ks = list(tree_top_k) + [1] * (k - len(tree_top_k))
    if len(ks) != k or any(not isinstance(x, int) or x < 1 for x in ks):
        raise ValueError(
            f"tree_top_k={tree_top_k!r}: need integers >= 1, at most one per draft level "
            f"(num_draft_tokens={k})."
        )
    nodes, width = 1, 1
    for x in ks:
        width *= x
        nodes += width
    if max_tree_nodes is not None:
        if not (isinstance(max_tree_nodes, int) and max_tree_nodes >= 1):
            raise ValueError(f"max_tree_nodes={max_tree_nodes!r} must be an integer >= 1.")
        nodes = min(nodes, max_tree_nodes)
    return ks, k, 0.0, nodes


def split_pair(model: nn.Module, draft_model: nn.Module, prompt_cache: Optional[list]):
    """The model's caches and the draft model's from one reused ``prompt_cache``
    (the model's layers first, as mlx-lm keeps them); ``(None, None)`` for none.

    Raises:
        ValueError: the cache does not hold both models' layers.
    """
    if prompt_cache is None:
        return None, None
    # (a cache per layer, or fewer where layers share keys and values: Gemma 4's)
    n, nd = len(make_prompt_cache(model)), len(make_prompt_cache(draft_model))
    if len(prompt_cache) != n + nd:
        raise ValueError(
            f"prompt_cache holds {len(prompt_cache)} caches; with draft_model it must hold the "
            f"model's {n} followed by the draft model's {nd} (mlx_lm.models.cache."
            "make_prompt_cache(model) + make_prompt_cache(draft_model))."
        )
    return list(prompt_cache[:n]), list(prompt_cache[n:])


def split_prompt_cache(model: nn.Module, draft_model: nn.Module, prompt_cache):
    """The model's caches and the draft model's: a reused ``prompt_cache`` holds
    both, the model's layers first (as mlx-lm's draft-model decoding keeps them).

    Raises:
        ValueError: the cache does not hold both, or the two hold different tokens.
    """
    if prompt_cache is None:
        return None, model_caches(draft_model, bounded=True)
    base, draft = split_pair(model, draft_model, prompt_cache)
    ok = (KVCache, QuantizedKVCache, WindowKVCache, ChunkKVCache)  # (the last two: ours)
    bad = sorted({type(c).__name__ for c in draft if type(c) not in ok})
    if bad:
        raise ValueError(
            f"prompt_cache: the draft model's layers need a KVCache (or QuantizedKVCache) each, "
            f"got {bad}."
        )
    if draft[0].offset != base[0].offset:
        raise ValueError(
            f"prompt_cache: the draft model's layers hold {draft[0].offset} tokens, the model's "
            f"{base[0].offset}; they must hold the same tokens."
        )
    return base, draft

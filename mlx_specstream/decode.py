"""The decode loop: each step runs one forward pass that verifies the previous
draft tree and, with streams, drafts the next one.

A step has two halves. :meth:`Decoder.launch` builds the pass over the tree,
the acceptance walk and the next draft's tokens as one lazy graph and starts
it with ``mx.async_eval``. :meth:`Decoder.finish` reads the host once (the
accepted node and the tokens), compacts the KV caches to the accepted path and
names the next tree. The generator launches step ``k + 1`` before it yields
step ``k``'s tokens, so the caller's detokenizing overlaps the device's work,
as in mlx-lm's ``generate_step``.

Pipelined (the default on a GPU, where the device would otherwise wait while
the host reads a step and builds the next): step ``k + 1`` is launched before step ``k``'s host read,
from the tree step ``k`` drafted on the device. Its pass first moves step
``k``'s accepted rows into place in every cache, then writes its own after
them, at an offset only the device knows (:class:`~mlx_specstream.cache.FoldingCache`),
so the host builds one step while the device runs the previous one.
"""

from dataclasses import dataclass
from typing import Callable, Generator, List, Optional, Tuple, Union

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from .cache import (
    ChunkKVCache,
    KVCacheList,
    appended_rows,
    adopt_kv_lists,
    cache_arrays,
    Fold,
    KVQuantizer,
    WindowKVCache,
    check_cache,
    commit_path,
    drafter_state_of,
    forget_past_windows,
    keep_drafter_state,
    model_caches,
    refuse_quantized_windows,
    window_rows,
)
from .config import DRAFTS, VerifierConfig
from .draft_confidence import (
    chain_confidence,
    chain_refusal,
    check_draft_confidence,
    confident_levels,
    own_cut,
    top_probabilities,
)
from .draft_model import DraftModel, draft_model_tree, split_pair, split_prompt_cache
from .draft_schedule import check_draft_schedule
from .dynamic_tree import draft_tree, drawn_tree, level_budgets
from .layout import TreeLayout, layout_of
from .model_parts import vocab_size
from .ngram import NGRAM_DRAFT_TOKENS, NgramIndex, device_lookup
from .precision import on_gpu, warn_if_tf32
from .recurrent import (
    DraftModelChain,
    attends,
    chain_generate_step,
    has_recurrent_layers,
    tree_refusal,
)
from .sample_utils import DistributionSampler
from .settings import (
    ACCEPTANCE,
    apply_processors,
    check_prompt,
    default_acceptance,
    dynamic_tree_setting,
    greedy,
    resolve_tree_settings,
)
from .streams import StepOutput, StreamRuntime, attach_chain_verifier, attach_verifier, get_runtime
from .support import tree_on_chains_refusal
from .tree import (
    DraftTree,
    accept,
    accept_by_rejection,
    certified_argmax,
    depth_limited,
    gumbel_top_k,
    merge_chains,
    path_to,
    StaticTree,
    static_tree,
    subtree_parents,
    top_k_desc,
)

__all__ = ["ACCEPTANCE", "DRAFTS", "Decoder", "spec_generate_step", "check_prompt"]


@dataclass
class Draft:
    """A tree to verify: its layout and its tokens (a host list, or a device
    array drafted by the previous step and never read on the host)."""

    layout: TreeLayout
    tokens: Union[List[int], mx.array]
    q: Optional[mx.array] = None  # rejection: (levels, V) draft distributions
    q_rows: Optional[List[int]] = None  # rejection, a drawn tree: each node's row of q


@dataclass
class Pending:
    """A launched step, until its host read."""

    draft: Draft
    prefix: int  # committed rows at launch (pipelined: before the step it follows)
    out: StepOutput
    tokens: mx.array  # (R,) tokens of the kept nodes
    logprobs: Optional[mx.array]  # (R, V); None when certified targets made it unneeded
    logits: Optional[mx.array] = None  # (R, V) after the logits processors
    certified: Optional[mx.array] = None  # (R,) the targets are surely mlx-lm's argmax
    targets: Optional[mx.array] = None  # (R,) target token after each node
    last: Optional[mx.array] = None  # the deepest accepted node
    top: Optional[mx.array] = None  # (depth, k) next draft tokens per level, best first
    next_tokens: Optional[mx.array] = None  # (T,) the next static tree's tokens, root first
    next_tree: Optional[DraftTree] = None  # the next dynamic tree (a drafter's, on the host)
    path: Optional[mx.array] = None  # pipelined: the padded path to ``last`` (paths_mx row)
    depth: Optional[mx.array] = None  # pipelined: the depth of ``last``
    probs: Optional[mx.array] = None  # rejection: (R, V) target distributions
    uniforms: Optional[mx.array] = None  # rejection: (R + 1,) the walk's coins
    draws: Optional[tuple] = None  # rejection: every node's next (q, draw order)
    sure: Optional[mx.array] = None  # draft_confidence: the next chain's top probabilities

    def logprobs_row(self, node: int) -> mx.array:
        """Node ``node``'s log-probabilities (lazy, on its own, when the step did not
        compute every node's)."""
        if self.logprobs is not None:
            return self.logprobs[node]
        return _log_softmax(self.logits[node])


class Decoder:
    """One generation's state: the caches, the settings and the token history.

    Args:
        rt (StreamRuntime): the model's runtime.
        cache (list): the KV caches, holding the prompt but its last token.
        history (list): the prompt tokens.
        sampler, processors: mlx-lm sampler and logits processors.
        tree (tuple): ``(ks, depth, prune_threshold, max_nodes)``.
        tree_nodes (int, optional): the cap of the model's own tree, where a tree
          with prompt lookup merged in may hold more (``max_nodes``). Default: ``max_nodes``.
        acceptance (str): one of :data:`ACCEPTANCE`.
        draft (str, optional): ``None`` (the model's streams or drafter),
          ``"ngram"`` or ``"streams+ngram"``.
        ngram_tokens (int): the longest prompt-lookup draft.
        max_tokens (int): tokens to generate, ``-1`` for no limit.
        ngram_candidates (int): prompt-lookup drafts merged into each tree
          (:meth:`~mlx_specstream.ngram.NgramIndex.drafts`).
        pipeline (bool, optional): launch each step before the previous one's
          host read (``None``: as the model's config says, else on a GPU;
          either only where the settings allow it).
        dynamic (bool): the drafter grows each tree from its own drafts
          (:mod:`mlx_specstream.dynamic_tree`) instead of filling the static tree.
        confidence (float, optional): each chain stops after a draft its drafter gives
          less than this probability (``draft_confidence``; a host read a chain).
    """

    def __init__(self, rt, cache, history, sampler, processors, tree, acceptance, draft,
                 ngram_tokens, max_tokens, dstate=None, quant=None, pipeline=None,
                 draft_model=None, ngram_candidates=1, tree_nodes=None,
                 dynamic=False, confidence=None):  # fmt: skip
        self.rt, self.cache, self.history = rt, cache, history
        self.quant = quant
        self.sampler, self.processors = sampler, processors
        ks, self.depth, self.threshold, self.max_nodes = tree
        self.by_rejection = acceptance == "rejection" and not getattr(sampler, "greedy", True)
        # draft_confidence: the next chain's real levels (None: all), read with its drafts
        self.confidence, self.drafted = confidence, None
        self.verified = 0  # a draft model's levels in the tree launched last (draft_schedule)
        self.draft = draft
        self.ngram_tokens = min(ngram_tokens, self.max_nodes - 1)
        self.ngram_candidates = ngram_candidates
        self.max_tokens, self.dstate = max_tokens, dstate
        self.draft_model = draft_model  # a DraftModel drafting instead of the model's own
        own = self.depth > 0 and draft_model is None
        self.streams = own and rt.drafter is None  # drafts from this pass's streams
        # Medusa heads draft from the accepted node's state alone: on the device too.
        self.heads = own and getattr(rt.drafter, "drafts_from_last_node", False)
        # Shared-mode main rows read their streams; lossless ones only when fused.
        self.all_streams = rt.streams is not None and not (
            rt.split_streams or (rt.config.mode == "lossless" and not self.streams)
        )
        # Stream logits of every node from the pass's own head call: one read of
        # the head's weights per step, where reads cost more than rows (GPUs). On a
        # CPU the extra rows often cost more (benchmarks/RESULTS.md): the accepted
        # node's streams go through the head on their own, unless the tuner said.
        in_pass = rt.stream_logits_in_pass
        in_pass = on_gpu() if in_pass is None else in_pass
        self.head_on_streams = self.streams and self.all_streams and in_pass
        # Rejection sampling: the next drafts drawn at every node before the walk
        # (one host read) where every node's draft logits come cheaply: the pass's
        # own stream logits, or Medusa heads, where rows cost little (a GPU).
        self.draws_at_every_node = (
            self.by_rejection
            and confidence is None  # (a cut reads the accepted node's chain)
            and (self.head_on_streams or (self.heads and in_pass))
        )
        self.tree_nodes = tree_nodes or self.max_nodes  # (the own tree's, below a merged one's)
        self.dynamic = dynamic and self.depth > 0
        if self.depth:
            self.tree = static_tree(ks, self.depth, self.tree_nodes)
            self.layout = layout_of(self.tree.parents)
            self.kmax = max(ks[: self.depth])
            self._levels = mx.array(self.tree.levels[1:], dtype=mx.int32)
            self._ranks = mx.array(self.tree.ranks[1:], dtype=mx.int32)
        # The levels a drafter drafts: those its tree holds (fewer where max_nodes caps).
        self.levels = max(self.tree.levels) + 1 if self.depth else 0
        self.emitted = self.passes = 0
        why_not = self._why_not_pipelined()
        if pipeline and why_not:
            raise ValueError(f"pipeline=True: {why_not}")
        if pipeline is None:  # the tuner's stored choice, else the device's default
            preferred = getattr(rt.config, "pipeline", None)
            pipeline = (on_gpu() if preferred is None else preferred) and not why_not
        self.pipelined = bool(pipeline)
        # Greedy and unpipelined: each node's target is its logits' argmax, certified
        # to be the argmax of its log-softmax (tree.certified_argmax); the log-softmax
        # of every node, most of a CPU step's elementwise work, runs only when a
        # certificate on the accepted path fails (finish).
        self.certify = not (self.pipelined or self.by_rejection) and (
            sampler is greedy or (isinstance(sampler, DistributionSampler) and sampler.greedy)
        )
        # Prompt lookup: a host index of the history, or pipelined, the history on
        # the device and a fixed chain of drafts (None: no n-gram drafts).
        self.ngrams = self.device_history = None
        if self.pipelined and draft == "ngram":
            self.layout = layout_of([-1] + list(range(self.ngram_tokens)))
            # (uint32, as the targets' argmax: no casts between them and the history)
            self.device_history = (mx.array(history, dtype=mx.uint32), mx.array(len(history)))
        elif draft in ("ngram", "streams+ngram"):
            self.ngrams = NgramIndex(history, candidates=ngram_candidates)

    def _why_not_pipelined(self) -> Optional[str]:
        """Why the next tree cannot be launched before this step's host read (None: it can)."""
        if not (self.streams or self.heads or self.draft == "ngram"):
            return (
                "only trees drafted on the device are pipelined: the model's streams, Medusa "
                "heads, or prompt lookup alone (draft='ngram')."
            )
        if self.draft == "streams+ngram" or self.processors or self.by_rejection:
            return (
                "draft='streams+ngram', logits processors and acceptance='rejection' read the "
                "host before the next tree exists."
            )
        if self.ngram_candidates > 1:
            return "several prompt-lookup drafts (ngram_candidates > 1) are merged on the host."
        if self.confidence is not None:
            return "draft_confidence reads each chain's probabilities on the host."
        if self.streams and (not self.all_streams or self.threshold > 0):
            return "the split stream pass and pruning (prune_threshold > 0) read the host mid-step."
        if self.quant is not None or any(
            type(c) not in (KVCache, WindowKVCache, ChunkKVCache, KVCacheList) for c in self.cache
        ):
            return "only plain KVCache layers are pipelined (no kv_bits, no max_kv_size)."
        return None

    # ---- one step ---------------------------------------------------------------
    def launch(self, draft: Draft, after: Optional[Pending] = None) -> Pending:
        """Starts the pass over ``draft`` and, on the device, the acceptance walk
        (argmax or sampled targets) and the next draft's tokens. Pipelined,
        ``after`` is the launched step not yet read that drafted ``draft``."""
        rt, prefix = self.rt, self.cache[0].offset
        fold = None
        if after is not None:  # its accepted path, as the device knows it
            layout, rows = after.out.layout, after.out.rows
            moves = None
            if not layout.is_chain:  # where each row goes: one row of the fold table
                table = layout.fold_table(max(map(appended_rows, rows)))
                moves = mx.take(table, after.last, axis=0)
            fold = Fold(prefix, after.depth + 1, after.path, rows, layout.is_chain, moves)
        tokens = draft.tokens
        tokens = mx.array(tokens, dtype=mx.int32) if isinstance(tokens, list) else tokens
        out = rt.forward(
            tokens, draft.layout, self.cache, self.threshold, self.all_streams,
            stream_logits=self.head_on_streams, pipelined=self.pipelined, fold=fold,
        )  # fmt: skip
        self.passes += 1
        if len(out.kept) < len(draft.layout):  # pruned: gather the surviving nodes
            tokens = mx.take(tokens, mx.array(out.kept))
        logits = out.logits
        if self.processors:  # per-node histories: the tokens go to the host
            logits = apply_processors(
                self.processors, self.history, tokens.tolist(), out.kept_parents, logits
            )
        certify = self.certify and logits.dtype == mx.float32
        logprobs = None if certify else _log_softmax(logits)
        p = Pending(draft, prefix, out, tokens, logprobs, logits)
        if self.by_rejection:  # walked on the host by finish()
            self._launch_rejection(p)
            return p
        if certify:
            p.targets, p.certified = _certified_argmax(logits)
        else:
            p.targets = self.sampler(logprobs)
        self._walk(p)
        if self.pipelined:  # the accepted path on the device, for the next pass and lookup
            p.path = mx.take(out.layout.paths_mx, p.last, axis=0)
            p.depth = mx.take(out.layout.depth_mx, p.last)
        if self.streams or self.heads:
            slog = self._stream_logits(out, p.last) if self.streams else self._heads_logits(out, p)
            p.top, p.next_tokens = self._draft_tokens(slog, p.targets[p.last])
            if self.confidence is not None:  # (read with the step, to cut the chain)
                p.sure = top_probabilities(slog[: self.levels])
        elif self.device_history is not None:
            p.next_tokens = self._lookup_on_device(p)
        arrays = (p.tokens, p.logprobs, p.targets, p.certified, p.last, p.next_tokens, p.sure)
        mx.async_eval([a for a in arrays if a is not None])
        return p

    def launch_ahead(self, p: Pending) -> Optional[Pending]:
        """Pipelined: launches the tree ``p`` drafted before ``p``'s host read
        (``None`` when not pipelined, or when ``p`` surely ends the generation)."""
        if not self.pipelined or 0 <= self.max_tokens <= self.emitted + 1:
            return None
        return self.launch(Draft(self.layout, p.next_tokens), after=p)

    def finish(self, p: Pending, folded: bool = False) -> Tuple[List[tuple], Optional[Draft]]:
        """The step's host read: the accepted path and the token after it. Then
        the caches keep that path only, and the next tree is chosen.

        Args:
            p (Pending): the launched step.
            folded (bool): a pipelined pass launched after ``p`` moves its
              accepted rows into place; only the offsets are set here.

        Returns:
            tuple: the new ``(token, logprobs row, from_draft)`` triples and the
            next :class:`Draft` (``None`` when ``max_tokens`` is reached).
        """
        out, parents = p.out, p.out.kept_parents
        if self.by_rejection:
            path, token, q = self._walk_by_rejection(p)
        else:
            # The step's one host read (greedy, "target-sample"): arrays the launch
            # already evaluated, so indexing on the host adds no device work.
            last = p.last.item()
            path = path_to(last, parents)
            if p.certified is not None:  # a failed certificate on the path: walk again
                certified = p.certified.tolist()
                if not all(certified[a] for a in path):
                    last = self._uncertified(p)
                    path = path_to(last, parents)
            token, q = p.targets.tolist()[last], None
            if p.sure is not None and p.next_tokens is not None:  # (the streams' chain, cut)
                self.drafted = confident_levels(p.sure.tolist(), self.confidence)
            self._observe(path)
        tokens = p.tokens.tolist()
        # Pipelined passes leave the offsets at the committed prefix: set them here.
        prefix = self.cache[0].offset if self.pipelined else p.prefix
        if self.pipelined:
            for c, rows in zip(self.cache, p.out.rows):
                c.offset = prefix + (len(path) if folded else appended_rows(rows))
        if not folded:
            commit_path(
                self.cache,
                prefix,
                [path if i >= self.rt.first_top else [out.kept[a] for a in path]
                 for i in range(self.rt.num_layers)],
            )  # fmt: skip
        if self.quant is not None:
            self.quant.maybe_quantize(self.cache)
        new = [(tokens[a], p.logprobs_row(parents[a]), True) for a in path[1:]]
        new.append((token, p.logprobs_row(path[-1]), False))
        if self.max_tokens >= 0:
            new = new[: self.max_tokens - self.emitted]
        self.emitted += len(new)
        self.history.extend(t for t, _, _ in new)
        if self.ngrams is not None:
            self.ngrams.extend(t for t, _, _ in new)
        # An attached drafter drafts from the accepted path (also after the last
        # step, so its context follows the cache into the next call; a draft
        # model's cache catches up when the call ends: DraftModel.hold).
        done = self.emitted == self.max_tokens
        drafter = self.dstate is not None or (self.draft_model is not None and not done)
        if drafter and not (self.by_rejection or self.heads):
            path_tokens = [tokens[a] for a in path]
            if self.dynamic:
                p.next_tree, _ = self._dynamic_tree(out, path, path_tokens, token)
            else:
                slog = self._drafter_logits(out, path, path_tokens, token)
                p.top, p.next_tokens = self._draft_tokens(slog, mx.array(token))
        if done:
            return new, None
        if folded:  # already launched: the whole tree the device drafted
            return new, Draft(self.layout, p.next_tokens)
        if p.next_tree is not None:
            return new, self._grown_draft(p.next_tree, q)
        return new, self._next_draft(p.next_tokens, token, q)

    def _uncertified(self, p: Pending) -> int:
        """A certificate on the accepted path failed: the targets again, from the full
        log-softmax as mlx-lm's sampler takes them, and the walk with them. The
        drafts made from the certified walk are dropped (the next tree is its
        root, and any n-gram chain). Returns the accepted node."""
        p.logprobs = _log_softmax(p.logits)
        p.targets = self.sampler(p.logprobs)
        self._walk(p)
        mx.eval(p.targets, p.last)
        p.certified = p.top = p.next_tokens = None
        return p.last.item()

    def _observe(self, path: List[int]) -> None:
        """A draft model's ``draft_schedule`` learns how many of the levels it drafted
        for this step were accepted (``path``: the accepted nodes, root first)."""
        if self.draft_model is not None and self.verified:  # (a path down a merged lookup
            # chain counts as deep as it goes, up to the draft model's levels)
            self.draft_model.length.update(min(len(path) - 1, self.verified), self.verified)
        self.verified = 0

    @staticmethod
    def _walk(p: Pending) -> None:
        """The acceptance walk over ``p``'s targets, on the device (sets ``p.last``)."""
        layout = p.out.layout
        _, p.last = _accept(
            p.tokens, layout.parents_mx, layout.ancestors_mx, p.targets, layout.depth_mx
        )

    def first_draft(self, root: int) -> Draft:
        """The first tree: the prompt's last token, and an n-gram chain after it; with
        a draft model, its drafts after the prompt too (as mlx-lm's loop drafts)."""
        if self.device_history is not None:
            draft, _ = device_lookup(*self._history_room(), self.ngram_tokens)
            return Draft(self.layout, mx.concatenate([mx.array([root], dtype=draft.dtype), draft]))
        if self.draft_model is not None and self._room() > 0:
            if self.dynamic:  # (grown after the prompt, as every step's)
                return self._grown_draft(*self._dynamic_tree(None, None, None, root))
            slog = self.draft_model.first_draft(vocab_size(self.rt.model))
            if self.by_rejection:  # drawn from the draft distributions, as every step's
                q, top = self._draw_now(slog)
                return self._next_draft(self._tree_tokens(root, top), root, q)
            return self._next_draft(self._draft_tokens(slog, mx.array(root))[1], root, None)
        return self._lookup_draft(root, self._lookup(self._room()))

    def _room(self) -> int:
        """How many draft levels the next tree may have: fewer near ``max_tokens``."""
        room = self.max_nodes - 1
        if self.max_tokens >= 0:
            room = min(room, self.max_tokens - self.emitted - 1)
        cap = None if self.quant is None else self.quant.max_tree_depth(self.cache)
        return room if cap is None else min(room, cap)

    # ---- drafts -------------------------------------------------------------------
    def _lookup(self, room: int) -> List[List[int]]:
        """The prompt-lookup chains for the next tree (none without n-gram drafts)."""
        if self.ngrams is None:
            return []
        return [c for c in self.ngrams.drafts(min(self.ngram_tokens, room)) if c]

    def _history_room(self):
        """The device history and its length, its buffer grown (and kept) to hold
        every token the steps in flight may add and a draft after them."""
        history, length = self.device_history
        need = len(self.history) + 4 * (self.ngram_tokens + 1)
        if history.shape[0] < need:
            history = mx.concatenate([history, mx.zeros(need + 1024, dtype=history.dtype)])
            self.device_history = history, length
        return history, length

    def _lookup_on_device(self, p: Pending) -> mx.array:
        """Pipelined prompt lookup: appends ``p``'s accepted drafts and bonus token
        to the device history, then the next chain's tokens (root first)."""
        history, length = self._history_room()
        bonus = mx.take(p.targets, p.last)
        history, length, chain = _extend_and_lookup(
            history, length, p.tokens, p.depth, bonus, self.ngram_tokens
        )
        self.device_history = history, length
        return chain

    def _stream_logits(self, out: StepOutput, node: mx.array) -> mx.array:
        """``(gamma, V)`` logits of the streams of kept node ``node``, in the model's
        dtype (a draft's tokens are their order: no cast to float32 on the device)."""
        if out.stream_logits is not None:  # computed by the pass's own head
            slog = mx.take(out.stream_logits, node, axis=0)
        elif self.all_streams:
            slog = self.rt.head(mx.take(out.stream_hidden, node, axis=0)[None], draft=True)[0]
        else:
            slog = self.rt.draft_streams(node, self.cache)
        return slog

    def _heads_logits(self, out: StepOutput, p: Pending) -> mx.array:
        """``(levels, V)`` logits of the Medusa heads the tree reads, at the accepted node
        (on the device)."""
        return self.rt.drafter.draft_at(self.rt, out.hidden, p.last, max(1, self.levels))

    def _drafter_logits(self, out, path, path_tokens, token) -> mx.array:
        """``(levels, V)`` logits of the next chain or static tree's levels, from the draft
        model or the attached drafter; with ``draft_confidence``, :attr:`drafted` says how
        many are real (a drafter that drafts level by level stops there; the rest repeat
        the last, as a draft model's do)."""
        if self.draft_model is not None:
            return self.draft_model.draft(path_tokens, token, out.logits.shape[-1])
        drafter, levels = self.rt.drafter, max(1, self.levels)
        cut = own_cut(drafter, self.confidence)  # (level by level: it stops at an unsure one)
        draft = drafter.draft(self.rt, self.dstate, out.hidden, path, path_tokens, token,
                              levels=levels, **cut).astype(mx.float32)  # fmt: skip
        return self._cut(draft, draft.shape[0] if cut else None)

    def _cut(self, slog: mx.array, drafted: Optional[int] = None) -> mx.array:
        """With ``draft_confidence``: sets :attr:`drafted` from the chain's logits ``slog``
        ``(L, V)`` (a host read; ``drafted``: the levels a drafter that cut its own chain
        kept) and cuts or pads them to the tree's levels (with the last)."""
        if self.confidence is None:
            return slog
        slog = slog[: self.levels]  # (a stream past the tree's levels drafts nothing)
        if drafted is None:
            drafted = confident_levels(top_probabilities(slog).tolist(), self.confidence)
        self.drafted = drafted
        if slog.shape[0] < self.levels:
            slog = mx.concatenate([slog] + [slog[-1:]] * (self.levels - slog.shape[0]))
        return slog

    def _dynamic_tree(self, out, path, path_tokens, token: int):
        """The drafter's dynamic tree rooted at ``token``, no deeper than the next
        tree may be (one level where none may: the drafter's context still grows).
        Sampling by rejection, a drawn one (:func:`~mlx_specstream.dynamic_tree.grow_drawn`,
        each level as wide as the static tree's) with its draft distributions and each
        node's row of them; else ``None`` for those."""
        depth = max(1, min(self.depth, self._room(), self.tree_nodes - 1))
        if self.draft_model is not None:  # (as long as its schedule says: draft_schedule)
            depth = self.verified = min(depth, self.draft_model.length.now)
        drawn = None
        if self.by_rejection:
            drawn = (level_budgets(self.kmax, depth, self.tree_nodes), self.sampler.probs)
        if self.draft_model is not None:  # (out None: the first tree, after the prompt)
            V = vocab_size(self.rt.model)
            if out is None:
                candidates = self.draft_model.first_tree(V, self.kmax, depth, drawn)
            else:
                candidates = self.draft_model.draft_tree(path_tokens, token, V, self.kmax, depth,
                                                         drawn)  # fmt: skip
        else:
            candidates = self.rt.drafter.draft_tree(
                self.rt, self.dstate, out.hidden, path, path_tokens, token, self.kmax, depth, drawn
            )
        if drawn is None:
            return draft_tree(candidates, token, self.tree_nodes), None
        tree, q, rows = drawn_tree(candidates, token, self.kmax)
        return tree, (q, rows)

    def _grown_draft(self, tree: DraftTree, q=None) -> Draft:
        """The next tree from a dynamic one, with any n-gram chains merged in (the
        lookup alone where no draft level fits); ``q``: a drawn tree's distributions
        and each node's row of them."""
        room = self._room()
        chains = self._lookup(room)
        if room <= 0:
            self.verified = 0
            return self._lookup_draft(tree.tokens[0], chains)
        if q is not None:  # (rejection: no lookup chains)
            return Draft(layout_of(tree.parents), tree.tokens, *q)
        if chains:
            return self._merged(tree.tokens, tree.parents, chains)
        return Draft(layout_of(tree.parents), tree.tokens)

    def _draft_tokens(self, slog: mx.array, root: mx.array):
        """Per-level top-k and the static tree's tokens under ``root``, on the device
        (ranked by logits: normalizing would not change the order)."""
        top = top_k_desc(slog[: self.depth], self.kmax)
        # A chain's drafts are its levels' first choices in order: a view, no gather.
        drafts = top[: len(self._levels), 0] if self.kmax == 1 else top[self._levels, self._ranks]
        return top, mx.concatenate([root.reshape(1), drafts])

    def _next_draft(self, next_tokens, token: int, q) -> Draft:
        """The next tree, rooted at ``token``: the static tree's ``next_tokens``
        (``None``: none), an n-gram chain, or both merged; shallower near
        ``max_tokens``. ``q``: the distributions ``next_tokens`` were drawn from."""
        room = self._room()
        depth = min(self.depth, room) if next_tokens is not None else 0
        if self.draft_model is not None:  # (a chain stopped where the draft model was unsure)
            depth = self.verified = min(depth, self.draft_model.drafted)
        elif self.drafted is not None:  # (where its drafter was: draft_confidence)
            depth = min(depth, self.drafted)
        chains = self._lookup(room)
        if depth and q is not None:  # rejection: tokens drawn on the host
            return self._restrict(Draft(self.layout, next_tokens, q), depth)
        if depth and not chains:
            return self._restrict(Draft(self.layout, next_tokens), depth)
        if not depth:
            return self._lookup_draft(token, chains)
        tokens = next_tokens.tolist()  # streams + n-gram: merged on the host
        keep = depth_limited(self.tree.parents, depth)
        return self._merged([tokens[i] for i in keep], subtree_parents(self.tree.parents, keep),
                            chains)  # fmt: skip

    def _merged(self, tokens: List[int], parents: List[int], chains: List[List[int]]) -> Draft:
        """The tree of ``tokens`` and ``parents`` with the n-gram ``chains`` merged in,
        under the node cap."""
        merged = merge_chains(tokens, parents, chains, self.max_nodes)
        return Draft(layout_of(merged.parents), merged.tokens)

    def _lookup_draft(self, root: int, chains: List[List[int]]) -> Draft:
        """The tree of prompt-lookup drafts alone: a chain, or several merged."""
        if len(chains) > 1:
            return self._merged([root], [-1], chains)
        chain = chains[0] if chains else []
        return Draft(layout_of([-1] + list(range(len(chain)))), [root] + chain)

    def _restrict(self, draft: Draft, depth: int) -> Draft:
        if depth == self.depth:
            return draft
        keep = depth_limited(self.tree.parents, depth)
        tokens = draft.tokens
        tokens = [tokens[i] for i in keep] if isinstance(tokens, list) else tokens[mx.array(keep)]
        return Draft(layout_of(subtree_parents(self.tree.parents, keep)), tokens, draft.q)

    # ---- sampling by recursive rejection --------------------------------------------
    def _launch_rejection(self, p: Pending) -> None:
        """Starts what the host walk reads: the target distributions, the walk's
        uniforms, the draft distributions the tree was drawn from, and where
        ``draws_at_every_node``, every node's next draws, so the step reads the
        host once."""
        p.probs = self.sampler.probs(p.logprobs)
        p.uniforms = mx.random.uniform(shape=(p.tokens.shape[0] + 1,))
        if self.draws_at_every_node:
            out = p.out
            slog = (
                out.stream_logits
                if self.streams
                else self.rt.drafter.draft_rows(self.rt, out.hidden, max(1, self.levels))
            )
            p.draws = self._draw(slog)
        arrays = [p.probs, p.uniforms, p.draft.q] + list(p.draws or ())
        mx.async_eval([a for a in arrays if a is not None])

    def _draw(self, slog: mx.array):
        """Drafts drawn without replacement from each level's distribution (Gumbel
        top-k): ``(..., levels, V)`` logits give the draft distributions ``q`` and
        the ``(..., levels, kmax)`` tokens in draw order."""
        logprobs = _log_softmax(slog[..., : self.depth, :].astype(mx.float32))
        q = self.sampler.probs(logprobs.reshape(-1, logprobs.shape[-1])).reshape(logprobs.shape)
        return q, gumbel_top_k(q, self.kmax)

    def _walk_by_rejection(self, p: Pending):
        """Recursive rejection sampling on the host, then the next drafts, drawn
        without replacement from the accepted node's streams or drafter: already
        drawn at every node (one host read), else drawn now (a second read)."""
        tokens, parents = p.tokens.tolist(), p.out.kept_parents
        q = None if p.draft.q is None else np.array(p.draft.q)
        path, token = accept_by_rejection(
            tokens, parents, np.array(p.probs), q, np.array(p.uniforms), p.draft.q_rows
        )
        self._observe(path)
        if not self.depth or (self.max_tokens >= 0 and self.emitted + len(path) >= self.max_tokens):
            return path, token, None
        if self.dynamic:  # each node's children drawn from its own distribution
            p.next_tree, q = self._dynamic_tree(p.out, path, [tokens[a] for a in path], token)
            return path, token, q
        last = path[-1]
        if p.draws is not None:
            q, top = p.draws[0][last], np.array(p.draws[1][last])
        else:  # (before the caches are compacted: split passes read the tree rows)
            if self.streams:
                slog = self._cut(self._stream_logits(p.out, mx.array(last)))
            else:
                slog = self._drafter_logits(p.out, path, [tokens[a] for a in path], token)
            q, top = self._draw_now(slog)
        p.next_tokens = self._tree_tokens(token, top)
        return path, token, q

    def _draw_now(self, slog: mx.array):
        """:meth:`_draw`, read to the host: ``q`` and the draws as a numpy array."""
        q, top = self._draw(slog)
        mx.eval(q, top)
        return q, np.array(top)

    def _tree_tokens(self, root: int, top) -> List[int]:
        """The static tree's tokens under ``root``, from per-level draws ``top``
        ``(levels, kmax)`` in draw order (host)."""
        return [root] + [int(top[g, r]) for g, r in zip(self.tree.levels[1:], self.tree.ranks[1:])]


def spec_generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: int = 2048,
    speculative: bool = True,
    tree_top_k: Union[None, int, List[int]] = None,
    tree_depth: Optional[int] = None,
    prune_threshold: Optional[float] = None,
    max_tree_nodes: Optional[int] = None,
    acceptance: Optional[str] = None,
    draft: Optional[str] = None,
    num_draft_tokens: Optional[int] = None,
    ngram_candidates: int = 1,
    draft_model: Optional[nn.Module] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
    max_kv_size: Optional[int] = None,
    pipeline: Optional[bool] = None,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    prompt_checkpoint_callback: Optional[Callable[[list], None]] = None,
    dynamic_tree: Optional[bool] = None,
    draft_confidence: Optional[float] = None,
    draft_schedule: Optional[str] = None,
) -> Generator[Tuple[int, mx.array, bool, int], None, None]:
    """A generator of tokens decoded with Speculative Streaming.

    Each step runs one forward pass over the draft tree, verifies it, and
    drafts the next tree from the streams of the last accepted node. Greedy
    decoding walks the tree while a child carries its parent's argmax; the
    argmax at the last accepted node is the correction (or bonus) token. With
    sampling, ``acceptance`` picks one of two lossless rules (below).

    Args:
        prompt (mx.array): the prompt tokens (at least one).
        model (nn.Module): a model with streams or a drafter attached; with
          ``draft="ngram"`` or ``draft_model``, any supported mlx-lm model. Where
          it (or the draft model) has recurrent layers, drafts are verified as
          chains (:mod:`mlx_specstream.recurrent`; trees, streams and
          ``max_kv_size`` are refused there).
        max_tokens (int): tokens to generate, ``-1`` for no limit. Default: ``256``.
        sampler (Callable, optional): mlx-lm sampler over ``(B, V)`` log
          probabilities. Default: argmax.
        logits_processors (list, optional): mlx-lm logits processors, applied at
          every tree node with that node's own token history.
        prompt_cache (list, optional): a KV cache per layer, updated in place.
          When the generator ends or is closed it holds the earlier tokens, the
          prompt and every yielded token, as mlx-lm's does (its loop feeds each
          token before yielding it): a follow-up call feeds only new tokens.
          The last one, when a step yielded it as its correction or bonus, is
          fed then, in one plain pass.
          An attached ParallelSpec drafter's own context is kept with it
          (:func:`mlx_specstream.cache.keep_drafter_state`).
        prefill_step_size (int): prompt chunk size. Default: ``2048``.
        prompt_progress_callback (Callable[[int, int], None], optional): called
          with (processed, total) prompt tokens as mlx-lm calls it: at 0, after
          each prefill chunk, and at the total once the first token is ready.
        prompt_checkpoint_callback (Callable[[list], None], optional): for a model
          with recurrent layers (whose caches cannot be trimmed back), called
          once the caches hold all but the prompt's last token, with their list
          (the model's layers, then a draft model's), before anything is
          generated; the server keeps a copy, so that a later prompt that
          starts with this one, whatever followed it, is not prefilled again.
          Refused for other models (their caches are trimmed back instead).
        speculative (bool): ``False`` decodes one token per pass (the baseline):
          plain mlx-lm decoding in lossless mode, the same model with its
          streams in shared mode. Default: ``True``.
        tree_top_k, tree_depth, prune_threshold, max_tree_nodes: per-call
          overrides of the model's tree settings.
        dynamic_tree (bool, optional): an EAGLE drafter, an MTP layer (one drafting every
          level) or a ``draft_model`` grows each tree from its own drafts (EAGLE-2's
          dynamic trees, :mod:`mlx_specstream.dynamic_tree`):
          ``tree_top_k`` children for each of the ``tree_top_k`` best nodes of a
          level, ``tree_depth`` levels, the best ``max_tree_nodes`` kept. With
          ``"rejection"``, each node's children are draws from its own distribution
          instead, as many on each level as the static tree has
          (:func:`~mlx_specstream.dynamic_tree.grow_drawn`). Refused for drafts that
          fill static trees. Default
          (``None``): the model's config (``dynamic_tree``), else wherever an EAGLE
          drafter grows them and the tree is wider than a chain; an MTP layer's and a
          draft model's where asked (``True``).
        acceptance (str): how drafts are verified when sampling; both keep the
          model's distribution exactly. ``"target-sample"``: deterministic
          top-k drafts, a target token drawn at every node, walk while a child
          matches. ``"rejection"``: drafts drawn without replacement from the
          stream distributions, verified by recursive rejection sampling over
          siblings; needs a sampler from
          :func:`mlx_specstream.sample_utils.make_sampler` and does not prune
          (a threshold is ignored with a warning); it reads the host once per
          step where every node's draft logits are at hand (the pass's stream
          logits, Medusa heads), else twice. Greedy decoding always walks by
          argmax. Default
          (``None``): ``"rejection"`` when the sampler exposes its
          distribution (a :class:`DistributionSampler`), as it accepts more
          drafts (``benchmarks/RESULTS.md``); otherwise ``"target-sample"``,
          with a warning.
        draft (str, optional): ``"streams"``: the model's streams or drafter.
          ``"ngram"``: prompt lookup only (any model). ``"streams+ngram"``:
          both, merged into one tree under ``max_tree_nodes`` (with an attached
          drafter, its MTP layers or heads: their tree under ``max_tree_nodes``
          and a lookup chain of up to ``num_draft_tokens`` beside it). Default
          (``None``): the source the model's config names (``draft``, stored
          by ``mlx_specstream.tune``), else ``"streams"``. With ``draft_model``:
          ``None`` (its drafts) or ``"ngram"`` (its drafts and a prompt-lookup
          chain of up to 10 tokens, merged into one tree).
        num_draft_tokens (int, optional): the longest prompt-lookup draft
          (default ``10``), or with ``draft_model`` the draft chain's length
          (default ``2``, as mlx-lm's).
        ngram_candidates (int): prompt-lookup drafts per tree: the tokens after
          the latest occurrences of the text's last n tokens, distinct, merged
          into one tree under ``max_tree_nodes`` (default ``1``: the latest
          occurrence's, a chain, as transformers' prompt lookup drafts). More
          raise the tokens per pass where text repeats with variations, and
          cost tree rows; not pipelined, and not on models with recurrent
          layers (chains only).
        draft_model (nn.Module, optional): a small mlx-lm model sharing the
          model's vocabulary that drafts a greedy chain, as in mlx-lm's
          draft-model decoding; ``tree_top_k`` widens each level into a tree,
          and ``max_tree_nodes`` caps it (default: every node, plus 10 for a
          prompt-lookup chain with ``draft="ngram"``). A reused ``prompt_cache``
          then holds the model's layers followed by the draft model's, as
          mlx-lm keeps them.
        draft_confidence (float, optional): each chain (a draft model's, or the model's
          streams' or drafter's: ``tree_top_k`` 1) stops after a draft its drafter gives
          less than this probability (transformers' ``assistant_confidence_threshold``,
          its default 0.4): ``num_draft_tokens`` (a draft model's) or ``tree_depth`` is
          then the longest chain. Levels drafted one after another (a draft model, an MTP
          layer, EAGLE) each read the host once, and stop there; ``0``: uncut. Default:
          ``None``, the model's tuned one (its config's ``draft_confidence``) where the
          drafts are a chain, else uncut (:mod:`mlx_specstream.draft_confidence`).
        draft_schedule (str, optional): how long a ``draft_model``'s chains are
          (transformers' ``num_assistant_tokens_schedule``). ``"constant"`` (the default):
          ``num_draft_tokens`` each. ``"heuristic"``: the first ``num_draft_tokens``
          long, then 2 longer after a step that accepted all its drafts and 1 shorter
          after one that did not, between 1 and ``num_draft_tokens`` (give it a longer cap
          than a fixed chain's, e.g. 8; :mod:`mlx_specstream.draft_schedule`); a grown
          tree's depth follows it too.
        kv_bits, kv_group_size, quantized_kv_start, max_kv_size: mlx-lm's
          KV-cache options. ``kv_bits`` converts the cache at the moments
          mlx-lm does (greedy output equals mlx-lm's with the same options).
          ``max_kv_size`` is accepted only when its window never fills during
          the call (a rotated window cannot be rolled back to a tree path).
        pipeline (bool, optional): launch each step's pass before the host
          reads the previous one, from the tree the device drafted, as
          mlx-lm's loop launches its next token. Needs drafts made on the
          device: the model's own streams (fused stream rows, no pruning),
          Medusa heads, or prompt lookup alone (``draft="ngram"``, then looked up on the
          device as a fixed chain of ``num_draft_tokens``); no logits
          processors, no ``"rejection"`` acceptance and a plain KV cache
          (``True`` with other settings raises). Default (``None``): the model config's
          ``pipeline`` (stored by ``mlx_specstream.tune``), else on when MLX
          runs on a GPU, as on this package's CPU measurements it does not
          pay (``benchmarks/RESULTS.md``); either only where the settings
          allow it.

    Yields:
        tuple: ``(token, logprobs, from_draft, forward_passes)``.
    """
    if draft is not None and draft not in DRAFTS:
        raise ValueError(
            f"draft={draft!r}: choose None (the model's configured drafts) or one of {DRAFTS}"
        )
    if draft_model is not None and draft not in (None, "streams", "ngram"):
        raise ValueError(
            f"draft={draft!r} with draft_model: the model's streams are off; pass None (the "
            "draft model's drafts) or 'ngram' (its drafts and prompt lookup, merged)."
        )
    check_draft_confidence(draft_confidence)
    check_draft_schedule(draft_schedule)
    if draft_schedule == "heuristic" and draft_model is None:
        raise ValueError(
            "draft_schedule='heuristic' sets how long a draft model's chains are (transformers' "
            "num_assistant_tokens_schedule): pass a draft_model, or draft_schedule=None."
        )
    # (a model that took streams or a drafter took the verifier: only a plain base is judged)
    plain_base = getattr(model, "speculative_streams", None) is None
    if (
        has_recurrent_layers(model)
        or (plain_base and tree_refusal(model))
        or (draft_model is not None and has_recurrent_layers(draft_model))
    ):
        lookup_trees = draft in ("ngram", "streams+ngram") and draft_model is None
        lookup_trees = lookup_trees and has_recurrent_layers(model)
        if ngram_candidates != 1 and not lookup_trees:
            raise ValueError(
                f"ngram_candidates={ngram_candidates}: this model's drafts are verified as one "
                "chain (recurrent layers with a draft model, or a model the tree verifier "
                "cannot take: mlx_specstream.recurrent); pass 1."
            )
        yield from _on_chain_model(
            prompt, model, speculative=speculative, draft=draft, draft_model=draft_model,
            tree=(tree_top_k, tree_depth, prune_threshold, max_tree_nodes), acceptance=acceptance,
            pipeline=pipeline, max_tokens=max_tokens, sampler=sampler,
            logits_processors=logits_processors, prompt_cache=prompt_cache,
            prefill_step_size=prefill_step_size, num_draft_tokens=num_draft_tokens,
            kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
            max_kv_size=max_kv_size, prompt_progress_callback=prompt_progress_callback,
            prompt_checkpoint_callback=prompt_checkpoint_callback,
            ngram_candidates=ngram_candidates, dynamic_tree=dynamic_tree,
            draft_confidence=draft_confidence, draft_schedule=draft_schedule,
        )  # fmt: skip
        return
    if prompt_checkpoint_callback is not None:
        raise ValueError(
            "prompt_checkpoint_callback is for models with recurrent layers, whose caches "
            "cannot be trimmed back to a prompt; this model's can (trim_prompt_cache)."
        )
    if draft == "ngram" or draft_model is not None:
        if getattr(model, "speculative_streams", None) is None:
            attach_verifier(model)
    rt = get_runtime(model)
    if draft_model is not None and rt.drafter is not None:
        raise ValueError("draft_model: this model has a drafter attached already; pass one.")
    if draft is None and draft_model is None:  # the source the model's config names (tuned)
        draft = getattr(rt.config, "draft", None)
    draft = None if draft == "streams" else draft  # from here: None = the model's own drafts
    if num_draft_tokens is None:
        num_draft_tokens = NGRAM_DRAFT_TOKENS if draft_model is None else 2
    if not (isinstance(num_draft_tokens, int) and num_draft_tokens >= 1):
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be an integer >= 1.")
    if not (isinstance(ngram_candidates, int) and ngram_candidates >= 1):
        raise ValueError(f"ngram_candidates={ngram_candidates!r} must be an integer >= 1.")
    if ngram_candidates > 1 and draft not in ("ngram", "streams+ngram"):
        raise ValueError(
            f"ngram_candidates={ngram_candidates} is for prompt lookup: pass draft='ngram' or "
            "'streams+ngram'."
        )
    ngram_tokens = num_draft_tokens  # the longest prompt-lookup chain
    if draft_model is not None:  # its chain, as tree levels (the streams are off)
        if tree_depth not in (None, num_draft_tokens) or prune_threshold:
            raise ValueError(
                "draft_model: its tree is num_draft_tokens levels deep, unpruned (tree_depth "
                f"{tree_depth!r} and prune_threshold {prune_threshold!r} are for streams)."
            )
        ks, depth, threshold, max_nodes = draft_model_tree(
            num_draft_tokens, tree_top_k, max_tree_nodes
        )
        if draft == "ngram":  # its tree and a lookup chain, merged as "streams+ngram" merges
            draft, ngram_tokens = "streams+ngram", NGRAM_DRAFT_TOKENS
            max_nodes += NGRAM_DRAFT_TOKENS if max_tree_nodes is None else 0
    else:
        ks, depth, threshold, max_nodes = resolve_tree_settings(
            rt, tree_top_k, tree_depth, prune_threshold, max_tree_nodes
        )
    dynamic = dynamic_tree_setting(rt, dynamic_tree, draft_model, ks, depth)
    tree_nodes = max_nodes
    if draft == "streams+ngram" and rt.drafter is not None:
        # An attached drafter's tree (max_tree_nodes) and a lookup chain beside it.
        max_nodes += ngram_tokens
    if draft == "ngram":
        depth = 0  # the model's own drafts are off
    if speculative:  # (asked, else the model's tuned one where its drafts are a chain)
        stored = None if draft_model is not None else getattr(rt.config, "draft_confidence", None)
        refusal = chain_refusal(ks, depth, dynamic, draft == "ngram")
        draft_confidence = chain_confidence(draft_confidence, stored, refusal)
    quant = KVQuantizer.from_args(kv_bits, kv_group_size, quantized_kv_start)
    if quant is not None:
        refuse_quantized_windows(model, draft_model, kv_bits)
    sampler = sampler or greedy
    asked = acceptance
    if acceptance is None:  # (without drafts there is nothing to accept)
        drafting = speculative and (depth or draft)
        acceptance = default_acceptance(sampler) if drafting else "target-sample"
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance={acceptance!r}: choose one of {ACCEPTANCE}")
    if acceptance == "rejection" and not (
        sampler is greedy or isinstance(sampler, DistributionSampler)
    ):
        raise ValueError(
            "acceptance='rejection' needs the target distribution, not only samples: pass a "
            "sampler from mlx_specstream.sample_utils.make_sampler."
        )
    if acceptance == "rejection" and draft is not None and not getattr(sampler, "greedy", True):
        # An n-gram draft is one deterministic proposal, not a draw from a distribution.
        if asked == "rejection" and speculative:
            warnings.warn(
                "acceptance='rejection' with prompt-lookup drafts: a lookup chain is one "
                "deterministic proposal, not a draw, so the tree is verified by "
                "acceptance='target-sample' (also lossless).",
                stacklevel=2,
            )
        acceptance = "target-sample"
    check_prompt(model, prompt)
    warn_if_tf32(model)  # float32 on a GPU: token identity needs MLX_ENABLE_TF32=0
    draft_cache, user_cache = None, prompt_cache
    if draft_model is not None:  # (mlx-lm's convention: the model's layers, then the draft's)
        prompt_cache, draft_cache = split_prompt_cache(model, draft_model, prompt_cache)
    if not speculative or (depth == 0 and draft is None):
        if rt.config.mode == "lossless":
            # Streams never touch the main stream: this is the base model.
            if draft_cache is not None:  # it follows the model's cache all the same
                dm = DraftModel(draft_model, draft_cache, 1, quant)
                yield from _plain_with_draft_cache(
                    prompt, model, dm, prompt_cache, user_cache, max_tokens=max_tokens,
                    sampler=sampler, logits_processors=logits_processors,
                    prefill_step_size=prefill_step_size, kv_bits=kv_bits,
                    kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
                    prompt_progress_callback=prompt_progress_callback,
                )  # fmt: skip
                return
            for n, (token, logprobs) in enumerate(
                bounded_generate_step(
                    prompt,
                    model,
                    max_tokens=max_tokens,
                    sampler=sampler,
                    logits_processors=logits_processors,
                    prompt_cache=prompt_cache,
                    prefill_step_size=prefill_step_size,
                    max_kv_size=max_kv_size,
                    kv_bits=kv_bits,
                    kv_group_size=kv_group_size,
                    quantized_kv_start=quantized_kv_start,
                    prompt_progress_callback=prompt_progress_callback,
                )
            ):
                yield token, logprobs, False, n + 1
            return
        depth, draft = 0, None
    if acceptance == "rejection" and not getattr(sampler, "greedy", True) and threshold > 0:
        # Pruning keeps or drops a draft by its value; rejection sampling's
        # residuals assume every draw is tried in order, so it would be biased.
        warnings.warn(
            f"acceptance='rejection' does not prune: prune_threshold={threshold} is ignored "
            "(pruning drafts by their values would bias rejection sampling).",
            stacklevel=2,
        )
        threshold = 0.0
    # (a cache of its own: window layers keep only what windows to come can see)
    cache = model_caches(model, max_kv_size, bounded=True) if prompt_cache is None else prompt_cache
    adopt_kv_lists(cache)  # (mlx-lm's CacheList of KVCaches: DeepSeek V3.2's, one per layer)
    max_rows = None
    if any(type(c) is RotatingKVCache for c in cache):  # accepted only while it never rotates
        gamma = getattr(rt.config, "num_streams", 0)  # (a drafter adds no rows)
        step_rows = max_nodes * (1 + gamma) + gamma
        max_rows = window_rows(cache[0].offset, prompt.size, max_tokens, step_rows)
    check_cache(cache, allow_quantized=True, max_rows=max_rows)
    start = cache[0].offset
    dstate = dm = None
    if draft_model is not None:
        dm = DraftModel(draft_model, draft_cache, depth, quant, draft_confidence, draft_schedule)
        if dynamic:
            dm.ready_to_grow()
    if rt.drafter is not None and depth:
        dstate = rt.drafter.start(start, drafter_state_of(cache), levels=depth)
        keep_drafter_state(cache, dstate)  # (for the next call on this cache)
    prompt_list = prompt.tolist()
    dec = Decoder(
        rt, cache, list(prompt_list), sampler, logits_processors or [],
        (ks, depth, threshold, max_nodes), acceptance, draft, ngram_tokens, max_tokens, dstate,
        quant, pipeline, dm, ngram_candidates, tree_nodes, dynamic, draft_confidence,
    )  # fmt: skip
    yielded, ended = 0, False  # ended: finished or closed, not failed
    try:
        with mx.stream(generation_stream):
            progress = prompt_progress_callback or (lambda *_: None)
            _prefill(rt, cache, prompt, prefill_step_size, dstate, quant, progress)
            if dm is not None:  # (the prompt's last token: fed with its first draft)
                dm.prefill(prompt_list[:-1], prefill_step_size)
                dm.extend(prompt_list[-1:])
            pending = dec.launch(dec.first_draft(prompt_list[-1]))
            while pending is not None:
                ahead = dec.launch_ahead(pending)  # pipelined: before this step's host read
                new, nxt = dec.finish(pending, folded=ahead is not None)
                forget_past_windows(cache)
                if nxt is None:  # done (a pass launched ahead is not counted)
                    pending, dec.passes = None, dec.passes - (ahead is not None)
                else:  # launched before the yields, which overlap its device work
                    pending = ahead if ahead is not None else dec.launch(nxt)
                if not yielded:  # the first token is ready: the prompt is in
                    progress(prompt.size, prompt.size)
                for token, logprobs, from_draft in new:
                    yielded += 1
                    yield token, logprobs, from_draft, dec.passes - (pending is not None)
                if dec.passes % 256 == 0:
                    mx.clear_cache()
        ended = True
    except GeneratorExit:  # closed by the consumer
        ended = True
        raise
    finally:
        end = start + prompt.size + yielded
        if user_cache is None:
            pass  # (a cache of its own is dropped here: no last token to feed, no rows to trim)
        elif ended and yielded:
            with mx.stream(generation_stream):
                hold_yielded(rt, cache, end, dec.history[end - start - 1], dstate, quant)
                if dm is not None:
                    dm.hold(dec.history, start, end)
        else:  # failed: what the cache surely holds (and the draft model's)
            held = min(end - 1, min(c.offset for c in cache))
            if dm is not None:
                held = min(held, dm.fed)
                dm.rewind(held)
            rewind(cache, held)
        if dm is not None and user_cache is not None:  # (a quantized layer is a new object)
            user_cache[:] = list(cache) + dm.cache
        rt.release()


def lookup_settings(lookup_tokens, candidates: int, nodes: int) -> tuple:
    """``draft="streams+ngram"`` on a model verified through its own passes: prompt
    lookup's drafts, ``(tokens, candidates, max_nodes)``, merged into the streams' or an
    attached drafter's (``num_draft_tokens`` sets lookup's length there, as on any model)."""
    lookup_tokens = NGRAM_DRAFT_TOKENS if lookup_tokens is None else lookup_tokens
    if not (isinstance(lookup_tokens, int) and lookup_tokens >= 1):
        raise ValueError(f"num_draft_tokens={lookup_tokens!r}: an integer >= 1.")
    return lookup_tokens, candidates, nodes


def drafter_growth(rt, tree: tuple, static: Optional[StaticTree], dynamic_tree):
    """Whether an attached drafter on a model with recurrent layers grows dynamic trees
    (:func:`~.settings.dynamic_tree_setting`: asked, or the config's, tuned) where its
    static tree would be ``static`` (``None``: a chain, or no tree the model takes):
    ``(k, max_nodes, depth)`` of the settings' tree, else ``None``.

    Example: an MTP layer's config (``top_k`` 1) and ``tree_top_k=2, max_tree_nodes=8,
    dynamic_tree=True`` give ``(2, 8, 3)``; ``dynamic_tree=None`` gives ``None`` (an MTP
    layer's trees grow where asked or tuned)."""
    if static is None:
        return None
    ks, depth, _, nodes = resolve_tree_settings(rt, tree[0], tree[1], None, tree[3])
    if not dynamic_tree_setting(rt, dynamic_tree, None, ks, depth):
        return None
    return max(ks[:depth]), nodes, depth


def streams_on_chains(rt, model, tree: tuple, num_draft_tokens: Optional[int]):
    """What the streams (or an attached drafter's levels) draft on a model with
    recurrent layers: a chain of
    ``num_draft_tokens`` (their top tokens, one each) when given, else the tree that
    the settings give on any model (:func:`resolve_tree_settings`: the call's, else the
    config's, tuned), verified as :meth:`~.recurrent.ChainCache.run` verifies trees
    where the model takes them (:func:`~.support.tree_on_chains_refusal`).

    Example: 3 streams and an untuned config (``top_k`` 3, 16 nodes) give the static
    tree of 16 nodes, 3 levels; ``num_draft_tokens=2`` a chain of 2; ``tree_depth=0``
    plain decoding.

    Returns:
        tuple: ``(tree, levels)``: the :class:`~.tree.StaticTree` (``None``: a
        chain) and how many levels it drafts (0: one token per pass).
    """
    top_k, depth, threshold, nodes = tree
    gamma = rt.config.num_streams
    if threshold:
        raise ValueError(
            f"prune_threshold={threshold!r}: not with recurrent layers (pruning reads the "
            "host between the layers of a pass)."
        )
    if num_draft_tokens is not None:  # (a chain of that many: top-1 each)
        if not (isinstance(num_draft_tokens, int) and 0 <= num_draft_tokens <= gamma):
            raise ValueError(
                f"num_draft_tokens={num_draft_tokens!r}: an integer in [0, {gamma}] (the "
                "model has that many streams)."
            )
        given = [n for n, v in (("tree_top_k", top_k), ("max_tree_nodes", nodes)) if v]
        if given:
            raise ValueError(
                f"num_draft_tokens={num_draft_tokens} sets a chain of the drafts' top "
                f"tokens, {' and '.join(given)} a tree: pass one or the other."
            )
        return None, num_draft_tokens
    asked = top_k is not None or nodes is not None  # (a tree the call names, not the config)
    ks, depth, _, nodes = resolve_tree_settings(rt, top_k, depth, None, nodes)
    shape = static_tree(ks, depth, nodes)
    if depth == 0 or layout_of(shape.parents).is_chain:
        return None, min(depth, len(shape) - 1)
    why = tree_on_chains_refusal(model)
    if why is not None:
        if asked:
            raise ValueError(
                f"tree_top_k / max_tree_nodes: no tree of drafts here: {why.rstrip('.')}."
            )
        warnings.warn(
            f"The model's config drafts a tree (top_k {ks}), which this model cannot take "
            f"({why.rstrip('.')}): its {'drafter' if rt.drafter is not None else 'streams'} "
            f"draft{'s' if rt.drafter is not None else ''} a chain of {depth}.",
            stacklevel=4,
        )
        return None, depth
    return shape, depth


def _on_chain_model(
    prompt,
    model,
    *,
    speculative,
    draft,
    draft_model,
    tree,
    acceptance,
    pipeline,
    dynamic_tree,
    **kw,
):
    """:func:`spec_generate_step` where the model or its draft model has recurrent
    layers, or the tree verifier cannot take the model (:func:`~.recurrent.tree_refusal`):
    chains of drafts, from prompt lookup or the draft model, verified through the
    model's own passes (:func:`mlx_specstream.recurrent.chain_generate_step`; with
    ``speculative=False`` the draft model's cache still follows the model's). Settings
    that need a tree, streams or a KV cache in every layer are refused, naming them.
    An attached drafter that runs again on its own output (one MTP layer) grows
    dynamic trees where asked (``dynamic_tree``) or tuned, as on any model."""
    model_type = getattr(getattr(model, "args", None), "model_type", type(model).__name__)
    recurrent = has_recurrent_layers(model) or (
        draft_model is not None and has_recurrent_layers(draft_model)
    )
    if recurrent:
        what, why = "has recurrent layers", "as recurrent layers read tokens in order"
        why += " and keep no row per token"
    else:
        reason = tree_refusal(model).removeprefix(f"Model type '{model_type}': ").rstrip(".")
        what, why = (
            "takes no tree",
            f"through its own passes, as the tree verifier cannot take it ({reason})",
        )
    where = "recurrent layers" if recurrent else "chains"
    rt = getattr(model, "speculative_streams", None)
    if rt is not None and rt.config.mode == "shared":
        raise ValueError(
            "draft_model with recurrent layers on a shared-mode stream model: its plain "
            "decoding is not the verifier's (use speculative=False without the draft model)."
        )
    # (lossless streams on a model with recurrent layers: their chain, on_chains)
    own_streams = getattr(rt, "streams", None) is not None and draft_model is None
    # (an attached drafter, its MTP layer, ParallelSpec or Medusa heads: chains of its levels)
    own_drafter = getattr(rt, "drafter", None) is not None and draft_model is None
    if (
        speculative
        and draft_model is None
        and draft != "ngram"
        and not (own_streams and draft in (None, "streams", "streams+ngram"))
        and not (own_drafter and draft in (None, "streams", "streams+ngram"))
    ):
        raise ValueError(
            f"Model type '{model_type}' {what}: it speculates with prompt lookup "
            f"(draft='ngram'), a draft model, its lossless-mode streams or its attached "
            f"drafter (its MTP layer; either with prompt lookup merged in: 'streams+ngram'), "
            f"verified {why}; got draft={draft!r}."
        )
    if (own_streams or own_drafter) and draft is None:  # the config's source (tuned)
        draft = getattr(rt.config, "draft", None)
    merged = False  # (lookup's drafts merged in, first: into the streams' or the drafter's)
    if speculative and own_drafter and draft != "ngram":
        # (a chain of each level's first choice, at most the config's levels; else the
        # settings' tree, where the model takes one; merged: num_draft_tokens is lookup's)
        merged = draft == "streams+ngram"
        n = None if merged else kw["num_draft_tokens"]
        if isinstance(n, int) and not isinstance(n, bool):
            n = min(n, resolve_tree_settings(rt, None, None, None, None)[1])
        kw["drafter_tree"], levels = streams_on_chains(rt, model, tree, n)
        nodes = tree[3] if tree[3] is not None else rt.config.max_tree_nodes
        growth = drafter_growth(rt, tree, kw["drafter_tree"], dynamic_tree)
        if growth is not None:  # (k children per node, as deep as the settings' tree)
            kw["drafter_growth"], levels = growth, growth[2]
            kw["drafter_tree"], dynamic_tree = None, None
        tree, lookup_tokens = (None, None, None, None), kw["num_draft_tokens"]
        kw["num_draft_tokens"], kw["attached_drafter"] = levels, levels > 0
        merged = merged and levels > 0  # (no levels: lookup alone)
        if merged:
            _merge_lookup(kw, levels, lookup_tokens, nodes)
    if dynamic_tree:  # (not taken above: the drafts here fill chains or static trees)
        raise ValueError(
            "dynamic_tree=True: this model's drafts are verified through its own passes "
            "(mlx_specstream.recurrent), as one chain or a static tree of its streams' or "
            "drafter's levels; a grown tree needs an attached drafter that runs again on its "
            "own output (one MTP layer) and a tree the model takes."
        )
    streams = speculative and own_streams and draft != "ngram"
    merged = merged or streams and draft == "streams+ngram"
    if streams:  # (the streams' chain or tree: the settings', tuned or given)
        lookup_tokens = kw["num_draft_tokens"] if merged else None  # (as on any model)
        kw["stream_tree"], levels = streams_on_chains(rt, model, tree, None if merged else
                                                      kw["num_draft_tokens"])  # fmt: skip
        nodes = tree[3] if tree[3] is not None else rt.config.max_tree_nodes
        tree, kw["num_draft_tokens"] = (None, None, None, None), levels
        streams = speculative = levels > 0 or merged
        if merged:
            if kw["stream_tree"] is None:  # (a chain of ``levels``: as a tree of one path)
                kw["stream_tree"] = static_tree([1] * levels, levels, levels + 1)
            _merge_lookup(kw, levels, lookup_tokens, nodes)
    if speculative and draft_model is not None and draft not in (None, "streams"):
        raise ValueError(
            f"draft={draft!r} with a draft_model on {where}: the draft model's chain alone is "
            "verified (prompt lookup is not merged into it there)."
        )
    if speculative:  # (asked, else the model's tuned one where its drafts are a chain)
        own_tree = kw.get("drafter_tree") or kw.get("stream_tree")
        k = 1 if own_tree is None else max(own_tree.ranks) + 1  # (its levels' widest)
        drafts = draft_model is not None or streams or kw.get("attached_drafter", False)
        lookup_only = draft == "ngram" and draft_model is None
        refusal = chain_refusal([k], int(drafts), bool(kw.get("drafter_growth")), lookup_only)
        stored = getattr(getattr(rt, "config", None), "draft_confidence", None)
        stored = None if draft_model is not None else stored
        kw["draft_confidence"] = chain_confidence(kw["draft_confidence"], stored, refusal)
    candidates = kw["ngram_candidates"]
    if not (isinstance(candidates, int) and candidates >= 1):
        raise ValueError(f"ngram_candidates={candidates!r} must be an integer >= 1.")
    if speculative and candidates > 1 and not merged:  # (several lookup drafts, a tree)
        if rt is None and attends(model):  # (the verifier alone: its trees' masks, positions)
            rt = attach_chain_verifier(model)
        nodes = tree[3] if tree[3] is not None else VerifierConfig.max_tree_nodes
        if not (isinstance(nodes, int) and nodes >= 2):
            raise ValueError(f"max_tree_nodes={tree[3]!r} must be an integer >= 2 here.")
        kw["max_tree_nodes"], tree = nodes, tree[:3] + (None,)
    named = dict(zip(("tree_top_k", "tree_depth", "prune_threshold", "max_tree_nodes"), tree))
    if speculative:  # (plain decoding takes mlx-lm's rotating caches too)
        named.update(max_kv_size=kw["max_kv_size"])
    given = sorted(k for k, v in {**named, "pipeline": pipeline or None}.items() if v is not None)
    if given:
        raise ValueError(
            f"{', '.join(given)}: not supported "
            f"{'with ' if recurrent else 'on '}{where} (model type "
            f"'{model_type}'{' or its draft model' if draft_model is not None else ''}): a "
            f"chain is verified in order {why}."
        )
    if acceptance is not None and acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance={acceptance!r}: choose one of {ACCEPTANCE}")
    sampler = kw["sampler"]  # (any sampler but ours says nothing of its temperature)
    sampling = sampler not in (None, greedy) and not getattr(sampler, "greedy", False)
    drafted = kw.get("attached_drafter", False)  # (the attached drafter's chains: drawn)
    lookup_only = draft_model is None and (merged or not streams and not drafted)
    if speculative and sampling and lookup_only:
        if acceptance == "rejection":
            warnings.warn(
                "acceptance='rejection' with prompt-lookup drafts: a lookup chain is one "
                "deterministic proposal, not a draw, so it is verified by "
                "acceptance='target-sample' (also lossless).",
                stacklevel=3,
            )
    if (
        speculative
        and sampling
        and (draft_model is not None or (streams or drafted) and not merged)
    ):
        if acceptance is None:
            acceptance = default_acceptance(sampler)
        if acceptance == "rejection" and not isinstance(sampler, DistributionSampler):
            raise ValueError(
                "acceptance='rejection' needs the target distribution, not only samples: pass "
                "a sampler from mlx_specstream.sample_utils.make_sampler."
            )
        kw["rejection"] = acceptance == "rejection"
    check_prompt(model, prompt)
    warn_if_tf32(model)
    if kw["num_draft_tokens"] is None:
        kw["num_draft_tokens"] = NGRAM_DRAFT_TOKENS if draft_model is None else 2
    if speculative or kw["prompt_checkpoint_callback"] is not None:
        if kw["max_kv_size"] is not None:
            raise ValueError(
                "max_kv_size with prompt_checkpoint_callback: not supported on recurrent "
                f"layers (model type '{model_type}')."
            )
        kw["quant"] = KVQuantizer.from_args(
            kw.pop("kv_bits"), kw.pop("kv_group_size"), kw.pop("quantized_kv_start")
        )
        kw.pop("max_kv_size")
        if not speculative:  # (the chain loop without drafts: plain decoding, with the hook)
            kw["num_draft_tokens"] = 0
        yield from chain_generate_step(
            prompt, model, draft_model=draft_model, streams=streams, **kw
        )
        return
    kw.pop("num_draft_tokens")
    kw.pop("prompt_checkpoint_callback")
    kw.pop("stream_tree", None)
    kw.pop("drafter_tree", None)
    kw.pop("ngram_candidates")
    kw.pop("max_tree_nodes", None)
    kw.pop("lookup", None)
    kw.pop("draft_confidence", None)
    kw.pop("draft_schedule", None)
    kw.pop("rejection", None)  # (mlx-lm's plain loop; the draft cache follows unquantized)
    own, theirs = split_pair(model, draft_model, kw.pop("prompt_cache"))
    own = make_prompt_cache(model) if own is None else own

    def follow(tokens):  # a reused draft cache holds every yielded token, as the model's
        if theirs is not None:
            chain = DraftModelChain(draft_model, theirs)
            chain.tokens = tokens
            chain.hold(len(tokens))

    yield from _plain_decoding(prompt, model, own, follow, **kw)


def _merge_lookup(kw: dict, levels: int, lookup_tokens, nodes: int) -> None:
    """``draft="streams+ngram"`` on recurrent layers: prompt lookup's chains (at most
    ``lookup_tokens`` long) merged into the streams' or the drafter's ``levels``, first,
    under ``nodes``; the pass drafts up to the longer of the two."""
    kw["lookup"] = lookup_settings(lookup_tokens, kw["ngram_candidates"], nodes)
    kw["num_draft_tokens"] = max(levels, min(kw["lookup"][0], nodes - 1))


def _plain_with_draft_cache(prompt, model, dm: DraftModel, prompt_cache, user_cache, **kwargs):
    """mlx-lm's plain decoding (``speculative=False``) of a call given a draft model
    ``dm``: the draft model's cache then takes in the same tokens, so the pair stays
    usable; ``user_cache`` (both models' layers) gets the layers back."""
    start = prompt_cache[0].offset if prompt_cache else 0
    cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache

    def follow(history):
        dm.hold(history, start, min(cache[0].offset, start + len(history)))
        if user_cache is not None:  # (a quantized layer is a new object)
            user_cache[:] = list(cache) + dm.cache

    yield from _plain_decoding(prompt, model, cache, follow, **kwargs)


def _plain_decoding(prompt, model, cache, follow: Callable[[List[int]], None], **kwargs):
    """mlx-lm's ``generate_step`` on ``cache``, as our generators yield, then
    ``follow(history)`` with the prompt and every yielded token (a draft model's
    cache is brought to them), also when the consumer stops early."""
    history = prompt.tolist()
    try:
        for n, (token, logprobs) in enumerate(
            bounded_generate_step(prompt, model, prompt_cache=cache, **kwargs), start=1
        ):
            history.append(int(token))
            yield token, logprobs, False, n
    finally:
        follow(history)


def bounded_generate_step(prompt: mx.array, model, prompt_cache=None, **kwargs):
    """mlx-lm's ``generate_step``, whose window layers of ours (a bounded prompt
    cache's :class:`~mlx_specstream.cache.WindowKVCache`) drop the rows no window to
    come sees after each prompt chunk and each token, as in our own loop."""
    progress = kwargs.pop("prompt_progress_callback", None) or (lambda *_: None)
    windows = prompt_cache is not None and any(isinstance(c, WindowKVCache) for c in prompt_cache)

    def chunked(done: int, total: int) -> None:  # (after each prompt chunk is evaluated)
        if windows:
            forget_past_windows(prompt_cache)
        progress(done, total)

    gen = generate_step(prompt, model, prompt_cache=prompt_cache,
                        prompt_progress_callback=chunked, **kwargs)  # fmt: skip
    for out in gen:
        yield out
        if windows:  # (the next token's pass is built: its rows are in)
            forget_past_windows(prompt_cache)


def _log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities over the last axis, as mlx-lm's ``generate_step`` computes them."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


# The acceptance walk, compiled: its elementwise chains fuse (5 kernels).
_accept = mx.compile(accept)
_certified_argmax = mx.compile(certified_argmax)


@mx.compile
def _extend_and_lookup(history, length, tokens, depth, bonus, max_tokens: int):
    """Pipelined prompt lookup's device work for one step, compiled (its
    elementwise chains fuse): appends the ``depth`` drafts the chain ``tokens``
    (root first) had accepted and the ``bonus`` token to ``history`` at
    ``length``, then looks the next chain up. The chain's accepted path is its
    first ``depth + 1`` nodes: its drafts are written whole, then the bonus over
    the first one not accepted (what lies past it is written again later).

    Returns:
        tuple: the history, its new length, and ``bonus`` followed by
        ``max_tokens`` drafts (:func:`~mlx_specstream.ngram.device_lookup`).
    """
    at = length.reshape(1)
    history = mx.slice_update(history, tokens[1:].astype(history.dtype), at, (0,))
    bonus = bonus.astype(history.dtype).reshape(1)
    history = mx.slice_update(history, bonus, at + depth, (0,))
    length = length + depth + 1
    draft, _ = device_lookup(history, length, max_tokens)
    return history, length, mx.concatenate([bonus, draft])


def hold_yielded(rt: StreamRuntime, cache, end: int, last: int, dstate, quant=None) -> None:
    """Leaves ``cache`` as mlx-lm's loop leaves its own when a generation ends or is
    closed: holding ``end`` tokens, the prompt and every yielded token, the last
    one (``last``) included, since mlx-lm feeds each token before yielding it.

    A step's accepted drafts are in the cache, and so is the root of a tree
    launched before the yields (the step's correction or bonus token). After the
    last step that token is missing: it is fed now, in a plain pass (as a follow-up
    call would have fed it at the head of its prompt), and an attached drafter
    keeps its state to pair with that call's first token.
    """
    if cache[0].offset >= end:
        rewind(cache, end)
        if dstate is not None:  # its last row pairs a yielded token with one not yielded
            dstate.trim_to(end - 1)
            dstate.pending_hidden = None
    else:
        keep = dstate is not None and dstate.needs_prompt
        hidden = rt.prefill(mx.array([last]), cache, keep)
        if keep:
            dstate.pending_hidden = hidden
    if quant is not None:
        quant.maybe_quantize(cache)
    mx.eval(cache_arrays(cache))


def rewind(cache, end: int) -> None:
    """Trims every layer, and an attached drafter's state, to ``end`` tokens
    (mid-step the stream layers hold more rows than the others)."""
    for c in cache:
        c.trim(max(0, c.offset - end))
    state = getattr(cache, "drafter_state", None)
    if state is not None:
        state.trim_to(end)


def _prefill(
    rt: StreamRuntime, cache, prompt: mx.array, step: int, dstate, quant=None, progress=None
) -> None:
    """Feeds all but the last prompt token with the plain model, calling
    ``progress(processed, total)`` at 0 and after each chunk. A drafter that
    reads the prompt gets (state, next token) pairs of those tokens too."""
    keep_hidden = dstate is not None and dstate.needs_prompt
    kept = []  # (the prompt's states, chunk by chunk, for a drafter that reads them)
    body = prompt[:-1]
    progress = progress or (lambda *_: None)
    progress(0, prompt.size)
    for i in range(0, body.size, step):
        hidden = rt.prefill(body[i : i + step], cache, keep_hidden)
        if keep_hidden:
            kept.append(hidden)
        if quant is not None:
            quant.maybe_quantize(cache)
        forget_past_windows(cache)  # (a long prompt's window layers stay bounded too)
        mx.eval(cache_arrays(cache))
        progress(min(i + step, body.size), prompt.size)
    pending = [] if dstate is None or dstate.pending_hidden is None else [dstate.pending_hidden]
    if keep_hidden and (body.size or pending):
        # (the last generation's last token pairs with this prompt's first one)
        dstate.prompt_hidden = mx.concatenate(pending + kept, axis=0)
        dstate.prompt_next = prompt.tolist()[1 - len(pending) :]
        dstate.pending_hidden = None

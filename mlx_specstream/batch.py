"""Batched decoding in which every row speculates: mlx-lm's ``batch_generate``,
with each row drafting by prompt lookup or with a draft model, and one pass
verifying every row's draft.

Each row drafts from its own prompt and output (:class:`~mlx_specstream.ngram.NgramIndex`),
or a draft model drafts every row's greedy chain in batched passes of its own; then a
pass feeds every row its pending token and its draft. A row accepts the draft's
longest prefix that matches its own choices, so rows advance by different numbers
of tokens; their key-value caches drift apart
(:class:`~mlx_specstream.ragged_cache.RaggedKVCache`) instead of being realigned.
Greedy output equals each prompt decoded alone; sampled output keeps the model's
distribution, since either draft is a deterministic proposal, accepted where it
equals the token the sampler drew.

Where every row's next input can be made on the device (rows without logits
processors), each pass is launched before the one before it is read, as mlx-lm's
loop does: the device chooses each row's tokens, counts what it keeps, moves its
cache's end and builds its next input (the token chosen at its last kept position,
then its draft: the streams' chain there, its lookup in a copy of its tokens kept on
the device, or the draft model's chain, its draft cache settled and fed there),
while the host reads the pass before.
"""

import copy
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .cache import (
    ChunkKVCache,
    KVCacheList,
    adopt_kv_lists,
    bounded_windows,
    cache_tokens,
    model_caches,
    sliding_windows,
    whole_windows,
)
from .cli_args import DRAFT_MODEL_TOKENS
from .ngram import NGRAM_DRAFT_TOKENS, NgramIndex, device_lookups
from .precision import on_gpu
from .batch_drafters import layer_rows
from .ragged_cache import RaggedKVCache, empty_ragged, padded_rows, ragged
from .recurrent import has_recurrent_layers, tree_refusal

DRAFTS = ("auto", "streams", "ngram", "streams+ngram", "draft_model", None)
# A row's own source: without a draft model, then with one.
ROW_DRAFTS = ("streams", "ngram", "streams+ngram")
MODEL_ROW_DRAFTS = ("draft_model", "draft_model+ngram")
STREAM_PASSES = ("fused", "split")


class RowTokens(NamedTuple):
    """What one row got from one pass."""

    uid: int  # the row's id (batch_generate_step: the prompt's index)
    tokens: List[int]  # accepted drafts, then the pass's own token
    logprobs: List[float]  # each token's log-probability under the (processed) model
    finish_reason: Optional[str]  # "stop" (the last token is a stop token), "length" or None
    distributions: List[mx.array]  # each token's (vocab,) log-probabilities (lazy)
    cache: Optional[List[KVCache]] = None  # a finished row's, with keep_caches


@dataclass
class _Row:
    uid: int
    history: NgramIndex  # the prompt and generated tokens; the last one is not fed yet
    max_tokens: int
    sampler: Optional[Callable]
    processors: List[Callable]
    draft_tokens: int  # the longest draft (0: none)
    base: int = 0  # tokens the caches hold before ``history`` (a cache given with the prompt)
    generated: int = 0
    draft: str = "ngram"  # where its drafts come from (ROW_DRAFTS, MODEL_ROW_DRAFTS)
    streams_draft: List[int] = field(default_factory=list)  # from the last pass's streams
    # tokens its draft cache holds that are its own, when a lookup draft replaced the
    # draft model's chain (which the draft cache was fed) in the last pass
    draft_cache_end: Optional[int] = None

    @property
    def uses_streams(self) -> bool:
        return self.draft_tokens > 0 and "streams" in self.draft

    @property
    def fed(self) -> int:
        """Tokens the model's cache holds: all but the last."""
        return self.base + len(self.history.tokens) - 1


def output_size(model) -> int:
    """The model's vocabulary: the size of its logits over one token."""
    return model(mx.array([[0]])).shape[-1]


def unbatchable(model, name: str = "model") -> Optional[str]:
    """Why ``model`` cannot decode rows of a :class:`SpecBatcher` (``None``: it can):
    a layer without a plain ``KVCache``, or rows that come out wrong
    (:func:`ragged_fault`), or a model the tree verifier cannot take."""
    why = tree_refusal(model)
    if why is not None and not has_recurrent_layers(model):
        return f"batch rows need the tree verifier's per-row positions and masks; {why}"
    for i, c in enumerate(model_caches(model)):
        if isinstance(c, ChunkKVCache):  # (mlx-lm's batch caches have no chunks either)
            return (
                f"layer {i} of this {name} attends in chunks of {c.chunk} tokens (Llama 4's "
                "chunked attention), which batch_generate does not apply to rows of a batch"
            )
        if type(c) is not KVCache and not isinstance(c, KVCacheList):  # (the last: in pairs)
            return (
                f"batch_generate needs a plain key-value cache in every layer; layer {i} of "
                f"this {name} has a {type(c).__name__} (rotating caches that keep "
                "their first tokens, recurrent and state-space layers are not batched "
                "speculatively)"
            )
    fault = ragged_fault(model)
    return None if fault is None else f"cannot batch this {type(model).__module__} {name}: {fault}"


PROBE_TOLERANCE = 0.05  # most |p(batch) - p(alone)| of a next-token probability
_PROBED = {}  # id(model) -> ragged_fault(model)


def ragged_fault(model) -> Optional[str]:
    """Why rows of different lengths in one batch pass do not each get what they
    would get alone (``None``: they do); measured once per model.

    Three prompts (8, 3 and 2 tokens) are cached, then one pass feeds each two
    more tokens; every row's next-token probabilities must equal the same tokens'
    alone to within :data:`PROBE_TOLERANCE` (on CPU float32 they differ by about
    1e-7). mlx-lm 0.32's gemma2 fails: its attention broadcasts a batch mask over
    its key-value heads.
    """
    if id(model) not in _PROBED:
        _PROBED[id(model)] = _probe(model)
        weakref.finalize(model, _PROBED.pop, id(model), None)
    return _PROBED[id(model)]


def _probe(model) -> Optional[str]:
    vocab = output_size(model)  # (the probe's tokens stay inside it)
    prompts = [[t % vocab for t in range(1, n + 1)] for n in (8, 3, 2)]
    fed = [5 % vocab, 6 % vocab]
    try:  # (prefilled together, padded to the longest, as rows joining a batch are)
        cache = [empty_ragged(c, len(prompts)) for c in model_caches(model)]
        _prefill_rows(model, cache, prompts, len(prompts[0]))
        batched = model(mx.array([fed] * len(prompts)), cache=cache)
    except Exception as e:  # noqa: BLE001 - the reason is reported
        return f"{type(e).__name__}: {e}"
    for b, p in enumerate(prompts):
        # (with caches, as decoding runs it: Gemma 3n's KV-sharing layers need theirs)
        alone = model(mx.array([p + fed]), cache=model_caches(model))[0, -2:]
        alone = mx.softmax(alone.astype(mx.float32), axis=-1)
        gap = mx.abs(mx.softmax(batched[b].astype(mx.float32), axis=-1) - alone).max().item()
        if gap > PROBE_TOLERANCE:
            return (f"a row of a batch differs from the same tokens alone by {gap:.2f} in a "
                    "next-token probability")  # fmt: skip
    return None


def _prefill_rows(model, cache: List[RaggedKVCache], feeds: List[List[int]], step: int,
                  rows_hidden: Optional[Callable] = None) -> None:  # fmt: skip
    """Feeds row ``b`` of ``cache`` the tokens ``feeds[b]`` after its end, every row in
    each pass (padded to the longest; the padding is not kept), ``step`` tokens in all
    per pass (at least one per row). With ``rows_hidden``, each pass keeps the last
    layer's states ``(B, w, D)``, given to ``rows_hidden(states, i, chunks)`` (the pass
    fed ``feeds[b][i : i + len(chunks[b])]``)."""
    step = max(step // len(feeds), 1)
    for i in range(0, max(map(len, feeds), default=0), step):
        chunks = [f[i : i + step] for f in feeds]
        tokens = padded_rows(chunks)
        if rows_hidden is None:
            model(tokens, cache=cache)
        else:
            rows_hidden(model.speculative_streams.prefill_rows(tokens, cache), i, chunks)
        for c in cache:
            c.advance([len(chunk) for chunk in chunks])
        mx.eval([c.state for c in cache])


def _prefill(model, cache: List[KVCache], tokens: List[int], start: int, step: int):
    """Feeds ``tokens[start:-1]`` to ``cache`` in chunks of ``step`` (the last token
    is the one the next pass feeds); returns ``cache``."""
    for i in range(start, len(tokens) - 1, step):
        model(mx.array([tokens[i : min(i + step, len(tokens) - 1)]]), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def stream_runtime(model):
    """The model's :class:`~mlx_specstream.streams.StreamRuntime` if it drafts a batch's
    rows with its own drafter: streams, or an attached drafter (Medusa heads, from each
    row's last layer's state in the verifying pass; a checkpoint's MTP layers, the
    ParallelSpec drafter, EAGLE's and DFlash's drafters, from their layers' rows:
    :mod:`~mlx_specstream.batch_drafters`); else ``None``."""
    rt = getattr(model, "speculative_streams", None)
    if rt is None or getattr(rt, "streams", None) is None and rt.drafter is None:
        return None
    return rt


def no_own_drafts(model) -> str:
    """Why ``model``'s rows cannot draft with its own drafter in a batch."""
    return ("the model has no speculative streams or attached drafter (Medusa heads, MTP "
            "layers, ParallelSpec, EAGLE, DFlash); draft='ngram' drafts its rows by prompt "
            "lookup")  # fmt: skip


def reads_streams(model) -> bool:
    """Whether the model's main rows read its streams (shared mode): every pass of its
    own decoding carries them, so a batch of it must too."""
    rt = stream_runtime(model)
    return rt is not None and rt.config.mode == "shared"


def tuned_depth(model) -> int:
    """How many tokens the model's streams draft on this device: its config's
    ``tree_depth`` as tuned here (0: the tuning found streams do not pay), else
    its number of streams."""
    cfg = stream_runtime(model).config
    return cfg.num_streams if cfg.tree_depth is None else cfg.tree_depth


def tuned_batch(model) -> Optional[dict]:
    """How the model's batches draft on this device, as ``python -m mlx_specstream.tune
    --batch-size K`` measured (:attr:`~mlx_specstream.config.SpecStreamConfig.batch`),
    or ``None`` where that was not tuned."""
    rt = getattr(model, "speculative_streams", None)
    return None if rt is None else getattr(rt.config, "batch", None)


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


class SpecBatcher:
    """Rows decoded together, each speculating, joining and leaving between passes
    (continuous batching, as mlx-lm's ``BatchGenerator``).

    A row joins with the tokens so far and, optionally, a cache holding a prefix of
    them (its own ``KVCache`` per layer); when it enters the batch, the rest but the
    last token is prefilled together with the other rows joining then (up to
    ``prefill_batch_size`` rows in each pass, padded to the longest, as mlx-lm's
    batches prefill; ``prefill_step_size`` tokens in all a pass). Each :meth:`step` drafts for every row,
    by prompt lookup or with a draft model, then one pass of the model verifies
    every row's last token and draft of up to its ``num_draft_tokens`` tokens (rows
    are padded to the longest draft; padding is never accepted). A row keeps the
    draft's longest prefix that equals its own choices, plus the pass's next choice.

    With ``streams`` (a lossless-mode stream model's), each row drafts the chain of
    its streams' first choices at its last accepted token: the stream rows of every
    token fed go through the verifying pass
    (:meth:`~mlx_specstream.streams.StreamRuntime.rows_pass`), or a second pass
    through the stream layers alone feeds every row's stream rows at its end
    (``stream_pass="split"``, :meth:`~mlx_specstream.streams.StreamRuntime.rows_streams`).
    A model with Medusa heads drafts the same way: the chain of its heads' first
    choices over the verifying pass's last-layer state at that token
    (:meth:`~mlx_specstream.streams.StreamRuntime.rows_heads`); one with a checkpoint's
    MTP layer or a ParallelSpec drafter, the layer's chain from its rows of each row's
    tokens (:mod:`~mlx_specstream.batch_drafters`; in pipelined passes its rows are fed
    and kept on the device too).

    With a draft model the rows draft together too: one pass feeds each row what
    the draft model has not seen (its last accepted tokens), then one pass per
    further draft token; each row's draft is the draft model's greedy chain, a
    deterministic proposal, so the output is the model's own, greedy or sampled.
    After the verification each row's draft cache keeps only its accepted tokens.

    Args:
        model: an mlx-lm model whose layers all use a plain ``KVCache``, and whose
          batched rows equal the same tokens alone (:func:`ragged_fault`).
        stop_tokens: tokens that end a row (the row's last token, ``"stop"``).
        prefill_step_size (int): prompt tokens per prefill pass (shared among the rows
          prefilled together).
        max_rows (int): most rows decoded at once; later ones wait their turn.
        prefill_batch_size (int): most rows prefilled in one pass (``None``: every
          row joining at once).
        keep_caches (bool): give a finished row's cache (:attr:`RowTokens.cache`).
        draft_model: an mlx-lm model with the same tokenizer (same conditions as
          ``model``) that drafts every row; ``None``: prompt lookup.
        streams (bool): rows may draft with the model's own streams (or Medusa heads,
          an MTP layer or a ParallelSpec drafter: :func:`stream_runtime`). A shared-mode
          model's rows always carry them (its main rows read them: its own
          decoding), with or without drafts.
        stream_pass (str): ``"fused"``: every fed token's stream rows go through
          the verifying pass; ``"split"``: a second pass feeds the stream rows of
          each row's last kept token alone.
        pipeline (bool, optional): where every row's next input can be made on the
          device (no logits processors), launch each pass before
          reading the one before it, as mlx-lm's loop does (:meth:`_pipelined_step`).
          ``None`` (default): rows drafting by lookup, with a draft model, or with a
          drafter layer's chain (MTP, ParallelSpec) take part on a GPU only (on a CPU
          their fixed-width passes and the device's drafting cost more than the
          overlap saves; rows with streams, Medusa heads or no drafts always do);
          ``True``: every row that can; ``False``: none.
    """

    def __init__(self, model, stop_tokens: Sequence[int] = (), prefill_step_size: int = 2048,
                 max_rows: Optional[int] = None, keep_caches: bool = False,
                 draft_model=None, streams: bool = False,
                 stream_pass: str = "fused", pipeline: Optional[bool] = None,
                 prefill_batch_size: Optional[int] = None):  # fmt: skip
        for m, name in ((model, "model"), (draft_model, "draft model")):
            why = None if m is None else unbatchable(m, name)
            if why:
                raise ValueError(why)
        if stream_pass not in STREAM_PASSES:
            raise ValueError(f"stream_pass={stream_pass!r}: one of {STREAM_PASSES}")
        self.shared = reads_streams(model)  # its every pass carries the streams
        if streams or self.shared:
            if stream_runtime(model) is None:
                raise ValueError(f"rows cannot draft with the model's own drafter: "
                                 f"{no_own_drafts(model)}")  # fmt: skip
            if draft_model is not None:
                raise ValueError(
                    "a batch's rows draft with a draft model or carry the model's streams, not "
                    "both" + (" (a shared-mode model's rows carry them in every pass)"
                              if self.shared else "")  # fmt: skip
                )
            if self.shared and stream_pass == "split":
                raise ValueError("stream_pass='split': a shared-mode model's main rows read "
                                 "their streams, in the same pass")  # fmt: skip
        self.streams = stream_runtime(model) if streams or self.shared else None
        # (an attached drafter, Medusa heads or a layer of its own: each row's chain from the
        # verifying pass's states, no stream rows)
        self.attached = self.streams is not None and self.streams.streams is None
        if self.attached and stream_pass == "split":
            raise ValueError("stream_pass='split': attached drafters (Medusa heads, MTP "
                             "layers, ParallelSpec) draft from the verifying pass's states, "
                             "with no pass of their own")  # fmt: skip
        # (MTP, ParallelSpec: the drafter's layer keeps rows of its own)
        self.layer_rows = layer_rows(self.streams) if self.attached else None
        self.fused = stream_pass == "fused"
        self.model, self.draft_model, self.stop = model, draft_model, set(stop_tokens)
        self.prefill_step_size, self.max_rows = prefill_step_size, max_rows
        self.prefill_batch_size = prefill_batch_size
        self.keep_caches = keep_caches
        self.rows: List[_Row] = []
        self.cache: Optional[List[RaggedKVCache]] = None
        self.draft_cache: Optional[List[RaggedKVCache]] = None
        self.waiting: List[Tuple[_Row, List[KVCache], List[KVCache]]] = []
        self._uid = 0
        self.pipeline = pipeline is not False
        # (rows drafting by lookup or with a draft model: their drafts made on the device)
        self.drafts_on_device = on_gpu() if pipeline is None else pipeline
        self._flight: Optional[_Pass] = None  # launched, not read yet (_pipelined_step)
        # while passes are pipelined and rows draft by lookup: each row's tokens so far
        # on the device, (B, C), and how many there are, (B,) (_launch)
        self._history: Optional[Tuple[mx.array, mx.array]] = None
        # the model's vocabulary: a draft model's drafts stay inside it
        self.vocab = output_size(model) if draft_model is not None else None

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    def insert(self, tokens: Sequence[int], cache: Optional[List[KVCache]] = None, *,
               draft_cache: Optional[List[KVCache]] = None, before: bool = False,
               max_tokens: int = 128,
               sampler: Optional[Callable] = None,
               logits_processors: Optional[List[Callable]] = None,
               num_draft_tokens: int = NGRAM_DRAFT_TOKENS,
               draft: Optional[str] = None) -> int:  # fmt: skip
        """Adds a row; returns its uid.

        Args:
            tokens: the row's tokens so far (the prompt, then any generated); the
              logits processors see them all.
            cache: per layer, a ``KVCache`` holding the first tokens (fewer than all);
              the row owns it from now on. ``None``: a new cache.
            draft_cache: the same for the draft model.
            before (bool): the caches hold context before ``tokens`` instead (as
              many tokens in both; mlx-lm's ``prompt_caches``): all of ``tokens``
              but the last are fed after it, and drafts and logits processors see
              ``tokens`` and what follows.
            max_tokens (int): tokens to generate (at least 1).
            sampler: mlx-lm sampler over ``(tokens, vocab)`` log-probabilities
              (``None``: greedy).
            logits_processors: mlx-lm logits processors for this row.
            num_draft_tokens (int): the longest draft (0: no drafts).
            draft (str): where the row's drafts come from: ``"streams"`` (the chain
              of the model's streams, at most as many tokens as it has streams),
              ``"ngram"`` (prompt lookup) or ``"streams+ngram"`` (prompt lookup where
              the row's tokens have a match, else the streams); in a batch with a
              draft model, ``"draft_model"`` (its greedy chain) or
              ``"draft_model+ngram"`` (lookup where it matches, else that chain).
              Default: ``"draft_model"`` with a draft model, ``"streams"`` in a batch
              with ``streams``, else ``"ngram"``.
        """
        tokens = list(tokens)
        if not tokens:
            raise ValueError("a row needs at least one token")
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"max_tokens={max_tokens!r} must be an integer >= 1.")
        if not (isinstance(num_draft_tokens, int) and num_draft_tokens >= 0):
            raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be an integer >= 0.")
        if draft is None:
            draft = "draft_model" if self.draft_model is not None else (
                "streams" if self.streams is not None else "ngram")  # fmt: skip
        allowed = ROW_DRAFTS if self.draft_model is None else MODEL_ROW_DRAFTS
        if draft not in allowed:
            raise ValueError(f"draft={draft!r}: a row of this batch drafts with one of {allowed}")
        if "streams" in draft and self.streams is None:
            raise ValueError(
                f"draft={draft!r} in a batch without streams (SpecBatcher(streams=True))"
            )
        base = cache_tokens(cache) if before and cache else 0
        cache = self._checked(self.model, cache, tokens, "cache", base)
        if self.draft_model is not None:
            if before and (draft_cache[0].offset if draft_cache else 0) != base:
                raise ValueError("the row's cache and draft cache hold different numbers of "
                                 "tokens before it")  # fmt: skip
            draft_cache = self._checked(self.draft_model, draft_cache, tokens, "draft cache",
                                        base)  # fmt: skip
        elif draft_cache is not None:
            raise ValueError("a draft cache for a batch without a draft model")
        self._uid += 1
        row = _Row(self._uid, NgramIndex(tokens), max_tokens, sampler,
                   list(logits_processors or []), num_draft_tokens, base, draft=draft)  # fmt: skip
        self.waiting.append((row, cache, draft_cache))
        return row.uid

    def _checked(self, model, cache, tokens: List[int], name: str, base: int) -> List[KVCache]:
        """``cache`` (or a new one), holding ``base`` tokens of context and fewer than
        all of ``tokens`` (the rest but the last are prefilled when the row joins); a
        bounded prompt cache's window layers get a row for every position back."""
        cache = model_caches(model) if cache is None else whole_windows(list(cache))
        adopt_kv_lists(cache)  # (mlx-lm's CacheList of KVCaches: DeepSeek V3.2's pairs)
        for i, c in enumerate(cache):
            if type(c) is not KVCache and type(c) is not KVCacheList:
                raise ValueError(f"layer {i} of the row's {name} is a {type(c).__name__}")
        held = cache[0].offset - base
        if held >= len(tokens):
            raise ValueError(f"the row's {name} holds {held} of its {len(tokens)} tokens: "
                             "it must leave the last one to feed")  # fmt: skip
        return cache

    def remove(self, uids: Sequence[int]) -> Dict[int, List[KVCache]]:
        """Takes rows out; each one's cache (holding its tokens but the last), then,
        with a draft model, the draft model's (holding as many)."""
        gone, out = set(uids), {}
        for row, cache, draft_cache in [w for w in self.waiting if w[0].uid in gone]:
            for m, c in ((self.model, cache), (self.draft_model, draft_cache)):
                if m is not None:  # (prefilled alone: it never joined)
                    _prefill(m, c, row.history.tokens, c[0].offset - row.base,
                             self.prefill_step_size)  # fmt: skip
            out[row.uid] = cache + (draft_cache or [])
        self.waiting = [w for w in self.waiting if w[0].uid not in gone]
        for b, row in enumerate(self.rows):
            if row.uid in gone:
                out[row.uid] = self._extract(b)
        self._keep([r for r in self.rows if r.uid not in gone])
        return out

    def _extract(self, b: int) -> List[KVCache]:
        """Row ``b``'s caches, the model's layers (bounded where they attend in a
        window) then the draft model's, both holding exactly its tokens but the last (a draft cache that lags, after a
        pass whose drafts were all accepted, is fed the tokens it lacks)."""
        row = self.rows[b]
        model_layers = [c.extract(b, row.fed) for c in self.cache]
        for c in model_layers:  # (a row ended by a stop token fed the drafts after it)
            c.trim(max(c.offset - row.fed, 0))
        bounded_windows(model_layers, self.model)  # (window layers: what windows to come see)
        if self.draft_model is None:
            return model_layers
        # (a pipelined pass's draft cache may hold the chain drafted after the row's tokens)
        draft_layers = [c.extract(b, min(c.ends[b], row.fed)) for c in self.draft_cache]
        bounded_windows(draft_layers, self.draft_model)
        lag = row.history.tokens[draft_layers[0].offset - row.base : row.fed - row.base]
        if lag:
            self.draft_model(mx.array([lag]), cache=draft_layers)
            mx.eval([c.state for c in draft_layers])
        return model_layers + draft_layers

    def _keep(self, keep: List[_Row]) -> None:
        if len(keep) < len(self.rows):
            at = {r.uid: b for b, r in enumerate(self.rows)}
            index = [at[r.uid] for r in keep]
            for c in self.cache + (self.draft_cache or []):
                c.filter(index)
            if self.layer_rows is not None:
                self.layer_rows.filter(index)
            if self._flight is not None:  # (its rows are the batch's, in order)
                self._flight = self._flight.filter(index) if keep else None
            if self._history is not None:
                at = mx.array(index, dtype=mx.int32)
                self._history = (self._history[0][at], self._history[1][at]) if keep else None
            self.rows = keep

    def _admit(self) -> None:
        room = len(self.waiting) if self.max_rows is None else self.max_rows - len(self.rows)
        if room <= 0 or not self.waiting:
            return
        joining, self.waiting = self.waiting[:room], self.waiting[room:]
        rows = [row for row, _, _ in joining]
        self.cache = self._joined(self.model, self.cache, rows, [c for _, c, _ in joining])
        if self.draft_model is not None:
            self.draft_cache = self._joined(self.draft_model, self.draft_cache, rows,
                                            [d for _, _, d in joining])  # fmt: skip
        self.rows += rows

    def _joined(self, model, cache: Optional[List[RaggedKVCache]], rows: List[_Row],
                caches: List[List[KVCache]]) -> List[RaggedKVCache]:  # fmt: skip
        """``cache``'s rows (if the batch has any), then the joining ``rows``, their
        ``caches`` merged and prefilled together (``prefill_batch_size`` rows at a
        time) with all of their tokens but the last."""
        starts = [c[0].offset - r.base for r, c in zip(rows, caches)]
        feeds = [r.history.tokens[s:-1] for r, s in zip(rows, starts)]
        size, new, layer_new = self.prefill_batch_size or len(rows), None, None
        drafter = self.layer_rows if model is self.model else None
        for g in range(0, len(rows), size):
            part = [ragged(layer) for layer in zip(*caches[g : g + size])]
            layer_part, hidden_to = None, None
            if drafter is not None:  # (the drafter layer's rows of the tokens prefilled)
                layer_part, hidden_to = self._layer_rows(rows[g : g + size], starts[g : g + size])
            _prefill_rows(model, part, feeds[g : g + size], self.prefill_step_size, hidden_to)
            new = part if new is None else [a.extend(b) for a, b in zip(new, part)]
            if drafter is not None:
                layer_new = layer_part if layer_new is None else layer_new.extend(layer_part)
        if drafter is not None:
            drafter.admit(layer_new, alone=not self.rows)
        for c, w in zip(new, sliding_windows(model)):  # (window layers: see RaggedKVCache)
            if isinstance(c, RaggedKVCache):
                c.window = w
        return new if cache is None or not self.rows else [a.extend(b) for a, b in zip(cache, new)]

    def _layer_rows(self, rows: List[_Row], starts: List[int]):
        """An empty drafter layer cache for ``rows`` joining, and the prefill's callback that
        feeds it each pass's states paired with the tokens after those fed (each row's
        tokens from ``starts[b]``: a cache given with it holds the ones before)."""
        part = self.layer_rows.empty(len(rows))
        nexts = [r.history.tokens[s + 1 :] for r, s in zip(rows, starts)]

        def hidden_to(hidden, i, chunks):
            nxt = [t[i : i + len(c)] for t, c in zip(nexts, chunks)]
            self.layer_rows.join(part, hidden, nxt, [len(c) for c in chunks])

        return part, hidden_to

    def step(self) -> List[RowTokens]:
        """One pass over every row (rows waiting join first, up to ``max_rows``):
        what each row got. Finished rows leave the batch."""
        self._admit()
        for c in (self.cache or []) + (self.draft_cache or []):
            if isinstance(c, RaggedKVCache):  # (window layers: columns no window sees go)
                c.forget()
        rows = self.rows
        if not rows:
            return []
        if self._flight is not None or self._pipelines():
            return self._pipelined_step()
        drafts = self._drafts()
        fed, inputs = _padded(rows, drafts)
        logits, fused = self._forward(inputs)
        if any(r.processors for r in rows):
            logits = _process(logits, rows, fed)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = _sample(logprobs, rows)
        chosen_lp = mx.take_along_axis(logprobs, chosen[..., None], axis=-1)[..., 0]
        chosen_on_device = chosen
        chosen, chosen_lp = chosen.tolist(), chosen_lp.astype(mx.float32).tolist()

        tokens = [accepted(d, c) for d, c in zip(drafts, chosen)]
        kept = [len(t) for t in tokens]
        out = [self._emit(r, b, t, lps, logprobs)
               for b, (r, t, lps) in enumerate(zip(rows, tokens, chosen_lp))]  # fmt: skip
        for c in self.cache:
            c.advance(kept)
        if self.layer_rows is not None:  # (the drafter layer's rows of what each row kept)
            self.layer_rows.step(self.streams._main_hidden, chosen_on_device, kept)
        if self.draft_cache is not None:
            self._settle_drafts(rows)
        if any(r.uses_streams and o[3] is None for r, o in zip(rows, out)):  # next drafts
            n = max(min(r.draft_tokens, self.streams.config.num_streams) for r in rows)
            chains = self._stream_chains(mx.array([k - 1 for k in kept]), fused, n)
            for r, d in zip(rows, chains.tolist()):
                r.streams_draft = d if r.uses_streams else []
        return self._leave(out)

    def _emit(self, r: _Row, b: int, tokens: List[int], lps: List[float], logprobs) -> list:
        """Row ``r`` (the pass's row ``b``) gets ``tokens``, cut at a stop token or its
        length: the fields of its :class:`RowTokens`."""
        tokens, finish = _cut(r, tokens, self.stop)
        r.generated += len(tokens)
        r.history.extend(tokens)
        return [r.uid, tokens, lps[: len(tokens)], finish,
                [logprobs[b, j] for j in range(len(tokens))], None]  # fmt: skip

    def _leave(self, out: List[list]) -> List[RowTokens]:
        """The pass's :class:`RowTokens` (``out``, of the batch's first rows): finished
        rows take their caches and leave the batch."""
        if self.keep_caches:
            for b, o in enumerate(out):
                if o[3] is not None:
                    o[5] = self._extract(b)
        done = {o[0] for o in out if o[3] is not None}
        self._keep([r for r in self.rows if r.uid not in done])
        if self.streams is not None and not self.rows:
            self.streams.release()  # (nothing of the batch outlives it)
        return [RowTokens(*o) for o in out]

    def _stream_chains(self, nodes: mx.array, fused: bool, n: Optional[int] = None) -> mx.array:
        """``(B, gamma)``: each row's streams' first choices at its token ``nodes[b]``
        of the last pass (from that pass's stream rows if ``fused``, else a pass of
        their own); a drafter with a layer of its own (MTP, ParallelSpec): each row's
        chain of ``n`` levels from its last kept token (``nodes``: the layer's own rows,
        kept at the pass)."""
        if self.layer_rows is not None:
            return self.layer_rows.chains(n)
        if self.attached:  # (Medusa heads)
            slog = self.streams.rows_heads(nodes)
        elif fused:
            slog = self.streams.fused_streams(nodes)
        else:
            slog = self.streams.rows_streams(nodes, self.cache)
        return mx.argmax(slog, axis=-1)

    def _drafts(self) -> List[List[int]]:
        """Each row's draft for the next pass (shorter near its ``max_tokens``)."""
        rows = self.rows
        lengths = [min(r.draft_tokens, r.max_tokens - r.generated - 1) for r in rows]
        if self.draft_model is None:
            return [_row_draft(r, n, r.streams_draft) for r, n in zip(rows, lengths)]
        chains = self._model_drafts(rows, lengths)
        drafts = [_row_draft(r, n, c) for r, n, c in zip(rows, lengths, chains)]
        for r, d, c in zip(rows, drafts, chains):  # (the draft cache was fed the chain)
            r.draft_cache_end = None if d == c[: len(d)] else r.fed + 1
        return drafts

    def _forward(self, inputs: mx.array) -> Tuple[mx.array, bool]:
        """The verifying pass over every row's inputs: its logits, and whether the
        streams' rows went through it too (a shared-mode model's always do)."""
        if self.streams is None:
            return self.model(inputs, cache=self.cache), False
        fused = (
            self.shared
            or self.fused
            and not self.attached
            and any(r.uses_streams for r in self.rows)
        )
        return self.streams.rows_pass(inputs, self.cache, streams=fused), fused

    # ---- pipelined passes ---------------------------------------------------------
    def _pipelines(self) -> bool:
        """Whether every row's next input can be made on the device: no logits
        processors; rows drafting by lookup, and a draft model's, only where they draft
        on the device (lookup rows from the start of a flight of passes, when the
        device takes a copy of the rows' tokens; a draft model's while a row drafts,
        since its cache is fed only then)."""
        looks_up = any(_looks_up(r) for r in self.rows)
        return (
            self.pipeline
            # (a drafter layer's rows, fed and settled on the device: on a GPU by default)
            and (self.layer_rows is None or self.drafts_on_device)
            # (a draft model's rows only while one drafts: its cache then never lags)
            and (self.draft_model is None
                 or self.drafts_on_device and any(r.draft_tokens for r in self.rows))
            and all(not r.processors for r in self.rows)
            and (not looks_up or self.drafts_on_device
                 and (self._flight is None or self._history is not None))  # fmt: skip
        )

    def _pipelined_step(self) -> List[RowTokens]:
        """Launches the next pass, then reads the one before it (mlx-lm's
        ``mx.async_eval`` pipelining): the host's work on one pass overlaps the
        device's on the next. Each pass's inputs come from the last one on the
        device: the token it chose at each row's last kept position, then the
        streams' chain there (:meth:`_launch`)."""
        p = self._flight or self._launch(self._host_inputs())
        self._flight = self._launch(self._inputs_after(p)) if self._pipelines() else None
        if self._flight is None:
            self._history = None  # (the host's tokens are the rows' again)
        out = self._read(p)
        if self._flight is None and self.draft_model is not None and self.rows:
            for r in self.rows:  # (the draft caches drop the chain drafted for no pass)
                r.draft_cache_end = None
            self._settle_drafts(self.rows)
        return out

    def _host_inputs(self) -> Tuple[mx.array, mx.array, mx.array]:
        """Each row's pending token and the draft the host holds for it, padded, the
        drafts' lengths, and which rows' lookup replaced the draft model's chain; the
        rows' tokens copied to the device if any looks up."""
        drafts = self._drafts()
        if any(_looks_up(r) for r in self.rows):
            self._history = _device_history([r.history.tokens for r in self.rows])
        replaced = mx.array([r.draft_cache_end is not None for r in self.rows])
        return _padded(self.rows, drafts)[1], mx.array([len(d) for d in drafts]), replaced

    def _inputs_after(self, p: "_Pass") -> Tuple[mx.array, mx.array, mx.array]:
        """The next pass's inputs from ``p``'s, on the device; rows that joined since
        feed their pending token and the lookup draft the host finds in their tokens,
        as wide as the pass allows (a draft model's rows: none, its cache not fed
        yet); their tokens join the device's copy."""
        inputs, drafts, joined = p.next_inputs, p.next_drafts, self.rows[len(p.rows) :]
        replaced = p.next_replaced
        if joined:
            W = inputs.shape[1]
            room = [min(r.draft_tokens, r.max_tokens - r.generated - 1, W - 1) for r in joined]
            host = [[] if self.draft_model is not None else _row_draft(r, n, r.streams_draft)
                    for r, n in zip(joined, room)]  # fmt: skip
            pad = [[r.history.tokens[-1], *d] + [r.history.tokens[-1]] * (W - 1 - len(d))
                   for r, d in zip(joined, host)]  # fmt: skip
            inputs = mx.concatenate([inputs, mx.array(pad, dtype=inputs.dtype)])
            found = mx.array([len(d) for d in host], dtype=drafts.dtype)
            drafts = mx.concatenate([drafts, found])
            replaced = mx.concatenate([replaced, mx.zeros(len(joined), dtype=mx.bool_)])
            if self._history is not None:
                new = _device_history([r.history.tokens for r in joined])
                self._history = _stacked(self._history, new)
        return inputs, drafts, replaced

    def _launch(self, fed: Tuple[mx.array, mx.array, mx.array]) -> "_Pass":
        """One pass over every row, every output left on the device: what each row
        keeps, the caches advanced over it, and the next pass's inputs."""
        (inputs, drafts, replaced), rows = fed, list(self.rows)
        W = inputs.shape[1]
        logits, fused = self._forward(inputs)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = _sample(logprobs, rows).astype(inputs.dtype)
        chosen_lp = mx.take_along_axis(logprobs, chosen[..., None], axis=-1)[..., 0]
        accepted = accepted_on_device(inputs, chosen, drafts)
        before = self.cache[0].offset
        for c in self.cache:
            c.advance_on_device(accepted + 1, W)
        bonus = mx.take_along_axis(chosen, accepted[:, None], axis=1)
        if self._history is not None:  # each row's kept tokens join its copy
            self._history = _extended(self._history, chosen, accepted, rows)
        if self.draft_model is not None:
            lengths = [r.draft_tokens for r in rows]
            # (S: the row's tokens from its pending one on: the pass's first input, then
            # its choices, of which the first accepted + 1 are the row's)
            seq = mx.concatenate([inputs[:, :1], chosen], axis=1)
            chain = self._model_drafts_on_device(rows, seq, accepted, before, replaced, lengths)
        else:
            lengths = [min(r.draft_tokens, self.streams.config.num_streams)
                       if r.uses_streams else 0 for r in rows]  # fmt: skip
            if self.layer_rows is not None:  # (the drafter layer's rows of what each kept)
                self.layer_rows.step(self.streams._main_hidden, chosen, accepted + 1)
            chain = None
            if max(lengths):
                chain = self._stream_chains(accepted, fused, max(lengths))[:, : max(lengths)]
        next_drafts, counts, took = self._next_drafts(rows, chain, lengths)
        next_inputs = mx.concatenate([bonus, next_drafts.astype(bonus.dtype)], axis=1)
        # (a draft model's rows whose lookup replaced its chain: their draft caches drop it)
        next_replaced = took
        if chain is not None and self.draft_model is not None:
            width = next_drafts.shape[1]
            differs = (next_drafts != _widened(chain, width)) & (mx.arange(width) < counts[:, None])
            next_replaced = took & differs.any(axis=1)
        mx.async_eval(chosen, chosen_lp, accepted, next_inputs, counts, next_replaced)
        return _Pass(rows, chosen, chosen_lp, logprobs, accepted, next_inputs, counts,
                     None if self.draft_model is not None else chain, lengths, replaced,
                     next_replaced, max(lengths) if self.draft_model is not None else -1)  # fmt: skip

    def _model_drafts_on_device(self, rows: List[_Row], seq: mx.array, accepted: mx.array,
                                before: mx.array, replaced: mx.array,
                                lengths: List[int]) -> Optional[mx.array]:  # fmt: skip
        """:meth:`_settle_drafts` then :meth:`_model_drafts` on the device, before the
        host reads the pass: each row's draft cache keeps the tokens it fed that the
        pass accepted (none of the chain where its lookup ``replaced`` it), then is fed
        the row's tokens it lacks, up to its pending one (``seq``'s, from the cache end
        ``before`` the pass), and drafts the greedy chain, ``(B, max(lengths))``."""
        old = self.draft_cache[0].offset
        limit = mx.where(replaced, before + 1, before + accepted + 1)
        kept = mx.minimum(old, limit) - old  # (0 or fewer)
        for c in self.draft_cache:
            c.advance_on_device(kept, 0)
        most = max(lengths)
        if most == 0:
            return None
        held = old + kept - before  # of the row's tokens in seq
        unfed = accepted + 2 - held
        width = seq.shape[1] if any(_looks_up(r) for r in rows) else 2
        at = mx.minimum(held[:, None] + mx.arange(width), seq.shape[1] - 1)
        logits = self.draft_model(mx.take_along_axis(seq, at, axis=1), cache=self.draft_cache)
        last = mx.take_along_axis(logits, (unfed - 1)[:, None, None], axis=1)[:, 0]
        token = mx.argmax(last[:, : self.vocab], axis=-1)
        for c in self.draft_cache:
            c.advance_on_device(unfed, width)
        chain, one = [token], mx.ones(len(rows), dtype=mx.int32)
        for _ in range(most - 1):
            logits = self.draft_model(token[:, None], cache=self.draft_cache)
            token = mx.argmax(logits[:, -1, : self.vocab], axis=-1)
            for c in self.draft_cache:
                c.advance_on_device(one, 1)
            chain.append(token)
        return mx.stack(chain, axis=1)

    def _next_drafts(self, rows: List[_Row], chain: Optional[mx.array],
                     lengths: List[int]) -> Tuple[mx.array, mx.array, mx.array]:  # fmt: skip
        """Each row's next draft on the device, ``(B, D)``, its length, ``(B,)``, and
        whether it is its lookup: its streams' or the draft model's ``chain``
        (``lengths[b]`` tokens of it), or its lookup in the device's copy of its tokens
        (``"...+ngram"``: where that has a match)."""
        B = len(rows)
        counts = mx.array(lengths, dtype=mx.int32)
        took = mx.zeros(B, dtype=mx.bool_)
        lookup = [r.draft_tokens if _looks_up(r) else 0 for r in rows]
        width = max(lengths + lookup)
        if width == 0:
            return mx.zeros((B, 0), dtype=mx.int32), counts, took
        drafts = mx.zeros((B, width), dtype=mx.int32) if chain is None else _widened(chain, width)
        if max(lookup):
            found, found_n = device_lookups(*self._history, max(lookup))
            found_n = mx.minimum(found_n, mx.array(lookup, dtype=mx.int32))
            # lookup rows take theirs; "...+ngram" rows where it matched
            took = mx.array([_looks_up(r) and r.draft == "ngram" for r in rows]) | (
                (found_n > 0) & mx.array([_looks_up(r) for r in rows])
            )
            drafts = mx.where(took[:, None], _widened(found, width), drafts)
            counts = mx.where(took, found_n, counts)
        return drafts, counts, took

    def _read(self, p: "_Pass") -> List[RowTokens]:
        """What each row of ``p`` got; the caches' ends settled; finished rows leave."""
        chosen, lps = p.chosen.tolist(), p.chosen_lp.astype(mx.float32).tolist()
        accepted = p.accepted.tolist()
        chain = p.stream_chain.tolist() if p.stream_chain is not None else None
        out = []
        for b, r in enumerate(p.rows):
            out.append(self._emit(r, b, chosen[b][: accepted[b] + 1], lps[b], p.logprobs))
            # (the streams' chain the next pass drafted from, for a step that reads it)
            r.streams_draft = chain[b][: p.stream_lengths[b]] if chain else []
        joined = len(self.rows) - len(p.rows)  # (rows that joined after p kept nothing of it)
        before = self.cache[0].ends[: len(p.rows)]
        for c in self.cache:
            c.settle([a + 1 for a in accepted] + [0] * joined)
        if self.layer_rows is not None:
            self.layer_rows.settle([a + 1 for a in accepted], joined)
        if p.draft_ops >= 0:
            self._settle_model_drafts(p, accepted, before, joined)
        return self._leave(out)

    def _settle_model_drafts(self, p: "_Pass", accepted: List[int], before: List[int],
                             joined: int) -> None:  # fmt: skip
        """The host's ends of the draft caches after what :meth:`_model_drafts_on_device`
        did on the device for pass ``p``, in the same order."""
        old = self.draft_cache[0].ends[: len(p.rows)]
        limit = [b + (1 if r else a + 1) for b, a, r in zip(before, accepted,
                                                             p.fed_replaced.tolist())]  # fmt: skip
        kept = [min(o, m) - o for o, m in zip(old, limit)]
        held = [o + k - b for o, k, b in zip(old, kept, before)]
        pad = [0] * joined
        steps = [kept]
        if p.draft_ops > 0:
            steps.append([a + 2 - h for a, h in zip(accepted, held)])
            steps += [[1] * len(p.rows)] * (p.draft_ops - 1)
        for c in self.draft_cache:
            for step in steps:
                c.settle(step + pad)

    def _settle_drafts(self, rows: List[_Row]) -> None:
        """Each row's draft cache keeps only the tokens it fed that were accepted: at
        most all of the row's tokens but the last (its rejected drafts are dropped),
        and none of the draft model's chain where a lookup draft replaced it."""
        ends = [r.fed if r.draft_cache_end is None else r.draft_cache_end for r in rows]
        for c in self.draft_cache:
            c.set_ends([min(e, end) for e, end in zip(c.ends, ends)])

    def _model_drafts(self, rows: List[_Row], lengths: List[int]) -> List[List[int]]:
        """Each row's greedy chain of the draft model, ``lengths[b]`` tokens long. The
        first pass feeds every row what its draft cache lacks (its last accepted
        tokens, padded to the longest), the next ones each row's last draft token."""
        most = max(lengths)
        if most == 0:
            return [[] for _ in rows]
        held = self.draft_cache[0].ends
        unfed = [r.history.tokens[e - r.base :] for r, e in zip(rows, held)]
        width = max(map(len, unfed))
        inputs = mx.array([u + [u[-1]] * (width - len(u)) for u in unfed])
        logits = self.draft_model(inputs, cache=self.draft_cache)
        last = mx.array([len(u) - 1 for u in unfed])
        token = mx.argmax(logits[mx.arange(len(rows)), last, : self.vocab], axis=-1)
        for c in self.draft_cache:
            c.advance([len(u) for u in unfed])
        chain = [token]
        for _ in range(most - 1):
            logits = self.draft_model(token[:, None], cache=self.draft_cache)
            token = mx.argmax(logits[:, -1, : self.vocab], axis=-1)
            for c in self.draft_cache:
                c.advance([1] * len(rows))
            chain.append(token)
        drafts = mx.stack(chain, axis=1).tolist()
        return [d[:n] for d, n in zip(drafts, lengths)]


@dataclass
class _Pass:
    """A pass launched on the device (:meth:`SpecBatcher._launch`), read later."""

    rows: List[_Row]  # the rows it fed, in order
    chosen: mx.array  # (B, W) the token chosen at each fed position
    chosen_lp: mx.array  # (B, W) their log-probabilities
    logprobs: mx.array  # (B, W, V)
    accepted: mx.array  # (B,) drafts each row kept (it keeps one token more)
    next_inputs: mx.array  # (B, 1 + drafts) the next pass's: the bonus token, then drafts
    next_drafts: mx.array  # (B,) the drafts each row feeds there
    stream_chain: Optional[mx.array]  # (B, S) the streams' chains at each row's last token
    stream_lengths: List[int]  # how much of it each row drafts with
    fed_replaced: mx.array  # (B,) whether a row's lookup replaced the draft model's chain...
    next_replaced: mx.array  # (B,) ...in the drafts it fed, and in its next ones
    draft_ops: int  # the draft model's passes for the next drafts (-1: no draft model)

    def filter(self, index: List[int]) -> "_Pass":
        """The pass's rows ``index`` only (the batch's rows, in order)."""
        at = mx.array(index, dtype=mx.int32)
        chain = None if self.stream_chain is None else self.stream_chain[at]
        return _Pass([self.rows[i] for i in index], self.chosen[at], self.chosen_lp[at],
                     self.logprobs[at], self.accepted[at], self.next_inputs[at],
                     self.next_drafts[at], chain, [self.stream_lengths[i] for i in index],
                     self.fed_replaced[at], self.next_replaced[at], self.draft_ops)  # fmt: skip


def _cut(row: _Row, tokens: List[int], stop) -> Tuple[List[int], Optional[str]]:
    """``tokens`` up to the row's first stop token or its ``max_tokens``, and why the
    row ends there (``"stop"``, ``"length"``; ``None``: it goes on)."""
    for j, t in enumerate(tokens):
        if t in stop or row.generated + j + 1 == row.max_tokens:
            return tokens[: j + 1], "stop" if t in stop else "length"
    return tokens, None


def _padded(rows: List[_Row], drafts: List[List[int]]) -> Tuple[List[List[int]], mx.array]:
    """Each row's pending token and draft (``fed``), and the pass's ``(B, W)`` inputs:
    them, padded with each row's last (padding is never kept)."""
    fed = [[r.history.tokens[-1]] + d for r, d in zip(rows, drafts)]
    return fed, padded_rows(fed)


def _row_draft(row: _Row, n: int, chain: List[int]) -> List[int]:
    """Up to ``n`` tokens of ``row``'s draft from its own source: its lookup chain
    (``"ngram"``, and ``"...+ngram"`` where it has a match), else ``chain`` (its
    streams' or the draft model's)."""
    if not n:
        return []
    if "ngram" in row.draft:
        lookup = row.history.draft(n)
        if lookup or row.draft == "ngram":
            return lookup
    return chain[:n]


def _looks_up(row: _Row) -> bool:
    """Whether ``row`` drafts by prompt lookup (alone or before its streams)."""
    return row.draft_tokens > 0 and "ngram" in row.draft


def _device_history(rows: List[List[int]], room: int = 256) -> Tuple[mx.array, mx.array]:
    """The rows' tokens on the device, ``(B, C)`` with room after the longest, and
    their numbers, ``(B,)``."""
    width = max(map(len, rows)) + room
    return (mx.array([r + [0] * (width - len(r)) for r in rows], dtype=mx.int32),
            mx.array([len(r) for r in rows], dtype=mx.int32))  # fmt: skip


def _stacked(a: Tuple[mx.array, mx.array], b: Tuple[mx.array, mx.array]):
    """Two device histories' rows, ``a``'s then ``b``'s (the narrower one widened)."""
    width = max(a[0].shape[1], b[0].shape[1])
    pad = [mx.pad(h, [(0, 0), (0, width - h.shape[1])]) for h in (a[0], b[0])]
    return mx.concatenate(pad), mx.concatenate([a[1], b[1]])


def _extended(history: Tuple[mx.array, mx.array], chosen: mx.array, accepted: mx.array,
              rows: List[_Row]) -> Tuple[mx.array, mx.array]:  # fmt: skip
    """The device history with each row's pass's choices written at its end, of which
    it keeps ``accepted[b] + 1`` (the rest is written over later). Its room grows
    before a row's tokens could reach its end: the host's count, which lags by at most
    the passes in flight, plus three passes' width."""
    tokens, lengths = history
    W = chosen.shape[1]
    need = max(len(r.history.tokens) for r in rows) + 3 * (W + max(r.draft_tokens for r in rows))
    if tokens.shape[1] < need:
        tokens = mx.pad(tokens, [(0, 0), (0, need + 256 - tokens.shape[1])])
    at = lengths[:, None] + mx.arange(W, dtype=mx.int32)
    tokens = mx.put_along_axis(tokens, at, chosen.astype(tokens.dtype), axis=1)
    return tokens, lengths + accepted.astype(lengths.dtype) + 1


def _widened(drafts: mx.array, width: int) -> mx.array:
    """``(B, width)``: ``drafts``' first ``width`` columns, padded with its last."""
    have = drafts.shape[1]
    if have >= width:
        return drafts[:, :width].astype(mx.int32)
    return mx.concatenate([drafts, mx.repeat(drafts[:, -1:], width - have, axis=1)],
                          axis=1).astype(mx.int32)  # fmt: skip


def _sample(logprobs: mx.array, rows: List[_Row]) -> mx.array:
    """``(rows, width)`` tokens: one argmax over greedy rows, one call of a sampler
    that every row shares, else each row's own."""
    greedy = [r.sampler is None or getattr(r.sampler, "greedy", False) for r in rows]
    chosen = _greedy(logprobs)
    if all(greedy):
        return chosen
    if len({id(r.sampler) for r in rows}) == 1:
        return rows[0].sampler(logprobs.reshape(-1, logprobs.shape[-1])).reshape(chosen.shape)
    return mx.stack([chosen[b] if g else r.sampler(logprobs[b])
                     for b, (r, g) in enumerate(zip(rows, greedy))])  # fmt: skip


def batch_generate_step(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: Union[int, Sequence[int]] = 128,
    stop_tokens: Sequence[int] = (),
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable]] = None,
    draft: Optional[str] = "auto",
    draft_model=None,
    num_draft_tokens: Optional[int] = None,
    stream_pass: Optional[str] = None,
    pipeline: Optional[bool] = None,
    prefill_step_size: int = 2048,
    prefill_batch_size: Optional[int] = None,
    prompt_caches: Optional[Sequence[list]] = None,
    return_prompt_caches: bool = False,
) -> Iterator[List[RowTokens]]:
    """Decodes ``prompts`` together, each row speculating (:class:`SpecBatcher`,
    every row from the start).

    Args:
        model: an mlx-lm model whose layers all use a plain ``KVCache``.
        prompts: token ids, one list per row (each at least one token).
        max_tokens (int or list): tokens to generate, for all rows or per row.
        stop_tokens: tokens that end a row (included in its tokens, with
          ``finish_reason="stop"``).
        sampler: mlx-lm sampler over ``(tokens, vocab)`` log-probabilities (default:
          greedy), the same for every row.
        logits_processors: mlx-lm logits processors, applied to every row with that
          row's own history.
        draft (str or None): where each row's drafts come from:

          * ``"streams"``: the chain of the model's streams (or Medusa heads, or MTP
            layer);
          * ``"ngram"``: prompt lookup; with ``draft_model``, a row's lookup chain
            where its tokens have a match, else the draft model's chain;
          * ``"streams+ngram"``: the lookup chain where it matches, else the streams'
            (a batch verifies chains, not merged trees);
          * ``"draft_model"``: the ``draft_model``'s greedy chain;
          * ``"auto"``: the draft model if given, else what
            ``python -m mlx_specstream.tune --batch-size K`` measured fastest for a
            batch on this device (the config's ``batch``: its draft, draft length,
            stream pass and pipelining), else the model's streams if it has streams that draft on
            this device (``tree_depth`` as tuned here is not 0), else prompt lookup;
          * ``None``: one token per row per pass (plain batched decoding).
        draft_model: an mlx-lm model with the same tokenizer.
        num_draft_tokens (int): the longest draft (default 10 for prompt lookup, as
          transformers', also with ``"streams+ngram"``, whose streams' chains stop
          at the number of streams; 3 for a draft model, as ``mlx_lm.server``; the
          ``tree_depth`` tuned for this device, else the number of streams, its
          most, for ``"streams"``).
        stream_pass (str, optional): with streams, ``"fused"`` (their rows go
          through the verifying pass) or ``"split"`` (a second, shorter pass), as
          :class:`SpecBatcher` (default: as tuned for batches here, else ``"fused"``).
        pipeline (bool, optional): launch each pass before reading the last, where
          every row's next input can be made on the device; ``None``: rows drafting
          by lookup, a draft model or a drafter layer only on a GPU (:class:`SpecBatcher`).
        prefill_step_size (int): prompt tokens per prefill pass (shared among the rows
          prefilled together).
        prefill_batch_size (int, optional): most prompts prefilled in one pass (default:
          all of them), as mlx-lm's.
        prompt_caches: per prompt, a cache holding context before it (the model's
          ``KVCache`` layers, then the draft model's, holding as many tokens), as
          mlx-lm's ``prompt_caches``: the prompt is fed after it. They are copied, not
          updated in place.
        return_prompt_caches (bool): a finished row's :attr:`RowTokens.cache` holds
          its context, prompt and tokens but the last (the same layout).

    Yields:
        list of :class:`RowTokens`: per pass, what each row that was decoded got
        (``uid``: the prompt's index).
    """
    if draft not in DRAFTS:
        raise ValueError(f"draft={draft!r}: batch_generate drafts with one of {DRAFTS}")
    tuned = tuned_batch(model) if draft == "auto" and draft_model is None else None
    if tuned is not None:
        draft = tuned["draft"]
        if num_draft_tokens is None:
            num_draft_tokens = tuned["num_draft_tokens"] or None
        stream_pass = stream_pass or tuned["stream_pass"]
        pipeline = tuned.get("pipeline") if pipeline is None else pipeline
    elif draft == "auto":
        own = stream_runtime(model) is not None and tuned_depth(model) > 0
        draft = "draft_model" if draft_model is not None else "streams" if own else "ngram"
    stream_pass = stream_pass or "fused"
    if draft_model is not None and draft == "ngram":  # lookup merged into its chains
        draft = "draft_model+ngram"
    if (draft in MODEL_ROW_DRAFTS) != (draft_model is not None):
        raise ValueError(
            f"draft={draft!r} with draft_model={'a model' if draft_model else None}: "
            "draft='draft_model' (or 'ngram' merged in) drafts with a draft model, and only "
            "they use one"
        )
    uses_streams = draft in ("streams", "streams+ngram")
    if uses_streams and stream_runtime(model) is None:
        raise ValueError(f"draft={draft!r}: {no_own_drafts(model)}")
    streams = stream_runtime(model).config.num_streams if uses_streams else None
    if num_draft_tokens is None:
        if draft == "streams":
            num_draft_tokens = tuned_depth(model) or streams
        else:
            num_draft_tokens = DRAFT_MODEL_TOKENS if draft_model is not None else NGRAM_DRAFT_TOKENS
    if not (isinstance(num_draft_tokens, int) and num_draft_tokens >= 1):
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be an integer >= 1.")
    if draft == "streams" and num_draft_tokens > streams:
        raise ValueError(f"num_draft_tokens={num_draft_tokens}: the model's streams draft "
                         f"{streams} tokens")  # fmt: skip
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_tokens for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
    if prompt_caches is not None and len(prompt_caches) != len(prompts):
        raise ValueError(f"{len(prompt_caches)} prompt_caches for {len(prompts)} prompts")
    batcher = SpecBatcher(model, stop_tokens, prefill_step_size,
                          keep_caches=return_prompt_caches, draft_model=draft_model,
                          streams=uses_streams, stream_pass=stream_pass,
                          pipeline=pipeline,
                          prefill_batch_size=prefill_batch_size)  # fmt: skip
    layers = len(model_caches(model))
    index = {}
    for i, (p, n) in enumerate(zip(prompts, limits)):
        if n > 0:
            given = copy.deepcopy(list(prompt_caches[i])) if prompt_caches else []
            uid = batcher.insert(p, given[:layers] or None, draft_cache=given[layers:] or None,
                                 before=bool(given), max_tokens=n, sampler=sampler,
                                 logits_processors=logits_processors,
                                 num_draft_tokens=num_draft_tokens if draft else 0,
                                 draft=draft if draft else None)  # fmt: skip
            index[uid] = i
    while len(batcher):
        yield [r._replace(uid=index[r.uid]) for r in batcher.step()]


def accepted_on_device(inputs: mx.array, chosen: mx.array, drafts: mx.array) -> mx.array:
    """``(B,)``: how many drafts each row keeps (:func:`accepted`, on the device): those
    before the first that is not the choice at the position before it. Row ``b`` fed
    its pending token, then ``drafts[b]`` drafts, then padding.

    Example: ``inputs = [[5, 6, 7, 9]]``, ``chosen = [[6, 7, 8, 1]]``, ``drafts =
    [3]``: 6 and 7 are kept, 9 is not (the choice after 7 was 8): ``[2]``.
    """
    W = inputs.shape[1]
    match = (chosen[:, :-1] == inputs[:, 1:]) & (mx.arange(W - 1) < drafts[:, None])
    return mx.cumprod(match.astype(mx.int32), axis=1).sum(axis=1)


def accepted(draft: Sequence[int], chosen: Sequence[int]) -> List[int]:
    """The tokens a row keeps from a pass: its choices up to and including the first
    one that is not the draft's next token (all of them when the whole draft is).

    Example:
        >>> accepted([5, 6, 7], [5, 6, 9, 2])   # 7 was not chosen: keep 5, 6, 9
        [5, 6, 9]
        >>> accepted([5, 6], [5, 6, 1])   # the whole draft, and the pass's next token
        [5, 6, 1]
        >>> accepted([], [4])
        [4]
    """
    n = 1
    while n <= len(draft) and draft[n - 1] == chosen[n - 1]:
        n += 1
    return list(chosen[:n])


def _process(logits: mx.array, rows: List[_Row], fed: List[List[int]]) -> mx.array:
    """Each row's processors at each fed position, with the history up to it."""
    out = []
    for b, (r, f) in enumerate(zip(rows, fed)):
        history = mx.array(r.history.tokens[:-1] + f)
        before = len(r.history.tokens)
        for j in range(logits.shape[1]):
            lg = logits[b, j][None]
            for p in r.processors:
                lg = p(history[: before + min(j, len(f) - 1)], lg)
            out.append(lg)
    return mx.concatenate(out).reshape(logits.shape)


@dataclass
class BatchStats:
    """Counts and times of one :func:`batch_generate` call (mlx-lm's names)."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_time: float = 0.0
    forward_passes: int = 0  # decode passes over the whole batch
    row_passes: int = 0  # the rows those passes decoded, summed over passes
    peak_memory: float = 0.0  # GB

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / max(self.prompt_time, 1e-9)

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / max(self.generation_time, 1e-9)

    @property
    def tokens_per_pass(self) -> float:
        """τ: tokens a row got per pass that decoded it."""
        return self.generation_tokens / max(self.row_passes, 1)


@dataclass
class BatchResponse:
    """What :func:`batch_generate` returns (mlx-lm's ``BatchResponse`` fields, then the
    finish reasons)."""

    texts: List[str]
    stats: BatchStats
    caches: Optional[List[list]] = None
    token_ids: Optional[List[List[int]]] = None
    logprobs: Optional[List[List[float]]] = None
    finish_reasons: List[Optional[str]] = field(default_factory=list)


def batch_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_tokens: Union[int, Sequence[int]] = 128,
    prompt_caches: Optional[Sequence[list]] = None,
    verbose: bool = False,
    return_prompt_caches: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    **kwargs,
) -> BatchResponse:
    """Generates a response to every prompt, in one batch whose rows speculate
    with prompt lookup; as mlx-lm's ``batch_generate`` (a row's stop token is not
    part of its text or token ids).

    Args:
        model: the model (every layer with a plain ``KVCache``).
        tokenizer: mlx-lm's ``TokenizerWrapper``; its EOS tokens end a row.
        prompts: token ids, one list per prompt.
        max_tokens (int or list): tokens per response, for all or per prompt.
        prompt_caches: per prompt, a cache holding context before it (see
          :func:`batch_generate_step`); copied, not updated in place.
        verbose (bool): print progress and speeds.
        return_prompt_caches (bool): also return each response's cache (its
          context, prompt and response but the last token).
        return_token_ids, return_logprobs (bool): also return each response's
          token ids and their log-probabilities.
        kwargs: :func:`batch_generate_step`'s options (``sampler``,
          ``logits_processors``, ``draft``, ``num_draft_tokens``, ...).

    Returns:
        BatchResponse: texts in the order of ``prompts``, and the statistics.
    """
    stats = BatchStats(prompt_tokens=sum(len(p) for p in prompts))
    tokens = [[] for _ in prompts]
    logprobs = [[] for _ in prompts]
    finish: List[Optional[str]] = [None] * len(prompts)
    caches: List[Optional[list]] = [None] * len(prompts)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    steps = batch_generate_step(
        model, prompts, max_tokens=max_tokens, stop_tokens=tokenizer.eos_token_ids,
        prompt_caches=prompt_caches, return_prompt_caches=return_prompt_caches, **kwargs
    )  # fmt: skip
    for i, out in enumerate(steps):
        if i == 0:  # the first pass ends the prompt's processing, as in mlx-lm's count
            stats.prompt_time = time.perf_counter() - tic
            tic = time.perf_counter()
        stats.forward_passes += 1
        stats.row_passes += len(out)
        for r in out:
            stats.generation_tokens += len(r.tokens)
            end = len(r.tokens) - (r.finish_reason == "stop")
            tokens[r.uid] += r.tokens[:end]
            logprobs[r.uid] += r.logprobs[:end]
            finish[r.uid], caches[r.uid] = r.finish_reason, r.cache
            if verbose and r.finish_reason:
                print(f"[batch_generate] Finished prompt {r.uid}", end="\r")
    stats.generation_time = time.perf_counter() - tic
    stats.peak_memory = mx.get_peak_memory() / 1e9
    texts = [tokenizer.decode(t) for t in tokens]
    if verbose:
        print(f"[batch_generate] Prompt: {stats.prompt_tokens} tokens, "
              f"{stats.prompt_tps:.3f} tokens-per-sec")  # fmt: skip
        print(f"[batch_generate] Generation: {stats.generation_tokens} tokens, "
              f"{stats.generation_tps:.3f} tokens-per-sec, "
              f"{stats.tokens_per_pass:.2f} tokens per row per pass")  # fmt: skip
        print(f"[batch_generate] Peak memory: {stats.peak_memory:.3f} GB")
    return BatchResponse(
        texts,
        stats,
        caches if return_prompt_caches else None,
        tokens if return_token_ids else None,
        logprobs if return_logprobs else None,
        finish,
    )

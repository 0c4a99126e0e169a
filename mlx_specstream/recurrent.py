"""Speculation verified as chains through the model's own passes: on models with
recurrent layers (mlx-lm's hybrid and state-space models: Qwen3-Next, Qwen3.5, LFM2,
Mamba, RWKV-7, ...) and on models the tree verifier cannot take (:func:`tree_refusal`:
nanochat, talkie, MiniMax M3, LongCat-Flash, AFM 7, DeepSeek V4.1, ...), whose own
RoPE, masks and caches then serve, as in mlx-lm's draft-model decoding.

A recurrent layer (a Gated DeltaNet, a Mamba mixer, a short convolution) keeps one
state in an ``ArraysCache``, not a row per token, so a rejected draft cannot be
trimmed away as a KV cache's rows can; mlx-lm's draft-model decoding refuses these
models for that reason. Here each pass feeds the tokens already accepted but not yet
in the caches (``pending``: the last step's accepted drafts and its correction or
bonus token), then a chain of drafts. Every recurrent mixer is called twice, on the
pending tokens and then on the drafts, and the state between the two calls is kept
aside. When a draft is rejected, each recurrent cache goes back to the state kept
aside, each KV cache is trimmed to the same token, and the accepted tokens become
the next pass's pending tokens. When every draft is accepted nothing is undone. A
layer cache that cannot be trimmed but whose updates only assign new arrays
(:func:`kept_whole`: DeepSeek V4.1's) is kept aside whole before each pass.

Example: the caches hold ``[p0 p1]``, pending is ``[a]`` and the drafts are
``[d1 d2 d3]``: the pass feeds ``[a d1 d2 d3]``, split after ``a``. With ``d1``
accepted and ``x`` drawn instead of ``d2``, the caches go back to ``[p0 p1 a]`` and
the next pass feeds ``[d1 x]`` and its drafts.

A recurrent layer reads its tokens in order, so it verifies a chain; the drafts are
prompt lookup's (:class:`LookupDrafts`) or a draft model's (:class:`DraftModelChain`,
itself recurrent or not, which keeps its state after each draft it feeds). The model's
own lossless streams (:class:`StreamDrafts`) draft chains or trees: a tree goes through
the attention layers with the tree verifier's masks and positions, and each recurrent
mixer reads it after the split as a batch of its root-to-leaf paths, each from the state
after the pending tokens (:func:`_along_paths`).

The cost over a plain pass: the recurrent mixers' weights are read twice per step,
the pending tokens ride along again, and a tree's paths repeat their shared nodes in
the mixers (on a bandwidth-bound device, rows are nearly free). With ``kv_bits`` the KV
layers convert where mlx-lm's loop converts them (:meth:`ChainCache.draft_room`).
"""

import ast
import copy
import inspect
import textwrap
import weakref
from typing import Callable, Generator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache

from .cache import (
    WindowKVCache,
    commit_path,
    drafter_state_of,
    keep_drafter_state,
    model_caches,
)
from .draft_confidence import confident_levels, own_cut, top_probabilities, unsure
from .draft_model import split_pair
from .draft_schedule import DraftLength
from .dynamic_tree import draft_tree, drawn_tree, level_budgets
from .ngram import NGRAM_DRAFT_TOKENS, NgramIndex
from .tree import (
    StaticTree,
    accept_by_rejection,
    children_of,
    depth_limited,
    merge_chains,
    path_rows,
    subtree_parents,
    top_k_desc,
)
from .config import VerifierConfig
from .settings import apply_processors
from .layout import layout_of
from .model_parts import vocab_size
from .streams import _swap_call, get_runtime
from .support import CHAIN_NOTE, TreeUnsupported, check_supported, tree_on_chains_refusal


class SplitPoint:
    """Where the recurrent mixers split the current pass (``at`` tokens, then
    the rest; ``None``: one call), and the states kept between the two calls."""

    def __init__(self):
        self.at: Optional[int] = None
        self.kept: List[Tuple[ArraysCache, list]] = []
        self.wrote: dict = {}  # id(cache) -> the slots the mixers split so far wrote
        # A tree after the split: the rest runs as a batch of its root-to-leaf paths
        # (tree.path_rows, as device arrays), from copies of the state kept aside.
        self.paths: Optional[Tuple[mx.array, mx.array, mx.array]] = None
        # Per mixer call along paths: its cache, and the slots it wrote, one row a path.
        self.path_states: List[Tuple[ArraysCache, dict]] = []


def attends(model: nn.Module) -> bool:
    """Whether some layer of ``model`` keeps keys and values (a cache other than a
    recurrent ``ArraysCache``), alone or in a ``CacheList``: Mamba's and RWKV-7's
    layers do not, so a tree of drafts needs no attention mask there."""
    made = model.make_cache() if hasattr(model, "make_cache") else [None]
    return any(not isinstance(k, ArraysCache) for c in made for k in layer_caches(c))


def has_recurrent_layers(model: nn.Module) -> bool:
    """Whether ``model``'s own cache (``model.make_cache()``) keeps a recurrent
    state (an ``ArraysCache``) in some layer, alone or inside a ``CacheList``."""

    def recurrent(c) -> bool:
        return isinstance(c, ArraysCache) or any(map(recurrent, getattr(c, "caches", ())))

    return hasattr(model, "make_cache") and any(map(recurrent, model.make_cache()))


def _cache_param(module: nn.Module) -> Optional[inspect.Signature]:
    """The signature of ``module``'s call when it takes a ``cache`` argument."""
    sig = inspect.signature(type(module).__call__)
    return sig if "cache" in sig.parameters else None


def reads_mask(module: nn.Module) -> bool:
    """Whether ``module``'s call reads its ``mask`` argument (RecurrentGemma's recurrent
    blocks are handed the attention's mask and never read it); ``True`` when its source
    cannot be read.

    Example: a call ``def __call__(self, x, cache=None, mask=None): return x`` gives
    ``False``; one that multiplies ``x`` by ``mask`` gives ``True``.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(module).__call__)))
    except (OSError, TypeError, SyntaxError):
        return True
    return any(
        isinstance(n, ast.Name) and n.id == "mask" and isinstance(n.ctx, ast.Load)
        for n in ast.walk(tree)
    )


def split_recurrent_mixers(model: nn.Module) -> SplitPoint:
    """Makes every recurrent mixer of ``model`` split its call at the model's
    :class:`SplitPoint` (done once; the model computes as before while ``at`` is
    ``None``) and returns that point.

    A recurrent mixer is a child of a decoder layer whose call takes a cache and
    is handed an ``ArraysCache`` (``linear_attn``, ``mixer``, ``conv``, ...). Which
    layers keep which cache is the model's own affair (Nemotron-H's MLP layers keep
    none, so its caches are not one per layer; Falcon-H1's keep two in a
    ``CacheList``): every such child is wrapped, and splits its call when the cache
    it gets is an ``ArraysCache``; an attention beside it runs whole.
    """
    split = getattr(model, "recurrent_split", None)
    if split is not None:
        return split
    split = SplitPoint()
    for layer in model.layers:
        for m in layer.children().values():
            if isinstance(m, nn.Module) and _cache_param(m) is not None:
                masked = reads_mask(m)
                _swap_call(
                    m,
                    lambda base, sig=_cache_param(m), masked=masked: _split_call(
                        base, sig, split, masked
                    ),
                )
    model.recurrent_split = split
    return split


def _split_call(
    base_call: Callable, sig: inspect.Signature, split: SplitPoint, reads_mask: bool = True
) -> Callable:
    """A mixer's call that, with ``split.at`` set, runs ``base_call`` on the
    first ``at`` tokens, keeps the cache's state, then runs it on the rest.

    Its other per-token inputs (arrays over the same tokens, as RWKV-7's
    ``v_first``) are split with them, a position ``offset`` (Ling's linear
    attention applies RoPE from it) moves on by ``at`` for the rest, and the two
    outputs are joined along the tokens (each element of a tuple). A mask is
    refused unless the mixer never reads it (``reads_mask``)."""
    x_name = list(sig.parameters)[1]  # (after self)

    def call(self, *args, **kwargs):
        at = split.at
        if at is None:  # (every call outside a split pass, mlx-lm's own included)
            return base_call(self, *args, **kwargs)
        bound = sig.bind(self, *args, **kwargs)
        x = bound.arguments[x_name]
        if x.shape[1] <= at or not isinstance(bound.arguments.get("cache"), ArraysCache):
            return base_call(self, *args, **kwargs)  # (an attention beside a mixer: whole)
        if reads_mask and bound.arguments.get("mask") is not None:
            raise ValueError("A split recurrent pass takes no mask (batch 1, no padding).")
        cache = bound.arguments["cache"]
        rest = split_inputs(bound.arguments, x_name, at)
        before = list(cache.cache)
        first = base_call(*bound.args, **bound.kwargs)
        keep_slots(split, cache, before, self)  # the state after the pending tokens
        bound.arguments.update(rest)
        if split.paths is not None:  # (a tree: the rest along its paths, the cache kept)
            return _joined_outputs(first, _along_paths(base_call, bound, x_name, split))
        return _joined_outputs(first, base_call(*bound.args, **bound.kwargs))

    return call


def _along_paths(base_call: Callable, bound: inspect.BoundArguments, x_name: str, split):
    """A mixer's call over a tree's nodes (the rest of a split pass, ``(1, n, ...)``)
    as a batch of the tree's root-to-leaf paths (:func:`~.tree.path_rows`): each
    row starts from the state the cache holds (broadcast, never written: the
    cache stays at the state after the pending tokens) and reads its path in
    order; each node's output is read back from the first path through it.

    Example: nodes ``[d1 d2 e1]``, ``d2`` under ``d1``, ``e1`` beside ``d1``: rows
    ``[d1 d2]`` and ``[e1 e1]`` from the same state; the outputs of ``d1``, ``d2``
    are row 0's, ``e1``'s row 1's first. The slots the call wrote (each path's
    final state) go to ``split.path_states``.
    """
    rows_of, row, col = split.paths
    n, batch = bound.arguments[x_name].shape[1], rows_of.shape[0]
    for name, value in list(bound.arguments.items()):
        if isinstance(value, mx.array) and value.ndim >= 2 and value.shape[:2] == (1, n):
            bound.arguments[name] = value[0][rows_of]  # (paths, depth, ...)
    cache = bound.arguments["cache"]
    tiled = copy.copy(cache)
    tiled.cache = [
        None if a is None else mx.broadcast_to(a, (batch,) + a.shape[1:]) for a in cache.cache
    ]
    bound.arguments["cache"] = tiled
    given = list(tiled.cache)
    out = base_call(*bound.args, **bound.kwargs)
    wrote = {i: a for i, (a, b) in enumerate(zip(tiled.cache, given)) if a is not b}
    split.path_states.append((cache, wrote))
    return _on_nodes(out, row, col, rows_of.shape)


def _on_nodes(out, row: mx.array, col: mx.array, shape: tuple):
    """A call's outputs over a batch of paths ``shape`` read back per node, as
    ``(1, n, ...)`` arrays (each element of a tuple; anything else as it is)."""
    if isinstance(out, tuple):
        return tuple(_on_nodes(a, row, col, shape) for a in out)
    if isinstance(out, mx.array) and out.ndim >= 2 and out.shape[:2] == shape:
        return out[row, col][None]
    return out


def keep_slots(split: SplitPoint, cache: ArraysCache, before: list, mixer) -> None:
    """Keeps aside the slots of ``cache`` that a mixer's first call wrote (those whose
    array changed from ``before``). Mixers that share one cache keep their own slots
    (RWKV-7's time mix writes slots 0 and 1, its channel mix slot 2); a slot written
    by two mixers in one pass cannot be rolled back, and is refused.

    Example: slots ``[a, b, c]``; the time mix writes ``[a', b', c]`` (keeps 0, 1),
    then the channel mix ``[a'', b'', c']`` on the rest and the next part: kept
    ``[a', b', c']``, the state after the pending tokens in every slot.
    """
    now = list(cache.cache)
    wrote = {i for i, (a, b) in enumerate(zip(before, now)) if a is not b}
    entry = next((i for i, (c, _) in enumerate(split.kept) if c is cache), None)
    if entry is None:
        split.kept.append((cache, now))
        split.wrote[id(cache)] = wrote
        return
    if wrote & split.wrote[id(cache)]:
        raise ValueError(
            f"{type(mixer).__name__}: a recurrent state written twice in one pass (two "
            "mixers write one slot of an ArraysCache), which a split pass cannot roll back."
        )
    kept = list(split.kept[entry][1])
    for i in wrote:
        kept[i] = now[i]
    split.kept[entry] = (cache, kept)
    split.wrote[id(cache)] |= wrote


def split_inputs(arguments: dict, x_name: str, at: int) -> dict:
    """Cuts a mixer call's inputs after ``at`` tokens: ``arguments`` keep the first
    part; returns the rest's (the tokens ``x_name`` and every other array over the
    same tokens; a position ``offset`` moved on by ``at``).

    Example: ``x`` ``(1, 5, D)``, ``v_first`` ``(1, 5, D)``, ``offset=7``, ``at=2``:
    the first call takes 2 tokens of each at offset 7, the rest 3 at offset 9.
    """
    x = arguments[x_name]
    rest = {x_name: x[:, at:]}
    arguments[x_name] = x[:, :at]
    for name, value in list(arguments.items()):
        if name == x_name:
            continue
        if isinstance(value, mx.array) and value.ndim >= 2 and value.shape[:2] == x.shape[:2]:
            arguments[name], rest[name] = value[:, :at], value[:, at:]
        elif name == "offset" and value is not None:
            rest[name] = value + at
    return rest


def _joined_outputs(first, rest):
    """Two calls' outputs over consecutive tokens as one call's: arrays joined on
    the token axis, each element of a tuple so (``None`` stays ``None``)."""
    if isinstance(first, tuple):
        return tuple(_joined_outputs(a, b) for a, b in zip(first, rest))
    if first is None:
        return None
    return mx.concatenate([first, rest], axis=1)


def layer_caches(c) -> list:
    """The caches one layer keeps: ``c``, or the members of a ``CacheList`` (Falcon-H1's
    layers keep a mixer's ``ArraysCache`` and an attention's ``KVCache`` side by side)."""
    members = getattr(c, "caches", None)
    return list(members) if isinstance(members, (list, tuple)) else [c]


CHAIN_CACHES = (KVCache, QuantizedKVCache, ArraysCache, WindowKVCache)  # (a bounded window's)


def _kept_aside(c) -> bool:
    return isinstance(c, ArraysCache) or kept_whole(c)


def kept_whole(c) -> bool:
    """Whether ``c`` is a layer cache that a chain keeps aside whole, as it is before a
    pass: one that cannot be trimmed, and whose every update assigns new arrays to its
    attributes, never writing into one (DeepSeek V4.1's ``LayerCache``: its window,
    compressed groups and open group)."""
    return type(c).__name__ == "LayerCache" and type(c).__module__.endswith(".deepseek_v41")


def state_of(c) -> object:
    """What restores a recurrent or whole-kept layer cache (:func:`set_state`)."""
    return dict(vars(c)) if kept_whole(c) else list(c.cache)


def set_state(c, state) -> None:
    """Puts back a state from :func:`state_of` (arrays are never written into)."""
    if kept_whole(c):
        vars(c).update(state)
    else:
        c.cache = list(state)


def chain_cache_refusal(model: nn.Module) -> Optional[str]:
    """The kinds of layer caches of ``model`` that a chain cannot roll back, named
    (``None``: every layer keeps caches of :data:`CHAIN_CACHES`, alone or in a
    ``CacheList``)."""
    made = model_caches(model, bounded=True)
    bad = sorted({type(k).__name__ for c in made for k in layer_caches(c)
                  if type(k) not in CHAIN_CACHES and not kept_whole(k)})  # fmt: skip
    return f"its layers keep {bad} caches" if bad else None


def tree_refusal(model: nn.Module) -> Optional[str]:
    """Why the tree verifier cannot take ``model`` while chains through its own passes
    can (:class:`~.support.TreeUnsupported`: its recurrent layers, its positions out of
    reach, its layers' calls), else ``None``; judged once per model.

    Example: nanochat rotates its queries in a function, not a RoPE module, so a
    tree's positions cannot reach it: prompt lookup runs on it as chains, and
    ``tree_refusal`` says why; for a Llama it is ``None``.
    """
    if id(model) not in _TREE_REFUSALS:
        try:
            check_supported(model, VerifierConfig())
            why = None
        except TreeUnsupported as e:
            why = None if chain_cache_refusal(model) else str(e).replace(CHAIN_NOTE, "")
        except ValueError:
            why = None  # (refused outright: attach_verifier says why)
        _TREE_REFUSALS[id(model)] = why
        weakref.finalize(model, _TREE_REFUSALS.pop, id(model), None)
    return _TREE_REFUSALS[id(model)]


_TREE_REFUSALS = {}  # id(model) -> tree_refusal(model)


def chains_only(model: nn.Module) -> bool:
    """Whether drafts for ``model`` are verified as chains through its own passes
    (:func:`chain_generate_step`): it has recurrent layers, or the tree verifier
    cannot take it (:func:`tree_refusal`)."""
    return has_recurrent_layers(model) or tree_refusal(model) is not None


def lookup_tree_refusal(model: nn.Module) -> Optional[str]:
    """Why several prompt-lookup drafts merged into a tree (``ngram_candidates > 1``)
    cannot be verified on ``model`` (``None``: they can): a model the tree verifier
    cannot take, or one with recurrent layers whose layers it cannot take apart
    (:func:`~mlx_specstream.support.tree_on_chains_refusal`; none without attention)."""
    if not has_recurrent_layers(model):
        return tree_refusal(model)
    return tree_on_chains_refusal(model) if attends(model) else None


def check_recurrent_cache(cache: list) -> None:
    """Raises ``ValueError`` naming the kinds of layer caches that a chain of drafts
    cannot roll back (taken: ``KVCache``, ``QuantizedKVCache`` and ``ArraysCache``,
    batch 1)."""
    cache = [k for c in cache for k in layer_caches(c)]
    bad = sorted({type(c).__name__ for c in cache if type(c) not in CHAIN_CACHES
                  and not kept_whole(c)})  # fmt: skip
    if bad:
        raise ValueError(
            "Speculation on a recurrent model needs a KVCache (or QuantizedKVCache) or an "
            f"ArraysCache per layer, got {bad} (rotating caches, max_kv_size, are not "
            "supported there; for a model's sliding window pass a prompt cache made by "
            "mlx_specstream.make_prompt_cache(model), whose window layers can roll back)."
        )
    batched = [c for c in cache if isinstance(c, ArraysCache) and c.left_padding is not None]
    if batched or any(isinstance(c, ArraysCache) and c.lengths is not None for c in cache):
        raise ValueError("A batched ArraysCache (left_padding or lengths set) is not supported.")


def verify_chain(
    logits: mx.array, drafts: List[int], history: List[int], sampler, processors
) -> Tuple[int, List[int], mx.array]:
    """Verifies a chain of drafts as mlx-lm's ``generate_step`` would decode.

    Row ``i`` of ``logits`` predicts the token after ``history + drafts[:i]``. Each
    row is processed and sampled as mlx-lm does one step (``processors`` with that
    row's own history, log-softmax, ``sampler``), all rows at once, with one host
    read; the drafts are accepted while each equals the token drawn before it. An
    accepted token was drawn from the model's distribution given everything before
    it, so the output is distributed as plain decoding's (greedy: identical).

    Example: drafts ``[4, 7]`` and rows that draw ``[4, 9, 2]`` accept ``4`` and give
    ``(1, [4, 9], logprobs)``; draws ``[4, 7, 2]`` give ``(2, [4, 7, 2], logprobs)``.

    Returns:
        tuple: the number of drafts accepted, the tokens to yield (those drafts and
        the token drawn after them) and the ``(len(drafts) + 1, V)`` log-probabilities.
    """
    logprobs = _row_logprobs(logits, drafts, history, processors)
    drawn = sampler(logprobs).tolist()
    a = 0
    while a < len(drafts) and drawn[a] == drafts[a]:
        a += 1
    return a, drafts[:a] + [drawn[a]], logprobs


def verify_chain_by_rejection(
    logits: mx.array, drafts: List[int], q: mx.array, history: List[int], sampler, processors
) -> Tuple[int, List[int], mx.array]:
    """Verifies a chain of drafts drawn from the draft distributions ``q`` by
    rejection sampling (:func:`~mlx_specstream.tree.accept_by_rejection` on a
    chain): draft ``i`` is accepted with probability ``min(1, p_i(x) / q_i(x))``,
    and the token after the last accepted one is drawn from the residual
    ``max(p - q, 0)`` (or from ``p`` after the whole chain). Each yielded token is
    distributed as plain decoding's; with ``q`` equal to the target's, every
    draft is accepted. One host read (the distributions and the uniforms).

    Args:
        logits: ``(n + 1, V)`` as for :func:`verify_chain`.
        drafts: the ``n`` drafts, draft ``i`` drawn from ``q[i]``.
        q: ``(n, V)`` the draft distributions.
        sampler: a :class:`~mlx_specstream.sample_utils.DistributionSampler`.

    Returns:
        tuple: as :func:`verify_chain`'s.
    """
    logprobs = _row_logprobs(logits, drafts, history, processors)
    p, u = sampler.probs(logprobs), mx.random.uniform(shape=(len(drafts) + 2,))
    mx.eval(p, q, u)
    parents = list(range(-1, len(drafts)))
    path, token = accept_by_rejection([-1] + drafts, parents, np.array(p), np.array(q), np.array(u))
    a = len(path) - 1
    return a, drafts[:a] + [token], logprobs


def verify_tree(
    logits: mx.array,
    drafts: List[int],
    parents: List[int],
    history: List[int],
    sampler,
    processors,
    q: Optional[mx.array] = None,
    q_rows: Optional[List[int]] = None,
) -> Tuple[List[int], List[int], mx.array]:
    """Verifies a tree of drafts as :func:`verify_chain` verifies a chain: node ``0``
    is the last token of ``history``, node ``i > 0`` carries ``drafts[i - 1]``, and
    row ``i`` of ``logits`` predicts the token after node ``i``'s path.

    Each row is processed and sampled as mlx-lm does one step, with its own path as
    history; the walk goes down to the child carrying the token drawn at its node
    (siblings carry distinct tokens, so at most one does). With ``q`` (``(depth,
    V)``: each level's draft distribution, siblings drawn from it without
    replacement in their order; with ``q_rows``, each node's row of ``q``: a drawn
    dynamic tree's) it accepts by recursive rejection sampling
    (:func:`~mlx_specstream.tree.accept_by_rejection`) instead. Either way each
    yielded token is distributed as plain decoding's (greedy: identical).

    Example: drafts ``[4, 7, 5]`` with parents ``[-1, 0, 1, 0]`` (4 then 7, and 5
    beside 4); rows that draw ``[5, 1, 3, 2]`` accept node 3 (token 5) and give
    ``([0, 3], [5, 2], logprobs)``.

    Returns:
        tuple: the accepted path (node 0 first), the tokens to yield (the accepted
        drafts and the token drawn after them) and their rows' log-probabilities.
    """
    tokens = [history[-1]] + list(drafts)
    if processors:
        logits = apply_processors(processors, history, tokens, parents, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if q is not None:
        p, u = sampler.probs(logprobs), mx.random.uniform(shape=(len(tokens) + 1,))
        mx.eval(p, q, u)
        path, token = accept_by_rejection(tokens, parents, np.array(p), np.array(q), np.array(u),
                                          q_rows)  # fmt: skip
    else:
        drawn, kids, path = sampler(logprobs).tolist(), children_of(parents), [0]
        while True:
            child = next((c for c in kids[path[-1]] if tokens[c] == drawn[path[-1]]), None)
            if child is None:
                break
            path.append(child)
        token = drawn[path[-1]]
    return path, [tokens[i] for i in path[1:]] + [token], logprobs[mx.array(path)]


def _row_logprobs(logits: mx.array, drafts: List[int], history: List[int], processors):
    """Each row's log-probabilities as mlx-lm computes one step's: ``processors``
    with the row's own history (``history + drafts[:i]``), then log-softmax."""
    if processors:
        rows = []
        for i in range(len(drafts) + 1):
            row, seen = logits[i : i + 1], mx.array(history + drafts[:i])
            for p in processors:
                row = p(seen, row)
            rows.append(row)
        logits = mx.concatenate(rows, axis=0)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def chain_generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[list] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: int = 2048,
    num_draft_tokens: int = NGRAM_DRAFT_TOKENS,
    draft_model: Optional[nn.Module] = None,
    rejection: bool = False,
    quant=None,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    prompt_checkpoint_callback: Optional[Callable[[list], None]] = None,
    streams: bool = False,
    stream_tree: Optional[StaticTree] = None,
    ngram_candidates: int = 1,
    max_tree_nodes: int = 16,
    lookup: Optional[Tuple[int, int, int]] = None,
    attached_drafter: bool = False,
    drafter_tree: Optional[StaticTree] = None,
    drafter_growth: Optional[Tuple[int, int, int]] = None,
    draft_confidence: Optional[float] = None,
    draft_schedule: Optional[str] = None,
) -> Generator[Tuple[int, mx.array, bool, int], None, None]:
    """A generator of tokens decoded with chains of drafts on a model with recurrent
    layers (or with a draft model that has them); what
    :func:`mlx_specstream.decode.spec_generate_step` runs for such models.

    Args:
        prompt (mx.array): the prompt tokens (at least one).
        model (nn.Module): an mlx-lm model whose cache mixes KV and recurrent
          layers (or has recurrent layers only).
        max_tokens (int): tokens to generate, ``-1`` for no limit. Default: ``256``.
        sampler, logits_processors: mlx-lm's. Default: argmax, none.
        prompt_cache (list, optional): mlx-lm's cache for ``model`` (with a draft
          model, followed by the draft model's), updated in place. When the
          generator ends or is closed it holds the earlier tokens, the prompt and
          every yielded token, as mlx-lm's loop leaves it.
        prefill_step_size (int): prompt chunk size (the prompt's recurrent state
          is computed in the same chunks as mlx-lm's). Default: ``2048``.
        num_draft_tokens (int): the longest draft. Default: ``10``.
        draft_model (nn.Module, optional): drafts a chain
          (:class:`DraftModelChain`) instead of prompt lookup: greedy, or with
          ``rejection`` drawn from its distributions under ``sampler`` (a
          :class:`~mlx_specstream.sample_utils.DistributionSampler`) and verified
          by rejection sampling (:func:`verify_chain_by_rejection`).
        quant (KVQuantizer, optional): mlx-lm's ``kv_bits``: the KV layers (the
          draft model's too) convert at the moments mlx-lm's loop converts them,
          and greedy output equals mlx-lm's with the same options.
        prompt_progress_callback (Callable, optional): as mlx-lm calls it.
        prompt_checkpoint_callback (Callable, optional): called with the caches
          (the model's, then the draft model's) once they hold all but the
          prompt's last token, before the first pass.
        streams (bool): the model's own lossless-mode streams draft the chains
          (:class:`StreamDrafts`; each pass keeps its stream layers' inputs): greedy,
          or with ``rejection`` drawn from their distributions under ``sampler`` and
          verified by rejection sampling.
        stream_tree (StaticTree, optional): with ``streams``, the streams' top tokens
          form this tree (``num_draft_tokens`` levels at most) instead of a chain: the
          attention layers verify it through the tree verifier's masks, the
          recurrent mixers along its paths (:meth:`ChainCache.run`), by
          :func:`verify_tree`.
        ngram_candidates (int): prompt lookup's drafts merged into one tree of at most
          ``max_tree_nodes`` nodes (:class:`LookupDrafts`; the model's runtime, a
          verifier alone without streams, verifies it as it verifies the streams').
        lookup (tuple, optional): with ``streams`` or ``attached_drafter``,
          ``draft="streams+ngram"``: prompt lookup's drafts (``(tokens, candidates,
          max_nodes)``: at most ``tokens`` long, ``candidates`` of them) merged into the
          streams' (or the drafter's) drafts, first, in a tree of at most ``max_nodes``
          nodes.
        attached_drafter (bool): the model's attached drafter (its MTP layer,
          ParallelSpec or Medusa heads) drafts chains of at most ``num_draft_tokens`` levels
          (:class:`DrafterChains`): greedy, or with ``rejection`` drawn under ``sampler``
          and verified by rejection sampling. Its state stays with ``prompt_cache``
          for the next call.
        drafter_tree (StaticTree, optional): with ``attached_drafter``, its levels' top
          tokens form this tree instead of a chain, verified as ``stream_tree`` is.
        drafter_growth (tuple, optional): with ``attached_drafter``, ``(k, max_nodes,
          depth)``: the drafter grows dynamic trees (:meth:`DrafterChains.grown_drafts`)
          of at most ``max_nodes`` nodes and ``depth`` levels, ``k`` children per node.
        draft_confidence (float, optional): each chain (the draft model's, the streams' or
          the attached drafter's) stops after a draft its drafter gives less than this
          probability (a draft model and one MTP layer then draft no further).
        draft_schedule (str, optional): ``"heuristic"``: a draft model's chains follow
          transformers' heuristic schedule (:mod:`mlx_specstream.draft_schedule`).

    Yields:
        tuple: ``(token, logprobs, from_draft, forward_passes)``.
    """
    own, drafter = prompt_cache, None
    if draft_model is not None:
        own, theirs = split_pair(model, draft_model, prompt_cache)
        vocab = getattr(getattr(model, "args", None), "vocab_size", None)
        drafter = DraftModelChain(draft_model, theirs, vocab, sampler if rejection else None, quant,
                                  draft_confidence, draft_schedule, num_draft_tokens)  # fmt: skip
    # (lookup trees: the tree verifier alone, streams.attach_chain_verifier; a model
    # without attention takes them without it)
    needs_runtime = streams or attached_drafter or ngram_candidates > 1 and attends(model)
    runtime = get_runtime(model) if needs_runtime else None
    state = ChainCache(model, own, quant, runtime, streams)
    # (draft="streams+ngram": lookup's drafts merged into the streams' or the drafter's)
    lookup_tokens, candidates, nodes = lookup or (NGRAM_DRAFT_TOKENS, 1, 16)
    index = None if lookup is None else NgramIndex(candidates=candidates)
    if attached_drafter:  # (its state continues a call's before on the same cache)
        offset = next((c.offset for c in state.kv), 0)
        dstate = runtime.drafter.start(offset, None if own is None else drafter_state_of(own))
        if own is not None:
            keep_drafter_state(own, dstate)
        drafter = DrafterChains(state, dstate, sampler if rejection else None, num_draft_tokens,
                                drafter_tree, index, lookup_tokens, nodes,
                                drafter_growth, draft_confidence)  # fmt: skip
    if streams:
        drafter = StreamDrafts(state, sampler if rejection else None, stream_tree, index,
                               lookup_tokens, nodes, draft_confidence)  # fmt: skip
    drafter = drafter or LookupDrafts(ngram_candidates, max_tree_nodes)
    sampler = sampler or (lambda x: mx.argmax(x, axis=-1))
    processors = logits_processors or []
    progress = prompt_progress_callback or (lambda *_: None)
    tokens = state.tokens = drafter.tokens = prompt.tolist()
    passes = yielded = 0
    ended = False
    try:
        with mx.stream(generation_stream):
            progress(0, len(tokens))
            while len(tokens) - state.held > 1:  # as mlx-lm: all but the last token, chunked
                upto = min(state.held + prefill_step_size, len(tokens) - 1)
                state.feed(upto)
                drafter.feed(upto)
                progress(state.held, len(tokens))
            if prompt_checkpoint_callback is not None:
                theirs = drafter.chain.cache if isinstance(drafter, DraftModelChain) else []
                prompt_checkpoint_callback(state.cache + theirs)
            while max_tokens < 0 or yielded < max_tokens:
                room = num_draft_tokens if max_tokens < 0 else max_tokens - yielded - 1
                n = state.draft_room(min(num_draft_tokens, room))
                drafts = drafter.draft(n) if n > 0 else []
                parents = getattr(drafter, "parents", None) if drafts else None
                if parents is not None:  # a tree: its nodes must fit too (kv_bits)
                    fit = state.draft_room(len(drafts))
                    drafts, parents = drafts[:fit], parents[: fit + 1]  # (parents first)
                logits = state.run(drafts, parents)
                passes += 1
                q = drafter.q if rejection and drafts else None
                if parents is not None:
                    q_rows = getattr(drafter, "q_rows", None)  # (a drawn grown tree's)
                    path, new, logprobs = verify_tree(
                        logits, drafts, parents, tokens, sampler, processors, q, q_rows
                    )
                    node, a = path[-1], len(path) - 1
                    if isinstance(drafter, DrafterChains):  # (its states: the path's nodes')
                        drafter.accepted_path(path)
                elif q is not None:
                    a, new, logprobs = verify_chain_by_rejection(
                        logits, drafts, q, tokens, sampler, processors
                    )
                    node = a
                else:
                    a, new, logprobs = verify_chain(logits, drafts, tokens, sampler, processors)
                    node = a
                if max_tokens < 0 or yielded + len(new) < max_tokens:
                    drafter.after_pass(node)  # (before the caches drop the rejected drafts)
                state.commit(a == len(drafts), path if parents is not None else None)
                if n > 0:
                    drafter.commit(a)
                if not yielded:
                    progress(len(tokens), len(tokens))
                tokens += new
                for i, token in enumerate(new):
                    yielded += 1
                    yield token, logprobs[i], i < a, passes
        ended = True
    except GeneratorExit:
        ended = True
        raise
    finally:
        state.split.at = None
        # mlx-lm's loop has fed every yielded token (a cache of the call's own is dropped)
        if ended and yielded and prompt_cache is not None:
            with mx.stream(generation_stream):
                state.hold(len(prompt) + yielded)
                drafter.hold(len(prompt) + yielded)
        if draft_model is not None and prompt_cache is not None:  # (converted layers are new)
            prompt_cache[:] = state.cache + drafter.chain.cache
        if state.runtime is not None:
            state.runtime.release()


class LookupDrafts:
    """Prompt lookup's drafts for :func:`chain_generate_step` (an
    :class:`~mlx_specstream.ngram.NgramIndex` over the call's tokens). It keeps
    no cache, so feeding, committing and holding leave it as it is.

    With ``candidates > 1``, up to that many drafts (the tokens after several earlier
    occurrences) merged into one tree of at most ``max_nodes`` nodes, root included
    (:func:`~mlx_specstream.tree.merge_chains`); :attr:`parents` then says the tree
    (``None``: a chain).

    Example: tokens ``[1 2 3 9 1 2 4 1 2]`` and two candidates give the drafts
    ``[4 1 2]`` and ``[3 9 1]``: a tree whose root (the last ``2``) has two children.
    """

    def __init__(self, candidates: int = 1, max_nodes: int = 16):
        self.tokens: List[int] = []
        self.index = NgramIndex(candidates=candidates)
        self.max_nodes = max_nodes
        self.parents: Optional[List[int]] = None

    def feed(self, upto: int) -> None:
        pass

    def draft(self, n: int) -> List[int]:
        self.index.extend(self.tokens[len(self.index.tokens) :])
        self.parents = None
        if self.index.candidates == 1:
            return self.index.draft(n)
        chains = self.index.drafts(min(n, self.max_nodes - 1))
        if len(chains) < 2:
            return chains[0] if chains else []
        merged = merge_chains([self.tokens[-1]], [-1], chains, self.max_nodes)
        self.parents = merged.parents
        return merged.tokens[1:]

    def after_pass(self, accepted: int) -> None:
        pass

    def commit(self, accepted: int) -> None:
        pass

    def hold(self, end: int) -> None:
        pass


class DraftModelChain:
    """A draft model's chain for :func:`chain_generate_step` (greedy, or drawn
    from its distributions under ``sampler``); its cache, recurrent layers
    included, follows the model's.

    It feeds the call's tokens not yet in its cache, then drafts one token per
    call, keeping the state after each; after the verification it goes back to
    the last accepted draft it fed (the last draft is never fed).

    Example: holding ``[p0 p1]``, with tokens ``[p0 p1 a]`` and 3 drafts, it feeds
    ``a`` (state s0), drafts ``d1``, feeds it (s1), ``d2`` (s2), drafts ``d3``.
    With ``d1`` accepted it goes back to s1 (``[p0 p1 a d1]``); with all three,
    it keeps s2 and feeds ``d3`` and the bonus token next time.
    """

    def __init__(
        self, model: nn.Module, cache: Optional[list], vocab_size: Optional[int] = None,
        sampler=None, quant=None, confidence: Optional[float] = None,
        schedule: Optional[str] = None, most: int = 1,
    ):  # fmt: skip
        self.chain = ChainCache(model, cache, quant)
        # (a chain stops after a draft less likely than this under the draft model)
        self.confidence = confidence
        # (draft_schedule: each chain at most length.now long, up to ``most``)
        self.length = DraftLength(max(most, 1), schedule)
        self.vocab_size = vocab_size  # the model's: larger draft vocabularies are cut to it
        self.sampler = sampler  # drafts drawn from its distributions (else greedy)
        self.q: Optional[mx.array] = None  # the last chain's draft distributions
        self.tokens: List[int] = []
        self.made = 0  # the last chain's drafts
        self.base = 0  # where the last chain's drafts begin in ``tokens``
        self.states: List[list] = []  # recurrent states after tokens[: base + i]

    def feed(self, upto: int) -> None:
        self.chain.tokens = self.tokens
        self.chain.feed(upto)

    def draft(self, n: int) -> List[int]:
        n = min(n, self.length.now)
        c = self.chain
        c.tokens, c.split.at = self.tokens, None
        recurrent = c.recurrent
        logits = c.model(mx.array(self.tokens[c.held :])[None], cache=c.cache)[0, -1]
        self.base = c.held = len(self.tokens)
        self.states, drafts, qs = [[state_of(x) for x in recurrent]], [], []
        for i in range(n):
            if self.sampler is None:
                drafts.append(mx.argmax(logits[: self.vocab_size], axis=-1).reshape(1))
            else:
                qs.append(self._distribution(logits))
                drafts.append(mx.random.categorical(mx.log(qs[-1])).reshape(1))
            if i == n - 1 or self._unsure(logits):  # (the last draft is not fed)
                break
            logits = c.model(drafts[-1][None], cache=c.cache)[0, -1]
            self.states.append([state_of(x) for x in recurrent])
        c.drafted = max(len(drafts) - 1, 0)
        self.made = len(drafts)  # (for the schedule: commit)
        self.q = mx.stack(qs) if qs else None
        return mx.concatenate(drafts).tolist() if drafts else []

    def _unsure(self, logits: mx.array) -> bool:
        """Whether the chain stops after the draft of ``logits`` (:func:`~.draft_confidence.unsure`,
        over the model's vocabulary)."""
        return unsure(logits[: self.vocab_size], self.confidence)

    def _distribution(self, logits: mx.array) -> mx.array:
        """The sampler's distribution over the draft logits, on the model's vocabulary."""
        logits = logits[None, : self.vocab_size].astype(mx.float32)
        q = self.sampler.probs(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]
        if self.vocab_size is not None and q.shape[-1] < self.vocab_size:
            q = mx.concatenate([q, mx.zeros((self.vocab_size - q.shape[-1],), q.dtype)])
        return q

    def after_pass(self, accepted: int) -> None:
        pass

    def commit(self, accepted: int) -> None:
        self.length.update(accepted, self.made)
        self.back_to(self.base + min(accepted, len(self.states) - 1))

    def back_to(self, end: int) -> None:
        """Back to holding ``tokens[:end]``, for ``end`` from the last chain's start
        to the last draft it fed (its states stay until the next chain)."""
        c = self.chain
        for x, state in zip(c.recurrent, self.states[end - self.base]):
            set_state(x, state)
        for x in c.kv:
            x.trim(c.held + c.drafted - end)
        c.held, c.drafted = end, 0
        c._settle()

    def hold(self, end: int) -> None:
        c = self.chain
        c.tokens = self.tokens
        if c.held > end:
            self.back_to(end)
        if c.held < end:
            c.feed(end)


def level_scores(logits: mx.array, sampler=None) -> Tuple[mx.array, Optional[mx.array]]:
    """Scores of each draft level's tokens whose argmax is its draft, and the levels'
    distributions ``q`` under ``sampler`` (a
    :class:`~mlx_specstream.sample_utils.DistributionSampler`; ``None``: greedy, the
    logits themselves): with a sampler the scores are ``log q`` plus Gumbel noise, so
    each level's argmax is a draw from ``q`` (its top k, draws without replacement)."""
    if sampler is None:
        return logits, None
    lp = logits.astype(mx.float32)
    q = sampler.probs(lp - mx.logsumexp(lp, axis=-1, keepdims=True))
    return mx.log(q) + mx.random.gumbel(q.shape), q


def lookup_merged(index: NgramIndex, history: List[int], tokens: List[int],
                  parents: Optional[List[int]], n: int, max_nodes: int):  # fmt: skip
    """``tokens`` (a chain, or a tree with ``parents``) below the last token of
    ``history``, with prompt lookup's drafts (``index``'s, at most ``n`` long, the
    history's new tokens added to it first) merged in first
    (:func:`~mlx_specstream.tree.merge_chains`): ``(tokens, parents)``, ``parents``
    ``None`` where the merged drafts are a chain; as given where lookup finds none.

    Example: history ``[5, 6, 7, 5, 6]`` and the chain ``[9]``: lookup drafts ``7 5 6``
    after ``6``, so the tree is ``7 5 6`` then ``9`` beside ``7``, parents ``[-1, 0, 1,
    2, 0]``.
    """
    index.extend(history[len(index.tokens) :])
    chains = [c for c in index.drafts(n) if c]
    if not chains:
        return tokens, parents
    merged = merge_chains([history[-1]] + tokens, parents or list(range(-1, len(tokens))),
                          chains, max_nodes)  # fmt: skip
    return merged.tokens[1:], None if layout_of(merged.parents).is_chain else merged.parents


class DrafterChains:
    """An attached drafter (a checkpoint's MTP layer, ParallelSpec or Medusa heads:
    :mod:`mlx_specstream.drafters`) drafting chains for :func:`chain_generate_step`,
    each level's first choice (a hybrid's recurrent layers verify chains).

    The drafter reads the model's last hidden states: row ``p`` pairs token ``p``'s
    state with token ``p + 1``'s embedding (:func:`~mlx_specstream.drafters.new_rows`).
    The :class:`ChainCache` hands every pass's and prompt chunk's states to
    :meth:`take`, by position; a later pass over the same positions (the pending
    tokens after a rejection) replaces the states of rejected drafts. Before each
    pass the states whose next token is known go into the drafter's cache, and the
    last one, the last accepted token paired with the pass's correction or bonus
    token, drafts the chain.

    Example: the caches hold ``[p0 p1]``, ``p2`` is pending and the drafter's cache
    holds rows 0-1 (``p0`` with ``p1``, ``p1`` with ``p2``); a pass over ``[p2 d1 d2]``
    accepts ``d1`` and draws ``x``: rows 2 (``p2``, ``d1``) and 3 (``d1``, ``x``) go in,
    and row 3 drafts the chain after ``x``.

    With a ``sampler`` each level's draft is drawn from its distribution under it,
    kept as ``q`` for :func:`verify_chain_by_rejection` (a level's distribution
    depends on the accepted tokens only: a valid proposal).

    With a ``tree`` (a :class:`~mlx_specstream.tree.StaticTree`), node ``i`` carries the
    token of rank ``ranks[i]`` of level ``levels[i]`` (drawn: without replacement, as
    :class:`StreamDrafts` draws them) and :attr:`parents` says the tree. With ``lookup``
    (an :class:`~mlx_specstream.ngram.NgramIndex`), prompt lookup's drafts are merged in
    first (:func:`lookup_merged`), as :class:`StreamDrafts` merges them. A tree pass's
    states are the pending tokens' by position, then the tree's nodes': once the tree is
    verified, the accepted path's go in at the positions after the pending ones
    (:meth:`accepted_path`).

    With ``grow`` ``(k, max_nodes, depth)`` (a drafter that runs again on its own output: one
    MTP layer), it grows EAGLE-2's dynamic trees instead (:meth:`grown_drafts`).

    With a ``confidence`` (``draft_confidence``) a chain stops after a level whose first
    choice the drafter gives less than it (one MTP layer then drafts no further).
    """

    def __init__(self, state: "ChainCache", dstate, sampler=None, levels: int = 3,
                 tree: Optional[StaticTree] = None, lookup: Optional[NgramIndex] = None,
                 lookup_tokens: int = NGRAM_DRAFT_TOKENS, max_nodes: int = 16,
                 grow: Optional[Tuple[int, int, int]] = None,
                 confidence: Optional[float] = None):  # fmt: skip
        self.state, self.rt, self.dstate, self.sampler = state, state.runtime, dstate, sampler
        self.confidence = confidence
        # draft="streams+ngram": prompt lookup's drafts merged in first, up to max_nodes nodes.
        self.lookup, self.lookup_tokens, self.max_nodes = lookup, lookup_tokens, max_nodes
        self.drafter, self.levels = state.runtime.drafter, levels
        self.vocab = vocab_size(state.model)
        self.tokens: List[int] = []
        self.q: Optional[mx.array] = None
        self.tree = None if tree is None or layout_of(tree.parents).is_chain else tree
        self.grow = grow
        self.q_rows: Optional[List[int]] = None  # (a drawn grown tree's: each node's row of q)
        self.parents: Optional[List[int]] = None  # the last draft's tree (None: a chain)
        self.nodes: Optional[mx.array] = None  # a tree pass's nodes' states, node 1 first
        # States of positions [start, start + len(rows)) not yet in the drafter's cache,
        # counted from the call's first prompt token: -1 is the state a call before
        # kept (it pairs with that token).
        self.rows: Optional[mx.array] = dstate.pending_hidden
        self.start = 0 if self.rows is None else -1
        dstate.pending_hidden = None
        # (the row of position 0 in the drafter's cache)
        self.base = dstate.offset - self.start
        state.hidden_sink = self.take

    def take(self, start: int, hidden: mx.array, nodes: int = 0) -> None:
        """The model's last hidden states ``(L, D)`` of positions ``start`` on, and after
        them those of a tree's ``nodes`` (kept aside for :meth:`accepted_path`)."""
        if nodes:
            hidden, self.nodes = hidden[:-nodes], hidden[-nodes:]
        if start < self.start:  # (positions already in the drafter's cache)
            hidden, start = hidden[self.start - start :], self.start
        keep = start - self.start
        if keep and (self.rows is None or keep > len(self.rows)):
            raise ValueError(f"DrafterChains: no states for positions {self.start}-{start}.")
        if len(hidden):
            self.rows = hidden if not keep else mx.concatenate([self.rows[:keep], hidden])

    def _new_rows(self, end: int) -> Optional[tuple]:
        """Takes the rows of positions before ``end - 1`` (their next token known), as
        the drafter's ``draft`` reads them: ``(hidden, path, path_tokens, token)``
        (``None``: no new row)."""
        k = 0 if self.rows is None else min(len(self.rows), end - 1 - self.start)
        if k <= 0:
            return None
        p = self.start  # (row i pairs the state of p + i with token p + i + 1)
        new = (self.rows[:k], list(range(k)), [None] + self.tokens[p + 1 : p + k],
               self.tokens[p + k])  # fmt: skip
        self.start += k
        self.rows = self.rows[k:] if k < len(self.rows) else None
        return new

    def _append(self, end: int, levels: int) -> Optional[mx.array]:
        """Puts the rows of positions before ``end - 1`` into the drafter's cache; the
        ``(levels, V)`` logits the last one drafts (fewer where a drafter that drafts level
        by level stops at an unsure one: :func:`~.draft_confidence.own_cut`)."""
        new = self._new_rows(end)
        if new is None:
            return None
        cut = own_cut(self.drafter, self.confidence)
        return self.drafter.draft(self.rt, self.dstate, *new, levels=levels, **cut)

    def _cut(self, logits: mx.array) -> mx.array:
        """With a confidence, a chain's ``(L, V)`` logits up to its first unsure level: a
        host read, but for a drafter that drafts level by level (it cut its own chain)."""
        if self.confidence is None or own_cut(self.drafter, self.confidence):
            return logits
        return logits[: confident_levels(top_probabilities(logits).tolist(), self.confidence)]

    def feed(self, upto: int) -> None:
        pass

    def draft(self, n: int) -> List[int]:
        """The next chain, at most ``n`` (and the drafter's levels) long; with a tree, its
        nodes but the root, at most ``n`` levels deep (:attr:`parents` then says it)."""
        tokens, parents = self._own_drafts(n)
        if self.lookup is not None:
            tokens, parents = lookup_merged(self.lookup, self.tokens, tokens, parents,
                                            min(n, self.lookup_tokens), self.max_nodes)  # fmt: skip
        self.parents = None if parents is None or layout_of(parents).is_chain else parents
        return tokens

    def _own_drafts(self, n: int) -> Tuple[List[int], Optional[List[int]]]:
        """The drafter's own drafts: ``(tokens, parents)`` of its tree, or of its chain
        (``parents`` ``None``)."""
        if self.grow is not None:
            return self.grown_drafts(n)
        logits = self._append(len(self.tokens), min(n, self.levels))
        if logits is None:
            return [], None
        logits = self._cut(logits[: min(n, self.levels), : self.vocab])
        scores, q = level_scores(logits, self.sampler)
        self.q = q
        if self.tree is None:
            return mx.argmax(scores, axis=-1).tolist(), None
        t = self.tree
        keep = depth_limited(t.parents, scores.shape[0])[1:]
        top = top_k_desc(scores, max(t.ranks) + 1)
        tokens = top[mx.array([t.levels[i] for i in keep]), mx.array([t.ranks[i] for i in keep])]
        return tokens.tolist(), subtree_parents(t.parents, [0] + keep)

    def grown_drafts(self, n: int) -> Tuple[List[int], Optional[List[int]]]:
        """A dynamic tree at most ``n`` (and ``grow``'s depth) deep: the drafter's
        ``draft_tree`` (:func:`~mlx_specstream.dynamic_tree.grown_candidates`) over the
        new rows, each node's ``k`` children its top-``k`` after that node's own path,
        the best ``max_nodes - 1`` candidates kept. With a ``sampler``, a drawn tree
        (:func:`~mlx_specstream.dynamic_tree.grow_drawn`): :attr:`q` then holds the
        distributions of the nodes with children, :attr:`q_rows` each node's row."""
        k, nodes, depth = self.grow
        depth = max(1, min(n, depth, nodes - 1))
        new = self._new_rows(len(self.tokens))
        if new is None:
            return [], None
        drawn = None
        if self.sampler is not None:
            drawn = (level_budgets(k, depth, nodes), self.sampler.probs)
        candidates = self.drafter.draft_tree(self.rt, self.dstate, *new, k, depth, drawn)
        if drawn is None:
            tree, self.q, self.q_rows = draft_tree(candidates, self.tokens[-1], nodes), None, None
        else:
            tree, self.q, self.q_rows = drawn_tree(candidates, self.tokens[-1], k)
        return tree.tokens[1:], tree.parents

    def accepted_path(self, path: List[int]) -> None:
        """After a tree pass: the states of the accepted ``path``'s nodes (root first)
        go in at the positions after the pending tokens'."""
        if self.nodes is not None and len(path) > 1:
            rows = self.nodes[mx.array([n - 1 for n in path[1:]])]
            self.rows = rows if self.rows is None else mx.concatenate([self.rows, rows])
        self.nodes = None

    def after_pass(self, node: int) -> None:
        pass

    def commit(self, accepted: int) -> None:
        pass

    def hold(self, end: int) -> None:
        """After the caches hold ``tokens[:end]``: the drafter's cache holds the rows
        of positions before ``end - 1``, and the state of position ``end - 1`` is kept
        to pair with the next call's first prompt token."""
        self._append(end, 1)
        self.dstate.trim_to(self.base + end - 1)
        if self.start == end - 1 and self.rows is not None:
            self.dstate.pending_hidden = self.rows[:1]
        self.state.hidden_sink = None


class StreamDrafts:
    """The model's own lossless-mode streams drafting for :func:`chain_generate_step`
    on a model with recurrent layers whose stream layers attend
    (:func:`~mlx_specstream.support.on_chains`).

    Each pass keeps its rows' inputs to the first stream layer
    (:meth:`ChainCache.run` runs the runtime's chain pass, whose lower layers are the
    model's own). After the verification, the last accepted row's stream rows go
    through the stream layers over the caches, still as the pass left them (its
    rejected rows masked out): stream ``j`` there predicts the token ``j + 1`` after
    the one drawn from that row, so their greedy tokens are the next chain. The
    stream rows' keys and values are then cut from the stream layers' caches. With
    the fused stream pass (``stream_pass="fused"``, the config's default) every row's
    stream rows ride in the verifying pass instead, and the accepted row's are read
    from it: no second pass, one read of the stream layers' and head's weights.

    With a ``sampler`` (a :class:`~mlx_specstream.sample_utils.DistributionSampler`)
    each stream's draft is drawn from its distribution under that sampler, kept as
    ``q`` for rejection sampling (:func:`verify_chain_by_rejection`): stream ``j``'s
    distribution depends on the tokens up to the accepted one only, a proposal as
    valid as any, so the output keeps the model's distribution.

    With a ``tree`` (a :class:`~mlx_specstream.tree.StaticTree`), node ``i`` carries
    the token of rank ``ranks[i]`` of stream ``levels[i]`` (greedy: by logits; drawn:
    without replacement, Gumbel top-k, so that the siblings are draws in order for
    recursive rejection sampling), and :attr:`parents` says the tree.

    Example: a pass over ``[a d1 d2 d3]`` accepts ``d1`` and draws ``x`` from
    ``d1``'s row: the streams of row 1 draft ``[y1 y2 y3]``, and the next pass feeds
    ``[d1 x y1 y2 y3]`` (``d1`` and ``x`` pending).
    """

    def __init__(
        self, state: "ChainCache", sampler=None, tree: Optional[StaticTree] = None,
        lookup: Optional[NgramIndex] = None, lookup_tokens: int = NGRAM_DRAFT_TOKENS,
        max_nodes: int = 16, confidence: Optional[float] = None,
    ):  # fmt: skip
        self.state, self.rt, self.sampler = state, state.runtime, sampler
        # (draft_confidence: a chain stops after a stream's draft less likely than this)
        self.confidence, self.sure = confidence, None
        self.tokens: List[int] = []
        self.next: Optional[mx.array] = None  # the next chain (tree: its nodes), on the device
        self.logits: Optional[mx.array] = None  # its stream logits
        self.q: Optional[mx.array] = None  # the drafts' distributions (drawn drafts)
        self.vocab = vocab_size(state.model)
        # A static tree of the streams' top tokens (None, or a chain: top-1 each).
        self.tree = None if tree is None or layout_of(tree.parents).is_chain else tree
        # (a chain's length: the given tree's, else as long as the call asks)
        self.levels = len(tree.parents) - 1 if tree is not None else self.rt.config.num_streams
        # draft="streams+ngram": prompt lookup's drafts merged in, up to max_nodes nodes.
        self.lookup, self.lookup_tokens, self.max_nodes = lookup, lookup_tokens, max_nodes
        self.parents: Optional[List[int]] = None  # the last draft's tree (None: a chain)

    def feed(self, upto: int) -> None:
        pass

    def draft(self, n: int) -> List[int]:
        """The next drafts, at most ``n`` levels deep: a chain, or with a tree its
        nodes but the root (``parents`` then says the tree, root first); with
        prompt lookup, its drafts (at most ``lookup_tokens``) merged in first
        (:func:`~mlx_specstream.tree.merge_chains`)."""
        tokens, parents = [], None
        if self.next is not None:
            if self.sure is not None:  # (a chain, cut where a stream is unsure)
                n = confident_levels(self.sure[: min(n, self.levels)].tolist(), self.confidence)
            if self.sampler is not None:
                self.q = self._q[:n]
            if self.tree is None:
                tokens = self.next[: min(n, self.levels)].tolist()
            else:
                keep = depth_limited(self.tree.parents, n)
                parents = subtree_parents(self.tree.parents, keep)
                nodes = self.next.tolist()
                tokens = [nodes[i - 1] for i in keep[1:]]
        if self.lookup is not None:
            tokens, parents = lookup_merged(self.lookup, self.tokens, tokens, parents,
                                            min(n, self.lookup_tokens), self.max_nodes)  # fmt: skip
        self.parents = parents
        return tokens

    def after_pass(self, node: int) -> None:
        """Drafts from the streams of the accepted ``node`` of the pass's drafts (0:
        the last pending token), the pass's caches still holding its rows."""
        s, row = self.state, self.state.first_row + node
        if s.stream_logits is not None:  # (the fused pass: every row's streams)
            logits = s.stream_logits[row]
        elif s.stream_hidden is not None:  # (the fused pass, the head after it)
            logits = self.rt.head(s.stream_hidden[row][None], draft=True)[0]
        else:
            logits = self.rt.draft_streams(mx.array(row, dtype=mx.int32), s.cache)
            s.cut_stream_rows(self.rt.config.num_streams)
        self.logits = logits  # (gamma, V): the chain's stream logits
        scores, self._q = level_scores(logits[:, : self.vocab], self.sampler)
        if self.tree is None:
            self.next = mx.argmax(scores, axis=-1)
            if self.confidence is not None:
                self.sure = top_probabilities(logits[:, : self.vocab])
        else:  # the static tree's nodes: rank r of level g (tree.levels, tree.ranks)
            top = top_k_desc(scores, max(self.tree.ranks) + 1)
            t = self.tree
            self.next = top[mx.array(t.levels[1:]), mx.array(t.ranks[1:])]
        mx.async_eval(self.next, *([] if self.sure is None else [self.sure]))

    def commit(self, accepted: int) -> None:
        pass

    def hold(self, end: int) -> None:
        pass


class ChainCache:
    """A recurrent model's caches during one call, and the call's tokens.

    ``tokens[:held]`` are in the caches; the rest (``pending``) are accepted and
    go in with the next pass, ahead of its drafts.
    """

    def __init__(
        self, model: nn.Module, cache: Optional[list], quant=None, runtime=None, streams=True
    ):
        self.model, self.split = model, split_recurrent_mixers(model)
        # (a StreamRuntime: its passes take trees; with ``streams``, they keep the stream
        # layers' inputs, and the fused stream pass's rows)
        self.runtime, self.streams = runtime, streams
        self.first_row = 0  # the last pass's row of its last pending token
        self.stream_logits: Optional[mx.array] = None  # a fused pass's, (rows, gamma, V)
        self.stream_hidden: Optional[mx.array] = None  # or its stream rows' states (rows, gamma, D)
        if runtime is not None:  # the stream layers' caches, one each
            layers = range(runtime.first_top, runtime.num_layers)
            self.upper = sorted({runtime.cache_slot[i] for i in layers})
        # (window layers: a WindowKVCache, whose rejected rows can be cut)
        self.cache = model_caches(model, bounded=True) if cache is None else cache
        check_recurrent_cache(self.cache)
        self.quant = quant  # mlx-lm's kv_bits (a KVQuantizer), converting as mlx-lm does
        self.tokens: List[int] = []
        self.held = 0
        self.pending_end = 0  # where the last pass's drafts began
        self.drafted = 0  # the last pass's drafts, while they are in the caches
        self.tree = False  # whether they were a tree
        # Its root-to-leaf paths that a commit keeps when accepted whole (the deepest):
        # path (node 0 first) -> its row of the mixers' batched states.
        self.whole_paths: dict = {}
        self.back = (0, [])  # where a roll-back goes: tokens held, recurrent states
        self.floor = 0  # the fewest tokens a roll-back may leave held (windows keep theirs)
        # Called with (position, the model's last hidden states (L, D)) after each pass
        # and prompt chunk (an attached drafter's: DrafterChains.take), or None.
        # (positions' states, then a tree's nodes': how many)
        self.hidden_sink: Optional[Callable[[int, mx.array, int], None]] = None

    @property
    def kv(self) -> list:
        """The KV layers (``kv_bits`` replaces them when it converts them)."""
        return [k for c in self.cache for k in layer_caches(c) if not _kept_aside(k)]

    @property
    def recurrent(self) -> list:
        """The caches a roll-back puts back as they were: the recurrent layers', and
        those kept whole (:func:`kept_whole`)."""
        return [k for c in self.cache for k in layer_caches(c) if _kept_aside(k)]

    def feed(self, upto: int) -> None:
        """Puts ``tokens[held:upto]`` in the caches, in one unsplit pass."""
        self.split.at = None
        tokens = mx.array(self.tokens[self.held : upto])
        if self.hidden_sink is None:
            self.model(tokens[None], cache=self.cache)
        else:  # (the last layer's states kept: runtime.prefill)
            self.hidden_sink(self.held, self.runtime.prefill(tokens, self.cache, keep_hidden=True))
        self.held = self.floor = upto
        self._settle()

    def draft_room(self, n: int) -> int:
        """How many of ``n`` drafts the next pass may carry. With ``kv_bits``, until
        the KV layers convert, a pass must not reach past the position where
        mlx-lm's one-token loop converts them (:class:`~mlx_specstream.cache.KVQuantizer`):
        pending tokens beyond that are fed first, and the drafts are cut to fit."""
        room = None if self.quant is None else self.quant.full_precision_room(self.cache)
        while room is not None and len(self.tokens) - self.held > room:
            self.feed(min(self.held + room, len(self.tokens) - 1))
            room = self.quant.full_precision_room(self.cache)
        return n if room is None else max(0, min(n, room - (len(self.tokens) - self.held)))

    def _settle(self, evaluate: bool = True) -> None:
        """Converts the KV layers where mlx-lm would now, has window layers drop the rows
        no window after a roll-back's point sees, and evaluates the caches (not after a
        pass: :meth:`run` evaluated their new states with its logits, and a roll-back
        puts back states computed then)."""
        if self.quant is not None:
            self.quant.maybe_quantize(self.cache)
        for c in self.kv:
            if isinstance(c, WindowKVCache):
                c.forget(min(self.held, self.floor))
        if evaluate:
            mx.eval([c.state for c in self.cache])

    def run(self, drafts: List[int], parents: Optional[List[int]] = None) -> mx.array:
        """One pass over the pending tokens and ``drafts``; the logits of the last
        pending token and of every draft.

        The pass is split between the two parts, so that a rejection can go back
        to the state after the pending tokens; except when a single token is
        pending before a chain: then a rejection goes back to the state before it,
        and it rides along again in the next pass (one more row there, where a
        split calls every recurrent mixer twice; ``benchmarks/RESULTS.md``).

        With ``parents`` (a tree whose root, node 0, is the last pending token and
        whose other nodes carry ``drafts``; a stream model's only), the drafts are a
        tree: the attention layers see it through the tree verifier's masks and
        positions, the recurrent mixers run it as a batch of its paths
        (:func:`_along_paths`), and after it the caches keep a deepest path of the
        tree where it was accepted whole (:meth:`commit`), else are rolled back.
        """
        pending, self.pending_end = self.tokens[self.held :], len(self.tokens)
        tree = parents is not None and not layout_of(parents).is_chain
        whole = len(pending) == 1 and not tree  # not split: back to before the pending token
        before = (self.held, [(c, state_of(c)) for c in self.recurrent])
        self.split.at = None if whole or not drafts else len(pending)
        self.split.kept, self.split.wrote, self.split.path_states = [], {}, []
        self.whole_paths = {}
        if tree:
            if self.runtime is None and self.kv:  # (without attention: no mask to make)
                raise ValueError("A tree of drafts needs the tree verifier's masks here.")
            rows = path_rows(parents)
            self.split.paths = tuple(mx.array(a) for a in rows)
            # The paths kept when accepted whole: the unpadded ones (every row's final
            # state is that path's), whose KV rows a commit gathers (cache.commit_path).
            for r, row in enumerate(rows[0].tolist()):
                if len(set(row)) == len(row):
                    self.whole_paths[tuple([0] + [n + 1 for n in row])] = r
        split = self.split.at is not None
        try:
            if self.runtime is None:
                logits = self.model(mx.array(pending + drafts)[None], cache=self.cache)
            else:  # (a chain's rows: the model's own masks and positions below the streams)
                width = len(pending) + len(drafts)
                fused = self.streams and not self.runtime.split_streams
                # Every row's stream logits from the pass's own head call (one read of the
                # head: the default, measured faster here on a CPU too, benchmarks/RESULTS.md),
                # or the accepted row's from the head after it (StreamDrafts.after_pass).
                in_pass = fused and self.runtime.stream_logits_in_pass is not False
                below = list(range(-1, len(pending) - 1))  # (the pending chain, then the drafts)
                above = range(len(drafts)) if parents is None else parents[1:]
                rows = layout_of(below + [len(pending) - 1 + q for q in above])
                out = self.runtime.forward(
                    pending + drafts, rows, self.cache, all_streams=fused, stream_logits=in_pass
                )
                logits, self.stream_logits = out.logits[None], out.stream_logits
                self.stream_hidden = out.stream_hidden if fused and not in_pass else None
                if self.hidden_sink is not None:  # (an attached drafter's: every row's)
                    self.hidden_sink(self.held, out.hidden, len(drafts) if tree else 0)
                if fused:  # (written after the main rows: cut before anything else)
                    self.cut_stream_rows(width * self.runtime.config.num_streams)
        finally:
            self.split.at, self.split.paths = None, None
        self.drafted, self.tree = len(drafts), tree
        self.first_row = len(pending) - 1
        if whole or (split and self.unsplit_states()):
            if tree:
                raise ValueError("A tree pass left a recurrent state no split mixer kept.")
            self.back = before
        else:
            self.back = (self.pending_end, self.split.kept)
        self.floor = self.back[0]
        rows = logits[0, len(pending) - 1 :]
        # (the caches' new states go with the logits: one evaluation, one wait, a step)
        mx.async_eval(rows, [c.state for c in self.cache])
        return rows

    def cut_stream_rows(self, n: int) -> None:
        """Cuts the last ``n`` rows, stream rows, from the stream layers' caches."""
        for i in self.upper:
            self.cache[i].trim(n)

    def unsplit_states(self) -> bool:
        """Whether the last split pass left a recurrent state that no split mixer kept
        (one written outside the layers' mixers, as LongCat's n-gram context, or
        inside an attention's ``CacheList``, as Baichuan-M1's): a rejection then goes
        back to before the pending tokens, which ride along again."""
        kept = {id(c) for c, _ in self.split.kept}
        return any(id(c) not in kept for c in self.recurrent)

    def commit(self, all_accepted: bool, path: Optional[List[int]] = None) -> None:
        """After :meth:`run`: keeps every draft, or goes back (:meth:`roll_back`;
        the accepted drafts are then pending). After a tree, ``path`` is the
        accepted one: kept when it is one of the tree's deepest paths whole (its KV
        rows gathered after the pending ones, a plain trim for the first path; each
        recurrent state is that path's row), else rolled back."""
        r = self.whole_paths.get(tuple(path)) if self.tree and path is not None else None
        if r is not None:
            for c, wrote in self.split.path_states:
                for i, a in wrote.items():
                    c.cache[i] = mx.contiguous(a[r : r + 1])  # (a copy, not a view of all)
            kept, kv = len(path) - 1, self.kv
            if kv:  # (the tree's rows follow what the caches held before: a reused cache's too)
                prefix = kv[0].offset - self.drafted
                commit_path(kv, prefix, [[n - 1 for n in path[1:]]] * len(kv))
            self.drafted = kept
            self.held = self.pending_end + kept
        elif all_accepted and not self.tree:
            self.held = self.pending_end + self.drafted
        else:
            self.roll_back()
        self.split.path_states = []  # (every path's states: let them go)
        self._settle(evaluate=False)

    def roll_back(self) -> None:
        """The caches as they were after the last pass's pending tokens (or, when
        it was not split, before its one pending token)."""
        held, states = self.back
        for c, state in states:
            set_state(c, state)
        for c in self.kv:
            c.trim(self.pending_end + self.drafted - held)
        self.held, self.drafted = held, 0

    def hold(self, end: int) -> None:
        """Leaves the caches holding ``tokens[:end]``: the last pass's drafts are
        taken out if the consumer stopped before all were yielded, and the tokens
        not yet in are fed."""
        if self.held > end:  # inside a step whose drafts were all accepted
            self.roll_back()
        if self.held < end:
            self.feed(end)

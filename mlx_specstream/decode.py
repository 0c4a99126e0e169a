"""The Speculative Streaming decode loop: one forward pass per step verifies the
previous draft tree and drafts the next one from the streams of the last
accepted node."""

from typing import Callable, Generator, List, Optional, Sequence, Tuple, Union

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import make_prompt_cache

from .cache import check_cache, commit_path
from .streams import StreamRuntime, get_runtime
from .sample_utils import DistributionSampler
from .tree import DraftTree, accept, accept_by_rejection, build_draft_tree


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _path_to(node: int, parents: Sequence[int], tokens: Sequence[int]) -> List[int]:
    """Tokens below the root on the path to ``node``, root excluded."""
    out = []
    while node > 0:
        out.append(tokens[node])
        node = parents[node]
    return out[::-1]


def _apply_processors(processors, history, tokens, parents, logits):
    """Runs mlx-lm logits processors on each tree node with that node's own history."""
    rows = []
    for a in range(logits.shape[0]):
        context = mx.array(history + _path_to(a, parents, tokens))
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


ACCEPTANCE = ("target-sample", "rejection")


def _default_acceptance(sampler) -> str:
    if sampler is _greedy or isinstance(sampler, DistributionSampler):
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


def _stream_logprobs(rt, out, cache, last, split, drafting=None):
    """``(gamma, V)`` log-probabilities of the streams of kept node ``last`` (or,
    with an attached drafter, of its levels; ``drafting`` is then
    ``(state, path, path_tokens, token)`` on the host)."""
    if rt.drafter is not None:
        slog = rt.drafter.draft(rt, drafting[0], out.hidden, *drafting[1:]).astype(mx.float32)
    elif split:
        slog = rt.draft_streams(last, cache).astype(mx.float32)
    else:
        slog = rt.head(mx.take(out.stream_hidden, last, axis=0)[None])[0].astype(mx.float32)
    return slog - mx.logsumexp(slog, axis=-1, keepdims=True)


def _target_sample_step(rt, out, cache, kept_tokens, logprobs, sampler, depth, kmax, dstate):
    """Design (a), on device: sample a target token at every node, walk while a
    child matches; drafts are the streams' top-k. One host read (two with an
    attached drafter, which drafts from the accepted path)."""
    targets = sampler(logprobs)
    _, last = accept(
        mx.array(kept_tokens),
        mx.array([0] + out.kept_parents[1:]),
        mx.array(out.kept_ancestors),
        targets,
    )
    results = [targets, last, logprobs]
    streams = depth and rt.drafter is None
    if streams:
        slog = _stream_logprobs(rt, out, cache, last, rt.split_streams)
        top = mx.argsort(-slog, axis=-1)[:, :kmax]
        results += [top, mx.take_along_axis(slog, top, axis=-1)]
    mx.eval(results)  # the step's one host read
    last = results[1].item()
    path = [last]
    while path[-1] > 0:  # the accepted nodes are the path from the root to ``last``
        path.append(out.kept_parents[path[-1]])
    path.reverse()
    token = targets[last].item()
    if not depth:
        return path, token, None, None
    if not streams:
        drafting = (dstate, path, [kept_tokens[i] for i in path], token)
        slog = _stream_logprobs(rt, out, cache, None, True, drafting)
        top = mx.argsort(-slog, axis=-1)[:, :kmax]
        results[3:] = [top, mx.take_along_axis(slog, top, axis=-1)]
        mx.eval(results[3:])
    return path, token, results[3].tolist(), results[4].tolist()


def _rejection_step(rt, out, cache, kept_tokens, logprobs, sampler, draft_q, depth, kmax, dstate):
    """Design (b): recursive rejection sampling on the host, then drafts drawn
    without replacement from the last accepted node's streams (Gumbel top-k)."""
    probs = sampler.probs(logprobs)
    uniforms = mx.random.uniform(shape=(len(kept_tokens) + 1,))
    mx.eval(probs, uniforms, logprobs)
    path, token = accept_by_rejection(
        kept_tokens, out.kept_parents, np.array(probs), draft_q, np.array(uniforms)
    )
    if not depth:
        return path, token, None, None, None
    drafting = (dstate, path, [kept_tokens[i] for i in path], token)
    slog = _stream_logprobs(rt, out, cache, mx.array(path[-1]), rt.split_streams, drafting)
    q = sampler.probs(slog)
    keys = mx.log(q) + mx.random.gumbel(q.shape)
    top = mx.argsort(-keys, axis=-1)[:, :kmax]  # draw order of a sample without replacement
    logq = mx.take_along_axis(mx.log(q), top, axis=-1)
    mx.eval(q, top, logq)
    # Scores that never increase along a draw: capping the tree then keeps a
    # draw-order prefix of every sibling list, as rejection sampling needs.
    scores = np.minimum.accumulate(np.array(logq), axis=1)
    return path, token, top.tolist(), scores.tolist(), np.array(q)


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
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
    max_kv_size: Optional[int] = None,
) -> Generator[Tuple[int, mx.array, bool, int], None, None]:
    """A generator of tokens decoded with Speculative Streaming.

    Each step runs one forward pass over the draft tree, verifies it, and
    drafts the next tree from the streams of the last accepted node. Greedy
    decoding walks the tree while a child carries its parent's argmax; the
    argmax at the last accepted node is the correction (or bonus) token. With
    sampling, ``acceptance`` picks one of two lossless rules (below).

    Args:
        prompt (mx.array): the prompt tokens (at least one).
        model (nn.Module): a model with streams attached.
        max_tokens (int): tokens to generate, ``-1`` for no limit. Default: ``256``.
        sampler (Callable, optional): mlx-lm sampler over ``(B, V)`` log
          probabilities. Default: argmax.
        logits_processors (list, optional): mlx-lm logits processors, applied at
          every tree node with that node's own token history.
        prompt_cache (list, optional): a ``KVCache`` per layer, updated in place.
        prefill_step_size (int): prompt chunk size. Default: ``2048``.
        speculative (bool): ``False`` decodes one token per pass (the baseline):
          plain mlx-lm decoding in lossless mode, the same model with its
          streams in shared mode. Default: ``True``.
        tree_top_k, tree_depth, prune_threshold, max_tree_nodes: per-call
          overrides of the model's tree settings.
        acceptance (str): how drafts are verified when sampling; both keep the
          model's distribution exactly. ``"target-sample"``: deterministic
          top-k drafts, a target token drawn at every node, walk while a child
          matches. ``"rejection"``: drafts drawn without replacement from the
          stream distributions, verified by recursive rejection sampling over
          siblings; needs a sampler from
          :func:`mlx_specstream.sample_utils.make_sampler`, reads the host
          twice per step and does not prune (a threshold is ignored with a
          warning). Greedy decoding always walks by argmax. Default
          (``None``): ``"rejection"`` when the sampler exposes its
          distribution (a :class:`DistributionSampler`), as it accepts more
          drafts (``benchmarks/RESULTS.md``); otherwise ``"target-sample"``,
          with a warning.
        kv_bits, kv_group_size, quantized_kv_start, max_kv_size: mlx-lm's
          KV-cache options; quantized and rotating caches cannot be rolled back
          to an accepted tree path, so setting them is refused.

    Yields:
        tuple: ``(token, logprobs, from_draft, forward_passes)``.
    """
    rt = get_runtime(model)
    ks, depth, threshold, max_nodes = resolve_tree_settings(
        rt, tree_top_k, tree_depth, prune_threshold, max_tree_nodes
    )
    if kv_bits is not None or max_kv_size is not None:
        raise ValueError(
            "kv_bits and max_kv_size are not supported by Speculative Streaming: quantized and "
            "rotating KV caches cannot be compacted to the accepted tree path. Leave them unset."
        )
    sampler = sampler or _greedy
    processors = logits_processors or []
    if acceptance is None:  # (without drafts there is nothing to accept)
        acceptance = _default_acceptance(sampler) if speculative and depth else "target-sample"
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance={acceptance!r}: choose one of {ACCEPTANCE}")
    if acceptance == "rejection" and not (
        sampler is _greedy or isinstance(sampler, DistributionSampler)
    ):
        raise ValueError(
            "acceptance='rejection' needs the target distribution, not only samples: pass a "
            "sampler from mlx_specstream.sample_utils.make_sampler."
        )
    check_prompt(model, prompt)
    if not speculative or depth == 0:
        if rt.config.mode == "lossless":
            # Streams never touch the main stream: this is the base model.
            for n, (token, logprobs) in enumerate(
                generate_step(
                    prompt,
                    model,
                    max_tokens=max_tokens,
                    sampler=sampler,
                    logits_processors=logits_processors,
                    prompt_cache=prompt_cache,
                    prefill_step_size=prefill_step_size,
                )
            ):
                yield token, logprobs, False, n + 1
            return
        depth = 0
    cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache
    check_cache(cache)
    prompt_list = prompt.tolist()
    first_top, num_layers = rt.first_top, rt.num_layers
    # Lossless main rows never read the streams: verify with main rows only,
    # then run the streams of the last accepted node alone (same result, far
    # fewer rows in the stream layers).
    split = rt.split_streams
    kmax = max(ks[:depth]) if depth else 0
    by_rejection = acceptance == "rejection" and not getattr(sampler, "greedy", True)
    if by_rejection and threshold > 0:
        # Pruning keeps or drops a draft by its value; rejection sampling's
        # residuals assume every draw is tried in order, so it would be biased.
        warnings.warn(
            f"acceptance='rejection' does not prune: prune_threshold={threshold} is ignored "
            "(pruning drafts by their values would bias rejection sampling).",
            stacklevel=2,
        )
        threshold = 0.0
    draft_q = None
    dstate = None
    if rt.drafter is not None and depth:
        dstate = rt.drafter.start(cache[0].offset, getattr(cache, "drafter_state", None))
        if hasattr(cache, "drafter_state"):  # a SpecPromptCache keeps it for the next call
            cache.drafter_state = dstate
    keep_hidden = dstate is not None and dstate.needs_prompt
    rt._prefill_hidden = []

    with mx.stream(generation_stream):
        # Prefill all but the last prompt token with the plain model.
        body = prompt[:-1]
        for start in range(0, body.size, prefill_step_size):
            rt.prefill(body[start : start + prefill_step_size], cache, keep_hidden)
            mx.eval([(c.keys, c.values) for c in cache])
        if keep_hidden and body.size:
            # The drafter's first pass reads the prompt too: (state, next token) pairs.
            dstate.prompt_hidden = mx.concatenate(rt._prefill_hidden, axis=0)
            dstate.prompt_next = prompt_list[1:]
        rt._prefill_hidden = []

        history = list(prompt_list)
        tree = DraftTree([prompt_list[-1]], [-1])
        emitted = passes = 0
        while True:
            prefix = cache[0].offset
            out = rt.forward(
                tree.tokens,
                tree.parents,
                cache,
                threshold,
                all_streams=not split,
            )
            passes += 1
            kept_tokens = [tree.tokens[i] for i in out.kept]
            logits = out.logits
            if processors:
                logits = _apply_processors(
                    processors, history, kept_tokens, out.kept_parents, logits
                )
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if by_rejection:
                path, token, top, top_lp, draft_q = _rejection_step(
                    rt, out, cache, kept_tokens, logprobs, sampler, draft_q, depth, kmax, dstate
                )
            else:
                path, token, top, top_lp = _target_sample_step(
                    rt, out, cache, kept_tokens, logprobs, sampler, depth, kmax, dstate
                )
            L = path[-1]
            commit_path(
                cache,
                prefix,
                [
                    path if layer >= first_top else [out.kept[i] for i in path]
                    for layer in range(num_layers)
                ],
            )
            new = [(kept_tokens[i], out.kept_parents[i], True) for i in path[1:]]
            new.append((token, L, False))
            for token_, source, from_draft in new:
                emitted += 1
                yield token_, logprobs[source], from_draft, passes
                if emitted == max_tokens:
                    return
            history.extend(t for t, _, _ in new)

            d = depth if max_tokens < 0 else min(depth, max_tokens - emitted - 1)
            if d > 0:
                tree = build_draft_tree(
                    token,
                    [top[j][: ks[j]] for j in range(d)],
                    [top_lp[j][: ks[j]] for j in range(d)],
                    max_nodes,
                )
            else:
                tree = DraftTree([token], [-1])
            if passes % 256 == 0:
                mx.clear_cache()

"""Picks the draft tree that decodes fastest on this device.

``python -m mlx_specstream.tune [--model DIR [--drafter DIR | --draft-model DIR]]
[--batch-size K [--batch-only]] [--save | --forget]``, ``python -m mlx_specstream.tune --stored``

Measures greedy tokens/s of one-token-per-pass decoding and of a grid of
trees (top-k per stream, depth, max nodes, then for the best shapes the
stream pass, where the stream logits are computed, pruning thresholds and
pipelined steps), on held-out prompts; with streams, also prompt lookup
(``draft="ngram"``) and prompt lookup merged with the best tree
(``"streams+ngram"``). The fastest wins, unless it beats plain decoding by
less than ``--min-gain`` (the median ratio of ``--confirm-rounds`` rounds that
time it and plain decoding back to back): then speculation does not pay on this device and
``tree_depth = 0`` (plain decoding) is chosen, and said. ``--save`` writes the
choice into the model's ``config.json`` for this device only (under ``tuned``,
keyed by :func:`~mlx_specstream.precision.device_key`; the previous file is
kept as ``config.json.before-tune``): on this device a call that names no tree
or ``draft`` then uses the stored ones, and on others the model's own settings
(or what was tuned there) still apply.

``--batch-size K`` also measures batches of K rows (``batch_generate``, the server's
batches): rows without drafts, prompt lookup of a few lengths and, with streams,
their chain of each depth through either stream pass, pipelined or not
(:func:`tune_batch`); the
choice is stored as the config's ``batch`` for this device, which
``batch_generate(draft="auto")`` and the server then follow; ``--batch-only``
tunes batches alone, keeping the device's other stored settings.

``--draft-model DIR`` tunes mlx-lm's draft-model decoding of the pair instead
(:func:`tune_draft_model`): chain lengths, trees static and grown, prompt lookup merged in.

A plain mlx-lm model (no streams, no drafter) gets prompt lookup only, with
several draft lengths (``--num-draft-tokens`` of the generate CLI) and several
drafts per tree (``--ngram-candidates``).

The tuner never writes into a plain mlx-lm model, a checkpoint whose own MTP layer
drafts, or the directories of ``--drafter`` or ``--draft-model``: it prints the flags that
decode as it chose, and ``--save`` keeps them for this device in the user's store
(:mod:`~mlx_specstream.tuned_store`), where ``generate``, ``chat`` and ``server`` apply them
to the same directories when a call names no drafting flag (``--no-speculation`` where
nothing pays: a draft model is then not even loaded). ``--stored`` lists what the store
holds; ``--forget`` removes this device's entry for ``--model`` (and its pair).
"""

import argparse
import functools
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .benchmark import DTYPES, load_prompts, verify_cost_curve
from .config import CONFIG_KEY, DRAFTER_KEY, write_config
from .draft_model import grows_trees
from .dynamic_tree import drafter_grows
from .generate import stream_generate
from .mtp import MTPDrafter
from .precision import compute_dtype, device_key, on_gpu
from .recurrent import has_recurrent_layers, lookup_tree_refusal
from .streams import get_runtime
from .support import tree_on_chains_refusal


def tokens_per_second(
    model,
    tokenizer,
    prompts,
    max_tokens,
    stream_pass=None,
    stream_logits_in_pass=None,
    num_mtp_layers=None,
    draft_vocab=None,
    **tree,
):
    """Median over prompts of greedy generation tokens/s, and the mean tau.
    ``stream_pass`` (``"fused"``/``"split"``, lossless streams only),
    ``stream_logits_in_pass``, ``num_mtp_layers`` (the MTP layers that draft) and
    ``draft_vocab=False`` (every token ranked, not the model's draft vocabulary)
    override the model's for this measurement."""
    # (a model with recurrent layers runs prompt lookup without a runtime)
    rt = get_runtime(model) if hasattr(model, "speculative_streams") else None
    saved = None if rt is None else (rt.split_streams, rt.stream_logits_in_pass)
    if stream_pass is not None:
        rt.split_streams = stream_pass == "split"
    if stream_logits_in_pass is not None:
        rt.stream_logits_in_pass = stream_logits_in_pass
    layers = None
    if num_mtp_layers is not None:
        layers = rt.drafter.num_layers
        rt.drafter.use_layers(num_mtp_layers)
    vocab = None if rt is None else rt.draft_vocab
    if draft_vocab is False:
        rt.draft_vocab = None
    tps, taus = [], []
    try:
        for prompt in prompts:
            for r in stream_generate(
                model, tokenizer, mx.array(prompt), max_tokens=max_tokens, **tree
            ):
                pass
            tps.append(r.generation_tps)
            taus.append(r.generation_tokens / r.forward_passes)
    finally:
        if rt is not None:
            rt.split_streams, rt.stream_logits_in_pass = saved
        if layers is not None:
            rt.drafter.use_layers(layers)
        if rt is not None:
            rt.draft_vocab = vocab
    return statistics.median(tps), statistics.mean(taus)


def candidate_trees(num_streams, has_adapter):
    """Tree shapes to try: every depth and width, capped at a few sizes."""
    shapes = []
    for depth in range(1, num_streams + 1):
        for k in (1, 2, 3):
            full = sum(k**g for g in range(depth + 1))
            for cap in sorted({n for n in (4, 8, 16) if n < full} | {full}):
                shapes.append(
                    dict(tree_depth=depth, tree_top_k=k, max_tree_nodes=cap, prune_threshold=0.0)
                )
    return shapes


CONFIRM_ROUNDS = 3  # rounds timing the fastest trial against plain decoding back to back


class Trials:
    """Settings measured against one-token-per-pass decoding on the same prompts:
    each one's tokens/s and tau, logged as it is measured.

    Args:
        measure: ``measure(model, tokenizer, prompts, max_tokens, **settings)`` gives
          tokens/s and tau (default: :func:`tokens_per_second`).
        plain (dict): the settings of one token per pass, and the choice when nothing
          beats it (default: ``speculative=False``; the choice ``tree_depth=0``).
        warm_up: settings of a short first run, not timed.
    """

    def __init__(self, model, tokenizer, prompts, max_tokens, log, measure=None,
                 plain: Optional[dict] = None, **warm_up):  # fmt: skip
        # (a trial's chains are drafted uncut unless it says, not as an earlier tuning stored)
        stored = getattr(getattr(model, "speculative_streams", None), "config", None)
        stored = getattr(stored, "draft_confidence", None)
        uncut = {"draft_confidence": 0} if measure is None and stored else {}
        self.log, measure = log, measure or tokens_per_second
        self.measure = lambda **s: measure(model, tokenizer, prompts, max_tokens, **{**uncut, **s})
        self.plain, self.plain_choice = (
            (dict(speculative=False), {"tree_depth": 0}) if plain is None else (plain, plain)
        )
        measure(model, tokenizer, prompts[:1], 16, **{**uncut, **warm_up})
        self.base_tps, _ = self.measure(**self.plain)
        log(f"one token per pass: {self.base_tps:.1f} tokens/s")
        self.results = []  # (tokens/s, tau, settings)

    def run(self, settings: dict) -> None:
        tps, tau = self.measure(**settings)
        self.results.append((tps, tau, settings))
        self.log(f"{settings}: {tps:.1f} tokens/s ({tps / self.base_tps:.2f}x), tau {tau:.2f}")

    def fastest(self, n: int) -> list:
        """The settings of the ``n`` fastest trials, fastest first."""
        return [s for _, _, s in sorted(self.results, key=lambda r: -r[0])[:n]]

    def confirm(self, settings: dict, rounds: int):
        """Median tokens/s of ``settings`` and of plain decoding, and the median of
        their ratio, over ``rounds`` rounds that time the two back to back. A CPU's
        speed can drift by a third between minutes, more than most trials differ."""
        pairs = []
        for _ in range(rounds):
            base, _ = self.measure(**self.plain)
            tps, _ = self.measure(**settings)
            pairs.append((tps, base, tps / base))
        self.log(f"confirmed in {rounds} rounds: " + ", ".join(f"{r:.2f}x" for *_, r in pairs))
        return tuple(statistics.median(column) for column in zip(*pairs))

    def choice(
        self, min_gain: float, what: str, describe=str, confirm_rounds: int = CONFIRM_ROUNDS
    ):
        """The fastest settings, or plain decoding's (``{"tree_depth": 0}``) when they
        beat it by less than ``min_gain``; with their tokens/s and plain's. With
        ``confirm_rounds``, that gain is the median of the fastest's ratio to plain
        decoding timed back to back in as many rounds, not its one trial's."""
        best_tps, best_tau, best = max(self.results, key=lambda r: r[0])
        base, gain = self.base_tps, best_tps / self.base_tps
        if confirm_rounds:
            best_tps, base, gain = self.confirm(best, confirm_rounds)
        if gain < min_gain:
            self.log(
                f"{what} does not pay on this device: the fastest gives {best_tps:.1f} tokens/s "
                f"vs {base:.1f} one token per pass ({gain:.2f}x < {min_gain}x). Choosing plain "
                "decoding."
            )
            return dict(self.plain_choice), base, base
        self.log(
            f"Best: {describe(best)} at {best_tps:.1f} tokens/s ({gain:.2f}x), tau {best_tau:.2f}"
        )
        return best, best_tps, base


def tune(
    model,
    tokenizer,
    prompts,
    max_tokens=64,
    min_gain=1.05,
    log=print,
    confirm_rounds=CONFIRM_ROUNDS,
):
    """The fastest way to decode ``model`` greedily on this device: a grid of stream
    (or drafter) trees, then for the best ones the stream pass, where the stream
    logits are computed, pruning thresholds and pipelined steps (or, for a drafter
    of several MTP layers, fewer of them), then prompt lookup alone and merged with
    the best tree; plain decoding when nothing beats it by ``min_gain`` in
    ``confirm_rounds`` back-to-back rounds.

    Returns:
        tuple: the choice (what :func:`save_choice` stores), its tokens/s and
        plain decoding's tokens/s.
    """
    rt = get_runtime(model)
    if has_recurrent_layers(model):  # (streams or a drafter drafting chains: recurrent)
        run = tune_stream_chains if rt.drafter is None else tune_drafter_chains
        return run(model, tokenizer, prompts, max_tokens, min_gain, log, confirm_rounds)
    has_adapter = rt.streams is not None and "prune_adapter" in rt.streams
    trials = Trials(model, tokenizer, prompts, max_tokens, log)
    lossless_streams = rt.streams is not None and rt.config.mode == "lossless"
    # (a drafter of several MTP layers: the trees drafted by all of them)
    held = len(rt.drafter.held_depths) if isinstance(rt.drafter, MTPDrafter) else 1
    # (an EAGLE drafter, one MTP layer: dynamic trees; grown in the grid where by default)
    grows = held == 1 and drafter_grows(rt.drafter)
    grown_first = grows and rt.drafter.grows_by_default
    for tree in candidate_trees(rt.config.num_streams, has_adapter):
        # (not the draft source or pipelining a previous tuning stored)
        tree.update(draft="streams", pipeline=False)
        if lossless_streams:
            tree["stream_pass"] = "fused"
        if held > 1:
            tree["num_mtp_layers"] = held
        if grows and tree["tree_top_k"] > 1:  # (not the way a previous tuning stored)
            tree["dynamic_tree"] = grown_first
        trials.run(dict(tree, **with_vocab(rt)))
    if grows:
        # The other kind on the fastest wide trees: a static tree of the drafter's levels
        # (fewer rows a step, fewer drafts right), or a grown one.
        wide = [t for t in trials.fastest(len(trials.results)) if "dynamic_tree" in t]
        for tree in wide[:3]:
            trials.run(dict(tree, dynamic_tree=not tree["dynamic_tree"]))
    if held > 1:
        # Fewer MTP layers (each costs a layer's pass a step): on the fastest trees that
        # read more than one (a tree of d levels runs the first d only).
        deep = [t for t in trials.fastest(len(trials.results)) if t["tree_depth"] > 1]
        for tree in deep[:3]:
            for n in range(1, min(held, tree["tree_depth"])):
                trials.run(dict(tree, num_mtp_layers=n))
    confident_chains(trials)
    try_every_token(trials, rt)
    if lossless_streams:
        # The stream pass: streams of every node inside the verify pass, or a
        # second pass for the accepted node's only; measured on the best shapes.
        for tree in trials.fastest(3):
            trials.run(dict(tree, stream_pass="split"))
    if rt.streams is not None:
        # Every node's stream logits from the pass's own head call, or the accepted
        # node's from a head call of their own (the device's default): on the
        # fastest fused trees, the other way round.
        fused = [
            t
            for t in trials.fastest(len(trials.results))
            if t.get("stream_pass", "fused") == "fused"
        ]
        for tree in fused[:3]:
            trials.run(dict(tree, stream_logits_in_pass=not on_gpu()))
    if has_adapter:
        for tree in trials.fastest(3):
            for threshold in (0.02, 0.05, 0.1, 0.2):
                trials.run(dict(tree, prune_threshold=threshold))
    if rt.streams is not None:
        # Pipelined steps (launched before the previous one's host read), where the
        # tree allows: the fused stream pass, no pruning.
        can = [
            t
            for t in trials.fastest(len(trials.results))
            if t.get("stream_pass", "fused") == "fused"
            and not t["prune_threshold"]
            and "draft_confidence" not in t  # (a cut reads the host before the next tree)
        ]
        for tree in can[:3]:
            trials.run(dict(tree, pipeline=True))  # fmt: skip
    # Prompt lookup, alone and merged with the fastest tree (the streams' or the drafter's).
    best_tree = {k: v for k, v in trials.fastest(1)[0].items() if k != "pipeline"}
    for drafts in (dict(draft="ngram"), dict(best_tree, draft="streams+ngram")):
        trials.run(drafts)
    choice, tps, base = trials.choice(min_gain, "Speculation", confirm_rounds=confirm_rounds)
    if lossless_streams and choice == {"tree_depth": 0}:
        # Plain decoding: a call that turns speculation on still gets the faster stream pass.
        fastest = trials.fastest(len(trials.results))
        choice["stream_pass"] = next(t["stream_pass"] for t in fastest if "stream_pass" in t)
    return choice, tps, base


def confident_chains(trials: "Trials") -> None:
    """The fastest of the deepest chains tried (``tree_top_k`` 1), cut where its drafter is unsure at each
    of :data:`DRAFT_CONFIDENCES` (``draft_confidence``): a step then verifies, and a
    drafter that drafts level by level drafts, only the levels it is sure of."""
    chains = [s for s in trials.fastest(len(trials.results))
              if s.get("tree_top_k") == 1 and s.get("draft", "streams") == "streams"
              and s.get("tree_depth", 0) > 1 and "draft_confidence" not in s]  # fmt: skip
    if not chains:
        return
    depth = max(s["tree_depth"] for s in chains)
    deepest = next(s for s in chains if s["tree_depth"] == depth)  # (the fastest so deep)
    for confidence in DRAFT_CONFIDENCES:
        trials.run(dict(deepest, draft_confidence=confidence))


def with_vocab(rt) -> dict:
    """What a trial says of the draft vocabulary: ``{"draft_vocab": True}`` where the
    model has one (the choice then stores it), else nothing."""
    return {} if rt.draft_vocab is None else {"draft_vocab": True}


def try_every_token(trials: "Trials", rt, n: int = 3) -> None:
    """With a draft vocabulary, the ``n`` fastest trials that draft again with every token
    ranked (drafts right more often, each level dearer)."""
    if rt.draft_vocab is None:
        return
    drafting = [t for t in trials.fastest(len(trials.results))
                if t.get("tree_depth") or t.get("num_draft_tokens")]  # fmt: skip
    for settings in drafting[:n]:
        trials.run(dict(settings, draft_vocab=False))


def tune_stream_chains(model, tokenizer, prompts, max_tokens, min_gain, log, confirm_rounds):
    """Lossless streams on a model with recurrent layers (what :func:`tune` runs for
    them, with its arguments): the fastest tree of :func:`candidate_trees` (chains,
    ``tree_top_k`` 1, and where the model takes them trees, whose nodes its recurrent
    mixers read along their paths) with the fused stream pass, then the split one on
    the two fastest, where the stream logits are computed on the two fastest fused,
    then prompt lookup alone and merged with the fastest; plain decoding when none
    beats it by ``min_gain``.

    Returns:
        tuple: the choice (``{"draft": "streams", "tree_depth": n, "tree_top_k": k,
        "max_tree_nodes": m, "prune_threshold": 0.0, "stream_pass": ...}`` or
        ``{"tree_depth": 0}``), its tokens/s and plain decoding's tokens/s.
    """
    trials = Trials(model, tokenizer, prompts, max_tokens, log, draft="streams")
    why = tree_on_chains_refusal(model)
    trees = why is None
    if not trees:
        log(f"[INFO] chains only: {why}")
    rt = get_runtime(model)
    for shape in candidate_trees(rt.config.num_streams, False):
        if trees or shape["tree_top_k"] == 1:
            trials.run(dict(shape, draft="streams", stream_pass="fused", **with_vocab(rt)))
    confident_chains(trials)
    # Every row's streams in the verifying pass, or the accepted row's in a pass of their own.
    for shape in trials.fastest(2):
        trials.run(dict(shape, stream_pass="split"))
    # Every row's stream logits from the pass's own head call (the default here), or
    # the accepted row's after it: on the two fastest fused, the latter.
    fused = [t for t in trials.fastest(len(trials.results)) if t["stream_pass"] == "fused"]
    for shape in fused[:2]:
        trials.run(dict(shape, stream_logits_in_pass=False))
    try_every_token(trials, rt, 2)
    # Prompt lookup, alone and merged with the fastest tree (as on any model).
    trials.run(dict(draft="ngram"))
    trials.run(dict(trials.fastest(1)[0], draft="streams+ngram"))
    return trials.choice(min_gain, "The streams' drafts", confirm_rounds=confirm_rounds)


def tune_drafter_chains(model, tokenizer, prompts, max_tokens, min_gain, log, confirm_rounds):
    """An attached drafter (its MTP layer, ParallelSpec or Medusa heads) on a model with
    recurrent layers (what :func:`tune` runs for it, with its arguments): its chains
    of every length (:class:`~mlx_specstream.recurrent.DrafterChains`), then where the
    model takes them the static trees of its levels (:func:`candidate_trees` wider than
    a chain, their nodes read along their paths by the recurrent mixers) and, for a
    drafter that grows them (one MTP layer), the dynamic trees of the three fastest wide
    ones; plain decoding when none beats it by ``min_gain``.

    Returns:
        tuple: the choice (``{"tree_depth": n, "tree_top_k": k, "max_tree_nodes": m}``:
        ``k`` 1 and ``m`` ``n + 1`` for chains of ``n``; or ``{"tree_depth": 0}``), its
        tokens/s and plain decoding's.
    """
    trials, rt = Trials(model, tokenizer, prompts, max_tokens, log), get_runtime(model)
    for n in range(1, rt.config.num_streams + 1):
        trials.run(dict(num_draft_tokens=n, **with_vocab(rt)))
    if rt.config.num_streams > 1:  # (the longest chain, cut where the drafter is unsure)
        for confidence in DRAFT_CONFIDENCES:
            trials.run(dict(num_draft_tokens=rt.config.num_streams, draft_confidence=confidence,
                            **with_vocab(rt)))  # fmt: skip
    why = tree_on_chains_refusal(model)
    grows = why is None and drafter_grows(rt.drafter)
    if why is None:
        for shape in candidate_trees(rt.config.num_streams, False):
            if shape["tree_top_k"] > 1:
                shape.pop("prune_threshold")
                if grows:  # (static first; not the way a previous tuning stored)
                    shape["dynamic_tree"] = False
                trials.run(dict(shape, **with_vocab(rt)))
    else:
        log(f"[INFO] chains only: {why}")
    if grows:  # (the fastest wide trees grown: each node's children after its own path)
        wide = [t for t in trials.fastest(len(trials.results)) if "dynamic_tree" in t]
        for tree in wide[:3]:
            trials.run(dict(tree, dynamic_tree=True))
    try_every_token(trials, rt, 2)
    # Prompt lookup, alone and merged into the fastest chain or tree (as on any model).
    fastest = as_tree(trials.fastest(1)[0])
    trials.run(dict(draft="ngram"))
    trials.run(dict(fastest, draft="streams+ngram"))

    def describe(best):
        if "num_draft_tokens" not in best:
            return choice_flags(best)
        n, cut = best["num_draft_tokens"], best.get("draft_confidence")
        if cut is not None:
            return f"chains of up to {n} cut at {cut} ({choice_flags(as_tree(best))})"
        return f"chains of {n} (--num-draft-tokens {n})"

    best, tps, base = trials.choice(min_gain, "Drafting chains", describe, confirm_rounds)
    if "num_draft_tokens" in best:
        best = as_tree(best)
    return best, tps, base


def as_tree(settings: dict) -> dict:
    """An attached drafter's chain of ``num_draft_tokens`` as the tree settings that draft
    it (what the config stores: ``top_k`` 1, ``n + 1`` nodes); other settings as they are.

    Example:
        >>> as_tree({"num_draft_tokens": 2, "draft_vocab": False})
        {'draft_vocab': False, 'tree_depth': 2, 'tree_top_k': 1, 'max_tree_nodes': 3}
    """
    if "num_draft_tokens" not in settings:
        return settings
    out = {k: v for k, v in settings.items() if k != "num_draft_tokens"}
    n = settings["num_draft_tokens"]
    return dict(out, tree_depth=n, tree_top_k=1, max_tree_nodes=n + 1)


def verify_cost_note(model, log=print) -> float:
    """Measures and logs c(16): a plain pass over 16 tokens / one over one token.

    Verifying drafts pays only where c(n) is small. MLX's CPU backend multiplies
    bfloat16 and float16 without BLAS, so there a pass over n tokens costs about n
    one-token passes; the note then says so and names float32.

    Returns:
        float: the measured c(16).
    """
    c16 = verify_cost_curve(model, sizes=(1, 16), repeats=3, kinds=("plain",))["plain"][16][1]
    log(f"a plain pass over 16 tokens costs {c16:.1f} one-token passes on this device")
    dtype = compute_dtype(model)
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    if not on_gpu() and (dtype != mx.float32 or quantized):
        what = f"{dtype}" + (" with quantized weights" if quantized else "")
        log(
            f"[INFO] On MLX's CPU backend only float32 products go to BLAS; this model computes "
            f"in {what}, so each verified token costs nearly a full pass. With a fast BLAS "
            "(OpenBLAS, Accelerate, MKL) float32 verifies nearly for free: measure it with "
            "--dtype float32 (and to run that way, convert the model to float32)."
        )
    return c16


LOOKUP_LENGTHS = (2, 4, 6, 10)  # prompt-lookup draft lengths tried on a plain model
LOOKUP_CANDIDATES = (2, 4)  # drafts per tree tried with the longest length (ngram_candidates)


def tune_lookup(
    model,
    tokenizer,
    prompts,
    max_tokens=64,
    min_gain=1.05,
    log=print,
    confirm_rounds=CONFIRM_ROUNDS,
):
    """Prompt lookup on a model with the verifier only: the fastest draft length
    (and, at the longest, several drafts per tree where the model takes trees:
    :func:`~mlx_specstream.recurrent.lookup_tree_refusal`), or plain decoding when
    none beats it by ``min_gain``.

    Returns:
        tuple: the choice (``{"draft": "ngram", "num_draft_tokens": n}``, with
        ``"ngram_candidates"`` where more than one draft won, or ``{"tree_depth": 0}``),
        its tokens/s and plain decoding's tokens/s.
    """
    trials = Trials(model, tokenizer, prompts, max_tokens, log, draft="ngram")
    for n in LOOKUP_LENGTHS:
        trials.run(dict(draft="ngram", num_draft_tokens=n))
    if lookup_tree_refusal(model) is None:  # (else one chain a pass)
        for k in LOOKUP_CANDIDATES:
            trials.run(dict(draft="ngram", num_draft_tokens=LOOKUP_LENGTHS[-1], ngram_candidates=k))

    def describe(best):
        k = best.get("ngram_candidates", 1)
        more = f" --ngram-candidates {k}" if k > 1 else ""
        return f"--draft ngram --num-draft-tokens {best['num_draft_tokens']}{more}"

    return trials.choice(min_gain, "Prompt lookup", describe=describe,
                         confirm_rounds=confirm_rounds)  # fmt: skip


DRAFT_MODEL_CHAINS = (1, 2, 3, 4, 5)  # a draft model's chain lengths tried (num_draft_tokens)
DRAFT_MODEL_TREES = ((2, 3, 8), (3, 4, 12), (4, 5, 16))  # its trees: (top-k, levels, nodes)


# Chains cut where the draft model is unsure (draft_confidence): their longest, and the
# thresholds tried (transformers' assistant_confidence_threshold defaults to 0.4)
# (0.3 was fastest for the shipped pair on this CPU: benchmarks/RESULTS.md)
CONFIDENT_CHAIN, DRAFT_CONFIDENCES = 8, (0.3, 0.4, 0.6)
# The longest chain under transformers' heuristic schedule (draft_schedule), its default
# for assistant models: 2 longer after a step that accepted all, 1 shorter after a miss
SCHEDULED_CHAIN = 8


def tune_draft_model(
    model,
    tokenizer,
    draft_model,
    prompts,
    max_tokens=64,
    min_gain=1.05,
    log=print,
    confirm_rounds=CONFIRM_ROUNDS,
):
    """mlx-lm's draft-model decoding through our verifier (``draft_model=``): the fastest
    chain length, a long chain cut where the draft model is unsure (``draft_confidence``),
    chains whose length follows transformers' heuristic schedule (``draft_schedule``),
    tree (its levels' top-k, static and grown: ``dynamic_tree``) or the
    fastest of those with prompt lookup merged in, against plain decoding without the
    draft model; plain decoding when none beats it by ``min_gain``. Trees are tried where
    both models take them (no recurrent layers; grown ones: no attention chunks or
    sparse attention in the draft model), and where not the log says why.

    Returns:
        tuple: the choice (``{"num_draft_tokens": n}``, with ``draft_confidence`` for a
        cut chain, ``draft_schedule`` for a scheduled one, ``tree_top_k``,
        ``max_tree_nodes``, ``dynamic_tree`` for a tree and ``draft: "ngram"`` for lookup
        merged in; or ``{"tree_depth": 0}``), its tokens/s and plain decoding's.
    """

    def measure(model, tokenizer, prompts, max_tokens, **settings):
        extra = {} if settings.get("speculative") is False else {"draft_model": draft_model}
        return tokens_per_second(model, tokenizer, prompts, max_tokens, **settings, **extra)

    trials = Trials(model, tokenizer, prompts, max_tokens, log, measure=measure)
    for n in DRAFT_MODEL_CHAINS:
        trials.run(dict(num_draft_tokens=n))
    for confidence in DRAFT_CONFIDENCES:  # (long chains cut where the draft model is unsure)
        trials.run(dict(num_draft_tokens=CONFIDENT_CHAIN, draft_confidence=confidence))
    trials.run(dict(num_draft_tokens=SCHEDULED_CHAIN, draft_schedule="heuristic"))
    if has_recurrent_layers(model) or has_recurrent_layers(draft_model):
        log("trees: not tried (recurrent layers verify one chain a pass)")
    else:
        grows = grows_trees(draft_model)
        if not grows:
            log("grown trees: not tried (the draft model has chunked or sparse attention)")
        for k, levels, nodes in DRAFT_MODEL_TREES:
            for dynamic in (False, True) if grows else (False,):
                trials.run(dict(num_draft_tokens=levels, tree_top_k=k, max_tree_nodes=nodes,
                                dynamic_tree=dynamic))  # fmt: skip
    trials.run(dict(trials.fastest(1)[0], draft="ngram"))
    return trials.choice(min_gain, "Draft-model decoding", describe=draft_model_flags,
                         confirm_rounds=confirm_rounds)  # fmt: skip


def draft_model_flags(choice: dict) -> str:
    """The command-line flags, after ``--draft-model DIR``, that decode as ``choice``
    (:func:`tune_draft_model`'s) says.

    Example:
        >>> draft_model_flags({"num_draft_tokens": 3})
        '--num-draft-tokens 3'
        >>> draft_model_flags({"num_draft_tokens": 8, "draft_confidence": 0.4})
        '--num-draft-tokens 8 --draft-confidence 0.4'
        >>> draft_model_flags({"num_draft_tokens": 8, "draft_schedule": "heuristic"})
        '--num-draft-tokens 8 --draft-schedule heuristic'
        >>> draft_model_flags({"num_draft_tokens": 5, "tree_top_k": 4, "max_tree_nodes": 16,
        ...                    "dynamic_tree": True, "draft": "ngram"})
        '--num-draft-tokens 5 --tree-top-k 4 --max-tree-nodes 16 --dynamic-tree --draft ngram'
    """
    flags = ["--num-draft-tokens", choice["num_draft_tokens"]]
    if "tree_top_k" in choice:
        flags += [
            "--tree-top-k",
            choice["tree_top_k"],
            "--max-tree-nodes",
            choice["max_tree_nodes"],
        ]
        flags += ["--dynamic-tree" if choice["dynamic_tree"] else "--no-dynamic-tree"]
    if "draft_confidence" in choice:
        flags += ["--draft-confidence", choice["draft_confidence"]]
    if "draft_schedule" in choice:
        flags += ["--draft-schedule", choice["draft_schedule"]]
    if choice.get("draft") == "ngram":
        flags += ["--draft", "ngram"]
    return " ".join(str(f) for f in flags)


def tuned_flags(choice: dict, with_draft_model: bool = False) -> list:
    """The flags that decode as ``choice`` says (after ``--draft-model DIR`` where
    ``with_draft_model``), as the user's store keeps them.

    Example:
        >>> tuned_flags({"tree_depth": 0}, with_draft_model=True)
        ['--no-speculation']
        >>> tuned_flags({"num_draft_tokens": 2}, with_draft_model=True)
        ['--num-draft-tokens', '2']
        >>> tuned_flags({"draft": "ngram", "num_draft_tokens": 4})
        ['--draft', 'ngram', '--num-draft-tokens', '4']
    """
    if choice.get("tree_depth") == 0:
        return ["--no-speculation"]
    return (draft_model_flags(choice) if with_draft_model else choice_flags(choice)).split()


def described(key: dict) -> str:
    """A store entry's (or :func:`~mlx_specstream.cli_args.tuning_key`'s) directories in words.

    Example:
        >>> described({"model": "q4", "drafter": None, "draft_model": "small"})
        'q4 with draft model small'
    """
    pair = [f" with {k.replace('_', ' ')} {key[k]}" for k in ("drafter", "draft_model")
            if key.get(k) is not None]  # fmt: skip
    return f"{key['model']}{''.join(pair)}"


def store_tuning(args, choice: dict, tps: float, base: float, log=print) -> dict:
    """Keeps ``choice`` for ``args``' model (with its ``--drafter`` or ``--draft-model``) on
    this device in the user's store (:mod:`~mlx_specstream.tuned_store`), where generate,
    chat and server find it; for models whose files the tuner does not write."""
    import mlx_lm

    from .cli_args import tuning_key
    from .tuned_store import save_flags, store_path

    flags = tuned_flags(choice, with_draft_model=args.draft_model is not None)
    key = tuning_key(args)
    measured = dict(tokens_per_second=tps, plain_tokens_per_second=base, mlx=mx.__version__,
                    mlx_lm=mlx_lm.__version__)  # fmt: skip
    entry = save_flags(flags, device_key(), measured=measured, **key)
    log(f"[INFO] saved for this device ({device_key()}) in {store_path()}: generate, chat and "
        f"server decode {described(key)} with {' '.join(flags)} where a call names no "
        "drafting flag (its files are not written)")  # fmt: skip
    return entry


BATCH_LOOKUP_LENGTHS = (2, 4)  # prompt-lookup draft lengths tried in batches


def batch_tokens_per_second(model, tokenizer, prompts, max_tokens, rows=4, **settings):
    """Generated tokens/s of ``batch_generate`` over ``rows`` prompts at once (``prompts``
    in turn), greedy, and tau (tokens a row got per pass)."""
    from .batch import batch_generate

    batch = [prompts[i % len(prompts)] for i in range(rows)]
    stats = batch_generate(model, tokenizer, batch, max_tokens=max_tokens, **settings).stats
    return stats.generation_tps, stats.tokens_per_pass


def tune_batch(
    model,
    tokenizer,
    prompts,
    max_tokens=64,
    rows=4,
    min_gain=1.05,
    log=print,
    confirm_rounds=CONFIRM_ROUNDS,
):
    """How ``rows`` rows of a batch decode fastest on this device (``batch_generate``,
    the server's batches): prompt lookup of a few lengths and, with streams, their
    chain of each depth through either stream pass (an attached drafter: its chain of
    each depth, one pass), each in pipelined passes and
    not, against rows without drafts,
    which win unless the fastest beats them by ``min_gain`` in ``confirm_rounds``
    back-to-back rounds.

    Returns:
        tuple: the choice (:attr:`~mlx_specstream.config.SpecStreamConfig.batch`:
        ``draft``, ``num_draft_tokens``, ``stream_pass``, ``rows``, ``pipeline``), its
        tokens/s and those of rows without drafts.
    """
    from .batch import stream_runtime, unbatchable

    why = unbatchable(model)
    if why:
        raise ValueError(f"the model cannot decode in batches: {why}")
    measure = functools.partial(batch_tokens_per_second, rows=rows)
    plain = dict(draft=None)
    trials = Trials(model, tokenizer, prompts, max_tokens, log, measure=measure, plain=plain,
                    draft=None)  # fmt: skip
    ways = [dict(draft="ngram", num_draft_tokens=n) for n in BATCH_LOOKUP_LENGTHS]
    rt = stream_runtime(model)
    if rt is not None:
        # (a shared-mode model's stream rows go with its main rows; an attached drafter
        # reads the verifying pass's states)
        split = rt.config.mode == "lossless" and rt.streams is not None
        passes = ("fused", "split") if split else ("fused",)
        ways += [dict(draft="streams", num_draft_tokens=n, stream_pass=stream_pass)
                 for n in range(1, rt.config.num_streams + 1) for stream_pass in passes]  # fmt: skip
    for way in ways:  # (each pipelined and not: which pays depends on the device)
        for pipeline in (True, False):
            trials.run(dict(way, pipeline=pipeline))

    def describe(best):
        return f"{rows} rows drafting with {best['draft']}, {best['num_draft_tokens']} tokens"

    choice, tps, base = trials.choice(min_gain, f"Speculation in batches of {rows}",
                                      describe=describe, confirm_rounds=confirm_rounds)  # fmt: skip
    entry = dict(draft=choice["draft"], num_draft_tokens=choice.get("num_draft_tokens", 0),
                 stream_pass=choice.get("stream_pass", "fused"), rows=rows,
                 pipeline=choice.get("pipeline"))  # fmt: skip
    return entry, tps, base


def save_choice(model_dir: Path, choice: dict, device: Optional[str] = None) -> dict:
    """Stores the tuned settings for ``device`` (default: this one) in ``config.json``,
    atomically, keeping the old file.

    They go under the section's ``tuned`` (see :class:`~mlx_specstream.config.SpecStreamConfig`),
    replacing that device's earlier entry (but its ``batch`` where ``choice`` has none,
    and all of it but ``batch`` where ``choice`` has only that) and keeping other
    devices' ones; the section's own settings stay as they were and apply on untuned
    devices.

    Returns:
        dict: the entry stored for ``device``.
    """
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    streams = CONFIG_KEY in config
    section = config[CONFIG_KEY if streams else DRAFTER_KEY]
    entry = {}
    if streams or "draft" in choice:  # (None: the model's own drafts)
        draft = choice.get("draft", "streams")
        entry["draft"] = None if draft == "streams" else draft
    if "tree_depth" in choice:  # (prompt lookup alone leaves the tree settings as they are)
        entry["tree_depth"] = choice["tree_depth"]
    if "stream_pass" in choice:  # (also with plain decoding: for calls that speculate)
        entry["stream_pass"] = choice["stream_pass"]
    if choice.get("tree_depth"):
        entry["top_k"] = choice["tree_top_k"]
        entry["max_tree_nodes"] = choice["max_tree_nodes"]
        if streams:  # (drafters never prune, pipeline or fuse)
            entry["prune_threshold"] = choice["prune_threshold"]
            if "pipeline" in choice:
                entry["pipeline"] = choice["pipeline"]
            # (None: the device's default)
            entry["stream_logits_in_pass"] = choice.get("stream_logits_in_pass")
        elif "num_mtp_layers" in choice:  # (MTP layers: how many of those held draft)
            entry["num_mtp_layers"] = choice["num_mtp_layers"]
        if "dynamic_tree" in choice:  # (an EAGLE drafter's tree: grown, or static)
            entry["dynamic_tree"] = choice["dynamic_tree"]
        if "draft_confidence" in choice:  # (its chains cut where the drafter is unsure)
            entry["draft_confidence"] = choice["draft_confidence"]
        if "draft_vocab" in choice:  # (the model's draft vocabulary, or every token)
            entry["draft_vocab"] = choice["draft_vocab"]
    if "batch" in choice:  # (tune_batch's, for batches)
        entry["batch"] = choice["batch"]
    device = device_key() if device is None else device
    before = (section.get("tuned") or {}).get(device) or {}
    if set(choice) == {"batch"}:  # (batches tuned alone: the device's other settings stay)
        entry = dict(before, batch=choice["batch"])
    elif "batch" not in entry and "batch" in before:  # (and a tree tuned alone keeps them)
        entry["batch"] = before["batch"]
    section["tuned"] = dict(section.get("tuned") or {}, **{device: entry})
    backup = model_dir / "config.json.before-tune"
    if not backup.exists():
        shutil.copy(config_file, backup)
    write_config(config_file, config)
    return entry


def choice_flags(choice: dict) -> str:
    """The command-line flags (generate, chat, server) that decode as ``choice`` says: a
    tuning that is not stored (a checkpoint's, a plain model's trees).

    Example:
        >>> choice_flags({"tree_depth": 2, "tree_top_k": 3, "max_tree_nodes": 8,
        ...               "draft": "streams", "num_mtp_layers": 1})
        '--tree-top-k 3 --tree-depth 2 --max-tree-nodes 8 --num-mtp-layers 1'
        >>> choice_flags({"draft": "ngram"})
        '--draft ngram'
        >>> choice_flags({"draft": "ngram", "num_draft_tokens": 10, "ngram_candidates": 4})
        '--draft ngram --num-draft-tokens 10 --ngram-candidates 4'
        >>> choice_flags({"tree_depth": 1, "tree_top_k": 4, "max_tree_nodes": 5,
        ...               "draft_vocab": False})
        '--tree-top-k 4 --tree-depth 1 --max-tree-nodes 5 --draft-vocab none'
        >>> choice_flags({"tree_depth": 0})
        '--no-speculation'
        >>> choice_flags({"tree_depth": 3, "tree_top_k": 2, "max_tree_nodes": 8,
        ...               "dynamic_tree": False})
        '--tree-top-k 2 --tree-depth 3 --max-tree-nodes 8 --no-dynamic-tree'
        >>> choice_flags({"tree_depth": 5, "tree_top_k": 1, "max_tree_nodes": 6,
        ...               "draft_confidence": 0.4})
        '--tree-top-k 1 --tree-depth 5 --max-tree-nodes 6 --draft-confidence 0.4'
    """
    if choice.get("tree_depth") == 0:
        return "--no-speculation"
    flags = []
    if choice.get("draft", "streams") != "streams":
        flags += ["--draft", choice["draft"]]
    if choice.get("draft") == "ngram" and "num_draft_tokens" in choice:  # (a plain model's)
        flags += ["--num-draft-tokens", choice["num_draft_tokens"]]
        if choice.get("ngram_candidates", 1) > 1:
            flags += ["--ngram-candidates", choice["ngram_candidates"]]
    if choice.get("tree_depth"):
        flags += ["--tree-top-k", choice["tree_top_k"], "--tree-depth", choice["tree_depth"],
                  "--max-tree-nodes", choice["max_tree_nodes"]]  # fmt: skip
    if "num_mtp_layers" in choice:
        flags += ["--num-mtp-layers", choice["num_mtp_layers"]]
    if "dynamic_tree" in choice and choice.get("tree_depth"):
        flags += ["--dynamic-tree" if choice["dynamic_tree"] else "--no-dynamic-tree"]
    if choice.get("draft_vocab") is False:
        flags += ["--draft-vocab", "none"]
    if "draft_confidence" in choice and choice.get("tree_depth"):
        flags += ["--draft-confidence", choice["draft_confidence"]]
    return " ".join(str(f) for f in flags)


def show_or_forget(args, log=print) -> None:
    """``--stored``: every entry of the user's store; ``--forget``: removes this device's
    entry for ``args``' directories. Each says what it did."""
    from .cli_args import tuning_key
    from .tuned_store import forget, store_path, stored_entries

    if args.forget:
        key = tuning_key(args)
        removed = forget(device_key(), **key)
        said = "removed" if removed else "nothing stored"
        log(f"[INFO] {said} for {described(key)} on this device ({device_key()}) in "
            f"{store_path()}")  # fmt: skip
        return
    entries = stored_entries()
    log(f"{len(entries)} tuning(s) stored in {store_path()}")
    for e in entries:
        tps = (e.get("measured") or {}).get("tokens_per_second")
        speed = f", {tps:.1f} tokens/s" if isinstance(tps, (int, float)) else ""
        log(f"- {described(e)} on {e['device']}: {' '.join(e['flags'])} "
            f"(saved {e.get('saved')}{speed})")  # fmt: skip


# Where tune --save keeps the choice for a model whose files it does not write
SAVE_INTO_STORE = "pass --save to keep it for this device in the user's store"


def main(argv=None):
    from .mtp import has_mtp_weights
    from .utils import is_plain, load, resolve_model_path

    p = argparse.ArgumentParser(description="Pick the fastest draft tree for this device.")
    p.add_argument("--model", default=None, help="Model directory (default: the embedded model)")
    p.add_argument(
        "--drafter",
        default=None,
        help="A drafter for --model from another directory (an EAGLE-3, EAGLE-1 or DFlash "
        "checkpoint, MTP layers, ...), as generate's --drafter; its files and the model's are "
        "not written",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        help="Tune mlx-lm's draft-model decoding with this draft model (a directory or hub "
        "id, as generate's --draft-model): chain lengths, trees static and grown, prompt "
        "lookup merged in; nothing is written",
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="JSONL with a 'prompt' per line (default: the model directory's prompts.jsonl, "
        "else the embedded model's held-out Python prompts)",
    )
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="Default: as the model is stored"
    )
    p.add_argument("--min-gain", type=float, default=1.05)
    p.add_argument(
        "--confirm-rounds",
        type=int,
        default=CONFIRM_ROUNDS,
        help="Rounds timing the fastest against plain decoding back to back (0: its one trial)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="Also tune how rows of a batch this size draft (batch_generate, the server's "
        "--decode-concurrency); 0: not",
    )
    p.add_argument(
        "--batch-only",
        action="store_true",
        help="Tune batches only; --save then keeps this device's other tuned settings",
    )
    p.add_argument(
        "--save",
        action="store_true",
        help="Write the choice into the model's config.json; for a plain mlx-lm model, a "
        "checkpoint's own MTP layer, --drafter or --draft-model (files the tuner does not "
        "write) keep its flags for this device in the user's store "
        "($MLX_SPECSTREAM_TUNED, else ~/.cache/mlx_specstream/tuned.json), where generate, "
        "chat and server find them",
    )
    p.add_argument(
        "--stored",
        action="store_true",
        help="Print what --save kept in the user's store (every model and device) and exit",
    )
    p.add_argument(
        "--forget",
        action="store_true",
        help="Remove from the user's store what --save kept for --model (with its --drafter "
        "or --draft-model) on this device, and exit",
    )
    args = p.parse_args(argv)
    from .default_model import DEFAULT_DIR, load_default

    if args.stored or args.forget:
        show_or_forget(args)
        return

    if args.draft_model is not None:
        for flag, given in [("--drafter", args.drafter), ("--batch-size", args.batch_size)]:
            if given:
                p.error(
                    f"{flag} with --draft-model: the tuner times the pair's draft-model "
                    "decoding one generation at a time."
                )
    model_dir = DEFAULT_DIR if args.model is None else resolve_model_path(args.model)
    # (a checkpoint whose own MTP layer drafts: tuned as a drafter, never written into)
    plain = is_plain(model_dir) and args.drafter is None
    mtp = plain and has_mtp_weights(model_dir)
    plain = plain and not mtp
    # (files the tuner does not write: --save keeps the choice in the user's store)
    in_store = plain or mtp or args.drafter is not None or args.draft_model is not None
    prompts_file = Path(args.prompts or Path(model_dir) / "prompts.jsonl")
    if args.prompts is None and not prompts_file.exists():  # (an mlx-lm model: none of its own)
        prompts_file = DEFAULT_DIR / "prompts.jsonl"
        print(f"[INFO] {model_dir} has no prompts.jsonl: timing the embedded model's held-out "
              f"Python prompts ({prompts_file}); --prompts FILE times text like yours")  # fmt: skip
    if not prompts_file.exists():
        p.error(
            f"--prompts: {prompts_file} does not exist; give a JSONL file with a 'prompt' per line"
        )
    if in_store and args.save and args.batch_size:
        p.error(
            f"--save with --batch-size: {model_dir} is not a model directory of ours, whose "
            "config keeps a batch choice; the store keeps one generation's flags. Tune batches "
            "without --save, or save without --batch-size."
        )
    if args.drafter is not None:
        model, tokenizer = load(str(model_dir), drafter=args.drafter)
    elif Path(model_dir).resolve() == DEFAULT_DIR.resolve():
        model, tokenizer = load_default()  # in the dtype it generates in (float32 on a CPU)
    else:
        model, tokenizer = load(str(model_dir), allow_plain=True)
    if args.dtype is not None:
        stored = compute_dtype(model)
        if args.save and DTYPES[args.dtype] != stored:
            p.error(
                f"--dtype {args.dtype} with --save: {model_dir} generates in {stored}, so a "
                f"choice measured in {args.dtype} may not pay there. "
                f"Tune without --save, or convert the model to {args.dtype} first."
            )
        model.set_dtype(DTYPES[args.dtype])
    if args.batch_size < 0:
        p.error(f"--batch-size {args.batch_size}: rows of a batch, >= 0")
    if args.batch_only and not args.batch_size:
        p.error("--batch-only needs --batch-size K")
    if args.batch_size > 0:
        from .batch import unbatchable

        why = unbatchable(model)
        if why:
            p.error(f"--batch-size: the model cannot decode in batches: {why}")
    verify_cost_note(model)
    prompts = load_prompts(prompts_file, tokenizer, args.num_prompts, args.prompt_tokens)
    tic = time.perf_counter()
    choice = {}
    if args.draft_model is not None:
        from .cli_args import load_draft_model

        draft_model = load_draft_model(args, tokenizer)  # (its vocabulary checked, as generate's)
        if args.dtype is not None:
            draft_model.set_dtype(DTYPES[args.dtype])
        choice, tps, base = tune_draft_model(
            model, tokenizer, draft_model, prompts, args.max_tokens, args.min_gain,
            confirm_rounds=args.confirm_rounds,
        )  # fmt: skip
        print(f"[INFO] tuning took {time.perf_counter() - tic:.0f} s")
        if args.save:
            store_tuning(args, choice, tps, base)
        elif choice.get("tree_depth") == 0:
            print(f"[INFO] not saved ({SAVE_INTO_STORE}); decode without it.")
        else:
            print(f"[INFO] not saved ({SAVE_INTO_STORE}); to decode so, pass: "
                  f"--draft-model {args.draft_model} {draft_model_flags(choice)}")  # fmt: skip
        return
    tps = base = None
    if not args.batch_only:
        run = tune_lookup if plain else tune
        choice, tps, base = run(
            model,
            tokenizer,
            prompts,
            args.max_tokens,
            args.min_gain,
            confirm_rounds=args.confirm_rounds,
        )
    if args.batch_size > 0:
        batch, _, _ = tune_batch(model, tokenizer, prompts, args.max_tokens, args.batch_size,
                                 args.min_gain, confirm_rounds=args.confirm_rounds)  # fmt: skip
        choice = dict(choice, batch=batch)
    print(f"[INFO] tuning took {time.perf_counter() - tic:.0f} s")
    if args.save and in_store:
        store_tuning(args, choice, tps, base)
    elif args.save:
        entry = save_choice(Path(model_dir), choice)
        print(
            f"[INFO] saved into {Path(model_dir) / 'config.json'} for this device "
            f"({device_key()}): {json.dumps(entry)}"
        )
    elif in_store:
        print(f"[INFO] not saved ({SAVE_INTO_STORE}; its files are not written); "
              f"to decode so, pass: {' '.join(tuned_flags(choice))}")  # fmt: skip
    else:
        print("[INFO] not saved (pass --save to write it into the model's config.json)")


if __name__ == "__main__":
    main()

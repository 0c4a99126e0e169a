"""Trains lossless-mode speculative streams for an mlx-lm model, in MLX.

``python -m mlx_specstream.train --model MODEL --data DATA --out OUT [--self-distill]``

The base model is frozen: only the stream embeddings, the early-exit pruning
adapter and the stream-only LoRA are trained (``mlx.optimizers.AdamW``), so
the main stream stays the base model bit for bit and decoding with the result
is lossless. The recipe is ``convert.finetune --mode lossless``'s, in MLX:

* loss: ``sum_j alpha_j * CE(stream j at position t -> token t + j + 1)`` over
  the positions from the last prompt token on, ``alpha_j`` =
  ``--stream-loss-weight`` (0.1, paper Eq. 5 with ``alpha_0 = 0``), plus the
  next-token loss of the pruning adapter at layer ``N - N_s`` on detached
  states (so it trains the adapter alone);
* AdamW with bias correction, a linear learning-rate decay to 0, gradients
  clipped to norm 1, no weight decay (torch under transformers' Trainer);
  ``--optimizer`` and ``--grad-accumulation-steps`` as in ``mlx_lm.lora``;
* ``--self-distill``: completions replaced by the base model's own greedy
  continuations, generated in batches.

Each step runs the model's multi-stream pass (``StreamRuntime.forward``) over
every training window as a chain tree: the main rows are causal and never
read the stream rows, stream ``j`` of position ``t`` reads the main rows up
to ``t`` and streams ``1..j`` of ``t``. Stream logits come from the model's
own final norm and head.

``--drafter eagle3`` trains an EAGLE-3 drafter instead (:mod:`.eagle_training`),
``--drafter eagle`` an EAGLE-1 drafter (:mod:`.eagle1_training`), ``--drafter
dflash`` a DFlash drafter (:mod:`.dflash_training`), and ``--drafter medusa`` Medusa-1
heads (:mod:`.medusa_training`), on the same data.

``OUT`` must not exist; while training it holds ``OUT/training`` (settings,
the self-distilled data, the newest checkpoint), which ``--resume`` continues
from. At the end ``OUT`` becomes a model directory that
``mlx_specstream.load`` runs, ``OUT/training`` is removed, and the draft tree
is tuned for this device (``--no-tune`` skips it).
"""

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .config import CONFIG_KEY, DRAFTER_KEY, SpecStreamConfig
from .draft_vocab import check_size, head_rows, use_draft_vocab, vocab_of_examples
from .model_parts import vocab_size
from .recurrent import has_recurrent_layers
from .streams import attach_streams, get_runtime
from .support import attending_top_layers, check_supported
from .train_data import Example, load_examples, self_distill, subset

TRAINING_DIR = "training"
SETTINGS_FILE = "settings.json"
CHECKPOINT_DIR = "checkpoint"
# Flags that change what a run computes: --resume refuses a checkpoint made
# with other values (the rest, e.g. --steps-per-report, may change freely).
RESUME_KEYS = (
    "model", "data", "iters", "batch_size", "learning_rate", "num_streams", "num_stream_layers",
    "stream_lora_rank", "stream_lora_alpha", "stream_lora_targets", "stream_loss_weight",
    "self_distill",
    "max_seq_length", "window_prompt", "max_examples", "seed", "grad_clip", "optimizer",
    "grad_accumulation_steps", "drafter", "ttt_steps", "eagle_layers", "block_size",
    "draft_layers", "target_layer_ids", "blocks_per_window", "medusa_num_layers",
    "medusa_lm_heads", "eagle_num_layers",
)  # fmt: skip
# (keys added later: a checkpoint written before them holds their defaults)
RESUME_DEFAULTS = {"drafter": "streams", "ttt_steps": 3, "eagle_layers": None, "block_size": 8,
                   "draft_layers": 2, "target_layer_ids": None, "blocks_per_window": 16,
                   "medusa_num_layers": 1, "medusa_lm_heads": "own",
                   "eagle_num_layers": 1}  # fmt: skip
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")


# ---- the streams to train --------------------------------------------------------------


DEFAULT_STREAM_LAYERS = 4  # (the paper's N_s)


def attach_for_training(model, config: SpecStreamConfig, seed: int, source: str = "the model"):
    """Attaches fresh streams to ``model`` initialised as ``convert.finetune``
    initialises them: stream embeddings ``N(0, 0.02)``, LoRA ``A`` ``N(0, 1/in)``
    and ``B = 0`` (each adapter starts as a no-op), the pruning adapter's
    down-projection ``U(-1/sqrt(in), 1/sqrt(in))`` (torch's ``nn.Linear``
    default) and up-projection 0 (it starts as the identity).

    Raises:
        ValueError: naming ``source`` when the model cannot run streams (no
          plain KV cache in every layer, no RoPE, too few layers).
    """
    if config.mode != "lossless":
        raise ValueError("mlx_specstream.train trains lossless-mode streams only.")
    try:
        check_supported(model, config)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    streams = attach_streams(model, config, seed=seed)
    key = mx.random.key(seed + 1)
    new = []
    for name, p in tree_flatten(streams.parameters()):
        if name.endswith(".lora_b") or name.endswith("up.weight"):
            new.append((name, mx.zeros_like(p)))
        elif name.endswith("down.weight"):
            bound = p.shape[-1] ** -0.5
            key, sub = mx.random.split(key)
            new.append((name, mx.random.uniform(-bound, bound, p.shape, key=sub)))
    streams.update(tree_unflatten(new))
    mx.eval(streams.parameters())
    return streams


class _StreamLayerInput:
    """Keeps the main states entering layer ``N - N_s`` during a pass (the
    pruning adapter's input), by wrapping that layer's call."""

    def __init__(self, layer):
        self.active = False
        self.value = None
        holder, base = self, type(layer)

        def __call__(self, x, *args, **kwargs):
            if holder.active:
                holder.value = x
            return base.__call__(self, x, *args, **kwargs)

        layer.__class__ = type(base.__name__, (base,), {"__call__": __call__})


def chain_parents(length: int) -> List[int]:
    """A chain tree over ``length`` tokens: each node's parent is the one before."""
    return [-1] + list(range(length - 1))


class StreamLoss:
    """The lossless-mode loss of ``convert.finetune`` on one model with streams.

    Args:
        model: a model with streams attached (:func:`attach_for_training`).
        stream_weight (float): ``alpha_j``, the same for every stream.
    """

    def __init__(self, model, stream_weight: float = 0.1):
        from mlx_lm.models.cache import make_prompt_cache

        self.model = model
        self.rt = get_runtime(model)
        self.stream_weight = stream_weight
        self.gamma = self.rt.config.num_streams
        self._make_cache = lambda: make_prompt_cache(model)
        self._layer_input = _StreamLayerInput(model.layers[self.rt.first_top])

    def outputs(self, ids: mx.array):
        """Last-layer stream states ``(T, gamma, D)`` of one window (before the
        final norm) and the layer-``N - N_s`` main states ``(T, D)`` (the pruning
        adapter's input)."""
        T = ids.shape[0]
        self._layer_input.active = True
        try:
            out = self.rt.forward(ids, chain_parents(T), self._make_cache(), all_streams=True)
        finally:
            self._layer_input.active = False
        return out.stream_hidden, self._layer_input.value[0]

    def early_logits(self, states: mx.array) -> mx.array:
        """Early-exit logits of the pruning adapter on detached states."""
        adapter = self.rt.streams.prune_adapter
        return self.rt.head(adapter(mx.stop_gradient(states))[None])[0]

    def stream_targets(self, length: int, prompt_len: int):
        """Per stream, the supervised positions ``[lo, hi)`` of a window: from
        the last prompt token on, while the target ``t + j + 1`` (stream ``j``,
        1-based) lies inside the window, as ``convert.finetune`` masks them."""
        lo = prompt_len - 1
        return [(lo, max(lo, length - (j + 2))) for j in range(self.gamma)]

    def normalizers(self, batch: List[Example]):
        """The batch's supervised positions per stream, and early-exit ones: what
        the loss divides its sums by."""
        counts = [0] * self.gamma
        early = 0
        for ex in batch:
            T, p = len(ex["input_ids"]), int(ex["prompt_len"])
            for j, (lo, hi) in enumerate(self.stream_targets(T, p)):
                counts[j] += max(0, hi - lo)
            early += T - 1 if "prune_adapter" in self.rt.streams else 0
        return counts, early

    def __call__(self, batch: List[Example], normalizers=None):
        """``(loss, metrics)`` of a batch: metrics hold per-stream (and early-exit)
        top-1 hits and counts, as device scalars.

        ``normalizers`` (:meth:`normalizers` of a larger batch) make this the
        batch's share of that batch's loss: the shares of its windows add up to it.
        """
        g = self.gamma
        ce_sum = [0.0] * g
        hits = [0.0] * g
        counts, early_count = self.normalizers(batch)
        early_sum, early_hits = 0.0, 0.0
        has_adapter = "prune_adapter" in self.rt.streams
        for ex in batch:
            ids = mx.array(ex["input_ids"], dtype=mx.int32)
            T, p = ids.shape[0], int(ex["prompt_len"])
            hidden, states = self.outputs(ids)
            spans = self.stream_targets(T, p)
            # The head runs on supervised stream rows only, in one call.
            rows = [hidden[lo:hi, j] for j, (lo, hi) in enumerate(spans) if hi > lo]
            if rows:
                logits = self.rt.head(mx.concatenate(rows)[None])[0].astype(mx.float32)
            start = 0
            for j, (lo, hi) in enumerate(spans):
                if hi <= lo:
                    continue
                z = logits[start : start + hi - lo]
                start += hi - lo
                y = ids[lo + j + 2 :]
                ce_sum[j] = ce_sum[j] + nn.losses.cross_entropy(z, y, reduction="sum")
                hits[j] = hits[j] + (mx.argmax(z, axis=-1) == y).sum()
            if has_adapter and T > 1:
                z = self.early_logits(states[:-1]).astype(mx.float32)
                y = ids[1:]
                early_sum = early_sum + nn.losses.cross_entropy(z, y, reduction="sum")
                early_hits = early_hits + (mx.argmax(z, axis=-1) == y).sum()
        divide, divide_early = normalizers or (counts, early_count)
        loss = mx.array(0.0)
        for j in range(g):
            if counts[j]:
                loss = loss + self.stream_weight * ce_sum[j] / divide[j]
        if early_count:
            loss = loss + early_sum / divide_early
        metrics = {
            "hits": [mx.array(h) for h in hits],
            "counts": counts,
            "early_hits": mx.array(early_hits),
            "early_count": early_count,
        }
        return loss, metrics


# ---- batches, optimizer, checkpoints -------------------------------------------------------


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> List[int]:
    """The examples of step ``step``: consecutive slices of a seeded shuffle per
    epoch, so a resumed run draws exactly the batches the first run would have."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, num_examples)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(num_examples)[i]))
    return out


def make_optimizer(learning_rate: float, iters: int, name: str = "adamw"):
    """The optimizer, with a linear learning-rate decay to 0 over ``iters`` steps.

    ``"adamw"`` (the default) is AdamW as torch runs it under transformers'
    Trainer (``convert.finetune``): bias-corrected moments (MLX's default leaves
    them uncorrected, which makes the early steps about 3x larger) and no
    weight decay. ``"adam"`` is the same without the decoupled decay term (equal
    at decay 0); ``"sgd"`` and ``"adafactor"`` are ``mlx.optimizers``' own, as
    ``mlx_lm.lora --optimizer`` names them (Adafactor at the given rate, not its
    relative steps).
    """
    schedule = optim.linear_schedule(learning_rate, 0.0, max(iters, 1))
    if name == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=0.0, bias_correction=True)
    if name == "adam":
        return optim.Adam(learning_rate=schedule, bias_correction=True)
    if name == "sgd":
        return optim.SGD(learning_rate=schedule)
    if name == "adafactor":
        # The given rate, not Adafactor's own relative steps (which would ignore it).
        return optim.Adafactor(learning_rate=schedule, relative_step=False, scale_parameter=False)
    raise ValueError(f"--optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}.")


def make_step(
    loss: StreamLoss,
    trainable: nn.Module,
    optimizer,
    grad_clip: float = 1.0,
    window_at_a_time: bool = False,
):
    """One optimizer step on ``trainable``'s parameters (the streams: the base
    model is not among them, so it gets no gradient and never changes).

    The step takes a list of micro-batches (``--grad-accumulation-steps``) and
    averages their gradients before the update; it returns their mean loss and
    each one's metrics. ``window_at_a_time`` (``--grad-checkpoint``) runs each
    window's forward and backward pass on its own and adds up their shares of the
    batch's loss and gradient: the same step, with the activations of one window
    in memory instead of the whole batch's.
    """
    value_and_grad = nn.value_and_grad(trainable, loss)

    def batch_value_and_grad(batch):
        if not window_at_a_time:
            return value_and_grad(batch)
        normalizers = loss.normalizers(batch)
        value, grads, m = None, None, None
        for ex in batch:
            (v, mv), g = value_and_grad([ex], normalizers)
            value = v if value is None else value + v
            grads = g if grads is None else tree_map(mx.add, grads, g)
            m = mv if m is None else add_metrics(m, mv)
            mx.eval(value, grads, m["hits"], m["early_hits"])  # one window's graph at a time
        return (value, m), grads

    def step(batches):
        total, values, metrics = None, [], []
        for batch in batches:
            (value, m), grads = batch_value_and_grad(batch)
            total = grads if total is None else tree_map(mx.add, total, grads)
            mx.eval(total, value, m["hits"])  # one micro-batch's graph at a time
            values.append(value)
            metrics.append(m)
        grads = total if len(batches) == 1 else tree_map(lambda g: g / len(batches), total)
        if grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(trainable, grads)
        value = sum(values) / len(values)
        mx.eval(trainable.parameters(), optimizer.state, value)
        return value, metrics

    return step


def at_step(loss, step: int, step_fn, batches):
    """``step_fn(batches)`` with ``loss.train_step`` set to ``step`` where the loss has one
    (a loss that draws noise while training draws it from the step: a resumed run draws the
    same), ``None`` again after (evaluation draws none)."""
    if not hasattr(loss, "train_step"):
        return step_fn(batches)
    loss.train_step = step
    try:
        return step_fn(batches)
    finally:
        loss.train_step = None


def add_metrics(a, b):
    """The metrics (:class:`StreamLoss`) of two batches together."""
    return {
        "hits": [x + y for x, y in zip(a["hits"], b["hits"])],
        "counts": [x + y for x, y in zip(a["counts"], b["counts"])],
        "early_hits": a["early_hits"] + b["early_hits"],
        "early_count": a["early_count"] + b["early_count"],
    }


def save_checkpoint(training_dir: Path, step: int, streams: nn.Module, optimizer):
    """Writes ``training_dir/checkpoint`` (streams, optimizer state, step),
    replacing the previous one only once the new one is complete."""
    final = training_dir / CHECKPOINT_DIR
    tmp = training_dir / (CHECKPOINT_DIR + ".tmp")
    old = training_dir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "streams.safetensors"), dict(tree_flatten(streams.parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(training_dir: Path, streams: nn.Module, optimizer) -> int:
    """Restores the newest checkpoint; returns its step (0 without one)."""
    final = training_dir / CHECKPOINT_DIR
    if not final.exists() and (training_dir / (CHECKPOINT_DIR + ".old")).exists():
        final = training_dir / (CHECKPOINT_DIR + ".old")  # interrupted while replacing it
    if not (final / "state.json").exists():
        return 0
    streams.load_weights(str(final / "streams.safetensors"), strict=True)
    optimizer.state = tree_unflatten(list(mx.load(str(final / "optimizer.safetensors")).items()))
    mx.eval(streams.parameters(), optimizer.state)
    return int(json.loads((final / "state.json").read_text())["step"])


# ---- metrics ----------------------------------------------------------------------


@dataclass
class Accuracy:
    """Running top-1 hits and counts per stream (and of the early exit)."""

    gamma: int
    label: str = "stream"  # (what each entry is: a stream, an EAGLE-3 step, a level)
    hits: List[float] = field(default_factory=list)
    counts: List[int] = field(default_factory=list)
    early_hits: float = 0.0
    early_count: int = 0

    def __post_init__(self):
        self.hits = self.hits or [0.0] * self.gamma
        self.counts = self.counts or [0] * self.gamma

    def add(self, metrics):
        for j in range(self.gamma):
            self.hits[j] += float(metrics["hits"][j].item())
            self.counts[j] += metrics["counts"][j]
        self.early_hits += float(metrics["early_hits"].item())
        self.early_count += metrics["early_count"]

    def top1(self) -> List[float]:
        return [h / c if c else 0.0 for h, c in zip(self.hits, self.counts)]

    def early_top1(self) -> float:
        return self.early_hits / self.early_count if self.early_count else 0.0

    def text(self) -> str:
        each = "/".join(f"{a:.3f}" for a in self.top1())
        if self.label != "stream":
            return f"{self.label} top-1 {each}"
        return f"stream top-1 {each}, early exit {self.early_top1():.3f}"


def evaluate(loss: StreamLoss, examples: List[Example], batch_size: int = 8):
    """Mean loss and per-stream top-1 accuracy on ``examples`` (no training)."""
    acc, total, batches = _accuracy(loss), 0.0, 0
    for i in range(0, len(examples), batch_size):
        value, metrics = loss(examples[i : i + batch_size])
        mx.eval(value, metrics["hits"])
        acc.add(metrics)
        total, batches = total + value.item(), batches + 1
    return total / max(batches, 1), acc


def _accuracy(loss) -> Accuracy:
    """An empty :class:`Accuracy` for ``loss``'s streams (or a drafter's steps, levels)."""
    return Accuracy(loss.gamma, label=getattr(loss, "label", "stream"))


# ---- the run ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train_streams` did."""

    steps: int
    accuracy: Accuracy  # over the last reporting window
    losses: List[float]


def train_streams(
    model,
    examples: List[Example],
    iters: int,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    stream_weight: float = 0.1,
    seed: int = 0,
    grad_clip: float = 1.0,
    training_dir: Optional[Path] = None,
    save_every: int = 100,
    steps_per_report: int = 10,
    trainable: Optional[nn.Module] = None,
    log: Optional[Callable[[str], None]] = None,
    optimizer: str = "adamw",
    grad_accumulation_steps: int = 1,
    valid: Optional[List[Example]] = None,
    steps_per_eval: int = 200,
    val_batches: int = 25,
    grad_checkpoint: bool = False,
    loss: Optional[StreamLoss] = None,
) -> TrainResult:
    """Trains the streams of ``model`` (attached with :func:`attach_for_training`), or
    its drafter (EAGLE-3's, EAGLE-1's or DFlash's, with ``loss`` its loss:
    :class:`~mlx_specstream.eagle_training.EagleLoss`, ...).

    Args:
        model: the model with streams.
        examples: ``{"input_ids", "prompt_len"}`` training examples.
        iters (int): optimizer steps in all (a resumed run counts the steps
          already done).
        batch_size, learning_rate, stream_weight, seed, grad_clip: the recipe.
        training_dir (Path, optional): where checkpoints go every
          ``save_every`` steps and at the end, and where a run resumes from.
        steps_per_report (int): steps between logged lines.
        trainable (nn.Module, optional): the parameters to train. Default: the
          streams (``model.speculative_streams.streams``). Anything else is for
          tests: passing a module that holds the base as well trains the base.
        log (callable, optional): receives the report lines. Default: printed
          above the progress bar.
        optimizer (str): ``"adamw"``, ``"adam"``, ``"sgd"`` or ``"adafactor"``
          (:func:`make_optimizer`).
        grad_accumulation_steps (int): micro-batches of ``batch_size`` whose
          gradients are averaged into each optimizer step.
        valid (list, optional): held-out examples, evaluated every
          ``steps_per_eval`` steps (not at the end: the command evaluates them
          all then) on ``val_batches`` batches (``-1``: all of them), as
          ``mlx_lm.lora`` reports validation.
        grad_checkpoint (bool): mlx-lm's memory-saving option, here a batch's
          backward pass taken a window at a time (:func:`make_step`): the same
          step in the memory of one window.
        loss (optional): the loss; default :class:`StreamLoss` (``stream_weight``).

    Returns:
        TrainResult: the steps done, accuracy over the last report window and
        every step's loss.
    """
    from tqdm import tqdm

    if not (isinstance(grad_accumulation_steps, int) and grad_accumulation_steps >= 1):
        raise ValueError(f"--grad-accumulation-steps {grad_accumulation_steps}: must be >= 1.")
    rt = get_runtime(model)
    streams = rt.streams if rt.streams is not None else rt.drafter  # (what is checkpointed)
    trainable = streams if trainable is None else trainable
    loss = StreamLoss(model, stream_weight) if loss is None else loss
    opt = make_optimizer(learning_rate, iters, optimizer)
    start = load_checkpoint(training_dir, streams, opt) if training_dir else 0
    step_fn = make_step(loss, trainable, opt, grad_clip, window_at_a_time=grad_checkpoint)
    k = grad_accumulation_steps
    held_out = (valid or [])[: None if val_batches < 0 else val_batches * batch_size]
    window, reported, losses = _accuracy(loss), None, []
    what = "streams" if rt.streams is not None else "the drafter"
    bar = tqdm(total=iters, initial=start, desc=f"training {what}", unit="step")
    log = log or bar.write
    if start:
        log(f"[INFO] resuming from step {start} ({training_dir / CHECKPOINT_DIR})")
    tic = time.perf_counter()
    for step in range(start, iters):
        # Micro-batch m of step s is batch s * k + m: the same sequence for any resume.
        batches = [
            [examples[i] for i in batch_indices(step * k + m, len(examples), batch_size, seed)]
            for m in range(k)
        ]
        value, metrics = at_step(loss, step, step_fn, batches)
        losses.append(value.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"step {step + 1}: the loss is {losses[-1]}")
        for m in metrics:
            window.add(m)
        bar.update(1)
        top1 = "/".join(f"{a:.2f}" for a in window.top1())
        bar.set_postfix_str(f"loss {losses[-1]:.3f}, top-1 {top1}", refresh=False)
        done = step + 1
        if training_dir and (done % save_every == 0 or done == iters):
            save_checkpoint(training_dir, done, streams, opt)
        if done % steps_per_report == 0 or done == iters:
            rate = (done - start) / (time.perf_counter() - tic)
            log(
                f"Iter {done}: loss {np.mean(losses[-steps_per_report:]):.3f}, "
                f"{window.text()}, {rate:.2f} steps/s"
            )
            reported, window = window, _accuracy(loss)
        if held_out and done % steps_per_eval == 0 and done < iters:
            val_loss, acc = evaluate(loss, held_out, batch_size)
            log(f"Iter {done}: val loss {val_loss:.3f}, {acc.text()}")
    bar.close()
    return TrainResult(steps=iters, accuracy=reported or window, losses=losses)


# ---- command line ---------------------------------------------------------------------------


def setup_arg_parser():
    p = argparse.ArgumentParser(
        prog="python -m mlx_specstream.train",
        description="Train lossless-mode speculative streams for an mlx-lm model (base frozen).",
    )
    p.add_argument("--model", required=True, help="mlx-lm model directory or Hugging Face repo")
    p.add_argument(
        "--drafter",
        choices=("streams", "eagle3", "eagle", "dflash", "medusa"),
        default="streams",
        help="What to train: lossless-mode speculative streams, an EAGLE-3 drafter (one "
        "layer of its own over three of the base's layers; --ttt-steps, --eagle-layers), an "
        "EAGLE-1 drafter (one layer of its own over the base's last state; --ttt-steps), "
        "a DFlash drafter (layers of its own drafting a block of masks in one pass; "
        "--block-size, --draft-layers, --target-layer-ids, --blocks-per-window), or Medusa-1 "
        "heads (--num-streams heads; --medusa-num-layers, --medusa-lm-heads)",
    )
    p.add_argument(
        "--medusa-num-layers",
        type=int,
        default=1,
        help="Medusa: residual blocks per head (FasterDecoding's medusa_num_layers)",
    )
    p.add_argument(
        "--medusa-lm-heads",
        choices=("own", "base"),
        default="own",
        help="Medusa: an LM head of its own per head, started from the base's (Medusa-1's "
        "recipe), or the base's LM head for every head (a step reads no extra head)",
    )
    p.add_argument(
        "--ttt-steps",
        type=int,
        default=None,
        help="EAGLE-3 and EAGLE-1: levels trained, each deeper one on the drafter's own "
        "outputs (default: 3 for EAGLE-3, its training-time test; 1 for EAGLE-1, its recipe)",
    )
    p.add_argument(
        "--eagle-layers",
        type=int,
        nargs=3,
        default=None,
        help="EAGLE-3: the base's layers whose inputs it reads (N: the last output; default "
        "2, N // 2, N - 3)",
    )
    p.add_argument(
        "--eagle-num-layers",
        type=int,
        default=1,
        help="EAGLE-3: its decoder layers (the speculators' num_hidden_layers; each after the "
        "first over the one before's output)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=8,
        help="DFlash: rows of its block, the bonus token and its masks (levels: one fewer)",
    )
    p.add_argument("--draft-layers", type=int, default=2, help="DFlash: its decoder layers")
    p.add_argument(
        "--target-layer-ids",
        type=int,
        nargs="+",
        default=None,
        help="DFlash: the base's layers whose outputs it reads (default: as many as "
        "--draft-layers, spread from layer 1 to N - 3, as z-lab's)",
    )
    p.add_argument(
        "--blocks-per-window",
        type=int,
        default=16,
        help="DFlash: blocks trained per window, their starts spread over its completion",
    )
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="JSONL files ('text', 'prompt'/'completion' or 'messages'), an mlx_lm.lora data "
        "directory (train.jsonl, valid.jsonl), or directories of text/code files",
    )
    p.add_argument("--out", required=True, help="New model directory (must not exist)")
    p.add_argument("--iters", type=int, default=1000, help="Training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--num-streams", type=int, default=3, help="gamma (Medusa: its heads)")
    p.add_argument(
        "--num-stream-layers",
        type=int,
        default=None,
        help="N_s (default 4; on a model with recurrent layers, its top layers that attend, "
        "at most 4)",
    )
    p.add_argument("--stream-lora-rank", type=int, default=16, help="0: no stream-only LoRA")
    p.add_argument("--stream-lora-alpha", type=float, default=32.0)
    p.add_argument(
        "--stream-lora-targets",
        nargs="+",
        default=None,
        help="Linear modules of each stream layer that get the stream LoRA, by path in the "
        "layer, e.g. self_attn.q_proj self_attn.v_proj (default: all of them). Each group of "
        "targets that reads one input costs a step 2 kernels, and each target 1 more",
    )
    p.add_argument("--stream-loss-weight", type=float, default=0.1, help="alpha_j")
    p.add_argument(
        "--self-distill",
        action="store_true",
        help="Train on the base model's own greedy continuations (recommended)",
    )
    p.add_argument("--distill-batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument(
        "--window-prompt", type=int, default=32, help="Prompt tokens of each text window"
    )
    p.add_argument("--max-examples", type=int, default=None, help="A seeded random subset")
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="Draft width stored in the config (default: 3 for streams, 1 for EAGLE's and "
        "DFlash's chains)",
    )
    p.add_argument("--max-tree-nodes", type=int, default=16)
    p.add_argument("--grad-clip", type=float, default=1.0, help="Gradient norm clip (0: off)")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="Optimizer (default: adamw, as the PyTorch recipe; mlx_lm.lora's names)",
    )
    p.add_argument(
        "--grad-accumulation-steps",
        type=int,
        default=1,
        help="Number of steps to accumulate before each optimizer update.",
    )
    p.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="Reduce memory use: the backward pass runs one window at a time (the same "
        "step; mlx-lm's flag name).",
        default=None,
    )
    p.add_argument(
        "--steps-per-eval",
        type=int,
        default=200,
        help="Number of training steps between held-out evaluations.",
    )
    p.add_argument(
        "--val-batches",
        type=int,
        default=25,
        help="Number of held-out batches, -1 uses the entire held-out set.",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="Enable trusting remote code for tokenizer"
    )
    p.add_argument("--steps-per-report", type=int, default=10)
    p.add_argument("--save-every", type=int, default=100, help="Steps between checkpoints")
    p.add_argument(
        "--resume",
        action="store_true",
        help="Continue the training checkpointed in --out (starts afresh if --out does not exist)",
    )
    p.add_argument(
        "--draft-vocab-size",
        type=int,
        default=None,
        help="Also write a draft vocabulary: the streams then rank only this many tokens, "
        "the most frequent in the (self-distilled) training completions (default: every token); "
        "EAGLE-3: its head's own tokens (its d2t), chosen so before training",
    )
    p.add_argument("--no-tune", action="store_true", help="Do not tune the draft tree at the end")
    p.add_argument(
        "--tune-max-tokens",
        type=int,
        default=64,
        help="Tokens generated per held-out prompt for each way of drafting the tuner times at "
        "the end (as mlx_specstream.tune's --max-tokens; fewer tune faster, less surely)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in RESUME_KEYS}


def check_out(args) -> bool:
    """Checks that ``--out`` may be written: it must not exist, unless this is
    ``--resume`` of its own unfinished training with the same flags. Returns
    whether there is a training state to resume.

    Raises:
        FileExistsError: ``OUT`` exists and this is not a resume of its own
          unfinished training.
        ValueError: ``--resume`` with flags that differ from the checkpoint's.
    """
    out = Path(args.out)
    training = out / TRAINING_DIR
    settings_file = training / SETTINGS_FILE
    if out.exists():
        if not args.resume:
            raise FileExistsError(
                f"{out} already exists; refusing to overwrite it (pass --resume to continue "
                "the training checkpointed in it)."
            )
        if (out / "config.json").exists():
            raise FileExistsError(f"{out} already holds a trained model; refusing to overwrite it.")
        if not settings_file.exists():
            raise FileExistsError(
                f"{out} exists but holds no training checkpoint ({settings_file}); refusing to "
                "overwrite it."
            )
        saved, now = json.loads(settings_file.read_text()), _settings(args)
        for key in RESUME_KEYS:
            if saved.get(key, RESUME_DEFAULTS.get(key)) != now[key]:
                flag = "--" + key.replace("_", "-")
                raise ValueError(
                    f"--resume: {settings_file} was written with {flag} {saved.get(key)!r}, "
                    f"not {now[key]!r}; resume with the same flags."
                )
        return True
    return False


def create_training_dir(args) -> Path:
    """``OUT/training`` with the run's settings (kept as they are on resume)."""
    training = Path(args.out) / TRAINING_DIR
    if not (training / SETTINGS_FILE).exists():
        training.mkdir(parents=True)
        (training / SETTINGS_FILE).write_text(json.dumps(_settings(args), indent=2))
    return training


def _write_jsonl(path: Path, examples: List[Example]):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    tmp.replace(path)


def _read_jsonl(path: Path) -> List[Example]:
    return [json.loads(line) for line in open(path)]


def read_data(args, tokenizer):
    """Training and held-out examples from ``--data`` (before self-distillation).

    Raises:
        FileNotFoundError, DataError: bad input, named (nothing is written yet).
    """
    train, valid, skipped = load_examples(
        args.data, tokenizer, args.max_seq_length, args.window_prompt
    )
    if skipped:
        print(
            f"[WARN] {len(skipped)} text(s) shorter than one window were skipped, e.g. "
            f"{skipped[0][0]} ({skipped[0][1]} tokens)"
        )
    return subset(train, args.max_examples, args.seed), valid


def prepare_data(args, model, tokenizer):
    """The (self-distilled) training and held-out examples. They are kept in
    ``OUT/training``, so a resumed run reads them back instead of generating
    them again; ``OUT/training`` is created only once ``--data`` has been read."""
    training = Path(args.out) / TRAINING_DIR
    train_file, valid_file = training / "train.jsonl", training / "valid.jsonl"
    if train_file.exists():
        return _read_jsonl(train_file), _read_jsonl(valid_file) if valid_file.exists() else []
    train, valid = read_data(args, tokenizer)
    create_training_dir(args)
    if args.self_distill:
        train = self_distill(model, tokenizer, train, args.distill_batch_size)
        if valid:
            valid = self_distill(
                model, tokenizer, valid, args.distill_batch_size, desc="self-distillation (valid)"
            )
    if valid:
        _write_jsonl(valid_file, valid)
    _write_jsonl(train_file, train)
    return train, valid


def base_config(model_path: Path) -> dict:
    """The base model's ``config.json`` without any drafting section."""
    config = json.loads((model_path / "config.json").read_text())
    config.pop(CONFIG_KEY, None)
    config.pop(DRAFTER_KEY, None)
    return config


def write_model(out: Path, model, tokenizer, config: dict, prompts: List[str]):
    """Writes the model directory into ``out`` (which holds the training state):
    saved next to it with :func:`mlx_specstream.save`, then moved in,
    ``config.json`` last, and the training state removed."""
    from .utils import save

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        prompts_file = staging / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        saved = save(staging / "model", model, tokenizer, config, extra_files=[prompts_file])
        names = sorted(p.name for p in saved.iterdir())
        for name in [n for n in names if n != "config.json"] + ["config.json"]:
            (saved / name).replace(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out / TRAINING_DIR, ignore_errors=True)


def prompt_ids(examples: List[Example], n: int) -> List[List[int]]:
    """The prompts of the first ``n`` examples with a prompt of 2 tokens or more."""
    out = [ex["input_ids"][: ex["prompt_len"]] for ex in examples if ex["prompt_len"] >= 2]
    return out[:n]


def train_eagle(args, model, tokenizer, model_path: Path) -> None:
    """``--drafter eagle3``: an EAGLE-3 drafter on the frozen base, trained on the same
    (self-distilled) windows with its training-time test, written as a model directory
    (``drafter.safetensors``) and tuned."""
    from .eagle_training import EagleLoss, attach_eagle_for_training, check_layers, check_steps

    check_layers(model, args.eagle_layers)  # (refused before anything is written)
    check_steps(args.ttt_steps)
    if args.eagle_num_layers < 1:
        raise ValueError(f"--eagle-num-layers {args.eagle_num_layers}: at least 1")
    if args.draft_vocab_size is not None:
        check_size(args.draft_vocab_size, head_rows(model), "--draft-vocab-size")
    train, valid = prepare_data(args, model, tokenizer)
    ids = None
    if args.draft_vocab_size is not None:  # (its head's rows: chosen before training)
        ids, _, text = vocab_of_examples(train, valid, tokenizer, head_rows(model),
                                         args.draft_vocab_size)  # fmt: skip
        print(f"[INFO] the drafter's own draft vocabulary (d2t): {text}")
    tree = None if args.top_k is None else dict(top_k=args.top_k)
    drafter = attach_eagle_for_training(model, args.eagle_layers, ids, tree, args.seed,
                                        args.eagle_num_layers)  # fmt: skip
    loss = EagleLoss(model, args.ttt_steps)
    trainable = sum(p.size for _, p in tree_flatten(drafter.trainable_parameters()))
    print(f"[INFO] {len(train)} training examples, {len(valid)} held out; an EAGLE-3 drafter "
          f"of {1 + len(drafter.upper)} layer(s) reading layers {drafter.feature_layers}, "
          f"{trainable:,} trainable parameters; the "
          "base is frozen")  # fmt: skip
    fit_and_write(args, model, tokenizer, model_path, train, valid, loss, vocab=False)


def train_eagle1(args, model, tokenizer, model_path: Path) -> None:
    """``--drafter eagle``: an EAGLE-1 drafter on the frozen base, trained on the same
    (self-distilled) windows with EAGLE-1's loss, written as a model directory
    (``drafter.safetensors``) and tuned."""
    from .eagle1_training import Eagle1Loss, attach_eagle1_for_training
    from .eagle_training import check_steps

    check_steps(args.ttt_steps)  # (refused before anything is written)
    if args.draft_vocab_size is not None:
        check_size(args.draft_vocab_size, head_rows(model), "--draft-vocab-size")
    tree = None if args.top_k is None else dict(top_k=args.top_k)
    drafter = attach_eagle1_for_training(model, tree, args.seed)
    train, valid = prepare_data(args, model, tokenizer)
    loss = Eagle1Loss(model, args.ttt_steps)
    trainable = sum(p.size for _, p in tree_flatten(drafter.trainable_parameters()))
    print(f"[INFO] {len(train)} training examples, {len(valid)} held out; an EAGLE-1 drafter "
          f"over the base's last state, {trainable:,} trainable parameters, {args.ttt_steps} "
          "level(s) trained; the base is frozen")  # fmt: skip
    fit_and_write(args, model, tokenizer, model_path, train, valid, loss)


def train_dflash(args, model, tokenizer, model_path: Path) -> None:
    """``--drafter dflash``: a DFlash drafter on the frozen base, trained on the same
    (self-distilled) windows with its block loss, written as a model directory
    (``drafter.safetensors``) and tuned."""
    from .dflash_training import (
        DFlashLoss,
        attach_dflash_for_training,
        check_block,
        check_layers,
        rarest_token,
    )

    # (refused before anything is written)
    check_block(args.block_size, args.draft_layers, args.blocks_per_window)
    check_layers(model, args.target_layer_ids, args.draft_layers)
    if args.draft_vocab_size is not None:
        check_size(args.draft_vocab_size, head_rows(model), "--draft-vocab-size")
    train, valid = prepare_data(args, model, tokenizer)
    mask = rarest_token(train + valid, vocab_size(model))
    print(f"[INFO] the mask token: id {mask} ({tokenizer.decode([mask])!r}), the rarest in "
          "the training windows")  # fmt: skip
    tree = None if args.top_k is None else dict(top_k=args.top_k)
    drafter = attach_dflash_for_training(model, args.target_layer_ids, args.draft_layers,
                                         args.block_size, mask, tree, args.seed)  # fmt: skip
    loss = DFlashLoss(model, args.blocks_per_window)
    trainable = sum(p.size for _, p in tree_flatten(drafter.trainable_parameters()))
    print(f"[INFO] {len(train)} training examples, {len(valid)} held out; a DFlash drafter of "
          f"{args.draft_layers} layer(s) reading layers {[i - 1 for i in drafter.feature_layers]}"
          f"' outputs, blocks of {args.block_size}, {trainable:,} trainable parameters; the base "
          "is frozen")  # fmt: skip
    fit_and_write(args, model, tokenizer, model_path, train, valid, loss)


def train_medusa(args, model, tokenizer, model_path: Path) -> None:
    """``--drafter medusa``: Medusa-1 heads on the frozen base, trained on the same
    (self-distilled) windows with Medusa-1's loss, written as a model directory
    (``drafter.safetensors``, the released heads' layout) and tuned."""
    from .medusa_training import MedusaLoss, attach_medusa_for_training, trainable_summary

    if args.draft_vocab_size is not None:  # (refused before anything is written)
        check_size(args.draft_vocab_size, head_rows(model), "--draft-vocab-size")
    tree = dict(max_tree_nodes=args.max_tree_nodes, **({} if args.top_k is None else
                                                       dict(top_k=args.top_k)))  # fmt: skip
    drafter = attach_medusa_for_training(model, args.num_streams, args.medusa_num_layers,
                                         args.medusa_lm_heads, tree)  # fmt: skip
    train, valid = prepare_data(args, model, tokenizer)
    print(f"[INFO] {len(train)} training examples, {len(valid)} held out; "
          f"{trainable_summary(drafter)}; the base is frozen")  # fmt: skip
    fit_and_write(args, model, tokenizer, model_path, train, valid, MedusaLoss(model))


def fit_and_write(args, model, tokenizer, model_path: Path, train, valid, loss, vocab=True):
    """Trains ``model``'s streams or drafter with ``loss`` as ``args`` say, reports the
    held-out accuracy, sets the draft vocabulary ``--draft-vocab-size`` asks for where
    ``vocab`` (the most frequent tokens of the training completions), writes the model
    directory into ``--out`` and tunes it."""
    out = Path(args.out)
    result = train_streams(
        model, train, args.iters, args.batch_size, args.learning_rate, seed=args.seed,
        grad_clip=args.grad_clip, training_dir=out / TRAINING_DIR, save_every=args.save_every,
        steps_per_report=args.steps_per_report, optimizer=args.optimizer,
        grad_accumulation_steps=args.grad_accumulation_steps, valid=valid,
        steps_per_eval=args.steps_per_eval, val_batches=args.val_batches,
        grad_checkpoint=bool(args.grad_checkpoint), loss=loss,
    )  # fmt: skip
    print(f"[INFO] training: {result.accuracy.text()} (last {args.steps_per_report} steps)")
    if valid:
        val_loss, acc = evaluate(loss, valid)
        print(f"[INFO] held out: loss {val_loss:.3f}, {acc.text()}")
    if vocab and args.draft_vocab_size is not None:  # (written with the model: save writes it)
        ids, _, text = vocab_of_examples(train, valid, tokenizer, head_rows(model),
                                         args.draft_vocab_size)  # fmt: skip
        use_draft_vocab(model, ids)
        print(f"[INFO] draft vocabulary: {text}")
    prompts = prompt_ids(valid or train, 3)
    write_model(
        out, model, tokenizer, base_config(model_path), [tokenizer.decode(p) for p in prompts]
    )
    finish(args, out, prompts)


def main(argv=None):
    import mlx_lm

    from .utils import resolve_model_path

    args = setup_arg_parser().parse_args(argv)
    if args.tune_max_tokens < 1:
        raise ValueError(f"--tune-max-tokens {args.tune_max_tokens}: must be >= 1.")
    if args.ttt_steps is None:
        args.ttt_steps = 1 if args.drafter == "eagle" else 3
    model_path = resolve_model_path(args.model)
    check_out(args)
    model, tokenizer = mlx_lm.load(
        str(model_path), tokenizer_config={"trust_remote_code": args.trust_remote_code}
    )
    if args.drafter == "eagle3":
        return train_eagle(args, model, tokenizer, model_path)
    if args.drafter == "dflash":
        return train_dflash(args, model, tokenizer, model_path)
    if args.drafter == "eagle":
        return train_eagle1(args, model, tokenizer, model_path)
    if args.drafter == "medusa":
        return train_medusa(args, model, tokenizer, model_path)
    layers = args.num_stream_layers
    if layers is None:
        layers = DEFAULT_STREAM_LAYERS
        if has_recurrent_layers(model):  # (stream layers attend: support.on_chains)
            layers = min(DEFAULT_STREAM_LAYERS, attending_top_layers(model))
            print(f"[INFO] the model has recurrent layers: {layers} stream layer(s), its top "
                  "layers that attend (--num-stream-layers)")  # fmt: skip
    spec = SpecStreamConfig(
        num_streams=args.num_streams,
        num_stream_layers=layers,
        top_k=3 if args.top_k is None else args.top_k,
        max_tree_nodes=args.max_tree_nodes,
        mode="lossless",
        stream_lora_rank=args.stream_lora_rank,
        stream_lora_alpha=args.stream_lora_alpha,
        stream_lora_targets=args.stream_lora_targets,
    )
    if args.draft_vocab_size is not None:  # (refused before anything is trained)
        check_size(args.draft_vocab_size, head_rows(model), "--draft-vocab-size")
    attach_for_training(model, spec, args.seed, source=f"--model {model_path}")
    train, valid = prepare_data(args, model, tokenizer)
    trainable = sum(p.size for _, p in tree_flatten(get_runtime(model).streams.parameters()))
    print(f"[INFO] {len(train)} training examples, {len(valid)} held out; "
          f"{trainable:,} trainable parameters; the base is frozen")  # fmt: skip
    loss = StreamLoss(model, args.stream_loss_weight)
    fit_and_write(args, model, tokenizer, model_path, train, valid, loss)


def finish(args, out: Path, prompts: List[List[int]]) -> None:
    """Loads the model written in ``out`` and tunes its draft tree for this device."""
    from .tune import save_choice, tune
    from .utils import load

    print(f"[INFO] wrote {out}")
    model, tokenizer = load(str(out))
    if args.no_tune or not prompts:
        print(f"[INFO] not tuned; run python -m mlx_specstream.tune --model {out} --save")
        return
    choice, _, _ = tune(model, tokenizer, prompts, max_tokens=args.tune_max_tokens)
    entry = save_choice(out, choice)
    print(f"[INFO] tuned the draft tree for this device: {json.dumps(entry)}")


if __name__ == "__main__":
    main()

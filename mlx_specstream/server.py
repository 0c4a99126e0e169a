"""An OpenAI-compatible HTTP server running Speculative Streaming.

``python -m mlx_specstream.server [--model DIR] [--host 127.0.0.1] [--port 8080]``

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` for server-sent events), ``GET /v1/models`` (and
``/v1/models/{id}``) and ``GET /health``. Request
fields follow ``mlx_lm.server``: ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``xtc_probability``,
``xtc_threshold``, ``stop``, ``seed``, ``logit_bias``, ``repetition_penalty``,
``presence_penalty``, ``frequency_penalty`` (each with its ``*_context_size``),
``chat_template_kwargs``, ``role_mapping``, ``stream_options``, ``logprobs``,
``top_logprobs``, ``n`` (choices batched, or one after another), and for chat ``tools``
(shown to the model by its chat template), ``tool_choice`` (``"auto"``, ``"none"``, or a
forced call: ``"required"`` or a named function, whose start the prompt then holds)
and messages with ``tool_calls`` or the ``tool`` role, plus our ``speculative`` (bool),
``acceptance``, ``draft``, ``num_draft_tokens``, ``ngram_candidates`` and
``draft_confidence`` and ``draft_schedule`` (such a request is decoded alone: batched rows
draft uncut chains of a fixed length). Fields we do
not support (``response_format``, ``best_of`` > 1, ...) are refused with a 400 that
names them.

A chat answer is split as ``mlx_lm.server`` splits it
(:mod:`~mlx_specstream.response_parser`): the model's thinking into the message's
``reasoning``, its tool calls, parsed by the tokenizer's tool parser, into
``tool_calls`` (``finish_reason`` ``"tool_calls"``), the rest into ``content``; the
markers are found in the text, so a step that adds several tokens at once splits as
one token at a time does.

The request fields are validated and the responses formatted by
:mod:`~mlx_specstream.openai_api`; this module runs the model and speaks HTTP.

Chat works on every model: with a chat template it is applied; without one the
messages are joined as ``mlx_lm.server`` joins them (:func:`~mlx_specstream.openai_api.join_messages`).

A request that is the only one waiting is decoded speculatively. Requests that
wait together are decoded together, one row each, by ``mlx_lm``'s continuous
batching, as ``mlx_lm.server`` decodes them; a request decoding alone when
others arrive joins them there, and the last row of a batch goes on alone
(:mod:`~mlx_specstream.replies`; ``--decode-concurrency 1`` serves one at a time).
With ``--draft ngram`` or a draft model the rows of a batch speculate too
(:class:`~mlx_specstream.replies.SpecBatch`). Seeded requests, and every request
with ``--kv-bits``, are served one at a time, in arrival order.

As in ``mlx_lm.server``, the KV caches of finished requests are kept in an LRU
(:class:`~mlx_specstream.prompt_cache.PromptCacheLRU`, bounded by
``--prompt-cache-size`` entries and ``--prompt-cache-bytes``), and a request
starts from the one sharing the longest prefix with its prompt, so a
conversation's follow-up turn prefills only its new tokens.

Every response carries ``usage``: OpenAI's ``prompt_tokens``,
``completion_tokens`` and ``total_tokens``, ``prompt_tokens_details.cached_tokens``
(as ``mlx_lm.server``), and ``speculative`` (see
:class:`~mlx_specstream.generate.SpeculativeUsage`). Bad requests get a 4xx
JSON error that names the field at fault. The server binds to localhost unless
told otherwise.
"""

import argparse
import atexit
import collections
import copy
import itertools
import json
import logging
import queue
import threading
import time
import uuid
import weakref
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors

from .cache import bounded_windows, cache_tokens, make_prompt_cache, trim_prompt_cache
from .cli_args import (
    DRAFT_MODEL_TOKENS,
    add_draft_args,
    add_kv_quantization_args,
    add_model_args,
    add_prefill_arg,
    load_draft_model,
    load_model,
    with_stored_tuning,
)
from .config import confidence_fault
from .generate import stream_generate, untuned_note
from .model_parts import vocab_size
from .streams import runtime_config
from .openai_api import (
    RequestError,
    add_reasoning_and_calls,
    check_unsupported,
    finish_reason,
    format_logprobs,
    join_messages,
    parse_generation_args,
    parse_tool_args,
    total_usage,
)
from .prompt_cache import PromptCacheLRU
from .recurrent import has_recurrent_layers
from .batch import (
    reads_streams,
    stream_runtime,
    tuned_batch,
    tuned_depth,
    unbatchable,
)
from .replies import Batch, Reply, SpecBatch, batching_fault
from .response_parser import Parts, ResponseParser, forced_call_text, initial_state
from .sample_utils import make_sampler, xtc_special_tokens

logger = logging.getLogger(__name__)
_END = object()  # a job's last event
_LIVE: "weakref.WeakSet[ModelService]" = weakref.WeakSet()


@atexit.register
def _stop_all():
    """Ends every generation thread before the interpreter finalizes (see ModelService)."""
    for service in list(_LIVE):
        service.stop()


class Job:
    """One request handed to the generation thread: its events come back on a queue."""

    def __init__(self, tokens: List[int], args: Dict[str, Any]):
        self.tokens, self.args = tokens, args
        self.choices = args.get("n", 1)
        self.cancelled = threading.Event()
        self._events: "queue.Queue" = queue.Queue()

    def put(self, event) -> None:
        self._events.put(event)

    def cancel(self) -> None:
        """The client is gone: the generation stops at its next piece."""
        self.cancelled.set()

    def __iter__(self):
        """``(choice index, text, finish_reason, usage, logprobs)`` events (see
        :class:`~mlx_specstream.replies.Reply`); re-raises the generation's error."""
        while True:
            event = self._events.get()
            if event is _END:
                return
            if isinstance(event, BaseException):
                raise event
            yield event


class ModelService:
    """One loaded model, its prompt-cache LRU, and the one thread that runs it.

    Every MLX operation of the server runs on that generation thread, in
    arrival order, as in ``mlx_lm.server``; the HTTP handler threads only
    parse, tokenize and write. Two reasons, both of MLX 0.32:

    * an unevaluated array is bound to a stream of the thread that made it
      ("There is no Stream(cpu, 0) in current thread" elsewhere), so the
      model's arrays are evaluated here, in the thread that builds the
      service, and the caches never change threads;
    * a thread that ran ``mx.compile``'d functions keeps a ``thread_local``
      compile cache whose destructor re-enters Python when the OS thread
      ends. If that happens while the interpreter is finalizing, CPython
      ends the thread with ``pthread_exit`` inside the destructor and the
      process aborts ("terminate called without an active exception";
      ``benchmarks/shutdown_abort.py`` reproduces it with MLX alone). The
      generation thread empties that cache (``mx.clear_streams``) before it
      ends, and :meth:`stop` (called by ``server_close`` and at exit) ends
      it before the interpreter finalizes.

    A request served alone is decoded speculatively. Requests that wait together
    are decoded together (:class:`~mlx_specstream.replies.Batch`), as
    ``mlx_lm.server`` batches every request it can; one running alone when others
    arrive joins them, and the last row of a batch goes on alone (:meth:`_run`).
    """

    def __init__(self, model, tokenizer, model_id: str, defaults: argparse.Namespace,
                 draft_model=None):  # fmt: skip
        self.model, self.tokenizer, self.model_id, self.defaults = (
            model,
            tokenizer,
            model_id,
            defaults,
        )
        self.draft_model = draft_model  # drafts every request (mlx-lm's --draft-model)
        self.prompt_cache = PromptCacheLRU(defaults.prompt_cache_size, defaults.prompt_cache_bytes)
        self.xtc_special_tokens = xtc_special_tokens(tokenizer)
        rt = getattr(model, "speculative_streams", None)
        # (an attached drafter on recurrent layers drafts chains, without lookup merged in)
        self.drafter_chains = (
            rt is not None
            and getattr(rt, "drafter", None) is not None
            and has_recurrent_layers(model)
        )
        self.batching = False  # set by the generation thread (see _can_batch)
        self.spec_batching = False  # batched rows speculate (SpecBatch)
        self.stream_batching = False  # and may draft with the model's streams
        # What the scheduler did: generations alone (started or resumed), batches, choices
        # handed from alone to a batch and taken back, and the most choices in one batch.
        self.served = dict(alone=0, batched=0, handed_over=0, taken_back=0, largest_batch=0)
        self._trimmable = can_trim_prompt_cache(make_prompt_cache(model))
        mx.eval(_arrays_of(model) + ([] if draft_model is None else _arrays_of(draft_model)))
        self._waiting: "collections.deque[Job]" = collections.deque()
        self._pending = 0  # submitted and not finished
        self._open: Dict[Job, int] = {}  # jobs taken from the queue: their choices not done
        self._state = threading.Condition()  # guards _waiting and _pending
        self._stopping = threading.Event()
        self._ready = threading.Event()  # set once the thread knows whether it batches
        self._thread = threading.Thread(
            target=self._run, name="mlx-specstream-generation", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        _LIVE.add(self)

    # ---- the generation thread --------------------------------------------------
    def submit(self, tokens: List[int], args: Dict[str, Any]) -> Job:
        """Queues a request; iterate the returned :class:`Job` for its events."""
        if not self._thread.is_alive():
            raise RuntimeError("the generation thread has stopped")
        job = Job(tokens, args)
        with self._state:
            self._pending += 1
            self._waiting.append(job)
            self._state.notify_all()
        return job

    @property
    def alive(self) -> bool:
        """Whether the generation thread runs (requests can be served)."""
        return self._thread.is_alive()

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Waits until every submitted request is finished (True) or ``timeout`` passes."""
        with self._state:
            return self._state.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Cancels what is queued, ends the generation thread and waits for it."""
        if not self._thread.is_alive():
            return
        self._stopping.set()
        with self._state:
            self._state.notify_all()
        self._thread.join(timeout)

    def _next_job(self) -> Optional[Job]:
        """The next waiting job (blocks); ``None`` once the service stops."""
        with self._state:
            self._state.wait_for(lambda: self._waiting or self._stopping.is_set())
            return None if self._stopping.is_set() else self._waiting.popleft()

    def _take_batchable(self) -> Optional[Job]:
        """The first waiting job, taken if it can be batched (else left first in line)."""
        with self._state:
            if self._waiting and self._batchable(self._waiting[0]):
                return self._waiting.popleft()
        return None

    def _batchable_waits(self) -> bool:
        with self._state:
            return bool(self._waiting) and self._batchable(self._waiting[0])

    def _batchable(self, job: Job) -> bool:
        """A seeded request is decoded alone, so that its output depends on its seed only;
        so is one with a ``draft_confidence`` or a heuristic ``draft_schedule`` (a batch's
        rows draft their chains uncut and of a fixed length, on the device)."""
        args = job.args
        alone = args.get("draft_confidence") or args.get("draft_schedule") == "heuristic"
        return self.batching and args["seed"] is None and not alone

    def _finish(self, job: Job) -> None:
        """The job's last event; its request is no longer pending."""
        self._open.pop(job, None)
        job.put(_END)
        with self._state:
            self._pending -= 1
            self._state.notify_all()

    def _fail(self, job: Job, error: BaseException, batch: Optional[Batch] = None) -> None:
        """Hands ``error`` to the job's request and ends it (its rows leave ``batch``)."""
        job.put(error)
        if batch is not None:
            batch.remove([r for r in batch.replies.values() if r.job is job])
        self._finish(job)

    def _keep(self, reply: Reply, cache) -> None:
        """A choice is done, or its client left: its cache goes into the LRU (keyed by
        the tokens it holds), and the job ends with its last choice."""
        if reply.finished:
            logger.debug("usage %s", json.dumps(reply.usage))
        # (a batch's row keeps its window layers whole: kept, they hold 2 to 3 windows)
        bounded_windows(cache, self.model, self.draft_model)
        self.prompt_cache.insert_finished(reply.sequence, cache)
        if reply.job in self._open:
            self._open[reply.job] -= 1
            if self._open[reply.job] == 0 or reply.job.cancelled.is_set():
                self._finish(reply.job)

    def _run(self):
        """The scheduler. A choice runs alone (speculatively) while nothing else
        waits, and a batch runs while several choices do. A choice alone hands its
        cache to a new batch when a request that can be batched arrives; the last
        row of a batch goes on alone once nobody waits to join it."""
        batch: Optional[Batch] = None
        alone = None  # (reply, cache): a choice to go on with alone
        try:
            self.batching = self._can_batch()
            self._ready.set()
            while not self._stopping.is_set():
                if batch is not None:
                    alone = self._batch_step(batch)
                    if not len(batch):
                        batch.close()
                        batch = None
                elif alone is not None:
                    reply, cache = alone
                    alone = None
                    try:
                        handed = self._decode_alone(reply, cache)
                    except Exception as e:  # noqa: BLE001 - handed to the request's thread
                        self._fail(reply.job, e)
                        continue
                    if handed is not None:
                        self.served["handed_over"] += 1
                        batch = self._new_batch()
                        try:
                            batch.add(*handed)
                        except Exception as e:  # noqa: BLE001 - handed to the request's thread
                            self._fail(reply.job, e)
                else:
                    job = self._next_job()
                    if job is None:
                        break
                    if job.cancelled.is_set():
                        self._finish(job)
                        continue
                    self._open[job] = job.choices
                    if self._batchable(job) and (job.choices > 1 or self._batchable_waits()):
                        batch = self._new_batch()
                        self._join(batch, job)
                    else:
                        alone = self._one_after_another(job)
        finally:
            self._ready.set()
            if batch is not None:
                batch.close()
            with self._state:  # (after stop(): nothing more is served)
                left, self._waiting = list(self._waiting), collections.deque()
            for job in list(self._open) + left:
                self._finish(job)
            mx.clear_streams()  # empties this thread's compile cache (see the class doc)

    def _one_after_another(self, job: Job):
        """Decodes a job's choices alone, in turn (a job of several choices comes here
        only when it cannot be batched); returns its last choice, to run as any
        choice alone (:meth:`_decode_alone`), or ``None`` once the job has ended."""
        for index in range(job.choices - 1):
            reply = Reply(self.tokenizer, job, index)
            try:
                self._decode_alone(reply, None)  # (no batch to join: never handed over)
            except Exception as e:  # noqa: BLE001 - handed to the request's thread
                self._fail(job, e)
            if job not in self._open or self._stopping.is_set():
                return None
        return Reply(self.tokenizer, job, job.choices - 1), None

    def _can_batch(self) -> bool:
        """Whether waiting requests are decoded together: as ``mlx_lm.server`` decides
        (no ``kv_bits``, caches that merge into a batch), and with
        ``--decode-concurrency`` above 1. A batch is tried once here
        (:func:`~mlx_specstream.replies.batching_fault`): a model whose batched
        pass fails or is wrong (mlx-lm's gemma2) serves one request at a time, and
        says so. Rows speculate in a batch (:class:`~mlx_specstream.replies.SpecBatch`)
        with the model's streams (where their tuning on this device leaves them on:
        for batches, as ``python -m mlx_specstream.tune --batch-size K`` measured and
        then as it chose, else the tree's tuning; a shared-mode model's rows always
        carry them, its main rows reading them), ``--draft ngram`` or a ``--draft-model`` (which ``mlx_lm.server`` serves one
        request at a time), where every layer of both models has a plain KV cache and
        such rows pass their own probe; elsewhere a batch decodes plainly (a draft
        model's requests one at a time), and the log says why."""
        d = self.defaults
        if d.decode_concurrency <= 1 or d.kv_bits is not None:
            return False
        shared = reads_streams(self.model)
        if self.draft_model is not None:
            why = unbatchable(self.model) or unbatchable(self.draft_model, "draft model")
            if shared:  # (mlx-lm's batch would drop them, and ours carries no draft model)
                why = "a shared-mode model's rows carry its streams, and a batch cannot also draft"
                why += " with a draft model"
            if why:
                logger.warning(f"requests are served one at a time: {why}")
                return False
            self.spec_batching = True
            return True
        if shared:  # mlx-lm's batch would decode without the streams: another model
            why = unbatchable(self.model)
            if why:
                logger.warning(f"requests are served one at a time: {why}")
                return False
            self.spec_batching = self.stream_batching = True
            return True
        if not all(hasattr(c, "merge") for c in make_prompt_cache(self.model)):
            return False
        fault = batching_fault(self.model)
        if fault is not None:
            logger.warning(
                f"requests are served one at a time: mlx-lm's batched decoding fails on this "
                f"model ({fault})"
            )
            return False
        has_streams = stream_runtime(self.model) is not None
        tuned = tuned_batch(self.model) if d.draft is None else None
        if tuned is not None:  # (measured for batches on this device: its drafts)
            streams_on = tuned["draft"] == "streams"
            lookup = tuned["draft"] == "ngram"
        else:
            streams_on = has_streams and tuned_depth(self.model) > 0
            lookup = "ngram" in (d.draft or "")
        if streams_on or lookup:
            why = unbatchable(self.model)
            if why:
                with_streams = " with the streams" if streams_on else ""
                logger.warning(f"requests decoded together do not draft{with_streams}: {why}")
            self.spec_batching, self.stream_batching = not why, streams_on and not why
            if tuned is not None and not why:
                source = "the streams' chain" if streams_on else "prompt lookup"
                logger.info(f"requests decoded together draft with {source} of "
                            f"{tuned['num_draft_tokens']} tokens, as tuned for batches of "
                            f"{tuned['rows']} on this device")  # fmt: skip
        elif has_streams:
            why = "for batches" if tuned is not None else "on this device"
            logger.warning(f"requests decoded together do not draft: the streams' tuning {why} "
                           "has them off")  # fmt: skip
        return True

    def _new_batch(self) -> Union[Batch, SpecBatch]:
        d = self.defaults
        self.served["batched"] += 1
        if self.spec_batching:
            tuned = tuned_batch(self.model) if self.draft_model is None else None
            return SpecBatch(self.model, self.tokenizer, d.decode_concurrency,
                             d.prefill_step_size, self.xtc_special_tokens,
                             self.draft_model, streams=self.stream_batching,
                             stream_pass=tuned["stream_pass"] if tuned else "fused",
                             tuned=tuned if d.draft is None else None,
                             prompt_concurrency=d.prompt_concurrency,
                             pipeline=tuned.get("pipeline") if tuned else None)  # fmt: skip
        return Batch(self.model, self.tokenizer, d.decode_concurrency, d.prompt_concurrency,
                     d.prefill_step_size, self.xtc_special_tokens)  # fmt: skip

    def _join(self, batch: Batch, job: Job) -> None:
        """Adds every choice of ``job`` to ``batch``, each from the prompt cache."""
        try:
            for index in range(job.choices):
                reply = Reply(self.tokenizer, job, index)
                batch.add(reply, self._prompt_cache_for(reply))
        except Exception as e:  # noqa: BLE001 - handed to the request's thread
            self._fail(job, e, batch)

    def _batch_step(self, batch: Batch):
        """Adds the requests waiting (while the first of them can be batched), takes
        out the rows whose clients left, and steps every row. Returns ``(reply,
        cache)`` instead when one row is left and nobody waits to join it: it goes on
        alone, speculatively, from where it is."""
        for job in iter(self._take_batchable, None):
            if job.cancelled.is_set():
                self._finish(job)
            else:
                self._open[job] = job.choices
                self._join(batch, job)
        for reply, cache in batch.remove(
            [r for r in batch.replies.values() if r.job.cancelled.is_set()]
        ):
            self._keep(reply, cache)
        if len(batch) == 1 and self._trimmable and not self._batchable_waits():
            self.served["taken_back"] += 1
            ((reply, cache),) = batch.remove(list(batch.replies.values()))
            return reply, cache
        self.served["largest_batch"] = max(self.served["largest_batch"], len(batch))
        try:
            for reply, event, cache in batch.step():
                if event is not None:
                    reply.job.put(event)
                if cache is not None:
                    self._keep(reply, cache)
        except Exception as e:  # noqa: BLE001 - a failed step: every request in it gets it
            jobs = {r.job for r in batch.replies.values()}
            batch.replies.clear()
            for job in jobs:
                self._fail(job, e)
        return None

    def _prompt_cache_for(self, reply: Reply):
        """A new choice's cache: the LRU's entry sharing the longest prefix with its
        prompt (``reply.cached`` says how many tokens), or a fresh one (with a draft
        model: the model's layers, then the draft's, as mlx-lm's)."""
        job = reply.job
        cache, reply.cached = self.prompt_cache.fetch(job.tokens, job.args.get("min_fed", 1))
        if cache is None:
            cache = make_prompt_cache(self.model, draft_model=self.draft_model)
        return cache

    def _decode_alone(self, reply: Reply, cache):
        """Decodes a choice speculatively from where it is, and sends its events;
        returns ``(reply, cache)`` when it stops to join a batch (a request that can
        be batched waits), else ``None``.

        A new choice (``cache`` ``None``) starts from the prompt cache and feeds the
        rest of its prompt. One back from a batch (``cache`` holding the start of its
        tokens) feeds its last tokens again: one at least, and as many as its logits
        processors read, so that they see what they would have. When the choice
        ends, or is closed early, its cache goes back into the LRU.
        """
        job, args = reply.job, reply.job.args
        sequence, fresh = reply.sequence, cache is None
        self.served["alone"] += 1
        if fresh:
            if reply.index == 0 and args["seed"] is not None:
                mx.random.seed(args["seed"])  # (later choices continue its random stream)
            cache = self._prompt_cache_for(reply)
            held = reply.cached
        else:
            held = cache_tokens(cache)
            feed = max(args.get("min_fed", 1), 1)
            held -= trim_prompt_cache(cache, max(held - (len(sequence) - feed), 0))
        kwargs = {
            k: args[k]
            for k in ("draft", "num_draft_tokens", "ngram_candidates", "draft_confidence",
                      "draft_schedule")  # fmt: skip
            if args.get(k) is not None
        }
        if self.draft_model is not None:
            kwargs["draft_model"] = self.draft_model
            kwargs.setdefault("num_draft_tokens", DRAFT_MODEL_TOKENS)
        d = self.defaults
        if d.kv_bits is not None:
            kwargs.update(kv_bits=d.kv_bits, kv_group_size=d.kv_group_size,
                          quantized_kv_start=d.quantized_kv_start)  # fmt: skip
        if fresh and self.prompt_cache.max_size and not self._trimmable:
            if cache_tokens(cache) is not None:  # (recurrent layers: keep the prompt's state)
                kwargs["prompt_checkpoint_callback"] = lambda held: self.prompt_cache.insert(
                    job.tokens[:-1], copy.deepcopy(held)
                )
        gen = stream_generate(
            self.model,
            self.tokenizer,
            sequence[held:],
            max_tokens=reply.max_tokens - len(reply.generated),
            sampler=make_sampler(**args["sampling"], xtc_special_tokens=self.xtc_special_tokens),
            prefill_step_size=d.prefill_step_size,
            logits_processors=(
                make_logits_processors(**args["processing"]) if args["processing"] else None
            ),
            speculative=args["speculative"],
            acceptance=args["acceptance"],
            prompt_cache=cache,
            **kwargs,
        )
        may_join = self._trimmable and self._batchable(job)
        reply.spec.resume()
        ended = handed = False  # ended: finished or closed, not failed (the cache is consistent)
        try:
            for r in gen:
                event = reply.add(r.token, r.logprobs, r.finish_reason, r)
                if event is not None:
                    job.put(event)
                if reply.finished or job.cancelled.is_set() or self._stopping.is_set():
                    break
                if may_join and self._batchable_waits():
                    handed = True
                    break
            ended = True
        finally:
            gen.close()  # the cache now holds what mlx-lm's would
        if handed:
            return reply, cache
        if ended and not self._stopping.is_set():
            self._keep(reply, cache)
        return None

    # ---- prompts ------------------------------------------------------------------
    def chat_messages(self, body: Dict[str, Any]) -> List[Dict[str, str]]:
        """The request's messages with their content as text; refuses what we cannot read."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
                raise RequestError(
                    f"'messages'[{i}]: each message needs a string 'role' and 'content'",
                    "messages",
                )
            if m["role"] == "function":
                raise RequestError(
                    f"'messages'[{i}]: role 'function' is OpenAI's deprecated one: use 'tool'",
                    "messages",
                )
            content = m.get("content")
            if content is None and m["role"] in ("assistant", "tool"):
                content = ""
            if isinstance(content, list):  # content parts: text only
                if not all(
                    isinstance(p, dict)
                    and p.get("type") == "text"
                    and isinstance(p.get("text"), str)
                    for p in content
                ):
                    raise RequestError(
                        f"'messages'[{i}]: only text content parts are supported", "messages"
                    )
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise RequestError(
                    f"'messages'[{i}]: each message needs a string 'role' and 'content'",
                    "messages",
                )
            message = {**m, "content": content}
            if m.get("tool_calls") is not None:
                message["tool_calls"] = self._tool_calls_of(m["tool_calls"], i)
            out.append(message)
        return out

    def _tool_calls_of(self, calls: Any, i: int) -> List[Dict[str, Any]]:
        """An assistant message's ``tool_calls`` with their arguments as objects, as chat
        templates read them (OpenAI sends them as JSON text; ``mlx_lm.server`` does the same)."""
        where = f"'messages'[{i}]['tool_calls']"
        if not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise RequestError(f"{where} must be a list of objects", "messages")
        if not self.tokenizer.has_chat_template:
            raise RequestError(f"{where} need a chat template (see --chat-template)", "messages")
        out = []
        for call in calls:
            function = call.get("function")
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    arguments = json.loads(function["arguments"])
                except json.JSONDecodeError as e:
                    raise RequestError(f"{where}: 'arguments' is not valid JSON: {e}", "messages")
                call = {**call, "function": {**function, "arguments": arguments}}
            out.append(call)
        return out

    def template_args(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """``--chat-template-args`` updated by the request's ``chat_template_kwargs``."""
        extra = body.get("chat_template_kwargs") or {}
        if not isinstance(extra, dict):
            raise RequestError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        return {**(self.defaults.chat_template_args or {}), **extra}

    def prompt_tokens(self, body: Dict[str, Any], chat: bool, tools=None) -> List[int]:
        """The prompt's tokens; a chat's ``tools`` are shown to the model by its template."""
        tokens = self._prompt_tokens(body, chat, tools)
        # The model checks only the tokens it is fed, which after a cache hit
        # are the new ones: the whole conversation is checked here.
        context = getattr(getattr(self.model, "args", None), "max_position_embeddings", None)
        if context and len(tokens) > context:
            param = "messages" if chat else "prompt"
            raise RequestError(
                f"The prompt has {len(tokens)} tokens, more than the model's context of "
                f"{context} (max_position_embeddings).",
                param,
            )
        return tokens

    def _prompt_tokens(self, body: Dict[str, Any], chat: bool, tools) -> List[int]:
        tok = self.tokenizer
        if chat:
            messages = self.chat_messages(body)
            mapping = body.get("role_mapping")  # (mlx_lm.server's; used without a template)
            if mapping is not None and not (
                isinstance(mapping, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
            ):
                raise RequestError("'role_mapping' must map roles to strings", "role_mapping")
            if tok.has_chat_template:
                return list(
                    tok.apply_chat_template(
                        messages, tools=tools, tokenize=True, add_generation_prompt=True,
                        **self.template_args(body),
                    )
                )  # fmt: skip
            return tok.encode(join_messages(messages, mapping))
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            return tok.encode(prompt)
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            vocab = vocab_size(self.model)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise RequestError(
                    f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "prompt"
                )
            return prompt
        raise RequestError("'prompt' must be a non-empty string or list of token ids", "prompt")


def _arrays_of(model) -> List[mx.array]:
    """Every array of the model's modules: parameters, private ones too (RoPE
    frequencies), and the attached streams' or drafter's. (Not the runtime's
    scratch arrays of the last step: those belong to the thread that ran it.)"""
    found, seen = [], set()
    rt = getattr(model, "speculative_streams", None)
    todo = [model] + [getattr(rt, name, None) for name in ("streams", "drafter")]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, mx.array):
            found.append(obj)
        elif isinstance(obj, dict):  # an nn.Module is a dict of its members
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
    return found


class Handler(BaseHTTPRequestHandler):
    service: ModelService = None
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # (at DEBUG: --log-level DEBUG or --verbose)
        logger.debug("%s - %s", self.address_string(), fmt % args)

    def _cors(self):
        """mlx_lm.server's CORS headers, from ``--allowed-origins``."""
        allowed = self.service.defaults.allowed_origins
        origin = self.headers.get("Origin")
        if "*" in allowed:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin in allowed:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Allow-Methods", "*")
        self.send_header("Access-Control-Allow-Headers", "*")

    def do_OPTIONS(self):
        self.send_response(HTTPStatus.NO_CONTENT)
        self._cors()
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self._cors()
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, message, param=None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(
            status, {"error": {"message": message, "type": kind, "param": param, "code": None}}
        )

    def do_GET(self):
        path = self.path.rstrip("/")
        model = {
            "id": self.service.model_id,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "mlx-specstream",
        }
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [model]})
        elif path == f"/v1/models/{self.service.model_id}":
            self._send_json(200, model)
        elif path.startswith("/v1/models/"):
            self._error(HTTPStatus.NOT_FOUND, f"unknown model {path[len('/v1/models/'):]!r}")
        elif path == "/health":  # (as mlx_lm.server's: 503 once the generation thread ended)
            alive = self.service.alive
            self._send_json(200 if alive else 503, {"status": "ok" if alive else "unavailable"})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"unknown path {self.path}")

    def do_POST(self):
        # (mlx_lm.server also answers chat at /chat/completions.)
        routes = {"/v1/completions": False, "/v1/chat/completions": True, "/chat/completions": True}
        path = self.path.rstrip("/")
        if path not in routes:
            return self._error(HTTPStatus.NOT_FOUND, f"unknown path {self.path}")
        try:
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the body is not valid JSON: {e}")
            if not isinstance(body, dict):
                raise RequestError("the body must be a JSON object")
            chat = routes[path]
            check_unsupported(body)
            tok = self.service.tokenizer
            tools, parse_tools, forced = parse_tool_args(body, tok, chat)
            tokens = self.service.prompt_tokens(body, chat, tools)
            initial = initial_state(tok, tokens) if chat else None
            forced_text = ""
            if forced is not None:  # the answer starts with the call: the prompt holds it
                try:
                    forced_text = forced_call_text(tok, initial, forced or None)
                except ValueError as e:
                    raise RequestError(str(e), "tool_choice") from e
                tokens = tokens + tok.encode(forced_text, add_special_tokens=False)
            args = parse_generation_args(body, self.service.defaults)
            if args["draft"] == "streams+ngram" and self.service.drafter_chains:
                raise RequestError(
                    "'draft'='streams+ngram': this model's drafter drafts chains through its "
                    "recurrent layers, with no lookup merged in; pass 'streams' or 'ngram'",
                    "draft",
                )
            if args["draft_schedule"] == "heuristic" and self.service.draft_model is None:
                raise RequestError(
                    "'draft_schedule'='heuristic' sets how long a draft model's chains are; this "
                    "server has no --draft-model",
                    "draft_schedule",
                )
            if args["draft"] == "streams+ngram" and self.service.draft_model is not None:
                raise RequestError(
                    "'draft'='streams+ngram': this server drafts with its --draft-model; 'ngram' "
                    "merges prompt lookup into its drafts",
                    "draft",
                )
        except RequestError as e:
            return self._error(e.status, str(e), e.param)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            job = self.service.submit(tokens, args)
        except RuntimeError as e:  # the server is shutting down
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
        events = iter(job)
        try:
            try:
                # The first piece comes once the prompt is in; errors raised
                # before it (a prompt longer than the model's context, ...)
                # are still the client's, and get a 400.
                first = next(events)
            except ValueError as e:
                return self._error(HTTPStatus.BAD_REQUEST, str(e))
            except Exception as e:  # noqa: BLE001 - reported to the client, not swallowed
                return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")
            # A chat's answer is split into content, reasoning and tool calls.
            parse = None
            if chat:
                parse = dict(tokenizer=tok, tools=tools, initial=initial, parse_tools=parse_tools,
                             forced=forced_text)  # fmt: skip
            if args["stream"]:
                self._stream(rid, chat, first, events, args, parse)
            else:
                self._complete(rid, chat, first, events, parse)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left
        finally:
            # Stops the generation if the client left (its cache still goes
            # back into the LRU); nothing when it has finished.
            job.cancel()

    def _base(self, rid, chat, chunk=False):
        kind = (
            "chat.completion.chunk" if chunk else "chat.completion" if chat else "text_completion"
        )
        return {
            "id": rid,
            "object": kind,
            "created": int(time.time()),
            "model": self.service.model_id,
        }

    def _complete(self, rid, chat, first, events, parse):
        choices, usages = {}, {}
        for index, piece, finish, usage, new in itertools.chain([first], events):
            c = choices.get(index)
            if c is None:
                c = choices[index] = {"parts": Parts(), "finish": None, "records": None}
                c["parser"] = ResponseParser(**parse) if parse else None
            parts = c["parser"].feed(piece, final=finish is not None) if parse else Parts(piece)
            c["parts"].extend(parts)
            c["finish"] = finish
            if new is not None:
                c["records"] = (c["records"] or []) + new
            if usage is not None:
                usages[index] = usage
        out = []
        for index, c in sorted(choices.items()):
            logprobs = None if c["records"] is None else format_logprobs(c["records"], chat)
            choice = {"index": index, "logprobs": logprobs}
            choice["finish_reason"] = finish_reason(c["finish"], c["parser"])
            if chat:
                parts = c["parts"]
                # (null when the model wrote no text, as mlx_lm.server and OpenAI send it)
                choice["message"] = {"role": "assistant", "content": parts.content or None}
                add_reasoning_and_calls(choice["message"], parts)
            else:
                choice["text"] = c["parts"].content
            out.append(choice)
        usage = total_usage([usages[i] for i in sorted(usages)]) if usages else None
        self._send_json(200, {**self._base(rid, chat), "choices": out, "usage": usage})

    def _stream(self, rid, chat, first, events, args, parse):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self._cors()
        self.end_headers()
        self.close_connection = True

        def send(payload):
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        parsers, usages = {}, []
        for index, piece, finish, usage, new in itertools.chain([first], events):
            if chat and index not in parsers:  # each choice opens with the role
                parsers[index] = ResponseParser(**parse, streaming=True)
                role = {"index": index, "delta": {"role": "assistant"}, "finish_reason": None}
                send({**self._base(rid, chat, True), "choices": [role]})
            logprobs = None if new is None else format_logprobs(new, chat)
            choice = {"index": index, "logprobs": logprobs}
            if chat:
                parser = parsers[index]
                parts = parser.feed(piece, final=finish is not None)
                choice["finish_reason"] = finish_reason(finish, parser)
                choice["delta"] = {"content": parts.content} if parts.content else {}
                add_reasoning_and_calls(choice["delta"], parts)
            else:
                choice["finish_reason"] = finish
                choice["text"] = piece
            payload = {**self._base(rid, chat, chat), "choices": [choice]}
            if finish is not None:
                payload["usage"] = usage
                usages.append(usage)
            send(payload)
        if args["include_usage"]:  # OpenAI's final chunk: no choices, the usage
            send({**self._base(rid, chat, chat), "choices": [], "usage": total_usage(usages)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(
    model, tokenizer, model_id="default", host="127.0.0.1", port=8080, draft_model=None, **defaults
):
    """A ready ``ThreadingHTTPServer`` (call ``serve_forever``); ``port=0`` picks a free port.
    ``draft_model`` (an mlx-lm model with the same tokenizer) drafts every request, as
    ``mlx_lm.server --draft-model`` does.

    ``defaults`` (those of the command's flags when not given): ``max_tokens`` (512),
    ``temp`` (0.0), ``top_p`` (1.0), ``top_k`` (0), ``min_p`` (0.0), ``draft`` (None),
    ``num_draft_tokens`` (None), ``ngram_candidates`` (None), ``draft_confidence`` (None),
    ``draft_schedule`` (None) and ``no_speculation`` (False: ``speculative`` true) of a
    request; ``chat_template_args`` ({}) for every chat template; ``prefill_step_size``
    (2048), ``kv_bits`` (None), ``kv_group_size`` (64) and ``quantized_kv_start``
    (5000), as in mlx-lm; ``prompt_cache_size`` (10 entries, 0: no prompt cache),
    ``prompt_cache_bytes`` (None: no byte limit); ``allowed_origins`` (``["*"]``);
    ``decode_concurrency`` (32) and ``prompt_concurrency`` (8), as in mlx-lm. The service
    (model, prompt-cache LRU, generation thread) is :func:`service_of` the server.

    ``server_close()`` ends the generation thread (so does interpreter exit);
    :func:`wait_idle` waits for the requests already handed to it.
    """
    # The command's own defaults (one source for both), then the caller's.
    options = argparse.Namespace(**{**vars(setup_arg_parser().parse_args([])), **defaults})
    handler = type(
        "BoundHandler",
        (Handler,),
        {"service": ModelService(model, tokenizer, model_id, options, draft_model)},
    )
    return Server((host, port), handler)


class Server(ThreadingHTTPServer):
    """The HTTP server; ``server_close`` also ends the generation thread."""

    daemon_threads = True  # a handler thread never runs MLX (see ModelService)

    def server_close(self):
        super().server_close()
        self.RequestHandlerClass.service.stop()


def service_of(server) -> ModelService:
    """The :class:`ModelService` behind a server from :func:`make_server`."""
    return server.RequestHandlerClass.service


def parse_size(text: str) -> int:
    """``"512MB"``, ``"2G"``, ``"1e9"`` -> bytes (as ``mlx_lm.server``'s sizes)."""
    units = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}
    t = text.strip().upper()
    digits = t.rstrip("KMGB")
    try:
        value = float(digits) * units[t[len(digits) :]]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB, 2GB)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB, 2GB)")
    return int(value)


def wait_idle(server, timeout: float = 60.0) -> bool:
    """Waits until every request handed to the model is finished (True) or
    ``timeout`` passes (False)."""
    return service_of(server).wait_idle(timeout)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="OpenAI-compatible server for Speculative Streaming.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--allowed-origins",
        type=lambda x: x.split(","),
        default="*",
        help="Allowed origins, comma-separated (default: *)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="Set the logging level (default: INFO); DEBUG logs requests and their usage",
    )
    p.add_argument("--chat-template", default="", help="Specify a chat template for the tokenizer")
    p.add_argument(
        "--use-default-chat-template", action="store_true", help="Use the default chat template"
    )
    p.add_argument(
        "--chat-template-args",
        type=json.loads,
        default="{}",
        help="A JSON formatted string of arguments for the tokenizer's apply_chat_template, "
        "e.g. '{\"enable_thinking\":false}'",
    )
    p.add_argument("--max-tokens", type=int, default=512, help="Default max_tokens of a request")
    p.add_argument("--temp", type=float, default=0.0, help="Default temperature of a request")
    p.add_argument("--top-p", type=float, default=1.0, help="Default top_p of a request")
    p.add_argument("--top-k", type=int, default=0, help="Default top_k of a request (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="Default min_p of a request (0: off)")
    add_draft_args(p, per_request=True)
    add_prefill_arg(p)
    p.add_argument(
        "--prompt-cache-size",
        type=int,
        default=10,
        help="Most KV caches kept for reuse across requests (0: none); as mlx_lm.server",
    )
    p.add_argument(
        "--prompt-cache-bytes",
        type=parse_size,
        default=None,
        help="Most bytes of KV caches kept for reuse (e.g. 512MB); default: no limit",
    )
    add_kv_quantization_args(p)
    p.add_argument(
        "--decode-concurrency",
        type=int,
        default=32,
        help="Most requests decoded together, in one batch, when several wait (1: one at a "
        "time, each speculatively); as mlx_lm.server",
    )
    p.add_argument(
        "--prompt-concurrency",
        type=int,
        default=8,
        help="Most prompts of a batch prefilled together; as mlx_lm.server",
    )
    p.add_argument(
        "--verbose", action="store_true", help="Log requests and their usage (--log-level DEBUG)"
    )
    return p


def main(argv=None):
    p = setup_arg_parser()
    args = p.parse_args(argv)
    logging.basicConfig(
        level="DEBUG" if args.verbose else args.log_level,
        format="%(asctime)s - %(levelname)s - %(message)s",
    )
    # (the flags tune --save stored for a model whose files it does not write, as defaults)
    args = with_stored_tuning(p, argv, log=lambda m: logger.info(m.removeprefix("[INFO] ")))
    if args.prompt_cache_size < 0:
        p.error("--prompt-cache-size must be >= 0")
    for flag in ("decode_concurrency", "prompt_concurrency"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    fault = confidence_fault(args.draft_confidence)
    if fault is not None:
        p.error(f"--draft-confidence {args.draft_confidence}: {fault}")
    if args.draft_model is not None and args.draft == "streams+ngram":
        p.error(
            "--draft streams+ngram with --draft-model: the model's streams are off; --draft "
            "ngram merges prompt lookup into the draft model's drafts"
        )
    model, tokenizer = load_model(
        args, {"chat_template": args.chat_template} if args.chat_template else None
    )
    if args.use_default_chat_template and tokenizer.chat_template is None:
        tokenizer.chat_template = tokenizer.default_chat_template
    draft_model = load_draft_model(args, tokenizer)
    if args.draft_confidence and args.decode_concurrency > 1:
        logger.info(
            "requests with a draft_confidence (--draft-confidence unless a request "
            "sends null) are decoded one at a time: a batch's rows draft uncut chains"
        )
    if args.draft_schedule == "heuristic" and args.decode_concurrency > 1:
        logger.info(
            "requests with a heuristic draft_schedule (--draft-schedule unless a request "
            "sends another) are decoded one at a time: a batch's rows draft fixed chains"
        )
    note = untuned_note(runtime_config(model), args.model)
    if note is not None and draft_model is None:
        logger.info(note.removeprefix("[INFO] "))
    server = make_server(
        model,
        tokenizer,
        args.model or "mlx-specstream-default",
        args.host,
        args.port,
        draft_model=draft_model,
        **{
            k: getattr(args, k)
            for k in (
                "max_tokens", "temp", "top_p", "top_k", "min_p", "draft", "num_draft_tokens",
                "ngram_candidates", "draft_confidence", "draft_schedule", "no_speculation",
                "chat_template_args", "prefill_step_size", "kv_bits", "kv_group_size",
                "quantized_kv_start", "prompt_cache_size", "prompt_cache_bytes", "allowed_origins",
                "decode_concurrency", "prompt_concurrency",
            )
        },  # fmt: skip
    )
    host, port = server.server_address[:2]
    logger.info(f"serving on http://{host}:{port}/v1")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()  # ends the generation thread


if __name__ == "__main__":
    main()

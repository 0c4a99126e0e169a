"""The server's replies: one request's choice as the events the client gets
(:class:`Reply`), and several choices decoded at once by mlx-lm's continuous
batching (:class:`Batch`).

A choice is decoded speculatively when it is the only one waiting, and in a batch
when several are: then one plain pass over a row per choice serves them all, as
``mlx_lm.server`` serves them, and a batch beats speculation for throughput. A
choice can start alone and join a batch when other requests arrive
(:meth:`Batch.add` of a reply that has generated tokens), and leave it to go on
alone (:meth:`Batch.remove` gives its cache); its reply goes on where it was.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache as make_mlx_lm_cache
from mlx_lm.sample_utils import make_logits_processors

from .batch import SpecBatcher, output_size, tuned_depth
from .cache import cache_tokens, trim_prompt_cache, whole_windows
from .cli_args import DRAFT_MODEL_TOKENS
from .generate import SpeculativeUsage
from .ngram import NGRAM_DRAFT_TOKENS
from .openai_api import make_usage, token_logprobs
from .sample_utils import make_sampler

# (index, text, finish_reason, usage, logprobs): what a job's queue carries per piece
Event = Tuple[int, str, Optional[str], Optional[Dict[str, Any]], Optional[List[dict]]]


PROBE_TOLERANCE = 0.05  # most |p(batch) - p(alone)| of a next-token probability


def batching_fault(model) -> Optional[str]:
    """Why mlx-lm's batched decoding cannot serve ``model`` (``None``: it can).

    Three prompts of different lengths are decoded by one ``BatchGenerator``,
    left-padded to one width, and each alone; every row's next-token
    probabilities must be its own to within :data:`PROBE_TOLERANCE` (on CPU
    float32 rows differ by 1e-7, bfloat16 rows by 1e-3). mlx-lm 0.32's gemma2, for
    one, fails: its mask is broadcast over the key-value heads, which raises with
    three rows and silently attends across rows and padding with two (0.35-0.5).
    """
    vocab = output_size(model)  # (the probe's tokens stay inside it)
    prompts = [[t % vocab for t in range(1, n + 1)] for n in (8, 3, 2)]
    try:
        generator = BatchGenerator(model, max_tokens=1)
        uids, rows = generator.insert(prompts), {}
        while responses := generator.next_generated():
            rows.update((r.uid, r.logprobs) for r in responses)
        generator.close()
    except Exception as e:  # noqa: BLE001 - the reason is reported
        return f"{type(e).__name__}: {e}"
    for uid, prompt in zip(uids, prompts):
        alone = mx.softmax(model(mx.array([prompt]))[0, -1].astype(mx.float32))
        gap = mx.abs(mx.exp(rows[uid].astype(mx.float32)) - alone).max().item()
        if gap > PROBE_TOLERANCE:
            return (
                f"a row of a batch differs from the same prompt alone by {gap:.2f} in a "
                "next-token probability"
            )
    return None


class Reply:
    """One choice of a request: its generated tokens turned into events.

    Fed one token at a time (:meth:`add`), from a speculative generation, from a
    batch, or from one and then the other. The text is cut at the first stop
    string, and the tail that could start one is held back until it cannot.

    Example (tokens ``t1``, ``t2``, ``t5`` of a word tokenizer; stop string ``"t5"``,
    so the text's last character is held back)::

        reply.add(1, lp, None)  # "t1"       -> (0, "t", None, None, None)
        reply.add(2, lp, None)  # "t1 t2"    -> (0, "1 t", None, None, None)
        reply.add(5, lp, None)  # "t1 t2 t5" -> (0, "2 ", "stop", usage, None)

    Args:
        tokenizer: mlx-lm's ``TokenizerWrapper``.
        job: where the events go (``put``), and whose ``args`` and ``tokens``
          (the whole prompt) this choice answers.
        index (int): the choice's index.
        cached (int): prompt tokens that came from the prompt cache (set once known).
    """

    def __init__(self, tokenizer, job, index: int, cached: int = 0):
        self.tokenizer, self.job, self.index, self.cached = tokenizer, job, index, cached
        args = job.args
        self.stops, self.top, self.max_tokens = (
            args["stop"],
            args.get("logprobs"),
            args["max_tokens"],
        )
        self.detokenizer = tokenizer.detokenizer
        self.generated: List[int] = []
        self.spec = SpeculativeUsage()
        self.text, self.emitted, self.records, self.sent = "", 0, [], 0
        self.finished = False
        self.usage: Optional[Dict[str, Any]] = None  # once finished

    def add(self, token: int, logprobs: mx.array, finish: Optional[str], response=None,
            from_draft: bool = False):  # fmt: skip
        """Takes the next token (``finish``: mlx-lm's reason when it is the last;
        ``response``: the speculative generation's, for its usage, ``None`` in a
        batch, where ``from_draft`` says the token was an accepted draft's); returns
        the event to send, or ``None`` while text is held back."""
        self.generated.append(token)
        if response is not None:
            self.spec.add(response)
        else:
            self.spec.add_batched(from_draft)
        if self.top is not None:
            self.records.append(token_logprobs(self.tokenizer, token, logprobs, self.top))
        if not (finish == "stop" and token in self.tokenizer.eos_token_ids):
            self.detokenizer.add_token(token)  # (an EOS token is not text, as in mlx-lm)
        if finish is not None:
            self.detokenizer.finalize()
        self.text += self.detokenizer.last_segment
        hit = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.text, finish = self.text[:hit], "stop"
        hold = max((len(s) - 1 for s in self.stops), default=0) if finish is None else 0
        ready = max(len(self.text) - hold, self.emitted)
        if ready == self.emitted and finish is None:
            return None
        if finish is not None:
            self.finished = True
            self.usage = make_usage(
                len(self.job.tokens), self.cached, len(self.generated), self.spec
            )
        new = None if self.top is None else self.records[self.sent :]
        event = (self.index, self.text[self.emitted : ready], finish, self.usage, new)
        self.emitted, self.sent = ready, len(self.records)
        return event

    @property
    def sequence(self) -> List[int]:
        """The prompt, then the tokens generated so far."""
        return list(self.job.tokens) + self.generated


class Batch:
    """Choices decoded together: mlx-lm's ``BatchGenerator`` (plain decoding, one
    row per choice, rows joining and leaving between steps) feeding :class:`Reply`s.

    Args:
        model: the model (its streams and hooks are idle in a plain pass).
        tokenizer: mlx-lm's ``TokenizerWrapper``; its EOS tokens end a row.
        decode_concurrency (int): most rows decoded at once (``mlx_lm.server``'s
          ``--decode-concurrency``).
        prompt_concurrency (int): most prompts prefilled at once (its
          ``--prompt-concurrency``).
        prefill_step_size (int): prompt tokens per prefill pass.
        xtc_special_tokens: the tokens XTC sampling never drops (as for one request).
    """

    def __init__(self, model, tokenizer, decode_concurrency: int, prompt_concurrency: int,
                 prefill_step_size: int, xtc_special_tokens: Sequence[int] = ()):  # fmt: skip
        self.tokenizer, self.xtc_special_tokens = tokenizer, xtc_special_tokens
        self.generator = BatchGenerator(
            model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=decode_concurrency,
            prefill_batch_size=prompt_concurrency,
            prefill_step_size=prefill_step_size,
        )
        self.replies: Dict[int, Reply] = {}  # by the generator's uid

    def __len__(self) -> int:
        return len(self.replies)

    def add(self, reply: Reply, cache: list) -> None:
        """Adds a choice; the tokens of ``reply.sequence`` that ``cache`` does not
        hold are fed. A new choice's cache holds ``reply.cached`` prompt tokens. One
        that has generated tokens (it ran speculatively until now) goes on from its
        last one: a cache that already holds that token gives it back (it must be
        trimmable) to compute what follows."""
        sequence, cache = reply.sequence, whole_windows(cache)  # (a batch's rows hold every row)
        held = cache_tokens(cache) if reply.generated else reply.cached
        if held == len(sequence):
            held -= trim_prompt_cache(cache, 1)
        args = reply.job.args
        processing = args["processing"]
        (uid,) = self.generator.insert_segments(
            segments=[[sequence[held:]]],
            max_tokens=[reply.max_tokens - len(reply.generated)],
            caches=[list(cache)],
            all_tokens=[sequence[:held]],  # the logits processors' history
            samplers=[make_sampler(**args["sampling"], xtc_special_tokens=self.xtc_special_tokens)],
            logits_processors=[make_logits_processors(**processing) if processing else []],
        )
        self.replies[uid] = reply

    def step(self) -> List[Tuple[Reply, Optional[Event], Optional[list]]]:
        """One step of every row: ``(reply, event, cache)`` for each choice that got
        a token, ``cache`` (holding the start of ``reply.sequence``) when the choice
        is done, else ``None``."""
        out = []
        _, responses = self.generator.next()
        for r in responses:
            reply = self.replies[r.uid]
            event = reply.add(r.token, r.logprobs, r.finish_reason)
            cache = None
            if reply.finished:
                del self.replies[r.uid]
                if r.finish_reason is None:  # (a stop string: the row is still there)
                    cache = self._remove([r.uid])[0]
                else:
                    cache = r.prompt_cache
            out.append((reply, event, cache))
        return out

    def remove(self, replies: Sequence[Reply]) -> List[Tuple[Reply, list]]:
        """Takes ``replies`` out (their clients left); ``(reply, cache)`` of each."""
        gone = set(map(id, replies))
        uids = [uid for uid, reply in self.replies.items() if id(reply) in gone]
        out = [self.replies.pop(uid) for uid in uids]
        return list(zip(out, self._remove(uids)))

    def _remove(self, uids: List[int]) -> List[list]:
        """The rows' caches, in the order of ``uids``, once the rows are gone."""
        caches = self.generator.remove(uids, return_prompt_caches=True)
        return [caches[uid][0] for uid in uids]

    def close(self) -> None:
        self.generator.close()


class SpecBatch:
    """Choices decoded together, each row speculating: a
    :class:`~mlx_specstream.batch.SpecBatcher` feeding :class:`Reply`s, with
    :class:`Batch`'s interface. With a draft model every speculative request's row
    drafts with it (up to its ``num_draft_tokens``, 3 by default; a request whose
    ``draft`` has ``"ngram"`` drafts its lookup chain where it matches instead). With
    ``streams`` (a model whose streams draft on this device) a speculative
    request's row drafts with them, or as its ``draft`` says (``"ngram"``,
    ``"streams+ngram"``: lookup where it matches, else the streams). Otherwise a row
    drafts by prompt lookup when its request's ``draft`` has ``"ngram"``. Other rows
    get one token per pass.

    Args:
        model: the model (every layer a plain ``KVCache``; see
          :func:`~mlx_specstream.batch.ragged_fault`).
        tokenizer: mlx-lm's ``TokenizerWrapper``; its EOS tokens end a row.
        decode_concurrency (int): most rows decoded at once.
        prefill_step_size (int): prompt tokens per prefill pass.
        xtc_special_tokens: the tokens XTC sampling never drops.
        draft_model: the server's draft model (a choice's cache then holds the
          model's layers, then the draft model's, as the server's caches do).
        streams (bool): rows may draft with the model's own streams.
        stream_pass (str): how their rows are fed (:class:`SpecBatcher`).
        prompt_concurrency (int, optional): most prompts prefilled at once.
        pipeline (bool, optional): pipelined passes (:class:`SpecBatcher`).
        tuned (dict, optional): how the model's batches draft on this device
          (:func:`~mlx_specstream.batch.tuned_batch`): a request that names no
          ``draft`` drafts so, with its draft length.
    """

    def __init__(self, model, tokenizer, decode_concurrency: int, prefill_step_size: int,
                 xtc_special_tokens: Sequence[int] = (), draft_model=None,
                 streams: bool = False, stream_pass: str = "fused",
                 tuned: Optional[dict] = None, prompt_concurrency: Optional[int] = None,
                 pipeline: Optional[bool] = None):  # fmt: skip
        self.tokenizer, self.xtc_special_tokens = tokenizer, xtc_special_tokens
        self.tuned = tuned
        self.batcher = SpecBatcher(model, tokenizer.eos_token_ids, prefill_step_size,
                                   max_rows=decode_concurrency, keep_caches=True,
                                   draft_model=draft_model, streams=streams,
                                   stream_pass=stream_pass, pipeline=pipeline,
                                   prefill_batch_size=prompt_concurrency)  # fmt: skip
        self.layers = len(make_mlx_lm_cache(model))
        self.replies: Dict[int, Reply] = {}  # by the batcher's uid

    def __len__(self) -> int:
        return len(self.replies)

    def add(self, reply: Reply, cache: list) -> None:
        """As :meth:`Batch.add` (``cache`` holds a prefix of ``reply.sequence``)."""
        sequence, cache = reply.sequence, _held_by(whole_windows(list(cache)), reply.sequence, 1)
        args = reply.job.args
        draft, tuned = args.get("draft") or None, self.tuned
        if draft is not None or self.batcher.draft_model is not None:
            tuned = None  # (the request's or the draft model's drafts, not the tuning's)
        elif tuned is not None:
            draft = tuned["draft"]
            args = dict(args, num_draft_tokens=args.get("num_draft_tokens")
                        or tuned["num_draft_tokens"] or None)  # fmt: skip
        if self.batcher.draft_model is not None:
            n = (args.get("num_draft_tokens") or DRAFT_MODEL_TOKENS) if args["speculative"] else 0
            draft = "draft_model+ngram" if "ngram" in (draft or "") else "draft_model"
        elif self.batcher.streams is not None:
            plain = tuned is not None and draft is None  # (tuned: no drafts)
            draft = draft or "streams"
            if draft == "streams":
                n = tuned["num_draft_tokens"] if tuned else tuned_depth(self.batcher.model)
            else:
                n = args.get("num_draft_tokens") or NGRAM_DRAFT_TOKENS
            n = n if args["speculative"] and not plain else 0
        else:
            drafts = "ngram" in (draft or "") and args["speculative"]
            n = (args.get("num_draft_tokens") or NGRAM_DRAFT_TOKENS) if drafts else 0
            draft = "ngram"
        uid = self.batcher.insert(
            sequence,
            cache[: self.layers],
            draft_cache=cache[self.layers :] or None,
            max_tokens=reply.max_tokens - len(reply.generated),
            sampler=make_sampler(**args["sampling"], xtc_special_tokens=self.xtc_special_tokens),
            logits_processors=(
                make_logits_processors(**args["processing"]) if args["processing"] else None
            ),
            num_draft_tokens=n,
            draft=draft,
        )
        self.replies[uid] = reply

    def step(self) -> List[Tuple[Reply, Optional[Event], Optional[list]]]:
        """One pass over every row: ``(reply, event, cache)`` per token a choice got
        (``cache``, holding the start of ``reply.sequence``, with its last one once
        the choice is done)."""
        out = []
        for row in self.batcher.step():
            reply = self.replies[row.uid]
            last = len(row.tokens) - 1
            for j, (token, logprobs) in enumerate(zip(row.tokens, row.distributions)):
                finish = row.finish_reason if j == last else None
                out.append([reply, reply.add(token, logprobs, finish, from_draft=j < last), None])
                if reply.finished:
                    break
            if reply.finished:
                del self.replies[row.uid]
                cache = row.cache if row.finish_reason else self.batcher.remove([row.uid])[row.uid]
                out[-1][2] = _held_by(cache, reply.sequence)
        return [tuple(o) for o in out]

    def remove(self, replies: Sequence[Reply]) -> List[Tuple[Reply, list]]:
        """Takes ``replies`` out (their clients left); ``(reply, cache)`` of each."""
        gone = set(map(id, replies))
        uids = [uid for uid, reply in self.replies.items() if id(reply) in gone]
        caches = self.batcher.remove(uids)
        return [(r, _held_by(caches[uid], r.sequence)) for uid in uids
                for r in [self.replies.pop(uid)]]  # fmt: skip

    def close(self) -> None:
        pass


def _held_by(cache: list, sequence: List[int], short: int = 0) -> list:
    """``cache`` with every layer cut to at most ``len(sequence) - short`` tokens: a
    choice cut short by a stop string ends before the accepted drafts its row fed,
    and a row joining a batch leaves its last token to feed."""
    for c in cache:
        over = c.offset - (len(sequence) - short)
        if over > 0:
            c.trim(over)
    return cache

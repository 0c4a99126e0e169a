"""The OpenAI API as ``mlx_lm.server`` speaks it: request fields validated into plain
values, and the response's parts (``usage``, ``logprobs``, a chat message's reasoning
and tool calls) formatted. Pure functions; the server (:mod:`mlx_specstream.server`)
runs the model.
"""

import argparse
from http import HTTPStatus
from typing import Any, Dict, List, Optional

import mlx.core as mx

from .decode import ACCEPTANCE, DRAFTS
from .config import confidence_fault
from .draft_schedule import SCHEDULES
from .response_parser import Parts, ResponseParser

# mlx_lm.server's layout for chat without a template: a prefix per role, a
# separator after each message, the assistant's prefix last, trailing
# whitespace stripped. (Like mlx_lm's, "system_prompt" is not inserted.)
DEFAULT_ROLE_MAPPING = {
    "system_prompt": (
        "A chat between a curious user and an artificial intelligence "
        "assistant. The assistant follows the given rules no matter what."
    ),
    "system": "ASSISTANT's RULE: ",
    "user": "USER: ",
    "assistant": "ASSISTANT: ",
    "stop": "\n",
}


def join_messages(messages: List[Dict[str, str]], role_mapping: Optional[dict] = None) -> str:
    """The prompt ``mlx_lm.server`` builds from chat messages when the tokenizer
    has no chat template.

    Example: ``[{"role": "user", "content": "hi"}]`` gives
    ``"USER: hi\nASSISTANT:"``. A role missing from the mapping gets no prefix.
    """
    mapping = role_mapping or DEFAULT_ROLE_MAPPING
    sep = mapping.get("stop", "")
    text = "".join(f"{mapping.get(m['role'], '')}{m.get('content', '')}{sep}" for m in messages)
    return (text + mapping.get("assistant", "")).rstrip()


# Request fields of the OpenAI API that this server does not implement, with
# the values that mean "not used". Anything else is refused, naming the field.
UNSUPPORTED = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "adapters": (None,),
    "draft_model": (None, "default_model"),
}
UNSUPPORTED_WHY = {
    "functions": "OpenAI's deprecated function calling is not supported: use 'tools'",
    "function_call": "OpenAI's deprecated function calling is not supported: use 'tool_choice'",
    "response_format": "this server returns plain text only ({'type': 'text'})",
    "best_of": "one choice per request only (best_of=1)",
    "echo": "echoing the prompt is not supported",
    "suffix": "suffixes (insertion) are not supported",
    "adapters": "this server serves one model: start it with --adapter-path",
    "draft_model": "drafts come from the model's own streams or --drafter, not a draft model",
}


def check_unsupported(body: Dict[str, Any]) -> None:
    for name, unused in UNSUPPORTED.items():
        value = body.get(name)
        if not any(value == u and type(value) is type(u) for u in unused):
            raise RequestError(f"'{name}' is not supported: {UNSUPPORTED_WHY[name]}", name)


class RequestError(ValueError):
    """A client error: becomes a 4xx JSON response."""

    def __init__(self, message, param=None, status=HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.param = param
        self.status = status


def _number(body, name, default, lo=None, hi=None, integer=False, lo_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise RequestError(f"'{name}'={value} must be {'>' if lo_open else '>='} {lo}", name)
    if hi is not None and value > hi:
        raise RequestError(f"'{name}'={value} must be <= {hi}", name)
    return value


def parse_generation_args(body: Dict[str, Any], defaults: argparse.Namespace) -> Dict[str, Any]:
    """Validated generation arguments of an OpenAI-style request body."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", defaults.max_tokens))
    max_tokens = _number(
        {"max_tokens": max_tokens}, "max_tokens", defaults.max_tokens, lo=1, integer=True
    )
    temp = _number(body, "temperature", defaults.temp, lo=0.0)
    top_p = _number(body, "top_p", defaults.top_p, lo=0.0, hi=1.0, lo_open=True)
    top_k = _number(body, "top_k", defaults.top_k, lo=0, integer=True)
    min_p = _number(body, "min_p", defaults.min_p, lo=0.0, hi=1.0)
    xtc_probability = _number(body, "xtc_probability", 0.0, lo=0.0, hi=1.0)
    xtc_threshold = _number(body, "xtc_threshold", 0.1, lo=0.0, hi=0.5)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", "seed")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise RequestError("'stop' must be a string or a list of non-empty strings", "stop")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise RequestError("'logit_bias' must map token ids to numbers", "logit_bias")
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise RequestError("'logit_bias' must map token ids to numbers", "logit_bias")
    # mlx-lm's penalties: each with the number of recent tokens it reads.
    penalties, reads = {}, [1]
    for name, lo in (("repetition", 0.0), ("presence", None), ("frequency", None)):
        value = _number(body, f"{name}_penalty", None, lo=lo)
        size = _number(body, f"{name}_context_size", 20, lo=1, integer=True)
        if value:
            penalties.update({f"{name}_penalty": value, f"{name}_context_size": size})
            reads.append(size)
    speculative = body.get("speculative", not defaults.no_speculation)
    if not isinstance(speculative, bool):
        raise RequestError("'speculative' must be a boolean", "speculative")
    acceptance = body.get("acceptance")
    if acceptance is not None and acceptance not in ACCEPTANCE:
        raise RequestError(f"'acceptance' must be one of {list(ACCEPTANCE)}", "acceptance")
    draft = body.get("draft", defaults.draft)
    if draft is not None and draft not in DRAFTS:
        raise RequestError(
            f"'draft'={draft!r} must be null (the model's configured drafts) or one of "
            f"{list(DRAFTS)}",
            "draft",
        )
    draft_tokens = body.get("num_draft_tokens", defaults.num_draft_tokens)
    if draft_tokens is not None:
        draft_tokens = _number({"num_draft_tokens": draft_tokens}, "num_draft_tokens", None,
                               lo=1, integer=True)  # fmt: skip
    candidates = body.get("ngram_candidates", defaults.ngram_candidates)
    if candidates is not None:
        candidates = _number({"ngram_candidates": candidates}, "ngram_candidates", None, lo=1,
                             integer=True)  # fmt: skip
    confidence = body.get("draft_confidence", defaults.draft_confidence)
    fault = confidence_fault(confidence)
    if fault is not None:
        raise RequestError(f"'draft_confidence'={confidence!r} {fault}", "draft_confidence")
    schedule = body.get("draft_schedule", defaults.draft_schedule)
    if schedule is not None and schedule not in SCHEDULES:
        raise RequestError(
            f"'draft_schedule'={schedule!r} must be null or one of {list(SCHEDULES)}",
            "draft_schedule",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", "stream")
    logprobs = requested_logprobs(body)
    n = _number(body, "n", 1, lo=1, hi=MAX_CHOICES, integer=True)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(
            "'stream_options' must be an object with a boolean 'include_usage'", "stream_options"
        )
    # Plain values only: the sampler and the processors are built by the
    # generation thread (see ModelService), which does all the MLX work.
    return dict(
        max_tokens=max_tokens,
        sampling=dict(
            temp=temp,
            top_p=top_p if top_p < 1 else 0.0,
            min_p=min_p,
            top_k=top_k,
            xtc_probability=xtc_probability,
            xtc_threshold=xtc_threshold,
        ),
        processing=dict(logit_bias=bias or None, **penalties) if (bias or penalties) else None,
        seed=seed,
        stop=stop,
        speculative=speculative,
        acceptance=acceptance,
        draft=draft,
        num_draft_tokens=draft_tokens,
        ngram_candidates=candidates,
        draft_confidence=confidence,
        draft_schedule=schedule,
        stream=stream,
        logprobs=logprobs,
        n=n,
        include_usage=options.get("include_usage", False),
        # A penalty reads the last tokens before each new one: a request reusing
        # a cached prefix still feeds that many itself, so it sees the same
        # history as a cold request.
        min_fed=max(reads),
    )


def parse_tool_args(body: Dict[str, Any], tokenizer, chat: bool):
    """The request's ``tools`` (``None`` when there are none), whether the model's
    tool calls are parsed out of its answer (not for ``tool_choice: "none"``, whose
    tools are not shown to the model either), and the forced call: ``None``, ``""``
    for ``"required"``, or the function's name for a named ``tool_choice`` (then the
    only tool shown to the model)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise RequestError("'tools' must be a list of objects", "tools")
    forced = None
    if choice == "required":
        forced = ""
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise RequestError(
                '\'tool_choice\' as an object must be {"type": "function", "function": '
                '{"name": ...}}',
                "tool_choice",
            )
        named = [t for t in tools or [] if (t.get("function") or {}).get("name") == name]
        if not named:
            raise RequestError(
                f"'tool_choice' names {name!r}, which is not in 'tools'", "tool_choice"
            )
        tools, forced = named[:1], name
    elif choice is not None and choice not in ("auto", "none"):
        raise RequestError(
            "'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", "
            '"function": {"name": ...}}',
            "tool_choice",
        )
    if forced is not None and not tools:
        raise RequestError("'tool_choice' forces a call: it needs 'tools'", "tool_choice")
    if body.get("parallel_tool_calls") not in (None, True):
        raise RequestError(
            "'parallel_tool_calls' must be true: every call the model writes is returned",
            "parallel_tool_calls",
        )
    if tools and not chat:
        raise RequestError("'tools' are for /v1/chat/completions", "tools")
    if choice == "none":
        return None, False, None
    if tools and not tokenizer.has_chat_template:
        raise RequestError("'tools' need a chat template (see --chat-template)", "tools")
    if tools and not tokenizer.has_tool_calling:
        raise RequestError(
            "'tools': this model's tokenizer has no tool-call format that mlx-lm knows; "
            "name one (a module of mlx_lm.tool_parsers) as 'tool_parser_type' in the "
            "model's tokenizer_config.json",
            "tools",
        )
    return tools or None, True, forced


MAX_TOP_LOGPROBS = 20  # (OpenAI's limit)
MAX_CHOICES = 16  # a request's most choices (n)


def requested_logprobs(body: Dict[str, Any]) -> Optional[int]:
    """How many alternatives a request wants with each token's log-probability, or
    ``None`` for no log-probabilities. Chat asks with ``"logprobs": true`` and
    ``top_logprobs``; a completion with ``"logprobs": n``."""
    value, top = body.get("logprobs"), body.get("top_logprobs")
    if value is None or value is False:
        if top not in (None, 0):
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    if value is True:
        return _number({"top_logprobs": top}, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS,
                       integer=True)  # fmt: skip
    return _number(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS, integer=True)


def token_logprobs(tokenizer, token: int, logprobs: mx.array, top: int) -> Dict[str, Any]:
    """One generated token's log-probability and its ``top`` alternatives, as plain
    values: ``{"id", "token", "logprob", "top": [(id, token, logprob), ...]}``.
    ``logprobs`` are the model's (after logits processors), as mlx-lm yields them."""
    out = {"id": token, "token": tokenizer.decode([token]), "logprob": logprobs[token].item()}
    if top:
        ids = mx.argsort(-logprobs)[:top].tolist()
        values = logprobs[mx.array(ids)].tolist()
        out["top"] = [(i, tokenizer.decode([i]), v) for i, v in zip(ids, values)]
    return out


def format_logprobs(records: List[Dict[str, Any]], chat: bool) -> Dict[str, Any]:
    """OpenAI's ``logprobs`` of a choice: chat's ``content`` list (with mlx_lm.server's
    ``id`` too), or a completion's ``tokens``/``token_logprobs``/``top_logprobs``."""
    if chat:

        def entry(i, t, v):
            return {"id": i, "token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}

        return {
            "content": [
                {**entry(r["id"], r["token"], r["logprob"]),
                 "top_logprobs": [entry(*a) for a in r.get("top", [])]}
                for r in records
            ]  # fmt: skip
        }
    return {
        "tokens": [r["token"] for r in records],
        "token_logprobs": [r["logprob"] for r in records],
        "top_logprobs": [{t: v for _, t, v in r.get("top", [])} for r in records],
    }


def make_usage(prompt_tokens: int, cached: int, completion_tokens: int, spec) -> Dict[str, Any]:
    """OpenAI's ``usage``, with ``mlx_lm.server``'s cached-token count and ours.

    ``completion_tokens`` counts every token the model generated for the
    request, the last one (an EOS token too) included, as ``mlx_lm.server``
    does; text cut by a stop string still counts.
    """
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
        "speculative": spec.as_dict(),
    }


def total_usage(usages: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One ``usage`` for a request's choices: the prompt (and its cached part) once,
    the completion tokens and forward passes of every choice."""
    first, generated = usages[0], sum(u["completion_tokens"] for u in usages)
    passes = sum(u["speculative"]["forward_passes"] for u in usages)
    accepted = sum(u["speculative"]["accepted_draft_tokens"] for u in usages)
    batched = sum(u["speculative"]["batched_tokens"] for u in usages)
    return {
        **first,
        "completion_tokens": generated,
        "total_tokens": first["prompt_tokens"] + generated,
        "speculative": {
            "forward_passes": passes,
            "accepted_draft_tokens": accepted,
            "tokens_per_pass": round(generated / max(passes, 1), 4),
            "batched_tokens": batched,
        },
    }


def finish_reason(finish: Optional[str], parser: Optional[ResponseParser]) -> Optional[str]:
    """OpenAI's ``"tool_calls"`` for an answer that stopped after calling a tool."""
    if finish == "stop" and parser is not None and parser.made_tool_call:
        return "tool_calls"
    return finish


def add_reasoning_and_calls(message: Dict[str, Any], parts: Parts) -> None:
    """A message's (or delta's) ``reasoning`` and ``tool_calls``, as ``mlx_lm.server``
    names them, when there are any."""
    if parts.reasoning:
        message["reasoning"] = parts.reasoning
    if parts.tool_calls:
        message["tool_calls"] = parts.tool_calls

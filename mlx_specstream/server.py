"""An OpenAI-compatible HTTP server running Speculative Streaming.

``python -m mlx_specstream.server [--model DIR] [--host 127.0.0.1] [--port 8080]``

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` for server-sent events) and ``GET /v1/models``. Request
fields follow ``mlx_lm.server``: ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``stop``, ``seed``,
``logit_bias``, ``repetition_penalty``, ``repetition_context_size``, plus our
``speculative`` (bool) and ``acceptance``. Speculative decoding is batch-1:
requests are served one at a time, in arrival order, each with its own
cache. Bad requests get a 4xx JSON error that names the field at fault. The
server binds to localhost unless told otherwise.
"""

import argparse
import json
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from .decode import ACCEPTANCE
from .generate import stream_generate
from .sample_utils import make_sampler


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
    top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True)
    top_k = _number(body, "top_k", 0, lo=0, integer=True)
    min_p = _number(body, "min_p", 0.0, lo=0.0, hi=1.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", "seed")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise RequestError("'stop' must be a string or a list of non-empty strings", "stop")
    processors = []
    bias = body.get("logit_bias")
    penalty = body.get("repetition_penalty")
    if bias is not None:
        if not isinstance(bias, dict):
            raise RequestError("'logit_bias' must map token ids to numbers", "logit_bias")
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise RequestError("'logit_bias' must map token ids to numbers", "logit_bias")
    if penalty is not None:
        _number(body, "repetition_penalty", None, lo=0.0)
    if bias or penalty:
        processors = make_logits_processors(
            logit_bias=bias,
            repetition_penalty=penalty,
            repetition_context_size=_number(
                body, "repetition_context_size", 20, lo=1, integer=True
            ),
        )
    speculative = body.get("speculative", True)
    if not isinstance(speculative, bool):
        raise RequestError("'speculative' must be a boolean", "speculative")
    acceptance = body.get("acceptance")
    if acceptance is not None and acceptance not in ACCEPTANCE:
        raise RequestError(f"'acceptance' must be one of {list(ACCEPTANCE)}", "acceptance")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", "stream")
    return dict(
        max_tokens=max_tokens,
        sampler=make_sampler(
            temp=temp, top_p=top_p if top_p < 1 else 0.0, min_p=min_p, top_k=top_k
        ),
        logits_processors=processors or None,
        seed=seed,
        stop=stop,
        speculative=speculative,
        acceptance=acceptance,
        stream=stream,
    )


class ModelService:
    """One loaded model, used by one request at a time."""

    def __init__(self, model, tokenizer, model_id: str, defaults: argparse.Namespace):
        self.model, self.tokenizer, self.model_id, self.defaults = (
            model,
            tokenizer,
            model_id,
            defaults,
        )
        self.lock = threading.Lock()

    def prompt_tokens(self, body: Dict[str, Any], chat: bool) -> List[int]:
        tok = self.tokenizer
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("'messages' must be a non-empty list", "messages")
            for m in messages:
                if not (
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                ):
                    raise RequestError(
                        "'messages': each message needs a string 'role' and 'content'", "messages"
                    )
            if not tok.has_chat_template:
                raise RequestError(
                    "this model's tokenizer has no chat template; use /v1/completions", "messages"
                )
            return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            return tok.encode(prompt)
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            vocab = self.model.args.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise RequestError(
                    f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "prompt"
                )
            return prompt
        raise RequestError("'prompt' must be a non-empty string or list of token ids", "prompt")

    def generate(self, tokens: List[int], args: Dict[str, Any]):
        """Yields ``(text, finish_reason, usage)``; holds the model until done or closed."""
        with self.lock:
            if args["seed"] is not None:
                mx.random.seed(args["seed"])
            stops, text, emitted = args["stop"], "", 0
            gen = stream_generate(
                self.model,
                self.tokenizer,
                tokens,
                max_tokens=args["max_tokens"],
                sampler=args["sampler"],
                logits_processors=args["logits_processors"],
                speculative=args["speculative"],
                acceptance=args["acceptance"],
            )
            try:
                for r in gen:
                    text += r.text
                    finish = r.finish_reason
                    hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                    if hit >= 0:
                        text, finish = text[:hit], "stop"
                    # Hold back a possible start of a stop string.
                    hold = max((len(s) - 1 for s in stops), default=0) if finish is None else 0
                    ready = len(text) - hold
                    usage = {
                        "prompt_tokens": len(tokens),
                        "completion_tokens": r.generation_tokens,
                        "total_tokens": len(tokens) + r.generation_tokens,
                        "forward_passes": r.forward_passes,
                    }
                    if ready > emitted or finish is not None:
                        yield text[emitted : max(ready, emitted)], finish, usage
                        emitted = max(ready, emitted)
                    if finish is not None:
                        return
            finally:
                gen.close()


class Handler(BaseHTTPRequestHandler):
    service: ModelService = None
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet by default
        if self.service.defaults.verbose:
            super().log_message(fmt, *args)

    def _send_json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, message, param=None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(
            status, {"error": {"message": message, "type": kind, "param": param, "code": None}}
        )

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": self.service.model_id,
                            "object": "model",
                            "created": int(time.time()),
                            "owned_by": "mlx-specstream",
                        }
                    ],
                },
            )
        else:
            self._error(HTTPStatus.NOT_FOUND, f"unknown path {self.path}")

    def do_POST(self):
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
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
            tokens = self.service.prompt_tokens(body, chat)
            args = parse_generation_args(body, self.service.defaults)
        except RequestError as e:
            return self._error(e.status, str(e), e.param)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            if args["stream"]:
                self._stream(rid, chat, tokens, args)
            else:
                self._complete(rid, chat, tokens, args)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; the generation was closed and the model freed

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

    def _complete(self, rid, chat, tokens, args):
        text, finish, usage = "", None, None
        for piece, finish, usage in self.service.generate(tokens, args):
            text += piece
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._send_json(200, {**self._base(rid, chat), "choices": [choice], "usage": usage})

    def _stream(self, rid, chat, tokens, args):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(payload):
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        if chat:
            send(
                {
                    **self._base(rid, chat, True),
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                    ],
                }
            )
        for piece, finish, usage in self.service.generate(tokens, args):
            if chat:
                choice = {
                    "index": 0,
                    "delta": {"content": piece} if piece else {},
                    "finish_reason": finish,
                }
            else:
                choice = {"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}
            payload = {**self._base(rid, chat, chat), "choices": [choice]}
            if finish is not None:
                payload["usage"] = usage
            send(payload)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(model, tokenizer, model_id="default", host="127.0.0.1", port=8080, **defaults):
    """A ready ``ThreadingHTTPServer`` (call ``serve_forever``); ``port=0`` picks a free port.

    After ``shutdown()``, call :func:`wait_idle` before the process exits, so no
    request thread is still inside MLX.
    """
    options = argparse.Namespace(**{"max_tokens": 512, "temp": 0.0, "verbose": False, **defaults})
    handler = type(
        "BoundHandler", (Handler,), {"service": ModelService(model, tokenizer, model_id, options)}
    )
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def wait_idle(server, timeout: float = 60.0) -> bool:
    """Waits until no generation holds the model (True) or ``timeout`` passes (False)."""
    lock = server.RequestHandlerClass.service.lock
    if lock.acquire(timeout=timeout):
        lock.release()
        return True
    return False


def main(argv=None):
    from .utils import load

    p = argparse.ArgumentParser(description="OpenAI-compatible server for Speculative Streaming.")
    p.add_argument(
        "--model", default=None, help="Model directory or hub id (default: the embedded model)"
    )
    p.add_argument(
        "--drafter",
        default=None,
        help="Model directory whose drafter replaces the model's own (same base)",
    )
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-tokens", type=int, default=512, help="Default max_tokens of a request")
    p.add_argument("--temp", type=float, default=0.0, help="Default temperature of a request")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    model, tokenizer = load(args.model, drafter=args.drafter)
    server = make_server(
        model,
        tokenizer,
        args.model or "mlx-specstream-default",
        args.host,
        args.port,
        max_tokens=args.max_tokens,
        temp=args.temp,
        verbose=args.verbose,
    )
    print(f"[INFO] serving on http://{server.server_address[0]}:{server.server_address[1]}/v1")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        wait_idle(server)


if __name__ == "__main__":
    main()

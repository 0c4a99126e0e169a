"""The OpenAI-compatible server, driven by the official ``openai`` client on localhost:
completions and chat (with and without a chat template), the prompt cache
across turns, ``usage``, concurrency, bad and unsupported input, and a clean
process exit."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers import tiny_model, tiny_spec_model, word_tokenizer
from mlx_lm.server import convert_chat

import mlx_specstream.server as server_mod
from mlx_specstream.generate import generate, stream_generate
from mlx_specstream.cache import trim_prompt_cache
from mlx_specstream.config import DrafterConfig
from mlx_specstream.drafters import attach_drafter
from mlx_specstream.server import join_messages, make_server, service_of, wait_idle

openai = pytest.importorskip("openai")

V = 64
TEMPLATE = "{% for m in messages %}t1 {{ m['content'] }} {% endfor %}t2"


@pytest.fixture(scope="module")
def served():
    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2)
    tok = word_tokenizer(V, eos=V - 1, chat_template=TEMPLATE)
    server = make_server(model, tok, "tiny", port=0, max_tokens=16)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
    yield model, tok, client, url
    client.close()
    server.shutdown()
    assert wait_idle(server)
    server.server_close()


@pytest.fixture
def serve():
    """Starts servers with their own model and prompt cache; closes them after the test."""
    made = []

    def start(model, tok, **defaults):
        server = make_server(model, tok, "tiny", port=0, **{"max_tokens": 16, **defaults})
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        client = openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
        made.append((server, client))
        return client, url, server

    yield start
    for server, client in made:
        client.close()
        server.shutdown()
        server.server_close()


def reference(model, tok, prompt, n, **kwargs):
    return generate(model, tok, prompt, max_tokens=n, **kwargs)


def test_models(served):
    _, _, client, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="unknown model 'other'"):
        client.models.retrieve("other")


def test_health_is_ok_until_the_generation_thread_ends(serve):
    """``GET /health`` as mlx_lm.server's: 200 while requests can be served, 503
    once the generation thread has stopped (control: the same server after stop)."""
    _, url, server = serve(spec_model(), word_tokenizer(V))
    health = url.rsplit("/v1", 1)[0] + "/health"

    def get():
        try:
            with urllib.request.urlopen(health, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert get() == (200, {"status": "ok"})
    service_of(server).stop()
    assert get() == (503, {"status": "unavailable"})


def test_completion_and_streaming(served):
    model, tok, client, _ = served
    want = reference(model, tok, "t3 t4 t5", 20)
    r = client.completions.create(model="tiny", prompt="t3 t4 t5", max_tokens=20, temperature=0)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == 3
    chunks = list(
        client.completions.create(model="tiny", prompt="t3 t4 t5", max_tokens=20, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_and_streaming(served):
    model, tok, client, _ = served
    messages = [{"role": "user", "content": "t7 t8"}]
    want = reference(
        model, tok, tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True), 12
    )
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    # mlx_lm.server's other path for chat, without /v1.
    *_, url = served
    body = json.dumps({"messages": messages, "max_tokens": 12}).encode()
    status, payload = post(url.removesuffix("/v1") + "/chat/completions", body)
    assert status == 200 and payload["choices"][0]["message"]["content"] == want


def test_stop_strings(served):
    model, tok, client, _ = served
    full = reference(model, tok, "t3 t4 t5", 20)
    words = full.split()
    stop = " " + words[3]
    r = client.completions.create(model="tiny", prompt="t3 t4 t5", max_tokens=20, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(served):
    _, _, client, _ = served
    texts = [
        client.completions.create(model="tiny", prompt="t9", max_tokens=16, temperature=1.0, seed=3)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert texts[0] == texts[1]


def test_concurrent_requests_are_served_correctly(served):
    model, tok, client, _ = served
    prompts = [f"t{i} t{i + 1}" for i in range(3, 11)]
    want = {p: reference(model, tok, p, 12) for p in prompts}
    got, errors = {}, []

    def worker(p):
        try:
            got[p] = (
                client.completions.create(model="tiny", prompt=p, max_tokens=12).choices[0].text
            )
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)

    tic = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == want
    assert time.perf_counter() - tic < 120


def post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"max_tokens": 4}).encode(), "prompt"),
        (json.dumps({"prompt": "t1", "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"prompt": "t1", "temperature": -1}).encode(), "temperature"),
        (json.dumps({"prompt": "t1", "top_p": 2.0}).encode(), "top_p"),
        (json.dumps({"prompt": "t1", "stop": 5}).encode(), "stop"),
        (json.dumps({"prompt": [1, 99999]}).encode(), "prompt"),
        (json.dumps({"prompt": "t1", "acceptance": "typical"}).encode(), "acceptance"),
        (json.dumps({"prompt": "t1", "draft_schedule": "fast"}).encode(), "draft_schedule"),
        # (no --draft-model here: its chains' schedule has nothing to set)
        (json.dumps({"prompt": "t1", "draft_schedule": "heuristic"}).encode(), "draft_schedule"),
        (json.dumps({"prompt": "t1", "xtc_threshold": 0.7}).encode(), "xtc_threshold"),
        (json.dumps({"prompt": "t1", "presence_penalty": "x"}).encode(), "presence_penalty"),
        (
            json.dumps({"prompt": "t1", "frequency_context_size": 0}).encode(),
            "frequency_context_size",
        ),
    ],
)
def test_malformed_completion_requests(served, body, param):
    *_, url = served
    status, payload = post(url + "/completions", body)
    assert status == 400
    assert (
        payload["error"]["type"] == "invalid_request_error" and payload["error"]["param"] == param
    )


def test_malformed_chat_and_unknown_path(served):
    _, _, client, url = served
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user"}])
    status, payload = post(url + "/nothing", b"{}")
    assert status == 404 and "unknown path" in payload["error"]["message"]


def test_client_disconnect_mid_stream_leaves_the_server_working(served):
    model, tok, client, url = served
    _hang_up_mid_stream(url, "t3 t4")
    r = client.completions.create(model="tiny", prompt="t5 t6", max_tokens=10)
    assert r.choices[0].text == reference(model, tok, "t5 t6", 10)


def _hang_up_mid_stream(url, prompt):
    host, port = url.split("//")[1].split("/")[0].split(":")
    body = json.dumps({"prompt": prompt, "max_tokens": 200, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"data:" not in received:
            chunk = s.recv(4096)
            assert chunk, "the server closed the stream early"
            received += chunk


def test_16_concurrent_clients_some_hanging_up(served):
    """Load: 16 clients at once, 4 of them disconnecting mid-stream. Every
    other client gets exactly its own answer; the server keeps serving."""
    model, tok, client, url = served
    jobs = []
    for i in range(16):
        prompt = f"t{3 + i} t{20 + i}"
        kind = ("complete", "stream", "chat", "hang-up")[i % 4]
        jobs.append((kind, prompt))
    want = {}
    for kind, prompt in jobs:
        if kind == "chat":
            messages = [{"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            want[prompt] = reference(model, tok, ids, 14)
        elif kind != "hang-up":
            want[prompt] = reference(model, tok, prompt, 14)
    got, errors = {}, []

    def worker(kind, prompt):
        try:
            if kind == "complete":
                r = client.completions.create(model="tiny", prompt=prompt, max_tokens=14)
                got[prompt] = r.choices[0].text
            elif kind == "stream":
                chunks = client.completions.create(
                    model="tiny", prompt=prompt, max_tokens=14, stream=True
                )
                got[prompt] = "".join(c.choices[0].text for c in chunks)
            elif kind == "chat":
                messages = [{"role": "user", "content": prompt}]
                r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=14)
                got[prompt] = r.choices[0].message.content
            else:
                _hang_up_mid_stream(url, prompt)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append((kind, prompt, e))

    tic = time.perf_counter()
    threads = [threading.Thread(target=worker, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a client never got its answer"
    assert not errors, errors
    assert got == want
    assert time.perf_counter() - tic < 180
    r = client.completions.create(model="tiny", prompt="t5 t6", max_tokens=10)
    assert r.choices[0].text == reference(model, tok, "t5 t6", 10)


# ---- chat on a model without a chat template -------------------------------------------


def spec_model():
    return tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2)


def chat_prompt(tok, messages, role_mapping=None):
    """The tokens mlx_lm.server feeds for ``messages`` without a chat template."""
    return tok.encode(convert_chat(messages, role_mapping))


@pytest.mark.parametrize(
    "messages, mapping",
    [
        ([{"role": "user", "content": "hi"}], None),
        (
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "t3 t4"},
                {"role": "assistant", "content": "t5 "},
                {"role": "user", "content": "t6\n"},
                {"role": "critic", "content": "t7"},
            ],
            None,
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            {"user": "<u>", "assistant": "<a>", "stop": " | "},
        ),
        ([{"role": "user", "content": "a"}], {"user": "U: "}),
    ],
)
def test_messages_are_joined_as_mlx_lm_server_joins_them(messages, mapping):
    assert join_messages(messages, mapping) == convert_chat(messages, mapping)


def test_chat_without_a_template(serve):
    """The default model has no chat template: chat still works, with the
    prompt mlx_lm.server would build. Negative control: the contents joined
    without the roles' layout give another answer."""
    model, tok = spec_model(), word_tokenizer(V)
    assert not tok.has_chat_template
    client, _, _ = serve(model, tok)
    messages = [
        {"role": "system", "content": "t9 t10"},
        {"role": "user", "content": "t3 t4 t5"},
    ]
    want = reference(model, tok, chat_prompt(tok, messages), 12)
    assert want != reference(model, tok, tok.encode("t9 t10 t3 t4 t5"), 12)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(chat_prompt(tok, messages))
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    # Content as text parts, and mlx_lm.server's role_mapping field.
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
             for m in messages]  # fmt: skip
    mapping = {"user": "t11 ", "system": "t12 ", "assistant": "t13", "stop": " "}
    r = client.chat.completions.create(
        model="tiny", messages=parts, max_tokens=12, extra_body={"role_mapping": mapping}
    )
    assert r.choices[0].message.content == reference(
        model, tok, chat_prompt(tok, messages, mapping), 12
    )


# ---- the prompt cache across turns -------------------------------------------------------


class Probe:
    """Counts the prompt tokens each request feeds through the model, and
    records the cache each request starts from.

    A request runs ``rt.prefill`` over its prompt but the last token, which
    the first decode pass feeds: fed = sum(prefill chunks) + 1. (The plain pass
    over its last generated token, once it has yielded it, is not counted.)
    """

    def __init__(self, model, monkeypatch):
        self.requests = []
        rt = model.speculative_streams
        prefill, real = rt.prefill, server_mod.stream_generate

        def counting_prefill(tokens, cache, keep_hidden=False):
            if threading.current_thread().name == "mlx-specstream-generation":  # the server's
                if not self.requests[-1]["decoding"]:
                    self.requests[-1]["prefilled"] += tokens.size
            return prefill(tokens, cache, keep_hidden)

        def recording(model, tokenizer, prompt, **kwargs):
            cache = kwargs["prompt_cache"]
            request = {"passed": list(prompt), "offset": cache[0].offset, "cache": cache,
                       "prefilled": 0, "decoding": False}  # fmt: skip
            self.requests.append(request)
            gen = real(model, tokenizer, prompt, **kwargs)
            try:
                for response in gen:
                    request["decoding"] = True
                    yield response
            finally:
                gen.close()  # (here, on the generation thread)

        monkeypatch.setattr(rt, "prefill", counting_prefill)
        monkeypatch.setattr(server_mod, "stream_generate", recording)

    def fed(self, i=-1):
        return self.requests[i]["prefilled"] + 1


def reference_tokens(model, tok, prompt, n, **kwargs):
    """A cold request's responses (counted by the test, not reported by the server)."""
    return list(stream_generate(model, tok, prompt, max_tokens=n, **kwargs))


def turn(messages, text, user):
    return messages + [{"role": "assistant", "content": text}, {"role": "user", "content": user}]


def test_follow_up_turns_prefill_only_their_new_tokens(serve, monkeypatch):
    """Turn 2 of a chat reuses turn 1's KV cache: the tokens fed through the
    model are only the new ones (counted at the model's prefill and checked
    against the cache offsets), and the answer equals a cold request's. A
    streamed turn 3 does the same. Negative control: a server whose cache
    is trimmed one token too far answers turn 2 differently."""
    model, tok = spec_model(), word_tokenizer(V)
    probe = Probe(model, monkeypatch)
    client, _, server = serve(model, tok)
    m1 = [{"role": "user", "content": "t3 t4 t5 t6"}]
    p1 = chat_prompt(tok, m1)
    g1 = [r.token for r in reference_tokens(model, tok, p1, 12)]

    r1 = client.chat.completions.create(model="tiny", messages=m1, max_tokens=12)
    text1 = r1.choices[0].message.content
    assert text1 == tok.decode(g1)
    assert probe.fed() == len(p1) and probe.requests[-1]["offset"] == 0
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    # The cache kept for turn 1 holds its prompt and every generated token (as mlx-lm's).
    assert probe.requests[-1]["cache"][0].offset == len(p1) + len(g1)
    assert service_of(server).prompt_cache.keys() == [p1 + g1]

    m2 = turn(m1, text1, "t20 t21 t22")
    p2 = chat_prompt(tok, m2)
    assert p2[: len(p1) + len(g1)] == p1 + g1  # the answer re-tokenizes to itself
    cold2 = reference(model, tok, p2, 12)
    r2 = client.chat.completions.create(model="tiny", messages=m2, max_tokens=12)
    assert r2.choices[0].message.content == cold2
    cached = len(p1) + len(g1)
    new = len(p2) - cached  # the new turn only
    assert new < len(p2) // 2
    assert probe.requests[-1]["offset"] == cached and len(probe.requests[-1]["passed"]) == new
    assert probe.fed() == new
    assert r2.usage.prompt_tokens == len(p2)
    assert r2.usage.prompt_tokens_details.cached_tokens == cached

    m3 = turn(m2, cold2, "t30")
    p3 = chat_prompt(tok, m3)
    stream = client.chat.completions.create(
        model="tiny", messages=m3, max_tokens=10, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference(
        model, tok, p3, 10
    )
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.prompt_tokens == len(p3)
    assert usage.prompt_tokens_details.cached_tokens == probe.requests[-1]["offset"] > cached
    assert probe.fed() == len(p3) - usage.prompt_tokens_details.cached_tokens

    # The same conversation on a server without a prompt cache prefills everything.
    cold_client, _, _ = serve(model, tok, prompt_cache_size=0)
    r = cold_client.chat.completions.create(model="tiny", messages=m2, max_tokens=12)
    assert r.choices[0].message.content == cold2
    assert probe.fed() == len(p2) and r.usage.prompt_tokens_details.cached_tokens == 0

    # Negative control: a cache trimmed one token too far gives another answer.
    bad_client, _, bad_server = serve(model, tok)
    lru = service_of(bad_server).prompt_cache
    fetch = lru.fetch

    def trimmed_too_far(tokens, min_new=1):
        cache, n = fetch(tokens, min_new)
        if cache is not None:
            trim_prompt_cache(cache, 1)
        return cache, n

    monkeypatch.setattr(lru, "fetch", trimmed_too_far)
    bad_client.chat.completions.create(model="tiny", messages=m1, max_tokens=12)
    r = bad_client.chat.completions.create(model="tiny", messages=m2, max_tokens=12)
    assert r.choices[0].message.content != cold2


def test_pipelined_steps_keep_the_prompt_cache_exact(serve, monkeypatch):
    """As on a GPU, where steps are pipelined by default: every turn of a chat,
    the follow-ups reusing the cache, equals a cold unpipelined request."""
    import mlx_specstream.decode as decode_module

    model, tok = spec_model(), word_tokenizer(V)
    m1 = [{"role": "user", "content": "t3 t4 t5 t6"}]
    cold1 = reference(model, tok, chat_prompt(tok, m1), 12)
    m2 = turn(m1, cold1, "t20 t21 t22")
    cold2 = reference(model, tok, chat_prompt(tok, m2), 12)
    m3 = turn(m2, cold2, "t30")
    cold3 = reference(model, tok, chat_prompt(tok, m3), 12)
    folds = []
    real_fold = decode_module.Fold
    monkeypatch.setattr(decode_module, "on_gpu", lambda: True)
    monkeypatch.setattr(decode_module, "Fold", lambda *a: folds.append(a) or real_fold(*a))
    client, _, _ = serve(model, tok)
    for messages, cold in ((m1, cold1), (m2, cold2), (m3, cold3)):
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
        assert r.choices[0].message.content == cold
    assert r.usage.prompt_tokens_details.cached_tokens > 0 and folds


def test_a_draft_model_drafts_every_request_and_its_cache_follows(serve):
    """``--draft-model``: a follow-up turn reuses the cache of both models and
    answers as a cold request; with the base's weights every draft is accepted
    (the draft model's cache follows the conversation). A request naming another
    draft source than prompt lookup (merged into its drafts) gets a 400."""

    model, same = tiny_model("llama", vocab_size=V), tiny_model("llama", vocab_size=V)
    tok = word_tokenizer(V)
    client, url, server = serve(model, tok, draft_model=same)
    m1 = [{"role": "user", "content": "t8 t9 t10"}]
    r1 = client.chat.completions.create(model="tiny", messages=m1, max_tokens=10)
    assert r1.choices[0].message.content == reference(model, tok, chat_prompt(tok, m1), 10)
    m2 = turn(m1, r1.choices[0].message.content, "t40 t41")
    r2 = client.chat.completions.create(model="tiny", messages=m2, max_tokens=12)
    assert r2.choices[0].message.content == reference(model, tok, chat_prompt(tok, m2), 12)
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(chat_prompt(tok, m1))
    (cache,) = [e.cache for e in service_of(server).prompt_cache._entries.values()]
    assert len(cache) == len(model.layers) + len(same.layers)
    assert cache[0].offset == cache[-1].offset
    # Every draft accepted: the 12 tokens took ceil(12 / 4) passes (3 drafts each).
    assert r2.usage.speculative["forward_passes"] == 3
    r3 = client.completions.create(
        model="tiny", prompt="t3 t4 t5 t3 t4", max_tokens=12, extra_body={"draft": "ngram"}
    )
    assert r3.choices[0].text == reference(model, tok, "t3 t4 t5 t3 t4", 12, speculative=False)
    status, payload = post(
        url + "/completions", json.dumps({"prompt": "t1", "draft": "streams+ngram"}).encode()
    )
    assert status == 400 and payload["error"]["param"] == "draft"


@pytest.mark.parametrize("kind", ["medusa", "parallelspec"])
def test_prompt_cache_with_attached_drafters(serve, kind):
    """With a Medusa or ParallelSpec drafter, a follow-up turn reuses the
    cache (and ParallelSpec its own state) and answers as a cold request."""
    model = tiny_model("llama", vocab_size=V)
    attach_drafter(model, DrafterConfig(kind=kind, num_draft_tokens=3, top_k=2), seed=0)
    tok = word_tokenizer(V)
    client, url, server = serve(model, tok)
    m1 = [{"role": "user", "content": "t8 t9 t10"}]
    r1 = client.chat.completions.create(model="tiny", messages=m1, max_tokens=10)
    m2 = turn(m1, r1.choices[0].message.content, "t40 t41")
    cold2 = reference(model, tok, chat_prompt(tok, m2), 12)
    assert cold2 != reference(model, tok, chat_prompt(tok, m2)[1:], 12)  # negative control
    r2 = client.chat.completions.create(model="tiny", messages=m2, max_tokens=12)
    assert r2.choices[0].message.content == cold2
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(chat_prompt(tok, m1))
    if kind == "parallelspec":
        (cache,) = [e.cache for e in service_of(server).prompt_cache._entries.values()]
        # Its last token's state waits to be paired with the next prompt's first token.
        assert cache.drafter_state.cache.offset == cache[0].offset - 1
        assert cache.drafter_state.pending_hidden is not None
    # Prompt lookup merged into the drafter's tree: the model's own text.
    r3 = client.completions.create(
        model="tiny", prompt="t3 t4 t5 t3 t4", max_tokens=12, extra_body={"draft": "streams+ngram"}
    )
    assert r3.choices[0].text == reference(model, tok, "t3 t4 t5 t3 t4", 12, speculative=False)


# ---- usage --------------------------------------------------------------------------------


def test_usage_matches_counted_tokens(serve):
    """``usage`` against a cold run counted here: prompt, completion and total
    tokens, forward passes, accepted draft tokens, tokens per pass, in plain,
    streamed and stop-string responses. Control: without speculation every
    token takes one pass and none comes from a draft."""
    model, tok = spec_model(), word_tokenizer(V)
    client, _, _ = serve(model, tok, prompt_cache_size=0)
    prompt = "t3 t4 t5"
    ids = tok.encode(prompt)
    ref = reference_tokens(model, tok, ids, 24)
    passes, accepted = ref[-1].forward_passes, sum(r.from_draft for r in ref)
    assert accepted > 0 and passes < len(ref)  # speculation did something here

    def check(usage, completion, passes, accepted):
        assert usage.prompt_tokens == len(ids)
        assert usage.completion_tokens == completion
        assert usage.total_tokens == len(ids) + completion
        assert usage.speculative == {
            "forward_passes": passes,
            "accepted_draft_tokens": accepted,
            "tokens_per_pass": round(completion / passes, 4),
            "batched_tokens": 0,  # (one request at a time: none from a batch)
        }

    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24)
    check(r.usage, len(ref), passes, accepted)
    chunks = list(
        client.completions.create(
            model="tiny", prompt=prompt, max_tokens=24, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-2].choices[0].finish_reason == "length"
    check(chunks[-2].usage, len(ref), passes, accepted)
    check(chunks[-1].usage, len(ref), passes, accepted)

    # A stop string ends the generation at the token that completes it.
    stop = ref[6].text
    n_stop = next(i + 1 for i in range(len(ref)) if stop in "".join(r.text for r in ref[: i + 1]))
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == n_stop
    assert r.usage.speculative["forward_passes"] == ref[n_stop - 1].forward_passes

    plain = reference_tokens(model, tok, ids, 24, speculative=False)
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=24, extra_body={"speculative": False}
    )
    check(r.usage, len(plain), len(plain), 0)
    assert r.choices[0].text == "".join(p.text for p in ref)  # lossless


def test_draft_field(serve):
    model, tok = spec_model(), word_tokenizer(V)
    client, url, _ = serve(model, tok)
    want = reference(model, tok, "t3 t4 t5 t3 t4", 16)
    assert want == reference(model, tok, "t3 t4 t5 t3 t4", 16, draft="ngram")
    for draft in ("ngram", "streams+ngram"):
        r = client.completions.create(
            model="tiny", prompt="t3 t4 t5 t3 t4", max_tokens=16, extra_body={"draft": draft}
        )
        assert r.choices[0].text == want
    status, payload = post(
        url + "/completions", json.dumps({"prompt": "t1", "draft": "x"}).encode()
    )
    assert status == 400 and payload["error"]["param"] == "draft"


@pytest.mark.parametrize(
    "field, asked, default, prompt",
    [
        ("num_draft_tokens", (1, 10), 3, "t3 t4 t5 t6 t3 t4 t5 t6 t3"),
        ("ngram_candidates", (3,), 2, "t3 t4 t5 t6 t3 t4 t7 t6 t3 t4"),
    ],
)
def test_prompt_lookup_fields(serve, monkeypatch, field, asked, default, prompt):
    """A request's ``num_draft_tokens`` or ``ngram_candidates`` (or the server's
    default) reaches the decoder with prompt lookup; the text stays the plain one; a
    bad value is refused, naming the field."""
    model, tok = spec_model(), word_tokenizer(V)
    want = reference(model, tok, prompt, 16)
    seen, real = [], server_mod.stream_generate

    def recording(*args, **kwargs):
        seen.append(kwargs.get(field))
        return real(*args, **kwargs)

    monkeypatch.setattr(server_mod, "stream_generate", recording)
    client, url, _ = serve(model, tok)
    for n in asked:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                      extra_body={"draft": "ngram", field: n})  # fmt: skip
        assert r.choices[0].text == want and seen[-1] == n
    client.completions.create(model="tiny", prompt=prompt, max_tokens=16)
    assert seen[-1] is None  # (not set: the decoder's default)
    client, url, _ = serve(model, tok, draft="ngram", **{field: default})
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16)
    assert r.choices[0].text == want and seen[-1] == default
    status, payload = post(url + "/completions", json.dumps({"prompt": "t1", field: 0}).encode())
    assert status == 400 and payload["error"]["param"] == field


# ---- concurrency with a bounded cache -----------------------------------------------------


def test_concurrent_conversations_with_a_bounded_cache(serve):
    """Eight two-turn conversations at once (plain, streamed, chat), on a cache
    bounded to 3 entries and to about two entries' bytes: every answer is
    the cold one, and the bounds hold."""
    model, tok = spec_model(), word_tokenizer(V)
    limit = 600_000  # a tiny cache takes 256 rows per layer: 262,144 bytes here
    client, _, server = serve(model, tok, prompt_cache_size=3, prompt_cache_bytes=limit)
    convs = {}
    for i in range(8):
        m1 = [{"role": "user", "content": f"t{3 + i} t{30 + i} t{12 + i}"}]
        a1 = reference(model, tok, chat_prompt(tok, m1), 10)
        m2 = turn(m1, a1, f"t{40 + i}")
        convs[i] = (m1, a1, m2, reference(model, tok, chat_prompt(tok, m2), 10))
    got, errors = {}, []

    def talk(i):
        m1, _, _, _ = convs[i]
        try:
            if i % 2:
                stream = client.chat.completions.create(
                    model="tiny", messages=m1, max_tokens=10, stream=True
                )
                a1 = "".join(c.choices[0].delta.content or "" for c in stream)
            else:
                a1 = client.chat.completions.create(model="tiny", messages=m1, max_tokens=10)
                a1 = a1.choices[0].message.content
            r = client.chat.completions.create(
                model="tiny", messages=turn(m1, a1, f"t{40 + i}"), max_tokens=10
            )
            got[i] = (a1, r.choices[0].message.content)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append((i, e))

    threads = [threading.Thread(target=talk, args=(i,)) for i in convs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert got == {i: (a1, a2) for i, (_, a1, _, a2) in convs.items()}
    lru = service_of(server).prompt_cache
    assert 1 <= len(lru) <= 3 and lru.nbytes <= limit


# ---- unsupported fields, bad input -------------------------------------------------------


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        ("completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"functions": [{"name": "f"}]}, "functions"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"n": 17}, "n"),
        ("completions", {"echo": True}, "echo"),
        ("completions", {"suffix": "t1"}, "suffix"),
        ("completions", {"best_of": 2}, "best_of"),
        ("completions", {"logprobs": -1}, "logprobs"),
        ("completions", {"stream_options": {"include_usage": "yes"}}, "stream_options"),
        ("chat", {"messages": [{"role": "function", "content": "1"}]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ("chat", {"role_mapping": {"user": 3}}, "role_mapping"),
        ("chat", {"chat_template_kwargs": "yes"}, "chat_template_kwargs"),
        ("chat", {"adapters": "other"}, "adapters"),
        ("completions", {"draft_model": "other"}, "draft_model"),
    ],
)
def test_unsupported_fields_are_refused_by_name(served, path, extra, param):
    *_, url = served
    body = (
        {"prompt": "t1"}
        if path == "completions"
        else {"messages": [{"role": "user", "content": "t1"}]}
    )
    status, payload = post(
        f"{url}/{path.replace('chat', 'chat/completions')}", json.dumps({**body, **extra}).encode()
    )
    assert status == 400 and payload["error"]["param"] == param
    assert param in payload["error"]["message"]


def test_unsupported_fields_through_the_client_and_their_neutral_values(served):
    model, tok, client, _ = served
    messages = [{"role": "user", "content": "t7 t8"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(openai.BadRequestError, match="no tool-call format") as e:
        client.chat.completions.create(model="tiny", messages=messages, tools=tools)
    assert e.value.body["param"] == "tools"
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, n=1, response_format={"type": "text"},
        tool_choice="auto", parallel_tool_calls=True,
    )  # fmt: skip
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert r.choices[0].message.content == reference(model, tok, ids, 12)


def test_prompt_longer_than_the_context_is_refused(serve):
    model = tiny_spec_model(
        "llama", vocab_size=V, num_streams=3, top_k=2, model_args={"max_position_embeddings": 16}
    )
    client, url, _ = serve(model, word_tokenizer(V))
    status, payload = post(
        url + "/completions", json.dumps({"prompt": list(range(3, 20))}).encode()
    )
    assert status == 400 and payload["error"]["param"] == "prompt"
    assert "17 tokens, more than the model's context of 16" in payload["error"]["message"]


# ---- process hygiene ----------------------------------------------------------------------


def test_the_process_exits_cleanly_after_serving(tmp_path):
    """A server process that served requests over keep-alive connections and
    exits without closing anything ends with status 0: no handler thread runs
    MLX, and the generation thread clears its MLX compile cache and ends
    before the interpreter finalizes (see ModelService). Before, the handler
    thread of the open connection ended during finalization and aborted."""
    script = tmp_path / "serve_and_exit.py"
    script.write_text(textwrap.dedent(f"""
            import sys, threading
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import openai
            from helpers import tiny_spec_model, word_tokenizer
            from mlx_specstream.server import make_server
            server = make_server(tiny_spec_model("llama", vocab_size=64, num_streams=3, top_k=2),
                                 word_tokenizer(64), "tiny", port=0, max_tokens=8)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{{server.server_address[1]}}/v1",
                                   api_key="x", max_retries=0)
            for content in ("t3 t4", "t5"):
                client.chat.completions.create(
                    model="tiny", messages=[{{"role": "user", "content": content}}], max_tokens=8)
            print("served", flush=True)
            """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "served" in out.stdout and "terminate called" not in out.stderr


def test_seeded_sampling_follow_up_equals_a_cold_request(serve):
    """Sampling (rejection over stream drafts) with a seed: a follow-up that
    reuses the cache draws the same text as a server without a cache.
    Negative control: another seed draws another text."""
    model, tok = spec_model(), word_tokenizer(V)
    warm, _, _ = serve(model, tok)
    cold, _, _ = serve(model, tok, prompt_cache_size=0)
    m1 = [{"role": "user", "content": "t3 t4 t5 t6"}]
    r1 = warm.chat.completions.create(
        model="tiny", messages=m1, max_tokens=12, temperature=1.0, seed=5
    )
    m2 = turn(m1, r1.choices[0].message.content, "t20 t21")

    def ask(client, seed):
        r = client.chat.completions.create(
            model="tiny", messages=m2, max_tokens=16, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    (text, cached), (cold_text, _) = ask(warm, 7), ask(cold, 7)
    assert cached > 0 and text == cold_text
    assert ask(cold, 8)[0] != cold_text


@pytest.mark.parametrize("kind, value", [("repetition", 4.0), ("presence", 3.0),
                                         ("frequency", 3.0)])  # fmt: skip
def test_penalty_follow_up_sees_the_same_history(serve, monkeypatch, kind, value):
    """A penalty reads the last ``*_context_size`` tokens: a follow-up reusing the
    cache still feeds that many, so it answers as a server without a cache.
    Negative control: feeding only the new tokens (the penalty then sees a
    shorter history) answers differently."""
    model, tok = spec_model(), word_tokenizer(V)
    body = {f"{kind}_penalty": value, f"{kind}_context_size": 12}
    m1 = [{"role": "user", "content": "t10 t33 t46 t50 t53"}]
    cold, _, _ = serve(model, tok, prompt_cache_size=0)
    a1 = cold.chat.completions.create(model="tiny", messages=m1, max_tokens=12, extra_body=body)
    m2 = turn(m1, a1.choices[0].message.content, "t20")
    want = cold.chat.completions.create(model="tiny", messages=m2, max_tokens=16, extra_body=body)
    want = want.choices[0].message.content

    def follow_up():
        warm, _, _ = serve(model, tok)
        warm.chat.completions.create(model="tiny", messages=m1, max_tokens=12, extra_body=body)
        r = warm.chat.completions.create(model="tiny", messages=m2, max_tokens=16, extra_body=body)
        return r.choices[0].message.content, r.usage

    text, usage = follow_up()
    cached = usage.prompt_tokens_details.cached_tokens
    assert text == want and cached > 0 and usage.prompt_tokens - cached == 12

    parse = server_mod.parse_generation_args
    monkeypatch.setattr(
        server_mod, "parse_generation_args", lambda b, d: {**parse(b, d), "min_fed": 1}
    )
    text, usage = follow_up()
    assert usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens < 12
    assert text != want


def test_penalties_and_xtc_are_mlx_lm_s(served):
    """Presence and frequency penalties are mlx-lm's logits processors (greedy:
    equal to ``generate`` with them; negative control: without them the text
    differs); XTC requests sample, seeded, as ``generate`` with the same sampler."""
    from mlx_lm.sample_utils import make_logits_processors

    from mlx_specstream.sample_utils import make_sampler

    model, tok, client, _ = served
    prompt = "t5 t9 t5 t9 t12"
    body = {"presence_penalty": 2.0, "frequency_penalty": 1.5, "frequency_context_size": 8}
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, extra_body=body)
    procs = make_logits_processors(
        presence_penalty=2.0, frequency_penalty=1.5, frequency_context_size=8
    )
    want = reference(model, tok, prompt, 16, logits_processors=procs)
    assert r.choices[0].text == want and want != reference(model, tok, prompt, 16)
    xtc = {"xtc_probability": 0.5, "xtc_threshold": 0.05, "seed": 3}
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=16, temperature=1.0, extra_body=xtc
    )
    import mlx.core as mx

    mx.random.seed(3)
    special = tok.encode("\n") + list(tok.eos_token_ids)
    sampler = make_sampler(1.0, xtc_probability=0.5, xtc_threshold=0.05,
                           xtc_special_tokens=special)  # fmt: skip
    assert r.choices[0].text == reference(model, tok, prompt, 16, sampler=sampler)


def test_chat_template_args_and_request_kwargs(serve):
    """``--chat-template-args`` reach every chat template; a request's
    ``chat_template_kwargs`` override them, as in mlx_lm.server."""
    template = "{% if loud %}t9 {% endif %}{% for m in messages %}{{ m['content'] }} {% endfor %}t2"
    model, tok = spec_model(), word_tokenizer(V, chat_template=template)
    _, _, server = serve(model, tok, chat_template_args={"loud": True})
    service = service_of(server)
    body = {"messages": [{"role": "user", "content": "t4"}]}
    assert service.prompt_tokens(body, chat=True) == tok.encode("t9 t4 t2")
    quiet = {**body, "chat_template_kwargs": {"loud": False}}
    assert service.prompt_tokens(quiet, chat=True) == tok.encode("t4 t2")


def test_kv_bits_server_equals_generate_from_the_same_caches(serve):
    """``--kv-bits``: a cold answer equals ``generate`` with the same quantized KV
    cache, and a follow-up equals ``generate`` continuing turn 1's cache trimmed
    to the shared prefix. (Not a cold request's answer: from its start on, a
    quantized cache holds what the first pass over it computed in full
    precision, so a cached prefix and a fresh one differ, in mlx-lm as here.)"""
    from mlx_specstream.cache import make_prompt_cache
    from mlx_specstream.prompt_cache import common_prefix

    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2,
                            model_args=dict(num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    tok = word_tokenizer(V, eos=V + 5)  # (head_dim 32: one group of 32; no EOS)
    kv = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=0)
    warm, _, _ = serve(model, tok, **kv)
    m1 = [{"role": "user", "content": "t10 t33 t46 t50 t53"}]
    a1 = warm.chat.completions.create(model="tiny", messages=m1, max_tokens=12)
    ids1 = tok.encode(convert_chat(m1, None))
    cache = make_prompt_cache(model)
    got = [r.token for r in stream_generate(model, tok, ids1, max_tokens=12, prompt_cache=cache,
                                            **kv)]  # fmt: skip
    assert a1.choices[0].message.content == tok.decode(got)
    assert tok.decode(got) != reference(model, tok, ids1, 12)  # the quantization matters
    m2 = turn(m1, a1.choices[0].message.content, "t20")
    r2 = warm.chat.completions.create(model="tiny", messages=m2, max_tokens=16)
    ids2 = tok.encode(convert_chat(m2, None))
    shared = min(common_prefix(ids1 + got, ids2), len(ids2) - 1)
    assert r2.usage.prompt_tokens_details.cached_tokens == shared > 0
    trim_prompt_cache(cache, cache[0].offset - shared)
    want = reference(model, tok, ids2[shared:], 16, prompt_cache=cache, **kv)
    assert r2.choices[0].message.content == want


def test_cors_headers_and_preflight(serve):
    model, tok = spec_model(), word_tokenizer(V)

    def request(url, method, origin):
        req = urllib.request.Request(url, method=method, headers={"Origin": origin})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("Access-Control-Allow-Origin")

    _, url, _ = serve(model, tok)
    assert request(url + "/models", "GET", "http://a") == (200, "*")
    assert request(url + "/chat/completions", "OPTIONS", "http://a") == (204, "*")
    _, url, _ = serve(model, tok, allowed_origins=["http://a"])
    assert request(url + "/models", "GET", "http://a") == (200, "http://a")
    assert request(url + "/models", "GET", "http://b") == (200, None)


def test_cli_flags_reach_the_loader_and_the_server(monkeypatch):
    seen = {}

    def fake_load(path, **kw):
        seen["load"] = kw
        return spec_model(), word_tokenizer(V)

    class Stop(Exception):
        pass

    def fake_make_server(model, tok, model_id, host, port, **defaults):
        seen["server"] = defaults
        raise Stop

    monkeypatch.setattr("mlx_specstream.utils.load", fake_load)
    monkeypatch.setattr(server_mod, "make_server", fake_make_server)
    with pytest.raises(Stop):
        server_mod.main(
            ["--adapter-path", "ad", "--trust-remote-code", "--chat-template", "{{ x }}",
             "--chat-template-args", '{"loud": true}', "--top-p", "0.9", "--top-k", "5",
             "--min-p", "0.1", "--kv-bits", "4", "--kv-group-size", "32",
             "--quantized-kv-start", "100", "--prefill-step-size", "256",
             "--allowed-origins", "http://a,http://b"]
        )  # fmt: skip
    assert seen["load"]["adapter_path"] == "ad"
    assert seen["load"]["tokenizer_config"] == {
        "trust_remote_code": True,
        "chat_template": "{{ x }}",
    }
    d = seen["server"]
    assert (d["top_p"], d["top_k"], d["min_p"]) == (0.9, 5, 0.1)
    assert (d["kv_bits"], d["kv_group_size"], d["quantized_kv_start"]) == (4, 32, 100)
    assert d["prefill_step_size"] == 256 and d["chat_template_args"] == {"loud": True}
    assert d["allowed_origins"] == ["http://a", "http://b"]
    assert d["draft_model"] is None

    draft = spec_model()
    monkeypatch.setattr("mlx_lm.load", lambda path, **kw: (draft, word_tokenizer(V)))
    with pytest.raises(Stop):
        server_mod.main(["--draft-model", "small", "--num-draft-tokens", "4"])
    assert seen["server"]["draft_model"] is draft and seen["server"]["num_draft_tokens"] == 4
    with pytest.raises(SystemExit):  # the streams are off with a draft model
        server_mod.main(["--draft-model", "small", "--draft", "streams+ngram"])
    with pytest.raises(Stop):  # its drafts and prompt lookup, merged
        server_mod.main(["--draft-model", "small", "--draft", "ngram"])
    assert seen["server"]["draft"] == "ngram"


def test_logprobs_are_the_models_as_mlx_lm_yields_them(served):
    """Chat (``logprobs``/``top_logprobs``, OpenAI's ``content`` list) and completions
    (``logprobs: n``, the legacy lists) return each token's log-probability and the
    top alternatives: those mlx-lm's own loop yields for the same tokens."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step

    model, tok, client, _ = served
    messages = [{"role": "user", "content": "t7 t8 t9"}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, logprobs=True, top_logprobs=3
    )
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    steps = list(generate_step(mx.array(ids), model, max_tokens=12))
    content = r.choices[0].logprobs.content
    assert [c.model_extra["id"] for c in content] == [t for t, _ in steps][: len(content)]
    for c, (t, lp) in zip(content, steps):
        lp = np.array(lp)
        assert c.token == tok.decode([t]) and np.isclose(c.logprob, lp[t], atol=1e-5)
        want_top = np.argsort(-lp, kind="stable")[:3]
        assert [a.model_extra["id"] for a in c.top_logprobs] == want_top.tolist()
        assert np.allclose([a.logprob for a in c.top_logprobs], lp[want_top], atol=1e-5)
    assert len({c.logprob for c in content}) > 1  # (not one value for every token)
    r = client.completions.create(model="tiny", prompt="t3 t4", max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(
        len(a) <= 2 and max(a.values()) >= v for a, v in zip(lp.top_logprobs, lp.token_logprobs)
    )
    r = client.completions.create(model="tiny", prompt="t3 t4", max_tokens=6)
    assert r.choices[0].logprobs is None  # (not asked)


def test_streamed_logprobs_are_the_whole_responses(served):
    """Streamed, each chunk carries the log-probabilities of the tokens generated
    since the last one: together, those of the whole (non-streamed) response."""
    _, _, client, _ = served
    messages = [{"role": "user", "content": "t7 t8 t9"}]
    ask = dict(model="tiny", messages=messages, max_tokens=12, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**ask).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]  # fmt: skip
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in whole]
    assert len(whole) == 12 and sum(1 for ch in chunks if ch.choices) > 2
    ask = dict(model="tiny", prompt="t3 t4", max_tokens=6, logprobs=1)
    whole = client.completions.create(**ask).choices[0].logprobs.token_logprobs
    chunks = client.completions.create(**ask, stream=True)
    assert [v for ch in chunks if ch.choices and ch.choices[0].logprobs
            for v in ch.choices[0].logprobs.token_logprobs] == whole  # fmt: skip


def test_n_choices_one_after_another(served):
    """Seeded, ``n`` choices are generated one after another: the first is the n=1
    answer and the rest continue its random stream, so they differ; greedy (and
    batched), all are the same; usage counts the prompt once and every choice's tokens. Streamed, each
    chunk names its choice and the pieces rebuild the same texts."""
    model, tok, client, _ = served
    messages = [{"role": "user", "content": "t7 t8 t9"}]
    ask = dict(model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=11)
    one = client.chat.completions.create(**ask).choices[0].message.content
    r = client.chat.completions.create(**ask, n=3)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and texts[0] == one
    assert len(set(texts)) > 1  # (not one draw three times)
    words = sum(len(t.split()) for t in texts)  # (one word a token; an EOS adds one)
    assert words <= r.usage.completion_tokens <= 3 * 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.model_extra["speculative"]["forward_passes"] >= 3
    greedy = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    streamed = {}
    for ch in client.chat.completions.create(**ask, n=3, stream=True):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def test_a_recurrent_model_is_served_with_prompt_lookup(serve, monkeypatch):
    """A hybrid model (recurrent and attention layers) with ``draft="ngram"``: every
    answer equals mlx-lm's plain decoding; a follow-up turn starts from the kept cache
    (which holds its key exactly). A regenerated turn, and a follow-up whose history
    holds another answer, start from the copy kept when the first prompt was in (its
    cache that ran past the prompt cannot be trimmed). Controls: without that copy the
    regenerated turn starts cold; with the trim guard off, a prompt that shares more with
    the longer entry than with the copy fails. A state-space model (no KV layer) is
    served without a prompt cache; a hybrid draft model drafts for every request, its
    cache kept beside the model's."""
    from helpers import tiny_hybrid

    import mlx_specstream.prompt_cache as pc

    model, tok = tiny_hybrid("qwen3_next", vocab_size=V), word_tokenizer(V)
    client, _, server = serve(model, tok, draft="ngram")

    def ask(messages):
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
        want = reference(model, tok, chat_prompt(tok, messages), 12, speculative=False)
        assert r.choices[0].message.content == want
        return want, r.usage.prompt_tokens_details.cached_tokens

    m1 = [{"role": "user", "content": "t3 t9 t4 t3 t9 t4 t3"}]
    p1 = chat_prompt(tok, m1)
    text1, cached = ask(m1)
    assert cached == 0
    m2 = turn(m1, text1, "t20 t21 t3 t9")
    g1 = len(tok.encode(text1))
    assert ask(m2)[1] == len(p1) + g1
    assert ask(m1)[1] == len(p1) - 1  # regenerated: from the copy of the prompt
    assert ask(turn(m1, "t7 t7", "t20"))[1] == len(p1) - 1  # another answer in its history
    # Control: a server that keeps no copy of the prompt serves the regenerated turn cold.
    monkeypatch.setattr(server_mod, "can_trim_prompt_cache", lambda cache: True)
    plain, _, _ = serve(model, tok, draft="ngram")
    for _ in range(2):
        r = plain.chat.completions.create(model="tiny", messages=m1, max_tokens=12)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    monkeypatch.undo()
    # Control: with the trim guard off, the entry that ran past the prompt gets trimmed.
    monkeypatch.setattr(pc, "can_trim_prompt_cache", lambda cache: True)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="tiny", messages=turn(m1, " ".join(text1.split()[:3]), "t20"), max_tokens=12
        )
    monkeypatch.undo()
    ssm = tiny_hybrid("mamba2", vocab_size=V)
    client, _, server = serve(ssm, tok, draft="ngram")
    for _ in range(2):
        r = client.completions.create(model="tiny", prompt="t3 t9 t4 t3 t9", max_tokens=10)
        assert r.choices[0].text == reference(ssm, tok, "t3 t9 t4 t3 t9", 10, speculative=False)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert service_of(server).prompt_cache.keys() == []
    # A draft model for every request: both models' caches kept, and reused by the follow-up.
    client, _, server = serve(model, tok, draft_model=tiny_hybrid("lfm2", vocab_size=V, seed=1))
    r1 = client.chat.completions.create(model="tiny", messages=m1, max_tokens=12)
    assert r1.choices[0].message.content == text1
    r2 = client.chat.completions.create(model="tiny", messages=m2, max_tokens=12)
    p2 = chat_prompt(tok, m2)
    assert r2.choices[0].message.content == reference(model, tok, p2, 12, speculative=False)
    assert r2.usage.prompt_tokens_details.cached_tokens == len(p1) + r1.usage.completion_tokens
    assert (
        client.chat.completions.create(
            model="tiny", messages=m1, max_tokens=12
        ).usage.prompt_tokens_details.cached_tokens
        == len(p1) - 1
    )  # (the pair's copy)


def assert_served_alone_and_together(model, vocab_size, **defaults):
    """A server on ``model`` (``defaults`` its settings): a request alone, a follow-up
    turn that starts from the kept cache, then requests that wait together; every
    answer equals mlx-lm's plain decoding of its prompt."""
    tok = word_tokenizer(vocab_size)
    server = make_server(model, tok, "tiny", port=0, max_tokens=12, **defaults)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
    try:
        m1 = [{"role": "user", "content": "t3 t9 t4 t3 t9 t4 t3"}]
        r1 = client.chat.completions.create(model="tiny", messages=m1, max_tokens=12)
        text1 = r1.choices[0].message.content
        assert text1 == reference(model, tok, chat_prompt(tok, m1), 12, speculative=False)
        m2 = turn(m1, text1, "t20 t21 t3 t9")
        r2 = client.chat.completions.create(model="tiny", messages=m2, max_tokens=12)
        assert r2.choices[0].message.content == reference(
            model, tok, chat_prompt(tok, m2), 12, speculative=False
        )
        assert r2.usage.prompt_tokens_details.cached_tokens >= len(chat_prompt(tok, m1)) - 1
        prompts = [f"t{i} t{i + 1} t{i} t{i + 1}" for i in range(3, 8)]
        got, errors = {}, []

        def worker(p):
            try:
                got[p] = client.completions.create(model="tiny", prompt=p, max_tokens=12)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        for p in prompts:
            assert got[p].choices[0].text == reference(model, tok, p, 12, speculative=False)
    finally:
        client.close()
        server.shutdown()
        server.server_close()


def test_lookup_is_not_merged_into_a_hybrid_s_drafter_chains(serve):
    """A drafter on a hybrid model drafts chains through its recurrent layers, with no
    lookup merged in: ``"draft": "streams+ngram"`` gets a 400 naming ``draft``, while its
    own chains (``"streams"``) answer as plain decoding does."""
    from helpers import tiny_hybrid

    model, tok = tiny_hybrid("qwen3_next", vocab_size=V), word_tokenizer(V)
    attach_drafter(model, DrafterConfig(kind="medusa", num_draft_tokens=2, top_k=1), seed=0)
    client, url, _ = serve(model, tok)
    status, payload = post(
        url + "/completions", json.dumps({"prompt": "t1", "draft": "streams+ngram"}).encode()
    )
    assert status == 400 and payload["error"]["param"] == "draft"
    assert "recurrent layers" in payload["error"]["message"]
    r = client.completions.create(
        model="tiny", prompt="t3 t4 t5", max_tokens=12, extra_body={"draft": "streams"}
    )
    assert r.choices[0].text == reference(model, tok, "t3 t4 t5", 12, speculative=False)

"""The OpenAI-compatible server, driven by the official ``openai`` client on localhost."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers import tiny_spec_model, word_tokenizer

from mlx_specstream import generate
from mlx_specstream.server import make_server, wait_idle

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
    server.shutdown()
    server.server_close()
    assert wait_idle(server)


def reference(model, tok, prompt, n):
    return generate(model, tok, prompt, max_tokens=n)


def test_models(served):
    _, _, client, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny"]


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

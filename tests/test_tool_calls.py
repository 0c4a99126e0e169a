"""Tool calls and reasoning in chat answers, as ``mlx_lm.server`` returns them: the
splitting of an answer's text (:mod:`mlx_specstream.response_parser`), golden, and the
server's requests with ``tools``, tool messages and thinking templates, end to end with
the official ``openai`` client."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from helpers import plain_greedy, tiny_spec_model
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tool_parsers import json_tools

from mlx_specstream.response_parser import Parts, ResponseParser, forced_call_text, initial_state
from mlx_specstream.server import make_server, wait_idle

openai = pytest.importorskip("openai")

MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


def marker_tokenizer(names=None, vocab_size=64, chat_template=None, parser=None, fmt=json_tools):
    """A whitespace WordLevel tokenizer over ``t0 .. t{V-1}``, the ids in ``names`` named
    otherwise (``{5: "<think>"}``), mlx-lm wrapped with the markers of the tool format
    ``fmt`` (a module of ``mlx_lm.tool_parsers``, ``json_tools`` by default: ``<tool_call>``)
    and ``parser`` (by default ``fmt``'s)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = names or {}
    vocab = {names.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{vocab_size - 1}")
    hf.chat_template = chat_template
    return TokenizerWrapper(
        hf,
        tool_call_start=fmt.tool_call_start,
        tool_call_end=fmt.tool_call_end,
        tool_parser=parser or fmt.parse_tool_call,
    )


@pytest.fixture(scope="module")
def tok():
    """Its ids 1..4 are the four markers."""
    return marker_tokenizer(dict(enumerate(MARKERS, start=1)))


CALL = '{"name": "weather", "arguments": {"city": "Paris"}}'
ANSWER = f"<think>Sunny?</think>Let me check.<tool_call>{CALL}</tool_call>Done."


def joined(parser, pieces):
    """The parts of an answer fed in ``pieces``, joined."""
    out = Parts()
    for i, piece in enumerate(pieces):
        parts = parser.feed(piece, final=i == len(pieces) - 1)
        out.extend(parts)
    return out


def without_ids(calls):
    return [{k: v for k, v in c.items() if k != "id"} for c in calls]


WEATHER = {"function": {"name": "weather", "arguments": '{"city": "Paris"}'}, "type": "function"}


def test_an_answer_split_into_content_reasoning_and_calls(tok):
    parser = ResponseParser(tok)
    out = joined(parser, [ANSWER])
    assert (out.content, out.reasoning) == ("Let me check.Done.", "Sunny?")
    assert without_ids(out.tool_calls) == [WEATHER] and out.tool_calls[0]["id"]
    assert parser.made_tool_call


def piece_by_piece(tok, pieces):
    """A control: each piece split alone, as if no state were kept between pieces."""
    return [joined(ResponseParser(tok), [p]).content for p in pieces]


@pytest.mark.parametrize("pieces", [2, 3])
def test_every_split_of_the_text_gives_the_same_parts(tok, pieces):
    """Markers cut anywhere (inside a token's text, or several in one piece) are found."""
    whole = joined(ResponseParser(tok), [ANSWER])
    cuts = range(1, len(ANSWER))
    splits = [(i,) for i in cuts] if pieces == 2 else [(i, j) for i in cuts for j in cuts if i < j]
    naive_differs = 0
    for cut in splits:
        bounds = (0, *cut, len(ANSWER))
        text = [ANSWER[a:b] for a, b in zip(bounds, bounds[1:])]
        out = joined(ResponseParser(tok), text)
        assert (out.content, out.reasoning) == (whole.content, whole.reasoning), cut
        assert without_ids(out.tool_calls) == without_ids(whole.tool_calls), cut
        # Control: markers looked for in each piece alone miss those cut in two.
        naive_differs += "".join(piece_by_piece(tok, text)) != whole.content
    assert naive_differs > 0


def test_a_call_cut_short_or_malformed_comes_back_as_content(tok):
    parser = ResponseParser(tok)
    out = joined(parser, ['Hi<tool_call>{"name": "weather", "argu'])  # max_tokens reached
    assert out.content == 'Hi<tool_call>{"name": "weather", "argu' and not out.tool_calls
    assert not parser.made_tool_call
    parser = ResponseParser(tok)
    out = joined(parser, ["<tool_call>not json</tool_call>after"])
    assert out.content == "<tool_call>not json</tool_call>after" and not parser.made_tool_call


def test_a_forced_call_s_start_and_a_parser_that_starts_inside_it(tok):
    """A forced call's text (the prompt holds it): the marker, after closing a reasoning
    block the template opened, and for a named function the call's head in
    ``json_tools``' format. A parser fed it first parses the model's rest as the call.
    Control: the same rest from the normal state is content, not a call."""
    assert forced_call_text(tok, "normal") == "<tool_call>"
    head = forced_call_text(tok, "reasoning", "weather")
    assert head == '</think><tool_call>\n{"name": "weather", "arguments": '
    parser = ResponseParser(tok, initial="reasoning", forced=head)
    out = joined(parser, ['{"city": "Paris"}}', "</tool_call>"])
    assert without_ids(out.tool_calls) == [WEATHER] and (out.content, out.reasoning) == ("", "")
    assert parser.made_tool_call
    out = joined(ResponseParser(tok, forced="<tool_call>"), [CALL + "</tool_call>Done."])
    assert without_ids(out.tool_calls) == [WEATHER] and out.content == "Done."
    rest = joined(ResponseParser(tok), ['{"city": "Paris"}}</tool_call>'])
    assert not rest.tool_calls and rest.content == '{"city": "Paris"}}</tool_call>'
    words = marker_tokenizer(dict(enumerate(MARKERS, start=1)), parser=word_call)
    with pytest.raises(ValueError, match="json_tools, qwen3_coder"):  # its head is not known
        forced_call_text(words, "normal", "weather")
    from mlx_lm.tool_parsers import glm47

    with pytest.raises(ValueError, match="not glm47"):  # its name runs into its arguments
        forced_call_text(marker_tokenizer(fmt=glm47), "normal", "weather")
    assert forced_call_text(marker_tokenizer(fmt=glm47), "normal") == glm47.tool_call_start


# A named call as each format's template writes it: (tool parser module, the rest of
# the call after the forced head, then its end marker).
NAMED_CALLS = {
    "json_tools": ('{"city": "Paris"}}\n', "</tool_call>"),
    "qwen3_coder": ("<parameter=city>\nParis\n</parameter>\n</function>\n", "</tool_call>"),
    "pythonic": ('city="Paris")]', "<|tool_call_end|>"),
    "function_gemma": ("city:<escape>Paris<escape>}", "<end_function_call>"),
    "gemma4": ('city:<|"|>Paris<|"|>}', "<tool_call|>"),
    "mistral": ('{"city": "Paris"}', ""),
    "kimi_k2": ('{"city": "Paris"}<|tool_call_end|>', "<|tool_calls_section_end|>"),
    "kimi_k3": ('<|open|>json<|sep|>{"city": "Paris"}<|close|>json<|sep|><|close|>call<|sep|>',
                "<|close|>tools<|sep|>"),
    "minimax_m2": ('<parameter name="city">Paris</parameter>\n</invoke>\n',
                   "</minimax:tool_call>"),
    "minicpm5": ('<param name="city">Paris</param>', "</function>"),
    "muse_spark": ('<atem:parameter name="city">"Paris"</atem:parameter></atem:invoke>',
                   "</atem:function_calls>"),
}  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(NAMED_CALLS))
def test_a_named_call_s_head_in_each_known_format_parses_to_that_function(fmt):
    """The forced head of a named call, then the rest as the format's template writes
    it: mlx-lm's own parser for the format reads a call to that function. Control: the
    head of another function parses to that other name."""
    import importlib

    module = importlib.import_module(f"mlx_lm.tool_parsers.{fmt}")
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    tok = marker_tokenizer(fmt=module)
    rest, end = NAMED_CALLS[fmt]
    for name in ("weather", "forecast"):
        forced = forced_call_text(tok, "normal", name)
        assert forced.startswith(module.tool_call_start)
        out = joined(ResponseParser(tok, tools, forced=forced), [rest + end])
        assert [c["function"]["name"] for c in out.tool_calls] == [name], out
        assert json.loads(out.tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_tool_choice_none_leaves_calls_in_the_content(tok):
    parser = ResponseParser(tok, parse_tools=False)
    out = joined(parser, [ANSWER])
    assert out.content == f"Let me check.<tool_call>{CALL}</tool_call>Done."
    assert out.reasoning == "Sunny?" and not out.tool_calls and not parser.made_tool_call


def test_streamed_calls_are_numbered(tok):
    parser = ResponseParser(tok, streaming=True)
    out = joined(parser, [f"<tool_call>{CALL}</tool_call>", f"<tool_call>{CALL}</tool_call>"])
    assert [c["index"] for c in out.tool_calls] == [0, 1]
    assert all("index" not in c for c in joined(ResponseParser(tok), [ANSWER]).tool_calls)


def test_initial_state_follows_an_open_think_marker(tok):
    think, end = tok.think_start_id, tok.think_end_id
    assert initial_state(tok, [10, think]) == "reasoning"
    assert initial_state(tok, [10, think, 11, end]) == "normal"
    assert initial_state(tok, [10, 11]) == "normal"
    parser = ResponseParser(tok, initial="reasoning")
    out = joined(parser, ["Hmm.</think>Yes."])
    assert (out.reasoning, out.content) == ("Hmm.", "Yes.")
    # Control: the same text from the normal state is all content.
    assert joined(ResponseParser(tok), ["Hmm.</think>Yes."]).content == "Hmm.</think>Yes."


# ---- the server ----------------------------------------------------------------------
V = 64
# Renders the tools' names, an assistant's calls (their arguments as objects), the
# messages, and an open think marker when thinking is on.
TEMPLATE = (
    "{% for t in tools or [] %}{{ t['function']['name'] }} {% endfor %}"
    "{% for m in messages %}{% for c in m['tool_calls'] or [] %}"
    "{{ c['function']['arguments']['word'] }} {% endfor %}t1 {{ m['content'] }} {% endfor %}t2"
    "{% if think %} <think>{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "t9", "parameters": {}}}]


def word_call(text, tools=None):
    """A tool parser for word tokens: the call's words as its arguments."""
    return {"name": "lookup", "arguments": {"words": text.split()}}


def markers_in(generated, avoid):
    """``{id: name}``: the first five distinct ids of ``generated`` not in ``avoid``,
    named ``<think>``, ``</think>``, ``<tool_call>``, ``</tool_call>`` and ``<end>`` in
    that order, so that the model's greedy answer holds a reasoning block and a tool
    call, and can be stopped after them by the stop string ``<end>``."""
    ids = []
    for t in generated:
        if t not in ids and t not in avoid:
            ids.append(t)
    assert len(ids) >= 5, generated
    return dict(zip(ids, (*MARKERS, "<end>")))


@pytest.fixture(scope="module")
def model():
    return tiny_spec_model("llama", vocab_size=V, num_streams=3, top_k=2)


def start(model, tok, **defaults):
    server = make_server(model, tok, "tiny", port=0, **{"max_tokens": 24, **defaults})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)

    def close():
        client.close()
        server.shutdown()
        assert wait_idle(server)
        server.server_close()

    return client, close


def streamed(chunks):
    """A streamed answer's content, reasoning, calls and finish reason."""
    content, reasoning, calls, finish = "", "", [], None
    for c in chunks:
        for choice in c.choices:
            d = choice.delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning", None) or ""
            calls += [tc.model_dump() for tc in d.tool_calls or []]
            finish = choice.finish_reason or finish
    return content, reasoning, calls, finish


def test_the_server_answers_with_reasoning_and_tool_calls(model):
    """The model's greedy answer, its markers named after the fact, comes back split as
    mlx-lm's state machine splits the plain decoding's text, with and without
    speculation, streamed or not; its finish reason is ``tool_calls``."""
    messages = [{"role": "user", "content": "t5 t6"}]
    probe = marker_tokenizer(chat_template=TEMPLATE)
    ids = probe.apply_chat_template(messages, tools=TOOLS, tokenize=True,
                                    add_generation_prompt=True)  # fmt: skip
    plain = plain_greedy(model, ids, 24)
    names = markers_in(plain, set(ids) | {V - 1})
    tok = marker_tokenizer(names, chat_template=TEMPLATE, parser=word_call)
    assert tok.apply_chat_template(messages, tools=TOOLS, tokenize=True,
                                   add_generation_prompt=True) == ids  # fmt: skip
    text = tok.decode(plain)
    expected = joined(ResponseParser(tok, TOOLS), [text[: text.index("<end>")]])
    assert expected.reasoning and expected.tool_calls  # (the test has both to check)
    client, close = start(model, tok)
    try:
        for speculative in (True, False):
            body = dict(model="tiny", messages=messages, tools=TOOLS, stop=["<end>"],
                        extra_body={"speculative": speculative})  # fmt: skip
            r = client.chat.completions.create(**body)
            message = r.choices[0].message
            assert message.content == (expected.content or None)
            assert message.model_extra["reasoning"] == expected.reasoning
            calls = [c.model_dump() for c in message.tool_calls]
            assert without_ids(calls) == without_ids(expected.tool_calls)
            assert r.choices[0].finish_reason == "tool_calls"
            content, reasoning, calls, finish = streamed(
                client.chat.completions.create(**body, stream=True)
            )
            assert (content, reasoning, finish) == (
                expected.content, expected.reasoning, "tool_calls"
            )  # fmt: skip
            assert [c["function"] for c in calls] == [c["function"] for c in expected.tool_calls]
            assert [c["index"] for c in calls] == list(range(len(calls)))
        # tool_choice "none": the tools are not shown, and calls stay in the content.
        r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                           tool_choice="none")  # fmt: skip
        no_tools = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        text = tok.decode(plain_greedy(model, no_tools, 24))
        expected = joined(ResponseParser(tok, parse_tools=False), [text])
        assert r.choices[0].message.content == expected.content
        assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"
    finally:
        close()


def test_tools_and_tool_messages_reach_the_template(model):
    """The prompt renders the tools and an assistant's earlier call, its JSON arguments
    read as an object, and the tool's answer; the reply is plain decoding's of it."""
    tok = marker_tokenizer(chat_template=TEMPLATE)
    call = {"id": "c1", "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"word": "t11"})}}  # fmt: skip
    messages = [
        {"role": "user", "content": "t5"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "t12"},
    ]
    read = [dict(m) for m in messages]
    read[1] = {**read[1], "content": "",
               "tool_calls": [{**call, "function": {"name": "lookup",
                                                    "arguments": {"word": "t11"}}}]}  # fmt: skip
    ids = tok.apply_chat_template(read, tools=TOOLS, tokenize=True, add_generation_prompt=True)
    assert tok.decode(ids) == "t9 t1 t5 t11 t1 t1 t12 t2"
    client, close = start(model, tok)
    try:
        r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                           max_tokens=12)  # fmt: skip
        expected = joined(ResponseParser(tok, TOOLS), [tok.decode(plain_greedy(model, ids, 12))])
        assert r.choices[0].message.content == expected.content
        assert r.usage.prompt_tokens == len(ids)
        # Control: without the tools the prompt is shorter by their names.
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
        assert r.usage.prompt_tokens == len(ids) - 1
    finally:
        close()


def test_a_thinking_template_starts_the_answer_in_reasoning(model):
    messages = [{"role": "user", "content": "t7"}]
    tok = marker_tokenizer(dict(enumerate(MARKERS, start=50)), chat_template=TEMPLATE)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                  think=True)  # fmt: skip
    assert ids[-1] == tok.think_start_id
    text = tok.decode(plain_greedy(model, ids, 24))
    client, close = start(model, tok)
    try:
        r = client.chat.completions.create(
            model="tiny", messages=messages, extra_body={"chat_template_kwargs": {"think": True}}
        )
        expected = joined(ResponseParser(tok, initial="reasoning"), [text])
        assert expected.reasoning
        assert r.choices[0].message.model_extra["reasoning"] == expected.reasoning
        assert r.choices[0].message.content == (expected.content or None)
        # Control: read from the normal state, the same text splits otherwise.
        assert joined(ResponseParser(tok), [text]).reasoning != expected.reasoning
    finally:
        close()


def test_a_forced_call_starts_the_answer_inside_a_tool_call(model):
    """``tool_choice: "required"``: the prompt ends with the call marker, and the answer
    is plain decoding's after it, parsed from inside the call, with and without
    speculation, streamed or not. A named function with a format whose call head is
    not known (this word parser) gets a 400. Control: ``"auto"`` answers otherwise."""
    messages = [{"role": "user", "content": "t5 t6"}]
    probe = marker_tokenizer(chat_template=TEMPLATE)
    ids = probe.apply_chat_template(messages, tools=TOOLS, tokenize=True,
                                    add_generation_prompt=True)  # fmt: skip
    start_id = next(i for i in range(3, V - 1) if i not in ids)  # named <tool_call>
    plain = plain_greedy(model, ids + [start_id], 24)
    new = [t for t in dict.fromkeys(plain) if t not in set(ids) | {start_id, V - 1}]
    names = {start_id: "<tool_call>", new[0]: "</tool_call>", new[1]: "<end>"}
    tok = marker_tokenizer(names, chat_template=TEMPLATE, parser=word_call)
    assert tok.apply_chat_template(messages, tools=TOOLS, tokenize=True,
                                   add_generation_prompt=True) == ids  # fmt: skip
    text = tok.decode(plain)
    expected = joined(ResponseParser(tok, TOOLS, forced="<tool_call>"),
                      [text[: text.index("<end>")]])  # fmt: skip
    assert expected.tool_calls
    client, close = start(model, tok)
    try:
        for speculative in (True, False):
            body = dict(model="tiny", messages=messages, tools=TOOLS, stop=["<end>"],
                        tool_choice="required", extra_body={"speculative": speculative})  # fmt: skip
            r = client.chat.completions.create(**body)
            calls = [c.model_dump() for c in r.choices[0].message.tool_calls]
            assert without_ids(calls) == without_ids(expected.tool_calls)
            assert r.choices[0].finish_reason == "tool_calls"
            assert r.usage.prompt_tokens == len(ids) + 1
            _, _, calls, finish = streamed(client.chat.completions.create(**body, stream=True))
            assert [c["function"] for c in calls] == [c["function"] for c in expected.tool_calls]
            assert finish == "tool_calls"
        auto = client.chat.completions.create(**{**body, "tool_choice": "auto"})
        assert auto.usage.prompt_tokens == len(ids)
        assert [c.model_dump() for c in auto.choices[0].message.tool_calls or []] != calls
        named = {"type": "function", "function": {"name": "t9"}}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{**body, "tool_choice": named})
        assert e.value.body["param"] == "tool_choice" and "json_tools" in e.value.body["message"]
    finally:
        close()


@pytest.mark.parametrize(
    "extra, param, says",
    [
        ({"tool_choice": "any"}, "tool_choice", "must be 'auto', 'none', 'required'"),
        ({"tool_choice": {"type": "function"}}, "tool_choice", "as an object must be"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "t8"}}},
            "tool_choice",
            "'t8', which is not in 'tools'",
        ),
        ({"tool_choice": "required", "tools": []}, "tool_choice", "needs 'tools'"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls", "every call"),
        ({"tools": "t9"}, "tools", "list of objects"),
        ({"messages": [{"role": "function", "content": "1"}]}, "messages", "use 'tool'"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"type": "function", "function": {"name": "f", "arguments": "{oops"}}
                        ],
                    }
                ]
            },
            "messages",
            "not valid JSON",
        ),
    ],
)
def test_bad_tool_requests_are_refused_by_name(model, extra, param, says):
    client, close = start(model, marker_tokenizer(chat_template=TEMPLATE))
    try:
        body = {"messages": [{"role": "user", "content": "t5"}], "tools": TOOLS, **extra}
        with pytest.raises(openai.BadRequestError) as e:
            client.post("/chat/completions", body=body, cast_to=object)
        assert e.value.body["param"] == param and says in e.value.body["message"]
    finally:
        close()


def test_tools_need_a_template_a_tool_format_and_the_chat_endpoint(model):
    from helpers import word_tokenizer

    for tok, says in (
        (word_tokenizer(V), "need a chat template"),
        (word_tokenizer(V, chat_template=TEMPLATE), "tool_parser_type"),
    ):
        client, close = start(model, tok)
        try:
            with pytest.raises(openai.BadRequestError, match=says):
                client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "t5"}], tools=TOOLS
                )
        finally:
            close()
    client, close = start(model, marker_tokenizer(chat_template=TEMPLATE))
    try:
        with pytest.raises(openai.BadRequestError, match="chat/completions"):
            client.post("/completions", body={"prompt": "t5", "tools": TOOLS}, cast_to=object)
    finally:
        close()


# ---- against mlx_lm.server ------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def mlx_lm_server(tmp_path_factory):
    """``mlx_lm.server`` on a tiny model directory whose tokenizer has think markers, a
    template that renders tools and can open the thinking block, and mlx-lm's
    ``json_tools`` parser; yields the directory and the server's URL."""
    from helpers import ARCH_ARGS, BASE, tiny_model
    from mlx_lm.utils import save_config, save_model

    path = tmp_path_factory.mktemp("mlx_lm_server") / "model"
    path.mkdir()
    save_model(path, tiny_model("llama", V))
    save_config({**BASE, **ARCH_ARGS["llama"], "vocab_size": V, "model_type": "llama"},
                path / "config.json")  # fmt: skip
    # (No tool-call marker tokens: a call this random model wrote would not parse, and
    # mlx_lm.server drops such a call where ours returns it as content.)
    tok = marker_tokenizer(dict(enumerate(MARKERS[:2], start=50)), chat_template=TEMPLATE)
    tok._tokenizer.save_pretrained(str(path))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["tool_parser_type"] = "json_tools"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # (up to 2 minutes on a slow machine)
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "mlx_lm.server exited"
                time.sleep(0.1)
        else:
            raise TimeoutError(f"mlx_lm.server did not answer at {url}/health")
        yield path, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_answers_match_mlx_lm_server_on_the_same_weights(mlx_lm_server):
    """The same requests to ``mlx_lm.server`` and to ours (random streams attached to the
    same weights, speculating): the same message (content, reasoning), finish reason and
    token counts, greedy; for a thinking template, for tools with an earlier call and its
    result in the history, and streamed. Control: without the thinking flag the
    answers differ from the thinking ones."""
    import mlx_lm

    from mlx_specstream import SpecStreamConfig, attach_streams

    path, theirs = mlx_lm_server
    model, tok = mlx_lm.load(str(path))
    assert tok.has_thinking and tok.has_tool_calling  # (as mlx-lm loads it)
    attach_streams(model, SpecStreamConfig(num_streams=3, num_stream_layers=2), seed=1)
    server = make_server(model, tok, "tiny", port=0, max_tokens=16)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ours = f"http://127.0.0.1:{server.server_address[1]}"
    call = {"id": "c1", "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"word": "t11"})}}  # fmt: skip
    requests = [
        {"messages": [{"role": "user", "content": "t7"}], "chat_template_kwargs": {"think": True}},
        {"messages": [{"role": "user", "content": "t7"}]},
        {
            "messages": [
                {"role": "user", "content": "t5"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "t12"},
            ],
            "tools": TOOLS,
        },
    ]
    try:
        answers = []
        for body in requests:
            body = {**body, "max_tokens": 16, "temperature": 0.0}
            a, b = post(f"{ours}/v1/chat/completions", body), post(
                f"{theirs}/v1/chat/completions", body
            )
            ca, cb = a["choices"][0], b["choices"][0]
            assert ca["message"] == cb["message"], body
            assert ca["finish_reason"] == cb["finish_reason"]
            for key in ("prompt_tokens", "completion_tokens"):
                assert a["usage"][key] == b["usage"][key], key
            answers.append(ca["message"])
            # Streamed: the deltas add up to the same parts.
            parts = []
            for url in (ours, theirs):
                with urllib.request.urlopen(urllib.request.Request(
                    f"{url}/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                    headers={"Content-Type": "application/json"}), timeout=60) as r:  # fmt: skip
                    events = [json.loads(line[6:]) for line in r.read().decode().splitlines()
                              if line.startswith("data: {")]  # fmt: skip
                deltas = [c["delta"] for e in events for c in e["choices"]]
                parts.append(tuple("".join(d.get(k) or "" for d in deltas)
                                   for k in ("content", "reasoning")))  # fmt: skip
            assert parts[0] == parts[1], body
        assert answers[0]["reasoning"] and answers[0] != answers[1]
    finally:
        server.shutdown()
        assert wait_idle(server)
        server.server_close()

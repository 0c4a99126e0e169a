"""A chat answer's text split into content, reasoning and tool calls, as ``mlx_lm.server``
splits it.

The text is matched against the tokenizer's markers (``<think>`` ... ``</think>``,
``<tool_call>`` ... ``</tool_call>`` and the like, which mlx-lm's tokenizer wrapper
infers) by mlx-lm's own :class:`~mlx_lm.generate.TextStateMachine`. It reads text, not
token ids, and holds back what may be the start of a marker, so a marker split across
tokens, or arriving inside a piece of several tokens, is found all the same. Tool calls
are parsed by the tokenizer's ``tool_parser`` and formatted by ``mlx_lm.server``'s
``ToolCallFormatter``.

Unlike ``mlx_lm.server``, nothing is dropped: a tool call that does not parse (cut short
by ``max_tokens``, or malformed) comes back in the content as the model wrote it,
markers included, and so does every call when the request said ``tool_choice: "none"``.

Example, with a tokenizer whose markers are ``<think>`` / ``</think>`` and
``<tool_call>`` / ``</tool_call>`` (mlx-lm's ``json_tools`` parser)::

    parser = ResponseParser(tokenizer)
    parser.feed("<think>It is sunny?</think>Let me check. <tool_")
    # Parts(content="Let me check. ", reasoning="It is sunny?", tool_calls=[])
    parser.feed('call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>', final=True)
    # Parts(content="", reasoning="", tool_calls=[{"function": {"name": "weather",
    #   "arguments": '{"city": "Paris"}'}, "type": "function", "id": "..."}])
    parser.made_tool_call  # True: the answer's finish_reason "stop" becomes "tool_calls"
"""

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.server import ToolCallFormatter
from mlx_lm.tool_parsers import (
    function_gemma,
    gemma4,
    json_tools,
    kimi_k2,
    kimi_k3,
    minicpm5,
    minimax_m2,
    mistral,
    muse_spark,
    pythonic,
    qwen3_coder,
)

logger = logging.getLogger(__name__)


@dataclass
class Parts:
    """What one piece of text added to each part of the answer."""

    content: str = ""
    reasoning: str = ""
    tool_calls: List[Dict[str, Any]] = field(default_factory=list)

    def extend(self, other: "Parts") -> None:
        """Appends what ``other`` adds (the next piece's parts)."""
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls


def initial_state(tokenizer, prompt: List[int]) -> str:
    """The state an answer starts in, as ``mlx_lm.server`` chooses it: ``"reasoning"``
    when the prompt's last think-start marker is not closed (a template that opens the
    thinking block itself), else ``"normal"``; a tokenizer's response format may name
    its own."""
    state = "normal"
    if tokenizer.has_thinking:
        if tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
            state = "reasoning"
    return tokenizer.response_initial_state or state


# A call's head, after its marker, in the formats that write the function's name
# first and close it (the model writes the arguments on), by tool parser.
CALL_HEADS = {
    json_tools.parse_tool_call: lambda name: '\n{"name": ' + json.dumps(name) + ', "arguments": ',
    qwen3_coder.parse_tool_call: lambda name: f"\n<function={name}>\n",
    pythonic.parse_tool_call: lambda name: f"[{name}(",
    function_gemma.parse_tool_call: lambda name: f"call:{name}{{",
    gemma4.parse_tool_call: lambda name: f"call:{name}{{",
    mistral.parse_tool_call: lambda name: f"{name}[ARGS]",
    kimi_k2.parse_tool_call: lambda name: (
        f"<|tool_call_begin|>functions.{name}:0<|tool_call_argument_begin|>"
    ),
    kimi_k3.parse_tool_call: lambda name: f'<|open|>call tool="{name}"<|sep|>',
    minimax_m2.parse_tool_call: lambda name: f'\n<invoke name="{name}">\n',
    minicpm5.parse_tool_call: lambda name: f'"{name}">',
    muse_spark.parse_tool_call: lambda name: f'<atem:invoke name="{name}">',
}


def forced_call_text(tokenizer, initial: str, name: Optional[str] = None) -> str:
    """The text a forced tool call's answer starts with, appended to the prompt:
    a reasoning block the template opened is closed, then the tool-call marker;
    for a named function (``name``) also the call's head, in the formats whose
    head is known (:data:`CALL_HEADS`: mlx-lm's ``json_tools``, ``{"name": ...,
    "arguments": ``; ``qwen3_coder``, ``pythonic``, ``function_gemma``, ``gemma4``,
    ``mistral``, ``kimi_k2``, ``kimi_k3``, ``minimax_m2``, ``minicpm5`` and
    ``muse_spark``: every head ends where the name does).
    The model writes the rest, so what it writes is its own distribution given
    that start.

    Example, with the ``<tool_call>`` markers of ``json_tools``::

        forced_call_text(tok, "normal")            # '<tool_call>'
        forced_call_text(tok, "reasoning", "f")
        # '</think><tool_call>\\n{"name": "f", "arguments": '

    Raises:
        ValueError: the tokenizer's response format decides where calls start, or a
          named call's head is not known for its tool parser.
    """
    targets = {dst for edges in tokenizer.response_transitions.values() for _, dst in edges}
    if "tool" in targets:
        raise ValueError(
            "this model's response format decides where tool calls start: a call cannot be forced"
        )
    text = (tokenizer.think_end if initial == "reasoning" else "") + tokenizer.tool_call_start
    if name is None:
        return text
    head = CALL_HEADS.get(tokenizer.tool_parser)
    if head is None:
        raise ValueError(
            "a named 'tool_choice' needs a tool-call format whose call starts with its name "
            "that this server knows (mlx_lm.tool_parsers: json_tools, qwen3_coder, pythonic, "
            "function_gemma, gemma4, mistral, kimi_k2, kimi_k3, minimax_m2, minicpm5, "
            "muse_spark; not glm47, laguna or longcat, whose name runs into its arguments); "
            "'required' with only that tool in 'tools' forces a call"
        )
    return text + head(name)


class ResponseParser:
    """Splits the pieces of one answer into :class:`Parts`.

    Args:
        tokenizer: mlx-lm's ``TokenizerWrapper``; its markers and ``tool_parser``.
        tools: The request's ``tools`` (some parsers read the declared types).
        initial: The state the answer starts in (:func:`initial_state`).
        streaming: Number tool calls with an ``index``, as OpenAI's stream deltas do.
        parse_tools: False for ``tool_choice: "none"``: calls stay in the content.
        forced: Text the answer starts with that the prompt holds (a forced call's
          start, :func:`forced_call_text`): read first, as if the model wrote it.
    """

    def __init__(self, tokenizer, tools=None, initial="normal", streaming=False, parse_tools=True,
                 forced=""):  # fmt: skip
        self._tokenizer = tokenizer
        self._state = make_text_state_machine(tokenizer).make_state(initial)
        self._format = ToolCallFormatter(tokenizer.tool_parser, tools, streaming)
        self._parse_tools = parse_tools
        self._previous = initial
        self._tool_text: Optional[str] = None  # the open call's text
        self.made_tool_call = False
        if forced:  # (it closes a reasoning block left empty, and opens a call)
            parts = self.feed(forced)
            assert not (parts.content or parts.tool_calls), (forced, parts)

    def feed(self, text: str, final: bool = False) -> Parts:
        """The parts ``text`` completes; ``final`` on the answer's last piece (what was
        held back as a possible marker start is then released)."""
        self._state, segments = TextStateMachine.split(self._state, text)
        if final:
            self._state, rest, state = TextStateMachine.flush(self._state)
            segments.append((state, rest))
        parts = Parts()
        for state, piece in segments:
            if self._previous == "tool" and state != "tool":
                self._close_call(parts, ended=True)
            if state == "tool":
                self._tool_text = (self._tool_text or "") + piece
            elif state == "reasoning":
                parts.reasoning += piece
            elif state == "normal":
                parts.content += piece
            self._previous = state
        if final and self._tool_text is not None:  # cut short inside a call
            self._close_call(parts, ended=False)
        return parts

    def _close_call(self, parts: Parts, ended: bool):
        text, self._tool_text = self._tool_text or "", None
        calls = []
        if self._parse_tools:
            try:  # (ToolCallFormatter logs and skips what raises ValueError)
                calls = self._format([text])
            except Exception as e:  # noqa: BLE001 - the text is returned, not lost
                logger.warning("the tool parser failed (%s: %s)", type(e).__name__, e)
        if calls:
            parts.tool_calls.extend(calls)
            self.made_tool_call = True
            return
        if self._parse_tools:
            logger.warning("a tool call did not parse; it is returned as content: %r", text)
        tok = self._tokenizer
        end = (tok.tool_call_end or "") if ended else ""
        parts.content += tok.tool_call_start + text + end

"""One answer's text split into content, reasoning and tool calls, by the model's own markers.

mlx-lm's tokenizer wrapper knows a model's think markers (`<think>`...`</think>`) and its tool
call format (the parser its chat template needs, from mlx_lm/tool_parsers/); its
TextStateMachine matches the markers in decoded text, strips them, and holds back text that may
be the start of one. Here that machine runs per request: reasoning text goes to
`reasoning_content`, each finished tool call is parsed with the model's parser, the rest is
content. A call that does not parse (cut by max_tokens) is kept as content, markers and all:
nothing generated is dropped.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlxfleet.openai.tools import ToolCall

if TYPE_CHECKING:  # imported where used: importing mlx-lm starts threads (see server.serve)
    from mlx_lm.generate import TextStateMachine

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Delta:
    """What a piece of generated text adds to the answer."""

    content: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)  # parsed; arguments as JSON text

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.calls)


def machine(tokenizer: Any, with_tools: bool) -> TextStateMachine | None:
    """The state machine for a model (None when it has neither think nor tool markers, or
    tools are off for the request)."""
    from mlx_lm.generate import TextStateMachine

    transitions: dict[str, list[tuple[str, str]]] = {}
    if tokenizer.has_thinking:
        transitions["normal"] = [(tokenizer.think_start, "reasoning")]
        transitions["reasoning"] = [(tokenizer.think_end, "normal")]
    if with_tools and tokenizer.has_tool_calling:
        transitions.setdefault("normal", []).append((tokenizer.tool_call_start, "tool"))
        if tokenizer.has_thinking:
            transitions["reasoning"].append((tokenizer.tool_call_start, "tool"))
        transitions["tool"] = [(tokenizer.tool_call_end, "normal")]
    return TextStateMachine(transitions) if transitions else None


def starts_in_reasoning(tokenizer: Any, prompt_ids: list[int]) -> bool:
    """Whether the chat template opened a think section the answer continues (Qwen3's
    generation prompt does)."""
    if not tokenizer.has_thinking:
        return False
    return bool(tokenizer.rfind_think_start(prompt_ids) > tokenizer.rfind_think_end(prompt_ids))


class Channels:
    """Splits one answer as it is generated. Not thread-safe: one request, one event loop."""

    def __init__(
        self,
        sm: TextStateMachine | None,
        tokenizer: Any,
        tools: list[dict[str, Any]] | None,
        reasoning: bool,
    ) -> None:
        self._sm = sm
        self._state = sm.make_state("reasoning" if reasoning else "normal") if sm else None
        self._parser = tokenizer.tool_parser
        self._tools = tools
        self._start, self._end = tokenizer.tool_call_start, tokenizer.tool_call_end
        self._tool_text = ""
        self.calls_made = 0

    def add(self, text: str) -> Delta:
        if self._sm is None or self._state is None:
            return Delta(content=text)
        self._state, segments = self._sm.split(self._state, text)
        return self._segments(segments)

    def finish(self) -> Delta:
        """The end of the answer: what the machine held back, and a call left open."""
        if self._sm is None or self._state is None:
            return Delta()
        self._state, held, current = self._sm.flush(self._state)
        delta = self._segments([(current, held)])
        if self._tool_text:  # an unfinished call: its text, as it was generated
            delta.content += self._start + self._tool_text
            self._tool_text = ""
        return delta

    def resume(self, text: str) -> None:
        """Replay what another engine already sent (a continued stream): state, open call and
        call count as they were, nothing emitted again."""
        self.add(text)

    def _segments(self, segments: list[tuple[str | None, str]]) -> Delta:
        delta = Delta()
        for i, (state, text) in enumerate(segments):
            closed = i < len(segments) - 1  # a later segment follows: this state was left
            if state == "tool":
                self._tool_text += text
                if closed:
                    self._close_call(delta)
            elif state == "reasoning":
                delta.reasoning += text
            else:
                delta.content += text
        return delta

    def _close_call(self, delta: Delta) -> None:
        text, self._tool_text = self._tool_text, ""
        try:
            parsed = self._parser(text, self._tools)
            calls = parsed if isinstance(parsed, list) else [parsed]
            if not all(isinstance(c, dict) for c in calls):
                raise TypeError("the parser gave something other than calls")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("a tool call did not parse (%s): kept as content", type(exc).__name__)
            delta.content += self._start + text + (self._end or "")
            return
        for call in calls:
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            delta.calls.append(
                ToolCall(f"call_{uuid.uuid4().hex[:24]}", str(call.get("name", "")), arguments)
            )
            self.calls_made += 1

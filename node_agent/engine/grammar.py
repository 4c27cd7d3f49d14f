"""Constrained decoding: the tokens a request's grammar allows, and nothing else.

The grammar library is llguidance (Microsoft's, the engine under Guidance; used by vLLM,
SGLang and llama.cpp). Chosen over xgrammar because its wheels need nothing else: xgrammar's
require PyTorch (and Triton on Linux), gigabytes for a Mac's node agent. llguidance ships abi3
wheels for macOS arm64 and Linux x86_64.

A request's grammar runs inside its own sampler, in the running batch (mlx-lm's BatchGenerator
takes a sampler per sequence): at each step it masks every token the grammar does not allow
before the draw, then consumes the token drawn. Logprobs a request asks for are the model's,
before the mask. Grammars compile once per grammar text
(an LRU of matchers; each request works on a copy), so a cached schema costs a request only the
copy. A continued stream (failover) first feeds the matcher the tokens already sent.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mlxfleet.errors import ApiError
from mlxfleet.openai.structured import ResponseFormat
from mlxfleet.openai.tools import Tool, ToolChoice

if TYPE_CHECKING:  # imported where used: the server imports this module before os.nice
    import mlx.core as mx

COMPILED_GRAMMARS = 64  # matchers kept, most recently used first
# JSON as Python's json.dumps writes it, no other whitespace: a model cannot pad forever, and
# models trained on json.dumps output keep their own spacing.
JSON_STYLE: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
HERMES_CALL_START = "<tool_call>"  # the json_tools format (Hermes, Qwen2.5) is the one we force


class RequestGrammar:
    """One sequence's grammar. It wraps the request's sampler (`constrain`): each draw masks
    the tokens the grammar forbids, then the token drawn is consumed at the next draw. In the
    sampler rather than as a logits processor: BatchGenerator samples rows with distinct
    samplers one by one anyway, while any processor sends the whole batch down its per-row
    logits path (measured in docs/benchmarks.md)."""

    def __init__(self, matcher: Any, sent: list[int], recipe: tuple[str, str] = ("", "")) -> None:
        self._matcher = matcher
        # What another rank of a group needs to build the same grammar (group.py).
        self.recipe = (*recipe, tuple(sent))
        self._last: Any = None  # the token drawn at the previous step (an mx array)
        if sent and not matcher.consume_tokens(sent):
            raise ApiError.invalid(
                "The continued tokens do not match the request's grammar.",
                "mlxfleet_continuation",
                "invalid_value",
            )

    def constrain(self, sampler: Callable[[mx.array], mx.array]) -> Callable[[mx.array], mx.array]:
        import mlx.core as mx
        import numpy as np

        matcher = self._matcher

        def sample(logprobs: mx.array) -> mx.array:
            if self._last is not None:
                matcher.consume_token(int(self._last.item()))
            allowed = np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8)
            mask = mx.array(allowed[: logprobs.shape[-1]] > 0)
            self._last = sampler(mx.where(mask, logprobs, mx.array(-mx.inf, logprobs.dtype)))
            return self._last

        return sample


class Grammars:
    """The engine's grammars: the tokenizer llguidance needs (built once, on first use) and
    the compiled matchers. Thread-safe (the tokenize thread builds, the model thread runs)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._wrapper = tokenizer
        self._vocab_size = vocab_size
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def for_format(
        self, fmt: ResponseFormat, sent: list[int], opened_thinking: bool
    ) -> RequestGrammar:
        """response_format: the answer is JSON valid against the schema (json_object: any
        object), after the model's think section when it has one."""
        schema = dict(fmt.schema or {}) if fmt.type == "json_schema" else {"type": "object"}
        body = f"body: %json {json.dumps(schema | {'x-guidance': JSON_STYLE})}"
        return self.from_recipe(self._lark(body, opened_thinking), "response_format", sent)

    def for_tool_choice(
        self,
        tools: tuple[Tool, ...],
        choice: ToolChoice,
        parallel: bool,
        sent: list[int],
        opened_thinking: bool,
    ) -> RequestGrammar:
        """tool_choice required or a named function: the answer is one call (or several, with
        parallel_tool_calls) of an allowed function, arguments valid against its schema."""
        start, end = self._wrapper.tool_call_start, self._wrapper.tool_call_end
        if start != HERMES_CALL_START:
            raise ApiError.invalid(
                "tool_choice 'required' or a named function is served for models whose tool "
                f"calls are {HERMES_CALL_START} JSON (Hermes, Qwen2.5); this model's are not.",
                "tool_choice",
                "unsupported_value",
            )
        allowed = [t for t in tools if choice.name in (None, t.name)]
        rules = []
        for i, tool in enumerate(allowed):
            call = {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
                "x-guidance": JSON_STYLE,
            }
            rules.append(f"f{i}: %json {json.dumps(call)}")
        many = parallel and choice.name is None
        body = "\n".join(
            [
                'body: call ("\\n" call)*' if many else "body: call",
                f'call: {_token(self._wrapper, start)} "\\n" call_body "\\n" '
                f"{_token(self._wrapper, end)}",
                "call_body: " + " | ".join(f"f{i}" for i in range(len(allowed))),
                *rules,
            ]
        )
        return self.from_recipe(self._lark(body, opened_thinking), "tools", sent)

    def from_recipe(
        self, grammar: str, param: str, sent: list[int] | tuple[int, ...]
    ) -> RequestGrammar:
        """A grammar from its Lark text (`param`: the request field named in its errors)."""
        return RequestGrammar(self._matcher(grammar, param), list(sent), (grammar, param))

    def _lark(self, body: str, opened_thinking: bool) -> str:
        """`body` (Lark rules defining `body`) as the whole answer, after a think section when
        the model has think markers: optional, or required to close when the chat template
        opened it. What is thought is free text; only what follows is constrained."""
        w = self._wrapper
        if not w.has_thinking or len(w.encode(w.think_end, add_special_tokens=False)) != 1:
            return f"start: body\n{body}"
        think_end = _token(w, w.think_end)
        rules = ["THOUGHT: /(?s:.*)/", "GAP: /[ \\n]{0,4}/", body]  # a bounded gap
        if opened_thinking:
            return "\n".join([f"start: THOUGHT {think_end} GAP body", *rules])
        think = f"think: {_token(w, w.think_start)} THOUGHT {think_end} GAP"
        return "\n".join(["start: think? body", think, *rules])

    def _matcher(self, grammar: str, param: str) -> Any:
        """A fresh copy of the compiled grammar (400 naming the problem when it does not
        compile)."""
        from llguidance import LLMatcher

        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
            tokenizer = self._tokenizer()
        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise ApiError.invalid(
                f"Invalid '{param}': the schema does not compile: {error}", param, "invalid_value"
            )
        compiled = LLMatcher(tokenizer, grammar, log_level=0)
        if compiled.is_error():
            raise ApiError.invalid(
                f"Invalid '{param}': {compiled.get_error()}", param, "invalid_value"
            )
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > COMPILED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def _tokenizer(self) -> Any:
        if self._lltokenizer is None:
            import llguidance.hf

            self._lltokenizer = llguidance.hf.from_tokenizer(
                self._wrapper._tokenizer,  # the Hugging Face tokenizer inside mlx-lm's wrapper
                n_vocab=self._vocab_size,
                eos_token=sorted(self._wrapper.eos_token_ids),
            )
        return self._lltokenizer


def _token(wrapper: Any, text: str) -> str:
    """A marker in Lark: its token, when it is one special token; else its text."""
    ids = wrapper.encode(text, add_special_tokens=False)
    return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(text)

"""The channel splitter on the fixture model's real tokenizer wrapper (mlx-lm's markers and
tool parser), fed text as a stream would feed it: in arbitrary pieces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.tokenizer_utils import load

from node_agent.engine.channels import Channels, Delta, machine


@pytest.fixture(scope="module")
def tokenizer(agent_model: Path) -> Any:
    return load(agent_model)


def feed(channels: Channels, pieces: list[str]) -> Delta:
    total = Delta()
    for delta in [*(channels.add(p) for p in pieces), channels.finish()]:
        total.content += delta.content
        total.reasoning += delta.reasoning
        total.calls += delta.calls
    return total


def test_markers_split_across_pieces_still_split_the_answer(tokenizer: Any) -> None:
    channels = Channels(machine(tokenizer, True), tokenizer, [], reasoning=False)
    call = '{"name": "f", "arguments": {"x": 1}}'
    text = f"<think>hm</think>ok <tool_call>\n{call}\n</tool_call> done"
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]  # cuts inside every marker
    out = feed(channels, pieces)
    assert (out.reasoning, out.content) == ("hm", "ok  done")
    [made] = out.calls
    assert (made.name, json.loads(made.arguments)) == ("f", {"x": 1})
    assert channels.calls_made == 1


def test_a_call_that_does_not_parse_or_is_cut_stays_content(tokenizer: Any) -> None:
    broken = feed(
        Channels(machine(tokenizer, True), tokenizer, [], False), ["a<tool_call>{nope</tool_call>"]
    )
    assert (broken.content, broken.calls) == ("a<tool_call>{nope</tool_call>", [])
    cut = feed(
        Channels(machine(tokenizer, True), tokenizer, [], False), ['b<tool_call>{"name": "f"']
    )
    assert (cut.content, cut.calls) == ('b<tool_call>{"name": "f"', [])


def test_without_tools_a_call_marker_is_just_text(tokenizer: Any) -> None:
    out = feed(
        Channels(machine(tokenizer, False), tokenizer, None, False), ["<tool_call>{}</tool_call>"]
    )
    assert (out.content, out.calls) == ("<tool_call>{}</tool_call>", [])

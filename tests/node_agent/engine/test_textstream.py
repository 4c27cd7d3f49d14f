"""Stop strings and hold-back over streamed text: pure, with a fake detokenizer."""

from __future__ import annotations

from node_agent.engine.textstream import TextStream, find_stop, held_back_length


class CharDetokenizer:
    """Token i is the i-th character of a fixed alphabet; enough to drive TextStream."""

    def __init__(self) -> None:
        self.text = ""

    def add_token(self, token: int) -> None:
        self.text += chr(token)

    def finalize(self) -> None:
        pass


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.add(ord(c)) for c in text]


def test_held_back_length_is_the_longest_stop_prefix_at_the_end() -> None:
    assert held_back_length("hello wor", ("world",)) == 3
    assert held_back_length("hello", ("world",)) == 0
    assert held_back_length("abab", ("abc", "bab")) == 2
    assert held_back_length("xbab", ("babc",)) == 3
    assert held_back_length("xa", ("a",)) == 0  # a whole stop is not "held", it is matched


def test_find_stop_returns_the_earliest_match() -> None:
    assert find_stop("one two three", ("three", "two")) == 4
    assert find_stop("one", ("x",)) == -1


def test_text_is_cut_before_the_stop_and_never_leaks_its_start() -> None:
    stream = TextStream(CharDetokenizer(), ("END",))
    deltas = feed(stream, "abc EN")
    assert "".join(deltas) == "abc "  # "EN" held back: it may become "END"
    assert stream.add(ord("D")) == ""
    assert stream.stopped
    assert stream.add(ord("x")) == ""


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    stream = TextStream(CharDetokenizer(), ("END",))
    assert "".join(feed(stream, "xEN")) == "x"
    assert stream.add(ord("o")) == "ENo"
    assert not stream.stopped
    assert "".join(feed(stream, "ffE")) == "ff"
    assert stream.finish() == "E"


def test_without_stops_every_character_flows_through() -> None:
    stream = TextStream(CharDetokenizer(), ())
    assert feed(stream, "ab") == ["a", "b"]
    assert stream.finish() == ""


def test_the_stop_string_that_matched_is_named() -> None:
    """Anthropic's `stop_sequence` says which one ended the answer (the engine's stop_reason)."""
    stream = TextStream(CharDetokenizer(), ("END", "HALT"))
    assert "".join(feed(stream, "go HALT then END")) == "go "
    assert (stream.stopped, stream.stop_sequence) == (True, "HALT")
    unstopped = TextStream(CharDetokenizer(), ("END",))
    feed(unstopped, "no stop here")
    assert (unstopped.stopped, unstopped.stop_sequence) == (False, None)

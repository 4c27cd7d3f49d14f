"""Generated token ids to text deltas, cut at stop strings; pure, testable without a model."""

from __future__ import annotations

from typing import Protocol


class Detokenizer(Protocol):
    """The part of mlx-lm's StreamingDetokenizer this module uses."""

    text: str

    def add_token(self, token: int) -> None: ...

    def finalize(self) -> None: ...


def held_back_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Index of the earliest stop string in text[start:] (absolute), or -1."""
    found = -1
    for stop in stops:
        i = text.find(stop, start)
        if i != -1 and (found == -1 or i < found):
            found = i
    return found


class TextStream:
    """Turns one request's token ids into text deltas and detects its stop strings.

    Text that could be the start of a stop string is held back until the next tokens show it
    is not, so a stream never sends the first half of a stop string. Not thread-safe: it lives
    on the model thread with its request.
    """

    def __init__(self, detokenizer: Detokenizer, stops: tuple[str, ...]) -> None:
        self._detokenizer = detokenizer
        self._stops = stops
        self._max_stop = max((len(s) for s in stops), default=0)
        self._sent = 0  # characters of detokenizer.text already returned as deltas
        self.stopped = False
        self.stop_sequence: str | None = None  # the stop string that ended the text

    def resume(self, token_ids: tuple[int, ...]) -> None:
        """Take in tokens whose text was already sent (a continued stream): later deltas
        follow on from their text exactly as if this stream had produced them."""
        if not token_ids:
            return
        for token in token_ids:
            self._detokenizer.add_token(token)
        self._sent = len(self._detokenizer.text)

    def add(self, token: int) -> str:
        """Consume one token; returns the text now safe to send (sets `stopped` on a stop)."""
        self._detokenizer.add_token(token)
        return self._advance(self._detokenizer.text, final=False)

    def finish(self) -> str:
        """Flush the detokenizer at the end of generation and return the remaining text."""
        self._detokenizer.finalize()
        return self._advance(self._detokenizer.text, final=True)

    def _advance(self, text: str, *, final: bool) -> str:
        if self.stopped:
            return ""
        if self._stops:
            # A stop can only start in the unsent tail or overlap it by less than its length.
            start = max(0, self._sent - self._max_stop + 1)
            cut = find_stop(text, self._stops, start)
            if cut != -1:
                self.stopped = True
                self.stop_sequence = next(s for s in self._stops if text.startswith(s, cut))
                delta = text[self._sent : max(cut, self._sent)]
                self._sent = max(cut, self._sent)
                return delta
        end = len(text) if final else len(text) - held_back_length(text, self._stops)
        end = max(end, self._sent)
        delta = text[self._sent : end]
        self._sent = end
        return delta

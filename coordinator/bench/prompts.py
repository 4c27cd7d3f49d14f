"""Prompts of exact token lengths, for a tokenizer we cannot see.

The endpoint counts: a probe request (max_tokens 1) reports `usage.prompt_tokens`, chat
template included. A prompt is a fixed instruction and N common words; N is searched for until
the count is exact. Words are space-separated and each is one token in common tokenizers, so
the count does not depend on their order: every request gets the same words shuffled, which
keeps a prefix cache from turning later requests' prefill into a lookup. A word that is more
than one token here is dropped and the search goes on; a length no search hits is reported
(`Calibration.exact`), never silently rounded.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from coordinator.bench.errors import PromptLengthError

# Asks for a long answer, so a real model generates up to max_tokens rather than stopping.
INSTRUCTION = "Write a long story that uses all of these words:"
# Common words: one token each in typical BPE vocabularies and in the demo model's; the
# search drops any that is not, for the endpoint at hand.
WORDS = (
    "the", "and", "of", "to", "in", "is", "it", "that", "for", "on", "with", "was", "at",
    "from", "this", "be", "are", "or", "but", "not", "all", "one", "day", "time", "water",
    "light", "morning", "small", "team", "model", "machine", "world", "river", "garden",
    "year", "people", "work", "long", "good", "new", "first", "right", "little", "high", "man",
)  # fmt: skip
MAX_PROBES = 24  # per length; a search usually needs 2 or 3
TOKENS_PER_WORD_GUESS = 1.0

Messages = list[dict[str, str]]
Probe = Callable[[Messages], Awaitable[int]]  # prompt tokens the endpoint counts for messages


@dataclass(frozen=True, slots=True)
class Calibration:
    """How one prompt length is built: `words` words; `tokens` is what the endpoint counted."""

    wanted: int
    words: tuple[str, ...]
    tokens: int
    probes: int

    @property
    def exact(self) -> bool:
        return self.tokens == self.wanted


def render(words: Iterable[str]) -> Messages:
    """The chat messages of a prompt with these words."""
    return [{"role": "user", "content": " ".join((INSTRUCTION, *words))}]


async def calibrate(probe: Probe, wanted: int, max_probes: int = MAX_PROBES) -> Calibration:
    """The words whose prompt the endpoint counts as exactly `wanted` tokens, or the closest
    found below it when `max_probes` probes cannot hit it."""
    vocab = list(WORDS)
    probes = 0

    async def count(n: int) -> int:
        nonlocal probes
        probes += 1
        try:
            return await probe(render(_words(vocab, n)))
        except PromptLengthError as exc:
            raise PromptLengthError(f"--prompt-tokens {wanted}: {exc}") from None

    lo_n, lo_t = 1, await count(1)
    one_word = lo_t
    if lo_t > wanted:
        raise PromptLengthError(
            f"--prompt-tokens {wanted}: too short, the chat template and instruction alone "
            f"are {lo_t - 1} tokens here"
        )
    hi: tuple[int, int] | None = None
    rate = TOKENS_PER_WORD_GUESS
    while lo_t < wanted and probes < max_probes:
        if hi is None:
            n = lo_n + max(1, round((wanted - lo_t) / rate))
        elif hi[0] == lo_n + 1:
            # Word lo_n is several tokens here: drop it, so the next word takes its place.
            # The words before it stay the same unless the list had wrapped round.
            if len(vocab) == 1:
                break
            culprit = lo_n % len(vocab)
            wrapped = lo_n >= len(vocab)
            del vocab[culprit]
            hi = None
            if wrapped:
                lo_n, lo_t = 1, one_word if culprit else await count(1)
                one_word = lo_t
            continue
        else:
            step = round((wanted - lo_t) * (hi[0] - lo_n) / (hi[1] - lo_t))
            n = min(max(lo_n + step, lo_n + 1), hi[0] - 1)
        t = await count(n)
        if t <= wanted:
            rate = max((t - lo_t) / (n - lo_n), 0.1)
            lo_n, lo_t = n, t
        else:
            hi = (n, t)
    return Calibration(wanted, tuple(_words(vocab, lo_n)), lo_t, probes)


def _words(vocab: list[str], n: int) -> list[str]:
    return [vocab[i % len(vocab)] for i in range(n)]


class PromptBook:
    """Calibrated prompts for one endpoint and model, one calibration per length (cached).
    Each `messages` call shuffles the words anew, from a seeded generator."""

    def __init__(self, probe: Probe, seed: int = 0) -> None:
        self._probe = probe
        self._rng = random.Random(seed)
        self._calibrations: dict[int, Calibration] = {}

    async def calibrate(self, lengths: Iterable[int]) -> list[Calibration]:
        for wanted in lengths:
            if wanted not in self._calibrations:
                self._calibrations[wanted] = await calibrate(self._probe, wanted)
        return list(self._calibrations.values())

    def calibration(self, wanted: int) -> Calibration:
        return self._calibrations[wanted]

    def messages(self, wanted: int) -> Messages:
        """A fresh prompt of the calibrated length `wanted` (calibrate it first)."""
        words = list(self._calibrations[wanted].words)
        self._rng.shuffle(words)
        return render(words)

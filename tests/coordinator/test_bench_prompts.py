"""Exact prompt lengths from an endpoint's own token counts, searched with few probes."""

from __future__ import annotations

import pytest

from coordinator.bench.errors import PromptLengthError
from coordinator.bench.prompts import INSTRUCTION, WORDS, Messages, PromptBook, calibrate


class Tokenizer:
    """A fake endpoint's counting: a template overhead, one token per word except `heavy`."""

    def __init__(self, overhead: int = 9, heavy: dict[str, int] | None = None) -> None:
        self.overhead = overhead
        self.heavy = heavy or {}
        self.probes = 0

    def count(self, messages: Messages) -> int:
        words = messages[0]["content"].split()
        return self.overhead + sum(self.heavy.get(w, 1) for w in words)

    async def probe(self, messages: Messages) -> int:
        self.probes += 1
        return self.count(messages)


@pytest.mark.parametrize("wanted", [20, 128, 2048, 8192])
async def test_one_token_words_hit_the_length_in_two_probes(wanted: int) -> None:
    tokenizer = Tokenizer()
    calibration = await calibrate(tokenizer.probe, wanted)
    assert calibration.exact and calibration.tokens == wanted
    assert calibration.probes == tokenizer.probes <= 2


async def test_words_of_several_tokens_are_still_hit_exactly() -> None:
    tokenizer = Tokenizer(heavy={"and": 2, "of": 3, "machine": 2})
    calibration = await calibrate(tokenizer.probe, 500)
    assert calibration.exact
    assert calibration.probes <= 8


async def test_a_word_that_makes_a_gap_is_dropped() -> None:
    # 9 + 10 instruction + "the" = 20; "and" is 2 tokens: 21 falls between 1 and 2 words.
    tokenizer = Tokenizer(heavy={"and": 2})
    calibration = await calibrate(tokenizer.probe, 21)
    assert calibration.exact and calibration.words == ("the", "of")
    assert calibration.probes == 3


async def test_many_words_of_several_tokens_are_dropped_until_the_length_is_hit() -> None:
    # After the first word ("the") every word is 2 tokens: 9 + 10 + 1 + 2k never makes 65,
    # until words that leave a gap are dropped and "the" comes round more often.
    tokenizer = Tokenizer(heavy={w: 2 for w in WORDS if w != "the"})
    calibration = await calibrate(tokenizer.probe, 65, max_probes=100)
    assert calibration.exact
    assert calibration.words.count("the") > 1
    assert len(set(calibration.words)) < len(WORDS)


async def test_an_unreachable_length_is_the_closest_below_and_not_exact() -> None:
    heavy = {w: 2 for w in [*WORDS, *INSTRUCTION.split()]}  # every word 2 tokens: even counts
    tokenizer = Tokenizer(overhead=10, heavy=heavy)
    calibration = await calibrate(tokenizer.probe, 101, max_probes=12)
    assert not calibration.exact
    assert calibration.tokens == 100 and calibration.probes <= 12


async def test_a_length_shorter_than_the_template_is_refused() -> None:
    with pytest.raises(PromptLengthError, match="--prompt-tokens 5: too short"):
        await calibrate(Tokenizer().probe, 5)


async def test_the_book_calibrates_each_length_once_and_shuffles_every_prompt() -> None:
    tokenizer = Tokenizer(heavy={"of": 2})
    book = PromptBook(tokenizer.probe, seed=1)
    await book.calibrate([64, 256])
    probes = tokenizer.probes
    await book.calibrate([256, 64])
    assert tokenizer.probes == probes  # cached
    prompts = [book.messages(256) for _ in range(5)]
    assert all(tokenizer.count(p) == 256 for p in prompts)  # order does not change the count
    assert len({p[0]["content"] for p in prompts}) == 5  # no two alike: no prefix cache hit
    assert all(p[0]["content"].startswith(INSTRUCTION) for p in prompts)
    assert sorted(prompts[0][0]["content"].split()) == sorted(prompts[1][0]["content"].split())
    again = PromptBook(Tokenizer(heavy={"of": 2}).probe, seed=1)
    await again.calibrate([256])
    assert again.messages(256) == prompts[0]  # the same seed, the same prompts


async def test_a_length_the_endpoint_refuses_is_named() -> None:
    async def refuse(messages: Messages) -> int:
        if len(messages[0]["content"].split()) > 100:
            raise PromptLengthError("the endpoint refused 4000 words: HTTP 400: too long")
        return len(messages[0]["content"].split())

    with pytest.raises(PromptLengthError) as caught:
        await calibrate(refuse, 4096)
    assert str(caught.value) == (
        "--prompt-tokens 4096: the endpoint refused 4000 words: HTTP 400: too long"
    )

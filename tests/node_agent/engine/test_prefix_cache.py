"""The prefix cache on its own, with mlx-lm's real KVCache objects (no model): longest-prefix
lookup, copies a request may write into, prefix entries folded, LRU under the byte budget."""

from __future__ import annotations

import copy

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from node_agent.engine.prefix_cache import BLOCK_TOKENS, PrefixCache

LAYERS, HEADS, DIM = 2, 2, 4


def kv(tokens: list[int]) -> list[KVCache]:
    """Per-layer caches whose every position holds its token id (so a trim is visible)."""
    cache = []
    for _ in range(LAYERS):
        c = KVCache()
        values = mx.broadcast_to(
            mx.array(tokens, dtype=mx.float32)[None, None, :, None], (1, HEADS, len(tokens), DIM)
        )
        c.update_and_fetch(values, values)
        cache.append(c)
    mx.eval([c.keys for c in cache])
    return cache


def held(cache: list[KVCache]) -> list[int]:
    keys, _ = cache[0].keys_and_values()  # up to the offset
    return [int(x) for x in keys[0, 0, :, 0].tolist()]


PROMPT = list(range(1000, 1100))  # 100 tokens: three whole blocks and a bit


def test_a_new_question_after_a_cached_prefix_starts_from_it() -> None:
    cache = PrefixCache(budget_bytes=1 << 20)
    assert cache.lookup(PROMPT) == (None, 0)  # a miss on an empty cache
    cache.insert(PROMPT, kv(PROMPT))
    follow_up = PROMPT + [7, 8, 9]
    found, n = cache.lookup(follow_up)
    assert n == len(PROMPT) and found is not None and held(found) == PROMPT
    # The same prompt again: all but its last token (which must run to give the first logits).
    again, n = cache.lookup(PROMPT)
    assert n == len(PROMPT) - 1 and again is not None and held(again) == PROMPT[:-1]
    # Diverging inside the fourth block: the whole blocks, then token by token.
    diverged = PROMPT[:70] + [1, 2, 3, 4, 5]
    part, n = cache.lookup(diverged)
    assert n == 70 and part is not None and held(part) == PROMPT[:70]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.tokens_saved) == (3, 1, 100 + 99 + 70)


def test_a_request_writes_into_its_copy_never_into_the_entry() -> None:
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.insert(PROMPT, kv(PROMPT))
    mine, n = cache.lookup(PROMPT + [5])
    assert mine is not None
    more = mx.full((1, HEADS, 3, DIM), -1.0)
    for layer in mine:  # what decoding does to the request's cache
        layer.update_and_fetch(more, more)
    assert held(mine) == PROMPT + [-1, -1, -1]
    theirs, _ = cache.lookup(PROMPT + [6])
    assert theirs is not None and held(theirs) == PROMPT


def test_short_prompts_and_no_match_are_misses() -> None:
    cache = PrefixCache(budget_bytes=1 << 20)
    short = list(range(BLOCK_TOKENS))
    cache.insert(short, kv(short))  # one block or less: not worth an entry
    assert cache.stats().entries == 0
    cache.insert(PROMPT, kv(PROMPT))
    assert cache.lookup(list(range(5000, 5100)))[1] == 0
    assert cache.lookup(PROMPT[:10] + list(range(50)))[1] == 0  # less than a block in common


def test_an_entry_that_is_a_prefix_of_a_newer_one_is_folded_into_it() -> None:
    """A conversation's turns: each turn's entry contains the one before."""
    cache = PrefixCache(budget_bytes=1 << 20)
    turn1 = PROMPT
    turn2 = PROMPT + list(range(2000, 2080))
    cache.insert(turn1, kv(turn1))
    cache.insert(turn2, kv(turn2))
    stats = cache.stats()
    assert stats.entries == 1 and stats.bytes == sum(c.nbytes for c in kv(turn2))
    found, n = cache.lookup(turn1 + [1])
    assert n == len(turn1) and found is not None and held(found) == turn1


def test_entries_leave_least_recently_used_first_within_the_budget() -> None:
    size = sum(c.nbytes for c in kv(PROMPT))
    cache = PrefixCache(budget_bytes=2 * size)
    a, b, c = (list(range(s, s + 100)) for s in (10_000, 20_000, 30_000))
    cache.insert(a, kv(a))
    cache.insert(b, kv(b))
    assert cache.lookup(a + [1])[1] == 100  # a is now the most recently used
    cache.insert(c, kv(c))  # over the budget: b goes
    assert cache.stats().bytes <= cache.budget_bytes and cache.stats().entries == 2
    assert cache.lookup(b + [1])[1] == 0
    assert cache.lookup(a + [1])[1] == 100 and cache.lookup(c + [1])[1] == 100
    huge = PrefixCache(budget_bytes=size - 1)
    huge.insert(a, kv(a))  # an entry over the whole budget is not kept
    assert huge.stats().entries == 0


def test_clear_frees_everything_and_a_zero_budget_keeps_nothing() -> None:
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.insert(PROMPT, kv(PROMPT))
    freed = cache.clear()
    assert freed > 0 and cache.stats().bytes == 0 and cache.lookup(PROMPT + [1])[1] == 0
    off = PrefixCache(budget_bytes=0)
    off.insert(PROMPT, kv(PROMPT))
    assert off.stats().entries == 0 and off.lookup(PROMPT + [1]) == (None, 0)


def test_a_group_rank_counts_tokens_at_the_whole_models_bytes_whatever_it_holds() -> None:
    """Ranks of a group hold different layers (and mlxfleet's layer split a marker value for
    the others'): counted in tokens x the whole model's bytes, every rank evicts alike."""
    whole_model_token_bytes = 1000
    small, large = kv(PROMPT), kv(PROMPT) + kv(PROMPT)  # one rank's layers, another's
    ranks = [PrefixCache(250_000, token_bytes=whole_model_token_bytes) for _ in range(2)]
    a, b, c = (list(range(s, s + 100)) for s in (10_000, 20_000, 30_000))
    for prefix, held_kv in zip(ranks, (small, large), strict=True):
        for tokens in (a, b, c):
            prefix.insert(tokens, copy.deepcopy(held_kv))
    for prefix in ranks:  # 100 tokens x 1000 bytes each: two fit in 250,000; a went first
        assert (prefix.stats().bytes, prefix.stats().entries) == (200_000, 2)
        assert prefix.lookup(a + [1])[1] == 0 and prefix.lookup(c + [1])[1] == 100

"""The engine's prefix cache: the KV of token sequences it has processed, reused by later requests
that begin the same way (an agent's system prompt, tools and conversation so far).

Entries are whole sequences: a finished request's prompt and answer with the KV mlx-lm extracted
for it. An index of chained block hashes (vLLM's idea: block i's hash covers blocks 0..i) finds
the entries sharing the longest run of whole blocks with a new prompt in one pass over its
blocks; the match is then extended token by token. The entry's KV is copied and trimmed to the
match, so the entry stays intact and the new request owns its copy: nothing a request does
writes into the cache. Entries are evicted least recently used first under a byte budget, and
an entry that is a prefix of a newer one is dropped (the newer one serves both).

Running requests' KV lives in the decode batch, never here, so no eviction touches it. Owned by
the model thread: not thread-safe.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

BLOCK_TOKENS = 32  # the index's granularity: a shorter shared prefix is not worth a copy


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What the cache holds and has done, for /v1/engine/stats and the metrics."""

    budget_bytes: int
    bytes: int
    entries: int
    hits: int  # requests that started from a cached prefix
    misses: int
    tokens_saved: int  # prompt tokens not prefilled thanks to the cache


@dataclass(slots=True)
class _Entry:
    tokens: tuple[int, ...]  # exactly the tokens whose KV `cache` holds
    cache: list[Any]  # one mlx-lm cache object per layer
    nbytes: int
    hashes: tuple[int, ...]  # the chained hash of each whole block


def block_hashes(tokens: tuple[int, ...] | list[int], block: int = BLOCK_TOKENS) -> list[int]:
    """Chained hashes of the whole blocks of `tokens`: equal hashes at i mean (up to hash
    collisions, which the token comparison after the lookup catches) equal tokens up to i."""
    hashes, previous = [], 0
    for start in range(0, len(tokens) - block + 1, block):
        previous = hash((previous, tuple(tokens[start : start + block])))
        hashes.append(previous)
    return hashes


def common_length(a: tuple[int, ...], b: list[int], start: int) -> int:
    """Length of the common prefix of a and b, known equal up to `start`."""
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """KV of processed sequences by prefix, LRU under `budget_bytes` (0: off)."""

    def __init__(self, budget_bytes: int, block: int = BLOCK_TOKENS, token_bytes: int = 0) -> None:
        self.budget_bytes = budget_bytes
        # A group's rank holds some of the layers (and mlxfleet's layer split a marker value
        # for each of the others): it counts an entry as tokens x the whole model's KV bytes
        # per token (mlxfleet.kv), the same on every rank, so all keep and evict alike. 0: an
        # engine alone counts the bytes its entries hold.
        self._token_bytes = token_bytes
        self._block = block
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._index: dict[int, set[int]] = {}  # block-chain hash -> entries holding it
        self._ids = 0
        self._bytes = 0
        self._hits = self._misses = self._saved = 0

    def stats(self) -> CacheStats:
        return CacheStats(
            self.budget_bytes,
            self._bytes,
            len(self._entries),
            self._hits,
            self._misses,
            self._saved,
        )

    def lookup(self, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A copy of the KV of the longest cached prefix of `tokens`, and its length (0 and
        None on a miss). At most len(tokens) - 1: the last prompt token must still run through
        the model to give the first logits."""
        if self.budget_bytes <= 0 or len(tokens) <= self._block:
            return None, 0
        holders: set[int] = set()
        for h in block_hashes(tokens, self._block):
            deeper = self._index.get(h)
            if not deeper:
                break
            holders = deeper
        # Every holder shares the deepest whole block; the longest match past it wins. The
        # comparison from token 0 also rules out a hash collision.
        best_id, matched = -1, 0
        for entry_id in holders:
            length = common_length(self._entries[entry_id].tokens, tokens, 0)
            if length > matched:
                best_id, matched = entry_id, length
        matched = min(matched, len(tokens) - 1)
        if best_id < 0 or matched < self._block:
            self._misses += 1
            return None, 0
        best = self._entries[best_id]
        self._entries.move_to_end(best_id)
        cache = copy.deepcopy(best.cache)
        if matched < len(best.tokens):
            trim_prompt_cache(cache, len(best.tokens) - matched)
        self._hits += 1
        self._saved += matched
        return cache, matched

    def insert(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep `cache` (the KV of exactly `tokens`) for later requests. A cache mlx-lm
        cannot trim could only serve its exact sequence, so it is not kept."""
        if self.budget_bytes <= 0 or len(tokens) <= self._block or not can_trim_prompt_cache(cache):
            return
        nbytes = len(tokens) * self._token_bytes or sum(c.nbytes for c in cache)
        if nbytes > self.budget_bytes:
            return
        key = tuple(tokens)
        hashes = tuple(block_hashes(key, self._block))
        sharing = {entry_id for h in hashes for entry_id in self._index.get(h, ())}
        for entry_id in sharing:
            held = self._entries[entry_id].tokens
            if len(held) <= len(key) and key[: len(held)] == held:
                self._drop(entry_id)  # a prefix of the new entry: it serves that too
        self._ids += 1
        self._entries[self._ids] = _Entry(key, cache, nbytes, hashes)
        for h in hashes:
            self._index.setdefault(h, set()).add(self._ids)
        self._bytes += nbytes
        while self._bytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> int:
        """Drop every entry (memory pressure); returns the bytes freed."""
        freed = self._bytes
        self._entries.clear()
        self._index.clear()
        self._bytes = 0
        return freed

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self._bytes -= entry.nbytes
        for h in entry.hashes:
            holders = self._index.get(h)
            if holders is not None:
                holders.discard(entry_id)
                if not holders:
                    del self._index[h]

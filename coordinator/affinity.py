"""Cache-aware routing: which replica holds the beginning of a request.

Every engine keeps the KV of what it has processed (its prefix cache), so a follow-up turn of a
conversation is cheapest on the replica that served the turn before. The gateway cannot see the
engines' tokens, so it keys requests the way they grow: a chat request is its tools, then each
message in turn, and a chained hash covers each leading part (the tools and messages 0..i), as
vLLM chains block hashes. Serving a request remembers all its keys for the engine that served
it; a later request's longest remembered key names the engine most likely to hold its prefix.

The table only advises: an engine that evicted the prefix still answers correctly (it prefills
again), and the Router's order and spill decide whenever no holder qualifies (routing.py).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.registry import EngineId

MAX_KEYS = 65_536  # remembered prefixes (about 100 bytes each), least recently used dropped
# A match covering less than this share of the request (only a shared system prompt, say) does
# not bind it: the Router spreads such requests as it would without a cache.
MIN_SHARE = 0.5
# The holder may have this many more requests in flight than the least loaded replica.
BALANCE_SLACK = 2
PROMPT_BLOCK_CHARS = 1024  # a completion prompt is keyed in blocks of this many characters


@dataclass(frozen=True, slots=True)
class Prefix:
    """A request's keys, one per leading part, and how many characters each part covers."""

    keys: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()  # cumulative: sizes[i] is the length of parts 0..i
    # Leading parts many conversations share (tools, template options, system prompts): a
    # match on these alone does not bind a request to a replica.
    preamble: int = 0


NO_PREFIX = Prefix()


def _chained(parts: Iterable[str], preamble: int = 0) -> Prefix:
    keys, sizes, key, size = [], [], 0, 0
    for part in parts:
        key = hash((key, part))
        size += len(part)
        keys.append(key)
        sizes.append(size)
    return Prefix(tuple(keys), tuple(sizes), preamble)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def chat_prefix(body: dict[str, Any]) -> Prefix:
    """Keys of a chat body: what the template renders first (tools, template options), then
    each message."""
    head = _compact([body.get("tools"), body.get("chat_template_kwargs")])
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    system = 0
    while system < len(messages) and _role(messages[system]) in ("system", "developer"):
        system += 1
    return _chained([head, *map(_compact, messages)], preamble=1 + system)


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def prompt_prefix(prompt: Any) -> Prefix:
    """Keys of a completion prompt, block by block."""
    text = prompt if isinstance(prompt, str) else _compact(prompt)
    return _chained(
        text[start : start + PROMPT_BLOCK_CHARS]
        for start in range(0, len(text), PROMPT_BLOCK_CHARS)
    )


class PrefixAffinity:
    """Remembered prefixes and the engines that served each. Use from the event loop."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._max_keys = max_keys
        # key -> the engines that served it, most recent last (a shared system prompt soon
        # has several; a conversation's own turns one).
        self._holders: OrderedDict[int, dict[EngineId, None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def remember(self, prefix: Prefix, engine_id: EngineId) -> None:
        """`engine_id` serves this request: it will hold every leading part of it."""
        for key in prefix.keys:
            holders = self._holders.setdefault(key, {})
            holders.pop(engine_id, None)
            holders[engine_id] = None
            self._holders.move_to_end(key)
        while len(self._holders) > self._max_keys:
            self._holders.popitem(last=False)

    def holder(
        self, prefix: Prefix, load: Mapping[EngineId, int], slack: int = BALANCE_SLACK
    ) -> EngineId | None:
        """The engine to serve this request for its cache, among the candidates in `load`
        (engine -> requests in flight): of those that served the longest leading part of it,
        the least loaded. None (the Router decides) when no part beyond the shared preamble and
        of at least MIN_SHARE of the request is held, or when the holder has more than `slack`
        requests in flight above the least loaded candidate: a cache hit does not justify a
        queue. Without the preamble rule every new conversation would follow the first replica
        that saw the team's system prompt, and pile up there."""
        if not prefix.keys or not load:
            return None
        floor = MIN_SHARE * prefix.sizes[-1]
        for depth in range(len(prefix.keys) - 1, -1, -1):
            key, size = prefix.keys[depth], prefix.sizes[depth]
            if size < floor or depth < prefix.preamble:
                return None
            held = [e for e in self._holders.get(key, ()) if e in load]
            if held:
                best = min(held, key=load.__getitem__)
                return best if load[best] - min(load.values()) <= slack else None
        return None

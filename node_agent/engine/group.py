"""One model across several Macs: the ranks of an MLX distributed pipeline group.

The agent starts one engine per member with MLX's own environment (MLX_RANK and MLX_HOSTFILE:
the ring backend over TCP, every other rank reached through the agent's rank link,
node_agent/rank_link.py). Rank 0 runs the last layers, the highest rank the first, and each rank
holds only its share of the weights and of the KV cache. Where mlx-lm's model has `pipeline()`
(PipelineMixin, in mlx-lm 0.32.2: Qwen2, Qwen3-MoE, Qwen3-Next, Qwen3.5, DeepSeek V2/V3/V3.2,
Kimi, GLM4-MoE, Ministral 3, Mistral 4, ...), `model.model.pipeline(group, split)` splits it;
any other architecture runs under our own layer split over MLX's send and receive
(layer_split.py: Llama and Mistral, Qwen3, Gemma, Phi-3, gpt-oss, ...), or is refused at load
in one line saying why (recurrent and hybrid models).

Rank 0 serves HTTP and runs the model thread as a single engine does; every other rank runs
the same decoder (batched.py) in lockstep, as mlx_lm.server does. Before each decode step rank
0 sends, in one message over the group itself, what changed since the last: sequences started
(prompt ids, max tokens and a sampling recipe: the request's parameters with a fixed seed, and
its grammar's text), sequences removed, the batch size, cache drops. So every rank's
BatchGenerator, samplers, grammars and prefix cache take the same decisions and draw the same
tokens. An idle rank 0 sends a beat every tick (--group-idle-tick-ms, 25 ms), and the other ranks
sleep until just before the next: MLX's ring would have them spin in its receive, a core each.
With a tick of 0 they wait in the receive and rank 0 beats every quarter of the stall limit.

A rank stuck in a collective for the stall limit (a dead or hung peer, a cut link) exits, and
so does one whose step fails: a group out of lockstep cannot be mended in place. Its agent
reports the exit, the coordinator unloads the other members and places the group again, and
streams continue on the replacement from their token ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import mlx.core as mx
import numpy as np

from mlxfleet.kv import kv_bytes_per_token
from mlxfleet.openai.sampling import SamplingParams
from node_agent.engine.config import BEAT_FRACTION, GroupSpec
from node_agent.engine.decoder import Decoder, NewSequences, Token
from node_agent.engine.layer_split import split_layers

logger = logging.getLogger(__name__)

EXIT_GROUP_LOST = 3  # the group broke (a peer died, hung or was cut off): place it again
LOAD_STALL_S = 300.0  # joining and loading wait for the slowest member's start, not a step
GRAMMAR_STALL_S = 60.0  # a step after which another rank compiled a request's grammar
WAKE_EARLY_S = 0.0015  # an idle follower is back in the receive this long before the next beat


@dataclass(frozen=True, slots=True)
class Recipe:
    """How every rank builds one sequence's sampler and processors: the request's sampling
    parameters (with a seed fixed by rank 0 when it sampled at random) and its grammar."""

    params: SamplingParams
    grammar: tuple[str, str, tuple[int, ...]] | None = None  # (lark text, param, sent ids)


def recipe_for(params: SamplingParams, grammar: Any) -> Recipe:
    """Rank 0's recipe: a random draw gets a seed now, so every rank draws the same."""
    if params.temperature > 0.0 and params.seed is None:
        params = replace(params, seed=int.from_bytes(os.urandom(7), "big"))
    return Recipe(params, None if grammar is None else grammar.recipe)


class Watchdog:
    """Ends the process when one collective takes longer than the stall limit. MLX releases
    the GIL while it waits on a socket, so this thread runs while the model thread is stuck."""

    def __init__(self, stall_s: float, on_stall: Callable[[str], None] | None = None) -> None:
        self.stall_s = stall_s
        self._on_stall = on_stall or _exit_lost
        self._since: float | None = None
        self._what = ""
        self._limit = LOAD_STALL_S
        self._thread = threading.Thread(
            target=self._watch, name="mlxfleet-group-watch", daemon=True
        )
        self._thread.start()

    @contextmanager
    def waiting(self, what: str, limit_s: float | None = None) -> Iterator[None]:
        self._what, self._limit = what, limit_s or self.stall_s
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(self.stall_s, 1.0) / 4)
            since = self._since
            if since is not None and time.monotonic() - since > self._limit:
                self._on_stall(f"{self._what} took more than {self._limit:.1f} s")
                return


def _exit_lost(why: str) -> NoReturn:
    logger.error("group lost: %s; exiting so that the group is placed again", why)
    logging.shutdown()
    os._exit(EXIT_GROUP_LOST)


def join(spec: GroupSpec) -> Any:
    """MLX's ring group from the environment the agent set; every rank must name the same
    group and split (a rank of another group is refused here, after the link let it in)."""
    group = mx.distributed.init(backend="ring", strict=True)
    if group.size() != len(spec.split):
        raise ValueError(f"the split names {len(spec.split)} ranks, MLX_HOSTFILE {group.size()}")
    text = f"{spec.group_id}:{','.join(map(str, spec.split))}".encode()
    digest = int.from_bytes(hashlib.sha256(text).digest()[:4], "big") & 0x7FFFFFFF
    seen = mx.distributed.all_gather(mx.array([digest], dtype=mx.int32), group=group, stream=mx.cpu)
    if set(seen.tolist()) != {digest}:  # type: ignore[arg-type]
        raise ValueError("a rank of another group (or with another layer split) joined")
    return group


def load_shard(model_path: Path, group: Any, split: tuple[int, ...]) -> tuple[Any, Any]:
    """This rank's layers of the model (lazily loaded: the others are never read)."""
    import mlx_lm

    loaded = mlx_lm.load(str(model_path), lazy=True)
    model, tokenizer = loaded[0], loaded[1]
    inner: Any = getattr(model, "model", None)
    if splits_by_mlx_lm(model):
        inner.pipeline(group, list(split))
    else:
        split_layers(model, group, list(split))
    mx.eval(model.parameters())
    return model, tokenizer


def splits_by_mlx_lm(model: Any) -> bool:
    """Whether mlx-lm's own pipeline() splits this model (else layer_split.py does)."""
    return hasattr(getattr(model, "model", None), "pipeline")


# The two commonest messages are one sum of a size that no message has: a plain step, a beat.
_STEP, _BEAT = 0, -1
_OPS: dict[int, tuple[str]] = {_STEP: ("step",), _BEAT: ("beat",)}


class Channel:
    """Rank 0's messages to every other rank, over the group itself (two sums: the size,
    then the bytes; a plain step and a beat are a size alone). Used on the model thread only,
    but for ask_drop.

    The size's sum carries one answer back: whether another rank was asked to drop its prefix
    cache (its agent saw memory pressure). A rank cannot drop alone, or the ranks' caches would
    differ: rank 0 then drops, and sends the drop to all, at the same point of the lockstep."""

    def __init__(self, group: Any, watchdog: Watchdog) -> None:
        self._group = group
        self.watchdog = watchdog
        self.sent_bytes = 0
        self.beats_sent = 0
        self._drops: list[Future[int]] = []  # a follower's drop requests, until rank 0's drop
        self._drops_lock = threading.Lock()

    def send(self, ops: list[tuple[Any, ...]]) -> bool:
        """Send `ops` to the others; whether one of them asks for a prefix-cache drop."""
        size = next((n for n, op in _OPS.items() if ops == [op]), None)
        data = b"" if size is not None else pickle.dumps(ops)
        with self.watchdog.waiting("sending to the group"):
            total = self._sum(mx.array([len(data) if size is None else size, 0], dtype=mx.int32))
            if data:
                self._sum(mx.array(np.frombuffer(data, dtype=np.uint8)))
        self.sent_bytes += len(data)
        self.beats_sent += size == _BEAT
        return total[1].item() != 0

    def ask_drop(self) -> Future[int]:
        """A follower's prefix-cache drop, asked from any thread; done (bytes freed) once rank
        0's drop has come and run here."""
        done: Future[int] = Future()
        with self._drops_lock:
            self._drops.append(done)
        return done

    def dropped(self, freed: int) -> None:
        with self._drops_lock:
            done, self._drops = self._drops, []
        for future in done:
            future.set_result(freed)

    def receive(self) -> list[tuple[Any, ...]]:
        # Idle, rank 0 beats every tick (or BEAT_FRACTION of the stall limit): a silent rank 0
        # is lost.
        with self.watchdog.waiting("waiting for rank 0"):
            asking = 1 if self._drops else 0
            total = self._sum(mx.array([0, asking], dtype=mx.int32))
            size: int = total[0].item()  # type: ignore[assignment]
            if size <= 0:
                return [_OPS[size]]
            data = self._sum(mx.zeros(size, dtype=mx.uint8))
        # Only group members reach this socket (the rank link checks certificates).
        ops: list[tuple[Any, ...]] = pickle.loads(np.array(data).tobytes())  # noqa: S301
        return ops

    def _sum(self, x: mx.array) -> mx.array:
        # On the stream mlx-lm's generator runs the model on (one per thread): on any other,
        # this sum runs beside a step's own sends and receives on the same sockets, and the
        # ranks read each other's bytes as activations (seen: greedy text diverging).
        from mlx_lm.generate import generation_stream

        total = mx.distributed.all_sum(x, group=self._group, stream=generation_stream)
        mx.eval(total)
        return total


class GroupLeader(Decoder):
    """Rank 0's decoder: the local one, with every call sent to the other ranks first."""

    def __init__(
        self,
        local: Decoder,
        channel: Channel,
        watchdog: Watchdog,
        on_step: Callable[[float], None] = lambda seconds: None,
        idle_tick_s: float = 0.0,
    ) -> None:
        self._local = local
        self._beat_s = idle_tick_s or watchdog.stall_s * BEAT_FRACTION
        self._on_step = on_step
        self._channel = channel
        self._watchdog = watchdog
        self._ops: list[tuple[Any, ...]] = []
        self._slots: int | None = None
        self._last_sent = time.monotonic()

    def slots(self, max_concurrency: int) -> int:
        if max_concurrency != self._slots:
            self._ops.append(("slots", max_concurrency))
            self._slots = max_concurrency
        return self._local.slots(max_concurrency)

    def _start(self, new: NewSequences) -> list[int]:
        if new.recipes is None:
            raise ValueError("a group needs each sequence's sampling recipe")
        self._ops.append(("insert", new.prompts, new.max_tokens, new.recipes, new.ignore_eos))
        return self._local.insert(
            new.prompts, new.max_tokens, new.samplers, new.ignore_eos, new.processors
        )

    def remove(self, uid: int) -> None:
        self._ops.append(("remove", uid))
        self._local.remove(uid)

    def step(self) -> list[Token]:
        began = time.monotonic()
        # A rank compiles a new sequence's grammar before its step: on a large vocabulary that
        # takes seconds, which are no stall.
        compiling = any(op[0] == "insert" and any(r.grammar for r in op[3]) for op in self._ops)
        asked = self._flush(("step",))
        try:
            with self._watchdog.waiting("a decode step", GRAMMAR_STALL_S if compiling else None):
                tokens = self._local.step()
        except Exception as exc:
            # Exit now, before the model thread fails the running requests: their streams
            # must break (the gateway then continues them on the replacement), not end.
            _exit_lost(f"a decode step failed: {type(exc).__name__}: {exc}")
        self._on_step(time.monotonic() - began)
        if asked:  # after this step: where the others run the drop, first in the next message
            self.drop_cache()
        return tokens

    def idle(self) -> None:
        if time.monotonic() - self._last_sent >= self._beat_s and self._flush(("beat",)):
            self.drop_cache()

    def idle_interval_s(self) -> float | None:
        return self._beat_s

    def cached(self, uid: int) -> int:
        return self._local.cached(uid)

    def cache_stats(self) -> Any:
        return self._local.cache_stats()

    def drop_cache(self) -> int:
        """Drop here and, in a message sent now, on the others (all between the same steps)."""
        self._ops.append(("drop_cache",))
        freed = self._local.drop_cache()
        self._flush(("beat",))
        return freed

    def reset(self) -> None:
        # A failed step leaves the ranks out of lockstep: only a new group mends that.
        _exit_lost("a decode step failed")

    def warm_up(self, prompt_ids: list[int], max_tokens: int) -> None:
        self._flush(("warm_up", prompt_ids, max_tokens))
        with self._watchdog.waiting("warming up", LOAD_STALL_S):
            self._local.warm_up(prompt_ids, max_tokens)

    def close(self) -> None:
        self._flush(("stop",))

    def _flush(self, last: tuple[Any, ...]) -> bool:
        """Send the ops so far and `last`; whether another rank asks for a cache drop."""
        ops, self._ops = [*self._ops, last], []
        try:
            asked = self._channel.send(ops)
        except Exception as exc:  # a peer lost: the same as a failed step
            _exit_lost(f"sending to the group failed: {type(exc).__name__}: {exc}")
        self._last_sent = time.monotonic()
        return asked


def follow(
    local: Decoder,
    channel: Channel,
    build: Callable[[Recipe], tuple[Any, list[Any]]],
    stats: Callable[[float], None],
    idle_tick_s: float = 0.0,
) -> None:
    """A rank other than 0: do what rank 0 sends, in order, until it says stop. `build` makes
    a sequence's sampler and processors from its recipe; `stats` gets each step's seconds.
    After a beat alone (rank 0 is idle) it sleeps until just before the next tick."""
    while True:
        ops = channel.receive()
        if idle_tick_s and ops == [("beat",)]:
            time.sleep(max(0.0, idle_tick_s - WAKE_EARLY_S))
            continue
        for op in ops:
            kind = op[0]
            if kind == "step":
                began = time.monotonic()
                with channel.watchdog.waiting("a decode step"):
                    local.step()
                stats(time.monotonic() - began)
            elif kind == "insert":
                _, prompts, max_tokens, recipes, ignore_eos = op
                built = [build(r) for r in recipes]
                local.insert(
                    prompts,
                    max_tokens,
                    [sampler for sampler, _ in built],
                    ignore_eos,
                    [processors for _, processors in built],
                )
            elif kind == "remove":
                local.remove(op[1])
            elif kind == "slots":
                local.slots(op[1])
            elif kind == "drop_cache":
                channel.dropped(local.drop_cache())
            elif kind == "warm_up":
                with channel.watchdog.waiting("warming up", LOAD_STALL_S):
                    local.warm_up(op[1], op[2])
            elif kind == "stop":
                return
            # "beat": nothing to do; it arrived, so rank 0 lives


class Rank:
    """This engine's place in its group: joined, its layers loaded (see the module's doc)."""

    def __init__(self, spec: GroupSpec, model_path: Path) -> None:
        self.spec = spec
        self.watchdog = Watchdog(spec.stall_s)
        with self.watchdog.waiting("joining the group", LOAD_STALL_S):
            self.group = join(spec)
            self.model, self.tokenizer = load_shard(model_path, self.group, spec.split)
        self.rank = int(self.group.rank())
        by_mlx_lm = splits_by_mlx_lm(self.model)
        self.split_by = "mlx-lm pipeline" if by_mlx_lm else "mlxfleet layer split"
        config = json.loads((model_path / "config.json").read_text())
        # What every rank counts a prefix-cached token at: the whole model's KV bytes.
        self.token_bytes = kv_bytes_per_token(config)
        self.channel = Channel(self.group, self.watchdog)
        self.steps = 0
        self.step_s_total = 0.0

    @property
    def layers(self) -> tuple[int, int]:
        """(first layer, layer count) this rank runs."""
        split = self.spec.split
        return sum(split[self.rank + 1 :]), split[self.rank]

    def wrap(self, local: Decoder) -> Decoder:
        """Rank 0's decoder sends every call to the others; theirs run what it sends."""
        if self.rank != 0:
            return local
        return GroupLeader(
            local, self.channel, self.watchdog, self._note_step, self.spec.idle_tick_s
        )

    def follow(self, local: Decoder, build: Callable[[Recipe], tuple[Any, list[Any]]]) -> None:
        """A rank other than 0: run until rank 0 says stop; exit the process if the group
        breaks (a peer lost, a failed step)."""
        try:
            follow(local, self.channel, build, self._note_step, self.spec.idle_tick_s)
        except Exception as exc:
            _exit_lost(f"{type(exc).__name__}: {exc}")

    def _note_step(self, seconds: float) -> None:
        self.steps += 1
        self.step_s_total += seconds

    def stats(self) -> dict[str, Any]:
        first, count = self.layers
        return {
            "group_id": self.spec.group_id,
            "rank": self.rank,
            "size": len(self.spec.split),
            "first_layer": first,
            "layers": count,
            "split_by": self.split_by,
            "steps": self.steps,
            "step_seconds_total": round(self.step_s_total, 6),
            "control_bytes_sent": self.channel.sent_bytes,
            "beats_sent": self.channel.beats_sent,
        }

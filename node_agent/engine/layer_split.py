"""A layer split of our own, over MLX's distributed send and receive, for architectures whose
mlx-lm model has no `pipeline()` (in mlx-lm 0.32.2: Llama and Mistral, Qwen3, Gemma, Phi-3,
Starcoder2, OLMo 2, Mixtral, gpt-oss, Cohere 2, ...).

It splits as mlx-lm's PipelineMixin does: rank 0 runs the last layers, the highest rank the
first; a rank receives the hidden state from the rank above before its first layer, sends it to
the rank below after its last, and after the model's last layer every rank takes rank 0's
hidden state (an all_gather), so every rank computes the same logits and samples alike.

Unlike PipelineMixin it leaves the model's code alone: each layer object changes class in
place. A layer this rank runs gains the sends and receives around its own call. Any other layer
drops its weights (they are never read from disk: the model is loaded lazily) but keeps its
attributes, and its call passes the hidden state through while it still appends to its KV cache
a one-value key and value per token. So the model's loop, the masks it builds from a cache's
offset by layer index (sliding windows, layer types), `make_cache()` and mlx-lm's batch cache
all see the layers and caches they expect, for a few bytes per token and layer.

What it needs of an architecture, checked at load or on the first forward pass (warm-up), each a
one-line refusal naming the architecture: a `layers` list with one layer per config layer; a
KVCache or RotatingKVCache per layer (recurrent and hybrid models keep other state: refused);
layers called once each, in order, on every forward pass; a layer's output is the hidden state
(one array). A model that carried other state from layer to layer would pass these checks and
answer differently from one engine: tests/node_agent/engine/test_layer_split.py compares every
rank against one process for Llama (plain and with sliding layers), Qwen3, Gemma, Gemma 3,
Phi-3, Starcoder2, OLMo 2, Mixtral, gpt-oss and Cohere 2; other architectures are not checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from node_agent.errors import SplitError

SPLITTABLE_CACHES = ("KVCache", "RotatingKVCache")


def kind_of(model: Any) -> str:
    """The model's architecture as mlx-lm names it (config.json's model_type)."""
    return str(getattr(getattr(model, "args", None), "model_type", type(model).__name__))


def split_layers(model: nn.Module, group: Any, split: list[int]) -> None:
    """Make `model` run this rank's share of `split` (layers per rank, rank 0's first, as
    mlx-lm's pipeline(group, split) takes it) in a group, in place, before its weights load."""
    kind = kind_of(model)
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise SplitError(f"{kind} models have no list of layers: our layer split cannot run them")
    if sum(split) != len(layers):
        raise SplitError(f"the split {split} names {sum(split)} layers, the model {len(layers)}")
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(model)
    kinds = {type(c).__name__ for c in caches}
    if len(caches) != len(layers) or not kinds <= set(SPLITTABLE_CACHES):
        held = ", ".join(sorted(kinds - set(SPLITTABLE_CACHES))) or f"{len(caches)} caches"
        raise SplitError(
            f"{kind} models keep {held} for {len(layers)} layers: our layer split runs models "
            f"with one {' or '.join(SPLITTABLE_CACHES)} per layer"
        )
    rank, size = group.rank(), group.size()
    first = sum(split[rank + 1 :])
    own = range(first, first + split[rank])
    order = _Order(kind, len(layers))
    _become(model, _pass, order)
    for index, layer in enumerate(layers):
        hooks = _Hooks(
            index=index,
            order=order,
            group=group,
            receive_from=rank + 1 if index == own.start and rank < size - 1 else None,
            send_to=rank - 1 if index == own.stop - 1 and rank > 0 else None,
            gather=index == len(layers) - 1,
        )
        if index in own:
            _become(layer, _run, hooks)
        else:
            layer.update(_emptied(layer.parameters()))
            _become(layer, _pass_through, hooks)


class _Order:
    """Which layer a forward pass calls next: a model that calls its layers in another order,
    or one more than once, or not all of them, would be split wrongly."""

    def __init__(self, kind: str, layers: int) -> None:
        self.kind, self.layers, self.next = kind, layers, 0

    def called(self, index: int) -> None:
        if index != self.next:
            after = f"after layer {self.next - 1}" if self.next else "first"
            raise SplitError(
                f"{self.kind} models call layer {index} {after}: our layer split runs models "
                "that call each layer once, in order"
            )
        self.next = index + 1

    def begin(self) -> None:
        self.next = 0

    def end(self) -> None:
        if self.next != self.layers:
            raise SplitError(
                f"{self.kind} models call {self.next} of their {self.layers} layers in a pass: "
                "our layer split runs models that call each layer once, in order"
            )


@dataclass(frozen=True, slots=True)
class _Hooks:
    """What one layer does around its call."""

    index: int
    order: _Order
    group: Any
    receive_from: int | None
    send_to: int | None
    gather: bool


def _emptied(tree: Any) -> Any:
    """The same tree of parameters with every array empty: nothing of it is ever loaded."""
    if isinstance(tree, dict):
        return {k: _emptied(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_emptied(v) for v in tree]
    return mx.zeros((0,), dtype=tree.dtype)


def _cache_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The KV cache a layer was called with (by keyword or position), or None."""
    from mlx_lm.models.cache import _BaseCache

    for value in (kwargs.get("cache"), *args):
        if isinstance(value, _BaseCache):
            return value
    return None


def _run(self: Any, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
    """A layer this rank runs: receive before the first, send after the last, then gather."""
    hooks: _Hooks = self._mlxfleet_split
    hooks.order.called(hooks.index)
    if hooks.receive_from is not None:
        x = mx.distributed.recv_like(x, hooks.receive_from, group=hooks.group)
    out = self._mlxfleet_base.__call__(self, x, *args, **kwargs)
    if not isinstance(out, mx.array):
        raise SplitError(
            f"{hooks.order.kind} layers return {type(out).__name__}, not the hidden state: our "
            "layer split cannot run them"
        )
    if hooks.send_to is not None:
        out = mx.distributed.send(out, hooks.send_to, group=hooks.group)
        # A prefill chunk evaluates only the caches: the send must be part of them (as in
        # mlx-lm's pipeline models), else the rank below waits for it forever.
        cache = _cache_of(args, kwargs)
        if cache is not None and isinstance(getattr(cache, "keys", None), mx.array):
            cache.keys = mx.depends(cache.keys, out)
    return _gathered(out, hooks)


def _pass_through(self: Any, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
    """A layer of another rank: the hidden state passes; the cache grows by one value a token,
    so that its offset (masks, positions, mlx-lm's batch bookkeeping) is the real layer's."""
    hooks: _Hooks = self._mlxfleet_split
    hooks.order.called(hooks.index)
    cache = _cache_of(args, kwargs)
    if cache is not None:
        marker = mx.zeros((x.shape[0], 1, x.shape[1], 1), dtype=x.dtype)
        cache.update_and_fetch(marker, marker)
    return _gathered(x, hooks)


def _pass(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The model's forward pass, checked to call each layer once, in order."""
    order: _Order = self._mlxfleet_split
    order.begin()
    out = self._mlxfleet_base.__call__(self, *args, **kwargs)
    order.end()
    return out


def _gathered(h: mx.array, hooks: _Hooks) -> mx.array:
    if not hooks.gather:
        return h
    return mx.distributed.all_gather(h, group=hooks.group)[: h.shape[0]]


_classes: dict[tuple[type, Callable[..., Any]], type] = {}


def _become(obj: nn.Module, call: Callable[..., Any], hooks: _Hooks | _Order) -> None:
    """Give `obj` (a layer, or the model) a subclass of its own class whose call is `call`."""
    base = type(obj)
    cls = _classes.get((base, call))
    if cls is None:
        members = {"__call__": call, "_mlxfleet_base": base}
        cls = type(f"Split{base.__name__}{call.__name__}", (base,), members)
        _classes[(base, call)] = cls
    object.__setattr__(obj, "_mlxfleet_split", hooks)  # a plain attribute, not a parameter
    obj.__class__ = cls

"""What sizing reads from a model's files, and a cache that reads them off the event loop.

A local MLX folder gives its tensor bytes (from the safetensors headers alone: no tensor is
read) and its config.json; a Hugging Face id gives the config.json of the local cache, if
there is one, and weights estimated from it (coordinator/memory.py). Reading can take a while
on a slow or network disk, so the reconciler never does it on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.errors import SizingError
from coordinator.memory import estimated_weight_bytes

logger = logging.getLogger(__name__)

SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # a header larger than this is not a safetensors file


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """A model as sizing sees it: tensor bytes and config.json."""

    weights: int
    config: Mapping[str, Any] | None  # None: a hub model not in the local cache yet


def safetensors_bytes(path: Path) -> int:
    """Tensor bytes in one safetensors file, from its header alone (no tensor is read)."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SizingError(f"{path.name}: too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > SAFETENSORS_HEADER_LIMIT:
            raise SizingError(f"{path.name}: header length {header_len} is not plausible")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SizingError(f"{path.name}: header is not JSON") from None
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = tensor["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SizingError(f"{path.name}: tensor {name!r} has no data_offsets") from None
        total += int(end) - int(start)
    return total


def weight_bytes(folder: Path) -> int:
    """All tensor bytes of an MLX model folder: weights, quantization scales and biases."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SizingError(f"{folder}: no .safetensors weights")
    return sum(safetensors_bytes(f) for f in files)


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise SizingError(f"{folder}: no config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SizingError(f"{folder}: config.json is not JSON") from None
    if not isinstance(config, dict):
        raise SizingError(f"{folder}: config.json is not an object")
    return config


def cached_hub_config(repo: str) -> dict[str, Any] | None:
    """config.json of a hub model already in the local Hugging Face cache (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo, "config.json")
    except ValueError:  # huggingface_hub's HFValidationError: "/no/such/folder" is no repo id
        raise SizingError(f"{repo!r} is neither a model folder nor a Hugging Face id") from None
    return read_config(Path(path).parent) if isinstance(path, str) else None


def read_model_files(source: str) -> ModelFiles:
    """A local model folder or a hub id, read from disk (blocking: call it off the loop)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return ModelFiles(weight_bytes(folder), read_config(folder))
    cached = cached_hub_config(source)
    if cached is None:
        return ModelFiles(0, None)
    return ModelFiles(estimated_weight_bytes(cached), cached)


def _read(source: str) -> ModelFiles | SizingError:
    try:
        return read_model_files(source)
    except SizingError as exc:
        return exc
    except OSError as exc:  # unreadable, vanished mid-read: as unsizable as a bad header
        return SizingError(f"{source}: {exc.strerror or exc}")


class ModelFileCache:
    """Each source's ModelFiles (or why it cannot be read), read once in a worker thread.

    Use from the event loop. `get` never blocks it: a first ask starts the read and answers
    None; `on_read` is called when a read is done, so the caller can look again. With no loop
    running (a script, a synchronous test) there is nothing to block, so `get` reads at once.
    The cache owns its read tasks; `close` cancels those still running.
    """

    def __init__(
        self,
        on_read: Callable[[], None],
        reader: Callable[[str], ModelFiles | SizingError] = _read,
    ) -> None:
        self._on_read = on_read
        self._reader = reader
        self._read: dict[str, ModelFiles | SizingError] = {}
        self._reading: dict[str, asyncio.Task[ModelFiles | SizingError]] = {}

    def get(self, source: str) -> ModelFiles | SizingError | None:
        """What `source` holds, why it cannot be sized, or None while it is being read."""
        if source in self._read:
            return self._read[source]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._read[source] = self._reader(source)
            return self._read[source]
        if source not in self._reading:
            task = asyncio.create_task(
                asyncio.to_thread(self._reader, source), name=f"read model files {source}"
            )
            task.add_done_callback(functools.partial(self._done, source))
            self._reading[source] = task
        return None

    async def settled(self) -> None:
        """Wait until every read started so far is done."""
        while self._reading:
            await asyncio.wait(list(self._reading.values()))

    def forget_missing(self) -> None:
        """Look hub models that were not in the local cache up again on the next ask."""
        for source, files in list(self._read.items()):
            if isinstance(files, ModelFiles) and files.config is None:
                del self._read[source]

    def close(self) -> None:
        for task in self._reading.values():
            task.cancel()
        self._reading.clear()

    def _done(self, source: str, task: asyncio.Task[ModelFiles | SizingError]) -> None:
        if self._reading.get(source) is task:
            del self._reading[source]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("reading the model files of %s failed: %r", source, exc)
            self._read[source] = SizingError(f"{source}: reading its files failed ({exc!r})")
        else:
            self._read[source] = task.result()
        self._on_read()

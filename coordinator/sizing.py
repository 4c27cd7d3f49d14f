"""What one engine of each unit needs, from its model's files and its knobs, never blocking.

The files are read off the event loop (coordinator/model_files.py); until they are, a unit
has no size and waits. The math is coordinator/memory.py's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from coordinator.config import ModelSpec
from coordinator.errors import SizingError
from coordinator.knobs import TierKnobs
from coordinator.memory import pipeline_shape, size_engine
from coordinator.model_files import ModelFileCache, ModelFiles
from coordinator.policy import UnitKey
from mlxfleet.kv import DEFAULT_CONTEXT_LENGTH


class Sizing:
    """Each unit's bytes per engine and context in force, cached. Use from the event loop.

    `on_read` is called when a model's files have been read, so the caller can look again.
    """

    def __init__(self, knobs: TierKnobs, on_read: Callable[[], None]) -> None:
        self._knobs = knobs
        self._files = ModelFileCache(on_read)
        self._sizes: dict[UnitKey, int | SizingError] = {}
        self._contexts: dict[UnitKey, int] = {}
        self._shapes: dict[UnitKey, tuple[int, int]] = {}

    def size(self, spec: ModelSpec) -> int | SizingError | None:
        """Bytes one engine of this unit needs, why it cannot be sized, or None while its
        model files are being read."""
        if spec.key not in self._sizes:
            files = self._files.get(spec.source)
            if files is None:
                return None
            self._sizes[spec.key] = self._measure(spec, files)
        return self._sizes[spec.key]

    def shape(self, spec: ModelSpec) -> tuple[int, int] | None:
        """(layers, bytes every rank holds) for placing this unit as a pipeline group
        (memory.pipeline_shape); None while it has no size, or none from a config.json."""
        self.size(spec)
        return self._shapes.get(spec.key)

    def weight(self, spec: ModelSpec) -> int:
        """The size for ordering and room: 0 while unknown or unsizable."""
        size = self.size(spec)
        return size if isinstance(size, int) else 0

    def context_length(self, spec: ModelSpec) -> int:
        """The context in force: the configured one, else the default capped by the model."""
        if spec.context_length is not None:
            return spec.context_length
        self.size(spec)
        return self._contexts.get(spec.key, DEFAULT_CONTEXT_LENGTH)

    def knobs_changed(self) -> None:
        """max_concurrency sizes the KV cache: size again, and look again for hub models that
        were not downloaded yet."""
        self._sizes.clear()
        self._shapes.clear()
        self._files.forget_missing()

    async def settled(self) -> None:
        """Wait until the model-file reads started so far are done."""
        await self._files.settled()

    def close(self) -> None:
        """Cancel the reads still running."""
        self._files.close()

    def _measure(self, spec: ModelSpec, files: ModelFiles | SizingError) -> int | SizingError:
        if isinstance(files, SizingError):
            return SizingError(f"{spec.name}: {files}")
        try:
            size, context = size_engine(
                files.weights,
                files.config,
                spec.context_length,
                self._knobs.engine(spec).max_concurrency,
                spec.kv_bits,
                spec.kv_group_size,
                prefix_cache_bytes=spec.prefix_cache_mib * 2**20,
            )
        except SizingError as exc:
            return SizingError(f"{spec.name}: {exc}")
        self._contexts[spec.key] = context
        if files.config is not None and size > 0:
            # Sized, but a config.json with no embedding shape: never split.
            with contextlib.suppress(SizingError):
                self._shapes[spec.key] = pipeline_shape(size, files.config)
        return size

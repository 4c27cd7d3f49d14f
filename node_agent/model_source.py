"""Hugging Face as a model source: which files an engine loads, the hub's cache, downloads.

The agent's model store (node_agent/model_store.py) decides where a model comes from; this
module is its only door to the hub. Every call here blocks (disk or network): run it in a
thread. huggingface_hub is imported on first use, so an agent that never meets a hub id never
loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# The files mlx_lm.load reads: mlx_lm.utils.DEFAULT_ALLOW_PATTERNS (0.32.2), copied because
# importing mlx_lm here would start MLX in the agent (its native threads abort the agent at
# exit, seen in CI, and on a Mac it would hold a Metal device); a test keeps them equal.
HUB_ALLOW_PATTERNS = (
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
)


def is_model_file(path: str) -> bool:
    """Whether an engine loads the file at this relative "/"-separated path (hidden: never)."""
    if any(part.startswith(".") for part in path.split("/")):
        return False
    return any(fnmatch.fnmatch(path, pattern) for pattern in HUB_ALLOW_PATTERNS)


def is_hub_id(source: str) -> bool:
    """Whether a source names a Hugging Face repository ("org/name") rather than a path."""
    if source.startswith(("/", "~", ".")) or source.count("/") > 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def hub_cached(source: str) -> Path | None:
    """The model's folder in this node's Hugging Face cache (a download made before, by us
    or anyone); None when it is not there. Never contacts the hub."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source, allow_patterns=list(HUB_ALLOW_PATTERNS), local_files_only=True
            )
        )
    except Exception:  # not cached (LocalEntryNotFoundError), or a partial cache entry
        return None


@dataclass(frozen=True, slots=True)
class HubListing:
    """The files of a model's current revision on the hub that an engine loads."""

    revision: str  # the commit: the download fetches exactly these files
    sizes: dict[str, int]
    sha256: dict[str, str]  # the hub's LFS hashes, for the files it stores in LFS

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def hub_listing(source: str) -> HubListing:
    """Ask the hub for the model's files (one request). Raises the hub's errors: offline,
    unreachable, no such repository, gated."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(source, files_metadata=True)
    sizes: dict[str, int] = {}
    hashes: dict[str, str] = {}
    for sibling in info.siblings or []:
        if not is_model_file(sibling.rfilename):
            continue
        sizes[sibling.rfilename] = sibling.size or 0
        if sibling.lfs is not None:
            hashes[sibling.rfilename] = sibling.lfs.sha256
    return HubListing(info.sha or "main", sizes, hashes)


def hub_download(source: str, revision: str, folder: Path) -> None:
    """Download the model's files at `revision` into `folder`. An interrupted download
    resumes from what `folder` already holds (huggingface_hub keeps its state in .cache/)."""
    from huggingface_hub import snapshot_download

    snapshot_download(
        source, revision=revision, allow_patterns=list(HUB_ALLOW_PATTERNS), local_dir=folder
    )


async def in_daemon_thread(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) in a daemon thread. Unlike asyncio.to_thread, a download still running when
    the agent exits does not hold the exit back (the default executor's threads would)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():  # the caller was cancelled
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (fn(*args), None)
        except BaseException as exc:
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, daemon=True, name="hub").start()
    return await future

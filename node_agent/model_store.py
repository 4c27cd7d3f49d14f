"""The node's model store: where the folder an engine loads comes from, and the disk it takes.

`ensure(source, manifest, holders)` returns that folder, trying in this order:
  1. the source is a folder on this node: used in place;
  2. the store holds the files (those of the fleet's manifest, when one is given);
  3. the Hugging Face cache holds them (an earlier download): used in place;
  4. other nodes hold them (holders, with the manifest): copied from them over mutual TLS
     (node_agent/peer_copy.py); a failed peer copy is an error, never a hub download, so the
     reason (a holder's bad file, say) reaches the coordinator as is;
  5. the source is a hub id: downloaded from Hugging Face (node_agent/model_source.py);
otherwise a one-line error. Two loads of one source at once share one copy.

Copies and downloads are staged, so that a store folder is always complete and verified:

    <root>/<slug>-<digest[:12]>/      a model (node_agent/holdings.py keeps the ledger)
    <root>/.partial/<slug>-<key>/     a copy in progress; a restart resumes it

Disk is a resource: a copy starts only when the model fits in `disk_room()` (free disk less a
reserve, within the budget, with unused store models counted as free), evicting the least
recently used store models that no engine uses; else "needs 41.2 GiB of disk, this node has
30.1 GiB free". ensure() returns its folder acquired; the supervisor releases it when the
engine exits. An in-place folder is hashed in the background (node_agent/manifest.py, cached):
its engine need not wait for that, only the fleet does before copying from it.

Use from the event loop. The store owns its background tasks; close() ends them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import ssl
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlxfleet.manifest import Manifest, ManifestError
from node_agent import model_source, peer_copy
from node_agent.errors import Error
from node_agent.holdings import RECORD, HeldModel, Holding, Holdings, write_json
from node_agent.manifest import HashCache, HashingStopped, build_manifest
from node_agent.model_source import in_daemon_thread
from node_agent.peer_copy import CopyFailed, CopyProgress, Holder

logger = logging.getLogger(__name__)

GIB = 2**30
MIB = 2**20
# Disk kept free for the OS and everything else: a copy never takes the last of it.
DISK_RESERVE_BYTES = 2 * GIB
STALE_PARTIAL_S = 24 * 3600.0  # a copy nobody resumed for this long is deleted at start
HUB_POLL_S = 1.0  # how often a hub download's progress is read from the disk
PARTIAL = ".partial"

__all__ = ["HeldModel", "ModelCopy", "ModelStore", "ModelUnavailable"]


class ModelUnavailable(Error):
    """The model's files cannot be had on this node: no holder, no hub, no disk room."""


@dataclass(frozen=True, slots=True)
class ModelCopy:
    """A copy onto this node in progress (a heartbeat's ModelCopy)."""

    source: str
    bytes_done: int
    bytes_total: int
    bytes_per_s: float
    origin: str  # "peer" or "hub"
    from_nodes: tuple[str, ...]


@dataclass(slots=True)
class _Copy:
    source: str
    origin: str
    progress: CopyProgress
    staged: int = 0  # bytes already there when it started (a resumed copy)

    def note_on_disk(self, done: int) -> None:
        """A hub download's progress, read from the disk."""
        self.progress.bytes_done = min(done, self.progress.bytes_total)
        self.progress.bytes_fetched = max(0, done - self.staged)
        self.progress.note()  # a sample for its rate


def size_text(n: int) -> str:
    """41.2 GiB, or 512.0 MiB under a GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def folder_name(source: str, key: str) -> str:
    """A store folder's name: the source made safe, and a key (the manifest digest's start)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-.")[-60:].lstrip("-.")
    return f"{slug or 'model'}-{key[:12]}"


def one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]


def bytes_under(folder: Path) -> int:
    """Bytes the files below a folder take on disk (0 if it does not exist): allocated
    blocks, as a copy's part files are sparse until written."""
    return sum(size for _, size in _files_under(folder))


class ModelStore:
    """The node's model files (see the module docstring). Use from the event loop."""

    def __init__(
        self,
        root: Path,
        budget_bytes: int | None = None,  # None: no budget, the disk is the limit
        *,
        hash_cache: Path | None = None,  # default: <root>/.hashes.json
        index_path: Path | None = None,  # the file server's index; default <root>/.index.json
        reserve_bytes: int = DISK_RESERVE_BYTES,
    ) -> None:
        self.root = root.absolute()
        self.budget_bytes = budget_bytes
        self.reserve_bytes = reserve_bytes
        self.peer_tls: ssl.SSLContext | None = None  # set once the node has its certificate
        self.fetched: Counter[str] = Counter()  # bytes received by finished copies, by origin
        self._partial = self.root / PARTIAL
        self._partial.mkdir(parents=True, exist_ok=True)
        self._hashes = HashCache(hash_cache or self.root / ".hashes.json")
        self.holdings = Holdings(index_path or self.root / ".index.json")
        self.holdings.open(self.root)
        self._jobs: dict[str, asyncio.Task[Path]] = {}
        self._copies: dict[str, _Copy] = {}
        self._hashing: dict[Path, asyncio.Task[None]] = {}
        self._stop = threading.Event()  # ends hashing threads at close()
        self._sweep_partials()

    @property
    def index_path(self) -> Path:
        return self.holdings.index_path

    # What the node reports
    def held(self) -> list[HeldModel]:
        return self.holdings.held()

    def manifests(self) -> list[Manifest]:
        return self.holdings.manifests()

    def copies(self) -> list[ModelCopy]:
        return [
            ModelCopy(
                c.source,
                c.progress.bytes_done,
                c.progress.bytes_total,
                c.progress.rate(),
                c.origin,
                tuple(c.progress.from_nodes),
            )
            for c in self._copies.values()
        ]

    def fetched_bytes(self) -> dict[str, int]:
        """Bytes received so far by origin, copies under way included (a counter)."""
        total = Counter(self.fetched)
        for c in self._copies.values():
            total[c.origin] += c.progress.bytes_fetched
        return dict(total)

    def disk_room(self) -> int:
        """Bytes of model files this node could take now: free disk less the reserve, within
        the budget, with the store models no engine uses counted as free (they would be
        evicted); copies under way have their bytes set aside."""
        evictable = sum(h.bytes for h in self.holdings.evictable())
        return max(0, self._room_without_eviction() + evictable)

    def _room_without_eviction(self) -> int:
        """Room now, nothing evicted (negative when over the budget)."""
        copies = [c.progress for c in self._copies.values()]
        room = shutil.disk_usage(self.root).free - self.reserve_bytes
        room -= sum(max(0, p.bytes_total - p.bytes_done) for p in copies)
        if self.budget_bytes is not None:
            used = self.holdings.stored_bytes() + sum(p.bytes_total for p in copies)
            room = min(room, self.budget_bytes - used)
        return room

    # Engines' use of folders
    def acquire(self, folder: Path) -> None:
        """An engine runs from `folder`: it is not evicted until released."""
        self.holdings.acquire(folder)

    def release(self, folder: Path) -> None:
        self.holdings.release(folder)

    # Getting a model's files
    async def ensure(
        self, source: str, manifest: Manifest | None = None, holders: Sequence[Holder] = ()
    ) -> Path:
        """The folder an engine loads the source from, acquired (release() it when the engine
        exits). ModelUnavailable (one line) when the files cannot be had here."""
        self.holdings.pin(source)
        try:
            job = self._jobs.get(source)
            if job is None:
                job = asyncio.create_task(self._get(source, manifest, list(holders)))
                self._jobs[source] = job
                job.add_done_callback(lambda t: self._job_done(source, t))
            folder = await asyncio.shield(job)  # one caller's cancel leaves the others' copy
            self.acquire(folder)
            return folder
        finally:
            self.holdings.unpin(source)

    def _job_done(self, source: str, task: asyncio.Task[Path]) -> None:
        if self._jobs.get(source) is task:
            del self._jobs[source]
        if not task.cancelled():
            task.exception()  # retrieved here: every caller may have gone

    async def _get(self, source: str, manifest: Manifest | None, holders: list[Holder]) -> Path:
        folder = Path(source).expanduser()
        if folder.is_dir():
            return self._in_place(source, folder)
        stored = self.holdings.stored(source, manifest)
        if stored is not None:
            return stored.folder
        hub = await asyncio.to_thread(model_source.is_hub_id, source)
        if hub:
            cached = await asyncio.to_thread(model_source.hub_cached, source)
            if cached is not None:
                return self._in_place(source, cached)
        if holders and manifest is not None:
            return await self._from_peers(source, manifest, holders)
        if hub:
            return await self._from_hub(source, manifest)
        raise ModelUnavailable(f"no node holds {source} and it is not a folder here")

    def _in_place(self, source: str, folder: Path) -> Path:
        """Use a folder where it is; hash it in the background (cached: cheap when known)."""
        folder = folder.absolute()
        holding = self.holdings.use_in_place(source, folder)
        if folder not in self._hashing:
            task = asyncio.create_task(self._hash_in_place(holding), name=f"hash {folder}")
            self._hashing[folder] = task
            task.add_done_callback(lambda _: self._hashing.pop(folder, None))
        return folder

    async def _hash_in_place(self, holding: Holding) -> None:
        try:
            manifest = await asyncio.to_thread(
                build_manifest, holding.source, holding.folder, self._hashes, self._stop
            )
        except HashingStopped:
            return
        except (OSError, ManifestError) as exc:
            logger.warning("not sharing %s (%s): %s", holding.source, holding.folder, one_line(exc))
            return
        self.holdings.set_manifest(holding, manifest)

    async def settle(self) -> None:
        """Wait until the in-place folders being hashed are (for tests and a clean exit)."""
        while self._hashing:
            await asyncio.gather(*self._hashing.values(), return_exceptions=True)

    async def _from_peers(self, source: str, manifest: Manifest, holders: list[Holder]) -> Path:
        if self.peer_tls is None:
            raise ModelUnavailable(f"cannot copy {source} from peers: this node has no identity")
        staging = self._partial / folder_name(source, manifest.digest)
        copy = await self._begin(source, "peer", manifest.total_bytes, staging)
        names = ", ".join(h.node_id for h in holders)
        logger.info("copying %s (%s) from %s", source, size_text(manifest.total_bytes), names)
        try:
            await peer_copy.copy_files(manifest, holders, staging, self.peer_tls, copy.progress)
        except CopyFailed as exc:
            raise ModelUnavailable(f"copy of {source} failed: {one_line(exc)}") from None
        finally:
            self._end(copy)
        return await self._commit(manifest, staging)

    async def _from_hub(self, source: str, manifest: Manifest | None) -> Path:
        try:
            listing = await in_daemon_thread(model_source.hub_listing, source)
        except Exception as exc:  # offline, unreachable, no such repository, gated
            raise ModelUnavailable(
                f"no node holds {source} and the hub failed: {one_line(exc)}"
            ) from None
        key = manifest.digest if manifest is not None else listing.revision
        staging = self._partial / folder_name(source, key)
        copy = await self._begin(source, "hub", listing.total_bytes, staging)
        logger.info("downloading %s (%s) from the hub", source, size_text(listing.total_bytes))
        poller = asyncio.create_task(self._follow_download(copy, staging))
        try:
            await in_daemon_thread(model_source.hub_download, source, listing.revision, staging)
        except Exception as exc:
            raise ModelUnavailable(f"download of {source} failed: {one_line(exc)}") from None
        finally:
            poller.cancel()
            copy.note_on_disk(bytes_under(staging))
            self._end(copy)
        await asyncio.to_thread(shutil.rmtree, staging / ".cache", True)  # the download's state
        try:
            got = await asyncio.to_thread(build_manifest, source, staging, None, self._stop)
            _check_download(got, listing, manifest)
        except (OSError, ManifestError) as exc:
            await asyncio.to_thread(shutil.rmtree, staging, True)  # fetched again next time
            raise ModelUnavailable(f"download of {source}: {one_line(exc)}") from None
        return await self._commit(got, staging)

    async def _follow_download(self, copy: _Copy, staging: Path) -> None:
        """A hub download tells nothing of its progress: read it from the disk."""
        while True:
            copy.note_on_disk(await asyncio.to_thread(bytes_under, staging))
            await asyncio.sleep(HUB_POLL_S)

    async def _begin(self, source: str, origin: str, total: int, staging: Path) -> _Copy:
        """Make room for a copy (evicting), then set its bytes aside: ModelUnavailable when
        the model does not fit. Bytes already staged (a resumed copy) need no room."""
        staged = await asyncio.to_thread(bytes_under, staging)
        needed = max(0, total - staged)
        room = self.disk_room()
        if needed > room:
            raise ModelUnavailable(
                f"needs {size_text(needed)} of disk, this node has {size_text(room)} free"
            )
        victims: list[Holding] = []
        base = self._room_without_eviction()
        for holding in self.holdings.evictable():
            if base >= needed:
                break
            victims.append(holding)
            base += holding.bytes
        # The accounting changes before the first await: a concurrent copy sees it.
        self.holdings.forget(victims)
        copy = _Copy(source, origin, CopyProgress(bytes_total=total, bytes_done=staged), staged)
        self._copies[source] = copy
        for h in victims:
            unused = time.strftime("%Y-%m-%d %H:%M", time.localtime(h.last_used))
            logger.info(
                "evicting %s (%s, unused since %s) to make room for %s",
                h.source,
                size_text(h.bytes),
                unused,
                source,
            )
            await asyncio.to_thread(shutil.rmtree, h.folder, True)
        staging.mkdir(parents=True, exist_ok=True)
        return copy

    def _end(self, copy: _Copy) -> None:
        self.fetched[copy.origin] += copy.progress.bytes_fetched
        self._copies.pop(copy.source, None)

    async def _commit(self, manifest: Manifest, staging: Path) -> Path:
        """Move a verified copy into the store under its digest, with its record."""
        final = self.root / folder_name(manifest.source, manifest.digest)
        if self.holdings.get(final) is not None:  # the same files, already there
            await asyncio.to_thread(shutil.rmtree, staging, True)
            return final
        holding = Holding(manifest.source, final, manifest, in_place=False)

        def move() -> None:
            write_json(staging / RECORD, holding.record())
            if final.exists():
                shutil.rmtree(final)  # a leftover without a record
            os.replace(staging, final)

        await asyncio.to_thread(move)
        self.holdings.add(holding)
        logger.info("%s is in the store: %s", manifest.source, final)
        return final

    def _sweep_partials(self) -> None:
        """Delete copies nobody resumed for a day (their source may be gone for good)."""
        for partial in self._partial.iterdir():
            newest = max([partial.stat().st_mtime, *(m for m, _ in _files_under(partial))])
            if time.time() - newest > STALE_PARTIAL_S:
                logger.info("deleting %s: a copy nobody resumed", partial)
                shutil.rmtree(partial, ignore_errors=True)

    async def close(self) -> None:
        """Stop hashing and copying (a copy resumes at the next start)."""
        self._stop.set()
        tasks = [*self._jobs.values(), *self._hashing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _files_under(folder: Path) -> list[tuple[float, int]]:
    """(mtime, bytes on disk) of each file below a folder; none if it does not exist."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            found.append((st.st_mtime, st.st_blocks * 512))
    return found


def _check_download(
    got: Manifest, listing: model_source.HubListing, manifest: Manifest | None
) -> None:
    """ManifestError naming a file whose hash is not the hub's LFS hash, or the files that
    differ from those the fleet recorded: every node must run the same files."""
    for f in got.files:
        lfs = listing.sha256.get(f.path)
        if lfs is not None and lfs != f.sha256:
            raise ManifestError(f"{f.path}: SHA-256 mismatch with the hub's")
    if manifest is not None and got.digest != manifest.digest:
        ours = {f.path: f for f in got.files}
        theirs = {f.path: f for f in manifest.files}
        differ = sorted(p for p in ours.keys() | theirs.keys() if ours.get(p) != theirs.get(p))
        raise ManifestError(
            f"the hub's files differ from the fleet's manifest: {', '.join(differ[:3])}"
        )

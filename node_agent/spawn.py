"""Starting engine processes without fork(): posix_spawn, wrapped for asyncio.

Why not `asyncio.create_subprocess_exec` (what the supervisor used before issue 16): on uvloop,
the daemons' loop, it is libuv's uv_spawn, which calls fork() on Linux, and fork() runs every
pthread_atfork handler in the process. grpcio's wheels (Linux and macOS) are built with gRPC's
fork support on, so importing grpc registers gRPC's. With the control stream open another
thread is always inside gRPC: the handlers log "Other threads are currently calling into gRPC,
skipping fork() handlers", and then the child can die before its exec, of SIGABRT
("ev_epoll1_linux.cc: Check failed: next_worker->state == KICKED") or SIGSEGV, and the agent's
own control stream can break (TSI_DATA_CORRUPTED, socket closed). tests/spawn_load.py shows
both; docs/benchmarks.md has the counts.

posix_spawn runs no atfork handlers: glibc implements it with clone(CLONE_VM | CLONE_VFORK)
and exec, macOS as one system call; the same code on both. CPython's subprocess would not do:
on macOS it fork()s whenever close_fds or start_new_session is set, and both are needed here.
(gRPC's fork support is also off in our processes, node_agent/__init__.py, for the fork()s
that remain, e.g. subprocess.run on macOS.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Mapping, Sequence

# Python ignores these two; an ignored signal stays ignored across exec (CPython's
# subprocess restores them the same way).
RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class EngineProcess:
    """A started child: its pid, its stdout as a StreamReader, its exit status.

    The parts of asyncio.subprocess.Process the supervisor uses. Use from the event loop that
    started it; a daemon thread per child waits for its exit (no SIGCHLD handler, no pidfd, the
    same on Linux and macOS).
    """

    def __init__(self, pid: int, stdout: asyncio.StreamReader) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None  # as subprocess reports it: -N for signal N
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        threading.Thread(target=self._reap, args=(loop,), name=f"reap-{pid}", daemon=True).start()

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        except ChildProcessError:  # reaped by a waitpid(-1) elsewhere: its status is lost
            code = 255
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._set_exit, code)

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        if not self._exited.done():
            self._exited.set_result(code)

    async def wait(self) -> int:
        """The exit status, once the child has ended."""
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        """Signal the child; ProcessLookupError once it has exited (as asyncio's does)."""
        if self.returncode is not None:
            raise ProcessLookupError(f"process {self.pid} has exited")
        os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _StdoutProtocol(asyncio.StreamReaderProtocol):
    """The child's stdout into a StreamReader; at EOF (the child has exited or closed it) our
    end closes too, rather than staying half-open as a socket connection would."""

    def eof_received(self) -> bool:
        super().eof_received()
        return False


def inherited_fds() -> list[int]:
    """Descriptors above 2 that an exec would pass on: the ones this process was given by its
    own parent (Python opens its own close-on-exec)."""
    folder = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    found = []
    for name in os.listdir(folder):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            if int(name) > 2 and os.get_inheritable(int(name)):
                found.append(int(name))
    return found


async def start(argv: Sequence[str], env: Mapping[str, str], stderr: int) -> EngineProcess:
    """Start argv (argv[0] a path) in a session of its own: stdin /dev/null, stdout read
    through the returned process's StreamReader, stderr the given descriptor, no other
    descriptor (as subprocess's close_fds).

    Raises OSError when it cannot be started (no such program, not executable)."""
    # stdout is a socket pair, not a pipe: uvloop's connect_read_pipe closes a pipe's
    # descriptor twice (libuv, then the file object), and in between another thread's new
    # file can take its number and be closed (seen: the next start's pipe gone, EBADF). A
    # socket it hands over cleanly. Both ends are close-on-exec (PEP 446): the child keeps 0-2.
    ours, theirs = socket.socketpair()
    try:
        pid = os.posix_spawn(
            argv[0],
            list(argv),
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
                *((os.POSIX_SPAWN_CLOSE, fd) for fd in inherited_fds()),
            ],
            setsid=True,  # Ctrl-C on the agent's terminal must not reach engines
            setsigmask=(),
            setsigdef=RESTORED_SIGNALS,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    reader = asyncio.StreamReader()
    process = EngineProcess(pid, reader)
    try:
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(lambda: _StdoutProtocol(reader), sock=ours)
    except BaseException:
        ours.close()
        process.kill()
        raise
    return process

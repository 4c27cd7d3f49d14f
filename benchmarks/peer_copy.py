"""Peer copy of model files: throughput against raw TCP, two holders against one, engine speed.

Hosts in network namespaces (tests/netns.py; root needed): h1 and h2 hold a model-sized set of
random files (GiB, a few safetensors-like files) and run the real file server
(node_agent/file_server.py) with node certificates from a fleet CA made here; h3 copies them
with node_agent/peer_copy.py, which verifies every file's SHA-256. Same run, alternating order:

1. Throughput: peer copy (h1 -> h3) against a raw TCP copy of the same bytes over the same link
   (one connection, sendfile on the sender, the receiver writing the files as peer copy does),
   with h1's uplink shaped to 1 Gbit/s (an office LAN), then unshaped (the veth's own speed).
2. Two holders against one, each holder's uplink shaped to 1 Gbit/s: the time to copy to h3.
3. Decode tokens/s of an engine (the demo model) on h1, alone and while h1 serves a copy to h3
   (copies one after another for the whole measurement), h1's uplink at 1 Gbit/s; served by
   the file server as shipped and, for comparison, by one at nice 10.

Two machines emulated on one: every process of a holder runs on CPU 0, the copying node and
the client that times the engine's stream on CPU 1 (taskset; the copier at a lowered priority
while the engine is timed, so that the client's timing is not its victim). The model files live
in the page cache on both ends, as a recently used model does, and every timed copy, raw or
peer, starts right after writing and deleting as many bytes (Bench.warm says why). `--sweep`
adds peer copy times for other span sizes and connection counts.

    PYTHONPATH=. python -m benchmarks.peer_copy [--gib 1] [--runs 3] [--sweep] [--write-docs]
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.fleet import LISTENING, demo_model
from coordinator.pki import FleetPki
from mlxfleet.manifest import Manifest
from node_agent import peer_copy
from node_agent.file_server import NICE, lower_priority
from node_agent.identity import make_csr
from node_agent.manifest import build_manifest
from tests.certs import write_key
from tests.netns import Host, Network, unavailable_reason

SECTION = "## Peer copy of model files (issue 18)"
MIB = 2**20
LAN_MBIT = 1000
HOLDER_CPU, COPIER_CPU = "0", "1"
FILES = 4  # the weights, split as safetensors shards are
RUN_TIMEOUT_S = 120.0
DECODE_TOKENS = 512
DECODE_STREAMS = 5  # per measurement; the median counts
ENGINE_READY_TIMEOUT_S = 180.0
WARM_BLOCK_BYTES = 64 * MIB
DESIGN = f"{peer_copy.CHUNK_BYTES // MIB}x{peer_copy.CONNECTIONS_PER_HOLDER}"  # as shipped
DESIGNS = ("16x2", "32x1", "32x2", "64x2")  # --sweep: MiB a span x connections per holder
ENGINE_CASES = ("alone", "serving", "nice 10")  # serving: from the file server as shipped


# --- roles: what runs inside a namespace (python -m benchmarks.peer_copy ROLE ...) ---------


def raw_recv(dest: str, sizes_json: str) -> None:
    """Accept one connection, write the files' bytes as they come; print the seconds taken."""
    sizes = json.loads(sizes_json)
    with socket.create_server(("0.0.0.0", 0)) as server:
        print(f"port {server.getsockname()[1]}", flush=True)
        conn, _ = server.accept()
        started, cpu = time.perf_counter(), time.process_time()
        buf = bytearray(MIB)
        view = memoryview(buf)
        with conn:
            for path, size in sizes:
                fd = os.open(Path(dest) / path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                at = 0
                while at < size:
                    n = conn.recv_into(view[: min(MIB, size - at)])
                    if n == 0:
                        raise SystemExit(f"the sender stopped at byte {at} of {path}")
                    os.pwrite(fd, view[:n], at)
                    at += n
                os.close(fd)
    print(json.dumps({"s": time.perf_counter() - started, "cpu": time.process_time() - cpu}))


def raw_send(address: str, folder: str, sizes_json: str) -> None:
    host, port = address.rsplit(":", 1)
    cpu = time.process_time()
    with socket.create_connection((host, int(port))) as conn:
        for path, size in json.loads(sizes_json):
            with open(Path(folder) / path, "rb") as f:
                conn.sendfile(f, 0, size)
    print(json.dumps({"cpu": time.process_time() - cpu}))


def fetch(
    manifest_path: str, holders_json: str, dest: str, tls_dir: str, design: str, loop: str
) -> None:
    """Copy with copy_files, its spans and connections as `design` says ("32x2": 32 MiB, 2 per
    holder); print seconds and bytes (with `loop`, copy again and again until killed)."""
    manifest = Manifest.from_json(Path(manifest_path).read_text())
    chunk_mib, connections = design.split("x")
    peer_copy.CHUNK_BYTES = int(chunk_mib) * MIB
    peer_copy.CONNECTIONS_PER_HOLDER = int(connections)
    holders = [peer_copy.Holder(n, u) for n, u in json.loads(holders_json)]
    if loop == "loop":  # background load on CPU 1: the client timing the engine goes first
        lower_priority()
    tls = Path(tls_dir)
    ctx = peer_copy.client_context(tls / "h3.crt", tls / "h3.key", (tls / "ca.pem").read_bytes())
    while True:
        shutil.rmtree(dest, ignore_errors=True)
        progress = peer_copy.CopyProgress()
        started, cpu = time.perf_counter(), time.process_time()
        asyncio.run(peer_copy.copy_files(manifest, holders, Path(dest), ctx, progress))
        took, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(json.dumps({"s": took, "cpu": cpu, "fetched": progress.bytes_fetched}))
        sys.stdout.flush()
        if loop != "loop":
            return


def decode(port: str, secret: str) -> None:
    """Wait for the engine, warm it up, then time DECODE_STREAMS streams: print their tok/s."""
    harness.wait_for(
        lambda: harness.http(f"http://127.0.0.1:{port}/health", secret)[0] == 200,
        ENGINE_READY_TIMEOUT_S,
        "the engine to load",
    )
    rates = [_stream(int(port), secret) for _ in range(DECODE_STREAMS + 1)][1:]
    print(json.dumps({"tok_s": rates}))


def _stream(port: int, secret: str) -> float:
    """One streamed completion of DECODE_TOKENS tokens: tokens/s from first to last token."""
    body = {
        "model": "demo",
        "prompt": "Once upon a time",
        "max_tokens": DECODE_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=RUN_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    response = conn.getresponse()
    first = last = 0.0
    tokens = 0
    while line := response.readline():
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if any(c.get("text") for c in event.get("choices") or ()):
            last = time.perf_counter()
            first = first or last
        tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    conn.close()
    return (tokens - 1) / (last - first)


ROLES = {"raw-recv": raw_recv, "raw-send": raw_send, "fetch": fetch, "decode": decode}


# --- the measurement, from the root namespace ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    s: float
    send_cpu: float  # CPU seconds of the sender (the holders' file servers, or raw-send)
    recv_cpu: float  # of the copying process


class Bench:
    """Three hosts, the model files and certificates, the holders' file servers."""

    def __init__(self, net: Network, work: Path, gib: float) -> None:
        self.net, self.work = net, work
        self.h1, self.h2, self.h3 = net.hosts
        self.tls = work / "tls"
        make_certs(self.tls, ("h1", "h2", "h3"))
        self.folder = work / "model"
        self.manifest = make_model(self.folder, int(gib * 1024 * MIB))
        (work / "manifest.json").write_text(self.manifest.to_json())
        listing = [[f.path, f.size, f.sha256] for f in self.manifest.files]
        index = {"models": {self.manifest.digest: {"folder": str(self.folder), "files": listing}}}
        (work / "index.json").write_text(json.dumps(index))
        self.sizes = json.dumps([[f.path, f.size] for f in self.manifest.files])
        self.procs: list[harness.Proc] = []
        self.urls: dict[str, str] = {}
        self.server_pids: dict[str, int] = {}

    def start(self) -> None:
        """The holders' file servers."""
        self.urls = {h.name: self.file_server(h) for h in (self.h1, self.h2)}

    def argv(self, host: Host, cpu: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", host.name, "taskset", "-c", cpu, sys.executable, *args]

    def file_server(self, host: Host, *flags: str) -> str:
        """Start a file server on `host` (on CPU 0) with `flags`; its URL."""
        name = host.name.rsplit("-", 1)[1]
        tls = [f"--cert={self.tls / name}.crt", f"--key={self.tls / name}.key"]
        argv = self.argv(
            host, HOLDER_CPU, "-m", "node_agent.file_server", f"--index={self.work}/index.json",
            *tls, f"--ca={self.tls}/ca.pem", "--host", host.ip, "--port", "0", *flags,
        )  # fmt: skip
        log = self.work / f"files-{name}{''.join(flags)}.log"
        proc = harness.Proc(argv, log, stdout_pipe=True)
        self.procs.append(proc)
        assert proc.popen.stdout is not None
        line = proc.popen.stdout.readline().decode()
        if not line.startswith("port "):
            raise RuntimeError(f"file server on {name}: {line!r}\n{proc.tail()}")
        if not flags:
            self.server_pids[host.name] = proc.popen.pid  # `ip netns exec` and taskset exec
        return f"https://{host.ip}:{int(line.split()[1])}"

    def role(self, host: Host, cpu: str, *args: str) -> dict[str, Any]:
        """Run a role to its end; its last stdout line, as JSON."""
        argv = self.argv(host, cpu, "-m", "benchmarks.peer_copy", *args)
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=harness.REPO
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:1])} failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def holders(self, *hosts: Host, urls: dict[str, str] | None = None) -> str:
        urls = urls or self.urls
        return json.dumps([[h.name.rsplit("-", 1)[1], urls[h.name]] for h in hosts])

    def fetch_args(
        self, hosts: tuple[Host, ...], design: str, loop: str, urls: dict[str, str] | None = None
    ) -> tuple[str, ...]:
        manifest, dest = str(self.work / "manifest.json"), str(self.work / "dest")
        holders = self.holders(*hosts, urls=urls)
        return ("fetch", manifest, holders, dest, str(self.tls), design, loop)

    def warm(self) -> None:
        """Write and delete as many bytes as a copy writes, just before it: this VM hands the
        pages freed by a copy back to its host within seconds, and touching them again then
        costs ~2 s of CPU a GiB (measured), more than the copies themselves; so every timed
        copy, raw or peer, starts with the same freshly freed pages."""
        block = bytes(WARM_BLOCK_BYTES)
        with open(self.work / "warm.bin", "wb") as f:
            for _ in range(self.manifest.total_bytes // WARM_BLOCK_BYTES + 1):
                f.write(block)
        (self.work / "warm.bin").unlink()

    def peer(self, *hosts: Host, design: str = DESIGN) -> Run:
        self.warm()
        served = self._served_cpu(hosts)
        got = self.role(self.h3, COPIER_CPU, *self.fetch_args(hosts, design, "once"))
        shutil.rmtree(self.work / "dest")
        assert got["fetched"] == self.manifest.total_bytes, got
        return Run(got["s"], self._served_cpu(hosts) - served, got["cpu"])

    def _served_cpu(self, hosts: tuple[Host, ...]) -> float:
        return sum(harness.cpu_s(self.server_pids[h.name]) for h in hosts)

    def raw(self) -> Run:
        self.warm()
        dest = self.work / "dest"
        dest.mkdir()
        recv_argv = self.argv(
            self.h3, COPIER_CPU, "-m", "benchmarks.peer_copy", "raw-recv", str(dest), self.sizes
        )
        recv = harness.Proc(recv_argv, self.work / "raw-recv.log", stdout_pipe=True)
        with harness.stopping([recv]):
            assert recv.popen.stdout is not None
            port = int(recv.popen.stdout.readline().decode().split()[1])
            address = f"{self.h3.ip}:{port}"
            sent = self.role(self.h1, HOLDER_CPU, "raw-send", address, str(self.folder), self.sizes)
            out, _ = recv.popen.communicate(timeout=RUN_TIMEOUT_S)
        shutil.rmtree(dest)
        got = json.loads(out.decode().strip().splitlines()[-1])
        return Run(got["s"], sent["cpu"], got["cpu"])


def make_certs(folder: Path, nodes: tuple[str, ...]) -> None:
    folder.mkdir(parents=True)
    pki = FleetPki.load_or_create(folder / "fleet")
    (folder / "ca.pem").write_bytes(pki.ca_cert_pem)
    for node in nodes:
        write_key(folder / f"{node}.key")
        csr = make_csr((folder / f"{node}.key").read_bytes())
        (folder / f"{node}.crt").write_bytes(pki.issue_node_certificate(node, csr))


def make_model(folder: Path, total: int) -> Manifest:
    """FILES shards of random bytes totalling `total`, a config and a tokenizer."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bench", "shards": FILES}))
    (folder / "tokenizer.json").write_bytes(os.urandom(2 * MIB))
    for i in range(FILES):
        with open(folder / f"model-{i + 1:05d}-of-{FILES:05d}.safetensors", "wb") as f:
            for _ in range(total // FILES // (64 * MIB)):
                f.write(os.urandom(64 * MIB))
    return build_manifest("bench", folder)


def throughput(b: Bench, runs: int, rate_mbit: float | None) -> dict[str, list[Run]]:
    if rate_mbit is None:
        b.net.unshape(b.h1)
    else:
        b.net.shape(b.h1, rate_mbit)
    times: dict[str, list[Run]] = {"raw": [], "peer": []}
    for i in range(runs):
        for kind in ("raw", "peer") if i % 2 == 0 else ("peer", "raw"):
            times[kind].append(b.raw() if kind == "raw" else b.peer(b.h1))
            print(f"  {rate_mbit or 'unshaped'} {kind}: {times[kind][-1]}", file=sys.stderr)
    return times


def two_holders(b: Bench, runs: int) -> dict[str, list[float]]:
    b.net.shape(b.h1, LAN_MBIT)
    b.net.shape(b.h2, LAN_MBIT)
    times: dict[str, list[float]] = {"one": [], "two": []}
    for i in range(runs):
        for kind in ("one", "two") if i % 2 == 0 else ("two", "one"):
            times[kind].append((b.peer(b.h1) if kind == "one" else b.peer(b.h1, b.h2)).s)
            print(f"  {kind} holder(s): {times[kind][-1]:.2f} s", file=sys.stderr)
    return times


def sweep(b: Bench, runs: int) -> dict[str, dict[str, list[float]]]:
    """Peer copy time per design: one holder on the unshaped veth, two at LAN_MBIT each."""
    out: dict[str, dict[str, list[float]]] = {"veth": {}, "two": {}}
    for case in out:
        for h in (b.h1, b.h2):
            if case == "veth":
                b.net.unshape(h)
            else:
                b.net.shape(h, LAN_MBIT)
        hosts = (b.h1,) if case == "veth" else (b.h1, b.h2)
        for i in range(runs):
            for design in DESIGNS if i % 2 == 0 else DESIGNS[::-1]:
                out[case].setdefault(design, []).append(b.peer(*hosts, design=design).s)
                print(f"  {case} {design}: {out[case][design][-1]:.2f} s", file=sys.stderr)
    return out


def engine_impact(b: Bench, runs: int) -> dict[str, list[float]]:
    """Decode tok/s on h1 alone and while h1 serves copies, from its file server as shipped
    and from one at nice 10; and the MB/s h1 sent meanwhile."""
    b.net.shape(b.h1, LAN_MBIT)
    nice10 = {b.h1.name: b.file_server(b.h1, "--nice=10")}
    secret = secrets.token_urlsafe(32)
    argv = b.argv(
        b.h1, HOLDER_CPU, "-m", "node_agent.engine", "--model-path", str(demo_model(b.work)),
        "--model-name", "demo", "--host", "127.0.0.1", "--port", "0",
    )  # fmt: skip
    engine = harness.Proc(argv, b.work / "engine.log", {"MLXFLEET_ENGINE_SECRET": secret}, True)
    b.procs.append(engine)
    assert engine.popen.stdout is not None
    match = LISTENING.search(engine.popen.stdout.readline().decode())
    if match is None:
        raise RuntimeError(f"the engine did not start:\n{engine.tail()}")
    port = match.group(1)
    b.role(b.h1, COPIER_CPU, "decode", port, secret)  # waits for the load; a warm-up
    out: dict[str, list[float]] = {}
    for i in range(runs):
        for kind in ENGINE_CASES if i % 2 == 0 else ENGINE_CASES[::-1]:
            if kind == "alone":
                rates = b.role(b.h1, COPIER_CPU, "decode", port, secret)["tok_s"]
            else:
                urls = nice10 if kind == "nice 10" else b.urls
                rates, served = serving_copies(b, port, secret, urls)
                out.setdefault(f"{kind} MB/s", []).append(served)
            out.setdefault(kind, []).append(statistics.median(rates))
            print(f"  engine, {kind}: {out[kind][-1]:.0f} tok/s", file=sys.stderr)
    return out


def serving_copies(
    b: Bench, port: str, secret: str, urls: dict[str, str]
) -> tuple[list[float], float]:
    """Decode while h3 copies from h1 again and again; (tok/s, MB/s h1 sent meanwhile)."""
    dest = b.work / "dest"
    fetch = b.fetch_args((b.h1,), DESIGN, "loop", urls)
    argv = b.argv(b.h3, COPIER_CPU, "-m", "benchmarks.peer_copy", *fetch)
    copier = harness.Proc(argv, b.work / "copier.log")
    with harness.stopping([copier]):
        harness.wait_for(lambda: on_disk(dest) > 64 * MIB, 30, "the copy to start")
        sent, started = sent_bytes(b.h1), time.perf_counter()
        rates = b.role(b.h1, COPIER_CPU, "decode", port, secret)["tok_s"]
        served = (sent_bytes(b.h1) - sent) / (time.perf_counter() - started) / 1e6
        if copier.popen.poll() is not None:
            raise RuntimeError(f"the copier ended during the measurement:\n{copier.tail()}")
    shutil.rmtree(dest, ignore_errors=True)
    return rates, served


def on_disk(folder: Path) -> int:
    """Bytes allocated under `folder` (its .part files are sparse until written)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def sent_bytes(host: Host) -> int:
    """What `host` has sent: its link's root-namespace end receives it."""
    return int(Path(f"/sys/class/net/{host.veth}/statistics/rx_bytes").read_text())


def sha256_s_per_gib() -> float:
    """What hashing alone costs here: seconds of one core a GiB."""
    data = os.urandom(256 * MIB)
    started = time.process_time()
    hashlib.sha256(data).digest()
    return (time.process_time() - started) * 4


def med(values: list[float]) -> float:
    return statistics.median(values)


def each(values: list[float]) -> str:
    return ", ".join(f"{x:.2f}" if x < 100 else f"{x:.0f}" for x in values)


def sweep_table(b: Bench, designs: dict[str, dict[str, list[float]]]) -> str:
    if not designs:
        return ""
    rows = [
        "**Span size and connections per holder (`--sweep`; medians, MB/s)**",
        "",
        "| span MiB × connections | one holder, unshaped | two holders at 1 Gbit/s each |",
        "|---|---:|---:|",
    ]
    for design in DESIGNS:
        veth, two = med(designs["veth"][design]), med(designs["two"][design])
        shipped = " (shipped)" if design == DESIGN else ""
        size = b.manifest.total_bytes / 1e6
        rows.append(f"| {design}{shipped} | {size / veth:.0f} | {size / two:.0f} |")
    return "\n".join(rows) + "\n"


def report(
    b: Bench, runs: int, lan: dict, veth: dict, two: dict, engine: dict, designs: dict
) -> str:
    size = b.manifest.total_bytes
    gib = size / 2**30
    rows = [
        "| link (h1's uplink) | copy | time s (MB/s) | × raw throughput "
        "| CPU s/GiB sender | CPU s/GiB receiver | runs (s) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for label, t in ((f"shaped to {LAN_MBIT} Mbit/s", lan), ("unshaped veth", veth)):
        raw = med([r.s for r in t["raw"]])
        for kind in ("raw", "peer"):
            runs_ = t[kind]
            took = med([r.s for r in runs_])
            ratio = "" if kind == "raw" else f"**{raw / took:.2f}**"
            rows.append(
                f"| {label} | {'raw TCP' if kind == 'raw' else 'peer copy'} "
                f"| {took:.2f} ({size / took / 1e6:.0f}) | {ratio} "
                f"| {med([r.send_cpu for r in runs_]) / gib:.2f} "
                f"| {med([r.recv_cpu for r in runs_]) / gib:.2f} | {each([r.s for r in runs_])} |"
            )
    one, both = med(two["one"]), med(two["two"])
    alone = med(engine["alone"])
    engine_rows = [
        f"| alone | {alone:.0f} | | {each(engine['alone'])} |",
        f"| serving, file server as shipped (nice {NICE}) | {med(engine['serving']):.0f} "
        f"| **{med(engine['serving']) / alone:.2f}** | {each(engine['serving'])} |",
        f"| serving, file server at nice 10 | {med(engine['nice 10']):.0f} "
        f"| {med(engine['nice 10']) / alone:.2f} | {each(engine['nice 10'])} |",
    ]
    return f"""{SECTION}

Measured {harness.now_utc()} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm")}, {peer_copy.ssl.OPENSSL_VERSION}

Method: benchmarks/peer_copy.py's docstring. {len(b.manifest.files)} files, {size / 2**30:.2f} GiB
of random bytes; hosts are network namespaces on one bridge, links shaped with `tc tbf`. Holder
processes on CPU 0, the copying node on CPU 1. Peer copy times include its SHA-256 check of every
file; the raw copy checks nothing. Medians of {runs} runs, alternating order; every timed copy
right after writing and deleting as many bytes (this VM's freed pages cost ~2 s/GiB to touch
again a few seconds later: benchmarks/peer_copy.py, Bench.warm).
Design as measured: spans of {peer_copy.CHUNK_BYTES // MIB} MiB, {peer_copy.CONNECTIONS_PER_HOLDER}
connections per holder, the file server at nice {NICE} and no send cap (`--rate-mib-s` 0).

**Throughput (target: peer copy ≥ 0.8× raw TCP)**

{chr(10).join(rows)}

The sender's CPU is the file server's (or raw-send's, sendfile), the receiver's that of the
process copying (decrypting, writing and hashing; or receiving and writing). On the unshaped
veth both ends are CPU-bound, one core each: peer copy's receiver spends
{med([r.recv_cpu for r in veth["peer"]]) / gib:.2f} s a GiB decrypting, writing and hashing
(SHA-256 alone takes {sha256_s_per_gib():.2f} s a GiB on this CPU) where raw TCP's spends
{med([r.recv_cpu for r in veth["raw"]]) / gib:.2f} s; at 1 Gbit/s peer copy keeps up with the wire.

**Two holders against one, each uplink at {LAN_MBIT} Mbit/s (target: ≤ 0.6× the time)**

| holders | time (s) | runs (s) |
|---|---:|---|
| one (h1) | {one:.2f} | {each(two["one"])} |
| two (h1, h2) | {both:.2f} | {each(two["two"])} |
| **two / one** | **{both / one:.2f}** | |

**Engine decode on the holder while it serves (target: ≥ 0.9× tokens/s)**

Demo model engine on h1 (CPU 0, which it keeps busy), batch 1, {DECODE_TOKENS} tokens a stream,
median of {DECODE_STREAMS} streams per measurement; meanwhile h3 copies the model from h1 again and
again, h1's uplink at {LAN_MBIT} Mbit/s. What h1 sent during the measurements (median): file
server as shipped {med(engine["serving MB/s"]):.0f} MB/s, at nice 10
{med(engine["nice 10 MB/s"]):.0f} MB/s.

| engine on h1 | decode tok/s | × alone | runs |
|---|---:|---:|---|
{chr(10).join(engine_rows)}

{sweep_table(b, designs)}"""


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ROLES:
        ROLES[sys.argv[1]](*sys.argv[2:])
        return 0
    parser = harness.parser(__doc__)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the model's files")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per comparison")
    parser.add_argument("--sweep", action="store_true", help="also try other span sizes")
    args = parser.parse_args()
    if (reason := unavailable_reason()) is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    with (
        tempfile.TemporaryDirectory(prefix="mlxfleet-peer-copy-", dir="/tmp") as tmp,
        Network(3) as net,
    ):
        b = Bench(net, Path(tmp), args.gib)
        with harness.stopping(b.procs):
            b.start()
            lan = throughput(b, args.runs, LAN_MBIT)
            veth = throughput(b, args.runs, None)
            two = two_holders(b, args.runs)
            designs = sweep(b, max(1, args.runs - 1)) if args.sweep else {}
            engine = engine_impact(b, args.runs)
        section = report(b, args.runs, lan, veth, two, engine, designs)
    harness.publish(SECTION, section, args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)

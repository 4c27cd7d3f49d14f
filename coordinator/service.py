"""Service files for launchd (macOS) and systemd (Linux), and the launchctl/systemctl calls.

One source of truth: deploy/launchd and deploy/systemd hold `example_files()`, rendered by the
same functions `mlxfleet service install` uses (a test checks they match). Regenerate them with
`python -m coordinator.service deploy`.
"""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from coordinator.errors import ServiceError

Role = Literal["agent", "coordinator"]
Manager = Literal["launchd", "systemd"]

ROLES: tuple[Role, ...] = ("agent", "coordinator")
DESCRIPTIONS: dict[Role, str] = {
    "agent": "mlxfleet node agent",
    "coordinator": "mlxfleet coordinator",
}
LABEL_PREFIX = "dev.mlxfleet"
SYSTEMD_DIR = Path("/etc/systemd/system")
SYSTEMD_USER = "mlxfleet"  # the dedicated account the units run as (--user names another)
ACCOUNT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a name or a numeric uid
SYSTEMD_HOME = Path("/var/lib/mlxfleet")  # systemd makes it: StateDirectory=mlxfleet
# launchd ThrottleInterval / systemd RestartSec: a crashed daemon is back within seconds (agents
# retry every RECONNECT_MAX_S = 5 s anyway), one that cannot start logs a line per 5 s, no more.
RESTART_DELAY_S = 5
# SIGTERM to SIGKILL. The agent stops its engines in parallel, each finishing in-flight requests
# for up to supervisor.STOP_TIMEOUT_S (15 s). The coordinator gives gRPC server.SHUTDOWN_GRACE_S
# (5 s), then its gateway waits up to aiohttp's shutdown_timeout (60 s) for open streams.
STOP_TIMEOUT_S: dict[Role, int] = {"agent": 30, "coordinator": 90}
CANNOT_FIX_EXIT = 2  # `mlxfleet` exits 2 on an expected error (not enrolled, bad config)
STEP_TIMEOUT_S = 2 * max(STOP_TIMEOUT_S.values())  # a bootout or restart waits for the stop
EXAMPLE_EXECUTABLE = Path("/usr/local/bin/mlxfleet")  # install writes the real path
EXAMPLE_USER_HOME = Path("/Users/you")


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What a service runs: `<executable> <role> <args...>` with MLXFLEET_HOME=home."""

    role: Role
    executable: Path  # absolute path of the `mlxfleet` console script
    home: Path  # absolute
    args: tuple[str, ...] = ()  # more flags for `mlxfleet <role>`, never a token


@dataclass(frozen=True, slots=True)
class Step:
    """One launchctl or systemctl call."""

    argv: tuple[str, ...]
    must_succeed: bool = True  # False: it fails when there is nothing to undo (not loaded yet)

    def __str__(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True, slots=True)
class Plan:
    """`service install`: make `dirs`, write `content` to `path`, then (unless --no-load) run."""

    path: Path
    content: bytes
    steps: tuple[Step, ...]
    dirs: tuple[Path, ...] = ()  # launchd opens its log file but does not make its folder


def manager_for(platform: str) -> Manager:
    """launchd on macOS, systemd on Linux (`platform` is sys.platform)."""
    if platform == "darwin":
        return "launchd"
    if platform.startswith("linux"):
        return "systemd"
    raise ServiceError(
        f"unsupported platform {platform!r}: services are for macOS (launchd) and Linux (systemd)"
    )


def label(role: Role) -> str:
    return f"{LABEL_PREFIX}.{role}"


def unit_name(role: Role) -> str:
    return f"mlxfleet-{role}.service"


def file_name(manager: Manager, role: Role) -> str:
    return f"{label(role)}.plist" if manager == "launchd" else unit_name(role)


def launch_agents_dir(user_home: Path) -> Path:
    return user_home / "Library" / "LaunchAgents"


def launchd_log_dir(user_home: Path) -> Path:
    return user_home / "Library" / "Logs" / "mlxfleet"


def log_file(log_dir: Path, role: Role) -> Path:
    """launchd's StandardOutPath and StandardErrorPath: one file, lines in order."""
    return log_dir / f"{role}.log"


def find_executable() -> Path:
    """This installation's `mlxfleet` script: next to its Python (venv, pipx), else on PATH."""
    beside = Path(sys.executable).parent / "mlxfleet"  # not resolved: a venv's python is a link
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("mlxfleet")
    if found is None:
        raise ServiceError(f"cannot find the mlxfleet command next to {sys.executable} or on PATH")
    return Path(found).absolute()


def launchd_job(spec: ServiceSpec, log_dir: Path) -> dict[str, object]:
    """The launchd.plist(5) dictionary; only keys that man page documents."""
    log = str(log_file(log_dir, spec.role))
    return {
        "Label": label(spec.role),
        "ProgramArguments": [str(spec.executable), spec.role, *spec.args],
        "EnvironmentVariables": {"MLXFLEET_HOME": str(spec.home)},
        "RunAtLoad": True,
        # Back after a crash or an error exit; a clean exit (SIGTERM handled) stays down.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": RESTART_DELAY_S,
        "ExitTimeOut": STOP_TIMEOUT_S[spec.role],
        # Unset or Standard: "light resource limits, throttling CPU and I/O" (launchd.plist(5)).
        # Every request and streamed token passes through these and the agent's engines.
        "ProcessType": "Interactive",
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }


def render_plist(spec: ServiceSpec, log_dir: Path) -> bytes:
    return plistlib.dumps(launchd_job(spec, log_dir), fmt=plistlib.FMT_XML, sort_keys=True)


def _systemd_word(word: str, *, expand_dollar: bool = True) -> str:
    """One word for a unit file: %-specifiers (and $VAR in ExecStart) kept literal, quoted."""
    if "\n" in word or "\0" in word:
        raise ServiceError(f"{word!r}: a service argument cannot hold a newline or NUL")
    word = word.replace("%", "%%")
    if expand_dollar:
        word = word.replace("$", "$$")
    if word and not any(c in word for c in " \t\"'\\;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(spec: ServiceSpec, user: str = SYSTEMD_USER) -> str:
    """The systemd.service(5) unit."""
    if not ACCOUNT_RE.fullmatch(user):
        raise ServiceError(f"--user {user!r}: not an account name")
    command = [str(spec.executable), spec.role, *spec.args]
    lines = [
        f"# {DESCRIPTIONS[spec.role]}: written by `mlxfleet service install {spec.role}`.",
        "[Unit]",
        f"Description={DESCRIPTIONS[spec.role]}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "# A dedicated account, made once with",
        f"#   useradd --system --create-home --home-dir {SYSTEMD_HOME} "
        f"--shell /usr/sbin/nologin {SYSTEMD_USER}",
        "# Another: `mlxfleet service install --user NAME`, or edit User= and daemon-reload.",
    ]
    if spec.role == "agent":
        lines.append("# --engine-memory-limit-mib (cgroup v1) needs User=root.")
    lines += [
        f"User={user}",
        "Environment=" + _systemd_word(f"MLXFLEET_HOME={spec.home}", expand_dollar=False),
    ]
    if spec.home == SYSTEMD_HOME:
        lines += [
            f"# systemd makes {SYSTEMD_HOME}, owned by User= and readable by it alone.",
            f"StateDirectory={SYSTEMD_HOME.name}",
            "StateDirectoryMode=0700",
        ]
    lines += [
        "ExecStart=" + " ".join(_systemd_word(word) for word in command),
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY_S}",
        "# Exit status 2 is an error a restart cannot fix (not enrolled, bad config): stay down.",
        f"RestartPreventExitStatus={CANNOT_FIX_EXIT}",
        "KillSignal=SIGTERM",
    ]
    if spec.role == "agent":
        lines += [
            "# SIGTERM to the agent alone: it stops its engines, each finishing in-flight",
            "# requests first; whatever is left at TimeoutStopSec gets SIGKILL.",
            "KillMode=mixed",
        ]
    else:
        lines.append(
            "# On SIGTERM the coordinator stops taking requests and drains in-flight ones."
        )
    lines += [
        f"TimeoutStopSec={STOP_TIMEOUT_S[spec.role]}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def load_steps(manager: Manager, role: Role, path: Path, uid: int) -> tuple[Step, ...]:
    """Load (or reload) the written file and start the daemon."""
    if manager == "launchd":
        domain = f"gui/{uid}"  # the user's login session: LaunchAgents run there
        return (
            Step(("launchctl", "bootout", f"{domain}/{label(role)}"), must_succeed=False),
            Step(("launchctl", "bootstrap", domain, str(path))),
        )
    # restart, not `enable --now`: a reinstall must replace a running daemon with the new unit.
    return (
        Step(("systemctl", "daemon-reload")),
        Step(("systemctl", "enable", unit_name(role))),
        Step(("systemctl", "restart", unit_name(role))),
    )


def unload_steps(
    manager: Manager, role: Role, uid: int
) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
    """(before removing the file, after removing it): stop the daemon, forget the service."""
    if manager == "launchd":
        bootout = Step(("launchctl", "bootout", f"gui/{uid}/{label(role)}"), must_succeed=False)
        return (bootout,), ()
    return (Step(("systemctl", "disable", "--now", unit_name(role))),), (
        Step(("systemctl", "daemon-reload")),
    )


def plan_install(
    manager: Manager, spec: ServiceSpec, directory: Path, *, uid: int, user: str, log_dir: Path
) -> Plan:
    """What to write where and what to run; `log_dir` is launchd's, `user` systemd's."""
    path = directory / file_name(manager, spec.role)
    steps = load_steps(manager, spec.role, path, uid)
    if manager == "launchd":
        return Plan(path, render_plist(spec, log_dir), steps, dirs=(log_dir,))
    return Plan(path, render_unit(spec, user).encode(), steps)


def example_files() -> dict[Path, bytes]:
    """deploy/{launchd,systemd}/*: what install writes, with placeholder paths."""
    files: dict[Path, bytes] = {}
    for role in ROLES:
        mac = ServiceSpec(role, EXAMPLE_EXECUTABLE, EXAMPLE_USER_HOME / ".mlxfleet")
        linux = ServiceSpec(role, EXAMPLE_EXECUTABLE, SYSTEMD_HOME)
        log_dir = launchd_log_dir(EXAMPLE_USER_HOME)
        files[Path("launchd") / file_name("launchd", role)] = render_plist(mac, log_dir)
        files[Path("systemd") / file_name("systemd", role)] = render_unit(linux).encode()
    return files


def _fail(what: str, path: Path, exc: OSError) -> ServiceError:
    hint = " (run as root, or pass --dir)" if isinstance(exc, PermissionError) else ""
    return ServiceError(f"cannot {what} {path}: {exc.strerror or exc}{hint}")


def write_plan(plan: Plan) -> None:
    """Make the folders, then write the file in one step (a crash leaves the old one)."""
    for folder in (*plan.dirs, plan.path.parent):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _fail("create", folder, exc) from None
    tmp = plan.path.with_name(f".{plan.path.name}.tmp")
    try:
        tmp.write_bytes(plan.content)
        tmp.chmod(0o644)  # launchd and systemd read it; it holds no secret
        os.replace(tmp, plan.path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _fail("write", plan.path, exc) from None


def remove_file(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        raise _fail("remove", path, exc) from None


def run_steps(steps: tuple[Step, ...]) -> None:
    """Run each call in order; one that must succeed and fails raises ServiceError."""
    for step in steps:
        try:
            done = subprocess.run(step.argv, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        except FileNotFoundError:
            raise ServiceError(f"{step.argv[0]} not found: cannot run `{step}`") from None
        except subprocess.TimeoutExpired:
            raise ServiceError(f"`{step}` did not finish in {STEP_TIMEOUT_S} s") from None
        except OSError as exc:
            raise ServiceError(f"cannot run `{step}`: {exc.strerror or exc}") from None
        if done.returncode != 0 and step.must_succeed:
            output = (done.stderr.strip() or done.stdout.strip()).splitlines()
            detail = output[-1] if output else "no output"
            raise ServiceError(f"`{step}` failed (exit {done.returncode}): {detail}")


if __name__ == "__main__":  # python -m coordinator.service deploy
    for relative, data in example_files().items():
        target = Path(sys.argv[1]) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        print(target)

"""Service files (deploy/launchd, deploy/systemd) and `mlxfleet service install | uninstall`.

launchctl cannot run here (Linux): the launchd tests check the argv lists and run them against
a stand-in `launchctl` on PATH. systemd units are checked with the real `systemd-analyze verify`.
"""

from __future__ import annotations

import argparse
import inspect
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator import service
from coordinator.cli import service as cli_service
from coordinator.errors import Error, ServiceError
from coordinator.service import ServiceSpec, Step
from node_agent.identity import NodeIdentity

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# launchd.plist(5) keys these files may use: a typo would be ignored by launchd, silently.
LAUNCHD_KEYS = {
    "Label",
    "ProgramArguments",
    "EnvironmentVariables",
    "RunAtLoad",
    "KeepAlive",
    "ThrottleInterval",
    "ExitTimeOut",
    "ProcessType",
    "StandardOutPath",
    "StandardErrorPath",
}


def run_cli(command: str) -> None:
    """`mlxfleet <command>` through this module's parser (the CLI wires the same add_parser)."""
    parser = argparse.ArgumentParser(prog="mlxfleet")
    cli_service.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(shlex.split(command))
    args.func(args)


def fake_tool(tmp_path: Path, name: str, exit_code: int = 0, stderr: str = "") -> Path:
    """A stand-in launchctl/systemctl on PATH that logs its argv to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    script = bin_dir / name
    script.write_text(
        f'#!/bin/sh\necho "{name} $*" >> "{log}"\necho "{stderr}" >&2\nexit {exit_code}\n'
    )
    script.chmod(0o755)
    return log


def enrolled_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    NodeIdentity("node-1", b"key", b"cert", b"coord", b"ca", "10.0.0.1:8401").save(home / "agent")
    return home


def check_job(job: dict[str, object], role: str, log_dir: Path) -> None:
    assert set(job) <= LAUNCHD_KEYS, set(job) - LAUNCHD_KEYS
    assert job["Label"] == f"dev.mlxfleet.{role}"
    program = job["ProgramArguments"]
    assert isinstance(program, list) and all(isinstance(a, str) for a in program)
    assert Path(program[0]).is_absolute() and program[0].endswith("/mlxfleet")
    assert program[1] == role
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["ProcessType"] == "Interactive"
    assert job["ThrottleInterval"] == service.RESTART_DELAY_S
    assert job["ExitTimeOut"] == service.STOP_TIMEOUT_S[role]
    assert job["StandardOutPath"] == job["StandardErrorPath"] == str(log_dir / f"{role}.log")
    env = job["EnvironmentVariables"]
    assert isinstance(env, dict) and Path(env["MLXFLEET_HOME"]).is_absolute()


def test_committed_files_are_what_install_renders() -> None:
    for relative, content in service.example_files().items():
        committed = (DEPLOY / relative).read_bytes()
        assert committed == content, f"{relative} is stale: python -m coordinator.service deploy"
    assert {p.name for p in (DEPLOY / "launchd").iterdir()} == {
        "dev.mlxfleet.agent.plist",
        "dev.mlxfleet.coordinator.plist",
    }


@pytest.mark.parametrize("role", service.ROLES)
def test_committed_plist_has_what_launchd_needs(role: str) -> None:
    path = DEPLOY / "launchd" / f"dev.mlxfleet.{role}.plist"
    job = plistlib.loads(path.read_bytes())
    assert job["Label"] == path.name.removesuffix(".plist")
    assert job["ProgramArguments"][0] == str(service.EXAMPLE_EXECUTABLE)  # the placeholder
    check_job(job, role, service.launchd_log_dir(service.EXAMPLE_USER_HOME))


@pytest.mark.parametrize("role", service.ROLES)
def test_rendered_plist_runs_the_role_with_its_flags(role: service.Role, tmp_path: Path) -> None:
    exe = tmp_path / "venv" / "bin" / "mlxfleet"
    spec = ServiceSpec(role, exe, tmp_path / "state", ("--label", "site=east"))
    job = plistlib.loads(service.render_plist(spec, tmp_path / "logs"))
    check_job(job, role, tmp_path / "logs")
    assert job["ProgramArguments"] == [str(exe), role, "--label", "site=east"]
    assert job["EnvironmentVariables"] == {"MLXFLEET_HOME": str(tmp_path / "state")}


def test_stop_timeouts_outlast_the_daemons_drains() -> None:
    """TimeoutStopSec/ExitTimeOut must not SIGKILL a daemon still finishing requests."""
    from aiohttp.web_runner import BaseRunner

    from coordinator.server import SHUTDOWN_GRACE_S
    from node_agent.supervisor import STOP_TIMEOUT_S

    gateway_drain_s = inspect.signature(BaseRunner).parameters["shutdown_timeout"].default
    assert service.STOP_TIMEOUT_S["agent"] > STOP_TIMEOUT_S
    assert service.STOP_TIMEOUT_S["coordinator"] > SHUTDOWN_GRACE_S + gateway_drain_s


@pytest.mark.parametrize("role", service.ROLES)
def test_rendered_unit_passes_systemd_analyze_verify(role: service.Role, tmp_path: Path) -> None:
    """systemd's own parser checks the unit; ExecStart must be a real executable for it."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: cannot verify the unit")
    exe = service.find_executable()
    home = tmp_path / "state dir" / "100%"  # a space and a % must be quoted and escaped
    spec = ServiceSpec(role, exe, home, ("--label", "a b"))
    unit = tmp_path / service.unit_name(role)
    unit.write_text(service.render_unit(spec, "root"))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = unit.read_text()
    assert f'Environment="MLXFLEET_HOME={tmp_path}/state dir/100%%"' in text
    assert f'ExecStart={exe} {role} --label "a b"' in text
    assert "StateDirectory" not in text  # only for the default /var/lib/mlxfleet
    assert f"TimeoutStopSec={service.STOP_TIMEOUT_S[role]}" in text
    assert ("KillMode=mixed" in text) == (role == "agent")


@pytest.mark.parametrize("role", service.ROLES)
def test_committed_unit_verifies_with_a_real_executable(role: str, tmp_path: Path) -> None:
    """The example differs from a real install only in its placeholder ExecStart path."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: cannot verify the unit")
    text = (DEPLOY / "systemd" / f"mlxfleet-{role}.service").read_text()
    unit = tmp_path / f"mlxfleet-{role}.service"
    unit.write_text(
        text.replace(str(service.EXAMPLE_EXECUTABLE), str(service.find_executable())).replace(
            "User=mlxfleet", "User=root"
        )
    )
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "User=mlxfleet\nEnvironment=MLXFLEET_HOME=/var/lib/mlxfleet\n" in text
    assert "Restart=on-failure\nRestartSec=5\n" in text
    assert "WantedBy=multi-user.target\n" in text


def test_load_steps_are_the_documented_commands() -> None:
    plist = Path("/Users/a/Library/LaunchAgents/dev.mlxfleet.agent.plist")
    assert [s.argv for s in service.load_steps("launchd", "agent", plist, 501)] == [
        ("launchctl", "bootout", "gui/501/dev.mlxfleet.agent"),
        ("launchctl", "bootstrap", "gui/501", str(plist)),
    ]
    # bootout fails when nothing is loaded yet: that failure is expected, not an error.
    assert [s.must_succeed for s in service.load_steps("launchd", "agent", plist, 501)] == [
        False,
        True,
    ]
    unit = Path("/etc/systemd/system/mlxfleet-coordinator.service")
    assert [s.argv for s in service.load_steps("systemd", "coordinator", unit, 0)] == [
        ("systemctl", "daemon-reload"),
        ("systemctl", "enable", "mlxfleet-coordinator.service"),
        ("systemctl", "restart", "mlxfleet-coordinator.service"),
    ]
    assert service.unload_steps("launchd", "coordinator", 501) == (
        (Step(("launchctl", "bootout", "gui/501/dev.mlxfleet.coordinator"), False),),
        (),
    )
    assert service.unload_steps("systemd", "agent", 0) == (
        (Step(("systemctl", "disable", "--now", "mlxfleet-agent.service")),),
        (Step(("systemctl", "daemon-reload")),),
    )


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_dry_run_prints_the_render_and_writes_nothing(
    platform: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    home = tmp_path / "state"
    out_dir = tmp_path / "out"
    run_cli(
        f"service install agent --home {home} --dir {out_dir} --coordinator 10.0.0.1:8401 "
        "--dry-run -- --label site=east"
    )
    out, err = capsys.readouterr()
    spec = ServiceSpec(
        "agent",
        service.find_executable(),
        home,
        ("--coordinator", "10.0.0.1:8401", "--label", "site=east"),
    )
    if platform == "darwin":
        expected = service.render_plist(spec, service.launchd_log_dir(tmp_path / "user")).decode()
        path = tmp_path / "out" / "dev.mlxfleet.agent.plist"
    else:
        expected = service.render_unit(spec)
        path = tmp_path / "out" / "mlxfleet-agent.service"
    assert out == expected
    assert f"# would write {path}" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "user").exists()


def test_no_load_writes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("")
    monkeypatch.chdir(tmp_path)  # --config fleet.toml is made absolute: a service starts in /
    home = tmp_path / "state"
    out = tmp_path / "out"
    run_cli(
        f"service install coordinator --home {home} --dir {out} --no-load -- --config fleet.toml"
    )
    path = out / "mlxfleet-coordinator.service"
    spec = ServiceSpec("coordinator", service.find_executable(), home, ("--config", str(fleet)))
    assert path.read_text() == service.render_unit(spec)
    assert path.stat().st_mode & 0o777 == 0o644
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {path}; load it with: systemctl daemon-reload && ")


def test_agent_install_needs_an_enrolled_node(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="this node has not enrolled") as info:
        run_cli(f"service install agent --home {tmp_path} --dir {tmp_path} --no-load")
    assert f"sudo -u mlxfleet mlxfleet agent --home {tmp_path} --token T" in str(info.value)
    assert not (tmp_path / "mlxfleet-agent.service").exists()
    home = enrolled_home(tmp_path)
    run_cli(f"service install agent --home {home} --dir {tmp_path} --no-load")
    assert (tmp_path / "mlxfleet-agent.service").exists()


@pytest.mark.parametrize(
    ("role", "flags", "message"),
    [
        ("agent", "--token mlxfj1.abc.def", "a join token is never written into a service file"),
        ("agent", "-- --token x", "a join token is never written into a service file"),
        ("agent", "-- --tok=x", "a join token is never written into a service file"),
        ("agent", "-- --home /x", "--home: pass --home before --"),
        ("coordinator", "-- --config /no/fleet.toml", "--config /no/fleet.toml: no such file"),
        ("coordinator", "-- --config", "--config: name a fleet.toml"),
    ],
)
def test_flags_that_must_not_reach_the_file(
    role: str, flags: str, message: str, tmp_path: Path
) -> None:
    home = enrolled_home(tmp_path)
    with pytest.raises(ServiceError) as info:
        run_cli(f"service install {role} --home {home} --dir {tmp_path} --no-load {flags}")
    assert str(info.value).startswith(message)
    assert list(tmp_path.glob("*.service")) == []


def test_unsupported_platform_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(ServiceError) as info:
        run_cli("service install coordinator --dry-run")
    message = str(info.value)
    assert message == (
        "unsupported platform 'win32': services are for macOS (launchd) and Linux (systemd)"
    )
    assert isinstance(info.value, Error)  # cli.main prints Error as one line and exits 2


def test_systemd_install_and_uninstall_run_systemctl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_tool(tmp_path, "systemctl")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    out = tmp_path / "units"
    run_cli(f"service install coordinator --home {tmp_path} --dir {out} --user root")
    run_cli(f"service uninstall coordinator --dir {out}")
    assert log.read_text().splitlines() == [
        "systemctl daemon-reload",
        "systemctl enable mlxfleet-coordinator.service",
        "systemctl restart mlxfleet-coordinator.service",
        "systemctl disable --now mlxfleet-coordinator.service",
        "systemctl daemon-reload",
    ]
    assert list(out.iterdir()) == []


def test_launchd_install_and_uninstall_run_launchctl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in launchctl: the real one exists only on macOS."""
    log = fake_tool(tmp_path, "launchctl")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(os, "getuid", lambda: 501)
    home = enrolled_home(tmp_path)
    run_cli(f"service install agent --home {home}")
    plist = tmp_path / "user" / "Library" / "LaunchAgents" / "dev.mlxfleet.agent.plist"
    job = plistlib.loads(plist.read_bytes())
    check_job(job, "agent", tmp_path / "user" / "Library" / "Logs" / "mlxfleet")
    assert (tmp_path / "user" / "Library" / "Logs" / "mlxfleet").is_dir()  # launchd won't make it
    run_cli("service uninstall agent")
    assert log.read_text().splitlines() == [
        "launchctl bootout gui/501/dev.mlxfleet.agent",
        f"launchctl bootstrap gui/501 {plist}",
        "launchctl bootout gui/501/dev.mlxfleet.agent",
    ]
    assert not plist.exists()


def test_launchd_install_refuses_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(os, "getuid", lambda: 0)
    with pytest.raises(ServiceError, match="not root: a LaunchAgent runs in that user's login"):
        run_cli(f"service install coordinator --home {tmp_path} --dir {tmp_path}")


def test_failing_or_missing_tool_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tool(tmp_path, "systemctl", exit_code=1, stderr="System has not been booted with systemd")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    command = f"service install coordinator --home {tmp_path} --user root"
    with pytest.raises(ServiceError) as info:
        run_cli(f"{command} --dir {tmp_path}/a")
    assert str(info.value) == (
        "`systemctl daemon-reload` failed (exit 1): System has not been booted with systemd "
        f"({tmp_path}/a/mlxfleet-coordinator.service is written but not loaded)"
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ServiceError, match="^systemctl not found: cannot run `systemctl daemon-"):
        run_cli(f"{command} --dir {tmp_path}/b")


def test_unwritable_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ServiceError, match=f"^cannot create {blocker}/sub: "):
        run_cli(f"service install coordinator --home {tmp_path} --dir {blocker}/sub --no-load")


def test_unknown_account_and_missing_uninstall(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="--user no-such-user-x: no such account; create it"):
        run_cli(
            f"service install coordinator --home {tmp_path} --dir {tmp_path} --user no-such-user-x"
        )
    with pytest.raises(ServiceError, match="does not exist: nothing to uninstall"):
        run_cli(f"service uninstall agent --dir {tmp_path}")

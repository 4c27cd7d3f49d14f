"""`mlxfleet service install | uninstall agent|coordinator`: run a daemon under launchd/systemd.

The join token never goes into a service file: the plist or unit is readable by every local
user (and `systemctl show` prints it), and the agent needs the token only once, to enroll.
Enroll first with `mlxfleet agent --token T`; the service then starts from the saved identity.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shlex
import sys
from pathlib import Path
from typing import Any

from coordinator import service
from coordinator.config import default_home
from coordinator.errors import ServiceError
from coordinator.service import Manager, Role

TOKEN_REFUSED = (
    "a join token is never written into a service file (any local user can read it): "
    "enroll once with `mlxfleet agent --token T`, then run `mlxfleet service install agent`"
)


def add_parser(subparsers: Any) -> None:
    """`service install ROLE` and `service uninstall ROLE`, one subparser per role."""
    parser = subparsers.add_parser("service", help="run the agent or coordinator at boot/login")
    verbs = parser.add_subparsers(dest="service_command", required=True)
    install = verbs.add_parser("install", help="write the launchd plist or systemd unit, load it")
    uninstall = verbs.add_parser("uninstall", help="stop the daemon and remove its service file")
    install_roles = install.add_subparsers(dest="role", required=True)
    uninstall_roles = uninstall.add_subparsers(dest="role", required=True)
    for role in service.ROLES:
        add = install_roles.add_parser(role, help=f"run `mlxfleet {role}` as a service")
        if role == "agent":
            add.add_argument("--token", help="refused: enroll first with `mlxfleet agent --token`")
            add.add_argument(
                "--coordinator", help="HOST[:PORT] (default: the one saved at enrollment)"
            )
        add.add_argument(
            "--home",
            help="state folder (default $MLXFLEET_HOME or ~/.mlxfleet; "
            f"Linux: {service.SYSTEMD_HOME})",
        )
        add.add_argument(
            "--user",
            default=service.SYSTEMD_USER,
            help=f"Linux: the account it runs as (default {service.SYSTEMD_USER})",
        )
        _common(add)
        add.add_argument(
            "daemon_args",
            nargs="*",
            metavar="-- FLAG",
            help=f"more `mlxfleet {role}` flags, after --",
        )
        add.set_defaults(func=cmd_service_install)
        remove = uninstall_roles.add_parser(role, help=f"stop and remove the {role} service")
        _common(remove)
        remove.set_defaults(func=cmd_service_uninstall)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        help=f"where the file goes (default ~/Library/LaunchAgents or {service.SYSTEMD_DIR})",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what it would do; do nothing")
    parser.add_argument("--no-load", action="store_true", help="no launchctl or systemctl calls")


def _directory(manager: Manager, text: str | None) -> Path:
    if text:
        return Path(text).expanduser().absolute()
    if manager == "launchd":
        return service.launch_agents_dir(Path.home())
    return service.SYSTEMD_DIR


def _home(manager: Manager, text: str | None) -> Path:
    """The service's MLXFLEET_HOME; on Linux it runs as another account, so not ours."""
    if text:
        return Path(text).expanduser().absolute()
    if manager == "launchd":
        return default_home().expanduser().absolute()
    return service.SYSTEMD_HOME


def _is_flag(arg: str, flag: str) -> bool:
    """Whether arg is flag, flag=VALUE or an abbreviation argparse would expand to it."""
    name = arg.partition("=")[0]
    return len(name) > 2 and flag.startswith(name)


def _daemon_args(role: Role, args: list[str]) -> tuple[str, ...]:
    """The flags after --, checked; a coordinator's --config made absolute (it starts in /)."""
    out = list(args)
    for i, arg in enumerate(out):
        if _is_flag(arg, "--token"):
            raise ServiceError(TOKEN_REFUSED)
        if _is_flag(arg, "--home"):
            raise ServiceError(f"{arg}: pass --home before --; it sets the service's MLXFLEET_HOME")
        if role == "coordinator" and arg.partition("=")[0] == "--config":
            name, sep, value = arg.partition("=")
            where = i if sep else i + 1
            if where == len(out):
                raise ServiceError("--config: name a fleet.toml")
            path = Path(value if sep else out[where]).expanduser().absolute()
            if not path.is_file():
                raise ServiceError(f"--config {path}: no such file")
            out[where] = f"{name}={path}" if sep else str(path)
    return tuple(out)


def _check_enrolled(manager: Manager, home: Path, user: str, coordinator: str | None) -> None:
    """An agent service without a saved identity would only exit with 'not enrolled'."""
    from node_agent.identity import NodeIdentity

    if NodeIdentity.load(home / "agent") is not None:
        return
    command = f"mlxfleet agent --home {shlex.quote(str(home))} --token T"
    command += f" --coordinator {shlex.quote(coordinator or 'HOST:PORT')}"
    if manager == "systemd":
        command = f"sudo -u {user} {command}"
    raise ServiceError(
        f"this node has not enrolled (no identity in {home / 'agent'}): run `{command}` once, "
        "stop it (Ctrl-C) after it logs 'enrolled as', then install the service"
    )


def _check_not_root(manager: Manager) -> None:
    if manager == "launchd" and os.getuid() == 0:
        raise ServiceError(
            "run this as the user the service is for, not root: "
            "a LaunchAgent runs in that user's login session"
        )


def _check_account(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ServiceError(
            f"--user {user}: no such account; create it with `useradd --system "
            f"--create-home --home-dir {service.SYSTEMD_HOME} --shell /usr/sbin/nologin "
            f"{user}`, or name another with --user"
        ) from None


def cmd_service_install(args: argparse.Namespace) -> None:
    manager = service.manager_for(sys.platform)
    role: Role = args.role
    if getattr(args, "token", None):
        raise ServiceError(TOKEN_REFUSED)
    extra = _daemon_args(role, args.daemon_args)
    coordinator = getattr(args, "coordinator", None)
    if coordinator:
        from node_agent.agent import DEFAULT_GRPC_PORT, split_host_port

        split_host_port(coordinator, DEFAULT_GRPC_PORT)  # a bad address fails here, not at boot
        extra = ("--coordinator", coordinator, *extra)
    home = _home(manager, args.home)
    spec = service.ServiceSpec(role, service.find_executable(), home, extra)
    plan = service.plan_install(
        manager,
        spec,
        _directory(manager, args.dir),
        uid=os.getuid(),
        user=args.user,
        log_dir=service.launchd_log_dir(Path.home()),
    )
    if args.dry_run:  # stdout is the file alone, so it can be redirected
        sys.stdout.write(plan.content.decode())
        print(f"# would write {plan.path}", file=sys.stderr)
        for step in () if args.no_load else plan.steps:
            print(f"# would run {step}", file=sys.stderr)
        return
    if not args.no_load:
        _check_not_root(manager)
        if manager == "systemd":
            _check_account(args.user)
    if role == "agent":
        _check_enrolled(manager, home, args.user, coordinator)
    service.write_plan(plan)
    if args.no_load:
        load = " && ".join(str(step) for step in plan.steps if step.must_succeed)
        print(f"wrote {plan.path}; load it with: {load}")
        return
    try:
        service.run_steps(plan.steps)
    except ServiceError as exc:
        raise ServiceError(f"{exc} ({plan.path} is written but not loaded)") from None
    logs = (
        f"logs in {service.log_file(plan.dirs[0], role)}"
        if manager == "launchd"
        else f"logs: journalctl -u {service.unit_name(role)}"
    )
    print(f"installed and started {service.file_name(manager, role)} ({plan.path}); {logs}")


def cmd_service_uninstall(args: argparse.Namespace) -> None:
    manager = service.manager_for(sys.platform)
    role: Role = args.role
    path = _directory(manager, args.dir) / service.file_name(manager, role)
    before, after = service.unload_steps(manager, role, os.getuid())
    if args.no_load:
        before, after = (), ()
    if args.dry_run:
        for step in before:
            print(f"# would run {step}")
        print(f"# would remove {path}")
        for step in after:
            print(f"# would run {step}")
        return
    if not path.exists():
        raise ServiceError(f"{path} does not exist: nothing to uninstall (another --dir?)")
    if before:
        _check_not_root(manager)
    service.run_steps(before)
    service.remove_file(path)
    service.run_steps(after)
    print(f"uninstalled {service.file_name(manager, role)} (removed {path})")

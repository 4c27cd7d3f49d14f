"""Which coordinator an admin command calls, and the call: `mlxfleet login | logout` too.

In order: `--coordinator URL` (with `--token` and `--ca FILE`); else, unless `--home` names a
state folder on this host, the login `mlxfleet login` saved; else this host's coordinator (its
port from MLXFLEET_HOME/coordinator.json, the local admin token). Every failure is one line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.cli.errors import CliError

LOGIN_FILE_ENV = "MLXFLEET_LOGIN_FILE"  # the saved login's path (tests point it elsewhere)
ADMIN_TIMEOUT_S = 10.0
URL_EXAMPLE = "https://coordinator:8400"


@dataclass(frozen=True, slots=True)
class Target:
    """One coordinator's admin API: its base URL, a bearer token and whom to trust for https."""

    url: str
    token: str
    ca_pem: str | None = None  # the CA to trust; None: the system's trust store
    pinned: ssl.SSLContext | None = None  # this host's gateway: its own certificate (ca.py)


def add_parser(subparsers: Any) -> None:
    """`login URL --token T [--ca FILE]` and `logout`."""
    login = subparsers.add_parser(
        "login", help="save a remote coordinator and operator token for the admin commands"
    )
    login.add_argument("url", metavar="URL", help=f"its gateway, e.g. {URL_EXAMPLE}")
    login.add_argument("--token", required=True, help="from `mlxfleet operator create NAME`")
    login.add_argument("--ca", metavar="FILE", help="CA to trust (`mlxfleet ca export` there)")
    login.set_defaults(func=cmd_login)
    logout = subparsers.add_parser("logout", help="forget the saved login")
    logout.set_defaults(func=cmd_logout)


def add_flags(parser: argparse.ArgumentParser, after_verb: bool = False) -> None:
    """--coordinator, --token and --ca; `after_verb`: also after a verb, absent ones unset."""
    default = argparse.SUPPRESS if after_verb else None
    parser.add_argument(
        "--coordinator",
        metavar="URL",
        default=default,
        help=f"a remote coordinator, e.g. {URL_EXAMPLE} (default: the saved login, else this host)",
    )
    parser.add_argument("--token", default=default, help="operator token for --coordinator")
    parser.add_argument("--ca", metavar="FILE", default=default, help="CA for --coordinator")


def target_of(args: argparse.Namespace | None, home: Path) -> Target:
    """The coordinator a command calls, in the order the module docstring gives."""
    flags = vars(args) if args is not None else {}
    if flags.get("coordinator") is not None:
        return remote_target(flags["coordinator"], flags.get("token") or "", flags.get("ca"))
    if flags.get("token") is not None or flags.get("ca") is not None:
        raise CliError("--token and --ca go with --coordinator URL")
    saved = load_login() if flags.get("home") is None else None
    return saved or local_target(home)


def remote_target(url: str, token: str, ca_file: str | None) -> Target:
    """A coordinator named on the command line; CliError for a bad URL or CA file."""
    url = parse_url(url)
    if ca_file is not None and not url.startswith("https://"):
        raise CliError(f"--ca: {url} is plain http; a CA goes with an https:// URL")
    return Target(url, token, None if ca_file is None else read_ca(Path(ca_file)))


def parse_url(text: str) -> str:
    """`https://host:port` (a path is kept, a trailing slash dropped); CliError otherwise."""
    parts = urllib.parse.urlsplit(text)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is no number or out of range
        valid = False
    if not valid or parts.query or parts.fragment:
        raise CliError(f"{text!r}: not a coordinator URL (expected one like {URL_EXAMPLE})")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def read_ca(path: Path) -> str:
    """The PEM text of a CA certificate file; CliError when it is missing or not one."""
    try:
        pem = path.read_text()
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, UnicodeDecodeError):  # before OSError: SSLError is one
        raise CliError(f"--ca {path}: not a PEM certificate") from None
    except OSError as exc:
        raise CliError(f"--ca {path}: {exc.strerror or exc}") from None
    return pem


def local_target(home: Path) -> Target:
    """This host's coordinator, from the files it writes into its MLXFLEET_HOME."""
    from coordinator.cli.ca import local_gateway_tls  # lazily: common imports this module
    from coordinator.server import ADMIN_TOKEN_FILE, RUNTIME_FILE  # lazily: it imports litellm

    try:
        runtime = json.loads((home / RUNTIME_FILE).read_text())
        token = (home / ADMIN_TOKEN_FILE).read_text().strip()
    except (OSError, ValueError):
        raise CliError(f"no coordinator is running with MLXFLEET_HOME={home}") from None
    host = runtime["host"] if runtime["host"] not in ("0.0.0.0", "::") else "127.0.0.1"
    scheme = runtime.get("gateway_scheme", "http")
    url = f"{scheme}://{host}:{runtime['gateway_port']}"
    return Target(url, token, pinned=local_gateway_tls(runtime))


def call(target: Target, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """The JSON reply of one admin API call; any failure is a CliError of one line."""
    headers = {"Content-Type": "application/json"}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    request = urllib.request.Request(
        target.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
    )
    context = target.pinned
    if context is None and target.url.startswith("https://"):
        context = ssl.create_default_context(cadata=target.ca_pem)
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT_S, context=context) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise CliError(_refusal(target, exc)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise CliError(f"{target.url}: {_failure(exc)}") from None


def _refusal(target: Target, exc: urllib.error.HTTPError) -> str:
    """The coordinator's own error message; a 401 names the URL (which token was refused)."""
    try:
        message = str(json.loads(exc.read())["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {exc.code} {exc.reason}"
    return f"{target.url} refused the token (401): {message}" if exc.code == 401 else message


def _failure(exc: BaseException) -> str:
    """Why a call got no HTTP reply, with the usual fix."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (
            f"certificate not trusted ({reason.verify_message}): pass --ca FILE "
            "(`mlxfleet ca export` on the coordinator host)"
        )
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed ({reason.reason}): is it a plain http:// port?"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused: is the coordinator running, on that port?"
    if isinstance(reason, ConnectionResetError | http.client.BadStatusLine):
        return "closed without an HTTP reply: is it an https:// port?"
    if isinstance(reason, TimeoutError):
        return f"no reply within {ADMIN_TIMEOUT_S:g} s"
    return f"not reachable: {reason}"


def login_path() -> Path:
    """$MLXFLEET_LOGIN_FILE, else mlxfleet/login.json in $XDG_CONFIG_HOME (~/.config)."""
    if override := os.environ.get(LOGIN_FILE_ENV):
        return Path(override).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "mlxfleet" / "login.json"


def save_login(target: Target) -> Path:
    """Write the login where login_path() says, mode 600 from its first byte (a token)."""
    path = login_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # O_EXCL below: never reuse a file someone else made
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        json.dump({"url": target.url, "token": target.token, "ca_pem": target.ca_pem}, out)
    tmp.replace(path)
    return path


def load_login() -> Target | None:
    """The saved login; None when there is none."""
    path = login_path()
    try:
        raw = json.loads(path.read_text())
        return Target(str(raw["url"]), str(raw["token"]), raw.get("ca_pem"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CliError(f"{path}: not a saved login; `mlxfleet login` again or logout") from None


def cmd_login(args: argparse.Namespace) -> None:
    """Check the token against the coordinator first: a bad login fails now, not later."""
    target = remote_target(args.url, args.token, args.ca)
    nodes = call(target, "GET", "/admin/v1/nodes")["nodes"]
    path = save_login(target)
    count = f"{len(nodes)} node{'' if len(nodes) == 1 else 's'}"
    print(f"logged in to {target.url} ({count} there); saved in {path}")


def cmd_logout(_args: argparse.Namespace) -> None:
    path = login_path()
    existed = path.exists()
    path.unlink(missing_ok=True)
    print(f"logged out: removed {path}" if existed else f"not logged in (no {path})")

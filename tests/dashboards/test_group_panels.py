"""The fleet dashboard's group panels, computed by a real Prometheus from known series.

Ten minutes of the series two agents and the coordinator would serve for a group of two (rank 0
on node a, rank 1 on node b) and a whole copy of the same model on node c, backfilled with
`promtool tsdb create-blocks-from openmetrics`; Debian's `prometheus` then answers each panel's
own expression. Every counter grows at a set rate, so each panel's value is known exactly.
"""

from __future__ import annotations

import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from dashboards import generate
from tests.conftest import Proc, wait_for

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
SCRAPE_S = 15
SPAN_S = 600
WINDOW = "1m"  # what $__rate_interval stands for
GIB = 2**30
GROUP = {"model": "big", "tier": "interactive", "group": "g-1"}
AGENTS = {"job": "mlxfleet-agents"}
COORDINATOR = {"job": "mlxfleet-coordinator"}
# node -> (rank, first layer, steps/s, step seconds/s, link bytes sent/s, received/s, RSS)
RANKS = {
    "a": (0, 16, 10.0, 0.5, 2000.0, 6000.0, 30 * GIB),
    "b": (1, 0, 10.0, 0.3, 6000.0, 2000.0, 28 * GIB),
}
SHARE_BYTES = 25 * GIB
TOKENS_PER_S = {"a": 20.0, "b": 0.0, "c": 100.0}  # c: a whole copy of the model, no group

Series = tuple[str, dict[str, str], Callable[[float], float]]  # name, labels, value at elapsed s


def series() -> list[Series]:
    out: list[Series] = []
    for node, (rank, first, steps, step_s, sent, received, rss) in RANKS.items():
        me = {**AGENTS, "node": node, **GROUP, "rank": str(rank)}
        layers = {"first_layer": str(first), "layers": "16"}
        out += [
            ("mlxfleet_group_rank_info", {**me, **layers}, lambda _: 1.0),
            ("mlxfleet_group_rank_rss_bytes", me, lambda _, v=rss: float(v)),
            ("mlxfleet_group_steps_total", me, lambda e, r=steps: r * e),
            ("mlxfleet_group_step_seconds_total", me, lambda e, r=step_s: r * e),
        ]
        link = {**AGENTS, "node": node, **GROUP}
        out.append(("mlxfleet_group_link_bytes_total", {**link, "direction": "sent"}, _rate(sent)))
        received_labels = {**link, "direction": "received"}
        out.append(("mlxfleet_group_link_bytes_total", received_labels, _rate(received)))
        member = {**COORDINATOR, **GROUP, "node": node, "rank": str(rank), **layers}
        out.append(("mlxfleet_group_member_bytes", member, lambda _: float(SHARE_BYTES)))
    for node, per_s in TOKENS_PER_S.items():
        engine = {**AGENTS, "node": node, "model": "big", "tier": "interactive"}
        out.append(("mlxfleet_engine_generation_tokens_total", engine, _rate(per_s)))
    return out


def _rate(per_s: float) -> Callable[[float], float]:
    return lambda elapsed: per_s * elapsed


def openmetrics(start: int) -> str:
    """Every series, a sample every SCRAPE_S from `start` for SPAN_S, grouped by name."""
    lines = []
    for name in dict.fromkeys(n for n, _, _ in series()):
        for _, labels, value in (s for s in series() if s[0] == name):
            text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            for elapsed in range(0, SPAN_S + 1, SCRAPE_S):
                lines.append(f"{name}{{{text}}} {value(elapsed)} {start + elapsed}")
    return "\n".join([*lines, "# EOF", ""])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A Prometheus over the backfilled series; yields its URL and the last sample's time."""
    if PROMETHEUS is None or PROMTOOL is None:
        print("SKIP: prometheus or promtool is not installed (Debian package prometheus)")
        pytest.skip("prometheus or promtool is not installed (Debian package prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    end = int(time.time()) // SCRAPE_S * SCRAPE_S - 60
    source = work / "series.om"
    source.write_text(openmetrics(end - SPAN_S))
    data = work / "data"
    done = subprocess.run(
        [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (work / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
    port = free_port()
    proc = Proc(
        [
            PROMETHEUS,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        work / "prometheus.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base), 30, "Prometheus to be ready")
        yield base, end
    except BaseException:
        print("--- prometheus log ---\n" + proc.output()[-4000:])
        raise
    finally:
        proc.stop()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def panel(title: str) -> list[str]:
    """The fleet dashboard's expressions of one panel, $__rate_interval filled in."""
    exprs = [e for uid, t, e in generate.panel_queries() if uid == "mlxfleet-fleet" and t == title]
    assert exprs, f"no panel {title!r} on the fleet dashboard"
    return [re.sub(r"\$__rate_interval", WINDOW, e) for e in exprs]


def values(prometheus: tuple[str, int], expr: str, at: int | None = None) -> dict[tuple, float]:
    """The query's answer at the last sample (or `at`): label values (sorted by name) -> value."""
    base, end = prometheus
    params = {"query": expr, "time": str(end if at is None else at)}
    body = httpx.get(f"{base}/api/v1/query", params=params, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    return {
        tuple(v for _, v in sorted(r["metric"].items())): float(r["value"][1])
        for r in body["data"]["result"]
    }


def close(found: dict[tuple, float], wanted: dict[tuple, float]) -> bool:
    return found.keys() == wanted.keys() and all(
        math.isclose(found[k], v, rel_tol=1e-6) for k, v in wanted.items()
    )


def test_group_members_table(prometheus: tuple[str, int]) -> None:
    [members] = panel("Group members")
    # by (model, tier, group, node, rank, first_layer, layers), sorted by label name
    assert values(prometheus, members) == {
        ("16", "g-1", "16", "big", "a", "0", "interactive"): SHARE_BYTES,
        ("0", "g-1", "16", "big", "b", "1", "interactive"): SHARE_BYTES,
    }


def test_memory_per_rank_and_its_share(prometheus: tuple[str, int]) -> None:
    rss, share = panel("Memory per rank")
    # (group, model, node, rank)
    assert values(prometheus, rss) == {
        ("g-1", "big", "a", "0"): 30 * GIB,
        ("g-1", "big", "b", "1"): 28 * GIB,
    }
    assert values(prometheus, share) == {
        ("g-1", "big", "a", "0"): SHARE_BYTES,
        ("g-1", "big", "b", "1"): SHARE_BYTES,
    }


def test_step_time_per_rank_is_seconds_over_steps(prometheus: tuple[str, int]) -> None:
    [step] = panel("Step time per rank")
    wanted = {("g-1", "big", "a", "0"): 0.5 / 10, ("g-1", "big", "b", "1"): 0.3 / 10}
    found = values(prometheus, step)
    assert close(found, wanted), found


def test_link_bytes_per_token_counts_only_the_groups_tokens(prometheus: tuple[str, int]) -> None:
    """Both members' sent bytes over rank 0's tokens: node c's whole copy is no group's."""
    [per_token] = panel("Link bytes per generated token")
    found = values(prometheus, per_token)
    assert close(found, {("big",): (2000.0 + 6000.0) / TOKENS_PER_S["a"]}), found


def test_rank_link_traffic_per_node(prometheus: tuple[str, int]) -> None:
    [traffic] = panel("Rank link traffic")
    # (direction, group, node)
    wanted = {
        ("received", "g-1", "a"): 6000.0,
        ("sent", "g-1", "a"): 2000.0,
        ("received", "g-1", "b"): 2000.0,
        ("sent", "g-1", "b"): 6000.0,
    }
    found = values(prometheus, traffic)
    assert close(found, wanted), found


def test_group_panels_show_zero_without_a_group(prometheus: tuple[str, int]) -> None:
    """Before the first group (an hour before these series), each panel shows 0, no gap."""
    _, end = prometheus
    titles = [
        "Group members",
        "Memory per rank",
        "Step time per rank",
        "Link bytes per generated token",
        "Rank link traffic",
    ]
    for expr in (e for title in titles for e in panel(title)):
        assert values(prometheus, expr, at=end - SPAN_S - 3600) == {(): 0.0}, expr

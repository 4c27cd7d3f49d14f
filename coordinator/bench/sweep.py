"""`--sweep KNOB=V1,V2,...`: the same workload once per value of one tier knob (our fleet only).

The knob is changed through the coordinator's admin API, as `mlxfleet tiers set` does (running
engines apply it without reloading), with the admin token of the coordinator's MLXFLEET_HOME.
TierKnobs remembers each knob's value before its first change and puts it back on restore().
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aiohttp

from coordinator.bench.errors import BenchError
from coordinator.bench.results import Workload
from mlxfleet.errors import TierError
from mlxfleet.tiers import DEFAULT_KNOBS, apply_knobs

logger = logging.getLogger(__name__)

ADMIN_TIMEOUT_S = 10.0
# --sweep names -> the knob names of the admin API (coordinator/tiers.py Knobs).
SWEEP_KNOBS = {
    "batch-window": "batch_window_ms",
    "max-batch-size": "max_batch_size",
    "max-concurrency": "max_concurrency",
    "queue-limit": "queue_limit",
}


def parse_sweep(text: str) -> tuple[str, list[int]]:
    """ "batch-window=50,80,200" -> ("batch_window_ms", [50, 80, 200]); BenchError otherwise."""
    name, sep, listed = text.partition("=")
    knob = SWEEP_KNOBS.get(name.strip())
    if not sep or knob is None:
        raise BenchError(
            f"--sweep {text!r}: expected KNOB=V1,V2,... with KNOB one of {', '.join(SWEEP_KNOBS)}"
        )
    values: list[int] = []
    for part in listed.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise BenchError(f"--sweep {text!r}: {part.strip()!r} is not an integer") from None
        if value in values:
            raise BenchError(f"--sweep {text!r}: {value} is listed twice")
        try:  # the coordinator's own range check, so a bad value fails before any run
            apply_knobs(DEFAULT_KNOBS["batch"], {knob: value})
        except TierError as exc:
            raise BenchError(f"--sweep {text!r}: {exc}") from None
        values.append(value)
    return knob, values


class TierKnobs:
    """One tier's knobs on the coordinator at `root` (the endpoint without /v1).

    Use from the event loop. `set` changes one knob; `restore` puts every changed knob back to
    its value before the first change. `async with` restores on exit, also after Ctrl-C.
    """

    def __init__(
        self, session: aiohttp.ClientSession, root: str, tier: Workload, home: Path
    ) -> None:
        self._session = session
        self._root = root.rstrip("/")
        self._tier = tier
        self._token_path = home / "admin_token"  # coordinator/server.py ADMIN_TOKEN_FILE
        self._token: str | None = None
        self._before: dict[str, int] | None = None  # the tier's knobs when first read
        self._original: dict[str, int] = {}  # knob -> value before our first change

    async def __aenter__(self) -> TierKnobs:
        await self.current()  # fail before the first run: not our fleet, or a wrong token
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.restore()

    async def current(self) -> dict[str, int]:
        """The tier's knobs in force on the coordinator now."""
        reply = await self._call("GET", "/admin/v1/tiers")
        knobs = dict(reply[self._tier])
        if self._before is None:
            self._before = knobs
        return knobs

    async def set(self, knob: str, value: int) -> dict[str, int]:
        """Set one knob; returns the tier's knobs the coordinator now has in force."""
        before = self._before if self._before is not None else await self.current()
        if knob not in before:
            raise BenchError(f"the coordinator has no {self._tier} knob {knob!r}")
        self._original.setdefault(knob, before[knob])
        reply = await self._call("POST", f"/admin/v1/tiers/{self._tier}", {knob: value})
        logger.info("%s tier: %s=%d", self._tier, knob, value)
        return dict(reply[self._tier])

    async def restore(self) -> None:
        """Put every changed knob back; BenchError (naming the values) when it cannot."""
        if not self._original:
            return
        try:
            await self._call("POST", f"/admin/v1/tiers/{self._tier}", self._original)
        except BenchError as exc:
            shown = ", ".join(f"{k}={v}" for k, v in self._original.items())
            raise BenchError(
                f"could not restore the {self._tier} tier's {shown} "
                f"(use `mlxfleet tiers set`): {exc}"
            ) from None
        logger.info("%s tier restored: %s", self._tier, self._original)
        self._original = {}

    def _read_token(self) -> str:
        if self._token is None:
            try:
                self._token = self._token_path.read_text().strip()
            except OSError:
                raise BenchError(
                    f"--sweep needs the coordinator's admin token: no {self._token_path} "
                    "(run bench on the coordinator's host, or pass its --home)"
                ) from None
        return self._token

    async def _call(self, method: str, path: str, body: dict[str, int] | None = None) -> Any:
        """One admin API call; its JSON answer, or BenchError in one line."""
        headers = {"Authorization": f"Bearer {self._read_token()}"}
        url = f"{self._root}{path}"
        try:
            async with self._session.request(
                method,
                url,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S),
            ) as reply:
                text = await reply.text()
                status = reply.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BenchError(f"the coordinator at {self._root} is not reachable: {exc}") from None
        if status == 401:
            raise BenchError(
                f"the admin token in {self._token_path} is not the one of the coordinator "
                f"at {self._root}"
            )
        if status == 404:
            raise BenchError(f"{self._root} has no mlxfleet admin API: --sweep needs our fleet")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if status != 200 or not isinstance(answer, dict) or self._tier not in answer:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            message = error.get("message") if isinstance(error, dict) else None
            shown = message if isinstance(message, str) else repr(text[:200])
            raise BenchError(f"{method} {path} answered {status}: {shown}")
        return answer

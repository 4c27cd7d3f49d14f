"""Who may call: team keys for /v1; for /admin the local admin token or an operator token
(team keys and operator tokens are stored hashed)."""

from __future__ import annotations

import hmac

from aiohttp import web

from coordinator.store import ApiKey, Store
from coordinator.tiers import KeyTiers, key_tiers
from mlxfleet.errors import ApiError, TierError
from mlxfleet.tiers import TIER_HEADER, Tier


def bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None without one."""
    header = request.headers.get("Authorization", "")
    return header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None


class Auth:
    """Checks a request's credentials; every refusal is a 401 ApiError."""

    def __init__(self, store: Store, admin_token: str) -> None:
        self._store = store
        self._admin_token = admin_token

    def team_key(self, request: web.Request) -> tuple[ApiKey, KeyTiers]:
        """The request's team key (401 without a valid one) and the tiers it may use. It comes
        as `Authorization: Bearer` or, as Anthropic's clients send it, `x-api-key`."""
        key = bearer(request) or request.headers.get("x-api-key", "").strip()
        record = self._store.api_key(key) if key else None
        if record is None:
            raise ApiError(
                401,
                "missing or invalid API key (send Authorization: Bearer <team key>, or "
                "x-api-key: <team key>)",
                code="invalid_api_key",
            )
        return record, key_tiers(record.tiers, record.default_tier)

    def admin(self, request: web.Request) -> None:
        """401 unless the request carries this host's admin token (MLXFLEET_HOME/admin_token)
        or a valid operator token (`mlxfleet operator create`, looked up by its hash)."""
        token = bearer(request) or ""
        local = hmac.compare_digest(token.encode(), self._admin_token.encode())
        if not local and (not token or self._store.operator(token) is None):
            raise ApiError(
                401,
                "missing, invalid or revoked admin token (send an operator token from "
                "`mlxfleet operator create NAME` on the coordinator host)",
                code="invalid_admin_token",
            )


def choose_tier(key: KeyTiers, request: web.Request) -> Tier:
    """The tier this request asks for (X-Mlxfleet-Tier) or its key's default: 400 for a
    value that is no tier, 403 for one the key may not use."""
    try:
        return key.choose(request.headers.get(TIER_HEADER))
    except TierError as exc:
        status = 403 if "may not use" in str(exc) else 400
        raise ApiError(
            status,
            str(exc),
            type="permission_error" if status == 403 else "invalid_request_error",
            param=TIER_HEADER,
            code="tier_not_allowed" if status == 403 else "invalid_tier",
        ) from None

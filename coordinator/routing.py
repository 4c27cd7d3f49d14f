"""The policy router: the only module that imports litellm.

LiteLLM is embedded as a library (`litellm.Router`), not run as its proxy: DESIGN.md says why.
The Router decides which deployment serves a request; the gateway moves the bytes itself,
because streaming through `Router.acompletion` costs tens of ms at 16 streams.
Its Router API is being replaced in 1.109+, so every LiteLLM call stays behind this adapter.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# Without this, importing litellm fetches its model cost map from the internet.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from litellm import Router  # noqa: E402
from litellm.types.router import Deployment, LiteLLM_Params, ModelInfo  # noqa: E402

from coordinator.affinity import NO_PREFIX, Prefix, PrefixAffinity  # noqa: E402
from coordinator.config import CloudFallback  # noqa: E402
from coordinator.errors import CloudFailed
from coordinator.registry import Engine, EngineId

logger = logging.getLogger(__name__)
ORDER_LOCAL = 1  # engines on the coordinator's own host
ORDER_REMOTE = 2  # engines on other nodes
ORDER_CLOUD = 3  # the [cloud] fallback: a LiteLLM provider model
litellm.suppress_debug_info = True
litellm.telemetry = False


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes: an engine's base URL and its bearer secret."""

    engine_id: EngineId
    model: str
    tier: str
    node_id: str
    url: str
    secret: str
    order: int = ORDER_LOCAL

    @property
    def cloud(self) -> bool:
        """The cloud fallback: LiteLLM calls the provider (our engines are called directly)."""
        return self.order == ORDER_CLOUD

    @property
    def tls(self) -> bool:
        """Engines on another host serve TLS with their node's certificate."""
        return self.url.startswith("https://")


def is_local(url: str) -> bool:
    """Does this engine URL point at the coordinator's own host (loopback)?"""
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _extras(**params: Any) -> Any:
    """Deployment params LiteLLM_Params accepts (extra="allow") but does not declare."""
    return params


def group(model: str, tier: str) -> str:
    """The Router model group of one unit."""
    return f"{model}@{tier}"


class Routing:
    """Deployments follow engines: added when ready, removed the moment they go away."""

    def __init__(
        self,
        fleet_ca_pem: bytes,
        *,
        prefer_local: bool = True,
        max_parallel: Callable[[str], int] = lambda tier: 0,
        cache_affinity: bool = True,
    ) -> None:
        self._router = Router(model_list=[], num_retries=0)
        self._prefer_local = prefer_local
        # A follow-up turn goes back to the replica holding its prefix (affinity.py).
        self._affinity = PrefixAffinity() if cache_affinity else None
        self._max_parallel = max_parallel  # by tier: the tier knobs' max_concurrency
        # Remote engines present node certificates from the fleet CA, checked by node id.
        self.engine_tls = ssl.create_default_context(cadata=fleet_ca_pem.decode())
        self._targets: dict[EngineId, Target] = {}
        self._draining: set[EngineId] = set()  # unrouted, still finishing requests in flight
        # Told when an engine leaves, so requests in flight to it are aborted, not left hanging.
        self.on_remove: list[Callable[[EngineId], None]] = []

    def add_engine(self, engine: Engine) -> None:
        if engine.engine_id in self._targets:
            return
        local = not self._prefer_local or is_local(engine.url)
        order = ORDER_LOCAL if local else ORDER_REMOTE
        max_parallel = self._max_parallel(engine.tier)
        deployment = Deployment(
            model_name=group(engine.model, engine.tier),  # one Router model group per unit
            litellm_params=LiteLLM_Params(
                model=f"openai/{engine.model}",
                api_base=f"{engine.url}/v1",
                api_key=engine.secret,
                # Both are LiteLLM deployment params its pydantic model takes as extras.
                **_extras(order=order, max_parallel_requests=max_parallel or None),
            ),
            model_info=ModelInfo(id=engine.engine_id),
        )
        self._router.add_deployment(deployment)
        self._targets[engine.engine_id] = Target(
            engine.engine_id,
            engine.model,
            engine.tier,
            engine.node_id,
            engine.url,
            engine.secret,
            order,
        )
        logger.info(
            "routing %s to engine %s at %s (order %d)",
            engine.model,
            engine.engine_id,
            engine.url,
            order,
        )

    def remove_engine(self, engine_id: EngineId, *, drain: bool = False) -> None:
        """Route nothing new to the engine. With `drain` (it was asked to stop and finishes
        what it serves) requests in flight to it go on; otherwise, or when a draining engine
        is later removed for good (it exited, its node went silent), they are aborted."""
        if self._targets.pop(engine_id, None) is not None:
            self._router.delete_deployment(engine_id)
            logger.info("engine %s left the router%s", engine_id, " (draining)" if drain else "")
            if drain:
                self._draining.add(engine_id)
                return
        elif drain or engine_id not in self._draining:
            return
        self._draining.discard(engine_id)
        for listener in self.on_remove:
            listener(engine_id)

    def on_engine_removed(self, listener: Callable[[EngineId], None]) -> None:
        """Call `listener(engine_id)` whenever an engine leaves the router for good."""
        self.on_remove.append(listener)

    def add_cloud(self, model: str, tier: str, cloud: CloudFallback) -> None:
        """The unit's last order before a pause: a provider model called through LiteLLM."""
        deployment_id = EngineId(f"cloud:{group(model, tier)}")
        if deployment_id in self._targets:
            return
        self._router.add_deployment(
            Deployment(
                model_name=group(model, tier),
                litellm_params=LiteLLM_Params(
                    model=cloud.model,
                    api_key=cloud.api_key,
                    api_base=cloud.api_base,
                    **_extras(order=ORDER_CLOUD),
                ),
                model_info=ModelInfo(id=deployment_id),
            )
        )
        self._targets[deployment_id] = Target(
            deployment_id, model, tier, "cloud", cloud.api_base or "", "", ORDER_CLOUD
        )
        logger.info("cloud fallback for %s/%s: %s", model, tier, cloud.model)

    async def call_cloud(self, target: Target, kind: str, params: dict[str, Any]) -> Any:
        """Call the provider through the Router (this exact deployment); returns LiteLLM's
        response, or an async iterator of chunks with `stream`."""
        call = self._router.acompletion if kind == "chat" else self._router.atext_completion
        try:
            return await call(model=target.engine_id, **params)
        except Exception as exc:  # any provider failure: status and one line, never the key
            status = getattr(exc, "status_code", None)
            raise CloudFailed(status if isinstance(status, int) else 502, str(exc)) from None

    def deployments(self) -> list[tuple[Target, bool]]:
        """Every deployment in the Router, and whether LiteLLM has it cooling down now.

        Only the cloud fallback is called through the Router, so only it can cool down: an
        engine that fails leaves the Router at once instead."""
        targets = list(self._targets.values())
        cooling = {
            model_id
            for model_id, _ in self._router.cooldown_cache.get_active_cooldowns(
                [t.engine_id for t in targets], None
            )
        }
        return [(t, t.engine_id in cooling) for t in targets]

    def models(self) -> list[str]:
        """Model names that have at least one routable engine (any tier)."""
        return sorted({t.model for t in self._targets.values() if not t.cloud})

    def units(self) -> set[tuple[str, str]]:
        """(model, tier) pairs that have at least one routable engine."""
        return {(t.model, t.tier) for t in self._targets.values() if not t.cloud}

    async def pick(
        self,
        model: str,
        tier: str,
        in_flight: Callable[[EngineId], int] = lambda engine_id: 0,
        prefix: Prefix = NO_PREFIX,
    ) -> Target | None:
        """The deployment for this model and tier, or None.

        Orders are tried lowest first; a deployment with max_parallel requests in flight is
        full and the request spills to the next order. Within an order, the engine that holds
        the request's prefix takes it if it is neither full nor well above the others' load
        (affinity.py); otherwise the Router chooses. When
        every deployment is full, the lowest order takes it anyway (its engine queues it, or
        answers 429)."""
        targets = [t for t in self._targets.values() if (t.model, t.tier) == (model, tier)]
        if not targets:
            # Our own table answers "none" without the Router's exception path (it keeps
            # deleted groups in Router.model_names).
            return None
        # The limit in force now: tier knobs change at runtime (`mlxfleet tiers set`).
        limits = {t.engine_id: self._max_parallel(t.tier) for t in targets if not t.cloud}
        full = [e for e, limit in limits.items() if limit and in_flight(e) >= limit]
        picked: Target | None = None
        for order in sorted({t.order for t in targets}):
            free = {t.engine_id for t in targets if t.order == order and t.engine_id not in full}
            if not free:
                continue
            load = {e: in_flight(e) for e in free}
            picked = self._holder(prefix, load, order) or await self._pick(
                model, tier, {"_target_order": order, "_excluded_deployment_ids": full}
            )
            if picked is not None:
                break
        else:
            picked = await self._pick(model, tier, {})
        if picked is not None and self._affinity is not None and not picked.cloud:
            self._affinity.remember(prefix, picked.engine_id)
        return picked

    def _holder(self, prefix: Prefix, load: dict[EngineId, int], order: int) -> Target | None:
        """The free engine that holds this request's prefix, if affinity applies (never the
        cloud: a provider's cache is not ours to steer)."""
        if self._affinity is None or order == ORDER_CLOUD:
            return None
        engine_id = self._affinity.holder(prefix, load)
        return self._targets[engine_id] if engine_id is not None else None

    async def _pick(
        self, model: str, tier: str, request_kwargs: dict[str, object]
    ) -> Target | None:
        try:
            deployment = await self._router.async_get_available_deployment(
                model=group(model, tier), request_kwargs=request_kwargs
            )
        except litellm.exceptions.BadRequestError:  # "no healthy deployments"
            return None
        return self._targets.get(EngineId(deployment["model_info"]["id"]))

"""The policy router: the only module that imports litellm.

LiteLLM is embedded as a library (`litellm.Router`), not run as its proxy: DESIGN.md says why.
The Router decides which deployment serves a request; the gateway moves the bytes itself,
because streaming through `Router.acompletion` costs tens of ms at 16 streams.
Its Router API is being replaced in 1.109+, so every LiteLLM call stays behind this adapter.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass

# Without this, importing litellm fetches its model cost map from the internet.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from litellm import Router  # noqa: E402
from litellm.types.router import Deployment, LiteLLM_Params, ModelInfo  # noqa: E402

from coordinator.registry import Engine, EngineId  # noqa: E402

logger = logging.getLogger(__name__)
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

    @property
    def tls(self) -> bool:
        """Engines on another host serve TLS with their node's certificate."""
        return self.url.startswith("https://")


def group(model: str, tier: str) -> str:
    """The Router model group of one unit."""
    return f"{model}@{tier}"


class Routing:
    """Deployments follow engines: added when ready, removed the moment they go away."""

    def __init__(self, fleet_ca_pem: bytes) -> None:
        self._router = Router(model_list=[], num_retries=0)
        # Remote engines present node certificates from the fleet CA, checked by node id.
        self.engine_tls = ssl.create_default_context(cadata=fleet_ca_pem.decode())
        self._targets: dict[EngineId, Target] = {}
        # Told when an engine leaves, so requests in flight to it are aborted, not left hanging.
        self.on_remove: list[Callable[[EngineId], None]] = []

    def add_engine(self, engine: Engine) -> None:
        if engine.engine_id in self._targets:
            return
        deployment = Deployment(
            model_name=group(engine.model, engine.tier),  # one Router model group per unit
            litellm_params=LiteLLM_Params(
                model=f"openai/{engine.model}", api_base=f"{engine.url}/v1", api_key=engine.secret
            ),
            model_info=ModelInfo(id=engine.engine_id),
        )
        self._router.add_deployment(deployment)
        self._targets[engine.engine_id] = Target(
            engine.engine_id, engine.model, engine.tier, engine.node_id, engine.url, engine.secret
        )
        logger.info("routing %s to engine %s at %s", engine.model, engine.engine_id, engine.url)

    def remove_engine(self, engine_id: EngineId) -> None:
        if self._targets.pop(engine_id, None) is None:
            return
        self._router.delete_deployment(engine_id)
        logger.info("engine %s left the router", engine_id)
        for listener in self.on_remove:
            listener(engine_id)

    def models(self) -> list[str]:
        """Model names that have at least one routable deployment (any tier)."""
        return sorted({t.model for t in self._targets.values()})

    def units(self) -> set[tuple[str, str]]:
        """(model, tier) pairs that have at least one routable deployment."""
        return {(t.model, t.tier) for t in self._targets.values()}

    async def pick(self, model: str, tier: str) -> Target | None:
        """The deployment the Router chooses for this model and tier, or None."""
        # Our own table answers "none" without the Router's exception path (it keeps
        # deleted groups in Router.model_names).
        if (model, tier) not in self.units():
            return None
        try:
            deployment = await self._router.async_get_available_deployment(
                model=group(model, tier), request_kwargs={}
            )
        except litellm.exceptions.BadRequestError:  # "no healthy deployments"
            return None
        return self._targets.get(EngineId(deployment["model_info"]["id"]))

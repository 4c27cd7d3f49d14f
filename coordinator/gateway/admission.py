"""The checks every dialect makes before any engine work: which unit serves the request, that
the key may use it, that max_tokens leaves room for a prompt, and the key's rate limits."""

from __future__ import annotations

from aiohttp import web

from coordinator.config import Config, ModelSpec
from coordinator.gateway.limits import KeyLimits, check_model
from coordinator.gateway.record import Outcome
from coordinator.reconcile import Reconciler
from coordinator.store import ApiKey
from mlxfleet.errors import ApiError
from mlxfleet.tiers import Tier


class Admission:
    """Admits a request to a unit or refuses it with an OpenAI-shaped ApiError."""

    def __init__(self, config: Config, reconciler: Reconciler, limits: KeyLimits) -> None:
        self._config = config
        self._reconciler = reconciler
        self._limits = limits

    def unit(self, record: ApiKey, model: str, tier: Tier, outcome: Outcome) -> ModelSpec:
        """The unit serving `model` in `tier` (403 for a model the key may not use, 404 for
        one not configured in the tier); the outcome is labelled with it."""
        check_model(record.models, model)
        spec = self._reconciler.unit(model, tier)  # the models now (changed at runtime too)
        if spec is None:
            served = sorted(s.tier for s in self._reconciler.units() if s.name == model)
            where = f" in the {tier} tier (it is served in: {', '.join(served)})" if served else ""
            raise ApiError(
                404,
                f"model {model!r} does not exist{where}",
                param="model",
                code="model_not_found",
            )
        outcome.model, outcome.tier = spec.name, spec.tier  # configured: bounded labels
        return spec

    def admit(
        self,
        request: web.Request,
        record: ApiKey,
        spec: ModelSpec,
        max_tokens: int | None,
        body_bytes: int,
    ) -> None:
        """Refuse a max_tokens that fills the context alone, then charge the key's limits."""
        # The prompt is tokenized on the engine (it holds the tokenizer), which refuses an
        # over-long prompt before generating; a max_tokens that alone fills the context is
        # refused here without engine work.
        context = self._reconciler.context_length(spec)
        if max_tokens is not None and max_tokens >= context:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} leaves no room for the prompt in "
                f"{spec.name!r}'s context of {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        self._limits.charge(request, record, max_tokens, body_bytes)

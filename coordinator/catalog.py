"""The models the fleet serves: fleet.toml's [[models]], with the changes made at runtime over it.

`mlxfleet models add|set|remove` change one model's table; the change is stored (a removal as
a tombstone), so it outlives a restart, and wins over fleet.toml's table of that name.
`mlxfleet reload` (and SIGHUP) re-reads fleet.toml: its [[models]] apply at once, with the
stored changes over them; its other settings need a restart (the reply names those that
changed). Every change goes to the reconciler as a whole new set of units (reconcile.py
says what happens to engines) and to the router's cloud fallback.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from coordinator.config import Config, ModelSpec, load_config, model_units
from coordinator.errors import ConfigError
from coordinator.policy import UnitKey
from coordinator.reconcile import Reconciler
from coordinator.registry import EngineId
from coordinator.routing import Routing, group
from coordinator.store import Store

logger = logging.getLogger(__name__)

DEFAULT_KV_BITS = 16  # the model's own dtype: no quantized KV cache

RUNTIME = "models changed at runtime"  # where a bad table is, in its error
# Config fields reload applies (the models) or that are not fleet.toml settings to compare.
NOT_COMPARED = frozenset(
    {"models", "model_tables", "path", "prefix_cache_mib", "home", "host", "gateway_port"}
    | {"grpc_port", "enroll_port"}  # the command line's too
)


class ModelNotFound(KeyError):
    """No model of that name is configured."""


class ModelExists(ValueError):
    """A model of that name is configured already."""


class Catalog:
    """fleet.toml's models with the stored runtime changes over them. Use from the event loop."""

    def __init__(
        self, config: Config, store: Store, reconciler: Reconciler, routing: Routing
    ) -> None:
        self._config = config
        self._store = store
        self._reconciler = reconciler
        self._routing = routing
        self._served: set[UnitKey] = set()

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """Each model's tables (one per tier, or one with `tiers`), by name, in fleet.toml's
        order then the order added."""
        return self._with_changes(self._file_tables())

    def apply(self) -> tuple[ModelSpec, ...]:
        """Serve what the tables say now (at start: fleet.toml with the stored changes)."""
        return self._serve(self._units(self.tables()))

    def add(self, table: Mapping[str, Any]) -> tuple[ModelSpec, ...]:
        """A new model (ConfigError for a bad table, ModelExists for a taken name); its units."""
        tables = self.tables()
        name = str(table.get("name"))
        if name in tables:
            raise ModelExists(f"model {name!r} exists: change it with `mlxfleet models set`")
        tables[name] = [dict(table)]
        return self._change(name, tables)

    def set(self, name: str, changes: Mapping[str, Any]) -> tuple[ModelSpec, ...]:
        """Change fields of a model's tables; `tiers` makes it one table for those tiers."""
        tables = self._existing(name)
        if "tiers" in changes:
            first = {k: v for k, v in tables[name][0].items() if k != "tier"}
            tables[name] = [{**first, **changes, "name": name}]
        else:
            tables[name] = [{**table, **changes, "name": name} for table in tables[name]]
        return self._change(name, tables)

    def remove(self, name: str) -> None:
        """Stop serving a model: new requests get 404, its engines go once idle."""
        tables = self._existing(name)
        del tables[name]
        units = self._units(tables)  # raises before anything is stored
        self._store.save_model_change(name, None)
        self._serve(units)

    def reset(self, name: str) -> None:
        """Forget the runtime change of a model: fleet.toml's tables of that name apply again
        (none: it is no longer served). ModelNotFound when it has no runtime change."""
        if name not in self._store.model_changes():
            raise ModelNotFound(name)
        tables = self._with_changes(self._file_tables(), skip=name)
        units = self._units(tables)  # the file's tables must fit with the other changes
        self._store.forget_model_change(name)
        self._serve(units)

    def overridden(self) -> list[str]:
        """Models fleet.toml names whose runtime change wins over its tables."""
        in_file = {str(t["name"]) for t in self._file_tables()}
        return sorted(in_file & set(self._store.model_changes()))

    def reload(self) -> list[str]:
        """Re-read fleet.toml and serve its models (the stored changes over them). Raises
        ConfigError when it does not load: the running configuration stays. Returns the other
        settings that changed, which apply at the next restart."""
        if self._config.path is None:
            raise ConfigError("the coordinator was started without a fleet.toml (--config)")
        fresh = load_config(self._config.path, home=self._config.home)
        changed = [
            f.name
            for f in dataclasses.fields(Config)
            if f.name not in NOT_COMPARED
            and getattr(fresh, f.name) != getattr(self._config, f.name)
        ]
        running, self._config = (
            self._config,
            dataclasses.replace(
                self._config,
                model_tables=fresh.model_tables,
                prefix_cache_mib=fresh.prefix_cache_mib,
                models=fresh.models,
            ),
        )
        try:
            units = self._units(self.tables())  # the stored changes must still fit
        except ConfigError:
            self._config = running
            raise
        self._serve(units)
        later = f" ({', '.join(changed)}: at the next restart)" if changed else ""
        logger.info("reloaded %s%s", self._config.path, later)
        return changed

    def _file_tables(self) -> tuple[Mapping[str, Any], ...]:
        """fleet.toml's [[models]] tables (those of models configured in code, for `up`)."""
        return self._config.model_tables or spec_tables(self._config.models)

    def _with_changes(
        self, file_tables: Iterable[Mapping[str, Any]], skip: str | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """The stored runtime changes (but `skip`'s) over fleet.toml's tables."""
        merged: dict[str, list[dict[str, Any]]] = {}
        for table in file_tables:
            merged.setdefault(str(table["name"]), []).append(dict(table))
        for name, tables in self._store.model_changes().items():
            if name == skip:
                continue
            if tables is None:
                merged.pop(name, None)
            else:
                merged[name] = [dict(t) for t in tables]
        return merged

    def _existing(self, name: str) -> dict[str, list[dict[str, Any]]]:
        tables = self.tables()
        if name not in tables:
            raise ModelNotFound(name)
        return tables

    def _change(self, name: str, tables: dict[str, list[dict[str, Any]]]) -> tuple[ModelSpec, ...]:
        units = self._units(tables)  # raises before anything is stored
        self._store.save_model_change(name, tables[name])
        self._serve(units)
        return tuple(u for u in units if u.name == name)

    def _units(self, tables: dict[str, list[dict[str, Any]]]) -> tuple[ModelSpec, ...]:
        flat = [table for named in tables.values() for table in named]
        return model_units(flat, RUNTIME, self._config.prefix_cache_mib)

    def _serve(self, units: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
        self._reconciler.set_units(units)
        keys = {u.key for u in units}
        cloud = self._config.cloud
        for model, tier in self._served - keys:
            self._routing.remove_engine(EngineId(f"cloud:{group(model, tier)}"))
        if cloud is not None:
            for model, tier in keys - self._served:
                self._routing.add_cloud(model, tier, cloud)
        self._served = keys
        return units


def spec_tables(specs: Iterable[ModelSpec]) -> tuple[dict[str, Any], ...]:
    """fleet.toml tables for models configured in code (`mlxfleet up`), one per name."""
    tables: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.name in tables:
            tables[spec.name]["tiers"].append(spec.tier)
            continue
        table: dict[str, Any] = {
            "name": spec.name, "source": spec.source, "tiers": [spec.tier],
            "replicas": spec.replicas, "pinned": spec.pinned,
            "prefix_cache_mib": spec.prefix_cache_mib, "kv_bits": spec.kv_bits,
        }  # fmt: skip
        if spec.kv_bits != DEFAULT_KV_BITS:
            table["kv_group_size"] = spec.kv_group_size
        elif spec.max_concurrency is not None:
            table["max_concurrency"] = spec.max_concurrency
        if spec.context_length is not None:
            table["context_length"] = spec.context_length
        if spec.sharding != "auto":
            table["sharding"] = spec.sharding
        labels = {"required": dict(spec.required_labels), "preferred": dict(spec.preferred_labels)}
        if any(labels.values()):
            table["labels"] = labels
        tables[spec.name] = table
    return tuple(tables.values())

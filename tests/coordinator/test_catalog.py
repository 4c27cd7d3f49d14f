"""Models changed at runtime: the catalog's tables over fleet.toml's, and what the reconcile
loop then does with the engines, step by step on the real registry, router and store."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.catalog import Catalog, ModelExists, ModelNotFound
from coordinator.config import load_config
from coordinator.errors import ConfigError
from coordinator.pki import FleetPki
from coordinator.reconcile import Reconciler
from coordinator.registry import Engine, NodeId, Registry
from coordinator.routing import Routing
from coordinator.store import Store
from tests.coordinator.test_placement_units import GIB, model_folder
from tests.coordinator.test_reconcile import FACTS, STATUS


def catalog(tmp_path: Path, toml: str) -> tuple[Catalog, Reconciler, Registry, Store]:
    path = tmp_path / "fleet.toml"
    path.write_text(toml)
    config = load_config(path, home=tmp_path)
    routing = Routing(FleetPki.load_or_create(tmp_path).ca_cert_pem)
    registry = Registry(routing)
    store = Store(tmp_path / "s.sqlite3")
    reconciler = Reconciler(config, registry, store)
    c = Catalog(config, store, reconciler, routing)
    c.apply()
    return c, reconciler, registry, store


def units(reconciler: Reconciler) -> list[tuple[str, str, int]]:
    return sorted((u.name, u.tier, u.replicas) for u in reconciler.units())


def toml(name: str, source: Path, tier: str) -> str:
    return f'[[models]]\nname = "{name}"\nsource = "{source}"\ntier = "{tier}"\n'


def test_changes_apply_over_fleet_toml_and_outlive_a_restart(tmp_path: Path) -> None:
    a, b = model_folder(tmp_path, "a", GIB), model_folder(tmp_path, "b", GIB)
    # one model in two tables (a tier each), as fleet.toml allows
    two_tables = toml("a", a, "interactive") + toml("a", a, "batch")
    c, reconciler, _, store = catalog(tmp_path, two_tables)
    assert units(reconciler) == [("a", "batch", 1), ("a", "interactive", 1)]
    c.add({"name": "b", "source": str(b), "tiers": ["batch"], "replicas": 2})
    c.set("a", {"replicas": 3})  # every table of the name
    assert units(reconciler) == [("a", "batch", 3), ("a", "interactive", 3), ("b", "batch", 2)]
    c.set("a", {"tiers": ["interactive"]})  # one table for those tiers
    assert units(reconciler) == [("a", "interactive", 3), ("b", "batch", 2)]
    with pytest.raises(ModelExists):
        c.add({"name": "b", "source": str(b)})
    with pytest.raises(ConfigError, match="'replicas' must be an integer 1-64"):
        c.set("b", {"replicas": 0})
    assert units(reconciler) == [("a", "interactive", 3), ("b", "batch", 2)]  # unchanged
    with pytest.raises(ModelNotFound):
        c.remove("nobody")
    c.remove("a")
    assert units(reconciler) == [("b", "batch", 2)]
    store.close()
    again, reconciler, _, _ = catalog(tmp_path, two_tables)  # a restart: the same fleet.toml
    assert units(reconciler) == [("b", "batch", 2)]
    assert list(again.tables()) == ["b"]


def test_reload_applies_the_file_keeps_the_changes_and_refuses_a_broken_one(
    tmp_path: Path,
) -> None:
    a, b = model_folder(tmp_path, "a", GIB), model_folder(tmp_path, "b", GIB)
    c, reconciler, _, _ = catalog(tmp_path, toml("a", a, "interactive"))
    c.add({"name": "b", "source": str(b)})
    path = tmp_path / "fleet.toml"
    path.write_text("idle_unload_s = 60\n" + toml("a", a, "batch"))
    assert c.reload() == ["idle_unload_s"]  # applied at the next restart
    assert units(reconciler) == [("a", "batch", 1), ("b", "interactive", 1)]
    path.write_text("[[models]\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        c.reload()
    assert units(reconciler) == [("a", "batch", 1), ("b", "interactive", 1)]


def test_a_removed_model_drains_and_a_changed_one_is_replaced_once_ready(tmp_path: Path) -> None:
    a, b = model_folder(tmp_path, "a", GIB), model_folder(tmp_path, "b", GIB)
    c, reconciler, registry, _ = catalog(tmp_path, toml("a", a, "interactive"))
    node = NodeId("n")
    registry.connect(node, FACTS, [])
    registry.heartbeat(node, STATUS, {})
    reconciler.step()
    [old] = list(registry.engines.values())
    registry.upsert_engine(Engine(old.engine_id, "a", node, "interactive", "ready", url="http://x"))

    # Changed: a new engine starts; the old one serves until it is ready.
    c.set("a", {"source": str(b)})
    reconciler.step()
    new = [e for e in registry.engines.values() if e.engine_id != old.engine_id]
    assert len(new) == 1 and registry.engines[old.engine_id].state == "ready"
    registry.upsert_engine(
        Engine(new[0].engine_id, "a", node, "interactive", "ready", url="http://y")
    )
    reconciler.step()
    assert registry.engines[old.engine_id].state == "stopping"

    # Removed: nothing unloads while a request is in flight; then it goes.
    reconciler.begin_request(("a", "interactive"))
    c.remove("a")
    reconciler.step()
    assert registry.engines[new[0].engine_id].state == "ready"
    reconciler.end_request(("a", "interactive"))
    reconciler.step()
    assert registry.engines[new[0].engine_id].state == "stopping"


def test_reset_forgets_a_runtime_change_and_the_file_applies_again(tmp_path: Path) -> None:
    a, b = model_folder(tmp_path, "a", GIB), model_folder(tmp_path, "b", GIB)
    c, reconciler, _, _ = catalog(tmp_path, toml("a", a, "interactive"))
    c.set("a", {"replicas": 2})
    c.add({"name": "b", "source": str(b)})
    assert c.overridden() == ["a"]  # b is not in fleet.toml: nothing of the file's is hidden
    c.reset("a")
    assert units(reconciler) == [("a", "interactive", 1), ("b", "interactive", 1)]
    assert c.overridden() == []
    c.reset("b")  # not in fleet.toml: no longer served
    assert units(reconciler) == [("a", "interactive", 1)]
    with pytest.raises(ModelNotFound):
        c.reset("a")  # no runtime change left
    c.remove("a")
    c.reset("a")  # the tombstone forgotten: served from the file again
    assert units(reconciler) == [("a", "interactive", 1)]

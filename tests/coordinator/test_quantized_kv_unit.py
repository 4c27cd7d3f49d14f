"""A batch unit with a quantized KV cache: config → sizing → LoadModel → the engine's argv,
and the prefix cache budget along the same path.

No processes: the reconciler on the real registry, the protobuf conversions on both sides, and
the supervisor's argv builder (the engine's own flags are tested in tests/node_agent/engine).
"""

from __future__ import annotations

from pathlib import Path

from coordinator.config import load_config
from coordinator.grpc_service import command_to_pb
from coordinator.memory import attention_shape, engine_overhead, kv_cache_bytes
from mlxfleet.kv import DEFAULT_PREFIX_CACHE_MIB
from mlxfleet.v1 import fleet_pb2 as pb
from node_agent.coordinator_client import load_request
from node_agent.supervisor import kv_args
from tests.coordinator.test_placement_units import GIB, LLAMA3_8B, Fleet, facts, model_folder


def test_an_8_bit_batch_unit_is_sized_for_one_sequence_and_says_so_to_the_engine(
    tmp_path: Path,
) -> None:
    source = model_folder(tmp_path, "llama", 5 * GIB)
    toml = tmp_path / "fleet.toml"
    toml.write_text(
        "[tiers.batch]\nprefix_cache_mib = 256\n"
        f'[[models]]\nname = "llama"\nsource = "{source}"\ntier = "batch"\nkv_bits = 8\n'
    )
    [spec] = load_config(toml, home=tmp_path).models
    fleet = Fleet(tmp_path, spec)
    # One sequence of 8192 tokens at 17/16 bytes a value (fp16 with 12 sequences: 12 GiB).
    kv = kv_cache_bytes(attention_shape(LLAMA3_8B), 8192, 1, kv_bits=8)
    assert kv == 2 * 32 * 8 * 128 * 8192 * 17 // 16  # 0.53 GiB
    # The tier's prefix cache budget: the sequential engine keeps one too.
    prefix = 256 * 2**20
    assert fleet.reconciler.size(spec) == 5 * GIB + kv + engine_overhead(LLAMA3_8B) + prefix
    fleet.join("mini-16", facts(16))  # budget 8 GiB: the fp16 batch unit (17.4 GiB) would not fit
    fleet.reconciler.step()
    [load] = fleet.loads()["mini-16"]
    assert (load.tier, load.kv_bits, load.kv_group_size) == ("batch", 8, 64)
    assert load.prefix_cache_mib == 256
    assert (load.knobs.max_concurrency, load.knobs.max_batch_size) == (1, 1)
    request = load_request(command_to_pb(load).load)
    assert (request.kv_bits, request.kv_group_size, request.knobs["max_concurrency"]) == (8, 64, 1)
    assert request.prefix_cache_mib == 256
    assert kv_args(request) == ["--kv-bits", "8", "--kv-group-size", "64"]


def test_an_unquantized_load_adds_no_engine_flags(tmp_path: Path) -> None:
    source = model_folder(tmp_path, "llama", 5 * GIB)
    toml = tmp_path / "fleet.toml"
    toml.write_text(f'[[models]]\nname = "llama"\nsource = "{source}"\ntier = "batch"\n')
    [spec] = load_config(toml, home=tmp_path).models
    fleet = Fleet(tmp_path, spec)
    fleet.join("studio", facts(128))
    fleet.reconciler.step()
    [load] = fleet.loads()["studio"]
    request = load_request(command_to_pb(load).load)
    assert (request.kv_bits, kv_args(request)) == (16, [])
    assert request.knobs["max_concurrency"] == 12
    assert request.prefix_cache_mib == DEFAULT_PREFIX_CACHE_MIB == 512


def test_a_zero_budget_survives_the_wire_and_an_unset_one_is_the_default() -> None:
    """0 (no prefix cache) is a value of its own, not proto3's "unset"."""
    off = pb.LoadModel(engine_id="e", model="m", source="s", prefix_cache_mib=0)
    assert load_request(pb.LoadModel.FromString(off.SerializeToString())).prefix_cache_mib == 0
    older = pb.LoadModel(engine_id="e", model="m", source="s")  # a coordinator without it
    assert load_request(older).prefix_cache_mib == DEFAULT_PREFIX_CACHE_MIB

"""The committed generated code is exactly what protoc makes from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parents[2] / "protos"
GENERATED = ("fleet_pb2.py", "fleet_pb2.pyi", "fleet_pb2_grpc.py")


def test_regenerating_the_protos_gives_no_diff(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(PROTOS),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(PROTOS / "mlxfleet" / "v1" / "fleet.proto"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    for name in GENERATED:
        fresh = (tmp_path / "mlxfleet" / "v1" / name).read_text()
        committed = (PROTOS / "mlxfleet" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run protos/generate.sh"


def test_contract_is_versioned_and_has_the_stream() -> None:
    from mlxfleet.v1 import fleet_pb2

    service = fleet_pb2.DESCRIPTOR.services_by_name["Fleet"]
    assert fleet_pb2.DESCRIPTOR.package == "mlxfleet.v1"
    connect = service.methods_by_name["Connect"]
    assert connect.client_streaming and connect.server_streaming
    assert not service.methods_by_name["Enroll"].client_streaming

"""The generated gRPC code (made by `make setup`, not committed) matches proto/ exactly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current_with_the_proto_files(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))
    assert protos, "no .proto files under proto/"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", *protos], cwd=ROOT, check=True)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.py*")}
    assert fresh
    for rel, content in fresh.items():
        have = ROOT / rel
        assert have.exists(), f"{rel} not generated: run `make setup`"
        assert have.read_bytes() == content, f"{rel} is stale: run `make setup`"


def test_the_contract_has_the_services_backends_and_operators_use():
    from parity_api.v1 import recommender_pb2

    services = recommender_pb2.DESCRIPTOR.services_by_name
    assert set(services["Recommender"].methods_by_name) == {"Recommend", "Rank", "GetFeatures", "IngestEvents"}
    assert set(services["Admin"].methods_by_name) >= {"LoadRelease", "GetStatus"}
    assert services["Recommender"].methods_by_name["IngestEvents"].client_streaming

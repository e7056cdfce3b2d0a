"""Serving and the device never need torch; the mobile SDK imports nothing of the project."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def test_features_server_and_mobile_sdk_import_without_torch():
    mods = sorted({f"features.{p.stem}" for p in (ROOT / "features").glob("*.py") if p.stem != "__init__"}
                  | {f"features.online.{p.stem}" for p in (ROOT / "features" / "online").glob("*.py") if p.stem != "__init__"}
                  | {"server", "mobile_sdk", "parity.cli"})
    code = BLOCK_TORCH + "".join(f"import {m}\n" for m in mods)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_mobile_sdk_imports_only_numpy_onnxruntime_cryptography_and_the_standard_library():
    """Hybrid mode's optional gRPC transport (hybrid.py, the `hybrid` extra) may also import grpc
    and the generated stubs, lazily."""
    allowed = {"numpy", "onnxruntime", "cryptography", "mobile_sdk"} | set(sys.stdlib_module_names)
    for path in (ROOT / "mobile_sdk").rglob("*.py"):
        ok = allowed | ({"grpc", "parity_api"} if path.name == "hybrid.py" else set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for n in names:
                assert n.split(".")[0] in ok, f"{path.name} imports {n}"

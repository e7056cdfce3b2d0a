"""The SDK ships alone: it imports nothing of Parity, and its package pins the backend's versions."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "mobile_sdk"
PARITY_PACKAGES = ("features", "models", "export", "server", "parity", "parity_api")


def test_importing_the_sdk_loads_no_parity_package_and_no_grpc():
    code = ("import mobile_sdk, sys; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {PARITY_PACKAGES + ('grpc', 'torch')!r}); "
            "print(','.join(bad))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ""


def test_no_sdk_source_imports_a_parity_package():
    for path in SDK.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative imports make the package layout matter"
                names = [node.module or ""]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                assert top not in PARITY_PACKAGES or (top == "parity_api" and path.name == "hybrid.py"), f"{path.name} imports {n}"


def _pins(deps: list[str]) -> dict[str, str]:
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", d.split("#")[0].strip()).groups() for d in deps)


def test_the_sdk_package_pins_the_root_versions_of_its_dependencies():
    sdk = tomllib.loads((SDK / "pyproject.toml").read_text())["project"]
    root = _pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert sdk["name"] == "parity-mobile-sdk"
    deps = _pins(sdk["dependencies"])
    assert set(deps) == {"numpy", "onnxruntime", "cryptography"}
    assert set(_pins(sdk["optional-dependencies"]["hybrid"])) == {"grpcio", "protobuf"}
    for name, version in deps.items() | _pins(sdk["optional-dependencies"]["hybrid"]).items():
        assert root[name] == version, f"{name}: the SDK pins {version}, the root pins {root[name]}"


def test_the_sdk_builds_as_its_own_wheel_and_imports_from_it(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SDK, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    (wheel,) = (tmp_path / "dist").glob("parity_mobile_sdk-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"mobile_sdk"}
    code = ("import mobile_sdk, sys; print(mobile_sdk.__file__); "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {PARITY_PACKAGES!r}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert p.returncode == 0, p.stderr
    path, mods = p.stdout.splitlines()
    assert Path(path).is_relative_to(tmp_path / "site") and mods == "[]"

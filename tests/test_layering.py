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


def test_the_backtest_imports_without_torch():
    mods = sorted({f"backtest.{p.stem}" for p in (ROOT / "backtest").glob("*.py")} | {"parity.cli_backtest"})
    code = BLOCK_TORCH + "".join(f"import {m}\n" for m in mods)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
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


# Which first-party packages each layer may import, read from every import statement in its
# source (lazy ones inside functions included): features -> models -> export -> pipeline, with
# server beside pipeline on top of export. No layer imports one above it, so nothing imports in
# a circle. Exceptions are listed by file, with why; they are what is left to straighten.
FIRST_PARTY = {"features", "models", "export", "monitor", "pipeline", "server", "parity", "mobile_sdk", "bench", "parity_api", "tests",
               "backtest"}
LAYERS = {
    "features": {"features"},
    "models": {"features", "models"},
    "export": {"features", "models", "export"},
    "monitor": {"features", "export", "monitor"},
    "pipeline": {"features", "models", "export", "pipeline"},
    "server": {"features", "export", "monitor", "server", "parity_api"},
    # above server and pipeline: it runs the server's request path on eval's held-out slice
    # (pipeline.heldout) and scores it with eval's metrics (models.metrics); torch-free modules
    # only, checked by test_the_backtest_imports_without_torch
    "backtest": {"features", "models", "export", "monitor", "server", "pipeline", "backtest"},
}
EXCEPTIONS: dict[str, set[str]] = {}  # file -> imports it may make beyond its layer, with why (none left)


def _first_party_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in FIRST_PARTY}
    return out


def _allowed(name: str, allowed: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def test_every_layer_imports_only_the_layers_below_it():
    bad = []
    for layer, allowed in LAYERS.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for name in sorted(_first_party_imports(path)):
                if not _allowed(name, allowed | EXCEPTIONS.get(rel, set())):
                    bad.append(f"{rel} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_layering_check_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import numpy\ndef f():\n    from export.runtime import ReleaseRuntime\n    import server.app\n")
    assert _first_party_imports(f) == {"export.runtime", "server.app"}
    assert not _allowed("server.app", LAYERS["pipeline"]) and not _allowed("server.config", LAYERS["pipeline"])
    assert _allowed("export.candidates", LAYERS["pipeline"])


def _third_party_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_peer_recommenders_library_stays_out_of_the_server_and_the_feature_store():
    """implicit is the `eval` extra (`parity eval --peers`), not the serving runtime."""
    bad = [path.relative_to(ROOT).as_posix() for layer in ("server", "features", "export", "mobile_sdk")
           for path in sorted((ROOT / layer).rglob("*.py")) if "implicit" in _third_party_imports(path)]
    assert not bad, f"these import implicit: {bad}"
    code = "import sys; sys.modules['implicit'] = None\nimport server, features.history, models.peers, pipeline.peers, parity.cli\n"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr

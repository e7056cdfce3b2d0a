"""Canary releases derived from a real release, for the closed-loop rollback study (bench/canary.py).

Each kind is a valid release folder written with `export.release.write_release` (new
release_id = the base id + "-" + kind, the manifest's file hashes recomputed from what is
staged, so it loads through LoadRelease's checks like any release):

- `good`: the same files, a new id. A canary the guard must leave alone.
- `slow`: every ONNX ranker gains a heavy subgraph (a chain of `layers` tanh(H @ W) over a
  (rows x width) matrix seeded from the input's *shape*, so it is finite whatever the
  features hold and ORT cannot constant-fold it), whose mean is added to the score with
  weight 0: the scores are unchanged, each ranker call costs a fixed extra time
  (`calibrate_slow_layers` picks `layers` for a target number of ms on this machine).
- `broken_features`: a serving bug, not a model change: the manifest's
  `ranker_inputs.columns` written sorted by name (as a dict dumped with sort_keys would)
  instead of in the model's input order. The server assembles the ranker matrix in the
  manifest's order, so the model reads every feature in the wrong slot; its predictions
  drift from the release's own reference histogram (which is unchanged: it was built with
  the right columns). The user tower reads its columns by name, so retrieval is unaffected.
- `worse`: a worse model: the ranker's logit negated (score = sigmoid(-logit) = 1 - p), so
  candidates are ordered worst first. Its manifest's prediction reference is mirrored to
  match (an honestly trained worse model carries its own reference), so its prediction PSI
  stays in line and only the business metrics (CTR, watch time) can catch it.

`python -m bench.canary_releases BASE_RELEASE ROOT [--slow-ms 45]` writes the four under ROOT.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.release import MANIFEST, Release, load_release, write_release

__all__ = ["KINDS", "CanaryRelease", "calibrate_slow_layers", "derive", "derive_all", "mirror_prediction_reference",
           "slow_graph", "worse_graph"]

KINDS = ("good", "slow", "broken_features", "worse")
SLOW_ROWS = 128
SLOW_WIDTH = 512


@dataclass(frozen=True)
class CanaryRelease:
    kind: str
    release: Release
    note: dict

    @property
    def release_id(self) -> str:
        return self.release.release_id

    @property
    def path(self) -> Path:
        return self.release.path


# -- graph edits ---------------------------------------------------------------------------------
def _rename_output(model: onnx.ModelProto, output: str = "score") -> tuple[onnx.NodeProto, str]:
    """Make the node producing graph output `output` write `<output>_inner` instead; return it."""
    inner = f"{output}_inner"
    for node in model.graph.node:
        for i, o in enumerate(node.output):
            if o == output:
                node.output[i] = inner
                return node, inner
    raise ValueError(f"no node produces the graph output {output!r}")


def slow_graph(model: onnx.ModelProto, layers: int, *, rows: int = SLOW_ROWS, width: int = SLOW_WIDTH, seed: int = 0) -> onnx.ModelProto:
    """A copy of `model` whose output is `score + 0 * mean(heavy(shape(features)))`."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    x = g.input[0].name
    _, inner = _rename_output(m)
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    a0 = (rng.standard_normal((rows, width)) * 1e-3).astype(np.float32)
    g.initializer.extend([numpy_helper.from_array(w, "slow_W"), numpy_helper.from_array(a0, "slow_A0"),
                          numpy_helper.from_array(np.zeros((), np.float32), "slow_zero")])
    nodes = [helper.make_node("Shape", [x], ["slow_shape"]),
             helper.make_node("Cast", ["slow_shape"], ["slow_shape_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["slow_shape_f"], ["slow_seed"], keepdims=0),
             helper.make_node("Mul", ["slow_A0", "slow_seed"], ["slow_h0"])]
    h = "slow_h0"
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [h, "slow_W"], [f"slow_mm{i}"]),
                  helper.make_node("Tanh", [f"slow_mm{i}"], [f"slow_h{i + 1}"])]
        h = f"slow_h{i + 1}"
    nodes += [helper.make_node("ReduceMean", [h], ["slow_mean"], keepdims=0),
              helper.make_node("Mul", ["slow_mean", "slow_zero"], ["slow_nothing"]),
              helper.make_node("Add", [inner, "slow_nothing"], ["score"])]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


def worse_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A copy whose scores order candidates the other way round. If the score is
    sigmoid(logit), the logit is negated (score -> 1 - score, "sigmoid"); otherwise the
    score itself is negated ("negate"). Returns the model and which of the two it did."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    node, inner = _rename_output(m)
    if node.op_type == "Sigmoid":
        node.output[0] = "score"  # undo the rename: negate the sigmoid's input instead
        logit = node.input[0]
        node.input[0] = "worse_neg_logit"
        idx = list(g.node).index(node)
        g.node.insert(idx, helper.make_node("Neg", [logit], ["worse_neg_logit"]))
        how = "sigmoid"
    else:
        g.node.extend([helper.make_node("Neg", [inner], ["score"])])
        how = "negate"
    onnx.checker.check_model(m)
    return m, how


def mirror_prediction_reference(pred: dict, how: str) -> dict:
    """The manifest's reference.prediction for scores mapped by x -> 1 - x ("sigmoid") or
    x -> -x ("negate"): edges and sample mapped and re-sorted, shares reversed."""
    f = (lambda v: 1.0 - v) if how == "sigmoid" else (lambda v: -v)
    out = dict(pred)
    if "edges" in pred:
        out["edges"] = sorted(f(float(e)) for e in pred["edges"])
    if "shares" in pred:
        out["shares"] = list(reversed(pred["shares"]))
    if "sample" in pred:
        out["sample"] = sorted(f(float(v)) for v in pred["sample"])
    return out


def _ranker_files(release: Release) -> list[str]:
    return sorted(rel for rel in release.meta.files if rel.startswith("rankers/") and rel.endswith(".onnx"))


def _time_per_call(model: onnx.ModelProto, n_features: int, batch: int = 100, repeats: int = 15) -> float:
    from export.onnx_export import ort_session

    s = ort_session(model.SerializeToString(), 1)
    x = np.random.default_rng(0).standard_normal((batch, n_features)).astype(np.float32)
    s.run(["score"], {"features": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(["score"], {"features": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000


def calibrate_slow_layers(base: Release, target_ms: float, *, ranker: str = "rankers/student_int8.onnx") -> tuple[int, float]:
    """How many heavy layers add about `target_ms` per ranker call on this machine (one ORT
    thread, as the server runs it), and the extra ms measured with that many."""
    model = onnx.load(str(base.path / ranker))
    n = len(base.meta.ranker_inputs.columns)
    plain = _time_per_call(model, n)
    probe = 8
    per_layer = max((_time_per_call(slow_graph(model, probe), n) - plain) / probe, 1e-3)
    layers = max(1, round(target_ms / per_layer))
    extra = _time_per_call(slow_graph(model, layers), n) - plain
    return layers, extra


# -- releases ------------------------------------------------------------------------------------
def derive(base: str | Path | Release, root: str | Path, kind: str, *, slow_layers: int = 40, release_id: str | None = None) -> CanaryRelease:
    """Write the `kind` canary of release `base` under `root` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    base = base if isinstance(base, Release) else load_release(base)
    manifest: dict[str, Any] = json.loads((base.path / MANIFEST).read_text())
    for key in ("files", "format_version"):
        manifest.pop(key, None)
    rid = release_id or f"{base.release_id}-{kind}"
    manifest["release_id"] = rid
    note: dict[str, Any] = {"kind": kind, "base_release_id": base.release_id}
    with tempfile.TemporaryDirectory(prefix=f"canary-{kind}-") as tmp:
        staged = Path(tmp) / "staged"
        shutil.copytree(base.path, staged, ignore=shutil.ignore_patterns(MANIFEST))
        for p in staged.rglob("*"):
            if p.is_file():
                p.chmod(0o644)
        if kind == "slow":
            for rel in _ranker_files(base):
                onnx.save(slow_graph(onnx.load(str(staged / rel)), slow_layers), str(staged / rel))
            note["change"] = f"every ONNX ranker computes {slow_layers} extra tanh({SLOW_ROWS}x{SLOW_WIDTH} @ {SLOW_WIDTH}x{SLOW_WIDTH}) layers, added x0"
            note["slow_layers"] = slow_layers
        elif kind == "worse":
            hows = set()
            for rel in _ranker_files(base):
                m, how = worse_graph(onnx.load(str(staged / rel)))
                onnx.save(m, str(staged / rel))
                hows.add(how)
            if len(hows) != 1:
                raise ValueError(f"the rankers of {base.release_id} end differently ({sorted(hows)}); cannot mirror one reference")
            how = hows.pop()
            ref = manifest.get("reference")
            if isinstance(ref, dict) and isinstance(ref.get("prediction"), dict):
                ref["prediction"] = mirror_prediction_reference(ref["prediction"], how)
            note["change"] = ("every ONNX ranker's logit negated (score = 1 - p)" if how == "sigmoid" else "every ONNX ranker's score negated") + \
                "; the prediction reference mirrored to match"
        elif kind == "broken_features":
            cols = list(manifest["ranker_inputs"]["columns"])
            wrong = sorted(cols)
            if wrong == cols:
                wrong = cols[::-1]
            manifest["ranker_inputs"]["columns"] = wrong
            moved = sum(a != b for a, b in zip(cols, wrong))
            note["change"] = f"ranker_inputs.columns written sorted by name: {moved}/{len(cols)} columns fed to the wrong model input"
            note["columns_moved"] = moved
        else:
            note["change"] = "none (same files, new release id)"
        manifest["canary_study"] = note
        release = write_release(root, staged, manifest)
    return CanaryRelease(kind, release, note)


def derive_all(base: str | Path | Release, root: str | Path, kinds: tuple[str, ...] = KINDS, *, slow_layers: int = 40) -> dict[str, CanaryRelease]:
    base = base if isinstance(base, Release) else load_release(base)
    return {k: derive(base, root, k, slow_layers=slow_layers) for k in kinds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("root", type=Path)
    ap.add_argument("--slow-ms", type=float, default=45.0, help="extra ms per ranker call for the slow canary (calibrated here)")
    args = ap.parse_args(argv)
    base = load_release(args.base)
    layers, extra = calibrate_slow_layers(base, args.slow_ms)
    for kind, c in derive_all(base, args.root, slow_layers=layers).items():
        print(json.dumps({"kind": kind, "release_id": c.release_id, "path": str(c.path), **c.note,
                          **({"extra_ms_measured": round(extra, 1)} if kind == "slow" else {})}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

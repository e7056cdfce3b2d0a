"""The baseline server of the serving benchmarks: Parity's own server with the torch fp32
teacher as its ranker, exact numpy retrieval and no caches.

    python -m bench.baseline_server --release R --events D --port P [any `parity serve` flag]

It is the product server (same code path, same protocol) with three things swapped, so the
ratio against it is what the ONNX int8 student, the ScaNN index and the caches buy together.
The torch teacher is a ranker plugin (`server.state.register_ranker`), registered here
because the server itself never imports torch (tests/test_layering.py). The release keeps
the teacher's weights as `rankers/teacher_torch.pt` (`models.ranker.save_ranker`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

__all__ = ["TORCH_TEACHER", "torch_teacher_scorer", "register", "BASELINE_FLAGS", "main"]

TORCH_TEACHER = "torch_teacher"
BASELINE_FLAGS = ("--ranker", TORCH_TEACHER, "--retrieval", "exact", "--no-caches")


def torch_teacher_scorer(release):
    """factory(release) -> scorer: the release's teacher in eager torch, one thread, no grad."""
    import torch

    from models.ranker import load_ranker

    torch.set_num_threads(1)  # as ONNX Runtime's sessions in the server (ort_threads=1)
    model = load_ranker(release.file("rankers/teacher_torch.pt"))

    def score(X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()

    return score


def register() -> None:
    from server.state import register_ranker

    register_ranker(TORCH_TEACHER, torch_teacher_scorer)


def main(argv: Sequence[str] | None = None) -> int:
    from parity.cli_serve import add_serve_arguments, run_from_args

    p = argparse.ArgumentParser(prog="python -m bench.baseline_server", description=__doc__.split("\n\n")[0])
    add_serve_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    register()
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

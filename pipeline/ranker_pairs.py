"""Teacher + distilled student pairs, and two of them side by side.

A release's trend choice (pipeline.train) trains the rankers twice, with and without the trend
inputs, and keeps the pair whose student ranks the validation lists better. Both trainings
run with one torch thread (models.ranker: the matrices are too small to gain from a second),
so on a machine with a spare core the second pair trains in a child process while this one
trains the first: the wall time of one pair instead of two. It gives the same weights as
training here (same rows, config, seed and thread count; tested).

The child is a fresh interpreter running this module (`python -m pipeline.ranker_pairs DIR`),
not a multiprocessing worker: torch's thread pools are not fork-safe, and a spawned worker
would re-import the caller's __main__ (a user's unguarded training script would run again).
It gets only what the rankers read (training and validation rows, column names), pickled to
a private temporary folder, and writes the pair back there.

Below `PARALLEL_MIN_ROWS` training rows the child's start-up (importing torch, copying the
rows) costs more than it saves, and a one-core machine has nothing to gain: both train here.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from models.data import Split
from models.ranker import RankerConfig, StudentRanker, TeacherRanker, train_student, train_teacher

__all__ = ["train_pair", "train_two_pairs", "PARALLEL_MIN_ROWS", "RankerRows"]

PARALLEL_MIN_ROWS = 100_000


@dataclass(frozen=True)
class RankerRows:
    """What models.ranker reads of a TrainingData: the rows it learns and stops on."""

    train: Split
    valid: Split
    columns: tuple[str, ...]

    @classmethod
    def of(cls, td) -> "RankerRows":
        return cls(td.train, td.valid, tuple(td.columns))


def train_pair(td, cfg: RankerConfig, seed: int) -> tuple[TeacherRanker, StudentRanker]:
    teacher = train_teacher(td, cfg, seed)
    return teacher, train_student(td, teacher, cfg, seed)


def _spare_core() -> bool:
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) >= 2


def train_two_pairs(a, b, cfg: RankerConfig, seed: int, *, parallel: bool | None = None):
    """((teacher, student) for training data `a`, the same for `b`). `parallel`: None decides
    from the row count and the cores; True / False force it (tests)."""
    if parallel is None:
        parallel = cfg.threads == 1 and min(len(a.train), len(b.train)) >= PARALLEL_MIN_ROWS and _spare_core()
    if not parallel:
        return train_pair(a, cfg, seed), train_pair(b, cfg, seed)
    with tempfile.TemporaryDirectory(prefix="parity-rankers-") as tmp:
        job = Path(tmp)
        with open(job / "in.pkl", "wb") as f:
            pickle.dump((RankerRows.of(b), cfg, seed), f, protocol=pickle.HIGHEST_PROTOCOL)
        with open(job / "stderr.txt", "wb") as err:
            child = subprocess.Popen([sys.executable, "-m", "pipeline.ranker_pairs", str(job)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=err)
        try:
            mine = train_pair(a, cfg, seed)
        except BaseException:
            child.kill()
            child.wait()
            raise
        if child.wait() != 0:
            err = (job / "stderr.txt").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the second ranker pair's training process exited with {child.returncode}:\n{err}")
        with open(job / "out.pkl", "rb") as f:
            return mine, pickle.load(f)


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """A child whose parent died (kill -9, OOM) stops instead of training for nobody."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(3)

    threading.Thread(target=watch, name="parity-parent-watch", daemon=True).start()


def _child(job: Path) -> None:
    _exit_with_parent(os.getppid())
    with open(job / "in.pkl", "rb") as f:
        rows, cfg, seed = pickle.load(f)
    pair = train_pair(rows, cfg, seed)
    with open(job / "out.tmp", "wb") as f:
        pickle.dump(pair, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(job / "out.tmp", job / "out.pkl")


if __name__ == "__main__":
    _child(Path(sys.argv[1]))

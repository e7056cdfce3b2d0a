"""`parity train`: events → training data → two-tower + index → the item-item model
(features.item_item) → the candidate quotas chosen on validation and the candidate-union lists
(models.candidates) → teacher → distilled int8 student → checked ONNX files → an immutable
release. Reproducible: the same events, profile and seed give the same data fingerprint and the
same metrics.

Each step fails loudly: onnx.checker and torch-vs-ORT agreement (1e-4) in the exporters,
int8-vs-fp32 ranking agreement (Kendall tau >= 0.95) in the quantiser, ANN recall@100 >=
0.95 against exact search here.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from export.index import build_index_for_recall
from export.onnx_export import export_ranker, ort_session
from export.quantize import quantize_student
from export.reference import PER_REQUEST, SAMPLE_FILE, build_reference, request_times, served_rows
from export.release import Release, new_release_id, write_release
from export.runtime import ReleaseRuntime, ordered_scores
from export.towers import export_towers
from export.item_item import save_item_item
from features.history import HISTORY_LEN
from features.item_item import DEFAULT_L2, fit_item_item
from features.events import MS_PER_DAY
from features.candidate_sources import CandidatePolicy
from models.candidates import candidate_training_data, choose_quotas, item_item_for
from models.data import SPLIT_FRACTIONS, build_training_data
from models.metrics import auc, candidate_lists, logloss, ndcg_at_k
from models.popularity import popularity
from models.ranker import RankerConfig, predict, save_ranker, train_student, train_teacher
from pipeline.ranker_pairs import train_pair, train_two_pairs
from models.two_tower import TwoTowerConfig, popularity_recall, retrieval_recall, train_two_tower

__all__ = ["PipelineConfig", "train_release", "PROFILES", "RecallTooLow"]

log = logging.getLogger(__name__)
PROFILES = ("tiny", "small", "default")
MIN_ANN_RECALL = 0.95


class RecallTooLow(RuntimeError):
    """The ANN index misses too many of the exact top-100: serving would lose candidates."""


@dataclass(frozen=True)
class PipelineConfig:
    profile: str
    max_rows: int | None
    two_tower: TwoTowerConfig
    ranker: RankerConfig
    popularity_half_life_ms: int | None
    ranker_rows: str = "labelled"  # "labelled": the labelled rows; "candidates": retrieval candidate lists (models.candidates)
    ranker_candidates: int = 200  # the retrieval budget of the candidate lists (two-tower + item-item; split on validation)
    item_item_l2: float | None = None  # candidate-list rankers: the item-item column's EASE lambda (None: no such column)
    item_item_history: int = HISTORY_LEN  # the user's last engaged items it reads (the server's seen record keeps seen_cap)
    # candidate lists: the rankers also learn on lists whose truth is missing from the history (models.candidates):
    # on MovieLens's random-holdout validation (published_protocol(holdout="valid"), seed 0) two-stage 0.119 -> 0.141
    missing_lists: bool = True
    # the ranker's trend inputs (features.assemble.TREND_COLUMNS, topic share): "valid" trains the rankers with and
    # without them and keeps them only if they raise the validation lists' NDCG@10 (manifest metrics.trend_choice);
    # "on" / "off" for studies. Simulator seed 1 (small): with them valid 0.2038, test 0.1920; without 0.2110, 0.1834
    trend_features: str = "valid"
    # candidate lists: once the epochs are chosen on the validation lists, the rankers are refitted on the
    # training and validation lists together for those epochs, so they have seen the days up to the test cut
    # (simulator seed 1, small, trend inputs on: int8 1.19x popularity without the refit, 1.27x with; trend inputs off
    # (what its validation lists choose): 1.14x without, 1.16x with. Its test slice lies in the drift)
    refit_ranker: bool = True
    # how a candidate list is ordered (manifest ranking.order, export.runtime.ordered_scores): "ranker" (the int8
    # student), "item_item" (the item-item score of the user's history, the ranker where there is none), or "valid":
    # item_item only if it raises the validation lists' NDCG@10 over the student (manifest ranking.choice).
    # The time-split validation lists favour the ranker (2026-11-30, seed 0: MovieLens default 0.170 vs 0.137,
    # simulator demo small 0.245 vs 0.102); pipeline.protocol_eval chooses on the random protocol's own validation
    # split and passes its choice here
    final_order: str = "valid"
    # a release ordered by item-item refits that model on every split's positives (the validation and test rows
    # too, as the rankers are refitted): the ranker reads its column only where the order falls back to it, and
    # then the column is missing in both. MovieLens random protocol, seed 0 (helper study): item-item alone 0.263 -> 0.3015
    refit_item_item: bool = True

    @classmethod
    def for_profile(cls, profile: str, kind: str) -> "PipelineConfig":
        if profile not in PROFILES:
            raise ValueError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
        max_rows = {"tiny": 20_000, "small": 200_000, "default": None}[profile]
        half = 3 * MS_PER_DAY if kind == "simulated" else None
        # Every data set's rankers learn on the candidate lists retrieval hands them (models.candidates):
        # on the simulator the impression rows taught a ranker that re-ranked the union worse (seed 0, small:
        # int8 1.60x popularity on labelled rows, 2.48x on candidate lists)
        rows = "candidates"
        return cls(profile, max_rows, TwoTowerConfig.for_profile(profile), RankerConfig.for_profile(profile), half, rows,
                   item_item_l2=DEFAULT_L2 if rows == "candidates" else None)

    def to_dict(self) -> dict:
        return {"profile": self.profile, "max_rows": self.max_rows, "two_tower": self.two_tower.to_dict(),
                "ranker": _plain(asdict(self.ranker)), "popularity_half_life_ms": self.popularity_half_life_ms,
                "ranker_rows": self.ranker_rows, "ranker_candidates": self.ranker_candidates, "item_item_l2": self.item_item_l2,
                "item_item_history": self.item_item_history, "missing_lists": self.missing_lists,
                "trend_features": self.trend_features, "refit_ranker": self.refit_ranker, "final_order": self.final_order,
                "refit_item_item": self.refit_item_item}


def _without_columns(td, drop: set[str]):
    """TrainingData whose ranker inputs leave out `drop` (studies: the release without an input group)."""
    keep = [j for j, c in enumerate(td.columns) if c not in drop]
    inputs = dataclasses.replace(td.inputs, columns=tuple(td.columns[j] for j in keep))
    cut = lambda s: dataclasses.replace(s, X=np.ascontiguousarray(s.X[:, keep]))  # noqa: E731
    return dataclasses.replace(td, inputs=inputs, train=cut(td.train), valid=cut(td.valid), test=cut(td.test))


def _trend_columns(columns) -> set[str]:
    return {c for c in columns if c.startswith("trend.")}


def _valid_ndcg_choice(valid, with_trend: np.ndarray, without: np.ndarray, k: int = 10, names: tuple[str, str] = ("with", "without")) -> dict:
    """Whether the first scores (the trend inputs; the item-item order) raise NDCG@k on the
    validation lists over the second (one list per user, the same rows for both): kept only
    when the paired mean difference is above 0."""
    lists = candidate_lists(valid.user_id, min_size=1)
    a = np.array([ndcg_at_k(valid.label[i], with_trend[i], k) for i in lists])
    b = np.array([ndcg_at_k(valid.label[i], without[i], k) for i in lists])
    ok = ~np.isnan(a) & ~np.isnan(b)
    d = a[ok] - b[ok]
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"kept": bool(len(d) and d.mean() > 0), f"valid_ndcg@{k}": {names[0]: float(a[ok].mean()) if ok.any() else None,
            names[1]: float(b[ok].mean()) if ok.any() else None}, "paired_diff": float(d.mean()) if len(d) else None,
            "se": se, "lists": int(ok.sum())}


def _final_order(cfg: "PipelineConfig", rd, student) -> tuple[str, dict | None]:
    """The release's ranking.order and, for "valid", the choice's figures on the validation lists."""
    if cfg.final_order not in ("ranker", "item_item", "valid"):
        raise ValueError(f"final_order must be 'ranker', 'item_item' or 'valid', got {cfg.final_order!r}")
    if cfg.final_order == "ranker":
        return "ranker", None
    if "retrieval.item_item" not in rd.columns:
        if cfg.final_order == "item_item":
            raise ValueError("final_order 'item_item' needs rankers trained on candidate lists with the item-item input")
        return "ranker", None  # "valid": nothing to choose between
    if cfg.final_order == "item_item":
        return "item_item", None
    p = predict(student, rd.valid.X)
    ii = rd.valid.X[:, rd.columns.index("retrieval.item_item")]
    choice = _valid_ndcg_choice(rd.valid, ordered_scores(p, ii, "item_item"), p, names=("item_item", "ranker"))
    return ("item_item" if choice["kept"] else "ranker"), choice


def _concat(name: str, *parts):
    from models.data import Split

    return Split(name, *(np.concatenate([getattr(p, f) for p in parts]) for f in ("user_id", "item_id", "ts", "label", "X", "H")))


def _plain(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _libraries() -> dict[str, str]:
    out = {}
    for name in ("torch", "onnx", "onnxruntime", "scann", "numpy", "pyarrow", "duckdb"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


REFERENCE_REQUESTS = 1000  # requests whose sampled candidates make the drift reference (x PER_REQUEST rows)
REFERENCE_SAMPLE = 2000  # raw values per continuous column kept for KS (in reference.npz, not the manifest)


def _serving_reference(staged: Path, manifest: dict, td, rd, valid_pred: np.ndarray, seed: int) -> dict:
    """The drift reference over what serving will sample: requests from the validation cut to the
    end of the events, at least the last day (users drawn as often as they act, one request
    each, at the time of one of their events),
    each request's candidates by the server's rule and `PER_REQUEST` of them drawn uniformly,
    with the ranker inputs as the batch path computes them and the int8 student's score
    (export.reference.served_rows), run on the staged release's own files. The served log's
    drift rows are drawn the same way, so a window without a shift looks like this reference.
    Falls back to the ranker's training rows (and validation scores) when the slice holds too
    few requests; the manifest says which (`population`)."""
    stage = {**manifest, "files": {p.relative_to(staged).as_posix(): {"sha256": "", "bytes": p.stat().st_size}
                                   for p in sorted(staged.rglob("*")) if p.is_file()}}
    rel = Release(staged, stage)
    rt = ReleaseRuntime.load(rel, rankers=("student_int8",))
    until = int(td.events.ts.max()) + 1  # the served population closest to serving: validation slice onward,
    since = min(int(td.split_ts[0]), until - MS_PER_DAY)  # and at least a whole day (one daily cycle)
    users, ts = request_times(td.events, since, until, REFERENCE_REQUESTS, seed)
    rows = None
    if len(users) >= 20:
        sets = {fs.name: fs for fs in td.sets}
        from features.pit import PitJoiner

        used = [sets[n] for n in rt.inputs.sets]
        rows = served_rows(rt, PitJoiner(used, td.events), used, sets[rt.inputs.user_set], td.events, td.info.kind, td.items,
                           users, ts, seed=seed)
    if rows is None or len(rows["X"]) < 100:
        pop = {"rows": "ranker_training_rows", "n": int(len(rd.train.X))}
        X, scores = rd.train.X, valid_pred
    else:
        pop = {"rows": "served_candidates", "since_ms": since, "until_ms": until, "requests": int(len(rows["users"])),
               "per_request": PER_REQUEST, "n": int(len(rows["X"])), "ranker": "student_int8"}
        X, scores = rows["X"], rows["scores"]
    ref, arrays = build_reference(X, rd.columns, scores, population=pop, sample=REFERENCE_SAMPLE)
    np.savez_compressed(staged / SAMPLE_FILE, **arrays)
    return ref


def train_release(data_dir: str | Path, out_root: str | Path, *, profile: str = "default", seed: int = 0,
                  keep: dict | None = None, ranker_rows: str | None = None, engine=None, overrides: dict | None = None) -> Release:
    """Train, check and write a release. `keep`, if given, receives the torch models, the
    training data and step timings (benchmarks compare torch with the exported files).
    `ranker_rows` overrides the dataset's default ("labelled" or "candidates"). `engine`
    (features.engines) runs the training rows' point-in-time join (default: this process)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, start: float) -> float:
        timings[name] = round(time.perf_counter() - start, 3)
        log.info("%s: %.1f s", name, timings[name])
        return time.perf_counter()

    torch.manual_seed(seed)
    np.random.seed(seed)
    t = time.perf_counter()
    from features.datasets import load_info

    kind = load_info(data_dir).kind
    cfg = PipelineConfig.for_profile(profile, kind)
    if ranker_rows is not None:
        if ranker_rows not in ("labelled", "candidates"):
            raise ValueError(f"ranker_rows must be 'labelled' or 'candidates', got {ranker_rows!r}")
        cfg = dataclasses.replace(cfg, ranker_rows=ranker_rows,
                                  item_item_l2=(cfg.item_item_l2 or DEFAULT_L2) if ranker_rows == "candidates" else None)
    if overrides:  # studies: PipelineConfig fields by name (bench/quality_study.py)
        cfg = dataclasses.replace(cfg, **overrides)
    td = build_training_data(data_dir, seed=seed, max_rows=cfg.max_rows, history_len=cfg.two_tower.history_len, engine=engine)
    if min(len(td.train), len(td.valid), len(td.test)) == 0 or td.train.label.sum() == 0:
        raise ValueError(f"{data_dir}: too little labelled data to train (train {len(td.train)}, valid {len(td.valid)}, test {len(td.test)} rows)")
    if cfg.trend_features not in ("valid", "on", "off"):
        raise ValueError(f"trend_features must be 'valid', 'on' or 'off', got {cfg.trend_features!r}")
    if cfg.trend_features == "off":
        td = _without_columns(td, _trend_columns(td.columns))
    fingerprint = td.fingerprint()
    t = step("training_data", t)

    tt = train_two_tower(td, cfg.two_tower, seed)
    item_emb = tt.item_embeddings()
    t = step("two_tower", t)

    rd = td  # the rankers' training data
    policy, quota_study = None, {}  # candidate lists: the quotas chosen on validation (manifest retrieval.candidates)
    item_item = None  # the item-item model of the ranker's retrieval.item_item column (candidate lists only)
    if cfg.ranker_rows == "candidates":
        if cfg.item_item_l2 is not None:
            item_item = item_item_for(td.train, tt.vocab, cfg.item_item_l2, cfg.item_item_history)
        policy, quota_study = choose_quotas(td, tt, item_item, dataclasses.replace(CandidatePolicy(), retrieve_k=cfg.ranker_candidates),
                                            cfg.popularity_half_life_ms, seed=seed)
        t = step("candidate_quotas", t)
        rd, _ = candidate_training_data(td, tt, policy, seed, item_item=item_item, half_life_ms=cfg.popularity_half_life_ms,
                                        missing_lists=cfg.missing_lists)
        if min(len(rd.train), len(rd.valid)) == 0 or rd.train.label.sum() == 0:
            raise ValueError(f"{data_dir}: too few candidate lists to train the rankers (train {len(rd.train)}, valid {len(rd.valid)} rows)")
        t = step("candidate_lists", t)
    trend_choice = None
    if cfg.trend_features == "valid" and _trend_columns(rd.columns):
        off = _without_columns(rd, _trend_columns(rd.columns))  # both pairs at once where a core is spare
        (teacher, student), (teacher_off, student_off) = train_two_pairs(rd, off, cfg.ranker, seed)
        trend_choice = _valid_ndcg_choice(rd.valid, predict(student, rd.valid.X), predict(student_off, off.valid.X))
        if not trend_choice["kept"]:
            rd, teacher, student = off, teacher_off, student_off
        t = step("rankers_and_trend_choice", t)
    else:
        teacher, student = train_pair(rd, cfg.ranker, seed)
        t = step("rankers", t)
    order, order_choice = _final_order(cfg, rd, student)  # on the validation lists, before the refit sees them
    item_item_refit = None
    if order == "item_item" and cfg.refit_item_item and item_item is not None:
        parts = (td.train, td.valid, td.test)
        pos = [p.label > 0.5 for p in parts]
        u = np.concatenate([p.user_id[m] for p, m in zip(parts, pos)])
        item_item = fit_item_item(tt.vocab, u, np.concatenate([p.item_id[m] for p, m in zip(parts, pos)]), cfg.item_item_l2, cfg.item_item_history)
        item_item_refit = {"positives": int(len(u)), "weights": int(item_item.nnz)}
        t = step("item_item_refit", t)
    refit = None
    if cfg.refit_ranker and rd is not td:
        both = dataclasses.replace(rd, train=_concat("train", rd.train, rd.valid))
        refit = {"teacher_epochs": teacher.fit_info.best_epoch, "student_epochs": student.fit_info.best_epoch, "rows": len(both.train),
                 "valid_auc": {"teacher": teacher.fit_info.best_valid_auc, "student": student.fit_info.best_valid_auc}}
        teacher = train_teacher(both, cfg.ranker, seed, epochs=refit["teacher_epochs"])
        student = train_student(both, teacher, cfg.ranker, seed, epochs=refit["student_epochs"])
        t = step("refit", t)

    with tempfile.TemporaryDirectory(prefix="parity-release-") as tmp:
        staged = Path(tmp) / "release"
        (staged / "rankers").mkdir(parents=True)
        (staged / "retrieval").mkdir()
        export_ranker(teacher, staged / "rankers/teacher_fp32.onnx", rd.valid.X)
        save_ranker(teacher, staged / "rankers/teacher_torch.pt")  # the torch baseline of the serving benchmarks
        export_ranker(student, staged / "rankers/student_fp32.onnx", rd.valid.X)
        quant = quantize_student(
            staged / "rankers/student_fp32.onnx", staged / "rankers/student_int8.onnx", rd.train.X,
            check_X=rd.valid.X, check_lists=candidate_lists(rd.valid.user_id), teacher_path=staged / "rankers/teacher_fp32.onnx", seed=seed,
            max_size_ratio=0.25 if profile != "tiny" else 1.0,  # tiny teachers are too small to dwarf a student
        ).to_dict()
        check = np.sort(np.random.default_rng(seed).choice(len(td.train), size=min(4096, len(td.train)), replace=False))
        export_towers(tt, staged / "retrieval", td.train.X[check][:, [td.columns.index(c) for c in tt.user_columns]], td.train.H[check])
        np.save(staged / "retrieval/item_embeddings.npy", item_emb, allow_pickle=False)
        if item_item is not None:
            save_item_item(item_item, staged / "retrieval")
        t = step("export", t)

        U_test = tt.user_embeddings(tt.user_inputs(td.test.X, td.columns), td.test.H)
        index, ann_recall, index_tried = build_index_for_recall(item_emb, U_test[:2000], MIN_ANN_RECALL, k=100)
        if ann_recall < MIN_ANN_RECALL:  # brute force answers exactly: a broken index, not a hard catalogue
            raise RecallTooLow(f"ANN recall@100 vs exact is {ann_recall:.3f} < {MIN_ANN_RECALL} after {index_tried}")
        index.save(staged / "retrieval/index")
        t = step("index", t)

        end = int(td.events.ts.max()) + 1
        pop_ids, pop_scores = popularity(td.events, kind, end, half_life_ms=cfg.popularity_half_life_ms)
        (staged / "popularity.json").write_text(json.dumps({"as_of_ts": end, "item_ids": pop_ids.tolist(), "scores": pop_scores.round(6).tolist()}))

        metrics = {
            "retrieval": {"recall@100_test_two_tower": retrieval_recall(tt, td, "test", 100), "recall@100_test_popularity": popularity_recall(td, "test", 100),
                          "ann_recall@100_vs_exact": ann_recall, "ann_index_tried": index_tried},
            "ranking_test": {},
            "quantization": quant,
        }
        p_teacher, p_student = predict(teacher, rd.test.X), predict(student, rd.test.X)
        int8 = ort_session(staged / "rankers/student_int8.onnx")
        p_int8 = int8.run(["score"], {"features": rd.test.X})[0].reshape(-1)
        for name, p in (("teacher", p_teacher), ("student_fp32", p_student), ("student_int8", p_int8)):
            metrics["ranking_test"][name] = {"auc": auc(rd.test.label, p), "logloss": logloss(rd.test.label, p)}
        metrics["ranking_test_rows"] = cfg.ranker_rows
        if refit is not None:
            metrics["ranker_refit"] = refit
        if trend_choice is not None:
            metrics["trend_choice"] = trend_choice
        valid_pred = predict(student, rd.valid.X)
        if order != "ranker":  # what the server will serve (export.runtime.ReleaseRuntime.final_scores)
            valid_pred = ordered_scores(valid_pred, rd.valid.X[:, rd.columns.index("retrieval.item_item")], order)
        manifest = {
            "release_id": new_release_id(fingerprint),
            "created_at_ms": int(time.time() * 1000),
            "dataset": {"kind": kind, "n_topics": td.info.n_topics, "events": int(len(td.events)), "end_ts": end},
            "feature_sets": {fs.name: {"version": fs.version, "entity": fs.entity.name, "definition": fs.definition()} for fs in td.sets},
            "ranker_inputs": {"user_set": rd.inputs.user_set, "item_set": rd.inputs.item_set, "pair_sets": [list(p) for p in rd.inputs.pair_sets],
                              "affinity": rd.inputs.affinity, "columns": list(rd.columns)},
            "retrieval": {"dim": tt.dim, "user_columns": list(tt.user_columns), "creator_buckets": cfg.two_tower.creator_buckets,
                          "history_len": cfg.two_tower.history_len,
                          "item_item": {"l2": item_item.l2, "history_len": item_item.history_len, "items": int(len(item_item.vocab)),
                                        "neighbours": item_item.neighbours, "weights": item_item.nnz}
                          if item_item is not None else None,
                          "index": index.config.to_dict(), "items": int(len(item_emb)),
                          **({"candidates": {"retrieve_k": policy.retrieve_k, "n_item_item": policy.n_item_item, "n_popular": policy.n_popular},
                              "candidate_quotas_valid": quota_study} if policy is not None else {})},
            "training_data": {"fingerprint": fingerprint, "rows": {s.name: len(s) for s in (td.train, td.valid, td.test)},
                              "positive_rate": {s.name: float(s.label.mean()) for s in (td.train, td.valid, td.test)},
                              "split_ts": list(td.split_ts), "split_mode": td.split_mode, "split_fractions": list(SPLIT_FRACTIONS),
                              "ranker_rows": {s.name: len(s) for s in (rd.train, rd.valid, rd.test)} if rd is not td else None},
            "ranking": {"order": order, **({"choice": order_choice} if order_choice is not None else {}),
                        **({"item_item_refit": item_item_refit} if item_item_refit is not None else {})},
            "config": cfg.to_dict() | {"popularity_half_life_ms": cfg.popularity_half_life_ms},
            "seed": seed,
            "libraries": _libraries(),
            "metrics": metrics,
            "models": {"teacher_fp32": "rankers/teacher_fp32.onnx", "student_fp32": "rankers/student_fp32.onnx", "student_int8": "rankers/student_int8.onnx",
                       "teacher_torch": "rankers/teacher_torch.pt", "user_tower": "retrieval/user_tower.onnx", "item_tower": "retrieval/item_tower.onnx"},
            "timings_s": timings,
        }
        manifest["reference"] = _serving_reference(staged, manifest, td, rd, valid_pred, seed)
        t = step("reference", t)
        release = write_release(out_root, staged, manifest)
    timings["total"] = round(time.perf_counter() - t0, 3)
    log.info("release %s in %.1f s", release.release_id, timings["total"])
    if keep is not None:
        keep.update(teacher=teacher, student=student, two_tower=tt, data=td, ranker_data=rd, timings=timings)
    return release

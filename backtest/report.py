"""A backtest's outputs: the tolerance per set, a table for people, one JSON object for programs,
and a plot of quality against staleness.

The JSON (the last line `parity backtest` prints, and its --json file) is what `parity
features plan` reads, so its shape is a contract:

    {
      "release_id": str, "dataset": str, "users": int, "k": 10, "ranker": "student_int8",
      "per_creator_cap": int, "seed": int, "seconds": float,
      "sets": [str],                  # varied one at a time: the release's feature sets and user_seen
      "fresh": {"ndcg@10": float, "recall@10": float, "auc": float | null},
      "conditions": [                 # fresh first, then in the order they ran
        {"target": str,               # a set, "user_seen", "user_record" (the whole user read), "all", or "fresh"
         "kind": "fresh" | "staleness" | "missing" | "latency",
         "staleness_ms": int, "missing": float,
         "ndcg@10": float, "recall@10": float, "auc": float | null,
         "ndcg_change": float,        # relative to fresh: -0.02 is 2 % worse
         "degraded": float,           # share of requests the server would have flagged degraded
         "user_missing": float,       # mean share of the user set's columns missing
         "read_misses": float}        # share of store reads past the budget (latency conditions)
      ],
      "tolerance": {                  # per set, "user_seen", "user_record" and "all"
        str: {"max_staleness_ms": int | null,   # null: not tested (user_record has no staleness)
              "max_missing": float | null}
      },
      "tolerance_rule": str,
      "latency": null | {"model": str, "budget_ms": float, "expected_share_over": float}
    }

Tolerance: the largest tested level at which NDCG@10 is within 1 % (relative) of the fresh
condition *and* so is every smaller tested level, so a noisy recovery past a real drop is not
reported as safe. Level 0 is the fresh condition itself, so a set that drops at its first
tested staleness gets 0.
"""
from __future__ import annotations

import math
from pathlib import Path

from backtest.conditions import ALL, USER_RECORD, format_ms
from backtest.replay import BacktestResult, ConditionResult

__all__ = ["TOLERANCE", "MissingExtra", "plot", "render_table", "require_matplotlib", "to_json", "tolerance"]

TOLERANCE = 0.01  # the relative NDCG@10 drop a level may cost and still count as tolerated
RULE = "largest tested level with NDCG@10 >= 0.99 x fresh at it and at every smaller tested level"


class MissingExtra(ImportError):
    """matplotlib (the `monitor` extra) is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtra("the backtest plot needs matplotlib: pip install 'parity[monitor]'") from exc
    matplotlib.use("Agg")  # headless; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raise MissingExtra now, before a long run, if the plot cannot be drawn."""
    _pyplot()


def _within(r: ConditionResult, fresh: float) -> bool:
    return r.ndcg >= fresh * (1.0 - TOLERANCE)


def _tolerated(levels: list[tuple[float, ConditionResult]], fresh: float) -> float:
    ok = 0.0
    for level, r in sorted(levels, key=lambda x: x[0]):
        if not _within(r, fresh):
            break
        ok = level
    return ok


def _targets(res: BacktestResult) -> list[str]:
    seen = {r.condition.target for r in res.results}
    return [t for t in (*res.targets, USER_RECORD, ALL) if t in seen]


def tolerance(res: BacktestResult) -> dict[str, dict[str, float | int | None]]:
    """target -> {"max_staleness_ms", "max_missing"} (None where that kind was not tested)."""
    fresh = res.fresh.ndcg
    out = {}
    for t in _targets(res):
        st = [(r.condition.staleness_ms, r) for r in res.results if r.condition.target == t and r.condition.kind == "staleness"]
        mi = [(r.condition.missing, r) for r in res.results if r.condition.target == t and r.condition.kind == "missing"]
        out[t] = {"max_staleness_ms": int(_tolerated(st, fresh)) if st else None, "max_missing": float(_tolerated(mi, fresh)) if mi else None}
    return out


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _change(r: ConditionResult, fresh: float) -> float:
    return (r.ndcg - fresh) / fresh if fresh > 0 else 0.0


def to_json(res: BacktestResult, *, seed: int = 0, ranker: str = "student_int8") -> dict:
    """The JSON object described in the module docstring (no NaN: an undefined AUC is null)."""
    k = res.k
    fresh = res.fresh
    conds = [{"target": r.condition.target, "kind": r.condition.kind, "staleness_ms": int(r.condition.staleness_ms),
              "missing": float(r.condition.missing), f"ndcg@{k}": r.ndcg, f"recall@{k}": r.recall, "auc": _num(r.auc),
              "ndcg_change": _change(r, fresh.ndcg), "degraded": r.degraded, "user_missing": r.user_missing, "read_misses": r.read_misses}
             for r in res.results]
    lat = None
    if res.latency is not None:
        lat = {"model": res.latency, "budget_ms": res.budget_ms, "expected_share_over": res.latency_share_over_budget}
    return {"release_id": res.release_id, "dataset": res.dataset, "users": res.users, "k": k, "ranker": ranker,
            "per_creator_cap": res.per_creator_cap, "seed": seed, "seconds": round(res.seconds, 3), "sets": list(res.targets),
            "fresh": {f"ndcg@{k}": fresh.ndcg, f"recall@{k}": fresh.recall, "auc": _num(fresh.auc)},
            "conditions": conds, "tolerance": tolerance(res), "tolerance_rule": RULE, "latency": lat}


def _level(r: ConditionResult) -> str:
    c = r.condition
    if c.kind == "staleness":
        return format_ms(c.staleness_ms)
    if c.kind == "missing":
        return f"{c.missing:g}"
    return "—"


def render_table(res: BacktestResult) -> str:
    """The conditions, then the tolerance, as aligned text."""
    k = res.k
    fresh = res.fresh.ndcg
    head = f"{'target':<16} {'kind':<10} {'level':>6} {f'NDCG@{k}':>8} {'change':>8} {f'recall@{k}':>10} {'AUC':>7} {'degraded':>9} {'user miss':>9}"
    title = (f"release {res.release_id} on {res.dataset}: {res.users} held-out requests, {len(res.results)} conditions "
             f"({res.seconds:.1f} s); per-creator cap {res.per_creator_cap}")
    lines = [title, head, "-" * len(head)]
    for r in res.results:
        c = r.condition
        lines.append(f"{c.target:<16} {c.kind:<10} {_level(r):>6} {r.ndcg:>8.4f} {_change(r, fresh):>+8.1%} {r.recall:>10.4f} "
                     f"{r.auc:>7.4f} {r.degraded:>9.1%} {r.user_missing:>9.1%}")
    if res.latency is not None:
        lines.append(f"latency: {res.latency}; budget {res.budget_ms:g} ms; expected share of reads over it "
                     f"{res.latency_share_over_budget:.1%}")
    lines += ["", f"tolerance ({RULE}):", f"{'target':<16} {'max staleness':>14} {'max missing':>12}"]
    for t, v in tolerance(res).items():
        st = "—" if v["max_staleness_ms"] is None else format_ms(v["max_staleness_ms"])
        mi = "—" if v["max_missing"] is None else f"{v['max_missing']:g}"
        lines.append(f"{t:<16} {st:>14} {mi:>12}")
    return "\n".join(lines)


def plot(res: BacktestResult, path: str | Path) -> Path:
    """NDCG@k against staleness (one line per set, `all` in black), and against the missing rate
    when one was tested; the dotted line is 1 % under fresh. Categorical x: the tested levels."""
    plt = _pyplot()
    fresh = res.fresh.ndcg
    k = res.k
    kinds = [kd for kd in ("staleness", "missing") if any(r.condition.kind == kd for r in res.results)] or ["staleness"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.2), dpi=100, squeeze=False)
    try:
        for ax, kind in zip(axes[0], kinds):
            attr = "staleness_ms" if kind == "staleness" else "missing"
            levels = sorted({0, *(getattr(r.condition, attr) for r in res.results if r.condition.kind == kind)})
            pos = {v: i for i, v in enumerate(levels)}
            for t in _targets(res):
                pts = sorted((getattr(r.condition, attr), r.ndcg) for r in res.results if r.condition.target == t and r.condition.kind == kind)
                if not pts:
                    continue
                xs = [0] + [pos[v] for v, _ in pts]
                ys = [fresh] + [y for _, y in pts]
                style = {"color": "black", "linewidth": 2.2} if t == ALL else {"linewidth": 1.4}
                ax.plot(xs, ys, marker="o", markersize=3.5, label=t, **style)
            ax.axhline(fresh * (1 - TOLERANCE), linestyle=":", color="grey", linewidth=1, label="fresh − 1 %")
            ax.set_xticks(range(len(levels)))
            ax.set_xticklabels([format_ms(int(v)) if kind == "staleness" else f"{v:g}" for v in levels])
            ax.set_xlabel("staleness (records as of t − s, read at t)" if kind == "staleness" else "share of records missing")
            ax.set_ylabel(f"NDCG@{k}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        fig.suptitle(f"{res.dataset}: release {res.release_id[:28]}, {res.users} held-out requests", fontsize=9)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out

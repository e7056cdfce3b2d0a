"""A synthetic short-video platform: the product's default data, deterministic from a seed.

Why synthetic: the project needs an event log it may redistribute, of any size, whose latent
structure is known, so tests can assert that features and models recover it. The generator
therefore plants the effects a recommender must handle:

- users with latent topic tastes (Dirichlet) and heavy-tailed activity (a few heavy users);
- creators with a main topic; items with topic, duration, latent quality and a popularity
  curve that rises after publish and then decays, under a slowly wandering per-topic trend;
- cold start: new items are published every day (and some users sign up mid-period);
- a deliberate topic-trend shift over the last days (``params.drift_topics`` from
  ``params.drift_start_ts``), for drift detection.

Event semantics (all events of a session carry its session_id):

- IMPRESSION (value 1) when an item is shown; impressions of a session are seconds apart.
- PLAY (value = seconds watched) is stamped when the play *ends*, i.e. when the watch time
  is known, so it always follows its impression for the same (user, item, session).
- SKIP (value 1): the user swiped past an impression without playing it, or played it
  briefly (under 10% of its duration; then the SKIP follows the PLAY).
- LIKE (value 1) follows the PLAY it belongs to.

Every impression happens at or after its item's publish_ts (an item is shown from the first
day that starts after it is published). Events of sessions that would run past the end of
the period are cut off, as a log snapshot would. ``event_id`` is 1, 2, ... in (ts, session,
event) order. All randomness comes from one ``numpy.random.Generator(PCG64(seed))`` drawn in
a fixed order, so the same seed yields identical events.

Generation is vectorised per simulated day (no per-event Python), and each finished day is
appended to the event log as it is produced.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from features.datasets import DatasetInfo, ITEMS_SCHEMA, ensure_new_data_dir, events_dir, write_catalogue
from features.eventlog import EventLog
from features.events import MS_PER_DAY, MS_PER_HOUR, EventBatch, EventType

__all__ = ["simulate", "DEFAULT_START_TS"]

DEFAULT_START_TS = 1_767_571_200_000  # 2026-01-05T00:00:00Z, a Monday

# Where impressions come from: popularity, freshness, uniform randomness, the user's taste.
_SOURCE_MIX = {"popular": 0.45, "fresh": 0.15, "random": 0.10, "taste": 0.30}
# Relative session-start rate by UTC hour (evening peak, night trough).
_DIURNAL = np.array(
    [0.5, 0.35, 0.25, 0.2, 0.2, 0.3, 0.5, 0.8, 0.9, 0.9, 0.9, 1.0,
     1.1, 1.0, 0.95, 1.0, 1.1, 1.3, 1.5, 1.7, 1.8, 1.6, 1.2, 0.8]
)  # fmt: skip
_KIND_RANK = {EventType.IMPRESSION: 0, EventType.SKIP: 1, EventType.PLAY: 2, EventType.LIKE: 3}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _sample_weighted(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    """n indices drawn with replacement, proportional to ``weights`` (inverse CDF)."""
    cum = np.cumsum(weights)
    idx = np.searchsorted(cum, rng.random(n) * cum[-1], side="right")
    return np.minimum(idx, len(weights) - 1)


def _exclusive_cumsum_by_group(values: np.ndarray, group_first: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """Per row, the sum of ``values`` over earlier rows of its (contiguous) group."""
    cs = np.cumsum(values)
    excl = cs - values
    return excl - excl[group_first][group_of]


def simulate(
    out_dir: str | os.PathLike[str],
    users: int = 2000,
    items: int = 500,
    days: int = 14,
    seed: int = 0,
    start_ts: int = DEFAULT_START_TS,
    *,
    n_topics: int = 20,
    new_item_frac: float = 0.3,
    drift_days: int = 3,
    n_drift_topics: int = 3,
    drift_boost: float = 5.0,
) -> DatasetInfo:
    """Generate a data dir at ``out_dir`` (new or empty) and return its DatasetInfo.

    ``start_ts`` must be a UTC midnight; the period is ``[start_ts, start_ts + days)``.
    Drift covers the last ``min(drift_days, days // 2)`` days.
    """
    if users < 1 or items < 1 or days < 1:
        raise ValueError(f"users, items and days must be >= 1 (got {users}, {items}, {days})")
    if n_topics < 1:
        raise ValueError("n_topics must be >= 1")
    if start_ts < 0 or start_ts % MS_PER_DAY:
        raise ValueError(f"start_ts {start_ts} must be a UTC midnight in ms since the epoch")
    if not 0.0 <= new_item_frac < 1.0:
        raise ValueError("new_item_frac must be in [0, 1)")
    out = ensure_new_data_dir(out_dir)
    rng = np.random.Generator(np.random.PCG64(seed))
    T = n_topics
    end_ts = start_ts + days * MS_PER_DAY

    # ---- topics, creators, items
    topic_base = rng.dirichlet(np.full(T, 2.0)) * T  # some topics are bigger than others
    n_creators = max(1, items // 5)
    creator_topic = rng.choice(T, size=n_creators, p=topic_base / topic_base.sum())
    creator_reach = rng.lognormal(0.0, 0.5, n_creators)
    creator_output = rng.lognormal(0.0, 1.0, n_creators)  # prolific creators publish more
    item_creator = rng.choice(n_creators, size=items, p=creator_output / creator_output.sum())
    on_topic = rng.random(items) < 0.85
    item_topic = np.where(on_topic, creator_topic[item_creator], rng.integers(0, T, items))
    duration = np.round(np.clip(rng.lognormal(np.log(240.0), 1.0, items), 30.0, 3600.0), 1)
    quality = rng.beta(2.5, 2.5, items)
    virality = rng.lognormal(0.0, 1.0, items) * creator_reach[item_creator]
    decay_days = rng.lognormal(np.log(4.0), 0.5, items)
    n_new = int(round(items * new_item_frac)) if items > 1 else 0
    publish = np.concatenate(
        [
            start_ts - rng.integers(0, 60 * MS_PER_DAY, items - n_new),  # back catalogue
            start_ts + rng.integers(0, days * MS_PER_DAY, n_new),  # published during the period
        ]
    )
    order = np.argsort(publish, kind="stable")  # item_id 1..n in publish order
    item_creator, item_topic, duration, quality, virality, decay_days, publish = (
        a[order] for a in (item_creator, item_topic, duration, quality, virality, decay_days, publish)
    )
    item_ids = np.arange(1, items + 1, dtype=np.int64)
    item_creator_id = (item_creator + 1).astype(np.int64)
    item_topic = item_topic.astype(np.int32)

    # ---- users
    taste = rng.dirichlet(np.full(T, 0.3), size=users)
    taste = np.nan_to_num(taste, nan=1.0 / T)
    cum_taste = np.cumsum(taste, axis=1)
    activity = np.clip(rng.lognormal(np.log(0.45), 1.0, users), 0.02, 12.0)  # sessions/day
    new_user = rng.random(users) < 0.1
    signup = np.where(
        new_user,
        start_ts + rng.integers(0, days * MS_PER_DAY, users),
        start_ts - rng.integers(MS_PER_DAY, 365 * MS_PER_DAY, users),
    ).astype(np.int64)
    region = rng.choice(8, size=users, p=np.array([8, 6, 5, 4, 3, 2, 1, 1]) / 30.0).astype(np.int32)

    # ---- trends and drift
    log_trend = np.cumsum(rng.normal(0.0, 0.08, (days, T)), axis=0)
    drift_n = min(drift_days, days // 2)
    drift_start = end_ts - drift_n * MS_PER_DAY
    drift_topics = np.sort(rng.choice(T, size=min(n_drift_topics, T), replace=False)) if drift_n else np.empty(0, int)
    is_drift_topic = np.zeros(T, dtype=bool)
    is_drift_topic[drift_topics] = True
    diurnal = _DIURNAL / _DIURNAL.sum()

    log = EventLog(events_dir(out))
    next_event_id = 1
    next_session_id = 1
    n_events = 0
    carry: dict[str, np.ndarray] | None = None
    src_edges = np.cumsum(list(_SOURCE_MIX.values()))

    for d in range(days):
        day_start = start_ts + d * MS_PER_DAY
        drifting = drift_n > 0 and day_start >= drift_start
        weekend = ((day_start // MS_PER_DAY) + 3) % 7 >= 5  # 1970-01-01 was a Thursday

        # sessions: Poisson(activity) per user, start hour from the diurnal curve
        n_sess = rng.poisson(activity * (1.25 if weekend else 1.0))
        sess_user = np.repeat(np.arange(users), n_sess)
        hour = rng.choice(24, size=len(sess_user), p=diurnal)
        sess_start = day_start + hour * MS_PER_HOUR + rng.integers(0, MS_PER_HOUR, len(sess_user))
        ok = sess_start >= signup[sess_user]
        sess_user, sess_start = sess_user[ok], sess_start[ok]
        so = np.argsort(sess_start, kind="stable")
        sess_user, sess_start = sess_user[so], sess_start[so]
        S = len(sess_user)
        sess_id = next_session_id + np.arange(S, dtype=np.int64)
        next_session_id += S

        # candidates: items published by the start of the day (ids are in publish order)
        k = int(np.searchsorted(publish, day_start, side="right"))
        if S == 0 or k == 0:
            new = None
        else:
            age = (day_start + MS_PER_DAY / 2 - publish[:k]) / MS_PER_DAY
            trend = topic_base[item_topic[:k]] * np.exp(log_trend[d, item_topic[:k]])
            if drifting:
                trend = trend * np.where(is_drift_topic[item_topic[:k]], drift_boost, 1.0)
            pop = virality[:k] * (1.0 - np.exp(-age / 0.3)) * (np.exp(-age / decay_days[:k]) + 0.03)
            w_pop = pop * trend
            w_fresh = np.exp(-age / 1.5) * trend

            # impressions: a handful per session, each from one of the sources
            n_imp = np.minimum(np.clip(2 + rng.poisson(4.0, S), 1, 15), k)
            imp_sess = np.repeat(np.arange(S), n_imp)
            N = len(imp_sess)
            src = np.searchsorted(src_edges, rng.random(N) * src_edges[-1], side="right")
            item = np.empty(N, dtype=np.int64)
            for s_code, weights in ((0, w_pop), (1, w_fresh), (2, np.ones(k))):
                m = src == s_code
                item[m] = _sample_weighted(rng, weights, int(m.sum()))
            m_taste = np.flatnonzero(src >= 3)
            r = rng.random(len(m_taste))
            t_pick = np.minimum((cum_taste[sess_user[imp_sess[m_taste]]] < r[:, None]).sum(axis=1), T - 1)
            topic_avail = item_topic[:k]
            for t in range(T):
                rows = m_taste[t_pick == t]
                if not len(rows):
                    continue
                cand = np.flatnonzero(topic_avail == t)
                if len(cand):
                    item[rows] = cand[_sample_weighted(rng, w_pop[cand], len(rows))]
                else:  # nothing of that topic yet: fall back to popularity
                    item[rows] = _sample_weighted(rng, w_pop, len(rows))

            # an item is shown at most once per session
            _, first = np.unique(imp_sess * items + item, return_index=True)
            keep = np.sort(first)
            imp_sess, item = imp_sess[keep], item[keep]
            N = len(item)
            u = sess_user[imp_sess]
            t_item = item_topic[item]

            # does the user play it? taste for the topic, quality, popularity, trend
            aff = np.log(taste[u, t_item] * T + 0.1)
            lp = np.log(w_pop + 1e-6)
            popz = (lp[item] - lp.mean()) / (lp.std() + 1e-9)
            logit = -1.6 + 0.9 * aff + 2.0 * (quality[item] - 0.5) + 0.25 * popz
            if drifting:
                logit = logit + 0.7 * is_drift_topic[t_item]
            played = rng.random(N) < _sigmoid(logit)
            liking = _sigmoid(0.9 * aff + 3.0 * (quality[item] - 0.5))
            frac = rng.beta(0.5 + 3.0 * liking, 1.5)
            watch_s = np.where(played, np.maximum(1.0, np.round(frac * duration[item], 1)), 0.0)
            brief = played & (frac < 0.1)
            liked = played & ~brief & (rng.random(N) < 0.02 + 0.4 * liking * frac)
            swiped = ~played & (rng.random(N) < 0.3)

            # timing: browse, then (if played) watch; the session is a sequence
            browse_ms = (500 + rng.exponential(3000.0, N)).astype(np.int64)
            watch_ms = np.round(watch_s * 1000).astype(np.int64)
            dwell = browse_ms + np.where(played, watch_ms + 1000 + liked * 2000, 0)
            sess_first = np.concatenate([[0], np.flatnonzero(np.diff(imp_sess)) + 1])
            grp = np.cumsum(np.r_[0, np.diff(imp_sess) != 0])
            imp_ts = sess_start[imp_sess] + _exclusive_cumsum_by_group(dwell, sess_first, grp)
            play_ts = imp_ts + browse_ms + watch_ms

            p, b, lk, sw = (np.flatnonzero(x) for x in (played, brief, liked, swiped))
            parts = [
                (np.arange(N), imp_ts, EventType.IMPRESSION, np.ones(N)),
                (p, play_ts[p], EventType.PLAY, watch_s[p]),
                (b, play_ts[b] + 300, EventType.SKIP, np.ones(len(b))),
                (lk, play_ts[lk] + 1000, EventType.LIKE, np.ones(len(lk))),
                (sw, imp_ts[sw] + browse_ms[sw], EventType.SKIP, np.ones(len(sw))),
            ]
            new = {
                "ts": np.concatenate([ts for _, ts, _, _ in parts]),
                "user_id": np.concatenate([u[i] + 1 for i, _, _, _ in parts]).astype(np.int64),
                "item_id": np.concatenate([item_ids[item[i]] for i, _, _, _ in parts]),
                "session_id": np.concatenate([sess_id[imp_sess[i]] for i, _, _, _ in parts]),
                "type": np.concatenate([np.full(len(i), int(ty), np.int8) for i, _, ty, _ in parts]),
                "rank": np.concatenate([np.full(len(i), _KIND_RANK[ty], np.int8) for i, _, ty, _ in parts]),
                "value": np.concatenate([v for _, _, _, v in parts]).astype(np.float64),
            }

        # emit everything before the next midnight; later events wait for the next day's chunk
        chunk = [c for c in (carry, new) if c is not None]
        if not chunk:
            continue
        ev = {key: np.concatenate([c[key] for c in chunk]) for key in chunk[0]}
        o = np.lexsort((ev["rank"], ev["session_id"], ev["ts"]))
        ev = {key: v[o] for key, v in ev.items()}
        cut = int(np.searchsorted(ev["ts"], day_start + MS_PER_DAY, side="left"))
        carry = {key: v[cut:] for key, v in ev.items()} if cut < len(ev["ts"]) else None
        if cut == 0:
            continue
        e = {key: v[:cut] for key, v in ev.items()}
        idx = e["item_id"] - 1
        batch = EventBatch(
            event_id=next_event_id + np.arange(cut, dtype=np.int64),
            ts=e["ts"],
            user_id=e["user_id"],
            item_id=e["item_id"],
            creator_id=item_creator_id[idx],
            topic=item_topic[idx],
            session_id=e["session_id"],
            type=e["type"],
            value=e["value"],
        )
        next_event_id += cut
        n_events += log.append(batch)
    # whatever is still carried ran past end_ts: the snapshot ends there.

    items_table = pa.table(
        {
            "item_id": item_ids,
            "topic": item_topic,
            "creator_id": item_creator_id,
            "duration_s": duration.astype(np.float64),
            "quality": quality.astype(np.float64),
            "publish_ts": publish.astype(np.int64),
            "genres": pa.array([[int(t)] for t in item_topic], type=pa.list_(pa.int32())),
            "title": [f"video-{i}" for i in item_ids.tolist()],
        },
        schema=ITEMS_SCHEMA,
    )
    users_table = pa.table(
        {
            "user_id": np.arange(1, users + 1, dtype=np.int64),
            "region": region,
            "signup_ts": signup,
        }
    )
    info = DatasetInfo(
        kind="simulated",
        seed=int(seed),
        n_users=users,
        n_items=items,
        n_events=n_events,
        start_ts=int(start_ts),
        end_ts=int(end_ts),
        n_topics=T,
        pii_fields={"users": []},
        params={
            "days": days,
            "n_creators": n_creators,
            "new_item_frac": new_item_frac,
            "n_new_items": n_new,
            "new_user_frac": 0.1,
            "source_mix": dict(_SOURCE_MIX),
            "drift_start_ts": int(drift_start) if drift_n else None,
            "drift_days": drift_n,
            "drift_topics": [int(t) for t in drift_topics],
            "drift_boost": drift_boost,
            "generator": "parity.simulator/1",
        },
    )
    write_catalogue(out, items_table, users_table, info)
    return info

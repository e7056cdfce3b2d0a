"""`make demo`: the main job on the embedded defaults, end to end, with a summary.

Simulate a video platform → build the offline views → materialise the memory online store
→ prove batch/stream parity → stream live events and watch them change served features →
train a release (small profile) → serve it over gRPC on the memory store → recommend for a
known user, a new user, and the known user again after live events (per-stage latency) →
shut the server down cleanly → distil the tiny device ranker, export a signed bundle, serve
it like a CDN, sync a device and rank offline.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from features.events import EventBatch, EventType
from features.lookup import FeatureLookup
from features.materialize import materialize
from features.modes import ModePlan
from features.online.memory import MemoryStore
from features.simulator import simulate
from features.streaming import StreamingIngestor
from features.verify import verify_parity
from parity.workspace import open_workspace


def _step(title: str) -> float:
    print(f"\n== {title}")
    return time.perf_counter()


def run(out: Path, seed: int = 0) -> dict:
    summary: dict = {}
    if out.exists():
        shutil.rmtree(out)
    t = _step("simulate a video platform (deterministic from the seed)")
    info = simulate(out / "data", seed=seed)
    print(f"{info.n_events} events, {info.n_users} users, {info.n_items} items over {(info.end_ts - info.start_ts) / 86_400_000:.0f} days ({time.perf_counter() - t:.1f} s)")
    ws = open_workspace(out / "data")

    t = _step("offline views and online materialisation (memory store)")
    ws.offline.build(ws.log, ws.sets)
    store = MemoryStore("demo")
    now = ws.log.max_ts() + 1
    for r in materialize(ws.log, store, ws.sets, until_ts=now):
        print(f"  {r.feature_set:<16} {r.version}  {r.entities_written:>6} entities")
    print(f"({time.perf_counter() - t:.1f} s)")

    t = _step("prove parity: replay through the streaming path vs batch point-in-time values")
    rep = verify_parity(ws.log.read(), ws.sets, MemoryStore("verify"), probes=5)
    print(f"  checked {rep.checked} values at {rep.probes} probe times: {rep.mismatches} mismatches, max |diff| {rep.max_abs_diff:.2g} ({time.perf_counter() - t:.1f} s)")
    summary["parity"] = rep.summary()
    t = time.perf_counter()
    modes = "user_activity=on_read,user_creator=on_read:cap=32,user_topic=materialized:1h"
    rep_m = verify_parity(ws.log.read(), ws.sets, MemoryStore("verify-modes"), probes=3, modes=ModePlan.parse(modes))
    print(f"  and with sets served other ways ({modes}): {rep_m.checked} values, {rep_m.mismatches} mismatches "
          f"({time.perf_counter() - t:.1f} s)")
    summary["parity_modes"] = rep_m.summary()

    _step("serve one user's features (one store round trip)")
    lookup = FeatureLookup(store, ws.sets)
    user = int(np.bincount(ws.log.read().user_id).argmax())
    res = lookup.read("user_activity", [user], now)
    fr = res.frame
    for c in ("plays_1h", "plays_1d", "plays_7d", "watch_s_7d", "likes_7d"):
        print(f"  user {user} {c:<12} {fr.column(c)[0]:>10.1f}")
    print(f"  feature_ts={int(fr.feature_ts[0])} staleness={int(res.staleness_ms[0]) / 1000:.1f} s")

    _step("live events through the streaming path change what is served")
    ing = StreamingIngestor(store, ws.sets, name="demo-live")
    item = ws.log.read(user_ids=[user]).item_id[-1]
    topic = int(ws.log.read(user_ids=[user]).topic[-1])
    live = EventBatch.from_rows(
        [{"event_id": 10**12 + i, "ts": now + i * 1000, "user_id": user, "item_id": int(item), "topic": topic, "type": EventType.PLAY, "value": 30.0} for i in range(3)]
    )
    r = ing.ingest(live)
    again = ing.ingest(live)  # a redelivery: no effect
    after = lookup.read("user_activity", [user], now + 5000).frame
    print(f"  ingested {r.accepted} plays (redelivery: {again.duplicates} duplicates ignored)")
    print(f"  plays_1h {fr.column('plays_1h')[0]:.0f} -> {after.column('plays_1h')[0]:.0f}, watch_s_1d {fr.column('watch_s_1d')[0]:.0f} -> {after.column('watch_s_1d')[0]:.0f}")
    summary["live_update"] = float(after.column("plays_1h")[0] - fr.column("plays_1h")[0])
    summary.update(_train_and_serve(out, ws, user))
    return summary


def _show(title: str, rec) -> None:
    items = ", ".join(f"{it.item_id}:{it.score:.3f}" for it in rec.items[:5])
    print(f"  {title}: release {rec.release_id[:24]} degraded={rec.degraded}")
    print(f"    top 5 (item:score) {items}")
    if rec.latency_ms:
        print("    latency ms " + "  ".join(f"{k}={v:.2f}" for k, v in rec.latency_ms.items()))


def _train_and_serve(out: Path, ws, user: int) -> dict:
    from pipeline.train import train_release
    from server.app import BackgroundServer
    from server.client import LiveEvent, ParityClient
    from server.config import ServerConfig

    t = _step("train a release (small profile): two-tower + ScaNN, teacher, distilled int8 student")
    rel = train_release(ws.data_dir, out / "releases", profile="small", seed=0)
    m = rel.manifest["metrics"]
    print(f"  {rel.release_id}: int8 student test AUC {m['ranking_test']['student_int8']['auc']:.4f} "
          f"(teacher {m['ranking_test']['teacher']['auc']:.4f}); two-tower recall@100 {m['retrieval']['recall@100_test_two_tower']:.3f} "
          f"vs popularity {m['retrieval']['recall@100_test_popularity']:.3f} ({time.perf_counter() - t:.1f} s)")

    t = _step("serve it over gRPC (memory store, every answer in the served log) and send requests")
    canary = out / "releases" / f"{rel.release_id}-canary"
    shutil.copytree(rel.path, canary)  # the same models under another name: a canary to roll out
    served = out / "served"
    cfg = ServerConfig(release=rel.path, data_dir=ws.data_dir, host="127.0.0.1", port=0, metrics_port=None, admin_token="demo-token",
                       served_log=served, log_sample=1.0)
    with BackgroundServer(cfg) as srv, ParityClient(f"127.0.0.1:{srv.port}", timeout_s=5, admin_token="demo-token") as client:
        status = client.status()
        print(f"  serving {status.release_id} on port {srv.port}; clock {status.clock} now={status.now_ms}; {status.catalogue_items} items")
        known = client.recommend(user, k=10, include_latency=True)
        _show(f"known user {user}", known)
        new = client.recommend(10**9, k=10, include_latency=True)
        _show("new user (no history)", new)
        top = [int(it.item_id) for it in known.items[:3]]
        # 20 s plays: plausible for any item (the shortest are 30 s; longer plays than 2x an item's duration are refused)
        # stamped by the server's clock after the requests above: an event stamped earlier than a
        # request that did not see it is a late event, which the live parity check rightly flags
        live_ms = client.status().now_ms
        live = [LiveEvent(2 * 10**12 + i, live_ms + i, user, item, "play", 20.0) for i, item in enumerate(top)]
        ing = client.ingest(live)
        print(f"  ingested {ing.accepted} live plays of the top items ({ing.duplicates} duplicates, {ing.invalid} invalid, {ing.limited} rate-limited)")
        time.sleep(cfg.response_cache_ttl_s + 0.2)
        after = client.recommend(user, k=10, include_latency=True)
        _show(f"known user {user} after live events", after)
        gone = not (set(top) & {int(it.item_id) for it in after.items})
        print(f"  the items just watched left the list: {gone}")
        for name, f in sorted(client.status().feature_sets.items()):
            age = f["staleness_p50_ms"] / 1000
            age_s = f"{age / 3600:.1f} h" if age >= 3600 else f"{age:.0f} s"
            print(f"  {name:<14} served {f['mode']}: staleness p50 {age_s}, "
                  f"{f['bytes_per_record']:.0f} bytes per record read ({f['records_read']} records)")
        users, counts = np.unique(ws.log.read().user_id, return_counts=True)
        other = int(next(u for u in users[np.argsort(-counts)].tolist() if u != user))  # the demo's user stays for the device step
        safe = _safe_change(srv, client, canary, other, live, served, ws)
    print(f"  server stopped cleanly ({time.perf_counter() - t:.1f} s)")
    out_summary = {"served": len(known.items) == 10 and len(new.items) == 10, "live_reflected": gone, "release": rel.release_id, **safe}
    out_summary.update(_device(out, ws, rel, user))
    return out_summary


def _safe_change(srv, client, canary: Path, user: int, live, served: Path, ws) -> dict:
    """A canary for half the users, then an abort; the live parity check on what was served;
    then one user erased everywhere (last: erasing changes the aggregates the log's rows saw)."""
    from features.events import EventBatch, EventType
    from server.rollout import RolloutSpec

    st = srv.run(srv.service.set_rollout(RolloutSpec(canary=canary.name, canary_percent=50.0, salt="demo")))
    arms = [client.recommend(u, k=5).arm for u in range(1, 41)]
    print(f"  rollout v{st['version']}: canary {canary.name[:28]} for 50 % of users -> {arms.count('canary')} of 40 users answered "
          f"by the canary, each always by the same arm")
    st = srv.run(srv.service.set_rollout(abort=True))
    back = {client.recommend(u, k=5).arm for u in range(1, 41)}
    print(f"  rollout {st['state']}: every answer from the {', '.join(sorted(back))} again")
    srv.service.observer.served_log.flush(30.0, finish_parts=True)
    # the live plays land in the event log, as a production pipeline lands them; then the check
    from features.catalog import ItemCatalog
    from features.datasets import read_items

    cat = ItemCatalog.from_table(read_items(ws.data_dir))
    rows = cat.index(np.asarray([int(e.item_id) for e in live], dtype=np.int64))
    ws.log.append(EventBatch.from_rows([{"event_id": int(e.event_id), "ts": int(e.ts_ms), "user_id": int(e.user_id), "item_id": int(e.item_id),
                                         "topic": int(cat.topic[r]), "creator_id": int(cat.creator_id[r]), "type": EventType.PLAY,
                                         "value": float(e.value)} for e, r in zip(live, rows.tolist())]))
    skew_free = _skew(served, ws)
    gone = client.delete_user(user, "demo: a user asked to be forgotten")
    fresh, stranger = client.recommend(user, k=5), client.recommend(10**9 + 7, k=5)
    same = [i.item_id for i in fresh.items] == [i.item_id for i in stranger.items]
    print(f"  erased user {user}: {gone['online_keys_deleted']} online keys, {gone['cache_entries_dropped']} cache entries, "
          f"{gone['served_log_rows_removed']} served-log rows (audit {gone['audit_id']}); now served as a new user: {same}")
    return {"rollout": 0 < arms.count("canary") < 40 and back == {"primary"}, "erased": same, "skew_free": skew_free}


def _skew(served: Path, ws) -> bool:
    """The live parity check on what the demo's server logged."""
    from features.catalog import ItemCatalog
    from features.datasets import read_items
    from monitor.served_log import read_served_log
    from monitor.skew import check_skew

    t = time.perf_counter()
    rep = check_skew(read_served_log(served), ws.log.read(), ws.sets, ItemCatalog.from_table(read_items(ws.data_dir)))
    print(f"  live parity check on the served log: {rep.requests} logged requests, {rep.compared} values recomputed with the batch path "
          f"as of each request, {rep.differ} differ "
          f"({', '.join(f'{s.feature_set} {s.differ}/{s.compared}' for s in rep.sets[:4])}, ...) ({time.perf_counter() - t:.1f} s)")
    return rep.compared > 0 and rep.differ == 0


def _device(out: Path, ws, rel, user: int) -> dict:
    """Export the device bundle, serve it like a CDN, sync a device, rank offline."""
    from export.device.bundle import export_device
    from export.device.cdn import BackgroundCDN
    from export.device.keys import keygen
    from export.device.tiny_model import build_device_model
    from mobile_sdk import Client, NoBundle

    t = _step("device: distil a tiny ranker, export a signed bundle, sync it over HTTP, rank on the device offline")
    keys = keygen(out / "keys", force=True)
    model = build_device_model(rel.path, ws.data_dir, out / "device-model", seed=0, widths=((64, 32),), alphas=(0.6,))
    rep = export_device(rel.path, ws.data_dir, keys, out / "bundle", model)
    print(f"  tiny ranker {model.bytes['int8'] / 1024:.1f} KB int8 ONNX, {model.bytes['ort'] / 1024:.1f} KB ORT "
          f"(hidden {'-'.join(map(str, model.hidden))}, built in {model.seconds:.1f} s)")
    print(f"  bundle v{rep.version}: {rep.items_total} items, {rep.users_written} users at {rep.bytes_per_user:.0f} bytes each, "
          f"{rep.bytes_written / 1e6:.1f} MB in {rep.seconds['total']:.1f} s")
    token = keys.token(user)
    with BackgroundCDN(out / "bundle") as cdn:
        device = Client(cdn.url, out / "device-cache", keys.public_pem, token)
        full = device.sync()
        again = device.sync()
        print(f"  device sync: {full.files_fetched} files, {full.bytes_fetched / 1024:.0f} KB in {full.seconds * 1000:.0f} ms "
              f"(signature, sizes and sha256 checked); again: not modified={again.not_modified}")
    now = {"now_ms": rep.watermark_ms + 60_000}  # the simulation's clock, a minute after the bundle's data ends
    ranked = device.rank(user, context=now, k=10)  # the CDN is gone: the device ranks from its cache
    items = ", ".join(f"{i}:{s:.3f}" for i, s in ranked[:5])
    print(f"  offline rank for user {user} from its {ranked.source!r} candidates in {ranked.elapsed_ms:.2f} ms: {items}")
    top = ranked[0][0]
    device.record({"ts": now["now_ms"] - 1000, "item_id": int(top), "type": 1, "value": 20.0})
    after = device.rank(user, context=now, k=10)
    print(f"  after a play of {top} this session: it left the list: {top not in after.item_ids}")
    device.close()
    cold = Client("http://127.0.0.1:9/", out / "empty-cache", keys.public_pem)
    try:
        cold.rank(user)
        cold_ok = False
    except NoBundle as exc:
        cold_ok = True
        print(f"  a device that never synced says so instead of guessing: {exc}")
    print(f"({time.perf_counter() - t:.1f} s)")
    return {"device_ranked": ranked.source == "user" and len(ranked) == 10 and top not in after.item_ids and cold_ok}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="parity-demo", description="Run Parity end to end on synthetic data.")
    p.add_argument("--out", default="demo-out", help="work folder (recreated)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t = time.perf_counter()
    s = run(Path(args.out), args.seed)
    parity_ok = all(s[k]["mismatches"] == 0 and s[k]["checked"] > 0 for k in ("parity", "parity_modes"))
    ok = (parity_ok and s["live_update"] == 3.0 and s["served"] and s["live_reflected"] and s["device_ranked"] and s["rollout"]
          and s["erased"] and s["skew_free"])
    print(f"\n== summary: parity {'PROVEN' if parity_ok else 'BROKEN'} ({s['parity']['checked']} values, {s['parity']['mismatches']} mismatches; also with sets on_read and materialized); "
          f"live features visible: {s['live_update'] == 3.0}; release {s['release']} served 10 items to known and new users: {s['served']}; "
          f"live events reflected in recommendations: {s['live_reflected']}; canary rolled out and back: {s['rollout']}; "
          f"served log free of skew: {s['skew_free']}; erased user served as new: {s['erased']}; device ranked offline from a signed bundle: "
          f"{s['device_ranked']}; {time.perf_counter() - t:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Prometheus metrics of one server, in its own registry (several servers can share a process).

Exposed on `--metrics-port` by prometheus_client's HTTP server. Names:
  parity_requests_total{rpc,code}                 every RPC with its final status code
  parity_request_seconds{rpc}                     RPC latency (histogram)
  parity_stage_seconds{stage}                     Recommend / Rank stage latency (histogram)
  parity_cache_requests_total{cache,result}       response / feature cache hits and misses
  parity_feature_missing_ratio                    fraction of a request's user features missing (histogram)
  parity_feature_staleness_seconds                now - feature timestamp of the user features served (histogram)
  parity_degraded_responses_total{reason}         answers from fallbacks (store down or slow, ...)
  parity_store_errors_total{op,kind}              online store failures on the request path
  parity_ingest_events_total{outcome}             live events: accepted, duplicate, late, invalid
  parity_release_loads_total{result}              LoadRelease outcomes
  parity_release_info{release_id}                 1 for the release being served
  parity_inflight_requests                        RPCs being handled
  parity_item_table_refreshes_total{result}       item feature table refreshes
  parity_admission_total{lane,outcome}            admission decisions: admitted, queue_full, wait_too_long, deadline,
                                                  expired (refused when its turn came), draining, streams_total, ...
  parity_queue_wait_seconds{lane}                 time an admitted request waited for a slot (histogram)
  parity_lane_running{lane}, parity_lane_queued{lane}   requests in service / waiting, per lane
  parity_ingest_streams_open                      IngestEvents streams open
  parity_store_state{state}                       1 for the online store's state: ok, empty (restarted without data), refilling
  parity_store_refills_total{result}              re-fills of a store found empty

  parity_grpc_calls_total{server,result}          gRPC's own count of calls per server (main, ops; channelz): started,
                                                  succeeded, failed; started - succeeded - failed - in flight = calls
                                                  the C core dropped before Python saw them (server/admission.py;
                                                  the client sees CANCELLED)
"""
from __future__ import annotations

import json
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

log = logging.getLogger(__name__)

__all__ = ["Metrics", "channelz_server_ids"]

_LATENCY = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
_STALENESS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400, 30 * 86400)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("parity_requests", "RPCs by method and status code", ["rpc", "code"], registry=r)
        self.latency = Histogram("parity_request_seconds", "RPC latency", ["rpc"], buckets=_LATENCY, registry=r)
        self.stage = Histogram("parity_stage_seconds", "request-path stage latency", ["stage"], buckets=_LATENCY, registry=r)
        self.cache = Counter("parity_cache_requests", "cache lookups", ["cache", "result"], registry=r)
        self.missing = Histogram("parity_feature_missing_ratio", "fraction of the user features missing per request",
                                 buckets=(0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0), registry=r)
        self.staleness = Histogram("parity_feature_staleness_seconds", "age of the user features served", buckets=_STALENESS, registry=r)
        self.degraded = Counter("parity_degraded_responses", "responses served from fallbacks", ["reason"], registry=r)
        self.served_staleness = Histogram("parity_served_staleness_seconds", "per request and feature set: age of the freshest value served",
                                          ["feature_set"], buckets=_STALENESS, registry=r)
        self.store_bytes = Counter("parity_store_bytes_read", "bytes the request path read from the online store", ["feature_set"], registry=r)
        self.serving_mode = Gauge("parity_serving_mode", "how each feature set is kept online (1 for its mode)", ["feature_set", "mode"], registry=r)
        self.values_fallbacks = Counter("parity_values_fallbacks", "served-values records read past their exact interval (their state read instead)", registry=r)
        self.store_errors = Counter("parity_store_errors", "online store failures on the request path", ["op", "kind"], registry=r)
        self.ingest = Counter("parity_ingest_events", "live events by outcome", ["outcome"], registry=r)
        self.release_loads = Counter("parity_release_loads", "LoadRelease outcomes", ["result"], registry=r)
        self.release = Gauge("parity_release_info", "the release being served", ["release_id"], registry=r)
        self.inflight = Gauge("parity_inflight_requests", "RPCs being handled", registry=r)
        self.item_refresh = Counter("parity_item_table_refreshes", "item feature table refreshes", ["result"], registry=r)
        self.admission = Counter("parity_admission", "admission decisions per lane", ["lane", "outcome"], registry=r)
        self.queue_wait = Histogram("parity_queue_wait_seconds", "time admitted requests waited for a slot", ["lane"], buckets=_LATENCY, registry=r)
        self.lane_running = Gauge("parity_lane_running", "requests in service per admission lane", ["lane"], registry=r)
        self.lane_queued = Gauge("parity_lane_queued", "requests waiting per admission lane", ["lane"], registry=r)
        self.ingest_streams = Gauge("parity_ingest_streams_open", "IngestEvents streams open", registry=r)
        self.store_state = Gauge("parity_store_state", "online store state (1 = current)", ["state"], registry=r)
        fl = ["arm", "feature"]
        self.drift_psi = Gauge("parity_drift_psi", "population stability index of served inputs vs the release reference (sliding window)", fl, registry=r)
        self.drift_js = Gauge("parity_drift_js_distance", "Jensen-Shannon distance of served inputs vs the release reference", fl, registry=r)
        self.drift_p = Gauge("parity_drift_p_adjusted", "KS / chi-square p-value, Benjamini-Hochberg adjusted across features", fl, registry=r)
        self.drift_missing = Gauge("parity_drift_missing_rate", "share of served values missing (sliding window)", fl, registry=r)
        self.drift_drifted = Gauge("parity_drift_drifted", "1 while the feature (or 'prediction') crosses a drift threshold", fl, registry=r)
        self.drift_alerts = Counter("parity_drift_alerts", "drift alert events written", fl, registry=r)
        self.drift_rolling = Gauge("parity_drift_reference_rolling", "1: drift is judged against the served rows of the 48 h before "
                                   "the window; 0: against the release's reference (not enough history yet)", ["arm"], registry=r)
        self.drift_rows = Gauge("parity_drift_window_rows", "sampled candidate rows in the drift window", ["arm"], registry=r)
        self.drift_dropped = Counter("parity_drift_dropped", "observations the drift buffer had no room for", registry=r)
        self.drift_step_seconds = Histogram("parity_drift_step_seconds", "time to fold and test one drift interval", registry=r)
        self.rollout_version = Gauge("parity_rollout_version", "version of the rollout this process applies", registry=r)
        self.rollout_canary_percent = Gauge("parity_rollout_canary_percent", "share of users the canary answers", registry=r)
        self.rollout_decisions = Counter("parity_rollout_decisions", "canary guard decisions acted on (rollback, promote)", ["action"], registry=r)
        self.guard_seconds = Histogram("parity_canary_guard_seconds", "time of one canary guard decision", registry=r)
        self.shadow_dropped = Counter("parity_shadow_dropped", "shadow requests the queue had no room for", registry=r)
        self.served_log = Counter("parity_served_log_records", "served-log records by outcome (written, dropped)", ["outcome"], registry=r)
        self.store_refills = Counter("parity_store_refills", "re-fills of an online store found empty", ["result"], registry=r)
        self._release_id: str | None = None
        self._http = None
        self._stage_children: dict = {}  # stage name -> its parity_stage_seconds child
        self._request_children: dict = {}  # (rpc, code) -> (parity_requests_total child, parity_request_seconds child)

    def cache_result(self, cache: str):
        hit, miss = self.cache.labels(cache, "hit"), self.cache.labels(cache, "miss")
        return lambda is_hit: (hit if is_hit else miss).inc()

    def set_release(self, release_id: str) -> None:
        if self._release_id is not None:
            self.release.remove(self._release_id)
        self.release.labels(release_id).set(1)
        self._release_id = release_id

    def observe_stages(self, stages) -> None:
        children = self._stage_children
        for name, ms in stages:
            child = children.get(name)
            if child is None:
                child = children[name] = self.stage.labels(name)  # ~10 per request: look each stage's child up once
            child.observe(ms / 1000.0)

    def request_done(self, rpc: str, code: str, seconds: float) -> None:
        """An RPC finished: parity_requests_total{rpc,code} and parity_request_seconds{rpc}."""
        key = (rpc, code)
        pair = self._request_children.get(key)
        if pair is None:
            pair = self._request_children[key] = (self.requests.labels(rpc, code), self.latency.labels(rpc))
        pair[0].inc()
        pair[1].observe(seconds)

    def on_admission(self, lane: str, outcome: str) -> None:
        self.admission.labels(lane, outcome).inc()

    def on_queue_wait(self, lane: str, seconds: float) -> None:
        self.queue_wait.labels(lane).observe(seconds)

    def watch_lanes(self, lanes) -> None:
        """Lane gauges read the lanes when scraped (nothing to update on the request path)."""
        for name, lane in lanes.items():
            self.lane_running.labels(name).set_function(lambda lane=lane: lane.running)
            self.lane_queued.labels(name).set_function(lambda lane=lane: lane.queued)

    def set_store_state(self, state: str) -> None:
        for s in ("ok", "empty", "refilling"):
            self.store_state.labels(s).set(1 if s == state else 0)

    def watch_grpc_calls(self, server_ids: dict[str, int]) -> None:
        """Export gRPC's channelz call counters of the servers named -> their channelz ids."""
        self.registry.register(_ChannelzCalls(server_ids))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics HTTP endpoint; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def channelz_server_ids() -> set[int]:
    """The channelz ids of the gRPC servers in this process (empty if channelz is unavailable)."""
    try:
        from grpc._cython import cygrpc

        return {int(srv["ref"]["serverId"]) for srv in json.loads(cygrpc.channelz_get_servers(0)).get("server", [])}
    except Exception:  # noqa: BLE001 - a private API: without it, the metric is absent, nothing else breaks
        log.debug("channelz unavailable", exc_info=True)
        return set()


class _ChannelzCalls:
    """gRPC's per-server call counters, read at scrape time from channelz (grpcio's own
    cygrpc.channelz_get_server, what the grpcio-channelz service serves): the only place
    that counts calls the C core dropped before they reached Python."""

    def __init__(self, server_ids: dict[str, int]) -> None:
        self.server_ids = dict(server_ids)

    def collect(self):
        fam = CounterMetricFamily("parity_grpc_calls", "calls counted by gRPC itself per server", labels=["server", "result"])
        try:
            from grpc._cython import cygrpc
        except Exception:  # noqa: BLE001
            return [fam]
        for name, sid in self.server_ids.items():
            try:
                d = json.loads(cygrpc.channelz_get_server(sid)).get("server", {}).get("data", {})
            except Exception:  # noqa: BLE001 - a server already gone
                continue
            for result, key in (("started", "callsStarted"), ("succeeded", "callsSucceeded"), ("failed", "callsFailed")):
                fam.add_metric([name, result], float(d.get(key, 0)))
        return [fam]

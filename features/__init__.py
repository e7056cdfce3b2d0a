"""Parity's feature store: one aggregation engine behind a batch path and a streaming path.

Public modules: events (the event-log schema), definitions (feature declarations),
engine (state building and reading), eventlog (part_checksum: each part's sha256 sidecar;
logcheck: `parity data check`), offline, online, pit (point-in-time join),
streaming (ingest), event_rules and contribution (what live events must pass at the edge),
materialize, verify; modes (each set's serving mode: streaming, materialized, on_read),
on_read (raw-event records computed on read), cadence (when materialized sets run),
durations (typed spans such as 15m).
"""

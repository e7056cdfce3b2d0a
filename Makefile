# Parity: the two commands a new user needs are `make demo` and `make test`.
# Both run `make setup` first; setup is idempotent (a stamp tracks pyproject.toml).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.parity-installed
BENCH_STAMP := $(VENV)/.parity-bench-installed
PROTOS := $(wildcard proto/parity_api/v1/*.proto)
GEN    := parity_api/v1/.generated
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: setup test demo bench bench-reliability bench-device bench-change bench-backtest bench-freshness bench-workers bench-peers bench-scaling loadtest clean

setup: $(STAMP) $(GEN)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[train,test,monitor,eval,ray]" --config-settings editable_mode=compat
	touch $(STAMP)

# Generated gRPC code is not committed: it is made from proto/ here (tests check it is current).
$(GEN): $(PROTOS) $(STAMP)
	mkdir -p parity_api/v1
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $(GEN)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m parity.demo --out $(DEMO_OUT)

# The bench extra (faiss-cpu) only for benchmarks: `make test` does not need it.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e ".[train,test,monitor,eval,ray,bench]" --config-settings editable_mode=compat
	touch $(BENCH_STAMP)

# Micro-benchmarks (pytest-benchmark), then the serving study (bench/serving.py: product server
# vs baseline, fixed rate, capacity, 10-minute soak; ~35 min), then reliability (bench/reliability.py:
# goodput and latency at 1-10x capacity and recovery; bench/reliability_faults.py: the fault table;
# ~20 min). SERVING_ARGS=--quick / RELIABILITY_ARGS=--quick for smoke runs.
SERVING_ARGS ?=
RELIABILITY_ARGS ?=
bench: setup $(BENCH_STAMP)
	$(PY) -m pytest bench --benchmark-only --benchmark-json=bench/results/latest.json -p no:cacheprovider
	$(PY) -m bench.report bench/results/latest.json bench/RESULTS.md
	$(PY) -m bench.serving --out bench/results/serving.json $(SERVING_ARGS)
	$(PY) -m bench.serving_report bench/results/serving.json bench/RESULTS.md
	$(MAKE) bench-reliability RELIABILITY_ARGS="$(RELIABILITY_ARGS)"
	$(MAKE) bench-device DEVICE_ARGS="$(DEVICE_ARGS)"
	$(MAKE) bench-change CHANGE_ARGS="$(CHANGE_ARGS)"

# Safe change (issue 11): canaries rolled back in a closed loop (bench/canary.py, ~3 min), drift
# detection on the simulator's shift and false alarms without one (bench/drift_study.py), and
# what the served log and the shadow cost the answer path (bench/change_overhead.py, ~25 min).
CHANGE_ARGS ?=
bench-change: setup
	$(PY) -m bench.canary --seeds 0 1 2 3 4 5 --out bench/results/canary.json
	$(PY) -m bench.drift_study --out bench/results/drift.json
	$(PY) -m bench.change_overhead --out bench/results/change_overhead.json $(CHANGE_ARGS)
	$(PY) -m bench.change_report bench/results/change_overhead.json bench/RESULTS.md

# Freshness (issue 12): parity backtest on the demo-size simulator (seeds 0-2) and MovieLens 100K
# (bench/backtest_study.py, ~10 min): the per-set tolerance of staleness and missing records.
bench-backtest: setup
	$(PY) -m bench.backtest_study --seeds 0 1 2 --out bench/results/backtest.json --results bench/RESULTS.md

# Worker fleets (issue 14): the serving study's fixed rate and capacity for `parity serve --workers 1`
# and `--workers 2` on both stores, the load over 8 connections (bench/workers_report.py; ~15 min).
bench-workers: setup $(BENCH_STAMP)
	$(PY) -m bench.serving --variants parity_w1,parity_w2 --no-soak --out bench/results/serving_workers.json
	$(PY) -m bench.workers_report bench/results/serving_workers.json bench/RESULTS.md

# Parity beside its peers (bench/peers_study.py, issue 13): implicit's ALS and BPR, item kNN and
# EASE tuned on validation, on MovieLens 100K under both protocols, seeds 0-2 (three default
# releases plus Parity's own 80/20 run per seed; about 6 CPU-minutes per seed once its release exists). PEERS_WORK keeps the
# imported data and the releases between runs.
PEERS_WORK ?= /tmp/parity-peers
bench-peers: setup
	$(PY) -m bench.peers_study --movielens $(PARITY_MOVIELENS) --seeds 0 1 2 --work $(PEERS_WORK) --out bench/results/peers.json --md bench/results/peers.md

# Scaling curves (issue 14, bench/scaling.py): tiny-profile training time and peak memory against
# events (0.25M, 1M, 4M) and items (3k, 10k), materialisation and batch states in one process vs
# Ray, device export against users; growth exponents, PNGs in bench/results/, the JSON and the
# generated:scaling section of bench/RESULTS.md (~15 min on 2 shared cores). SCALING_ARGS=--quick for a
# smoke run (written under /tmp, RESULTS untouched); SCALING_ARGS=--big adds 16M events.
SCALING_ARGS ?=
bench-scaling: setup
	nice -n 10 $(PY) -m bench.scaling $(SCALING_ARGS)

# The freshness trade (bench/freshness_trade.py): write, read, bytes and served staleness per
# serving mode for a light and a heavy feature set, and the serving study per mode (~20 min).
FRESHNESS_ARGS ?= --servers --rounds 2
bench-freshness: setup
	$(PY) -m bench.freshness_trade --out bench/results/freshness_trade.json $(FRESHNESS_ARGS)
	$(PY) -m bench.freshness_trade --render bench/results/freshness_trade.json bench/RESULTS.md

# The device path (bench/device.py: bundle sizes, export throughput at 10k and 100k users, delta,
# on-device rank vs the server's Recommend, sync, hybrid mode behind bench/delay_proxy.py, quality;
# ~15 min). DEVICE_ARGS=--quick for a smoke run.
DEVICE_ARGS ?=
bench-device: setup
	$(PY) -m bench.device --out bench/results/device.json $(DEVICE_ARGS)
	$(PY) -m bench.device_report bench/results/device.json bench/RESULTS.md

bench-reliability: setup
	$(PY) -m bench.grpc_probe --out bench/results/grpc_probe.json
	$(PY) -m bench.reliability --out bench/results/reliability.json $(RELIABILITY_ARGS)
	$(PY) -m bench.reliability_faults --out bench/results/reliability_faults.json $(RELIABILITY_ARGS)
	$(PY) -m bench.reliability_report bench/results/reliability.json bench/results/reliability_faults.json bench/RESULTS.md

# Locust, headless, fixed time and user count: starts a server on the demo workspace (made if
# missing) unless LOADTEST_HOST names a running one; writes Locust's CSV and a summary
# (bench/results/locust_*). Offered load is about users x 5 requests/s.
LOADTEST_HOST ?=
LOADTEST_EVENTS ?=
LOADTEST_USERS ?= 30
LOADTEST_TIME ?= 60s
loadtest: setup
	$(PY) -m bench.loadtest --users $(LOADTEST_USERS) --run-time $(LOADTEST_TIME) --workspace $(DEMO_OUT) \
	  $(if $(LOADTEST_HOST),--host $(LOADTEST_HOST)) $(if $(LOADTEST_EVENTS),--events $(LOADTEST_EVENTS))

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .benchmarks

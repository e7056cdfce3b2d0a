"""`parity backtest`: what stale, missing and slow feature reads cost a release's quality.

Sits above server/ (it runs the server's own read policy, decode and request pipeline) and
beside pipeline/ (it scores parity eval's held-out slice with eval's metric):

- asof.py: the store's records as of a past time (batch engine states, the server's bytes)
- latency.py: how long a store read takes (observed samples or a fitted lognormal)
- conditions.py: what is varied (one set at a time, then all) and how
- replay.py: the held-out requests through the server's path under each condition
- report.py: the table, the JSON (its schema is documented there), the tolerance, the plot

No torch: tests/test_layering.py imports it with torch blocked.
"""

"""Watching what is served: the served log, skew and drift checks, rollout statistics.

Sits beside export/ above features/ (torch-free): the server writes the served log and
exports drift gauges with it, and `parity monitor` reads it back.
"""

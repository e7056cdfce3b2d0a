"""Benchmarks of the feature store (`make bench`); not collected by `make test`."""

"""Parity's serving layer: an async gRPC server (grpc.aio) for two-stage recommendations.

Modules, from the outside in:
  app          the process: grpc.aio server, health, reflection, metrics endpoint, TLS, SIGTERM drain
  servicer     thin Recommender handlers (proto ↔ typed queries, errors → status codes)
  admin        the Admin service (LoadRelease, GetStatus) behind a bearer token
  service      the request path's orchestration: caches, store budget and fallbacks, worker threads
  pipeline     the pure computation: user tower → ANN + cold-start candidates → assemble → int8 ranker → top k
  state        the served snapshot (release + catalogue + item table), skew guard, atomic swap
  user_features, items, seen   what is read from the online store and how it is decoded
  caches, metrics, validation, config, clock, errors, bootstrap
  client       a typed Python client for backends

The server imports features/, export/ and the generated proto code; never torch or models/.
"""
